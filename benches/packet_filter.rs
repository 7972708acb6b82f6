//! The packet filter core (`dataplane::packet::filter`) per packet, on the bundled policy
//! (config/flowgate.toml; 127.0.0.1 may reach 127.0.0.2:8081/TCP and 198.18.40.53:53/UDP):
//! - `hit/tcp`: bursts of 64 data segments of established TCP flows (the conntrack hit
//!   path: classify, one batch lookup, window tracking, the state machine, counters), the
//!   flows cycling through 4,096 so a burst's entries are not all in L1. Target ≤ 100 ns a
//!   packet (issue 21).
//! - `hit/udp`: the same for datagrams of assured UDP flows (to the DNS server).
//! - `hit/tcp6`, `hit/udp6`: the same two over IPv6, on the packet lab's policy
//!   (tests/fixtures/packet_lab/: 2001:db8:1::2 may reach 2001:db8:2::2 on TCP 8000 and
//!   UDP 5353), so the conntrack hit is measured for both IP versions (issue 21: ≤ 100 ns a
//!   packet for each).
//! - `new/syn`: a bare SYN of a new allowed flow through the one gate (decide, insert,
//!   window set-up), then the flow removed again.
//!
//! Timed in the benchmark thread's CPU time (the host is shared). First figures (loaded
//! 2-core host, load average ~10): hit/tcp 100 ns a packet, hit/udp 81 ns, new/syn 0.9 µs;
//! before `lookup_many` prefetched the cold part of TCP entries, hit/tcp was 154 ns.
//! With IPv6 (same host, load average ~8, 2026-12-08): hit/tcp 137 ns, hit/udp 84 ns,
//! hit/tcp6 152 ns, hit/udp6 117 ns, new/syn 0.86 µs: an IPv6 hit costs 10–40 % more
//! (16-byte addresses to hash and compare, a 40-byte header). A second run (load average
//! ~12): hit/tcp 112 ns, hit/udp 102 ns, hit/tcp6 151 ns, hit/udp6 120 ns. On that load
//! the 100 ns target is missed for TCP, and for IPv6 both; a quiet host is needed to say
//! whether it is met.
//!
//! `cargo bench --bench packet_filter -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use flowgate::config::Config;
use flowgate::conntrack::Conntrack;
use flowgate::control::ControlPlane;
use flowgate::dataplane::packet::classify;
use flowgate::dataplane::packet::filter::{
    Filter, FilterConfig, MAX_BURST, PacketCounters, Verdict,
};
use flowgate::dataplane::{ListenerTag, Runtime};
use flowgate::telemetry::flowlog::{FlowLog, FlowLogConfig, FlowLogWriter};
use flowgate::telemetry::metrics::Registry;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The bundled inventory's DNS server: every workload may send it datagrams on port 53.
const DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 53);
const FLOWS: u16 = 4096;
/// The packet lab's client and server (tests/fixtures/packet_lab/inventory.yaml).
const LAB_CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const LAB_SERVER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
const LAB_INVENTORY: &str = include_str!("../tests/fixtures/packet_lab/inventory.yaml");
const LAB_POLICY: &str = include_str!("../tests/fixtures/packet_lab/policy.yaml");

/// An IPv6 packet of `proto` (no extension headers) around `l4`.
fn ip6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    p[6] = proto;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p
}

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
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sp: u16,
    dp: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    data: usize,
) -> Vec<u8> {
    ip4(src, dst, 6, &tcp_segment(sp, dp, flags, seq, ack, data))
}

#[allow(clippy::too_many_arguments)]
fn tcp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sp: u16,
    dp: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    data: usize,
) -> Vec<u8> {
    ip6(src, dst, 6, &tcp_segment(sp, dp, flags, seq, ack, data))
}

fn tcp_segment(sp: u16, dp: u16, flags: u8, seq: u32, ack: u32, data: usize) -> Vec<u8> {
    let mut t = vec![0u8; 20 + data];
    t[0..2].copy_from_slice(&sp.to_be_bytes());
    t[2..4].copy_from_slice(&dp.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65_000u16.to_be_bytes());
    t
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sp: u16, dp: u16) -> Vec<u8> {
    ip4(src, dst, 17, &datagram(sp, dp))
}

fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sp: u16, dp: u16) -> Vec<u8> {
    ip6(src, dst, 17, &datagram(sp, dp))
}

fn datagram(sp: u16, dp: u16) -> Vec<u8> {
    let mut u = vec![0u8; 8 + 64];
    u[0..2].copy_from_slice(&sp.to_be_bytes());
    u[2..4].copy_from_slice(&dp.to_be_bytes());
    u[4..6].copy_from_slice(&72u16.to_be_bytes());
    u
}

/// CPU time of the calling thread: the benchmark machine is shared (2 cores, several
/// builds running), so wall time mostly measures the scheduler (as in benches/conntrack.rs).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn run_all(f: &mut Filter, packets: &[Vec<u8>]) {
    let mut v = [Verdict::Pass; MAX_BURST];
    for chunk in packets.chunks(MAX_BURST) {
        let refs: Vec<&[u8]> = chunk.iter().map(|p| p.as_slice()).collect();
        f.run(&refs, &mut v[..chunk.len()], Instant::now());
        assert!(v[..chunk.len()].iter().all(|v| *v == Verdict::Pass), "{v:?}");
    }
}

/// A filter on the policy `config` names (its flow log in `dir`), and its runtime.
fn filter_on(
    config: &std::path::Path,
    dir: &std::path::Path,
) -> (Filter, Arc<Runtime>, FlowLogWriter) {
    let cfg = Config::load(config).unwrap();
    let log_cfg = FlowLogConfig {
        output: dir.join("flow.log").to_string_lossy().into_owned(),
        ..FlowLogConfig::default()
    };
    let registry = Arc::new(Registry::default());
    let (flowlog, writer) = FlowLog::start(&log_cfg, registry.clone()).unwrap();
    let conntrack = Arc::new(Conntrack::new(&cfg.conntrack));
    let control =
        ControlPlane::new(cfg.clone(), conntrack.clone(), registry.clone(), Arc::new(|_, _, _| {}))
            .unwrap();
    let rt = Runtime::new(conntrack, control.policy(), registry.clone(), flowlog);
    let tag = ListenerTag {
        index: 0,
        name: Arc::from("packet"),
        counters: registry.listener("packet", "packet"),
    };
    let f =
        Filter::new(rt.clone(), tag, FilterConfig::default(), Arc::new(PacketCounters::default()));
    (f, rt, writer)
}

/// Times bursts of `refs` (cycling through them) through `f`, in thread CPU time.
fn bench_hits(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, f: &mut Filter, refs: &[&[u8]]) {
    let mut verdicts = [Verdict::Pass; MAX_BURST];
    let mut at = 0;
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu();
            for _ in 0..iters {
                let burst = &refs[at..at + MAX_BURST];
                at = (at + MAX_BURST) % refs.len();
                f.run(black_box(burst), &mut verdicts, Instant::now());
                black_box(&verdicts);
            }
            thread_cpu() - start
        })
    });
    assert!(verdicts.iter().all(|v| *v == Verdict::Pass), "{name}: {verdicts:?}");
}

fn bench(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/flowgate.toml");
    let dir = tempfile::tempdir().unwrap();
    let (mut f, rt, writer) = filter_on(&path, dir.path());

    // FLOWS established TCP flows and as many assured UDP flows.
    let ports = || (0..FLOWS).map(|i| 10_000 + i);
    let handshake: Vec<Vec<u8>> = ports()
        .flat_map(|p| {
            [
                tcp(CLIENT, SERVER, p, 8081, 0x02, 1000, 0, 0),
                tcp(SERVER, CLIENT, 8081, p, 0x12, 5000, 1001, 0),
                tcp(CLIENT, SERVER, p, 8081, 0x10, 1001, 5001, 0),
            ]
        })
        .collect();
    // Not in one burst: a flow's three segments must come in order across bursts too.
    run_all(&mut f, &handshake);
    let udp_flows: Vec<Vec<u8>> =
        ports().flat_map(|p| [udp(CLIENT, DNS, p, 53), udp(DNS, CLIENT, 53, p)]).collect();
    run_all(&mut f, &udp_flows);

    // Data segments that stay inside the window however often they are replayed (the same
    // sequence number: a retransmission, which window tracking and the machine accept).
    let data: Vec<Vec<u8>> =
        ports().map(|p| tcp(CLIENT, SERVER, p, 8081, 0x18, 1001, 5001, 1200)).collect();
    let data_refs: Vec<&[u8]> = data.iter().map(|p| p.as_slice()).collect();
    let dgrams: Vec<Vec<u8>> = ports().map(|p| udp(CLIENT, DNS, p, 53)).collect();
    let dgram_refs: Vec<&[u8]> = dgrams.iter().map(|p| p.as_slice()).collect();

    let mut g = c.benchmark_group("packet_filter");
    g.throughput(Throughput::Elements(MAX_BURST as u64));
    bench_hits(&mut g, "hit/tcp", &mut f, &data_refs);
    bench_hits(&mut g, "hit/udp", &mut f, &dgram_refs);

    // The same over IPv6, on the packet lab's policy.
    let lab = tempfile::tempdir().unwrap();
    std::fs::write(lab.path().join("inventory.yaml"), LAB_INVENTORY).unwrap();
    std::fs::create_dir(lab.path().join("policies")).unwrap();
    std::fs::write(lab.path().join("policies/lab.yaml"), LAB_POLICY).unwrap();
    std::fs::write(
        lab.path().join("flowgate.toml"),
        "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\
         [control]\nwatch = false\n",
    )
    .unwrap();
    let (mut f6, _rt6, writer6) = filter_on(&lab.path().join("flowgate.toml"), lab.path());
    let (c6, s6) = (LAB_CLIENT, LAB_SERVER);
    let handshake6: Vec<Vec<u8>> = ports()
        .flat_map(|p| {
            [
                tcp6(c6, s6, p, 8000, 0x02, 1000, 0, 0),
                tcp6(s6, c6, 8000, p, 0x12, 5000, 1001, 0),
                tcp6(c6, s6, p, 8000, 0x10, 1001, 5001, 0),
            ]
        })
        .collect();
    run_all(&mut f6, &handshake6);
    let udp_flows6: Vec<Vec<u8>> =
        ports().flat_map(|p| [udp6(c6, s6, p, 5353), udp6(s6, c6, 5353, p)]).collect();
    run_all(&mut f6, &udp_flows6);
    let data6: Vec<Vec<u8>> =
        ports().map(|p| tcp6(c6, s6, p, 8000, 0x18, 1001, 5001, 1200)).collect();
    let data6_refs: Vec<&[u8]> = data6.iter().map(|p| p.as_slice()).collect();
    let dgrams6: Vec<Vec<u8>> = ports().map(|p| udp6(c6, s6, p, 5353)).collect();
    let dgram6_refs: Vec<&[u8]> = dgrams6.iter().map(|p| p.as_slice()).collect();
    bench_hits(&mut g, "hit/tcp6", &mut f6, &data6_refs);
    bench_hits(&mut g, "hit/udp6", &mut f6, &dgram6_refs);
    writer6.finish();

    g.throughput(Throughput::Elements(1));
    // Client ports the established flows do not use.
    let mut port = 20_000u16;
    let mut verdicts = [Verdict::Pass; MAX_BURST];
    let mut syn = tcp(CLIENT, SERVER, port, 8081, 0x02, 7, 0, 0);
    g.bench_function("new/syn", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu();
            for _ in 0..iters {
                port = if port == u16::MAX { 20_000 } else { port + 1 };
                syn[20..22].copy_from_slice(&port.to_be_bytes());
                f.run(&[&syn], &mut verdicts[..1], Instant::now());
                assert_eq!(verdicts[0], Verdict::Pass);
                if let Ok(c) = classify::classify(&syn) {
                    rt.conntrack.remove(&c.key);
                }
            }
            thread_cpu() - start
        })
    });
    g.finish();
    writer.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
