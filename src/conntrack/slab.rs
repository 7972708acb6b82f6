//! A shard's slab: where its entries live, in place, by slot id.
//!
//! Slots come in chunks of `1 << bits`, allocated as the shard first grows and then kept
//! until the shard is dropped: a slot never moves, so a reader holding a slot id (from an
//! index word) can always turn it into the entry, with no lock. Each chunk is two arrays,
//! the entries' hot parts (one cache line each), taken from the table's huge-page arena
//! (`pages.rs`) because every lookup reads one, and their cold parts, boxed.
//!
//! Why by hand rather than `Vec`s behind `OnceLock`s: the batch lookup turns a slot id into
//! an address for every key, so the chunk table is two flat arrays of pointers (8 bytes a
//! chunk, a shard's in a few cache lines that stay in L1) and one load finds a chunk, with
//! no once-state to check and no length to compare (an id's offset in its chunk is in range
//! by construction).

use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, Ordering};

use super::entry::{Cold, Entry, Hot};
use super::pages::Arena;

// Hot parts are never dropped in place: the arena frees their memory as a whole.
const _: () = assert!(!std::mem::needs_drop::<Hot>());

pub(super) struct Slab {
    /// Chunk `c`'s hot parts (in the table's arena, which outlives the slab), or null
    /// while it is not allocated. Published after `cold`.
    hot: Box<[AtomicPtr<Hot>]>,
    cold: Box<[AtomicPtr<Cold>]>,
    bits: u32,
}

impl Slab {
    /// A slab for up to `slots` slots in chunks of `1 << bits` (none allocated yet).
    pub(super) fn new(slots: usize, bits: u32) -> Slab {
        let chunks = slots.div_ceil(1 << bits);
        Slab {
            hot: (0..chunks).map(|_| AtomicPtr::new(ptr::null_mut())).collect(),
            cold: (0..chunks).map(|_| AtomicPtr::new(ptr::null_mut())).collect(),
            bits,
        }
    }

    fn chunk_len(&self) -> usize {
        1 << self.bits
    }

    /// The entry in slot `id`, if its chunk exists, borrowed from the slab: the borrow
    /// checker keeps it from outliving the slab's memory. A handle that must live longer
    /// (an `EntryRef`, which keeps the shard alive) is made with the `unsafe`
    /// [`Entry::alias`], whose caller says what keeps the memory alive.
    #[inline]
    pub(super) fn get(&self, id: u32) -> Option<Slot<'_>> {
        let c = (id >> self.bits) as usize;
        let hot = NonNull::new(self.hot.get(c)?.load(Ordering::Acquire))?;
        // Stored before `hot` was published (Release above pairs with it).
        let cold = NonNull::new(self.cold.get(c)?.load(Ordering::Relaxed))?;
        let i = (id & ((1 << self.bits) - 1)) as usize;
        // SAFETY: both arrays of chunk `c` hold `chunk_len()` initialised parts, and `i` is
        // below it (masked); they stay allocated and in place until `self` is dropped.
        let entry = unsafe { Entry::from_parts(hot.add(i).as_ref(), cold.add(i).as_ref()) };
        Some(Slot { entry, _slab: PhantomData })
    }

    /// Prefetches slot `id`'s hot part if its chunk exists (a hint: never faults).
    #[inline]
    pub(super) fn prefetch(&self, id: u32) {
        let c = (id >> self.bits) as usize;
        if let Some(hot) = self.hot.get(c) {
            let i = (id & ((1 << self.bits) - 1)) as usize;
            super::prefetch_ptr(hot.load(Ordering::Acquire).wrapping_add(i).cast());
        }
    }

    /// Prefetches slot `id`'s cold part too (a packet TCP flow's window bounds hang off it).
    #[inline]
    pub(super) fn prefetch_cold(&self, id: u32) {
        let c = (id >> self.bits) as usize;
        if let Some(cold) = self.cold.get(c) {
            let i = (id & ((1 << self.bits) - 1)) as usize;
            super::prefetch_ptr(cold.load(Ordering::Relaxed).wrapping_add(i).cast());
        }
    }

    /// Makes sure the chunk holding slot `id` exists, its hot parts taken from `arena`
    /// (the shard's writer lock held, so no other thread allocates it meanwhile). False if
    /// `id` is beyond the slab.
    pub(super) fn grow_to(&self, id: u32, arena: &Arena) -> bool {
        let c = (id >> self.bits) as usize;
        let (Some(hot), Some(cold)) = (self.hot.get(c), self.cold.get(c)) else {
            return false;
        };
        if !hot.load(Ordering::Acquire).is_null() {
            return true;
        }
        // The only allocation on the insert path: once per chunk, while the shard grows.
        let h = arena.take(self.chunk_len() * std::mem::size_of::<Hot>()).cast::<Hot>();
        for i in 0..self.chunk_len() {
            // SAFETY: the arena handed out room for `chunk_len()` aligned hot parts at `h`
            // (`Hot` is line-aligned and the arena's pieces are), used by nothing else.
            unsafe { h.add(i).write(Hot::empty()) };
        }
        let k: Box<[Cold]> = (0..self.chunk_len()).map(|_| Cold::empty()).collect();
        cold.store(Box::into_raw(k).cast(), Ordering::Relaxed);
        hot.store(h.as_ptr(), Ordering::Release);
        true
    }
}

/// A slot's entry for as long as the slab is borrowed: the rule that the parts outlive
/// the entry (`Entry::from_parts`) held by a lifetime instead of by the callers.
pub(super) struct Slot<'a> {
    entry: Entry,
    _slab: PhantomData<&'a Slab>,
}

impl Deref for Slot<'_> {
    type Target = Entry;

    #[inline(always)]
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // Hot parts need no dropping (asserted above) and their memory is the arena's.
        let n = self.chunk_len();
        for cold in &mut self.cold {
            let k = *cold.get_mut();
            if !k.is_null() {
                // SAFETY: a non-null pointer came from `Box::into_raw` of `n` parts in
                // `grow_to`, and `&mut self` means no entry of this slab is in use.
                drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(k, n)) });
            }
        }
    }
}
