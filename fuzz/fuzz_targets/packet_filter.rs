#![no_main]
//! Sequences of packets through the real packet filter (`Filter::run`): the classifier,
//! the fragment table, one conntrack batch lookup per burst, TCP window tracking and the
//! state machine, and the one gate (`admit_packet`) deciding new flows with a small
//! compiled policy, over a conntrack table of 16 entries (so "table full" is reached).
//!
//! Input: a program of one-byte operations and their arguments (missing bytes read as 0):
//! a packet built from a few fields — endpoints among five hosts in IPv4 or IPv6, TCP
//! (flags, seq/ack near the usual ISNs or anything, window, window-scale option, payload),
//! UDP, SCTP, ICMP/ICMPv6 echo request or reply, an ICMP error quoting a TCP/UDP packet,
//! another protocol; IPv4 or IPv6-extension-header fragments; IPv6 hop-by-hop and
//! destination-options chains, some longer than the limit — or raw bytes, both added to
//! the current burst (at most `MAX_BURST`); run the burst; let time pass (up to ~11
//! minutes, so flows and fragment verdicts expire). The first byte picks the filter's knobs
//! (`on_deny`, `tcp_liberal`).
//!
//! The policy (the e2e tests' lab, tests/fixtures/packet_lab/): `client` may reach
//! `server` on TCP 8000 and 9000 and UDP 5353,
//! `pinger` may reach `server` on anything; nobody else reaches anyone (default deny, and
//! `stranger` is in no inventory). The oracle below says the same without the compiler.
//!
//! Invariants, after every burst: never panics; a forwarded packet of a flow is either in a
//! direction the policy allows or a reply of a flow that was forwarded in the allowed
//! direction before; a forwarded ICMP error quotes such a flow; a forwarded later fragment
//! follows a forwarded first fragment with its key; `Reject` only for policy denials with
//! `on_deny = "reject"`, and its reply fits the buffer and parses; the worker's counters
//! add up (packets and bytes passed + dropped = run, causes = drops, malformed reasons =
//! malformed drops).
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use flowgate::dataplane::Runtime;
use flowgate::dataplane::packet::classify::{self, FragmentKey, Kind, Limits};
use flowgate::dataplane::packet::filter::{
    DropCause, Filter, FilterConfig, MAX_BURST, OnDeny, PacketCounters, Verdict,
};
use flowgate::flow::{FlowKey, Proto};
use flowgate::policy::{CompileOptions, CompiledPolicy, DefaultAction, PolicySet, load};

/// The packet lab of the end-to-end tests (tests/packet_e2e.rs), IPv4 and IPv6 addresses.
const INVENTORY: &str = include_str!("../../tests/fixtures/packet_lab/inventory.yaml");
const POLICY: &str = include_str!("../../tests/fixtures/packet_lab/policy.yaml");

/// client, intruder, pinger, server, stranger (in no inventory).
const HOSTS4: [Ipv4Addr; 5] = [
    Ipv4Addr::new(198, 18, 1, 2),
    Ipv4Addr::new(198, 18, 1, 3),
    Ipv4Addr::new(198, 18, 1, 4),
    Ipv4Addr::new(198, 18, 2, 2),
    Ipv4Addr::new(198, 18, 9, 9),
];
const HOSTS6: [Ipv6Addr; 5] = [
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3),
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 4),
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 9),
];
const CLIENT: usize = 0;
const PINGER: usize = 2;
const SERVER: usize = 3;
const PORTS: [u16; 5] = [40000, 40001, 8000, 9000, 5353];
const ISNS: [u32; 4] = [1000, 1001, 5000, 5001];

fn host(ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(a) => HOSTS4.iter().position(|h| *h == a),
        IpAddr::V6(a) => HOSTS6.iter().position(|h| *h == a),
    }
}

/// The policy, said without the compiler: may `k` open a flow?
fn allowed(k: &FlowKey) -> bool {
    match (host(k.src.ip()), host(k.dst.ip())) {
        (Some(CLIENT), Some(SERVER)) => {
            (k.proto == Proto::Tcp && matches!(k.dst.port(), 8000 | 9000))
                || (k.proto == Proto::Udp && k.dst.port() == 5353)
        }
        (Some(PINGER), Some(SERVER)) => true,
        _ => false,
    }
}

fn compiled() -> CompiledPolicy {
    let inventory = load::parse_inventory(INVENTORY, Path::new("inventory.yaml"))
        .unwrap_or_else(|e| panic!("the target's inventory must parse: {e:?}"));
    let policies = load::parse_policies(POLICY, Path::new("policy.yaml"))
        .unwrap_or_else(|e| panic!("the target's policy must parse: {e:?}"));
    let opts = CompileOptions {
        default: DefaultAction::Deny,
        unknown: DefaultAction::Deny,
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    };
    CompiledPolicy::compile(&PolicySet::new(inventory, policies), &opts)
        .unwrap_or_else(|e| panic!("the target's policy must compile: {e}"))
}

/// The program's bytes; reads past the end give zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b.to_vec()
    }
    fn seq(&mut self) -> u32 {
        let s = self.u8();
        if s & 1 == 1 { self.u32() } else { ISNS[usize::from(s >> 1) % 4] + u32::from(self.u8()) }
    }
}

#[derive(Clone, Copy)]
enum Frag {
    None,
    /// The first fragment (more to come) with this id.
    First(u16),
    /// A later one: id, offset in 8-byte units, more.
    Later(u16, u16, bool),
}

fn frag(i: &mut Input) -> Frag {
    let f = i.u8();
    match f & 3 {
        2 => Frag::First(u16::from(f >> 2)),
        3 => Frag::Later(u16::from(f >> 4), u16::from(i.u8()), f & 4 != 0),
        _ => Frag::None,
    }
}

fn ip4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8], frag: Frag) -> Vec<u8> {
    let (id, flags_off) = match frag {
        Frag::None => (0, 0),
        Frag::First(id) => (id, 0x2000),
        Frag::Later(id, off, more) => (id, (off & 0x1fff) | if more { 0x2000 } else { 0 }),
    };
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
    let len = u16::try_from(20 + l4.len()).unwrap_or(u16::MAX);
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&flags_off.to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p
}

/// An IPv6 packet: `ext` hop-by-hop (first) / destination-options headers, then a fragment
/// header if `frag` says so, then `l4` (protocol `proto`).
fn ip6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8], frag: Frag, ext: usize) -> Vec<u8> {
    let mut chain: Vec<(u8, Vec<u8>)> =
        (0..ext).map(|n| (if n == 0 { 0 } else { 60 }, vec![0u8; 8])).collect();
    match frag {
        Frag::None => {}
        Frag::First(id) => chain.push((44, frag_header(id, 0, true))),
        Frag::Later(id, off, more) => chain.push((44, frag_header(id, off, more))),
    }
    let mut body = Vec::new();
    for (n, (_, h)) in chain.iter().enumerate() {
        let mut h = h.clone();
        h[0] = chain.get(n + 1).map_or(proto, |next| next.0);
        body.extend_from_slice(&h);
    }
    body.extend_from_slice(l4);
    let mut p = vec![0x60, 0, 0, 0];
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    p.extend_from_slice(&len.to_be_bytes());
    p.push(chain.first().map_or(proto, |h| h.0));
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&body);
    p
}

fn frag_header(id: u16, off: u16, more: bool) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[2..4].copy_from_slice(&(((off & 0x1fff) << 3) | u16::from(more)).to_be_bytes());
    h[4..8].copy_from_slice(&u32::from(id).to_be_bytes());
    h
}

fn ip(v6: bool, s: usize, d: usize, proto: u8, l4: &[u8], frag: Frag, ext: usize) -> Vec<u8> {
    if v6 {
        ip6(HOSTS6[s], HOSTS6[d], proto, l4, frag, ext)
    } else {
        ip4(HOSTS4[s], HOSTS4[d], proto, l4, frag)
    }
}

fn tcp(i: &mut Input, sport: u16, dport: u16) -> Vec<u8> {
    let flags = i.u8();
    let (seq, ack) = (i.seq(), i.seq());
    let window = match i.u8() % 4 {
        0 => 0,
        1 => 1024,
        2 => 65535,
        _ => i.u16(),
    };
    let opt = i.u8();
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[13] = flags;
    t[14..16].copy_from_slice(&window.to_be_bytes());
    if opt & 1 == 1 {
        // Window scale (0..=15, beyond RFC 7323's 14 too), NOP-padded to 4 bytes.
        t.extend_from_slice(&[1, 3, 3, (opt >> 1) & 15]);
    }
    t[12] = u8::try_from(t.len() / 4).unwrap_or(15) << 4;
    t.resize(t.len() + usize::from(opt >> 5) * 100, 0);
    t
}

fn udp(sport: u16, dport: u16, data: usize) -> Vec<u8> {
    let mut u = vec![0u8; 8 + data];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&u16::try_from(8 + data).unwrap_or(u16::MAX).to_be_bytes());
    u
}

/// One generated packet.
fn packet(i: &mut Input) -> Vec<u8> {
    let a = i.u8();
    let v6 = a & 1 == 1;
    let (s, d) = (usize::from((a >> 1) & 7) % 5, usize::from(a >> 4) % 5);
    let what = i.u8();
    let p = i.u8();
    let (sport, dport) = (PORTS[usize::from(p) % 5], PORTS[usize::from(p / 5) % 5]);
    let fr = frag(i);
    let e = i.u8();
    let ext = if v6 { usize::from(if e & 0x80 != 0 { e % 16 } else { e % 3 }) } else { 0 };
    if let Frag::Later(..) = fr {
        let data = i.bytes(usize::from(what % 64));
        let proto = [6, 17, 1, 58][usize::from(what >> 6)];
        return ip(v6, s, d, proto, &data, fr, ext);
    }
    let (icmp, echo_req, echo_rep) = if v6 { (58, 128, 129) } else { (1, 8, 0) };
    match what % 7 {
        0 => ip(v6, s, d, 6, &tcp(i, sport, dport), fr, ext),
        1 => ip(v6, s, d, 17, &udp(sport, dport, usize::from(what >> 3)), fr, ext),
        k @ (2 | 3) => {
            let mut b = vec![if k == 2 { echo_req } else { echo_rep }, 0, 0, 0];
            b.extend_from_slice(&PORTS[usize::from(what >> 3) % 5].to_be_bytes());
            b.extend_from_slice(&i.u16().to_be_bytes());
            b.extend_from_slice(&[0u8; 8]);
            ip(v6, s, d, icmp, &b, fr, ext)
        }
        4 => {
            // An error from s to d quoting a packet d sent to s.
            let (inner_l4, proto) =
                if what & 8 == 0 { (tcp(i, dport, sport), 6) } else { (udp(dport, sport, 4), 17) };
            let inner = ip(v6, d, s, proto, &inner_l4, Frag::None, 0);
            let mut b =
                if v6 { vec![1, 4, 0, 0, 0, 0, 0, 0] } else { vec![3, 3, 0, 0, 0, 0, 0, 0] };
            let cut = usize::from(what >> 4) * 8;
            b.extend_from_slice(&inner[..inner.len().saturating_sub(cut).max(1)]);
            ip(v6, s, d, icmp, &b, fr, ext)
        }
        5 => {
            let mut b = vec![0u8; 12];
            b[0..2].copy_from_slice(&sport.to_be_bytes());
            b[2..4].copy_from_slice(&dport.to_be_bytes());
            b[4..8].copy_from_slice(&i.u32().to_be_bytes());
            ip(v6, s, d, 132, &b, fr, ext)
        }
        _ => ip(v6, s, d, 47, &[0u8; 8], fr, ext),
    }
}

/// What the fuzzer knows of the filter's past, to check a burst against.
#[derive(Default)]
struct Model {
    /// Canonical keys of flows forwarded in a direction the policy allows.
    opened: HashSet<FlowKey>,
    /// Fragment keys of forwarded first fragments.
    firsts: HashSet<FragmentKey>,
    /// Every flow key classified, to clear the shared table after the input.
    keys: HashSet<FlowKey>,
}

struct Snapshot {
    passed: (u64, u64),
    dropped: (u64, u64),
    causes: [u64; DropCause::COUNT],
    malformed: u64,
}

fn snapshot(c: &PacketCounters) -> Snapshot {
    let r = Ordering::Relaxed;
    Snapshot {
        passed: (c.passed_packets.load(r), c.passed_bytes.load(r)),
        dropped: (c.dropped_packets.load(r), c.dropped_bytes.load(r)),
        causes: std::array::from_fn(|n| c.dropped[n].load(r)),
        malformed: c.malformed.iter().map(|m| m.load(r)).sum(),
    }
}

fn run(f: &mut Filter, model: &mut Model, burst: &mut Vec<Vec<u8>>, now: Instant, on_deny: OnDeny) {
    if burst.is_empty() {
        return;
    }
    let before = snapshot(f.counters());
    let refs: Vec<&[u8]> = burst.iter().map(Vec::as_slice).collect();
    let mut verdicts = [Verdict::Pass; MAX_BURST];
    f.run(&refs, &mut verdicts[..refs.len()], now);
    let verdicts = &verdicts[..refs.len()];
    let after = snapshot(f.counters());

    // Counters add up.
    let mut want =
        Snapshot { passed: (0, 0), dropped: (0, 0), causes: [0; DropCause::COUNT], malformed: 0 };
    for (p, v) in refs.iter().zip(verdicts) {
        let bytes = p.len() as u64;
        match v {
            Verdict::Pass => {
                want.passed.0 += 1;
                want.passed.1 += bytes;
            }
            Verdict::Drop(c) | Verdict::Reject(c) => {
                want.dropped.0 += 1;
                want.dropped.1 += bytes;
                want.causes[c.index()] += 1;
                if let DropCause::Malformed(_) = c {
                    want.malformed += 1;
                }
            }
        }
    }
    let delta = |a: (u64, u64), b: (u64, u64)| (a.0 - b.0, a.1 - b.1);
    assert_eq!(delta(after.passed, before.passed), want.passed, "passed packets/bytes");
    assert_eq!(delta(after.dropped, before.dropped), want.dropped, "dropped packets/bytes");
    for n in 0..DropCause::COUNT {
        assert_eq!(after.causes[n] - before.causes[n], want.causes[n], "{}", DropCause::LABELS[n]);
    }
    assert_eq!(after.malformed - before.malformed, want.malformed, "malformed reasons");

    // What this burst forwarded in an allowed direction, and its first fragments.
    let classified: Vec<_> =
        refs.iter().map(|p| classify::classify_with(p, &Limits::DEFAULT).ok()).collect();
    model.keys.extend(classified.iter().flatten().map(|c| c.key));
    for (c, v) in classified.iter().zip(verdicts) {
        let (Some(c), Verdict::Pass) = (c, v) else { continue };
        if let Kind::Flow { first_fragment, .. } = c.kind {
            if allowed(&c.key) {
                model.opened.insert(c.key.canonical());
            }
            if first_fragment.is_some()
                && let Some(fk) = c.fragment_key()
            {
                model.firsts.insert(fk);
            }
        }
    }
    let mut out = [0u8; 1500];
    for ((p, c), v) in refs.iter().zip(&classified).zip(verdicts) {
        match (v, c) {
            (Verdict::Pass, None) => panic!("a malformed packet forwarded: {p:02x?}"),
            (Verdict::Pass, Some(c)) => match c.kind {
                Kind::Flow { .. } => assert!(
                    allowed(&c.key) || model.opened.contains(&c.key.canonical()),
                    "forwarded {:?}, which no allowed flow explains",
                    c.key
                ),
                Kind::Related { .. } => assert!(
                    model.opened.contains(&c.key.canonical()),
                    "an ICMP error about {:?} forwarded, a flow never opened",
                    c.key
                ),
                Kind::Fragment { .. } => {
                    let fk = c.fragment_key().expect("a later fragment has a fragment key");
                    assert!(
                        model.firsts.contains(&fk),
                        "a later fragment forwarded without its first"
                    );
                }
            },
            (Verdict::Reject(cause), _) => {
                assert_eq!((on_deny, *cause), (OnDeny::Reject, DropCause::Policy));
                if let Some(n) = f.reject_reply(p, &mut out, now) {
                    // A whole IP packet: its header's length is what was written. (Not
                    // necessarily one the classifier maps to a flow: it may quote a packet
                    // without ports.)
                    let r = &out[..n];
                    let len = match r.first().map(|b| b >> 4) {
                        Some(4) if n >= 20 => usize::from(u16::from_be_bytes([r[2], r[3]])),
                        Some(6) if n >= 40 => 40 + usize::from(u16::from_be_bytes([r[4], r[5]])),
                        _ => panic!("the reject reply is no IP packet: {r:02x?}"),
                    };
                    assert_eq!(len, n, "the reject reply's length");
                }
            }
            (Verdict::Drop(DropCause::Policy), Some(c)) => {
                assert_eq!(on_deny, OnDeny::Drop);
                assert!(!allowed(&c.key), "{:?} allowed by policy, dropped as denied", c.key);
            }
            (Verdict::Drop(_), _) => {}
        }
    }
    burst.clear();
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut i = Input(data);
    let knobs = i.u8();
    let on_deny = if knobs & 1 == 1 { OnDeny::Reject } else { OnDeny::Drop };
    let cfg = FilterConfig {
        on_deny,
        tcp_liberal: knobs & 2 != 0,
        max_fragments: 4,
        reject_per_second: 1000,
        ..FilterConfig::default()
    };
    // One runtime for every input (building one per input ran at ~10 exec/s); each input
    // removes the flows it opened, below.
    static RT: OnceLock<Arc<Runtime>> = OnceLock::new();
    let rt = RT.get_or_init(|| Runtime::standalone(compiled(), 16)).clone();
    let tag = rt.first_listener("packet", "packet");
    let mut f = Filter::new(rt.clone(), tag, cfg, Arc::new(PacketCounters::default()));
    let mut model = Model::default();
    let mut now = Instant::now();
    let mut burst: Vec<Vec<u8>> = Vec::new();
    for _ in 0..512 {
        if i.0.is_empty() {
            break;
        }
        match i.u8() % 8 {
            0 => run(&mut f, &mut model, &mut burst, now, on_deny),
            1 => {
                run(&mut f, &mut model, &mut burst, now, on_deny);
                now += Duration::from_millis(u64::from(i.u16()) * 10);
            }
            2 => {
                let n = usize::from(i.u8());
                burst.push(i.bytes(n));
            }
            _ => burst.push(packet(&mut i)),
        }
        if burst.len() == MAX_BURST {
            run(&mut f, &mut model, &mut burst, now, on_deny);
        }
    }
    run(&mut f, &mut model, &mut burst, now, on_deny);
    for key in &model.keys {
        rt.conntrack.remove(key);
    }
});
