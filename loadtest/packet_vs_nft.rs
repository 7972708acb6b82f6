//! Packet mode against the kernel: TCP throughput (iperf3, one stream) and UDP packets per
//! second with a 64-byte payload, received at the server, from a client to a server through
//! a gateway namespace that
//!
//! - forwards in the kernel with nftables holding the equivalent rule set, behind
//!   `ct state established,related accept` as a real rule set has it:
//!   1. one rule (`ip saddr C ip daddr S meta l4proto {tcp, udp} th dport 5201 accept`),
//!   2. 10,000 rules as a linear chain (`ip saddr X ip daddr Y tcp dport P accept` × 9,999
//!      that never match, the real flow's rule last),
//!   3. 10,000 rules as a set (`ip saddr . ip daddr . meta l4proto . th dport @allowed`),
//!   4. (for reference) the linear chain without conntrack, so every packet walks it;
//! - runs `flowgate` in packet mode with the equivalent NetworkPolicy set — one policy, or
//!   10,000 over a generated inventory of 10,001 workloads — through
//!   5. the TUN front end (the gateway routes everything it forwards into the TUN),
//!   6. the AF_PACKET front end, a bump in the wire (tests/support/bump.rs).
//!
//! For the bump, client and server share one subnet and the gateway's two interfaces
//! have no address.
//!
//! UDP is driven by `flowgate-udpblast` (the loadtest crate's: `sendmmsg` batches from
//! `PV_UDP_THREADS` sockets, default 2, a `recvmmsg` receiver on as many SO_REUSEPORT
//! sockets answering each flow once, so conntrack sees it established as it does iperf3's):
//! one `iperf3 -u` sender is one thread and caps at its own rate, not the path's.
//! `loadtest/run` passes its path in `PV_BLAST`; without it the UDP figure is
//! `iperf3 -u -l 64 -b 0`'s, and the table says so.
//!
//! flowgate's cases run when the built binary accepts a `[packet]` config (`flowgate
//! check` on it exits 0) and starts; otherwise they print `n/a` with the reason. Every
//! load loop is bounded (iperf3 `-t`, `timeout`, bounded start-up waits).
//!
//! ```text
//! sudo cargo bench --bench packet_vs_nft                  # 4 s per measurement, 1 round
//! PV_SECS=8 PV_ROUNDS=3 PV_RULES=10000 sudo cargo bench --bench packet_vs_nft
//! PV_FLOWGATE=path/to/flowgate sudo cargo bench --bench packet_vs_nft   # another build
//! PV_BLAST=target/release/flowgate-udpblast sudo cargo bench --bench packet_vs_nft
//! ```
//!
//! Needs root, iperf3 and nft. Prints every measurement, each case's median, the ratios
//! flowgate / kernel-1-rule, flowgate / nft-linear-10k, flowgate / nft-set-10k, and one
//! JSON line (`{"bench":"packet_vs_nft",…}`) with every case's medians for loadtest/run.
//! Not a test: the figures depend on the machine and on what else runs on it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::bump::{self, Bump};
use support::netns::Netns;
use support::process::Flowgate;
use support::topology::{self, CLIENT, SERVER, Topology};

/// iperf3's port: the TCP control connection and the data (TCP or UDP) all use it.
const PORT: u16 = 5201;
const TUN: &str = "fgbench0";
const START: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    Nft(NftSet),
    Flowgate { frontend: Frontend, policies: usize },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum NftSet {
    One,
    Linear,
    Set,
    LinearStateless,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Frontend {
    Tun,
    AfPacket,
}

/// A generated filler address: 198.19.0.0/16, never the client's or the server's.
fn filler(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn filler_port(i: usize) -> u16 {
    10_000 + (i % 50_000) as u16
}

/// The nftables rule set for `set` with `rules` rules in all.
fn nft_ruleset(set: NftSet, rules: usize) -> String {
    let mut s = String::from("table inet fg {\n");
    let real = format!(
        "ip saddr {CLIENT} ip daddr {SERVER} meta l4proto {{ tcp, udp }} th dport {PORT} accept"
    );
    let fillers = rules.saturating_sub(1);
    if set == NftSet::Set {
        s.push_str(
                "  set allowed {\n    type ipv4_addr . ipv4_addr . inet_proto . inet_service\n    elements = {\n",
            );
        for i in 0..fillers {
            let _ =
                writeln!(s, "      {} . {} . tcp . {},", filler(i), filler(i + 1), filler_port(i));
        }
        let _ = writeln!(s, "      {CLIENT} . {SERVER} . tcp . {PORT},");
        let _ = writeln!(s, "      {CLIENT} . {SERVER} . udp . {PORT}");
        s.push_str("    }\n  }\n");
    }
    s.push_str("  chain forward {\n    type filter hook forward priority 0; policy drop;\n");
    if set != NftSet::LinearStateless {
        s.push_str("    ct state established,related accept\n");
    }
    match set {
        NftSet::One => {
            let _ = writeln!(s, "    {real}");
        }
        NftSet::Linear | NftSet::LinearStateless => {
            for i in 0..fillers {
                let _ = writeln!(
                    s,
                    "    ip saddr {} ip daddr {} tcp dport {} accept",
                    filler(i),
                    filler(i + 1),
                    filler_port(i)
                );
            }
            let _ = writeln!(s, "    {real}");
            if set == NftSet::LinearStateless {
                // Without conntrack the replies need their own rule, also last.
                let _ = writeln!(
                    s,
                    "    ip saddr {SERVER} ip daddr {CLIENT} meta l4proto {{ tcp, udp }} th sport {PORT} accept"
                );
            }
        }
        NftSet::Set => {
            s.push_str("    ip saddr . ip daddr . meta l4proto . th dport @allowed accept\n");
        }
    }
    s.push_str("  }\n}\n");
    s
}

/// The inventory and policies flowgate gets: `client`, `server`, and for `policies > 1`
/// `policies - 1` filler workloads, each isolated by a policy of its own that lets the
/// next filler in on one port; the real policy is last.
fn flowgate_policy(client: Ipv4Addr, server: Ipv4Addr, policies: usize) -> (String, String) {
    let mut inv = String::from("namespaces:\n  - name: bench\nworkloads:\n");
    let _ = writeln!(
        inv,
        "  - {{name: client, namespace: bench, labels: {{app: client}}, ips: [{client}]}}"
    );
    let _ = writeln!(
        inv,
        "  - {{name: server, namespace: bench, labels: {{app: server}}, ips: [{server}]}}"
    );
    let fillers = policies.saturating_sub(1);
    // Fillers w0..=w{fillers}: policy i lets w{i+1} into w{i}.
    for i in (0..=fillers).filter(|_| fillers > 0) {
        let _ = writeln!(
            inv,
            "  - {{name: w{i}, namespace: bench, labels: {{app: w{i}}}, ips: [{}]}}",
            filler(i)
        );
    }
    let mut pol = String::new();
    for i in 0..fillers {
        let _ = write!(
            pol,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: w{i}, namespace: bench}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: w{i}}}}}\n  policyTypes: [Ingress]\n\
             \x20 ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: w{}}}}}}}]\n\
             \x20     ports: [{{port: {}}}]\n---\n",
            i + 1,
            filler_port(i)
        );
    }
    // One policy for both ends: the client may send to the server on 5201 (TCP and UDP),
    // the server take it.
    let _ = write!(
        pol,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: iperf, namespace: bench}}\n\
         spec:\n  podSelector: {{}}\n  policyTypes: [Ingress, Egress]\n\
         \x20 ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n\
         \x20     ports: [{{port: {PORT}, protocol: TCP}}, {{port: {PORT}, protocol: UDP}}]\n\
         \x20 egress:\n    - to: [{{podSelector: {{matchLabels: {{app: server}}}}}}]\n\
         \x20     ports: [{{port: {PORT}, protocol: TCP}}, {{port: {PORT}, protocol: UDP}}]\n"
    );
    (inv, pol)
}

/// Writes flowgate's config for `frontend` into `dir`.
fn write_config(dir: &Path, frontend: Frontend, inv: &str, pol: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("inventory.yaml"), inv).unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/bench.yaml"), pol).unwrap();
    let fe = match frontend {
        Frontend::Tun => format!("frontend = \"tun\"\n[packet.tun]\ndevice = \"{TUN}\"\n"),
        Frontend::AfPacket => format!(
            "frontend = \"afpacket\"\n[packet.afpacket]\ninside = \"{}\"\noutside = \"{}\"\n",
            bump::INSIDE,
            bump::OUTSIDE
        ),
    };
    let config = dir.join("flowgate.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\
             [flowlog]\noutput = \"flow.log\"\n\
             [admin]\nbind = \"127.0.0.1:0\"\n\
             [control]\nwatch = false\n\
             [packet]\nworkers = 2\nburst = 64\n{fe}"
        ),
    )
    .unwrap();
    config
}

/// The flowgate binary: `PV_FLOWGATE` if set (another build's), else the one cargo built
/// with this bench.
fn flowgate_bin() -> String {
    std::env::var("PV_FLOWGATE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_flowgate").to_string())
}

/// Whether the built flowgate takes a `[packet]` config of `frontend`: `None` if so,
/// else why not.
fn packet_mode_missing(frontend: Frontend) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let (inv, pol) = flowgate_policy(CLIENT, SERVER, 1);
    let config = write_config(dir.path(), frontend, &inv, &pol);
    let out = Command::new("timeout")
        .args(["30", &flowgate_bin(), "check", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("flowgate check runs");
    if out.status.success() {
        return None;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("unknown field"));
    let line = line.or_else(|| err.lines().find(|l| !l.trim().is_empty()));
    Some(line.unwrap_or("check failed").trim().to_string())
}

/// `flowgate run` in `ns`.
fn flowgate_in(ns: &Netns, config: &Path) -> Flowgate {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, &flowgate_bin(), "run", "--config"]).arg(config);
    Flowgate::spawn(cmd)
}

/// One measurement: (UDP received pps, TCP bits/s).
type Figures = (f64, f64);

fn measure(client: &Netns, server: &Netns, server_addr: Ipv4Addr, secs: u32) -> Figures {
    let pps = match blaster() {
        Some(bin) => udp_blast(&bin, client, server, server_addr, secs),
        None => topology::udp_pps_between(client, server, server_addr, 64, secs).1,
    };
    let bps = topology::iperf3_between(client, server, server_addr, secs);
    (pps, bps)
}

/// The UDP driver, `PV_BLAST`, when it names a file.
fn blaster() -> Option<String> {
    std::env::var("PV_BLAST").ok().filter(|p| Path::new(p).is_file())
}

fn udp_threads() -> usize {
    std::env::var("PV_UDP_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2).clamp(1, 16)
}

/// 64-byte datagrams from `client` to `server_addr` for `secs` through `flowgate-udpblast`:
/// the packets per second the server's sockets received (first datagram to last).
fn udp_blast(bin: &str, client: &Netns, server: &Netns, server_addr: Ipv4Addr, secs: u32) -> f64 {
    let threads = udp_threads().to_string();
    let mut recv = Command::new("ip")
        .args(["netns", "exec", &server.name, bin, "recv", "--threads", &threads, "--bind"])
        .arg(format!("{server_addr}:{PORT}"))
        .args(["--secs", &(secs + 10).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("flowgate-udpblast recv starts");
    let stdout = recv.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(10));
    if ready.as_deref() != Ok("ready") {
        let _ = recv.kill();
        let _ = recv.wait();
        panic!("flowgate-udpblast recv did not start: {ready:?}");
    }
    let send = topology::output_in(
        client,
        &format!(
            "timeout {} {bin} send --to {server_addr}:{PORT} --threads {threads} --secs {secs} --size 64",
            secs + 10
        ),
    );
    // The receiver ends 1 s after the last datagram (or at its own --secs).
    let result = rx.recv_timeout(Duration::from_secs(u64::from(secs) + 15));
    let _ = recv.kill();
    let _ = recv.wait();
    let _ = reader.join();
    let sent = String::from_utf8_lossy(&send.stdout);
    assert!(
        send.status.success(),
        "flowgate-udpblast send: {} {}",
        send.status,
        String::from_utf8_lossy(&send.stderr)
    );
    let v: serde_json::Value = result
        .ok()
        .and_then(|l| serde_json::from_str(&l).ok())
        .unwrap_or_else(|| panic!("flowgate-udpblast recv printed no result (sent: {sent})"));
    let pps = v["pps"].as_f64().unwrap_or(0.0);
    assert!(pps > 0.0, "no datagram reached the server ({v}; sent: {})", sent.trim());
    pps
}

fn run_nft(set: NftSet, rules: usize, secs: u32) -> Figures {
    let topo = Topology::kernel();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), nft_ruleset(set, rules)).unwrap();
    let out = topology::output_in(&topo.gateway, &format!("nft -f {}", file.path().display()));
    assert!(out.status.success(), "nft -f: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(topology::ping(&topo.client, SERVER, 1), 0, "ICMP is not in the rule set");
    measure(&topo.client, &topo.server, SERVER, secs)
}

fn run_flowgate(frontend: Frontend, policies: usize, secs: u32) -> Result<Figures, String> {
    let dir = tempfile::tempdir().unwrap();
    match frontend {
        Frontend::Tun => {
            let topo = Topology::kernel();
            let (inv, pol) = flowgate_policy(CLIENT, SERVER, policies);
            let config = write_config(dir.path(), frontend, &inv, &pol);
            let mut fg = flowgate_in(&topo.gateway, &config);
            guard(|| fg.wait_stderr("flowgate: packet filter", START))?;
            topo.route_through(TUN);
            guard(|| fg.wait_ready())?;
            guard(|| measure(&topo.client, &topo.server, SERVER, secs))
        }
        Frontend::AfPacket => {
            let b = Bump::new();
            let (inv, pol) = flowgate_policy(bump::CLIENT, bump::SERVER, policies);
            let config = write_config(dir.path(), frontend, &inv, &pol);
            let mut fg = flowgate_in(&b.bump, &config);
            guard(|| fg.wait_ready())?;
            guard(|| measure(&b.client, &b.server, bump::SERVER, secs))
        }
    }
}

/// Runs `f`, turning a panic (flowgate died, a measurement failed) into its message.
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".to_string());
        msg.lines().next().unwrap_or_default().chars().take(200).collect()
    })
}

fn name(case: Case, rules: usize) -> String {
    match case {
        Case::Nft(NftSet::One) => "nft, 1 rule".to_string(),
        Case::Nft(NftSet::Linear) => format!("nft, {rules} rules, linear"),
        Case::Nft(NftSet::Set) => format!("nft, {rules} rules, set"),
        Case::Nft(NftSet::LinearStateless) => format!("nft, {rules} linear, no ct"),
        Case::Flowgate { frontend, policies } => {
            let fe = match frontend {
                Frontend::Tun => "tun",
                Frontend::AfPacket => "afpacket",
            };
            format!("flowgate {fe}, {policies} pol.")
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0
        || !support::require::on_path("iperf3")
        || !support::require::on_path("nft")
    {
        eprintln!("packet_vs_nft: needs root, iperf3 and nft (scripts/setup.sh); skipping");
        return;
    }
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let secs = env("PV_SECS", 4).clamp(1, 60) as u32;
    let rounds = env("PV_ROUNDS", 1).clamp(1, 10);
    let rules = env("PV_RULES", 10_000).clamp(2, 100_000);
    // A panic in a flowgate case is caught and reported; keep its message off the table.
    std::panic::set_hook(Box::new(|_| {}));

    let mut cases = vec![
        Case::Nft(NftSet::One),
        Case::Nft(NftSet::Linear),
        Case::Nft(NftSet::Set),
        Case::Nft(NftSet::LinearStateless),
    ];
    let mut missing = Vec::new();
    for fe in [Frontend::Tun, Frontend::AfPacket] {
        match packet_mode_missing(fe) {
            None => {
                cases.push(Case::Flowgate { frontend: fe, policies: 1 });
                cases.push(Case::Flowgate { frontend: fe, policies: rules });
            }
            Some(why) => missing.push((fe, why)),
        }
    }
    for (fe, why) in &missing {
        println!("flowgate {fe:?}: n/a ({why})");
    }
    // Rounds interleave the cases so a neighbour's load lands on all alike.
    let mut res: Vec<Vec<Figures>> = vec![Vec::new(); cases.len()];
    let mut failed: Vec<Option<String>> = vec![None; cases.len()];
    for round in 1..=rounds {
        for (i, case) in cases.iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            let r = match *case {
                Case::Nft(set) => guard(|| run_nft(set, rules, secs)),
                Case::Flowgate { frontend, policies } => run_flowgate(frontend, policies, secs),
            };
            match r {
                Ok((pps, bps)) => {
                    println!(
                        "round {round}: {:<30} UDP {:>9.0} pps   TCP {:>6.2} Gbit/s",
                        name(*case, rules),
                        pps,
                        bps / 1e9
                    );
                    res[i].push((pps, bps));
                }
                Err(why) => {
                    println!("round {round}: {:<30} n/a ({why})", name(*case, rules));
                    failed[i] = Some(why);
                }
            }
        }
    }
    let median = |mut v: Vec<f64>| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    };
    let med: Vec<Option<Figures>> = res
        .iter()
        .map(|r| {
            Some((
                median(r.iter().map(|x| x.0).collect())?,
                median(r.iter().map(|x| x.1).collect())?,
            ))
        })
        .collect();
    let at = |c: Case| cases.iter().position(|x| *x == c).and_then(|i| med[i]);
    let (one, linear, set) =
        (at(Case::Nft(NftSet::One)), at(Case::Nft(NftSet::Linear)), at(Case::Nft(NftSet::Set)));
    let udp = match blaster() {
        Some(_) => format!("flowgate-udpblast, {} senders", udp_threads()),
        None => "iperf3 -u -l 64 -b 0, one sender".to_string(),
    };
    println!(
        "\nmedian of {rounds} (iperf3 -t {secs}, one stream; UDP 64 B by {udp}, received at the server):"
    );
    println!(
        "  {:<30} {:>11} {:>9}   {:>15} {:>15} {:>15}",
        "case", "UDP pps", "TCP Gb/s", "/ nft-1 u,t", "/ linear u,t", "/ set u,t"
    );
    let ratio = |a: Option<Figures>, b: Option<Figures>| match (a, b) {
        (Some(a), Some(b)) => format!("{:>6.2} {:>6.2}", a.0 / b.0, a.1 / b.1),
        _ => format!("{:>13}", "n/a"),
    };
    for (case, m) in cases.iter().zip(&med) {
        let figs = match m {
            Some((pps, bps)) => format!("{pps:>11.0} {:>9.2}", bps / 1e9),
            None => format!("{:>11} {:>9}", "n/a", "n/a"),
        };
        let ratios = match case {
            Case::Flowgate { .. } => {
                format!("   {}   {}   {}", ratio(*m, one), ratio(*m, linear), ratio(*m, set))
            }
            _ => String::new(),
        };
        println!("  {:<30} {figs}{ratios}", name(*case, rules));
    }
    for (fe, why) in &missing {
        println!("  flowgate {fe:?}: n/a — {why}");
    }
    // For loadtest/run: every case's medians (null where it did not run) and why not.
    let mut json = serde_json::Map::new();
    for ((case, m), why) in cases.iter().zip(&med).zip(&failed) {
        let v = match m {
            Some((pps, bps)) => serde_json::json!({ "udp_pps": pps, "tcp_gbps": bps / 1e9 }),
            None => serde_json::json!({ "error": why.clone().unwrap_or_default() }),
        };
        json.insert(name(*case, rules), v);
    }
    for (frontend, why) in &missing {
        for policies in [1, rules] {
            let case = Case::Flowgate { frontend: *frontend, policies };
            json.insert(name(case, rules), serde_json::json!({ "error": why }));
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "packet_vs_nft",
            "rules": rules,
            "secs": secs,
            "rounds": rounds,
            "udp_driver": udp,
            "cases": json,
        })
    );
}
