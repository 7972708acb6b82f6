//! The control-plane and admin tests' world: a small policy directory and inventory in a
//! temp dir, a config pointing at it, and a control plane over them
//! ([`Fixture::control_with`] is the only place the tests construct one).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowgate::admin::{AdminServer, AdminState};
use flowgate::config::Config;
use flowgate::conntrack::{Conntrack, CutSignal, Entry, EntryInit, EntryRef, FlowState, tcp_key};
use flowgate::control::{ControlError, ControlPlane, ControlTasks, RevokeFn};
use flowgate::dataplane::Readiness;
use flowgate::flow::Proto;
use flowgate::policy::{Decision, FlowQuery, Generation};
use flowgate::telemetry::metrics::Registry;

pub const TOKEN: &str = "test-token-1234";

pub const INVENTORY: &str = "\
namespaces:
  - name: apps
workloads:
  - {name: web, namespace: apps, labels: {app: web}, ips: [127.0.10.1]}
  - {name: db, namespace: apps, labels: {app: db}, ips: [127.0.10.2]}
";

/// Keeps web → db allowed (policy.default is allow in these tests).
pub const BASE_POLICY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-egress, namespace: apps}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
    - to:
        - podSelector: {matchLabels: {app: db}}
";

/// Denies every workload's traffic into db.
pub const DENY_DB: &str = "\
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: deny-db}
spec:
  priority: 10
  subject:
    pods:
      namespaceSelector: {}
      podSelector: {matchLabels: {app: db}}
  ingress:
    - name: block
      action: Deny
      from:
        - namespaces: {}
";

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub cfg: Config,
    pub conntrack: Arc<Conntrack>,
    pub metrics: Arc<Registry>,
    pub revoked: Arc<Mutex<Vec<(String, Decision)>>>,
}

impl Fixture {
    /// `extra_toml` is appended to the config (e.g. `[control]\nwatch = false`).
    pub fn new(extra_toml: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("inventory.yaml"), INVENTORY).unwrap();
        std::fs::write(dir.path().join("policies/base.yaml"), BASE_POLICY).unwrap();
        let toml = format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"allow\"\n\
             {extra_toml}\n"
        );
        let path = dir.path().join("flowgate.toml");
        std::fs::write(&path, toml).unwrap();
        let cfg = Config::load(&path).expect("test config loads");
        let conntrack = Arc::new(Conntrack::new(&cfg.conntrack));
        Fixture {
            dir,
            cfg,
            conntrack,
            metrics: Arc::new(Registry::default()),
            revoked: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A control plane over the fixture's config, recording revocations in `revoked`.
    pub fn control(&self) -> ControlPlane {
        let revoked = self.revoked.clone();
        let on_revoke: RevokeFn = Arc::new(move |e: &Entry, d: &Decision, _| {
            revoked.lock().unwrap().push((format!("{}->{}", e.key().src, e.key().dst), *d));
        });
        self.control_with(self.cfg.clone(), on_revoke).expect("control plane starts on the fixture")
    }

    /// A control plane over `cfg` (the fixture's, possibly changed) with the fixture's
    /// conntrack table and metrics, calling `on_revoke` for each flow it cuts.
    pub fn control_with(
        &self,
        cfg: Config,
        on_revoke: RevokeFn,
    ) -> Result<ControlPlane, ControlError> {
        ControlPlane::new(cfg, self.conntrack.clone(), self.metrics.clone(), on_revoke)
    }

    /// Tracks a TCP flow as the proxy would, with a cut signal.
    pub fn track(&self, src: &str, dst: &str, generation: u64) -> (EntryRef, Arc<CutSignal>) {
        self.track_named(src, dst, generation, None)
    }

    /// Tracks a TCP flow as an egress listener would: admitted for the name `fqdn`.
    pub fn track_named(
        &self,
        src: &str,
        dst: &str,
        generation: u64,
        fqdn: Option<&str>,
    ) -> (EntryRef, Arc<CutSignal>) {
        let cut = Arc::new(CutSignal::default());
        let entry = self
            .conntrack
            .insert(
                tcp_key(src.parse().unwrap(), dst.parse().unwrap()),
                EntryInit {
                    cut: Some(cut.clone()),
                    fqdn: fqdn.map(Arc::from),
                    ..EntryInit::plain(FlowState::Open, Generation(generation))
                },
                Instant::now(),
            )
            .expect("insert");
        (entry, cut)
    }
}

/// A control plane serving: its triggers and the admin API over it, as the gateway starts
/// them (readiness starts at `Starting`: no listener in these tests).
pub struct Started {
    pub admin_addr: SocketAddr,
    pub readiness: Readiness,
    _admin: AdminServer,
    _triggers: ControlTasks,
}

/// Starts `control`'s triggers and an admin API over it (inside a tokio runtime).
pub fn start(control: &ControlPlane) -> Started {
    let readiness = Readiness::default();
    let state = AdminState::new(control.clone(), readiness.clone()).expect("admin token");
    let admin = AdminServer::start(state).expect("admin API binds");
    let triggers = control.start().expect("control plane starts");
    Started { admin_addr: admin.local_addr(), readiness, _admin: admin, _triggers: triggers }
}

/// Writes `text` to `path` the way editors do: a temp file, then rename over the target.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn allowed(control: &ControlPlane, src: &str, dst: &str, port: u16) -> bool {
    let snap = control.policy().load_full();
    snap.compiled
        .decide(&FlowQuery {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            dst_port: port,
            proto: Proto::Tcp,
            fqdn: None,
        })
        .verdict
        .is_allow()
}

/// Polls `f` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

pub async fn wait_for_async(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

pub fn admin_toml() -> String {
    format!("[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n")
}

pub fn addr_url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}
