//! networking.k8s.io/v1 NetworkPolicy → IR, with exactly Kubernetes' semantics. The
//! points where a naive mapping goes wrong, each covered by a test:
//!
//! - `policyTypes` defaulting ([`policy_types`]): absent *or empty* → `Ingress` always,
//!   `Egress` iff there are egress rules (Kubernetes tests `len(...) == 0` on both lists,
//!   so on the wire `policyTypes: []` is no `policyTypes` and `egress: []` is no
//!   `egress`). When given non-empty, it alone decides which directions are covered.
//! - port `protocol` defaulting: absent → `TCP` ([`validate::protocol`]).
//! - A covered direction with no rules isolates and admits nothing (`Some(vec![])`);
//!   `ingress: [{}]` is one rule admitting everything.
//! - A rule with no `from`/`to` (or an empty list) admits every peer.
//! - `namespaceSelector` + `podSelector` in ONE peer is an intersection (those pods in
//!   those namespaces), not two peers.

use serde_norway::Value;

use super::annotations::policy_meta;
use super::k8s::{self, IntOrString};
use super::{Report, validate};
use crate::policy::ir::{
    Action, LabelSelector, NamespaceMatch, Peer, Peers, Policy, PolicyKind, PortMatch, Rule, Tier,
    WorkloadSelector,
};

/// Converts one NetworkPolicy document (its namespace already defaulted); its
/// spellings ([`spellings_of`]) go to `spellings`.
pub fn convert(
    value: Value,
    r: &mut Report<'_>,
    spellings: &mut Vec<(String, String)>,
) -> Option<Policy> {
    let obj: k8s::Object<k8s::NetworkPolicySpec> = r.typed(value)?;
    spellings.extend(spellings_of(&obj));
    convert_object(obj, r)
}

/// Converts one typed NetworkPolicy (a missing namespace is `default`).
pub fn convert_object(
    obj: k8s::Object<k8s::NetworkPolicySpec>,
    r: &mut Report<'_>,
) -> Option<Policy> {
    let meta = policy_meta(r, &obj.metadata, true)?;
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".to_owned());
    let spec = &obj.spec;

    let pods = match &spec.pod_selector {
        Some(sel) => validate::selector(r, "spec.podSelector", sel),
        None => LabelSelector::default(),
    };

    let (mut ingress_covered, mut egress_covered) = (false, false);
    for (i, t) in policy_types(spec).into_iter().enumerate() {
        match t {
            INGRESS => ingress_covered = true,
            EGRESS => egress_covered = true,
            other => r.error(
                &format!("spec.policyTypes[{i}]"),
                format!("unknown policy type {other:?} (expected {INGRESS} or {EGRESS})"),
            ),
        }
    }

    let ingress = ingress_covered.then(|| {
        let rules = spec.ingress.iter().flatten().enumerate();
        rules
            .filter_map(|(i, rule)| {
                let path = format!("spec.ingress[{i}]");
                self::rule(r, &path, "from", &ns, rule.from.as_deref(), rule.ports.as_deref())
            })
            .collect()
    });
    let egress = egress_covered.then(|| {
        let rules = spec.egress.iter().flatten().enumerate();
        rules
            .filter_map(|(i, rule)| {
                let path = format!("spec.egress[{i}]");
                self::rule(r, &path, "to", &ns, rule.to.as_deref(), rule.ports.as_deref())
            })
            .collect()
    });

    Some(Policy {
        kind: PolicyKind::NetworkPolicy,
        name: meta.name,
        namespace: Some(ns.clone()),
        source: r.file().to_owned(),
        tier: Tier::Namespaced,
        subject: WorkloadSelector { namespaces: NamespaceMatch::Named(ns), pods },
        ingress,
        egress,
        mode: meta.mode,
        expiry: meta.expiry,
        created_at: meta.created_at,
    })
}

/// The fields of one NetworkPolicy document whose spelling differs from what the API
/// server makes of it, as `(field, message)`; see [`super::Spelling`]. A document that
/// does not deserialise has none (the load reports it).
pub(super) fn spellings(value: Value) -> Vec<(String, String)> {
    match serde_norway::from_value::<k8s::Object<k8s::NetworkPolicySpec>>(value) {
        Ok(obj) => spellings_of(&obj),
        Err(_) => Vec::new(),
    }
}

/// [`spellings`] of a typed NetworkPolicy.
pub(super) fn spellings_of(obj: &k8s::Object<k8s::NetworkPolicySpec>) -> Vec<(String, String)> {
    let spec = &obj.spec;
    let mut out = Vec::new();
    let types = policy_types(spec);
    if spec.policy_types.as_ref().is_some_and(Vec::is_empty) {
        let (read, isolated) = if types.contains(&EGRESS) {
            ("[Ingress, Egress]", "ingress and egress")
        } else {
            ("[Ingress]", "ingress")
        };
        out.push((
            "spec.policyTypes".to_owned(),
            format!(
                "empty policyTypes is read as {read}, exactly as if it were absent (Kubernetes \
                 defaults an empty list): this policy isolates the selected pods for {isolated}"
            ),
        ));
    }
    let egress_listed = spec.policy_types.as_ref().is_some_and(|t| t.iter().any(|t| t == EGRESS));
    if spec.egress.as_ref().is_some_and(Vec::is_empty) && !egress_listed {
        out.push((
            "spec.egress".to_owned(),
            "empty egress without Egress in policyTypes is read as no egress section: egress \
             is not isolated (list Egress in policyTypes to deny all egress)"
                .to_owned(),
        ));
    }
    let from = spec.ingress.iter().flatten().map(|r| r.from.as_ref());
    let to = spec.egress.iter().flatten().map(|r| r.to.as_ref());
    let rules = (from.enumerate().map(|(i, p)| ("ingress", "from", "source", i, p)))
        .chain(to.enumerate().map(|(i, p)| ("egress", "to", "destination", i, p)));
    for (dir, peer_field, who, i, peers) in rules {
        if peers.is_some_and(Vec::is_empty) {
            out.push((
                format!("spec.{dir}[{i}].{peer_field}"),
                format!(
                    "empty {peer_field} is read as no {peer_field}: this rule admits every {who} \
                     (not none)"
                ),
            ));
        }
    }
    out
}

const INGRESS: &str = "Ingress";
const EGRESS: &str = "Egress";

/// `spec.policyTypes` as the API server stores it, after `SetDefaults_NetworkPolicy`
/// (kubernetes `pkg/apis/networking/v1/defaults.go`):
///
/// ```go
/// if len(obj.Spec.PolicyTypes) == 0 {
///     // Any policy that does not specify policyTypes implies at least "Ingress".
///     obj.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
///     if len(obj.Spec.Egress) != 0 {
///         obj.Spec.PolicyTypes = append(obj.Spec.PolicyTypes, networkingv1.PolicyTypeEgress)
///     }
/// }
/// ```
///
/// Go's `len` is 0 for a nil and for an empty list alike, so `policyTypes: []` (and
/// `policyTypes: null`) is read exactly as an absent `policyTypes`, and `egress: []`
/// exactly as an absent `egress`. A non-empty list is kept as written (values are
/// checked by the caller).
pub(super) fn policy_types(spec: &k8s::NetworkPolicySpec) -> Vec<&str> {
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => types.iter().map(String::as_str).collect(),
        _ if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) => vec![INGRESS, EGRESS],
        _ => vec![INGRESS],
    }
}

/// One ingress or egress rule; `peer_field` is `from` or `to`.
fn rule(
    r: &mut Report<'_>,
    path: &str,
    peer_field: &str,
    ns: &str,
    peers: Option<&[k8s::NpPeer]>,
    ports: Option<&[k8s::NpPort]>,
) -> Option<Rule> {
    let peers = match peers {
        None | Some([]) => Peers::Any,
        Some(list) => Peers::List(
            list.iter()
                .enumerate()
                .filter_map(|(i, p)| peer(r, &format!("{path}.{peer_field}[{i}]"), ns, p))
                .collect(),
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .filter_map(|(i, p)| port(r, &format!("{path}.ports[{i}]"), p))
                .collect(),
        ),
    };
    Some(Rule { name: None, action: Action::Allow, peers, ports })
}

fn peer(r: &mut Report<'_>, path: &str, ns: &str, p: &k8s::NpPeer) -> Option<Peer> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => {
            r.error(
                path,
                "empty peer: set podSelector, namespaceSelector or ipBlock (to admit every \
                 peer, leave the list out instead)",
            );
            None
        }
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            r.error(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector in one peer",
            );
            None
        }
        (None, None, Some(block)) => ip_block(r, &format!("{path}.ipBlock"), block),
        (pods, nss, None) => {
            let pods = match pods {
                Some(sel) => validate::selector(r, &format!("{path}.podSelector"), sel),
                None => LabelSelector::default(),
            };
            let namespaces = match nss {
                Some(sel) => NamespaceMatch::Selector(validate::selector(
                    r,
                    &format!("{path}.namespaceSelector"),
                    sel,
                )),
                None => NamespaceMatch::Named(ns.to_owned()),
            };
            Some(Peer::Workloads(WorkloadSelector { namespaces, pods }))
        }
    }
}

/// `ipBlock`: every `except` must be a strict subnet of `cidr`, in the same family.
fn ip_block(r: &mut Report<'_>, path: &str, block: &k8s::IpBlock) -> Option<Peer> {
    let net = validate::cidr(r, &format!("{path}.cidr"), &block.cidr);
    let mut except = Vec::new();
    for (i, e) in block.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{i}]");
        let Some(sub) = validate::cidr(r, &field, e) else { continue };
        let Some(net) = net else { continue };
        let same_family = sub.addr().is_ipv4() == net.addr().is_ipv4();
        if !same_family {
            r.error(&field, format!("{sub} is not the same address family as cidr {net}"));
        } else if !net.contains(&sub) || sub.prefix_len() <= net.prefix_len() {
            r.error(&field, format!("{sub} is not strictly inside cidr {net}"));
        } else {
            except.push(sub);
        }
    }
    Some(Peer::Cidr { net: net?, except })
}

fn port(r: &mut Report<'_>, path: &str, p: &k8s::NpPort) -> Option<PortMatch> {
    let protocol = validate::protocol(r, &format!("{path}.protocol"), p.protocol.as_deref());
    match (&p.port, p.end_port) {
        (None, None) => Some(PortMatch::Range { protocol: protocol?, first: 0, last: 65535 }),
        (None, Some(_)) => {
            r.error(&format!("{path}.endPort"), "endPort needs a numeric port");
            None
        }
        (Some(IntOrString::Str(name)), end) => {
            let named = validate::port_name(r, &format!("{path}.port"), name);
            if end.is_some() {
                r.error(&format!("{path}.endPort"), "endPort cannot be used with a named port");
                return None;
            }
            if !named {
                return None;
            }
            Some(PortMatch::Named { protocol: Some(protocol?), name: name.clone() })
        }
        (Some(IntOrString::Int(n)), end) => {
            let first = validate::port_number(r, &format!("{path}.port"), *n);
            let last = match end {
                None => first,
                Some(e) => {
                    let last = validate::port_number(r, &format!("{path}.endPort"), e);
                    if let (Some(f), Some(l)) = (first, last)
                        && l < f
                    {
                        r.error(
                            &format!("{path}.endPort"),
                            format!("endPort {l} is below port {f}"),
                        );
                        return None;
                    }
                    last
                }
            };
            Some(PortMatch::Range { protocol: protocol?, first: first?, last: last? })
        }
    }
}
