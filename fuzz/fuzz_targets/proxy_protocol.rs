//! PROXY protocol parser: arbitrary bytes and an arbitrary `max_len` never panic, and every
//! accepted header obeys the parser's contract:
//! - it occupies at most the input, and at most `max_len` (v2) or 107 bytes (v1);
//! - the consumed prefix alone parses to the same header, and every shorter prefix is
//!   "need more bytes" (so a reader that consumes on `Ok(None)` never eats payload);
//! - re-encoding the decoded addresses and parsing that gives the same addresses back.
#![no_main]

use flowgate::wire::proxy_protocol::{Command, V1_MAX_LEN, Version, encode_v1, encode_v2, parse};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&knob, input)) = data.split_first() else { return };
    let max_len = 16 + usize::from(knob) * 8;
    let Ok(Some((header, n))) = parse(input, max_len) else { return };
    assert!(n <= input.len());
    match header.version {
        Version::V1 => assert!(n <= V1_MAX_LEN),
        Version::V2 => assert!(n <= max_len),
    }
    assert_eq!(parse(&input[..n], max_len), Ok(Some((header, n))));
    for cut in 0..n {
        assert_eq!(parse(&input[..cut], max_len), Ok(None), "prefix {cut} of {n}");
    }
    let mut out = Vec::new();
    match header.version {
        Version::V1 => {
            encode_v1(header.addresses, &mut out).expect("decoded v1 addresses are encodable");
        }
        Version::V2 => {
            encode_v2(header.command, header.transport, header.addresses, &[], &mut out)
                .expect("decoded v2 addresses are encodable");
        }
    }
    let (again, m) =
        parse(&out, max_len.max(out.len())).expect("own output parses").expect("complete");
    assert_eq!(m, out.len());
    assert_eq!(again.addresses, header.addresses);
    if header.command == Command::Local {
        assert_eq!(again.command, Command::Local);
    }
});
