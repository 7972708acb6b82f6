//! Compilation: [`PolicySet`] → [`CompiledPolicy`], every selector resolved. (Stub: being built.)

use std::time::SystemTime;

use thiserror::Error;

use super::ir::PolicySet;
use super::{Decision, DefaultAction, FlowQuery};

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

/// The immutable, shareable result of compilation.
#[derive(Debug)]
pub struct CompiledPolicy {
    _private: (),
}

impl CompiledPolicy {
    pub fn compile(
        _set: &PolicySet,
        _opts: &CompileOptions,
    ) -> Result<CompiledPolicy, CompileError> {
        todo!("policy engine")
    }

    pub fn decide(&self, _q: &FlowQuery<'_>) -> Decision {
        todo!("policy engine")
    }
}
