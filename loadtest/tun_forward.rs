//! What the TUN front end costs before any filtering: TCP throughput client → server
//! (iperf3, one stream) through a gateway namespace that
//!
//! 1. forwards in the kernel (the reference),
//! 2. routes everything through a TUN with offloads (virtio-net header, TSO/USO) and a
//!    trivial forwarder on `flowgate::dataplane::packet::tun` that writes each frame back as read,
//! 3. the same through a plain TUN (no header, no offloads: one MTU-sized packet per read).
//!
//! ```text
//! sudo cargo bench --bench tun_forward              # 5 s per case; needs root and iperf3
//! TF_SECS=10 TF_ROUNDS=5 sudo cargo bench --bench tun_forward   # default 5 s, 3 rounds
//! ```
//!
//! Prints each round's rates, each case's median and the TUN/kernel ratios. Each case
//! builds its own namespaces (tests/support/topology.rs) and deletes them; every wait is
//! bounded. Not a test: the numbers depend on the machine and on what else runs on it
//! (on a shared 2-core machine one round's kernel rate varied 4.5–7.5 Gbit/s, hence the
//! interleaved rounds and medians).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use flowgate::dataplane::packet::tun::Offloads;
use support::topology::{self, Forwarder, Seen, Topology};

#[derive(Clone, Copy)]
enum Case {
    Kernel,
    Tun(Offloads),
}

fn run(case: Case, secs: u32) -> f64 {
    let topo = Topology::kernel();
    let fwd = match case {
        Case::Kernel => None,
        Case::Tun(offloads) => {
            let tun = topology::open_tun(&topo.gateway, "fg0", 1, offloads);
            topo.route_through("fg0");
            Some(Forwarder::start(tun.into_queues(), Duration::from_secs(u64::from(secs) + 60)))
        }
    };
    let bps = topology::iperf3(&topo, secs);
    if let Some(fwd) = fwd {
        let seen = fwd.finish().unwrap_or_else(|e| panic!("forwarder: {e}"));
        eprintln!(
            "    forwarder: {} frames, {} MB, {} GSO, largest {} B, {} write errors",
            Seen::get(&seen.frames),
            Seen::get(&seen.bytes) / 1_000_000,
            Seen::get(&seen.gso_frames),
            Seen::get(&seen.max_packet),
            Seen::get(&seen.write_errors)
        );
    }
    bps
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !support::require::on_path("iperf3") {
        eprintln!("tun_forward: needs root and iperf3 (scripts/setup.sh); skipping");
        return;
    }
    let secs: u32 = std::env::var("TF_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let secs = secs.clamp(1, 60);
    let rounds: usize = std::env::var("TF_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let rounds = rounds.clamp(1, 10);
    let cases = [
        ("kernel forwarding", Case::Kernel),
        ("TUN, offloads on", Case::Tun(Offloads::On)),
        ("TUN, offloads off", Case::Tun(Offloads::Off)),
    ];
    // Rounds interleave the cases, so a neighbour's burst of load on a shared machine
    // lands on all three alike; each case reports its median.
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 1..=rounds {
        for ((name, case), r) in cases.iter().zip(&mut rates) {
            let bps = run(*case, secs);
            println!("round {round}: {name:<20} {:>6.2} Gbit/s", bps / 1e9);
            r.push(bps);
        }
    }
    let median: Vec<f64> = rates
        .iter_mut()
        .map(|r| {
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        })
        .collect();
    println!("median of {rounds} (iperf3 -t {secs}, one stream):");
    for ((name, _), bps) in cases.iter().zip(&median) {
        println!("  {name:<20} {:>6.2} Gbit/s", bps / 1e9);
    }
    println!("TUN offloads on  / kernel: {:.2}×", median[1] / median[0]);
    println!("TUN offloads off / kernel: {:.3}×", median[2] / median[0]);
    println!("offloads on / off:         {:.1}×", median[1] / median[2]);
    // One machine-readable line for `loadtest/run`.
    println!(
        "{}",
        serde_json::json!({
            "bench": "tun_forward", "secs": secs, "rounds": rounds,
            "kernel_gbps": median[0] / 1e9, "tun_on_gbps": median[1] / 1e9,
            "tun_off_gbps": median[2] / 1e9,
        })
    );
}
