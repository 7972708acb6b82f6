//! Helpers shared by the egress listener tests (tests/egress_listeners.rs,
//! tests/egress_identity.rs): real peers (python3's http.server, openssl s_server, curl)
//! on fixed loopback addresses, and bounded waits.
#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// The plain HTTP server's address (`web.test` in the tests' static DNS tables).
pub const WEB: &str = "127.0.0.21";
/// The HTTPS server's address (`tls.test`).
pub const TLS: &str = "127.0.0.22";

/// Whether the real peers this file needs are installed; prints why a test skips if not.
pub fn peers_present(bins: &[&str]) -> bool {
    for b in bins {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {b}"))
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("SKIP: {b} is not installed (scripts/setup.sh installs it)");
            return false;
        }
    }
    true
}

pub fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Waits (bounded) until `c` reaches `at_least`: the proxy counts a failed handshake
/// after its error reply and a short linger, so the client may see the close first.
pub async fn wait_count(c: &std::sync::atomic::AtomicU64, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while get(c) < at_least {
        assert!(Instant::now() < deadline, "counter at {} < {at_least}", get(c));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free port on `ip` (bound and released; the servers bind it right after).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// Polls until something accepts on `addr` (bounded).
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed (by its own pid) when dropped.
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn http_server(root: &std::path::Path) -> (Server, u16) {
    std::fs::write(root.join("hello.txt"), "hello from the web server\n").unwrap();
    let port = free_port(WEB);
    let child = std::process::Command::new("python3")
        .args(["-m", "http.server", "--bind", WEB, &port.to_string()])
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs");
    let s = Server(child);
    wait_listening(SocketAddr::new(WEB.parse().unwrap(), port)).await;
    (s, port)
}

pub async fn https_server(dir: &std::path::Path) -> (Server, u16) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let st = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj"])
        .arg("/CN=tls.test")
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(st.success());
    let port = free_port(TLS);
    let child = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(format!("{TLS}:{port}"))
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server runs");
    let s = Server(child);
    wait_listening(SocketAddr::new(TLS.parse().unwrap(), port)).await;
    (s, port)
}

/// Runs curl (bounded by `--max-time`); returns exit code, stdout, stderr.
pub async fn curl(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-v", "--max-time", "10"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
