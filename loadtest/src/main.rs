//! flowgate vs HAProxy, end to end on loopback, in one run.
//!
//! Both proxies sit in front of the same upstreams with an equivalent rule: connections
//! from 127.0.0.5 (the load generator's address) to 127.0.0.6 (the upstreams) are allowed,
//! anything else is refused. flowgate decides with its compiled policy (two NetworkPolicies
//! over a three-workload inventory); HAProxy with `tcp-request connection accept if { src }`.
//!
//! Phases, each bounded by `--seconds` per target (default 8, at most 20), split into
//! `--rounds` (default 4) slices run in turn across the targets:
//! 1. bulk throughput: `iperf3 -c` through each proxy to one `iperf3 -s` (one stream);
//! 2. new connections per second: `--concurrency` (default 64) tasks, each looping
//!    connect → 64-byte request → 64-byte response → server closes → client closes;
//!    p50/p99/max of that whole exchange from an hdrhistogram.
//!
//! A direct run (no proxy) is measured too, as the ceiling. Ratios are flowgate / HAProxy:
//! throughput and conn/s want ≥ 1.0, p99 wants ≤ 1.0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLIENT_IP: &str = "127.0.0.5";
const DENIED_IP: &str = "127.0.0.7";
const UPSTREAM_IP: &str = "127.0.0.6";
const MSG: usize = 64;

struct Args {
    flowgate: PathBuf,
    haproxy: String,
    iperf3: String,
    seconds: u64,
    rounds: u64,
    /// flowgate processes sharing the listening ports (SO_REUSEPORT). Default 1.
    fg_procs: usize,
    /// flowgate's `run.worker_threads` (0 = one per CPU, its default).
    fg_workers: usize,
    concurrency: usize,
    /// Which phases: "all", "tput", "cps".
    only: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        flowgate: PathBuf::new(),
        haproxy: "haproxy".into(),
        iperf3: "iperf3".into(),
        seconds: 8,
        rounds: 4,
        fg_workers: 0,
        fg_procs: 1,
        concurrency: 64,
        only: "all".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--flowgate" => a.flowgate = v()?.into(),
            "--haproxy" => a.haproxy = v()?,
            "--iperf3" => a.iperf3 = v()?,
            "--seconds" => a.seconds = v()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--fg-procs" => a.fg_procs = v()?.parse().map_err(|e| format!("--fg-procs: {e}"))?,
            "--fg-workers" => {
                a.fg_workers = v()?.parse().map_err(|e| format!("--fg-workers: {e}"))?
            }
            "--rounds" => a.rounds = v()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--concurrency" => {
                a.concurrency = v()?.parse().map_err(|e| format!("--concurrency: {e}"))?
            }
            "--only" => a.only = v()?,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.flowgate.as_os_str().is_empty() {
        return Err("--flowgate PATH is required (run.sh passes it)".into());
    }
    a.seconds = a.seconds.clamp(1, 20);
    a.concurrency = a.concurrency.clamp(1, 1024);
    a.rounds = a.rounds.clamp(1, a.seconds);
    Ok(a)
}

/// A child process killed (by its own pid) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc { name, child })
    }

    fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(format!("{} exited early: {st}", self.name)),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

fn free_port(ip: &str) -> Result<u16, String> {
    let l = std::net::TcpListener::bind((ip, 0)).map_err(|e| format!("bind {ip}:0: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("literal loopback address"), port)
}

/// A TCP connection from `src` (port chosen at connect time, so the 4-tuple space is not
/// limited by bind-time port allocation).
async fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(&addr(src, 0).into())?;
    sock.set_nonblocking(true)?;
    let std: std::net::TcpStream = sock.into();
    let s = tokio::net::TcpSocket::from_std_stream(std);
    let s = s.connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Waits until `to` accepts a connection from the client address (bounded).
async fn wait_up(to: SocketAddr, who: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if connect_from(CLIENT_IP, to).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{who} not accepting on {to}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The request/response upstream: read 64 bytes, answer 64 bytes, close first (so the
/// TIME_WAIT state lands on the server side and the client's port space stays free).
async fn rr_server(l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; MSG];
            if s.read_exact(&mut buf).await.is_ok() {
                let _ = s.write_all(&[b'r'; MSG]).await;
            }
        });
    }
}

/// One request/response connection; `Ok(true)` when the full response came back.
async fn one_exchange(to: SocketAddr) -> std::io::Result<bool> {
    let mut s = connect_from(CLIENT_IP, to).await?;
    s.write_all(&[b'q'; MSG]).await?;
    let mut buf = [0u8; MSG * 2];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
        if got == buf.len() {
            break;
        }
    }
    Ok(got == MSG)
}

struct CpsResult {
    conns: u64,
    errors: u64,
    secs: f64,
    hist: Histogram<u64>,
}

impl CpsResult {
    fn merge(&mut self, other: CpsResult) {
        self.conns += other.conns;
        self.errors += other.errors;
        self.secs += other.secs;
        let _ = self.hist.add(&other.hist);
    }
    fn rate(&self) -> f64 {
        self.conns as f64 / self.secs
    }
    fn p(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

async fn cps(to: SocketAddr, concurrency: usize, secs: u64) -> CpsResult {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let stop = stop.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            // Microseconds, 1 µs .. 60 s, 3 significant digits.
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(5), one_exchange(to)).await;
                match r {
                    Ok(Ok(true)) => {
                        n += 1;
                        h.saturating_record(t0.elapsed().as_micros() as u64);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (n, h)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut conns = 0;
    for t in tasks {
        if let Ok((n, h)) = t.await {
            conns += n;
            let _ = hist.add(&h);
        }
    }
    CpsResult {
        conns,
        errors: errors.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
        hist,
    }
}

/// Bulk throughput in Gbit/s through `port` on 127.0.0.1 (or direct to the iperf3 server).
fn iperf(args: &Args, to: SocketAddr, secs: u64) -> Result<f64, String> {
    let out = Command::new(&args.iperf3)
        .args(["-c", &to.ip().to_string(), "-p", &to.port().to_string(), "-B", CLIENT_IP])
        .args(["-t", &secs.to_string(), "-J", "--connect-timeout", "5000"])
        .output()
        .map_err(|e| format!("iperf3: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!("iperf3 output is not JSON ({e}): {}", String::from_utf8_lossy(&out.stderr))
    })?;
    if let Some(err) = v.get("error") {
        return Err(format!("iperf3 via {to}: {err}"));
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|b| b / 1e9)
        .ok_or_else(|| format!("iperf3 via {to}: no end.sum_received in its report"))
}

const INVENTORY: &str = "namespaces:\n  - name: lt\nworkloads:\n  - name: client\n    namespace: lt\n    labels: {app: client}\n    ips: [127.0.0.5]\n  - name: other\n    namespace: lt\n    labels: {app: other}\n    ips: [127.0.0.7]\n  - name: upstream\n    namespace: lt\n    labels: {app: upstream}\n    ips: [127.0.0.6]\n";

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-egress, namespace: lt}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{podSelector: {matchLabels: {app: upstream}}}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: upstream-ingress, namespace: lt}\nspec:\n  podSelector: {matchLabels: {app: upstream}}\n  policyTypes: [Ingress]\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: client}}}]\n";

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn flowgate_config(
    dir: &Path,
    workers: usize,
    fg_iperf: u16,
    fg_rr: u16,
    iperf: u16,
    rr: u16,
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir.join("policies")).map_err(|e| e.to_string())?;
    write(&dir.join("inventory.yaml"), INVENTORY)?;
    write(&dir.join("policies/lt.yaml"), POLICY)?;
    let cfg = format!(
        "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\n\
         [flowlog]\noutput = \"flow.log\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n[run]\ndrain_timeout = \"1s\"\nworker_threads = {workers}\n\n\
         [[listener]]\nname = \"iperf\"\nkind = \"tcp\"\nbind = \"127.0.0.1:{fg_iperf}\"\n\
         upstreams = [\"{UPSTREAM_IP}:{iperf}\"]\nmax_connections = 8000\n\n\
         [[listener]]\nname = \"rr\"\nkind = \"tcp\"\nbind = \"127.0.0.1:{fg_rr}\"\n\
         upstreams = [\"{UPSTREAM_IP}:{rr}\"]\nmax_connections = 8000\n"
    );
    let p = dir.join("flowgate.toml");
    write(&p, &cfg)?;
    Ok(p)
}

fn haproxy_config(
    dir: &Path,
    ha_iperf: u16,
    ha_rr: u16,
    iperf: u16,
    rr: u16,
) -> Result<PathBuf, String> {
    let front = |name: &str, port: u16, up: u16| {
        format!(
            "frontend {name}\n  bind 127.0.0.1:{port}\n  tcp-request connection accept if {{ src {CLIENT_IP} }}\n  \
             tcp-request connection reject\n  default_backend {name}_be\n\n\
             backend {name}_be\n  server s1 {UPSTREAM_IP}:{up}\n\n"
        )
    };
    let cfg = format!(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  \
         timeout server 5m\n\n{}{}",
        front("iperf", ha_iperf, iperf),
        front("rr", ha_rr, rr)
    );
    let p = dir.join("haproxy.cfg");
    write(&p, &cfg)?;
    Ok(p)
}

/// CPU seconds (user + system) a process has used so far, from /proc (0 if unreadable).
/// On a shared machine this is the steadier measure: it does not depend on how much CPU
/// the scheduler happened to give the proxy, only on how much each connection costs.
fn cpu_secs(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_secs_of(p)).sum()
}

/// Context switches (voluntary and not) of every thread of `pids` so far, from /proc (0 if
/// unreadable). Each one is a sleep and a wake-up: on a VM a wake-up of an idle vCPU is an
/// interrupt and often a VM exit, paid by whoever sent the segment that woke it.
fn ctx_switches(pids: &[u32]) -> u64 {
    let mut n = 0;
    for &pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(t.path().join("status")) else { continue };
            n += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    n
}

/// Machine-wide (busy, all) jiffies so far, from the first line of /proc/stat. A closed
/// loop that leaves CPUs idle is waiting on something other than CPU.
fn machine_jiffies() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else { return (0, 0) };
    let Some(line) = text.lines().next() else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|w| w.parse().ok()).collect();
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (all.saturating_sub(idle), all)
}

fn cpu_secs_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// The order of the targets (0 direct, 1 haproxy, 2 flowgate) in round `round`: direct
/// first, then the proxies in an order that alternates from round to round.
fn slice_order(round: u64) -> [usize; 3] {
    if round.is_multiple_of(2) { [0, 1, 2] } else { [0, 2, 1] }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

async fn run(args: Args) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("flowgate-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (iperf_port, rr_port) = (free_port(UPSTREAM_IP)?, free_port(UPSTREAM_IP)?);
    let (fg_iperf, fg_rr, ha_iperf, ha_rr) = (
        free_port("127.0.0.1")?,
        free_port("127.0.0.1")?,
        free_port("127.0.0.1")?,
        free_port("127.0.0.1")?,
    );

    let rr = TcpListener::bind(addr(UPSTREAM_IP, rr_port)).await.map_err(|e| e.to_string())?;
    tokio::spawn(rr_server(rr));
    let mut iperf_srv = Proc::spawn(
        "iperf3 -s",
        Command::new(&args.iperf3).args(["-s", "-B", UPSTREAM_IP, "-p", &iperf_port.to_string()]),
        &dir.join("iperf3.log"),
    )?;
    let fg_cfg = flowgate_config(&dir, args.fg_workers, fg_iperf, fg_rr, iperf_port, rr_port)?;
    let mut fg = Proc::spawn(
        "flowgate",
        Command::new(&args.flowgate).arg("run").arg("--config").arg(&fg_cfg),
        &dir.join("flowgate.log"),
    )?;
    // Extra flowgate processes on the same ports (SO_REUSEPORT, flowgate's default): the
    // kernel spreads connections across them, one event loop each (`--fg-procs`).
    let mut fg_extra = Vec::new();
    for i in 1..args.fg_procs {
        fg_extra.push(Proc::spawn(
            "flowgate (extra)",
            Command::new(&args.flowgate).arg("run").arg("--config").arg(&fg_cfg),
            &dir.join(format!("flowgate-{i}.log")),
        )?);
    }
    let ha_cfg = haproxy_config(&dir, ha_iperf, ha_rr, iperf_port, rr_port)?;
    let mut ha = Proc::spawn(
        "haproxy",
        Command::new(&args.haproxy).arg("-db").arg("-f").arg(&ha_cfg),
        &dir.join("haproxy.log"),
    )?;
    wait_up(addr(UPSTREAM_IP, iperf_port), "iperf3 -s").await?;
    wait_up(addr("127.0.0.1", fg_rr), "flowgate").await?;
    wait_up(addr("127.0.0.1", ha_rr), "haproxy").await?;
    for p in [&mut iperf_srv, &mut fg, &mut ha] {
        p.check_alive()?;
    }

    // The rules really are equivalent: the client gets its answer through both, the other
    // address through neither.
    for (who, port) in [("flowgate", fg_rr), ("haproxy", ha_rr)] {
        let to = addr("127.0.0.1", port);
        if !matches!(one_exchange(to).await, Ok(true)) {
            return Err(format!("{who}: the allowed client got no response"));
        }
        let denied = async {
            let mut s = connect_from(DENIED_IP, to).await?;
            s.write_all(&[b'q'; MSG]).await?;
            let mut b = [0u8; MSG];
            s.read(&mut b).await
        };
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), denied).await
            && n > 0
        {
            return Err(format!("{who}: the denied client got an answer"));
        }
    }
    println!("# flowgate {} vs {}", args.flowgate.display(), haproxy_version(&args.haproxy));
    println!(
        "# {} s per target per phase in {} interleaved rounds, {} concurrent for conn/s; work dir {}",
        args.seconds,
        args.rounds,
        args.concurrency,
        dir.display()
    );

    // The machine is shared: load changes from second to second. Each target's time is
    // split into `rounds` slices run in turn, so a burst of outside load hits all three
    // alike instead of one phase. The two proxies swap places every other round (direct,
    // haproxy, flowgate, then direct, flowgate, haproxy): a slice inherits the previous
    // one's leftovers (TIME_WAIT sockets, the upstream's port reuse, cache and scheduler
    // state), and a fixed order would hand that cost to the same proxy every time.
    let rounds = args.rounds;
    let slice = (args.seconds / rounds).max(1);
    let mut tput = [f64::NAN; 3];
    let fg_pids: Vec<u32> =
        std::iter::once(fg.child.id()).chain(fg_extra.iter().map(|p| p.child.id())).collect();
    let pids = [Vec::new(), vec![ha.child.id()], fg_pids];
    let (mut tput_cpu, mut tput_bytes) = ([0.0f64; 3], [0.0f64; 3]);
    let mut cps_cpu = [0.0f64; 3];
    // The driver's own CPU per slice: the client and the upstream live in this process,
    // and on a saturated machine what a proxy makes *them* spend per connection (wake-ups,
    // segments to process) slows the closed loop as much as the proxy's own CPU.
    let mut cps_self_cpu = [0.0f64; 3];
    let (mut cps_ctx, mut cps_self_ctx) = ([0u64; 3], [0u64; 3]);
    let mut cps_busy = [(0u64, 0u64); 3];
    let me = [std::process::id()];
    if args.only == "all" || args.only == "tput" {
        let targets = [
            addr(UPSTREAM_IP, iperf_port),
            addr("127.0.0.1", ha_iperf),
            addr("127.0.0.1", fg_iperf),
        ];
        let mut sum = [0.0; 3];
        for round in 0..rounds {
            for i in slice_order(round) {
                let to = targets[i];
                let c0 = cpu_secs(&pids[i]);
                let gbps = iperf(&args, to, slice)?;
                sum[i] += gbps;
                tput_cpu[i] += cpu_secs(&pids[i]) - c0;
                tput_bytes[i] += gbps * 1e9 / 8.0 * slice as f64;
                // iperf3 -s takes a moment to be ready for the next test.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        for i in 0..3 {
            tput[i] = sum[i] / rounds as f64;
        }
        println!(
            "throughput Gbit/s: direct {:.2}  haproxy {:.2}  flowgate {:.2}",
            tput[0], tput[1], tput[2]
        );
        println!(
            "proxy CPU per GB moved: haproxy {:.3} s  flowgate {:.3} s",
            tput_cpu[1] / (tput_bytes[1] / 1e9),
            tput_cpu[2] / (tput_bytes[2] / 1e9)
        );
    }
    let mut res: Vec<CpsResult> = Vec::new();
    if args.only == "all" || args.only == "cps" {
        let targets = [
            ("direct", addr(UPSTREAM_IP, rr_port)),
            ("haproxy", addr("127.0.0.1", ha_rr)),
            ("flowgate", addr("127.0.0.1", fg_rr)),
        ];
        let mut slots: [Option<CpsResult>; 3] = [None, None, None];
        for round in 0..rounds {
            let mut rates = [0.0f64; 3];
            for i in slice_order(round) {
                let to = targets[i].1;
                let (c0, s0) = (cpu_secs(&pids[i]), cpu_secs(&me));
                let (x0, y0) = (ctx_switches(&pids[i]), ctx_switches(&me));
                let j0 = machine_jiffies();
                let r = cps(to, args.concurrency, slice).await;
                cps_cpu[i] += cpu_secs(&pids[i]) - c0;
                cps_self_cpu[i] += cpu_secs(&me) - s0;
                cps_ctx[i] += ctx_switches(&pids[i]).saturating_sub(x0);
                cps_self_ctx[i] += ctx_switches(&me).saturating_sub(y0);
                let j1 = machine_jiffies();
                cps_busy[i].0 += j1.0.saturating_sub(j0.0);
                cps_busy[i].1 += j1.1.saturating_sub(j0.1);
                rates[i] = r.rate();
                match &mut slots[i] {
                    Some(acc) => acc.merge(r),
                    empty => *empty = Some(r),
                }
                // Let the proxies' close work settle between slices.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let first = if round.is_multiple_of(2) { "haproxy" } else { "flowgate" };
            println!(
                "# round {round} ({first} first): conn/s haproxy {:.0}  flowgate {:.0}  ratio {:.3}",
                rates[1],
                rates[2],
                ratio(rates[2], rates[1])
            );
        }
        res.extend(slots.into_iter().flatten());
        for ((name, _), r) in targets.iter().zip(&res) {
            println!(
                "conn/s {name:>8}: {:>9.0}  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>8.3} ms  errors {}",
                r.rate(),
                r.p(0.50),
                r.p(0.99),
                r.hist.max() as f64 / 1000.0,
                r.errors
            );
        }
        if let [_, h, f] = &res[..] {
            println!(
                "proxy CPU per connection: haproxy {:.1} us  flowgate {:.1} us",
                cps_cpu[1] * 1e6 / h.conns.max(1) as f64,
                cps_cpu[2] * 1e6 / f.conns.max(1) as f64
            );
        }
        let per = |i: usize| cps_self_cpu[i] * 1e6 / res[i].conns.max(1) as f64;
        println!(
            "driver (client + upstream) CPU per connection: direct {:.1} us  haproxy {:.1} us  flowgate {:.1} us",
            per(0),
            per(1),
            per(2)
        );
        let ctx = |c: &[u64; 3], i: usize| c[i] as f64 / res[i].conns.max(1) as f64;
        println!(
            "context switches per connection: proxy haproxy {:.2}  flowgate {:.2}; driver direct {:.2}  haproxy {:.2}  flowgate {:.2}",
            ctx(&cps_ctx, 1),
            ctx(&cps_ctx, 2),
            ctx(&cps_self_ctx, 0),
            ctx(&cps_self_ctx, 1),
            ctx(&cps_self_ctx, 2)
        );
        let busy = |i: usize| 100.0 * cps_busy[i].0 as f64 / cps_busy[i].1.max(1) as f64;
        println!(
            "machine busy: direct {:.1} %  haproxy {:.1} %  flowgate {:.1} %",
            busy(0),
            busy(1),
            busy(2)
        );
    }
    for p in [&mut iperf_srv, &mut fg, &mut ha] {
        p.check_alive()?;
    }
    println!("ratios flowgate/haproxy (targets: throughput >= 1.0, conn/s >= 1.0, p99 <= 1.0):");
    if !tput[1].is_nan() {
        println!("  throughput {:.3}", ratio(tput[2], tput[1]));
        println!(
            "  CPU/GB     {:.3}",
            ratio(tput_cpu[2] / tput_bytes[2], tput_cpu[1] / tput_bytes[1])
        );
    }
    if let [_, h, f] = &res[..] {
        println!("  conn/s     {:.3}", ratio(f.rate(), h.rate()));
        println!("  p50        {:.3}", ratio(f.p(0.5), h.p(0.5)));
        println!("  p99        {:.3}", ratio(f.p(0.99), h.p(0.99)));
        println!(
            "  CPU/conn   {:.3}",
            ratio(cps_cpu[2] / f.conns.max(1) as f64, cps_cpu[1] / h.conns.max(1) as f64)
        );
    }
    // One machine-readable line for `loadtest/run` (NaN, a phase not run, becomes null).
    let num = |x: f64| if x.is_finite() { serde_json::json!(x) } else { serde_json::Value::Null };
    let mut line = serde_json::json!({
        "bench": "l4",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "haproxy": haproxy_version(&args.haproxy),
        "tput_gbps": {"direct": num(tput[0]), "haproxy": num(tput[1]), "flowgate": num(tput[2])},
    });
    if let [_, h, f] = &res[..] {
        line["cps"] = serde_json::json!({"haproxy": num(h.rate()), "flowgate": num(f.rate())});
        line["p50_ms"] = serde_json::json!({"haproxy": num(h.p(0.5)), "flowgate": num(f.p(0.5))});
        line["p99_ms"] = serde_json::json!({"haproxy": num(h.p(0.99)), "flowgate": num(f.p(0.99))});
        line["cpu_per_conn_us"] = serde_json::json!({
            "haproxy": num(cps_cpu[1] * 1e6 / h.conns.max(1) as f64),
            "flowgate": num(cps_cpu[2] * 1e6 / f.conns.max(1) as f64),
        });
        line["errors"] = serde_json::json!({"haproxy": h.errors, "flowgate": f.errors});
    }
    println!("{line}");
    drop((fg, fg_extra, ha, iperf_srv));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn haproxy_version(bin: &str) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "haproxy (version unknown)".into())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flowgate-loadtest: {e}");
            std::process::exit(2);
        }
    };
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("flowgate-loadtest: {e}");
        std::process::exit(1);
    }
}
