//! The fragment table: a first fragment's verdict, remembered for the later fragments of
//! the same IP packet, which carry no ports and so cannot be matched to a flow themselves.
//!
//! Bounded and preallocated: `max_fragments` slots (rounded up to a power of two) made when
//! the worker's filter is, nothing allocated per packet. A fragment key hashes to a home
//! slot and is looked for in the [`PROBE`] slots from there; a first fragment takes the
//! first of those that is empty, expired (`fragment_timeout`) or its own, and when all are
//! live the table is full for it: counted, and its later fragments are dropped (fail
//! closed). One table per worker, so no lock; the kernel steers a packet's fragments to
//! one queue (they share the addresses the TUN queue or the fanout hashes on), and a
//! fragment another worker sees is dropped.
//!
//! What is refused: a later fragment with no remembered first fragment (never seen, not
//! allowed, expired, or arriving before it), and one that overlaps the first fragment's
//! bytes (offset inside them) — the overlap that rewrites the L4 header a verdict was made
//! on (RFC 1858, RFC 3128; the classifier already refuses the 8-byte TCP case). Overlaps
//! between two later fragments are left to the receiver's reassembly, which the header
//! they cannot reach no longer matters to. Reassembly itself is not done here.

use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use super::classify::FragmentKey;

/// Slots looked at per key: a bound on the work of one fragment.
pub const PROBE: usize = 8;

/// What a later fragment gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// Its first fragment passed.
    Pass,
    /// No first fragment remembered (or it was not passed).
    Unknown,
    /// It overlaps its first fragment's bytes.
    Overlap,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    key: Option<FragmentKey>,
    /// Whether the first fragment passed.
    pass: bool,
    /// Bytes of IP payload the first fragment carried: a later one must start at or past.
    first_len: u32,
    expires: Instant,
}

/// One worker's fragment table.
#[derive(Debug)]
pub struct Fragments {
    slots: Box<[Slot]>,
    mask: usize,
    timeout: Duration,
    hasher: RandomState,
}

impl Fragments {
    /// A table of at least `max` slots (at least [`PROBE`]); the one allocation.
    pub fn new(max: usize, timeout: Duration, now: Instant) -> Fragments {
        let n = max.max(PROBE).next_power_of_two();
        let empty = Slot { key: None, pass: false, first_len: 0, expires: now };
        Fragments {
            slots: vec![empty; n].into_boxed_slice(),
            mask: n - 1,
            timeout,
            hasher: RandomState::new(),
        }
    }

    fn home(&self, key: &FragmentKey) -> usize {
        self.hasher.hash_one(key) as usize & self.mask
    }

    /// Remembers a first fragment's verdict (`pass`) and its payload length. Returns false
    /// when every slot it may take is live (table full; counted by the caller).
    pub fn first(&mut self, key: FragmentKey, pass: bool, first_len: u32, now: Instant) -> bool {
        let home = self.home(&key);
        let mut free = None;
        for i in 0..PROBE {
            let at = (home + i) & self.mask;
            let slot = &self.slots[at];
            if slot.key == Some(key) {
                free = Some(at);
                break;
            }
            if free.is_none() && (slot.key.is_none() || slot.expires <= now) {
                free = Some(at);
            }
        }
        let Some(at) = free else { return false };
        self.slots[at] = Slot { key: Some(key), pass, first_len, expires: now + self.timeout };
        true
    }

    /// What a later fragment at `offset` (bytes) of `key` gets.
    pub fn later(&self, key: &FragmentKey, offset: u32, now: Instant) -> Follow {
        let home = self.home(key);
        for i in 0..PROBE {
            let slot = &self.slots[(home + i) & self.mask];
            if slot.key == Some(*key) && slot.expires > now {
                return if !slot.pass {
                    Follow::Unknown
                } else if offset < slot.first_len {
                    Follow::Overlap
                } else {
                    Follow::Pass
                };
            }
        }
        Follow::Unknown
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn key(id: u32) -> FragmentKey {
        FragmentKey {
            src: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            dst: IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)),
            proto: 17,
            id,
        }
    }

    #[test]
    fn later_fragments_follow_the_first_until_it_expires() {
        let t0 = Instant::now();
        let mut f = Fragments::new(16, Duration::from_secs(2), t0);
        assert_eq!(f.later(&key(1), 1480, t0), Follow::Unknown);
        assert!(f.first(key(1), true, 1480, t0));
        assert!(f.first(key(2), false, 1480, t0));
        assert_eq!(f.later(&key(1), 1480, t0), Follow::Pass);
        assert_eq!(f.later(&key(1), 800, t0), Follow::Overlap);
        assert_eq!(f.later(&key(2), 1480, t0), Follow::Unknown);
        assert_eq!(f.later(&key(1), 1480, t0 + Duration::from_secs(3)), Follow::Unknown);
    }

    #[test]
    fn a_full_table_refuses_and_frees_by_expiry() {
        let t0 = Instant::now();
        let mut f = Fragments::new(8, Duration::from_secs(2), t0);
        let taken = (0..64).filter(|&i| f.first(key(i), true, 8, t0)).count();
        assert_eq!(taken, 8, "eight slots, each key probes all of them");
        assert!(!f.first(key(100), true, 8, t0));
        assert!(f.first(key(100), true, 8, t0 + Duration::from_secs(3)));
    }
}
