//! What several targets share: the project's example policy (config/inventory.yaml and
//! config/policies/), loaded once through the same loader the gateway uses, as the
//! "current policy" an input is checked against.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowgate::policy::compile::CompileOptions;
use flowgate::policy::ir::PolicySet;
use flowgate::policy::{CompiledPolicy, DefaultAction, Generation, PolicySnapshot, load};

/// A fixed clock: a run's result depends on its input alone (no flaky reproducers).
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

/// The example policy set (inventory + policies), as the loader returns it.
pub fn example_set() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = config_dir();
        load::load(&dir.join("policies"), &dir.join("inventory.yaml"))
            .unwrap_or_else(|e| panic!("the example policy in config/ must load: {e}"))
    })
}

/// The options the reloader compiles with (`[policy] default = deny`, unknown too).
pub fn options() -> CompileOptions {
    CompileOptions { default: DefaultAction::Deny, unknown: DefaultAction::Deny, now: now() }
}

/// The example policy compiled, as the admin API reads it.
pub fn example_snapshot() -> &'static PolicySnapshot {
    static SNAP: OnceLock<PolicySnapshot> = OnceLock::new();
    SNAP.get_or_init(|| PolicySnapshot {
        compiled: CompiledPolicy::compile(example_set(), &options())
            .unwrap_or_else(|e| panic!("the example policy in config/ must compile: {e}")),
        generation: Generation(1),
        content_hash: String::new(),
        loaded_at: now(),
        source_revision: Default::default(),
    })
}
