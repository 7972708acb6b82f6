//! Identity: which workload owns an address, by longest-prefix match over every
//! workload's addresses and CIDRs.
//!
//! The prefixes are flattened at compile time into a sorted table of disjoint segments
//! covering the whole address space, each labelled with the owner of its most specific
//! covering prefix (or nobody). A lookup is then one binary search for the last segment
//! that starts at or before the address. IPv4 adds a 2^16-entry first-level index on the
//! top 16 bits, which narrows the search to the segments of one /16 — usually one or two
//! entries (see `benches/decide.rs`, `lpm/*`: this is why a lookup is a few nanoseconds
//! at 10,000 workloads).
//!
//! Not here: what a workload is allowed to do (that is `compile`/`decide`).

use std::net::IpAddr;

use ipnet::IpNet;

/// Owner id meaning "no workload": the segment is external.
const NOBODY: u32 = u32::MAX;

/// A /16 with more segments than this gets a /24 second level.
const DENSE: u32 = 16;

/// An address as a number in its family, the form every table in the engine uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Key {
    V4(u32),
    V6(u128),
}

impl Key {
    pub(crate) fn of(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(a) => Key::V4(u32::from(a)),
            IpAddr::V6(a) => Key::V6(u128::from(a)),
        }
    }
}

/// An inclusive address range in one family (a CIDR, flattened).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Range {
    pub(crate) v6: bool,
    pub(crate) first: u128,
    pub(crate) last: u128,
}

impl Range {
    pub(crate) fn of(net: &IpNet) -> Range {
        match net {
            IpNet::V4(n) => Range {
                v6: false,
                first: u128::from(u32::from(n.network())),
                last: u128::from(u32::from(n.broadcast())),
            },
            IpNet::V6(n) => {
                Range { v6: true, first: u128::from(n.network()), last: u128::from(n.broadcast()) }
            }
        }
    }

    #[inline]
    pub(crate) fn contains(&self, key: Key) -> bool {
        match key {
            Key::V4(a) => !self.v6 && (self.first..=self.last).contains(&u128::from(a)),
            Key::V6(a) => self.v6 && (self.first..=self.last).contains(&a),
        }
    }
}

/// The longest-prefix-match table for both families.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Lpm {
    v4_starts: Vec<u32>,
    v4_owners: Vec<u32>,
    /// Per /16 `h` (length 2^16 + 1): `[first segment whose start is ≥ h << 16, offset in
    /// v4_sub or NOBODY]`. Kept as pairs so the one cache line read gives both.
    v4_index: Vec<[u32; 2]>,
    /// For each /16 with more than [`DENSE`] segments, a second level of 257 entries:
    /// first segment whose start is ≥ the /24's base (the last entry is the next /16's).
    /// A workload /16 holding hundreds of /32s then costs one more load instead of an
    /// eight-step binary search over a few cache lines; memory is bounded by
    /// 257 × 4 bytes per `DENSE` segments.
    v4_sub: Vec<u32>,
    v6_starts: Vec<u128>,
    v6_owners: Vec<u32>,
}

impl Lpm {
    /// Builds the table from `(prefix, owner)` pairs. On two equal prefixes the lowest
    /// owner wins (the loader forbids it; this keeps the result deterministic).
    pub(crate) fn build(entries: impl IntoIterator<Item = (IpNet, u32)>) -> Lpm {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, owner) in entries {
            let r = Range::of(&net);
            let prefix = (r.first, r.last, net.prefix_len(), owner);
            if r.v6 {
                v6.push(prefix);
            } else {
                v4.push(prefix);
            }
        }
        let (v4_starts, v4_owners) = segments(v4, u128::from(u32::MAX));
        let v4_starts: Vec<u32> = v4_starts.into_iter().map(|s| s as u32).collect();
        let first_at = |base: u64| v4_starts.partition_point(|&s| u64::from(s) < base) as u32;
        let mut v4_index: Vec<[u32; 2]> =
            (0..=(1u64 << 16)).map(|h| [first_at(h << 16), NOBODY]).collect();
        let mut v4_sub = Vec::new();
        for h in 0..(1usize << 16) {
            if v4_index[h + 1][0] - v4_index[h][0] > DENSE {
                v4_index[h][1] = v4_sub.len() as u32;
                let base = (h as u64) << 16;
                v4_sub.extend((0..=256u64).map(|m| first_at(base + (m << 8))));
            }
        }
        let (v6_starts, v6_owners) = segments(v6, u128::MAX);
        Lpm { v4_starts, v4_owners, v4_index, v4_sub, v6_starts, v6_owners }
    }

    /// The owner of `key`, if any workload owns it.
    #[inline]
    pub(crate) fn lookup(&self, key: Key) -> Option<u32> {
        let owner = match key {
            Key::V4(a) => {
                let h = (a >> 16) as usize;
                let [lo, sub] = self.v4_index[h];
                let (lo, hi) = if sub == NOBODY {
                    (lo as usize, self.v4_index[h + 1][0] as usize)
                } else {
                    let m = sub as usize + ((a >> 8) & 0xff) as usize;
                    (self.v4_sub[m] as usize, self.v4_sub[m + 1] as usize)
                };
                // Segment 0 starts at 0, so some segment at or before `a` always exists:
                // either inside this /16 (or /24) or the last one before it (`lo - 1`).
                let pos = lo + self.v4_starts[lo..hi].partition_point(|&s| s <= a);
                self.v4_owners[pos - 1]
            }
            Key::V6(a) => {
                let pos = self.v6_starts.partition_point(|&s| s <= a);
                self.v6_owners[pos - 1]
            }
        };
        (owner != NOBODY).then_some(owner)
    }

    /// The start of every segment owned by `owner` inside `range`, in address order:
    /// the addresses of `range` that really resolve to `owner`.
    ///
    /// A binary search and a walk over the segments of `range` only (it copied the whole
    /// table once per call: `flowgate test` asks this for a workload whose first address is
    /// not its own).
    pub(crate) fn owned_starts(&self, range: Range, owner: u32) -> Vec<u128> {
        if range.v6 {
            owned_in(&self.v6_starts, &self.v6_owners, range, owner)
        } else {
            owned_in(&self.v4_starts, &self.v4_owners, range, owner)
        }
    }
}

/// [`Lpm::owned_starts`] over one family's segments.
fn owned_in<T: Copy + Into<u128>>(
    starts: &[T],
    owners: &[u32],
    range: Range,
    owner: u32,
) -> Vec<u128> {
    let from = starts.partition_point(|&s| s.into() <= range.first).saturating_sub(1);
    starts[from..]
        .iter()
        .zip(&owners[from..])
        .map(|(&s, &o)| (s.into(), o))
        .take_while(|&(s, _)| s <= range.last)
        .filter(|&(_, o)| o == owner)
        .map(|(s, _)| s.max(range.first))
        .collect()
}

/// Flattens nested prefixes `(first, last, len, owner)` into disjoint segments
/// `(starts, owners)` covering `0..=max`, adjacent segments of one owner merged.
fn segments(mut prefixes: Vec<(u128, u128, u8, u32)>, max: u128) -> (Vec<u128>, Vec<u32>) {
    // Outer prefixes before inner ones at the same start; among equal prefixes the
    // lowest owner is pushed last and so is innermost.
    prefixes.sort_by(|a, b| (a.0, a.2, b.3).cmp(&(b.0, b.2, a.3)));
    let mut starts: Vec<u128> = Vec::new();
    let mut owners: Vec<u32> = Vec::new();
    let mut emit = |start: u128, owner: u32| {
        if owners.last() != Some(&owner) {
            starts.push(start);
            owners.push(owner);
        }
    };
    // `cur`: the first address not yet covered by an emitted segment (None: past `max`).
    let mut cur: Option<u128> = Some(0);
    let mut stack: Vec<(u128, u32)> = Vec::new();
    for (first, last, _, owner) in prefixes {
        while let Some(&(end, top)) = stack.last() {
            if end >= first {
                break;
            }
            if let Some(c) = cur
                && c <= end
            {
                emit(c, top);
                cur = end.checked_add(1);
            }
            stack.pop();
        }
        if let Some(c) = cur
            && c < first
        {
            emit(c, stack.last().map_or(NOBODY, |&(_, o)| o));
            cur = Some(first);
        }
        stack.push((last, owner));
    }
    while let Some((end, top)) = stack.pop() {
        if let Some(c) = cur
            && c <= end
        {
            emit(c, top);
            cur = end.checked_add(1);
        }
    }
    if let Some(c) = cur
        && c <= max
    {
        emit(c, NOBODY);
    }
    (starts, owners)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test literal")
    }

    fn ip(s: &str) -> Key {
        Key::of(s.parse().expect("test literal"))
    }

    #[test]
    fn most_specific_prefix_wins() {
        let lpm = Lpm::build([
            (net("10.0.0.0/8"), 0),
            (net("10.1.0.0/16"), 1),
            (net("10.1.2.3/32"), 2),
            (net("10.1.255.0/24"), 3),
            (net("2001:db8::/32"), 4),
            (net("2001:db8::1/128"), 5),
        ]);
        assert_eq!(lpm.lookup(ip("10.0.0.1")), Some(0));
        assert_eq!(lpm.lookup(ip("10.1.0.1")), Some(1));
        assert_eq!(lpm.lookup(ip("10.1.2.3")), Some(2));
        assert_eq!(lpm.lookup(ip("10.1.2.4")), Some(1));
        assert_eq!(lpm.lookup(ip("10.1.255.255")), Some(3));
        assert_eq!(lpm.lookup(ip("10.2.0.0")), Some(0));
        assert_eq!(lpm.lookup(ip("10.255.255.255")), Some(0));
        assert_eq!(lpm.lookup(ip("11.0.0.0")), None);
        assert_eq!(lpm.lookup(ip("9.255.255.255")), None);
        assert_eq!(lpm.lookup(ip("0.0.0.0")), None);
        assert_eq!(lpm.lookup(ip("255.255.255.255")), None);
        assert_eq!(lpm.lookup(ip("2001:db8::1")), Some(5));
        assert_eq!(lpm.lookup(ip("2001:db8::2")), Some(4));
        assert_eq!(lpm.lookup(ip("::")), None);
        assert_eq!(lpm.lookup(ip("ffff::")), None);
    }

    #[test]
    fn whole_space_and_edges() {
        let lpm =
            Lpm::build([(net("0.0.0.0/0"), 7), (net("255.255.255.255/32"), 8), (net("::/0"), 9)]);
        assert_eq!(lpm.lookup(ip("1.2.3.4")), Some(7));
        assert_eq!(lpm.lookup(ip("255.255.255.255")), Some(8));
        assert_eq!(lpm.lookup(ip("255.255.255.254")), Some(7));
        assert_eq!(lpm.lookup(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")), Some(9));
        let empty = Lpm::build([]);
        assert_eq!(empty.lookup(ip("1.2.3.4")), None);
        assert_eq!(empty.lookup(ip("::1")), None);
    }

    #[test]
    fn equal_prefixes_go_to_the_lowest_owner() {
        let lpm = Lpm::build([(net("10.0.0.0/24"), 5), (net("10.0.0.0/24"), 2)]);
        assert_eq!(lpm.lookup(ip("10.0.0.9")), Some(2));
    }

    /// A /16 dense enough for the /24 second level, with a covering /16 and /20 and /32s
    /// on both sides of /24 boundaries: every address of it resolves as a linear scan
    /// over the prefixes (most specific, then lowest owner) says.
    #[test]
    fn dense_sixteen_matches_a_linear_scan() {
        let mut entries = vec![(net("10.7.0.0/16"), 0), (net("10.7.16.0/20"), 1)];
        for k in 0..300u32 {
            let a = 0x0a07_0000 + k * 97 % 65536;
            entries.push((IpNet::from(IpAddr::V4(a.into())), 2 + k));
        }
        entries.push((net("10.7.255.255/32"), 999));
        entries.push((net("10.8.0.0/32"), 1000));
        let lpm = Lpm::build(entries.clone());
        for a in 0x0a06_ff00u32..=0x0a08_0100 {
            let want = entries
                .iter()
                .filter(|(n, _)| Range::of(n).contains(Key::V4(a)))
                .min_by_key(|(n, o)| (std::cmp::Reverse(n.prefix_len()), *o))
                .map(|(_, o)| *o);
            assert_eq!(lpm.lookup(Key::V4(a)), want, "{}", std::net::Ipv4Addr::from(a));
        }
    }

    #[test]
    fn owned_starts_skip_carved_out_addresses() {
        let lpm = Lpm::build([(net("10.0.0.0/30"), 0), (net("10.0.0.1/32"), 1)]);
        let starts = lpm.owned_starts(Range::of(&net("10.0.0.0/30")), 0);
        assert_eq!(starts, vec![0x0a00_0000, 0x0a00_0002]);
    }
}
