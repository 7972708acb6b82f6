//! `policy::diff` at scale (issue 23's targets):
//! - `diff/one-change/10k`: one NetworkPolicy changed in a set of 10,000 over 10,000
//!   workloads (target ≤ 1 s, both compiles included);
//! - `diff/unrelated/1k`: two unrelated sets of 1,000 NetworkPolicies over 1,000 workloads
//!   (target ≤ 5 s, both compiles included).
//!
//! The `diff-only` variants leave the compiles out. The sets are generated like
//! benches/decide.rs's: namespaces with team/env labels, workloads with app/tier labels and
//! named ports, NetworkPolicies of every common shape (default deny, app-to-app with
//! namespace selectors, expressions, ipBlocks with excepts, DNS).
//!
//! `cargo bench --bench diff`

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::flow::Proto;
use flowgate::policy::diff::{self, Side};
use flowgate::policy::ir::{
    Action, Inventory, LabelSelector, Labels, Mode, NAMESPACE_NAME_LABEL, NamedPort, Namespace,
    NamespaceMatch, Peer, Peers, Policy, PolicyKind, PolicySet, PortMatch, Requirement, Rule,
    SelectorOp, Tier, Workload, WorkloadSelector,
};
use flowgate::policy::{CompileOptions, CompiledPolicy, DefaultAction};
use ipnet::IpNet;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

const APPS: &[&str] = &[
    "web", "api", "db", "cache", "queue", "auth", "billing", "search", "mail", "cron", "etl",
    "report", "gateway", "admin", "metrics", "logs", "cdn", "media", "ml", "notify",
];
const TIERS: &[&str] = &["front", "back", "data"];
const TEAMS: &[&str] = &["payments", "data", "platform", "growth", "edge", "ml", "ops", "core"];
const ENVS: &[&str] = &["prod", "staging", "dev"];
const PORT_NAMES: &[&str] = &["http", "grpc", "metrics", "db"];

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn inventory(rng: &mut Rng, workloads: usize, namespaces: usize) -> Inventory {
    let ns_name = |i: usize| format!("ns{i:03}");
    let namespaces_list = (0..namespaces)
        .map(|i| {
            let name = ns_name(i);
            let mut l = labels(&[("team", TEAMS[i % TEAMS.len()]), ("env", ENVS[i % ENVS.len()])]);
            l.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
            Namespace { name, labels: l }
        })
        .collect();
    let workloads = (0..workloads)
        .map(|i| {
            let ns = i % namespaces;
            let app = APPS[(i / namespaces) % APPS.len()];
            let mut l = labels(&[("app", app), ("tier", TIERS[i % TIERS.len()])]);
            if rng.chance(10) {
                l.insert("canary".into(), "true".into());
            }
            let addrs = vec![IpNet::from(IpAddr::V4(Ipv4Addr::new(
                10,
                ns as u8,
                (i / 256 % 256) as u8,
                (i % 256) as u8,
            )))];
            let ports = PORT_NAMES
                .iter()
                .enumerate()
                .filter(|_| rng.chance(60))
                .map(|(k, name)| NamedPort {
                    name: name.to_string(),
                    port: [8080u16, 9090, 9100, 5432][k] + (i % 3) as u16,
                    protocol: Proto::Tcp,
                })
                .collect();
            Workload { name: format!("w{i}"), namespace: ns_name(ns), labels: l, addrs, ports }
        })
        .collect();
    Inventory { namespaces: namespaces_list, workloads }
}

fn pods(app: &str) -> LabelSelector {
    LabelSelector { match_labels: labels(&[("app", app)]), match_expressions: vec![] }
}

fn ports(rng: &mut Rng) -> Option<Vec<PortMatch>> {
    match rng.below(4) {
        0 => None,
        1 => Some(vec![PortMatch::Named {
            protocol: Some(Proto::Tcp),
            name: rng.pick(PORT_NAMES).to_string(),
        }]),
        2 => {
            let p = rng.pick(&[80u16, 443, 5432, 8080]);
            Some(vec![PortMatch::Range { protocol: Proto::Tcp, first: p, last: p }])
        }
        _ => Some(vec![PortMatch::Range { protocol: Proto::Tcp, first: 8000, last: 8100 }]),
    }
}

fn network_policy(rng: &mut Rng, k: usize, namespaces: usize, prefix: &str) -> Policy {
    let ns = format!("ns{:03}", rng.below(namespaces));
    let subject =
        |sel| WorkloadSelector { namespaces: NamespaceMatch::Named(ns.clone()), pods: sel };
    let base = |subject, ingress, egress| Policy {
        kind: PolicyKind::NetworkPolicy,
        name: format!("{prefix}{k}"),
        namespace: Some(ns.clone()),
        source: Default::default(),
        tier: Tier::Namespaced,
        subject,
        ingress,
        egress,
        mode: Mode::Enforce,
        expiry: None,
        created_at: None,
    };
    let allow = |peers, ports| Rule { name: None, action: Action::Allow, peers, ports };
    match rng.below(10) {
        0 => base(subject(LabelSelector::default()), Some(vec![]), None),
        1..=4 => {
            let from = if rng.chance(50) {
                Peer::Workloads(WorkloadSelector {
                    namespaces: NamespaceMatch::Named(ns.clone()),
                    pods: pods(rng.pick(APPS)),
                })
            } else {
                Peer::Workloads(WorkloadSelector {
                    namespaces: NamespaceMatch::Selector(LabelSelector {
                        match_labels: labels(&[("team", rng.pick(TEAMS))]),
                        match_expressions: vec![],
                    }),
                    pods: pods(rng.pick(APPS)),
                })
            };
            base(
                subject(pods(rng.pick(APPS))),
                Some(vec![allow(Peers::List(vec![from]), ports(rng))]),
                None,
            )
        }
        5 | 6 => {
            let peers = vec![
                Peer::Workloads(WorkloadSelector {
                    namespaces: NamespaceMatch::Selector(LabelSelector {
                        match_labels: labels(&[("env", rng.pick(ENVS))]),
                        match_expressions: vec![],
                    }),
                    pods: LabelSelector::default(),
                }),
                Peer::Workloads(WorkloadSelector {
                    namespaces: NamespaceMatch::Named(ns.clone()),
                    pods: LabelSelector {
                        match_labels: Labels::new(),
                        match_expressions: vec![Requirement {
                            key: "tier".into(),
                            op: SelectorOp::In,
                            values: vec![rng.pick(TIERS).to_string()],
                        }],
                    },
                }),
            ];
            let sel = LabelSelector {
                match_labels: labels(&[("app", rng.pick(APPS))]),
                match_expressions: vec![Requirement {
                    key: "canary".into(),
                    op: SelectorOp::DoesNotExist,
                    values: vec![],
                }],
            };
            base(subject(sel), Some(vec![allow(Peers::List(peers), ports(rng))]), None)
        }
        7 | 8 => {
            let a = rng.below(200) as u8;
            let cidr = Peer::Cidr {
                net: IpNet::new(IpAddr::V4(Ipv4Addr::new(172, a / 16, 0, 0)), 12)
                    .expect("prefix")
                    .trunc(),
                except: vec![
                    IpNet::new(IpAddr::V4(Ipv4Addr::new(172, a / 16, 1, 0)), 24)
                        .expect("prefix")
                        .trunc(),
                ],
            };
            let egress = vec![
                allow(Peers::List(vec![cidr]), ports(rng)),
                allow(
                    Peers::Any,
                    Some(vec![PortMatch::Range { protocol: Proto::Udp, first: 53, last: 53 }]),
                ),
            ];
            base(subject(pods(rng.pick(APPS))), None, Some(egress))
        }
        _ => base(
            subject(pods(rng.pick(APPS))),
            Some(vec![allow(
                Peers::Any,
                Some(vec![PortMatch::Range { protocol: Proto::Tcp, first: 443, last: 443 }]),
            )]),
            None,
        ),
    }
}

fn opts() -> CompileOptions {
    CompileOptions {
        default: DefaultAction::Deny,
        unknown: DefaultAction::Deny,
        now: SystemTime::now(),
    }
}

/// Compiles both sides and diffs them; the number of class changes.
fn compile_and_diff(before: &PolicySet, after: &PolicySet) -> usize {
    let cb = CompiledPolicy::compile(before, &opts()).expect("compiles");
    let ca = CompiledPolicy::compile(after, &opts()).expect("compiles");
    let (d, _) =
        diff::diff(Side { set: before, compiled: &cb }, Side { set: after, compiled: &ca });
    d.changes.len()
}

fn one_change() -> (PolicySet, PolicySet) {
    let mut rng = Rng(0x5eed_d1ff);
    let inv = Arc::new(inventory(&mut rng, 10_000, 100));
    let policies: Vec<Arc<Policy>> =
        (0..10_000).map(|k| Arc::new(network_policy(&mut rng, k, 100, "np"))).collect();
    let before = PolicySet { inventory: inv.clone(), policies: policies.clone() };
    let mut after = PolicySet { inventory: inv, policies };
    // The change: one app-to-app policy gets another port.
    let i = after
        .policies
        .iter()
        .position(|p| p.ingress.as_ref().is_some_and(|r| !r.is_empty()))
        .expect("an ingress policy");
    let p = Arc::make_mut(&mut after.policies[i]);
    if let Some(r) = p.ingress.as_mut().and_then(|r| r.first_mut()) {
        r.ports = Some(vec![PortMatch::Range { protocol: Proto::Tcp, first: 7000, last: 7001 }]);
    }
    (before, after)
}

fn unrelated() -> (PolicySet, PolicySet) {
    let mut rng = Rng(0x0dd_5e75);
    let inv = Arc::new(inventory(&mut rng, 1_000, 20));
    let a = (0..1_000).map(|k| Arc::new(network_policy(&mut rng, k, 20, "a"))).collect();
    let b = (0..1_000).map(|k| Arc::new(network_policy(&mut rng, k, 20, "b"))).collect();
    (PolicySet { inventory: inv.clone(), policies: a }, PolicySet { inventory: inv, policies: b })
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("diff");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for (name, (before, after)) in [("one-change/10k", one_change()), ("unrelated/1k", unrelated())]
    {
        let cb = CompiledPolicy::compile(&before, &opts()).expect("compiles");
        let ca = CompiledPolicy::compile(&after, &opts()).expect("compiles");
        let (d, stats) =
            diff::diff(Side { set: &before, compiled: &cb }, Side { set: &after, compiled: &ca });
        eprintln!(
            "{name}: {} class changes, {} endpoint changes; {stats:?}",
            d.changes.len(),
            d.expand().len()
        );
        g.bench_function(name, |b| b.iter(|| compile_and_diff(&before, &after)));
        g.bench_function(format!("{name}/diff-only"), |b| {
            b.iter(|| {
                diff::diff(
                    Side { set: &before, compiled: &cb },
                    Side { set: &after, compiled: &ca },
                )
                .0
                .changes
                .len()
            })
        });
    }
    g.finish();
}

criterion_group!(diff_benches, benches);
criterion_main!(diff_benches);
