//! AdminNetworkPolicy and BaselineAdminNetworkPolicy (policy.networking.k8s.io/v1alpha1)
//! and their successor ClusterNetworkPolicy (v1alpha2, `tier: Admin | Baseline`) → IR.
//!
//! All three share one shape: a `subject`, and ingress/egress rules evaluated in order,
//! each with a `name`, an `action` and peers. The mapping:
//! - subject `namespaces: sel` → every pod in the matching namespaces; `pods:
//!   {namespaceSelector, podSelector}` → those pods in those namespaces;
//! - peers `namespaces` / `pods` likewise, `networks` → CIDRs, egress `domainNames` →
//!   [`DomainPattern`] (Allow rules only, as NPEP-133 says: a name-based deny is
//!   unenforceable without seeing every name), `nodes` → refused (flowgate has no nodes);
//! - ports `portNumber` → a one-port range, `portRange` → a range, `namedPort` → a named
//!   port of any protocol; CNP `protocols` likewise.
//!
//! Absent `ingress`/`egress` → `None`: the policy says nothing about that direction.

use serde_norway::Value;

use super::annotations::{PolicyMeta, policy_meta};
use super::k8s;
use super::{Report, validate};
use crate::flow::Proto;
use crate::policy::ir::{
    Action, DomainPattern, LabelSelector, NamespaceMatch, Peer, Peers, Policy, PolicyKind,
    PortMatch, Rule, Tier, WorkloadSelector,
};

/// Per direction, per policy; the upstream API's limit.
pub const MAX_RULES: usize = 100;
/// Longest rule name the upstream API allows.
const MAX_RULE_NAME: usize = 100;
const MAX_PRIORITY: i64 = 1000;

/// Which of the three spellings is being read: actions and limits differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Anp,
    Banp,
    Cnp,
}

pub fn convert_anp(value: Value, r: &mut Report<'_>) -> Option<Policy> {
    let obj: k8s::Object<k8s::AdminSpec> = r.typed(value)?;
    let meta = policy_meta(r, &obj.metadata, false);
    let priority = match obj.spec.priority {
        None => {
            r.error("spec.priority", "missing (0-1000, lower first)");
            None
        }
        Some(p) => priority(r, p),
    };
    let (ingress, egress) = admin_rules(r, &obj.spec, Flavor::Anp);
    let subject = subject(r, &obj.spec.subject, Flavor::Anp);
    let tier = Tier::Admin { priority: priority? };
    build(PolicyKind::AdminNetworkPolicy, meta?, r, tier, subject?, ingress, egress)
}

pub fn convert_banp(value: Value, r: &mut Report<'_>) -> Option<Policy> {
    let obj: k8s::Object<k8s::AdminSpec> = r.typed(value)?;
    let meta = policy_meta(r, &obj.metadata, false);
    if obj.spec.priority.is_some() {
        r.error("spec.priority", "a BaselineAdminNetworkPolicy has no priority");
    }
    let (ingress, egress) = admin_rules(r, &obj.spec, Flavor::Banp);
    let subject = subject(r, &obj.spec.subject, Flavor::Banp);
    let tier = Tier::Baseline { priority: 0 };
    build(PolicyKind::BaselineAdminNetworkPolicy, meta?, r, tier, subject?, ingress, egress)
}

pub fn convert_cnp(value: Value, r: &mut Report<'_>) -> Option<Policy> {
    let obj: k8s::Object<k8s::CnpSpec> = r.typed(value)?;
    let meta = policy_meta(r, &obj.metadata, false);
    let spec = &obj.spec;
    let priority = priority(r, spec.priority);
    let tier = match spec.tier.as_str() {
        "Admin" => priority.map(|priority| Tier::Admin { priority }),
        "Baseline" => priority.map(|priority| Tier::Baseline { priority }),
        other => {
            r.error("spec.tier", format!("unknown tier {other:?} (expected Admin or Baseline)"));
            None
        }
    };
    let ingress = rules(r, "ingress", spec.ingress.as_deref(), Flavor::Cnp);
    let egress = rules(r, "egress", spec.egress.as_deref(), Flavor::Cnp);
    let subject = subject(r, &spec.subject, Flavor::Cnp);
    build(PolicyKind::ClusterNetworkPolicy, meta?, r, tier?, subject?, ingress, egress)
}

fn build(
    kind: PolicyKind,
    meta: PolicyMeta,
    r: &Report<'_>,
    tier: Tier,
    subject: WorkloadSelector,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
) -> Option<Policy> {
    Some(Policy {
        kind,
        name: meta.name,
        namespace: None,
        source: r.file().to_owned(),
        tier,
        subject,
        ingress,
        egress,
        mode: meta.mode,
        expiry: meta.expiry,
        created_at: meta.created_at,
    })
}

fn priority(r: &mut Report<'_>, p: i64) -> Option<u32> {
    match u32::try_from(p) {
        Ok(v) if p <= MAX_PRIORITY => Some(v),
        _ => {
            r.error("spec.priority", format!("priority {p} is out of range 0-{MAX_PRIORITY}"));
            None
        }
    }
}

fn limit(r: &mut Report<'_>, path: &str, n: usize) {
    if n > MAX_RULES {
        r.error(path, format!("{n} rules; at most {MAX_RULES} are allowed per direction"));
    }
}

fn rule_name(r: &mut Report<'_>, path: &str, name: Option<&str>) {
    if let Some(n) = name
        && n.chars().count() > MAX_RULE_NAME
    {
        r.error(&format!("{path}.name"), format!("longer than {MAX_RULE_NAME} characters"));
    }
}

fn action(r: &mut Report<'_>, path: &str, text: &str, flavor: Flavor) -> Option<Action> {
    let action = match (flavor, text) {
        (Flavor::Anp | Flavor::Banp, "Allow") | (Flavor::Cnp, "Accept") => Some(Action::Allow),
        (_, "Deny") => Some(Action::Deny),
        (Flavor::Anp | Flavor::Cnp, "Pass") => Some(Action::Pass),
        _ => None,
    };
    if action.is_none() {
        let message = match (flavor, text) {
            (Flavor::Banp, "Pass") => "Pass is not allowed in a BaselineAdminNetworkPolicy: \
                                       there is no tier below it to pass to (use Allow or Deny)"
                .to_owned(),
            (Flavor::Anp, _) => format!("unknown action {text:?} (expected Allow, Deny or Pass)"),
            (Flavor::Banp, _) => format!("unknown action {text:?} (expected Allow or Deny)"),
            (Flavor::Cnp, _) => format!("unknown action {text:?} (expected Accept, Deny or Pass)"),
        };
        r.error(path, message);
    }
    action
}

/// ANP/BANP rules of both directions.
fn admin_rules(
    r: &mut Report<'_>,
    spec: &k8s::AdminSpec,
    flavor: Flavor,
) -> (Option<Vec<Rule>>, Option<Vec<Rule>>) {
    let ingress = rules(r, "ingress", spec.ingress.as_deref(), flavor);
    (ingress, rules(r, "egress", spec.egress.as_deref(), flavor))
}

/// One rule of any of the three kinds, as far as they agree: a name, an action, and a
/// peer list and port clauses each kind spells its own way (`from`/`to`; `ports` in
/// v1alpha1, `protocols` in v1alpha2).
trait AdminRule {
    /// `(name, action)`.
    fn parts(&self) -> (Option<&str>, &str);
    /// The rule's port clauses; `path` is the rule's field path.
    fn ports(&self, r: &mut Report<'_>, path: &str) -> Option<Vec<PortMatch>>;
    /// The rule's peers ([`ingress_peers`] or [`egress_peers`]).
    fn peers(&self, r: &mut Report<'_>, path: &str, rule: RuleContext) -> Option<Peers>;
}

/// The four rule types differ only in their peer field and how they spell ports.
macro_rules! admin_rule {
    ($rule:ty, $peers:ident, $read_peers:ident, $ports:ident, $read_ports:ident) => {
        impl AdminRule for $rule {
            fn parts(&self) -> (Option<&str>, &str) {
                (self.name.as_deref(), &self.action)
            }
            fn ports(&self, r: &mut Report<'_>, path: &str) -> Option<Vec<PortMatch>> {
                $read_ports(r, path, self.$ports.as_deref())
            }
            fn peers(&self, r: &mut Report<'_>, path: &str, rule: RuleContext) -> Option<Peers> {
                $read_peers(r, path, self.$peers.as_deref(), rule)
            }
        }
    };
}

admin_rule!(k8s::AdminIngressRule, from, ingress_peers, ports, admin_ports);
admin_rule!(k8s::AdminEgressRule, to, egress_peers, ports, admin_ports);
admin_rule!(k8s::CnpIngressRule, from, ingress_peers, protocols, cnp_protocols);
admin_rule!(k8s::CnpEgressRule, to, egress_peers, protocols, cnp_protocols);

/// What the peer checks need to know of their rule. `action` is `None` when the rule's
/// action is invalid (already reported); `named_port`: the rule selects a named port.
#[derive(Clone, Copy)]
struct RuleContext {
    action: Option<Action>,
    named_port: bool,
    flavor: Flavor,
}

/// `spec.ingress` or `spec.egress` (`dir`) of any of the three kinds; absent → `None`.
/// Ports are read before peers: a named port rules out networks and domain peers.
fn rules<R: AdminRule>(
    r: &mut Report<'_>,
    dir: &str,
    rules: Option<&[R]>,
    flavor: Flavor,
) -> Option<Vec<Rule>> {
    let rules = rules?;
    limit(r, &format!("spec.{dir}"), rules.len());
    let rules = rules.iter().enumerate().filter_map(|(i, rule)| {
        let path = format!("spec.{dir}[{i}]");
        let (name, action_text) = rule.parts();
        let action = action(r, &format!("{path}.action"), action_text, flavor);
        rule_name(r, &path, name);
        let ports = rule.ports(r, &path);
        let named = ports.iter().flatten().any(|p| matches!(p, PortMatch::Named { .. }));
        let peers = rule.peers(r, &path, RuleContext { action, named_port: named, flavor });
        Some(Rule { name: name.map(str::to_owned), action: action?, peers: peers?, ports })
    });
    Some(rules.collect())
}

fn subject(r: &mut Report<'_>, s: &k8s::Subject, flavor: Flavor) -> Option<WorkloadSelector> {
    match (&s.namespaces, &s.pods) {
        (Some(ns), None) => Some(namespaces_peer(r, "spec.subject.namespaces", ns)),
        (None, Some(pods)) => pods_peer(r, "spec.subject.pods", pods, flavor),
        _ => {
            r.error("spec.subject", "set exactly one of namespaces or pods");
            None
        }
    }
}

fn namespaces_peer(r: &mut Report<'_>, path: &str, sel: &k8s::LabelSelector) -> WorkloadSelector {
    WorkloadSelector {
        namespaces: NamespaceMatch::Selector(validate::selector(r, path, sel)),
        pods: LabelSelector::default(),
    }
}

/// `pods: {namespaceSelector, podSelector}`: those pods in those namespaces.
///
/// `namespaceSelector` is required in v1alpha1 (AdminNetworkPolicy and
/// BaselineAdminNetworkPolicy: `NamespacedPod.NamespaceSelector` carries no `+optional`
/// under the package's `+kubebuilder:validation:Required`, kubernetes-sigs/network-policy-api
/// `apis/v1alpha1/shared_types.go`). In v1alpha2 (ClusterNetworkPolicy) it is `+optional`
/// and only `podSelector` is required (`apis/v1alpha2/clusternetworkpolicy_types.go`, and
/// the CRD's `required: [podSelector]`): absent, the Go value is the empty selector, which
/// "selects all Namespaces".
fn pods_peer(
    r: &mut Report<'_>,
    path: &str,
    pods: &k8s::NamespacedPod,
    flavor: Flavor,
) -> Option<WorkloadSelector> {
    let ns_path = format!("{path}.namespaceSelector");
    let ns = match (&pods.namespace_selector, flavor) {
        (Some(sel), _) => Some(validate::selector(r, &ns_path, sel)),
        (None, Flavor::Cnp) => Some(LabelSelector::default()),
        (None, Flavor::Anp | Flavor::Banp) => {
            r.error(&ns_path, "missing (use {} to select every namespace)");
            None
        }
    };
    let pods = validate::selector(r, &format!("{path}.podSelector"), &pods.pod_selector);
    Some(WorkloadSelector { namespaces: NamespaceMatch::Selector(ns?), pods })
}

/// `from` and `to` are required and list at least one peer (`MinItems=1`).
fn at_least_one_peer<'a, T>(
    r: &mut Report<'_>,
    field: &str,
    peers: Option<&'a [T]>,
) -> Option<&'a [T]> {
    if peers.is_none_or(<[T]>::is_empty) {
        r.error(field, "at least one peer is required");
        return None;
    }
    peers
}

/// `from` must list at least one peer; each peer sets exactly one field.
fn ingress_peers(
    r: &mut Report<'_>,
    path: &str,
    from: Option<&[k8s::AdminIngressPeer]>,
    rule: RuleContext,
) -> Option<Peers> {
    let flavor = rule.flavor;
    let from = at_least_one_peer(r, &format!("{path}.from"), from)?;
    let mut peers = Vec::new();
    for (i, p) in from.iter().enumerate() {
        let pp = format!("{path}.from[{i}]");
        if p.domain_names.is_some() {
            r.error(&format!("{pp}.domainNames"), "domainNames is only allowed in egress rules");
            continue;
        }
        if p.networks.is_some() || p.nodes.is_some() {
            r.error(&pp, "networks and nodes peers are only allowed in egress rules");
            continue;
        }
        match (&p.namespaces, &p.pods) {
            (Some(ns), None) => {
                peers.push(Peer::Workloads(namespaces_peer(r, &format!("{pp}.namespaces"), ns)))
            }
            (None, Some(pods)) => {
                peers.extend(pods_peer(r, &format!("{pp}.pods"), pods, flavor).map(Peer::Workloads))
            }
            _ => r.error(&pp, "set exactly one of namespaces or pods"),
        }
    }
    Some(Peers::List(peers))
}

/// `to` must list at least one peer; each peer sets exactly one field. Domain peers only
/// in Allow rules; a named port cannot apply to networks or domains (they have none).
fn egress_peers(
    r: &mut Report<'_>,
    path: &str,
    to: Option<&[k8s::AdminEgressPeer]>,
    rule: RuleContext,
) -> Option<Peers> {
    let RuleContext { action, named_port, flavor } = rule;
    let action = action?;
    let to = at_least_one_peer(r, &format!("{path}.to"), to)?;
    let mut peers = Vec::new();
    for (i, p) in to.iter().enumerate() {
        let pp = format!("{path}.to[{i}]");
        let set = [
            p.namespaces.is_some(),
            p.pods.is_some(),
            p.nodes.is_some(),
            p.networks.is_some(),
            p.domain_names.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            r.error(&pp, "set exactly one of namespaces, pods, networks or domainNames");
            continue;
        }
        if let Some(ns) = &p.namespaces {
            peers.push(Peer::Workloads(namespaces_peer(r, &format!("{pp}.namespaces"), ns)));
        } else if let Some(pods) = &p.pods {
            peers.extend(pods_peer(r, &format!("{pp}.pods"), pods, flavor).map(Peer::Workloads));
        } else if p.nodes.is_some() {
            r.error(
                &format!("{pp}.nodes"),
                "nodes peers are not supported: flowgate has no nodes (use networks with the node CIDRs)",
            );
        } else if let Some(nets) = &p.networks {
            address_peer(r, &pp, "networks", "CIDR", nets.is_empty(), named_port);
            for (j, n) in nets.iter().enumerate() {
                if let Some(net) = validate::cidr(r, &format!("{pp}.networks[{j}]"), n) {
                    peers.push(Peer::Cidr { net, except: Vec::new() });
                }
            }
        } else if let Some(names) = &p.domain_names {
            if action != Action::Allow {
                r.error(
                    &format!("{pp}.domainNames"),
                    "domainNames is only allowed in Allow (Accept) rules",
                );
                continue;
            }
            address_peer(r, &pp, "domainNames", "domain name", names.is_empty(), named_port);
            for (j, n) in names.iter().enumerate() {
                match domain(n) {
                    Ok(d) => peers.push(Peer::Domain(d)),
                    Err(msg) => r.error(&format!("{pp}.domainNames[{j}]"), msg),
                }
            }
        }
    }
    Some(Peers::List(peers))
}

/// A `networks` or `domainNames` peer (`key`) lists at least one `item`, and cannot go
/// with a named port: neither an address range nor a name has ports by name.
fn address_peer(
    r: &mut Report<'_>,
    peer_path: &str,
    key: &str,
    item: &str,
    empty: bool,
    named_port: bool,
) {
    let field = format!("{peer_path}.{key}");
    if empty {
        r.error(&field, format!("at least one {item} is required"));
    }
    if named_port {
        r.error(&field, format!("a {key} peer cannot be used with a named port"));
    }
}

/// Normalises and checks a `domainNames` entry: lower case, trailing dot dropped, `*`
/// only as the whole first label, at least two labels after it, each label
/// `[a-z0-9]([-a-z0-9_]*[a-z0-9])?` of at most 63 characters, 253 in all.
pub fn domain(text: &str) -> Result<DomainPattern, String> {
    let lower = text.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let (wildcard, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let label_ok = |l: &str| {
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| alnum(c) || c == '-' || c == '_')
            && l.starts_with(alnum)
            && l.ends_with(alnum)
    };
    if rest.len() > 253 || rest.split('.').count() < 2 || !rest.split('.').all(label_ok) {
        return Err(format!(
            "{text:?} is not a valid domain name (e.g. api.example.com, or *.example.com; \
             '*' only as the whole first label)"
        ));
    }
    Ok(if wildcard {
        DomainPattern::Wildcard(rest.to_owned())
    } else {
        DomainPattern::Exact(rest.to_owned())
    })
}

/// ANP `ports`: each entry sets exactly one of portNumber, portRange, namedPort.
fn admin_ports(
    r: &mut Report<'_>,
    path: &str,
    ports: Option<&[k8s::AdminPort]>,
) -> Option<Vec<PortMatch>> {
    let ports = ports.filter(|p| !p.is_empty())?;
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let pp = format!("{path}.ports[{i}]");
        match (&p.port_number, &p.port_range, &p.named_port) {
            (Some(n), None, None) => {
                let proto = validate::protocol(
                    r,
                    &format!("{pp}.portNumber.protocol"),
                    n.protocol.as_deref(),
                );
                let port = validate::port_number(r, &format!("{pp}.portNumber.port"), n.port);
                if let (Some(protocol), Some(port)) = (proto, port) {
                    out.push(PortMatch::Range { protocol, first: port, last: port });
                }
            }
            (None, Some(range), None) => {
                let proto = validate::protocol(
                    r,
                    &format!("{pp}.portRange.protocol"),
                    range.protocol.as_deref(),
                );
                if let Some(m) =
                    range_match(r, &format!("{pp}.portRange"), proto, range.start, range.end)
                {
                    out.push(m);
                }
            }
            (None, None, Some(name)) => {
                if validate::port_name(r, &format!("{pp}.namedPort"), name) {
                    out.push(PortMatch::Named { protocol: None, name: name.clone() });
                }
            }
            _ => r.error(&pp, "set exactly one of portNumber, portRange or namedPort"),
        }
    }
    Some(out)
}

fn range_match(
    r: &mut Report<'_>,
    path: &str,
    proto: Option<Proto>,
    start: i64,
    end: i64,
) -> Option<PortMatch> {
    let first = validate::port_number(r, &format!("{path}.start"), start);
    let last = validate::port_number(r, &format!("{path}.end"), end);
    let (first, last) = (first?, last?);
    if last < first {
        r.error(&format!("{path}.end"), format!("end {last} is below start {first}"));
        return None;
    }
    Some(PortMatch::Range { protocol: proto?, first, last })
}

/// CNP `protocols`: each entry sets exactly one of tcp, udp, sctp, destinationNamedPort;
/// a protocol without `destinationPort` means every port of it.
fn cnp_protocols(
    r: &mut Report<'_>,
    path: &str,
    protocols: Option<&[k8s::CnpProtocol]>,
) -> Option<Vec<PortMatch>> {
    let protocols = protocols.filter(|p| !p.is_empty())?;
    let mut out = Vec::new();
    for (i, p) in protocols.iter().enumerate() {
        let pp = format!("{path}.protocols[{i}]");
        let chosen = [
            p.tcp.as_ref().map(|x| (Proto::Tcp, "tcp", x)),
            p.udp.as_ref().map(|x| (Proto::Udp, "udp", x)),
            p.sctp.as_ref().map(|x| (Proto::Sctp, "sctp", x)),
        ];
        let mut chosen = chosen.into_iter().flatten();
        match (chosen.next(), chosen.next(), &p.destination_named_port) {
            (Some((proto, field, pp_port)), None, None) => {
                let fp = format!("{pp}.{field}.destinationPort");
                match &pp_port.destination_port {
                    None => out.push(PortMatch::Range { protocol: proto, first: 0, last: 65535 }),
                    Some(k8s::CnpPort { number: Some(n), range: None }) => {
                        if let Some(port) = validate::port_number(r, &format!("{fp}.number"), *n) {
                            out.push(PortMatch::Range { protocol: proto, first: port, last: port });
                        }
                    }
                    Some(k8s::CnpPort { number: None, range: Some(range) }) => {
                        if let Some(m) = range_match(
                            r,
                            &format!("{fp}.range"),
                            Some(proto),
                            range.start,
                            range.end,
                        ) {
                            out.push(m);
                        }
                    }
                    Some(_) => r.error(&fp, "set exactly one of number or range"),
                }
            }
            (None, None, Some(name)) => {
                if validate::port_name(r, &format!("{pp}.destinationNamedPort"), name) {
                    out.push(PortMatch::Named { protocol: None, name: name.clone() });
                }
            }
            _ => r.error(&pp, "set exactly one of tcp, udp, sctp or destinationNamedPort"),
        }
    }
    Some(out)
}
