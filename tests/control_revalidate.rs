//! Revalidation after a reload: established flows that the new generation denies are cut
//! (their CutSignal fires, a real connection waiting on it closes, the entry leaves the
//! table) and reported; flows still allowed move to the new generation; `on_change = keep`
//! leaves everything alone.

mod support;

use std::sync::Arc;
use std::time::Duration;

use flowgate::control::{ReloadResult, Trigger};
use support::control::*;
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn now_denied_flows_are_cut_and_reported() {
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    let control = fx.control();

    // A real connection whose forwarding task closes it when the flow is cut.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let mut client = tokio::net::TcpStream::connect(server_addr).await.unwrap();
    let (server_side, _) = listener.accept().await.unwrap();

    let (denied, cut) = fx.track("127.0.10.1:40000", "127.0.10.2:5432", 1);
    let (kept, kept_cut) = fx.track("127.0.10.2:40001", "127.0.10.1:80", 1);
    let task_cut = cut.clone();
    let task = tokio::spawn(async move {
        task_cut.cut().await;
        drop(server_side);
    });

    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    let report = control.reload(Trigger::Api).await;
    assert_eq!(report.result, ReloadResult::Ok);
    assert_eq!(report.revalidated, 2);
    assert_eq!(report.revoked, 1);

    assert!(cut.is_cut(), "web → db is denied now: cut");
    assert!(!kept_cut.is_cut(), "db → web is still allowed");
    assert_eq!(kept.generation().0, 2, "a kept flow moves to the new generation");
    assert!(fx.conntrack.lookup(&denied.key()).is_none(), "the cut flow left the table");
    assert!(fx.conntrack.lookup(&kept.key()).is_some());
    let revoked = fx.revoked.lock().unwrap().clone();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].0, "127.0.10.1:40000->127.0.10.2:5432");
    assert!(!revoked[0].1.verdict.is_allow());

    // The connection really closes: the client reads EOF.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    task.await.unwrap();
    assert_eq!(fx.metrics.control.revoked.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn keep_leaves_established_flows_alone() {
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    let mut cfg = fx.cfg.clone();
    cfg.policy.on_change = flowgate::config::OnChange::Keep;
    let control =
        fx.control_with(cfg, Arc::new(|_, _, _| panic!("nothing is revoked with keep"))).unwrap();
    let (entry, cut) = fx.track("127.0.10.1:40000", "127.0.10.2:5432", 1);
    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    let report = control.reload_blocking(Trigger::Api);
    assert_eq!(report.result, ReloadResult::Ok);
    assert_eq!(report.revoked, 0);
    assert!(!cut.is_cut());
    assert!(fx.conntrack.lookup(&entry.key()).is_some());
    assert!(!allowed(&control, "127.0.10.1", "127.0.10.2", 5432), "new flows are denied");
}

#[test]
fn many_flows_are_revalidated_in_batches() {
    let fx =
        Fixture::new(&format!("[control]\nwatch = false\nrevalidate_batch = 7\n{}", admin_toml()));
    let control = fx.control();
    let mut cuts = Vec::new();
    for port in 0..500u16 {
        cuts.push(fx.track(&format!("127.0.10.1:{}", 20000 + port), "127.0.10.2:5432", 1).1);
        fx.track(&format!("127.0.10.2:{}", 20000 + port), "127.0.10.1:80", 1);
    }
    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    let report = control.reload_blocking(Trigger::Api);
    assert_eq!(report.revalidated, 1000);
    assert_eq!(report.revoked, 500);
    assert!(cuts.iter().all(|c| c.is_cut()));
    assert_eq!(fx.conntrack.len(), 500);
    assert_eq!(fx.revoked.lock().unwrap().len(), 500);
}

/// web may reach `api.test` (and only by that name): the addresses behind it are denied.
const NAMED_EGRESS: &str = "\
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: web-names}
spec:
  priority: 5
  subject:
    pods:
      namespaceSelector: {}
      podSelector: {matchLabels: {app: web}}
  egress:
    - name: api
      action: Allow
      to:
        - domainNames: [api.test]
    - name: rest
      action: Deny
      to:
        - networks: [127.0.50.0/24]
";

/// The same policy without the name rule.
const NAMES_REMOVED: &str = "\
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: web-names}
spec:
  priority: 5
  subject:
    pods:
      namespaceSelector: {}
      podSelector: {matchLabels: {app: web}}
  egress:
    - name: rest
      action: Deny
      to:
        - networks: [127.0.50.0/24]
";

/// A revoked flow as the callback saw it: `src->dst` and the name it was admitted for.
type Revoked = (String, Option<String>);

#[test]
fn flows_admitted_for_a_name_are_redecided_with_it() {
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    std::fs::write(fx.path("policies/names.yaml"), NAMED_EGRESS).unwrap();
    let revoked: Arc<std::sync::Mutex<Vec<Revoked>>> = Arc::default();
    let seen = revoked.clone();
    let control = fx
        .control_with(
            fx.cfg.clone(),
            Arc::new(move |e, d, _| {
                assert!(!d.verdict.is_allow());
                let k = e.key();
                seen.lock()
                    .unwrap()
                    .push((format!("{}->{}", k.src, k.dst), e.fqdn().map(String::from)));
            }),
        )
        .unwrap();
    let generation = control.policy().load().generation.0;

    // The premise: the address alone is denied, the name allows it.
    let snap = control.policy().load_full();
    let query = |fqdn| flowgate::policy::FlowQuery {
        src: "127.0.10.1".parse().unwrap(),
        dst: "127.0.50.1".parse().unwrap(),
        dst_port: 443,
        proto: flowgate::flow::Proto::Tcp,
        fqdn,
    };
    assert!(snap.compiled.decide(&query(Some("api.test"))).verdict.is_allow());
    assert!(!snap.compiled.decide(&query(None)).verdict.is_allow());

    let (named, named_cut) =
        fx.track_named("127.0.10.1:40000", "127.0.50.1:443", generation, Some("api.test"));
    assert_eq!(named.fqdn(), Some("api.test"));
    // The same destination tracked without its name: only the name allows it, so the first
    // reload cuts it (what every such tunnel suffered before the entry kept the name).
    let (_unnamed, unnamed_cut) = fx.track("127.0.10.1:40001", "127.0.50.1:443", generation);

    // A reload that changes something else keeps the named flow.
    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    let report = control.reload_blocking(Trigger::Api);
    assert_eq!(report.result, ReloadResult::Ok);
    assert_eq!(report.revalidated, 2);
    assert_eq!(report.revoked, 1);
    assert!(!named_cut.is_cut(), "the domainNames rule still allows api.test");
    assert!(unnamed_cut.is_cut());
    assert_eq!(named.generation().0, generation + 1);
    assert!(fx.conntrack.lookup(&named.key()).is_some());
    assert_eq!(
        revoked.lock().unwrap().as_slice(),
        [("127.0.10.1:40001->127.0.50.1:443".to_string(), None)].as_slice()
    );

    // A reload that drops the rule cuts it, and the report names it.
    revoked.lock().unwrap().clear();
    replace_file(&fx.path("policies/names.yaml"), NAMES_REMOVED);
    let report = control.reload_blocking(Trigger::Api);
    assert_eq!(report.result, ReloadResult::Ok);
    assert_eq!(report.revoked, 1);
    assert!(named_cut.is_cut(), "without the rule the name allows nothing");
    assert!(fx.conntrack.lookup(&named.key()).is_none());
    let revoked = revoked.lock().unwrap().clone();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].1.as_deref(), Some("api.test"));
}
