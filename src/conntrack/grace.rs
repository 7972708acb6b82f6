//! Grace periods for batch readers: how [`super::Conntrack::lookup_many`] reads entries
//! without pinning each one.
//!
//! A pin is an atomic read-modify-write on the entry, twice per lookup; on x86 each is a
//! full barrier, the largest part of a cached lookup's cost. A batch reader instead
//! announces itself once per call in a reader slot, with the table's epoch at the time,
//! and pins nothing. A removed entry's slot is then not handed to a new flow until every
//! reader that might have seen it has finished its call: quiescent-state reclamation, as
//! DPDK's `rte_hash` (with RCU QSBR) and VPP's bihash do it, but for slots of a slab
//! rather than for memory, so nothing is freed late and nothing allocates.
//!
//! The writer's side (`Shard` in `mod.rs`): a removed slot goes to the shard's *open*
//! limbo list, not the free list. When the free list runs dry the writer *closes* the open
//! list, stamping it with the epoch ([`Readers::stamp`]), and moves the closed list to the
//! free list once [`Readers::safe`] is past its stamp: no reader that entered at or before
//! the stamp is still inside a call. Until then the shard takes fresh slots, so a writer
//! never waits for a reader; and it advances the epoch ([`Readers::advance`]), so readers
//! entering from then on do not hold the list back. With no batch reader inside a call
//! (a proxy-only gateway), a closed list is free at once and the epoch never moves.
//!
//! Why that is enough (all of it `SeqCst`, so one total order `S` holds): a reader stores
//! its epoch `e` in its slot, then reads index words. A writer unpublishes a slot's word,
//! then (later, under the same shard lock) closes the list with stamp `s` read from the
//! epoch. If the reader saw the word, its read came before the unpublish in `S`, so its
//! slot store and its epoch read came before the writer's epoch read: `e ≤ s`, and any
//! later scan of the reader slots sees `e` until the reader leaves. A reader that read an
//! epoch `> s` read it after an advance that followed the stamp, so after the unpublish,
//! and can no longer see the word.
//!
//! The slots are a fixed array ([`ConntrackConfig::batch_readers`], default 64): a call
//! that finds every slot busy (more concurrent batch callers than slots) falls back to
//! pinning each entry, which is correct and only slower, and is counted.
//!
//! [`ConntrackConfig::batch_readers`]: super::ConntrackConfig::batch_readers
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// One reader slot on a cache line of its own: 0 when idle, else the epoch its reader
/// entered at (epochs start at 1).
#[repr(align(128))]
#[derive(Default)]
struct Slot(AtomicU64);

/// The table's batch readers and its epoch.
pub(super) struct Readers {
    epoch: AtomicU64,
    slots: Box<[Slot]>,
    /// One past the highest slot ever taken: writers scan no further.
    used: AtomicUsize,
    /// Calls that found every slot busy and pinned entries instead.
    pub(super) fallbacks: AtomicU64,
}

thread_local! {
    /// Where this thread starts looking for a free reader slot (threads spread out, and a
    /// thread usually finds the slot it had last time).
    static HINT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Hands each thread its own starting slot.
static NEXT_HINT: AtomicUsize = AtomicUsize::new(0);

impl Readers {
    pub(super) fn new(slots: usize) -> Readers {
        Readers {
            epoch: AtomicU64::new(1),
            slots: (0..slots).map(|_| Slot::default()).collect(),
            used: AtomicUsize::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    /// Announces a batch reader: until the guard drops, no slot whose word this thread
    /// reads is re-used for another flow. `None` (counted) when every slot is busy.
    #[inline]
    pub(super) fn enter(&self) -> Option<ReadGuard<'_>> {
        let n = self.slots.len();
        if n == 0 {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let start = HINT.with(|h| {
            if h.get() == usize::MAX {
                h.set(NEXT_HINT.fetch_add(1, Ordering::Relaxed));
            }
            h.get()
        }) % n;
        let epoch = self.epoch.load(Ordering::SeqCst);
        for k in 0..n {
            let i = (start + k) % n;
            let slot = &self.slots[i].0;
            if slot.load(Ordering::Relaxed) == 0
                && slot.compare_exchange(0, epoch, Ordering::SeqCst, Ordering::Relaxed).is_ok()
            {
                // Only when it moves: `fetch_max` is a locked write even when it changes
                // nothing, and every batch of every thread would take the line from the
                // others. `used` only grows, so a value already high enough stays so, and a
                // writer's later `SeqCst` load sees at least what this one saw.
                if self.used.load(Ordering::SeqCst) <= i {
                    self.used.fetch_max(i + 1, Ordering::SeqCst);
                }
                if k != 0 {
                    HINT.with(|h| h.set(i));
                }
                return Some(ReadGuard { slot });
            }
        }
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// The stamp of a limbo list whose slots were all unpublished before this call.
    pub(super) fn stamp(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Moves the epoch on, so readers entering from now on are known not to have seen
    /// the slots of any list stamped so far.
    pub(super) fn advance(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The oldest epoch a reader still inside a call entered at (`u64::MAX` if none is):
    /// a list stamped below it is safe to re-use.
    pub(super) fn safe(&self) -> u64 {
        let mut safe = u64::MAX;
        let used = self.used.load(Ordering::SeqCst).min(self.slots.len());
        for slot in &self.slots[..used] {
            let e = slot.0.load(Ordering::SeqCst);
            if e != 0 {
                safe = safe.min(e);
            }
        }
        safe
    }
}

/// A batch reader inside a call; leaving is a plain store.
pub(super) struct ReadGuard<'a> {
    slot: &'a AtomicU64,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.slot.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_safe_once_the_readers_that_could_see_it_have_left() {
        let r = Readers::new(4);
        assert_eq!(r.safe(), u64::MAX, "no reader: anything is safe");
        let early = r.enter().expect("a free slot");
        let stamp = r.stamp();
        assert!(r.safe() <= stamp, "a reader from before the stamp holds it back");
        let same = r.enter().expect("a free slot");
        assert!(r.safe() <= stamp, "so does one that entered before the epoch moved");
        r.advance();
        let late = r.enter().expect("a free slot");
        drop((early, same));
        assert!(r.safe() > stamp, "a reader that entered after the advance does not");
        drop(late);
        assert_eq!(r.safe(), u64::MAX);
    }

    /// Whichever slot a reader holds, a writer's scan sees it: `used` covers every slot
    /// taken, although `enter` writes it only when it grows. The reader kept is the last
    /// to enter, so no later reader can have moved `used` past it.
    #[test]
    fn the_last_reader_to_enter_holds_a_stamp_back() {
        for count in 1..=3 {
            let r = Readers::new(64);
            let mut guards: Vec<ReadGuard<'_>> =
                (0..count).map(|_| r.enter().expect("a free slot")).collect();
            let last = guards.pop().expect("at least one reader");
            drop(guards);
            let stamp = r.stamp();
            r.advance();
            assert!(r.safe() <= stamp, "the last of {count} readers is not seen");
            drop(last);
            assert_eq!(r.safe(), u64::MAX);
        }
    }

    #[test]
    fn every_slot_busy_falls_back_and_counts() {
        let r = Readers::new(2);
        let a = r.enter().expect("slot");
        let b = r.enter().expect("slot");
        assert!(r.enter().is_none());
        assert_eq!(r.fallbacks.load(Ordering::Relaxed), 1);
        drop(a);
        assert!(r.enter().is_some(), "a released slot is taken again");
        drop(b);
        assert!(Readers::new(0).enter().is_none(), "no slots: always pinned");
    }
}
