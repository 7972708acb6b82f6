//! Connection tracking: the table every dataplane consults before it asks the policy.
//!
//! One entry per flow, found from either direction (the key is canonicalised). An entry
//! holds what the data path needs on every packet or byte (state, counters, last seen) and
//! what the control plane needs later (verdict generation, the two workload identities, a
//! handle to cut the flow when a reload revokes it).
//!
//! The table is bounded: at capacity, unassured entries are evicted first, otherwise the new
//! flow is refused; both are counted. Expiry is incremental (`expire_step` with a budget),
//! so no caller ever stops the world.
//!
//! Not here: deciding (`policy`), forwarding (`dataplane`), logging (`telemetry`).
//!
//! This first version is a plain sharded map behind the final API; the layout is chosen by
//! benchmark in `benches/conntrack.rs` (see BENCHMARKS.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Deserialize;
use thiserror::Error;

use crate::flow::{FlowKey, Proto};
use crate::policy::{Generation, WorkloadId};

/// `[conntrack]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// Maximum number of tracked flows. Default 262,144.
    pub capacity: usize,
    /// Idle timeouts per protocol and state.
    #[serde(with = "humantime_serde_compat")]
    pub tcp_established: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub tcp_transitory: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub udp_unreplied: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub udp_assured: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub icmp: Duration,
}

impl Default for ConntrackConfig {
    /// Linux-like defaults (nf_conntrack): established TCP 5 days, closing states 2 min,
    /// UDP 30 s until a reply is seen and 180 s after, ICMP 30 s.
    fn default() -> Self {
        ConntrackConfig {
            capacity: 262_144,
            tcp_established: Duration::from_secs(5 * 24 * 3600),
            tcp_transitory: Duration::from_secs(120),
            udp_unreplied: Duration::from_secs(30),
            udp_assured: Duration::from_secs(180),
            icmp: Duration::from_secs(30),
        }
    }
}

/// Durations in the config are written the human way (`30s`, `5m`).
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Lifecycle of a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FlowState {
    /// A proxied connection (or a TCP flow) carrying data.
    Open = 0,
    /// A proxied connection with one side shut down, or TCP FIN seen.
    Closing = 1,
    /// UDP: only the originator has sent.
    Unreplied = 2,
    /// UDP: both sides have sent; evicted last.
    Assured = 3,
}

impl FlowState {
    fn from_u8(v: u8) -> FlowState {
        match v {
            1 => FlowState::Closing,
            2 => FlowState::Unreplied,
            3 => FlowState::Assured,
            _ => FlowState::Open,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            FlowState::Open => "open",
            FlowState::Closing => "closing",
            FlowState::Unreplied => "unreplied",
            FlowState::Assured => "assured",
        }
    }
}

/// Tells a forwarding task that its flow has been cut (revoked by a reload, quarantined).
/// Proxied connections `select!` on [`CutSignal::cut`]; packet flows simply lose their entry.
#[derive(Debug, Default)]
pub struct CutSignal {
    cut: AtomicBool,
    notify: tokio::sync::Notify,
}

impl CutSignal {
    /// Marks the flow as cut and wakes its task. Idempotent.
    pub fn trigger(&self) {
        self.cut.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Completes once the flow is cut.
    pub async fn cut(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_cut() {
                return;
            }
            notified.await;
        }
    }
}

/// What the dataplane knows when it admits a flow.
#[derive(Debug)]
pub struct EntryInit {
    pub state: FlowState,
    pub generation: Generation,
    pub src_workload: Option<WorkloadId>,
    pub dst_workload: Option<WorkloadId>,
    /// Index of the listener (or packet port) that admitted the flow.
    pub listener: u16,
    /// Present for proxied flows, which a reload cuts through it.
    pub cut: Option<Arc<CutSignal>>,
}

/// One tracked flow. Counters and timestamps are atomics: the forwarding task updates them
/// without a lock, readers (`/flows`, revalidation) see a recent value.
#[derive(Debug)]
pub struct Entry {
    /// The key as the originator sent it (not canonicalised).
    pub key: FlowKey,
    pub src_workload: Option<WorkloadId>,
    pub dst_workload: Option<WorkloadId>,
    pub listener: u16,
    pub cut: Option<Arc<CutSignal>>,
    created_ms: u64,
    last_seen_ms: AtomicU64,
    state: AtomicU8,
    generation: AtomicU64,
    /// Bytes and packets, originator → responder and back.
    pub bytes_orig: AtomicU64,
    pub bytes_reply: AtomicU64,
    pub packets_orig: AtomicU64,
    pub packets_reply: AtomicU64,
}

impl Entry {
    pub fn state(&self) -> FlowState {
        FlowState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, s: FlowState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// The policy generation that last allowed this flow.
    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(Ordering::Relaxed))
    }

    pub fn set_generation(&self, g: Generation) {
        self.generation.store(g.0, Ordering::Relaxed);
    }

    /// Milliseconds since the table was created, when the entry was created / last used.
    pub fn created_ms(&self) -> u64 {
        self.created_ms
    }

    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }
}

/// Why a new flow could not be tracked.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InsertError {
    #[error("connection table full ({capacity} entries) and nothing evictable")]
    Full { capacity: usize },
    #[error("flow already tracked")]
    Exists,
}

/// Totals for metrics; monotonic except `entries`.
#[derive(Debug, Default)]
pub struct ConntrackStats {
    pub inserted: AtomicU64,
    pub evicted: AtomicU64,
    pub refused: AtomicU64,
    pub expired: AtomicU64,
}

/// The table.
#[derive(Debug)]
pub struct Conntrack {
    map: DashMap<FlowKey, Arc<Entry>>,
    cfg: ConntrackConfig,
    epoch: Instant,
    stats: ConntrackStats,
}

impl Conntrack {
    pub fn new(cfg: &ConntrackConfig) -> Conntrack {
        Conntrack {
            map: DashMap::new(),
            cfg: cfg.clone(),
            epoch: Instant::now(),
            stats: ConntrackStats::default(),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Tracks a new flow. At capacity an unassured entry is evicted to make room; if none
    /// can be, the flow is refused ([`InsertError::Full`]) and counted.
    pub fn insert(
        &self,
        key: FlowKey,
        init: EntryInit,
        now: Instant,
    ) -> Result<Arc<Entry>, InsertError> {
        if self.map.len() >= self.cfg.capacity && !self.evict_one() {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(InsertError::Full { capacity: self.cfg.capacity });
        }
        let ms = self.ms(now);
        let entry = Arc::new(Entry {
            key,
            src_workload: init.src_workload,
            dst_workload: init.dst_workload,
            listener: init.listener,
            cut: init.cut,
            created_ms: ms,
            last_seen_ms: AtomicU64::new(ms),
            state: AtomicU8::new(init.state as u8),
            generation: AtomicU64::new(init.generation.0),
            bytes_orig: AtomicU64::new(0),
            bytes_reply: AtomicU64::new(0),
            packets_orig: AtomicU64::new(0),
            packets_reply: AtomicU64::new(0),
        });
        match self.map.entry(key.canonical()) {
            dashmap::mapref::entry::Entry::Occupied(_) => Err(InsertError::Exists),
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(entry.clone());
                self.stats.inserted.fetch_add(1, Ordering::Relaxed);
                Ok(entry)
            }
        }
    }

    fn evict_one(&self) -> bool {
        let victim = self
            .map
            .iter()
            .find(|e| matches!(e.value().state(), FlowState::Unreplied) && e.value().cut.is_none())
            .map(|e| *e.key());
        match victim {
            Some(k) => {
                self.map.remove(&k);
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Finds a flow from either direction.
    pub fn lookup(&self, key: &FlowKey) -> Option<Arc<Entry>> {
        self.map.get(&key.canonical()).map(|e| e.value().clone())
    }

    /// Marks activity on an entry (the packet path calls this on every hit).
    pub fn touch(&self, entry: &Entry, now: Instant) {
        entry.last_seen_ms.store(self.ms(now), Ordering::Relaxed);
    }

    /// Forgets a flow (closed connection). Returns whether it was tracked.
    pub fn remove(&self, key: &FlowKey) -> bool {
        self.map.remove(&key.canonical()).is_some()
    }

    /// Expires idle entries, looking at no more than `budget` of them; returns how many
    /// were removed. Called repeatedly by a background task.
    pub fn expire_step(&self, now: Instant, budget: usize) -> usize {
        let now_ms = self.ms(now);
        let dead: Vec<FlowKey> = self
            .map
            .iter()
            .take(budget)
            .filter(|e| {
                let entry = e.value();
                let idle = now_ms.saturating_sub(entry.last_seen_ms());
                u128::from(idle) > self.timeout(entry).as_millis()
            })
            .map(|e| *e.key())
            .collect();
        for k in &dead {
            self.map.remove(k);
        }
        self.stats.expired.fetch_add(dead.len() as u64, Ordering::Relaxed);
        dead.len()
    }

    fn timeout(&self, e: &Entry) -> Duration {
        match (e.key.proto, e.state()) {
            (Proto::Udp, FlowState::Assured) => self.cfg.udp_assured,
            (Proto::Udp, _) => self.cfg.udp_unreplied,
            (Proto::Icmp | Proto::Icmpv6, _) => self.cfg.icmp,
            (_, FlowState::Closing) => self.cfg.tcp_transitory,
            _ => self.cfg.tcp_established,
        }
    }

    /// Calls `f` on every entry (weakly consistent: concurrent inserts may or may not be
    /// seen). For revalidation and `/flows`; never on the hot path.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Entry>)) {
        for e in &self.map {
            f(e.value());
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.cfg.capacity
    }

    pub fn stats(&self) -> &ConntrackStats {
        &self.stats
    }

    /// Milliseconds since the table was created, for `Entry::*_ms` comparisons.
    pub fn now_ms(&self, now: Instant) -> u64 {
        self.ms(now)
    }
}

/// Convenience for tests and the proxy: a TCP key.
pub fn tcp_key(src: SocketAddr, dst: SocketAddr) -> FlowKey {
    FlowKey::new(Proto::Tcp, src, dst)
}
