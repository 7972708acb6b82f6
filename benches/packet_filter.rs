//! The packet filter core (`dataplane::packet::filter`) per packet, on the bundled policy
//! (config/flowgate.toml; 127.0.0.1 may reach 127.0.0.2:8081/TCP and 198.18.40.53:53/UDP):
//! - `hit/tcp`: bursts of 64 data segments of established TCP flows (the conntrack hit
//!   path: classify, one batch lookup, window tracking, the state machine, counters), the
//!   flows cycling through 4,096 so a burst's entries are not all in L1. Target ≤ 100 ns a
//!   packet (issue 21).
//! - `hit/udp`: the same for datagrams of assured UDP flows (to the DNS server).
//! - `new/syn`: a bare SYN of a new allowed flow through the one gate (decide, insert,
//!   window set-up), then the flow removed again.
//!
//! Timed in the benchmark thread's CPU time (the host is shared).
//!
//! `cargo bench --bench packet_filter -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowgate::config::Config;
use flowgate::conntrack::Conntrack;
use flowgate::control::ControlPlane;
use flowgate::dataplane::packet::classify;
use flowgate::dataplane::packet::filter::{
    Filter, FilterConfig, MAX_BURST, PacketCounters, Verdict,
};
use flowgate::dataplane::{ListenerTag, Runtime};
use flowgate::telemetry::flowlog::{FlowLog, FlowLogConfig};
use flowgate::telemetry::metrics::Registry;

const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The bundled inventory's DNS server: every workload may send it datagrams on port 53.
const DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 53);
const FLOWS: u16 = 4096;

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
    let mut t = vec![0u8; 20 + data];
    t[0..2].copy_from_slice(&sp.to_be_bytes());
    t[2..4].copy_from_slice(&dp.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65_000u16.to_be_bytes());
    ip4(src, dst, 6, &t)
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sp: u16, dp: u16) -> Vec<u8> {
    let mut u = vec![0u8; 8 + 64];
    u[0..2].copy_from_slice(&sp.to_be_bytes());
    u[2..4].copy_from_slice(&dp.to_be_bytes());
    u[4..6].copy_from_slice(&72u16.to_be_bytes());
    ip4(src, dst, 17, &u)
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

fn bench(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/flowgate.toml");
    let cfg = Config::load(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log_cfg = FlowLogConfig {
        output: dir.path().join("flow.log").to_string_lossy().into_owned(),
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
    let mut f =
        Filter::new(rt.clone(), tag, FilterConfig::default(), Arc::new(PacketCounters::default()));

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

    let mut verdicts = [Verdict::Pass; MAX_BURST];
    let mut g = c.benchmark_group("packet_filter");
    g.throughput(Throughput::Elements(MAX_BURST as u64));
    for (name, refs) in [("hit/tcp", &data_refs), ("hit/udp", &dgram_refs)] {
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
    g.throughput(Throughput::Elements(1));
    // Client ports the established flows do not use.
    let mut port = 20_000u16;
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
