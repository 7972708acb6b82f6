//! The policy engine's cost: `decide` at 10 / 1,000 / 10,000 NetworkPolicies over 10,000
//! workloads, the same with 100 AdminNetworkPolicies and a BaselineAdminNetworkPolicy on
//! top, `PolicyHandle` load + decide, compile time, the memory the compiled tables hold,
//! and the naive evaluator (`policy::reference`) on the same input for the ratio.
//!
//! Run: `cargo bench --bench decide` (quick: add `-- --warm-up-time 1 --measurement-time 3`).
//! Before the timed groups it prints, per set, compile time, the bytes the compiled
//! policy keeps (counted by this binary's global allocator) and the peak during
//! compilation, and it asserts that `decide` made no allocation over every sample flow.
//! Results are recorded in BENCHMARKS.md, section "Policy engine".
//!
//! The input is generated, deterministic (fixed seed) and shaped like a real cluster:
//! 100 namespaces (team/env labels) of 100 workloads each, app/tier labels from small
//! vocabularies, /32 addresses plus some /28 scaling subnets and IPv6, named ports;
//! NetworkPolicies that are default-denies, app-to-app allows by pod and namespace
//! selectors (one peer and two peers), named and numbered ports and ranges, ipBlocks
//! with excepts; ANPs with namespace/pod subjects, networks, domains, namedPort,
//! portRange and Pass; a BANP that denies between workloads.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flowgate::flow::Proto;
use flowgate::policy::ir::{
    Action, DomainPattern, Inventory, LabelSelector, Labels, Mode, NAMESPACE_NAME_LABEL, NamedPort,
    Namespace, NamespaceMatch, Peer, Peers, Policy, PolicyKind, PolicySet, PortMatch, Requirement,
    Rule, SelectorOp, Tier, Workload, WorkloadSelector,
};
use flowgate::policy::{
    CompileOptions, CompiledPolicy, DefaultAction, FlowQuery, Generation, PolicyHandle,
    PolicySnapshot, reference,
};
use ipnet::IpNet;

#[path = "support/realistic.rs"]
mod realistic;

// ---------------- counting allocator ----------------

/// Counts allocations and live bytes, so the bench can report the compiled policy's
/// footprint and prove `decide` allocates nothing.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn add_live(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards every call unchanged to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        add_live(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        add_live(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------- deterministic generator ----------------

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

const NAMESPACES: usize = 100;
const WORKLOADS: usize = 10_000;
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

fn ns_name(i: usize) -> String {
    format!("ns{i:03}")
}

fn inventory(rng: &mut Rng) -> Inventory {
    let namespaces = (0..NAMESPACES)
        .map(|i| {
            let name = ns_name(i);
            let mut l = labels(&[("team", TEAMS[i % TEAMS.len()]), ("env", ENVS[i % ENVS.len()])]);
            l.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
            Namespace { name, labels: l }
        })
        .collect();
    let workloads = (0..WORKLOADS)
        .map(|i| {
            let ns = i % NAMESPACES;
            let app = APPS[(i / NAMESPACES) % APPS.len()];
            let mut l = labels(&[("app", app), ("tier", TIERS[i % TIERS.len()])]);
            if rng.chance(10) {
                l.insert("canary".into(), "true".into());
            }
            // 10.<ns>.<i/256>.<i%256>/32, every 10th also a /28 scaling subnet in 10.200/16
            // and every 5th an IPv6 address.
            let mut addrs = vec![IpNet::from(IpAddr::V4(Ipv4Addr::new(
                10,
                ns as u8,
                (i / 256 % 256) as u8,
                (i % 256) as u8,
            )))];
            if i % 10 == 0 {
                let base = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + (i as u32 / 10) * 16;
                addrs.push(IpNet::new(IpAddr::V4(Ipv4Addr::from(base)), 28).expect("prefix"));
            }
            if i % 5 == 0 {
                addrs.push(IpNet::from(IpAddr::V6(Ipv6Addr::new(
                    0x2001, 0xdb8, ns as u16, 0, 0, 0, 0, i as u16,
                ))));
            }
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
    Inventory { namespaces, workloads }
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

fn network_policy(rng: &mut Rng, k: usize) -> Policy {
    let ns = ns_name(rng.below(NAMESPACES));
    let subject =
        |sel| WorkloadSelector { namespaces: NamespaceMatch::Named(ns.clone()), pods: sel };
    let base = |subject, ingress, egress| Policy {
        kind: PolicyKind::NetworkPolicy,
        name: format!("np{k}"),
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
        // Default deny of a namespace.
        0 => base(subject(LabelSelector::default()), Some(vec![]), None),
        // App-to-app within the namespace, or from a team's namespaces (one peer: ns AND pod).
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
        // Two peers (union), with expressions.
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
        // Egress to an ipBlock with an except, and DNS.
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
        // Allow from anywhere on a port (ingress rule with no `from`).
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

fn admin_policy(rng: &mut Rng, k: usize) -> Policy {
    let subject = WorkloadSelector {
        namespaces: NamespaceMatch::Selector(if rng.chance(30) {
            LabelSelector::default()
        } else {
            LabelSelector {
                match_labels: labels(&[("team", rng.pick(TEAMS))]),
                match_expressions: vec![],
            }
        }),
        pods: if rng.chance(50) { LabelSelector::default() } else { pods(rng.pick(APPS)) },
    };
    let action = rng.pick(&[Action::Allow, Action::Deny, Action::Pass, Action::Pass]);
    let egress = vec![
        Rule {
            name: Some("imds".into()),
            action: Action::Deny,
            peers: Peers::List(vec![Peer::Cidr {
                net: "169.254.169.254/32".parse().expect("prefix"),
                except: vec![],
            }]),
            ports: None,
        },
        Rule {
            name: Some("apis".into()),
            action: Action::Allow,
            peers: Peers::List(vec![
                Peer::Domain(DomainPattern::Exact(format!("api{k}.example.com"))),
                Peer::Domain(DomainPattern::Wildcard(format!("svc{}.example.net", k % 7))),
            ]),
            ports: Some(vec![PortMatch::Range { protocol: Proto::Tcp, first: 443, last: 443 }]),
        },
        Rule {
            name: Some("peers".into()),
            action,
            peers: Peers::List(vec![Peer::Workloads(WorkloadSelector {
                namespaces: NamespaceMatch::Selector(LabelSelector {
                    match_labels: labels(&[("env", rng.pick(ENVS))]),
                    match_expressions: vec![],
                }),
                pods: pods(rng.pick(APPS)),
            })]),
            ports: Some(vec![PortMatch::Named {
                protocol: None,
                name: rng.pick(PORT_NAMES).to_string(),
            }]),
        },
    ];
    let ingress = vec![Rule {
        name: Some("range".into()),
        action: rng.pick(&[Action::Allow, Action::Deny, Action::Pass]),
        peers: Peers::List(vec![Peer::Workloads(WorkloadSelector {
            namespaces: NamespaceMatch::Selector(LabelSelector {
                match_labels: labels(&[("team", rng.pick(TEAMS))]),
                match_expressions: vec![],
            }),
            pods: LabelSelector::default(),
        })]),
        ports: Some(vec![PortMatch::Range { protocol: Proto::Tcp, first: 9000, last: 9200 }]),
    }];
    Policy {
        kind: PolicyKind::AdminNetworkPolicy,
        name: format!("anp{k:03}"),
        namespace: None,
        source: Default::default(),
        tier: Tier::Admin { priority: rng.below(1000) as u32 },
        subject,
        ingress: Some(ingress),
        egress: Some(egress),
        mode: if k.is_multiple_of(25) { Mode::Audit } else { Mode::Enforce },
        expiry: None,
        created_at: None,
    }
}

fn baseline() -> Policy {
    let all = WorkloadSelector {
        namespaces: NamespaceMatch::Selector(LabelSelector::default()),
        pods: LabelSelector::default(),
    };
    Policy {
        kind: PolicyKind::BaselineAdminNetworkPolicy,
        name: "default".into(),
        namespace: None,
        source: Default::default(),
        tier: Tier::Baseline { priority: 0 },
        subject: all.clone(),
        ingress: Some(vec![Rule {
            name: Some("deny-from-workloads".into()),
            action: Action::Deny,
            peers: Peers::List(vec![Peer::Workloads(all)]),
            ports: None,
        }]),
        egress: None,
        mode: Mode::Enforce,
        expiry: None,
        created_at: None,
    }
}

fn policy_set(nps: usize, admin: bool) -> PolicySet {
    let mut rng = Rng(0x5eed_f10e_u64 ^ nps as u64);
    let inventory = inventory(&mut rng);
    let mut policies: Vec<Policy> = (0..nps).map(|k| network_policy(&mut rng, k)).collect();
    if admin {
        policies.extend((0..100).map(|k| admin_policy(&mut rng, k)));
        policies.push(baseline());
    }
    PolicySet::new(inventory, policies)
}

/// The control-plane benchmark's shape (benches/reload.rs on the `control` branch): a
/// label value unique to every workload and one NetworkPolicy per workload whose subject
/// and peers each name a single other workload, so nearly every selector is distinct
/// (~30,000 at 10,000 policies). This is the case that stresses selector resolution at
/// compile time rather than the rule lists.
fn diverse_set() -> PolicySet {
    const N: usize = 10_000;
    let namespaces = (0..NAMESPACES)
        .map(|n| {
            let name = ns_name(n);
            let mut l = labels(&[("team", &format!("t{}", n % 7))]);
            l.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
            Namespace { name, labels: l }
        })
        .collect();
    let workloads = (0..N)
        .map(|i| Workload {
            name: format!("w{i}"),
            namespace: ns_name(i % NAMESPACES),
            labels: labels(&[("app", &format!("w{i}")), ("tier", &format!("t{}", i % 3))]),
            addrs: vec![IpNet::from(IpAddr::V4(Ipv4Addr::new(
                10,
                (i % NAMESPACES) as u8,
                (i / 256) as u8,
                (i % 256) as u8,
            )))],
            ports: vec![],
        })
        .collect();
    let anywhere = |app: String| WorkloadSelector {
        namespaces: NamespaceMatch::Selector(LabelSelector::default()),
        pods: pods(&app),
    };
    let policies = (0..N)
        .map(|i| {
            let ns = ns_name(i % NAMESPACES);
            let port = 8000 + (i % 1000) as u16;
            let ports =
                Some(vec![PortMatch::Range { protocol: Proto::Tcp, first: port, last: port }]);
            let rule = |peers: Vec<Peer>| Rule {
                name: None,
                action: Action::Allow,
                peers: Peers::List(peers),
                ports: ports.clone(),
            };
            Policy {
                kind: PolicyKind::NetworkPolicy,
                name: format!("p{i}"),
                namespace: Some(ns.clone()),
                source: Default::default(),
                tier: Tier::Namespaced,
                mode: Mode::Enforce,
                expiry: None,
                created_at: None,
                subject: WorkloadSelector {
                    namespaces: NamespaceMatch::Named(ns.clone()),
                    pods: pods(&format!("w{i}")),
                },
                ingress: Some(vec![rule(vec![
                    Peer::Workloads(anywhere(format!("w{}", (i + N - 1) % N))),
                    Peer::Workloads(WorkloadSelector {
                        namespaces: NamespaceMatch::Named(ns.clone()),
                        pods: pods(&format!("w{}", (i + 2) % N)),
                    }),
                ])]),
                egress: Some(vec![rule(vec![Peer::Workloads(anywhere(format!(
                    "w{}",
                    (i + 1) % N
                )))])]),
            }
        })
        .collect();
    PolicySet::new(Inventory { namespaces, workloads }, policies)
}

/// 1,024 flows: workload → workload (70%), workload → external or metadata (15%),
/// workload → a domain (10%), external → workload (5%), with named-port numbers and
/// common ports.
struct Flows {
    flows: Vec<(IpAddr, IpAddr, u16, Proto, Option<String>)>,
}

impl Flows {
    fn new(set: &PolicySet) -> Flows {
        let mut rng = Rng(0xf10e);
        let w = |rng: &mut Rng| {
            let w = &set.inventory.workloads[rng.below(set.inventory.workloads.len())];
            let net = w.addrs[rng.below(w.addrs.len())];
            if net.prefix_len() < 32 && !net.addr().is_ipv6() {
                net.hosts().nth(3).unwrap_or(net.addr())
            } else {
                net.addr()
            }
        };
        let flows = (0..1024)
            .map(|_| {
                let port = rng.pick(&[80u16, 443, 5432, 8080, 8081, 9090, 9100, 9150, 53]);
                let proto = if port == 53 { Proto::Udp } else { Proto::Tcp };
                match rng.below(20) {
                    0..=13 => {
                        let (s, d) = (w(&mut rng), w(&mut rng));
                        // Same family for both ends, as real flows are.
                        let d = if s.is_ipv4() == d.is_ipv4() { d } else { s };
                        (s, d, port, proto, None)
                    }
                    14..=16 => {
                        let s = w(&mut rng);
                        let d = if s.is_ipv6() {
                            IpAddr::V6(Ipv6Addr::new(
                                0x2606,
                                0,
                                0,
                                0,
                                0,
                                0,
                                0,
                                rng.below(999) as u16,
                            ))
                        } else if rng.chance(20) {
                            IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))
                        } else {
                            IpAddr::V4(Ipv4Addr::new(
                                172,
                                rng.below(16) as u8,
                                rng.below(4) as u8,
                                9,
                            ))
                        };
                        (s, d, port, proto, None)
                    }
                    17 | 18 => {
                        let name = if rng.chance(50) {
                            format!("api{}.example.com", rng.below(120))
                        } else {
                            format!("x.svc{}.example.net", rng.below(9))
                        };
                        (
                            w(&mut rng),
                            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                            443,
                            Proto::Tcp,
                            Some(name),
                        )
                    }
                    _ => (
                        IpAddr::V4(Ipv4Addr::new(203, 0, 113, rng.below(250) as u8)),
                        w(&mut rng),
                        443,
                        Proto::Tcp,
                        None,
                    ),
                }
            })
            .collect();
        Flows { flows }
    }

    fn query(&self, i: usize) -> FlowQuery<'_> {
        let (src, dst, dst_port, proto, fqdn) = &self.flows[i % self.flows.len()];
        FlowQuery {
            src: *src,
            dst: *dst,
            dst_port: *dst_port,
            proto: *proto,
            fqdn: fqdn.as_deref(),
        }
    }
}

fn opts() -> CompileOptions {
    CompileOptions {
        default: DefaultAction::Deny,
        unknown: DefaultAction::Deny,
        now: SystemTime::now(),
    }
}

/// Compile time, retained bytes and peak bytes, printed once per set; asserts `decide`
/// allocates nothing over all flows; prints the verdict mix so the input is visibly not
/// trivial.
fn report(label: &str, set: &PolicySet, flows: &Flows) -> CompiledPolicy {
    let live_before = LIVE.load(Ordering::Relaxed);
    PEAK.store(live_before, Ordering::Relaxed);
    let t = Instant::now();
    let compiled = CompiledPolicy::compile(set, &opts()).expect("generated sets compile");
    let took = t.elapsed();
    let retained = LIVE.load(Ordering::Relaxed) - live_before;
    let peak = PEAK.load(Ordering::Relaxed) - live_before;
    let allocs_before = ALLOCS.load(Ordering::Relaxed);
    let mut allowed = 0usize;
    let mut would = 0usize;
    for i in 0..flows.flows.len() {
        let d = compiled.decide(&flows.query(i));
        allowed += usize::from(d.verdict.is_allow());
        would += usize::from(d.would_deny.is_some());
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - allocs_before;
    assert_eq!(
        allocs,
        0,
        "{label}: decide allocated {allocs} times over {} flows",
        flows.flows.len()
    );
    println!(
        "{label}: compile {:.1} ms, compiled policy retains {:.1} MiB, compile peak {:.1} MiB; \
         {} of {} sample flows allowed, {would} would-deny; decide allocations: 0",
        took.as_secs_f64() * 1e3,
        retained as f64 / (1 << 20) as f64,
        peak as f64 / (1 << 20) as f64,
        allowed,
        flows.flows.len()
    );
    compiled
}

/// Thread CPU time (`CLOCK_THREAD_CPUTIME_ID`): what the benchmark thread itself spent,
/// so that other processes competing for the cores do not inflate the figures. The bench
/// reports both this and criterion's wall clock.
struct ThreadCpu;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID is available on Linux");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Nanos;

impl ValueFormatter for Nanos {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (div, unit) = if typical < 1e3 {
            (1.0, "ns")
        } else if typical < 1e6 {
            (1e3, "µs")
        } else {
            (1e6, "ms")
        };
        values.iter_mut().for_each(|v| *v /= div);
        unit
    }
    fn scale_throughputs(&self, _: f64, _: &Throughput, values: &mut [f64]) -> &'static str {
        values.iter_mut().for_each(|v| *v = 1e9 / *v);
        "elem/s"
    }
    fn scale_for_machines(&self, _: &mut [f64]) -> &'static str {
        "ns"
    }
}

impl Measurement for ThreadCpu {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &Nanos
    }
}

/// One generated set with its flows and compiled policy, built once for both measurements.
struct Entry {
    label: String,
    set: PolicySet,
    flows: Flows,
    compiled: CompiledPolicy,
}

fn entries() -> &'static [Entry] {
    static SETS: OnceLock<Vec<Entry>> = OnceLock::new();
    SETS.get_or_init(|| {
        let mut v: Vec<Entry> = [
            (10, false),
            (1_000, false),
            (10_000, false),
            (10, true),
            (1_000, true),
            (10_000, true),
        ]
        .into_iter()
        .map(|(nps, admin)| {
            let label = if admin { format!("{nps}np+100anp+banp") } else { format!("{nps}np") };
            let set = policy_set(nps, admin);
            let flows = Flows::new(&set);
            let compiled = report(&label, &set, &flows);
            Entry { label, set, flows, compiled }
        })
        .collect();
        let set = diverse_set();
        let flows = Flows::new(&set);
        let label = "10000np-diverse".to_string();
        let compiled = report(&label, &set, &flows);
        v.push(Entry { label, set, flows, compiled });
        v
    })
}

/// A realistic set (`support/realistic.rs`) written to disk and loaded as `check` and
/// `run` load it, with its flow mix.
struct RealEntry {
    label: String,
    compiled: CompiledPolicy,
    flows: Vec<realistic::Flow>,
}

impl RealEntry {
    fn query(&self, i: usize) -> FlowQuery<'static> {
        let (src, dst, dst_port, udp) = self.flows[i % self.flows.len()];
        FlowQuery {
            src,
            dst,
            dst_port,
            proto: if udp { Proto::Udp } else { Proto::Tcp },
            fqdn: None,
        }
    }
}

/// `FLOWGATE_BENCH_REALISTIC` (default `1k,10k,10k+tiers`; `100k` on request).
fn realistic_entries() -> &'static [RealEntry] {
    static SETS: OnceLock<Vec<RealEntry>> = OnceLock::new();
    SETS.get_or_init(|| {
        realistic::Shape::from_env("1k,10k,10k+tiers")
            .into_iter()
            .map(|shape| {
                let dir = tempfile::tempdir().expect("tempdir");
                realistic::write(dir.path(), &shape);
                let set = flowgate::policy::load::load(
                    &dir.path().join("policies"),
                    &dir.path().join("inventory.yaml"),
                )
                .expect("the realistic set loads");
                let e = RealEntry {
                    label: shape.label(),
                    compiled: CompiledPolicy::compile(&set, &opts()).expect("compiles"),
                    flows: realistic::flows(&shape, 4096),
                };
                let allocs_before = ALLOCS.load(Ordering::Relaxed);
                let allowed =
                    (0..e.flows.len()).filter(|&i| e.compiled.decide(&e.query(i)).verdict.is_allow()).count();
                let allocs = ALLOCS.load(Ordering::Relaxed) - allocs_before;
                assert_eq!(allocs, 0, "{}: decide allocated", e.label);
                let t = Instant::now();
                let again = CompiledPolicy::compile(&set, &opts()).expect("compiles");
                println!(
                    "{}: {} policies, {} workloads; compile {:.1} ms; {allowed} of {} flows allowed",
                    e.label,
                    set.policies.len(),
                    set.inventory.workloads.len(),
                    t.elapsed().as_secs_f64() * 1e3,
                    e.flows.len()
                );
                drop(again);
                e
            })
            .collect()
    })
}

fn realistic_benches<M: Measurement + 'static>(c: &mut Criterion<M>, clock: &str) {
    let mut g = c.benchmark_group(format!("decide_realistic/{clock}"));
    for e in realistic_entries() {
        let mut i = 0usize;
        g.bench_function(BenchmarkId::from_parameter(&e.label), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(e.compiled.decide(black_box(&e.query(i))))
            })
        });
    }
    g.finish();
}

fn benches<M: Measurement + 'static>(c: &mut Criterion<M>, clock: &str) {
    realistic_benches(c, clock);
    if std::env::var_os("FLOWGATE_BENCH_REALISTIC_ONLY").is_some() {
        return;
    }
    let sets = entries();
    let mut decide = c.benchmark_group(format!("decide/{clock}"));
    for e in sets {
        let mut i = 0usize;
        decide.bench_function(BenchmarkId::from_parameter(&e.label), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(e.compiled.decide(black_box(&e.flows.query(i))))
            })
        });
    }
    decide.finish();

    // The data path's real call: one arc-swap load, then decide.
    let e = &sets[5];
    let handle: PolicyHandle = Arc::new(ArcSwap::from_pointee(PolicySnapshot {
        compiled: CompiledPolicy::compile(&e.set, &opts()).expect("compiles"),
        generation: Generation(1),
        content_hash: String::new(),
        loaded_at: SystemTime::now(),
        source_revision: Default::default(),
    }));
    let mut g = c.benchmark_group(format!("handle/{clock}"));
    let mut i = 0usize;
    g.bench_function(BenchmarkId::new("load+decide", &e.label), |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let snap = handle.load();
            black_box(snap.compiled.decide(black_box(&e.flows.query(i))))
        })
    });
    g.finish();

    // Compile time.
    let mut g = c.benchmark_group(format!("compile/{clock}"));
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for k in [2, 5, 6] {
        let e = &sets[k];
        g.bench_function(BenchmarkId::from_parameter(&e.label), |b| {
            b.iter(|| black_box(CompiledPolicy::compile(&e.set, &opts()).expect("compiles")))
        });
    }
    g.finish();

    // The naive evaluator on the same inputs: the ratio the issue asks for.
    let mut g = c.benchmark_group(format!("reference/{clock}"));
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let o = opts();
    for k in [0, 2, 5] {
        let e = &sets[k];
        let mut i = 0usize;
        g.bench_function(BenchmarkId::from_parameter(&e.label), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(reference::decide(&e.set, &o, black_box(&e.flows.query(i))))
            })
        });
    }
    g.finish();
}

fn cpu(c: &mut Criterion<ThreadCpu>) {
    benches(c, "cpu");
}

fn wall(c: &mut Criterion) {
    benches(c, "wall");
}

criterion_group! {
    name = by_cpu;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = cpu
}
criterion_group!(by_wall, wall);
criterion_main!(by_cpu, by_wall);
