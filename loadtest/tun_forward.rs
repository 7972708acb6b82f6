//! What the TUN front end costs before any filtering: TCP throughput client → server
//! (iperf3, one stream) through a gateway namespace that
//!
//! 1. forwards in the kernel (the reference),
//! 2. routes everything through a TUN with offloads (virtio-net header, TSO/USO) and a
//!    trivial forwarder on `flowgate::dataplane::tun` that writes each frame back as read,
//! 3. the same through a plain TUN (no header, no offloads: one MTU-sized packet per read).
//!
//! ```text
//! sudo cargo bench --bench tun_forward              # 5 s per case; needs root and iperf3
//! TF_SECS=10 sudo cargo bench --bench tun_forward
//! ```
//!
//! Prints the three rates and the TUN/kernel ratios. Each case builds its own namespaces
//! (tests/support/topology.rs) and deletes them; every wait is bounded. Not a test: the
//! numbers depend on the machine and on what else runs on it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use flowgate::dataplane::tun::Offloads;
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
    let cases = [
        ("kernel forwarding", Case::Kernel),
        ("TUN, offloads on", Case::Tun(Offloads::On)),
        ("TUN, offloads off", Case::Tun(Offloads::Off)),
    ];
    let mut rates = Vec::new();
    for (name, case) in cases {
        let bps = run(case, secs);
        println!("{name:<20} {:>8.2} Gbit/s  (iperf3 -t {secs}, one stream)", bps / 1e9);
        rates.push(bps);
    }
    println!("TUN offloads on  / kernel: {:.2}×", rates[1] / rates[0]);
    println!("TUN offloads off / kernel: {:.3}×", rates[2] / rates[0]);
    println!("offloads on / off:         {:.1}×", rates[1] / rates[2]);
}
