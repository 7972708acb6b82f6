//! `policy::generate` on random observed flows: the YAML it writes loads (the real
//! loader), lints clean, and compiled with `default: deny` allows every observed flow; when
//! every workload has a label value of its own and blocks are /32, `policy::diff` against a
//! policy that allows exactly the observed set (one NetworkPolicy per flow and side) finds
//! nothing at all.
//!
//! 200 proptest cases per run.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use flowgate::flow::Proto;
use flowgate::policy::diff::{self, Side};
use flowgate::policy::generate::{self, Observed, Options};
use flowgate::policy::ir::{
    Action, Inventory, LabelSelector, Labels, Mode, NAMESPACE_NAME_LABEL, Namespace,
    NamespaceMatch, Peer, Peers, Policy, PolicyKind, PolicySet, PortMatch, Rule, Tier, Workload,
    WorkloadSelector,
};
use flowgate::policy::{CompileOptions, CompiledPolicy, DefaultAction, FlowQuery, lint, load};
use ipnet::IpNet;
use proptest::prelude::*;

const NS: &[&str] = &["a", "b"];

fn inventory(n: usize, shared_labels: bool) -> Inventory {
    let workloads = (0..n)
        .map(|i| Workload {
            name: format!("w{i}"),
            namespace: NS[i % 2].to_string(),
            labels: Labels::from([(
                "app".to_string(),
                if shared_labels { format!("app{}", i % 3) } else { format!("app{i}") },
            )]),
            addrs: vec![IpNet::from(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1)))],
            ports: vec![],
        })
        .collect();
    let namespaces = NS
        .iter()
        .map(|n| Namespace {
            name: n.to_string(),
            labels: Labels::from([(NAMESPACE_NAME_LABEL.to_string(), n.to_string())]),
        })
        .collect();
    Inventory { namespaces, workloads }
}

/// An endpoint: a workload index, or an external address 203.0.113.x.
#[derive(Clone, Copy, Debug)]
enum End {
    W(usize),
    Ext(u8),
}

fn ip_of(e: End) -> IpAddr {
    match e {
        End::W(i) => IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1)),
        End::Ext(x) => IpAddr::V4(Ipv4Addr::new(203, 0, 113, x)),
    }
}

fn name_of(inv: &Inventory, e: End) -> Option<String> {
    match e {
        End::W(i) => inv.workloads.get(i).map(|w| format!("{}/{}", w.namespace, w.name)),
        End::Ext(_) => None,
    }
}

fn end(n: usize) -> impl Strategy<Value = End> {
    prop_oneof![4 => (0..n).prop_map(End::W), 1 => (1u8..5).prop_map(End::Ext)]
}

type Flow = (End, End, u16, Proto);

fn flows(n: usize) -> impl Strategy<Value = Vec<Flow>> {
    proptest::collection::vec(
        (end(n), end(n), 1u16..8, proptest::sample::select(&[Proto::Tcp, Proto::Udp][..])),
        1..12,
    )
}

fn observed(inv: &Inventory, flows: &[Flow]) -> Vec<Observed> {
    flows
        .iter()
        .enumerate()
        .map(|(i, &(s, d, port, proto))| Observed {
            ts: format!("2026-12-07T10:00:{:02}.000Z", i % 60),
            proto,
            src: ip_of(s),
            dst: ip_of(d),
            dst_port: port,
            src_workload: name_of(inv, s),
            dst_workload: name_of(inv, d),
            fqdn: None,
            count: 1 + i as u64,
        })
        .collect()
}

fn load_generated(inv: &Inventory, g: &generate::Generated) -> PolicySet {
    let mut policies = Vec::new();
    for (ns, yaml) in &g.files {
        let file = format!("{ns}.yaml");
        let p = load::parse_policies(yaml, Path::new(&file))
            .unwrap_or_else(|e| panic!("generated YAML does not load: {e}\n{yaml}"));
        policies.extend(p);
    }
    PolicySet::new(inv.clone(), policies)
}

fn opts() -> CompileOptions {
    CompileOptions {
        default: DefaultAction::Deny,
        unknown: DefaultAction::Deny,
        now: SystemTime::now(),
    }
}

/// One NetworkPolicy per observed flow and workload side, selecting by the workload's
/// own (unique) labels: exactly the observed set.
fn exact(inv: &Inventory, flows: &[Flow]) -> PolicySet {
    let sel = |i: usize| {
        let w = &inv.workloads[i];
        WorkloadSelector {
            namespaces: NamespaceMatch::Named(w.namespace.clone()),
            pods: LabelSelector { match_labels: w.labels.clone(), match_expressions: vec![] },
        }
    };
    let peer = |e: End| match e {
        End::W(i) => Peer::Workloads(sel(i)),
        End::Ext(_) => Peer::Cidr { net: IpNet::from(ip_of(e)), except: vec![] },
    };
    let mut out = Vec::new();
    for (k, &(s, d, port, protocol)) in flows.iter().enumerate() {
        let rule = |p: Peer| Rule {
            name: None,
            action: Action::Allow,
            peers: Peers::List(vec![p]),
            ports: Some(vec![PortMatch::Range { protocol, first: port, last: port }]),
        };
        let np = |i: usize, side: &str, ingress, egress| Policy {
            kind: PolicyKind::NetworkPolicy,
            name: format!("f{k}-{side}"),
            namespace: Some(inv.workloads[i].namespace.clone()),
            source: Default::default(),
            tier: Tier::Namespaced,
            subject: sel(i),
            ingress,
            egress,
            mode: Mode::Enforce,
            expiry: None,
            created_at: None,
        };
        if let (End::Ext(_), End::Ext(_)) = (s, d) {
            continue;
        }
        if let End::W(i) = s {
            out.push(np(i, "egress", None, Some(vec![rule(peer(d))])));
        }
        if let End::W(j) = d {
            out.push(np(j, "ingress", Some(vec![rule(peer(s))]), None));
        }
    }
    PolicySet::new(inv.clone(), out)
}

fn check(n: usize, shared: bool, flows: Vec<Flow>) -> Result<(), TestCaseError> {
    let inv = inventory(n, shared);
    let obs = observed(&inv, &flows);
    let g = generate::generate(&inv, &obs, &Options::default());
    let set = load_generated(&inv, &g);
    let warnings = lint::lint(&set, SystemTime::now());
    prop_assert!(warnings.is_empty(), "{warnings:?}");
    let compiled = CompiledPolicy::compile(&set, &opts()).unwrap();
    for &(s, d, port, proto) in &flows {
        if let (End::Ext(_), End::Ext(_)) = (s, d) {
            prop_assert!(!g.unexpressed.is_empty());
            continue;
        }
        let q = FlowQuery { src: ip_of(s), dst: ip_of(d), dst_port: port, proto, fqdn: None };
        prop_assert!(
            compiled.decide(&q).verdict.is_allow(),
            "{s:?} → {d:?} {port}/{proto} not allowed"
        );
    }
    if !shared {
        let want = exact(&inv, &flows);
        let inventory = Arc::clone(&want.inventory);
        let got = PolicySet { inventory, policies: set.policies.clone() };
        let cw = CompiledPolicy::compile(&want, &opts()).unwrap();
        let cg = CompiledPolicy::compile(&got, &opts()).unwrap();
        let (d, _) =
            diff::diff(Side { set: &want, compiled: &cw }, Side { set: &got, compiled: &cg });
        let changes: Vec<String> = d
            .expand()
            .iter()
            .map(|c| {
                format!(
                    "{} {} → {} {:?}/{}",
                    c.kind.as_str(),
                    c.from.label(),
                    c.to.label(),
                    c.ports,
                    c.proto
                )
            })
            .collect();
        prop_assert!(changes.is_empty(), "generated differs from the observed set: {changes:#?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn generated_policy_allows_exactly_what_was_observed(
        (n, flows) in (1usize..6).prop_flat_map(|n| (Just(n), flows(n))),
        shared in any::<bool>(),
    ) {
        check(n, shared, flows)?;
    }
}

#[test]
fn external_blocks_are_aggregated_to_the_prefix_and_no_wider() {
    let inv = inventory(2, false);
    let flows =
        [(End::W(0), End::Ext(1), 443, Proto::Tcp), (End::W(0), End::Ext(3), 443, Proto::Tcp)];
    let obs = observed(&inv, &flows);
    let g = generate::generate(&inv, &obs, &Options { prefix_v4: 24, ..Options::default() });
    let yaml: String = g.files.iter().map(|f| f.1.clone()).collect();
    assert!(yaml.contains("cidr: 203.0.113.0/24"), "{yaml}");
    let g = generate::generate(&inv, &obs, &Options::default());
    let yaml: String = g.files.iter().map(|f| f.1.clone()).collect();
    assert!(
        yaml.contains("cidr: 203.0.113.1/32") && yaml.contains("cidr: 203.0.113.3/32"),
        "{yaml}"
    );
    assert!(yaml.contains("# 3 flow(s) observed, first at 2026-12-07T10:00:00.000Z"), "{yaml}");
}
