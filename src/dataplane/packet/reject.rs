//! Reject replies: what a packet denied with `on_deny = "reject"` is answered with, written
//! into the caller's buffer (an IP packet for the front end to send back towards the
//! packet's source), and the per-worker rate limit on them.
//!
//! - A TCP segment gets a RST (RFC 9293 §3.10.7.1, reset generation for a segment to a
//!   port with no connection: with ACK, `<SEQ=SEG.ACK><CTL=RST>`; without,
//!   `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`), from the address it was sent to. A RST
//!   is never answered.
//! - Anything else gets ICMP "administratively prohibited": ICMPv4 type 3 code 13
//!   (RFC 1812 §5.2.7.1) quoting as much of the packet as keeps the reply within 576
//!   bytes, or ICMPv6 type 1 code 1 (RFC 4443 §3.1) within 1280 bytes. It comes from the
//!   packet's destination address (flowgate has no address of its own on the path). No
//!   reply answers an ICMP error, a later fragment, or a packet from or to an address that
//!   is not one host's (unspecified, multicast, IPv4 broadcast) (RFC 1122 §3.2.2, RFC 4443
//!   §2.4 (e)).
//!
//! Checksums are computed in full. Pure: the rate limit ([`RateLimit`]) is given `now`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::classify::{Classified, Kind, L4};
use crate::conntrack::TcpFlags;

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_HEADER: usize = 20;
const ICMP_HEADER: usize = 8;
/// RFC 1812 §4.3.2.3: an ICMPv4 error is at most 576 bytes.
const ICMPV4_MAX: usize = 576;
/// RFC 4443 §2.4 (c): an ICMPv6 error is at most the minimum MTU.
const ICMPV6_MAX: usize = 1280;
const TTL: u8 = 64;

/// Writes the reject reply to `packet` (classified as `c`) into `out`; its length, or
/// `None` when the packet gets no reply or `out` cannot hold the reply's headers.
pub fn write(packet: &[u8], c: &Classified, out: &mut [u8]) -> Option<usize> {
    let (src, dst) = (c.key.src.ip(), c.key.dst.ip());
    // The reply goes to the sender and comes from the address the packet was sent to:
    // both must name one host. A packet to a multicast or broadcast address gets no error
    // (RFC 1122 §3.2.2, RFC 4443 §2.4 (e)) and no RST, which would come from a group.
    if !is_host(src) || !is_host(dst) {
        return None;
    }
    match c.kind {
        Kind::Flow { l4: L4::Tcp(seg), .. } => {
            if seg.flags.contains(TcpFlags::RST) {
                return None;
            }
            let (seq, ack, flags) = if seg.flags.contains(TcpFlags::ACK) {
                (seg.ack, 0, TcpFlags::RST)
            } else {
                let mut len = seg.payload_len;
                if seg.flags.contains(TcpFlags::SYN) {
                    len = len.wrapping_add(1);
                }
                if seg.flags.contains(TcpFlags::FIN) {
                    len = len.wrapping_add(1);
                }
                (0, seg.seq.wrapping_add(len), TcpFlags(TcpFlags::RST.0 | TcpFlags::ACK.0))
            };
            let ip = ip_header(out, dst, src, 6, TCP_HEADER)?;
            let t = &mut out[ip..ip + TCP_HEADER];
            t[0..2].copy_from_slice(&c.key.dst.port().to_be_bytes());
            t[2..4].copy_from_slice(&c.key.src.port().to_be_bytes());
            t[4..8].copy_from_slice(&seq.to_be_bytes());
            t[8..12].copy_from_slice(&ack.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = flags.0;
            t[14..20].fill(0);
            let sum = finish(pseudo(dst, src, 6, TCP_HEADER) + sum16(t));
            t[16..18].copy_from_slice(&sum.to_be_bytes());
            Some(ip + TCP_HEADER)
        }
        Kind::Related { .. } | Kind::Fragment { .. } => None,
        Kind::Flow { .. } => {
            let v4 = src.is_ipv4();
            let (header, max, proto) =
                if v4 { (IPV4_HEADER, ICMPV4_MAX, 1) } else { (IPV6_HEADER, ICMPV6_MAX, 58) };
            let room = max.min(out.len()).checked_sub(header + ICMP_HEADER)?;
            let quote = &packet[..c.ip_len.min(packet.len())];
            let quote = &quote[..quote.len().min(room)];
            let len = ICMP_HEADER + quote.len();
            let ip = ip_header(out, dst, src, proto, len)?;
            let m = &mut out[ip..ip + len];
            // Type, code: v4 destination unreachable / administratively prohibited; v6
            // destination unreachable / communication administratively prohibited.
            (m[0], m[1]) = if v4 { (3, 13) } else { (1, 1) };
            m[2..8].fill(0);
            m[ICMP_HEADER..].copy_from_slice(quote);
            let body = sum16(m);
            let sum = if v4 { finish(body) } else { finish(pseudo(dst, src, 58, len) + body) };
            m[2..4].copy_from_slice(&sum.to_be_bytes());
            Some(ip + len)
        }
    }
}

/// Whether `ip` names one host (a reply to it reaches one sender).
fn is_host(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    }
}

/// Writes an IP header from `src` to `dst` for `payload` bytes of protocol `proto` at the
/// start of `out`; its length, or `None` if `out` cannot hold header and payload.
fn ip_header(out: &mut [u8], src: IpAddr, dst: IpAddr, proto: u8, payload: usize) -> Option<usize> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let h = out.get_mut(..IPV4_HEADER + payload)?;
            let total = u16::try_from(IPV4_HEADER + payload).ok()?;
            h[0] = 0x45;
            h[1] = 0;
            h[2..4].copy_from_slice(&total.to_be_bytes());
            // Identification 0 and don't fragment (RFC 6864: an atomic datagram).
            h[4..6].fill(0);
            h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
            h[8] = TTL;
            h[9] = proto;
            h[10..12].fill(0);
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let sum = finish(sum16(&h[..IPV4_HEADER]));
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            Some(IPV4_HEADER)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = out.get_mut(..IPV6_HEADER + payload)?;
            h[0..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
            h[4..6].copy_from_slice(&u16::try_from(payload).ok()?.to_be_bytes());
            h[6] = proto;
            h[7] = TTL;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            Some(IPV6_HEADER)
        }
        _ => None,
    }
}

/// The one's-complement sum of `data` as big-endian 16-bit words (odd length: a zero pad),
/// not yet folded.
fn sum16(data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    let mut sum: u32 = 0;
    for w in &mut chunks {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

/// The pseudo-header's sum (RFC 9293 §3.1, RFC 8200 §8.1).
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let addr = |ip: IpAddr| match ip {
        IpAddr::V4(a) => sum16(&a.octets()),
        IpAddr::V6(a) => sum16(&a.octets()),
    };
    // `len` is below 64 KiB here: the reply fits a 16-bit IP length.
    addr(src) + addr(dst) + u32::from(proto) + (len as u32 & 0xffff) + (len as u32 >> 16)
}

/// Folds a sum and complements it.
fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A per-worker limit of `per_second` replies a second, in bursts of up to one second's
/// worth (GCRA: one timestamp, no refill loop).
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    burst: Duration,
    /// When the bucket is next empty (theoretical arrival time).
    tat: Option<Instant>,
}

impl RateLimit {
    /// `per_second` 0 allows nothing.
    pub fn new(per_second: u32) -> RateLimit {
        let interval =
            if per_second == 0 { Duration::MAX } else { Duration::from_secs(1) / per_second };
        RateLimit { interval, burst: Duration::from_secs(1), tat: None }
    }

    /// Whether one more reply may go at `now`.
    pub fn allow(&mut self, now: Instant) -> bool {
        if self.interval == Duration::MAX {
            return false;
        }
        let tat = self.tat.map_or(now, |t| t.max(now));
        if tat.saturating_duration_since(now) + self.interval > self.burst {
            return false;
        }
        self.tat = Some(tat + self.interval);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let data = [0x45u8, 0, 0, 0x1c, 0, 0, 0x40, 0, 64, 1, 0, 0, 198, 18, 0, 1, 198, 18, 1, 1];
        let mut h = data;
        let s = finish(sum16(&h));
        h[10..12].copy_from_slice(&s.to_be_bytes());
        assert_eq!(finish(sum16(&h)), 0);
    }

    const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
    const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn v6(next: u8, src: [u8; 16], dst: [u8; 16], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    /// The reply to `packet` as an IPv6 packet: (its next header, its payload) after
    /// checking the header says what was written, and the L4 checksum with the IPv6
    /// pseudo-header verifies.
    fn reply6(packet: &[u8]) -> (u8, Vec<u8>) {
        let c = super::super::classify::classify(packet).unwrap();
        let mut out = [0u8; 1500];
        let n = write(packet, &c, &mut out).expect("a reply");
        let r = &out[..n];
        assert_eq!(r[0] >> 4, 6);
        assert_eq!(usize::from(u16::from_be_bytes([r[4], r[5]])), n - IPV6_HEADER);
        assert_eq!((&r[8..24], &r[24..40]), (&SERVER6[..], &CLIENT6[..]), "from the server");
        let (src, dst) = (IpAddr::from(SERVER6), IpAddr::from(CLIENT6));
        let payload = &r[IPV6_HEADER..];
        assert_eq!(finish(pseudo(src, dst, r[6], payload.len()) + sum16(payload)), 0);
        (r[6], payload.to_vec())
    }

    #[test]
    fn ipv6_udp_gets_administratively_prohibited_quoting_within_1280_bytes() {
        for data in [8usize, 1400] {
            let mut udp = vec![0u8; 8 + data];
            udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
            udp[2..4].copy_from_slice(&5353u16.to_be_bytes());
            udp[4..6].copy_from_slice(&u16::try_from(8 + data).unwrap().to_be_bytes());
            let packet = v6(17, CLIENT6, SERVER6, &udp);
            let (next, icmp) = reply6(&packet);
            assert_eq!((next, icmp[0], icmp[1]), (58, 1, 1), "ICMPv6 type 1 code 1");
            assert!(IPV6_HEADER + icmp.len() <= ICMPV6_MAX, "{} bytes", icmp.len());
            let quote = &icmp[ICMP_HEADER..];
            assert_eq!(quote, &packet[..quote.len()], "quotes the packet from its start");
            if packet.len() + IPV6_HEADER + ICMP_HEADER <= ICMPV6_MAX {
                assert_eq!(quote.len(), packet.len(), "a small packet is quoted whole");
            } else {
                assert_eq!(IPV6_HEADER + icmp.len(), ICMPV6_MAX, "cut at the minimum MTU");
            }
        }
    }

    #[test]
    fn ipv6_syn_gets_rst_ack_with_the_pseudo_header_checksum() {
        let mut syn = vec![0u8; 20];
        syn[0..2].copy_from_slice(&40000u16.to_be_bytes());
        syn[2..4].copy_from_slice(&8000u16.to_be_bytes());
        syn[4..8].copy_from_slice(&77u32.to_be_bytes());
        (syn[12], syn[13]) = (5 << 4, TcpFlags::SYN.0);
        let (next, rst) = reply6(&v6(6, CLIENT6, SERVER6, &syn));
        assert_eq!(next, 6);
        assert_eq!(u16::from_be_bytes([rst[0], rst[1]]), 8000);
        assert_eq!(u16::from_be_bytes([rst[2], rst[3]]), 40000);
        assert_eq!(u32::from_be_bytes([rst[8], rst[9], rst[10], rst[11]]), 78, "ACK = SEQ + 1");
        assert_eq!(rst[13], TcpFlags::RST.0 | TcpFlags::ACK.0);
    }

    #[test]
    fn nothing_answers_a_packet_to_or_from_a_group() {
        let all_nodes = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let udp = [0x9c, 0x40, 0x14, 0xe9, 0, 8, 0, 0];
        let mut out = [0u8; 1500];
        for p in [v6(17, CLIENT6, all_nodes, &udp), v6(17, [0; 16], SERVER6, &udp)] {
            let c = super::super::classify::classify(&p).unwrap();
            assert_eq!(write(&p, &c, &mut out), None, "{:?}", c.key);
        }
        let mut syn = [0u8; 20];
        (syn[12], syn[13]) = (5 << 4, TcpFlags::SYN.0);
        let p = v6(6, CLIENT6, all_nodes, &syn);
        let c = super::super::classify::classify(&p).unwrap();
        assert_eq!(write(&p, &c, &mut out), None, "no RST from a group");
    }

    #[test]
    fn rate_limit_allows_a_seconds_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10);
        assert_eq!((0..20).filter(|_| r.allow(t0)).count(), 10);
        assert!(!r.allow(t0 + Duration::from_millis(50)));
        assert!(r.allow(t0 + Duration::from_millis(150)));
        assert!(!RateLimit::new(0).allow(t0));
    }
}
