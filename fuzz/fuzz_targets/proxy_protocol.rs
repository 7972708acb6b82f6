#![no_main]
// Stub: being built.
libfuzzer_sys::fuzz_target!(|_data: &[u8]| {});
