//! The packet filter's hot-path promise, checked with a counting allocator (as
//! tests/l4_admit_alloc.rs does for the gate): a burst of packets of tracked flows (TCP
//! data through window tracking and the state machine, UDP replies) allocates nothing, and
//! neither does a burst of denied SYNs or malformed packets. Allocations are counted per
//! thread, so the flow-log writer and the gateway's tasks do not count.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use flowgate::config::Config;
use flowgate::dataplane::ListenerTag;
use flowgate::dataplane::packet::filter::{
    DropCause, Filter, FilterConfig, MAX_BURST, PacketCounters, Verdict,
};
use support::l4::World;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

const OK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const BAD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
const WEB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 20);

fn ip4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p
}

#[allow(clippy::too_many_arguments)]
fn tcp(
    s: Ipv4Addr,
    d: Ipv4Addr,
    sp: u16,
    dp: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    n: usize,
) -> Vec<u8> {
    let mut t = vec![0u8; 20 + n];
    t[0..2].copy_from_slice(&sp.to_be_bytes());
    t[2..4].copy_from_slice(&dp.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65_000u16.to_be_bytes());
    ip4(s, d, 6, &t)
}

fn udp(s: Ipv4Addr, d: Ipv4Addr, sp: u16, dp: u16) -> Vec<u8> {
    let mut u = vec![0u8; 40];
    u[0..2].copy_from_slice(&sp.to_be_bytes());
    u[2..4].copy_from_slice(&dp.to_be_bytes());
    u[4..6].copy_from_slice(&40u16.to_be_bytes());
    ip4(s, d, 17, &u)
}

fn run(f: &mut Filter, packets: &[Vec<u8>]) -> Vec<Verdict> {
    let refs: Vec<&[u8]> = packets.iter().map(|p| p.as_slice()).collect();
    let mut v = vec![Verdict::Pass; refs.len()];
    for (p, v) in refs.chunks(MAX_BURST).zip(v.chunks_mut(MAX_BURST)) {
        f.run(p, v, Instant::now());
    }
    v
}

#[test]
fn the_hit_path_allocates_nothing() {
    let world = World::new();
    let cfg = Config::load(&world.write_config("")).unwrap();
    let standalone = support::gateway::runtime(&cfg);
    let rt = standalone.gateway.rt.clone();
    let tag = ListenerTag {
        index: rt.registry.listeners().len() as u16,
        name: Arc::from("packet"),
        counters: rt.registry.listener("packet", "packet"),
    };
    let mut f = Filter::new(rt, tag, FilterConfig::default(), Arc::new(PacketCounters::default()));

    // 32 TCP flows established and 32 UDP flows assured (allocates: new flows).
    let ports = || (0..32u16).map(|i| 30_000 + i);
    for (flags, from_client) in [(0x02, true), (0x12, false), (0x10, true)] {
        let step: Vec<_> = ports()
            .map(|p| match from_client {
                true => {
                    tcp(OK, WEB, p, 80, flags, if flags == 0x02 { 1000 } else { 1001 }, 5001, 0)
                }
                false => tcp(WEB, OK, 80, p, flags, 5000, 1001, 0),
            })
            .collect();
        assert!(run(&mut f, &step).iter().all(|v| *v == Verdict::Pass));
    }
    let udp_open: Vec<_> = ports().map(|p| udp(OK, WEB, p, 53)).collect();
    assert!(run(&mut f, &udp_open).iter().all(|v| *v == Verdict::Pass));

    // The burst: data both ways and UDP replies, all hits.
    let mut burst: Vec<Vec<u8>> = Vec::new();
    for p in ports() {
        burst.push(tcp(OK, WEB, p, 80, 0x18, 1001, 5001, 500));
        burst.push(udp(WEB, OK, 53, p));
    }
    let refs: Vec<&[u8]> = burst.iter().map(|p| p.as_slice()).collect();
    let mut v = [Verdict::Pass; MAX_BURST];
    // Warm up (thread-locals, lazily made statics).
    f.run(&refs, &mut v, Instant::now());
    assert!(v.iter().all(|v| *v == Verdict::Pass), "{v:?}");

    let before = allocs();
    for _ in 0..100 {
        f.run(&refs, &mut v, Instant::now());
    }
    assert_eq!(allocs() - before, 0, "the hit path allocated");
    assert!(v.iter().all(|v| *v == Verdict::Pass), "{v:?}");

    // Denied SYNs (the gate's deny path) and malformed packets allocate nothing either.
    let denied: Vec<Vec<u8>> =
        (0..MAX_BURST as u16).map(|i| tcp(BAD, WEB, 40_000 + i, 80, 0x02, 1, 0, 0)).collect();
    let denied_refs: Vec<&[u8]> = denied.iter().map(|p| p.as_slice()).collect();
    f.run(&denied_refs, &mut v, Instant::now());
    let junk: Vec<&[u8]> = vec![&[0x45, 0, 0]; MAX_BURST];
    let before = allocs();
    for _ in 0..10 {
        f.run(&denied_refs, &mut v, Instant::now());
        assert!(v.iter().all(|v| *v == Verdict::Drop(DropCause::Policy)), "{v:?}");
        f.run(&junk, &mut v, Instant::now());
    }
    assert_eq!(allocs() - before, 0, "the deny or malformed path allocated");
    drop(standalone);
}
