//! Metrics: counters the data path bumps with relaxed atomics (no lock, no allocation), and
//! the decision-latency histogram, merged and rendered only when `/metrics` is scraped.
//!
//! Names are the ones DESIGN.md lists (`flowgate_flows_total{listener,verdict}`, …); the
//! Prometheus rendering lives with the admin API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Per-listener counters. One per configured listener; the listener's tasks hold an `Arc`.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    /// The listener's name from the config.
    pub name: String,
    /// The listener's kind (`tcp`, `udp`, `http-connect`, …).
    pub kind: String,
    pub accepted: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// Connections (or UDP sessions) open now.
    pub active: AtomicU64,
    /// Client → upstream and upstream → client bytes.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Handshakes (PROXY header, CONNECT, SOCKS5) rejected as malformed.
    pub handshake_malformed: AtomicU64,
    /// Handshakes that did not complete within their timeout.
    pub handshake_timeout: AtomicU64,
    /// PROXY headers from peers outside `trusted_proxies`.
    pub untrusted_proxy: AtomicU64,
    /// Times accepting paused because `max_connections` was reached.
    pub limit_reached: AtomicU64,
    /// Upstream connects that failed.
    pub upstream_failed: AtomicU64,
    /// New flows refused because the conntrack table was full.
    pub conntrack_full: AtomicU64,
    /// `accept` errors (EMFILE pauses the loop; the loop never stops for them).
    pub accept_errors: AtomicU64,
    /// UDP datagrams dropped for a reason other than policy (session limit, send buffer
    /// full, malformed PROXY header).
    pub datagrams_dropped: AtomicU64,
}

impl ListenerCounters {
    /// Adds one to a counter; the data path's only way to touch a metric.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every metric source, shared by the data path (which bumps) and the admin API (which
/// renders).
#[derive(Debug, Default)]
pub struct Registry {
    listeners: Mutex<Vec<Arc<ListenerCounters>>>,
    /// Policy decision latency.
    pub decision: DecisionLatency,
    /// Flow-log events dropped because the log channel was full.
    pub flowlog_dropped: AtomicU64,
    /// Flow-log events folded into an earlier identical one.
    pub flowlog_folded: AtomicU64,
}

impl Registry {
    /// Registers a listener's counters (at start-up, not on the data path).
    pub fn listener(&self, name: &str, kind: &str) -> Arc<ListenerCounters> {
        let c = Arc::new(ListenerCounters {
            name: name.to_owned(),
            kind: kind.to_owned(),
            ..ListenerCounters::default()
        });
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).push(c.clone());
        c
    }

    /// All listeners' counters, for rendering.
    pub fn listeners(&self) -> Vec<Arc<ListenerCounters>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Decision latency. (First version: a sum and a count; the hdrhistogram per worker, merged
/// at scrape time, replaces it.)
#[derive(Debug, Default)]
pub struct DecisionLatency {
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl DecisionLatency {
    #[inline]
    pub fn record(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }
}
