//! What the network-namespace egress tests share: a namespace that is deleted on drop,
//! running a test body *inside* one, flowgate started in-process from config text, and
//! servers that count the connections they accept.
//!
//! flowgate runs in the test process, on a thread that has entered the namespace
//! (`setns(CLONE_NEWNET)`) and drives a current-thread tokio runtime: every socket it
//! opens (listeners, dials, DNS queries) is created on that thread and so lives in the
//! namespace, exactly as under `ip netns exec`, while the test can still read flowgate's
//! counters and flow log directly. Child processes (curl, openssl, `ip`, `nft`) spawned
//! from that thread inherit its namespace. The in-process gate, the counter read, the
//! child-process guard and the bounded listening wait are [`super::egress`]'s.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::egress::count_accepts;

/// Runs a command to completion (bounded by its own nature: `ip`, `nft`); panics with
/// its stderr when it fails.
pub fn sh(cmd: &str) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("sh runs");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A named network namespace (`ip netns add`), deleted on drop — on failure too — which
/// also removes its interfaces and addresses.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace, named after the test and this process so parallel runs do not
    /// collide; its `lo` is up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("fg-{tag}-{}", std::process::id());
        // A leftover from a run that was killed before its guard ran.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(&format!("ip netns add {name}"));
        let ns = Netns { name };
        ns.exec("ip link set lo up");
        ns
    }

    /// Runs `cmd` inside the namespace (`ip netns exec`).
    pub fn exec(&self, cmd: &str) {
        sh(&format!("ip netns exec {} sh -c '{cmd}'", self.name));
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.name)).expect("netns file");
        // SAFETY: a valid namespace fd; CLONE_NEWNET changes only this thread's network
        // namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Runs `body` on a new thread inside the namespace, on a current-thread runtime (so
    /// every task, and every socket, stays on that thread). Panics propagate.
    pub fn run<F, Fut>(&self, body: F)
    where
        F: FnOnce() -> Fut + Send,
        Fut: std::future::Future<Output = ()>,
    {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                self.enter();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(body());
            });
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        });
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A TCP server on `addr` that counts accepts and answers every connection with a
/// minimal HTTP response whose body is `body` (after reading the request head, or
/// whatever arrives within a second).
pub async fn counting_http(addr: SocketAddr, body: &'static str) -> Arc<AtomicUsize> {
    let l = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    count_accepts(l, move |mut s| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16_384 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => head.extend_from_slice(&buf[..k]),
                }
            }
        })
        .await;
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
        let _ = s.shutdown().await;
    })
}

/// A TCP server on `addr` that counts accepts and splices each connection to `backend`
/// (a real TLS server elsewhere), so accepts per address are counted even for TLS.
pub async fn counting_front(addr: SocketAddr, backend: SocketAddr) -> Arc<AtomicUsize> {
    let l = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    count_accepts(l, move |mut s| async move {
        if let Ok(mut b) = TcpStream::connect(backend).await {
            let _ = tokio::time::timeout(
                Duration::from_secs(15),
                tokio::io::copy_bidirectional(&mut s, &mut b),
            )
            .await;
        }
    })
}

/// Runs curl (bounded by `--max-time`) with `prefix` in front (e.g. `ip netns exec X`);
/// returns exit code, stdout, stderr.
pub async fn curl(prefix: &[&str], args: &[&str]) -> (i32, String, String) {
    let mut argv: Vec<&str> = prefix.to_vec();
    argv.extend(["curl", "-sS", "-v", "--max-time", "10"]);
    argv.extend(args);
    let out = tokio::process::Command::new(argv[0])
        .args(&argv[1..])
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
