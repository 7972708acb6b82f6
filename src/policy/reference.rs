//! A deliberately simple evaluator straight over the IR: the oracle the property test
//! holds [`CompiledPolicy`](super::CompiledPolicy) against.
//!
//! Clarity over speed, on purpose: every call loops over every workload and every policy,
//! precomputes nothing and shares no code with `compile`/`decide` except the IR's own
//! matchers ([`WorkloadSelector::matches`], [`DomainPattern::matches`]). If the two
//! engines disagree, read this file first: it is meant to be checkable against the
//! semantics in `docs/DESIGN.md` line by line.
//!
//! The semantics, for a flow S → D:
//! - identity: longest-prefix match of each address over every workload's `addrs`; on a
//!   tie (the loader forbids it) the lowest workload index wins; no match = external;
//! - the egress side is evaluated if S is a workload, the ingress side if D is one; the
//!   flow is allowed iff every evaluated side allows; neither → `policy.unknown`;
//! - one side: Admin tier (first matching rule; Allow/Deny final, Pass leaves the tier),
//!   then NetworkPolicy isolation (isolated: admitted or `NotAdmitted`, final), then the
//!   Baseline tier (first matching Allow/Deny), then `policy.default`;
//! - expired policies (expiry ≤ `now`) do not exist; audit-mode policies do not change
//!   the verdict, they only fill `would_deny` (see [`decide`]).
//!
//! One reading happens before the IR and is the oracle's too: which directions a
//! NetworkPolicy covers. [`network_policy_directions`] reads it from the API reference
//! text of `policyTypes`, independently of the loader, so a test can hold the loader's
//! reading of every spelling (absent, `[]`, each list) against it.

use std::cmp::Ordering;
use std::net::IpAddr;

use super::compile::CompileOptions;
use super::ir::{
    Action, Labels, Mode, NAMESPACE_NAME_LABEL, Namespace, Peer, Peers, Policy, PolicySet,
    PortMatch, Rule, Tier, Workload,
};
use super::{Cause, Decision, DefaultAction, DenyReason, FlowQuery, PolicyId, Verdict, WorkloadId};
use crate::flow::Direction;

/// A NetworkPolicy's direction fields as written in YAML, before the API server's
/// defaulting. `None`: the key is absent (or null).
#[derive(Clone, Copy, Debug, Default)]
pub struct WrittenDirections<'a> {
    pub policy_types: Option<&'a [&'a str]>,
    pub ingress: Option<&'a [Rule]>,
    pub egress: Option<&'a [Rule]>,
}

/// The IR's `(ingress, egress)` for a NetworkPolicy written as `w`, read from the API
/// reference of `NetworkPolicySpec` (k8s.io/api `networking/v1/types.go`):
///
/// > policyTypes is a list of rule types that the NetworkPolicy relates to. Valid
/// > options are ["Ingress"], ["Egress"], or ["Ingress", "Egress"]. If this field is not
/// > specified, it will default based on the existence of ingress or egress rules;
/// > policies that contain an egress section are assumed to affect egress, and all
/// > policies (whether or not they contain an ingress section) are assumed to affect
/// > ingress.
///
/// "Not specified" and "existence" are the API server's `len(...) == 0` tests
/// (`SetDefaults_NetworkPolicy`, kubernetes `pkg/apis/networking/v1/defaults.go`): an
/// empty `policyTypes` is not specified, an empty `egress` is no egress section.
/// A direction the policy affects with no rules admits nothing:
///
/// > If this field is empty then this NetworkPolicy does not allow any traffic (and
/// > serves solely to ensure that the pods it selects are isolated by default)
pub fn network_policy_directions(
    w: WrittenDirections<'_>,
) -> (Option<Vec<Rule>>, Option<Vec<Rule>>) {
    let specified = w.policy_types.filter(|types| !types.is_empty());
    let has_egress_section = w.egress.is_some_and(|rules| !rules.is_empty());
    let affects = |ty: &str| match specified {
        Some(types) => types.contains(&ty),
        None => ty == "Ingress" || (ty == "Egress" && has_egress_section),
    };
    let rules = |written: Option<&[Rule]>| written.unwrap_or_default().to_vec();
    (affects("Ingress").then(|| rules(w.ingress)), affects("Egress").then(|| rules(w.egress)))
}

/// The workload owning `ip`: longest prefix over every workload's addresses, ties to
/// the lowest index.
pub fn workload_of(set: &PolicySet, ip: IpAddr) -> Option<WorkloadId> {
    let mut best: Option<(u8, usize)> = None;
    for (i, w) in set.inventory.workloads.iter().enumerate() {
        for net in &w.addrs {
            if net.contains(&ip) {
                let len = net.prefix_len();
                if best.is_none_or(|(l, _)| len > l) {
                    best = Some((len, i));
                }
            }
        }
    }
    best.map(|(_, i)| WorkloadId(i as u32))
}

/// The namespace object of a workload. A namespace missing from the inventory behaves
/// as one that carries only its name label (what Kubernetes would give it).
pub fn namespace_of(set: &PolicySet, workload: &Workload) -> Namespace {
    set.inventory.namespaces.iter().find(|n| n.name == workload.namespace).cloned().unwrap_or_else(
        || Namespace {
            name: workload.namespace.clone(),
            labels: Labels::from([(NAMESPACE_NAME_LABEL.to_string(), workload.namespace.clone())]),
        },
    )
}

/// Which policies take part in an evaluation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Enforce {
    /// Live policies that are not in audit mode: the real verdict.
    WithoutAudit,
    /// Every live policy, audit ones enforced: the would-be verdict.
    All,
}

/// One endpoint of the flow.
#[derive(Clone, Copy)]
struct End {
    ip: IpAddr,
    workload: Option<usize>,
}

/// The outcome of one side.
#[derive(Clone, Copy, Debug)]
struct Side {
    allow: bool,
    cause: Cause,
    policy: Option<usize>,
}

/// Decides one flow over the raw policy set.
///
/// Audit mode: the verdict (and every field except `would_deny`) is what the set gives
/// without its audit-mode policies. If the set has any live audit policy, the flow is
/// evaluated again with every live policy enforced; when that second verdict denies and
/// the first allows, `would_deny` is the policy behind the second verdict.
pub fn decide(set: &PolicySet, opts: &CompileOptions, q: &FlowQuery<'_>) -> Decision {
    let src = End { ip: q.src, workload: workload_of(set, q.src).map(|w| w.0 as usize) };
    let dst = End { ip: q.dst, workload: workload_of(set, q.dst).map(|w| w.0 as usize) };
    let real = evaluate(set, opts, q, src, dst, Enforce::WithoutAudit);
    let any_audit = set.policies.iter().any(|p| p.mode == Mode::Audit && p.is_live(opts.now));
    let mut decision = real;
    if any_audit && real.verdict.is_allow() {
        let all = evaluate(set, opts, q, src, dst, Enforce::All);
        if !all.verdict.is_allow() {
            decision.would_deny = all.policy;
        }
    }
    decision
}

fn evaluate(
    set: &PolicySet,
    opts: &CompileOptions,
    q: &FlowQuery<'_>,
    src: End,
    dst: End,
    enforce: Enforce,
) -> Decision {
    let mut d = Decision {
        verdict: Verdict::Allow,
        src_workload: src.workload.map(|w| WorkloadId(w as u32)),
        dst_workload: dst.workload.map(|w| WorkloadId(w as u32)),
        policy: None,
        would_deny: None,
    };
    if src.workload.is_none() && dst.workload.is_none() {
        if opts.unknown == DefaultAction::Deny {
            d.verdict = Verdict::Deny(DenyReason { direction: None, cause: Cause::Unknown });
        }
        return d;
    }
    let egress = src.workload.map(|w| side(set, opts, q, w, Direction::Egress, dst, dst, enforce));
    let ingress =
        dst.workload.map(|w| side(set, opts, q, w, Direction::Ingress, src, dst, enforce));
    for (dir, s) in [(Direction::Egress, egress), (Direction::Ingress, ingress)] {
        if let Some(s) = s
            && !s.allow
        {
            d.verdict = Verdict::Deny(DenyReason { direction: Some(dir), cause: s.cause });
            d.policy = s.policy.map(|i| PolicyId(i as u32));
            return d;
        }
    }
    d.policy = ingress
        .and_then(|s| s.policy)
        .or(egress.and_then(|s| s.policy))
        .map(|i| PolicyId(i as u32));
    d
}

/// Policies that take part, in set order, with their index.
fn active<'a>(
    set: &'a PolicySet,
    opts: &'a CompileOptions,
    enforce: Enforce,
) -> impl Iterator<Item = (usize, &'a Policy)> + 'a {
    set.policies.iter().map(|p| &**p).enumerate().filter(move |(_, p)| {
        p.is_live(opts.now) && (enforce == Enforce::All || p.mode == Mode::Enforce)
    })
}

/// The total order of a cluster tier: priority, then name, then namespace and source,
/// then position in the set.
fn tier_order(a: &(u32, usize, &Policy), b: &(u32, usize, &Policy)) -> Ordering {
    (a.0, &a.2.name, &a.2.namespace, &a.2.source, a.1).cmp(&(
        b.0,
        &b.2.name,
        &b.2.namespace,
        &b.2.source,
        b.1,
    ))
}

#[allow(clippy::too_many_arguments)]
fn side(
    set: &PolicySet,
    opts: &CompileOptions,
    q: &FlowQuery<'_>,
    w: usize,
    dir: Direction,
    peer: End,
    dst: End,
    enforce: Enforce,
) -> Side {
    let workload = &set.inventory.workloads[w];
    let ns = namespace_of(set, workload);
    let selects = |p: &Policy| p.subject.matches(&ns, workload);
    let rules_of = |p: &'_ Policy| -> Option<Vec<Rule>> {
        match dir {
            Direction::Ingress => p.ingress.clone(),
            Direction::Egress => p.egress.clone(),
        }
    };
    let matches = |r: &Rule| rule_matches(set, q, r, peer, dst);

    // 1. Admin tier.
    let mut admin: Vec<(u32, usize, &Policy)> = active(set, opts, enforce)
        .filter_map(|(i, p)| match p.tier {
            Tier::Admin { priority } if selects(p) => Some((priority, i, p)),
            _ => None,
        })
        .collect();
    admin.sort_by(tier_order);
    'admin: for (_, i, p) in &admin {
        for r in rules_of(p).unwrap_or_default() {
            if matches(&r) {
                match r.action {
                    Action::Allow => {
                        return Side { allow: true, cause: Cause::AdminDeny, policy: Some(*i) };
                    }
                    Action::Deny => {
                        return Side { allow: false, cause: Cause::AdminDeny, policy: Some(*i) };
                    }
                    Action::Pass => break 'admin,
                }
            }
        }
    }

    // 2. NetworkPolicy tier.
    let isolating: Vec<(usize, Vec<Rule>)> = active(set, opts, enforce)
        .filter(|(_, p)| p.tier == Tier::Namespaced && selects(p))
        .filter_map(|(i, p)| rules_of(p).map(|rules| (i, rules)))
        .collect();
    if let Some((first, _)) = isolating.first() {
        for (i, rules) in &isolating {
            if rules.iter().any(matches) {
                return Side { allow: true, cause: Cause::NotAdmitted, policy: Some(*i) };
            }
        }
        return Side { allow: false, cause: Cause::NotAdmitted, policy: Some(*first) };
    }

    // 3. Baseline tier. (A `Pass` here is outside the IR's invariants; it leaves the tier.)
    let mut baseline: Vec<(u32, usize, &Policy)> = active(set, opts, enforce)
        .filter_map(|(i, p)| match p.tier {
            Tier::Baseline { priority } if selects(p) => Some((priority, i, p)),
            _ => None,
        })
        .collect();
    baseline.sort_by(tier_order);
    'baseline: for (_, i, p) in &baseline {
        for r in rules_of(p).unwrap_or_default() {
            if matches(&r) {
                match r.action {
                    Action::Allow => {
                        return Side { allow: true, cause: Cause::BaselineDeny, policy: Some(*i) };
                    }
                    Action::Deny => {
                        return Side { allow: false, cause: Cause::BaselineDeny, policy: Some(*i) };
                    }
                    Action::Pass => break 'baseline,
                }
            }
        }
    }

    // 4. The default.
    Side { allow: opts.default == DefaultAction::Allow, cause: Cause::DefaultDeny, policy: None }
}

/// Does `rule` match the flow, `peer` being the other end and `dst` the destination?
fn rule_matches(set: &PolicySet, q: &FlowQuery<'_>, rule: &Rule, peer: End, dst: End) -> bool {
    let peer_ok = match &rule.peers {
        Peers::Any => true,
        Peers::List(list) => list.iter().any(|p| peer_matches(set, q, p, peer)),
    };
    let port_ok = match &rule.ports {
        None => true,
        Some(ports) => ports.iter().any(|p| port_matches(set, q, p, dst)),
    };
    peer_ok && port_ok
}

fn peer_matches(set: &PolicySet, q: &FlowQuery<'_>, peer: &Peer, end: End) -> bool {
    match peer {
        Peer::Workloads(sel) => end.workload.is_some_and(|w| {
            let workload = &set.inventory.workloads[w];
            sel.matches(&namespace_of(set, workload), workload)
        }),
        Peer::Cidr { net, except } => {
            net.contains(&end.ip) && !except.iter().any(|e| e.contains(&end.ip))
        }
        Peer::Domain(pattern) => q.fqdn.is_some_and(|name| pattern.matches(name)),
    }
}

fn port_matches(set: &PolicySet, q: &FlowQuery<'_>, port: &PortMatch, dst: End) -> bool {
    match port {
        PortMatch::Range { protocol, first, last } => {
            *protocol == q.proto && (*first..=*last).contains(&q.dst_port)
        }
        PortMatch::Named { protocol, name } => dst.workload.is_some_and(|w| {
            set.inventory.workloads[w].ports.iter().any(|np| {
                np.name == *name
                    && np.protocol == q.proto
                    && protocol.is_none_or(|p| p == q.proto)
                    && np.port == q.dst_port
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::flow::Proto;
    use crate::policy::ir::{
        Inventory, LabelSelector, NamespaceMatch, PolicyKind, Workload, WorkloadSelector,
    };

    fn deny_all_in_x(written: WrittenDirections<'_>) -> Policy {
        let (ingress, egress) = network_policy_directions(written);
        Policy {
            kind: PolicyKind::NetworkPolicy,
            name: "deny-all".into(),
            namespace: Some("x".into()),
            source: Default::default(),
            tier: Tier::Namespaced,
            subject: WorkloadSelector {
                namespaces: NamespaceMatch::Named("x".into()),
                pods: LabelSelector::default(),
            },
            ingress,
            egress,
            mode: Mode::Enforce,
            expiry: None,
            created_at: None,
        }
    }

    fn workload(name: &str, ns: &str, ip: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: ns.into(),
            labels: Labels::new(),
            addrs: vec![ip.parse().unwrap()],
            ports: vec![],
        }
    }

    fn verdict(set: &PolicySet, src: &str, dst: &str) -> Verdict {
        let opts = CompileOptions {
            default: DefaultAction::Allow,
            unknown: DefaultAction::Allow,
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
        };
        let q = FlowQuery {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            dst_port: 80,
            proto: Proto::Tcp,
            fqdn: None,
        };
        decide(set, &opts, &q).verdict
    }

    /// Issue 27: `policyTypes: []` with no rules is the deny-all-ingress of every cluster,
    /// not a policy that applies to no direction.
    #[test]
    fn empty_policy_types_is_read_as_absent() {
        let empty = WrittenDirections { policy_types: Some(&[]), ..Default::default() };
        let absent = WrittenDirections::default();
        assert_eq!(network_policy_directions(empty), (Some(vec![]), None));
        assert_eq!(network_policy_directions(empty), network_policy_directions(absent));

        let inventory = Inventory {
            namespaces: vec![],
            workloads: vec![
                workload("a", "x", "198.18.0.1/32"),
                workload("b", "x", "198.18.0.2/32"),
                workload("c", "y", "198.18.0.3/32"),
            ],
        };
        let set = PolicySet::new(inventory, vec![deny_all_in_x(empty)]);
        let not_admitted = Verdict::Deny(DenyReason {
            direction: Some(Direction::Ingress),
            cause: Cause::NotAdmitted,
        });
        assert_eq!(verdict(&set, "198.18.0.3", "198.18.0.1"), not_admitted, "y -> x");
        assert_eq!(verdict(&set, "198.18.0.2", "198.18.0.1"), not_admitted, "x -> x");
        assert_eq!(verdict(&set, "203.0.113.9", "198.18.0.2"), not_admitted, "outside -> x");
        assert_eq!(verdict(&set, "198.18.0.1", "198.18.0.3"), Verdict::Allow, "egress untouched");
    }

    /// The reverse case of issue 27: `policyTypes: []` with `ingress: [{}]` admits.
    #[test]
    fn empty_policy_types_with_an_open_rule_admits() {
        let open = [Rule { name: None, action: Action::Allow, peers: Peers::Any, ports: None }];
        let w = WrittenDirections { policy_types: Some(&[]), ingress: Some(&open), egress: None };
        assert_eq!(network_policy_directions(w), (Some(open.to_vec()), None));
    }

    #[test]
    fn egress_is_affected_by_an_egress_section_or_by_being_listed() {
        let open = [Rule { name: None, action: Action::Allow, peers: Peers::Any, ports: None }];
        /// `policyTypes`, `egress`, then whether ingress and egress are affected.
        type Case<'a> = (Option<&'a [&'a str]>, Option<&'a [Rule]>, bool, bool);
        let cases: [Case<'_>; 8] = [
            (None, Some(&open), true, true),
            (Some(&[]), Some(&open), true, true),
            (None, Some(&[]), true, false),
            (Some(&[]), Some(&[]), true, false),
            (Some(&["Egress"]), None, false, true),
            (Some(&["Ingress"]), Some(&open), true, false),
            (Some(&["Egress", "Ingress"]), None, true, true),
            (Some(&["Ingress", "Egress"]), None, true, true),
        ];
        for (policy_types, egress, ingress_on, egress_on) in cases {
            let w = WrittenDirections { policy_types, ingress: None, egress };
            let (i, e) = network_policy_directions(w);
            assert_eq!((i.is_some(), e.is_some()), (ingress_on, egress_on), "{w:?}");
        }
    }
}
