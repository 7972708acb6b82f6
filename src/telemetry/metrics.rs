//! Metrics: counters the data path bumps with relaxed atomics (no lock, no allocation), and
//! the decision-latency histogram, merged and rendered only when `/metrics` is scraped.
//!
//! Names are the ones docs/DESIGN.md lists (`flowgate_flows_total{listener,verdict}`, …), defined
//! once in [`super::exposition::names`], which renders these sources as Prometheus text.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;

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
    /// Egress clients refused at once because `max_handshakes` were in progress.
    pub handshakes_full: AtomicU64,
    /// SOCKS5 UDP ASSOCIATE requests refused because `udp_max_associations` were open.
    pub udp_associations_full: AtomicU64,
    /// SOCKS5 UDP associations closed after `udp_associate_idle_timeout` without a datagram.
    pub udp_associations_idle: AtomicU64,
    /// Upstream connects that failed.
    pub upstream_failed: AtomicU64,
    /// New flows refused because the conntrack table was full.
    pub conntrack_full: AtomicU64,
    /// `accept` errors (EMFILE pauses the loop; the loop never stops for them).
    pub accept_errors: AtomicU64,
    /// UDP datagrams dropped for a reason other than policy (session limit, send buffer
    /// full, malformed PROXY header).
    pub datagrams_dropped: AtomicU64,
    /// Egress listeners: proxy credentials missing where required, or wrong.
    pub auth_failed: AtomicU64,
    /// `http-connect` with `verify_sni`: tunnels refused because the TLS ClientHello
    /// named another host than the CONNECT request (or was broken).
    pub sni_refused: AtomicU64,
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
    /// Reloads, revalidation, emergency entries, admin API.
    pub control: ControlCounters,
    /// The packet filter's front ends (`[packet]`), read at scrape.
    packet: Mutex<Vec<Arc<dyn PacketSource>>>,
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

    /// Registers a packet front end's counters (at start-up).
    pub fn packet_source(&self, source: Arc<dyn PacketSource>) {
        self.packet.lock().unwrap_or_else(|e| e.into_inner()).push(source);
    }

    /// Every packet front end's totals, summed over its workers now.
    pub fn packet_totals(&self) -> Vec<PacketTotals> {
        let sources = self.packet.lock().unwrap_or_else(|e| e.into_inner()).clone();
        sources.iter().map(|s| s.totals()).collect()
    }
}

/// A packet front end's counters as the scrape sees them. The packet dataplane keeps its
/// counters per worker, in its own types (which telemetry, below it, cannot name), and sums
/// them here when `/metrics` is scraped — never on the packet path.
pub trait PacketSource: Send + Sync + std::fmt::Debug {
    fn totals(&self) -> PacketTotals;
}

/// One packet front end's counters, summed over its workers: plain values for rendering.
/// The label sets (`dropped`, `malformed`) come with their labels, in a fixed order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketTotals {
    /// The `frontend` label (`tun`, `afpacket`).
    pub frontend: &'static str,
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// Dropped packets by reason (`policy`, `malformed`, …, and the device's own).
    pub dropped: Vec<(&'static str, u64)>,
    /// Malformed packets by the classifier's reason.
    pub malformed: Vec<(&'static str, u64)>,
    pub rejects_sent: u64,
    pub rejects_limited: u64,
    /// Device (TUN queue, ring) reads, writes and polls that failed.
    pub device_errors: u64,
}

/// Control-plane counters. Cold path: bumped at most once per reload or admin request.
#[derive(Debug)]
pub struct ControlCounters {
    pub reloads_ok: AtomicU64,
    pub reloads_unchanged: AtomicU64,
    pub reloads_error: AtomicU64,
    /// 1 while the last reload attempt was rejected (the sources are broken), else 0.
    pub reload_failing: AtomicU64,
    /// Unix seconds of the last successful reload.
    pub last_success_unix: AtomicU64,
    /// Duration of every reload attempt (load + compile + swap), microseconds.
    pub reload_duration: Mutex<Histogram<u64>>,
    pub reload_seconds_sum_us: AtomicU64,
    /// Established flows decided again after a reload, and those cut.
    pub revalidated: AtomicU64,
    pub revoked: AtomicU64,
    pub emergency_accepted: AtomicU64,
    pub emergency_rejected: AtomicU64,
    /// Debounced change notifications from the source watcher.
    pub watch_events: AtomicU64,
    pub audit_write_errors: AtomicU64,
    /// Admin API requests refused: missing or wrong token (401), malformed (400).
    pub admin_unauthorized: AtomicU64,
    pub admin_bad_request: AtomicU64,
    pub admin_requests: AtomicU64,
    /// `/flows` answers cut short by the cap.
    pub admin_flows_truncated: AtomicU64,
    /// 1 when the policy comes from etcd (the two gauges below are exported only then).
    pub source_remote: AtomicU64,
    /// 1 while the etcd source is reachable (its watch runs), else 0.
    pub source_connected: AtomicU64,
    /// The etcd revision of the policy in force.
    pub source_revision: AtomicU64,
    /// etcd answers refused for exceeding `source.max_answer_bytes`.
    pub source_too_large: AtomicU64,
}

impl Default for ControlCounters {
    fn default() -> Self {
        ControlCounters {
            reloads_ok: AtomicU64::new(0),
            reloads_unchanged: AtomicU64::new(0),
            reloads_error: AtomicU64::new(0),
            reload_failing: AtomicU64::new(0),
            last_success_unix: AtomicU64::new(0),
            reload_duration: Mutex::new(new_histogram(3_600_000_000)),
            reload_seconds_sum_us: AtomicU64::new(0),
            revalidated: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            emergency_accepted: AtomicU64::new(0),
            emergency_rejected: AtomicU64::new(0),
            watch_events: AtomicU64::new(0),
            audit_write_errors: AtomicU64::new(0),
            admin_unauthorized: AtomicU64::new(0),
            admin_bad_request: AtomicU64::new(0),
            admin_requests: AtomicU64::new(0),
            admin_flows_truncated: AtomicU64::new(0),
            source_remote: AtomicU64::new(0),
            source_connected: AtomicU64::new(0),
            source_revision: AtomicU64::new(0),
            source_too_large: AtomicU64::new(0),
        }
    }
}

/// How a reload attempt ended, as the metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new generation is in force.
    Ok,
    /// The sources had not changed; nothing was swapped.
    Unchanged,
    /// Rejected; the previous generation keeps serving.
    Error,
}

/// One reload attempt in the metrics' terms (the control plane makes one from its report).
#[derive(Clone, Copy, Debug)]
pub struct ReloadSample {
    pub outcome: ReloadOutcome,
    /// When the attempt was made.
    pub time: SystemTime,
    /// Load + compile + swap.
    pub duration: Duration,
    /// Established flows decided again, and those cut.
    pub revalidated: usize,
    pub revoked: usize,
}

impl ControlCounters {
    /// Counts one reload attempt.
    pub fn record_reload(&self, report: &ReloadSample) {
        let counter = match report.outcome {
            ReloadOutcome::Ok => &self.reloads_ok,
            ReloadOutcome::Unchanged => &self.reloads_unchanged,
            ReloadOutcome::Error => &self.reloads_error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.reload_failing
            .store(u64::from(report.outcome == ReloadOutcome::Error), Ordering::Relaxed);
        if report.outcome == ReloadOutcome::Ok {
            let unix =
                report.time.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            self.last_success_unix.store(unix, Ordering::Relaxed);
        }
        let us = report.duration.as_micros().min(u128::from(u64::MAX)) as u64;
        self.reload_seconds_sum_us.fetch_add(us, Ordering::Relaxed);
        self.reload_duration.lock().unwrap_or_else(|e| e.into_inner()).saturating_record(us.max(1));
        self.revalidated.fetch_add(report.revalidated as u64, Ordering::Relaxed);
        self.revoked.fetch_add(report.revoked as u64, Ordering::Relaxed);
    }
}

/// A histogram of values from 1 to `max`, 2 significant digits (1 % resolution): enough
/// for latency quantiles, and small (tens of KiB) so one per worker costs little.
fn new_histogram(max: u64) -> Histogram<u64> {
    Histogram::new_with_bounds(1, max, 2).expect("bounds 1..max with 2 digits are valid")
}

/// Recorder slots; a thread takes slot `n % SLOTS` where `n` counts threads that ever
/// recorded. More worker threads than slots share slots (still correct, see `record`).
const SLOTS: usize = 32;

/// Largest recordable decision time: 10 s (anything longer is clamped).
const MAX_NS: u64 = 10_000_000_000;

/// One worker's recorder, on its own cache lines so workers never share one.
#[derive(Debug)]
#[repr(align(128))]
struct Slot {
    hist: Mutex<Histogram<u64>>,
    /// Exact sum and count (the histogram only keeps buckets).
    sum_ns: AtomicU64,
    count: AtomicU64,
}

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// Policy decision latency: an hdrhistogram per worker thread, merged when scraped.
///
/// Recording takes the calling thread's own slot with `try_lock`, which never waits: if the
/// slot is busy (the scraper is merging it, or another thread shares it), the sample goes
/// to the next free slot, and after a bounded number of tries it is counted in `dropped`.
/// The scraper holds one slot at a time for one histogram add.
#[derive(Debug)]
pub struct DecisionLatency {
    slots: Box<[Slot]>,
    dropped: AtomicU64,
}

impl Default for DecisionLatency {
    fn default() -> Self {
        DecisionLatency {
            slots: (0..SLOTS)
                .map(|_| Slot {
                    hist: Mutex::new(new_histogram(MAX_NS)),
                    sum_ns: AtomicU64::new(0),
                    count: AtomicU64::new(0),
                })
                .collect(),
            dropped: AtomicU64::new(0),
        }
    }
}

/// A merged view of [`DecisionLatency`] at scrape time.
#[derive(Debug, Clone)]
pub struct LatencySnapshot {
    pub histogram: Histogram<u64>,
    pub count: u64,
    pub sum: Duration,
    pub dropped: u64,
}

impl DecisionLatency {
    /// Records one decision's duration. No allocation; never waits on a lock.
    #[inline]
    pub fn record(&self, d: Duration) {
        let ns = (d.as_nanos().min(u128::from(MAX_NS)) as u64).max(1);
        let home = SLOT.with(|s| {
            let v = s.get();
            if v != usize::MAX {
                return v;
            }
            let v = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
            s.set(v);
            v
        });
        for i in 0..4 {
            let slot = &self.slots[(home + i) % SLOTS];
            if let Ok(mut h) = slot.hist.try_lock() {
                // `ns` is clamped into the histogram's range, so this cannot fail.
                let _ = h.record(ns);
                drop(h);
                slot.sum_ns.fetch_add(ns, Ordering::Relaxed);
                slot.count.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Decisions recorded so far.
    pub fn count(&self) -> u64 {
        self.slots.iter().map(|s| s.count.load(Ordering::Relaxed)).sum()
    }

    /// Total time of the recorded decisions.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.slots.iter().map(|s| s.sum_ns.load(Ordering::Relaxed)).sum())
    }

    /// Merges every slot (scrape time, cold).
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut merged = new_histogram(MAX_NS);
        for slot in self.slots.iter() {
            let h = slot.hist.lock().unwrap_or_else(|e| e.into_inner());
            // Same bounds on both sides, so adding cannot fail.
            let _ = merged.add(&*h);
        }
        LatencySnapshot {
            count: merged.len(),
            sum: self.sum(),
            histogram: merged,
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_from_many_threads_merges() {
        let lat = Arc::new(DecisionLatency::default());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let lat = lat.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u64 {
                        lat.record(Duration::from_nanos(100 + t * 1000 + i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = lat.snapshot();
        assert_eq!(snap.count + snap.dropped, 8000);
        assert_eq!(lat.count(), snap.count);
        let p50 = snap.histogram.value_at_quantile(0.5);
        assert!((3000..=5200).contains(&p50), "p50 {p50}");
        assert!(snap.histogram.max() >= 7000);
    }

    #[test]
    fn out_of_range_values_are_clamped() {
        let lat = DecisionLatency::default();
        lat.record(Duration::ZERO);
        lat.record(Duration::from_secs(3600));
        let snap = lat.snapshot();
        assert_eq!(snap.count, 2);
        assert_eq!(snap.histogram.min(), 1);
    }
}
