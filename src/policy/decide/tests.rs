//! Semantics of `decide`, point by point (issue 3's NetworkPolicy list and issue 4's tier
//! list). Each test loads real YAML through the loader, compiles it and asks concrete
//! flows; every answer is also checked against the reference evaluator. Each test
//! carries at least one flow that a naive implementation (named in the test) gets wrong.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::flow::{Direction, Proto};
use crate::policy::ir::PolicySet;
use crate::policy::load::{parse_inventory, parse_policies};
use crate::policy::{
    Cause, CompileOptions, CompiledPolicy, Decision, DefaultAction, DenyReason, FlowQuery, Verdict,
    reference, simulate,
};

/// Namespaces `a` (team x) and `b` (team y) and `c` (team x); workloads with labels,
/// addresses and named ports. Used by most tests.
const INV: &str = "
namespaces:
  - {name: a, labels: {team: x}}
  - {name: b, labels: {team: y}}
  - {name: c, labels: {team: x}}
workloads:
  - name: web
    namespace: a
    labels: {app: web, tier: front}
    ips: [10.0.1.1, '2001:db8::1']
    ports: [{name: http, port: 8080}, {name: dns, port: 53, protocol: UDP}]
  - name: db
    namespace: a
    labels: {app: db}
    ips: [10.0.1.2]
    ports: [{name: http, port: 9090}]
  - name: web
    namespace: b
    labels: {app: web}
    ips: [10.0.2.1]
  - name: api
    namespace: b
    labels: {app: api, tier: back}
    ips: [10.0.2.2]
  - name: web
    namespace: c
    labels: {app: web}
    ips: [10.0.3.0/24]
  - name: pinned
    namespace: c
    labels: {app: pinned}
    ips: [10.0.3.7]
";

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// A loaded and compiled set, asked through both engines.
struct Engine {
    set: PolicySet,
    opts: CompileOptions,
    compiled: CompiledPolicy,
}

fn engine_with(inv: &str, policies: &str, default: DefaultAction) -> Engine {
    let inventory =
        parse_inventory(inv, Path::new("inv.yaml")).unwrap_or_else(|e| panic!("inventory: {e}"));
    let policies = if policies.trim().is_empty() {
        Vec::new()
    } else {
        parse_policies(policies, Path::new("p.yaml")).unwrap_or_else(|e| panic!("policies: {e}"))
    };
    let set = PolicySet::new(inventory, policies);
    let opts = CompileOptions { default, unknown: DefaultAction::Deny, now: now() };
    let compiled = CompiledPolicy::compile(&set, &opts).unwrap_or_else(|e| panic!("compile: {e}"));
    Engine { set, opts, compiled }
}

fn engine(policies: &str) -> Engine {
    engine_with(INV, policies, DefaultAction::Allow)
}

impl Engine {
    /// Decides `from → to:port/proto` (endpoints as `ns/name` or an IP; `to` may be a
    /// domain), checking the reference and `explain` agree.
    fn ask(&self, from: &str, to: &str, port: &str, proto: Proto) -> Decision {
        let from = simulate::parse_endpoint(from, false).expect("test endpoint");
        let to = simulate::parse_endpoint(to, true).expect("test endpoint");
        let port = simulate::parse_port(port).expect("test port");
        let flow = simulate::resolve(&self.compiled, &from, &to, &port, proto)
            .unwrap_or_else(|e| panic!("resolve: {e}"));
        self.query(&flow.query())
    }

    fn query(&self, q: &FlowQuery<'_>) -> Decision {
        let fast = self.compiled.decide(q);
        let slow = reference::decide(&self.set, &self.opts, q);
        assert_eq!(fast, slow, "compiled vs reference for {q:?}");
        assert_eq!(self.compiled.explain(q).decision, fast);
        fast
    }

    fn allows(&self, from: &str, to: &str, port: &str) -> bool {
        self.ask(from, to, port, Proto::Tcp).verdict.is_allow()
    }

    fn allows_proto(&self, from: &str, to: &str, port: &str, proto: Proto) -> bool {
        self.ask(from, to, port, proto).verdict.is_allow()
    }

    fn policy_name(&self, d: &Decision) -> Option<&str> {
        d.policy.and_then(|p| self.compiled.policy_name(p))
    }
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

fn anp(name: &str, priority: u32, spec: &str, annotations: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\nspec:\n  priority: {priority}\n{spec}"
    )
}

fn banp(spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: default}}\nspec:\n{spec}"
    )
}

fn deny(d: Decision) -> Option<DenyReason> {
    match d.verdict {
        Verdict::Allow => None,
        Verdict::Deny(r) => Some(r),
    }
}

// ---------------- NetworkPolicy (issue 3) ----------------

#[test]
fn empty_pod_selector_selects_every_pod_of_its_own_namespace_only() {
    // Naive: `podSelector: {}` selecting every pod everywhere.
    let e = engine(&np("a", "deny-all", "podSelector: {}\npolicyTypes: [Ingress]"));
    assert!(!e.allows("b/web", "a/web", "80"));
    assert!(!e.allows("b/web", "a/db", "80"));
    assert!(e.allows("a/web", "b/api", "80"), "b is not isolated");
}

#[test]
fn match_labels_and_every_expression_operator() {
    let e = engine(&np(
        "b",
        "p",
        "podSelector: {}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {app: web}\n      matchExpressions:\n      - {key: tier, operator: In, values: [front]}\n      - {key: role, operator: DoesNotExist}\n    namespaceSelector: {}\n  - podSelector:\n      matchExpressions:\n      - {key: tier, operator: NotIn, values: [front, back]}\n      - {key: app, operator: Exists}",
    ));
    // a/web: app=web, tier=front, no role → first peer.
    assert!(e.allows("a/web", "b/api", "80"));
    // b/web: no tier (NotIn holds for an absent key — naive: NotIn needs the key), app set.
    assert!(e.allows("b/web", "b/api", "80"));
    // a/db: not web (first peer), and not in b (second peer's implicit namespace).
    assert!(!e.allows("a/db", "b/api", "80"));
    // b/api → b/web: tier=back is excluded by NotIn.
    assert!(!e.allows("b/api", "b/web", "80"));
}

#[test]
fn namespace_and_pod_selector_in_one_peer_intersect_in_two_peers_unite() {
    let one_peer = engine(&np(
        "b",
        "p",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: x}}\n    podSelector: {matchLabels: {app: db}}",
    ));
    // Only db pods in team-x namespaces.
    assert!(one_peer.allows("a/db", "b/api", "80"));
    assert!(!one_peer.allows("a/web", "b/api", "80"), "naive: union of the two selectors");
    assert!(!one_peer.allows("c/web", "b/api", "80"));

    let two_peers = engine(&np(
        "b",
        "p",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: x}}\n  - podSelector: {matchLabels: {app: db}}",
    ));
    // Every pod of team-x namespaces, or db pods of b itself (there are none).
    assert!(two_peers.allows("a/web", "b/api", "80"), "naive: intersection");
    assert!(two_peers.allows("c/pinned", "b/api", "80"));
    assert!(!two_peers.allows("b/web", "b/api", "80"), "a bare podSelector stays in b");
}

#[test]
fn namespace_selector_alone_and_empty() {
    let e = engine(&np(
        "a",
        "p",
        "podSelector: {matchLabels: {app: db}}\ningress:\n- from:\n  - namespaceSelector: {}",
    ));
    // Every workload in every namespace, but never an external address.
    assert!(e.allows("b/web", "a/db", "80"));
    assert!(e.allows("a/web", "a/db", "80"));
    assert!(!e.allows("192.0.2.1", "a/db", "80"), "naive: empty selector = everything");
}

#[test]
fn ip_block_with_except_v4_and_v6() {
    let e = engine(&np(
        "a",
        "p",
        "podSelector: {matchLabels: {app: web}}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/8, except: [10.0.2.0/24]}\n  - ipBlock: {cidr: '2001:db8::/32', except: ['2001:db8:1::/48']}",
    ));
    assert!(e.allows("c/pinned", "a/web", "80"), "workloads are matched by ipBlock too");
    assert!(e.allows("10.200.0.1", "a/web", "80"));
    assert!(!e.allows("b/api", "a/web", "80"), "inside except (naive: except ignored)");
    assert!(!e.allows("10.0.2.200", "a/web", "80"));
    assert!(!e.allows("11.0.0.1", "a/web", "80"));
    assert!(e.allows("2001:db8:2::1", "a/web", "80"));
    assert!(!e.allows("2001:db8:1::1", "a/web", "80"));
    assert!(!e.allows("2001:db9::1", "a/web", "80"));
}

#[test]
fn named_port_is_resolved_on_each_destination_and_protocol() {
    // `http` is 8080 on a/web and 9090 on a/db. Naive: resolve the name once (first
    // workload that has it) and match that number everywhere.
    let e = engine(&np(
        "a",
        "p",
        "podSelector: {}\ningress:\n- ports: [{port: http}]\n- ports: [{port: dns, protocol: UDP}]",
    ));
    assert!(e.allows("b/web", "a/web", "8080"));
    assert!(!e.allows("b/web", "a/web", "9090"));
    assert!(e.allows("b/web", "a/db", "9090"));
    assert!(!e.allows("b/web", "a/db", "8080"));
    // dns is UDP 53 on a/web: TCP 53 is not it.
    assert!(e.allows_proto("b/web", "a/web", "53", Proto::Udp));
    assert!(!e.allows_proto("b/web", "a/web", "53", Proto::Tcp));
    // The port number the name stands for on another workload does not count.
    assert!(!e.allows_proto("b/web", "a/db", "53", Proto::Udp));

    // A TCP `http` rule does not match the UDP flow to the same number.
    assert!(!e.allows_proto("b/web", "a/web", "8080", Proto::Udp));
}

#[test]
fn end_port_ranges_are_inclusive_and_protocol_defaults_to_tcp() {
    let e = engine(&np(
        "a",
        "p",
        "podSelector: {}\ningress:\n- ports: [{port: 1000, endPort: 1010}, {protocol: SCTP, port: 5000}, {protocol: UDP}]",
    ));
    assert!(!e.allows("b/web", "a/web", "999"));
    assert!(e.allows("b/web", "a/web", "1000"));
    assert!(e.allows("b/web", "a/web", "1010"), "naive: endPort exclusive");
    assert!(!e.allows("b/web", "a/web", "1011"));
    assert!(!e.allows_proto("b/web", "a/web", "1005", Proto::Sctp), "range is TCP only");
    assert!(e.allows_proto("b/web", "a/web", "5000", Proto::Sctp));
    assert!(!e.allows("b/web", "a/web", "5000"));
    // A protocol without a port: every UDP port.
    assert!(e.allows_proto("b/web", "a/web", "1", Proto::Udp));
    assert!(e.allows_proto("b/web", "a/web", "65535", Proto::Udp));
}

#[test]
fn policy_types_default_ingress_always_egress_only_with_egress_rules() {
    let default = DefaultAction::Allow;
    // Only ingress rules, no policyTypes: ingress isolated, egress not.
    let e = engine_with(
        INV,
        &np(
            "a",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{podSelector: {}}]",
        ),
        default,
    );
    assert!(e.allows("a/web", "b/api", "80"), "naive: the policy isolates both directions");
    assert!(!e.allows("b/api", "a/web", "80"));
    // No rules at all, no policyTypes: isolates ingress (deny all in), not egress.
    let e = engine_with(INV, &np("a", "p", "podSelector: {}"), default);
    assert!(!e.allows("a/db", "a/web", "80"));
    assert!(e.allows("a/web", "b/api", "80"));
    // Egress rules present, no policyTypes: isolates ingress and egress.
    let e = engine_with(
        INV,
        &np("a", "p", "podSelector: {matchLabels: {app: web}}\negress:\n- to: [{podSelector: {}}]"),
        default,
    );
    assert!(e.allows("a/web", "a/db", "80"));
    assert!(!e.allows("a/web", "b/api", "80"));
    assert!(!e.allows("a/db", "a/web", "80"), "ingress is isolated too (Ingress always)");
    // policyTypes: [Egress] with no egress rules: egress denied, ingress untouched.
    let e = engine_with(INV, &np("a", "p", "podSelector: {}\npolicyTypes: [Egress]"), default);
    assert!(!e.allows("a/web", "b/api", "80"));
    assert!(e.allows("b/api", "a/web", "80"));
}

#[test]
fn empty_ingress_list_vs_empty_rule_vs_rule_without_from() {
    // `ingress: []`: isolates, admits nothing.
    let e = engine(&np("a", "p", "podSelector: {}\ningress: []"));
    assert!(!e.allows("b/api", "a/web", "80"));
    assert!(!e.allows("192.0.2.1", "a/web", "80"));
    // `ingress: [{}]`: isolates and admits everything, externals included.
    let e = engine_with(INV, &np("a", "p", "podSelector: {}\ningress: [{}]"), DefaultAction::Deny);
    assert!(e.allows("192.0.2.1", "a/web", "80"), "naive: [{{}}] treated like []");
    // From a workload, its own egress still counts: b/api is not isolated → default deny.
    assert_eq!(
        deny(e.ask("b/api", "a/web", "80", Proto::Tcp)),
        Some(DenyReason { direction: Some(Direction::Egress), cause: Cause::DefaultDeny })
    );
    let d = e.ask("192.0.2.1", "a/web", "1", Proto::Sctp);
    assert!(d.verdict.is_allow());
    // A rule with ports but no `from`: every peer, those ports only.
    let e = engine(&np("a", "p", "podSelector: {}\ningress: [{ports: [{port: 443}]}]"));
    assert!(e.allows("192.0.2.1", "a/web", "443"));
    assert!(e.allows("b/api", "a/web", "443"));
    assert!(!e.allows("b/api", "a/web", "80"));
}

#[test]
fn isolation_is_per_direction_and_policies_add_up() {
    let policies = [
        np("a", "in-from-b", "podSelector: {}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: y}}}]"),
        np("a", "in-from-c", "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: c}}}]"),
    ]
    .concat();
    let e = engine_with(INV, &policies, DefaultAction::Allow);
    // a/web is isolated for ingress by both; either admitting is enough (union).
    assert!(e.allows("b/api", "a/web", "80"));
    assert!(e.allows("c/web", "a/web", "80"), "naive: only the first policy's rules count");
    assert!(!e.allows("c/web", "a/db", "80"), "in-from-c does not select a/db");
    // Ingress isolation says nothing about egress: a/web → anywhere falls to the default.
    assert!(e.allows("a/web", "192.0.2.1", "80"), "naive: isolated in both directions");
    let e = engine_with(INV, &policies, DefaultAction::Deny);
    assert_eq!(
        deny(e.ask("a/web", "192.0.2.1", "80", Proto::Tcp)),
        Some(DenyReason { direction: Some(Direction::Egress), cause: Cause::DefaultDeny })
    );
}

#[test]
fn both_sides_must_allow() {
    let e = engine_with(
        INV,
        &[
            np("a", "web-out", "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress:\n- to: [{namespaceSelector: {}}]"),
            np("b", "api-in", "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: y}}}]"),
        ]
        .concat(),
        DefaultAction::Allow,
    );
    // a/web's egress admits, b/api's ingress does not: denied on the ingress side.
    let d = e.ask("a/web", "b/api", "80", Proto::Tcp);
    assert_eq!(
        deny(d),
        Some(DenyReason { direction: Some(Direction::Ingress), cause: Cause::NotAdmitted })
    );
    assert_eq!(e.policy_name(&d), Some("b/api-in"));
    // Egress denies, ingress would admit: denied on the egress side.
    let d = e.ask("a/web", "192.0.2.1", "80", Proto::Tcp);
    assert_eq!(deny(d).and_then(|r| r.direction), Some(Direction::Egress));
    assert!(e.allows("b/web", "b/api", "80"));
}

#[test]
fn externals_bring_no_policy_and_defaults_decide_the_rest() {
    let e = engine_with(
        INV,
        &np(
            "a",
            "p",
            "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{ipBlock: {cidr: 192.0.2.0/24}}]",
        ),
        DefaultAction::Deny,
    );
    // External source: only a/db's ingress is evaluated (naive: default-deny the external).
    assert!(e.allows("192.0.2.9", "a/db", "80"));
    // A non-isolated workload under default deny.
    assert_eq!(
        deny(e.ask("192.0.2.9", "a/web", "80", Proto::Tcp)).map(|r| r.cause),
        Some(Cause::DefaultDeny)
    );
    let allow = engine_with(INV, "", DefaultAction::Allow);
    assert!(allow.allows("192.0.2.9", "a/web", "80"));
    assert!(allow.allows("a/web", "b/web", "80"));
    // Neither side a workload: policy.unknown (deny here), whatever the default.
    let d = allow.query(&FlowQuery {
        src: "192.0.2.1".parse().expect("ip"),
        dst: "198.51.100.1".parse().expect("ip"),
        dst_port: 80,
        proto: Proto::Tcp,
        fqdn: None,
    });
    assert_eq!(deny(d), Some(DenyReason { direction: None, cause: Cause::Unknown }));
}

#[test]
fn identity_is_longest_prefix_match() {
    // c/web owns 10.0.3.0/24; c/pinned owns 10.0.3.7 inside it.
    let e = engine(&np("c", "p", "podSelector: {matchLabels: {app: pinned}}\ningress: []"));
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    assert_eq!(
        e.compiled
            .workload_of(ip("10.0.3.7"))
            .and_then(|w| e.compiled.workload_name(w))
            .map(|n| n.to_string()),
        Some("c/pinned".to_string())
    );
    assert!(!e.allows("a/web", "10.0.3.7", "80"), "naive: first matching prefix (c/web)");
    assert!(e.allows("a/web", "10.0.3.8", "80"));
}

// ---------------- Tiers (issue 4) ----------------

const DENY_WEB_EGRESS: &str = "subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\negress:\n- {name: r, action: Deny, to: [{networks: [192.0.2.0/24]}]}";
const ALLOW_WEB_EGRESS: &str = "subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\negress:\n- {name: r, action: Allow, to: [{networks: [192.0.2.0/24]}]}";

#[test]
fn lower_priority_number_goes_first_and_ties_go_by_name() {
    let base = np("a", "iso", "podSelector: {}\npolicyTypes: [Egress]");
    let e = engine(
        &[
            anp("deny", 10, DENY_WEB_EGRESS, ""),
            anp("allow", 20, ALLOW_WEB_EGRESS, ""),
            base.clone(),
        ]
        .concat(),
    );
    let d = e.ask("a/web", "192.0.2.1", "80", Proto::Tcp);
    assert_eq!(deny(d).map(|r| r.cause), Some(Cause::AdminDeny));
    assert_eq!(e.policy_name(&d), Some("deny"));
    // Swap the priorities (file order unchanged: naive = file order).
    let e = engine(
        &[
            anp("deny", 20, DENY_WEB_EGRESS, ""),
            anp("allow", 10, ALLOW_WEB_EGRESS, ""),
            base.clone(),
        ]
        .concat(),
    );
    assert!(e.allows("a/web", "192.0.2.1", "80"), "ANP Allow is final over the NP isolation");
    // Equal priorities: by name ("a-deny" < "b-allow"), whatever the file order.
    let e = engine(
        &[anp("b-allow", 7, ALLOW_WEB_EGRESS, ""), anp("a-deny", 7, DENY_WEB_EGRESS, "")].concat(),
    );
    assert!(!e.allows("a/web", "192.0.2.1", "80"));
    // Within one policy, the first matching rule wins.
    let e = engine(&anp(
        "p",
        1,
        "subject: {namespaces: {}}\negress:\n- {name: first, action: Allow, to: [{networks: [192.0.2.1/32]}]}\n- {name: second, action: Deny, to: [{networks: [192.0.2.0/24]}]}",
        "",
    ));
    assert!(e.allows("a/web", "192.0.2.1", "80"));
    assert!(!e.allows("a/web", "192.0.2.2", "80"));
}

#[test]
fn admin_deny_overrides_a_networkpolicy_allow() {
    let e = engine(
        &[
            anp("block", 5, DENY_WEB_EGRESS, ""),
            np("a", "all-out", "podSelector: {}\npolicyTypes: [Egress]\negress: [{}]"),
        ]
        .concat(),
    );
    assert!(!e.allows("a/web", "192.0.2.1", "80"), "naive: NetworkPolicy allow wins");
    assert!(e.allows("a/web", "198.51.100.1", "80"));
    assert!(e.allows("a/db", "192.0.2.1", "80"), "the ANP subject is app=web only");
}

#[test]
fn pass_falls_through_to_networkpolicy_then_to_baseline() {
    let pass = anp(
        "pass",
        1,
        "subject: {namespaces: {}}\negress:\n- {name: p, action: Pass, to: [{networks: [192.0.2.0/24]}]}\n- {name: rest, action: Allow, to: [{networks: [0.0.0.0/0]}]}",
        "",
    );
    let later_deny = anp(
        "later",
        2,
        "subject: {namespaces: {}}\negress:\n- {name: d, action: Deny, to: [{networks: [0.0.0.0/0]}]}",
        "",
    );
    let baseline = banp(
        "subject: {namespaces: {}}\negress:\n- {name: bd, action: Deny, to: [{networks: [192.0.2.0/25]}]}\n- {name: ba, action: Allow, to: [{networks: [192.0.2.0/24]}]}",
    );
    let np_allow = np(
        "a",
        "web-out",
        "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 192.0.2.0/26}}]",
    );
    let e = engine_with(INV, &[pass, later_deny, baseline, np_allow].concat(), DefaultAction::Deny);
    // a/web: Pass (skipping the later Deny and the rest of the ANP tier) → NP admits .0/26.
    assert!(
        e.allows("a/web", "192.0.2.1", "80"),
        "naive: Pass = Allow, or Pass continues the ANP tier"
    );
    // a/web: Pass → NP isolated, not admitted → denied by the NP tier, not the baseline.
    let d = e.ask("a/web", "192.0.2.200", "80", Proto::Tcp);
    assert_eq!(deny(d).map(|r| r.cause), Some(Cause::NotAdmitted));
    // a/db (not isolated): Pass → baseline decides (first matching BANP rule).
    let d = e.ask("a/db", "192.0.2.1", "80", Proto::Tcp);
    assert_eq!(deny(d).map(|r| r.cause), Some(Cause::BaselineDeny));
    assert!(e.allows("a/db", "192.0.2.200", "80"), "baseline Allow");
    // Not matched by Pass: the next rule of the same ANP (Allow) decides before the later
    // ANP's Deny.
    let d = e.ask("a/db", "198.51.100.1", "80", Proto::Tcp);
    assert!(d.verdict.is_allow());
    assert_eq!(e.policy_name(&d), Some("pass"));
}

#[test]
fn baseline_applies_only_to_workloads_no_networkpolicy_isolates() {
    let e = engine(&[
        banp("subject: {namespaces: {}}\ningress:\n- {name: no, action: Deny, from: [{namespaces: {}}]}"),
        np("a", "db-in", "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{podSelector: {matchLabels: {app: web}}}]"),
    ]
    .concat());
    assert!(e.allows("a/web", "a/db", "80"), "naive: BANP deny applied to the isolated a/db");
    let d = e.ask("a/db", "a/web", "80", Proto::Tcp);
    assert_eq!(deny(d).map(|r| r.cause), Some(Cause::BaselineDeny));
    let d = e.ask("b/web", "a/db", "80", Proto::Tcp);
    assert_eq!(deny(d).map(|r| r.cause), Some(Cause::NotAdmitted));
}

#[test]
fn domain_names_exact_and_wildcard() {
    let e = engine_with(
        INV,
        &anp(
            "names",
            1,
            "subject: {namespaces: {}}\negress:\n- {name: n, action: Allow, to: [{domainNames: [api.stripe.com, '*.example.com']}]}",
            "",
        ),
        DefaultAction::Deny,
    );
    assert!(e.allows("a/web", "api.stripe.com", "443"));
    assert!(e.allows("a/web", "API.Stripe.com.", "443"), "case and trailing dot");
    assert!(!e.allows("a/web", "x.api.stripe.com", "443"), "exact is exact");
    assert!(e.allows("a/web", "a.example.com", "443"));
    assert!(e.allows("a/web", "a.b.example.com", "443"), "naive: wildcard = one label");
    assert!(!e.allows("a/web", "example.com", "443"), "naive: wildcard includes the apex");
    assert!(!e.allows("a/web", "badexample.com", "443"));
    // Without a name a domain rule never matches, even to the address the name had.
    assert!(!e.allows("a/web", "0.0.0.0", "443"));
}

#[test]
fn expiry_past_is_not_enforced_future_is() {
    let at = |secs: i64| {
        let t = if secs >= 0 {
            now() + Duration::from_secs(secs as u64)
        } else {
            now() - Duration::from_secs(secs.unsigned_abs())
        };
        chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()
    };
    let block = |ann: String| engine(&anp("emergency", 1, DENY_WEB_EGRESS, &ann));
    let past = block(format!("flowgate.dev/expires-at: '{}'", at(-60)));
    assert!(past.allows("a/web", "192.0.2.1", "80"), "naive: expiry ignored");
    let future = block(format!("flowgate.dev/expires-at: '{}'", at(60)));
    assert!(!future.allows("a/web", "192.0.2.1", "80"));
    assert_eq!(future.compiled.next_expiry(), Some(now() + Duration::from_secs(60)));
    // A TTL counts from the creation time.
    let ttl = |created: i64| {
        let yaml = anp("emergency", 1, DENY_WEB_EGRESS, "flowgate.dev/ttl: 15m")
            .replace("metadata: {", &format!("metadata: {{creationTimestamp: '{}', ", at(created)));
        engine(&yaml)
    };
    assert!(ttl(-16 * 60).allows("a/web", "192.0.2.1", "80"));
    assert!(!ttl(-14 * 60).allows("a/web", "192.0.2.1", "80"));
}

#[test]
fn audit_mode_allows_and_reports_would_deny() {
    let e = engine(&[
        anp("staged", 1, DENY_WEB_EGRESS, "flowgate.dev/mode: audit"),
        anp("real", 2, "subject: {namespaces: {}}\negress:\n- {name: d, action: Deny, to: [{networks: [198.51.100.0/24]}]}", ""),
    ]
    .concat());
    let d = e.ask("a/web", "192.0.2.1", "80", Proto::Tcp);
    assert!(d.verdict.is_allow(), "naive: audit policies enforced");
    assert_eq!(d.would_deny.and_then(|p| e.compiled.policy_name(p)), Some("staged"));
    // Not in the audit policy's scope: no would-deny.
    let d = e.ask("a/db", "192.0.2.1", "80", Proto::Tcp);
    assert!(d.verdict.is_allow());
    assert_eq!(d.would_deny, None);
    // A real denial stays a denial, without a would-deny.
    let d = e.ask("a/web", "198.51.100.1", "80", Proto::Tcp);
    assert_eq!(e.policy_name(&d), Some("real"));
    assert!(!d.verdict.is_allow());
    assert_eq!(d.would_deny, None);
}

#[test]
fn anp_named_port_and_port_range() {
    // Ingress from workloads (ANP ingress peers are namespaces/pods); the baseline denies
    // whatever the ANP does not allow, so each assertion really depends on the ANP rule.
    let e = engine_with(
        INV,
        &[
            anp(
                "ports",
                1,
                "subject: {namespaces: {}}\ningress:\n- {name: named, action: Allow, from: [{namespaces: {}}], ports: [{namedPort: http}]}\n- {name: range, action: Allow, from: [{namespaces: {}}], ports: [{portRange: {protocol: UDP, start: 7000, end: 7100}}]}",
                "",
            ),
            banp("subject: {namespaces: {}}\ningress:\n- {name: no, action: Deny, from: [{namespaces: {}}]}"),
        ]
        .concat(),
        DefaultAction::Allow,
    );
    // namedPort per destination, any protocol the port is declared with.
    assert!(e.allows("b/web", "a/web", "8080"));
    assert!(!e.allows("b/web", "a/web", "9090"));
    assert!(e.allows("b/web", "a/db", "9090"), "naive: name resolved once");
    assert!(!e.allows("b/web", "a/db", "8080"));
    assert!(!e.allows_proto("b/web", "a/web", "53", Proto::Udp), "dns is not http");
    // portRange: inclusive, protocol respected.
    assert!(e.allows_proto("b/web", "a/web", "7000", Proto::Udp));
    assert!(e.allows_proto("b/web", "a/web", "7100", Proto::Udp), "naive: end exclusive");
    assert!(!e.allows_proto("b/web", "a/web", "7101", Proto::Udp));
    assert!(!e.allows_proto("b/web", "a/web", "6999", Proto::Udp));
    assert!(!e.allows_proto("b/web", "a/web", "7050", Proto::Tcp));
}

#[test]
fn decide_does_not_allocate() {
    // See also benches/decide.rs, which asserts the same at 10,000 policies.
    let e = engine(&[
        anp("staged", 1, DENY_WEB_EGRESS, "flowgate.dev/mode: audit"),
        np("a", "p", "podSelector: {}\ningress:\n- ports: [{port: http}]"),
        banp("subject: {namespaces: {}}\ningress:\n- {name: no, action: Deny, from: [{namespaces: {}}]}"),
    ]
    .concat());
    let q = FlowQuery {
        src: "10.0.1.1".parse().expect("ip"),
        dst: "192.0.2.1".parse().expect("ip"),
        dst_port: 80,
        proto: Proto::Tcp,
        fqdn: Some("a.example.com"),
    };
    let q2 = FlowQuery {
        src: "10.0.2.1".parse().expect("ip"),
        dst: "10.0.1.2".parse().expect("ip"),
        fqdn: None,
        ..q
    };
    // The probe itself works: a Box is counted.
    let probe = alloc_probe::allocations();
    let boxed = std::hint::black_box(Box::new(7u64));
    assert_eq!(alloc_probe::allocations() - probe, 1, "{boxed}");
    let before = alloc_probe::allocations();
    let mut n = 0;
    for _ in 0..1000 {
        n += usize::from(e.compiled.decide(&q).would_deny.is_some());
        n += usize::from(e.compiled.decide(&q2).verdict.is_allow());
    }
    let after = alloc_probe::allocations();
    assert_eq!(n, 1000 + 1000 * usize::from(e.compiled.decide(&q2).verdict.is_allow()));
    assert_eq!(after - before, 0, "decide allocated");
}

/// A counting allocator for this test binary: counts allocations made by the current
/// thread only, so tests running in parallel do not disturb each other.
mod alloc_probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    struct Counting;

    // SAFETY: every call is forwarded unchanged to the system allocator; the counter
    // is a const-initialised thread-local `Cell`, which does not allocate.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded with the caller's pointer and layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            // SAFETY: forwarded unchanged.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// Allocations (and reallocations) made so far by the calling thread.
    pub(super) fn allocations() -> u64 {
        COUNT.with(Cell::get)
    }
}

// ---------------- decide_as (issue 7: proxy credentials) ----------------

/// A credential's workload is the flow's source: the same address decides as whichever
/// workload the credential names, `decide_as` with the address's own workload equals
/// `decide`, and an id of no workload fails closed. (A `decide_as` that ignored its
/// workload, or looked the address up instead, fails the second and third checks.)
#[test]
fn decide_as_decides_as_the_named_workload() {
    let e = engine_with(
        INV,
        &[
            np("b", "api-in", "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: y}}}]"),
            np("a", "db-out", "podSelector: {matchLabels: {app: db}}\npolicyTypes: [Egress]\negress: []"),
        ]
        .concat(),
        DefaultAction::Allow,
    );
    let c = &e.compiled;
    let id = |ns: &str, name: &str| c.find_workload(ns, name).expect("workload");
    // b/web's address to b/api:80 — allowed by b/api's ingress (team y).
    let src: IpAddr = "10.0.2.1".parse().unwrap();
    let dst: IpAddr = "10.0.2.2".parse().unwrap();
    let q = FlowQuery { src, dst, dst_port: 80, proto: Proto::Tcp, fqdn: None };
    let plain = e.query(&q);
    assert!(plain.verdict.is_allow());
    assert_eq!(c.decide_as(&q, id("b", "web")), plain);
    // The same address as a/web (team x): b/api's ingress does not admit it.
    let as_a = c.decide_as(&q, id("a", "web"));
    assert_eq!(
        deny(as_a),
        Some(DenyReason { direction: Some(Direction::Ingress), cause: Cause::NotAdmitted })
    );
    assert_eq!(as_a.src_workload, Some(id("a", "web")));
    // As a/db, whose egress is isolated with no rule: denied on the egress side.
    let as_db = c.decide_as(&q, id("a", "db"));
    assert_eq!(deny(as_db).and_then(|r| r.direction), Some(Direction::Egress));
    // An id from no compilation counts as no workload: ingress decides as for an unknown
    // source, and b/api admits team y only.
    let stale = c.decide_as(&q, crate::policy::WorkloadId(u32::MAX - 1));
    assert_eq!(stale.src_workload, None);
    assert!(!stale.verdict.is_allow());
}
