//! A fleet on etcd, with real processes: a three-member etcd cluster on loopback, three
//! `flowgate` replicas (the real binary) with `[source] kind = "etcd"`, a real HAProxy
//! balancing over them with PROXY v2, and `flowgate push` / `flowgate fleet status` run as
//! commands. Clients bound to 127.0.0.2 (allowed from the start) and 127.0.0.3 (allowed
//! only by the second policy version) connect through HAProxy to an echo server.
//!
//! Skipped, saying so, when `etcd` or `haproxy` is not installed (scripts/setup.sh installs
//! both); in CI that fails the test instead.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowgate::admin::client::AdminClient;
use support::etcd::Cluster;
use support::process::Flowgate;
use support::require::{Need, skip_unless};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const ALLOWED: &str = "127.0.0.2";
const LATER: &str = "127.0.0.3";
const WEB: &str = "127.0.0.20";
const PREFIX: &str = "/fleet-test";
const TOKEN: &str = "fleet-admin-token";

const INVENTORY: &str = r#"
namespaces:
  - name: hp
workloads:
  - {name: allowed, namespace: hp, labels: {app: allowed}, ips: [127.0.0.2]}
  - {name: later, namespace: hp, labels: {app: later}, ips: [127.0.0.3]}
  - {name: web, namespace: hp, labels: {app: web}, ips: [127.0.0.20]}
"#;

/// Version 1: only `allowed` reaches `web`. Version 2 adds `later` (two objects: its egress
/// and a second ingress on `web`, which must arrive together).
fn policy_files(v2: bool) -> Vec<(&'static str, String)> {
    let mut files = vec![(
        "allowed.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: allowed-egress, namespace: hp}\nspec:\n  podSelector: {matchLabels: {app: allowed}}\n  \
         policyTypes: [Egress]\n  egress:\n    - to: [{podSelector: {matchLabels: {app: web}}}]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: web-ingress, namespace: hp}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  \
         policyTypes: [Ingress]\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: allowed}}}]\n"
            .to_owned(),
    )];
    if v2 {
        files.push((
            "later-egress.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: later-egress, namespace: hp}\nspec:\n  podSelector: {matchLabels: {app: later}}\n  \
             policyTypes: [Egress]\n  egress:\n    - to: [{podSelector: {matchLabels: {app: web}}}]\n"
                .to_owned(),
        ));
        files.push((
            "later-ingress.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: web-from-later, namespace: hp}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  \
             policyTypes: [Ingress]\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: later}}}]\n"
                .to_owned(),
        ));
    }
    files
}

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

struct Fleet {
    dir: PathBuf,
    cluster: Cluster,
    replicas: Vec<Flowgate>,
    admins: Vec<SocketAddr>,
    listeners: Vec<SocketAddr>,
}

impl Fleet {
    /// etcd (3 members), version 1 pushed, `n` replicas started on it.
    fn start(dir: &Path, n: usize, upstream: SocketAddr) -> Fleet {
        let cluster = Cluster::start(dir, 3);
        let mut fleet = Fleet {
            dir: dir.to_owned(),
            cluster,
            replicas: Vec::new(),
            admins: Vec::new(),
            listeners: Vec::new(),
        };
        fleet.push(false).expect("first push");
        for i in 0..n {
            let cfg = format!(
                "[policy]\ndefault = \"deny\"\n\n[source]\nkind = \"etcd\"\nendpoints = [{eps}]\n\
                 prefix = \"{PREFIX}\"\nreplica_id = \"r{i}\"\nreport_ttl = \"10s\"\ndial_timeout = \"1s\"\n\n\
                 [flowlog]\noutput = \"flow-{i}.log\"\n\n[run]\ndrain_timeout = \"1s\"\n\n\
                 [admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
                 [[listener]]\nname = \"behind-lb\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
                 upstreams = [\"{upstream}\"]\nproxy_protocol = \"any\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
                eps = fleet
                    .cluster
                    .urls()
                    .iter()
                    .map(|u| format!("\"{u}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            let path = dir.join(format!("r{i}.toml"));
            std::fs::write(&path, cfg).expect("write config");
            let mut fg = Flowgate::run(&path);
            fleet.listeners.push(fg.listener("behind-lb"));
            fleet.admins.push(fg.admin());
            fg.wait_ready();
            fleet.replicas.push(fg);
        }
        fleet
    }

    /// Writes version 1 or 2 into a fresh directory and pushes it; the revision printed.
    fn push(&self, v2: bool) -> Result<i64, String> {
        let pdir = self.dir.join(if v2 { "v2" } else { "v1" });
        let _ = std::fs::remove_dir_all(&pdir);
        std::fs::create_dir_all(&pdir).expect("mkdir");
        for (name, text) in policy_files(v2) {
            std::fs::write(pdir.join(name), text).expect("write policy");
        }
        let inv = self.dir.join("inventory.yaml");
        std::fs::write(&inv, INVENTORY).expect("write inventory");
        self.push_dir(&pdir, &inv)
    }

    fn push_dir(&self, pdir: &Path, inv: &Path) -> Result<i64, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .arg("push")
            .arg(pdir)
            .arg("--inventory")
            .arg(inv)
            .arg("--endpoints")
            .arg(self.cluster.endpoints())
            .arg("--prefix")
            .arg(PREFIX)
            .output()
            .expect("run flowgate push");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!("{}{}", stdout, String::from_utf8_lossy(&out.stderr)));
        }
        stdout
            .split_whitespace()
            .nth(2)
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| format!("push printed {stdout:?}"))
    }

    /// `flowgate fleet status --json`: exit code and answer.
    fn status(&self) -> (i32, serde_json::Value) {
        let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["fleet", "status", "--json", "--expect", "0", "--prefix", PREFIX])
            .arg("--endpoints")
            .arg(self.cluster.endpoints())
            .output()
            .expect("run flowgate fleet status");
        let code = out.status.code().unwrap_or(-1);
        let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (code, v)
    }

    /// Waits (bounded) until every replica's `/policy` says it enforces `revision` or later.
    async fn wait_all_at(&self, revision: i64, within: Duration) {
        let deadline = Instant::now() + within;
        for admin in &self.admins {
            loop {
                let r = policy_of(*admin).await["source"]["revision"].as_i64().unwrap_or(0);
                if r >= revision {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {admin} at revision {r}, not {revision}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn policy_of(admin: SocketAddr) -> serde_json::Value {
    let a = AdminClient::new(admin, None).get("/policy").await.expect("GET /policy");
    serde_json::from_str(&a.body).expect("JSON")
}

async fn readyz_of(admin: SocketAddr) -> (u16, String) {
    let a = AdminClient::new(admin, None).get("/readyz").await.expect("GET /readyz");
    (a.status, a.body)
}

/// An echo server on 127.0.0.20.
async fn echo_upstream() -> SocketAddr {
    let up = TcpListener::bind(format!("{WEB}:0")).await.expect("bind upstream");
    let addr = up.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = up.accept().await else { continue };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// HAProxy round-robin over `servers`, sending PROXY v2; its frontend address.
async fn start_haproxy(dir: &Path, servers: &[SocketAddr]) -> (Proc, SocketAddr) {
    let port = free_port();
    let mut cfg = format!(
        "global\n  maxconn 100\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
         timeout server 30s\n\nlisten fleet\n  bind 127.0.0.1:{port}\n  balance roundrobin\n"
    );
    for (i, s) in servers.iter().enumerate() {
        cfg.push_str(&format!("  server r{i} {s} send-proxy-v2\n"));
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write haproxy config");
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn haproxy");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "haproxy not listening on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (Proc(child), addr)
}

/// Whether a connection from `src` through `via` gets its bytes echoed (allowed) or is
/// closed without them (denied).
async fn passes(src: &str, via: SocketAddr) -> bool {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(format!("{src}:0").parse().expect("source address")).expect("bind source");
    let Ok(mut c) = s.connect(via).await else { return false };
    if c.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut back)).await,
        Ok(Ok(_)) if &back == b"ping"
    )
}

/// Each of `rounds` connections through HAProxy (round robin: every replica is hit).
async fn all_pass(src: &str, via: SocketAddr, rounds: usize) -> Vec<bool> {
    let mut out = Vec::new();
    for _ in 0..rounds {
        out.push(passes(src, via).await);
    }
    out
}

/// A connection straight to one replica's listener from 127.0.0.1 (a trusted proxy),
/// claiming client `src` in a PROXY v1 header (a source port of its own, so no two flows
/// share a key); open once its first bytes came back.
async fn connect_direct(src: &str, replica: SocketAddr) -> Option<TcpStream> {
    static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(20000);
    let port = PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut c = TcpStream::connect(replica).await.ok()?;
    let header = format!("PROXY TCP4 {src} {} {port} {}\r\n", replica.ip(), replica.port());
    c.write_all(header.as_bytes()).await.ok()?;
    c.write_all(b"ping").await.ok()?;
    let mut back = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut back)).await {
        Ok(Ok(_)) if &back == b"ping" => Some(c),
        _ => None,
    }
}

/// Whether each replica, asked directly, lets `src` through.
async fn direct_passes(src: &str, replicas: &[SocketAddr]) -> Vec<bool> {
    let mut out = Vec::new();
    for r in replicas {
        out.push(connect_direct(src, *r).await.is_some());
    }
    out
}

/// Waits (bounded) until every replica, asked directly, answers `want` for `src`.
async fn wait_direct(src: &str, replicas: &[SocketAddr], want: bool, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = direct_passes(src, replicas).await;
        if got.iter().all(|&p| p == want) {
            return;
        }
        assert!(Instant::now() < deadline, "{src} through each replica: {got:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether an open connection was cut: it stops echoing and ends (bounded wait).
async fn is_cut(c: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if c.write_all(b"ping").await.is_err() {
            return true;
        }
        let mut back = [0u8; 4];
        match tokio::time::timeout(Duration::from_millis(300), c.read(&mut back)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            _ => {}
        }
    }
    false
}

fn admin(addr: SocketAddr) -> AdminClient {
    AdminClient::new(addr, Some(TOKEN.to_owned()))
}

fn needs() -> bool {
    skip_unless(&[Need::Bin("etcd"), Need::Bin("haproxy")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_reaches_every_replica_and_traffic_through_haproxy_sees_it() {
    if needs() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let up = echo_upstream().await;
    let fleet = Fleet::start(dir.path(), 3, up);
    let (_ha, via) = start_haproxy(dir.path(), &fleet.listeners).await;

    assert_eq!(all_pass(ALLOWED, via, 6).await, vec![true; 6], "allowed client, version 1");
    assert_eq!(all_pass(LATER, via, 6).await, vec![false; 6], "later client, version 1");

    let rev = fleet.push(true).expect("push version 2");
    fleet.wait_all_at(rev, Duration::from_secs(5)).await;
    assert_eq!(all_pass(LATER, via, 6).await, vec![true; 6], "later client, version 2");
    assert_eq!(all_pass(ALLOWED, via, 6).await, vec![true; 6], "allowed client, version 2");

    let hashes: Vec<String> = {
        let mut h = Vec::new();
        for a in &fleet.admins {
            h.push(policy_of(*a).await["hash"].as_str().unwrap_or_default().to_owned());
        }
        h
    };
    assert!(hashes.iter().all(|h| h == &hashes[0] && !h.is_empty()), "hashes differ: {hashes:?}");
    let (code, status) = fleet.status();
    assert_eq!(code, 0, "fleet status: {status}");
    assert_eq!(status["replicas"].as_array().map(Vec::len), Some(3), "{status}");
    assert_eq!(status["latest_revision"].as_i64(), Some(rev), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_shows_as_drifting_within_2s_and_catches_up() {
    if needs() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let up = echo_upstream().await;
    let fleet = Fleet::start(dir.path(), 3, up);
    let (code, status) = fleet.status();
    assert_eq!(code, 0, "in step before: {status}");

    fleet.replicas[1].signal(libc::SIGSTOP);
    let rev = fleet.push(true).expect("push version 2");
    let pushed = Instant::now();
    let drifting = loop {
        let (code, status) = fleet.status();
        if code == 3 {
            break status;
        }
        assert!(pushed.elapsed() < Duration::from_secs(2), "no drift shown within 2 s: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let shown = pushed.elapsed();
    let replicas = drifting["replicas"].as_array().cloned().unwrap_or_default();
    let drifted: Vec<&str> = replicas
        .iter()
        .filter(|r| r["drifting"] == true)
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(drifted, vec!["r1"], "{drifting}");
    eprintln!("drift shown {shown:?} after the push");

    fleet.replicas[1].signal(libc::SIGCONT);
    fleet.wait_all_at(rev, Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, status) = fleet.status();
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still drifting after SIGCONT: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_replicas_keep_enforcing_and_the_next_push_arrives_when_it_returns() {
    if needs() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let up = echo_upstream().await;
    let mut fleet = Fleet::start(dir.path(), 3, up);
    let (_ha, via) = start_haproxy(dir.path(), &fleet.listeners).await;

    for i in 0..3 {
        fleet.cluster.kill_member(i);
    }
    for admin in fleet.admins.clone() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (code, body) = readyz_of(admin).await;
            if body.contains("etcd unreachable") {
                assert_eq!(code, 200, "still ready (enforcing the last policy): {body}");
                break;
            }
            assert!(Instant::now() < deadline, "{admin} /readyz does not say etcd is away: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(policy_of(admin).await["source"]["connected"], false);
    }
    assert_eq!(all_pass(ALLOWED, via, 6).await, vec![true; 6], "allowed still allowed");
    assert_eq!(all_pass(LATER, via, 6).await, vec![false; 6], "denied still denied");

    for i in 0..3 {
        fleet.cluster.start_member(i);
    }
    fleet.cluster.wait_writable();
    let rev = fleet.push(true).expect("push version 2");
    fleet.wait_all_at(rev, Duration::from_secs(10)).await;
    assert_eq!(all_pass(LATER, via, 6).await, vec![true; 6], "the push after etcd returned");
    for admin in &fleet.admins {
        assert_eq!(policy_of(*admin).await["source"]["connected"], true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_past_a_replicas_revision_is_recovered_by_a_relist() {
    if needs() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let up = echo_upstream().await;
    let mut fleet = Fleet::start(dir.path(), 1, up);
    let before = policy_of(fleet.admins[0]).await["source"]["revision"].as_i64().unwrap_or(0);

    // Stopped, its watch connection is cut under it (etcd restarted) and the history it
    // would resume from is compacted away meanwhile.
    fleet.replicas[0].signal(libc::SIGSTOP);
    for i in 0..3 {
        fleet.cluster.kill_member(i);
    }
    for i in 0..3 {
        fleet.cluster.start_member(i);
    }
    fleet.cluster.wait_writable();
    let rev = fleet.push(true).expect("push version 2");
    let rt_client = fleet.cluster.client();
    let last = fleet.push(false).expect("push version 1 again").max(rev);
    let rev2 = fleet.push(true).expect("push version 2 again");
    rt_client.compact(rev2).await.expect("compact");
    assert!(rev2 > before + 1 && last < rev2);

    fleet.replicas[0].signal(libc::SIGCONT);
    fleet.wait_all_at(rev2, Duration::from_secs(10)).await;
    let p = policy_of(fleet.admins[0]).await;
    assert_eq!(p["counts"]["policies"], 4, "version 2 in force after the re-list: {p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_during_pushes_loses_nothing_and_applies_nothing_by_halves() {
    if needs() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let up = echo_upstream().await;
    let mut fleet = Fleet::start(dir.path(), 3, up);
    let inv = dir.path().join("inventory.yaml");
    std::fs::write(&inv, INVENTORY).expect("inventory");
    // Each push renames the pair of later-* objects: a replica that saw half a push would
    // hold 3 or 5 policies, never 4 or 2.
    let mut last = 0;
    let mut first: Option<i64> = None;
    let mut killed = None;
    for k in 0..12 {
        let pdir = dir.path().join(format!("k{k}"));
        std::fs::create_dir_all(&pdir).expect("mkdir");
        for (name, text) in policy_files(true) {
            let text = text.replace("name: later-egress", &format!("name: later-egress-{k}"));
            let text = text.replace("name: web-from-later", &format!("name: web-from-later-{k}"));
            std::fs::write(pdir.join(format!("{k}-{name}")), text).expect("write");
        }
        if k == 4 {
            let leader = fleet.cluster.leader().expect("a leader");
            fleet.cluster.kill_member(leader);
            killed = Some(leader);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        last = loop {
            match fleet.push_dir(&pdir, &inv) {
                Ok(r) => break r,
                Err(e) => {
                    assert!(Instant::now() < deadline, "push {k} never went through: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        first.get_or_insert(last);
        // Every replica, at every point it is asked, holds a whole push: version 1 (2
        // policies) before it applied the first of these pushes, 4 after — never 3 or 5.
        // The revision comes from the same snapshot as the policy, so they pair exactly:
        // 4 policies at the first push's revision or later, 2 before it.
        for admin in &fleet.admins {
            let p = policy_of(*admin).await;
            let n = p["counts"]["policies"].as_i64().unwrap_or(0);
            let at = p["source"]["revision"].as_i64().unwrap_or(0);
            let applied = first.is_some_and(|f| at >= f);
            assert!(
                (n == 4 && applied) || (n == 2 && !applied),
                "{admin} at revision {at} holds {n} policies after push {k}"
            );
        }
    }
    fleet.wait_all_at(last, Duration::from_secs(10)).await;
    let mut hashes = Vec::new();
    for admin in &fleet.admins {
        let p = policy_of(*admin).await;
        assert_eq!(p["counts"]["policies"], 4, "{p}");
        hashes.push(p["hash"].as_str().unwrap_or_default().to_owned());
    }
    assert!(hashes.iter().all(|h| h == &hashes[0]), "replicas disagree: {hashes:?}");
    if let Some(i) = killed {
        fleet.cluster.start_member(i);
    }
    let (code, status) = fleet.status();
    assert_eq!(code, 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_posted_to_one_replica_cuts_and_refuses_the_address_on_all_three() {
    if needs() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let up = echo_upstream().await;
    let mut fleet = Fleet::start(dir.path(), 3, up);
    let (_ha, via) = start_haproxy(dir.path(), &fleet.listeners).await;
    assert_eq!(direct_passes(ALLOWED, &fleet.listeners).await, vec![true; 3], "before");
    let mut established =
        connect_direct(ALLOWED, fleet.listeners[2]).await.expect("open a flow on replica 3");

    // Posted to replica 1: stored in etcd, enforced by all three.
    let body = serde_json::json!({"quarantine": ALLOWED, "ttl": "5m"}).to_string();
    let a = admin(fleet.admins[0]).post("/emergency", Some(body)).await.expect("POST");
    assert_eq!(a.status, 201, "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("JSON");
    assert_eq!(v["scope"], "fleet", "{v}");
    assert!(v.get("warning").is_none(), "{v}");
    let id = v["id"].as_str().expect("an id").to_owned();
    assert!(is_cut(&mut established, Duration::from_secs(5)).await, "flow on replica 3 not cut");
    wait_direct(ALLOWED, &fleet.listeners, false, Duration::from_secs(5)).await;
    assert_eq!(all_pass(ALLOWED, via, 6).await, vec![false; 6], "through HAProxy, quarantined");
    for a in &fleet.admins {
        let p = policy_of(*a).await;
        let ids: Vec<&str> = p["emergency"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["id"].as_str())
            .collect();
        assert_eq!(ids, vec![id.as_str()], "{a}: {p}");
    }

    // Lifted through another replica: restored everywhere.
    let a = admin(fleet.admins[1])
        .request(hyper::Method::DELETE, &format!("/emergency/{id}"), None)
        .await
        .expect("DELETE");
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("\"fleet\""), "{}", a.body);
    wait_direct(ALLOWED, &fleet.listeners, true, Duration::from_secs(5)).await;
    assert_eq!(all_pass(ALLOWED, via, 6).await, vec![true; 6], "through HAProxy, lifted");
    let a = admin(fleet.admins[2])
        .request(hyper::Method::DELETE, &format!("/emergency/{id}"), None)
        .await
        .expect("DELETE again");
    assert_eq!(a.status, 404, "lifted already: {}", a.body);

    // A short one expires on every replica (etcd drops its key with the lease).
    let body = serde_json::json!({"quarantine": ALLOWED, "ttl": "2s"}).to_string();
    let a = admin(fleet.admins[2]).post("/emergency", Some(body)).await.expect("POST");
    assert_eq!(a.status, 201, "{}", a.body);
    wait_direct(ALLOWED, &fleet.listeners, false, Duration::from_secs(2)).await;
    wait_direct(ALLOWED, &fleet.listeners, true, Duration::from_secs(8)).await;
    let keys = fleet.cluster.client();
    let prefix = format!("{PREFIX}/emergency/");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = keys
            .range(&prefix, &flowgate::control::etcd::prefix_end(&prefix), true)
            .await
            .expect("range");
        if left.kvs.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the expired entry's key stays in etcd");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // etcd away: the replica asked still protects itself, and says it is alone.
    for i in 0..3 {
        fleet.cluster.kill_member(i);
    }
    let body = serde_json::json!({"quarantine": ALLOWED, "ttl": "5m"}).to_string();
    let a = admin(fleet.admins[0]).post("/emergency", Some(body)).await.expect("POST");
    assert_eq!(a.status, 201, "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("JSON");
    assert_eq!(v["scope"], "local", "{v}");
    assert!(v["warning"].as_str().is_some_and(|w| w.contains("this replica only")), "{v}");
    assert_eq!(
        direct_passes(ALLOWED, &fleet.listeners).await,
        vec![false, true, true],
        "local only while etcd is away"
    );
}

/// An answer or watch message over the client's limit is refused with an error naming the
/// knob (not buffered, not retried on another member); under the limit it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_answer_over_the_size_limit_is_refused_with_a_clear_error() {
    if needs() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(dir.path(), 1);
    let small = || cluster.client().with_max_answer(16 * 1024);
    let big = vec![b'x'; 32 * 1024];
    let key = format!("{PREFIX}/big");
    cluster.client().put(&key, b"small", 0).await.expect("put");
    assert_eq!(small().range(&key, "", false).await.expect("a small answer").kvs.len(), 1);

    let mut watch = small().watch(&key, "", 0).await.expect("watch");
    cluster.client().put(&key, &big, 0).await.expect("put a 32 KiB value");
    let err = small().range(&key, "", false).await.expect_err("over the limit");
    assert!(
        matches!(err, flowgate::control::etcd::EtcdError::TooLarge { limit: 16384, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("source.max_answer_bytes"), "{err}");
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch.next().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        }
    })
    .await
    .expect("the watch answers within 10 s");
    assert!(
        matches!(seen, flowgate::control::etcd::EtcdError::TooLarge { .. }),
        "the watch message is over the limit too: {seen}"
    );
    let ok = cluster.client().range(&key, "", false).await.expect("the default limit");
    assert_eq!(ok.kvs[0].value.len(), big.len());
}

/// A push diffs against the manifest the previous push wrote (unchanged objects are not
/// rewritten), and a key changed by hand behind the manifest's back is noticed: the values
/// are read then, and the push restores what the directory says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_diffs_against_the_manifest_and_notices_keys_changed_by_hand() {
    if needs() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let fleet = Fleet {
        dir: dir.path().to_owned(),
        cluster: Cluster::start(dir.path(), 1),
        replicas: Vec::new(),
        admins: Vec::new(),
        listeners: Vec::new(),
    };
    let client = fleet.cluster.client();
    let object = format!("{PREFIX}/policy/objects/allowed.yaml");
    let first = fleet.push(false).expect("first push");
    let manifest = client.range(&format!("{PREFIX}/manifest"), "", false).await.expect("range");
    assert_eq!(manifest.kvs.len(), 1, "the push wrote its manifest");
    let written = client.range(&object, "", false).await.expect("range").kvs[0].mod_revision;
    assert_eq!(written, first);

    let second = fleet.push(false).expect("the same again");
    assert!(second > first);
    let now = client.range(&object, "", false).await.expect("range").kvs[0].mod_revision;
    assert_eq!(now, first, "an unchanged object is not rewritten");

    // Deleted by hand: the manifest still lists it, the listing does not.
    client
        .txn(&[], &[flowgate::control::etcd::TxnOp::Delete { key: object.clone() }])
        .await
        .expect("delete by hand");
    fleet.push(false).expect("push after the hand edit");
    let back = client.range(&object, "", false).await.expect("range");
    assert_eq!(back.kvs.len(), 1, "the push restored the object deleted by hand");
}
