//! Policy: from Kubernetes YAML to a verdict on one flow.
//!
//! Cold path: [`load`] reads the inventory and the policy directory into the [`ir`]
//! model (rejecting bad input whole, naming file, object and field), [`lint`] warns about
//! policies that are legal but probably wrong, and [`compile`] turns the model into an
//! immutable [`CompiledPolicy`] with every selector already resolved.
//!
//! Hot path: [`CompiledPolicy::decide`] answers one [`FlowQuery`] without allocating and
//! without taking a lock. [`CompiledPolicy::explain`] answers the same question from the
//! same tables, slowly, with the trace a human needs; [`simulate`] turns what a user
//! types (`ns/workload`, a domain, a named port) into the query both answer.
//!
//! Not here: when policy is reloaded (`control`), what happens to a denied flow
//! (`dataplane`), and how a denial is logged (`telemetry`).
// The one `unsafe` under policy/ is a counting allocator in `decide/tests.rs`.
#![cfg_attr(not(test), forbid(unsafe_code))]

pub mod compile;
pub mod decide;
pub mod diff;
pub mod explain;
pub mod generate;
pub mod inventory;
pub mod ir;
pub mod lint;
pub mod load;
pub mod reference;
pub mod simulate;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::flow::{Direction, FlowKey, Proto};

pub use compile::{CompileCache, CompileError, CompileOptions, CompiledPolicy, WorkloadName};
pub use ir::PolicySet;
pub use load::{LoadError, LoadErrors};

/// What to do with a flow that no policy decided: `policy.default` (a workload that no
/// policy isolates) and `policy.unknown` (neither endpoint is a workload).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Allow,
    #[default]
    Deny,
}

/// Index of a workload in the compiled inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId(pub u32);

/// Index of a policy in the compiled policy set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId(pub u32);

/// A policy generation: bumped by every successful reload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Generation(pub u64);

/// The question asked on every new flow. Borrowed, so building one costs nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowQuery<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub proto: Proto,
    /// The destination's name where the dataplane knows it (CONNECT, SOCKS5, SNI, Host),
    /// normalised: lower case, no trailing dot. Domain rules only match when it is set.
    pub fqdn: Option<&'a str>,
}

impl<'a> FlowQuery<'a> {
    /// The question for a flow as the dataplanes key it, with the name it was asked for.
    #[inline]
    pub const fn from_key(key: &FlowKey, fqdn: Option<&'a str>) -> FlowQuery<'a> {
        FlowQuery {
            src: key.src.ip(),
            dst: key.dst.ip(),
            dst_port: key.dst.port(),
            proto: key.proto,
            fqdn,
        }
    }
}

/// Why a flow was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// An AdminNetworkPolicy rule with `action: Deny` matched.
    AdminDeny,
    /// NetworkPolicies isolate the workload in this direction and none admitted the flow.
    NotAdmitted,
    /// A BaselineAdminNetworkPolicy rule with `action: Deny` matched.
    BaselineDeny,
    /// Nothing decided and `policy.default` is `deny`.
    DefaultDeny,
    /// Neither endpoint is a workload and `policy.unknown` is `deny`.
    Unknown,
}

impl Cause {
    pub const fn as_str(self) -> &'static str {
        match self {
            Cause::AdminDeny => "admin-deny",
            Cause::NotAdmitted => "not-admitted",
            Cause::BaselineDeny => "baseline-deny",
            Cause::DefaultDeny => "default-deny",
            Cause::Unknown => "unknown-endpoints",
        }
    }
}

/// A denial: which side refused (`None` for [`Cause::Unknown`]) and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DenyReason {
    pub direction: Option<Direction>,
    pub cause: Cause,
}

/// The outcome. A denial is a value, never an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny(DenyReason),
}

impl Verdict {
    pub const fn is_allow(self) -> bool {
        matches!(self, Verdict::Allow)
    }
}

/// The answer of [`CompiledPolicy::decide`]: `Copy`, no heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    pub verdict: Verdict,
    pub src_workload: Option<WorkloadId>,
    pub dst_workload: Option<WorkloadId>,
    /// The policy that decided: the ANP/BANP whose rule matched, the NetworkPolicy whose
    /// rule admitted, or (for [`Cause::NotAdmitted`]) the first isolating one. `None`
    /// when a default decided.
    pub policy: Option<PolicyId>,
    /// Set when an audit-mode policy would have denied this flow had it been enforced.
    pub would_deny: Option<PolicyId>,
}

/// Everything that must change together on a reload: the compiled tables (which include
/// the inventory and the defaults), their generation and where they came from.
#[derive(Debug)]
pub struct PolicySnapshot {
    pub compiled: CompiledPolicy,
    pub generation: Generation,
    /// Hex SHA-256 over the policy sources, for `/policy` and the audit trail.
    pub content_hash: String,
    pub loaded_at: SystemTime,
    /// The etcd revision the policy sources were read at (0 for the files source). Kept
    /// here so a revision is never shown with a policy it does not belong to; raised in
    /// place when a later revision holds the very same objects (nothing to recompile).
    pub source_revision: std::sync::atomic::AtomicI64,
}

/// The shared, lock-free handle through which the data path reads the current policy.
/// Readers call `load()` once per decision; the control plane `store`s a new snapshot.
pub type PolicyHandle = Arc<ArcSwap<PolicySnapshot>>;
