//! The reloader's compilation (`CompiledPolicy::compile_with` and its `CompileCache`,
//! carried from one generation to the next) against a compilation from scratch, over
//! random edit sequences.
//!
//! Each proptest case is a random starting set (namespaces, workloads with labels,
//! addresses and named ports; NetworkPolicies, AdminNetworkPolicies and a
//! BaselineAdminNetworkPolicy with selectors using every operator, workload, CIDR and
//! port peers) and a sequence of up to 12 edits applied the way the reloader applies a
//! file change: a policy added, removed or replaced (the other policies and the
//! inventory shared by `Arc`, as the parse cache shares them), or the inventory replaced
//! (relabelled or readdressed workloads, a workload added or removed), a policy moved
//! within the set or re-created equal in a new `Arc` (the compiler caches each policy's
//! compiled part by its `Arc`), or replaced by an invalid one (the compile must fail and
//! the cache must serve the next edit as if it had not happened). After every edit
//! the incrementally compiled policy must equal, table by table, a fresh `compile` of
//! the same set, and decide every sample flow the same way.
//!
//! **Case count: 300 sequences × up to 12 edits (≈ 2,000 compared compilations) and 32
//! flows each per `cargo test` run.**

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::SystemTime;

use flowgate::flow::Proto;
use flowgate::policy::ir::{
    Action, Inventory, LabelSelector, Labels, NAMESPACE_NAME_LABEL, NamedPort, Namespace,
    NamespaceMatch, Peer, Peers, Policy, PolicyKind, PolicySet, PortMatch, Requirement, Rule,
    SelectorOp, Tier, Workload, WorkloadSelector,
};
use flowgate::policy::{CompileCache, CompileOptions, CompiledPolicy, DefaultAction, FlowQuery};
use ipnet::IpNet;
use proptest::prelude::*;
use proptest::sample::select;

const NAMESPACES: &[&str] = &["a", "b", "c"];
const KEYS: &[&str] = &["app", "role", "canary"];
const VALUES: &[&str] = &["x", "y", "z"];
const PORT_NAMES: &[&str] = &["http", "grpc"];

fn labels() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(
        select(KEYS).prop_map(str::to_string),
        select(VALUES).prop_map(str::to_string),
        0..3,
    )
}

fn label_selector() -> impl Strategy<Value = LabelSelector> {
    let req = (
        select(KEYS),
        select(&[SelectorOp::In, SelectorOp::NotIn, SelectorOp::Exists, SelectorOp::DoesNotExist]),
        prop::collection::vec(select(VALUES), 1..3),
    )
        .prop_map(|(k, op, vs)| Requirement {
            key: k.to_string(),
            op,
            values: match op {
                SelectorOp::In | SelectorOp::NotIn => vs.into_iter().map(str::to_string).collect(),
                _ => Vec::new(),
            },
        });
    (
        prop::collection::btree_map(
            select(KEYS).prop_map(str::to_string),
            select(VALUES).prop_map(str::to_string),
            0..2,
        ),
        prop::collection::vec(req, 0..2),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

fn workload_selector() -> impl Strategy<Value = WorkloadSelector> {
    let ns = prop_oneof![
        select(NAMESPACES).prop_map(|n| NamespaceMatch::Named(n.to_string())),
        label_selector().prop_map(NamespaceMatch::Selector),
    ];
    (ns, label_selector()).prop_map(|(namespaces, pods)| WorkloadSelector { namespaces, pods })
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => workload_selector().prop_map(Peer::Workloads),
        1 => select(&["10.0.0.0/8", "10.0.1.0/24", "0.0.0.0/0"]).prop_map(|n| {
            let net: IpNet = n.parse().unwrap();
            let except = if n == "0.0.0.0/0" { vec!["10.0.0.0/8".parse().unwrap()] } else { vec![] };
            Peer::Cidr { net, except }
        }),
    ]
}

fn port() -> impl Strategy<Value = PortMatch> {
    prop_oneof![
        (select(&[80u16, 443, 8080, 9090]), 0u16..20).prop_map(|(first, span)| PortMatch::Range {
            protocol: Proto::Tcp,
            first,
            last: first + span,
        }),
        select(PORT_NAMES)
            .prop_map(|n| PortMatch::Named { protocol: Some(Proto::Tcp), name: n.to_string() }),
    ]
}

/// A rule whose action is one of `actions` (`Pass` only in the Admin tier).
fn rule(actions: &'static [Action]) -> impl Strategy<Value = Rule> {
    let action = select(actions);
    (
        action,
        prop_oneof![1 => Just(Peers::Any), 4 => prop::collection::vec(peer(), 0..3).prop_map(Peers::List)],
        prop::option::of(prop::collection::vec(port(), 1..3)),
    )
        .prop_map(|(action, peers, ports)| Rule { name: None, action, peers, ports })
}

/// A policy of the kind `k` (0–5: NetworkPolicy, 6: ANP, 7: BANP), named `name`.
fn policy(name: String) -> impl Strategy<Value = Policy> {
    (0u8..8, select(NAMESPACES), workload_selector(), 0u32..5).prop_flat_map(
        move |(k, ns, subject, priority)| {
            let (kind, tier, admin) = match k {
                6 => (PolicyKind::AdminNetworkPolicy, Tier::Admin { priority }, true),
                7 => (PolicyKind::BaselineAdminNetworkPolicy, Tier::Baseline { priority: 0 }, true),
                _ => (PolicyKind::NetworkPolicy, Tier::Namespaced, false),
            };
            let name = name.clone();
            let subject = if admin {
                subject
            } else {
                WorkloadSelector {
                    namespaces: NamespaceMatch::Named(ns.to_string()),
                    pods: subject.pods,
                }
            };
            let actions: &'static [Action] = match tier {
                Tier::Admin { .. } => &[Action::Allow, Action::Deny, Action::Pass],
                Tier::Baseline { .. } => &[Action::Allow, Action::Deny],
                Tier::Namespaced => &[Action::Allow],
            };
            let rules = move || prop::option::of(prop::collection::vec(rule(actions), 0..3));
            (rules(), rules()).prop_map(move |(ingress, egress)| Policy {
                kind,
                name: name.clone(),
                namespace: (!admin).then(|| ns.to_string()),
                source: format!("/policies/{name}.yaml").into(),
                tier,
                subject: subject.clone(),
                ingress,
                egress,
                mode: Default::default(),
                expiry: None,
                created_at: None,
            })
        },
    )
}

/// `n` workloads spread over the namespaces; addresses 10.0.{0,1}.i, some a /30 too.
fn inventory(n: usize) -> impl Strategy<Value = Inventory> {
    prop::collection::vec((labels(), 0usize..3, any::<bool>(), 0u16..3), n).prop_map(|ws| {
        let namespaces = NAMESPACES
            .iter()
            .map(|n| Namespace {
                name: n.to_string(),
                labels: Labels::from([
                    (NAMESPACE_NAME_LABEL.to_string(), n.to_string()),
                    ("app".to_string(), if *n == "a" { "x" } else { "y" }.to_string()),
                ]),
            })
            .collect();
        let workloads = ws
            .into_iter()
            .enumerate()
            .map(|(i, (labels, ns, subnet, port))| {
                let mut addrs = vec![IpNet::from(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1)))];
                if subnet {
                    addrs.push(format!("10.0.1.{}/30", i * 4).parse().unwrap());
                }
                Workload {
                    name: format!("w{i}"),
                    namespace: NAMESPACES[ns].to_string(),
                    labels,
                    addrs,
                    ports: vec![NamedPort {
                        name: PORT_NAMES[(i + usize::from(port)) % 2].to_string(),
                        port: 8080 + port,
                        protocol: Proto::Tcp,
                    }],
                }
            })
            .collect();
        Inventory { namespaces, workloads }
    })
}

#[derive(Clone, Debug)]
enum Edit {
    Add(Policy),
    Remove(usize),
    Replace(usize, Policy),
    Inventory(Inventory),
    /// A policy moved to another place in the set, its `Arc` kept (the compiler's parts
    /// are cached by `Arc`, and rule ids follow set order).
    Move(usize, usize),
    /// A policy replaced by an equal copy in a new `Arc` (a file rewritten unchanged).
    Recreate(usize),
    /// A policy replaced by one the compiler rejects: the compile must fail, and the next
    /// edit starts again from the set before (as the reloader keeps the last good one).
    Invalid(usize),
}

fn edit(step: usize) -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => policy(format!("new{step}")).prop_map(Edit::Add),
        2 => any::<usize>().prop_map(Edit::Remove),
        4 => (any::<usize>(), policy(format!("edit{step}"))).prop_map(|(i, p)| Edit::Replace(i, p)),
        1 => (3usize..12).prop_flat_map(inventory).prop_map(Edit::Inventory),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Edit::Move(i, j)),
        1 => any::<usize>().prop_map(Edit::Recreate),
        1 => any::<usize>().prop_map(Edit::Invalid),
    ]
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    (1usize..=12).prop_flat_map(|n| (0..n).map(edit).collect::<Vec<_>>())
}

fn start() -> impl Strategy<Value = PolicySet> {
    (
        (3usize..12).prop_flat_map(inventory),
        (0usize..10).prop_flat_map(|n| (0..n).map(|i| policy(format!("p{i}"))).collect::<Vec<_>>()),
    )
        .prop_map(|(inv, policies)| PolicySet::new(inv, policies))
}

fn flows() -> Vec<FlowQuery<'static>> {
    let mut v = Vec::new();
    for s in [1u8, 2, 5, 9] {
        for d in [1u8, 3, 6, 11] {
            for port in [80u16, 8080] {
                v.push(FlowQuery {
                    src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, s)),
                    dst: IpAddr::V4(Ipv4Addr::new(10, 0, if d == 11 { 1 } else { 0 }, d)),
                    dst_port: port,
                    proto: Proto::Tcp,
                    fqdn: None,
                });
            }
        }
    }
    v
}

/// Applies `e` as a reload does: untouched policies and the inventory stay shared.
fn apply(set: &PolicySet, e: &Edit) -> PolicySet {
    let mut next = PolicySet { inventory: set.inventory.clone(), policies: set.policies.clone() };
    match e {
        Edit::Add(p) => next.policies.push(Arc::new(p.clone())),
        Edit::Remove(i) if !next.policies.is_empty() => {
            next.policies.remove(i % set.policies.len());
        }
        Edit::Replace(i, p) if !next.policies.is_empty() => {
            let at = i % set.policies.len();
            next.policies[at] = Arc::new(p.clone());
        }
        Edit::Inventory(inv) => next.inventory = Arc::new(inv.clone()),
        Edit::Move(i, j) if !next.policies.is_empty() => {
            let p = next.policies.remove(i % set.policies.len());
            let to = j % (next.policies.len() + 1);
            next.policies.insert(to, p);
        }
        Edit::Recreate(i) if !next.policies.is_empty() => {
            let at = i % set.policies.len();
            next.policies[at] = Arc::new(Policy::clone(&set.policies[at]));
        }
        Edit::Invalid(i) => {
            let mut bad = next
                .policies
                .get(i % set.policies.len().max(1))
                .map_or_else(invalid_policy, |p| Policy::clone(p));
            bad.ingress = Some(vec![Rule {
                name: None,
                action: Action::Allow,
                peers: Peers::Any,
                ports: Some(vec![PortMatch::Range { protocol: Proto::Tcp, first: 90, last: 80 }]),
            }]);
            match next.policies.is_empty() {
                true => next.policies.push(Arc::new(bad)),
                false => {
                    let at = i % set.policies.len();
                    next.policies[at] = Arc::new(bad);
                }
            }
        }
        _ => {}
    }
    next
}

/// A NetworkPolicy to make invalid when the set has none.
fn invalid_policy() -> Policy {
    Policy {
        kind: PolicyKind::NetworkPolicy,
        name: "bad".into(),
        namespace: Some("a".into()),
        source: "/bad.yaml".into(),
        tier: Tier::Namespaced,
        subject: WorkloadSelector {
            namespaces: NamespaceMatch::Named("a".into()),
            pods: LabelSelector::default(),
        },
        ingress: None,
        egress: None,
        mode: Default::default(),
        expiry: None,
        created_at: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn incremental_compile_equals_full_compile(set in start(), edits in edits()) {
        let opts = CompileOptions {
            default: DefaultAction::Deny,
            unknown: DefaultAction::Deny,
            now: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        };
        let flows = flows();
        let mut cache = CompileCache::default();
        let mut set = set;
        let first = CompiledPolicy::compile_with(&set, &opts, &mut cache).unwrap();
        prop_assert_eq!(&first, &CompiledPolicy::compile(&set, &opts).unwrap());
        for (step, e) in edits.iter().enumerate() {
            if let Edit::Invalid(_) = e {
                let bad = apply(&set, e);
                prop_assert!(CompiledPolicy::compile_with(&bad, &opts, &mut cache).is_err());
                prop_assert!(CompiledPolicy::compile(&bad, &opts).is_err());
                continue;
            }
            set = apply(&set, e);
            let incremental = CompiledPolicy::compile_with(&set, &opts, &mut cache).unwrap();
            let full = CompiledPolicy::compile(&set, &opts).unwrap();
            prop_assert!(incremental == full, "step {} ({:?}): compiled tables differ", step, e);
            for q in &flows {
                prop_assert_eq!(incremental.decide(q), full.decide(q), "step {}: {:?}", step, q);
            }
        }
    }
}

/// The cache does carry selections over: an edit sequence that changes one policy
/// leaves every other selector resolved (checked through equal results and, for the
/// test to be able to fail on a stale cache, a relabelled inventory that must not reuse
/// the old selections).
#[test]
fn a_new_inventory_is_never_served_old_selections() {
    let opts = CompileOptions {
        default: DefaultAction::Deny,
        unknown: DefaultAction::Deny,
        now: SystemTime::UNIX_EPOCH,
    };
    let ns = |n: &str| Namespace {
        name: n.into(),
        labels: Labels::from([(NAMESPACE_NAME_LABEL.to_string(), n.to_string())]),
    };
    let w = |app: &str| Workload {
        name: "w".into(),
        namespace: "a".into(),
        labels: Labels::from([("app".to_string(), app.to_string())]),
        addrs: vec!["10.0.0.1/32".parse().unwrap()],
        ports: vec![],
    };
    let p = Policy {
        kind: PolicyKind::NetworkPolicy,
        name: "p".into(),
        namespace: Some("a".into()),
        source: "/p.yaml".into(),
        tier: Tier::Namespaced,
        subject: WorkloadSelector {
            namespaces: NamespaceMatch::Named("a".into()),
            pods: LabelSelector {
                match_labels: Labels::from([("app".to_string(), "x".to_string())]),
                match_expressions: vec![],
            },
        },
        ingress: Some(vec![]),
        egress: None,
        mode: Default::default(),
        expiry: None,
        created_at: None,
    };
    let mut cache = CompileCache::default();
    let set =
        PolicySet::new(Inventory { namespaces: vec![ns("a")], workloads: vec![w("x")] }, vec![p]);
    let q = FlowQuery {
        src: "10.9.9.9".parse().unwrap(),
        dst: "10.0.0.1".parse().unwrap(),
        dst_port: 80,
        proto: Proto::Tcp,
        fqdn: None,
    };
    let before = CompiledPolicy::compile_with(&set, &opts, &mut cache).unwrap();
    assert!(!before.decide(&q).verdict.is_allow(), "isolated while labelled app=x");
    let relabelled = PolicySet {
        inventory: Arc::new(Inventory { namespaces: vec![ns("a")], workloads: vec![w("y")] }),
        policies: set.policies.clone(),
    };
    let after = CompiledPolicy::compile_with(&relabelled, &opts, &mut cache).unwrap();
    assert_eq!(after, CompiledPolicy::compile(&relabelled, &opts).unwrap());
}
