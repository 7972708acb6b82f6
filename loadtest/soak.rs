//! Soak (issue 22): a real `flowgate run` for a long time under mixed allowed and denied
//! TCP, UDP and CONNECT traffic with periodic reloads (SIGHUP, every other one after an
//! unrelated policy file changed). Every 10 s it samples RSS, open fds, conntrack entries
//! and the latency of allowed TCP exchanges (p50, p99) into a CSV. It fails (exit 1) on:
//! - any error in allowed traffic (a refused, reset, wrong or late echo; a CONNECT not
//!   answered 200);
//! - growth that does not level off: RSS, fds or conntrack entries in the last third of
//!   the run above the middle third's peak by more than 10 % plus a small slack;
//! - a lost log line: for the TCP and CONNECT listeners, the denials sent must all be in
//!   the flow log (folded lines' `count`s) or in flowgate_flowlog_dropped_total.
//!
//! ```text
//! cargo bench --bench soak                              # 30 minutes
//! cargo bench --bench soak -- --secs 120 --csv soak.csv # CI
//! cargo bench --profile dev --bench soak -- --secs 120  # reuse the test build
//! ```
//! Denied UDP is sent too (a datagram per 50 ms) and its lines reported, not balanced: a
//! denied UDP session's datagrams fold by session, not one line each.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

const CLIENT: &str = "127.0.72.1";
const BAD: &str = "127.0.72.9";
const WEB: &str = "127.0.72.2";

const POLICY: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: t}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: web}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-ingress, namespace: t}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
";

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

/// What the traffic tasks count.
#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    errors: AtomicU64,
    denied_tcp: AtomicU64,
    denied_connect: AtomicU64,
    denied_udp: AtomicU64,
    /// Allowed TCP exchange latencies (µs) since the last sample.
    lat: Mutex<Vec<u64>>,
}

impl Stats {
    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        if self.errors.fetch_add(1, Ordering::Relaxed) < 20 {
            eprintln!("soak: allowed {what} failed: {e}");
        }
    }
}

async fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{src}:0").parse().unwrap())?;
    s.connect(to).await
}

const T: Duration = Duration::from_secs(5);

async fn tcp_exchange(gw: SocketAddr) -> std::io::Result<()> {
    let mut s = connect_from(CLIENT, gw).await?;
    s.write_all(b"soak-ping").await?;
    let mut b = [0u8; 9];
    tokio::time::timeout(T, s.read_exact(&mut b)).await??;
    if &b != b"soak-ping" {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(())
}

/// A CONNECT from `src` to `target`: the status code, and the stream when 200.
async fn connect(proxy: SocketAddr, src: &str, target: &str) -> std::io::Result<(u16, TcpStream)> {
    let mut s = connect_from(src, proxy).await?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        if tokio::time::timeout(T, s.read(&mut b)).await?? == 0 {
            break;
        }
        head.push(b[0]);
    }
    let code =
        String::from_utf8_lossy(&head).split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, s))
}

async fn allowed_connect(proxy: SocketAddr, target: &str) -> std::io::Result<()> {
    let (code, mut s) = connect(proxy, CLIENT, target).await?;
    if code != 200 {
        return Err(std::io::Error::other(format!("CONNECT answered {code}")));
    }
    s.write_all(b"soak-ping").await?;
    let mut b = [0u8; 9];
    tokio::time::timeout(T, s.read_exact(&mut b)).await??;
    Ok(())
}

async fn udp_exchange(sock: &UdpSocket, to: SocketAddr, seq: u64) -> std::io::Result<()> {
    let msg = seq.to_be_bytes();
    sock.send_to(&msg, to).await?;
    let mut b = [0u8; 64];
    loop {
        let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut b)).await??;
        // A late echo of an earlier datagram is skipped.
        if b[..n] == msg {
            return Ok(());
        }
    }
}

fn admin_get(admin: SocketAddr, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(3)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(admin: SocketAddr, name: &str) -> f64 {
    admin_get(admin, "/metrics")
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// `Some(reason)` when the series' last third tops its middle third's peak by more than
/// 10 % + `slack`.
fn grows(name: &str, series: &[u64], slack: u64) -> Option<String> {
    let n = series.len();
    if n < 6 {
        return None;
    }
    let mid = series[n / 3..2 * n / 3].iter().max().copied().unwrap_or(0);
    let last = series[2 * n / 3..].iter().max().copied().unwrap_or(0);
    (last > mid + mid / 10 + slack)
        .then(|| format!("{name} keeps growing: middle-third peak {mid}, last-third peak {last}"))
}

struct Args {
    secs: u64,
    csv: PathBuf,
}

fn args() -> Args {
    let mut a = Args { secs: 1800, csv: PathBuf::from("soak.csv") };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--secs" => a.secs = it.next().and_then(|v| v.parse().ok()).expect("--secs N"),
            "--csv" => a.csv = PathBuf::from(it.next().expect("--csv PATH")),
            // `cargo bench` passes --bench; anything else is ignored too.
            _ => {}
        }
    }
    a
}

fn write_config(d: &Path, web_port: u16, udp_up: SocketAddr) {
    std::fs::write(
        d.join("inventory.yaml"),
        format!(
            "namespaces:\n  - name: t\nworkloads:\n\
             \x20 - {{name: client, namespace: t, labels: {{app: client}}, ips: [{CLIENT}]}}\n\
             \x20 - {{name: bad, namespace: t, labels: {{app: bad}}, ips: [{BAD}]}}\n\
             \x20 - {{name: web, namespace: t, labels: {{app: web}}, ips: [{WEB}]}}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(d.join("policies")).unwrap();
    std::fs::write(d.join("policies/allow.yaml"), POLICY).unwrap();
    std::fs::write(
        d.join("flowgate.toml"),
        format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\
             unknown = \"deny\"\n\n[flowlog]\noutput = \"flow.log\"\n\n\
             [admin]\nbind = \"127.0.0.1:0\"\n\n[control]\nwatch = false\n\n\
             [dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"500ms\"\n\
             [dns.static]\n\"web.soak\" = [\"{WEB}\"]\n\
             [ssrf]\ntreat_as_external = [\"{WEB}/32\"]\n\n\
             [[listener]]\nname = \"web\"\nkind = \"echo\"\nbind = \"{WEB}:{web_port}\"\n\n\
             [[listener]]\nname = \"gw\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
             upstreams = [\"{WEB}:{web_port}\"]\n\n\
             [[listener]]\nname = \"udp\"\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n\
             upstreams = [\"{udp_up}\"]\n\n\
             [[listener]]\nname = \"connect\"\nkind = \"http-connect\"\nbind = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
}

fn main() {
    let args = args();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // The UDP upstream: an echo.
    let udp_up = rt.block_on(async {
        let s = UdpSocket::bind(format!("{WEB}:0")).await.unwrap();
        let a = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut b = vec![0u8; 2048];
            loop {
                if let Ok((n, p)) = s.recv_from(&mut b).await {
                    let _ = s.send_to(&b[..n], p).await;
                }
            }
        });
        a
    });
    // The CONNECT target: an echo of our own (the proxy never dials the gateway's own
    // listeners, so flowgate's echo listener cannot be it).
    let tcp_up = rt.block_on(async {
        let l = tokio::net::TcpListener::bind(format!("{WEB}:0")).await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        a
    });
    let web_port = free_port(WEB);
    write_config(d, web_port, udp_up);
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
    let mut addrs = std::collections::HashMap::new();
    let mut admin = None;
    for l in BufReader::new(child.0.stderr.take().unwrap()).lines().map_while(Result::ok) {
        let last = l.rsplit(' ').next().unwrap_or_default();
        if let Some(rest) = l.strip_prefix("flowgate: listener ") {
            let name = rest.split(' ').next().unwrap_or_default().to_string();
            addrs.insert(name, last.parse::<SocketAddr>().unwrap());
        } else if l.contains("admin API on http://") {
            admin = last.strip_prefix("http://").and_then(|a| a.parse::<SocketAddr>().ok());
        }
        if l.contains("flowgate: ready") {
            break;
        }
    }
    let (gw, udp, proxy) = (addrs["gw"], addrs["udp"], addrs["connect"]);
    let admin = admin.expect("flowgate printed its admin address");
    let pid = child.0.id();
    let target = format!("web.soak:{}", tcp_up.port());

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Duration::from_millis(2);
    let _guard = rt.enter();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (st, stop) = (stats.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                match tcp_exchange(gw).await {
                    Ok(()) => {
                        st.ok.fetch_add(1, Ordering::Relaxed);
                        st.lat.lock().unwrap().push(t0.elapsed().as_micros() as u64);
                    }
                    Err(e) => st.error("tcp", &e),
                }
                tokio::time::sleep(pause).await;
            }
        }));
    }
    for _ in 0..2 {
        let (st, stop, target) = (stats.clone(), stop.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match allowed_connect(proxy, &target).await {
                    Ok(()) => st.ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        st.error("connect", &e);
                        0
                    }
                };
                tokio::time::sleep(pause).await;
            }
        }));
    }
    {
        let (st, stop) = (stats.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let sock = UdpSocket::bind(format!("{CLIENT}:0")).await.unwrap();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                match udp_exchange(&sock, udp, seq).await {
                    Ok(()) => st.ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        st.error("udp", &e);
                        0
                    }
                };
                tokio::time::sleep(pause).await;
            }
        }));
    }
    // Denied traffic: TCP (reset), CONNECT (403), UDP (dropped).
    {
        let (st, stop, target) = (stats.clone(), stop.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let usock = UdpSocket::bind(format!("{BAD}:0")).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = connect_from(BAD, gw).await {
                    let mut b = [0u8; 4];
                    let _ = tokio::time::timeout(T, s.read(&mut b)).await;
                }
                st.denied_tcp.fetch_add(1, Ordering::Relaxed);
                if let Ok((200, _)) = connect(proxy, BAD, &target).await {
                    st.error("denial", &"a denied CONNECT got 200");
                }
                st.denied_connect.fetch_add(1, Ordering::Relaxed);
                let _ = usock.send_to(b"denied", udp).await;
                st.denied_udp.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    let mut csv = std::fs::File::create(&args.csv).unwrap();
    writeln!(csv, "secs,rss_kib,fds,conntrack,p50_us,p99_us,ok,errors,generation").unwrap();
    let (mut rss, mut fds, mut ct) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    let mut next_reload = start + Duration::from_secs(5);
    let mut next_sample = start + Duration::from_secs(10);
    let mut reloads = 0u64;
    while start.elapsed() < Duration::from_secs(args.secs) {
        std::thread::sleep(Duration::from_millis(100));
        if child.0.try_wait().ok().flatten().is_some() {
            eprintln!("soak: FAIL: flowgate exited");
            std::process::exit(1);
        }
        let now = Instant::now();
        if now >= next_reload {
            reloads += 1;
            if reloads.is_multiple_of(2) {
                std::fs::write(
                    d.join("policies/unrelated.yaml"),
                    POLICY.replace("client-egress", &format!("unrelated-{reloads}")),
                )
                .unwrap();
            }
            // SAFETY: kill(2) on the pid of the child this program spawned.
            unsafe { libc::kill(pid as i32, libc::SIGHUP) };
            next_reload = now + Duration::from_secs(5);
        }
        if now >= next_sample {
            let mut lat = std::mem::take(&mut *stats.lat.lock().unwrap());
            lat.sort_unstable();
            let (r, f) = (rss_kib(pid), open_fds(pid));
            let c = metric(admin, "flowgate_conntrack_entries") as u64;
            let generation = metric(admin, "flowgate_policy_generation") as u64;
            let row = format!(
                "{},{r},{f},{c},{},{},{},{},{generation}",
                start.elapsed().as_secs(),
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                stats.ok.load(Ordering::Relaxed),
                stats.errors.load(Ordering::Relaxed),
            );
            println!("{row}");
            writeln!(csv, "{row}").unwrap();
            rss.push(r);
            fds.push(f);
            ct.push(c);
            next_sample = now + Duration::from_secs(10);
        }
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    });

    // Let the flow log's fold window close, then balance denials against lines + drops.
    std::thread::sleep(Duration::from_secs(3));
    let mut logged = std::collections::HashMap::<String, u64>::new();
    for l in std::fs::read_to_string(d.join("flow.log")).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            eprintln!("soak: FAIL: a flow-log line is not JSON: {l:?}");
            std::process::exit(1);
        };
        if v["event"] == "deny" {
            let key = v["listener"].as_str().unwrap_or_default().to_string();
            *logged.entry(key).or_default() += v["count"].as_u64().unwrap_or(1);
        }
    }
    let dropped = metric(admin, "flowgate_flowlog_dropped_total") as u64;
    let mut failures = Vec::new();
    let errors = stats.errors.load(Ordering::Relaxed);
    if errors > 0 {
        failures.push(format!("{errors} errors in allowed traffic"));
    }
    for (listener, sent) in [
        ("gw", stats.denied_tcp.load(Ordering::Relaxed)),
        ("connect", stats.denied_connect.load(Ordering::Relaxed)),
    ] {
        let got = logged.get(listener).copied().unwrap_or(0);
        println!("denials on {listener}: sent {sent}, logged {got}, dropped (all) {dropped}");
        if got + dropped < sent {
            failures
                .push(format!("{listener}: {sent} denials sent, {got} logged + {dropped} dropped"));
        }
    }
    println!(
        "denied udp: sent {}, logged {} (folded per session)",
        stats.denied_udp.load(Ordering::Relaxed),
        logged.get("udp").copied().unwrap_or(0)
    );
    failures.extend(grows("rss_kib", &rss, 8 * 1024));
    failures.extend(grows("fds", &fds, 16));
    failures.extend(grows("conntrack", &ct, 64));
    println!(
        "soak: {} s, {} allowed exchanges, {reloads} reloads, samples in {}",
        args.secs,
        stats.ok.load(Ordering::Relaxed),
        args.csv.display()
    );
    // One machine-readable line for `loadtest/run`.
    let max = |v: &[u64]| v.iter().max().copied().unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "bench": "soak",
            "secs": args.secs,
            "ok": stats.ok.load(Ordering::Relaxed),
            "errors": errors,
            "reloads": reloads,
            "samples": rss.len(),
            "rss_kib": {"first": rss.first(), "max": max(&rss), "last": rss.last()},
            "fds": {"first": fds.first(), "max": max(&fds), "last": fds.last()},
            "conntrack_max": max(&ct),
            "csv": args.csv.display().to_string(),
            "pass": failures.is_empty(),
            "failures": failures,
        })
    );
    if failures.is_empty() {
        println!("soak: PASS");
    } else {
        for f in &failures {
            eprintln!("soak: FAIL: {f}");
        }
        std::process::exit(1);
    }
}
