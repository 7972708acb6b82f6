//! `[control]`: reload debounce, audit log, revalidation batches, the emergency overlay.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// `[control]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Quiet time after a change that may leave a file incomplete (a create, a write still
    /// open, a removal) before reloading. Default `50ms`.
    #[serde(with = "crate::human_duration")]
    pub debounce: Duration,
    /// Append audit events (one JSON line per reload attempt) to this file; default: stderr.
    pub audit_log: Option<PathBuf>,
    /// Entries re-checked between yields during revalidation. Default 4096.
    pub revalidate_batch: usize,
    /// Keep emergency policies in this JSON file so they survive a restart; default: none
    /// (memory only).
    pub emergency_state: Option<PathBuf>,
    /// Most emergency entries active at once. Default 64.
    pub emergency_max: usize,
    /// Longest TTL an emergency entry may have. Default `24h`.
    #[serde(with = "crate::human_duration")]
    pub emergency_max_ttl: Duration,
    /// Watch the policy sources for changes. Default true.
    pub watch: bool,
    /// Quiet time after a change that leaves a policy file or the inventory whole (renamed
    /// into place, written and closed) before reloading: gathers a machine-made burst into
    /// one reload. Default `5ms`; set it to `debounce` to wait alike for every change.
    #[serde(with = "crate::human_duration")]
    pub settle: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            debounce: Duration::from_millis(50),
            audit_log: None,
            revalidate_batch: 4096,
            emergency_state: None,
            emergency_max: 64,
            emergency_max_ttl: Duration::from_secs(24 * 3600),
            watch: true,
            settle: Duration::from_millis(5),
        }
    }
}

impl ControlConfig {
    /// Makes relative paths relative to the config file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.audit_log, &mut self.emergency_state].into_iter().flatten() {
            *p = base.join(&*p);
        }
    }
}
