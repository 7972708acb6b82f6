//! What the AF_PACKET front end's device layer costs before any filtering, and why it is
//! built on TPACKET_V3 rings rather than pnet's datalink channel: client — bump — server
//! namespaces (tests/support/bump.rs), the bump's two interfaces joined by
//!
//! 1. a kernel bridge (the reference),
//! 2. pnet's datalink channel (`pnet_datalink`): one thread per direction, `next()` →
//!    `send_to()`, i.e. poll + recvfrom + poll + sendto per frame,
//! 3. `flowgate::dataplane::packet::afpacket`: one worker, a burst from the rings, one
//!    `sendmmsg` per burst, frames sent from the ring in place,
//!
//! measuring UDP packets per second with a 64-byte payload received at the server
//! (`iperf3 -u -l 64 -b 0`) and TCP throughput (`iperf3`, one stream). pnet cannot carry
//! a frame larger than the MTU or one whose checksum is left to offload (it has no
//! virtio-net header), so cases 2 and 3 run with checksum/segmentation offloads off on the
//! client's and server's interfaces; case 3 runs again with them on (how flowgate runs).
//!
//! ```text
//! sudo cargo bench --bench afpacket_forward         # 4 s per case, 3 rounds; root, iperf3
//! AF_SECS=8 AF_ROUNDS=5 sudo cargo bench --bench afpacket_forward
//! ```
//!
//! Prints each round, each case's median and the ring/pnet ratios. Every case builds its
//! own namespaces and deletes them; every wait is bounded.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pnet_datalink::{Channel, Config};
use support::bump::{self, Bump, Forwarder, SERVER};
use support::topology::{self, in_ns};

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Bridge,
    Pnet,
    Ring { offloads: bool },
}

/// pnet's channel on both interfaces, one thread per direction, until `stop` or `limit`.
struct PnetForwarder {
    stop: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PnetForwarder {
    fn start(b: &Bump, limit: Duration) -> PnetForwarder {
        let channels = in_ns(&b.bump, || {
            let ifaces = pnet_datalink::interfaces();
            [bump::INSIDE, bump::OUTSIDE].map(|name| {
                let iface = ifaces.iter().find(|i| i.name == name).expect("bump interface");
                let cfg = Config {
                    read_timeout: Some(Duration::from_millis(20)),
                    read_buffer_size: 65_536,
                    write_buffer_size: 65_536,
                    promiscuous: true,
                    ..Config::default()
                };
                match pnet_datalink::channel(iface, cfg) {
                    Ok(Channel::Ethernet(tx, rx)) => (tx, rx),
                    Ok(_) => panic!("not an Ethernet channel"),
                    Err(e) => panic!("pnet channel on {name}: {e}"),
                }
            })
        });
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(AtomicU64::new(0));
        let [(tx_in, rx_in), (tx_out, rx_out)] = channels;
        let mut threads = Vec::new();
        for (mut rx, mut tx) in [(rx_in, tx_out), (rx_out, tx_in)] {
            let (stop, frames) = (stop.clone(), frames.clone());
            threads.push(std::thread::spawn(move || {
                let end = Instant::now() + limit;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    let Ok(frame) = rx.next() else { continue };
                    frames.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send_to(frame, None);
                }
            }));
        }
        PnetForwarder { stop, frames, threads }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.frames.load(Ordering::Relaxed)
    }
}

/// (UDP received pps, TCP bits/s) through the bump joined as `case`.
fn run(case: Case, secs: u32) -> (f64, f64) {
    let b = Bump::new();
    if case != (Case::Ring { offloads: true }) && case != Case::Bridge {
        b.offloads_off();
    }
    let limit = Duration::from_secs(u64::from(secs) * 2 + 60);
    enum Running {
        Nothing,
        Pnet(PnetForwarder),
        Ring(Forwarder),
    }
    let running = match case {
        Case::Bridge => {
            b.bump.exec(&format!(
                "ip link add br0 type bridge && ip link set br0 up && \
                 ip link set {} master br0 && ip link set {} master br0",
                bump::INSIDE,
                bump::OUTSIDE
            ));
            Running::Nothing
        }
        Case::Pnet => Running::Pnet(PnetForwarder::start(&b, limit)),
        Case::Ring { .. } => {
            Running::Ring(Forwarder::start(b.open(1).into_queues(), limit, bump::forward_all))
        }
    };
    assert_eq!(bump::ping(&b, 2), 2, "the bump forwards");
    let (_, pps) = topology::udp_pps_between(&b.client, &b.server, SERVER, 64, secs);
    let bps = topology::iperf3_between(&b.client, &b.server, SERVER, secs);
    match running {
        Running::Nothing => {}
        Running::Pnet(p) => eprintln!("    pnet: {} frames", p.finish()),
        Running::Ring(f) => {
            let seen = f.finish().unwrap_or_else(|e| panic!("ring forwarder: {e}"));
            eprintln!(
                "    ring: {} frames, {} GSO, {} send failures",
                support::bump::Seen::get(&seen.inside) + support::bump::Seen::get(&seen.outside),
                support::bump::Seen::get(&seen.gso),
                support::bump::Seen::get(&seen.send_failed)
            );
        }
    }
    (pps, bps)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !support::require::on_path("iperf3") {
        eprintln!("afpacket_forward: needs root and iperf3 (scripts/setup.sh); skipping");
        return;
    }
    let env = |k: &str, d: u32| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let secs = env("AF_SECS", 4).clamp(1, 60);
    let rounds = env("AF_ROUNDS", 3).clamp(1, 10) as usize;
    let cases = [
        ("kernel bridge", Case::Bridge),
        ("pnet channel, offloads off", Case::Pnet),
        ("TPACKET_V3, offloads off", Case::Ring { offloads: false }),
        ("TPACKET_V3, offloads on", Case::Ring { offloads: true }),
    ];
    // Rounds interleave the cases so a neighbour's load lands on all alike.
    let mut res: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
    for round in 1..=rounds {
        for ((name, case), r) in cases.iter().zip(&mut res) {
            let (pps, bps) = run(*case, secs);
            println!(
                "round {round}: {name:<28} UDP {:>9.0} pps   TCP {:>6.2} Gbit/s",
                pps,
                bps / 1e9
            );
            r.push((pps, bps));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let med: Vec<(f64, f64)> = res
        .iter()
        .map(|r| {
            let mut p: Vec<f64> = r.iter().map(|x| x.0).collect();
            let mut b: Vec<f64> = r.iter().map(|x| x.1).collect();
            (median(&mut p), median(&mut b))
        })
        .collect();
    println!("median of {rounds} (iperf3 -t {secs}; UDP -l 64 -b 0, received at the server):");
    for ((name, _), (pps, bps)) in cases.iter().zip(&med) {
        println!("  {name:<28} UDP {pps:>9.0} pps   TCP {:>6.2} Gbit/s", bps / 1e9);
    }
    println!(
        "ring / pnet (offloads off): UDP {:.2}×  TCP {:.2}×",
        med[2].0 / med[1].0,
        med[2].1 / med[1].1
    );
    println!(
        "ring offloads on / bridge:  UDP {:.2}×  TCP {:.2}×",
        med[3].0 / med[0].0,
        med[3].1 / med[0].1
    );
    // One machine-readable line for `loadtest/run`.
    let case = |m: &(f64, f64)| serde_json::json!({"udp_pps": m.0, "tcp_gbps": m.1 / 1e9});
    println!(
        "{}",
        serde_json::json!({
            "bench": "afpacket_forward", "secs": secs, "rounds": rounds,
            "bridge": case(&med[0]), "pnet_off": case(&med[1]), "ring_off": case(&med[2]),
            "ring_on": case(&med[3]),
        })
    );
}
