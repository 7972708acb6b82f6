//! The packet filter: one worker's verdicts for a burst of IP packets, independent of the
//! front end that read them (TUN or AF_PACKET).
//!
//! A burst goes through three steps:
//! 1. each packet is classified ([`classify`](super::classify)); a malformed one is
//!    dropped by the classifier's reason; a later fragment follows its first fragment's
//!    verdict ([`fragments`](super::fragments)) or is dropped, decided after the rest of
//!    the burst so that a first fragment earlier in the same burst counts;
//! 2. the flows of the rest are looked up in conntrack in one batch
//!    ([`Conntrack::lookup_many`]). A hit passes through the flow's state: a TCP segment
//!    through window tracking (`conntrack::tcp_window`, unless `tcp_liberal`) and the
//!    state machine (`conntrack::tcp_state`) — refused → [`DropCause::Invalid`]; a reply
//!    of a UDP/ICMP/other flow makes it assured; an ICMP error quoting the flow passes; a
//!    flow the control plane revoked after a policy change → [`DropCause::Revoked`]. The
//!    entry's counters and last-seen time are updated;
//! 3. a miss that may open a flow (a bare TCP SYN, UDP, SCTP, an ICMP echo request, other
//!    protocols) is admitted through the one gate (`dataplane::admit_packet`, which counts,
//!    times and logs it like any flow): allowed → tracked and passed; denied →
//!    [`DropCause::Policy`] ([`Verdict::Reject`] with `on_deny = "reject"`); allowed but
//!    the table is full → [`DropCause::TableFull`]. Any other miss (a TCP segment that is
//!    not a SYN, an echo reply, an ICMP error about an untracked flow) →
//!    [`DropCause::Untracked`].
//!
//! The deny flow-log events are the gate's, deduplicated by the flow log (a retried SYN
//! within the dedupe window adds to one line's count). A revoked flow's `revoked` event is
//! the control plane's, once per flow: revalidation marks a packet flow's entry revoked
//! instead of removing it, and never decides a revoked entry again.
//!
//! The front end owns the buffers and the I/O; this module owns no socket and makes no
//! syscall, so the same code filters both front ends and runs in benches and the fuzzer.
//! Per packet of a tracked flow: no allocation, no lock, no syscall (the batch lookup
//! takes none; tests/packet_filter_alloc.rs counts allocations, benches/packet_filter.rs
//! measures the cost). A new flow allocates what the gate does on allow.
//!
//! Counters are per worker ([`PacketCounters`], one `Arc` each, summed when the metrics are
//! scraped), so the per-packet path never writes a cache line another core writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::classify::{self, Classified, DropReason, Kind, L4, Limits};
use super::fragments::{Follow, Fragments};
use super::reject::{self, RateLimit};
use crate::conntrack::{Entry, FlowState, InsertError, Side, TcpConn, TcpFlags, TcpSegmentNumbers};
use crate::dataplane::{Admission, FlowRequest, ListenerTag, Runtime, admit_packet};
use crate::flow::{FlowKey, Proto};

/// Most packets in one burst ([`Filter::run`]).
pub const MAX_BURST: usize = 64;

/// What happens to a packet denied by policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnDeny {
    /// Dropped silently (default).
    #[default]
    Drop,
    /// Dropped and answered: TCP RST, or ICMP/ICMPv6 "administratively prohibited", at most
    /// `reject_per_second` replies a second per worker.
    Reject,
}

/// The filter's knobs (from `[packet]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    pub on_deny: OnDeny,
    /// Accept TCP segments outside the tracked window (Linux `nf_conntrack_tcp_be_liberal`).
    pub tcp_liberal: bool,
    /// First fragments whose verdict is remembered for their later fragments at once.
    pub max_fragments: usize,
    /// How long a first fragment's verdict is remembered.
    pub fragment_timeout: Duration,
    /// Reject replies per second per worker; beyond it denied packets are only dropped.
    pub reject_per_second: u32,
    pub limits: Limits,
}

impl Default for FilterConfig {
    fn default() -> FilterConfig {
        FilterConfig {
            on_deny: OnDeny::Drop,
            tcp_liberal: false,
            max_fragments: 4096,
            fragment_timeout: Duration::from_secs(2),
            reject_per_second: 100,
            limits: Limits::DEFAULT,
        }
    }
}

/// A packet's fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it.
    Pass,
    /// Drop it, for this cause.
    Drop(DropCause),
    /// Drop it and send [`Filter::reject_reply`] back to its sender.
    Reject(DropCause),
}

/// Why a packet was not forwarded: the `reason` label of
/// `flowgate_packet_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropCause {
    /// The classifier refused it (bad header, bad length, chain too long, …).
    Malformed(DropReason),
    /// Refused by policy (a `deny` flow-log event was written for its flow).
    Policy,
    /// Of a flow the control plane revoked after a policy change.
    Revoked,
    /// Not valid for its TCP flow's state or outside its window.
    Invalid,
    /// A packet that cannot open a flow and belongs to none (a TCP segment other than a
    /// SYN, an ICMP error quoting an untracked flow, an echo reply).
    Untracked,
    /// A later fragment whose first fragment was not seen or not allowed, or the fragment
    /// table was full.
    Fragment,
    /// Allowed, but conntrack could not track the new flow (table full): fail closed.
    TableFull,
}

impl DropCause {
    /// The number of distinct counter labels ([`DropCause::index`]).
    pub const COUNT: usize = 7;

    /// The counter label.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropCause::Malformed(_) => "malformed",
            DropCause::Policy => "policy",
            DropCause::Revoked => "revoked",
            DropCause::Invalid => "invalid",
            DropCause::Untracked => "untracked",
            DropCause::Fragment => "fragment",
            DropCause::TableFull => "table_full",
        }
    }

    /// Index into [`PacketCounters::dropped`].
    pub const fn index(self) -> usize {
        match self {
            DropCause::Malformed(_) => 0,
            DropCause::Policy => 1,
            DropCause::Revoked => 2,
            DropCause::Invalid => 3,
            DropCause::Untracked => 4,
            DropCause::Fragment => 5,
            DropCause::TableFull => 6,
        }
    }

    /// Every label, in index order.
    pub const LABELS: [&'static str; DropCause::COUNT] =
        ["malformed", "policy", "revoked", "invalid", "untracked", "fragment", "table_full"];
}

/// One worker's packet counters. Written only by its worker (relaxed increments on lines no
/// other core writes); read by the metrics scrape.
#[derive(Debug, Default)]
pub struct PacketCounters {
    pub passed_packets: AtomicU64,
    pub passed_bytes: AtomicU64,
    pub dropped_packets: AtomicU64,
    pub dropped_bytes: AtomicU64,
    /// Dropped packets by [`DropCause::index`].
    pub dropped: [AtomicU64; DropCause::COUNT],
    /// Malformed packets by the classifier's reason, in [`DropReason::ALL`] order.
    pub malformed: [AtomicU64; DropReason::ALL.len()],
    /// Reject replies sent, and those not sent because of `reject_per_second`.
    pub rejects_sent: AtomicU64,
    pub rejects_limited: AtomicU64,
    /// First fragments whose verdict could not be remembered: the fragment table was full
    /// (their later fragments are then dropped as [`DropCause::Fragment`]).
    pub fragments_table_full: AtomicU64,
    /// Later fragments dropped because they overlap their first fragment (a subset of the
    /// `fragment` drops).
    pub fragments_overlapping: AtomicU64,
}

/// A burst's counts, added to the worker's [`PacketCounters`] once per burst rather than
/// per packet (an atomic add each is a good part of a hit's cost).
#[derive(Default)]
struct Tally {
    passed_packets: u64,
    passed_bytes: u64,
    dropped_packets: u64,
    dropped_bytes: u64,
}

impl Tally {
    #[inline]
    fn count(&mut self, counters: &PacketCounters, verdict: Verdict, bytes: usize) {
        let bytes = bytes as u64;
        match verdict {
            Verdict::Pass => {
                self.passed_packets += 1;
                self.passed_bytes += bytes;
            }
            Verdict::Drop(cause) | Verdict::Reject(cause) => {
                self.dropped_packets += 1;
                self.dropped_bytes += bytes;
                counters.count_cause(cause);
            }
        }
    }

    fn add_to(&self, c: &PacketCounters) {
        let r = Ordering::Relaxed;
        if self.passed_packets != 0 {
            c.passed_packets.fetch_add(self.passed_packets, r);
            c.passed_bytes.fetch_add(self.passed_bytes, r);
        }
        if self.dropped_packets != 0 {
            c.dropped_packets.fetch_add(self.dropped_packets, r);
            c.dropped_bytes.fetch_add(self.dropped_bytes, r);
        }
    }
}

impl PacketCounters {
    fn count_cause(&self, cause: DropCause) {
        self.dropped[cause.index()].fetch_add(1, Ordering::Relaxed);
        if let DropCause::Malformed(reason) = cause
            && let Some(i) = DropReason::ALL.iter().position(|r| *r == reason)
        {
            self.malformed[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One worker's filter. Not shared: each worker (TUN queue, AF_PACKET ring) owns one.
#[derive(Debug)]
pub struct Filter {
    rt: Arc<Runtime>,
    tag: ListenerTag,
    cfg: FilterConfig,
    counters: Arc<PacketCounters>,
    fragments: Fragments,
    rejects: RateLimit,
    /// The burst's classified packets and the keys looked up (by position in the burst),
    /// kept here so a burst allocates nothing.
    burst: Box<Burst>,
}

/// Per-burst scratch space.
#[derive(Debug)]
struct Burst {
    classified: [Option<Classified>; MAX_BURST],
    keys: [FlowKey; MAX_BURST],
    /// `keys[j]` belongs to packet `at[j]`.
    at: [u8; MAX_BURST],
}

impl Burst {
    fn new() -> Box<Burst> {
        let none = FlowKey::new(
            Proto::Udp,
            std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        );
        Box::new(Burst {
            classified: [None; MAX_BURST],
            keys: [none; MAX_BURST],
            at: [0; MAX_BURST],
        })
    }
}

/// A hit's answer before any admission: the packet's verdict, or "treat it as a miss"
/// (a revoked TCP flow whose originator opens it again with a SYN).
enum Hit {
    Verdict(Verdict),
    Reopen,
}

impl Filter {
    /// A filter for one worker; `tag` names the packet front end in the flow log and
    /// metrics, `counters` is this worker's own. Allocates the worker's fragment table and
    /// burst space once.
    pub fn new(
        rt: Arc<Runtime>,
        tag: ListenerTag,
        cfg: FilterConfig,
        counters: Arc<PacketCounters>,
    ) -> Filter {
        let fragments = Fragments::new(cfg.max_fragments, cfg.fragment_timeout, Instant::now());
        let rejects = RateLimit::new(cfg.reject_per_second);
        Filter { rt, tag, cfg, counters, fragments, rejects, burst: Burst::new() }
    }

    /// This worker's counters.
    pub fn counters(&self) -> &Arc<PacketCounters> {
        &self.counters
    }

    /// Decides a burst: `verdicts[i]` for `packets[i]` (each one IP packet, a GSO
    /// super-packet counting as one). At most [`MAX_BURST`] packets are decided (the rest
    /// of a longer slice are left as they are: the caller keeps bursts within it);
    /// `verdicts` at least as long as `packets`. No allocation, no lock, no syscall on a
    /// hit.
    pub fn run(&mut self, packets: &[&[u8]], verdicts: &mut [Verdict], now: Instant) {
        let n = packets.len().min(verdicts.len()).min(MAX_BURST);
        let (packets, verdicts) = (&packets[..n], &mut verdicts[..n]);
        let b = &mut *self.burst;
        let mut m = 0;
        // Later fragments, decided last: their first fragment may be in this very burst
        // (the kernel writes a datagram's fragments back to back).
        let mut later: u64 = 0;
        // 1. Classify.
        for (i, packet) in packets.iter().enumerate() {
            b.classified[i] = None;
            verdicts[i] = match classify::classify_with(packet, &self.cfg.limits) {
                Err(reason) => Verdict::Drop(DropCause::Malformed(reason)),
                Ok(c) => match c.kind {
                    Kind::Fragment { .. } => {
                        b.classified[i] = Some(c);
                        later |= 1 << i;
                        Verdict::Drop(DropCause::Fragment)
                    }
                    _ => {
                        b.classified[i] = Some(c);
                        b.keys[m] = c.key;
                        b.at[m] = i as u8;
                        m += 1;
                        Verdict::Pass
                    }
                },
            };
        }
        // 2. One batch lookup; hits decided in place, misses marked.
        let mut misses: u64 = 0;
        if m > 0 {
            let (ct, cfg) = (&*self.rt.conntrack, &self.cfg);
            let (classified, at) = (&b.classified, &b.at);
            let ms = ct.now_ms(now);
            ct.lookup_many(&b.keys[..m], |j, hit| {
                let i = usize::from(at[j]);
                let Some(c) = classified[i] else { return };
                match hit.map(|(e, side)| on_hit(ct, cfg, e, side, &c, packets[i], ms)) {
                    Some(Hit::Verdict(v)) => verdicts[i] = v,
                    Some(Hit::Reopen) | None => misses |= 1 << i,
                }
            });
        }
        // 3. Misses, in order: an earlier packet of the burst may have opened the flow.
        while misses != 0 {
            let i = misses.trailing_zeros() as usize;
            misses &= misses - 1;
            if let Some(c) = self.burst.classified[i] {
                verdicts[i] = self.on_miss(&c, packets[i], now);
            }
        }
        // First fragments' verdicts for their later fragments, and later fragments by
        // them, in burst order; the counters.
        let mut tally = Tally::default();
        for (i, packet) in packets.iter().enumerate() {
            if later & (1 << i) != 0 {
                if let Some(c) = &self.burst.classified[i]
                    && let Kind::Fragment { offset, .. } = c.kind
                {
                    verdicts[i] = follow(&self.fragments, &self.counters, c, offset, now);
                }
            } else if let Some(c) = &self.burst.classified[i]
                && let Some(key) = c.fragment_key()
            {
                let first_len = u32::try_from(c.ip_len - c.l4_offset).unwrap_or(u32::MAX);
                let pass = verdicts[i] == Verdict::Pass;
                if !self.fragments.first(key, pass, first_len, now) {
                    self.counters.fragments_table_full.fetch_add(1, Ordering::Relaxed);
                }
            }
            tally.count(&self.counters, verdicts[i], packet.len());
        }
        tally.add_to(&self.counters);
    }

    /// A packet whose flow the batch did not find: looked up once more (an earlier packet
    /// of this burst, or another worker, may have opened it since), else admitted if it
    /// may open a flow.
    fn on_miss(&mut self, c: &Classified, packet: &[u8], now: Instant) -> Verdict {
        let (ct, cfg) = (&*self.rt.conntrack, &self.cfg);
        let ms = ct.now_ms(now);
        let again = ct.lookup_with(&c.key, |e, side| on_hit(ct, cfg, e, side, c, packet, ms));
        match again {
            Some(Hit::Verdict(v)) => return v,
            Some(Hit::Reopen) => {
                ct.remove(&c.key);
            }
            None => {}
        }
        let Kind::Flow { l4, .. } = c.kind else {
            // An ICMP error about a flow that is not tracked.
            return Verdict::Drop(DropCause::Untracked);
        };
        let (tcp, state) = match l4 {
            L4::Tcp(seg) => match TcpConn::open(seg.flags) {
                Ok(conn) => (Some(conn), FlowState::Unreplied),
                Err(_) => return Verdict::Drop(DropCause::Untracked),
            },
            L4::Echo { reply: true, .. } => return Verdict::Drop(DropCause::Untracked),
            _ => (None, FlowState::Unreplied),
        };
        let req = FlowRequest::to(c.key, state);
        match admit_packet(&self.rt, &self.tag, &req, tcp, now) {
            Admission::Allow(a) => {
                let side = a.entry.side_of(&c.key).unwrap_or(Side::Orig);
                if let (L4::Tcp(seg), Some(w)) = (l4, a.entry.tcp_window()) {
                    // The SYN that opened the flow: its numbers and window scale.
                    let _ = w.on_segment(side, &numbers(&seg, packet, c), true);
                }
                a.entry.count(side, packet.len() as u64);
                Verdict::Pass
            }
            Admission::Tracked(_) => Verdict::Pass,
            Admission::Deny(_) => match cfg.on_deny {
                OnDeny::Drop => Verdict::Drop(DropCause::Policy),
                OnDeny::Reject => Verdict::Reject(DropCause::Policy),
            },
            Admission::Untracked(InsertError::Full { .. }) => Verdict::Drop(DropCause::TableFull),
            // Opened meanwhile by another worker: follow its entry.
            Admission::Untracked(InsertError::Exists) => {
                match ct.lookup_with(&c.key, |e, side| on_hit(ct, cfg, e, side, c, packet, ms)) {
                    Some(Hit::Verdict(v)) => v,
                    _ => Verdict::Drop(DropCause::Untracked),
                }
            }
        }
    }

    /// The reply to a packet given [`Verdict::Reject`]: a TCP RST, or an ICMP/ICMPv6
    /// "administratively prohibited" error quoting it (`reject.rs`), written into `out`
    /// (an IP packet; `out` of at least 1280 bytes for a full ICMPv6 quote). `None` when
    /// the rate limit (`reject_per_second` per worker) says no (counted in
    /// `rejects_limited`) or the packet warrants none (a RST, an ICMP error, a later
    /// fragment, a malformed packet, a source that is not one host). Counted in
    /// `rejects_sent` when written.
    pub fn reject_reply(&mut self, packet: &[u8], out: &mut [u8], now: Instant) -> Option<usize> {
        let c = classify::classify_with(packet, &self.cfg.limits).ok()?;
        if let Kind::Flow { l4: L4::Tcp(seg), .. } = c.kind
            && seg.flags.contains(TcpFlags::RST)
        {
            return None;
        }
        if matches!(c.kind, Kind::Related { .. } | Kind::Fragment { .. }) {
            return None;
        }
        if !self.rejects.allow(now) {
            self.counters.rejects_limited.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let n = reject::write(packet, &c, out)?;
        self.counters.rejects_sent.fetch_add(1, Ordering::Relaxed);
        Some(n)
    }
}

/// A later fragment's verdict.
fn follow(
    fragments: &Fragments,
    counters: &PacketCounters,
    c: &Classified,
    offset: u16,
    now: Instant,
) -> Verdict {
    let Some(key) = c.fragment_key() else { return Verdict::Drop(DropCause::Fragment) };
    match fragments.later(&key, u32::from(offset), now) {
        Follow::Pass => Verdict::Pass,
        Follow::Unknown => Verdict::Drop(DropCause::Fragment),
        Follow::Overlap => {
            counters.fragments_overlapping.fetch_add(1, Ordering::Relaxed);
            Verdict::Drop(DropCause::Fragment)
        }
    }
}

/// A packet of a tracked flow (`e`, the packet travelling on `side`).
#[inline]
fn on_hit(
    ct: &crate::conntrack::Conntrack,
    cfg: &FilterConfig,
    e: &Entry,
    side: Side,
    c: &Classified,
    packet: &[u8],
    now_ms: u64,
) -> Hit {
    if e.is_revoked() {
        // A new connection on the same ports after the revocation is a new flow, decided
        // afresh (a SYN from the originator); anything else of the flow is dropped.
        if let Kind::Flow { l4: L4::Tcp(seg), .. } = c.kind
            && side == Side::Orig
            && TcpConn::open(seg.flags).is_ok()
        {
            return Hit::Reopen;
        }
        return Hit::Verdict(Verdict::Drop(DropCause::Revoked));
    }
    match c.kind {
        Kind::Flow { l4: L4::Tcp(seg), .. } => {
            if let Some(w) = e.tcp_window() {
                let nums = numbers(&seg, packet, c);
                if w.on_segment(side, &nums, cfg.tcp_liberal).is_err() {
                    return Hit::Verdict(Verdict::Drop(DropCause::Invalid));
                }
            }
            if e.on_tcp_segment(side, seg.flags).is_err() {
                return Hit::Verdict(Verdict::Drop(DropCause::Invalid));
            }
        }
        Kind::Flow { .. } => {
            if side == Side::Reply {
                e.mark_reply();
            }
        }
        // An ICMP error about this flow: passes, changes nothing.
        Kind::Related { .. } | Kind::Fragment { .. } => {}
    }
    e.count(side, packet.len() as u64);
    ct.touch_ms(e, now_ms);
    Hit::Verdict(Verdict::Pass)
}

/// What window tracking reads of a TCP segment (the window-scale option only on a SYN).
#[inline]
fn numbers(seg: &classify::TcpSegment, packet: &[u8], c: &Classified) -> TcpSegmentNumbers {
    let wscale =
        if seg.flags.contains(TcpFlags::SYN) { window_scale(packet, c.l4_offset) } else { None };
    TcpSegmentNumbers {
        flags: seg.flags,
        seq: seg.seq,
        ack: seg.ack,
        window: seg.window,
        payload_len: seg.payload_len,
        wscale,
    }
}

/// The window-scale option (kind 3, RFC 7323) of the TCP header at `l4`, if present and
/// well formed. A malformed option list ends the walk: the option is then absent.
fn window_scale(packet: &[u8], l4: usize) -> Option<u8> {
    let header = packet.get(l4..)?;
    let len = usize::from(*header.get(12)? >> 4) * 4;
    let mut opts = header.get(20..len)?;
    while let [kind, rest @ ..] = opts {
        match *kind {
            0 => return None,
            1 => opts = rest,
            _ => {
                let n = usize::from(*rest.first()?);
                if n < 2 || n > opts.len() {
                    return None;
                }
                if *kind == 3 && n == 3 {
                    return Some(opts[2]);
                }
                opts = &opts[n..];
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_scale_is_read_from_the_options() {
        // IPv4 header (20) then a TCP header of 32 bytes: MSS, NOP, WS 7, NOP, NOP, SACKOK...
        let mut p = vec![0u8; 20 + 32];
        p[20 + 12] = 8 << 4;
        p[40..52].copy_from_slice(&[2, 4, 5, 0xb4, 1, 3, 3, 7, 1, 1, 4, 2]);
        assert_eq!(window_scale(&p, 20), Some(7));
        p[45] = 0; // the option's length 0: malformed, absent
        assert_eq!(window_scale(&p, 20), None);
        p[20 + 12] = 5 << 4;
        assert_eq!(window_scale(&p, 20), None);
        assert_eq!(window_scale(&p[..30], 20), None);
    }
}
