//! Compilation: [`PolicySet`] → [`CompiledPolicy`], every selector resolved.
//!
//! (Milestone 1: the tables are still the reference evaluator over a copy of the set;
//! the public API below is the one the runtime integrates against.)

use std::net::IpAddr;
use std::time::SystemTime;

use thiserror::Error;

use super::ir::{PolicyKind, PolicySet};
use super::{DefaultAction, PolicyId, WorkloadId, reference};
use crate::flow::Proto;

/// Inputs to compilation besides the policy set.
#[derive(Clone, Copy, Debug)]
pub struct CompileOptions {
    pub default: DefaultAction,
    pub unknown: DefaultAction,
    /// Policies that have expired by `now` are left out; TTLs without `created_at` count from it.
    pub now: SystemTime,
}

#[derive(Debug, Error)]
pub enum CompileError {
    #[error("policy {policy}: {message}")]
    Invalid { policy: String, message: String },
}

/// A workload's name, borrowed from the compiled tables. Displays as `ns/name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadName<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

impl std::fmt::Display for WorkloadName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The immutable, shareable result of compilation.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub(super) set: PolicySet,
    pub(super) opts: CompileOptions,
    names: Vec<String>,
    next_expiry: Option<SystemTime>,
}

impl CompiledPolicy {
    /// # Errors
    /// [`CompileError::Invalid`] when the set breaks an invariant of [`super::ir`].
    pub fn compile(set: &PolicySet, opts: &CompileOptions) -> Result<CompiledPolicy, CompileError> {
        let names = set.policies.iter().map(|p| p.display_name()).collect();
        let next_expiry = set
            .policies
            .iter()
            .filter_map(|p| reference::expires_at(p, opts.now))
            .filter(|at| *at > opts.now)
            .min();
        Ok(CompiledPolicy { set: set.clone(), opts: *opts, names, next_expiry })
    }

    pub fn workload_of(&self, ip: IpAddr) -> Option<WorkloadId> {
        reference::workload_of(&self.set, ip)
    }

    pub fn workload_name(&self, id: WorkloadId) -> Option<WorkloadName<'_>> {
        self.set
            .inventory
            .workloads
            .get(id.0 as usize)
            .map(|w| WorkloadName { namespace: &w.namespace, name: &w.name })
    }

    pub fn find_workload(&self, namespace: &str, name: &str) -> Option<WorkloadId> {
        self.set
            .inventory
            .workloads
            .iter()
            .position(|w| w.namespace == namespace && w.name == name)
            .map(|i| WorkloadId(i as u32))
    }

    pub fn workload_addr(&self, id: WorkloadId) -> Option<IpAddr> {
        self.set.inventory.workloads.get(id.0 as usize)?.addrs.first().map(|n| n.network())
    }

    pub fn named_port(&self, id: WorkloadId, name: &str, proto: Proto) -> Option<u16> {
        self.set
            .inventory
            .workloads
            .get(id.0 as usize)?
            .ports
            .iter()
            .find(|p| p.name == name && p.protocol == proto)
            .map(|p| p.port)
    }

    pub fn policy_name(&self, id: PolicyId) -> Option<&str> {
        self.names.get(id.0 as usize).map(String::as_str)
    }

    pub fn policy_kind(&self, id: PolicyId) -> Option<PolicyKind> {
        self.set.policies.get(id.0 as usize).map(|p| p.kind)
    }

    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.next_expiry
    }

    pub fn workload_count(&self) -> usize {
        self.set.inventory.workloads.len()
    }

    pub fn policy_count(&self) -> usize {
        self.set.policies.len()
    }

    pub fn options(&self) -> &CompileOptions {
        &self.opts
    }
}
