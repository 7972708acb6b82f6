//! The policy intermediate representation: what `load` produces from YAML and what
//! `compile` consumes. It is the one normalised model of all policy kinds
//! (NetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy),
//! so the engine never sees Kubernetes' spelling and the loader never sees the engine's
//! tables. It is plain data: tests and property tests build it directly.
//!
//! Invariants the loader guarantees (the engine may rely on them):
//! - every `LabelSelector` is valid (operators have the values they need);
//! - every `Peer::Cidr` has each `except` inside `net`, and `net`/`except` are the same family;
//! - every `PortMatch::Range` has `first <= last`;
//! - `Action::Pass` only appears in `Tier::Admin`; `Peer::Domain` only in egress `Allow` rules;
//! - workload names are unique per namespace and no address is owned twice.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use crate::flow::Proto;

/// Kubernetes labels, sorted for deterministic output.
pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries with its own name, as Kubernetes adds it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Who is who: namespaces, and workloads with their addresses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inventory {
    pub namespaces: Vec<Namespace>,
    pub workloads: Vec<Workload>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Namespace {
    pub name: String,
    /// Includes [`NAMESPACE_NAME_LABEL`].
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    /// Addresses (as /32 or /128) and CIDRs the workload owns; identity is by longest
    /// prefix match over all workloads' entries.
    pub addrs: Vec<IpNet>,
    pub ports: Vec<NamedPort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Proto,
}

/// A Kubernetes label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: SelectorOp,
    /// Non-empty for `In`/`NotIn`, empty for `Exists`/`DoesNotExist`.
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Which namespaces a workload selector looks in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceMatch {
    /// Exactly this namespace (NetworkPolicy's own namespace for a bare `podSelector`).
    Named(String),
    /// Every namespace whose labels match.
    Selector(LabelSelector),
}

/// A set of workloads: those matching `pods` in the namespaces `namespaces` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSelector {
    pub namespaces: NamespaceMatch,
    pub pods: LabelSelector,
}

/// The tier a policy lives in; tiers are evaluated Admin → Namespaced → Baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// AdminNetworkPolicy / ClusterNetworkPolicy tier Admin. Lower priority first.
    Admin { priority: u32 },
    /// networking.k8s.io/v1 NetworkPolicy.
    Namespaced,
    /// BaselineAdminNetworkPolicy / ClusterNetworkPolicy tier Baseline.
    Baseline { priority: u32 },
}

/// The Kubernetes kind a policy was written as (for messages and `explain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    NetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
}

impl PolicyKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            PolicyKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
            PolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }
}

/// When an emergency policy stops being enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// `flowgate.dev/expires-at`.
    At(SystemTime),
    /// `flowgate.dev/ttl`, counted from `Policy::created_at` if set, otherwise from the
    /// compile's `now` the first time the policy is seen (the control plane keeps that).
    Ttl(Duration),
}

/// Whether a policy's denials are enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    /// `flowgate.dev/mode: audit`: evaluated, would-be denials reported, not enforced.
    Audit,
}

/// One policy of any kind.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub kind: PolicyKind,
    pub name: String,
    /// Set for NetworkPolicy; cluster-scoped kinds have none.
    pub namespace: Option<String>,
    /// The file it came from (empty for policies built in code).
    pub source: PathBuf,
    pub tier: Tier,
    pub subject: WorkloadSelector,
    /// `None`: the policy says nothing about ingress (for a NetworkPolicy: `Ingress` is
    /// not in `policyTypes`, so it does not isolate for ingress). `Some(vec![])`: it
    /// covers ingress with no rules (a NetworkPolicy that isolates and admits nothing).
    pub ingress: Option<Vec<Rule>>,
    /// As `ingress`, for egress.
    pub egress: Option<Vec<Rule>>,
    pub mode: Mode,
    pub expiry: Option<Expiry>,
    /// `metadata.creationTimestamp`, when given.
    pub created_at: Option<SystemTime>,
}

impl Policy {
    /// `namespace/name` for namespaced policies, `name` otherwise.
    pub fn display_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// When this policy stops being enforced, or `None` if never. A TTL counts from
    /// `created_at`, or from `now` when the policy carries no creation time (see
    /// [`Expiry::Ttl`]). The compiler and the reference evaluator both read expiry
    /// through this, so the two cannot disagree on what an annotation means.
    pub fn expires_at(&self, now: SystemTime) -> Option<SystemTime> {
        match self.expiry? {
            Expiry::At(at) => Some(at),
            Expiry::Ttl(ttl) => self.created_at.unwrap_or(now).checked_add(ttl),
        }
    }

    /// Whether this policy is still in force at `now`: an expiry at or before `now`
    /// removes it.
    pub fn is_live(&self, now: SystemTime) -> bool {
        self.expires_at(now).is_none_or(|at| at > now)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Admin tier only: skip the rest of the Admin tier, continue with NetworkPolicy.
    Pass,
}

/// One ingress or egress rule. NetworkPolicy rules are all `Allow`; Admin/Baseline rules
/// are evaluated in order and the first match decides.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// ANP rule name; `None` for NetworkPolicy rules (they are shown by index).
    pub name: Option<String>,
    pub action: Action,
    /// The other end of the flow: sources for ingress rules, destinations for egress.
    pub peers: Peers,
    /// `None`: all ports and protocols.
    pub ports: Option<Vec<PortMatch>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Peers {
    /// NetworkPolicy rule without `from`/`to` (or with an empty list): any peer,
    /// workload or external.
    Any,
    /// Any of these. An empty list matches nothing.
    List(Vec<Peer>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Peer {
    /// Inventory workloads. Never matches an external address.
    Workloads(WorkloadSelector),
    /// An address range (ipBlock / networks), matched against the peer's address whether
    /// or not a workload owns it.
    Cidr { net: IpNet, except: Vec<IpNet> },
    /// An egress destination by name; matches only when the flow carries a name.
    Domain(DomainPattern),
}

/// A `domainNames` entry, normalised: lower case, no trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    /// `api.example.com`
    Exact(String),
    /// `*.example.com`, stored as `example.com`: matches one or more labels before it,
    /// never `example.com` itself.
    Wildcard(String),
}

/// A port clause. Matches the destination port of the flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// `port` / `endPort` / `portNumber` / `portRange`; `first..=last`. A protocol-only
    /// NetworkPolicy port (no `port`) is `0..=65535`.
    Range { protocol: Proto, first: u16, last: u16 },
    /// A named port, resolved on the destination workload. `protocol: None` (ANP
    /// `namedPort`) matches the named port whatever its protocol.
    Named { protocol: Option<Proto>, name: String },
}

/// Everything `compile` needs: who is who, and the policies.
///
/// The inventory and each policy are behind an `Arc` so that a set can be rebuilt from
/// parts of an earlier one by pointer copies: the control plane reloads a 10,000-policy
/// directory after one file changed by reusing the other files' parsed policies and the
/// unchanged inventory, and a deep copy of those cost about as much as the rest of the
/// reload. Readers see through the `Arc`s (`set.policies[i].name`, `&set.inventory`);
/// the rare writer (the emergency overlay) uses `Arc::make_mut`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    pub inventory: Arc<Inventory>,
    pub policies: Vec<Arc<Policy>>,
}

impl PolicySet {
    /// A set owning freshly built parts (loaders, tests and benches build sets this way).
    pub fn new(inventory: Inventory, policies: Vec<Policy>) -> PolicySet {
        PolicySet {
            inventory: Arc::new(inventory),
            policies: policies.into_iter().map(Arc::new).collect(),
        }
    }
}

impl LabelSelector {
    /// Kubernetes selector semantics: every `matchLabels` pair and every expression must
    /// hold. `NotIn` and `DoesNotExist` hold when the key is absent.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// True for `{}`: selects everything.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.op {
            SelectorOp::In => value.is_some_and(|v| self.values.contains(v)),
            SelectorOp::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOp::Exists => value.is_some(),
            SelectorOp::DoesNotExist => value.is_none(),
        }
    }
}

impl WorkloadSelector {
    /// Does this selector pick `workload`, which lives in `namespace`?
    pub fn matches(&self, namespace: &Namespace, workload: &Workload) -> bool {
        let ns_ok = match &self.namespaces {
            NamespaceMatch::Named(name) => *name == namespace.name,
            NamespaceMatch::Selector(sel) => sel.matches(&namespace.labels),
        };
        ns_ok && workload.namespace == namespace.name && self.pods.matches(&workload.labels)
    }
}

impl DomainPattern {
    /// Matches a normalised name (lower case, no trailing dot). A wildcard matches one or
    /// more labels in front of its suffix, never the suffix itself.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            DomainPattern::Exact(exact) => name == exact,
            DomainPattern::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn not_in_and_does_not_exist_hold_for_absent_keys() {
        let absent = labels(&[("app", "web")]);
        let not_in =
            Requirement { key: "tier".into(), op: SelectorOp::NotIn, values: vec!["db".into()] };
        let dne = Requirement { key: "tier".into(), op: SelectorOp::DoesNotExist, values: vec![] };
        let in_ = Requirement { key: "tier".into(), op: SelectorOp::In, values: vec!["db".into()] };
        assert!(not_in.matches(&absent));
        assert!(dne.matches(&absent));
        assert!(!in_.matches(&absent));
        assert!(!not_in.matches(&labels(&[("tier", "db")])));
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::default().matches(&Labels::new()));
    }

    #[test]
    fn wildcard_needs_at_least_one_label() {
        let w = DomainPattern::Wildcard("example.com".into());
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("badexample.com"));
        assert!(!w.matches(".example.com"));
        let e = DomainPattern::Exact("example.com".into());
        assert!(e.matches("example.com") && !e.matches("a.example.com"));
    }
}
