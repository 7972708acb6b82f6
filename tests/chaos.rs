//! Chaos: faults injected on purpose while traffic flows through the real `flowgate`
//! binary, each with its expected outcome asserted (issue 22). Upstreams killed and
//! restarted, an upstream that never answers, the flow-log disk full, the policy directory
//! deleted, file descriptors exhausted, SIGHUP storms, SIGTERM mid-transfer, the DNS
//! server gone.
//!
//! Identities (as in tests/support/l4.rs): 127.0.0.10 `t/client-ok` may reach `t/web`
//! (127.0.0.20, where the upstreams listen); 127.0.0.11 `t/client-bad` is denied. Every
//! bind is on port 0 (an upstream restarted on the port it had is the one exception: the
//! gateway's config names it); every loop is bounded in count and time.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::egress::{caller_egress_policy, caller_inventory};
use support::l4::{BAD, INVENTORY, OK, POLICY, WEB};
use support::process::Flowgate;
use support::require::{Need, skip_unless};

/// A temp dir with the inventory, the policy and the config; `flowgate run` on it.
struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        World::with(INVENTORY, POLICY)
    }

    fn with(inventory: &str, policy: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("inventory.yaml"), inventory).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/t.yaml"), policy).unwrap();
        World { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Writes the config: policy, a flow log at `log` (dedupe off: one line per event),
    /// the admin API on port 0, no watcher (SIGHUP reloads), then `extra`.
    fn config(&self, log: &Path, extra: &str) -> PathBuf {
        let text = format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\nunknown = \"deny\"\n\n\
             [flowlog]\noutput = \"{}\"\ndedupe_window = \"0s\"\n\n\
             [admin]\nbind = \"127.0.0.1:0\"\n\n[control]\nwatch = false\n\n{extra}\n",
            log.display()
        );
        let p = self.path("flowgate.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn start(&self, extra: &str) -> Flowgate {
        let cfg = self.config(&self.path("flow.log"), extra);
        let mut fg = Flowgate::run(&cfg);
        fg.wait_ready();
        fg
    }

    /// Flow-log lines at `log`, each parsed (a half line fails the test).
    fn lines(log: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line {l:?}: {e}"))
            })
            .collect()
    }
}

fn tcp_listener(name: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
         upstreams = [\"{upstream}\"]\n{extra}\n"
    )
}

/// A TCP connection from `src` (the identity the policy sees), bounded connect.
fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&format!("{src}:0").parse::<SocketAddr>().unwrap().into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(3))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

/// One echo exchange through the gateway from `src`: `Ok` when the bytes come back.
fn echo_once(src: &str, to: SocketAddr) -> std::io::Result<()> {
    let mut s = connect_from(src, to)?;
    exchange(&mut s)
}

fn exchange(s: &mut TcpStream) -> std::io::Result<()> {
    let msg = b"chaos-ping";
    s.write_all(msg)?;
    let mut back = [0u8; 10];
    s.read_exact(&mut back)?;
    if &back == msg { Ok(()) } else { Err(std::io::Error::other("echo returned other bytes")) }
}

/// A denied client: the gateway resets it (or closes it) without data.
fn expect_refused(src: &str, to: SocketAddr) {
    let r = connect_from(src, to).and_then(|mut s| {
        let _ = s.write_all(b"x");
        let mut b = [0u8; 8];
        s.read(&mut b)
    });
    assert!(matches!(r, Err(_) | Ok(0)), "a denied client got data: {r:?}");
}

/// An echo upstream on `addr` (port 0: a new one), serving until `stop`; returns its
/// address and the handle that stops it (closing the listener and every connection).
struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(addr: SocketAddr) -> EchoServer {
        let l = TcpListener::bind(addr).unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        let st = st.clone();
                        conns.push(std::thread::spawn(move || serve_echo(s, &st)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            drop(l);
            for c in conns {
                let _ = c.join();
            }
        });
        EchoServer { addr, accepted, stop, thread: Some(thread) }
    }

    fn kill(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_echo(mut s: TcpStream, stop: &AtomicBool) {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 16384];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
    let _ = s.shutdown(Shutdown::Both);
}

/// `GET path` on the admin API: (status, body).
fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(3)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The sum of the samples of metric `name` (every label set).
fn metric(admin: SocketAddr, name: &str) -> f64 {
    let (st, body) = admin_get(admin, "/metrics");
    assert_eq!(st, 200);
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn policy_json(admin: SocketAddr) -> serde_json::Value {
    let (st, body) = admin_get(admin, "/policy");
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `f` until it holds (bounded).
fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The upstream is killed: connections during the outage fail fast (well inside the
/// connect timeout) and are counted as upstream failures; after the restart they succeed
/// again at once (a listener's only upstream is tried even while cooling down: trying
/// beats refusing; the cooldown with a second upstream is the next test).
#[test]
fn upstream_killed_and_restarted() {
    let w = World::new();
    let up = EchoServer::start(format!("{WEB}:0").parse().unwrap());
    let up_addr = up.addr;
    let mut fg = w.start(&tcp_listener(
        "gw",
        up_addr,
        "connect_timeout = \"3s\"\nupstream_cooldown = \"500ms\"",
    ));
    let (gw, admin) = (fg.listener("gw"), fg.admin());
    for _ in 0..5 {
        echo_once(OK, gw).unwrap();
    }
    up.kill();
    let failures_before = metric(admin, "flowgate_upstream_failures_total");
    for i in 0..5 {
        let t0 = Instant::now();
        let r = echo_once(OK, gw);
        assert!(r.is_err(), "outage attempt {i} reached a dead upstream");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "outage attempt {i} took {:?}",
            t0.elapsed()
        );
    }
    let failures = metric(admin, "flowgate_upstream_failures_total") - failures_before;
    assert!(failures >= 1.0, "the outage is counted in flowgate_upstream_failures_total");
    let _up = EchoServer::start(up_addr);
    let restarted = Instant::now();
    wait_until(Duration::from_secs(5), "traffic flows again after the restart", || {
        echo_once(OK, gw).is_ok()
    });
    println!("upstream back after {:?} (cooldown 500ms)", restarted.elapsed());
    for _ in 0..5 {
        echo_once(OK, gw).unwrap();
    }
    fg.assert_running();
}

/// Two upstreams, one killed: traffic moves to the other; once restarted, the killed one
/// gets no connection before its cooldown has passed, and gets its share after.
#[test]
fn restarted_upstream_waits_out_its_cooldown() {
    let w = World::new();
    let a = EchoServer::start(format!("{WEB}:0").parse().unwrap());
    let b = EchoServer::start(format!("{WEB}:0").parse().unwrap());
    let (a_addr, b_accepted) = (a.addr, b.accepted.clone());
    let cfg = format!(
        "[[listener]]\nname = \"gw\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
         upstreams = [\"{a_addr}\", \"{}\"]\nupstream_cooldown = \"2s\"\n",
        b.addr
    );
    let mut fg = w.start(&cfg);
    let gw = fg.listener("gw");
    for _ in 0..4 {
        echo_once(OK, gw).unwrap();
    }
    assert!(a.accepted.load(Ordering::Relaxed) >= 1, "round robin reached both");
    a.kill();
    let killed = Instant::now();
    let mut failed = 0;
    for _ in 0..6 {
        failed += usize::from(echo_once(OK, gw).is_err());
    }
    assert!(failed <= 1, "{failed} connections failed with one upstream of two down");
    let a = EchoServer::start(a_addr);
    let b_before = b_accepted.load(Ordering::Relaxed);
    for _ in 0..6 {
        echo_once(OK, gw).unwrap();
    }
    if killed.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            a.accepted.load(Ordering::Relaxed),
            0,
            "the restarted upstream was used inside its cooldown"
        );
        assert_eq!(b_accepted.load(Ordering::Relaxed) - b_before, 6);
    }
    std::thread::sleep(
        Duration::from_secs(2).saturating_sub(killed.elapsed()) + Duration::from_millis(300),
    );
    for _ in 0..6 {
        echo_once(OK, gw).unwrap();
    }
    assert!(
        a.accepted.load(Ordering::Relaxed) >= 2,
        "the restarted upstream is back in rotation after the cooldown"
    );
    fg.assert_running();
}

/// An upstream that accepts and never answers: the client is closed after idle_timeout,
/// and the gateway keeps serving other flows meanwhile.
#[test]
fn silent_upstream_is_cut_at_idle_timeout() {
    let w = World::new();
    let silent = TcpListener::bind(format!("{WEB}:0")).unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        // Accept and hold, never read or write, until the listener's test ends.
        let mut conns = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok((s, _)) = silent.accept() {
                conns.push(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let echo = EchoServer::start(format!("{WEB}:0").parse().unwrap());
    let cfg = tcp_listener("silent", silent_addr, "idle_timeout = \"600ms\"")
        + &tcp_listener("echo", echo.addr, "");
    let mut fg = w.start(&cfg);
    let (silent_gw, echo_gw) = (fg.listener("silent"), fg.listener("echo"));
    let mut victims: Vec<TcpStream> =
        (0..5).map(|_| connect_from(OK, silent_gw).unwrap()).collect();
    let t0 = Instant::now();
    for v in &mut victims {
        v.write_all(b"hello?").unwrap();
    }
    // Other flows are served while the silent ones hang.
    for _ in 0..20 {
        echo_once(OK, echo_gw).unwrap();
    }
    for (i, v) in victims.iter_mut().enumerate() {
        let mut b = [0u8; 16];
        let r = v.read(&mut b);
        let after = t0.elapsed();
        assert!(matches!(r, Ok(0) | Err(_)), "victim {i} got data: {r:?}");
        if let Err(e) = &r {
            assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "victim {i} not closed in 3 s");
        }
        assert!(after >= Duration::from_millis(500), "victim {i} closed early: {after:?}");
        assert!(after < Duration::from_secs(3), "victim {i} closed late: {after:?}");
    }
    echo_once(OK, echo_gw).unwrap();
    fg.assert_running();
    drop(fg);
    held.join().unwrap();
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "chaos-flowlog"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", at.display());
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` (writes until ENOSPC, bounded).
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = [0u8; 4096];
    for _ in 0..100_000 {
        if f.write_all(&chunk).and_then(|()| f.sync_all()).is_err() {
            return;
        }
    }
    panic!("{} never filled", path.display());
}

/// The flow log's disk is full: traffic keeps flowing, the gateway stays up, every line
/// it could not write is counted in flowgate_flowlog_dropped_total, no half line is left
/// in the file, and once space is freed new lines are written again.
#[test]
fn flowlog_disk_full_drops_are_counted_and_logging_resumes() {
    if skip_unless(&[Need::Root, Need::Bin("mount")]) {
        return;
    }
    let w = World::new();
    let fs = Tmpfs::mount(w.path("mnt"), "256k");
    let log = fs.0.join("flow.log");
    let up = EchoServer::start(format!("{WEB}:0").parse().unwrap());
    let cfg = w.config(&log, &tcp_listener("gw", up.addr, ""));
    let mut fg = Flowgate::run(&cfg);
    fg.wait_ready();
    let (gw, admin) = (fg.listener("gw"), fg.admin());
    fill(&fs.0.join("filler"));
    // 600 denials (~300 bytes a line: three times the writer's 64 KiB buffer).
    let full_phase = 600;
    for i in 0..full_phase {
        expect_refused(BAD, gw);
        if i % 100 == 0 {
            echo_once(OK, gw).unwrap_or_else(|e| panic!("allowed traffic with the log full: {e}"));
        }
    }
    wait_until(Duration::from_secs(5), "drops counted while the disk is full", || {
        metric(admin, "flowgate_flowlog_dropped_total") > 0.0
    });
    fg.assert_running();
    echo_once(OK, gw).unwrap();
    // Space freed: new denials (from an address of their own) reach the file.
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let later = 50;
    for _ in 0..later {
        expect_refused("127.0.0.12", gw);
    }
    wait_until(Duration::from_secs(5), "lines written again after space was freed", || {
        World::lines(&log)
            .iter()
            .any(|l| l["src"].as_str().is_some_and(|s| s.starts_with("127.0.0.12:")))
    });
    // Every denial is in the file or counted as dropped.
    let total = f64::from(full_phase + later);
    wait_until(Duration::from_secs(5), "written + dropped = denials sent", || {
        let written: u64 = World::lines(&log)
            .iter()
            .filter(|l| l["event"] == "deny")
            .map(|l| l["count"].as_u64().unwrap())
            .sum();
        let dropped = metric(admin, "flowgate_flowlog_dropped_total");
        #[allow(clippy::cast_precision_loss)]
        let sum = written as f64 + dropped;
        println!("written {written} + dropped {dropped} of {total}");
        (sum - total).abs() < 0.5
    });
    fg.assert_running();
}

/// The policy directory deleted: the reload fails and says so, the last good generation
/// keeps deciding (allowed stays allowed, denied stays denied), /readyz stays 200; once
/// restored, a reload succeeds.
#[test]
fn policy_dir_deleted_keeps_last_good_generation() {
    let w = World::new();
    let up = EchoServer::start(format!("{WEB}:0").parse().unwrap());
    let mut fg = w.start(&tcp_listener("gw", up.addr, ""));
    let (gw, admin) = (fg.listener("gw"), fg.admin());
    let before = policy_json(admin);
    assert!(before["last_error"].is_null(), "{before}");
    echo_once(OK, gw).unwrap();
    expect_refused(BAD, gw);

    std::fs::remove_dir_all(w.path("policies")).unwrap();
    fg.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(10), "the failed reload shows in /policy", || {
        !policy_json(admin)["last_error"].is_null()
    });
    let during = policy_json(admin);
    assert_eq!(during["generation"], before["generation"], "{during}");
    assert_eq!(during["hash"], before["hash"], "{during}");
    assert_eq!(admin_get(admin, "/readyz").0, 200);
    for _ in 0..5 {
        echo_once(OK, gw).unwrap_or_else(|e| panic!("allowed flow refused while deleted: {e}"));
        expect_refused(BAD, gw);
    }

    std::fs::create_dir(w.path("policies")).unwrap();
    std::fs::write(w.path("policies/t.yaml"), POLICY).unwrap();
    fg.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(10), "the reload after the restore succeeds", || {
        policy_json(admin)["last_error"].is_null()
    });
    let after = policy_json(admin);
    let result = after["last_reload"]["result"].as_str().unwrap_or_default().to_string();
    assert!(result == "ok" || result == "unchanged", "{after}");
    assert_eq!(after["hash"], before["hash"], "{after}");
    echo_once(OK, gw).unwrap();
    expect_refused(BAD, gw);
    fg.assert_running();
}

/// CPU ticks (user + system) the process used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split(' ').collect();
    // Fields 14 and 15 (utime, stime), counted from 3 after the comm.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count).unwrap_or(0)
}

/// The gateway runs with RLIMIT_NOFILE = 64: beyond it new connections are not served,
/// the ones already open keep working, the gateway does not spin or die, and once
/// connections close it serves new ones again.
#[test]
fn file_descriptors_exhausted() {
    let w = World::new();
    let up = EchoServer::start(format!("{WEB}:0").parse().unwrap());
    let cfg = w.config(&w.path("flow.log"), &tcp_listener("gw", up.addr, ""));
    let mut cmd = Flowgate::command(&cfg);
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 64, rlim_max: 64 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut fg = Flowgate::spawn(cmd);
    fg.wait_ready();
    let (gw, admin) = (fg.listener("gw"), fg.admin());
    // At the limit either accept() fails (EMFILE) or, with the client accepted, the
    // upstream socket cannot be opened: which one depends on timing, both are counted.
    let refusals = || {
        metric(admin, "flowgate_upstream_failures_total")
            + metric(admin, "flowgate_accept_errors_total")
    };
    let failures_before = refusals();
    let pid = fg.pid();
    println!("{} fds open at start", open_fds(pid));
    let mut held = Vec::new();
    let mut failed = 0;
    for _ in 0..60 {
        let mut s = match connect_from(OK, gw) {
            Ok(s) => s,
            Err(_) => {
                failed += 1;
                continue;
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        match exchange(&mut s) {
            Ok(()) => held.push(s),
            Err(_) => failed += 1,
        }
        if failed >= 3 {
            break;
        }
    }
    println!("{} connections held, {failed} refused; {} fds open", held.len(), open_fds(pid));
    assert!(failed >= 1, "the fd limit was never reached ({} held)", held.len());
    assert!(held.len() >= 5, "only {} connections before the limit", held.len());
    // Existing connections keep working at the limit.
    for (i, s) in held.iter_mut().enumerate() {
        exchange(s).unwrap_or_else(|e| panic!("held connection {i} broke at the limit: {e}"));
    }
    // No spinning at the limit: under a quarter of a core over 2 s.
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    let used = cpu_ticks(pid) - t0;
    assert!(used < hz / 2, "{used} ticks in 2 s at the fd limit (spinning)");
    fg.assert_running();
    // Recovery: connections close, new ones are served.
    drop(held);
    wait_until(Duration::from_secs(10), "new connections served after fds are freed", || {
        echo_once(OK, gw).is_ok()
    });
    for _ in 0..10 {
        echo_once(OK, gw).unwrap();
    }
    let failures = refusals() - failures_before;
    println!("accept errors and upstream failures counted at the limit: {failures}");
    assert!(failures >= 1.0, "connections refused at the fd limit are counted");
    fg.assert_running();
}

/// 200 SIGHUPs in a burst while allowed and denied traffic flows: no allowed connection
/// fails, no denied one gets through, the policy ends where it started (same hash, no
/// error), the process is alive and ready.
#[test]
fn sighup_storm() {
    let w = World::new();
    let up = EchoServer::start(format!("{WEB}:0").parse().unwrap());
    let mut fg = w.start(&tcp_listener("gw", up.addr, ""));
    let (gw, admin) = (fg.listener("gw"), fg.admin());
    let before = policy_json(admin);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match echo_once(OK, gw) {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("allowed flow failed during the storm: {e}");
                        bad.fetch_add(1, Ordering::Relaxed)
                    }
                };
                expect_refused(BAD, gw);
            }
        })
    };
    for _ in 0..200 {
        fg.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    fg.assert_running();
    assert_eq!(bad.load(Ordering::Relaxed), 0, "allowed connections failed during the storm");
    assert!(ok.load(Ordering::Relaxed) > 10, "too little traffic: {}", ok.load(Ordering::Relaxed));
    let after = policy_json(admin);
    assert_eq!(after["hash"], before["hash"], "{after}");
    assert!(after["last_error"].is_null(), "{after}");
    assert!(after["generation"].as_u64() >= before["generation"].as_u64());
    assert_eq!(admin_get(admin, "/readyz").0, 200);
    echo_once(OK, gw).unwrap();
}

/// An upstream that sends `chunks` × 64 KiB, `gap` apart, then closes.
fn trickle(chunks: usize, gap: Duration) -> SocketAddr {
    let l = TcpListener::bind(format!("{WEB}:0")).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            for _ in 0..chunks {
                if s.write_all(&[7u8; 65536]).is_err() {
                    return;
                }
                std::thread::sleep(gap);
            }
        }
    });
    addr
}

/// Reads until EOF or an error; bytes read and when it ended.
fn drain(s: &mut TcpStream) -> (usize, Instant) {
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut total = 0;
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return (total, Instant::now()),
            Ok(n) => total += n,
        }
    }
}

/// SIGTERM in the middle of a transfer: a transfer shorter than drain_timeout completes
/// and the gateway exits 0 right after; a longer one is cut at drain_timeout, exit 0.
#[test]
fn sigterm_mid_transfer_drains() {
    // Shorter than the drain: 20 chunks over ~2 s, drain_timeout 6 s.
    let w = World::new();
    let up = trickle(20, Duration::from_millis(100));
    let mut fg = w.start(&format!("[run]\ndrain_timeout = \"6s\"\n{}", tcp_listener("gw", up, "")));
    let gw = fg.listener("gw");
    let mut s = connect_from(OK, gw).unwrap();
    let mut first = [0u8; 1024];
    s.read_exact(&mut first).unwrap();
    fg.signal(libc::SIGTERM);
    let term = Instant::now();
    let (n, ended) = drain(&mut s);
    assert_eq!(n + first.len(), 20 * 65536, "the transfer completed through the drain");
    // The client closes its side too (until then the flow is half-open, and the drain
    // rightly waits for it).
    drop(s);
    let st = fg.wait_exit(Duration::from_secs(8));
    println!("transfer done {:?} after SIGTERM, exit {:?} after", ended - term, term.elapsed());
    assert!(st.success(), "exit status {st}");
    assert!(term.elapsed() < Duration::from_secs(5), "exit waited beyond the last flow");

    // Longer than the drain: 40 chunks over ~8 s, drain_timeout 1 s.
    let w = World::new();
    let up = trickle(40, Duration::from_millis(200));
    let mut fg = w.start(&format!("[run]\ndrain_timeout = \"1s\"\n{}", tcp_listener("gw", up, "")));
    let gw = fg.listener("gw");
    let mut s = connect_from(OK, gw).unwrap();
    s.read_exact(&mut first).unwrap();
    fg.signal(libc::SIGTERM);
    let term = Instant::now();
    let (n, ended) = drain(&mut s);
    let cut = ended - term;
    assert!(n + first.len() < 40 * 65536, "the long transfer was cut");
    assert!(cut >= Duration::from_millis(800) && cut < Duration::from_secs(4), "cut after {cut:?}");
    let st = fg.wait_exit(Duration::from_secs(5));
    assert!(st.success(), "exit status {st}");
}

const EGRESS_INVENTORY: &str = caller_inventory!("127.0.0.10");

const EGRESS_POLICY: &str = caller_egress_policy!("apis" => "domainNames: [web.test, gone.test]");

/// A CONNECT through `proxy`: the status code of the reply (0 when none came).
fn connect_status(proxy: SocketAddr, target: &str) -> (u16, TcpStream) {
    let mut s = connect_from(OK, proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head);
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, s)
}

/// The DNS server is gone (it receives and never answers): CONNECT to a name it would
/// resolve gets 502/504 within the DNS timeout, not a hang; names in [dns.static] still
/// work.
#[test]
fn dns_server_gone() {
    let dns = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns_addr = dns.local_addr().unwrap();
    let web = EchoServer::start("127.0.0.21:0".parse().unwrap());
    let w = World::with(EGRESS_INVENTORY, EGRESS_POLICY);
    let mut fg = w.start(&format!(
        "[dns]\nservers = [\"{dns_addr}\"]\ntimeout = \"1s\"\n\
         [dns.static]\n\"web.test\" = [\"127.0.0.21\"]\n\
         [ssrf]\ntreat_as_external = [\"127.0.0.21/32\"]\n\
         [[listener]]\nname = \"connect\"\nkind = \"http-connect\"\nbind = \"127.0.0.1:0\"\n"
    ));
    let proxy = fg.listener("connect");
    for i in 0..3 {
        let t0 = Instant::now();
        let (code, _) = connect_status(proxy, "gone.test:80");
        let took = t0.elapsed();
        assert!(
            code == 502 || code == 504,
            "attempt {i}: CONNECT to an unresolvable name got {code}"
        );
        assert!(
            took < Duration::from_secs(3),
            "attempt {i}: answered after {took:?} (dns timeout 1 s)"
        );
        // Static names are answered meanwhile.
        let (code, mut s) = connect_status(proxy, &format!("web.test:{}", web.addr.port()));
        assert_eq!(code, 200, "a static name with the DNS server gone");
        exchange(&mut s).unwrap();
    }
    fg.assert_running();
    drop(dns);
}
