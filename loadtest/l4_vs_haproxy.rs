//! End-to-end L4 load test: flowgate's TCP listener against HAProxy in TCP mode, in one run,
//! on loopback, with an equivalent allow rule (clients 127.0.1.0/24 may reach the upstream).
//!
//! ```text
//! cargo bench --bench l4_vs_haproxy            # needs haproxy and iperf3 (scripts/setup.sh)
//! L4_SECS=5 L4_CONC=64 cargo bench --bench l4_vs_haproxy
//! L4_REVERSE=1 cargo bench --bench l4_vs_haproxy   # HAProxy measured first
//! ```
//!
//! Measures, for each gateway in turn (same upstream, same client, same machine):
//! - bulk throughput: `iperf3 -c` through the gateway for L4_SECS seconds;
//! - new connections per second and latency: L4_CONC concurrent clients, each looping
//!   connect → 64-byte request → 64-byte echo → close, for L4_SECS seconds; every
//!   iteration's latency goes into an hdrhistogram (p50, p99).
//!
//! Upstreams: `iperf3 -s` and flowgate's built-in echo listener, in their own processes.
//! Prints a table and the flowgate/HAProxy ratios. Not a test: run it by hand.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const IPERF_PORT: u16 = 25201;
const ECHO: &str = "127.0.0.20:25202";
const FG_BULK: &str = "127.0.0.1:25301";
const FG_RR: &str = "127.0.0.1:25302";
const HA_BULK: &str = "127.0.0.1:25401";
const HA_RR: &str = "127.0.0.1:25402";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without
    // it, and a load test has no business running inside the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("l4_vs_haproxy: not under `cargo bench`; skipped");
        return;
    }
    for bin in ["haproxy", "iperf3"] {
        if !have(bin) {
            eprintln!(
                "l4_vs_haproxy: skipped: `{bin}` not installed (run scripts/setup.sh as root)"
            );
            return;
        }
    }
    let secs = env_u64("L4_SECS", 5);
    let conc = env_u64("L4_CONC", 64) as usize;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("policies")).unwrap();
    std::fs::write(
        d.join("inventory.yaml"),
        "namespaces: [{name: lt}]\nworkloads:\n  - {name: clients, namespace: lt, labels: {app: c}, ips: [127.0.1.0/24]}\n  - {name: upstream, namespace: lt, labels: {app: u}, ips: [127.0.0.20]}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("policies/lt.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: c, namespace: lt}\nspec:\n  podSelector: {matchLabels: {app: c}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: u}}}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: u, namespace: lt}\nspec:\n  podSelector: {matchLabels: {app: u}}\n  policyTypes: [Ingress]\n  ingress: [{from: [{podSelector: {matchLabels: {app: c}}}]}]\n",
    )
    .unwrap();
    let threads = env_u64("L4_THREADS", 2);
    // The echo upstream is a separate flowgate process running only an echo listener.
    std::fs::write(
        d.join("echo.toml"),
        format!("[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\n[run]\nworker_threads = 1\n[[listener]]\nname = \"echo\"\nkind = \"echo\"\nbind = \"{ECHO}\"\nmax_connections = 100000\n"),
    )
    .unwrap();
    std::fs::write(
        d.join("gw.toml"),
        format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\n[flowlog]\noutput = \"flow.log\"\n[run]\nworker_threads = {threads}\n\
             [[listener]]\nname = \"bulk\"\nkind = \"tcp\"\nbind = \"{FG_BULK}\"\nupstreams = [\"127.0.0.20:{IPERF_PORT}\"]\nmax_connections = 100000\n\
             [[listener]]\nname = \"rr\"\nkind = \"tcp\"\nbind = \"{FG_RR}\"\nupstreams = [\"{ECHO}\"]\nmax_connections = 100000\n"
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("haproxy.cfg"),
        format!(
            "global\n  maxconn 8000\n  nbthread {threads}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n\
             frontend bulk\n  bind {HA_BULK}\n  tcp-request connection reject unless {{ src 127.0.1.0/24 }}\n  default_backend iperf\n\
             frontend rr\n  bind {HA_RR}\n  tcp-request connection reject unless {{ src 127.0.1.0/24 }}\n  default_backend echo\n\
             backend iperf\n  server s 127.0.0.20:{IPERF_PORT}\nbackend echo\n  server s {ECHO}\n"
        ),
    )
    .unwrap();

    let fg = env!("CARGO_BIN_EXE_flowgate");
    let _iperf = Proc(
        Command::new("iperf3")
            .args(["-s", "-B", "127.0.0.20", "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _echo = spawn_flowgate(fg, &d.join("echo.toml"));
    let _gw = spawn_flowgate(fg, &d.join("gw.toml"));
    let mut _ha = Proc(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(d.join("haproxy.cfg"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(800));
    if let Some(st) = _ha.0.try_wait().ok().flatten() {
        eprintln!("l4_vs_haproxy: haproxy exited at start-up: {st}");
        return;
    }

    println!(
        "l4_vs_haproxy: {secs}s per measurement, {conc} concurrent clients, {threads} threads each"
    );
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut rows = Vec::new();
    let mut order = [("flowgate", FG_BULK, FG_RR), ("haproxy", HA_BULK, HA_RR)];
    // L4_REVERSE=1 measures HAProxy first, to check that the order does not favour one.
    if std::env::var_os("L4_REVERSE").is_some() {
        order.reverse();
    }
    for (name, bulk, rr) in order {
        let gbps = iperf(bulk, secs);
        let (cps, p50, p99, errors) = rt.block_on(conn_rate(rr.parse().unwrap(), conc, secs));
        println!(
            "{name:>9}: bulk {gbps:6.2} Gbit/s | {cps:8.0} conn/s | p50 {p50:6} us | p99 {p99:6} us | errors {errors}"
        );
        rows.push((name, (gbps, cps, p50, p99)));
    }
    rows.sort_by_key(|r| r.0 != "flowgate");
    let (f, h) = (rows[0].1, rows[1].1);
    println!(
        "ratios flowgate/haproxy: bulk {:.2}x | conn/s {:.2}x | p99 {:.2}x (lower is better)",
        f.0 / h.0,
        f.1 / h.1,
        f.3 as f64 / h.3 as f64
    );
}

fn spawn_flowgate(bin: &str, cfg: &std::path::Path) -> Proc {
    let mut c = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = c.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if l.contains("ready") {
                let _ = tx.send(());
            }
            if l.contains("error") {
                eprintln!("{l}");
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("flowgate ready");
    Proc(c)
}

/// iperf3 through `via` from 127.0.1.1; received Gbit/s.
fn iperf(via: &str, secs: u64) -> f64 {
    let addr: SocketAddr = via.parse().unwrap();
    let out = Command::new("iperf3")
        .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-B", "127.0.1.1", "-t", &secs.to_string(), "-J"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9
}

/// `conc` clients loop connect → 64 B → 64 B back → close for `secs`; conn/s, p50, p99 (us).
async fn conn_rate(to: SocketAddr, conc: usize, secs: u64) -> (f64, u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..conc)
        .map(|i| {
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
                // Spread clients over source addresses so TIME_WAIT never runs out of ports.
                let mut n = i as u32;
                let req = [7u8; 64];
                let mut resp = [0u8; 64];
                while Instant::now() < deadline {
                    n = n.wrapping_add(conc as u32);
                    let src = SocketAddr::from(([127, 0, 1, 1 + (n % 250) as u8], 0));
                    let t0 = Instant::now();
                    let r = async {
                        let s = TcpSocket::new_v4()?;
                        s.bind(src)?;
                        let mut c = s.connect(to).await?;
                        c.set_nodelay(true)?;
                        c.write_all(&req).await?;
                        c.read_exact(&mut resp).await?;
                        Ok::<_, std::io::Error>(())
                    }
                    .await;
                    match r {
                        Ok(()) => {
                            let _ = h.record(t0.elapsed().as_micros() as u64);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                h
            })
        })
        .collect();
    let mut all = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    (
        all.len() as f64 / secs as f64,
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99),
        errors.load(Ordering::Relaxed),
    )
}
