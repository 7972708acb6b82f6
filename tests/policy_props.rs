//! The compiled engine against the reference evaluator, on random inputs.
//!
//! Each proptest case is one random policy set — namespaces with labels, workloads with
//! overlapping IPv4/IPv6 prefixes and named ports, NetworkPolicies, AdminNetworkPolicies
//! and BaselineAdminNetworkPolicies with selectors using every operator, peers and ports
//! of every kind, Pass/Allow/Deny, audit mode and expiries, random defaults — and 24
//! random flows over it (workload addresses, network/broadcast edges, external
//! addresses, with and without a domain name).
//!
//! **Case count: 10,000 proptest cases (random policy sets) × 24 flows = 240,000 flow
//! cases per `cargo test` run** (about 8 s of CPU in the dev profile, measured with
//! the machine's 2 cores shared by a dozen runnable jobs). Every set
//! mixes NetworkPolicies with ANPs and BANPs (Pass/Allow/Deny, domain peers, audit mode,
//! expiries), so tier ordering is exercised in nearly every case.
//! For every flow: `CompiledPolicy::decide` equals `reference::decide` on the whole
//! `Decision`, and `CompiledPolicy::explain` agrees with `decide`.
//!
//! NetworkPolicies are generated as written: `policyTypes` absent, empty (`[]`) or each
//! non-empty list, and `ingress`/`egress` absent, empty or with rules. The engine gets
//! them as the real loader reads that spelling; the oracle gets them as
//! `reference::network_policy_directions` reads it from the API reference (issue 27:
//! the two disagreed on `policyTypes: []`, and the generator never wrote it).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use flowgate::flow::Proto;
use flowgate::policy::ir::{
    Action, DomainPattern, Expiry, Inventory, LabelSelector, Labels, Mode, NAMESPACE_NAME_LABEL,
    NamedPort, Namespace, NamespaceMatch, Peer, Peers, Policy, PolicyKind, PolicySet, PortMatch,
    Requirement, Rule, SelectorOp, Tier, Workload, WorkloadSelector,
};
use flowgate::policy::reference::{self, WrittenDirections};
use flowgate::policy::{CompileOptions, CompiledPolicy, DefaultAction, FlowQuery, Verdict};
use ipnet::IpNet;
use proptest::prelude::*;
use proptest::sample::select;

const FLOWS_PER_SET: usize = 24;
const SETS: u32 = 10_000;

/// Prefixes that nest and overlap in both families, including the whole space.
const PREFIXES: &[&str] = &[
    "10.0.0.0/8",
    "10.0.0.0/16",
    "10.0.0.0/24",
    "10.0.0.0/25",
    "10.0.0.128/25",
    "10.0.0.1/32",
    "10.0.0.130/32",
    "10.0.1.0/24",
    "10.1.0.0/16",
    "192.168.0.0/30",
    "2001:db8::/32",
    "2001:db8::/64",
    "2001:db8::1/128",
    "2001:db8:0:1::/64",
    "fd00::/8",
];

/// Peer CIDRs: the workload prefixes plus the whole spaces and a few outside ones.
const PEER_PREFIXES: &[&str] = &[
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/8",
    "10.0.0.0/24",
    "10.0.0.0/25",
    "10.0.0.1/32",
    "10.0.0.128/25",
    "10.1.0.0/16",
    "8.8.0.0/16",
    "2001:db8::/32",
    "2001:db8::/64",
    "2001:db8::1/128",
];

const EXTRA_IPS: &[&str] = &[
    "0.0.0.0",
    "8.8.8.8",
    "10.0.0.5",
    "10.2.0.1",
    "169.254.169.254",
    "255.255.255.255",
    "2001:db9::1",
    "2001:db8:0:2::5",
    "::1",
];

const DOMAINS: &[&str] = &["example.com", "api.example.com", "a.b.example.com", "example.org"];

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|_| panic!("bad test prefix {s}"))
}

fn labels_strategy(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map(
        select(keys).prop_map(String::from),
        select(values).prop_map(String::from),
        0..3,
    )
}

fn selector_strategy(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = LabelSelector> {
    let op = select(
        &[SelectorOp::In, SelectorOp::NotIn, SelectorOp::Exists, SelectorOp::DoesNotExist][..],
    );
    let req = (select(keys), op, proptest::collection::vec(select(values), 1..3)).prop_map(
        |(k, op, vals)| {
            let values = match op {
                SelectorOp::In | SelectorOp::NotIn => vals.into_iter().map(String::from).collect(),
                _ => Vec::new(),
            };
            Requirement { key: k.to_string(), op, values }
        },
    );
    let random = (
        proptest::collection::btree_map(
            select(keys).prop_map(String::from),
            select(values).prop_map(String::from),
            0..2,
        ),
        proptest::collection::vec(req, 0..2),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        });
    // Empty selectors are common in real policy and make rules actually match.
    prop_oneof![2 => Just(LabelSelector::default()), 3 => random]
}

const POD_KEYS: &[&str] = &["app", "tier"];
const POD_VALUES: &[&str] = &["web", "db", "api"];
const NS_KEYS: &[&str] = &["team", "env", NAMESPACE_NAME_LABEL];
const NS_VALUES: &[&str] = &["x", "y", "a", "b"];
const NS_NAMES: &[&str] = &["a", "b", "c", "d"];

fn workload_selector() -> impl Strategy<Value = WorkloadSelector> {
    let ns = prop_oneof![
        select(NS_NAMES).prop_map(|n| NamespaceMatch::Named(n.to_string())),
        selector_strategy(NS_KEYS, NS_VALUES).prop_map(NamespaceMatch::Selector),
    ];
    (ns, selector_strategy(POD_KEYS, POD_VALUES))
        .prop_map(|(namespaces, pods)| WorkloadSelector { namespaces, pods })
}

fn peer() -> impl Strategy<Value = Peer> {
    let cidr = (select(PEER_PREFIXES), proptest::collection::vec(select(PEER_PREFIXES), 0..3))
        .prop_map(|(n, ex)| {
            let n = net(n);
            let except: BTreeSet<IpNet> =
                ex.into_iter().map(net).filter(|e| n.contains(e) && *e != n).collect();
            Peer::Cidr { net: n, except: except.into_iter().collect() }
        });
    let domain = (select(DOMAINS), any::<bool>()).prop_map(|(d, wild)| {
        Peer::Domain(if wild {
            DomainPattern::Wildcard(d.to_string())
        } else {
            DomainPattern::Exact(d.to_string())
        })
    });
    prop_oneof![3 => workload_selector().prop_map(Peer::Workloads), 2 => cidr, 1 => domain]
}

fn port() -> impl Strategy<Value = PortMatch> {
    let proto = select(&[Proto::Tcp, Proto::Udp, Proto::Sctp][..]);
    prop_oneof![
        (proto.clone(), select(&[53u16, 80, 443, 8080, 65535][..]), 0u16..400).prop_map(
            |(protocol, first, span)| {
                PortMatch::Range { protocol, first, last: first.saturating_add(span % 3 * 200) }
            }
        ),
        (proptest::option::of(proto), select(&["http", "https", "dns", "none"][..]))
            .prop_map(|(protocol, name)| PortMatch::Named { protocol, name: name.to_string() }),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    let peers = prop_oneof![1 => Just(Peers::Any), 4 => proptest::collection::vec(peer(), 0..3).prop_map(Peers::List)];
    let ports = proptest::option::of(proptest::collection::vec(port(), 0..3));
    let action = select(&[Action::Allow, Action::Deny, Action::Pass][..]);
    (action, peers, ports, proptest::option::of(select(&["r1", "r2"][..]))).prop_map(
        |(action, peers, ports, name)| Rule { name: name.map(String::from), action, peers, ports },
    )
}

/// Every spelling of a NetworkPolicy's `policyTypes`: absent, empty, and each non-empty
/// list the API accepts (both orders of the pair).
const POLICY_TYPES: &[Option<&[&str]>] = &[
    None,
    Some(&[]),
    Some(&["Ingress"]),
    Some(&["Egress"]),
    Some(&["Ingress", "Egress"]),
    Some(&["Egress", "Ingress"]),
];

type PolicyTypes = Option<&'static [&'static str]>;

/// A generated policy as written. For a NetworkPolicy, `ingress`/`egress` are the lists
/// as written (`None`: the key is absent) and `policy_types` its `policyTypes`; what they
/// mean is left to the loader and to the oracle. Other kinds are generated as IR.
#[derive(Clone, Debug)]
struct WrittenPolicy {
    policy: Policy,
    policy_types: PolicyTypes,
}

/// A generated policy set as written; [`Written::loaded`] is what the engine is given,
/// [`Written::specified`] what the oracle is given.
#[derive(Clone, Debug)]
struct Written {
    inventory: Inventory,
    policies: Vec<WrittenPolicy>,
}

impl Written {
    /// Each NetworkPolicy's directions as the real loader reads its spelling.
    fn loaded(&self) -> PolicySet {
        self.with_directions(|w| {
            let (ingress, egress) = loaded_directions(
                w.policy_types,
                w.policy.ingress.as_ref().map(Vec::len),
                w.policy.egress.as_ref().map(Vec::len),
            );
            let rules = |covered: bool, written: &Option<Vec<Rule>>| {
                covered.then(|| written.clone().unwrap_or_default())
            };
            (rules(ingress, &w.policy.ingress), rules(egress, &w.policy.egress))
        })
    }

    /// Each NetworkPolicy's directions as the oracle reads the API reference.
    fn specified(&self) -> PolicySet {
        self.with_directions(|w| {
            reference::network_policy_directions(WrittenDirections {
                policy_types: w.policy_types,
                ingress: w.policy.ingress.as_deref(),
                egress: w.policy.egress.as_deref(),
            })
        })
    }

    fn with_directions(
        &self,
        read: impl Fn(&WrittenPolicy) -> (Option<Vec<Rule>>, Option<Vec<Rule>>),
    ) -> PolicySet {
        let policies = self.policies.iter().map(|w| {
            let mut p = w.policy.clone();
            if p.kind == PolicyKind::NetworkPolicy {
                (p.ingress, p.egress) = read(w);
            }
            p
        });
        PolicySet::new(self.inventory.clone(), policies.collect())
    }
}

/// A NetworkPolicy's spelling: `policyTypes`, and how many ingress and egress rules (`None`:
/// the key is absent).
type Spelling = (PolicyTypes, Option<usize>, Option<usize>);

thread_local! {
    /// Whether the loader covers ingress and egress, per spelling.
    static LOADED: RefCell<HashMap<Spelling, (bool, bool)>> = RefCell::new(HashMap::new());
}

/// Which directions the real loader covers for a NetworkPolicy spelled with these
/// `policyTypes` and this many ingress/egress rules (`None`: the key is absent). The
/// loader reads a skeleton with `{}` rules; only the spelling matters, and there are few
/// spellings, so each is loaded once per thread.
fn loaded_directions(
    types: PolicyTypes,
    ingress: Option<usize>,
    egress: Option<usize>,
) -> (bool, bool) {
    let key = (types, ingress, egress);
    if let Some(hit) = LOADED.with(|c| c.borrow().get(&key).copied()) {
        return hit;
    }
    let list = |n: usize| format!("[{}]", vec!["{}"; n].join(", "));
    let mut yaml = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n",
    );
    if let Some(t) = types {
        yaml += &format!("  policyTypes: [{}]\n", t.join(", "));
    }
    if let Some(n) = ingress {
        yaml += &format!("  ingress: {}\n", list(n));
    }
    if let Some(n) = egress {
        yaml += &format!("  egress: {}\n", list(n));
    }
    let loaded = flowgate::policy::load::parse_policies(&yaml, Path::new("skeleton.yaml"))
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let [p] = &loaded[..] else { panic!("one policy from {yaml}") };
    for (covered, written) in [(&p.ingress, ingress), (&p.egress, egress)] {
        if let Some(rules) = covered {
            assert_eq!(rules.len(), written.unwrap_or(0), "a covered direction keeps its rules");
        }
    }
    let hit = (p.ingress.is_some(), p.egress.is_some());
    LOADED.with(|c| c.borrow_mut().insert(key, hit));
    hit
}

fn policy(now: SystemTime) -> impl Strategy<Value = WrittenPolicy> {
    let tier = prop_oneof![
        2 => (0u32..3).prop_map(|priority| Tier::Admin { priority }),
        3 => Just(Tier::Namespaced),
        1 => (0u32..2).prop_map(|priority| Tier::Baseline { priority }),
    ];
    let rules = || proptest::option::of(proptest::collection::vec(rule(), 0..3));
    let expiry = prop_oneof![
        6 => Just((None, None)),
        1 => (-100i64..100).prop_map(move |s| (Some(Expiry::At(shift(now, s))), None)),
        1 => (0u64..300, proptest::option::of(-400i64..0))
            .prop_map(move |(ttl, created)| (Some(Expiry::Ttl(Duration::from_secs(ttl))), created.map(|c| shift(now, c)))),
    ];
    (
        tier,
        select(&["p0", "p1", "p2"][..]),
        select(NS_NAMES),
        workload_selector(),
        selector_strategy(POD_KEYS, POD_VALUES),
        rules(),
        rules(),
        prop_oneof![5 => Just(Mode::Enforce), 1 => Just(Mode::Audit)],
        expiry,
        select(POLICY_TYPES),
    )
        .prop_map(
            |(
                tier,
                name,
                ns,
                subject,
                pods,
                ingress,
                egress,
                mode,
                (expiry, created_at),
                types,
            )| {
                let (kind, namespace, subject) = match tier {
                    Tier::Namespaced => (
                        PolicyKind::NetworkPolicy,
                        Some(ns.to_string()),
                        WorkloadSelector {
                            namespaces: NamespaceMatch::Named(ns.to_string()),
                            pods,
                        },
                    ),
                    Tier::Admin { .. } => (PolicyKind::AdminNetworkPolicy, None, subject),
                    Tier::Baseline { .. } => {
                        (PolicyKind::BaselineAdminNetworkPolicy, None, subject)
                    }
                };
                let mut p = Policy {
                    kind,
                    name: name.to_string(),
                    namespace,
                    source: Default::default(),
                    tier,
                    subject,
                    ingress,
                    egress,
                    mode,
                    expiry,
                    created_at,
                };
                sanitize(&mut p);
                let policy_types = (tier == Tier::Namespaced).then_some(types).flatten();
                WrittenPolicy { policy: p, policy_types }
            },
        )
}

fn shift(now: SystemTime, secs: i64) -> SystemTime {
    if secs >= 0 {
        now + Duration::from_secs(secs as u64)
    } else {
        now - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Enforces the IR's invariants on a generated policy: NetworkPolicy rules allow;
/// Pass only in the Admin tier; domain peers only in egress Allow rules.
fn sanitize(p: &mut Policy) {
    let tier = p.tier;
    for (egress, rules) in [(false, &mut p.ingress), (true, &mut p.egress)] {
        for r in rules.iter_mut().flatten() {
            r.action = match (tier, r.action) {
                (Tier::Namespaced, _) => Action::Allow,
                (Tier::Baseline { .. }, Action::Pass) => Action::Deny,
                (_, a) => a,
            };
            if tier == Tier::Namespaced {
                r.name = None;
            }
            if !(egress && r.action == Action::Allow)
                && let Peers::List(peers) = &mut r.peers
            {
                peers.retain(|p| !matches!(p, Peer::Domain(_)));
            }
        }
    }
}

fn workload() -> impl Strategy<Value = Workload> {
    let np = (
        select(&["http", "https", "dns"][..]),
        select(&[53u16, 80, 443, 8080][..]),
        select(&[Proto::Tcp, Proto::Udp][..]),
    )
        .prop_map(|(name, port, protocol)| NamedPort {
            name: name.to_string(),
            port,
            protocol,
        });
    (
        select(NS_NAMES),
        labels_strategy(POD_KEYS, POD_VALUES),
        proptest::collection::vec(select(PREFIXES), 0..3),
        proptest::collection::vec(np, 0..3),
    )
        .prop_map(|(ns, labels, addrs, ports)| Workload {
            name: String::new(),
            namespace: ns.to_string(),
            labels,
            addrs: addrs.into_iter().map(net).collect(),
            ports,
        })
}

fn policy_set(now: SystemTime) -> impl Strategy<Value = Written> {
    let ns = labels_strategy(&["team", "env"], NS_VALUES);
    (
        proptest::collection::vec(ns, 3),
        proptest::collection::vec(workload(), 1..8),
        proptest::collection::vec(policy(now), 1..12),
    )
        .prop_map(|(ns_labels, mut workloads, policies)| {
            // Namespace "d" is left out of the inventory on purpose.
            let namespaces = ns_labels
                .into_iter()
                .zip(["a", "b", "c"])
                .map(|(mut labels, name)| {
                    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
                    Namespace { name: name.to_string(), labels }
                })
                .collect();
            // No address is owned twice (a loader invariant).
            let mut owned = BTreeSet::new();
            for (i, w) in workloads.iter_mut().enumerate() {
                w.name = format!("w{i}");
                w.addrs.retain(|a| owned.insert(*a));
            }
            Written { inventory: Inventory { namespaces, workloads }, policies }
        })
}

#[derive(Clone, Debug)]
struct Flow {
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    proto: Proto,
    fqdn: Option<&'static str>,
}

fn interesting_ips() -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = EXTRA_IPS.iter().filter_map(|s| s.parse().ok()).collect();
    for p in PREFIXES {
        let n = net(p);
        ips.push(n.network());
        ips.push(n.broadcast());
        if let Some(h) = n.hosts().nth(1) {
            ips.push(h);
        }
    }
    ips
}

fn flow(owned: Vec<IpAddr>) -> impl Strategy<Value = Flow> {
    let ips = interesting_ips();
    let ip = prop_oneof![1 => select(ips), 2 => select(owned)];
    (
        ip.clone(),
        ip,
        select(&[0u16, 1, 53, 80, 443, 600, 8080, 65535][..]),
        select(&[Proto::Tcp, Proto::Tcp, Proto::Udp, Proto::Sctp, Proto::Icmp][..]),
        proptest::option::of(select(DOMAINS)),
    )
        .prop_map(|(src, dst, port, proto, fqdn)| Flow { src, dst, port, proto, fqdn })
}

/// Addresses inside the set's workload prefixes: network, first host, last address.
fn owned_ips(inventory: &Inventory) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = inventory
        .workloads
        .iter()
        .flat_map(|w| w.addrs.iter())
        .flat_map(|n| [n.network(), n.hosts().nth(1).unwrap_or(n.network()), n.broadcast()])
        .collect();
    if ips.is_empty() {
        ips.push(IpAddr::from([10, 0, 0, 1]));
    }
    ips
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(SETS))]

    /// 10,000 sets × 24 flows = 240,000 cases; see the module doc.
    #[test]
    fn compiled_decide_equals_reference(
        (written, flows) in policy_set(now()).prop_flat_map(|written| {
            let flows = proptest::collection::vec(flow(owned_ips(&written.inventory)), FLOWS_PER_SET);
            (Just(written), flows)
        }),
        default in select(&[DefaultAction::Allow, DefaultAction::Deny][..]),
        unknown in select(&[DefaultAction::Allow, DefaultAction::Deny][..]),
    ) {
        let opts = CompileOptions { default, unknown, now: now() };
        // The loader and the oracle read every spelling of every NetworkPolicy alike...
        let set = written.loaded();
        let specified = written.specified();
        for (w, (got, want)) in written.policies.iter().zip(set.policies.iter().zip(&specified.policies)) {
            prop_assert_eq!(
                (&got.ingress, &got.egress), (&want.ingress, &want.egress),
                "policyTypes {:?}, ingress {:?}, egress {:?}",
                w.policy_types, w.policy.ingress.as_ref().map(Vec::len), w.policy.egress.as_ref().map(Vec::len)
            );
        }
        // ... and the engine over the loaded set decides as the oracle over the specified one.
        let compiled = match CompiledPolicy::compile(&set, &opts) {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("compile: {e}"))),
        };
        for f in &flows {
            let q = FlowQuery { src: f.src, dst: f.dst, dst_port: f.port, proto: f.proto, fqdn: f.fqdn };
            let fast = compiled.decide(&q);
            let slow = reference::decide(&specified, &opts, &q);
            prop_assert_eq!(fast, slow, "flow {:?}", f);
            let ex = compiled.explain(&q);
            prop_assert_eq!(ex.decision, fast);
            prop_assert_eq!(ex.verdict, if fast.verdict.is_allow() { "allow" } else { "deny" });
            prop_assert_eq!(ex.policy.is_some(), fast.policy.is_some());
            prop_assert_eq!(ex.would_deny.is_some(), fast.would_deny.is_some());
            if let Verdict::Deny(r) = fast.verdict {
                let side = match r.direction.map(|d| d.as_str()) {
                    Some("egress") => ex.egress.as_ref(),
                    Some(_) => ex.ingress.as_ref(),
                    None => None,
                };
                if r.direction.is_some() {
                    prop_assert_eq!(side.map(|s| s.verdict), Some("deny"));
                }
            }
            // Identity agrees with the oracle.
            prop_assert_eq!(compiled.workload_of(f.src), reference::workload_of(&set, f.src));
        }
        // Every workload's representative address resolves back to it.
        for i in 0..set.inventory.workloads.len() {
            let id = flowgate::policy::WorkloadId(i as u32);
            if let Some(ip) = compiled.workload_addr(id) {
                prop_assert_eq!(compiled.workload_of(ip), Some(id));
            }
        }
        // The next expiry is the earliest future one.
        let expect = set.policies.iter().filter_map(|p| p.expires_at(opts.now)).filter(|t| *t > opts.now).min();
        prop_assert_eq!(compiled.next_expiry(), expect);
    }
}

/// The property test is only as good as its inputs: over a sample of the same generator,
/// every outcome the tiers can produce must actually occur — each denial cause, allows by
/// each tier, audit would-denies, domain-rule allows — so agreement is not vacuous.
#[test]
fn generator_reaches_every_tier_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeMap;

    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut spellings: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..500 {
        let default = if i % 2 == 0 { DefaultAction::Allow } else { DefaultAction::Deny };
        let written = policy_set(now()).new_tree(&mut runner).expect("generate").current();
        for w in &written.policies {
            if w.policy.kind == PolicyKind::NetworkPolicy {
                *spellings.entry(format!("{:?}", w.policy_types)).or_default() += 1;
            }
        }
        let set = written.loaded();
        let flows = proptest::collection::vec(flow(owned_ips(&set.inventory)), FLOWS_PER_SET)
            .new_tree(&mut runner)
            .expect("generate")
            .current();
        let opts = CompileOptions { default, unknown: DefaultAction::Deny, now: now() };
        let compiled = CompiledPolicy::compile(&set, &opts).expect("compile");
        for f in &flows {
            let q = FlowQuery {
                src: f.src,
                dst: f.dst,
                dst_port: f.port,
                proto: f.proto,
                fqdn: f.fqdn,
            };
            let ex = compiled.explain(&q);
            let mut hit = |k: &'static str| *seen.entry(k).or_default() += 1;
            hit(ex.reason.unwrap_or("allow"));
            if ex.would_deny.is_some() {
                hit("would-deny");
            }
            for side in [ex.egress.as_ref(), ex.ingress.as_ref()].into_iter().flatten() {
                if side.verdict == "allow" {
                    hit(match side.decided_by {
                        "admin" => "allow-by-admin",
                        "networkpolicy" => "allow-by-networkpolicy",
                        "baseline" => "allow-by-baseline",
                        _ => "allow-by-default",
                    });
                }
                if side.admin.as_ref().is_some_and(|r| r.action == "Pass") {
                    hit("pass");
                }
            }
            if f.fqdn.is_some()
                && ex.verdict == "allow"
                && ex.egress.as_ref().is_some_and(|s| s.decided_by == "admin")
            {
                hit("allow-with-name-by-admin");
            }
        }
    }
    eprintln!("outcomes over 500 sets x {FLOWS_PER_SET} flows: {seen:?}");
    for k in [
        "allow",
        "admin-deny",
        "not-admitted",
        "baseline-deny",
        "default-deny",
        "unknown-endpoints",
        "would-deny",
        "allow-by-admin",
        "allow-by-networkpolicy",
        "allow-by-baseline",
        "pass",
        "allow-with-name-by-admin",
    ] {
        assert!(seen.get(k).copied().unwrap_or(0) >= 5, "{k} too rare: {seen:?}");
    }
    // Every spelling of policyTypes is written, `[]` included.
    for types in POLICY_TYPES {
        let n = spellings.get(&format!("{types:?}")).copied().unwrap_or(0);
        assert!(n >= 20, "policyTypes {types:?} too rare: {spellings:?}");
    }
}
