//! Byte-literal fixtures, built by hand below (and with smoltcp's emit side for the
//! round-trip property), one per protocol and per drop reason.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber,
};

use super::*;

const A4: [u8; 4] = [198, 18, 0, 1];
const B4: [u8; 4] = [198, 18, 1, 2];
const R4: [u8; 4] = [198, 18, 9, 9];
const A6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn a4() -> Ipv4Addr {
    Ipv4Addr::from(A4)
}
fn b4() -> Ipv4Addr {
    Ipv4Addr::from(B4)
}
fn a6() -> Ipv6Addr {
    Ipv6Addr::from(A6)
}
fn b6() -> Ipv6Addr {
    Ipv6Addr::from(B6)
}

/// An IPv4 packet: 20-byte header, fragment fields as given, total length filled in.
fn v4_frag(
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    id: u16,
    off: u16,
    more: bool,
    l4: &[u8],
) -> Vec<u8> {
    let flags_off = (off / 8) | if more { 0x2000 } else { 0 };
    let mut p = vec![0x45, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags_off.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

fn v4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
    v4_frag(proto, src, dst, 0x1234, 0, false, l4)
}

/// An IPv6 packet whose payload (extension headers + L4) is `rest`.
fn v6(next: u8, src: [u8; 16], dst: [u8; 16], rest: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(rest.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(rest);
    p
}

/// An 8-byte options-style extension header (hop-by-hop, destination options, routing).
fn ext(next: u8) -> [u8; 8] {
    [next, 0, 1, 4, 0, 0, 0, 0]
}

fn frag6(next: u8, off: u16, more: bool, id: u32) -> [u8; 8] {
    let fo = off | u16::from(more);
    let [f0, f1] = fo.to_be_bytes();
    let [i0, i1, i2, i3] = id.to_be_bytes();
    [next, 0, f0, f1, i0, i1, i2, i3]
}

fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&0x0100_0000u32.to_be_bytes());
    t.extend_from_slice(&0x0200_0000u32.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0x01, 0xf6, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An ICMP/ICMPv6 message: type, code, checksum 0, four bytes of rest-of-header, data.
fn icmp(ty: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut i = vec![ty, code, 0, 0];
    i.extend_from_slice(&rest);
    i.extend_from_slice(data);
    i
}

fn echo(ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let [i0, i1] = id.to_be_bytes();
    let [s0, s1] = seq.to_be_bytes();
    icmp(ty, 0, [i0, i1, s0, s1], b"ping")
}

fn flow_l4(c: &Classified) -> L4 {
    match c.kind {
        Kind::Flow { l4, .. } => l4,
        other => panic!("not a flow: {other:?}"),
    }
}

#[test]
fn ipv4_tcp_ports_flags_and_sequence_space() {
    let pkt = v4(6, A4, B4, &tcp(40000, 443, 0x18, b"hello"));
    let c = classify(&pkt).unwrap();
    assert_eq!(c.key, FlowKey::new(Proto::Tcp, sa(a4(), 40000), sa(b4(), 443)));
    assert_eq!((c.l4_offset, c.ip_len), (20, pkt.len()));
    let L4::Tcp(seg) = flow_l4(&c) else { panic!("not tcp") };
    assert_eq!(seg.flags, TcpFlags::ACK | TcpFlags::PSH);
    assert_eq!((seg.seq, seg.ack, seg.window, seg.payload_len), (0x0100_0000, 0x0200_0000, 502, 5));
}

#[test]
fn ipv4_options_move_the_l4_header() {
    let mut pkt = v4(17, A4, B4, &udp(5353, 53, b"q"));
    // IHL 6: one word of options (NOPs) before UDP.
    pkt[0] = 0x46;
    pkt.splice(20..20, [1, 1, 1, 1]);
    let len = pkt.len() as u16;
    pkt[2..4].copy_from_slice(&len.to_be_bytes());
    let c = classify(&pkt).unwrap();
    assert_eq!(c.key, FlowKey::new(Proto::Udp, sa(a4(), 5353), sa(b4(), 53)));
    assert_eq!(c.l4_offset, 24);
}

#[test]
fn link_padding_past_total_length_is_not_the_packet() {
    let mut pkt = v4(17, A4, B4, &udp(1, 2, b""));
    let ip_len = pkt.len();
    pkt.extend_from_slice(&[0; 18]);
    let c = classify(&pkt).unwrap();
    assert_eq!(c.ip_len, ip_len);
}

#[test]
fn ipv6_udp_through_extension_headers() {
    let mut rest = Vec::new();
    rest.extend_from_slice(&ext(60)); // hop-by-hop → destination options
    rest.extend_from_slice(&ext(43)); // destination options → routing
    rest.extend_from_slice(&ext(17)); // routing → UDP
    rest.extend_from_slice(&udp(5353, 53, b"q"));
    let pkt = v6(0, A6, B6, &rest);
    let c = classify(&pkt).unwrap();
    assert_eq!(c.key, FlowKey::new(Proto::Udp, sa(a6(), 5353), sa(b6(), 53)));
    assert_eq!(c.l4_offset, 40 + 24);
    assert_eq!(flow_l4(&c), L4::Udp);
}

#[test]
fn ipv6_authentication_header_counts_four_byte_units() {
    // AH with payload length 4: (4 + 2) * 4 = 24 bytes.
    let mut ah = vec![6, 4, 0, 0];
    ah.extend_from_slice(&[0; 20]);
    ah.extend_from_slice(&tcp(1000, 22, 0x02, b""));
    let c = classify(&v6(51, A6, B6, &ah)).unwrap();
    assert_eq!(c.key, FlowKey::new(Proto::Tcp, sa(a6(), 1000), sa(b6(), 22)));
    assert_eq!(c.l4_offset, 40 + 24);
}

#[test]
fn sctp_ports_and_verification_tag() {
    let mut s = Vec::new();
    s.extend_from_slice(&3868u16.to_be_bytes());
    s.extend_from_slice(&3869u16.to_be_bytes());
    s.extend_from_slice(&0xdead_beefu32.to_be_bytes());
    s.extend_from_slice(&[0; 4]);
    let c = classify(&v4(132, A4, B4, &s)).unwrap();
    assert_eq!(c.key, FlowKey::new(Proto::Sctp, sa(a4(), 3868), sa(b4(), 3869)));
    assert_eq!(flow_l4(&c), L4::Sctp { vtag: 0xdead_beef });
    assert_eq!(classify(&v4(132, A4, B4, &s[..11])), Err(DropReason::Truncated));
}

#[test]
fn unknown_protocols_classify_with_ports_zero() {
    let c = classify(&v4(47, A4, B4, b"gre payload")).unwrap();
    assert_eq!(c.key, FlowKey::new(Proto::Unknown(47), sa(a4(), 0), sa(b4(), 0)));
    assert_eq!(flow_l4(&c), L4::Other);
    // No next header and ESP end the walk like an L4 protocol.
    let c = classify(&v6(59, A6, B6, b"")).unwrap();
    assert_eq!(c.key.proto, Proto::Unknown(59));
    let c = classify(&v6(50, A6, B6, &[0; 16])).unwrap();
    assert_eq!(c.key.proto, Proto::Unknown(50));
}

#[test]
fn echo_reply_matches_the_reversed_request_key() {
    let req = classify(&v4(1, A4, B4, &echo(8, 0x4242, 1))).unwrap();
    let rep = classify(&v4(1, B4, A4, &echo(0, 0x4242, 1))).unwrap();
    assert_eq!(req.key, FlowKey::new(Proto::Icmp, sa(a4(), 0x4242), sa(b4(), 0)));
    assert_eq!(rep.key, req.key.reversed());
    assert_eq!(flow_l4(&req), L4::Echo { id: 0x4242, seq: 1, reply: false });
    assert_eq!(flow_l4(&rep), L4::Echo { id: 0x4242, seq: 1, reply: true });

    let req6 = classify(&v6(58, A6, B6, &echo(128, 7, 9))).unwrap();
    let rep6 = classify(&v6(58, B6, A6, &echo(129, 7, 9))).unwrap();
    assert_eq!(req6.key, FlowKey::new(Proto::Icmpv6, sa(a6(), 7), sa(b6(), 0)));
    assert_eq!(rep6.key, req6.key.reversed());
}

#[test]
fn neighbour_discovery_is_icmp_info_with_ports_zero() {
    let ns = icmp(135, 0, [0; 4], &B6);
    let c = classify(&v6(58, A6, B6, &ns)).unwrap();
    assert_eq!(c.key, FlowKey::new(Proto::Icmpv6, sa(a6(), 0), sa(b6(), 0)));
    assert_eq!(flow_l4(&c), L4::IcmpInfo { ty: 135, code: 0 });
}

#[test]
fn icmp_of_the_other_version_has_no_ports() {
    // Protocol 58 inside IPv4 is not ICMP to this packet: a protocol like any other.
    let c = classify(&v4(58, A4, B4, &echo(128, 7, 9))).unwrap();
    assert_eq!((c.key.src.port(), c.key.dst.port(), flow_l4(&c)), (0, 0, L4::Other));
}

/// The TCP segment A → B that the errors below quote (IP header + first 8 bytes).
fn quoted_tcp_v4() -> Vec<u8> {
    v4(6, A4, B4, &tcp(40000, 443, 0x02, b""))[..28].to_vec()
}

#[test]
fn icmp_error_is_related_to_the_quoted_flow_reversed() {
    let quoted_key = FlowKey::new(Proto::Tcp, sa(a4(), 40000), sa(b4(), 443));
    // Port unreachable from B, time exceeded from a router R, both travelling back to A.
    for (from, ty, code, kind) in [
        (B4, 3, 3, IcmpErrorKind::DestUnreachable),
        (R4, 11, 0, IcmpErrorKind::TimeExceeded),
        (R4, 12, 0, IcmpErrorKind::ParamProblem),
        (R4, 3, 4, IcmpErrorKind::DestUnreachable),
    ] {
        let c = classify(&v4(1, from, A4, &icmp(ty, code, [0; 4], &quoted_tcp_v4()))).unwrap();
        assert_eq!(c.key, quoted_key.reversed(), "type {ty}");
        assert_eq!(
            c.kind,
            Kind::Related { error: IcmpError { kind, code }, reporter: IpAddr::from(from) }
        );
    }
}

#[test]
fn icmpv6_errors_quote_through_extension_headers() {
    let mut inner_rest = ext(17).to_vec();
    inner_rest.extend_from_slice(&udp(5353, 53, b"query"));
    let quoted = v6(60, A6, B6, &inner_rest);
    let quoted_key = FlowKey::new(Proto::Udp, sa(a6(), 5353), sa(b6(), 53));
    for (ty, kind) in [
        (1, IcmpErrorKind::DestUnreachable),
        (2, IcmpErrorKind::PacketTooBig),
        (3, IcmpErrorKind::TimeExceeded),
        (4, IcmpErrorKind::ParamProblem),
    ] {
        let c = classify(&v6(58, B6, A6, &icmp(ty, 0, [0, 0, 5, 0], &quoted))).unwrap();
        assert_eq!(c.key, quoted_key.reversed());
        assert!(matches!(c.kind, Kind::Related { error, .. } if error.kind == kind));
    }
}

#[test]
fn icmp_error_about_an_echo_matches_the_echo_reply_key() {
    let quoted = v4(1, A4, B4, &echo(8, 0x4242, 1));
    let c = classify(&v4(1, R4, A4, &icmp(11, 0, [0; 4], &quoted[..28]))).unwrap();
    let reply = classify(&v4(1, B4, A4, &echo(0, 0x4242, 1))).unwrap();
    assert_eq!(c.key, reply.key);
}

#[test]
fn icmp_error_quoting_a_truncated_header_drops() {
    let whole = quoted_tcp_v4();
    // Every cut of the quote: inside the IP header, inside the first 8 L4 bytes.
    for cut in 0..whole.len() {
        let pkt = v4(1, B4, A4, &icmp(3, 3, [0; 4], &whole[..cut]));
        assert_eq!(classify(&pkt), Err(DropReason::BadQuote), "quote cut at {cut}");
    }
    // An ICMP error shorter than its own 8-byte header.
    assert_eq!(classify(&v4(1, B4, A4, &[3, 3, 0, 0])), Err(DropReason::Truncated));
    // A quote with IHL < 5.
    let mut bad = whole.clone();
    bad[0] = 0x44;
    assert_eq!(classify(&v4(1, B4, A4, &icmp(3, 3, [0; 4], &bad))), Err(DropReason::BadQuote));
}

#[test]
fn icmp_error_quote_checks() {
    // Addressed to someone other than the quoted packet's sender.
    let pkt = v4(1, B4, R4, &icmp(3, 3, [0; 4], &quoted_tcp_v4()));
    assert_eq!(classify(&pkt), Err(DropReason::QuoteMismatch));
    // An error about an error.
    let inner_err = v4(1, A4, B4, &icmp(3, 1, [0; 4], &quoted_tcp_v4()));
    let pkt = v4(1, R4, A4, &icmp(11, 0, [0; 4], &inner_err));
    assert_eq!(classify(&pkt), Err(DropReason::UnmatchableQuote));
    // An error about a later fragment (no ports to match).
    let frag = v4_frag(17, A4, B4, 7, 1480, false, &[0; 8]);
    let pkt = v4(1, R4, A4, &icmp(11, 1, [0; 4], &frag));
    assert_eq!(classify(&pkt), Err(DropReason::UnmatchableQuote));
    // An ICMPv4 error quoting IPv6.
    let pkt = v4(1, R4, A4, &icmp(3, 3, [0; 4], &v6(17, A6, B6, &udp(1, 2, b""))));
    assert_eq!(classify(&pkt), Err(DropReason::BadQuote));
}

#[test]
fn fragments_first_carries_ports_later_ones_the_fragment_key() {
    let first = v4_frag(17, A4, B4, 0x77, 0, true, &udp(5353, 53, &[0; 32]));
    let later = v4_frag(17, A4, B4, 0x77, 40, false, &[0; 16]);
    let fk = FragmentKey { src: a4().into(), dst: b4().into(), proto: 17, id: 0x77 };
    let id = FragmentId { id: 0x77, proto: 17 };

    let c = classify(&first).unwrap();
    assert_eq!(c.key, FlowKey::new(Proto::Udp, sa(a4(), 5353), sa(b4(), 53)));
    assert_eq!(c.kind, Kind::Flow { l4: L4::Udp, first_fragment: Some(id) });
    assert_eq!(c.fragment_key(), Some(fk));

    let c = classify(&later).unwrap();
    assert_eq!(c.key, FlowKey::new(Proto::Udp, sa(a4(), 0), sa(b4(), 0)));
    assert_eq!(c.kind, Kind::Fragment { id, offset: 40, more: false });
    assert_eq!(c.fragment_key(), Some(fk));
    assert_eq!(c.l4_offset, 20);
    assert_eq!(classify(&v4(17, A4, B4, &udp(1, 2, b""))).unwrap().fragment_key(), None);
}

#[test]
fn ipv6_fragments_and_atomic_fragments() {
    let mut first = frag6(6, 0, true, 0xabcd).to_vec();
    first.extend_from_slice(&tcp(1000, 80, 0x02, &[0; 16]));
    let c = classify(&v6(44, A6, B6, &first)).unwrap();
    let fk = FragmentKey { src: a6().into(), dst: b6().into(), proto: 6, id: 0xabcd };
    assert_eq!(c.key, FlowKey::new(Proto::Tcp, sa(a6(), 1000), sa(b6(), 80)));
    assert!(matches!(c.kind, Kind::Flow { first_fragment: Some(_), .. }));
    assert_eq!(c.fragment_key(), Some(fk));

    let mut later = frag6(6, 64, false, 0xabcd).to_vec();
    later.extend_from_slice(&[0; 24]);
    let c = classify(&v6(44, A6, B6, &later)).unwrap();
    assert_eq!(
        c.kind,
        Kind::Fragment { id: FragmentId { id: 0xabcd, proto: 6 }, offset: 64, more: false }
    );
    assert_eq!(c.fragment_key(), Some(fk));
    assert_eq!((c.key.src.port(), c.l4_offset), (0, 48));

    // A reserved bit set between offset and M changes neither.
    let mut first_res = frag6(6, 0b100, true, 0xabcd).to_vec();
    first_res.extend_from_slice(&tcp(1000, 80, 0x02, &[0; 16]));
    let c = classify(&v6(44, A6, B6, &first_res)).unwrap();
    assert!(matches!(c.kind, Kind::Flow { first_fragment: Some(_), .. }));

    // Offset 0 and no more fragments: a whole packet (RFC 6946).
    let mut atomic = frag6(17, 0, false, 1).to_vec();
    atomic.extend_from_slice(&udp(1, 2, b""));
    let c = classify(&v6(44, A6, B6, &atomic)).unwrap();
    assert_eq!(c.kind, Kind::Flow { l4: L4::Udp, first_fragment: None });
}

#[test]
fn first_fragment_without_the_whole_l4_header_drops() {
    let short_tcp = &tcp(1000, 80, 0x02, b"")[..12];
    let pkt = v4_frag(6, A4, B4, 9, 0, true, short_tcp);
    assert_eq!(classify(&pkt), Err(DropReason::Truncated));
}

#[test]
fn tcp_fragment_at_offset_eight_drops() {
    let pkt = v4_frag(6, A4, B4, 9, 8, true, &[0; 16]);
    assert_eq!(classify(&pkt), Err(DropReason::TinyFragment));
    // The same offset for UDP is just a later fragment.
    assert!(classify(&v4_frag(17, A4, B4, 9, 8, true, &[0; 16])).is_ok());
}

#[test]
fn drop_reasons_for_broken_ip_headers() {
    assert_eq!(classify(&[]), Err(DropReason::Truncated));
    assert_eq!(classify(&[0x45]), Err(DropReason::Truncated));
    assert_eq!(classify(&[0x60; 39]), Err(DropReason::Truncated));
    assert_eq!(classify(&[0x00; 40]), Err(DropReason::UnknownVersion));
    assert_eq!(classify(&[0x50; 40]), Err(DropReason::UnknownVersion));

    let good = v4(17, A4, B4, &udp(1, 2, b"x"));
    for ihl in 0..5u8 {
        let mut p = good.clone();
        p[0] = 0x40 | ihl;
        assert_eq!(classify(&p), Err(DropReason::BadIhl), "ihl {ihl}");
    }
    // IHL 15 (60 bytes) in a 29-byte packet.
    let mut p = good.clone();
    p[0] = 0x4f;
    assert_eq!(classify(&p), Err(DropReason::Truncated));
    // Total length beyond the buffer, and shorter than the header.
    let mut p = good.clone();
    p[2..4].copy_from_slice(&(good.len() as u16 + 1).to_be_bytes());
    assert_eq!(classify(&p), Err(DropReason::BadLength));
    let mut p = good.clone();
    p[2..4].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(classify(&p), Err(DropReason::BadLength));
    // IPv6 payload length beyond the buffer.
    let mut p = v6(17, A6, B6, &udp(1, 2, b""));
    p[4..6].copy_from_slice(&9u16.to_be_bytes());
    assert_eq!(classify(&p), Err(DropReason::BadLength));
}

#[test]
fn drop_reasons_for_broken_l4_headers() {
    let t = tcp(1, 2, 0x02, b"");
    assert_eq!(classify(&v4(6, A4, B4, &t[..19])), Err(DropReason::Truncated));
    let mut bad_off = t.clone();
    bad_off[12] = 0x40;
    assert_eq!(classify(&v4(6, A4, B4, &bad_off)), Err(DropReason::BadTcpOffset));
    // Data offset 6 (24 bytes) with 20 bytes present.
    let mut long_off = t.clone();
    long_off[12] = 0x60;
    assert_eq!(classify(&v4(6, A4, B4, &long_off)), Err(DropReason::Truncated));
    assert_eq!(classify(&v4(17, A4, B4, &[0; 7])), Err(DropReason::Truncated));
    assert_eq!(classify(&v4(1, A4, B4, &[8, 0, 0, 0, 0, 1, 0])), Err(DropReason::Truncated));
    assert_eq!(classify(&v6(58, A6, B6, &[128, 0, 0])), Err(DropReason::Truncated));
}

#[test]
fn extension_chains_are_bounded() {
    // An endless chain: destination options pointing at destination options, 100 deep.
    let rest: Vec<u8> = (0..100).flat_map(|_| ext(60)).collect();
    assert_eq!(classify(&v6(60, A6, B6, &rest)), Err(DropReason::ExtChainTooLong));
    // Exactly at the bound passes; one more does not.
    let max = DEFAULT_MAX_IPV6_EXT_HEADERS;
    let chain = |n: usize| {
        let mut r: Vec<u8> = (1..n).flat_map(|_| ext(60)).collect();
        r.extend_from_slice(&ext(17));
        r.extend_from_slice(&udp(1, 2, b""));
        v6(60, A6, B6, &r)
    };
    assert!(classify(&chain(max)).is_ok());
    assert_eq!(classify(&chain(max + 1)), Err(DropReason::ExtChainTooLong));
    // The knob.
    let tight = Limits { max_ipv6_ext_headers: 1 };
    assert_eq!(classify_with(&chain(2), &tight), Err(DropReason::ExtChainTooLong));
    assert!(classify_with(&chain(1), &tight).is_ok());
    // A chain that runs off the end of the packet.
    assert_eq!(classify(&v6(60, A6, B6, &ext(60))), Err(DropReason::Truncated));
    let mut long = ext(17);
    long[1] = 3; // claims 32 bytes
    assert_eq!(classify(&v6(60, A6, B6, &long)), Err(DropReason::Truncated));
}

#[test]
fn misplaced_extension_headers_drop() {
    let mut r = ext(0).to_vec(); // destination options → hop-by-hop
    r.extend_from_slice(&ext(17));
    r.extend_from_slice(&udp(1, 2, b""));
    assert_eq!(classify(&v6(60, A6, B6, &r)), Err(DropReason::BadExtChain));

    let mut r = frag6(44, 0, true, 1).to_vec(); // a second fragment header
    r.extend_from_slice(&frag6(17, 0, true, 2));
    r.extend_from_slice(&udp(1, 2, b""));
    assert_eq!(classify(&v6(44, A6, B6, &r)), Err(DropReason::BadExtChain));
}

#[test]
fn every_reason_has_a_distinct_label() {
    let mut labels: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), DropReason::ALL.len());
}

/// Emits a TCP segment for `key` with smoltcp's emit side.
fn emit_tcp(key: &FlowKey, control: TcpControl, seq: i32, payload: &[u8]) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: key.src.port(),
        dst_port: key.dst.port(),
        control,
        seq_number: TcpSeqNumber(seq),
        ack_number: None,
        window_len: 1024,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let caps = ChecksumCapabilities::default();
    let (ip_hdr, src, dst) = match (key.src.ip(), key.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (20, IpAddress::Ipv4(s), IpAddress::Ipv4(d)),
        (IpAddr::V6(s), IpAddr::V6(d)) => (40, IpAddress::Ipv6(s), IpAddress::Ipv6(d)),
        _ => unreachable!("same family"),
    };
    let mut buf = vec![0; ip_hdr + tcp.buffer_len()];
    match (src, dst) {
        (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => {
            let ip = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
        }
        (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            let ip = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            ip.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
        }
        _ => unreachable!("same family"),
    }
    tcp.emit(&mut TcpPacket::new_unchecked(&mut buf[ip_hdr..]), &src, &dst, &caps);
    buf
}

fn arb_key() -> impl Strategy<Value = FlowKey> {
    let v4 =
        (any::<[u8; 4]>(), any::<[u8; 4]>()).prop_map(|(s, d)| (IpAddr::from(s), IpAddr::from(d)));
    let v6 = (any::<[u8; 16]>(), any::<[u8; 16]>())
        .prop_map(|(s, d)| (IpAddr::from(s), IpAddr::from(d)));
    (prop_oneof![v4, v6], any::<u16>(), any::<u16>())
        .prop_map(|((s, d), sp, dp)| FlowKey::new(Proto::Tcp, sa(s, sp), sa(d, dp)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_panics_and_stays_inside_the_buffer(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(c) = classify(&buf) {
            prop_assert!(c.l4_offset <= c.ip_len && c.ip_len <= buf.len());
        }
    }

    #[test]
    fn never_panics_on_mutated_valid_packets(
        base in 0usize..4,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut pkt = match base {
            0 => v4(6, A4, B4, &tcp(1, 2, 0x02, b"abc")),
            1 => v6(60, A6, B6, &[ext(17).as_slice(), &udp(1, 2, b"q")].concat()),
            2 => v4(1, B4, A4, &icmp(3, 3, [0; 4], &quoted_tcp_v4())),
            _ => v6(58, B6, A6, &icmp(1, 4, [0; 4], &v6(17, A6, B6, &udp(1, 2, b"")))),
        };
        for (at, byte) in flips {
            let i = at.index(pkt.len());
            pkt[i] = byte;
        }
        let pkt = &pkt[..cut.index(pkt.len() + 1)];
        if let Ok(c) = classify(pkt) {
            prop_assert!(c.l4_offset <= c.ip_len && c.ip_len <= pkt.len());
        }
    }

    #[test]
    fn a_tcp_packet_built_from_a_key_classifies_back_to_it(
        key in arb_key(),
        syn in any::<bool>(),
        seq in any::<i32>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let control = if syn { TcpControl::Syn } else { TcpControl::None };
        let pkt = emit_tcp(&key, control, seq, &payload);
        let c = classify(&pkt).unwrap();
        prop_assert_eq!(c.key, key);
        prop_assert_eq!(c.ip_len, pkt.len());
        let L4::Tcp(seg) = flow_l4(&c) else { panic!("not tcp") };
        prop_assert_eq!(seg.seq, seq as u32);
        prop_assert_eq!(seg.payload_len as usize, payload.len());
        prop_assert_eq!(seg.flags.contains(TcpFlags::SYN), syn);
        // And its reply's key is the reverse.
        let reply = emit_tcp(&key.reversed(), TcpControl::None, 0, b"");
        prop_assert_eq!(classify(&reply).unwrap().key, key.reversed());
    }
}

#[test]
fn link_control_is_nd_with_hop_limit_255_and_mld_from_the_link() {
    let ll: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    let solicited: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2];
    let mld2: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];
    let hop = |mut p: Vec<u8>, h: u8| {
        p[7] = h;
        p
    };
    // ND: every type 133–137 at hop limit 255, to a group or to a unicast address.
    for ty in 133..=137 {
        let nd = icmp(ty, 0, [0; 4], &B6);
        assert!(is_link_control(&hop(v6(58, A6, solicited, &nd), 255)), "type {ty}");
        assert!(is_link_control(&hop(v6(58, ll, B6, &nd), 255)), "type {ty}");
        // Routed (hop limit below 255): not ND any receiver accepts; the filter decides.
        assert!(!is_link_control(&hop(v6(58, A6, B6, &nd), 64)), "type {ty}");
    }
    // MLDv2 report behind a hop-by-hop router alert, hop limit 1, from link-local.
    let mut report = ext(58).to_vec();
    report.extend_from_slice(&icmp(143, 0, [0; 4], &[0; 4]));
    assert!(is_link_control(&hop(v6(0, ll, mld2, &report), 1)));
    assert!(is_link_control(&hop(v6(0, [0; 16], mld2, &report), 1)));
    assert!(!is_link_control(&hop(v6(0, A6, mld2, &report), 1)), "global source");
    assert!(!is_link_control(&hop(v6(0, ll, B6, &report), 1)), "unicast destination");
    assert!(!is_link_control(&hop(v6(0, ll, mld2, &report), 2)), "hop limit 2");
    // Not link control: echo, data, ND behind another extension header or a fragment,
    // truncated, IPv4.
    assert!(!is_link_control(&hop(v6(58, A6, B6, &echo(128, 1, 1)), 255)));
    assert!(!is_link_control(&hop(v6(17, A6, B6, &udp(1, 2, b"x")), 255)));
    let mut behind = ext(58).to_vec();
    behind.extend_from_slice(&icmp(135, 0, [0; 4], &B6));
    assert!(!is_link_control(&hop(v6(60, A6, B6, &behind), 255)));
    let mut frag = frag6(58, 0, true, 7).to_vec();
    frag.extend_from_slice(&icmp(135, 0, [0; 4], &B6));
    assert!(!is_link_control(&hop(v6(44, A6, B6, &frag), 255)));
    let ns = hop(v6(58, A6, solicited, &icmp(135, 0, [0; 4], &B6)), 255);
    assert!(!is_link_control(&ns[..44]), "cut inside the ICMPv6 header");
    let mut long = ns.clone();
    long[4..6].copy_from_slice(&2000u16.to_be_bytes());
    assert!(!is_link_control(&long), "payload length beyond the buffer");
    assert!(!is_link_control(&v4(58, A4, B4, &icmp(135, 0, [0; 4], &B6))));
    assert!(!is_link_control(&[]));
}
