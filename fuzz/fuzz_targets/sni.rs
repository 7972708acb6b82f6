#![no_main]
//! Invariants: never panics; a found name lies inside the first record and is made of
//! LDH characters; one byte less of the record is "need more"; the HTTP Host peek never
//! panics either.
use flowgate::wire::http_connect::Limits;
use flowgate::wire::sni::{MAX_RECORD, peek_client_hello, peek_http_host};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = peek_client_hello(data, MAX_RECORD) {
        assert!(h.record_len <= data.len());
        if let Some(name) = h.server_name {
            assert!(!name.is_empty());
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
        }
        assert_eq!(peek_client_hello(&data[..h.record_len - 1], MAX_RECORD), Ok(None));
    }
    let _ = peek_http_host(data, &Limits::default());
});
