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

use support::l4::{BAD, INVENTORY, OK, POLICY, WEB};
use support::process::Flowgate;
use support::require::{Need, skip_unless};

/// A temp dir with the inventory, the policy and the config; `flowgate run` on it.
struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("inventory.yaml"), INVENTORY).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/t.yaml"), POLICY).unwrap();
        World { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Writes the config: policy, a flow log at `log` (dedupe off: one line per event),
    /// the admin API on port 0, no watcher (SIGHUP reloads), then `extra`.
    fn config(&self, log: &Path, extra: &str) -> PathBuf {
        let text = format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\n\
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
    if &back == msg {
        Ok(())
    } else {
        Err(std::io::Error::other("echo returned other bytes"))
    }
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
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
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
        EchoServer { addr, stop, thread: Some(thread) }
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
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
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
/// connect timeout) and are counted as upstream failures; after the restart (and the
/// cooldown) they succeed again.
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
        assert!(t0.elapsed() < Duration::from_secs(1), "outage attempt {i} took {:?}", t0.elapsed());
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
