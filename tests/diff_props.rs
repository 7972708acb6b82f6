//! `policy::diff` against brute force, on random inputs.
//!
//! Each case is a random inventory and a pair of policy sets over it (NetworkPolicies,
//! AdminNetworkPolicies with Allow/Deny/Pass, BaselineAdminNetworkPolicies; CIDR peers
//! with excepts, domain peers, named and numbered ports): the second set is the first
//! with policies removed, added and rewritten under the same name, or an unrelated set.
//! Brute force decides every (source, destination, port, protocol) under both sets with
//! `CompiledPolicy::decide` — sources: every workload and external probe addresses
//! (every boundary of every CIDR the policies name, ±1, and the first address of every
//! range the diff reports); destinations: the same plus probe names — and compares each
//! flow's change (opened, closed or none) with what the diff reports for the classes the
//! endpoints belong to. Nothing missing, nothing extra: every endpoint the diff names is
//! probed.
//!
//! Ports: policies only name ports 1-12, so ports 1-14 and 65535 are decided one by one,
//! and every reported range must treat 15-65534 as one block equal to 65535.
//!
//! 300 proptest cases per run (each decides ~40,000 flows twice).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use flowgate::flow::Proto;
use flowgate::policy::diff::{self, ChangeKind, Endpoint, Side};
use flowgate::policy::ir::{
    Action, DomainPattern, Inventory, LabelSelector, Labels, Mode, NAMESPACE_NAME_LABEL, NamedPort,
    Namespace, NamespaceMatch, Peer, Peers, Policy, PolicyKind, PolicySet, PortMatch, Requirement,
    Rule, SelectorOp, Tier, Workload, WorkloadSelector,
};
use flowgate::policy::{CompileOptions, CompiledPolicy, DefaultAction, FlowQuery};
use ipnet::IpNet;
use proptest::prelude::*;
use proptest::sample::select;

const PREFIXES: &[&str] = &[
    "10.0.0.1/32",
    "10.0.0.2/32",
    "10.0.0.3/32",
    "10.0.0.4/32",
    "10.0.0.5/32",
    "10.0.0.6/32",
    "10.0.0.8/29",
    "10.0.1.0/24",
    "2001:db8::1/128",
    "2001:db8::2/128",
];

const PEER_PREFIXES: &[&str] = &[
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/8",
    "10.0.0.0/24",
    "10.0.0.0/30",
    "10.0.0.2/32",
    "10.0.1.0/25",
    "8.8.0.0/16",
    "8.8.8.0/24",
    "2001:db8::/32",
];

const DOMAINS: &[&str] = &["example.com", "api.example.com", "b.example.com", "example.org"];
const DOMAIN_PROBES: &[&str] = &[
    "example.com",
    "api.example.com",
    "b.example.com",
    "example.org",
    "x.example.com",
    "x.b.example.com",
    "x.api.example.com",
    "x.example.org",
];

const POD_KEYS: &[&str] = &["app", "tier"];
const POD_VALUES: &[&str] = &["web", "db", "api"];
const NS_KEYS: &[&str] = &["team", NAMESPACE_NAME_LABEL];
const NS_VALUES: &[&str] = &["x", "y", "a", "b"];
const NS_NAMES: &[&str] = &["a", "b", "c"];
const PROTOS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn labels(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map(
        select(keys).prop_map(String::from),
        select(values).prop_map(String::from),
        0..3,
    )
}

fn selector(
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
    prop_oneof![2 => Just(LabelSelector::default()), 3 => random]
}

fn workload_selector() -> impl Strategy<Value = WorkloadSelector> {
    let ns = prop_oneof![
        select(NS_NAMES).prop_map(|n| NamespaceMatch::Named(n.to_string())),
        selector(NS_KEYS, NS_VALUES).prop_map(NamespaceMatch::Selector),
    ];
    (ns, selector(POD_KEYS, POD_VALUES))
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
    let proto = select(&PROTOS[..]);
    prop_oneof![
        (proto.clone(), 1u16..=12, 0u16..4).prop_map(|(protocol, first, span)| PortMatch::Range {
            protocol,
            first,
            last: (first + span).min(12)
        }),
        (proptest::option::of(proto), select(&["http", "dns", "none"][..]))
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

fn policy() -> impl Strategy<Value = Policy> {
    let tier = prop_oneof![
        2 => (0u32..3).prop_map(|priority| Tier::Admin { priority }),
        4 => Just(Tier::Namespaced),
        1 => (0u32..2).prop_map(|priority| Tier::Baseline { priority }),
    ];
    let rules = || proptest::option::of(proptest::collection::vec(rule(), 0..3));
    (
        tier,
        select(&["p0", "p1", "p2", "p3"][..]),
        select(NS_NAMES),
        workload_selector(),
        selector(POD_KEYS, POD_VALUES),
        rules(),
        rules(),
        prop_oneof![6 => Just(Mode::Enforce), 1 => Just(Mode::Audit)],
    )
        .prop_map(|(tier, name, ns, subject, pods, ingress, egress, mode)| {
            let (kind, namespace, subject) = match tier {
                Tier::Namespaced => (
                    PolicyKind::NetworkPolicy,
                    Some(ns.to_string()),
                    WorkloadSelector { namespaces: NamespaceMatch::Named(ns.to_string()), pods },
                ),
                Tier::Admin { .. } => (PolicyKind::AdminNetworkPolicy, None, subject),
                Tier::Baseline { .. } => (PolicyKind::BaselineAdminNetworkPolicy, None, subject),
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
                expiry: None,
                created_at: None,
            };
            sanitize(&mut p);
            p
        })
}

/// The IR's invariants: NetworkPolicy rules allow; Pass only in the Admin tier; domain
/// peers only in egress Allow rules.
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
    let np = (select(&["http", "dns"][..]), 1u16..=12, select(&[Proto::Tcp, Proto::Udp][..]))
        .prop_map(|(name, port, protocol)| NamedPort { name: name.to_string(), port, protocol });
    (
        select(NS_NAMES),
        labels(POD_KEYS, POD_VALUES),
        proptest::collection::vec(select(PREFIXES), 1..3),
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

fn inventory() -> impl Strategy<Value = Inventory> {
    inventory_of(1..8, false)
}

/// `count` workloads; with `own_addrs`, each also owns an address of its own in
/// 10.0.2.0/24 (so that every one of them is an endpoint).
fn inventory_of(
    count: std::ops::Range<usize>,
    own_addrs: bool,
) -> impl Strategy<Value = Inventory> {
    (
        proptest::collection::vec(labels(&["team"], NS_VALUES), 2),
        proptest::collection::vec(workload(), count),
    )
        .prop_map(move |(ns_labels, mut workloads)| {
            // Namespace "c" is left out of the inventory on purpose.
            let namespaces = ns_labels
                .into_iter()
                .zip(["a", "b"])
                .map(|(mut labels, name)| {
                    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
                    Namespace { name: name.to_string(), labels }
                })
                .collect();
            let mut owned = BTreeSet::new();
            for (i, w) in workloads.iter_mut().enumerate() {
                w.name = format!("w{i}");
                w.addrs.retain(|a| owned.insert(*a));
                if own_addrs {
                    w.addrs.push(net(&format!("10.0.2.{}/32", i + 1)));
                }
            }
            Inventory { namespaces, workloads }
        })
}

/// A pair of policy lists: the second derived from the first, or unrelated.
fn pair() -> impl Strategy<Value = (Vec<Policy>, Vec<Policy>)> {
    let base = || proptest::collection::vec(policy(), 0..8);
    let derived = (
        base(),
        proptest::collection::vec(any::<bool>(), 8),
        proptest::collection::vec(policy(), 0..3),
        proptest::option::of((0usize..8, policy())),
    )
        .prop_map(|(a, keep, added, rewrite)| {
            let mut b: Vec<Policy> = a
                .iter()
                .zip(keep.iter().chain(std::iter::repeat(&true)))
                .filter(|(_, k)| **k)
                .map(|(p, _)| p.clone())
                .collect();
            b.extend(added);
            if let Some((i, mut p)) = rewrite
                && let Some(old) = b.get(i % b.len().max(1))
            {
                // Same identity, different content.
                p.name = old.name.clone();
                p.kind = old.kind;
                p.tier = old.tier;
                p.namespace = old.namespace.clone();
                if let (Some(ns), Tier::Namespaced) = (&p.namespace, p.tier) {
                    p.subject.namespaces = NamespaceMatch::Named(ns.clone());
                }
                sanitize(&mut p);
                let j = i % b.len().max(1);
                b[j] = p;
            }
            (a, b)
        });
    prop_oneof![3 => derived, 1 => (base(), base())]
}

/// The diff's changes by (from, to, protocol): (kind, first port, last port).
type Reported = HashMap<(String, String, Proto), Vec<(ChangeKind, u16, u16)>>;

/// How the brute force asks about one endpoint.
#[derive(Clone, Debug)]
struct Probe {
    ip: IpAddr,
    fqdn: Option<String>,
    workload: bool,
}

fn check(
    inventory: Inventory,
    before: Vec<Policy>,
    after: Vec<Policy>,
    default: DefaultAction,
) -> Result<(), TestCaseError> {
    let inv = std::sync::Arc::new(inventory);
    let arcs = |v: Vec<Policy>| v.into_iter().map(std::sync::Arc::new).collect();
    let set_b = PolicySet { inventory: inv.clone(), policies: arcs(before) };
    let set_a = PolicySet { inventory: inv.clone(), policies: arcs(after) };
    let opts =
        CompileOptions { default, unknown: DefaultAction::Deny, now: std::time::SystemTime::now() };
    let cb = CompiledPolicy::compile(&set_b, &opts).unwrap();
    let ca = CompiledPolicy::compile(&set_a, &opts).unwrap();
    let sb = Side { set: &set_b, compiled: &cb };
    let sa = Side { set: &set_a, compiled: &ca };
    let (d, _) = diff::diff(sb, sa);

    // The diff, by endpoint labels.
    let mut reported: Reported = HashMap::new();
    for c in d.expand() {
        for &(f, l) in c.ports {
            reported
                .entry((c.from.label().to_string(), c.to.label().to_string(), c.proto))
                .or_default()
                .push((c.kind, f, l));
        }
    }
    let all_patterns: Vec<DomainPattern> = set_b
        .policies
        .iter()
        .chain(&set_a.policies)
        .flat_map(|p| p.egress.iter().flatten())
        .flat_map(|r| match &r.peers {
            Peers::List(l) => l.clone(),
            Peers::Any => vec![],
        })
        .filter_map(|p| match p {
            Peer::Domain(d) => Some(d),
            _ => None,
        })
        .collect();

    // Endpoints: label → probes.
    let mut sources: Vec<(String, Probe)> = Vec::new();
    let mut dests: Vec<(String, Probe)> = Vec::new();
    for (i, w) in inv.workloads.iter().enumerate() {
        if let Some(ip) = ca.workload_addr(flowgate::policy::WorkloadId(i as u32)) {
            let p =
                (format!("{}/{}", w.namespace, w.name), Probe { ip, fqdn: None, workload: true });
            sources.push(p.clone());
            dests.push(p);
        }
    }
    let mut ext: Vec<IpAddr> = Vec::new();
    for p in PEER_PREFIXES {
        let n = net(p);
        for ip in [n.network(), n.broadcast()] {
            ext.push(ip);
            match ip {
                IpAddr::V4(a) => {
                    let v = u32::from(a);
                    ext.extend(
                        [v.wrapping_sub(1), v.wrapping_add(1)].map(|x| IpAddr::V4(x.into())),
                    );
                }
                IpAddr::V6(a) => {
                    let v = u128::from(a);
                    ext.extend(
                        [v.wrapping_sub(1), v.wrapping_add(1)].map(|x| IpAddr::V6(x.into())),
                    );
                }
            }
        }
    }
    for class in &d.classes {
        for m in &class.members {
            if let Endpoint::Addresses { ranges, .. } = m {
                ext.extend(ranges.iter().map(|r| r.0));
            }
        }
    }
    for ip in ext {
        if cb.workload_of(ip).is_some() {
            continue;
        }
        // The diff's class of this address, if the diff has one.
        let label = d.classes.iter().flat_map(|c| &c.members).find_map(|m| match m {
            Endpoint::Addresses { label, ranges }
                if ranges.iter().any(|r| r.0 <= ip && ip <= r.1 && same_family(r.0, ip)) =>
            {
                Some(label.clone())
            }
            _ => None,
        });
        let label = label.unwrap_or_else(|| format!("unclassified {ip}"));
        let p = (label, Probe { ip, fqdn: None, workload: false });
        sources.push(p.clone());
        dests.push(p);
    }
    for name in DOMAIN_PROBES {
        let mut matching: Vec<&DomainPattern> =
            all_patterns.iter().filter(|p| p.matches(name)).collect();
        if matching.is_empty() {
            continue;
        }
        matching.sort_by_key(|p| format!("{p:?}"));
        matching.dedup();
        let label = d.classes.iter().flat_map(|c| &c.members).find_map(|m| match m {
            Endpoint::Domain { label, patterns } => {
                let mut ps: Vec<&DomainPattern> = patterns.iter().collect();
                ps.sort_by_key(|p| format!("{p:?}"));
                (ps == matching).then(|| label.clone())
            }
            _ => None,
        });
        let label = label.unwrap_or_else(|| format!("unclassified {name}"));
        dests.push((
            label,
            Probe {
                ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                fqdn: Some(name.to_string()),
                workload: false,
            },
        ));
    }

    // Every endpoint the diff names is probed.
    let probed: BTreeSet<&str> = sources.iter().chain(&dests).map(|(l, _)| l.as_str()).collect();
    for (from, to, _) in reported.keys() {
        prop_assert!(probed.contains(from.as_str()), "unprobed source {from}");
        prop_assert!(probed.contains(to.as_str()), "unprobed destination {to}");
    }

    let ports: Vec<u16> = (1..=14).chain([65535]).collect();
    for (sl, s) in &sources {
        for (dl, t) in &dests {
            if !s.workload && !t.workload {
                continue;
            }
            for proto in PROTOS {
                let got = reported.get(&(sl.clone(), dl.clone(), proto));
                for &port in &ports {
                    let q = FlowQuery {
                        src: s.ip,
                        dst: t.ip,
                        dst_port: port,
                        proto,
                        fqdn: t.fqdn.as_deref(),
                    };
                    let (b, a) =
                        (cb.decide(&q).verdict.is_allow(), ca.decide(&q).verdict.is_allow());
                    let want = match (b, a) {
                        (false, true) => Some(ChangeKind::Opened),
                        (true, false) => Some(ChangeKind::Closed),
                        _ => None,
                    };
                    let have: Vec<ChangeKind> = got
                        .into_iter()
                        .flatten()
                        .filter(|r| r.1 <= port && port <= r.2)
                        .map(|r| r.0)
                        .collect();
                    prop_assert!(
                        have.len() <= 1,
                        "{sl} → {dl} {port}/{proto}: reported twice: {have:?}"
                    );
                    prop_assert_eq!(
                        have.first().copied(),
                        want,
                        "{} → {} {}/{} (src {}, dst {} {:?})",
                        sl,
                        dl,
                        port,
                        proto,
                        s.ip,
                        t.ip,
                        t.fqdn
                    );
                }
                // 15-65534 is one block, the same as 65535.
                for r in got.into_iter().flatten() {
                    let inside =
                        u32::from(r.2.min(65534)).saturating_sub(u32::from(r.1.max(15))) + 1;
                    let overlap = if r.2 < 15 || r.1 > 65534 { 0 } else { inside };
                    prop_assert!(
                        overlap == 0 || overlap == 65520,
                        "{sl} → {dl} {proto}: range {}-{} splits the unnamed ports",
                        r.1,
                        r.2
                    );
                    prop_assert_eq!(
                        overlap != 0,
                        r.2 == 65535,
                        "{} → {} {}: {}-{}",
                        sl,
                        dl,
                        proto,
                        r.1,
                        r.2
                    );
                }
            }
        }
    }
    Ok(())
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn diff_equals_brute_force(
        inventory in inventory(),
        (before, after) in pair(),
        allow in any::<bool>(),
    ) {
        let default = if allow { DefaultAction::Allow } else { DefaultAction::Deny };
        check(inventory, before, after, default)?;
    }
}

proptest! {
    // Each case decides ~2,000,000 flows twice: a few cases.
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    /// Enough classes (64 and more) that the pairs are shared out between threads, and
    /// enough workloads alike to one side's rules and not to the other's that a side's
    /// outcomes are shared by a group of peers.
    #[test]
    fn diff_equals_brute_force_on_many_workloads(
        inventory in inventory_of(70..90, true),
        (before, after) in pair(),
        allow in any::<bool>(),
    ) {
        let default = if allow { DefaultAction::Allow } else { DefaultAction::Deny };
        check(inventory, before, after, default)?;
    }
}

/// Two destinations that the source's egress rules cannot tell apart (one group: its
/// outcomes worked out once) but whose own ingress rules differ; and a pair whose egress
/// side refuses everything on both sides while its ingress side changes (nothing to
/// report).
#[test]
fn shared_egress_outcomes_and_refused_pairs_against_brute_force() {
    let w = |name: &str, ip: &str, app: &str, tier: &str| Workload {
        name: name.into(),
        namespace: "a".into(),
        labels: Labels::from([
            ("app".to_string(), app.to_string()),
            ("tier".to_string(), tier.to_string()),
        ]),
        addrs: vec![net(ip)],
        ports: vec![NamedPort { name: "http".into(), port: 3, protocol: Proto::Tcp }],
    };
    let inventory = Inventory {
        namespaces: vec![],
        workloads: vec![
            w("web", "10.0.0.1/32", "web", "w"),
            w("db1", "10.0.0.2/32", "db", "x"),
            w("db2", "10.0.0.3/32", "db", "y"),
            w("api", "10.0.0.4/32", "api", "z"),
        ],
    };
    let sel = |key: &str, value: &str| WorkloadSelector {
        namespaces: NamespaceMatch::Named("a".into()),
        pods: LabelSelector {
            match_labels: Labels::from([(key.to_string(), value.to_string())]),
            match_expressions: vec![],
        },
    };
    let rule = |peer: WorkloadSelector, first: u16, last: u16| Rule {
        name: None,
        action: Action::Allow,
        peers: Peers::List(vec![Peer::Workloads(peer)]),
        ports: Some(vec![PortMatch::Range { protocol: Proto::Tcp, first, last }]),
    };
    let np = |name: &str, subject: WorkloadSelector, ingress, egress| Policy {
        kind: PolicyKind::NetworkPolicy,
        name: name.into(),
        namespace: Some("a".into()),
        source: Default::default(),
        tier: Tier::Namespaced,
        subject,
        ingress,
        egress,
        mode: Mode::Enforce,
        expiry: None,
        created_at: None,
    };
    let common = vec![
        // db1 and db2 differ in what they admit, not in what web's egress sees.
        np("db1", sel("tier", "x"), Some(vec![rule(sel("app", "web"), 1, 6)]), None),
        np("db2", sel("tier", "y"), Some(vec![rule(sel("app", "web"), 4, 9)]), None),
        // api may send nothing anywhere, before and after.
        np("api", sel("app", "api"), None, Some(vec![])),
    ];
    let mut before = common.clone();
    before.push(np("web", sel("app", "web"), None, Some(vec![rule(sel("app", "db"), 2, 5)])));
    let mut after = common;
    after.push(np("web", sel("app", "web"), None, Some(vec![rule(sel("app", "db"), 5, 8)])));
    // What api's destinations admit changes, but api's egress refuses everything.
    after.push(np(
        "web-from-api",
        sel("app", "web"),
        Some(vec![rule(sel("app", "api"), 1, 12)]),
        None,
    ));
    for default in [DefaultAction::Deny, DefaultAction::Allow] {
        check(inventory.clone(), before.clone(), after.clone(), default).unwrap();
    }
}

/// A changed inventory: the workloads are compared by name; one absent on a side reaches
/// nothing there.
#[test]
fn inventory_change_is_reported_by_workload_name() {
    let w = |name: &str, ip: &str, app: &str| Workload {
        name: name.into(),
        namespace: "a".into(),
        labels: Labels::from([("app".to_string(), app.to_string())]),
        addrs: vec![net(ip)],
        ports: vec![],
    };
    let before = Inventory {
        namespaces: vec![],
        workloads: vec![w("web", "10.0.0.1/32", "web"), w("db", "10.0.0.2/32", "db")],
    };
    let after = Inventory {
        namespaces: vec![],
        workloads: vec![w("web", "10.0.0.1/32", "web"), w("db", "10.0.0.2/32", "web")],
    };
    let allow_web = Policy {
        kind: PolicyKind::NetworkPolicy,
        name: "web".into(),
        namespace: Some("a".into()),
        source: Default::default(),
        tier: Tier::Namespaced,
        subject: WorkloadSelector {
            namespaces: NamespaceMatch::Named("a".into()),
            pods: LabelSelector::default(),
        },
        ingress: Some(vec![Rule {
            name: None,
            action: Action::Allow,
            peers: Peers::List(vec![Peer::Workloads(WorkloadSelector {
                namespaces: NamespaceMatch::Named("a".into()),
                pods: LabelSelector {
                    match_labels: Labels::from([("app".to_string(), "web".to_string())]),
                    match_expressions: vec![],
                },
            })]),
            ports: Some(vec![PortMatch::Range { protocol: Proto::Tcp, first: 80, last: 80 }]),
        }]),
        egress: None,
        mode: Mode::Enforce,
        expiry: None,
        created_at: None,
    };
    let opts = CompileOptions {
        default: DefaultAction::Allow,
        unknown: DefaultAction::Deny,
        now: std::time::SystemTime::now(),
    };
    let sb = PolicySet::new(before, vec![allow_web.clone()]);
    let sa = PolicySet::new(after, vec![allow_web]);
    let (cb, ca) = (
        CompiledPolicy::compile(&sb, &opts).unwrap(),
        CompiledPolicy::compile(&sa, &opts).unwrap(),
    );
    let (d, stats) = diff::diff(Side { set: &sb, compiled: &cb }, Side { set: &sa, compiled: &ca });
    assert!(stats.full);
    let lines: Vec<String> = d
        .expand()
        .iter()
        .filter(|c| c.proto == Proto::Tcp && matches!(c.from, Endpoint::Workload(_)))
        .map(|c| format!("{} {} → {} {:?}", c.kind.as_str(), c.from.label(), c.to.label(), c.ports))
        .collect();
    assert!(lines.contains(&"opened a/db → a/db [(80, 80)]".to_string()), "{lines:#?}");
    assert!(lines.contains(&"opened a/db → a/web [(80, 80)]".to_string()), "{lines:#?}");
}
