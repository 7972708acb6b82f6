#![no_main]
//! Invariants: never panics; a parsed request has a non-zero port and a head no longer
//! than the input; the head alone parses to the same request, and one byte less of it is
//! "need more", never an error (so the parser cannot refuse a slow but valid client); the
//! origin-form head written for upstream is itself a valid, complete head.
use flowgate::wire::http_connect::{
    Limits, basic_credentials, parse_head, parse_request, write_origin_form,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(Some(r)) = parse_request(data, &limits) {
        assert!(r.port != 0);
        let n = r.head.head_len;
        assert!(n <= data.len() && n <= limits.max_head);
        assert_eq!(parse_request(&data[..n], &limits), Ok(Some(r)));
        assert_eq!(parse_request(&data[..n - 1], &limits), Ok(None));
        if let Some(v) = r.proxy_authorization {
            let mut creds = [0u8; 512];
            if let Some((user, pass)) = basic_credentials(v, &mut creds) {
                assert!(user.len() + pass.len() < v.len());
            }
        }
        let mut out = Vec::new();
        if write_origin_form(&r, &mut out) > 0 {
            let big = Limits { max_head: 1 << 20, max_request_line: 1 << 20, max_headers: 1 << 16 };
            let h = parse_head(&out, &big).expect("origin form parses").expect("complete");
            assert_eq!(h.head_len, out.len());
        }
    }
});
