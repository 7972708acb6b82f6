//! Serde types for the Kubernetes objects flowgate reads, spelled exactly as the API
//! spells them. They are deliberately loose where Kubernetes is loose on the wire (a CIDR
//! is a `String`, a protocol is a `String`) so that the semantic checks in the sibling
//! modules can report *every* problem with its field path, instead of serde stopping at
//! the first one. They are strict about structure: every struct denies unknown fields,
//! like `kubectl apply --validate=strict`.
//!
//! Lists are `Option<Vec<_>>` because YAML `key:` (null) and an absent key both mean
//! "not set" in Kubernetes' JSON, and serde would reject null for a bare `Vec`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};

/// `apiVersion`, `kind`, `metadata`, `spec` and an ignored `status`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S> {
    /// Checked on the untyped document on the slow path, on this on the fast one.
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: S,
    /// Written by controllers, never by the author; accepted and ignored.
    #[allow(dead_code)]
    pub status: Option<IgnoredAny>,
}

/// Kubernetes' standard object metadata. Fields flowgate has no use for (uid,
/// managedFields, …) are accepted so that `kubectl get -o yaml` output loads as is.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // the ignored fields exist only to be accepted
pub struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
    pub creation_timestamp: Option<String>,
    pub generate_name: Option<IgnoredAny>,
    pub uid: Option<IgnoredAny>,
    pub resource_version: Option<IgnoredAny>,
    pub generation: Option<IgnoredAny>,
    pub deletion_timestamp: Option<IgnoredAny>,
    pub deletion_grace_period_seconds: Option<IgnoredAny>,
    pub owner_references: Option<IgnoredAny>,
    pub finalizers: Option<IgnoredAny>,
    pub managed_fields: Option<IgnoredAny>,
    pub self_link: Option<IgnoredAny>,
}

/// `metav1.LabelSelector`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    pub match_labels: Option<BTreeMap<String, String>>,
    pub match_expressions: Option<Vec<SelectorRequirement>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: String,
    pub values: Option<Vec<String>>,
}

/// `intstr.IntOrString`: a port number or a port name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntOrString {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("port {v} is out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::Str(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

// ---- networking.k8s.io/v1 NetworkPolicy ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    pub pod_selector: Option<LabelSelector>,
    pub policy_types: Option<Vec<String>>,
    pub ingress: Option<Vec<NpIngressRule>>,
    pub egress: Option<Vec<NpEgressRule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NpIngressRule {
    pub from: Option<Vec<NpPeer>>,
    pub ports: Option<Vec<NpPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NpEgressRule {
    pub to: Option<Vec<NpPeer>>,
    pub ports: Option<Vec<NpPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NpPeer {
    pub pod_selector: Option<LabelSelector>,
    pub namespace_selector: Option<LabelSelector>,
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpBlock {
    pub cidr: String,
    pub except: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NpPort {
    pub protocol: Option<String>,
    pub port: Option<IntOrString>,
    pub end_port: Option<i64>,
}

// ---- policy.networking.k8s.io/v1alpha1 AdminNetworkPolicy / BaselineAdminNetworkPolicy ----

/// ANP and BANP share one shape; BANP has no `priority` (checked in `admin`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminSpec {
    pub priority: Option<i64>,
    pub subject: Subject,
    pub ingress: Option<Vec<AdminIngressRule>>,
    pub egress: Option<Vec<AdminEgressRule>>,
}

/// Exactly one of the two must be set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subject {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
}

/// `namespaceSelector` is required in v1alpha1 (ANP/BANP) and optional in v1alpha2 (CNP);
/// `admin::pods_peer` applies the difference.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespacedPod {
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: LabelSelector,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminIngressRule {
    pub name: Option<String>,
    pub action: String,
    pub from: Option<Vec<AdminIngressPeer>>,
    pub ports: Option<Vec<AdminPort>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminEgressRule {
    pub name: Option<String>,
    pub action: String,
    pub to: Option<Vec<AdminEgressPeer>>,
    pub ports: Option<Vec<AdminPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminIngressPeer {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
    /// Egress-only peer kinds, accepted here only to be refused with a clear message.
    pub networks: Option<IgnoredAny>,
    pub domain_names: Option<IgnoredAny>,
    pub nodes: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminEgressPeer {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
    pub nodes: Option<IgnoredAny>,
    pub networks: Option<Vec<String>>,
    pub domain_names: Option<Vec<String>>,
}

/// Exactly one of the three must be set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminPort {
    pub port_number: Option<PortNumber>,
    pub named_port: Option<String>,
    pub port_range: Option<PortRange>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortNumber {
    pub protocol: Option<String>,
    pub port: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortRange {
    pub protocol: Option<String>,
    pub start: i64,
    pub end: i64,
}

// ---- policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CnpSpec {
    pub tier: String,
    pub priority: i64,
    pub subject: Subject,
    pub ingress: Option<Vec<CnpIngressRule>>,
    pub egress: Option<Vec<CnpEgressRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CnpIngressRule {
    pub name: Option<String>,
    pub action: String,
    pub from: Option<Vec<AdminIngressPeer>>,
    pub protocols: Option<Vec<CnpProtocol>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CnpEgressRule {
    pub name: Option<String>,
    pub action: String,
    pub to: Option<Vec<AdminEgressPeer>>,
    pub protocols: Option<Vec<CnpProtocol>>,
}

/// Exactly one of the four must be set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CnpProtocol {
    pub tcp: Option<CnpProtocolPort>,
    pub udp: Option<CnpProtocolPort>,
    pub sctp: Option<CnpProtocolPort>,
    pub destination_named_port: Option<String>,
}

/// `destinationPort` absent: every port of that protocol.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CnpProtocolPort {
    pub destination_port: Option<CnpPort>,
}

/// Exactly one of the two must be set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CnpPort {
    pub number: Option<i64>,
    pub range: Option<CnpPortRange>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CnpPortRange {
    pub start: i64,
    pub end: i64,
}

// ---- inventory.yaml (flowgate's own format) ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryFile {
    pub namespaces: Option<Vec<InvNamespace>>,
    pub workloads: Option<Vec<InvWorkload>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvNamespace {
    pub name: String,
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvWorkload {
    pub name: String,
    pub namespace: String,
    pub labels: Option<BTreeMap<String, String>>,
    pub ips: Option<Vec<String>>,
    pub ports: Option<Vec<InvPort>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvPort {
    pub name: String,
    pub port: i64,
    pub protocol: Option<String>,
}
