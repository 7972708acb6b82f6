//! Connection tracking: the table every dataplane consults before it asks the policy.
//!
//! One entry per flow, found from either direction (the key is canonicalised and hashed
//! once, see `entry.rs`). An entry holds what the data path needs on every packet or byte
//! (state, counters, last seen) and what the control plane needs later (verdict generation,
//! the two workload identities, the name an egress flow was admitted for, a handle to cut the
//! flow when a reload revokes it).
//!
//! Layout: N shards picked by the key's keyed hash. Each shard has
//! - a slab (`slab.rs`): entries stored in place in chunks of up to 1,024 that are
//!   allocated as the shard first grows and then re-used through a free list, never freed:
//!   no allocation per flow, and memory cannot run ahead of the live entries under a flood
//!   (a removed slot waits in limbo only while a batch lookup that began before its removal
//!   is still running, see below). Each entry is two parts: what a packet touches (key,
//!   state, counters) in one aligned 64-byte line, and what only the control plane reads in
//!   24 bytes of a parallel array, so a lookup's hit costs two cache lines, bucket and entry;
//! - an index: a fixed array of 64-byte buckets of fifteen 4-byte words (a hash tag in the
//!   bits a slot id does not need, and the slot id) plus an overflow count, probed linearly
//!   from the key's home bucket: about 5 bytes per slot of capacity (14 with the 8-byte
//!   words it had before; BENCHMARKS.md, "Sixth look"). A bucket is scanned four words at
//!   a time. A probe stops at the first bucket whose overflow count is 0, so a miss costs one
//!   cache line in the common case; the counts are exact (decremented when the entry that
//!   overflowed is removed), so probe lengths do not degrade under churn. Nothing moves once
//!   published, so a reader never misses an entry that stays in the table;
//! - both the index and the slab's hot parts in the table's arena (`pages.rs`): blocks the
//!   shards share, on 2 MiB huge pages where the kernel has them, so that a lookup's two
//!   random lines do not also cost two page walks;
//! - a mutex taken only by writers of that shard (insert, remove, evict, the expiry sweep)
//!   guarding the free and limbo lists and the eviction queue.
//!
//! Lookups take no lock at all: they cannot wait for a writer. They read the index words,
//! then *pin* the slot a word names (an atomic count on the entry itself) and check that
//! it is live and holds the key. A writer never re-uses a pinned slot (the free list skips
//! it), so a reader's `&Entry` is one flow's entry for as long as it holds it.
//! [`EntryRef`] is a pinned slot: what `insert` and `lookup` return and what proxied flows
//! keep for their lifetime. The packet path's batch lookup ([`Conntrack::lookup_many`])
//! pins nothing: each call is a grace period (`grace.rs`), and a removed slot is re-used
//! only once every call that could have seen it has returned. The choice against
//! `scc::HashIndex` of `Arc<Entry>` (the previous layout), dashmap and papaya was made by
//! benchmark (`benches/conntrack.rs`, BENCHMARKS.md "Connection tracking").
//!
//! Bounded: a global capacity (atomic reservation) and a per-shard share. At the limit an
//! unassured entry (UDP/ICMP unreplied, TCP not established, closing) is evicted, oldest
//! first, from the shard's FIFO of 4-byte slot ids (amortised O(1): every queued id is
//! popped at most once; stale ids are skipped or compacted away); if none can be, the new
//! flow is refused. Both are counted. Expiry is incremental ([`Conntrack::expire_step`],
//! `expiry.rs`), so no caller ever stops the world.
//!
//! Keys: TCP/UDP/SCTP use the ports; ICMP echo puts the identifier in the originator's
//! source port and 0 in the destination port, so an echo reply is the reverse key.
//!
//! Per new flow the table allocates nothing once a shard's slab has grown to its
//! high-water mark (a chunk per 1,024 slots before that); proxied, packet and IPv6 flows
//! add one small side allocation (cut handle, name, IPv6 addresses, a packet TCP flow's
//! window bounds). Lookups and per-packet
//! updates allocate nothing.
//!
//! Not here: deciding (`policy`), forwarding (`dataplane`), logging (`telemetry`).

mod config;
mod entry;
mod expiry;
mod grace;
mod pages;
mod slab;
pub mod tcp_state;
pub mod tcp_window;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use thiserror::Error;

use crate::flow::{FlowKey, Proto};

pub use config::{ConntrackConfig, ConntrackConfigError};
pub use entry::{CutSignal, Entry, EntryInit, FlowState};
pub use tcp_state::{Side, TcpConn, TcpFlags, TcpInvalid, TcpState};
pub use tcp_window::{OutOfWindow, Segment as TcpSegmentNumbers, TcpWindow};

use entry::{NIL, PackedProbe, Probe, QUEUED, Seeds};
use expiry::{Cursor, Timeouts};
use grace::Readers;
use pages::Arena;
use slab::{Slab, Slot};

/// Why a new flow could not be tracked.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InsertError {
    #[error("connection table full ({capacity} entries) and nothing evictable")]
    Full { capacity: usize },
    #[error("flow already tracked")]
    Exists,
}

/// How many neighbouring shards an insert tries to evict from when its own shard has
/// nothing evictable but the table as a whole is full.
const NEIGHBOURS: usize = 4;

/// Index words per bucket; the sixteenth word of the 64-byte bucket is its overflow count.
const WAYS: usize = 15;

/// Slots of shard capacity per index bucket: at most 80% of the index words are used when
/// a shard is at its cap, 64% at its even share of the capacity. Buckets of fifteen keep
/// overflow rare at that load (bucketised linear probing), and every bucket fewer is index
/// that stays in cache.
const SLOTS_PER_BUCKET: usize = 12;

/// Largest slab chunk, in entries (88 KiB).
const MAX_CHUNK_BITS: u32 = 10;

/// How many free-list heads an insert looks at before it gives up on pinned slots and
/// takes a fresh one.
const FREE_TRIES: usize = 4;

/// One cache line of the index: fifteen words, each a tag and a slot id (see
/// [`Shard::word`]) or 0 when empty, and the number of entries whose home bucket comes
/// before this one but which live after it.
#[repr(C, align(64))]
#[derive(Default)]
struct Bucket {
    words: [AtomicU32; WAYS],
    overflow: AtomicU32,
}

impl Bucket {
    /// Which words carry `tag` (bit `i` for word `i`), `id_max` being the shard's id mask
    /// (a word carries the tag when it differs from it only in the id bits). Computed
    /// without a branch per word: where in a bucket a key's word sits is random, so a branch
    /// on each compare would be mispredicted on most lookups.
    ///
    /// On x86_64 the line is read as four 16-byte vectors and compared four words at a
    /// time: fifteen scalar compares made batch lookups slower than seven 8-byte ones had
    /// been, four vector compares faster (same-process A/B, BENCHMARKS.md "Sixth look").
    ///
    /// The words are read by an `asm!` load rather than an intrinsic because they are
    /// atomics that writers store concurrently: the CPU reads each aligned 4-byte word of
    /// a 16-byte aligned load whole (aligned 16-byte loads are even atomic as a whole on
    /// CPUs with AVX), so each word is read as by a relaxed atomic load, which an
    /// intrinsic's plain load would not be in Rust's memory model. A plain x86 load is also
    /// what the SeqCst load of the portable version compiles to (`grace.rs` says why batch
    /// readers need SeqCst), and the `asm!` block is a compiler barrier for the atomics
    /// around it. The answer only picks which words [`Shard::examine`] re-reads atomically
    /// and checks.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    fn tagged(&self, tag: u32, id_max: u32) -> u32 {
        use std::arch::x86_64::{
            __m128i, _mm_and_si128, _mm_castsi128_ps, _mm_cmpeq_epi32, _mm_movemask_ps,
            _mm_set1_epi32,
        };
        // SAFETY: `self` is a live, 64-byte aligned bucket of sixteen 4-byte atomics, so the
        // four aligned loads read exactly its 64 bytes; they write nothing and touch no
        // stack or flags. The intrinsics need only SSE2, part of the x86_64 baseline.
        unsafe {
            let (w0, w1, w2, w3): (__m128i, __m128i, __m128i, __m128i);
            std::arch::asm!(
                "movdqa {w0}, xmmword ptr [{p}]",
                "movdqa {w1}, xmmword ptr [{p} + 16]",
                "movdqa {w2}, xmmword ptr [{p} + 32]",
                "movdqa {w3}, xmmword ptr [{p} + 48]",
                p = in(reg) self,
                w0 = out(xmm_reg) w0,
                w1 = out(xmm_reg) w1,
                w2 = out(xmm_reg) w2,
                w3 = out(xmm_reg) w3,
                options(nostack, preserves_flags, readonly),
            );
            // Bit casts: the tag and the mask as the vector lanes' signed type.
            let tag = _mm_set1_epi32(tag.cast_signed());
            let hi = _mm_set1_epi32((!id_max).cast_signed());
            let lanes = |w: __m128i| -> u32 {
                let eq = _mm_cmpeq_epi32(_mm_and_si128(w, hi), tag);
                _mm_movemask_ps(_mm_castsi128_ps(eq)).cast_unsigned()
            };
            // The sixteenth word is the overflow count, not a way.
            (lanes(w0) | lanes(w1) << 4 | lanes(w2) << 8 | lanes(w3) << 12) & ((1 << WAYS) - 1)
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    fn tagged(&self, tag: u32, id_max: u32) -> u32 {
        tagged_portable(self, tag, id_max)
    }
}

/// Each shard's cap: its even share of `capacity` plus 25% for hash imbalance (the global
/// count is the limit).
fn shard_cap(capacity: usize, shards: usize) -> usize {
    let share = capacity.div_ceil(shards);
    share + share / 4 + 16
}

/// The low bits of a shard's index words that hold a slot id, for `max_slots` slots; the
/// bits above are the tag. At most 30 bits, so that a tag keeps its top bit (a used word is
/// never 0) and at least one hash bit; `ConntrackConfig::validate`'s limits need at most 29.
fn id_mask(max_slots: usize) -> u32 {
    let bits = max_slots.next_power_of_two().trailing_zeros().min(30);
    (1 << bits) - 1
}

/// [`Bucket::tagged`] for any target: the same answer, one atomic load per word.
#[cfg(any(test, not(target_arch = "x86_64")))]
#[inline]
fn tagged_portable(bucket: &Bucket, tag: u32, id_max: u32) -> u32 {
    let mut mask = 0;
    for (i, w) in bucket.words.iter().enumerate() {
        // SeqCst (a plain load on x86): see `grace.rs` for why batch readers need it.
        mask |= u32::from(w.load(Ordering::SeqCst) ^ tag <= id_max) << i;
    }
    mask
}

/// One shard: the index readers use, the slab, the shadow count, the writers' state.
///
/// What a lookup reads (the index, the slab's chunk tables, the id mask) comes first, in
/// one cache line of its own: left to the compiler, the fields sat on three lines, each a
/// likely L1 miss per key with 128 shards (BENCHMARKS.md, "Sixth look"). Writers' fields
/// come after, so an insert does not take the line from readers.
#[repr(C, align(64))]
struct Shard {
    index: Index,
    slab: Slab,
    /// The low bits of an index word that hold the slot id (all ids are below it + 1); the
    /// bits above are the tag.
    id_max: u32,
    /// Where the index and the slab's hot parts live (shared by the table's shards): kept
    /// here so that a shard an [`EntryRef`] holds keeps its memory.
    arena: Arc<Arena>,
    /// The table's hash keys (a copy: writers re-hash an entry to find its index word).
    seeds: Seeds,
    /// Slots handed out from the slab so far (the sweep and `for_each` scan below it).
    high: AtomicU32,
    max_slots: usize,
    len: AtomicUsize,
    writer: Mutex<Writer>,
}

/// A shard's index: its buckets, in the table's arena (`pages.rs`), which the shard keeps
/// alive. Reads as a slice.
struct Index {
    buckets: NonNull<Bucket>,
    len: usize,
}

impl Index {
    /// `len` empty buckets from `arena`.
    fn new(arena: &Arena, len: usize) -> Index {
        let buckets = arena.take(len * std::mem::size_of::<Bucket>()).cast();
        Index { buckets, len }
    }
}

impl std::ops::Deref for Index {
    type Target = [Bucket];

    fn deref(&self) -> &[Bucket] {
        // SAFETY: the arena gave `len` buckets' worth of zeroed, line-aligned bytes, and a
        // bucket of zeros is an empty bucket (all its fields are atomic integers). The
        // memory stays in place while the arena lives, and the shard owning this index
        // holds the arena.
        unsafe { std::slice::from_raw_parts(self.buckets.as_ptr(), self.len) }
    }
}

// SAFETY: an `Index` is a shared slice of buckets, which are atomics (`Sync`).
unsafe impl Send for Index {}
// SAFETY: as above.
unsafe impl Sync for Index {}

/// A FIFO of slot ids linked through [`Entry`]'s `link` (the slots are not live).
#[derive(Debug, Clone, Copy)]
struct SlotList {
    head: u32,
    tail: u32,
    len: usize,
}

impl SlotList {
    const EMPTY: SlotList = SlotList { head: NIL, tail: NIL, len: 0 };
}

/// What only the shard's writers touch.
#[derive(Debug)]
struct Writer {
    /// Slots a new flow may take, oldest freed first.
    free: SlotList,
    /// Removed slots that a batch reader may still be looking at (see `grace.rs`): `open`
    /// takes new ones; `closed`, stamped `closed_at`, joins `free` once the readers that
    /// could have seen its slots have left.
    open: SlotList,
    closed: SlotList,
    closed_at: u64,
    /// Slot ids of entries that were evictable when queued, oldest first.
    queue: VecDeque<u32>,
    /// Compact when the queue grows past this (keeps it O(live entries), amortised O(1)).
    compact_at: usize,
}

impl Shard {
    /// A shard for `shard_cap` live entries, with `pin_slack` more slots for removed
    /// entries still pinned by a handle or in limbo (not re-used until released).
    fn new(shard_cap: usize, pin_slack: usize, seeds: Seeds, arena: &Arc<Arena>) -> Shard {
        let buckets = Shard::buckets(shard_cap);
        let id_max = id_mask(shard_cap + pin_slack);
        // Only reachable without `ConntrackConfig::validate`: a shard too big for its ids
        // refuses new flows past the last id rather than mixing ids into tags.
        let max_slots = (shard_cap + pin_slack).min(id_max as usize + 1);
        let chunk_bits = max_slots.next_power_of_two().trailing_zeros().min(MAX_CHUNK_BITS);
        Shard {
            seeds,
            index: Index::new(arena, buckets),
            id_max,
            arena: arena.clone(),
            slab: Slab::new(max_slots, chunk_bits),
            high: AtomicU32::new(0),
            max_slots,
            len: AtomicUsize::new(0),
            writer: Mutex::new(Writer {
                free: SlotList::EMPTY,
                open: SlotList::EMPTY,
                closed: SlotList::EMPTY,
                closed_at: 0,
                queue: VecDeque::new(),
                compact_at: 0,
            }),
        }
    }

    /// Index buckets for a shard of `shard_cap` entries.
    fn buckets(shard_cap: usize) -> usize {
        shard_cap.div_ceil(SLOTS_PER_BUCKET).max(2)
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock leaves at worst a leaked slot or a stale queue
        // entry (both tolerated), so a poisoned lock is still usable.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tag of a key hashing to `h`: hash bits 16..48 (the home bucket comes from the
    /// top bits, the shard from the bottom ones) above the id bits, with the top bit set so
    /// that a used word is never 0. How many bits it has depends on the shard's size: 16 at
    /// 2M entries with the automatic shard count, never fewer than 12 with it. A tag only
    /// filters; a lookup always compares the entry's key.
    #[inline]
    fn tag(&self, h: u64) -> u32 {
        ((h >> 16) as u32 | 0x8000_0000) & !self.id_max
    }

    /// The index word for slot `id` of an entry whose key hashes to `h`.
    #[inline]
    fn word(&self, h: u64, id: u32) -> u32 {
        self.tag(h) | id
    }

    #[inline]
    fn slot(&self, id: u32) -> Option<Slot<'_>> {
        self.slab.get(id)
    }

    /// The key's home bucket: the top hash bits scaled to the bucket count.
    #[inline]
    fn home(&self, h: u64) -> usize {
        (((h >> 32) * self.index.len() as u64) >> 32) as usize
    }

    #[inline]
    fn next(&self, b: usize) -> usize {
        if b + 1 == self.index.len() { 0 } else { b + 1 }
    }

    /// Finds the live entry for `p` and calls `f` with its slot id, the entry and the side,
    /// the slot pinned meanwhile. No lock; a writer cannot make it wait.
    #[inline]
    fn find<R>(&self, p: &Probe, f: impl FnOnce(u32, &Entry, Side) -> R) -> Option<R> {
        let tag = self.tag(p.hash);
        let mut b = self.home(p.hash);
        for _ in 0..self.index.len() {
            let bucket = &self.index[b];
            let mask = bucket.tagged(tag, self.id_max);
            if let Some((id, held, side)) = self.examine(bucket, mask, tag, p, true) {
                return Some(f(id, &held.entry, side));
            }
            if bucket.overflow.load(Ordering::Acquire) == 0 {
                return None;
            }
            b = self.next(b);
        }
        None
    }

    /// Tries the words of `bucket` that carried the probe's tag (`mask`, from
    /// [`Bucket::tagged`]) in order: the first slot that holds the probed key, with its id
    /// and the side. Each word is read again here and skipped if its tag changed meanwhile
    /// (a word that gained the tag since is not looked at: that insert raced this lookup).
    /// The slot is pinned for as long as the [`Held`] lives, unless `pin` is false because
    /// the caller is a batch reader inside a grace period (`grace.rs`), which keeps the
    /// slot from being re-used without touching it.
    #[inline(always)]
    fn examine(
        &self,
        bucket: &Bucket,
        mut mask: u32,
        tag: u32,
        p: &Probe,
        pin: bool,
    ) -> Option<(u32, Held<'_>, Side)> {
        while mask != 0 {
            // SeqCst as in `Bucket::tagged`.
            let word = bucket.words[mask.trailing_zeros() as usize].load(Ordering::SeqCst);
            mask &= mask - 1;
            if word ^ tag > self.id_max {
                continue;
            }
            let id = word & self.id_max;
            let Some(e) = self.slot(id) else { continue };
            if !(if pin { e.pin() } else { e.is_live() }) {
                continue;
            }
            let held = Held { entry: e, pinned: pin };
            if let Some(side) = held.entry.matches(p) {
                return Some((id, held, side));
            }
        }
        None
    }

    /// Makes slot `id` findable under hash `h` (writer lock held). False if the index has
    /// no empty word at all (cannot happen at the sizes `new` picks; handled anyway).
    fn publish(&self, h: u64, id: u32) -> bool {
        let home = self.home(h);
        let mut b = home;
        for _ in 0..self.index.len() {
            let bucket = &self.index[b];
            if let Some(w) = bucket.words.iter().find(|w| w.load(Ordering::Relaxed) == 0) {
                // Overflow counts first: a reader that finds the word must not have stopped
                // before it.
                let mut o = home;
                while o != b {
                    self.index[o].overflow.fetch_add(1, Ordering::Release);
                    o = self.next(o);
                }
                w.store(self.word(h, id), Ordering::Release);
                return true;
            }
            b = self.next(b);
        }
        false
    }

    /// Removes slot `id`'s word (writer lock held).
    fn unpublish(&self, h: u64, id: u32) {
        let want = self.word(h, id);
        let home = self.home(h);
        let mut b = home;
        for _ in 0..self.index.len() {
            let bucket = &self.index[b];
            if let Some(w) = bucket.words.iter().find(|w| w.load(Ordering::Relaxed) == want) {
                // SeqCst: batch readers' grace periods are ordered against it (`grace.rs`).
                w.store(0, Ordering::SeqCst);
                let mut o = home;
                while o != b {
                    self.index[o].overflow.fetch_sub(1, Ordering::Release);
                    o = self.next(o);
                }
                return;
            }
            b = self.next(b);
        }
    }

    /// A slot for a new entry: the oldest free one that nobody pins (refilling the free
    /// list from limbo when it runs dry), else a fresh one.
    fn alloc(&self, w: &mut Writer, readers: &Readers) -> Option<u32> {
        if let Some(id) = self.take_free(w) {
            return Some(id);
        }
        if self.reclaim(w, readers)
            && let Some(id) = self.take_free(w)
        {
            return Some(id);
        }
        let high = self.high.load(Ordering::Relaxed);
        if high as usize >= self.max_slots {
            return None;
        }
        if !self.slab.grow_to(high, &self.arena) {
            return None;
        }
        self.high.store(high + 1, Ordering::Release);
        Some(high)
    }

    /// The oldest free slot nobody pins, looking at no more than `FREE_TRIES` (pinned
    /// ones go to the back).
    fn take_free(&self, w: &mut Writer) -> Option<u32> {
        for _ in 0..w.free.len.min(FREE_TRIES) {
            let id = self.pop(&mut w.free)?;
            if !self.slot(id)?.is_pinned() {
                return Some(id);
            }
            self.push(&mut w.free, id);
        }
        None
    }

    /// Moves limbo slots no batch reader can still see to the free list; closes the open
    /// limbo list if none is closed. Returns whether any moved. Never waits.
    fn reclaim(&self, w: &mut Writer, readers: &Readers) -> bool {
        if w.closed.len == 0 && w.open.len != 0 {
            w.closed = std::mem::replace(&mut w.open, SlotList::EMPTY);
            w.closed_at = readers.stamp();
        }
        if w.closed.len == 0 {
            return false;
        }
        if readers.safe() <= w.closed_at {
            // A reader from before the stamp is still inside a call: make sure the ones
            // entering next do not hold the list back too.
            readers.advance();
            return false;
        }
        let closed = std::mem::replace(&mut w.closed, SlotList::EMPTY);
        if w.free.len == 0 {
            w.free = closed;
        } else if let Some(tail) = self.slot(w.free.tail) {
            tail.free(closed.head);
            w.free.tail = closed.tail;
            w.free.len += closed.len;
        }
        true
    }

    /// Takes the first slot of `list`.
    fn pop(&self, list: &mut SlotList) -> Option<u32> {
        if list.len == 0 {
            return None;
        }
        let id = list.head;
        list.head = self.slot(id)?.next_free();
        list.len -= 1;
        Some(id)
    }

    /// Marks slot `id` not live and appends it to `list`.
    fn push(&self, list: &mut SlotList, id: u32) {
        let Some(e) = self.slot(id) else { return };
        e.free(NIL);
        if list.len == 0 {
            list.head = id;
        } else if let Some(tail) = self.slot(list.tail) {
            tail.free(id);
        }
        list.tail = id;
        list.len += 1;
    }

    /// Removes the live entry in slot `id` from the index and puts the slot in limbo.
    fn remove_slot(&self, w: &mut Writer, id: u32, e: &Entry) {
        self.unpublish(e.hash(&self.seeds), id);
        self.push(&mut w.open, id);
        self.len.fetch_sub(1, Ordering::Relaxed);
    }

    fn enqueue(&self, w: &mut Writer, id: u32, shard_cap: usize) {
        w.queue.push_back(id);
        let limit = w.compact_at.max(shard_cap + shard_cap / 2 + 64);
        if w.queue.len() > limit {
            for &id in &w.queue {
                if let Some(e) = self.slot(id) {
                    e.swap_flag(QUEUED, false);
                }
            }
            // Keep each live, still evictable entry once (a re-used slot may be queued
            // twice), in queue order.
            w.queue.retain(|&id| {
                self.slot(id).is_some_and(|e| {
                    e.is_live() && e.is_evictable() && e.swap_flag(QUEUED, true) & QUEUED == 0
                })
            });
            // Never compact again before the queue has doubled: amortised O(1) per push.
            w.compact_at = w.queue.len() * 2;
        }
    }

    /// Pops queued ids until one names an entry that is still evictable, cuts and removes
    /// it. Returns whether one was evicted.
    fn evict_one(&self, w: &mut Writer) -> bool {
        while let Some(id) = w.queue.pop_front() {
            let Some(e) = self.slot(id) else { continue };
            if !e.is_live() {
                continue;
            }
            e.swap_flag(QUEUED, false);
            if !e.is_evictable() {
                continue;
            }
            // Cut before the slot can be re-used (its cut handle goes with the next flow).
            e.trigger_cut();
            self.remove_slot(w, id, &e);
            return true;
        }
        false
    }
}

/// How many keys ahead of the one it examines [`Conntrack::lookup_many`] prefetches the
/// entry: enough lookups' worth of work to cover a cache miss, few enough that the lines
/// are still in L1 when used. 8 while each key's stages also stalled on copies of its
/// state; with those gone (BENCHMARKS.md, "Fifth look") an entry is asked for 16 keys
/// ahead (8, 12, 16 and 20 measured within the machine's noise of each other).
const ENTRY_AHEAD: usize = 16;
/// How many keys before its entry is prefetched a key's bucket is: buckets depend on
/// nothing, so a batch of 32 (a NIC burst) has every bucket requested at the start; a
/// shorter distance (6 and 6, the first version) left the bucket reads waiting on memory
/// (same-binary pairs: misses 0.73×, hits 0.87× with 24 and 8).
const BUCKET_AHEAD: usize = 16;
/// Lookups in flight in [`Conntrack::lookup_many`]'s pipeline (at least
/// `BUCKET_AHEAD + ENTRY_AHEAD`: a key's place is re-filled once it has been examined). A
/// power of two, so finding a place is a mask, not a division.
const RING: usize = 32;
const _: () = assert!(RING >= BUCKET_AHEAD + ENTRY_AHEAD, "a key's slot is re-filled before use");

/// One key of [`Conntrack::lookup_many`]'s pipeline between its stages (48 bytes).
#[derive(Clone, Copy)]
struct Pending<'a> {
    probe: PackedProbe,
    shard: &'a Shard,
    bucket: &'a Bucket,
    /// The key's tag in its shard's index.
    tag: u32,
    /// Which of the home bucket's words carried the tag when stage 2 read it.
    mask: u32,
}

/// Asks the CPU to start loading the cache line holding `p` (a hint; no effect on
/// correctness, and nothing on targets without one).
#[inline(always)]
fn prefetch<T>(p: &T) {
    prefetch_ptr(std::ptr::from_ref(p).cast());
}

/// [`prefetch`] of an address (never dereferenced).
#[inline]
pub(crate) fn prefetch_ptr(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint that never faults, whatever the address; SSE is part of
    // the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Drops a reader's pin, even if the reader's closure panics.
struct Unpin<'a>(&'a Entry);

impl Drop for Unpin<'_> {
    fn drop(&mut self) {
        self.0.unpin();
    }
}

/// An entry a lookup found: pinned (dropping this unpins it), or held by the caller's
/// grace period.
struct Held<'a> {
    entry: Slot<'a>,
    pinned: bool,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.pinned {
            self.entry.unpin();
        }
    }
}

/// A tracked flow's entry, pinned: its slot is not re-used while this lives, so it stays
/// this flow's entry even after the flow is removed from the table (like an `Arc` that
/// outlives its map entry). Cloning takes another pin. Keeps its shard's memory alive.
pub struct EntryRef {
    shard: Arc<Shard>,
    entry: Entry,
}

impl EntryRef {
    /// Pins `e` (already pinned by the caller, or its shard's writer lock held).
    fn new(shard: &Arc<Shard>, e: &Entry) -> EntryRef {
        e.pin_again();
        // SAFETY: the handle keeps the shard, and so the slot's memory, alive.
        EntryRef { shard: shard.clone(), entry: unsafe { e.alias() } }
    }

    /// Whether both handles name the same slot.
    pub fn ptr_eq(a: &EntryRef, b: &EntryRef) -> bool {
        a.entry.slot_id() == b.entry.slot_id()
    }
}

impl std::ops::Deref for EntryRef {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl Clone for EntryRef {
    fn clone(&self) -> EntryRef {
        EntryRef::new(&self.shard, self)
    }
}

impl Drop for EntryRef {
    fn drop(&mut self) {
        self.unpin();
    }
}

impl std::fmt::Debug for EntryRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("EntryRef").field(&**self).finish()
    }
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

/// The table.
pub struct Conntrack {
    shards: Box<[Arc<Shard>]>,
    seeds: Seeds,
    mask: usize,
    shard_cap: usize,
    cfg: ConntrackConfig,
    timeouts: Timeouts,
    epoch: Instant,
    stats: ConntrackStats,
    /// Shadow total (reserved before an insert, so it never exceeds the capacity).
    len: AtomicUsize,
    cursor: Mutex<Cursor>,
    /// Batch readers' grace periods (`lookup_many`).
    readers: Readers,
    /// The shards' index and hot entry parts (each shard holds it too).
    arena: Arc<Arena>,
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
        let shard_cap = shard_cap(cfg.capacity, n);
        let seeds = Seeds::random();
        // Every shard's index and, at most, every slot's hot part.
        let index = Shard::buckets(shard_cap) * std::mem::size_of::<Bucket>();
        let hot = (shard_cap + cfg.pin_slack) * std::mem::size_of::<entry::Hot>();
        let most = n * (index + hot);
        let arena = Arc::new(Arena::new(most));
        let shards =
            (0..n).map(|_| Arc::new(Shard::new(shard_cap, cfg.pin_slack, seeds, &arena))).collect();
        Conntrack {
            shards,
            seeds,
            mask: n - 1,
            shard_cap,
            cfg: cfg.clone(),
            timeouts: Timeouts::new(cfg),
            epoch: Instant::now(),
            stats: ConntrackStats::default(),
            len: AtomicUsize::new(0),
            cursor: Mutex::new(Cursor::default()),
            readers: Readers::new(cfg.batch_readers),
            arena,
        }
    }

    /// Bytes the table has mapped itself, outside the global allocator: its index and the
    /// hot parts of its entries (`pages.rs`). Pages are only resident once written.
    pub fn mapped_bytes(&self) -> usize {
        self.arena.mapped()
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    #[inline]
    fn shard_index(&self, hash: u64) -> usize {
        // Low bits: the index uses bits 16..47 (tag) and the top bits (bucket).
        hash as usize & self.mask
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
    ) -> Result<EntryRef, InsertError> {
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
    ) -> Result<EntryRef, InsertError> {
        self.insert_inner(&key, init, Some(conn), now)
    }

    fn insert_inner(
        &self,
        key: &FlowKey,
        init: EntryInit,
        tcp: Option<TcpConn>,
        now: Instant,
    ) -> Result<EntryRef, InsertError> {
        let probe = Probe::new(key, &self.seeds);
        let si = self.shard_index(probe.hash);
        let shard = &self.shards[si];
        let mut w = shard.lock();
        if shard.find(&probe, |_, _, _| ()).is_some() {
            return Err(InsertError::Exists);
        }
        if !self.make_room(si, &mut w) {
            return Err(self.refuse());
        }
        let Some((id, e)) =
            shard.alloc(&mut w, &self.readers).and_then(|id| Some((id, shard.slot(id)?)))
        else {
            // Every spare slot is pinned by a handle of a removed flow: give the
            // reservation back and refuse.
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(self.refuse());
        };
        e.init(key, init, tcp, self.ms(now));
        if !shard.publish(probe.hash, id) {
            shard.push(&mut w.free, id);
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(self.refuse());
        }
        shard.len.fetch_add(1, Ordering::Relaxed);
        if e.is_evictable() {
            e.swap_flag(QUEUED, true);
            shard.enqueue(&mut w, id, self.shard_cap);
        }
        self.stats.inserted.fetch_add(1, Ordering::Relaxed);
        Ok(EntryRef::new(shard, &e))
    }

    fn refuse(&self) -> InsertError {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        InsertError::Full { capacity: self.cfg.capacity }
    }

    /// Reserves one place in shard `si` (whose writer lock the caller holds) and in the
    /// table, evicting to make room. Returns false if the flow must be refused.
    fn make_room(&self, si: usize, w: &mut Writer) -> bool {
        let shard = &self.shards[si];
        if shard.len.load(Ordering::Relaxed) >= self.shard_cap {
            if !shard.evict_one(w) {
                return false;
            }
            self.evicted();
        }
        for _ in 0..=NEIGHBOURS + 1 {
            if self.reserve() {
                return true;
            }
            // The table is full: evict here, or else in a neighbour shard that is not busy
            // (try_lock: never wait on, or deadlock with, another writer).
            if shard.evict_one(w) {
                self.evicted();
                continue;
            }
            let mut found = false;
            for i in 1..=NEIGHBOURS.min(self.mask) {
                let other = &self.shards[(si + i) & self.mask];
                let Ok(mut ow) = other.writer.try_lock() else { continue };
                if other.evict_one(&mut ow) {
                    self.evicted();
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
    fn evicted(&self) {
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.stats.evicted.fetch_add(1, Ordering::Relaxed);
    }

    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.cfg.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    /// Finds a flow from either direction; the handle pins its entry (keep it no longer
    /// than needed: a removed flow's slot is re-used only once every handle is dropped).
    pub fn lookup(&self, key: &FlowKey) -> Option<EntryRef> {
        let probe = Probe::new(key, &self.seeds);
        let shard = &self.shards[self.shard_index(probe.hash)];
        shard.find(&probe, |_, e, _| EntryRef::new(shard, e))
    }

    /// The packet path's lookup: no lock, no allocation, no shared counter; calls `f` with
    /// the entry (pinned for the call) and the side the packet with `key` travels on.
    #[inline]
    pub fn lookup_with<R>(&self, key: &FlowKey, f: impl FnOnce(&Entry, Side) -> R) -> Option<R> {
        let probe = Probe::new(key, &self.seeds);
        self.shards[self.shard_index(probe.hash)].find(&probe, |_, e, side| f(e, side))
    }

    /// The packet path's lookup for a received batch: looks up every key of `keys` and
    /// calls `f(i, hit)` for each in order, `hit` being the entry and the side, or `None`.
    /// Same semantics as [`Conntrack::lookup_with`] per key, with two differences that make
    /// it several times cheaper per key:
    /// - it pins nothing: the call is one grace period (`grace.rs`), during which no entry
    ///   it finds is handed to another flow. So `f` must not block, and a batch should be
    ///   a burst (tens of keys), not a table scan. When more threads are inside this call
    ///   than `batch_readers` allows, the extra ones pin each entry instead (counted);
    /// - it is a software pipeline: key `i + BUCKET_AHEAD + ENTRY_AHEAD` is hashed and its
    ///   bucket prefetched, key `i + ENTRY_AHEAD`'s bucket (arrived by now) is scanned for
    ///   the key's tag and the entry its first matching word names is prefetched (its hot
    ///   line), key `i` is examined with both lines in cache. The cache misses of
    ///   consecutive lookups overlap instead of being paid one after another. A key carries
    ///   48 bytes between the stages (its packed probe, shard, bucket, tag and the words
    ///   carrying it): the bucket is scanned once and an IPv4 key canonicalised once.
    ///
    /// No lock, no allocation.
    pub fn lookup_many<'t>(
        &'t self,
        keys: &[FlowKey],
        mut f: impl FnMut(usize, Option<(&Entry, Side)>),
    ) {
        let guard = self.readers.enter();
        let pin = guard.is_none();
        let n = keys.len();
        // Small and cheap to set up: no copy of a 96-byte probe per key, no division by an
        // odd ring size, and the shard and bucket found once.
        let first = &*self.shards[0];
        let mut ring = [Pending {
            probe: PackedProbe::default(),
            shard: first,
            bucket: &first.index[0],
            tag: 0,
            mask: 0,
        }; RING];
        // Hashes key `j`, prefetches its bucket and fills its place in the ring. In place:
        // returned by value, the 48 bytes were written to a temporary with 8-byte stores
        // and copied with 16-byte loads, which the CPU cannot forward from those stores
        // (a quarter of the batch's samples sat on that copy, "Sixth look").
        let stage1 = |q: &mut Pending<'t>, j: usize| self.stage1(q, &keys[j]);
        // Reads the bucket (arrived by now), keeps which words carry the key's tag and
        // prefetches the first one's entry (almost always the key's).
        let stage2 = |q: &mut Pending<'_>, key: &FlowKey| {
            q.mask = q.bucket.tagged(q.tag, q.shard.id_max);
            if q.mask != 0 {
                let word = q.bucket.words[q.mask.trailing_zeros() as usize].load(Ordering::Relaxed);
                q.shard.slab.prefetch(word & q.shard.id_max);
                // A packet TCP flow's hit reads its window bounds through the cold part's
                // side allocation (benches/packet_filter.rs, hit/tcp).
                if key.proto == Proto::Tcp {
                    q.shard.slab.prefetch_cold(word & q.shard.id_max);
                }
            }
        };
        for j in 0..n.min(BUCKET_AHEAD + ENTRY_AHEAD) {
            stage1(&mut ring[j % RING], j);
        }
        for j in 0..n.min(ENTRY_AHEAD) {
            stage2(&mut ring[j % RING], &keys[j]);
        }
        for i in 0..n {
            if i + ENTRY_AHEAD < n {
                stage2(&mut ring[(i + ENTRY_AHEAD) % RING], &keys[i + ENTRY_AHEAD]);
            }
            let q = &ring[i % RING];
            let probe = q.probe.unpack(&keys[i]);
            if let Some((_, held, side)) = q.shard.examine(q.bucket, q.mask, q.tag, &probe, pin) {
                f(i, Some((&held.entry, side)));
            } else if q.bucket.overflow.load(Ordering::Acquire) == 0 {
                f(i, None);
            } else {
                // The key may live past its home bucket: the general (pinning) path.
                let mut f = Some(&mut f);
                let hit = q.shard.find(&probe, |_, e, side| {
                    if let Some(f) = f.take() {
                        f(i, Some((e, side)));
                    }
                });
                if hit.is_none()
                    && let Some(f) = f.take()
                {
                    f(i, None);
                }
            }
            // Key `i` is done: its place in the ring takes the key furthest ahead.
            if i + BUCKET_AHEAD + ENTRY_AHEAD < n {
                let j = i + BUCKET_AHEAD + ENTRY_AHEAD;
                stage1(&mut ring[j % RING], j);
            }
        }
        drop(guard);
    }

    /// [`Conntrack::lookup_many`]'s first stage for `key`: hashes it, prefetches its bucket
    /// and fills its place `q` in the ring.
    #[inline(always)]
    fn stage1<'t>(&'t self, q: &mut Pending<'t>, key: &FlowKey) {
        let probe = Probe::new(key, &self.seeds);
        let shard = &*self.shards[self.shard_index(probe.hash)];
        let bucket = &shard.index[shard.home(probe.hash)];
        prefetch(bucket);
        let tag = shard.tag(probe.hash);
        *q = Pending { probe: PackedProbe::pack(&probe), shard, bucket, tag, mask: 0 };
    }

    /// Marks activity on an entry (the packet path calls this on every hit).
    pub fn touch(&self, entry: &Entry, now: Instant) {
        entry.set_last_seen_ms(self.ms(now));
    }

    /// [`Conntrack::touch`] with the time already converted ([`Conntrack::now_ms`]): a
    /// burst converts its one `now` once.
    #[inline]
    pub fn touch_ms(&self, entry: &Entry, now_ms: u64) {
        entry.set_last_seen_ms(now_ms);
    }

    /// Forgets a flow (closed connection). Returns whether it was tracked. Does not cut it:
    /// the caller is the one closing it.
    pub fn remove(&self, key: &FlowKey) -> bool {
        let probe = Probe::new(key, &self.seeds);
        let shard = &self.shards[self.shard_index(probe.hash)];
        let mut w = shard.lock();
        // Under the writer lock nobody else can free the slot `find` returns.
        let Some(id) = shard.find(&probe, |id, _, _| id) else {
            return false;
        };
        let Some(e) = shard.slot(id) else { return false };
        shard.remove_slot(&mut w, id, &e);
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.stats.removed.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// How long `entry` may stay idle in its current protocol and state.
    pub fn timeout(&self, entry: &Entry) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeouts.for_entry(entry))
    }

    /// Calls `f` on every entry (weakly consistent: concurrent inserts may or may not be
    /// seen). For revalidation and `/flows`; never on the hot path.
    pub fn for_each(&self, mut f: impl FnMut(&EntryRef)) {
        for shard in &self.shards {
            let high = shard.high.load(Ordering::Acquire);
            for id in 0..high {
                let Some(e) = shard.slot(id) else { continue };
                if e.pin() {
                    let _pin = Unpin(&e);
                    f(&EntryRef::new(shard, &e));
                }
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

    /// Batch lookups that found every `batch_readers` slot taken and pinned each entry
    /// instead (`flowgate_conntrack_batch_fallbacks_total`).
    pub fn batch_fallbacks(&self) -> u64 {
        self.readers.fallbacks.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

    use super::*;
    use crate::policy::Generation;

    fn key(i: u16) -> FlowKey {
        let at = |ip: u32, port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from_bits(ip), port));
        FlowKey::new(Proto::Udp, at(0x0a00_0001, 1000 + i), at(0xc612_0001, 53))
    }

    /// Puts a word with `victim`'s tag but `decoy`'s slot in front of `victim`'s own word in
    /// its home bucket: what a tag collision looks like to a lookup.
    fn shadow(ct: &Conntrack, victim: &FlowKey, decoy: &FlowKey) {
        let (pv, pd) = (Probe::new(victim, &ct.seeds), Probe::new(decoy, &ct.seeds));
        let shard = &ct.shards[ct.shard_index(pv.hash)];
        let decoy_id = ct.shards[ct.shard_index(pd.hash)].find(&pd, |id, _, _| id);
        let decoy_id = decoy_id.expect("decoy tracked");
        let victim_id = shard.find(&pv, |id, _, _| id).expect("victim tracked");
        let words = &shard.index[shard.home(pv.hash)].words;
        let own =
            words.iter().position(|w| w.load(Ordering::Relaxed) == shard.word(pv.hash, victim_id));
        let own = own.expect("victim in its home bucket");
        let free = words.iter().skip(own).position(|w| w.load(Ordering::Relaxed) == 0);
        let free = own + free.expect("room after it");
        words[free].store(shard.word(pv.hash, victim_id), Ordering::Release);
        words[own].store(shard.word(pv.hash, decoy_id), Ordering::Release);
    }

    /// A shard holding the table's whole capacity (one shard: 64 % of its index words) has
    /// buckets that overflow into the next. Every flow is found from both directions by both
    /// lookups; after every other flow is removed the rest still are and the removed are
    /// not; once all are removed every word and overflow count is back to 0.
    #[test]
    fn a_full_shard_finds_every_flow_through_overflowing_buckets() {
        let cap = 20_000;
        let ct =
            Conntrack::new(&ConntrackConfig { capacity: cap, shards: 1, ..Default::default() });
        let now = Instant::now();
        let at = |ip: u32, port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from_bits(ip), port));
        let keys: Vec<FlowKey> = (0..cap as u32)
            .map(|i| {
                FlowKey::new(
                    Proto::Tcp,
                    at(0x0a00_0000 | i >> 6, 1000 + (i & 63) as u16),
                    at(0xc612_0001, 443),
                )
            })
            .collect();
        for k in &keys {
            ct.insert(*k, EntryInit::plain(FlowState::Assured, Generation(1)), now).expect("room");
        }
        let shard = &ct.shards[0];
        let overflowing =
            shard.index.iter().filter(|b| b.overflow.load(Ordering::Relaxed) > 0).count();
        assert!(overflowing > 0, "no bucket overflowed: the test would not cover the probe");
        let check = |present: &dyn Fn(usize) -> bool| {
            for (i, k) in keys.iter().enumerate() {
                assert_eq!(ct.lookup_with(k, |e, _| e.key()), present(i).then_some(*k), "{i}");
                assert_eq!(ct.lookup_with(&k.reversed(), |_, _| ()).is_some(), present(i));
            }
            for (c, chunk) in keys.chunks(32).enumerate() {
                ct.lookup_many(chunk, |j, hit| {
                    let i = c * 32 + j;
                    assert_eq!(hit.map(|(e, _)| e.key()), present(i).then_some(keys[i]), "{i}");
                });
            }
        };
        check(&|_| true);
        for k in keys.iter().step_by(2) {
            assert!(ct.remove(k));
        }
        check(&|i| i % 2 == 1);
        for k in keys.iter().skip(1).step_by(2) {
            assert!(ct.remove(k));
        }
        for b in shard.index.iter() {
            assert_eq!(b.overflow.load(Ordering::Relaxed), 0);
            assert!(b.words.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        }
    }

    /// What a lookup reads of its shard is one cache line (see [`Shard`]).
    #[test]
    fn a_shards_reader_fields_share_one_line() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(align_of::<Shard>(), 64);
        assert_eq!(offset_of!(Shard, index), 0);
        assert!(offset_of!(Shard, slab) + size_of::<Slab>() <= 64);
        assert!(offset_of!(Shard, id_max) + size_of::<u32>() <= 64);
    }

    /// The largest table the config accepts, in one shard, still leaves its index words a
    /// tag of the top bit and two hash bits, so no id bit is ever read as a tag.
    #[test]
    fn the_largest_shard_keeps_tag_bits() {
        use config::{MAX_CAPACITY, MAX_PIN_SLACK};
        let worst = id_mask(shard_cap(MAX_CAPACITY, 1) + MAX_PIN_SLACK);
        assert!(worst < 1 << 29, "{worst:#x}");
        assert_eq!(id_mask(shard_cap(2 << 20, 128) + 64), 0x7fff);
        assert_eq!(id_mask(usize::MAX >> 1), (1 << 30) - 1);
    }

    /// The vector scan of a bucket answers as the portable one does, at four tag widths,
    /// in buckets holding the tag in any subset of words, tags one bit away, other tags
    /// and empty words, and with the overflow word carrying the tag.
    #[test]
    fn a_bucket_scan_finds_exactly_the_tagged_words() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for id_bits in [4u32, 15, 22, 29] {
            let id_max = (1u32 << id_bits) - 1;
            for _ in 0..2000 {
                let tag = ((rnd() as u32) | 0x8000_0000) & !id_max;
                let bucket = Bucket::default();
                let mut want = 0;
                for (i, w) in bucket.words.iter().enumerate() {
                    let id = rnd() as u32 & id_max;
                    let word = match rnd() % 4 {
                        0 => 0,
                        1 => {
                            want |= 1 << i;
                            tag | id
                        }
                        // Another tag: differs from ours in one random tag bit.
                        2 => {
                            (tag ^ (1 << (id_bits + (rnd() % u64::from(32 - id_bits)) as u32))) | id
                        }
                        _ => (rnd() as u32 | 0x8000_0000) & !id_max | id,
                    };
                    if word != 0 && word & !id_max == tag {
                        want |= 1 << i;
                    }
                    w.store(word, Ordering::Relaxed);
                }
                // The overflow word never counts, whatever it holds.
                bucket.overflow.store(tag | 1, Ordering::Relaxed);
                assert_eq!(bucket.tagged(tag, id_max), want, "tag {tag:#x} id_max {id_max:#x}");
                assert_eq!(tagged_portable(&bucket, tag, id_max), want);
            }
        }
    }

    /// A tag collision: the first word with the key's tag names another flow's slot
    /// (or a slot since freed). Both lookups must go past it to the key's own entry; tags
    /// collide too rarely for the other tests ever to meet one.
    #[test]
    fn lookups_go_past_a_tag_match_that_names_another_flow() {
        // One shard, so the decoys share the victims' slab.
        let ct =
            Conntrack::new(&ConntrackConfig { capacity: 256, shards: 1, ..Default::default() });
        let now = Instant::now();
        for i in 0..8 {
            ct.insert(key(i), EntryInit::plain(FlowState::Assured, Generation(1)), now)
                .expect("room");
        }
        // Victim 0 shadowed by a live flow, victim 2 by a slot that is then freed.
        shadow(&ct, &key(0), &key(1));
        shadow(&ct, &key(2), &key(3));
        assert!(ct.remove(&key(3)));
        let keys: Vec<FlowKey> = (0..8).map(key).collect();
        let mut seen = Vec::new();
        ct.lookup_many(&keys, |i, hit| seen.push((i, hit.map(|(e, _)| e.key()))));
        let want: Vec<_> = (0..8).map(|i| (i, (i != 3).then(|| key(i as u16)))).collect();
        assert_eq!(seen, want);
        // The single lookup goes past the decoy to the second word with the tag.
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(ct.lookup_with(k, |e, _| e.key()), (i != 3).then_some(*k));
        }
    }
}
