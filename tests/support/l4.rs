//! The L4 gateway tests' world: a policy in a temp dir, an in-process gateway built from
//! real config text, real upstream servers on loopback, clients bound to chosen loopback
//! addresses (the address is the identity the policy sees).
//!
//! Identities (inventory in the temp dir, `policy.default = deny`):
//! - 127.0.0.10 `t/client-ok`: may reach `t/web` on any port (both sides allow it).
//! - 127.0.0.11 `t/client-bad`: no policy admits it → denied (egress, default-deny).
//! - 127.0.0.20 `t/web`: the upstreams listen here.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flowgate::config::Config;
use flowgate::control::ControlPlane;
use flowgate::dataplane::Runtime;
use flowgate::telemetry::metrics::ListenerCounters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

use super::gateway::{self, InProcess};

pub const OK: &str = "127.0.0.10";
pub const BAD: &str = "127.0.0.11";
pub const WEB: &str = "127.0.0.20";

pub const INVENTORY: &str = r#"
namespaces:
  - name: t
workloads:
  - name: client-ok
    namespace: t
    labels: {app: client-ok}
    ips: [127.0.0.10]
  - name: client-bad
    namespace: t
    labels: {app: client-bad}
    ips: [127.0.0.11]
  - name: web
    namespace: t
    labels: {app: web}
    ips: [127.0.0.20]
"#;

/// Two NetworkPolicies in namespace `ns` that let pods `app: client` reach pods
/// `app: web` (both sides must allow it under default deny): `client`'s egress (policy
/// `name`) and web's ingress (`web-ingress`). A `&'static str`:
/// `client_web_policy!("t", "ok-egress", "client-ok")`.
#[allow(unused_macros)] // each test binary uses a different part of support
macro_rules! client_web_policy {
    ($ns:literal, $name:literal, $client:literal) => {
        concat!(
            "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ",
            $name,
            ", namespace: ",
            $ns,
            "}
spec:
  podSelector: {matchLabels: {app: ",
            $client,
            "}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: web}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-ingress, namespace: ",
            $ns,
            "}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: ",
            $client,
            "}}}]
"
        )
    };
}
#[allow(unused_imports)]
pub(crate) use client_web_policy;

pub const POLICY: &str = client_web_policy!("t", "ok-egress", "client-ok");

/// A temp dir holding the inventory, the policy and (later) the flow log.
pub struct World {
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("inventory.yaml"), INVENTORY).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/t.yaml"), POLICY).unwrap();
        World { dir }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("flow.log")
    }

    /// A full config file text: the policy section, a file flow log, the admin API on
    /// port 0, no source watcher (the tests reload through the control plane when they
    /// change a policy file), and `extra` (listeners, conntrack…).
    pub fn config_text(&self, extra: &str) -> String {
        format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\n\
             [flowlog]\noutput = \"flow.log\"\ndedupe_window = \"150ms\"\n\n\
             [admin]\nbind = \"127.0.0.1:0\"\n\n\
             [control]\nwatch = false\n\n{extra}\n"
        )
    }

    pub fn write_config(&self, extra: &str) -> PathBuf {
        let p = self.dir.path().join("flowgate.toml");
        std::fs::write(&p, self.config_text(extra)).unwrap();
        p
    }

    /// Flow-log lines parsed as JSON (empty if the file is not there yet).
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every flow-log line is JSON"))
            .collect()
    }

    /// Polls the flow log until `pred` holds for some line (bounded by `within`).
    pub async fn wait_log(
        &self,
        within: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log_lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(Instant::now() < deadline, "no matching flow-log line: {:?}", self.log_lines());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// An in-process gateway started from config text, exactly as `flowgate run` does.
pub struct Gateway {
    pub world: World,
    pub rt: Arc<Runtime>,
    /// The one writer of `rt.policy`: reload it to change the policy.
    pub control: ControlPlane,
    pub running: InProcess,
}

impl Gateway {
    pub fn start(world: World, listeners_toml: &str) -> Gateway {
        let path = world.write_config(listeners_toml);
        let cfg = Config::load(&path).unwrap();
        let running = gateway::start(&cfg);
        Gateway { world, rt: running.rt.clone(), control: running.control.clone(), running }
    }

    /// A gateway whose one listener, TCP `pp`, forwards to `up` and reads the PROXY
    /// header as `pp_keys` (the listener's `proxy_protocol*`/`trusted_proxies` lines) say.
    pub fn in_front_of(up: &Upstream, pp_keys: &str) -> Gateway {
        Gateway::start(World::new(), &tcp_listener("pp", &[up.addr], pp_keys))
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.running.addr(name)
    }

    pub fn counters(&self, name: &str) -> Arc<ListenerCounters> {
        self.rt.registry.listeners().into_iter().find(|c| c.name == name).unwrap()
    }

    /// Waits (bounded) until the conntrack table is empty.
    pub async fn wait_conntrack_empty(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.rt.conntrack.is_empty() {
            assert!(Instant::now() < deadline, "{} entries left", self.rt.conntrack.len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A TCP connection from a chosen loopback address.
pub async fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{src}:0").parse().unwrap())?;
    s.connect(to).await
}

/// A real TCP upstream on 127.0.0.20 that counts the connections it accepts and serves
/// each with `serve`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn start<F, Fut>(serve: F) -> Upstream
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind(format!("{WEB}:0")).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        Upstream { addr, accepted }
    }

    /// Echo: writes back what it reads, FIN at EOF.
    pub async fn echo() -> Upstream {
        Upstream::start(|mut s: TcpStream| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }
}

/// A UDP echo server on 127.0.0.20.
pub async fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind(format!("{WEB}:0")).await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            if let Ok((n, peer)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], peer).await;
            }
        }
    });
    addr
}

/// A TCP listener TOML table.
pub fn tcp_listener(name: &str, upstreams: &[SocketAddr], extra: &str) -> String {
    let ups: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[[listener]]\nname = \"{name}\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
         upstreams = [{}]\n{extra}\n",
        ups.join(", ")
    )
}

/// Sends `data` and reads the same number of bytes back.
pub async fn roundtrip(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await.unwrap().unwrap();
    back
}

/// An address nothing listens on (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind(format!("{WEB}:0")).unwrap();
    l.local_addr().unwrap()
}

/// Connects from `src` and expects a reset (on connect or on the first read); returns the
/// time from starting the connect to seeing it.
pub async fn expect_reset(src: &str, to: SocketAddr) -> Duration {
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = connect_from(src, to).await?;
        let mut b = [0u8; 16];
        let n = s.read(&mut b).await?;
        Ok::<usize, std::io::Error>(n)
    })
    .await
    .expect("reset within 5 s");
    let e = r.expect_err("a refused client gets an error, not data or a clean EOF");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    t0.elapsed()
}
