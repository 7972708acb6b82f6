//! The egress listener tests' helpers (tests/egress_listeners.rs, egress_identity.rs, and
//! through [`super::netns`] the namespace tests): flowgate started in-process from config
//! text ([`Gate`]), real peers (python3's http.server, openssl s_server, curl) on loopback
//! addresses, and bounded waits; the fixture every egress test starts from (namespace
//! `fn`, workload `caller` and its egress AdminNetworkPolicy: [`caller_inventory!`],
//! [`caller_egress_policy!`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flowgate::config::Config;
use flowgate::control::ControlPlane;
use flowgate::dataplane::Runtime;
use flowgate::telemetry::metrics::ListenerCounters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::gateway::{self, InProcess};
pub use super::process::free_port;

/// The egress tests' inventory, as a `&'static str`: namespace `fn` with workload `caller`
/// (`app: caller`) on the first list of IPs and, given a second, `other` (`app: other`) on
/// that: `caller_inventory!("127.0.0.10", "127.0.0.11")`.
#[allow(unused_macros)] // each test binary uses a different part of support
macro_rules! caller_inventory {
    ($caller:literal $(, $other:literal)?) => {
        concat!(
            "
namespaces:
  - name: fn
workloads:
  - name: caller
    namespace: fn
    labels: {app: caller}
    ips: [", $caller, "]
",
            $("  - name: other
    namespace: fn
    labels: {app: other}
    ips: [", $other, "]
",)?
        )
    };
}
#[allow(unused_imports)]
pub(crate) use caller_inventory;

/// The egress tests' AdminNetworkPolicy `caller-egress` (priority 10), as a `&'static str`:
/// `fn/caller` may go to each `rule => peer`, `peer` being one `to:` entry:
/// `caller_egress_policy!("sink" => "networks: [127.0.0.23/32]")`.
#[allow(unused_macros)] // each test binary uses a different part of support
macro_rules! caller_egress_policy {
    ($($rule:literal => $to:literal),+ $(,)?) => {
        concat!(
            "
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: caller-egress}
spec:
  priority: 10
  subject:
    pods:
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: fn}}
      podSelector: {matchLabels: {app: caller}}
  egress:
",
            $("    - name: ", $rule, "
      action: Allow
      to:
        - ", $to, "
",)+
        )
    };
}
#[allow(unused_imports)]
pub(crate) use caller_egress_policy;

/// flowgate, in-process, built from config text the way `flowgate run` builds it, so a
/// test can read its counters and flow log directly.
pub struct Gate {
    pub dir: tempfile::TempDir,
    pub rt: Arc<Runtime>,
    /// The one writer of `rt.policy`: reload it to change the policy.
    pub control: ControlPlane,
    pub running: InProcess,
}

impl Gate {
    /// `config` is everything after the `[policy]`, `[flowlog]`, `[admin]` and `[control]`
    /// sections (which point at `inventory` and the one policy file written here; no
    /// source watcher: the tests reload through the control plane).
    pub async fn start(inventory: &str, policy: &str, config: &str) -> Gate {
        Gate::start_with(inventory, policy, config, &[], "127.0.0.1:0").await
    }

    /// [`Gate::start`], with `files` (name, contents) written next to the config first (a
    /// hosts file), its `[[credential]]` table in force, and the admin API bound on
    /// `admin_bind` (`HOST:0`).
    pub async fn start_with(
        inventory: &str,
        policy: &str,
        config: &str,
        files: &[(&str, &str)],
        admin_bind: &str,
    ) -> Gate {
        let (dir, path) = write_world(inventory, policy, config, files, admin_bind);
        let cfg = Config::load(&path).unwrap();
        let running = gateway::start(&cfg);
        Gate { dir, rt: running.rt.clone(), control: running.control.clone(), running }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.running.addr(name)
    }

    pub fn counters(&self, name: &str) -> Arc<ListenerCounters> {
        self.rt.registry.listeners().into_iter().find(|c| c.name == name).unwrap()
    }

    pub fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("flow.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("flow-log lines are JSON"))
            .collect()
    }

    /// Waits (bounded) for an event matching `pred`; returns it. `what` names it in the
    /// failure message.
    pub async fn wait_event(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(e) = self.log().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(Instant::now() < deadline, "no event {what}: {:#?}", self.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A directory laid out for flowgate, in-process ([`Gate`]) or as `flowgate run`:
/// `inventory.yaml`, `policy` as `policies/policy.yaml`, `files` (name, contents), and
/// `flowgate.toml`: `[policy]` (default deny), `[flowlog]` (`flow.log`, no folding),
/// `[admin]` on `admin_bind`, `[control]` with no source watcher (the tests reload by
/// hand), then `config`. Returns the directory and the config's path.
pub fn write_world(
    inventory: &str,
    policy: &str,
    config: &str,
    files: &[(&str, &str)],
    admin_bind: &str,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inventory.yaml"), inventory).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/policy.yaml"), policy).unwrap();
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    let text = format!(
        "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\n\
         default = \"deny\"\nunknown = \"deny\"\n\
         [flowlog]\noutput = \"flow.log\"\ndedupe_window = \"0s\"\n\
         [admin]\nbind = \"{admin_bind}\"\n[control]\nwatch = false\n{config}"
    );
    let path = dir.path().join("flowgate.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The plain HTTP server's address (`web.test` in the tests' static DNS tables).
pub const WEB: &str = "127.0.0.21";
/// The HTTPS server's address (`tls.test`).
pub const TLS: &str = "127.0.0.22";
/// `fn/caller`, the client the egress policies allow, and `fn/other`, which none allows:
/// the workloads of [`INVENTORY`].
pub const CALLER: &str = "127.0.0.10";
pub const OTHER: &str = "127.0.0.11";
/// A server with no name (`sink.test` at most), reached by address.
pub const SINK: &str = "127.0.0.23";
/// The loopback tests' inventory: [`CALLER`] and [`OTHER`].
pub const INVENTORY: &str = caller_inventory!("127.0.0.10", "127.0.0.11");

/// Accepts on `l` for the rest of the test, counting every connection before `serve`
/// handles it on a task of its own. Returns the count.
pub fn count_accepts<F, Fut>(l: TcpListener, serve: F) -> Arc<AtomicUsize>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    n
}

/// Connects to `to` from [`CALLER`]'s address (the source the policies know).
pub async fn from_caller(to: SocketAddr) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{CALLER}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// Reads `s` until the peer closes it (or a read fails): everything that arrived, or
/// `None` if it was still open after 5 s.
pub async fn read_to_close(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    r.ok().map(|()| out)
}

/// A TCP server on `ip` (port 0) that counts accepts and answers each connection with
/// "ok": returns its port and the count.
pub async fn sink(ip: &str) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let n = count_accepts(l, |mut s| async move {
        let _ = s.write_all(b"ok").await;
    });
    (port, n)
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
    let port = free_port(TLS);
    let s = tls_server_on(dir, SocketAddr::new(TLS.parse().unwrap(), port)).await;
    (s, port)
}

/// A self-signed certificate for `tls.test` in `dir` and an `openssl s_server -www` on
/// `addr`, listening when this returns.
pub async fn tls_server_on(dir: &std::path::Path, addr: SocketAddr) -> Server {
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
    let child = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(addr.to_string())
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
    wait_listening(addr).await;
    s
}

/// Runs curl (bounded by `--max-time`); returns exit code, stdout, stderr.
pub async fn curl(args: &[&str]) -> (i32, String, String) {
    super::netns::curl(&[], args).await
}
