//! Issue 6's acceptance, end to end against the real `flowgate run` process: a tcp
//! listener forwarding to flowgate's own echo listener, the admin API on a free loopback
//! port with a token, the flow log and the audit trail in files, the policy in a temp dir
//! rewritten (rename and in place) or signalled while real clients connect.
//!
//! Each test uses its own 127.0.x.y addresses, so the tests of this file can run side by
//! side. Every wait is bounded; the child is killed when a test fails half-way.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

mod support;
use support::process::Flowgate;

const TOKEN: &str = "e2e-token-5678";

/// Addresses of one test: `client` is allowed to reach `web` (where the echo listener
/// is), `other` is a workload no policy admits.
#[derive(Clone, Copy)]
struct Net {
    client: &'static str,
    web: &'static str,
    other: &'static str,
}

fn inventory(net: Net) -> String {
    format!(
        "namespaces:\n  - name: t\nworkloads:\n\
         \x20 - {{name: client, namespace: t, labels: {{app: client}}, ips: [{}]}}\n\
         \x20 - {{name: web, namespace: t, labels: {{app: web}}, ips: [{}]}}\n\
         \x20 - {{name: other, namespace: t, labels: {{app: other}}, ips: [{}]}}\n",
        net.client, net.web, net.other
    )
}

/// client → web, both sides (policy.default is deny). `note` goes in a comment so each
/// rewrite changes the file's content.
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

/// A policy about `other` only (egress to web on port `port`): never changes what
/// `client` may do.
fn unrelated_policy(port: u16) -> String {
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

/// An AdminNetworkPolicy denying the client's egress everywhere (beats the NetworkPolicies).
const DENY_CLIENT: &str = "\
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: deny-client}
spec:
  priority: 5
  subject:
    pods:
      namespaceSelector: {}
      podSelector: {matchLabels: {app: client}}
  egress:
    - name: block
      action: Deny
      to:
        - namespaces: {}
";

/// A port nothing listens on right now on `ip` (bound, then released).
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind(format!("{ip}:0")).unwrap().local_addr().unwrap().port()
}

/// Writes `text` the way editors do: a temp file in the same directory, then rename.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A running `flowgate run` over a temp config dir.
struct Gate {
    dir: tempfile::TempDir,
    fg: Flowgate,
    config: PathBuf,
    admin: SocketAddr,
    gw: SocketAddr,
}

impl Gate {
    /// Writes inventory, `policies/allow.yaml`, the config (`control_extra` appended to
    /// `[control]`), starts the process and waits until it is ready.
    fn start(net: Net, control_extra: &str) -> Gate {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("inventory.yaml"), inventory(net)).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/allow.yaml"), allow_policy("initial 000"))
            .unwrap();
        let admin_port = free_port("127.0.0.1");
        let web_port = free_port(net.web);
        let config = dir.path().join("flowgate.toml");
        std::fs::write(
            &config,
            format!(
                "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\n\
                 default = \"deny\"\non_change = \"revalidate\"\n\n\
                 [flowlog]\noutput = \"flow.log\"\ndedupe_window = \"50ms\"\n\n\
                 [admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken = \"{TOKEN}\"\n\n\
                 [control]\naudit_log = \"audit.log\"\n{control_extra}\n\n\
                 [run]\ndrain_timeout = \"2s\"\n\n\
                 [[listener]]\nname = \"web\"\nkind = \"echo\"\nbind = \"{}:{web_port}\"\n\n\
                 [[listener]]\nname = \"gw\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
                 upstreams = [\"{}:{web_port}\"]\nidle_timeout = \"30s\"\n",
                net.web, net.web
            ),
        )
        .unwrap();
        let mut gate = Gate {
            dir,
            fg: Flowgate::run(&config),
            config,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            gw: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        gate.gw = gate.fg.listener("gw");
        assert_eq!(gate.fg.admin(), gate.admin);
        gate.fg.wait_ready();
        assert_eq!(http(gate.admin, "GET", "/readyz", None, None).0, 200);
        gate
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn policy(&self) -> serde_json::Value {
        let (status, body) = http(self.admin, "GET", "/policy", None, None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn generation(&self) -> u64 {
        self.policy()["generation"].as_u64().unwrap()
    }

    /// One sample of the Prometheus exposition, e.g.
    /// `flowgate_policy_reloads_total{result="error"}`.
    fn metric(&self, series: &str) -> f64 {
        let (status, body) = http(self.admin, "GET", "/metrics", None, None);
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in the exposition"))
    }

    fn json_lines(&self, rel: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path(rel))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{rel}: {e}: {l}")))
            .collect()
    }

    fn flow_log(&self) -> Vec<serde_json::Value> {
        self.json_lines("flow.log")
    }

    fn audit_count(&self) -> usize {
        std::fs::read_to_string(self.path("audit.log")).unwrap_or_default().lines().count()
    }

    fn gw_upstream(&self) -> SocketAddr {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let line = text.lines().find(|l| l.starts_with("upstreams")).unwrap();
        line.split('"').nth(1).unwrap().parse().unwrap()
    }

    /// Waits (bounded) until `f` holds.
    fn wait(&self, what: &str, within: Duration, mut f: impl FnMut(&Gate) -> bool) {
        let deadline = Instant::now() + within;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, a clean exit (which flushes the flow log), then the flow log.
    fn stop_and_flow_log(&mut self) -> Vec<serde_json::Value> {
        self.fg.signal(libc::SIGTERM);
        let st = self.fg.wait_exit(Duration::from_secs(10));
        assert!(st.success(), "{st:?}");
        self.flow_log()
    }
}

/// One HTTP/1.1 request to the admin API (`Connection: close`); (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A TCP connection from `src`. The port is chosen at connect time
/// (IP_BIND_ADDRESS_NO_PORT), so thousands of short connections from one address do not
/// run out of ports to TIME_WAIT.
async fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
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

/// A short allowed connection: request, half-close, the whole echo back, then EOF.
async fn short_exchange(src: &str, gw: SocketAddr, n: usize) -> std::io::Result<()> {
    let mut s = connect_from(src, gw).await?;
    let req = format!("request {n:08}\n");
    s.write_all(req.as_bytes()).await?;
    s.shutdown().await?;
    let mut back = Vec::with_capacity(req.len());
    s.read_to_end(&mut back).await?;
    if back != req.as_bytes() {
        return Err(std::io::Error::other(format!("echo mismatch: {back:?}")));
    }
    Ok(())
}

/// Sends `data` on a held connection and reads it back (bounded).
async fn roundtrip(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(back, data);
}

/// The held connection ends (EOF or reset) within `within`.
async fn expect_cut(s: &mut TcpStream, within: Duration) {
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(within, s.read(&mut b)).await.expect("cut within the bound");
    match r {
        Ok(0) => {}
        Ok(n) => panic!("read {n} bytes from a connection that should be cut"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
}

/// A new connection from `src` is refused: reset on connect or on the first read (no
/// echo comes back).
async fn expect_refused(src: &str, gw: SocketAddr) {
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = connect_from(src, gw).await?;
        s.write_all(b"hello?").await?;
        let mut b = [0u8; 16];
        s.read(&mut b).await
    })
    .await
    .expect("answer within 5 s");
    match r {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("{src} was served ({n} bytes) while it should be refused"),
    }
}

/// An allowed client makes ≥ 10,000 short connections, 32 at a time, while the policy is
/// reloaded 200 times: the allow file replaced by rename, an unrelated file rewritten in
/// place, SIGHUPs. Not one allowed connection fails or is denied, and the generation moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_keeps_allowed_connections() {
    const CONNECTIONS: usize = 10_000;
    const RELOADS: usize = 200;
    const CONCURRENCY: usize = 32;
    let net = Net { client: "127.0.61.1", web: "127.0.61.2", other: "127.0.61.3" };
    let mut gate = Gate::start(net, "debounce = \"10ms\"");
    std::fs::write(gate.path("policies/unrelated.yaml"), unrelated_policy(1)).unwrap();
    gate.wait("the unrelated policy to load", Duration::from_secs(10), |g| g.generation() >= 2);
    let generation_before = gate.generation();
    let audit_before = gate.audit_count();
    let started = Instant::now();
    let limit = Duration::from_secs(180);

    // The reload driver: one trigger at a time, each waited for in the audit trail, so
    // 200 triggers are 200 reload attempts (debouncing could otherwise fold them).
    let reloads_done = Arc::new(AtomicBool::new(false));
    let driver = {
        let done = reloads_done.clone();
        let allow = gate.path("policies/allow.yaml");
        let unrelated = gate.path("policies/unrelated.yaml");
        let audit = gate.path("audit.log");
        let pid = i32::try_from(gate.fg.pid()).unwrap();
        std::thread::spawn(move || {
            let count = || std::fs::read_to_string(&audit).unwrap_or_default().lines().count();
            let (mut renames, mut in_place, mut hups) = (0, 0, 0);
            for i in 0..RELOADS {
                let before = count();
                match i % 3 {
                    0 => {
                        replace_file(&allow, &allow_policy(&format!("rewrite {i:03}")));
                        renames += 1;
                    }
                    // In place. Truncate-and-write only on a file that never concerns the
                    // client: a truncated file is an empty, valid policy for an instant,
                    // and a reload that happened to read it would rightly deny. The allow
                    // file is overwritten in place without truncation, same length, only
                    // its comment changing, so every read sees a whole policy.
                    1 if i % 2 == 0 => {
                        std::fs::write(&unrelated, unrelated_policy(1000 + i as u16)).unwrap();
                        in_place += 1;
                    }
                    1 => {
                        let mut f = std::fs::OpenOptions::new().write(true).open(&allow).unwrap();
                        f.write_all(allow_policy(&format!("rewrite {i:03}")).as_bytes()).unwrap();
                        in_place += 1;
                    }
                    _ => {
                        // SAFETY: kill(2) on the pid of the child this test spawned.
                        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
                        hups += 1;
                    }
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while count() <= before {
                    assert!(Instant::now() < deadline, "reload {i} not in the audit trail");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            done.store(true, Ordering::Release);
            (renames, in_place, hups)
        })
    };

    // The clients: keep going until both the 10,000 connections and the 200 reloads are
    // done, so every reload happens under traffic.
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (next, ok, failures, done) =
            (next.clone(), ok.clone(), failures.clone(), reloads_done.clone());
        let gw = gate.gw;
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if (n >= CONNECTIONS && done.load(Ordering::Acquire)) || started.elapsed() > limit {
                    return;
                }
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    short_exchange(net.client, gw, n),
                )
                .await
                {
                    Ok(Ok(())) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => failures.lock().unwrap().push(format!("#{n}: {e}")),
                    Err(_) => failures.lock().unwrap().push(format!("#{n}: timed out")),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (renames, in_place, hups) =
        tokio::task::spawn_blocking(move || driver.join().unwrap()).await.unwrap();
    let elapsed = started.elapsed();
    let failures = failures.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    eprintln!(
        "storm: {ok} connections, {} reloads ({renames} renames, {in_place} in place, \
         {hups} SIGHUPs) in {elapsed:?}",
        gate.audit_count() - audit_before
    );
    assert!(elapsed < limit, "did not finish within {limit:?}");
    assert!(failures.is_empty(), "{} failed allowed connections: {:?}", failures.len(), {
        let mut f = failures.clone();
        f.truncate(10);
        f
    });
    assert!(ok >= CONNECTIONS, "only {ok} connections");
    assert!(gate.audit_count() - audit_before >= RELOADS);

    // Every rename changed the content: the generation advanced at least that often.
    let generation_after = gate.generation();
    assert!(
        generation_after >= generation_before + renames as u64,
        "generation {generation_before} → {generation_after} after {renames} content changes"
    );
    assert_eq!(gate.metric("flowgate_policy_reload_failing"), 0.0);
    assert_eq!(gate.metric("flowgate_flows_revoked_total"), 0.0);
    let client = format!("{}:", net.client);
    let bad: Vec<_> = gate
        .stop_and_flow_log()
        .into_iter()
        .filter(|l| {
            l["src"].as_str().is_some_and(|s| s.starts_with(&client)) && l["event"] != "allow"
        })
        .collect();
    assert!(bad.is_empty(), "the allowed client was denied or cut: {:?}", &bad[..bad.len().min(5)]);
}

/// An open allowed connection; the policy is rewritten to deny it: revalidation cuts the
/// connection and the flow log's `revoked` event names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidate_cuts_and_logs_revoked() {
    let net = Net { client: "127.0.62.1", web: "127.0.62.2", other: "127.0.62.3" };
    let mut gate = Gate::start(net, "");
    let mut held = connect_from(net.client, gate.gw).await.unwrap();
    roundtrip(&mut held, b"before the change\n").await;
    let client_addr = held.local_addr().unwrap();
    let before = gate.generation();

    replace_file(&gate.path("policies/deny.yaml"), DENY_CLIENT);
    let t0 = Instant::now();
    expect_cut(&mut held, Duration::from_secs(5)).await;
    let cut_after = t0.elapsed();
    let after = gate.generation();
    assert!(after > before);
    expect_refused(net.client, gate.gw).await;
    // The counter is bumped when the reload that cut the flow finishes, a moment after the
    // cut itself.
    gate.wait("the revocation counter", Duration::from_secs(5), |g| {
        g.metric("flowgate_flows_revoked_total") >= 1.0
    });
    assert_eq!(gate.metric("flowgate_flows_revoked_total"), 1.0);

    let log = gate.stop_and_flow_log();
    let revoked: Vec<_> = log.iter().filter(|l| l["event"] == "revoked").collect();
    assert_eq!(revoked.len(), 1, "{log:?}");
    let r = revoked[0];
    assert_eq!(r["src"], client_addr.to_string(), "{r}");
    assert_eq!(r["dst"], gate.gw_upstream().to_string(), "{r}");
    assert_eq!(r["listener"], "gw", "{r}");
    assert_eq!(r["generation"], after, "{r}");
    assert!(r["policy"].as_str().is_some_and(|p| p.contains("deny-client")), "{r}");
    assert_eq!(r["src_workload"], "t/client", "{r}");
    eprintln!("revoked after {cut_after:?}: {r}");
}

/// One way to break the policy sources.
type Breakage = Box<dyn Fn(&Gate)>;

/// Bad YAML, a half-written file and a deleted inventory are each rejected; traffic goes
/// on under the last good generation; `/policy` and the metrics show the failure; fixing
/// the sources recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_policy_keeps_last_good() {
    let net = Net { client: "127.0.63.1", web: "127.0.63.2", other: "127.0.63.3" };
    let mut gate = Gate::start(net, "");
    let good = gate.generation();
    let mut held = connect_from(net.client, gate.gw).await.unwrap();
    roundtrip(&mut held, b"held\n").await;
    let allow = gate.path("policies/allow.yaml");
    let inventory_text = std::fs::read_to_string(gate.path("inventory.yaml")).unwrap();
    let full = allow_policy("good");
    let cut_at = full.find("{app: web}").unwrap() + 6;

    let breakages: [(&str, &str, Breakage); 3] = [
        (
            "bad YAML",
            "bad.yaml",
            Box::new(|g: &Gate| replace_file(&g.path("policies/bad.yaml"), "spec: [\n  {a: ")),
        ),
        (
            "half-written file",
            "allow.yaml",
            Box::new(move |_g: &Gate| std::fs::write(&allow, &full[..cut_at]).unwrap()),
        ),
        (
            "deleted inventory",
            "inventory.yaml",
            Box::new(|g: &Gate| std::fs::remove_file(g.path("inventory.yaml")).unwrap()),
        ),
    ];
    for (what, file, break_it) in &breakages {
        let errors = gate.metric("flowgate_policy_reloads_total{result=\"error\"}");
        break_it(&gate);
        gate.wait(&format!("{what} to be rejected"), Duration::from_secs(10), |g| {
            g.metric("flowgate_policy_reloads_total{result=\"error\"}") > errors
        });
        assert_eq!(gate.metric("flowgate_policy_reload_failing"), 1.0, "{what}");
        let p = gate.policy();
        assert_eq!(p["generation"], good, "{what}: the last good generation stays in force");
        let err = p["last_error"].to_string();
        assert!(err.contains(file), "{what}: /policy last_error names {file}: {p}");
        // Traffic goes on: the held connection and new ones.
        roundtrip(&mut held, what.as_bytes()).await;
        short_exchange(net.client, gate.gw, 1).await.unwrap();
        expect_refused(net.other, gate.gw).await;
    }

    // Fix everything; the watcher picks it up, no restart.
    std::fs::write(gate.path("inventory.yaml"), &inventory_text).unwrap();
    std::fs::remove_file(gate.path("policies/bad.yaml")).unwrap();
    replace_file(&gate.path("policies/allow.yaml"), &allow_policy("fixed"));
    gate.wait("recovery", Duration::from_secs(10), |g| {
        g.metric("flowgate_policy_reload_failing") == 0.0
    });
    let p = gate.policy();
    assert!(p["generation"].as_u64().unwrap() > good, "{p}");
    assert!(p["last_error"].is_null(), "{p}");
    roundtrip(&mut held, b"after the fix\n").await;
    short_exchange(net.client, gate.gw, 2).await.unwrap();
    let pid = gate.fg.pid();
    assert!(gate.fg.child.try_wait().unwrap().is_none(), "flowgate {pid} still the same process");
    let log = gate.stop_and_flow_log();
    let client = format!("{}:", net.client);
    assert!(
        !log.iter()
            .any(|l| l["src"].as_str().is_some_and(|s| s.starts_with(&client))
                && l["event"] != "allow"),
        "{log:?}"
    );
}

/// `flowgate quarantine 127.0.0.2 --ttl 2s` (the real CLI, admin address and token from
/// the config) cuts the client's open connection and refuses new ones; after the TTL it
/// connects again, with no file touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_cuts_and_expires() {
    let net = Net { client: "127.0.0.2", web: "127.0.64.2", other: "127.0.64.3" };
    let gate = Gate::start(net, "");
    let before = gate.generation();
    let mut held = connect_from(net.client, gate.gw).await.unwrap();
    roundtrip(&mut held, b"before\n").await;

    let config = gate.config.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["quarantine", "127.0.0.2", "--ttl", "2s", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let quarantined_at = Instant::now();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("quarantine 127.0.0.2 until "), "{stdout}");
    assert!(stdout.contains("1 open flow(s) cut"), "{stdout}");

    expect_cut(&mut held, Duration::from_secs(5)).await;
    expect_refused(net.client, gate.gw).await;
    assert!(gate.generation() > before);

    // The TTL runs out: the expiry timer reloads and the client is served again.
    let deadline = quarantined_at + Duration::from_secs(10);
    loop {
        if short_exchange(net.client, gate.gw, 0).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "still refused 10 s after a 2 s quarantine");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lifted_after = quarantined_at.elapsed();
    assert!(lifted_after >= Duration::from_millis(1500), "lifted too early: {lifted_after:?}");
    assert_eq!(gate.policy()["emergency"].as_array().map(Vec::len), Some(0));
    let audit = gate.json_lines("audit.log");
    assert!(audit.iter().any(|a| a["trigger"] == "expiry"), "{audit:?}");
    assert!(!audit.iter().any(|a| a["trigger"] == "watch"), "no file changed: {audit:?}");
    eprintln!("quarantine lifted after {lifted_after:?}");
}

/// Mutating calls without a token or with a wrong one get 401 and change nothing; bad JSON
/// gets 400 with a reason; the right token then does change things.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_auth() {
    let net = Net { client: "127.0.65.1", web: "127.0.65.2", other: "127.0.65.3" };
    let gate = Gate::start(net, "watch = false");
    let admin = gate.admin;
    let before = gate.generation();
    let audit_before = gate.audit_count();
    // A pending change only a reload would apply.
    std::fs::write(gate.path("policies/unrelated.yaml"), unrelated_policy(7)).unwrap();
    let quarantine = r#"{"quarantine": "127.0.65.1", "ttl": "1m"}"#;
    for token in [None, Some("wrong-token"), Some("")] {
        let (status, body) = http(admin, "POST", "/reload", token, None);
        assert_eq!(status, 401, "reload with {token:?}: {body}");
        let (status, body) = http(admin, "POST", "/emergency", token, Some(quarantine));
        assert_eq!(status, 401, "emergency with {token:?}: {body}");
        assert!(body.contains("bearer token"), "{body}");
    }
    assert_eq!(gate.generation(), before, "a refused call changed the generation");
    assert_eq!(gate.policy()["emergency"].as_array().map(Vec::len), Some(0));
    assert_eq!(gate.audit_count(), audit_before, "a refused call reached the reloader");
    short_exchange(net.client, gate.gw, 0).await.unwrap();
    assert!(gate.metric("flowgate_admin_rejected_total{reason=\"unauthorized\"}") >= 6.0);

    for bad in [r#"{"quarantine": "127.0.65.1", "ttl": "#, "not json", r#"{"ttl": 5}"#] {
        let (status, body) = http(admin, "POST", "/emergency", Some(TOKEN), Some(bad));
        assert_eq!(status, 400, "{bad}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    }
    let (_, body) = http(admin, "POST", "/emergency", Some(TOKEN), Some("not json"));
    assert!(body.contains("bad JSON"), "{body}");
    assert_eq!(gate.generation(), before);

    // The right token: the same calls take effect.
    let (status, body) = http(admin, "POST", "/reload", Some(TOKEN), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(gate.generation(), before + 1);
    let (status, body) = http(admin, "POST", "/emergency", Some(TOKEN), Some(quarantine));
    assert_eq!(status, 201, "{body}");
    expect_refused(net.client, gate.gw).await;
}

/// Connections keep opening while the policy flips to deny, again and again: once the
/// reload that denies the client has finished, not one of its connections may still be
/// served, whether it was established long before or admitted while the reload ran (the
/// newest 200 of each round are checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_under_load_leaves_no_flow_open() {
    const ROUNDS: usize = 10;
    const OPENERS: usize = 16;
    const HELD_MAX: usize = 200;
    let net = Net { client: "127.0.66.1", web: "127.0.66.2", other: "127.0.66.3" };
    let gate = Gate::start(net, "debounce = \"5ms\"");
    let deny = gate.path("policies/deny.yaml");
    let mut survivors = Vec::new();
    let mut held_total = 0;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::<TcpStream>::new()));
        let mut tasks = Vec::new();
        for _ in 0..OPENERS {
            let (stop, held, gw) = (stop.clone(), held.clone(), gate.gw);
            tasks.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                    let Ok(Ok(mut s)) =
                        tokio::time::timeout(Duration::from_secs(2), connect_from(net.client, gw))
                            .await
                    else {
                        continue;
                    };
                    let mut b = [0u8; 1];
                    let echoed = async {
                        s.write_all(b"x").await?;
                        s.read_exact(&mut b).await
                    };
                    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), echoed).await {
                        // The newest connections matter (those admitted around the swap);
                        // older ones are let go so descriptors stay bounded.
                        let mut held = held.lock().unwrap();
                        held.push_back(s);
                        if held.len() > HELD_MAX {
                            held.pop_front();
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let generation = gate.generation();
        let audit = gate.audit_count();
        replace_file(&deny, DENY_CLIENT);
        gate.wait("the deny reload", Duration::from_secs(10), |g| {
            g.audit_count() > audit && g.generation() > generation
        });
        // Openers go on for a moment under the new generation (refused now), then stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.store(true, Ordering::Release);
        for t in tasks {
            t.await.unwrap();
        }
        let streams = std::mem::take(&mut *held.lock().unwrap());
        held_total += streams.len();
        for (i, mut s) in streams.into_iter().enumerate() {
            let probe = async {
                s.write_all(b"y").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
                survivors.push(format!("round {round}, connection {i}"));
            }
        }
        let (generation, audit) = (gate.generation(), gate.audit_count());
        std::fs::remove_file(&deny).unwrap();
        gate.wait("the allow reload", Duration::from_secs(10), |g| {
            g.audit_count() > audit && g.generation() > generation
        });
    }
    eprintln!("{held_total} connections held across {ROUNDS} deny flips");
    assert!(held_total >= ROUNDS, "too few connections to mean anything: {held_total}");
    assert!(survivors.is_empty(), "still served after the deny: {survivors:?}");
}
