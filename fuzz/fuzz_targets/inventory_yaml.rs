#![no_main]
//! The inventory file's bytes through the loader, as a reload reads it
//! (`load::parse_inventory_file`, errors and all); an accepted inventory is compiled with
//! the example policies (what the reloader does next). Invariants: never panics; a refusal
//! names at least one problem, every one in this file; the same bytes give the same answer.
use std::path::Path;

use flowgate::policy::{CompiledPolicy, PolicySet, load};

#[path = "../common/mod.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let file = Path::new("inventory.yaml");
    let first = load::parse_inventory_file(data, file);
    assert_eq!(first, load::parse_inventory_file(data, file), "same bytes, another answer");
    match first {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a refusal without a reason");
            assert!(errors.0.iter().all(|e| e.file == file));
            let _ = errors.to_string();
        }
        Ok(inventory) => {
            let set = PolicySet {
                inventory: std::sync::Arc::new(inventory),
                policies: common::example_set().policies.clone(),
            };
            if let Err(e) = CompiledPolicy::compile(&set, &common::options()) {
                let _ = e.to_string();
            }
        }
    }
});
