#![no_main]
//! `GET /explain?…` query strings, answered against the example policy by the admin
//! handler's own function (`flowgate::fuzzing::admin_explain`: percent-decoding, the
//! endpoint, port and protocol parsers of `policy::simulate`, resolution and
//! `CompiledPolicy::explain`). Invariants: never panics; a refusal has a message; an
//! answer is a JSON object that carries the generation.
#[path = "../common/mod.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else { return };
    match flowgate::fuzzing::admin_explain(common::example_snapshot(), query) {
        Err(message) => assert!(!message.is_empty()),
        Ok(v) => assert_eq!(v.get("generation").and_then(|g| g.as_u64()), Some(1), "{v}"),
    }
});
