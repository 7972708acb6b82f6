//! A policy set shaped like a GitOps repository of a large cluster, shared by the
//! policy-engine benches (`benches/reload.rs`, `benches/decide.rs`) through `#[path]`.
//!
//! `namespaces × apps` workloads (1k × 1k: 10 × 100, 10k × 10k: 100 × 100, 100k × 100k:
//! 1,000 × 100) plus a platform namespace (`kube-system`: DNS) and `monitoring`
//! (Prometheus). Per namespace, one file per policy:
//! - `default-deny` (Ingress + Egress, every pod);
//! - `allow-dns`: egress to kube-dns in kube-system on UDP/TCP 53;
//! - `allow-metrics`: ingress from Prometheus on the named port `metrics`;
//! - one policy per app, by role (app index mod 10):
//!   - 0: frontend — ingress from the internet (`ipBlock 0.0.0.0/0 except 10.0.0.0/8`) and
//!     from the frontends of the namespaces of its team (namespaceSelector + podSelector)
//!     on the named port `http`; egress to three backends (`matchExpressions app In`) on
//!     `grpc`;
//!   - 1–7: backend — ingress from its callers on `grpc` and a port range (`endPort`),
//!     every third one also from a caller in another namespace; egress to a database
//!     (named port `db`), to the next backend on `grpc`, and to an external range on 443;
//!   - 8, 9: database — ingress from backends without a `canary` label (`In` +
//!     `DoesNotExist`) on `db`.
//!
//! Workloads own a /32 in 10.0.0.0/9; every fourth also a /27 scaling subnet in
//! 10.128.0.0/9. Every thirteenth carries `canary: "true"`.
//!
//! Optionally 100 AdminNetworkPolicies (a metadata-service block, per-team pass rules,
//! port guardrails) and a BaselineAdminNetworkPolicy, in one file of their own.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// Size of a realistic set.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub namespaces: usize,
    pub apps: usize,
    /// 100 ANPs + 1 BANP.
    pub cluster_tiers: bool,
}

impl Shape {
    pub const fn new(namespaces: usize, apps: usize) -> Shape {
        Shape { namespaces, apps, cluster_tiers: false }
    }
    /// `1k`, `10k`, `100k` (policies ≈ workloads ≈ that).
    pub fn by_label(label: &str) -> Option<Shape> {
        match label {
            "1k" => Some(Shape::new(10, 100)),
            "10k" => Some(Shape::new(100, 100)),
            "100k" => Some(Shape::new(1_000, 100)),
            _ => None,
        }
    }
    /// The shapes `FLOWGATE_BENCH_REALISTIC` names (`1k,10k,100k`, each optionally
    /// `+tiers`), or those of `default` when it is not set.
    pub fn from_env(default: &str) -> Vec<Shape> {
        let spec = std::env::var("FLOWGATE_BENCH_REALISTIC").unwrap_or_else(|_| default.into());
        spec.split(',')
            .filter_map(|l| {
                let (base, tiers) = match l.trim().strip_suffix("+tiers") {
                    Some(b) => (b, true),
                    None => (l.trim(), false),
                };
                let s = Shape::by_label(base)?;
                Some(if tiers { s.with_cluster_tiers() } else { s })
            })
            .collect()
    }
    pub fn with_cluster_tiers(self) -> Shape {
        Shape { cluster_tiers: true, ..self }
    }
    pub fn workloads(&self) -> usize {
        self.namespaces * self.apps
    }
    pub fn label(&self) -> String {
        let k = self.workloads() / 1000;
        let base = format!("realistic-{k}kx{k}k");
        if self.cluster_tiers { format!("{base}+100anp+banp") } else { base }
    }
}

pub const TEAMS: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Frontend,
    Backend,
    Database,
}

pub fn role(app: usize) -> Role {
    match app % 10 {
        0 => Role::Frontend,
        8 | 9 => Role::Database,
        _ => Role::Backend,
    }
}

pub fn ns_name(n: usize) -> String {
    format!("team{}-ns{n}", n % TEAMS)
}

pub fn app_name(a: usize) -> String {
    let r = match role(a) {
        Role::Frontend => "web",
        Role::Backend => "svc",
        Role::Database => "db",
    };
    format!("{r}{a}")
}

/// Global index of workload (namespace, app).
pub fn index(shape: &Shape, n: usize, a: usize) -> usize {
    n * shape.apps + a
}

/// The /32 of workload `i`.
pub fn addr(i: usize) -> Ipv4Addr {
    let i = i as u32 + 1;
    Ipv4Addr::from(0x0a00_0000 | i)
}

/// The /27 scaling subnet of workload `i` (every fourth), as its network address.
pub fn subnet(i: usize) -> Option<Ipv4Addr> {
    i.is_multiple_of(4).then(|| Ipv4Addr::from(0x0a80_0000 | ((i as u32 / 4) << 5)))
}

pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 127, 0, 10);
pub const PROM_IP: Ipv4Addr = Ipv4Addr::new(10, 127, 0, 20);

/// The backends a frontend `a` calls (app indices, all backends).
fn frontend_calls(shape: &Shape, a: usize) -> [usize; 3] {
    let b = |k: usize| {
        let mut x = (a + k) % shape.apps;
        while role(x) != Role::Backend {
            x = (x + 1) % shape.apps;
        }
        x
    };
    [b(1), b(3), b(5)]
}

/// The database backend `a` calls.
fn backend_db(shape: &Shape, a: usize) -> usize {
    let mut x = (a / 10) * 10 + 8 + (a % 2);
    if x >= shape.apps {
        x = 8;
    }
    x
}

fn next_backend(shape: &Shape, a: usize) -> usize {
    let mut x = (a + 1) % shape.apps;
    while role(x) != Role::Backend {
        x = (x + 1) % shape.apps;
    }
    x
}

pub fn inventory(shape: &Shape) -> String {
    let mut s = String::with_capacity(shape.workloads() * 160);
    s.push_str("namespaces:\n  - name: kube-system\n  - name: monitoring\n");
    for n in 0..shape.namespaces {
        let _ = writeln!(
            s,
            "  - name: {}\n    labels: {{team: t{}, env: {}}}",
            ns_name(n),
            n % TEAMS,
            if n % 3 == 0 { "staging" } else { "prod" }
        );
    }
    s.push_str("workloads:\n");
    let _ = writeln!(
        s,
        "  - {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}, ips: [{DNS_IP}]}}"
    );
    let _ = writeln!(
        s,
        "  - {{name: prometheus, namespace: monitoring, labels: {{app: prometheus}}, ips: [{PROM_IP}]}}"
    );
    for n in 0..shape.namespaces {
        for a in 0..shape.apps {
            let i = index(shape, n, a);
            let role_label = match role(a) {
                Role::Frontend => "frontend",
                Role::Backend => "backend",
                Role::Database => "database",
            };
            let canary = if i.is_multiple_of(13) { ", canary: \"true\"" } else { "" };
            let ips = match subnet(i) {
                Some(net) => format!("[{}, {net}/27]", addr(i)),
                None => format!("[{}]", addr(i)),
            };
            let ports = match role(a) {
                Role::Frontend => "{name: http, port: 8080}, {name: metrics, port: 9100}",
                Role::Backend => "{name: grpc, port: 9090}, {name: metrics, port: 9100}",
                Role::Database => "{name: db, port: 5432}, {name: metrics, port: 9187}",
            };
            let _ = writeln!(
                s,
                "  - {{name: {app}, namespace: {ns}, labels: {{app: {app}, role: {role_label}, \
                 version: v{v}{canary}}}, ips: {ips}, ports: [{ports}]}}",
                app = app_name(a),
                ns = ns_name(n),
                v = i % 3,
            );
        }
    }
    s
}

fn np_header(s: &mut String, name: &str, ns: &str, version: usize) {
    let _ = write!(
        s,
        "# version {version}\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n"
    );
}

/// The text of the policy for app `a` of namespace `n` (`version` goes into a comment and,
/// for `version > 0`, moves the backend port range, so a rewrite changes what is enforced).
pub fn app_policy(shape: &Shape, n: usize, a: usize, version: usize) -> String {
    let ns = ns_name(n);
    let app = app_name(a);
    let mut s = String::with_capacity(1024);
    np_header(&mut s, &format!("{app}-policy"), &ns, version);
    let _ = write!(
        s,
        "  podSelector:\n    matchLabels: {{app: {app}}}\n  policyTypes: [Ingress, Egress]\n"
    );
    match role(a) {
        Role::Frontend => {
            let [b1, b2, b3] = frontend_calls(shape, a);
            let _ = write!(
                s,
                "  ingress:\n    - from:\n        - ipBlock:\n            cidr: 0.0.0.0/0\n            \
                 except: [10.0.0.0/8]\n        - namespaceSelector:\n            \
                 matchLabels: {{team: t{team}}}\n          podSelector:\n            \
                 matchLabels: {{role: frontend}}\n      ports:\n        - port: http\n  \
                 egress:\n    - to:\n        - podSelector:\n            matchExpressions:\n              \
                 - {{key: app, operator: In, values: [{}, {}, {}]}}\n      ports:\n        \
                 - port: grpc\n",
                app_name(b1),
                app_name(b2),
                app_name(b3),
                team = n % TEAMS,
            );
        }
        Role::Backend => {
            let lo = 8000 + (version % 50) * 10;
            let _ = write!(
                s,
                "  ingress:\n    - from:\n        - podSelector:\n            \
                 matchLabels: {{role: frontend}}\n        - podSelector:\n            \
                 matchLabels: {{app: {prev}}}\n",
                prev = app_name((a + shape.apps - 1) % shape.apps),
            );
            if a.is_multiple_of(3) {
                let other = (n + 1) % shape.namespaces;
                let _ = write!(
                    s,
                    "        - namespaceSelector:\n            matchLabels: \
                     {{kubernetes.io/metadata.name: {}}}\n          podSelector:\n            \
                     matchLabels: {{app: {app}}}\n",
                    ns_name(other)
                );
            }
            let _ = write!(
                s,
                "      ports:\n        - port: grpc\n        - {{port: {lo}, endPort: {hi}}}\n  \
                 egress:\n    - to:\n        - podSelector:\n            matchLabels: {{app: {db}}}\n      \
                 ports:\n        - port: db\n    - to:\n        - podSelector:\n            \
                 matchLabels: {{app: {next}}}\n      ports:\n        - port: grpc\n    - to:\n        \
                 - ipBlock:\n            cidr: 203.0.113.0/24\n      ports:\n        - {{port: 443}}\n",
                hi = lo + 99,
                db = app_name(backend_db(shape, a)),
                next = app_name(next_backend(shape, a)),
            );
        }
        Role::Database => {
            s.push_str(
                "  ingress:\n    - from:\n        - podSelector:\n            matchExpressions:\n              \
                 - {key: role, operator: In, values: [backend]}\n              \
                 - {key: canary, operator: DoesNotExist}\n      ports:\n        - port: db\n  \
                 egress: []\n",
            );
        }
    }
    s
}

pub fn default_deny(n: usize) -> String {
    let mut s = String::new();
    np_header(&mut s, "default-deny", &ns_name(n), 0);
    s.push_str("  podSelector: {}\n  policyTypes: [Ingress, Egress]\n");
    s
}

pub fn allow_dns(n: usize) -> String {
    let mut s = String::new();
    np_header(&mut s, "allow-dns", &ns_name(n), 0);
    s.push_str(
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n    - to:\n        \
         - namespaceSelector:\n            matchLabels: {kubernetes.io/metadata.name: kube-system}\n          \
         podSelector:\n            matchLabels: {k8s-app: kube-dns}\n      ports:\n        \
         - {protocol: UDP, port: 53}\n        - {protocol: TCP, port: 53}\n",
    );
    s
}

pub fn allow_metrics(n: usize) -> String {
    let mut s = String::new();
    np_header(&mut s, "allow-metrics", &ns_name(n), 0);
    s.push_str(
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n    - from:\n        \
         - namespaceSelector:\n            matchLabels: {kubernetes.io/metadata.name: monitoring}\n          \
         podSelector:\n            matchLabels: {app: prometheus}\n      ports:\n        \
         - port: metrics\n",
    );
    s
}

/// The platform namespaces' own policies: DNS admits every namespace, Prometheus may
/// scrape every `metrics` port.
pub fn platform() -> [(&'static str, String); 2] {
    [
        (
            "kube-system",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: dns\n  \
             namespace: kube-system\nspec:\n  podSelector:\n    matchLabels: {k8s-app: kube-dns}\n  \
             policyTypes: [Ingress]\n  ingress:\n    - from:\n        - namespaceSelector: {}\n      \
             ports:\n        - {protocol: UDP, port: 53}\n        - {protocol: TCP, port: 53}\n"
                .to_string(),
        ),
        (
            "monitoring",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: scrape\n  \
             namespace: monitoring\nspec:\n  podSelector:\n    matchLabels: {app: prometheus}\n  \
             policyTypes: [Ingress, Egress]\n  ingress: []\n  egress:\n    - to:\n        \
             - namespaceSelector: {}\n      ports:\n        - port: metrics\n"
                .to_string(),
        ),
    ]
}

/// 100 ANPs and a BANP.
pub fn cluster_tiers(shape: &Shape) -> String {
    let mut s = String::new();
    s.push_str(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\n\
         metadata: {name: block-imds}\nspec:\n  priority: 1\n  subject: {namespaces: {}}\n  \
         egress:\n    - name: no-metadata\n      action: Deny\n      to:\n        \
         - networks: [169.254.169.254/32]\n",
    );
    for k in 1..100 {
        let team = k % TEAMS;
        s.push_str("---\n");
        if k % 2 == 0 {
            let _ = write!(
                s,
                "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\n\
                 metadata: {{name: team{team}-pass-{k}}}\nspec:\n  priority: {k}\n  subject:\n    \
                 namespaces:\n      matchLabels: {{team: t{team}}}\n  ingress:\n    \
                 - name: same-team\n      action: Pass\n      from:\n        - namespaces:\n            \
                 matchLabels: {{team: t{team}}}\n  egress:\n    - name: same-team\n      \
                 action: Pass\n      to:\n        - namespaces:\n            matchLabels: {{team: t{team}}}\n"
            );
        } else {
            let port = 20000 + k;
            let _ = write!(
                s,
                "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\n\
                 metadata: {{name: guard-{k}}}\nspec:\n  priority: {k}\n  subject:\n    \
                 pods:\n      namespaceSelector: {{matchLabels: {{env: prod}}}}\n      \
                 podSelector: {{matchLabels: {{role: {r}}}}}\n  ingress:\n    - name: no-debug\n      \
                 action: Deny\n      from:\n        - namespaces: {{}}\n      ports:\n        \
                 - portNumber: {{protocol: TCP, port: {port}}}\n  egress:\n    - name: no-smtp\n      \
                 action: Deny\n      to:\n        - networks: [0.0.0.0/0]\n      ports:\n        \
                 - portNumber: {{protocol: TCP, port: 25}}\n",
                r = ["frontend", "backend", "database"][k % 3],
            );
        }
    }
    let _ = shape;
    s.push_str(
        "---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\n\
         metadata: {name: default}\nspec:\n  subject: {namespaces: {}}\n  ingress:\n    \
         - name: deny-cross-namespace\n      action: Deny\n      from:\n        - namespaces: {}\n",
    );
    s
}

/// The path of app `a`'s policy file under `dir` (the policy directory).
pub fn app_file(dir: &Path, n: usize, a: usize) -> PathBuf {
    dir.join(ns_name(n)).join(format!("{}.yaml", app_name(a)))
}

/// Writes `inventory.yaml` and `policies/` (one file per policy, a directory per
/// namespace) under `root`.
pub fn write(root: &Path, shape: &Shape) {
    std::fs::write(root.join("inventory.yaml"), inventory(shape)).expect("write inventory");
    let dir = root.join("policies");
    std::fs::create_dir_all(&dir).expect("mkdir policies");
    for (ns, text) in platform() {
        std::fs::create_dir_all(dir.join(ns)).expect("mkdir namespace");
        std::fs::write(dir.join(ns).join("policy.yaml"), text).expect("write");
    }
    for n in 0..shape.namespaces {
        let nsdir = dir.join(ns_name(n));
        std::fs::create_dir_all(&nsdir).expect("mkdir namespace");
        std::fs::write(nsdir.join("default-deny.yaml"), default_deny(n)).expect("write");
        std::fs::write(nsdir.join("allow-dns.yaml"), allow_dns(n)).expect("write");
        std::fs::write(nsdir.join("allow-metrics.yaml"), allow_metrics(n)).expect("write");
        for a in 0..shape.apps {
            std::fs::write(app_file(&dir, n, a), app_policy(shape, n, a, 0)).expect("write");
        }
    }
    if shape.cluster_tiers {
        std::fs::write(dir.join("cluster-tiers.yaml"), cluster_tiers(shape)).expect("write");
    }
}

/// Rewrites app `a`'s policy of namespace `n` as editors do (write a temporary file,
/// rename it over the old one).
pub fn rewrite(root: &Path, shape: &Shape, n: usize, a: usize, version: usize) {
    let path = app_file(&root.join("policies"), n, a);
    let tmp = path.with_file_name(format!(".{}.tmp", app_name(a)));
    std::fs::write(&tmp, app_policy(shape, n, a, version)).expect("write tmp");
    std::fs::rename(&tmp, &path).expect("rename");
}

/// A deterministic generator (xorshift) for flows.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One flow of the mix: source, destination, port, UDP?
pub type Flow = (IpAddr, IpAddr, u16, bool);

/// A realistic mix of `count` flows, most of them allowed: frontend → its backends on
/// grpc (25 %), backend → database (20 %), backend → next backend (10 %), internet →
/// frontend (10 %), DNS (15 %), Prometheus scrapes (10 %), backend → external 443 (5 %),
/// and denied probes: a workload to a random other one on a random port (5 %).
pub fn flows(shape: &Shape, count: usize) -> Vec<Flow> {
    let mut rng = Rng(0x5eed_f10e);
    let v4 = IpAddr::V4;
    let mut out = Vec::with_capacity(count);
    // An address of workload `i`: its /32, or (for those with one) a pod in its subnet.
    let at = |rng: &mut Rng, i: usize| -> IpAddr {
        match subnet(i) {
            Some(net) if rng.below(2) == 0 => v4(Ipv4Addr::from(u32::from(net) + 5)),
            _ => v4(addr(i)),
        }
    };
    while out.len() < count {
        let n = rng.below(shape.namespaces);
        let pick = |rng: &mut Rng, want: Role| loop {
            let a = rng.below(shape.apps);
            if role(a) == want {
                break a;
            }
        };
        let k = rng.below(100);
        let flow = match k {
            0..=24 => {
                let f = pick(&mut rng, Role::Frontend);
                let b = frontend_calls(shape, f)[rng.below(3)];
                (at(&mut rng, index(shape, n, f)), at(&mut rng, index(shape, n, b)), 9090, false)
            }
            25..=44 => {
                let b = pick(&mut rng, Role::Backend);
                let d = backend_db(shape, b);
                (at(&mut rng, index(shape, n, b)), at(&mut rng, index(shape, n, d)), 5432, false)
            }
            45..=54 => {
                let b = pick(&mut rng, Role::Backend);
                let c = next_backend(shape, b);
                (at(&mut rng, index(shape, n, b)), at(&mut rng, index(shape, n, c)), 9090, false)
            }
            55..=64 => {
                let f = pick(&mut rng, Role::Frontend);
                let src = v4(Ipv4Addr::new(198, 51, 100, rng.below(250) as u8 + 1));
                (src, at(&mut rng, index(shape, n, f)), 8080, false)
            }
            65..=79 => {
                let a = rng.below(shape.apps);
                (at(&mut rng, index(shape, n, a)), v4(DNS_IP), 53, rng.below(10) != 0)
            }
            80..=89 => {
                let a = rng.below(shape.apps);
                let port = if role(a) == Role::Database { 9187 } else { 9100 };
                (v4(PROM_IP), at(&mut rng, index(shape, n, a)), port, false)
            }
            90..=94 => {
                let b = pick(&mut rng, Role::Backend);
                let dst = v4(Ipv4Addr::new(203, 0, 113, rng.below(250) as u8 + 1));
                (at(&mut rng, index(shape, n, b)), dst, 443, false)
            }
            _ => {
                let a = rng.below(shape.workloads());
                let b = rng.below(shape.workloads());
                let port = [22u16, 80, 3306, 6379, 8443][rng.below(5)];
                (at(&mut rng, a), at(&mut rng, b), port, false)
            }
        };
        out.push(flow);
    }
    out
}

/// A `flowgate test` case file of `count` cases over the mix's shapes, by workload name
/// and named port, each with the verdict the set gives it.
pub fn cases(shape: &Shape, count: usize) -> String {
    let mut rng = Rng(0xca5e);
    let mut s = String::from("cases:\n");
    for k in 0..count {
        let n = rng.below(shape.namespaces);
        let ns = ns_name(n);
        let (from, to, port, expect) = match k % 4 {
            0 => {
                let f = (rng.below(shape.apps / 10)) * 10;
                let b = frontend_calls(shape, f)[rng.below(3)];
                (format!("{ns}/{}", app_name(f)), format!("{ns}/{}", app_name(b)), "grpc", "allow")
            }
            1 => {
                let b = loop {
                    let a = rng.below(shape.apps);
                    if role(a) == Role::Backend {
                        break a;
                    }
                };
                let d = backend_db(shape, b);
                // Canaries are kept away from the databases.
                let expect = if index(shape, n, b).is_multiple_of(13) { "deny" } else { "allow" };
                (format!("{ns}/{}", app_name(b)), format!("{ns}/{}", app_name(d)), "db", expect)
            }
            2 => {
                let a = rng.below(shape.apps);
                (
                    "monitoring/prometheus".to_string(),
                    format!("{ns}/{}", app_name(a)),
                    "metrics",
                    "allow",
                )
            }
            _ => {
                let d = (rng.below(shape.apps / 10)) * 10 + 8;
                let f = (rng.below(shape.apps / 10)) * 10;
                (format!("{ns}/{}", app_name(f)), format!("{ns}/{}", app_name(d)), "db", "deny")
            }
        };
        let _ = writeln!(
            s,
            "  - {{name: c{k}, from: {from}, to: {to}, port: {port}, expect: {expect}}}"
        );
    }
    s
}
