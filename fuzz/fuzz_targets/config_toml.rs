#![no_main]
//! The config file through `Config::parse` and `Config::validate`, as `Config::load` runs
//! them (text that is not UTF-8 is refused before, by `read_to_string`). Invariants: never
//! panics; parsing is deterministic; an error message is never empty.
use flowgate::config::Config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text) {
        Err(message) => assert!(!message.is_empty()),
        Ok(cfg) => {
            if let Err(e) = cfg.validate() {
                assert!(!e.to_string().is_empty());
            }
        }
    }
});
