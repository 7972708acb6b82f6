#![no_main]
//! Invariants: never panics; a parsed request has a non-zero port and a head no longer
//! than the input; the head alone parses to the same request, and one byte less of it is
//! "need more", never an error (so the parser cannot refuse a slow but valid client).
use flowgate::wire::http_connect::{Limits, parse_request};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(Some(r)) = parse_request(data, &limits) {
        assert!(r.port != 0);
        let n = r.head.head_len;
        assert!(n <= data.len() && n <= limits.max_head);
        assert_eq!(parse_request(&data[..n], &limits), Ok(Some(r)));
        assert_eq!(parse_request(&data[..n - 1], &limits), Ok(None));
    }
});
