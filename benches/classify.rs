//! The packet classifier's header walk, ns per packet, done three ways on the same packets:
//! with `smoltcp::wire`, with `pnet_packet`, and with hand-written reads — the measurement
//! that chose the library `dataplane::packet::classify` is written with — and then
//! `classify` itself, so the production walk is measured against the same packets.
//!
//! Each walk does what `classify` needs: IPv4 (IHL, total length) or IPv6 (extension headers
//! walked with a bound), then TCP (ports, flags, seq/ack/window), UDP ports, or an ICMP
//! error's quoted header (the quoted flow's ports, reversed).
//!
//! `cargo bench --bench classify -- --warm-up-time 1 --measurement-time 3`
//!
//! Median ns per packet on the 2-core dev machine, shared (load average 4–6, so ±20%):
//!
//! | packet                 | smoltcp | pnet | by hand | classify (pnet) |
//! |------------------------|--------:|-----:|--------:|----------------:|
//! | IPv4/TCP               |    32.8 | 28.7 |    30.2 |            58.0 |
//! | IPv6/UDP, 1 ext header |    35.5 | 33.3 |    21.9 |            40.3 |
//! | ICMP error quoting TCP |    47.8 | 29.7 |    27.9 |            39.2 |
//!
//! pnet was as fast as or faster than smoltcp on every packet in two runs (the first:
//! 24/21/45 vs 25/32/69 ns), and close to hand-written reads, so `classify` uses pnet.
//! smoltcp loses most on ICMP: it turns each type and protocol byte into an enum (and
//! `Ipv4Packet::next_header` is not even inlined). `classify` does more than the walks (the
//! whole `FlowKey` with `SocketAddr`s, fragment and quote checks, a ~100-byte result).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::dataplane::packet::classify::classify;

/// What every walk extracts: enough for a flow key and the TCP state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Walked {
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    tcp: (u8, u32, u32, u16),
    related: bool,
}

/// The extension-header bound every walk applies.
const MAX_EXT: usize = 8;

mod with_smoltcp {
    use super::*;
    use smoltcp::wire::{
        Icmpv4Message, Icmpv4Packet, IpProtocol, Ipv4Packet, Ipv6ExtHeader, Ipv6FragmentHeader,
        Ipv6Packet, TcpPacket, UdpPacket,
    };

    pub fn walk(buf: &[u8]) -> Option<Walked> {
        ip(buf, false)
    }

    fn ip(buf: &[u8], quoted: bool) -> Option<Walked> {
        match buf.first()? >> 4 {
            4 => {
                let p = Ipv4Packet::new_unchecked(buf);
                if quoted {
                    // A quote holds the header and 8 bytes: total length is not the buffer's.
                    if buf.len() < 20 || p.header_len() < 20 || buf.len() < p.header_len().into() {
                        return None;
                    }
                } else {
                    p.check_len().ok()?;
                }
                let l4 = if quoted { &buf[p.header_len().into()..] } else { p.payload() };
                let (src, dst) = (IpAddr::V4(p.src_addr()), IpAddr::V4(p.dst_addr()));
                l4_walk(p.next_header(), src, dst, l4, quoted)
            }
            6 => {
                let p = Ipv6Packet::new_unchecked(buf);
                if quoted {
                    if buf.len() < 40 {
                        return None;
                    }
                } else {
                    p.check_len().ok()?;
                }
                let mut rest = if quoted { &buf[40..] } else { p.payload() };
                let mut nh = p.next_header();
                let (src, dst) = (IpAddr::V6(p.src_addr()), IpAddr::V6(p.dst_addr()));
                for _ in 0..MAX_EXT {
                    match nh {
                        IpProtocol::HopByHop | IpProtocol::Ipv6Route | IpProtocol::Ipv6Opts => {
                            let h = Ipv6ExtHeader::new_checked(rest).ok()?;
                            nh = h.next_header();
                            rest = &rest[(usize::from(h.header_len()) + 1) * 8..];
                        }
                        IpProtocol::Ipv6Frag => {
                            let h = Ipv6ExtHeader::new_checked(rest).ok()?;
                            let f = Ipv6FragmentHeader::new_checked(&rest[2..]).ok()?;
                            if f.frag_offset() != 0 {
                                return None;
                            }
                            nh = h.next_header();
                            rest = &rest[8..];
                        }
                        _ => return l4_walk(nh, src, dst, rest, quoted),
                    }
                }
                None
            }
            _ => None,
        }
    }

    fn l4_walk(
        nh: IpProtocol,
        src: IpAddr,
        dst: IpAddr,
        l4: &[u8],
        quoted: bool,
    ) -> Option<Walked> {
        let mut w = Walked {
            proto: nh.into(),
            src,
            dst,
            sport: 0,
            dport: 0,
            tcp: (0, 0, 0, 0),
            related: false,
        };
        match nh {
            IpProtocol::Tcp if quoted => {
                let t = UdpPacket::new_unchecked(l4.get(..8)?);
                (w.sport, w.dport) = (t.src_port(), t.dst_port());
            }
            IpProtocol::Tcp => {
                let t = TcpPacket::new_checked(l4).ok()?;
                (w.sport, w.dport) = (t.src_port(), t.dst_port());
                let flags = u8::from(t.fin())
                    | u8::from(t.syn()) << 1
                    | u8::from(t.rst()) << 2
                    | u8::from(t.psh()) << 3
                    | u8::from(t.ack()) << 4;
                w.tcp = (flags, t.seq_number().0 as u32, t.ack_number().0 as u32, t.window_len());
            }
            IpProtocol::Udp => {
                let u = UdpPacket::new_unchecked(l4.get(..8)?);
                (w.sport, w.dport) = (u.src_port(), u.dst_port());
            }
            IpProtocol::Icmp if !quoted => {
                let i = Icmpv4Packet::new_checked(l4).ok()?;
                match i.msg_type() {
                    Icmpv4Message::DstUnreachable
                    | Icmpv4Message::TimeExceeded
                    | Icmpv4Message::ParamProblem => {
                        let inner = ip(i.data(), true)?;
                        return Some(Walked {
                            src: inner.dst,
                            dst: inner.src,
                            sport: inner.dport,
                            dport: inner.sport,
                            related: true,
                            ..inner
                        });
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Some(w)
    }
}

mod with_pnet {
    use super::*;
    use pnet_packet::icmp::{IcmpPacket, IcmpTypes};
    use pnet_packet::ip::{IpNextHeaderProtocol, IpNextHeaderProtocols as P};
    use pnet_packet::ipv4::Ipv4Packet;
    use pnet_packet::ipv6::{ExtensionPacket, FragmentPacket, Ipv6Packet};
    use pnet_packet::tcp::TcpPacket;
    use pnet_packet::udp::UdpPacket;

    pub fn walk(buf: &[u8]) -> Option<Walked> {
        ip(buf, false)
    }

    fn ip(buf: &[u8], quoted: bool) -> Option<Walked> {
        match buf.first()? >> 4 {
            4 => {
                let p = Ipv4Packet::new(buf)?;
                let hl = usize::from(p.get_header_length()) * 4;
                let total = usize::from(p.get_total_length());
                if hl < 20 || buf.len() < hl || (!quoted && (total < hl || total > buf.len())) {
                    return None;
                }
                let l4 = if quoted { &buf[hl..] } else { &buf[hl..total] };
                let (src, dst) = (IpAddr::V4(p.get_source()), IpAddr::V4(p.get_destination()));
                l4_walk(p.get_next_level_protocol(), src, dst, l4, quoted)
            }
            6 => {
                let p = Ipv6Packet::new(buf)?;
                let end = 40 + usize::from(p.get_payload_length());
                if !quoted && end > buf.len() {
                    return None;
                }
                let mut rest = if quoted { &buf[40..] } else { &buf[40..end] };
                let mut nh = p.get_next_header();
                let (src, dst) = (IpAddr::V6(p.get_source()), IpAddr::V6(p.get_destination()));
                for _ in 0..MAX_EXT {
                    match nh {
                        P::Hopopt | P::Ipv6Route | P::Ipv6Opts => {
                            let h = ExtensionPacket::new(rest)?;
                            let len = (usize::from(h.get_hdr_ext_len()) + 1) * 8;
                            nh = h.get_next_header();
                            rest = rest.get(len..)?;
                        }
                        P::Ipv6Frag => {
                            let f = FragmentPacket::new(rest)?;
                            if f.get_fragment_offset() != 0 {
                                return None;
                            }
                            nh = f.get_next_header();
                            rest = &rest[8..];
                        }
                        _ => return l4_walk(nh, src, dst, rest, quoted),
                    }
                }
                None
            }
            _ => None,
        }
    }

    fn l4_walk(
        nh: IpNextHeaderProtocol,
        src: IpAddr,
        dst: IpAddr,
        l4: &[u8],
        quoted: bool,
    ) -> Option<Walked> {
        let mut w =
            Walked { proto: nh.0, src, dst, sport: 0, dport: 0, tcp: (0, 0, 0, 0), related: false };
        match nh {
            P::Tcp if quoted => {
                let t = UdpPacket::new(l4)?;
                (w.sport, w.dport) = (t.get_source(), t.get_destination());
            }
            P::Tcp => {
                let t = TcpPacket::new(l4)?;
                let doff = usize::from(t.get_data_offset()) * 4;
                if doff < 20 || doff > l4.len() {
                    return None;
                }
                (w.sport, w.dport) = (t.get_source(), t.get_destination());
                w.tcp = (t.get_flags(), t.get_sequence(), t.get_acknowledgement(), t.get_window());
            }
            P::Udp => {
                let u = UdpPacket::new(l4)?;
                (w.sport, w.dport) = (u.get_source(), u.get_destination());
            }
            P::Icmp if !quoted => {
                let i = IcmpPacket::new(l4)?;
                let t = i.get_icmp_type();
                if t == IcmpTypes::DestinationUnreachable
                    || t == IcmpTypes::TimeExceeded
                    || t == IcmpTypes::ParameterProblem
                {
                    let inner = ip(l4.get(8..)?, true)?;
                    return Some(Walked {
                        src: inner.dst,
                        dst: inner.src,
                        sport: inner.dport,
                        dport: inner.sport,
                        related: true,
                        ..inner
                    });
                }
            }
            _ => {}
        }
        Some(w)
    }
}

/// Plain slice reads, the baseline that says whether either library costs anything.
mod by_hand {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    pub fn walk(buf: &[u8]) -> Option<Walked> {
        ip(buf, false)
    }

    fn ip(buf: &[u8], quoted: bool) -> Option<Walked> {
        match buf.first()? >> 4 {
            4 => {
                let h: &[u8; 20] = buf.get(..20)?.try_into().ok()?;
                let hl = usize::from(h[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
                if hl < 20 || buf.len() < hl || (!quoted && (total < hl || total > buf.len())) {
                    return None;
                }
                let l4 = if quoted { &buf[hl..] } else { &buf[hl..total] };
                let src = IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15]));
                let dst = IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19]));
                l4_walk(h[9], src, dst, l4, quoted)
            }
            6 => {
                let h: &[u8; 40] = buf.get(..40)?.try_into().ok()?;
                let end = 40 + usize::from(u16::from_be_bytes([h[4], h[5]]));
                if !quoted && end > buf.len() {
                    return None;
                }
                let mut rest = if quoted { &buf[40..] } else { &buf[40..end] };
                let mut nh = h[6];
                let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24]).ok()?));
                let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&h[24..40]).ok()?));
                for _ in 0..MAX_EXT {
                    match nh {
                        0 | 43 | 60 => {
                            let e = rest.get(..2)?;
                            nh = e[0];
                            rest = rest.get((usize::from(e[1]) + 1) * 8..)?;
                        }
                        44 => {
                            let e = rest.get(..8)?;
                            if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                                return None;
                            }
                            nh = e[0];
                            rest = &rest[8..];
                        }
                        _ => return l4_walk(nh, src, dst, rest, quoted),
                    }
                }
                None
            }
            _ => None,
        }
    }

    fn l4_walk(nh: u8, src: IpAddr, dst: IpAddr, l4: &[u8], quoted: bool) -> Option<Walked> {
        let mut w =
            Walked { proto: nh, src, dst, sport: 0, dport: 0, tcp: (0, 0, 0, 0), related: false };
        match nh {
            6 if !quoted => {
                let t = l4.get(..20)?;
                let doff = usize::from(t[12] >> 4) * 4;
                if doff < 20 || doff > l4.len() {
                    return None;
                }
                (w.sport, w.dport) = (u16_at(t, 0)?, u16_at(t, 2)?);
                w.tcp = (t[13], u32_at(t, 4)?, u32_at(t, 8)?, u16_at(t, 14)?);
            }
            6 | 17 => {
                let t = l4.get(..8)?;
                (w.sport, w.dport) = (u16_at(t, 0)?, u16_at(t, 2)?);
            }
            1 if !quoted => {
                let i = l4.get(..8)?;
                if matches!(i[0], 3 | 11 | 12) {
                    let inner = ip(&l4[8..], true)?;
                    return Some(Walked {
                        src: inner.dst,
                        dst: inner.src,
                        sport: inner.dport,
                        dport: inner.sport,
                        related: true,
                        ..inner
                    });
                }
            }
            _ => {}
        }
        Some(w)
    }
}

fn ipv4_tcp() -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 1, 198, 18, 1, 2];
    // TCP: 40000 → 443, seq, ack, doff 5, ACK|PSH, window 502, then 64 bytes of payload.
    p.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb, 0, 0, 0x10, 0, 0, 0, 0x20, 0, 0x50, 0x18]);
    p.extend_from_slice(&[0x01, 0xf6, 0, 0, 0, 0]);
    p.extend_from_slice(&[0xab; 64]);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

fn ipv6_udp_one_ext() -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 0, 60, 64];
    p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    // Destination options: next UDP, length 0 (8 bytes), PadN filling the rest.
    p.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    // UDP 5353 → 53, length 8 + 64.
    p.extend_from_slice(&[0x14, 0xe9, 0, 53, 0, 72, 0, 0]);
    p.extend_from_slice(&[0xcd; 64]);
    let len = (p.len() - 40) as u16;
    p[4..6].copy_from_slice(&len.to_be_bytes());
    p
}

fn icmp_error_quoting_tcp() -> Vec<u8> {
    let quoted = ipv4_tcp();
    // Port unreachable from the server (198.18.1.2) back to the client (198.18.0.1).
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 198, 18, 1, 2, 198, 18, 0, 1];
    p.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    p.extend_from_slice(&quoted[..28]);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

fn walks(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    for (name, pkt) in [
        ("ipv4_tcp", ipv4_tcp()),
        ("ipv6_udp_ext", ipv6_udp_one_ext()),
        ("icmp_err_tcp", icmp_error_quoting_tcp()),
    ] {
        let want = by_hand::walk(&pkt).expect("fixture walks");
        assert_eq!(with_smoltcp::walk(&pkt), Some(want), "{name}: smoltcp");
        assert_eq!(with_pnet::walk(&pkt), Some(want), "{name}: pnet");
        let c = classify(&pkt).expect("fixture classifies");
        assert_eq!((c.key.src.ip(), c.key.dst.ip()), (want.src, want.dst), "{name}: classify");
        assert_eq!((c.key.src.port(), c.key.dst.port()), (want.sport, want.dport), "{name}");
        let buf = pkt.as_slice();
        g.bench_function(format!("smoltcp/{name}"), |b| {
            b.iter(|| with_smoltcp::walk(black_box(buf)))
        });
        g.bench_function(format!("pnet/{name}"), |b| b.iter(|| with_pnet::walk(black_box(buf))));
        g.bench_function(format!("by_hand/{name}"), |b| b.iter(|| by_hand::walk(black_box(buf))));
        g.bench_function(format!("flowgate/{name}"), |b| b.iter(|| classify(black_box(buf))));
    }
    g.finish();
}

criterion_group!(benches, walks);
criterion_main!(benches);
