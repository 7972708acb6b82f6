//! The packet filter core (`dataplane::packet::filter`) against a real runtime: the
//! gateway's conntrack, compiled policy, control plane and file flow log (tests/support's
//! L4 world: `t/client-ok` 127.0.0.10 may reach `t/web` 127.0.0.20, `t/client-bad`
//! 127.0.0.11 nothing), fed packets built with pnet_packet. No device and no root: the
//! front ends' end-to-end tests live with them.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flowgate::config::Config;
use flowgate::conntrack::{FlowState, TcpState};
use flowgate::control::Trigger;
use flowgate::dataplane::ListenerTag;
use flowgate::dataplane::packet::classify::{self, DropReason};
use flowgate::dataplane::packet::filter::{
    DropCause, Filter, FilterConfig, OnDeny, PacketCounters, Verdict,
};
use pnet_packet::Packet;
use pnet_packet::ip::IpNextHeaderProtocol;
use pnet_packet::ipv4::{Ipv4Packet, MutableIpv4Packet};
use pnet_packet::ipv6::MutableIpv6Packet;
use pnet_packet::tcp::{MutableTcpPacket, TcpPacket};
use support::gateway::Standalone;
use support::l4::World;

const OK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const BAD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
const WEB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 20);

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;
const PSH_ACK: u8 = 0x18;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

// ---- packets ----------------------------------------------------------------------------

/// An IPv4 packet; `frag` is (identification, offset in bytes, more fragments).
fn ip4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8], frag: (u16, u16, bool)) -> Vec<u8> {
    let mut buf = vec![0u8; 20 + payload.len()];
    let mut p = MutableIpv4Packet::new(&mut buf).unwrap();
    p.set_version(4);
    p.set_header_length(5);
    p.set_total_length((20 + payload.len()) as u16);
    p.set_ttl(64);
    p.set_next_level_protocol(IpNextHeaderProtocol(proto));
    p.set_source(src);
    p.set_destination(dst);
    p.set_identification(frag.0);
    p.set_fragment_offset(frag.1 / 8);
    p.set_flags(if frag.2 { 1 } else { 0 });
    p.set_payload(payload);
    buf
}

struct Seg {
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    window: u16,
    data: usize,
}

fn tcp_bytes(s: &Seg) -> Vec<u8> {
    let mut buf = vec![0u8; 20 + s.data];
    let mut t = MutableTcpPacket::new(&mut buf).unwrap();
    t.set_source(s.sport);
    t.set_destination(s.dport);
    t.set_sequence(s.seq);
    t.set_acknowledgement(s.ack);
    t.set_data_offset(5);
    t.set_flags(s.flags);
    t.set_window(s.window);
    buf
}

fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, s: Seg) -> Vec<u8> {
    ip4(src, dst, 6, &tcp_bytes(&s), (0, 0, false))
}

fn udp_bytes(sport: u16, dport: u16, data: usize) -> Vec<u8> {
    let mut b = vec![0u8; 8 + data];
    b[0..2].copy_from_slice(&sport.to_be_bytes());
    b[2..4].copy_from_slice(&dport.to_be_bytes());
    b[4..6].copy_from_slice(&((8 + data) as u16).to_be_bytes());
    b
}

fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ip4(src, dst, 17, &udp_bytes(sport, dport, 32), (0, 0, false))
}

fn echo4(src: Ipv4Addr, dst: Ipv4Addr, reply: bool, id: u16) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[0] = if reply { 0 } else { 8 };
    b[4..6].copy_from_slice(&id.to_be_bytes());
    ip4(src, dst, 1, &b, (0, 0, false))
}

/// An ICMPv4 destination unreachable (port unreachable) from `from` to `to`, quoting
/// `quoted` (an IPv4 packet `to` sent).
fn unreachable4(from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut b = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&quoted[..quoted.len().min(28)]);
    ip4(from, to, 1, &b, (0, 0, false))
}

fn ip6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 40 + payload.len()];
    let mut p = MutableIpv6Packet::new(&mut buf).unwrap();
    p.set_version(6);
    p.set_payload_length(payload.len() as u16);
    p.set_next_header(IpNextHeaderProtocol(next));
    p.set_hop_limit(64);
    p.set_source(src);
    p.set_destination(dst);
    p.set_payload(payload);
    buf
}

// ---- the world --------------------------------------------------------------------------

struct Bench {
    world: World,
    gw: Standalone,
}

impl Bench {
    fn new() -> Bench {
        let world = World::new();
        let cfg = Config::load(&world.write_config("")).unwrap();
        let gw = support::gateway::runtime(&cfg);
        Bench { world, gw }
    }

    fn filter(&self, cfg: FilterConfig) -> Filter {
        let rt = self.gw.gateway.rt.clone();
        // The tag's index is its place in the registry: how `log_revoked` names it.
        let index = rt.registry.listeners().len() as u16;
        let tag = ListenerTag {
            index,
            name: Arc::from("packet"),
            counters: rt.registry.listener("packet", "packet"),
        };
        Filter::new(rt, tag, cfg, Arc::new(PacketCounters::default()))
    }

    /// The flow-log lines with `event` about a flow from `src`, once `want` of them are
    /// there (polled: the writer flushes on its own thread), or whatever is there after 5 s.
    fn events(&self, event: &str, src: &str, want: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<_> = self
                .world
                .log_lines()
                .into_iter()
                .filter(|l| l["event"] == event && l["src"].as_str().unwrap_or("").contains(src))
                .collect();
            if lines.len() >= want || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One packet through the filter.
fn one(f: &mut Filter, p: &[u8]) -> Verdict {
    let mut v = [Verdict::Pass];
    f.run(&[p], &mut v, Instant::now());
    v[0]
}

fn dropped(f: &Filter, cause: DropCause) -> u64 {
    f.counters().dropped[cause.index()].load(Ordering::Relaxed)
}

fn malformed(f: &Filter, reason: DropReason) -> u64 {
    let i = DropReason::ALL.iter().position(|r| *r == reason).unwrap();
    f.counters().malformed[i].load(Ordering::Relaxed)
}

fn seg(sport: u16, dport: u16, flags: u8, seq: u32, ack: u32, data: usize) -> Seg {
    Seg { sport, dport, flags, seq, ack, window: 65_000, data }
}

/// The handshake of an allowed connection `OK:sport → WEB:80` (client ISN 1000, server
/// ISN 5000), all passed.
fn handshake(f: &mut Filter, sport: u16) {
    assert_eq!(one(f, &tcp4(OK, WEB, seg(sport, 80, SYN, 1000, 0, 0))), Verdict::Pass);
    assert_eq!(one(f, &tcp4(WEB, OK, seg(80, sport, SYN_ACK, 5000, 1001, 0))), Verdict::Pass);
    assert_eq!(one(f, &tcp4(OK, WEB, seg(sport, 80, ACK, 1001, 5001, 0))), Verdict::Pass);
}

fn tcp_state(b: &Bench, sport: u16) -> Option<TcpState> {
    let key = classify::classify(&tcp4(OK, WEB, seg(sport, 80, ACK, 0, 0, 0))).unwrap().key;
    b.gw.gateway.rt.conntrack.lookup(&key).and_then(|e| e.tcp_state())
}

// ---- tests --------------------------------------------------------------------------------

#[test]
fn an_allowed_connection_passes_from_syn_to_rst_and_nothing_after() {
    let b = Bench::new();
    let mut f = b.filter(FilterConfig::default());
    handshake(&mut f, 40_000);
    assert_eq!(tcp_state(&b, 40_000), Some(TcpState::Established));
    // Data both ways, in one burst.
    let burst = [
        tcp4(OK, WEB, seg(40_000, 80, PSH_ACK, 1001, 5001, 100)),
        tcp4(WEB, OK, seg(80, 40_000, PSH_ACK, 5001, 1101, 1000)),
        tcp4(OK, WEB, seg(40_000, 80, ACK, 1101, 6001, 0)),
    ];
    let refs: Vec<&[u8]> = burst.iter().map(|p| p.as_slice()).collect();
    let mut v = [Verdict::Drop(DropCause::Untracked); 3];
    f.run(&refs, &mut v, Instant::now());
    assert_eq!(v, [Verdict::Pass; 3]);
    // Orderly close by the client, then a reset.
    assert_eq!(one(&mut f, &tcp4(OK, WEB, seg(40_000, 80, FIN_ACK, 1101, 6001, 0))), Verdict::Pass);
    assert_eq!(tcp_state(&b, 40_000), Some(TcpState::FinWait));
    assert_eq!(one(&mut f, &tcp4(WEB, OK, seg(80, 40_000, ACK, 6001, 1102, 0))), Verdict::Pass);
    assert_eq!(one(&mut f, &tcp4(WEB, OK, seg(80, 40_000, RST, 6001, 0, 0))), Verdict::Pass);
    assert_eq!(tcp_state(&b, 40_000), Some(TcpState::Close));
    // Nothing of the flow passes after the reset.
    let late = tcp4(OK, WEB, seg(40_000, 80, PSH_ACK, 1102, 6001, 10));
    assert_eq!(one(&mut f, &late), Verdict::Drop(DropCause::Invalid));
    let c = f.counters();
    assert_eq!(c.passed_packets.load(Ordering::Relaxed), 9);
    assert_eq!(dropped(&f, DropCause::Invalid), 1);
    // The entry counted both directions.
    let key = classify::classify(&late).unwrap().key;
    let e = b.gw.gateway.rt.conntrack.lookup(&key).unwrap();
    assert_eq!(e.packets_orig().load(Ordering::Relaxed), 5);
    assert_eq!(e.packets_reply().load(Ordering::Relaxed), 4);
}

#[test]
fn a_segment_without_a_flow_is_untracked_and_a_syn_ack_cannot_open_one() {
    let b = Bench::new();
    let mut f = b.filter(FilterConfig::default());
    assert_eq!(
        one(&mut f, &tcp4(OK, WEB, seg(40_001, 80, PSH_ACK, 1, 1, 10))),
        Verdict::Drop(DropCause::Untracked)
    );
    assert_eq!(
        one(&mut f, &tcp4(WEB, OK, seg(80, 40_001, SYN_ACK, 1, 1, 0))),
        Verdict::Drop(DropCause::Untracked)
    );
    assert_eq!(dropped(&f, DropCause::Untracked), 2);
    assert!(b.gw.gateway.rt.conntrack.is_empty(), "nothing tracked");
}

#[test]
fn a_denied_syn_is_dropped_and_logged_once_however_often_it_is_retried() {
    let b = Bench::new();
    let mut f = b.filter(FilterConfig::default());
    let syn = tcp4(BAD, WEB, seg(40_002, 80, SYN, 77, 0, 0));
    for _ in 0..20 {
        assert_eq!(one(&mut f, &syn), Verdict::Drop(DropCause::Policy));
    }
    assert_eq!(dropped(&f, DropCause::Policy), 20);
    let denies = b.events("deny", "127.0.0.11", 1);
    assert_eq!(denies.len(), 1, "retries fold into one line: {denies:?}");
    assert_eq!(denies[0]["count"], 20, "{denies:?}");
    // The gate counted every refusal on the packet listener.
    let counters = b.gw.gateway.rt.registry.listeners();
    let packet = counters.iter().find(|c| c.name == "packet").unwrap();
    assert_eq!(packet.denied.load(Ordering::Relaxed), 20);
}

#[test]
fn a_segment_far_outside_the_window_is_invalid_unless_liberal() {
    for liberal in [false, true] {
        let b = Bench::new();
        let mut f = b.filter(FilterConfig { tcp_liberal: liberal, ..FilterConfig::default() });
        handshake(&mut f, 40_003);
        let far = tcp4(OK, WEB, seg(40_003, 80, PSH_ACK, 1001 + (1 << 30), 5001, 100));
        let want = if liberal { Verdict::Pass } else { Verdict::Drop(DropCause::Invalid) };
        assert_eq!(one(&mut f, &far), want, "liberal {liberal}");
        let old_ack = tcp4(OK, WEB, seg(40_003, 80, ACK, 1001, 5001u32.wrapping_sub(1 << 24), 0));
        assert_eq!(one(&mut f, &old_ack), want, "liberal {liberal}");
        // The flow itself carries on.
        let next = tcp4(OK, WEB, seg(40_003, 80, PSH_ACK, 1001, 5001, 100));
        assert_eq!(one(&mut f, &next), Verdict::Pass);
        assert_eq!(dropped(&f, DropCause::Invalid), if liberal { 0 } else { 2 });
    }
}

#[test]
fn a_udp_reply_assures_its_flow_and_echo_is_a_flow() {
    let b = Bench::new();
    let ct = b.gw.gateway.rt.conntrack.clone();
    let mut f = b.filter(FilterConfig::default());
    let req = udp4(OK, WEB, 5353, 53);
    assert_eq!(one(&mut f, &req), Verdict::Pass);
    let key = classify::classify(&req).unwrap().key;
    assert_eq!(ct.lookup(&key).unwrap().state(), FlowState::Unreplied);
    assert_eq!(one(&mut f, &udp4(WEB, OK, 53, 5353)), Verdict::Pass);
    assert_eq!(ct.lookup(&key).unwrap().state(), FlowState::Assured);

    // An echo reply without a request belongs to nothing; with one, it passes.
    assert_eq!(one(&mut f, &echo4(WEB, OK, true, 9)), Verdict::Drop(DropCause::Untracked));
    assert_eq!(one(&mut f, &echo4(OK, WEB, false, 9)), Verdict::Pass);
    assert_eq!(one(&mut f, &echo4(WEB, OK, true, 9)), Verdict::Pass);
    let ekey = classify::classify(&echo4(OK, WEB, false, 9)).unwrap().key;
    assert_eq!(ct.lookup(&ekey).unwrap().state(), FlowState::Assured);
    // A denied client's echo request is refused by policy.
    assert_eq!(one(&mut f, &echo4(BAD, WEB, false, 9)), Verdict::Drop(DropCause::Policy));
}

#[test]
fn an_icmp_error_passes_only_for_a_tracked_flow() {
    let b = Bench::new();
    let mut f = b.filter(FilterConfig::default());
    let req = udp4(OK, WEB, 5354, 53);
    assert_eq!(one(&mut f, &req), Verdict::Pass);
    // The server's port is closed: its error quotes the request.
    assert_eq!(one(&mut f, &unreachable4(WEB, OK, &req)), Verdict::Pass);
    // An error about a flow nobody opened.
    let other = udp4(OK, WEB, 5355, 53);
    assert_eq!(one(&mut f, &unreachable4(WEB, OK, &other)), Verdict::Drop(DropCause::Untracked));
    // An error that opens nothing: the flow table holds only the one flow.
    assert_eq!(b.gw.gateway.rt.conntrack.len(), 1);
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    let b = Bench::new();
    let mut f = b.filter(FilterConfig::default());
    // A UDP datagram in two fragments: 8 + 24 bytes, then the rest at offset 32.
    let udp = udp_bytes(6000, 53, 100);
    let first = ip4(OK, WEB, 17, &udp[..32], (7, 0, true));
    let later = ip4(OK, WEB, 17, &udp[32..], (7, 32, false));
    assert_eq!(one(&mut f, &first), Verdict::Pass);
    assert_eq!(one(&mut f, &later), Verdict::Pass);
    // Overlapping the first fragment's bytes (rewrites the header it was judged by).
    let overlap = ip4(OK, WEB, 17, &udp[16..], (7, 16, false));
    assert_eq!(one(&mut f, &overlap), Verdict::Drop(DropCause::Fragment));
    assert_eq!(f.counters().fragments_overlapping.load(Ordering::Relaxed), 1);
    // A fragment of a datagram whose first fragment was never seen.
    let unknown = ip4(OK, WEB, 17, &udp[32..], (8, 32, false));
    assert_eq!(one(&mut f, &unknown), Verdict::Drop(DropCause::Fragment));
    // A denied first fragment: its later fragments are dropped too.
    let bad_first = ip4(BAD, WEB, 17, &udp[..32], (9, 0, true));
    let bad_later = ip4(BAD, WEB, 17, &udp[32..], (9, 32, false));
    assert_eq!(one(&mut f, &bad_first), Verdict::Drop(DropCause::Policy));
    assert_eq!(one(&mut f, &bad_later), Verdict::Drop(DropCause::Fragment));
    assert_eq!(dropped(&f, DropCause::Fragment), 3);
}

#[test]
fn later_fragments_in_the_same_burst_as_their_first_follow_it() {
    let b = Bench::new();
    let mut f = b.filter(FilterConfig::default());
    // As the kernel writes a fragmented datagram: its fragments back to back, in one read.
    let udp = udp_bytes(6001, 53, 100);
    let first = ip4(OK, WEB, 17, &udp[..32], (11, 0, true));
    let middle = ip4(OK, WEB, 17, &udp[32..64], (11, 32, true));
    let last = ip4(OK, WEB, 17, &udp[64..], (11, 64, false));
    let overlap = ip4(OK, WEB, 17, &udp[8..], (11, 8, false));
    let bad_first = ip4(BAD, WEB, 17, &udp[..32], (12, 0, true));
    let bad_later = ip4(BAD, WEB, 17, &udp[32..], (12, 32, false));
    let burst: Vec<&[u8]> = vec![&first, &middle, &last, &overlap, &bad_first, &bad_later];
    let mut v = [Verdict::Pass; 6];
    f.run(&burst, &mut v, Instant::now());
    assert_eq!(
        v,
        [
            Verdict::Pass,
            Verdict::Pass,
            Verdict::Pass,
            Verdict::Drop(DropCause::Fragment),
            Verdict::Drop(DropCause::Policy),
            Verdict::Drop(DropCause::Fragment),
        ]
    );
    assert_eq!(f.counters().fragments_overlapping.load(Ordering::Relaxed), 1);
    assert_eq!(dropped(&f, DropCause::Fragment), 2);
    // A later fragment ahead of its first fragment in the burst is still dropped.
    let first = ip4(OK, WEB, 17, &udp[..32], (13, 0, true));
    let early = ip4(OK, WEB, 17, &udp[32..], (13, 32, false));
    let mut v = [Verdict::Pass; 2];
    f.run(&[&early, &first], &mut v, Instant::now());
    assert_eq!(v, [Verdict::Drop(DropCause::Fragment), Verdict::Pass]);
}

#[test]
fn a_reload_that_denies_an_established_flow_revokes_it_once() {
    let b = Bench::new();
    let mut f = b.filter(FilterConfig::default());
    handshake(&mut f, 40_004);
    let udp = udp4(OK, WEB, 5400, 53);
    assert_eq!(one(&mut f, &udp), Verdict::Pass);
    // A policy that lets client-ok reach nothing.
    let policies = b.world.dir.path().join("policies/t.yaml");
    std::fs::write(&policies, "").unwrap();
    let report = b.gw.gateway.control.reload_blocking(Trigger::Api);
    assert_eq!(report.revoked, 2, "{report:?}");
    let data = tcp4(OK, WEB, seg(40_004, 80, PSH_ACK, 1001, 5001, 100));
    let reply = tcp4(WEB, OK, seg(80, 40_004, ACK, 5001, 1101, 0));
    assert_eq!(one(&mut f, &data), Verdict::Drop(DropCause::Revoked));
    assert_eq!(one(&mut f, &reply), Verdict::Drop(DropCause::Revoked));
    assert_eq!(one(&mut f, &udp), Verdict::Drop(DropCause::Revoked));
    // A new connection on the same ports is decided afresh: denied now.
    let syn = tcp4(OK, WEB, seg(40_004, 80, SYN, 9000, 0, 0));
    assert_eq!(one(&mut f, &syn), Verdict::Drop(DropCause::Policy));
    // Another reload (the policy allows again) neither logs the flows again nor revives
    // the revoked UDP flow.
    std::fs::write(&policies, support::l4::POLICY).unwrap();
    let again = b.gw.gateway.control.reload_blocking(Trigger::Api);
    assert_eq!(again.revoked, 0, "{again:?}");
    assert_eq!(one(&mut f, &udp), Verdict::Drop(DropCause::Revoked));
    let revoked = b.events("revoked", "127.0.0.10", 2);
    std::thread::sleep(Duration::from_millis(300));
    let revoked_later = b.events("revoked", "127.0.0.10", 3);
    assert_eq!(revoked.len(), 2, "one event per flow: {revoked:?}");
    assert_eq!(revoked_later.len(), 2, "{revoked_later:?}");
    assert!(revoked.iter().all(|l| l["listener"] == "packet"), "{revoked:?}");
    assert_eq!(dropped(&f, DropCause::Revoked), 4);
}

#[test]
fn malformed_packets_are_dropped_and_counted_by_reason() {
    let b = Bench::new();
    let mut f = b.filter(FilterConfig::default());
    let good = tcp4(OK, WEB, seg(40_005, 80, SYN, 1, 0, 0));
    let mut ihl = good.clone();
    ihl[0] = 0x44;
    let mut too_long = good.clone();
    too_long[2..4].copy_from_slice(&200u16.to_be_bytes());
    let mut tcp_short = good[..20 + 12].to_vec();
    tcp_short[2..4].copy_from_slice(&32u16.to_be_bytes());
    let v6 = |n| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n);
    // Twenty destination-options headers, each naming the next.
    let mut chain = Vec::new();
    for _ in 0..20 {
        chain.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    chain.extend_from_slice(&udp_bytes(1, 2, 0));
    let endless = ip6(v6(1), v6(2), 60, &chain);
    // A TCP fragment at offset 8 (would rewrite the first fragment's flags).
    let tiny = ip4(OK, WEB, 6, &[0u8; 16], (3, 8, false));
    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        ("zero length", vec![], DropReason::Truncated),
        ("truncated IPv4", good[..12].to_vec(), DropReason::Truncated),
        ("truncated IPv6", ip6(v6(1), v6(2), 17, &[])[..30].to_vec(), DropReason::Truncated),
        ("truncated TCP", tcp_short, DropReason::Truncated),
        ("IHL below 5", ihl, DropReason::BadIhl),
        ("total length beyond the buffer", too_long, DropReason::BadLength),
        ("endless IPv6 extension chain", endless, DropReason::ExtChainTooLong),
        ("overlapping TCP fragment", tiny, DropReason::TinyFragment),
    ];
    for (what, p, reason) in &cases {
        let v = one(&mut f, p);
        assert_eq!(v, Verdict::Drop(DropCause::Malformed(*reason)), "{what}");
    }
    assert_eq!(malformed(&f, DropReason::Truncated), 4);
    assert_eq!(malformed(&f, DropReason::BadIhl), 1);
    assert_eq!(malformed(&f, DropReason::BadLength), 1);
    assert_eq!(malformed(&f, DropReason::ExtChainTooLong), 1);
    assert_eq!(malformed(&f, DropReason::TinyFragment), 1);
    assert_eq!(dropped(&f, DropCause::Malformed(DropReason::Truncated)), cases.len() as u64);
    // A whole burst of them next to a good packet: the good one still passes.
    let mut burst: Vec<&[u8]> = cases.iter().map(|(_, p, _)| p.as_slice()).collect();
    burst.push(&good);
    let mut v = vec![Verdict::Pass; burst.len()];
    f.run(&burst, &mut v, Instant::now());
    assert_eq!(v.last(), Some(&Verdict::Pass));
    assert!(v[..cases.len()].iter().all(|v| matches!(v, Verdict::Drop(DropCause::Malformed(_)))));
}

#[test]
fn reject_answers_a_denied_syn_with_a_rst_and_udp_with_icmp_within_the_rate() {
    let b = Bench::new();
    let cfg =
        FilterConfig { on_deny: OnDeny::Reject, reject_per_second: 2, ..FilterConfig::default() };
    let mut f = b.filter(cfg);
    let now = Instant::now();
    let syn = tcp4(BAD, WEB, seg(40_006, 80, SYN, 1000, 0, 0));
    assert_eq!(one(&mut f, &syn), Verdict::Reject(DropCause::Policy));
    let mut out = [0u8; 1500];
    let n = f.reject_reply(&syn, &mut out, now).expect("a RST");
    let ip = Ipv4Packet::new(&out[..n]).unwrap();
    assert_eq!((ip.get_source(), ip.get_destination()), (WEB, BAD));
    assert_eq!(pnet_packet::ipv4::checksum(&ip), ip.get_checksum());
    let t = TcpPacket::new(ip.payload()).unwrap();
    assert_eq!((t.get_source(), t.get_destination()), (80, 40_006));
    assert_eq!(t.get_flags(), RST | ACK);
    assert_eq!((t.get_sequence(), t.get_acknowledgement()), (0, 1001));
    assert_eq!(pnet_packet::tcp::ipv4_checksum(&t, &WEB, &BAD), t.get_checksum());

    // A denied datagram: ICMP administratively prohibited, quoting it.
    let udp = udp4(BAD, WEB, 5000, 53);
    assert_eq!(one(&mut f, &udp), Verdict::Reject(DropCause::Policy));
    let n = f.reject_reply(&udp, &mut out, now).expect("an ICMP error");
    let ip = Ipv4Packet::new(&out[..n]).unwrap();
    assert_eq!(ip.get_next_level_protocol().0, 1);
    let icmp = ip.payload();
    assert_eq!((icmp[0], icmp[1]), (3, 13));
    assert_eq!(&icmp[8..], &udp[..]);
    let sum = pnet_packet::util::checksum(icmp, 1);
    assert_eq!(sum, u16::from_be_bytes([icmp[2], icmp[3]]));
    // The filter's own classifier takes the reply for an error about that datagram.
    let c = classify::classify(&out[..n]).unwrap();
    assert!(matches!(c.kind, classify::Kind::Related { .. }));

    // Two a second: the third is not sent, and counted.
    assert_eq!(f.reject_reply(&syn, &mut out, now), None);
    let c = f.counters();
    assert_eq!(c.rejects_sent.load(Ordering::Relaxed), 2);
    assert_eq!(c.rejects_limited.load(Ordering::Relaxed), 1);
    // A RST is never answered.
    let rst = tcp4(BAD, WEB, seg(40_006, 80, RST, 1, 0, 0));
    let later = now + Duration::from_secs(5);
    assert_eq!(f.reject_reply(&rst, &mut out, later), None);

    // IPv6 (no policy knows it: denied): ICMPv6 type 1 code 1 within 1280 bytes.
    let (a, z) = (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
    );
    let big = ip6(a, z, 17, &udp_bytes(5000, 53, 1400));
    assert_eq!(one(&mut f, &big), Verdict::Reject(DropCause::Policy));
    let n = f.reject_reply(&big, &mut out, later).expect("an ICMPv6 error");
    assert_eq!(n, 1280);
    assert_eq!(out[6], 58);
    assert_eq!(&out[8..24], &z.octets());
    assert_eq!((out[40], out[41]), (1, 1));
    let icmp = pnet_packet::icmpv6::Icmpv6Packet::new(&out[40..n]).unwrap();
    assert_eq!(pnet_packet::icmpv6::checksum(&icmp, &z, &a), icmp.get_checksum());
    let _ = IpAddr::V6(a);
}
