#![no_main]
//! `POST /emergency` bodies: the JSON as the handler reads it (`serde_json::from_slice`
//! into `EmergencyRequest`), checked and added by `Overlay::add` against the example
//! policy, then laid over it (`Overlay::apply`) and compiled, as the control plane's
//! reload does. Invariants: never panics; a refused request leaves the overlay as it was;
//! an accepted entry expires after it was created, within `emergency_max_ttl`, and the
//! overlay then holds exactly it.
use std::time::Duration;

use flowgate::control::emergency::{EmergencyRequest, Overlay, OverlayLimits};
use flowgate::policy::CompiledPolicy;

#[path = "../common/mod.rs"]
mod common;

const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<EmergencyRequest>(data) else { return };
    let limits = OverlayLimits { max_entries: 4, max_ttl: MAX_TTL };
    let Ok(mut overlay) = Overlay::open(None, limits, common::now()) else { return };
    let now = common::now();
    let current = common::example_set();
    match overlay.add(&req, current, now) {
        Err(e) => {
            assert!(overlay.entries().is_empty(), "a refused request changed the overlay");
            let _ = e.to_string();
        }
        Ok(entry) => {
            assert_eq!(overlay.entries(), std::slice::from_ref(&entry));
            assert!(entry.expires_at() > now);
            assert!(entry.expires_at() <= now + MAX_TTL);
            let _ = entry.describe();
            let mut set = current.clone();
            overlay.apply(&mut set, now);
            if let Err(e) = CompiledPolicy::compile(&set, &common::options()) {
                let _ = e.to_string();
            }
        }
    }
});
