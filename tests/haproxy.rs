//! A real HAProxy in front of the real `flowgate` binary, sending PROXY v2 (`send-proxy-v2`)
//! and v1 (`send-proxy`). Two clients bound to 127.0.0.2 (allowed by the policy) and
//! 127.0.0.3 (denied) connect through HAProxy; flowgate must decide on the addresses the
//! header carries (HAProxy itself connects from 127.0.0.1), forward only the allowed one, and
//! log both with their real address and port.
//!
//! Skipped, saying so, when `haproxy` is not installed (scripts/setup.sh installs it); in
//! CI that fails the test instead.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::l4::client_web_policy;
use support::process::Flowgate;
use support::require::{Need, skip_unless};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const ALLOWED: &str = "127.0.0.2";
const DENIED: &str = "127.0.0.3";
const WEB: &str = "127.0.0.20";

const INVENTORY: &str = r#"
namespaces:
  - name: hp
workloads:
  - {name: allowed, namespace: hp, labels: {app: allowed}, ips: [127.0.0.2]}
  - {name: denied, namespace: hp, labels: {app: denied}, ips: [127.0.0.3]}
  - {name: web, namespace: hp, labels: {app: web}, ips: [127.0.0.20]}
"#;

const POLICY: &str = client_web_policy!("hp", "allowed-egress", "allowed");

/// A child process killed by its own pid when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().expect("local addr").port()
}

/// Starts flowgate with a listener requiring a PROXY header from 127.0.0.1 (HAProxy), in
/// front of `upstream`; returns the process and the listener's address (read from stderr).
fn start_flowgate(dir: &Path, upstream: SocketAddr) -> (Flowgate, SocketAddr) {
    std::fs::create_dir_all(dir.join("policies")).expect("mkdir");
    std::fs::write(dir.join("inventory.yaml"), INVENTORY).expect("write inventory");
    std::fs::write(dir.join("policies/hp.yaml"), POLICY).expect("write policy");
    let cfg = format!(
        "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\n\
         [flowlog]\noutput = \"flow.log\"\ndedupe_window = \"0s\"\nallow_sample = 1\n\n\
         [run]\ndrain_timeout = \"1s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"behind-lb\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
         upstreams = [\"{upstream}\"]\nproxy_protocol = \"any\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n"
    );
    let path = dir.join("flowgate.toml");
    std::fs::write(&path, cfg).expect("write config");
    let mut fg = Flowgate::run(&path);
    let addr = fg.listener("behind-lb");
    fg.wait_ready();
    (fg, addr)
}

/// Starts HAProxy with two TCP frontends: one sending PROXY v2, one v1, both to `flowgate`.
fn start_haproxy(dir: &Path, flowgate: SocketAddr) -> (Proc, SocketAddr, SocketAddr) {
    let (p2, p1) = (free_port(), free_port());
    let cfg = format!(
        "global\n  maxconn 100\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
         timeout server 30s\n\n\
         listen pp_v2\n  bind 127.0.0.1:{p2}\n  server fg {flowgate} send-proxy-v2\n\n\
         listen pp_v1\n  bind 127.0.0.1:{p1}\n  server fg {flowgate} send-proxy\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write haproxy config");
    let check =
        Command::new("haproxy").arg("-c").arg("-f").arg(&path).output().expect("haproxy -c");
    assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn haproxy");
    (
        Proc(child),
        format!("127.0.0.1:{p2}").parse().expect("addr"),
        format!("127.0.0.1:{p1}").parse().expect("addr"),
    )
}

async fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{src}:0").parse().expect("source address literal"))?;
    s.connect(to).await
}

/// Waits (bounded) until HAProxy accepts on `to`.
async fn wait_listening(to: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(to).await.is_err() {
        assert!(Instant::now() < deadline, "haproxy not listening on {to}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("flow.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("flow-log lines are JSON"))
        .collect()
}

/// Waits (bounded) for a flow-log event of `event` from exactly `src`.
async fn wait_event(dir: &Path, event: &str, src: SocketAddr) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = log_lines(dir);
        if let Some(l) = lines.iter().find(|l| l["event"] == event && l["src"] == src.to_string()) {
            return l.clone();
        }
        assert!(Instant::now() < deadline, "no {event} event from {src}: {lines:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v1_and_v2_give_flowgate_the_real_clients() {
    if skip_unless(&[Need::Bin("haproxy")]) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");

    // The upstream: an echo server on 127.0.0.20 that counts accepts and remembers peers.
    let up = TcpListener::bind(format!("{WEB}:0")).await.expect("bind upstream");
    let up_addr = up.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = up.accept().await else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let (_fg, fg_addr) = start_flowgate(dir.path(), up_addr);
    let (_ha, via_v2, via_v1) = start_haproxy(dir.path(), fg_addr);
    wait_listening(via_v2).await;
    wait_listening(via_v1).await;
    // wait_listening's own probes came from 127.0.0.1 (no workload): denied, never forwarded.
    let probes_accepted = accepted.load(Ordering::SeqCst);
    assert_eq!(probes_accepted, 0);

    for (variant, via) in [("send-proxy-v2", via_v2), ("send-proxy", via_v1)] {
        // Allowed client: bytes go through and come back.
        let mut ok = connect_from(ALLOWED, via).await.expect("connect via haproxy");
        let ok_src = ok.local_addr().expect("addr");
        let msg = format!("hello through {variant}");
        ok.write_all(msg.as_bytes()).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), ok.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("{variant}: no echo in time"))
            .unwrap_or_else(|e| panic!("{variant}: allowed client cut: {e}"));
        assert_eq!(back, msg.as_bytes());
        let allow = wait_event(dir.path(), "allow", ok_src).await;
        assert_eq!(allow["src_workload"], "hp/allowed", "{variant}: {allow}");
        assert_eq!(allow["dst"], up_addr.to_string(), "{variant}: {allow}");
        drop(ok);

        // Denied client: HAProxy's connection to flowgate is reset, so the client is
        // closed without a byte; the upstream never sees it.
        let before = accepted.load(Ordering::SeqCst);
        let mut bad = connect_from(DENIED, via).await.expect("connect via haproxy");
        let bad_src = bad.local_addr().expect("addr");
        let _ = bad.write_all(b"let me in").await;
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), bad.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("{variant}: denied client left open"));
        assert!(matches!(r, Ok(0) | Err(_)), "{variant}: denied client got data: {r:?}");
        let deny = wait_event(dir.path(), "deny", bad_src).await;
        assert_eq!(deny["src_workload"], "hp/denied", "{variant}: {deny}");
        assert_eq!(deny["listener"], "behind-lb", "{variant}: {deny}");
        assert_eq!(accepted.load(Ordering::SeqCst), before, "{variant}: upstream contacted");
    }
    // Nothing in the log names HAProxy's own address as a client of a forwarded flow.
    for l in log_lines(dir.path()) {
        if l["event"] == "allow" {
            assert_ne!(
                l["src"].as_str().and_then(|s| s.split(':').next()),
                Some("127.0.0.1"),
                "{l}"
            );
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "one forwarded connection per variant");
}
