//! The long version of `tests/control_e2e.rs::reload_storm_keeps_allowed_connections`:
//! a real `flowgate run` (tcp listener → its own echo listener), STORM_CONC clients looping
//! connect → request → half-close → echo → EOF, first STORM_SECS seconds with a quiet
//! policy (the baseline), then STORM_SECS seconds while the policy is reloaded back to back
//! (the allow file replaced by rename, an unrelated file rewritten in place, SIGHUP; each
//! reload waited for in the audit trail). Same process, same client, same run.
//!
//! ```text
//! cargo bench --bench reload_storm
//! STORM_SECS=60 STORM_CONC=64 cargo bench --bench reload_storm
//! ```
//!
//! Prints connections/s and latency (p50, p99) for both phases and their ratio, the number
//! of reloads, and fails (exit 1) on any failed allowed connection or any deny or
//! revocation of the client in the flow log. Not a test: run it by hand.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const CLIENT: &str = "127.0.71.1";
const WEB: &str = "127.0.71.2";

fn allow_policy(note: &str) -> String {
    format!(
        "# {note}\n\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-egress, namespace: t}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
    - to: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-ingress, namespace: t}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Ingress]
  ingress:
    - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]
"
    )
}

fn unrelated_policy(port: u32) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: other-egress, namespace: t}}
spec:
  podSelector: {{matchLabels: {{app: other}}}}
  policyTypes: [Egress]
  egress:
    - to: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
      ports: [{{port: {port}}}]
"
    )
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind(format!("{ip}:0")).unwrap().local_addr().unwrap().port()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

async fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = TcpSocket::new_v4()?;
    {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own with a valid int option value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    s.bind(format!("{src}:0").parse().unwrap())?;
    s.connect(to).await
}

async fn exchange(gw: SocketAddr) -> std::io::Result<()> {
    let mut s = connect_from(CLIENT, gw).await?;
    let req = [b'r'; 64];
    s.write_all(&req).await?;
    s.shutdown().await?;
    let mut back = Vec::with_capacity(64);
    s.read_to_end(&mut back).await?;
    if back != req {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

struct Phase {
    ok: u64,
    failed: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
}

/// `conc` clients for `secs` seconds; every exchange's latency in one histogram.
async fn phase(gw: SocketAddr, conc: usize, secs: u64) -> Phase {
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let failed = failed.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            while Instant::now() < end {
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(10), exchange(gw)).await {
                    Ok(Ok(())) => {
                        // `record` grows the auto-resizing histogram; `saturating_record` would clamp.
                        let _ = h.record(t.elapsed().as_micros() as u64);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            h
        }));
    }
    let mut all = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    Phase {
        ok: all.len(),
        failed: failed.load(Ordering::Relaxed),
        secs: t0.elapsed().as_secs_f64(),
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
    }
}

fn main() {
    let secs = env_num("STORM_SECS", 20);
    let conc = env_num("STORM_CONC", 32) as usize;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("inventory.yaml"),
        format!(
            "namespaces:\n  - name: t\nworkloads:\n\
             \x20 - {{name: client, namespace: t, labels: {{app: client}}, ips: [{CLIENT}]}}\n\
             \x20 - {{name: web, namespace: t, labels: {{app: web}}, ips: [{WEB}]}}\n\
             \x20 - {{name: other, namespace: t, labels: {{app: other}}, ips: [127.0.71.3]}}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir(d.join("policies")).unwrap();
    let allow = d.join("policies/allow.yaml");
    let unrelated = d.join("policies/unrelated.yaml");
    std::fs::write(&allow, allow_policy("initial")).unwrap();
    std::fs::write(&unrelated, unrelated_policy(1)).unwrap();
    let web_port = free_port(WEB);
    let admin_port = free_port("127.0.0.1");
    std::fs::write(
        d.join("flowgate.toml"),
        format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\n\
             [flowlog]\noutput = \"flow.log\"\n\n\
             [admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken = \"storm\"\n\n\
             [control]\naudit_log = \"audit.log\"\ndebounce = \"10ms\"\n\n\
             [[listener]]\nname = \"web\"\nkind = \"echo\"\nbind = \"{WEB}:{web_port}\"\n\n\
             [[listener]]\nname = \"gw\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
             upstreams = [\"{WEB}:{web_port}\"]\nmax_connections = 100000\n"
        ),
    )
    .unwrap();
    let mut child = Proc(
        Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .arg("run")
            .arg("--config")
            .arg(d.join("flowgate.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut gw = None;
    for l in BufReader::new(child.0.stderr.take().unwrap()).lines().map_while(Result::ok) {
        if l.contains("listener gw ") {
            gw = l.rsplit(' ').next().and_then(|a| a.parse::<SocketAddr>().ok());
        }
        if l.contains("ready") {
            break;
        }
    }
    let gw = gw.expect("flowgate printed the gw listener");
    let pid = i32::try_from(child.0.id()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();

    let quiet = rt.block_on(phase(gw, conc, secs));

    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let stop = stop.clone();
        let audit = d.join("audit.log");
        std::thread::spawn(move || {
            let mut i: u64 = 0;
            while !stop.load(Ordering::Acquire) {
                let before = lines(&audit).len();
                match i % 3 {
                    0 => {
                        let tmp = allow.with_file_name(".allow.yaml.tmp");
                        std::fs::write(&tmp, allow_policy(&format!("rewrite {i}"))).unwrap();
                        std::fs::rename(&tmp, &allow).unwrap();
                    }
                    1 => std::fs::write(&unrelated, unrelated_policy(1000 + i as u32)).unwrap(),
                    // SAFETY: kill(2) on the pid of the child this program spawned.
                    _ => assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0),
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while lines(&audit).len() <= before {
                    assert!(Instant::now() < deadline, "reload {i} not in the audit trail");
                    std::thread::sleep(Duration::from_millis(2));
                }
                i += 1;
            }
            i
        })
    };
    let storm = rt.block_on(phase(gw, conc, secs));
    stop.store(true, Ordering::Release);
    let reloads = driver.join().unwrap();

    // SAFETY: kill(2) on the pid of the child this program spawned; SIGTERM flushes the log.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = child.0.wait();
    let bad = lines(&d.join("flow.log"))
        .into_iter()
        .filter(|l| {
            l.contains(&format!("\"src\":\"{CLIENT}:")) && !l.contains("\"event\":\"allow\"")
        })
        .count();
    let audit = lines(&d.join("audit.log"));
    let errors = audit.iter().filter(|l| l.contains("\"result\":\"error\"")).count();

    println!("reload storm: {conc} clients, {secs} s per phase");
    println!("phase   conn/s    p50 µs  p99 µs  failed");
    for (name, p) in [("quiet", &quiet), ("reloads", &storm)] {
        println!(
            "{name:<7} {:>8.0}  {:>6}  {:>6}  {}",
            p.ok as f64 / p.secs,
            p.p50_us,
            p.p99_us,
            p.failed
        );
    }
    println!(
        "reloads during the storm: {reloads} ({:.1}/s), {errors} rejected; conn/s ratio \
         reloads/quiet = {:.3}",
        reloads as f64 / storm.secs,
        (storm.ok as f64 / storm.secs) / (quiet.ok as f64 / quiet.secs)
    );
    println!("flow-log denials or revocations of the client: {bad}");
    // One machine-readable line for `loadtest/run`.
    let phase = |p: &Phase| {
        serde_json::json!({"cps": p.ok as f64 / p.secs, "p50_us": p.p50_us, "p99_us": p.p99_us,
            "failed": p.failed})
    };
    println!(
        "{}",
        serde_json::json!({
            "bench": "reload_storm", "secs": secs, "concurrency": conc, "reloads": reloads,
            "rejected": errors, "client_denials": bad,
            "quiet": phase(&quiet), "reloads_phase": phase(&storm),
        })
    );
    if quiet.failed + storm.failed > 0 || bad > 0 || errors > 0 {
        eprintln!("FAILED: allowed connections failed or were denied");
        std::process::exit(1);
    }
}
