//! Table-driven: every special range, sampled at its first, middle and last address,
//! written in every spelling a client can use, through the same name parser the
//! listeners use. Each external control is checked in the same spellings, so a guard that
//! refused everything would fail too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;
use crate::egress::name::Target;

/// Every way to write `a` that some resolver or `inet_aton` reads as `a` (directly).
fn v4_spellings(a: Ipv4Addr) -> Vec<String> {
    let [b0, b1, b2, b3] = a.octets();
    let n = u32::from(a);
    vec![
        a.to_string(),
        format!("{a}."),
        n.to_string(),
        format!("0x{n:08x}"),
        format!("0X{n:X}"),
        format!("0{n:o}"),
        format!("0{b0:o}.0{b1:o}.0{b2:o}.0{b3:o}"),
        format!("0x{b0:x}.0x{b1:x}.0x{b2:x}.0x{b3:x}"),
        format!("{b0}.{b1}.{}", (u32::from(b2) << 8) | u32::from(b3)),
        format!("{b0}.{}", n & 0x00ff_ffff),
        format!("0x{b0:x}.{}", n & 0x00ff_ffff),
        format!("[::ffff:{a}]"),
        format!("[::FFFF:{:x}:{:x}]", n >> 16, n & 0xffff),
        format!("::ffff:{a}"),
    ]
}

/// The IPv6 forms that embed `a`, with how.
fn v6_embeddings(a: Ipv4Addr) -> Vec<(String, Embedding)> {
    let n = u32::from(a);
    vec![
        (format!("[64:ff9b::{a}]"), Embedding::Nat64),
        (format!("[64:ff9b::{:x}:{:x}]", n >> 16, n & 0xffff), Embedding::Nat64),
        (format!("[2002:{:x}:{:x}::1]", n >> 16, n & 0xffff), Embedding::SixToFour),
        (format!("[::{a}]"), Embedding::Compatible),
    ]
}

fn parse_addr(s: &str) -> IpAddr {
    match Target::parse(s) {
        Ok(Target::Addr(a)) => a,
        other => panic!("{s:?} should parse as an address: {other:?}"),
    }
}

fn samples_v4(r: &SpecialRange) -> Vec<Ipv4Addr> {
    let base = r.bits as u32;
    let size = if r.prefix == 0 { u32::MAX } else { (1u64 << (32 - r.prefix)) as u32 - 1 };
    let mut v = vec![base, base | size, base | (size / 2 + 1).min(size)];
    v.dedup();
    v.into_iter().map(Ipv4Addr::from).collect()
}

fn samples_v6(r: &SpecialRange) -> Vec<Ipv6Addr> {
    let base = r.bits;
    let size = if r.prefix == 128 { 0 } else { u128::MAX >> r.prefix };
    let mut v = vec![base, base | size, base | (size / 3)];
    v.dedup();
    v.into_iter().map(Ipv6Addr::from).collect()
}

/// The most specific name for `a` in the v4 table.
fn expected_v4(a: Ipv4Addr) -> &'static str {
    classify_v4(a).expect("sample lies in a special range").name
}

#[test]
fn tables_say_what_their_cidr_says() {
    for r in V4_RANGES.iter().chain(V6_RANGES) {
        let net: IpNet = r.cidr.parse().unwrap_or_else(|e| panic!("{}: {e}", r.cidr));
        assert_eq!(net.prefix_len(), r.prefix, "{}", r.cidr);
        let bits = match net.network() {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        assert_eq!(bits, r.bits, "{}", r.cidr);
        assert_eq!(net.network(), net.addr(), "{} is a network address", r.cidr);
    }
}

#[test]
fn every_v4_range_in_every_spelling() {
    let guard = Guard::default();
    let mut checked = 0;
    for r in V4_RANGES {
        for a in samples_v4(r) {
            let want = expected_v4(a);
            for s in v4_spellings(a) {
                let ip = parse_addr(&s);
                let refusal = guard.check(ip).expect_err(&s);
                assert_eq!(refusal.range.name, want, "{s:?} → {refusal}");
                checked += 1;
            }
            for (s, how) in v6_embeddings(a) {
                let ip = parse_addr(&s);
                let refusal = guard.check(ip).expect_err(&s);
                // `::0.0.0.0` and `::0.0.0.1` are `::` and `::1` themselves.
                if how == Embedding::Compatible && u32::from(a) <= 1 {
                    continue;
                }
                assert_eq!(refusal.range.name, want, "{s:?} → {refusal}");
                assert_eq!(refusal.embedded, Some((how, a)), "{s:?}");
                checked += 1;
            }
        }
    }
    assert!(checked > 700, "{checked}");
}

#[test]
fn every_v6_range_in_every_spelling() {
    let guard = Guard::default();
    for r in V6_RANGES {
        for a in samples_v6(r) {
            for s in
                [a.to_string(), format!("[{a}]"), format!("[{}]", a.to_string().to_uppercase())]
            {
                let ip = parse_addr(&s);
                let refusal = guard.check(ip).expect_err(&s);
                // A sample may fall in a nested, more specific range (::1 in ::/8).
                let specific = V6_RANGES.iter().find(|x| x.contains_v6(a)).unwrap();
                if refusal.embedded.is_none() {
                    assert_eq!(refusal.range, specific, "{s:?} → {refusal}");
                }
            }
        }
    }
}

#[test]
fn named_cases_from_the_issue() {
    let guard = Guard::default();
    let cases = [
        ("2130706433", "loopback"),
        ("0177.0.0.1", "loopback"),
        ("0x7f.1", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("169.254.169.254.", "cloud-metadata"),
        ("0xa9fea9fe", "cloud-metadata"),
        ("[fd00:ec2::254]", "cloud-metadata"),
        ("[::ffff:169.254.169.254]", "cloud-metadata"),
        ("10.0.0.1", "private"),
        ("100.64.0.1", "cgnat"),
        ("[fe80::1]", "link-local"),
        ("[fd12:3456::1]", "unique-local"),
        ("[ff02::1]", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("0.1.2.3", "this-network"),
        ("0", "unspecified"),
        ("[::]", "unspecified"),
        ("[::1]", "loopback"),
        ("192.0.2.1", "documentation"),
        ("[2001:db8::1]", "documentation"),
        ("198.19.255.255", "benchmarking"),
        ("192.0.0.8", "ietf-protocol"),
        ("[64:ff9b:1::a00:1]", "nat64-local"),
        ("[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "teredo"),
        ("[::8.8.8.8]", "reserved"),
    ];
    for (s, want) in cases {
        let r = guard.check(parse_addr(s)).expect_err(s);
        assert_eq!(r.range.name, want, "{s} → {r}");
    }
}

#[test]
fn external_addresses_pass_in_every_spelling() {
    let guard = Guard::default();
    let edges = [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "1.0.0.0",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.255",
        "192.0.3.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
    ];
    for e in edges {
        let a: Ipv4Addr = e.parse().unwrap();
        for s in v4_spellings(a) {
            assert_eq!(guard.check(parse_addr(&s)), Ok(()), "{s:?}");
        }
        for (s, how) in v6_embeddings(a) {
            let res = guard.check(parse_addr(&s));
            if how == Embedding::Compatible {
                assert!(res.is_err(), "deprecated compatible form {s:?} is refused");
            } else {
                assert_eq!(res, Ok(()), "{s:?}");
            }
        }
    }
    for s in ["2606:4700::1111", "[2a00:1450:4001::200e]", "2001:4860:4860::8888", "2001:200::1"] {
        assert_eq!(guard.check(parse_addr(s)), Ok(()), "{s:?}");
    }
}

#[test]
fn treat_as_external_lifts_exactly_its_ranges() {
    let guard = Guard::new(SsrfConfig {
        enabled: true,
        treat_as_external: vec!["127.0.0.2/32".parse().unwrap(), "10.0.0.0/8".parse().unwrap()],
    });
    for s in ["127.0.0.2", "0x7f000002", "127.2", "[::ffff:127.0.0.2]", "10.1.2.3", "012.1"] {
        assert_eq!(guard.check(parse_addr(s)), Ok(()), "{s}");
    }
    for s in ["127.0.0.1", "127.0.0.3", "[64:ff9b::127.0.0.2]", "[::1]", "172.16.0.1", "11.0.0.1.0"]
    {
        if let Ok(Target::Addr(ip)) = Target::parse(s) {
            if s != "11.0.0.1.0" {
                assert!(guard.check(ip).is_err(), "{s}");
            }
        } else {
            assert_eq!(s, "11.0.0.1.0", "only the invalid spelling fails to parse");
        }
    }
    let off = Guard::new(SsrfConfig { enabled: false, treat_as_external: vec![] });
    assert_eq!(off.check(parse_addr("169.254.169.254")), Ok(()));
}

#[test]
fn refusal_reads_well_in_a_log() {
    let r = Guard::default().check(parse_addr("[::ffff:127.0.0.1]")).unwrap_err();
    assert_eq!(r.to_string(), "loopback (127.0.0.0/8) via ipv4-mapped 127.0.0.1");
    let r = Guard::default().check(parse_addr("10.0.0.1")).unwrap_err();
    assert_eq!(r.to_string(), "private (10.0.0.0/8)");
}

#[test]
fn config_parses_with_defaults() {
    let c: SsrfConfig = toml::from_str("").unwrap();
    assert_eq!(c, SsrfConfig::default());
    assert!(c.enabled);
    let c: SsrfConfig =
        toml::from_str("treat_as_external = [\"127.0.0.2/32\", \"::1/128\"]").unwrap();
    assert_eq!(c.treat_as_external.len(), 2);
    assert!(toml::from_str::<SsrfConfig>("treat_as_external = [\"127.0.0.300/32\"]").is_err());
    assert!(toml::from_str::<SsrfConfig>("enable = false").is_err());
}
