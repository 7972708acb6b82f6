//! The library's gateway, as `flowgate run` starts it: every part up from one config,
//! bound addresses reported, `/readyz` following the one readiness state (starting →
//! ready → draining), a flow admitted end to end, a reload through the admin API that cuts
//! the flow the new policy denies (cut once, logged once), and a drain that waits for the
//! open connection.

mod support;

use std::time::Duration;

use flowgate::admin::client::AdminClient;
use flowgate::config::Config;
use flowgate::dataplane::ReadyState;
use flowgate::gateway::Gateway;
use support::l4::client_web_policy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const TOKEN: &str = "gateway-test-token";

const INVENTORY: &str = "
namespaces:
  - name: t
workloads:
  - {name: client, namespace: t, labels: {app: client}, ips: [127.0.0.10]}
  - {name: web, namespace: t, labels: {app: web}, ips: [127.0.0.1]}
";

/// client → web allowed by both sides; default deny.
const POLICY: &str = client_web_policy!("t", "client-egress", "client");

fn config(dir: &std::path::Path, echo_port: u16) -> Config {
    std::fs::write(dir.join("inventory.yaml"), INVENTORY).unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/t.yaml"), POLICY).unwrap();
    let text = format!(
        "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\
         [flowlog]\noutput = \"flow.log\"\ndedupe_window = \"0s\"\n\
         [control]\nwatch = false\n\
         [admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\
         [[listener]]\nname = \"echo\"\nkind = \"echo\"\nbind = \"127.0.0.1:{echo_port}\"\n\
         [[listener]]\nname = \"gw\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
         upstreams = [\"127.0.0.1:{echo_port}\"]\n"
    );
    let path = dir.join("flowgate.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

/// A port free a moment ago, for the echo listener the tcp listener names as upstream.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn connect_from(src: &str, to: std::net::SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

fn flow_log(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("flow.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_serves_reloads_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(config(dir.path(), free_port())).expect("gateway starts");
    assert_eq!(gw.readiness().state(), ReadyState::Ready);
    assert_eq!(gw.listeners().len(), 2);
    let addr = gw.listener_addr("gw").expect("bound");
    assert_ne!(addr.port(), 0, "the real port");
    let admin = AdminClient::new(gw.admin_addr(), Some(TOKEN.into()));
    let r = admin.get("/readyz").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

    let mut s = connect_from("127.0.0.10", addr).await;
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await.unwrap().unwrap();
    assert_eq!(&b, b"ping");
    // The client's connection on `gw`, and its upstream leg on `echo`.
    assert_eq!(gw.open_connections(), 2);

    // A policy that no longer lets the client in: the reload is the one writer of the
    // policy, and its revalidation cuts the open flow once and logs it once.
    std::fs::write(
        dir.path().join("policies/t.yaml"),
        POLICY.replace("app: client}", "app: nobody}"),
    )
    .unwrap();
    let r = admin.post("/reload", None).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let report: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!((report["generation"].as_u64(), report["revoked"].as_u64()), (Some(2), Some(1)));
    assert_eq!(gw.runtime().generation().0, 2);
    let cut = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.unwrap();
    assert!(matches!(cut, Ok(0) | Err(_)), "cut: {cut:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let revoked = loop {
        let lines: Vec<_> =
            flow_log(dir.path()).into_iter().filter(|l| l["event"] == "revoked").collect();
        if !lines.is_empty() || tokio::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(revoked.len(), 1, "one revoked event: {revoked:?}");
    assert_eq!(revoked[0]["listener"], "gw");
    assert_eq!(revoked[0]["generation"], 2);

    // Drain: readiness says so at once, the admin API answers until the end.
    let mut held = TcpStream::connect(gw.listener_addr("echo").unwrap()).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).await.unwrap();
    gw.stop_accepting();
    assert_eq!(gw.readiness().state(), ReadyState::Draining);
    let r = admin.get("/readyz").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (503, "draining\n"));
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
    });
    let drained = gw.drain(Duration::from_secs(10)).await;
    assert!(drained.in_time, "{drained:?}");
    closer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_error_names_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), free_port());
    cfg.admin.bind = "0.0.0.0:0".parse().unwrap();
    cfg.admin.token = None;
    let err = Gateway::start(cfg).expect_err("no token on a non-loopback admin address");
    assert!(err.to_string().contains("without a token"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(dir.path(), free_port());
    cfg.admin.bind = taken.local_addr().unwrap();
    let err = Gateway::start(cfg).expect_err("the admin port is taken");
    let chain: Vec<String> =
        std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
            .map(|e| e.to_string())
            .collect();
    assert!(chain[0].starts_with("admin: cannot bind"), "{chain:?}");
    assert!(chain.iter().any(|m| m.contains("in use")), "the cause is kept: {chain:?}");
    assert!(!chain[0].contains("in use"), "and said once: {chain:?}");

    let port = taken.local_addr().unwrap().port();
    let err = Gateway::start(config(dir.path(), port)).expect_err("the echo port is taken");
    assert!(err.to_string().contains("listener echo: cannot bind"), "{err}");
}
