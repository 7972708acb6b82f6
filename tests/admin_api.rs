//! The admin API over real HTTP on a loopback TCP port: every endpoint, the bearer token
//! (401 and nothing changes), bad JSON (400 with a reason), `/explain` agreeing with
//! `CompiledPolicy::explain`, and an emergency quarantine that cuts a flow and expires on
//! time without any file change. curl is used as the client where it is installed (a real,
//! independent HTTP peer); the crate's own client otherwise and for the CLI paths.

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flowgate::admin::client::AdminClient;
use flowgate::admin::{AdminError, AdminState};
use flowgate::dataplane::Readiness;
use flowgate::flow::Proto;
use flowgate::policy::FlowQuery;
use serde_json::Value;
use support::control::*;

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `curl` → (status, body). Blocking, so run it off the runtime's threads.
async fn curl(args: Vec<String>) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}"])
            .args(&args)
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    })
    .await
    .unwrap()
}

async fn setup() -> (Fixture, flowgate::control::ControlPlane, Started) {
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    let control = fx.control();
    let tasks = start(&control);
    (fx, control, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_endpoints() {
    let (fx, control, tasks) = setup().await;
    let c = AdminClient::new(tasks.admin_addr, None);

    let h = c.get("/healthz").await.unwrap();
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    assert_eq!(c.get("/readyz").await.unwrap().status, 503, "listeners not bound yet");
    tasks.readiness.set_ready();
    assert_eq!(c.get("/readyz").await.unwrap().status, 200);
    tasks.readiness.set_draining();
    let r = c.get("/readyz").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (503, "draining\n"), "says so while draining");

    let p = json(&c.get("/policy").await.unwrap().body);
    assert_eq!(p["generation"], 1);
    assert_eq!(p["counts"]["workloads"], 2);
    assert_eq!(p["counts"]["policies"], 1);
    assert_eq!(p["hash"].as_str().unwrap().len(), 64);
    assert!(p["sources"]["inventory"].as_str().unwrap().ends_with("inventory.yaml"));
    assert!(p["last_error"].is_null());

    fx.track_named("127.0.10.1:40000", "127.0.10.2:5432", 1, Some("db.test"));
    fx.track("127.0.10.2:40001", "127.0.10.1:80", 1);
    fx.track("198.51.100.7:40002", "127.0.10.1:80", 1);
    let all = json(&c.get("/flows").await.unwrap().body);
    assert_eq!(all["total"], 3);
    assert_eq!(all["flows"].as_array().unwrap().len(), 3);
    let by_src = json(&c.get("/flows?src=127.0.10.1").await.unwrap().body);
    assert_eq!(by_src["matched"], 1);
    assert_eq!(by_src["flows"][0]["dst"], "127.0.10.2:5432");
    assert_eq!(by_src["flows"][0]["src_workload"], "apps/web");
    assert_eq!(by_src["flows"][0]["fqdn"], "db.test", "the name the flow was admitted for");
    let by_dst = json(&c.get("/flows?src=127.0.10.2").await.unwrap().body);
    assert!(by_dst["flows"][0]["fqdn"].is_null(), "no name: null");
    let by_workload = json(&c.get("/flows?workload=apps%2Fdb").await.unwrap().body);
    assert_eq!(by_workload["matched"], 2);
    let capped = json(&c.get("/flows?limit=1").await.unwrap().body);
    assert_eq!(capped["flows"].as_array().unwrap().len(), 1);
    assert_eq!(capped["truncated"], true);
    assert_eq!(c.get("/flows?src=nonsense").await.unwrap().status, 400);

    // /explain: the same answer as CompiledPolicy::explain.
    let cases = [
        ("apps/web", "apps/db", 5432, "127.0.10.1", "127.0.10.2"),
        ("127.0.10.1", "203.0.113.9", 443, "127.0.10.1", "203.0.113.9"),
        ("198.51.100.7", "apps/web", 80, "198.51.100.7", "127.0.10.1"),
    ];
    let snap = control.policy().load_full();
    for (from, to, port, src, dst) in cases {
        let url = format!("/explain?from={}&to={}&port={port}", from.replace('/', "%2F"), to);
        let got = c.get(&url).await.unwrap();
        assert_eq!(got.status, 200, "{}", got.body);
        let mut got = json(&got.body);
        assert_eq!(got["generation"], 1);
        got.as_object_mut().unwrap().remove("generation");
        let want = snap.compiled.explain(&FlowQuery {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            dst_port: port,
            proto: Proto::Tcp,
            fqdn: None,
        });
        assert_eq!(got, serde_json::to_value(&want).unwrap(), "{from} → {to}:{port}");
    }
    let bad = c.get("/explain?from=apps/nope&to=apps/db&port=1").await.unwrap();
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("no workload apps/nope"), "{}", bad.body);
    assert_eq!(c.get("/explain?from=apps/web&to=apps/db").await.unwrap().status, 400);

    let m = c.get("/metrics").await.unwrap();
    assert_eq!(m.status, 200);
    assert!(m.body.contains("\nflowgate_policy_generation 1\n"), "{}", m.body);
    assert!(m.body.contains("flowgate_conntrack_entries 3\n"));
    // Proxied flows never use the batch lookup, so nothing has fallen back to pins.
    assert!(m.body.contains("\nflowgate_conntrack_batch_fallbacks_total 0\n"), "{}", m.body);
    assert!(m.body.contains("flowgate_policy_reloads_total{result=\"ok\"} 1\n"));
    assert_eq!(c.get("/nope").await.unwrap().status, 404);
    assert_eq!(c.post("/healthz", None).await.unwrap().status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_need_the_token_and_change_nothing_without_it() {
    let (fx, control, tasks) = setup().await;
    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    let reload_url = addr_url(tasks.admin_addr, "/reload");
    let emergency_url = addr_url(tasks.admin_addr, "/emergency");
    let quarantine = r#"{"quarantine": "127.0.10.1", "ttl": "1h"}"#.to_string();

    let attempts: Vec<Option<&str>> = vec![None, Some("wrong-token"), Some("")];
    let have_curl = support::require::have(&support::require::Need::Bin("curl"));
    for token in attempts {
        for (url, body) in [(&reload_url, None), (&emergency_url, Some(quarantine.clone()))] {
            let status = if have_curl {
                let mut args = vec!["-X".to_string(), "POST".to_string(), url.clone()];
                if let Some(t) = token {
                    args.extend(["-H".to_string(), format!("Authorization: Bearer {t}")]);
                }
                if let Some(b) = &body {
                    args.extend(["--data".to_string(), b.clone()]);
                }
                curl(args).await.0
            } else {
                let c = AdminClient::new(tasks.admin_addr, token.map(str::to_owned));
                let path = if url.ends_with("/reload") { "/reload" } else { "/emergency" };
                c.post(path, body.clone()).await.unwrap().status
            };
            assert_eq!(status, 401, "{url} with token {token:?}");
        }
    }
    assert_eq!(control.generation(), 1, "no reload happened");
    assert!(control.emergency_entries().is_empty(), "no emergency entry was added");
    assert_eq!(fx.metrics.control.admin_unauthorized.load(Ordering::Relaxed), 6);

    // The right token works.
    let c = AdminClient::new(tasks.admin_addr, Some(TOKEN.to_string()));
    let r = c.post("/reload", None).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(json(&r.body)["generation"], 2);
    assert_eq!(control.generation(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_with_a_reason() {
    let (_fx, control, tasks) = setup().await;
    let c = AdminClient::new(tasks.admin_addr, Some(TOKEN.to_string()));
    for (body, needle) in [
        ("{not json", "bad JSON"),
        (r#"{"quarantine": "127.0.0.9"}"#, "needs a ttl"),
        (r#"{"quarantine": "127.0.0.9", "ttl": "soon"}"#, "not a duration"),
        (r#"{"quarantine": "what?", "ttl": "1m"}"#, "expected an IP address"),
        (r#"{"quarantine": "127.0.0.9", "ttl": "1m", "extra": 1}"#, "unknown field"),
        (r#"{"policy": "kind: [", "ttl": "1m"}"#, "rejected"),
        (r#"{"ttl": "1m"}"#, "exactly one"),
    ] {
        let r = c.post("/emergency", Some(body.to_string())).await.unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let reason = json(&r.body)["error"].as_str().unwrap().to_string();
        assert!(reason.contains(needle), "{body}: {reason}");
    }
    let r = c.post("/emergency", Some(r#"{"quarantine": "apps/nope", "ttl": "1m"}"#.into())).await;
    assert_eq!(r.unwrap().status, 404);
    assert!(control.emergency_entries().is_empty());
    assert_eq!(control.generation(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_policy_shows_in_policy_and_metrics() {
    let (fx, control, tasks) = setup().await;
    std::fs::write(fx.path("policies/broken.yaml"), "kind: NetworkPolicy\nspec: [\n").unwrap();
    let c = AdminClient::new(tasks.admin_addr, Some(TOKEN.to_string()));
    let r = c.post("/reload", None).await.unwrap();
    assert_eq!(r.status, 422);
    let p = json(&c.get("/policy").await.unwrap().body);
    assert_eq!(p["generation"], 1);
    let file = p["last_error"]["errors"][0]["file"].as_str().unwrap();
    assert!(file.ends_with("broken.yaml"), "{p}");
    let m = c.get("/metrics").await.unwrap().body;
    assert!(m.contains("flowgate_policy_reload_failing 1\n"));
    assert!(m.contains("flowgate_policy_reloads_total{result=\"error\"} 1\n"));
    std::fs::remove_file(fx.path("policies/broken.yaml")).unwrap();
    assert_eq!(c.post("/reload", None).await.unwrap().status, 200);
    let p = json(&c.get("/policy").await.unwrap().body);
    assert!(p["last_error"].is_null());
    assert_eq!(control.generation(), 1, "back to the content in force: unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_cuts_and_expires_on_time() {
    let (fx, control, tasks) = setup().await;
    let (_, web_cut) = fx.track("127.0.10.1:40000", "127.0.10.2:5432", 1);
    let (_, other_cut) = fx.track("127.0.10.2:40001", "203.0.113.9:443", 1);
    assert!(allowed(&control, "127.0.10.1", "127.0.10.2", 5432));

    let c = AdminClient::new(tasks.admin_addr, Some(TOKEN.to_string()));
    let r = c
        .post("/emergency", Some(r#"{"quarantine": "127.0.10.1", "ttl": "1500ms"}"#.into()))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let answer = json(&r.body);
    assert_eq!(answer["revoked"], 1);
    assert!(web_cut.is_cut(), "the quarantined address's open flow is cut");
    assert!(!other_cut.is_cut());
    assert!(!allowed(&control, "127.0.10.1", "127.0.10.2", 5432), "new flows refused");
    assert!(!allowed(&control, "127.0.10.2", "127.0.10.1", 80), "both directions");
    let p = json(&c.get("/policy").await.unwrap().body);
    assert_eq!(p["emergency"].as_array().unwrap().len(), 1);
    let generation = control.generation();

    let cc = control.clone();
    assert!(
        wait_for_async(Duration::from_secs(6), || cc.emergency_entries().is_empty()).await,
        "the quarantine expires"
    );
    assert!(control.generation() > generation);
    assert!(allowed(&control, "127.0.10.1", "127.0.10.2", 5432), "allowed again after the TTL");

    // A workload quarantine by name works the same way.
    let r = c
        .post("/emergency", Some(r#"{"quarantine": "apps/db", "ttl": "1h"}"#.into()))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(!allowed(&control, "127.0.10.1", "127.0.10.2", 5432));
    assert!(!allowed(&control, "127.0.10.2", "198.51.100.1", 53));
}

#[test]
fn refuses_a_non_loopback_bind_without_a_token() {
    let fx = Fixture::new("[control]\nwatch = false\n[admin]\nbind = \"0.0.0.0:0\"\n");
    let err = AdminState::new(fx.control(), Readiness::default()).unwrap_err();
    assert!(matches!(err, AdminError::NoToken { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emergency_overlay_survives_reload_and_restart() {
    let fx = Fixture::new(&format!(
        "[control]\nwatch = false\nemergency_state = \"emergency.json\"\n{}",
        admin_toml()
    ));
    let control = fx.control();
    let tasks = start(&control);
    let c = AdminClient::new(tasks.admin_addr, Some(TOKEN.to_string()));
    let body = serde_json::json!({ "policy": DENY_DB, "ttl": "1h" }).to_string();
    let r = c.post("/emergency", Some(body)).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(!allowed(&control, "127.0.10.1", "127.0.10.2", 5432));
    // A file reload keeps the emergency policy.
    std::fs::write(
        fx.path("policies/extra.yaml"),
        BASE_POLICY.replace("web-egress", "web-egress-2"),
    )
    .unwrap();
    assert_eq!(c.post("/reload", None).await.unwrap().status, 200);
    assert!(!allowed(&control, "127.0.10.1", "127.0.10.2", 5432));
    drop(tasks);
    // A new control plane (a restart) reads it back from the state file.
    let restarted = fx.control();
    assert_eq!(restarted.emergency_entries().len(), 1);
    assert!(!allowed(&restarted, "127.0.10.1", "127.0.10.2", 5432));
}

/// An inventory where the port name `pg` means 5432 on `apps/db` and 6432 on `apps/pool`,
/// `dns` is UDP only, and a policy that lets web reach `api.example.com` by name.
const NAMED_INVENTORY: &str = "\
namespaces:
  - name: apps
workloads:
  - {name: web, namespace: apps, labels: {app: web}, ips: [127.0.10.1]}
  - name: db
    namespace: apps
    labels: {app: db}
    ips: [127.0.10.2]
    ports: [{name: pg, port: 5432}, {name: dns, port: 53, protocol: UDP}]
  - name: pool
    namespace: apps
    labels: {app: pool}
    ips: [127.0.10.3]
    ports: [{name: pg, port: 6432}]
";

const BY_NAME: &str = "\
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: web-to-api}
spec:
  priority: 20
  subject:
    pods:
      namespaceSelector: {}
      podSelector: {matchLabels: {app: web}}
  egress:
    - name: api-by-name
      action: Allow
      to:
        - domainNames: [api.example.com]
      ports:
        - portNumber: {protocol: TCP, port: 443}
";

/// `flowgate explain --config CONFIG ARGS --json` → (exit code, stdout, stderr).
async fn cli_explain(config: std::path::PathBuf, args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .arg("explain")
            .arg("--config")
            .arg(&config)
            .args(&args)
            .arg("--json")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// `/explain` takes what `flowgate explain` takes — named ports (resolved on the
/// destination for the protocol) and domain names — and gives the same answer: the real
/// binary on the same config is the reference, case by case, refusals included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_accepts_what_the_cli_accepts_and_agrees_with_it() {
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    std::fs::write(fx.path("inventory.yaml"), NAMED_INVENTORY).unwrap();
    std::fs::write(fx.path("policies/by-name.yaml"), BY_NAME).unwrap();
    let control = fx.control();
    let tasks = start(&control);
    let c = AdminClient::new(tasks.admin_addr, None);

    // (from, to, port, protocol) → the port and FQDN the flow must have.
    let cases = [
        ("apps/web", "apps/db", "pg", "TCP", 5432, None),
        ("apps/web", "apps/pool", "pg", "tcp", 6432, None),
        ("apps/web", "127.0.10.2", "pg", "TCP", 5432, None),
        ("apps/web", "apps/db", "dns", "UDP", 53, None),
        ("apps/web", "API.Example.com.", "443", "TCP", 443, Some("api.example.com")),
        ("127.0.10.1", "other.example.com", "443", "TCP", 443, Some("other.example.com")),
        ("apps/web", "localhost", "8080", "TCP", 8080, Some("localhost")),
    ];
    for (from, to, port, proto, want_port, want_fqdn) in cases {
        let url = format!("/explain?from={from}&to={to}&port={port}&protocol={proto}");
        let api = c.get(&url).await.unwrap();
        assert_eq!(api.status, 200, "{url}: {}", api.body);
        let mut api = json(&api.body);
        assert_eq!(api["generation"], 1);
        api.as_object_mut().unwrap().remove("generation");
        assert_eq!(api["port"], want_port, "{url}");
        assert_eq!(api["fqdn"].as_str(), want_fqdn, "{url}");
        if want_fqdn.is_some() {
            assert_eq!(api["dst"]["ip"], "0.0.0.0", "{url}: a name is asked as 0.0.0.0");
        }
        let args = ["--from", from, "--to", to, "--port", port, "--protocol", proto];
        let (code, out, err) =
            cli_explain(fx.path("flowgate.toml"), args.map(String::from).to_vec()).await;
        assert_eq!(code, 0, "{url}: {err}");
        assert_eq!(api, json(&out), "{url}: /explain and flowgate explain disagree");
    }
    // The name decides: api.example.com is allowed by name, other.example.com is not.
    let allowed_by_name =
        json(&c.get("/explain?from=apps/web&to=api.example.com&port=443").await.unwrap().body);
    assert_eq!(allowed_by_name["verdict"], "allow");
    assert!(
        allowed_by_name["policy"].as_str().is_some_and(|p| p.contains("web-to-api")),
        "{allowed_by_name}"
    );
    let other =
        json(&c.get("/explain?from=apps/web&to=other.example.com&port=443").await.unwrap().body);
    assert_eq!(other["verdict"], "deny");

    // What the CLI refuses, /explain refuses with the same reason.
    for (to, port, proto, needle) in [
        ("apps/db", "pg", "UDP", "has no UDP port named \"pg\""),
        ("apps/db", "nope", "TCP", "has no TCP port named \"nope\""),
        ("api.example.com", "pg", "TCP", "needs a workload destination"),
        ("203.0.113.9", "pg", "TCP", "needs a workload destination"),
        ("apps/db", "0", "TCP", "neither a number 1-65535 nor a port name"),
        ("apps/db", "Bad_Name", "TCP", "neither a number 1-65535 nor a port name"),
        ("apps/db", "5432", "ICMP", "unknown protocol"),
        ("bad..name", "443", "TCP", "is not namespace/workload"),
    ] {
        let url = format!("/explain?from=apps/web&to={to}&port={port}&protocol={proto}");
        let api = c.get(&url).await.unwrap();
        assert_eq!(api.status, 400, "{url}: {}", api.body);
        let reason = json(&api.body)["error"].as_str().unwrap().to_owned();
        assert!(reason.contains(needle), "{url}: {reason}");
        let args = ["--from", "apps/web", "--to", to, "--port", port, "--protocol", proto];
        let (code, _, err) =
            cli_explain(fx.path("flowgate.toml"), args.map(String::from).to_vec()).await;
        assert_eq!(code, 1, "{url}: the CLI refuses too");
        assert!(err.contains(needle), "{url}: {err}");
    }
    // `fqdn=` names the flow of an address destination (normalised like `to`).
    let named = json(
        &c.get("/explain?from=apps/web&to=203.0.113.9&port=443&fqdn=API.example.com.")
            .await
            .unwrap()
            .body,
    );
    assert_eq!(named["fqdn"], "api.example.com");
    assert_eq!(named["dst"]["ip"], "203.0.113.9");
    assert_eq!(
        c.get("/explain?from=apps/web&to=203.0.113.9&port=443&fqdn=a%20b").await.unwrap().status,
        400
    );
}

/// A gateway with no token refuses every mutating call with a 401 that says so (and names
/// the variable its `admin.token_env` reads), whatever token the client sends; one with a
/// token says only that the token is missing or wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_says_whether_the_gateway_has_a_token_at_all() {
    // token_env names a variable no process has: the gateway starts without a token.
    let var = format!("FLOWGATE_TEST_UNSET_{}", std::process::id());
    let fx = Fixture::new(&format!(
        "[control]\nwatch = false\n[admin]\nbind = \"127.0.0.1:0\"\ntoken_env = \"{var}\"\n"
    ));
    let control = fx.control();
    // Starts: token_env naming an unset variable is no token, not an error.
    let tasks = start(&control);
    for token in [None, Some(TOKEN.to_owned())] {
        let c = AdminClient::new(tasks.admin_addr, token.clone());
        for (path, body) in [
            ("/reload", None),
            ("/emergency", Some(r#"{"quarantine": "127.0.10.1", "ttl": "1h"}"#)),
        ] {
            let r = c.post(path, body.map(str::to_owned)).await.unwrap();
            assert_eq!(r.status, 401, "{path} {token:?}: {}", r.body);
            let u = r.unauthorized().expect("a flowgate 401 body");
            assert!(!u.token_configured, "{}", r.body);
            assert_eq!(u.token_env.as_deref(), Some(var.as_str()));
            assert!(u.error.contains("has no admin token"), "{}", u.error);
        }
    }
    assert_eq!(control.generation(), 1);
    assert!(control.emergency_entries().is_empty());
    assert_eq!(fx.metrics.control.admin_unauthorized.load(Ordering::Relaxed), 4);

    let (_fx, _control, tasks) = setup().await;
    for (token, needle) in [(None, "missing bearer token"), (Some("nope"), "wrong bearer token")] {
        let c = AdminClient::new(tasks.admin_addr, token.map(str::to_owned));
        let r = c.post("/reload", None).await.unwrap();
        assert_eq!(r.status, 401);
        let u = r.unauthorized().expect("a flowgate 401 body");
        assert!(u.token_configured);
        assert_eq!(u.token_env, None, "{}", r.body);
        assert!(u.error.contains(needle), "{}", u.error);
    }
}
