//! `flowgate generate` round trip with the real binary: a gateway in observe mode
//! (`policy.mode = "observe"`, no policy) carries a known set of flows between inventory
//! workloads on loopback addresses, from an external address and to one; the flow log it
//! writes goes through `flowgate generate`; the result passes `flowgate check` with no
//! warning (and the Kubernetes OpenAPI schema, with `kubernetes-validate`), allows every
//! observed flow with `default: deny` (`flowgate test`), refuses what was not observed, and
//! `flowgate diff` against a hand-written policy allowing exactly the observed set shows
//! no change.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use support::process::{Flowgate, free_port};
use support::require::{Need, have};

const INVENTORY: &str = "\
namespaces:
  - {name: shop, labels: {team: shop}}
  - {name: data, labels: {team: data}}
workloads:
  - {name: client-a, namespace: shop, labels: {app: client-a}, ips: [127.0.0.11]}
  - {name: client-b, namespace: shop, labels: {app: client-b}, ips: [127.0.0.12]}
  - {name: web, namespace: shop, labels: {app: web}, ips: [127.0.0.21]}
  - {name: db, namespace: data, labels: {app: db}, ips: [127.0.0.22]}
";

/// One echoed exchange from `src` through the listener at `via`.
fn exchange(src: &str, via: SocketAddr) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(src.parse().unwrap(), 0).into()).unwrap();
    s.connect_timeout(&via.into(), Duration::from_secs(5)).unwrap();
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap_or_else(|e| panic!("{src} via {via}: not echoed: {e}"));
    assert_eq!(&buf, b"ping\n");
}

fn flowgate(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the flowgate binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn observe_generate_check_and_diff_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("inventory.yaml"), INVENTORY).unwrap();
    std::fs::create_dir(dir.join("policies")).unwrap();
    let (web_port, db_port, ext_port) =
        (free_port("127.0.0.21"), free_port("127.0.0.22"), free_port("127.0.0.60"));
    let config = format!(
        "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\nmode = \"observe\"\n\
         [flowlog]\noutput = \"flows.jsonl\"\ndedupe_window = \"10s\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"to-web\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.21:{web_port}\"]\n\
         [[listener]]\nname = \"to-db\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.22:{db_port}\"]\n\
         [[listener]]\nname = \"to-ext\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.60:{ext_port}\"]\n\
         [[listener]]\nname = \"web\"\nkind = \"echo\"\nbind = \"127.0.0.21:{web_port}\"\n\
         [[listener]]\nname = \"db\"\nkind = \"echo\"\nbind = \"127.0.0.22:{db_port}\"\n\
         [[listener]]\nname = \"ext\"\nkind = \"echo\"\nbind = \"127.0.0.60:{ext_port}\"\n"
    );
    std::fs::write(dir.join("flowgate.toml"), config).unwrap();
    let mut gw = Flowgate::run(&dir.join("flowgate.toml"));
    let l = gw.listeners();
    // The observed set: a → web (twice), b → web, a → db, 127.0.0.50 → web, a → external.
    exchange("127.0.0.11", l["to-web"]);
    exchange("127.0.0.11", l["to-web"]);
    exchange("127.0.0.12", l["to-web"]);
    exchange("127.0.0.11", l["to-db"]);
    exchange("127.0.0.50", l["to-web"]);
    exchange("127.0.0.11", l["to-ext"]);
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(dir.join("flows.jsonl")).unwrap();
    assert_eq!(log.matches("\"event\":\"allow\"").count(), 5, "{log}");

    let (code, out, err) = flowgate(
        dir,
        &["generate", "--flowlog", "flows.jsonl", "--inventory", "inventory.yaml", "--out", "gen"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gen/shop.yaml") && out.contains("gen/data.yaml"), "{out}");
    let shop = std::fs::read_to_string(dir.join("gen/shop.yaml")).unwrap();
    assert!(shop.contains("# 2 flow(s) observed, first at"), "{shop}");
    assert!(shop.contains("cidr: 127.0.0.50/32") && shop.contains("cidr: 127.0.0.60/32"), "{shop}");

    // Lint clean.
    let (code, _, err) =
        flowgate(dir, &["check", "--policies", "gen", "--inventory", "inventory.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning:"), "{err}");

    // Every observed flow allowed under default deny; an unobserved one refused.
    let cases = format!(
        "cases:\n\
         - {{from: shop/client-a, to: shop/web, port: {web_port}, expect: allow}}\n\
         - {{from: shop/client-b, to: shop/web, port: {web_port}, expect: allow}}\n\
         - {{from: shop/client-a, to: data/db, port: {db_port}, expect: allow}}\n\
         - {{from: 127.0.0.50, to: shop/web, port: {web_port}, expect: allow}}\n\
         - {{from: shop/client-a, to: 127.0.0.60, port: {ext_port}, expect: allow}}\n\
         - {{from: shop/client-b, to: data/db, port: {db_port}, expect: deny}}\n\
         - {{from: shop/client-a, to: shop/web, port: {db_port}, expect: deny}}\n\
         - {{from: 127.0.0.51, to: shop/web, port: {web_port}, expect: deny}}\n"
    );
    std::fs::write(dir.join("cases.yaml"), cases).unwrap();
    let (code, out, err) = flowgate(
        dir,
        &[
            "test",
            "cases.yaml",
            "--policies",
            "gen",
            "--inventory",
            "inventory.yaml",
            "--default",
            "deny",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");

    // Exactly the observed set, written by hand: the diff shows nothing.
    let np = |name: &str, ns: &str, app: &str, dir: &str, peer: &str, port: u16| {
        let (types, key, field) =
            if dir == "in" { ("Ingress", "ingress", "from") } else { ("Egress", "egress", "to") };
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  policyTypes: [{types}]\n  {key}:\n  - {field}: [{peer}]\n    ports: [{{port: {port}}}]\n"
        )
    };
    let pod = |app: &str| format!("{{podSelector: {{matchLabels: {{app: {app}}}}}}}");
    let other_ns = |ns: &str, app: &str| {
        format!(
            "{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}, podSelector: {{matchLabels: {{app: {app}}}}}}}"
        )
    };
    let exact = [
        np("a-web", "shop", "client-a", "out", &pod("web"), web_port),
        np("b-web", "shop", "client-b", "out", &pod("web"), web_port),
        np("a-db", "shop", "client-a", "out", &other_ns("data", "db"), db_port),
        np("a-ext", "shop", "client-a", "out", "{ipBlock: {cidr: 127.0.0.60/32}}", ext_port),
        np("web-a", "shop", "web", "in", &pod("client-a"), web_port),
        np("web-b", "shop", "web", "in", &pod("client-b"), web_port),
        np("web-ext", "shop", "web", "in", "{ipBlock: {cidr: 127.0.0.50/32}}", web_port),
        np("db-a", "data", "db", "in", &other_ns("shop", "client-a"), db_port),
    ]
    .concat();
    std::fs::create_dir(dir.join("exact")).unwrap();
    std::fs::write(dir.join("exact/observed.yaml"), exact).unwrap();
    let (code, out, err) = flowgate(
        dir,
        &[
            "diff",
            "--from",
            "exact",
            "--to",
            "gen",
            "--inventory",
            "inventory.yaml",
            "--default",
            "deny",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "no reachability change", "{out}");
    // The diff can see a difference: without the generated policies, the flows close.
    let (code, out, _) = flowgate(
        dir,
        &[
            "diff",
            "--from",
            "gen",
            "--to",
            "policies",
            "--inventory",
            "inventory.yaml",
            "--default",
            "deny",
        ],
    );
    assert_eq!(code, 0);
    assert!(out.contains(&format!("closed: shop/client-a → shop/web {web_port}/TCP")), "{out}");

    // The Kubernetes OpenAPI schema of a current release.
    if have(&Need::Bin("kubernetes-validate")) {
        for f in ["gen/shop.yaml", "gen/data.yaml"] {
            let out = Command::new("kubernetes-validate")
                .args(["--strict", f])
                .current_dir(dir)
                .output()
                .expect("kubernetes-validate runs");
            assert!(
                out.status.success(),
                "{f}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
