//! What a front end's receive batch knows about the frames its last read lent, whatever
//! holds their bytes (the TUN batch's own slots, the AF_PACKET rings): how many there are,
//! which are still to be forwarded, and how many frames were read but not lent. Both
//! front ends' batches hold one ([`Lent`]) and deref to it, so this bookkeeping is written
//! once.

/// Makes batch type `$t` (with a `lent: Lent` field) deref to its bookkeeping — a batch
/// is its [`Lent`] plus where the frames lie, so `len`, `dropped`, `is_kept` are
/// [`Lent`]'s — and print as it (not its buffers).
macro_rules! batch_derefs_to_lent {
    ($t:ty) => {
        impl std::ops::Deref for $t {
            type Target = $crate::dataplane::packet::lent::Lent;
            fn deref(&self) -> &Self::Target {
                &self.lent
            }
        }

        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t)).field("lent", &self.lent).finish_non_exhaustive()
            }
        }
    };
}
pub(super) use batch_derefs_to_lent;

/// The bookkeeping of one batch: `len` frames lent, `keep[i]` while frame `i` is still to
/// be forwarded, `dropped` frames read but not lent since the batch was made.
#[derive(Debug)]
pub struct Lent {
    keep: Box<[bool]>,
    len: usize,
    dropped: u64,
}

impl Lent {
    /// Room for `capacity` frames (at least one).
    pub(super) fn new(capacity: usize) -> Lent {
        Lent { keep: vec![false; capacity.max(1)].into_boxed_slice(), len: 0, dropped: 0 }
    }

    /// Forgets the frames of the last read.
    pub(super) fn reset(&mut self) {
        self.len = 0;
    }

    /// Counts one more frame lent, marked to be forwarded; its index. The caller checks
    /// [`Lent::is_full`] first.
    pub(super) fn push(&mut self) -> usize {
        let i = self.len;
        self.keep[i] = true;
        self.len += 1;
        i
    }

    /// Counts a frame read but not lent (too large, cut short, no packet in it).
    pub(super) fn refuse(&mut self) {
        self.dropped += 1;
    }

    pub(super) fn is_full(&self) -> bool {
        self.len == self.keep.len()
    }

    /// How many frames the last read lent.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many frames one read may lend.
    pub fn capacity(&self) -> usize {
        self.keep.len()
    }

    /// Frames read but not lent since the batch was made.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Marks frame `i` as not to be forwarded (denied, invalid). No-op past the end.
    pub fn unmark(&mut self, i: usize) {
        if i < self.len {
            self.keep[i] = false;
        }
    }

    /// Whether frame `i` is still marked to be forwarded.
    pub fn is_kept(&self, i: usize) -> bool {
        i < self.len && self.keep[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_kept_until_unmarked_and_forgotten_on_reset() {
        let mut l = Lent::new(2);
        assert_eq!((l.len(), l.capacity(), l.is_empty()), (0, 2, true));
        assert_eq!(l.push(), 0);
        assert_eq!(l.push(), 1);
        assert!(l.is_full());
        l.unmark(1);
        l.unmark(7);
        assert!(l.is_kept(0) && !l.is_kept(1) && !l.is_kept(2));
        l.refuse();
        l.reset();
        assert_eq!((l.len(), l.dropped(), l.is_kept(0)), (0, 1, false));
    }
}
