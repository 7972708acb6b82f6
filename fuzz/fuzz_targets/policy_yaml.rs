#![no_main]
//! A policy file's bytes through the loader, as a reload reads each file
//! (`load::parse_policy_file`, errors and all); what it accepts is laid over the example
//! inventory and compiled (what the reloader does next), and linted (what `flowgate check`
//! does). Invariants: never panics; a refusal names at least one problem, every one in this
//! file; the same bytes give the same answer (the reloader's per-file cache relies on it);
//! every accepted policy's source is this file.
use std::path::Path;

use flowgate::policy::{CompiledPolicy, PolicySet, lint, load};

#[path = "../common/mod.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let file = Path::new("policies/fuzz.yaml");
    let first = load::parse_policy_file(data, file);
    assert_eq!(first, load::parse_policy_file(data, file), "same bytes, another answer");
    match first {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a refusal without a reason");
            assert!(errors.0.iter().all(|e| e.file == file));
            let _ = errors.to_string();
        }
        Ok(policies) => {
            assert!(policies.iter().all(|p| p.source == file));
            let set = PolicySet::new(common::example_set().inventory.as_ref().clone(), policies);
            let _ = lint::lint(&set, common::now());
            if let Err(e) = CompiledPolicy::compile(&set, &common::options()) {
                let _ = e.to_string();
            }
        }
    }
});
