//! The fuzz targets' invariants (fuzz/fuzz_targets/*.rs), run in CI as property tests:
//! valid messages mutated byte by byte, truncated and extended, plus random bytes. The
//! libFuzzer targets explore further; these keep the invariants checked on every build.

use flowgate::egress::Target;
use flowgate::egress::ssrf::Guard;
use flowgate::wire::http_connect::{
    Limits, basic_credentials, parse_head, parse_request, write_origin_form,
};
use flowgate::wire::sni::{MAX_RECORD, build_client_hello, peek_client_hello, peek_http_host};
use flowgate::wire::socks5::{Greeting, Request, UdpHeader, UserPass};
use proptest::prelude::*;

const HTTP_SEEDS: &[&[u8]] = &[
    b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nUser-Agent: curl/8\r\n\r\n",
    b"GET http://a.example:8080/x?y HTTP/1.1\r\nHost: a.example:8080\r\nProxy-Authorization: Basic dTpw\r\n\r\n",
    b"CONNECT [::1]:443 HTTP/1.0\r\n\r\n",
];

const SOCKS_SEEDS: &[&[u8]] = &[
    b"\x05\x02\x00\x02",
    b"\x01\x07billing\x06s3cret",
    b"\x05\x01\x00\x03\x0bexample.com\x01\xbb",
    b"\x05\x03\x00\x04\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01\x00\x35",
    b"\x00\x00\x00\x01\x0a\x00\x00\x01\x00\x35payload",
];

/// A seed with some bytes replaced, then cut or extended.
fn mutated(seeds: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    // Half the inputs keep their full length, so the "parsed" branch and its invariants
    // are exercised often, not only the truncated ones.
    (
        0..seeds.len(),
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        prop::option::of(any::<usize>()),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(move |(i, flips, cut, tail)| {
            let mut v = seeds[i].to_vec();
            for (at, b) in flips {
                let n = v.len();
                v[at % n] = b;
            }
            if let Some(cut) = cut {
                v.truncate(cut % (v.len() + 1));
                v.extend(tail);
            }
            v
        })
}

fn check_http(data: &[u8]) {
    let limits = Limits::default();
    if let Ok(Some(r)) = parse_request(data, &limits) {
        assert!(r.port != 0);
        let n = r.head.head_len;
        assert!(n <= data.len());
        assert_eq!(parse_request(&data[..n], &limits), Ok(Some(r)));
        assert_eq!(parse_request(&data[..n - 1], &limits), Ok(None));
        // The head forwarded upstream for an absolute-form request is a valid head.
        if let Some(v) = r.proxy_authorization {
            let mut creds = [0u8; 512];
            if let Some((user, pass)) = basic_credentials(v, &mut creds) {
                assert!(user.len() + pass.len() < v.len());
            }
        }
        let mut out = Vec::new();
        if write_origin_form(&r, &mut out) > 0 {
            let big =
                Limits { max_head: 64 * 1024, max_request_line: 64 * 1024, max_headers: 1024 };
            let h = parse_head(&out, &big).expect("origin form parses").expect("complete");
            assert_eq!(h.head_len, out.len());
        }
        // Whatever the head named, normalising it never panics, and an address it names
        // is classified.
        if let Ok(Target::Addr(a)) = Target::from_http(r.host) {
            let _ = Guard::default().check(a);
        }
    }
    let _ = peek_http_host(data, &limits);
}

fn check_socks(data: &[u8]) {
    let mut out = [0u8; 600];
    if let Ok(Some((g, n))) = Greeting::parse(data) {
        assert_eq!(g.methods.len() + 2, n);
    }
    if let Ok(Some((up, n))) = UserPass::parse(data) {
        let m = up.encode(&mut out).expect("re-encodes");
        assert_eq!(&out[..m], &data[..n]);
    }
    if let Ok(Some((r, n))) = Request::parse(data) {
        let m = r.encode(&mut out).expect("re-encodes");
        assert_eq!(&out[..m], &data[..n]);
        assert_eq!(Request::parse(&data[..n - 1]), Ok(None));
        let _ = Target::from_socks(r.addr);
    }
    if let Ok(h) = UdpHeader::parse(data) {
        let m = UdpHeader::encode(h.addr, h.port, &mut out).expect("re-encodes");
        assert_eq!(m + h.payload.len(), data.len());
    }
}

fn check_sni(data: &[u8]) {
    if let Ok(Some(h)) = peek_client_hello(data, MAX_RECORD) {
        assert!(h.record_len <= data.len());
        assert_eq!(peek_client_hello(&data[..h.record_len - 1], MAX_RECORD), Ok(None));
        if let Some(name) = h.server_name {
            assert!(
                !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn http_mutations(data in mutated(HTTP_SEEDS)) { check_http(&data); }

    #[test]
    fn socks_mutations(data in mutated(SOCKS_SEEDS)) { check_socks(&data); }

    #[test]
    fn sni_mutations(
        name in "[a-z0-9.-]{1,40}",
        pad in 0usize..300,
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in any::<usize>(),
    ) {
        let mut rec = build_client_hello(Some(&name), pad);
        if flips.is_empty() {
            let h = peek_client_hello(&rec, MAX_RECORD).expect("valid").expect("complete");
            prop_assert_eq!(h.server_name, Some(name.as_str()));
        }
        for (at, b) in flips {
            let n = rec.len();
            rec[at % n] = b;
        }
        rec.truncate(cut % (rec.len() + 1));
        check_sni(&rec);
    }

    #[test]
    fn random_bytes(data in prop::collection::vec(any::<u8>(), 0..300)) {
        check_http(&data);
        check_socks(&data);
        check_sni(&data);
        if let Ok(s) = std::str::from_utf8(&data)
            && let Ok(Target::Addr(a)) = Target::parse(s)
        {
            let _ = Guard::default().check(a);
        }
    }

    #[test]
    fn every_ipv4_spelling_agrees(a in any::<u32>()) {
        // Decimal, hex and dotted forms of one address parse to that address, and the
        // guard's answer is the same for all of them (the SSRF property, sampled widely).
        let ip = std::net::Ipv4Addr::from(a);
        let forms = [ip.to_string(), a.to_string(), format!("0x{a:x}"), format!("0{a:o}"), format!("[::ffff:{ip}]")];
        let g = Guard::default();
        let want = g.check(ip.into()).is_ok();
        for f in forms {
            match Target::parse(&f) {
                Ok(Target::Addr(x)) => {
                    prop_assert_eq!(x.to_canonical(), std::net::IpAddr::V4(ip), "{}", f);
                    prop_assert_eq!(g.check(x).is_ok(), want, "{}", f);
                }
                other => prop_assert!(false, "{} → {:?}", f, other),
            }
        }
    }
}
