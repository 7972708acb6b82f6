#![no_main]
//! Invariants: never panics; a classified packet's offsets lie within the buffer
//! (`l4_offset <= ip_len <= len`); the verdict depends only on the IP packet, not on
//! link padding after it (the same bytes cut at `ip_len` classify the same); a strict
//! prefix of a classified packet never claims more bytes than it was given; and a
//! later fragment or ICMP error never carries ports it could not have read.
use flowgate::dataplane::packet::classify::{Kind, classify};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(c) = classify(data) else { return };
    assert!(c.l4_offset <= c.ip_len && c.ip_len <= data.len());
    assert_eq!(classify(&data[..c.ip_len]), Ok(c), "padding changed the verdict");
    if let Kind::Fragment { .. } = c.kind {
        assert_eq!((c.key.src.port(), c.key.dst.port()), (0, 0));
    }
    for cut in [0, c.l4_offset / 2, c.l4_offset, c.ip_len.saturating_sub(1)] {
        if cut < c.ip_len {
            if let Ok(p) = classify(&data[..cut]) {
                assert!(p.ip_len <= cut, "a prefix of {cut} bytes claims {}", p.ip_len);
            }
        }
    }
});
