//! Packet → flow: the header walk that turns one IP packet into the [`FlowKey`] of the flow
//! it belongs to, plus what conntrack reads next (TCP flags and sequence space, the ICMP echo
//! identifier, the fragment it is part of). Pure: no I/O, no clock, no allocation.
//!
//! # Safety contract
//! The input is untrusted bytes straight off a TUN queue or an AF_PACKET ring. Every length
//! is checked once, before the fields behind it are read, and then the fields are read in
//! place through `pnet_packet` views (whose constructors check only a fixed minimum size;
//! the variable lengths are checked here, so a failure names *which* check failed).
//! [`classify`] never
//! panics and never reads past `buf`; what it returns lies inside `buf` (the fuzz target
//! `fuzz/fuzz_targets/packet_classify.rs` asserts it). A packet that cannot be classified is
//! a [`DropReason`], a small `Copy` value the caller counts; nothing is logged here.
//!
//! # What is checked and what is not
//! - IPv4: version, IHL ≥ 5, header and total length within the buffer. The header checksum
//!   is **not** verified: on the TUN front end the kernel verified it on ingress before
//!   routing the packet into the device (it drops bad ones, `IPSTATS_MIB_INHDRERRORS`), and
//!   on AF_PACKET the next hop verifies it; re-summing 20+ bytes per packet buys nothing a
//!   conntrack decision depends on. L4 checksums are not verified either (GSO super-packets
//!   from a TUN with offloads carry partial checksums by design).
//! - IPv6: payload length within the buffer; extension headers (hop-by-hop, routing,
//!   destination options, fragment, AH) walked up to [`Limits::max_ipv6_ext_headers`]
//!   headers; a longer chain is [`DropReason::ExtChainTooLong`], so an endless chain costs
//!   at most that many reads.
//! - Link padding past the IP length (AF_PACKET on Ethernet) is ignored:
//!   [`Classified::ip_len`] says where the packet ends.
//!
//! # Keys
//! [`Classified::key`] is always in the direction *this packet* travels (source → destination
//! of the packet, or of the flow an ICMP error is about, seen as that error travels), so a
//! reply's key is the reverse of its request's key and conntrack matches it with
//! [`FlowKey::reversed`]/[`FlowKey::canonical`] as for any other reply.
//! - TCP, UDP, SCTP: the ports.
//! - ICMP/ICMPv6 echo: the identifier stands in for a port **on the requester's side**, and
//!   0 on the responder's side: a request `A → B` with identifier `id` is
//!   `(A:id → B:0)`, its reply `B → A` is `(B:0 → A:id)` — exactly the reverse.
//! - Other ICMP informational messages (neighbour discovery, router adverts, …) and protocols
//!   without ports ([`Proto::Unknown`], ESP, …): ports 0. Policy decides (default deny).
//! - ICMP errors ([`Kind::Related`]): the key of the flow the error's *quoted* header
//!   belongs to, reversed (the error travels back towards the quoted packet's sender), so
//!   the caller looks it up like a reply and passes the error only for a tracked flow.
//! - Later fragments ([`Kind::Fragment`]): ports 0 and a [`FragmentId`]; the first
//!   fragment (offset 0) carries the same, and [`Classified::fragment_key`] turns either
//!   into the [`FragmentKey`] the caller applies the first fragment's verdict by.

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};

// pnet_packet rather than smoltcp::wire: on this walk pnet's views cost what hand-written
// reads cost, smoltcp's up to 1.5x more (it converts every protocol and ICMP type byte into
// an enum and back); numbers in benches/classify.rs.
// ICMP echo request and reply share one layout, so the request view reads both.
use pnet_packet::icmp::echo_request::EchoRequestPacket as Icmpv4Echo;
use pnet_packet::icmpv6::echo_request::EchoRequestPacket as Icmpv6Echo;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::{ExtensionPacket, FragmentPacket, Ipv6Packet};
use pnet_packet::tcp::TcpPacket;
use pnet_packet::udp::UdpPacket;
use thiserror::Error;

use crate::conntrack::TcpFlags;
use crate::flow::{FlowKey, Proto};

/// How many IPv6 extension headers are walked before the packet is dropped as
/// [`DropReason::ExtChainTooLong`]. Real traffic carries 0–2 (hop-by-hop for MLD/jumbo,
/// a fragment header, a destination options header); 8 leaves room for any legitimate
/// chain, and every header costs at least 8 bytes, so the bound also caps the walk's work.
/// The default of the knob `[packet] max_ipv6_ext_headers`.
pub const DEFAULT_MAX_IPV6_EXT_HEADERS: usize = 8;

/// The limits of one classification, the knobs of the walk. Build once per worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// At most this many IPv6 extension headers are walked (default
    /// [`DEFAULT_MAX_IPV6_EXT_HEADERS`]).
    pub max_ipv6_ext_headers: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits { max_ipv6_ext_headers: DEFAULT_MAX_IPV6_EXT_HEADERS };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// Why a packet was not classified. The caller drops it and counts it under
/// [`DropReason::as_str`]; the set is closed so counters can be resolved once
/// ([`DropReason::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
pub enum DropReason {
    /// The buffer ends before a header does (including an empty buffer).
    #[error("truncated header")]
    Truncated,
    /// The version nibble is neither 4 nor 6.
    #[error("unknown IP version")]
    UnknownVersion,
    /// IPv4 IHL below 5 (a header shorter than 20 bytes).
    #[error("IPv4 header length below 20 bytes")]
    BadIhl,
    /// The IP length field disagrees with the buffer: IPv4 total length shorter than the
    /// header or longer than the buffer; IPv6 payload length longer than the buffer.
    #[error("IP length field disagrees with the packet")]
    BadLength,
    /// A TCP data offset below 5.
    #[error("TCP data offset below 20 bytes")]
    BadTcpOffset,
    /// More IPv6 extension headers than [`Limits::max_ipv6_ext_headers`].
    #[error("IPv6 extension header chain too long")]
    ExtChainTooLong,
    /// A hop-by-hop header not right after the IPv6 header, or a second fragment header.
    #[error("IPv6 extension header out of place")]
    BadExtChain,
    /// An IPv4 TCP fragment at offset 8 bytes, which can rewrite the first fragment's flags
    /// (RFC 1858, the "tiny fragment" overlap).
    #[error("TCP fragment overlapping the TCP header")]
    TinyFragment,
    /// An ICMP error whose quoted header is truncated or malformed, or of the other IP
    /// version.
    #[error("ICMP error with a malformed quoted header")]
    BadQuote,
    /// An ICMP error not addressed to the sender of the packet it quotes.
    #[error("ICMP error not addressed to the quoted packet's sender")]
    QuoteMismatch,
    /// An ICMP error that no flow can match: it quotes another ICMP error, or a later
    /// fragment (no ports).
    #[error("ICMP error about a packet no flow can match")]
    UnmatchableQuote,
}

impl DropReason {
    /// Every reason, for pre-resolving one counter per reason.
    pub const ALL: [DropReason; 11] = [
        DropReason::Truncated,
        DropReason::UnknownVersion,
        DropReason::BadIhl,
        DropReason::BadLength,
        DropReason::BadTcpOffset,
        DropReason::ExtChainTooLong,
        DropReason::BadExtChain,
        DropReason::TinyFragment,
        DropReason::BadQuote,
        DropReason::QuoteMismatch,
        DropReason::UnmatchableQuote,
    ];

    /// The counter label.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::UnknownVersion => "unknown_version",
            DropReason::BadIhl => "bad_ihl",
            DropReason::BadLength => "bad_length",
            DropReason::BadTcpOffset => "bad_tcp_offset",
            DropReason::ExtChainTooLong => "ext_chain_too_long",
            DropReason::BadExtChain => "bad_ext_chain",
            DropReason::TinyFragment => "tiny_fragment",
            DropReason::BadQuote => "bad_quote",
            DropReason::QuoteMismatch => "quote_mismatch",
            DropReason::UnmatchableQuote => "unmatchable_quote",
        }
    }
}

/// One classified packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classified {
    /// The flow, in the direction this packet travels (see the module doc for ICMP and
    /// fragments).
    pub key: FlowKey,
    /// What kind of packet of that flow this is.
    pub kind: Kind,
    /// Where the L4 header starts in the buffer, after IPv4 options or IPv6 extension
    /// headers (for a later fragment: where its payload starts; for an ICMP error: the ICMP
    /// header). Always `<= ip_len`.
    pub l4_offset: usize,
    /// How many bytes of the buffer the IP packet covers (IPv4 total length, or 40 + IPv6
    /// payload length); anything past it is link padding. Always `<= buf.len()`.
    pub ip_len: usize,
}

impl Classified {
    /// The key of the caller's fragment table, for a first fragment and a later one alike
    /// (`None` for a packet that is not a fragment).
    pub fn fragment_key(&self) -> Option<FragmentKey> {
        let id = match self.kind {
            Kind::Flow { first_fragment: Some(id), .. } | Kind::Fragment { id, .. } => id,
            _ => return None,
        };
        Some(FragmentKey {
            src: self.key.src.ip(),
            dst: self.key.dst.ip(),
            proto: id.proto,
            id: id.id,
        })
    }
}

/// What a classified packet is to its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A packet of flow `key` itself. `first_fragment` is set on the first fragment
    /// (offset 0, more to come) of a fragmented packet: the caller records this packet's
    /// verdict under it for the [`Kind::Fragment`]s that follow.
    Flow { l4: L4, first_fragment: Option<FragmentId> },
    /// An ICMP/ICMPv6 error about flow `key` (the quoted packet's flow, reversed). The
    /// caller passes it only when `key` is a tracked flow, and never opens a flow for it.
    Related { error: IcmpError, reporter: IpAddr },
    /// A fragment after the first: no L4 header, so `key` has ports 0. The caller applies
    /// the verdict the first fragment with the same [`Classified::fragment_key`] got, or
    /// drops it. `offset` is in bytes.
    Fragment { id: FragmentId, offset: u16, more: bool },
}

/// The L4 facts of a packet that conntrack reads after the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(TcpSegment),
    Udp,
    /// SCTP, with the common header's verification tag.
    Sctp {
        vtag: u32,
    },
    /// An ICMP/ICMPv6 echo request (`reply: false`) or reply; `id` is in the key.
    Echo {
        id: u16,
        seq: u16,
        reply: bool,
    },
    /// Another ICMP/ICMPv6 informational message (neighbour discovery, router adverts, …).
    IcmpInfo {
        ty: u8,
        code: u8,
    },
    /// A protocol without ports ([`Proto::Unknown`], or ICMP of the other IP version).
    Other,
}

/// What the TCP state machine (and, later, window tracking) reads of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    pub flags: TcpFlags,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    /// Bytes of payload after the TCP header in this packet (a GSO super-packet counts
    /// all its segments' payload).
    pub payload_len: u32,
}

/// The error an ICMP/ICMPv6 [`Kind::Related`] packet reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub kind: IcmpErrorKind,
    /// The message code as on the wire (e.g. 4, "fragmentation needed", for ICMPv4
    /// destination unreachable).
    pub code: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IcmpErrorKind {
    DestUnreachable,
    /// ICMPv6 only; ICMPv4 says it as destination unreachable, code 4.
    PacketTooBig,
    TimeExceeded,
    ParamProblem,
}

/// The part of a [`FragmentKey`] that is not in the flow key: kept small so a
/// [`Classified`] stays cheap to return (benches/classify.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentId {
    pub id: u32,
    pub proto: u8,
}

/// Identifies the fragments of one IP packet: every fragment carries the same (RFC 791:
/// source, destination, protocol, identification; RFC 8200: source, destination,
/// identification). `proto` is the IPv4 protocol field or the IPv6 fragment header's next
/// header, which are the same in every fragment of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub id: u32,
}

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_HEADER: usize = 20;
/// UDP's header; also what ICMP's fixed part (type, code, checksum, 4 bytes) and the
/// prefix of SCTP that holds its ports take.
const L4_MIN: usize = 8;
const SCTP_HEADER: usize = 12;

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const PROTO_SCTP: u8 = 132;
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;

/// Classifies one IP packet with the default [`Limits`].
///
/// # Errors
/// The [`DropReason`] the packet is dropped for.
pub fn classify(buf: &[u8]) -> Result<Classified, DropReason> {
    classify_with(buf, &Limits::DEFAULT)
}

/// Classifies one IP packet (the buffer starts at the IP header, as a TUN read without
/// `IFF_VNET_HDR` or past the virtio-net header, or an AF_PACKET frame past the link
/// header).
///
/// # Errors
/// The [`DropReason`] the packet is dropped for.
pub fn classify_with(buf: &[u8], limits: &Limits) -> Result<Classified, DropReason> {
    let ip = IpHeader::parse(buf, limits, Framing::Packet)?;
    let l4 = buf.get(ip.l4_offset..ip.end).ok_or(DropReason::Truncated)?;
    let (l4_offset, ip_len) = (ip.l4_offset, ip.end);
    let addr = |src_port, dst_port| {
        FlowKey::new(
            Proto::from_number(ip.proto),
            SocketAddr::new(ip.src, src_port),
            SocketAddr::new(ip.dst, dst_port),
        )
    };

    let mut first_fragment = None;
    if let Some(frag) = ip.fragment {
        let fragment = FragmentId { id: frag.id, proto: frag.proto };
        if frag.offset != 0 {
            if ip.v4 && frag.offset == 8 && ip.proto == PROTO_TCP {
                return Err(DropReason::TinyFragment);
            }
            let kind = Kind::Fragment { id: fragment, offset: frag.offset, more: frag.more };
            return Ok(Classified { key: addr(0, 0), kind, l4_offset, ip_len });
        }
        first_fragment = Some(fragment);
    }

    let icmp = if ip.v4 { PROTO_ICMP } else { PROTO_ICMPV6 };
    let (src_port, dst_port, l4) = match ip.proto {
        p if p == icmp => {
            if let Some(error) = icmp_error(ip.v4, l4)? {
                // The quote follows the 8-byte ICMP header (`icmp_error` checked its length).
                let key = quoted_key(&ip, &l4[L4_MIN..], limits)?;
                let kind = Kind::Related { error, reporter: ip.src };
                return Ok(Classified { key, kind, l4_offset, ip_len });
            }
            icmp_info(ip.v4, l4)?
        }
        _ => transport(ip.proto, l4)?,
    };
    Ok(Classified {
        key: addr(src_port, dst_port),
        kind: Kind::Flow { l4, first_fragment },
        l4_offset,
        ip_len,
    })
}

/// Whether the bytes are a whole packet or the header an ICMP error quotes: a quote is cut
/// after the first 8 bytes of L4 (ICMPv4 minimum) or the MTU (ICMPv6), so its length
/// fields describe a packet that is not all there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Packet,
    Quote,
}

#[derive(Clone, Copy)]
struct Fragment {
    id: u32,
    /// In bytes.
    offset: u16,
    more: bool,
    proto: u8,
}

/// The IP layer of a packet, after the IPv6 extension-header walk.
struct IpHeader {
    v4: bool,
    src: IpAddr,
    dst: IpAddr,
    /// The L4 protocol number (for a later fragment: the protocol field / the fragment
    /// header's next header, since the walk stops there).
    proto: u8,
    l4_offset: usize,
    /// Where the IP packet ends in the buffer.
    end: usize,
    fragment: Option<Fragment>,
}

impl IpHeader {
    #[inline(always)]
    fn parse(buf: &[u8], limits: &Limits, framing: Framing) -> Result<IpHeader, DropReason> {
        match buf.first().map(|b| b >> 4) {
            None => Err(DropReason::Truncated),
            Some(4) => IpHeader::parse_v4(buf, framing),
            Some(6) => IpHeader::parse_v6(buf, limits, framing),
            Some(_) => Err(DropReason::UnknownVersion),
        }
    }

    #[inline(always)]
    fn parse_v4(buf: &[u8], framing: Framing) -> Result<IpHeader, DropReason> {
        // `new` is `None` below the 20-byte fixed header.
        let p = Ipv4Packet::new(buf).ok_or(DropReason::Truncated)?;
        let header_len = usize::from(p.get_header_length()) * 4;
        if header_len < IPV4_HEADER {
            return Err(DropReason::BadIhl);
        }
        if buf.len() < header_len {
            return Err(DropReason::Truncated);
        }
        let end = match framing {
            Framing::Quote => buf.len(),
            Framing::Packet => {
                let total = usize::from(p.get_total_length());
                if total < header_len || total > buf.len() {
                    return Err(DropReason::BadLength);
                }
                total
            }
        };
        let proto = p.get_next_level_protocol().0;
        // Flags are (reserved, don't fragment, more fragments); the offset counts 8 bytes
        // (13 bits, so at most 65,528 bytes).
        let more = p.get_flags() & 0b001 != 0;
        let offset = p.get_fragment_offset() * 8;
        let fragment = (more || offset != 0).then(|| Fragment {
            id: u32::from(p.get_identification()),
            offset,
            more,
            proto,
        });
        Ok(IpHeader {
            v4: true,
            src: IpAddr::V4(p.get_source()),
            dst: IpAddr::V4(p.get_destination()),
            proto,
            l4_offset: header_len,
            end,
            fragment,
        })
    }

    #[inline(always)]
    fn parse_v6(buf: &[u8], limits: &Limits, framing: Framing) -> Result<IpHeader, DropReason> {
        // `new` is `None` below the 40-byte header.
        let p = Ipv6Packet::new(buf).ok_or(DropReason::Truncated)?;
        let end = match framing {
            Framing::Quote => buf.len(),
            Framing::Packet => {
                let total = IPV6_HEADER + usize::from(p.get_payload_length());
                if total > buf.len() {
                    return Err(DropReason::BadLength);
                }
                total
            }
        };
        let mut ip = IpHeader {
            v4: false,
            src: IpAddr::V6(p.get_source()),
            dst: IpAddr::V6(p.get_destination()),
            proto: p.get_next_header().0,
            l4_offset: IPV6_HEADER,
            end,
            fragment: None,
        };
        // The walk: each extension header names the next; stop at the first that is not
        // one, at a later fragment's fragment header (what follows is payload), or at the
        // bound.
        for walked in 0..=limits.max_ipv6_ext_headers {
            let is_ext = matches!(
                ip.proto,
                EXT_HOP_BY_HOP | EXT_ROUTING | EXT_FRAGMENT | EXT_AH | EXT_DEST_OPTS
            );
            if !is_ext {
                return Ok(ip);
            }
            if walked == limits.max_ipv6_ext_headers {
                break;
            }
            if ip.proto == EXT_HOP_BY_HOP && walked != 0 {
                return Err(DropReason::BadExtChain);
            }
            // Every extension header is at least 8 bytes and starts with (next, length).
            let rest = buf.get(ip.l4_offset..end).ok_or(DropReason::Truncated)?;
            if rest.len() < 8 {
                return Err(DropReason::Truncated);
            }
            let ext = ExtensionPacket::new(rest).ok_or(DropReason::Truncated)?;
            let len = match ip.proto {
                EXT_FRAGMENT => {
                    if ip.fragment.is_some() {
                        return Err(DropReason::BadExtChain);
                    }
                    let frag = FragmentPacket::new(rest).ok_or(DropReason::Truncated)?;
                    // Offset (13 bits, in 8-byte units, so already bytes once the low 3
                    // bits are cleared), 2 reserved bits, M. pnet's `get_fragment_offset`
                    // keeps one reserved bit, so mask here.
                    let field = frag.get_fragment_offset_with_flags();
                    let (offset, more) = (field & !0b111, field & 1 != 0);
                    let next = frag.get_next_header().0;
                    // An atomic fragment (offset 0, no more) is a whole packet (RFC 6946).
                    if offset != 0 || more {
                        ip.fragment =
                            Some(Fragment { id: frag.get_id(), offset, more, proto: next });
                    }
                    if offset != 0 {
                        ip.l4_offset += 8;
                        ip.proto = next;
                        return Ok(ip);
                    }
                    8
                }
                // AH counts 4-byte units minus 2 (RFC 4302), the others 8-byte units minus 1.
                EXT_AH => (usize::from(ext.get_hdr_ext_len()) + 2) * 4,
                _ => (usize::from(ext.get_hdr_ext_len()) + 1) * 8,
            };
            if rest.len() < len {
                return Err(DropReason::Truncated);
            }
            ip.proto = ext.get_next_header().0;
            ip.l4_offset += len;
        }
        Err(DropReason::ExtChainTooLong)
    }
}

/// Ports and L4 facts of TCP, UDP, SCTP or a protocol without ports.
#[inline(always)]
fn transport(proto: u8, l4: &[u8]) -> Result<(u16, u16, L4), DropReason> {
    match proto {
        PROTO_TCP => {
            // `new` is `None` below the 20-byte fixed header.
            let t = TcpPacket::new(l4).ok_or(DropReason::Truncated)?;
            let header_len = usize::from(t.get_data_offset()) * 4;
            if header_len < TCP_HEADER {
                return Err(DropReason::BadTcpOffset);
            }
            let payload_len = l4.len().checked_sub(header_len).ok_or(DropReason::Truncated)?;
            let segment = TcpSegment {
                flags: TcpFlags(t.get_flags()),
                seq: t.get_sequence(),
                ack: t.get_acknowledgement(),
                window: t.get_window(),
                // At most 64 KiB - 20: an IP length field is 16 bits.
                payload_len: u32::try_from(payload_len).unwrap_or(u32::MAX),
            };
            Ok((t.get_source(), t.get_destination(), L4::Tcp(segment)))
        }
        PROTO_UDP => {
            let u = UdpPacket::new(l4).ok_or(DropReason::Truncated)?;
            Ok((u.get_source(), u.get_destination(), L4::Udp))
        }
        PROTO_SCTP => {
            // pnet has no SCTP: the common header is source port, destination port,
            // verification tag, checksum (RFC 9260 §3.1).
            let h: &[u8; SCTP_HEADER] = l4
                .get(..SCTP_HEADER)
                .and_then(|h| h.try_into().ok())
                .ok_or(DropReason::Truncated)?;
            let vtag = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            Ok((
                u16::from_be_bytes([h[0], h[1]]),
                u16::from_be_bytes([h[2], h[3]]),
                L4::Sctp { vtag },
            ))
        }
        _ => Ok((0, 0, L4::Other)),
    }
}

/// The error an ICMP/ICMPv6 message reports, or `None` for an informational message.
///
/// # Errors
/// [`DropReason::Truncated`] below the 8 bytes every ICMP message starts with.
#[inline(always)]
fn icmp_error(v4: bool, l4: &[u8]) -> Result<Option<IcmpError>, DropReason> {
    let Some(&[ty, code, ..]) = l4.get(..L4_MIN) else {
        return Err(DropReason::Truncated);
    };
    let kind = match (v4, ty) {
        (true, 3) | (false, 1) => IcmpErrorKind::DestUnreachable,
        (false, 2) => IcmpErrorKind::PacketTooBig,
        (true, 11) | (false, 3) => IcmpErrorKind::TimeExceeded,
        (true, 12) | (false, 4) => IcmpErrorKind::ParamProblem,
        _ => return Ok(None),
    };
    Ok(Some(IcmpError { kind, code }))
}

/// Ports and L4 facts of an ICMP/ICMPv6 informational message (see the module doc for
/// how an echo's identifier becomes a port).
#[inline(always)]
fn icmp_info(v4: bool, l4: &[u8]) -> Result<(u16, u16, L4), DropReason> {
    // `new` is `None` below the 8 bytes of (type, code, checksum, identifier, sequence).
    let (ty, code, id, seq) = if v4 {
        let i = Icmpv4Echo::new(l4).ok_or(DropReason::Truncated)?;
        (i.get_icmp_type().0, i.get_icmp_code().0, i.get_identifier(), i.get_sequence_number())
    } else {
        let i = Icmpv6Echo::new(l4).ok_or(DropReason::Truncated)?;
        (i.get_icmpv6_type().0, i.get_icmpv6_code().0, i.get_identifier(), i.get_sequence_number())
    };
    Ok(match (v4, ty) {
        (true, 8) | (false, 128) => (id, 0, L4::Echo { id, seq, reply: false }),
        (true, 0) | (false, 129) => (0, id, L4::Echo { id, seq, reply: true }),
        _ => (0, 0, L4::IcmpInfo { ty, code }),
    })
}

/// The key of the flow an ICMP error quotes, reversed: the direction the error travels.
fn quoted_key(outer: &IpHeader, quote: &[u8], limits: &Limits) -> Result<FlowKey, DropReason> {
    let inner = IpHeader::parse(quote, limits, Framing::Quote).map_err(|_| DropReason::BadQuote)?;
    if inner.v4 != outer.v4 {
        return Err(DropReason::BadQuote);
    }
    if inner.src != outer.dst {
        return Err(DropReason::QuoteMismatch);
    }
    if inner.fragment.is_some_and(|f| f.offset != 0) {
        return Err(DropReason::UnmatchableQuote);
    }
    // RFC 792 guarantees the first 8 bytes of the quoted L4 header: the ports, an echo's
    // identifier, an SCTP verification tag. Nothing past them is read.
    let l4 =
        quote.get(inner.l4_offset..).and_then(|l4| l4.get(..L4_MIN)).ok_or(DropReason::BadQuote)?;
    let icmp = if inner.v4 { PROTO_ICMP } else { PROTO_ICMPV6 };
    let (src_port, dst_port) = match inner.proto {
        p if p == icmp => {
            if icmp_error(inner.v4, l4)?.is_some() {
                return Err(DropReason::UnmatchableQuote);
            }
            let (s, d, _) = icmp_info(inner.v4, l4)?;
            (s, d)
        }
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]))
        }
        _ => (0, 0),
    };
    let quoted = FlowKey::new(
        Proto::from_number(inner.proto),
        SocketAddr::new(inner.src, src_port),
        SocketAddr::new(inner.dst, dst_port),
    );
    Ok(quoted.reversed())
}

/// Whether `buf` is IPv6's own link control — neighbour discovery (RFC 4861: router and
/// neighbour solicitation and advertisement, redirect; ICMPv6 types 133–137) or multicast
/// listener discovery (RFC 2710, RFC 3810: query, report, done; 130–132 and 143) — which
/// a bump in the wire passes unfiltered as it passes ARP, IPv6's ARP being these.
///
/// Only what cannot be a routed flow qualifies: ND with hop limit 255 (receivers discard
/// ND with any other, RFC 4861 §6.1/§7.1, so no router forwarded it), MLD with hop limit 1
/// to a multicast group from a link-local or the unspecified address (RFC 3810 §5, §7.4).
/// The ICMPv6 header follows the IPv6 header or one hop-by-hop header (MLD's router
/// alert); anything else — another extension header, a fragment, a short or malformed
/// packet — is not link control and goes to the filter. Pure, bounded, never panics.
pub fn is_link_control(buf: &[u8]) -> bool {
    let Some(p) = Ipv6Packet::new(buf) else { return false };
    if p.get_version() != 6 {
        return false;
    }
    let end = IPV6_HEADER + usize::from(p.get_payload_length());
    let Some(packet) = buf.get(..end) else { return false };
    let (mut next, mut at) = (p.get_next_header().0, IPV6_HEADER);
    if next == EXT_HOP_BY_HOP {
        let Some(&[n, len]) = packet.get(at..at + 2) else { return false };
        (next, at) = (n, at + (usize::from(len) + 1) * 8);
    }
    if next != PROTO_ICMPV6 {
        return false;
    }
    // Every ICMPv6 message is at least 8 bytes; ND and MLD are longer, their receivers
    // check the rest.
    let Some(&[ty, ..]) = packet.get(at..at + L4_MIN) else { return false };
    let src = p.get_source();
    match ty {
        133..=137 => p.get_hop_limit() == 255,
        130..=132 | 143 => {
            p.get_hop_limit() == 1
                && p.get_destination().is_multicast()
                && (src.is_unspecified() || src.is_unicast_link_local())
        }
        _ => false,
    }
}
