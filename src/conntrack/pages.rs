//! Where the table's two big arrays live: every shard's index and the hot parts of its
//! slab, carved from blocks the table shares, asked of the kernel as 2 MiB huge pages.
//!
//! Why: a batch lookup reads two random lines a key out of tens of megabytes (the bucket,
//! then the entry). With 4 KiB pages each of those is also a TLB miss, whose page walk
//! holds up the prefetch that needed it; with 2 MiB pages a 1M-entry table's index and hot
//! lines fit in a few dozen TLB entries. Same-process A/B: batched random hits 0.96× on
//! one thread, 0.94× on two (median ratios; BENCHMARKS.md, "Seventh look").
//!
//! Why blocks shared by the shards rather than an allocation each: a shard's index is
//! ~110 KiB at 2M entries and its slab grows a chunk (64 KiB of hot lines) at a time, and
//! only a region that spans an aligned 2 MiB can be a huge page. Shared blocks also bound
//! what the huge pages add to the memory a table holds: at most one block not yet filled.
//!
//! Why by hand, and mapped rather than allocated: the global allocator has no way to ask
//! for huge pages, may hand back memory it touched before (the binary's mimalloc does),
//! whose small pages then stay small, and pads an aligned request (glibc maps 4 MiB for
//! 2 MiB aligned to 2 MiB). A block mapped here is fresh zero pages, exactly as large as
//! asked, faulted in only when first written. The table reports what it maps
//! ([`super::Conntrack::mapped_bytes`]). The advice is a hint, which a kernel without
//! transparent huge pages ignores.

use std::alloc::{Layout, handle_alloc_error};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A huge page on x86_64 and aarch64 with 4 KiB base pages.
pub(super) const HUGE_PAGE: usize = 2 << 20;

/// What the arena hands out is aligned to a cache line (buckets and hot parts are).
const LINE: usize = 64;

/// The smallest base page of the targets this runs on: blocks are whole pages.
const PAGE: usize = 4096;

/// One mapping of the arena.
struct Block {
    ptr: NonNull<u8>,
    len: usize,
}

impl Block {
    /// `len` bytes of fresh zero pages; aligned to a huge page, and advised to be backed
    /// by huge pages, when `len` is a multiple of one. Aborts as `Box` does when the
    /// kernel has no memory to give.
    fn map(len: usize) -> Block {
        let huge = len.is_multiple_of(HUGE_PAGE);
        // Room to find an aligned start; the parts outside it are unmapped again.
        let slack = if huge { HUGE_PAGE } else { 0 };
        let fail = || -> ! {
            handle_alloc_error(Layout::from_size_align(len, LINE).unwrap_or(Layout::new::<u8>()))
        };
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing
        // touches no existing memory.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + slack,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            fail()
        }
        let at = at.cast::<u8>();
        let head = at.align_offset(if huge { HUGE_PAGE } else { 1 });
        // SAFETY: `head < slack` (or 0), so `start` and `start + len` lie in the mapping;
        // both trimmed parts are whole pages of it (the mapping and `start` are page
        // aligned, `len` and `slack` whole huge pages), used by nothing.
        let start = unsafe {
            let start = at.add(head);
            if head > 0 {
                libc::munmap(at.cast(), head);
            }
            if slack - head > 0 {
                libc::munmap(start.add(len).cast(), slack - head);
            }
            start
        };
        let Some(ptr) = NonNull::new(start) else { fail() };
        if huge {
            advise_huge(ptr, len);
        }
        Block { ptr, len }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: mapped in `map` with this address and length, and unmapped only here,
        // when nothing points into it any more (the arena is being dropped).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Asks the kernel to back `len` bytes at `ptr` (huge-page aligned) with huge pages. A
/// hint: where transparent huge pages are off or unsupported nothing changes.
#[cfg(target_os = "linux")]
fn advise_huge(ptr: NonNull<u8>, len: usize) {
    // SAFETY: the range is one block just mapped; the advice does not change its contents.
    unsafe {
        libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_: NonNull<u8>, _: usize) {}

/// The blocks of one table. Taking memory locks a mutex: it happens when the table is
/// built (the indexes) and when a shard's slab grows a chunk, never on a lookup.
pub(super) struct Arena {
    /// Size of a shared block: a huge page, or less for a table that never needs one.
    block: usize,
    blocks: Mutex<Blocks>,
    /// Bytes mapped so far.
    mapped: AtomicUsize,
}

struct Blocks {
    all: Vec<Block>,
    /// Where the next piece of the current shared block starts, and how much is left.
    next: NonNull<u8>,
    left: usize,
}

// SAFETY: the blocks are plain memory owned by the arena, and handed out once each; what
// is stored in them is the callers' concern (atomics only).
unsafe impl Send for Arena {}
// SAFETY: as above; the block list is behind the mutex.
unsafe impl Sync for Arena {}

impl Arena {
    /// An arena for a table that needs at most about `bytes` in all.
    pub(super) fn new(bytes: usize) -> Arena {
        let block = bytes.next_multiple_of(PAGE).clamp(PAGE, HUGE_PAGE);
        let blocks = Blocks { all: Vec::new(), next: NonNull::dangling(), left: 0 };
        Arena { block, blocks: Mutex::new(blocks), mapped: AtomicUsize::new(0) }
    }

    /// Bytes mapped so far (the arena's memory, outside the global allocator's count).
    pub(super) fn mapped(&self) -> usize {
        self.mapped.load(Ordering::Relaxed)
    }

    fn map(&self, len: usize) -> Block {
        let b = Block::map(len);
        self.mapped.fetch_add(len, Ordering::Relaxed);
        b
    }

    /// `bytes` zeroed bytes aligned to a cache line, at the same address until the arena
    /// is dropped. A piece larger than a shared block gets a block of its own.
    pub(super) fn take(&self, bytes: usize) -> NonNull<u8> {
        let bytes = bytes.next_multiple_of(LINE).max(LINE);
        // A panic while holding the lock cannot leave the list inconsistent (a block is
        // pushed whole), so a poisoned lock is still usable.
        let mut b = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if bytes > self.block {
            // Whole huge pages when it spans one (the tail is never touched, so it costs
            // address space, not memory).
            let whole = if bytes >= HUGE_PAGE { HUGE_PAGE } else { PAGE };
            let own = self.map(bytes.next_multiple_of(whole));
            let ptr = own.ptr;
            b.all.push(own);
            return ptr;
        }
        if b.left < bytes {
            let fresh = self.map(self.block);
            b.next = fresh.ptr;
            b.left = self.block;
            b.all.push(fresh);
        }
        let at = b.next;
        // SAFETY: `bytes <= left`, so the result is inside the current block or one past
        // its end.
        b.next = unsafe { at.add(bytes) };
        b.left -= bytes;
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_zeroed_aligned_apart_and_counted() {
        let a = Arena::new(3 * HUGE_PAGE);
        assert_eq!(a.block, HUGE_PAGE);
        let sizes = [100, 64, 4096, 1 << 20, 900 << 10, 3 << 20, 1, 200 << 10];
        let mut got: Vec<(usize, usize)> = Vec::new();
        for &n in &sizes {
            let p = a.take(n).as_ptr();
            assert_eq!(p as usize % LINE, 0, "{n} bytes at {p:p}");
            // SAFETY: the arena handed out at least `n` bytes at `p`.
            let s = unsafe { std::slice::from_raw_parts_mut(p, n) };
            assert!(s.iter().all(|&x| x == 0), "{n} bytes zeroed");
            s.fill(0xa5);
            got.push((p as usize, n));
        }
        got.sort_unstable();
        for w in got.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "pieces overlap: {w:?}");
        }
        let blocks = a.blocks.lock().expect("not poisoned");
        // 100 + 64 + 4096 + 1 MiB + 900 KiB (and later 1) fit in one shared block, the
        // 3 MiB piece gets its own, and 200 KiB more need a second shared block.
        assert_eq!(blocks.all.len(), 3);
        for b in &blocks.all {
            assert_eq!(b.len % HUGE_PAGE, 0, "whole huge pages");
            assert_eq!(b.ptr.as_ptr() as usize % HUGE_PAGE, 0, "a huge page can back it");
        }
        assert_eq!(a.mapped(), 2 * HUGE_PAGE + 2 * HUGE_PAGE, "two shared, one of 4 MiB");
    }

    #[test]
    fn a_small_table_takes_no_more_than_it_needs() {
        let a = Arena::new(10_000);
        assert_eq!(a.block, 12_288, "rounded to a page, not to a huge page");
        let p = a.take(6_000);
        let q = a.take(4_000);
        assert_eq!(q.as_ptr() as usize - p.as_ptr() as usize, 6_016);
        assert_eq!(a.blocks.lock().expect("not poisoned").all.len(), 1);
        assert_eq!(a.mapped(), 12_288);
    }
}
