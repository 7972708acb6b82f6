//! Loader tests. Each names the naive mapping it guards against.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;
use crate::flow::Proto;
use crate::policy::ir::*;

fn policies(yaml: &str) -> Vec<Policy> {
    match parse_policies(yaml, Path::new("t.yaml")) {
        Ok(p) => p,
        Err(e) => panic!("unexpected errors: {e}"),
    }
}

fn one(yaml: &str) -> Policy {
    let mut p = policies(yaml);
    assert_eq!(p.len(), 1, "{p:?}");
    p.remove(0)
}

fn errors(yaml: &str) -> Vec<LoadError> {
    match parse_policies(yaml, Path::new("t.yaml")) {
        Ok(p) => panic!("expected errors, loaded {p:?}"),
        Err(e) => e.0,
    }
}

/// Asserts exactly one error, at `field`, whose message contains `needle`.
fn error_at(yaml: &str, field: &str, needle: &str) -> LoadError {
    let errs = errors(yaml);
    let hit = errs
        .iter()
        .find(|e| e.field.as_deref() == Some(field) && e.message.contains(needle))
        .unwrap_or_else(|| panic!("no error at {field} containing {needle:?}: {errs:#?}"));
    hit.clone()
}

fn np(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: ns\nspec:\n{}",
        indent(spec)
    )
}

fn anp(spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata:\n  name: a\nspec:\n{}",
        indent(spec)
    )
}

fn banp(spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata:\n  name: default\nspec:\n{}",
        indent(spec)
    )
}

fn cnp(spec: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: c\nspec:\n{}",
        indent(spec)
    )
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        match_expressions: vec![],
    }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

// ---------- NetworkPolicy mapping ----------

#[test]
fn np_subject_is_pod_selector_in_own_namespace() {
    let p = one(&np("podSelector: {matchLabels: {app: db}}"));
    assert_eq!(p.kind, PolicyKind::NetworkPolicy);
    assert_eq!(p.tier, Tier::Namespaced);
    assert_eq!(p.namespace.as_deref(), Some("ns"));
    assert_eq!(p.source, Path::new("t.yaml"));
    assert_eq!(
        p.subject,
        WorkloadSelector {
            namespaces: NamespaceMatch::Named("ns".into()),
            pods: sel(&[("app", "db")])
        }
    );
}

#[test]
fn np_without_policy_types_isolates_ingress_only() {
    // Naive: "no ingress rules → no ingress isolation". Kubernetes: Ingress always.
    let p = one(&np("podSelector: {}"));
    assert_eq!(p.ingress, Some(vec![]));
    assert_eq!(p.egress, None);
}

#[test]
fn np_without_policy_types_covers_egress_iff_egress_rules_exist() {
    let p = one(&np("podSelector: {}\negress: [{}]"));
    assert_eq!(p.ingress, Some(vec![]));
    assert_eq!(p.egress.as_ref().map(Vec::len), Some(1));
    // `egress: []` is the same as no egress on the wire (Kubernetes checks len > 0).
    let p = one(&np("podSelector: {}\negress: []"));
    assert_eq!(p.egress, None);
}

#[test]
fn np_policy_types_decide_directions_and_ignore_other_rules() {
    // Naive: keep the ingress rules. Kubernetes: Ingress not listed → not covered at all.
    let p = one(&np("podSelector: {}\npolicyTypes: [Egress]\ningress: [{}]"));
    assert_eq!(p.ingress, None);
    assert_eq!(p.egress, Some(vec![]), "covered egress without rules isolates");
    let p = one(&np("podSelector: {}\npolicyTypes: [Ingress, Egress]"));
    assert_eq!((p.ingress, p.egress), (Some(vec![]), Some(vec![])));
}

#[test]
fn np_empty_rule_admits_everything_but_empty_list_admits_nothing() {
    let allow_all = Rule { name: None, action: Action::Allow, peers: Peers::Any, ports: None };
    assert_eq!(one(&np("podSelector: {}\ningress: [{}]")).ingress, Some(vec![allow_all.clone()]));
    assert_eq!(one(&np("podSelector: {}\ningress: []")).ingress, Some(vec![]));
    // `from: []` is "no restriction on sources", not "no sources".
    assert_eq!(
        one(&np("podSelector: {}\ningress: [{from: [], ports: []}]")).ingress,
        Some(vec![allow_all])
    );
}

#[test]
fn np_namespace_and_pod_selector_in_one_peer_intersect() {
    let p = one(&np(
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: a}}\n    podSelector: {matchLabels: {app: x}}",
    ));
    let rule = &p.ingress.unwrap()[0];
    assert_eq!(
        rule.peers,
        Peers::List(vec![Peer::Workloads(WorkloadSelector {
            namespaces: NamespaceMatch::Selector(sel(&[("team", "a")])),
            pods: sel(&[("app", "x")]),
        })])
    );
    // Two list items are two peers (a union), with the bare podSelector in the policy's namespace.
    let p = one(&np(
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: a}}\n  - podSelector: {matchLabels: {app: x}}",
    ));
    assert_eq!(
        p.ingress.unwrap()[0].peers,
        Peers::List(vec![
            Peer::Workloads(WorkloadSelector {
                namespaces: NamespaceMatch::Selector(sel(&[("team", "a")])),
                pods: LabelSelector::default(),
            }),
            Peer::Workloads(WorkloadSelector {
                namespaces: NamespaceMatch::Named("ns".into()),
                pods: sel(&[("app", "x")]),
            }),
        ])
    );
}

#[test]
fn np_ip_block_maps_to_cidr_v4_and_v6() {
    let p = one(&np(
        "podSelector: {}\negress:\n- to:\n  - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}\n  - ipBlock: {cidr: 'fd00::/8'}",
    ));
    assert_eq!(
        p.egress.unwrap()[0].peers,
        Peers::List(vec![
            Peer::Cidr { net: net("10.0.0.0/8"), except: vec![net("10.1.0.0/16")] },
            Peer::Cidr { net: net("fd00::/8"), except: vec![] },
        ])
    );
}

#[test]
fn np_ports_default_tcp_names_ranges_and_protocol_only() {
    let p = one(&np(
        "podSelector: {}\ningress:\n- ports:\n  - port: 80\n  - {protocol: UDP, port: dns}\n  - {port: 8000, endPort: 8080}\n  - protocol: SCTP",
    ));
    assert_eq!(
        p.ingress.unwrap()[0].ports,
        Some(vec![
            PortMatch::Range { protocol: Proto::Tcp, first: 80, last: 80 },
            PortMatch::Named { protocol: Some(Proto::Udp), name: "dns".into() },
            PortMatch::Range { protocol: Proto::Tcp, first: 8000, last: 8080 },
            PortMatch::Range { protocol: Proto::Sctp, first: 0, last: 65535 },
        ])
    );
}

#[test]
fn np_namespace_defaults_to_default() {
    let p = one(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: {}}",
    );
    assert_eq!(p.namespace.as_deref(), Some("default"));
    assert_eq!(p.subject.namespaces, NamespaceMatch::Named("default".into()));
}

#[test]
fn np_standard_metadata_accepted_and_status_ignored() {
    let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  uid: 1234\n  resourceVersion: '7'\n  generation: 3\n  managedFields: [{manager: kubectl}]\n  labels: {team: a}\nspec: {podSelector: {}}\nstatus: {anything: goes}";
    one(yaml);
}

// ---------- annotations ----------

#[test]
fn annotations_map_to_expiry_mode_and_created_at() {
    let meta = |ann: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  creationTimestamp: '2026-01-01T00:00:00Z'\n  annotations: {{{ann}}}\nspec: {{podSelector: {{}}}}"
        )
    };
    let p = one(&meta("flowgate.dev/ttl: 15m, flowgate.dev/mode: audit"));
    assert_eq!(p.expiry, Some(Expiry::Ttl(Duration::from_secs(900))));
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(p.created_at, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)));
    // Any offset: 01:00+01:00 is midnight UTC.
    let p = one(&meta("flowgate.dev/expires-at: '2026-01-01T01:00:00+01:00'"));
    assert_eq!(
        p.expiry,
        Some(Expiry::At(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)))
    );
    assert_eq!(p.mode, Mode::Enforce);
    // Someone else's annotations are none of our business.
    assert_eq!(one(&meta("example.com/owner: me")).expiry, None);
}

#[test]
fn malformed_annotations_are_errors() {
    let meta = |ann: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  annotations: {{{ann}}}\nspec: {{podSelector: {{}}}}"
        )
    };
    error_at(&meta("flowgate.dev/ttl: soon"), "metadata.annotations.flowgate.dev/ttl", "duration");
    error_at(&meta("flowgate.dev/ttl: 0s"), "metadata.annotations.flowgate.dev/ttl", "zero");
    error_at(
        &meta("flowgate.dev/expires-at: tomorrow"),
        "metadata.annotations.flowgate.dev/expires-at",
        "RFC 3339",
    );
    error_at(
        &meta("flowgate.dev/mode: enforcing"),
        "metadata.annotations.flowgate.dev/mode",
        "audit or enforce",
    );
    error_at(
        &meta("flowgate.dev/ttl: 1h, flowgate.dev/expires-at: '2026-01-01T00:00:00Z'"),
        "metadata.annotations",
        "both",
    );
    // A misspelt annotation would silently leave an emergency policy in force for ever.
    error_at(
        &meta("flowgate.dev/tll: 1h"),
        "metadata.annotations.flowgate.dev/tll",
        "unknown flowgate annotation",
    );
}

// ---------- NetworkPolicy errors ----------

#[test]
fn malformed_yaml_is_an_error_naming_the_file() {
    let errs = errors("apiVersion: networking.k8s.io/v1\nkind: [unclosed\n");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].file, Path::new("t.yaml"));
    assert!(errs[0].message.contains("malformed YAML"), "{}", errs[0]);
}

#[test]
fn unknown_kind_and_api_version_are_errors() {
    let e = error_at(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
        "kind",
        "unknown kind \"Pod\"",
    );
    assert_eq!(e.object.as_deref(), Some("Pod x"));
    error_at(
        "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec: {}",
        "apiVersion",
        "networking.k8s.io/v1",
    );
    error_at("metadata: {name: x}\n", "kind", "missing");
    let errs = errors("- just\n- a list\n");
    assert!(errs[0].message.contains("expected a Kubernetes object"));
}

#[test]
fn unknown_fields_are_errors_with_their_path() {
    let e = error_at(
        &np("podSelector: {}\ningress:\n- from:\n  - podSelectr: {}"),
        "spec.ingress[0].from[0].podSelectr",
        "unknown field `podSelectr`",
    );
    assert_eq!(e.object.as_deref(), Some("NetworkPolicy ns/p"));
    error_at(&np("podSelector: {}\nfoo: 1"), "spec.foo", "unknown field `foo`");
    error_at(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, nmespace: x}\nspec: {}",
        "metadata.nmespace",
        "unknown field",
    );
}

#[test]
fn invalid_cidrs_are_errors() {
    let e = error_at(
        &np(
            "podSelector: {}\ningress:\n- from:\n  - podSelector: {}\n  - ipBlock: {cidr: 10.0.0.300/8}",
        ),
        "spec.ingress[0].from[1].ipBlock.cidr",
        "not a valid CIDR",
    );
    assert_eq!(
        e.to_string(),
        format!("t.yaml: NetworkPolicy ns/p: spec.ingress[0].from[1].ipBlock.cidr: {}", e.message)
    );
    // Host bits set: Kubernetes refuses it; silently using 10.0.0.0/8 would widen the rule.
    error_at(
        &np("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.1/8}"),
        "spec.ingress[0].from[0].ipBlock.cidr",
        "host bits",
    );
    error_at(
        &np("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.1}"),
        "spec.ingress[0].from[0].ipBlock.cidr",
        "not a CIDR",
    );
}

#[test]
fn except_must_be_strictly_inside_cidr_and_same_family() {
    let y = |except: &str| {
        np(&format!(
            "podSelector: {{}}\ningress:\n- from:\n  - ipBlock: {{cidr: 10.0.0.0/16, except: [10.0.1.0/24, {except}]}}"
        ))
    };
    error_at(&y("10.1.0.0/24"), "spec.ingress[0].from[0].ipBlock.except[1]", "not strictly inside");
    error_at(&y("10.0.0.0/16"), "spec.ingress[0].from[0].ipBlock.except[1]", "not strictly inside");
    error_at(&y("10.0.0.0/8"), "spec.ingress[0].from[0].ipBlock.except[1]", "not strictly inside");
    error_at(&y("'fd00::/64'"), "spec.ingress[0].from[0].ipBlock.except[1]", "family");
}

#[test]
fn end_port_rules() {
    error_at(
        &np("podSelector: {}\ningress:\n- ports: [{port: 90, endPort: 80}]"),
        "spec.ingress[0].ports[0].endPort",
        "below port 90",
    );
    error_at(
        &np("podSelector: {}\ningress:\n- ports: [{port: http, endPort: 80}]"),
        "spec.ingress[0].ports[0].endPort",
        "named port",
    );
    error_at(
        &np("podSelector: {}\ningress:\n- ports: [{endPort: 80}]"),
        "spec.ingress[0].ports[0].endPort",
        "numeric port",
    );
    error_at(
        &np("podSelector: {}\ningress:\n- ports: [{port: 0}]"),
        "spec.ingress[0].ports[0].port",
        "out of range",
    );
    error_at(
        &np("podSelector: {}\ningress:\n- ports: [{port: 70000}]"),
        "spec.ingress[0].ports[0].port",
        "out of range",
    );
    error_at(
        &np("podSelector: {}\ningress:\n- ports: [{port: Bad_Name}]"),
        "spec.ingress[0].ports[0].port",
        "port name",
    );
}

#[test]
fn selector_operator_rules() {
    let y = |expr: &str| np(&format!("podSelector:\n  matchExpressions: [{expr}]"));
    error_at(
        &y("{key: app, operator: Equals, values: [a]}"),
        "spec.podSelector.matchExpressions[0].operator",
        "unknown selector operator",
    );
    error_at(
        &y("{key: app, operator: In}"),
        "spec.podSelector.matchExpressions[0].values",
        "at least one value",
    );
    error_at(
        &y("{key: app, operator: NotIn, values: []}"),
        "spec.podSelector.matchExpressions[0].values",
        "at least one value",
    );
    error_at(
        &y("{key: app, operator: Exists, values: [a]}"),
        "spec.podSelector.matchExpressions[0].values",
        "no values",
    );
    error_at(
        &y("{key: 'bad key', operator: Exists}"),
        "spec.podSelector.matchExpressions[0].key",
        "label key",
    );
    let p = one(&y("{key: app, operator: NotIn, values: [a, b]}"));
    assert_eq!(
        p.subject.pods.match_expressions,
        vec![Requirement {
            key: "app".into(),
            op: SelectorOp::NotIn,
            values: vec!["a".into(), "b".into()]
        }]
    );
}

#[test]
fn unknown_protocol_is_an_error() {
    error_at(
        &np("podSelector: {}\ningress:\n- ports: [{protocol: tcp, port: 80}]"),
        "spec.ingress[0].ports[0].protocol",
        "unknown protocol",
    );
    error_at(
        &np("podSelector: {}\ningress:\n- ports: [{protocol: ICMP}]"),
        "spec.ingress[0].ports[0].protocol",
        "unknown protocol",
    );
}

#[test]
fn peers_must_be_non_empty_and_ip_block_alone() {
    error_at(
        &np("podSelector: {}\ningress:\n- from: [{}]"),
        "spec.ingress[0].from[0]",
        "empty peer",
    );
    error_at(
        &np("podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]"),
        "spec.ingress[0].from[0]",
        "cannot be combined",
    );
}

#[test]
fn bad_policy_types_and_names() {
    error_at(
        &np("podSelector: {}\npolicyTypes: [ingress]"),
        "spec.policyTypes[0]",
        "unknown policy type",
    );
    error_at(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: Bad_Name}\nspec: {}",
        "metadata.name",
        "not a valid name",
    );
    error_at(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: {}",
        "metadata.name",
        "missing",
    );
}

#[test]
fn all_errors_of_all_documents_are_collected_and_nothing_partial_is_returned() {
    let yaml = format!(
        "{}\n---\n{}\n---\n{}",
        np("podSelector: {}"), // fine
        np(
            "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: nope}}]\n  ports: [{protocol: XTP}]"
        ),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
    );
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs.iter().any(|e| e.field.as_deref() == Some("spec.ingress[0].from[0].ipBlock.cidr"))
    );
    assert!(errs.iter().any(|e| e.field.as_deref() == Some("spec.ingress[0].ports[0].protocol")));
    assert!(errs.iter().any(|e| e.object.as_deref() == Some("Service s")));
}

#[test]
fn lists_and_empty_documents() {
    let yaml = "---\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: a}\n  spec: {podSelector: {}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicyList\nitems:\n- metadata: {name: b}\n  spec: {podSelector: {}}\n---\n";
    let names: Vec<_> = policies(yaml).into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["a", "b"]);
    let errs = errors(
        "apiVersion: v1\nkind: List\nitems:\n- {kind: Pod, apiVersion: v1, metadata: {name: x}}\n",
    );
    assert_eq!(errs[0].object.as_deref(), Some("Pod x"));
}

#[test]
fn nothing_panics_on_odd_documents() {
    for yaml in [
        "",
        "---",
        "42",
        "null",
        "[]",
        "kind: 3",
        "kind: NetworkPolicy\napiVersion: 7",
        "kind: List\napiVersion: v1\nitems: 5",
        "kind: NetworkPolicyList\napiVersion: networking.k8s.io/v1\nitems: [1, null]",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: 5\nspec: []",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {ingress: [{ports: [{port: 1.5}]}]}",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {ingress: [{ports: [{port: 99999999999999999999}]}]}",
        "a: &a [*a]",
        "\t\u{0}",
        "!!binary x",
    ] {
        let _ = parse_policies(yaml, Path::new("t.yaml"));
        let _ = parse_inventory(yaml, Path::new("i.yaml"));
    }
}

// ---------- AdminNetworkPolicy / BaselineAdminNetworkPolicy / ClusterNetworkPolicy ----------

#[test]
fn anp_maps_subject_rules_peers_and_ports() {
    let p = one(&anp("priority: 10
subject:
  pods:
    namespaceSelector: {matchLabels: {team: a}}
    podSelector: {matchLabels: {app: x}}
ingress:
- name: from-monitoring
  action: Allow
  from:
  - namespaces: {matchLabels: {team: mon}}
  ports:
  - portNumber: {protocol: TCP, port: 9090}
  - namedPort: metrics
  - portRange: {protocol: UDP, start: 1000, end: 2000}
egress:
- name: pass-dns
  action: Pass
  to:
  - pods:
      namespaceSelector: {}
      podSelector: {matchLabels: {app: dns}}
- name: web
  action: Allow
  to:
  - domainNames: [API.Example.com., '*.example.org']
  - networks: [203.0.113.0/24]"));
    assert_eq!(p.kind, PolicyKind::AdminNetworkPolicy);
    assert_eq!(p.tier, Tier::Admin { priority: 10 });
    assert_eq!(p.namespace, None);
    assert_eq!(
        p.subject,
        WorkloadSelector {
            namespaces: NamespaceMatch::Selector(sel(&[("team", "a")])),
            pods: sel(&[("app", "x")])
        }
    );
    let ingress = p.ingress.unwrap();
    assert_eq!(ingress[0].name.as_deref(), Some("from-monitoring"));
    assert_eq!(
        ingress[0].peers,
        Peers::List(vec![Peer::Workloads(WorkloadSelector {
            namespaces: NamespaceMatch::Selector(sel(&[("team", "mon")])),
            pods: LabelSelector::default(),
        })])
    );
    assert_eq!(
        ingress[0].ports,
        Some(vec![
            PortMatch::Range { protocol: Proto::Tcp, first: 9090, last: 9090 },
            PortMatch::Named { protocol: None, name: "metrics".into() },
            PortMatch::Range { protocol: Proto::Udp, first: 1000, last: 2000 },
        ])
    );
    let egress = p.egress.unwrap();
    assert_eq!(egress[0].action, Action::Pass);
    assert_eq!(egress[0].ports, None);
    assert_eq!(
        egress[1].peers,
        Peers::List(vec![
            Peer::Domain(DomainPattern::Exact("api.example.com".into())),
            Peer::Domain(DomainPattern::Wildcard("example.org".into())),
            Peer::Cidr { net: net("203.0.113.0/24"), except: vec![] },
        ])
    );
}

#[test]
fn anp_subject_namespaces_and_absent_directions() {
    let p = one(&anp("priority: 0\nsubject: {namespaces: {}}"));
    assert_eq!(
        p.subject,
        WorkloadSelector {
            namespaces: NamespaceMatch::Selector(LabelSelector::default()),
            pods: LabelSelector::default()
        }
    );
    assert_eq!((p.ingress, p.egress), (None, None));
    // An explicit empty list covers the direction with no rules (nothing to match).
    assert_eq!(
        one(&anp("priority: 0\nsubject: {namespaces: {}}\negress: []")).egress,
        Some(vec![])
    );
}

#[test]
fn banp_and_cnp_tiers() {
    let p = one(&banp(
        "subject: {namespaces: {}}\ningress:\n- {action: Deny, from: [{namespaces: {}}]}",
    ));
    assert_eq!(p.tier, Tier::Baseline { priority: 0 });
    assert_eq!(p.kind, PolicyKind::BaselineAdminNetworkPolicy);
    assert_eq!(p.ingress.unwrap()[0].action, Action::Deny);

    let p = one(&cnp("tier: Baseline\npriority: 7\nsubject: {namespaces: {}}
egress:
- name: ok
  action: Accept
  to: [{namespaces: {}}]
  protocols:
  - tcp: {destinationPort: {number: 443}}
  - udp: {destinationPort: {range: {start: 53, end: 54}}}
  - sctp: {}
  - destinationNamedPort: dns"));
    assert_eq!(p.kind, PolicyKind::ClusterNetworkPolicy);
    assert_eq!(p.tier, Tier::Baseline { priority: 7 });
    let rule = &p.egress.unwrap()[0];
    assert_eq!(rule.action, Action::Allow);
    assert_eq!(
        rule.ports,
        Some(vec![
            PortMatch::Range { protocol: Proto::Tcp, first: 443, last: 443 },
            PortMatch::Range { protocol: Proto::Udp, first: 53, last: 54 },
            PortMatch::Range { protocol: Proto::Sctp, first: 0, last: 65535 },
            PortMatch::Named { protocol: None, name: "dns".into() },
        ])
    );
    assert_eq!(
        one(&cnp("tier: Admin\npriority: 3\nsubject: {namespaces: {}}")).tier,
        Tier::Admin { priority: 3 }
    );
    error_at(
        &cnp(
            "tier: Admin\npriority: 3\nsubject: {namespaces: {}}\ningress: [{action: Allow, from: [{namespaces: {}}]}]",
        ),
        "spec.ingress[0].action",
        "Accept",
    );
    error_at(
        &cnp("tier: Middle\npriority: 3\nsubject: {namespaces: {}}"),
        "spec.tier",
        "unknown tier",
    );
}

#[test]
fn anp_priority_range() {
    error_at(&anp("priority: 1001\nsubject: {namespaces: {}}"), "spec.priority", "out of range");
    error_at(&anp("priority: -1\nsubject: {namespaces: {}}"), "spec.priority", "out of range");
    error_at(&anp("subject: {namespaces: {}}"), "spec.priority", "missing");
    assert_eq!(
        one(&anp("priority: 1000\nsubject: {namespaces: {}}")).tier,
        Tier::Admin { priority: 1000 }
    );
    error_at(&banp("priority: 3\nsubject: {namespaces: {}}"), "spec.priority", "no priority");
}

#[test]
fn anp_actions() {
    error_at(
        &anp(
            "priority: 1\nsubject: {namespaces: {}}\ningress: [{action: Drop, from: [{namespaces: {}}]}]",
        ),
        "spec.ingress[0].action",
        "unknown action \"Drop\"",
    );
    // Pass in a BANP: there is no tier below the baseline to pass to.
    error_at(
        &banp("subject: {namespaces: {}}\negress: [{action: Pass, to: [{namespaces: {}}]}]"),
        "spec.egress[0].action",
        "Pass is not allowed",
    );
}

#[test]
fn domain_names_only_in_egress_allow_rules() {
    error_at(
        &anp(
            "priority: 1\nsubject: {namespaces: {}}\ningress: [{action: Allow, from: [{domainNames: [a.example.com]}]}]",
        ),
        "spec.ingress[0].from[0].domainNames",
        "only allowed in egress",
    );
    for action in ["Deny", "Pass"] {
        error_at(
            &anp(&format!(
                "priority: 1\nsubject: {{namespaces: {{}}}}\negress: [{{action: {action}, to: [{{domainNames: [a.example.com]}}]}}]"
            )),
            "spec.egress[0].to[0].domainNames",
            "only allowed in Allow",
        );
    }
}

#[test]
fn domain_name_syntax() {
    assert_eq!(admin::domain("Api.Stripe.COM."), Ok(DomainPattern::Exact("api.stripe.com".into())));
    assert_eq!(
        admin::domain("*.amazonaws.com"),
        Ok(DomainPattern::Wildcard("amazonaws.com".into()))
    );
    for bad in [
        "*",
        "*.com",
        "a.*.com",
        "foo*.example.com",
        "example",
        "-a.example.com",
        "a..b",
        "",
        "exa mple.com",
        "*.*.example.com",
    ] {
        assert!(admin::domain(bad).is_err(), "{bad} should be rejected");
    }
    error_at(
        &anp(
            "priority: 1\nsubject: {namespaces: {}}\negress: [{action: Allow, to: [{domainNames: ['a.*.com']}]}]",
        ),
        "spec.egress[0].to[0].domainNames[0]",
        "not a valid domain",
    );
}

#[test]
fn more_than_100_rules_is_an_error() {
    let rules: String = (0..101)
        .map(|i| format!("- {{name: r{i}, action: Deny, to: [{{namespaces: {{}}}}]}}\n"))
        .collect();
    error_at(
        &anp(&format!("priority: 1\nsubject: {{namespaces: {{}}}}\negress:\n{rules}")),
        "spec.egress",
        "at most 100",
    );
    let rules: String = (0..100)
        .map(|i| format!("- {{name: r{i}, action: Deny, to: [{{namespaces: {{}}}}]}}\n"))
        .collect();
    one(&anp(&format!("priority: 1\nsubject: {{namespaces: {{}}}}\negress:\n{rules}")));
}

#[test]
fn admin_peer_and_port_shape_errors() {
    let y =
        |rule: &str| anp(&format!("priority: 1\nsubject: {{namespaces: {{}}}}\negress: [{rule}]"));
    error_at(&y("{action: Deny, to: [{nodes: {}}]}"), "spec.egress[0].to[0].nodes", "no nodes");
    error_at(&y("{action: Deny, to: []}"), "spec.egress[0].to", "at least one peer");
    error_at(
        &y("{action: Deny, to: [{namespaces: {}, networks: [10.0.0.0/8]}]}"),
        "spec.egress[0].to[0]",
        "exactly one",
    );
    error_at(
        &y("{action: Deny, to: [{networks: [10.0.0.1/8]}]}"),
        "spec.egress[0].to[0].networks[0]",
        "host bits",
    );
    error_at(
        &y("{action: Deny, to: [{namespaces: {}}], ports: [{portRange: {start: 9, end: 8}}]}"),
        "spec.egress[0].ports[0].portRange.end",
        "below start",
    );
    error_at(
        &y(
            "{action: Deny, to: [{namespaces: {}}], ports: [{portNumber: {port: 80}, namedPort: http}]}",
        ),
        "spec.egress[0].ports[0]",
        "exactly one",
    );
    error_at(
        &y("{action: Deny, to: [{networks: [10.0.0.0/8]}], ports: [{namedPort: http}]}"),
        "spec.egress[0].to[0].networks",
        "named port",
    );
    error_at(
        &anp(
            "priority: 1\nsubject: {namespaces: {}, pods: {namespaceSelector: {}, podSelector: {}}}",
        ),
        "spec.subject",
        "exactly one",
    );
    error_at(&anp("priority: 1\nsubject: {}"), "spec.subject", "exactly one");
}

// ---------- API server defaulting: one test per rule, each citing it ----------
//
// flowgate reads each object as the API server stores it after defaulting, so that a
// policy means in flowgate what it means in a cluster. The rules, and where they are:
// - NetworkPolicy `policyTypes`: `SetDefaults_NetworkPolicy`, kubernetes
//   `pkg/apis/networking/v1/defaults.go` (`if len(obj.Spec.PolicyTypes) == 0 { [Ingress]
//   + Egress if len(obj.Spec.Egress) != 0 }`);
// - NetworkPolicy port `protocol`: `SetDefaults_NetworkPolicyPort`, same file ("Default
//   any undefined Protocol fields to TCP");
// - AdminNetworkPolicy / BaselineAdminNetworkPolicy `portNumber.protocol` and
//   `portRange.protocol`: `+kubebuilder:default=TCP`, kubernetes-sigs/network-policy-api
//   `apis/v1alpha1/shared_types.go` (`Port`, `PortRange`);
// - ClusterNetworkPolicy `pods.namespaceSelector`: `+optional` (the CRD requires only
//   `podSelector`), the Go zero value being the empty selector that "selects all
//   Namespaces", network-policy-api `apis/v1alpha2/clusternetworkpolicy_types.go`
//   (`NamespacedPod`); in v1alpha1 it is required.

/// `SetDefaults_NetworkPolicy`: `len(PolicyTypes) == 0` holds for `[]` and `null` as for
/// an absent key, so all three get `[Ingress]` (issue 27: `[]` used to cover nothing).
#[test]
fn default_np_empty_policy_types_is_absent_policy_types() {
    let absent = one(&np("podSelector: {}"));
    assert_eq!((absent.ingress.clone(), absent.egress.clone()), (Some(vec![]), None));
    for spelling in ["policyTypes: []", "policyTypes: null", "policyTypes:"] {
        let p = one(&np(&format!("podSelector: {{}}\n{spelling}")));
        assert_eq!((&p.ingress, &p.egress), (&absent.ingress, &absent.egress), "{spelling}");
    }
    // ... and the reverse case of the issue: `[]` with an open rule admits.
    let allow_all = Rule { name: None, action: Action::Allow, peers: Peers::Any, ports: None };
    let p = one(&np("podSelector: {}\npolicyTypes: []\ningress: [{}]"));
    assert_eq!((p.ingress, p.egress), (Some(vec![allow_all]), None));
}

/// `SetDefaults_NetworkPolicy`: with `len(Egress) != 0` the default is `[Ingress,
/// Egress]`, for an empty `policyTypes` exactly as for an absent one; `egress: []` has
/// length 0 and adds nothing.
#[test]
fn default_np_empty_policy_types_adds_egress_iff_egress_rules() {
    let p = one(&np("podSelector: {}\npolicyTypes: []\negress: [{}]"));
    assert_eq!(p.ingress, Some(vec![]));
    assert_eq!(p.egress.as_ref().map(Vec::len), Some(1));
    let p = one(&np("podSelector: {}\npolicyTypes: []\negress: []"));
    assert_eq!((p.ingress, p.egress), (Some(vec![]), None));
    // A non-empty list is not defaulted: it alone decides.
    let p = one(&np("podSelector: {}\npolicyTypes: [Ingress]\negress: [{}]"));
    assert_eq!((p.ingress, p.egress), (Some(vec![]), None));
}

/// `SetDefaults_NetworkPolicyPort`: `if obj.Protocol == nil { TCP }`, for a numbered,
/// a ranged, a named and a port-less entry alike.
#[test]
fn default_np_port_protocol_is_tcp() {
    let p = one(&np(
        "podSelector: {}\ningress:\n- ports: [{port: 80}, {port: 90, endPort: 99}, {port: http}, {}]",
    ));
    assert_eq!(
        p.ingress.unwrap()[0].ports,
        Some(vec![
            PortMatch::Range { protocol: Proto::Tcp, first: 80, last: 80 },
            PortMatch::Range { protocol: Proto::Tcp, first: 90, last: 99 },
            PortMatch::Named { protocol: Some(Proto::Tcp), name: "http".into() },
            PortMatch::Range { protocol: Proto::Tcp, first: 0, last: 65535 },
        ])
    );
}

/// network-policy-api v1alpha1 `Port.Protocol` and `PortRange.Protocol`:
/// `+kubebuilder:default=TCP`, in AdminNetworkPolicy and BaselineAdminNetworkPolicy.
#[test]
fn default_admin_port_protocol_is_tcp() {
    let rule = "ingress:\n- action: Deny\n  from: [{namespaces: {}}]\n  ports: [{portNumber: {port: 80}}, {portRange: {start: 1000, end: 2000}}]";
    let expect = Some(vec![
        PortMatch::Range { protocol: Proto::Tcp, first: 80, last: 80 },
        PortMatch::Range { protocol: Proto::Tcp, first: 1000, last: 2000 },
    ]);
    let p = one(&anp(&format!("priority: 1\nsubject: {{namespaces: {{}}}}\n{rule}")));
    assert_eq!(p.ingress.unwrap()[0].ports, expect, "AdminNetworkPolicy");
    let p = one(&banp(&format!("subject: {{namespaces: {{}}}}\n{rule}")));
    assert_eq!(p.ingress.unwrap()[0].ports, expect, "BaselineAdminNetworkPolicy");
}

/// network-policy-api v1alpha2 `NamespacedPod.NamespaceSelector` is `+optional` (CRD:
/// `required: [podSelector]`); absent it is the empty selector, "selects all
/// Namespaces". In v1alpha1 the field is required, and flowgate says so.
#[test]
fn default_cnp_pods_namespace_selector_is_every_namespace() {
    let p = one(&cnp("tier: Admin
priority: 1
subject: {pods: {podSelector: {matchLabels: {app: web}}}}
ingress:
- action: Deny
  from: [{pods: {podSelector: {matchLabels: {app: db}}}}]
egress:
- action: Deny
  to: [{pods: {podSelector: {}}}]"));
    let every_ns = |pods| WorkloadSelector {
        namespaces: NamespaceMatch::Selector(LabelSelector::default()),
        pods,
    };
    assert_eq!(p.subject, every_ns(sel(&[("app", "web")])));
    let peers = |rules: Option<Vec<Rule>>| rules.unwrap().remove(0).peers;
    assert_eq!(
        peers(p.ingress),
        Peers::List(vec![Peer::Workloads(every_ns(sel(&[("app", "db")])))])
    );
    assert_eq!(peers(p.egress), Peers::List(vec![Peer::Workloads(every_ns(sel(&[])))]));

    error_at(
        &anp("priority: 1\nsubject: {pods: {podSelector: {}}}"),
        "spec.subject.pods.namespaceSelector",
        "missing",
    );
    error_at(
        &banp(
            "subject: {namespaces: {}}\negress: [{action: Deny, to: [{pods: {podSelector: {}}}]}]",
        ),
        "spec.egress[0].to[0].pods.namespaceSelector",
        "missing",
    );
}

// ---------- spellings that differ from their meaning (for `flowgate check`) ----------

fn spelled(yaml: &str) -> Vec<(String, String, String)> {
    spellings(yaml).into_iter().map(|s| (s.object, s.field, s.message)).collect()
}

#[test]
fn spelling_empty_policy_types_says_how_it_is_read() {
    let s = spelled(&np("podSelector: {}\npolicyTypes: []"));
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!((s[0].0.as_str(), s[0].1.as_str()), ("NetworkPolicy ns/p", "spec.policyTypes"));
    assert!(s[0].2.contains("read as [Ingress]"), "{s:?}");
    let s = spelled(&np("podSelector: {}\npolicyTypes: []\negress: [{}]"));
    assert!(s[0].2.contains("read as [Ingress, Egress]"), "{s:?}");
    // Absent, or any non-empty list, reads as it looks.
    for spec in [
        "podSelector: {}",
        "podSelector: {}\npolicyTypes: [Egress]",
        "podSelector: {}\npolicyTypes: [Ingress, Egress]\negress: []",
    ] {
        assert_eq!(spelled(&np(spec)), vec![], "{spec}");
    }
}

#[test]
fn spelling_empty_egress_and_empty_peer_lists() {
    let s = spelled(&np("podSelector: {}\negress: []"));
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].1, "spec.egress");
    assert!(s[0].2.contains("egress is not isolated"), "{s:?}");
    let s = spelled(&np("podSelector: {}\ningress: [{}, {from: []}]\negress: [{to: []}]"));
    let fields: Vec<&str> = s.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(fields, ["spec.ingress[1].from", "spec.egress[0].to"], "{s:?}");
    assert!(s[0].2.contains("admits every source"), "{s:?}");
    assert!(s[1].2.contains("admits every destination"), "{s:?}");
}

#[test]
fn spellings_are_found_in_lists_and_skip_what_does_not_load() {
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: d}\n  spec: {podSelector: {}, policyTypes: []}\n";
    let s = spelled(list);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].0, "NetworkPolicy default/d", "namespace defaulted as the load does");
    let typed = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicyList\nitems:\n- metadata: {name: t, namespace: q}\n  spec: {podSelector: {}, policyTypes: []}\n";
    assert_eq!(spelled(typed)[0].0, "NetworkPolicy q/t");
    assert_eq!(spelled(&np("podSelector: {}\npolicyTypes: []\nbogus: 1")), vec![]);
    assert_eq!(spelled("{[: not yaml"), vec![]);
}

// ---------- inventory ----------

fn inventory(yaml: &str) -> Result<Inventory, Vec<LoadError>> {
    parse_inventory(yaml, Path::new("inv.yaml")).map_err(|e| e.0)
}

fn inv_error(yaml: &str, field: &str, needle: &str) {
    let errs = inventory(yaml).expect_err("expected errors");
    assert!(
        errs.iter().any(|e| e.field.as_deref() == Some(field) && e.message.contains(needle)),
        "no error at {field} containing {needle:?}: {errs:#?}"
    );
}

const INV: &str = "namespaces:
- name: payments
  labels: {team: payments}
- name: data
workloads:
- name: billing
  namespace: payments
  labels: {app: billing}
  ips: [198.18.10.0/24, 198.18.99.7, '2001:db8::1']
  ports:
  - {name: https, port: 8443}
  - {name: dns, port: 53, protocol: UDP}
- name: db
  namespace: data
  ips: [198.18.10.5]
";

#[test]
fn inventory_maps_namespaces_workloads_addresses_and_ports() {
    let inv = match inventory(INV) {
        Ok(i) => i,
        Err(e) => panic!("{e:#?}"),
    };
    assert_eq!(
        inv.namespaces[0].labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
        Some("payments")
    );
    assert_eq!(inv.namespaces[0].labels.get("team").map(String::as_str), Some("payments"));
    assert_eq!(inv.namespaces[1].labels.len(), 1);
    let w = &inv.workloads[0];
    assert_eq!(w.addrs, vec![net("198.18.10.0/24"), net("198.18.99.7/32"), net("2001:db8::1/128")]);
    assert_eq!(
        w.ports,
        vec![
            NamedPort { name: "https".into(), port: 8443, protocol: Proto::Tcp },
            NamedPort { name: "dns".into(), port: 53, protocol: Proto::Udp },
        ]
    );
    // 198.18.10.5 lies inside billing's /24: overlapping but different is fine (LPM).
    assert_eq!(inv.workloads[1].addrs, vec![net("198.18.10.5/32")]);
}

#[test]
fn inventory_errors() {
    inv_error(
        "namespaces: []\nworkloads: [{name: w, namespace: nope}]",
        "workloads[0].namespace",
        "not declared",
    );
    inv_error(
        "namespaces: [{name: a}]\nworkloads: [{name: w, namespace: a}, {name: w, namespace: a}]",
        "workloads[1].name",
        "declared twice",
    );
    // The same address as a bare IP and as a /32 is the same network.
    inv_error(
        "namespaces: [{name: a}]\nworkloads: [{name: w, namespace: a, ips: [10.0.0.1]}, {name: v, namespace: a, ips: [10.0.0.1/32]}]",
        "workloads[1].ips[0]",
        "already owned by a/w",
    );
    inv_error(
        "namespaces: [{name: a}]\nworkloads: [{name: w, namespace: a, ips: [10.0.0.1/8]}]",
        "workloads[0].ips[0]",
        "host bits",
    );
    inv_error(
        "namespaces: [{name: a}]\nworkloads: [{name: w, namespace: a, ips: [10.0.0.256]}]",
        "workloads[0].ips[0]",
        "not an IP",
    );
    inv_error(
        "namespaces: [{name: a, labels: {'bad key!': x}}]",
        "namespaces[0].labels.bad key!",
        "label key",
    );
    inv_error(
        "namespaces: [{name: a}]\nworkloads: [{name: w, namespace: a, labels: {app: 'no spaces'}}]",
        "workloads[0].labels.app",
        "label value",
    );
    inv_error(
        "namespaces: [{name: a}]\nworkloads: [{name: w, namespace: a, ports: [{name: http, port: 0}]}]",
        "workloads[0].ports[0].port",
        "out of range",
    );
    inv_error(
        "namespaces: [{name: a}]\nworkloads: [{name: w, namespace: a, ports: [{name: http, port: 80, protocol: HTTP}]}]",
        "workloads[0].ports[0].protocol",
        "unknown protocol",
    );
    inv_error(
        "namespaces: [{name: a}]\nworkloads: [{name: w, namespace: a, ports: [{name: HTTP, port: 80}]}]",
        "workloads[0].ports[0].name",
        "port name",
    );
    inv_error(
        "namespaces: [{name: a, lables: {}}]",
        "namespaces[0].lables",
        "unknown field `lables`",
    );
    inv_error("namespaces: [{name: a}, {name: a}]", "namespaces[1].name", "declared twice");
    inv_error(
        "namespaces: [{name: a, labels: {kubernetes.io/metadata.name: b}}]",
        "namespaces[0].labels.kubernetes.io/metadata.name",
        "must equal",
    );
    let errs = inventory("namespaces: [{name: a\n").expect_err("malformed");
    assert!(errs[0].message.contains("malformed YAML"));
}

// ---------- directory ----------

#[test]
fn directory_walk_is_recursive_sorted_and_skips_leftovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let write = |rel: &str, name: &str| {
        let path = d.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let body = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}}}\nspec: {{}}\n"
        );
        std::fs::write(path, body).expect("write");
    };
    write("b.yaml", "b");
    write("a/z.yml", "z");
    write("a/a.yaml", "a");
    for leftover in
        [".hidden.yaml", ".#lock.yaml", "b.yaml~", "c.yaml.swp", "notes.txt", ".git/x.yaml"]
    {
        std::fs::create_dir_all(d.join(".git")).expect("mkdir");
        std::fs::write(d.join(leftover), "this: [is not valid").expect("write");
    }
    let names: Vec<_> = match load_policies(d) {
        Ok(p) => p.into_iter().map(|p| p.name).collect(),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(names, ["a", "z", "b"]);
    let missing = load_policies(&d.join("nope")).expect_err("missing dir");
    assert!(missing.0[0].message.contains("cannot read"));
}

#[test]
fn load_collects_inventory_and_policy_errors_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("p")).expect("mkdir");
    std::fs::write(d.join("inv.yaml"), "namespaces: []\nworkloads: [{name: w, namespace: x}]")
        .expect("write");
    std::fs::write(d.join("p/a.yaml"), "kind: Nope\napiVersion: v1\nmetadata: {name: n}")
        .expect("write");
    let errs = load(&d.join("p"), &d.join("inv.yaml")).expect_err("errors").0;
    assert_eq!(errs.len(), 2, "{errs:#?}");
}

// ---------- the bad-input lists of issues 3 and 4, in one place ----------

/// Every bad input both issues list: the message names the file, the object and the
/// field; a valid policy in the same file is not loaded either (nothing partial); no
/// panic. The object label is the `Kind ns/name` a user can grep for.
#[test]
fn every_listed_bad_input_names_file_object_and_field_and_loads_nothing() {
    let good = np("podSelector: {}").replace("name: p", "name: good");
    let anp_rule = |rule: &str| anp(&format!("priority: 1\nsubject: {{namespaces: {{}}}}\n{rule}"));
    let meta = |ann: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: ns\n  annotations: {{{ann}}}\nspec: {{podSelector: {{}}}}"
        )
    };
    let many: String = (0..101)
        .map(|i| format!("- {{name: r{i}, action: Deny, to: [{{namespaces: {{}}}}]}}\n"))
        .collect();
    let cases: Vec<(&str, String, &str, &str)> = vec![
        // (what, document, object, field)
        (
            "unknown kind",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n".into(),
            "Pod x",
            "kind",
        ),
        (
            "invalid CIDR",
            np("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.300/8}"),
            "NetworkPolicy ns/p",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "except not inside cidr",
            np(
                "podSelector: {}\negress:\n- to:\n  - ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}",
            ),
            "NetworkPolicy ns/p",
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            "endPort below port",
            np("podSelector: {}\ningress:\n- ports: [{port: 90, endPort: 80}]"),
            "NetworkPolicy ns/p",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "endPort with a named port",
            np("podSelector: {}\ningress:\n- ports: [{port: http, endPort: 80}]"),
            "NetworkPolicy ns/p",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "unknown selector operator",
            np("podSelector:\n  matchExpressions: [{key: app, operator: Equals, values: [a]}]"),
            "NetworkPolicy ns/p",
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            "unknown protocol",
            np("podSelector: {}\ningress:\n- ports: [{protocol: ICMP, port: 1}]"),
            "NetworkPolicy ns/p",
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "priority out of range",
            anp("priority: 1001\nsubject: {namespaces: {}}"),
            "AdminNetworkPolicy a",
            "spec.priority",
        ),
        (
            "unknown action",
            anp_rule("egress: [{action: Drop, to: [{namespaces: {}}]}]"),
            "AdminNetworkPolicy a",
            "spec.egress[0].action",
        ),
        (
            "Pass in a BANP",
            banp("subject: {namespaces: {}}\ningress: [{action: Pass, from: [{namespaces: {}}]}]"),
            "BaselineAdminNetworkPolicy default",
            "spec.ingress[0].action",
        ),
        (
            "domainNames in an ingress rule",
            anp_rule("ingress: [{action: Allow, from: [{domainNames: [a.example.com]}]}]"),
            "AdminNetworkPolicy a",
            "spec.ingress[0].from[0].domainNames",
        ),
        (
            "domainNames in a Deny rule",
            anp_rule("egress: [{action: Deny, to: [{domainNames: [a.example.com]}]}]"),
            "AdminNetworkPolicy a",
            "spec.egress[0].to[0].domainNames",
        ),
        (
            "more than 100 rules",
            anp_rule(&format!("egress:\n{many}")),
            "AdminNetworkPolicy a",
            "spec.egress",
        ),
        (
            "malformed TTL",
            meta("flowgate.dev/ttl: fifteen"),
            "NetworkPolicy ns/p",
            "metadata.annotations.flowgate.dev/ttl",
        ),
        (
            "malformed expiry",
            meta("flowgate.dev/expires-at: '2026-13-01T00:00:00Z'"),
            "NetworkPolicy ns/p",
            "metadata.annotations.flowgate.dev/expires-at",
        ),
    ];
    for (what, doc, object, field) in &cases {
        let text = format!("{good}\n---\n{doc}");
        let errs = match parse_policies(&text, Path::new("dir/t.yaml")) {
            Ok(p) => panic!("{what}: loaded {} policies", p.len()),
            Err(e) => e.0,
        };
        let hit = errs
            .iter()
            .find(|e| e.object.as_deref() == Some(*object) && e.field.as_deref() == Some(*field))
            .unwrap_or_else(|| panic!("{what}: no error at {object} {field}: {errs:#?}"));
        assert_eq!(hit.file, Path::new("dir/t.yaml"), "{what}");
        let shown = hit.to_string();
        assert!(shown.starts_with(&format!("dir/t.yaml: {object}: {field}: ")), "{what}: {shown}");
        assert!(!hit.message.is_empty(), "{what}");
    }

    // Malformed YAML: no object can be named; the file and the position are.
    let errs = parse_policies(&format!("{good}\n---\nkind: [unclosed\n"), Path::new("dir/t.yaml"))
        .expect_err("malformed");
    assert!(errs.0.iter().any(|e| e.file == Path::new("dir/t.yaml")
        && e.message.contains("malformed YAML")
        && e.message.contains("line")));

    // Duplicate workload addresses: the inventory names the workload and the field.
    let errs = parse_inventory(
        "namespaces: [{name: a}]\nworkloads:\n- {name: w, namespace: a, ips: [10.0.0.0/24]}\n- {name: v, namespace: a, ips: [10.0.0.0/24]}\n",
        Path::new("inv.yaml"),
    )
    .expect_err("duplicate");
    let e =
        errs.0.iter().find(|e| e.field.as_deref() == Some("workloads[1].ips[0]")).expect("field");
    assert_eq!(e.object.as_deref(), Some("Workload a/v"));
    assert_eq!(
        e.to_string(),
        "inv.yaml: Workload a/v: workloads[1].ips[0]: 10.0.0.0/24 is already owned by a/w"
    );
}

/// What [`documents`] writes for one text: policies, spellings, errors.
type Parsed = (Vec<Policy>, Vec<Spelling>, Vec<LoadError>);

/// Both paths of [`documents`] on one text: `(fast taken, fast result, slow result)`.
fn both_paths(yaml: &str) -> (bool, Parsed, Parsed) {
    let file = Path::new("t.yaml");
    let mut fast = (Vec::new(), Vec::new(), Vec::new());
    let taken = documents_fast(yaml, file, &mut fast.2, &mut fast.0, &mut fast.1);
    let mut slow = (Vec::new(), Vec::new(), Vec::new());
    documents_slow(yaml, file, &mut slow.2, &mut slow.0, &mut slow.1);
    (taken, fast, slow)
}

/// The fast path (YAML straight into the typed structs) gives exactly what the `Value`
/// path gives, spellings and validation errors included; what it cannot prove the same
/// (a number or a bool where a string goes, a duplicate key, null as an empty map, tags,
/// anchors, skipped subtrees) it leaves to the slow path, whose messages stay.
#[test]
fn fast_path_equals_the_value_path() {
    let same = [
        np("podSelector: {matchLabels: {app: a}}\npolicyTypes: []\ningress:\n- from: []\n  ports: [{port: 80}, {port: http, protocol: UDP}, {port: 1000, endPort: 2000}]\negress: []"),
        np("podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}\n  - namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [a, b]}]}\n    podSelector: {matchLabels: {role: x}}"),
        // Validation errors are found on the typed object: same on both paths.
        np("podSelector: {}\ningress:\n- ports: [{port: 70000}, {protocol: ICMP}]"),
        // `null` for an optional field is its absence on both paths.
        np("podSelector: ~\ningress: [{from: ~, ports: ~}]"),
        // No namespace (defaulted), two documents and an empty one, a comment.
        "# c\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec: {podSelector: {}}\n---\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b, namespace: x, labels: {k: v}, annotations: {flowgate.dev/mode: audit}}\nspec: {podSelector: {}}\n".to_owned(),
    ];
    for yaml in &same {
        let (taken, fast, slow) = both_paths(yaml);
        assert!(taken, "{yaml}");
        assert_eq!(fast, slow, "{yaml}");
    }
    let refused = [
        // A number or a bool where the API wants a string.
        np("podSelector: {matchLabels: {version: 1}}"),
        np("podSelector: {matchLabels: {on: true}}"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: 12}\nspec: {}\n"
            .to_owned(),
        // Duplicate keys: a Value mapping refuses them, a streaming map would keep one.
        np("podSelector: {matchLabels: {a: x, a: y}}"),
        np("podSelector: {}\npodSelector: {}"),
        // Null as an empty map; a skipped subtree; tags, anchors, merge keys.
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec: ~\n"
            .to_owned(),
        format!("{}status: {{a: 1, a: 2}}\n", np("podSelector: {}")),
        np("podSelector: !!map {}"),
        np("podSelector: &s {}\ningress: [{from: [{podSelector: *s}]}]"),
        // Another kind, or a wrong apiVersion: the slow path says which.
        anp("priority: 1\nsubject: {namespaces: {}}"),
        "apiVersion: networking.k8s.io/v2\nkind: NetworkPolicy\nmetadata: {name: a}\nspec: {}\n"
            .to_owned(),
        // Unknown field, malformed YAML.
        np("podSelector: {}\nfoo: 1"),
        format!("{}---\nkind: [unclosed\n", np("podSelector: {}")),
    ];
    for yaml in &refused {
        let (taken, fast, _) = both_paths(yaml);
        assert!(!taken, "{yaml}");
        assert_eq!(fast, Default::default(), "{yaml}");
    }
}

/// The inventory's fast path refuses what its `Value` path refuses.
#[test]
fn inventory_fast_path_keeps_the_value_path_errors() {
    let good = "namespaces: [{name: a, labels: {t: x}}]\nworkloads:\n- {name: w, namespace: a, ips: [10.0.0.1], ports: [{name: http, port: 80}]}\n";
    let mut errors = Vec::new();
    let fast = strict::document::<k8s::InventoryFile>(good).expect("fast").expect("some");
    let slow = inventory::parse(good, Path::new("i.yaml"), &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(fast.workloads.map(|w| w.len()), Some(slow.workloads.len()));
    for bad in [
        "namespaces: [{name: a, labels: {t: 1}}]\n",
        "namespaces: [{name: a}]\nnamespaces: []\n",
        "namespaces: [{name: 7}]\n",
    ] {
        assert!(strict::document::<k8s::InventoryFile>(bad).is_none(), "{bad}");
        assert!(parse_inventory(bad, Path::new("i.yaml")).is_err(), "{bad}");
    }
}
