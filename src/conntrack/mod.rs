//! Connection tracking: the table every dataplane consults before it asks the policy.
//!
//! One entry per flow, found from either direction (the key is canonicalised and hashed
//! once, see `entry.rs`). An entry holds what the data path needs on every packet or byte
//! (state, counters, last seen) and what the control plane needs later (verdict generation,
//! the two workload identities, the name an egress flow was admitted for, a handle to cut the
//! flow when a reload revokes it).
//!
//! Layout: N shards picked by the key's keyed hash. Each shard is a lock-free-readable
//! `scc::HashIndex` whose slots hold one pointer (`Arc<Entry>`; the key lives in the entry),
//! an atomic shadow count, and a mutex taken only by writers of that shard (insert, evict,
//! the expiry sweep) guarding its eviction queue. Lookups take no lock at all: they cannot
//! wait for a writer. The map was chosen against dashmap, papaya and per-worker maps by
//! benchmark (`benches/conntrack.rs`, BENCHMARKS-conntrack.md).
//!
//! Bounded: a global capacity (atomic reservation) and a per-shard share. At the limit an
//! unassured entry (UDP/ICMP unreplied, TCP not established, closing) is evicted, oldest
//! first, from the shard's FIFO of 4-byte key hashes (amortised O(1): every queued hash is
//! popped at most once; stale hashes are skipped or compacted away); if none can be, the new
//! flow is refused. Both are counted. Expiry is incremental ([`Conntrack::expire_step`],
//! `expiry.rs`), so no caller ever stops the world. Removed entries are freed once no
//! reader can still see them (epoch-based reclamation), so under a flood memory sits
//! above the steady-state figure by a bounded backlog (BENCHMARKS-conntrack.md).
//!
//! Keys: TCP/UDP/SCTP use the ports; ICMP echo puts the identifier in the originator's
//! source port and 0 in the destination port, so an echo reply is the reverse key.
//!
//! Per new flow the table allocates the `Arc<Entry>` (80 + 16 bytes) and, rarely, a map
//! bucket; lookups and per-packet updates allocate nothing.
//!
//! Not here: deciding (`policy`), forwarding (`dataplane`), logging (`telemetry`).

mod config;
mod entry;
mod expiry;
pub mod tcp_state;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use scc::HashIndex;
use thiserror::Error;

use crate::flow::{FlowKey, Proto};

pub use config::{ConntrackConfig, ConntrackConfigError};
pub use entry::{CutSignal, Entry, EntryInit, FlowState};
pub use tcp_state::{Side, TcpConn, TcpFlags, TcpInvalid, TcpState};

use entry::{ByHash, Exact, PassThrough, Probe, QUEUED, Slot};
use expiry::{Cursor, Timeouts};

/// Why a new flow could not be tracked.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InsertError {
    #[error("connection table full ({capacity} entries) and nothing evictable")]
    Full { capacity: usize },
    #[error("flow already tracked")]
    Exists,
}

/// Totals for metrics; monotonic.
#[derive(Debug, Default)]
pub struct ConntrackStats {
    pub inserted: AtomicU64,
    /// Unassured entries dropped to make room (`flowgate_conntrack_evictions_total`).
    pub evicted: AtomicU64,
    /// New flows refused: table full and nothing evictable.
    pub refused: AtomicU64,
    pub expired: AtomicU64,
    /// Entries removed by their owner ([`Conntrack::remove`]).
    pub removed: AtomicU64,
}

/// How many neighbouring shards an insert tries to evict from when its own shard has
/// nothing evictable but the table as a whole is full.
const NEIGHBOURS: usize = 4;

/// One shard: the map readers use, the shadow count, the writers' eviction queue.
struct Shard {
    map: HashIndex<Slot, (), PassThrough>,
    len: AtomicUsize,
    queue: Mutex<EvictQueue>,
}

/// Hashes of entries that were evictable when queued, oldest first.
#[derive(Debug, Default)]
struct EvictQueue {
    hashes: VecDeque<u32>,
    /// Compact when the queue grows past this (keeps it O(live entries), amortised O(1)).
    compact_at: usize,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, EvictQueue> {
        // A panic while holding the queue cannot leave it inconsistent (it is only a hint
        // list), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, q: &mut EvictQueue, hash: u32, shard_cap: usize) {
        q.hashes.push_back(hash);
        let limit = q.compact_at.max(shard_cap + shard_cap / 2 + 64);
        if q.hashes.len() > limit {
            q.hashes.retain(|&h| {
                self.map
                    .peek_with(&ByHash(h), |slot, ()| {
                        let keep = slot.0.is_evictable();
                        if !keep {
                            slot.0.swap_flag(QUEUED, false);
                        }
                        keep
                    })
                    .unwrap_or(false)
            });
            // Never compact again before the queue has doubled: amortised O(1) per push.
            q.compact_at = q.hashes.len() * 2;
        }
    }

    /// Pops queued hashes until one names an entry that is still evictable, and removes it.
    fn evict_one(&self, q: &mut EvictQueue) -> Option<Arc<Entry>> {
        while let Some(h) = q.hashes.pop_front() {
            let Some(e) = self.map.peek_with(&ByHash(h), |slot, ()| slot.0.clone()) else {
                continue;
            };
            e.swap_flag(QUEUED, false);
            if !e.is_evictable() {
                continue;
            }
            if self.map.remove_sync(&Exact { hash: e.hash64(), entry: &e }) {
                self.len.fetch_sub(1, Ordering::Relaxed);
                return Some(e);
            }
        }
        None
    }
}

/// See [`Conntrack::read_guard`]. Not `Send`: it pins the current thread.
pub struct ReadGuard(#[allow(dead_code)] scc::Guard);

/// The table.
pub struct Conntrack {
    shards: Box<[Shard]>,
    mask: usize,
    shard_cap: usize,
    cfg: ConntrackConfig,
    timeouts: Timeouts,
    epoch: Instant,
    stats: ConntrackStats,
    /// Shadow total (reserved before an insert, so it never exceeds the capacity).
    len: AtomicUsize,
    cursor: Mutex<Cursor>,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("shards", &self.shards.len())
            .field("len", &self.len())
            .field("capacity", &self.cfg.capacity)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Conntrack {
    pub fn new(cfg: &ConntrackConfig) -> Conntrack {
        let n = cfg.effective_shards();
        let share = cfg.capacity.div_ceil(n);
        // Slack over the exact share absorbs hash imbalance; the global count is the limit.
        let shard_cap = share + share / 4 + 16;
        let shards = (0..n)
            .map(|_| Shard {
                map: HashIndex::with_capacity_and_hasher(share.min(1 << 16), PassThrough),
                len: AtomicUsize::new(0),
                queue: Mutex::new(EvictQueue::default()),
            })
            .collect();
        Conntrack {
            shards,
            mask: n - 1,
            shard_cap,
            cfg: cfg.clone(),
            timeouts: Timeouts::new(cfg),
            epoch: Instant::now(),
            stats: ConntrackStats::default(),
            len: AtomicUsize::new(0),
            cursor: Mutex::new(Cursor::default()),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn shard_index(&self, hash: u64) -> usize {
        // The map buckets by the top bits and tags by the low byte; take the middle.
        (hash >> 20) as usize & self.mask
    }

    /// Tracks a new flow. At capacity an unassured entry is evicted to make room; if none
    /// can be, the flow is refused ([`InsertError::Full`]) and counted.
    ///
    /// # Errors
    /// [`InsertError::Full`] (refused, counted) or [`InsertError::Exists`].
    pub fn insert(
        &self,
        key: FlowKey,
        init: EntryInit,
        now: Instant,
    ) -> Result<Arc<Entry>, InsertError> {
        self.insert_inner(&key, init, None, now)
    }

    /// Tracks a new packet-dataplane TCP flow whose state machine starts at `conn`
    /// (from [`EntryInit::tcp_packet`] / [`TcpConn::open`]).
    ///
    /// # Errors
    /// As [`Conntrack::insert`].
    pub fn insert_tcp(
        &self,
        key: FlowKey,
        init: EntryInit,
        conn: TcpConn,
        now: Instant,
    ) -> Result<Arc<Entry>, InsertError> {
        self.insert_inner(&key, init, Some(conn), now)
    }

    fn insert_inner(
        &self,
        key: &FlowKey,
        init: EntryInit,
        tcp: Option<TcpConn>,
        now: Instant,
    ) -> Result<Arc<Entry>, InsertError> {
        let probe = Probe::new(key);
        let si = self.shard_index(probe.hash);
        let shard = &self.shards[si];
        let mut q = shard.lock();
        if shard.map.contains(&probe) {
            return Err(InsertError::Exists);
        }
        if !self.make_room(si, &mut q) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(InsertError::Full { capacity: self.cfg.capacity });
        }
        let entry = Arc::new(Entry::new(key, init, tcp, self.ms(now)));
        if shard.map.insert_sync(Slot(entry.clone()), ()).is_err() {
            // Unreachable while inserts hold the shard lock; give the reservation back.
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(InsertError::Exists);
        }
        shard.len.fetch_add(1, Ordering::Relaxed);
        if entry.is_evictable() {
            entry.swap_flag(QUEUED, true);
            shard.enqueue(&mut q, probe.h32, self.shard_cap);
        }
        self.stats.inserted.fetch_add(1, Ordering::Relaxed);
        Ok(entry)
    }

    /// Reserves one place in shard `si` (whose queue the caller holds) and in the table,
    /// evicting to make room. Returns false if the flow must be refused.
    fn make_room(&self, si: usize, q: &mut EvictQueue) -> bool {
        let shard = &self.shards[si];
        if shard.len.load(Ordering::Relaxed) >= self.shard_cap {
            match shard.evict_one(q) {
                Some(victim) => self.evicted(victim),
                None => return false,
            }
        }
        for _ in 0..=NEIGHBOURS + 1 {
            if self.reserve() {
                return true;
            }
            // The table is full: evict here, or else in a neighbour shard that is not busy
            // (try_lock: never wait on, or deadlock with, another writer).
            if let Some(victim) = shard.evict_one(q) {
                self.evicted(victim);
                continue;
            }
            let mut found = false;
            for i in 1..=NEIGHBOURS.min(self.mask) {
                let other = &self.shards[(si + i) & self.mask];
                let Ok(mut oq) = other.queue.try_lock() else { continue };
                if let Some(victim) = other.evict_one(&mut oq) {
                    self.evicted(victim);
                    found = true;
                    break;
                }
            }
            if !found {
                return false;
            }
        }
        false
    }

    /// Accounts for an evicted entry (its shard count was already decremented).
    fn evicted(&self, victim: Arc<Entry>) {
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        victim.trigger_cut();
    }

    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.cfg.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    /// Finds a flow from either direction.
    pub fn lookup(&self, key: &FlowKey) -> Option<Arc<Entry>> {
        let probe = Probe::new(key);
        self.shards[self.shard_index(probe.hash)].map.peek_with(&probe, |slot, ()| slot.0.clone())
    }

    /// The packet path's lookup: no reference count traffic, no lock, no allocation. Calls
    /// `f` with the entry and the side the packet with `key` travels on.
    pub fn lookup_with<R>(&self, key: &FlowKey, f: impl FnOnce(&Entry, Side) -> R) -> Option<R> {
        let probe = Probe::new(key);
        self.shards[self.shard_index(probe.hash)]
            .map
            .peek_with(&probe, |slot, ()| slot.0.matches(&probe).map(|side| f(&slot.0, side)))
            .flatten()
    }

    /// A guard for one batch of lookups on this thread (a packet worker takes one per
    /// received batch). Lookups made while it lives skip the memory-reclamation handshake
    /// (a `SeqCst` fence) each lookup otherwise pays. Measured saving is small (27.1 → 25.5 ns
    /// per hot lookup, `lookup_with_hit_hot64` vs `…_batch64` in benches/conntrack.rs).
    /// Drop it when the batch is done: while it is held, this thread delays the freeing of
    /// removed entries.
    pub fn read_guard(&self) -> ReadGuard {
        ReadGuard(scc::Guard::new())
    }

    /// Marks activity on an entry (the packet path calls this on every hit).
    pub fn touch(&self, entry: &Entry, now: Instant) {
        entry.set_last_seen_ms(self.ms(now));
    }

    /// Forgets a flow (closed connection). Returns whether it was tracked. Does not cut it:
    /// the caller is the one closing it.
    pub fn remove(&self, key: &FlowKey) -> bool {
        let probe = Probe::new(key);
        let shard = &self.shards[self.shard_index(probe.hash)];
        if shard.map.remove_sync(&probe) {
            shard.len.fetch_sub(1, Ordering::Relaxed);
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.stats.removed.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// How long `entry` may stay idle in its current protocol and state.
    pub fn timeout(&self, entry: &Entry) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeouts.for_entry(entry))
    }

    /// Calls `f` on every entry (weakly consistent: concurrent inserts may or may not be
    /// seen). For revalidation and `/flows`; never on the hot path.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Entry>)) {
        for shard in &self.shards {
            let guard = scc::Guard::new();
            for (slot, ()) in shard.map.iter(&guard) {
                f(&slot.0);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.cfg.capacity
    }

    /// Number of shards (for metrics and tests).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
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
