//! End-to-end egress load test: flowgate's `http-connect` listener against Squid, in one
//! run, on loopback, with the same allowlist (CONNECT to 127.0.0.20/32 only).
//!
//! ```text
//! cargo bench --bench egress_vs_squid                 # needs squid (Debian package)
//! EG_SECS=5 EG_CONC=64 EG_MIB=512 cargo bench --bench egress_vs_squid
//! ```
//!
//! Measures, for each proxy in turn (same upstream, same client, same machine):
//! - CONNECT tunnels per second: EG_CONC concurrent clients, each looping connect →
//!   `CONNECT` → `200` → 64 bytes through the tunnel → 64 bytes echoed → close;
//! - bulk throughput through one tunnel: EG_MIB MiB sent and echoed back at once;
//! - memory per idle tunnel: EG_IDLE (default 1,000) tunnels opened through the proxy
//!   and left idle; the proxy process's RSS (`/proc/PID/status` VmRSS) after, minus
//!   before, divided by EG_IDLE. Then they are closed.
//!
//! `EG_REVERSE=1` measures Squid first, to show the order does not decide the ratio.
//!
//! The upstream is flowgate's built-in echo listener in a second flowgate process (the
//! proxy refuses to dial its own listeners), used by both proxies.
//! Prints the numbers and the flowgate/Squid ratios. Not a test: run it by hand.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ECHO: &str = "127.0.0.20:25602";
const FG: &str = "127.0.0.1:25601";
const SQUID: &str = "127.0.0.1:25611";

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

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if Command::new("squid").arg("-v").output().is_err() {
        eprintln!("egress_vs_squid: squid not installed (scripts/setup.sh); skipping");
        return;
    }
    let secs = env_u64("EG_SECS", 3);
    let conc = env_u64("EG_CONC", 64);
    let mib = env_u64("EG_MIB", 256);
    let idle = env_u64("EG_IDLE", 1000);
    let reverse = env_u64("EG_REVERSE", 0) != 0;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir(d.join("policies")).expect("mkdir");
    std::fs::write(
        d.join("inventory.yaml"),
        "namespaces:\n  - name: bench\nworkloads:\n  - name: client\n    namespace: bench\n    ips: [127.0.0.1]\n",
    )
    .expect("inventory");
    std::fs::write(
        d.join("policies/anp.yaml"),
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\n\
         metadata: {name: bench}\nspec:\n  priority: 1\n  subject:\n    namespaces:\n      \
         matchLabels: {kubernetes.io/metadata.name: bench}\n  egress:\n    - name: echo\n      \
         action: Allow\n      to:\n        - networks: [127.0.0.20/32]\n",
    )
    .expect("policy");
    std::fs::write(
        d.join("flowgate.toml"),
        format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\n\
             [flowlog]\noutput = \"flow.log\"\n[admin]\nbind = \"127.0.0.1:0\"\n[ssrf]\ntreat_as_external = [\"127.0.0.20/32\"]\n\
             [[listener]]\nname = \"egress\"\nkind = \"http-connect\"\nbind = \"{FG}\"\n"
        ),
    )
    .expect("config");
    // The upstream runs in a process of its own: the proxy never dials its own listeners.
    std::fs::write(
        d.join("echo.toml"),
        format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\n\
             [admin]\nbind = \"127.0.0.1:0\"\n\
             [[listener]]\nname = \"echo\"\nkind = \"echo\"\nbind = \"{ECHO}\"\n"
        ),
    )
    .expect("echo config");
    let squid_dir = d.join("squid");
    std::fs::create_dir(&squid_dir).expect("mkdir");
    // Squid drops privileges to `proxy`; it must be able to write its log and pid here.
    let _ = Command::new("chmod").arg("777").arg(&squid_dir).status();
    let sd = squid_dir.display();
    std::fs::write(
        squid_dir.join("squid.conf"),
        format!(
            "http_port {SQUID}\nacl dst_ok dst 127.0.0.20/32\nacl CONNECT method CONNECT\n\
             http_access allow CONNECT dst_ok\nhttp_access deny all\ncache deny all\n\
             access_log none\ncache_log {sd}/cache.log\npid_filename {sd}/squid.pid\n\
             coredump_dir {sd}\nworkers 1\nmax_filedescriptors 16384\n"
        ),
    )
    .expect("squid.conf");
    let exe = env!("CARGO_BIN_EXE_flowgate");
    let _echo = Proc(
        Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(d.join("echo.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("flowgate echo starts"),
    );
    let fg = Proc(
        Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(d.join("flowgate.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{exe}: {e} (cargo build --release first, or FLOWGATE_BIN)")
            }),
    );
    let squid = Proc(
        Command::new("squid")
            .arg("-N")
            .arg("-f")
            .arg(squid_dir.join("squid.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("squid starts"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        for p in [FG, SQUID] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while tunnel(p).await.is_err() {
                assert!(Instant::now() < deadline, "{p} does not tunnel to {ECHO}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut order = [("flowgate", FG, fg.0.id()), ("squid", SQUID, squid.0.id())];
        if reverse {
            order.reverse();
        }
        let mut rows = Vec::new();
        for (name, p, pid) in order {
            let cps = tunnels_per_sec(p, conc, secs).await;
            let mbps = bulk(p, mib).await;
            let per = idle_memory(p, pid, idle).await;
            println!(
                "{name:9} CONNECT tunnels/s ({conc} concurrent): {cps:10.0}   bulk: {mbps:8.1} MiB/s each way   idle tunnel: {per:8.0} bytes RSS each ({idle} open)"
            );
            rows.push((name, cps, mbps, per));
        }
        if reverse {
            rows.reverse();
        }
        println!(
            "ratio flowgate/squid: tunnels/s {:.2}x, bulk {:.2}x, memory per idle tunnel {:.2}x (lower is better){}",
            rows[0].1 / rows[1].1,
            rows[0].2 / rows[1].2,
            rows[0].3 / rows[1].3,
            if reverse { " [Squid measured first]" } else { "" }
        );
        // One machine-readable line for `loadtest/run`.
        let side = |r: &(&str, f64, f64, f64)| {
            serde_json::json!({"tunnels_per_s": r.1, "bulk_mib_s": r.2, "idle_tunnel_bytes": r.3})
        };
        println!(
            "{}",
            serde_json::json!({
                "bench": "egress_vs_squid", "secs": secs, "concurrency": conc, "mib": mib,
                "idle": idle, "squid_first": reverse,
                "flowgate": side(&rows[0]), "squid": side(&rows[1]),
            })
        );
    });
}

/// A tunnel to the echo upstream through `proxy`, past the `200`.
async fn tunnel(proxy: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("CONNECT {ECHO} HTTP/1.1\r\nHost: {ECHO}\r\n\r\n").as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 256];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).await?;
        if n == 0 || head.len() > 4096 {
            return Err(std::io::Error::other("no complete reply"));
        }
        head.extend_from_slice(&b[..n]);
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(std::io::Error::other(String::from_utf8_lossy(&head).into_owned()));
    }
    Ok(s)
}

async fn tunnels_per_sec(proxy: &'static str, conc: u64, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (done, failed) = (done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while Instant::now() < end {
                let ok = async {
                    let mut s = tunnel(proxy).await?;
                    s.write_all(&[7u8; 64]).await?;
                    s.read_exact(&mut buf).await?;
                    std::io::Result::Ok(())
                }
                .await;
                match ok {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        eprintln!("{proxy}: {f} failed tunnels");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn bulk(proxy: &str, mib: u64) -> f64 {
    let s = tunnel(proxy).await.expect("tunnel");
    let (mut r, mut w) = s.into_split();
    let total = mib * 1024 * 1024;
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            w.write_all(&chunk).await.expect("write");
            sent += chunk.len() as u64;
        }
        w
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < total {
        let n = r.read(&mut buf).await.expect("read");
        assert!(n > 0, "tunnel closed early");
        got += n as u64;
    }
    let _ = writer.await;
    mib as f64 / start.elapsed().as_secs_f64()
}

/// The resident set of process `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Opens `n` tunnels through `proxy` (one after another, each past its `200` and one echoed
/// byte, so both legs are up), lets them sit idle, and returns the growth of the proxy's
/// RSS per tunnel. Bounded: every tunnel within 10 s or the measurement is abandoned.
async fn idle_memory(proxy: &'static str, pid: u32, n: u64) -> f64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(pid);
    let mut open = Vec::with_capacity(n as usize);
    let mut b = [0u8; 1];
    for _ in 0..n {
        let t = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = tunnel(proxy).await?;
            s.write_all(b"x").await?;
            s.read_exact(&mut b).await?;
            std::io::Result::Ok(s)
        })
        .await;
        match t {
            Ok(Ok(s)) => open.push(s),
            _ => {
                eprintln!("{proxy}: idle tunnel {} failed", open.len());
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = rss(pid);
    let count = open.len().max(1) as f64;
    drop(open);
    tokio::time::sleep(Duration::from_millis(500)).await;
    after.saturating_sub(before) as f64 / count
}
