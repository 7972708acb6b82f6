//! Loading the inventory and the policy directory into the IR. (Stub: being built.)

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::ir::PolicySet;

/// One problem in one input file, with enough context for a human to fix it.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{}: {}{}{message}", file.display(), object.as_deref().map(|o| format!("{o}: ")).unwrap_or_default(), field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct LoadError {
    pub file: PathBuf,
    /// `Kind ns/name` of the object, when the error is inside one.
    pub object: Option<String>,
    /// The field path inside the object, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: Option<String>,
    pub message: String,
}

/// Every problem found; loading reports them all at once.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{} error(s) in policy input", .0.len())]
pub struct LoadErrors(pub Vec<LoadError>);

/// Loads the policy directory (recursively) and the inventory. All or nothing.
pub fn load(_policy_dir: &Path, _inventory: &Path) -> Result<PolicySet, LoadErrors> {
    todo!("policy loader")
}
