//! The hot path: `CompiledPolicy::decide`.

use super::{CompiledPolicy, Decision, FlowQuery, reference};

impl CompiledPolicy {
    /// Decides one flow. No allocation, no lock.
    pub fn decide(&self, q: &FlowQuery<'_>) -> Decision {
        reference::decide(&self.set, &self.opts, q)
    }
}
