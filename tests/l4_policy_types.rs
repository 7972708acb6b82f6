//! Issue 27 on a running gateway: a NetworkPolicy written with `policyTypes: []` is read
//! as the API server defaults it (`[Ingress]`, plus `Egress` with egress rules), by the
//! in-process L4 listener built from config text by `tests/support/l4.rs`.
//!
//! Identities (this file's inventory, `policy.default = deny`):
//! - 127.0.0.10 (`OK`) is `y/c`; a NetworkPolicy in `y` admits all of its egress, so only
//!   the destination's ingress side can refuse;
//! - 127.0.0.20 (`WEB`, where the upstreams listen) is `x/a`.
//!
//! The reason in the flow log tells the readings apart: were `policyTypes: []` to cover no
//! direction, `x/a` would not be isolated and the refusal would be `default-deny`.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::l4::*;

const INVENTORY: &str = r#"
namespaces:
  - name: x
  - name: y
workloads:
  - name: c
    namespace: y
    labels: {app: c}
    ips: [127.0.0.10]
  - name: a
    namespace: x
    labels: {app: a}
    ips: [127.0.0.20]
"#;

/// Every pod in `y` may send anywhere.
const Y_EGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: all-out, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{}]
"#;

/// Exactly the policy of issue 27.
const DENY_ALL: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: []
"#;

/// The reverse case of the issue: `policyTypes: []` with an ingress rule admits `y`.
const ALLOW_FROM_Y: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-y, namespace: x}
spec:
  podSelector: {}
  policyTypes: []
  ingress:
    - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]
"#;

/// The harness world with this file's inventory and `x_policy` in place of its own.
fn world(x_policy: &str) -> World {
    let w = World::new();
    std::fs::write(w.dir.path().join("inventory.yaml"), INVENTORY).unwrap();
    std::fs::write(w.dir.path().join("policies/t.yaml"), format!("{Y_EGRESS}---{x_policy}"))
        .unwrap();
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_policy_types_deny_all_refuses_ingress_to_the_namespace() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(world(DENY_ALL), &tcp_listener("gw", &[up.addr], ""));
    expect_reset(OK, gw.addr("gw")).await;
    let line = gw.world.wait_log(Duration::from_secs(5), |l| l["event"] == "deny").await;
    assert_eq!(line["src_workload"], "y/c", "{line}");
    assert_eq!(line["dst_workload"], "x/a", "{line}");
    assert_eq!(line["direction"], "ingress", "{line}");
    assert_eq!(line["reason"], "not-admitted", "isolated by x/deny-all, not the default: {line}");
    assert!(line["policy"].as_str().is_some_and(|p| p.contains("deny-all")), "{line}");
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0, "the upstream was contacted");
    let c = gw.counters("gw");
    assert_eq!((get(&c.allowed), get(&c.denied) >= 1), (0, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_policy_types_with_an_ingress_rule_admits() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(world(ALLOW_FROM_Y), &tcp_listener("gw", &[up.addr], ""));
    let mut s = connect_from(OK, gw.addr("gw")).await.unwrap();
    assert_eq!(roundtrip(&mut s, b"issue 27").await, b"issue 27");
    let c = gw.counters("gw");
    assert_eq!((get(&c.allowed), get(&c.denied)), (1, 0));
}
