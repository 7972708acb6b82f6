//! Byte-literal fixtures, every truncation, every malformation the issue names, and
//! property tests (arbitrary bytes never panic; encode → parse round-trips).

use super::*;
use proptest::prelude::*;

const MAX: usize = DEFAULT_MAX_HEADER_LEN;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address literal")
}

fn addrs(src: &str, dst: &str) -> Addresses {
    Addresses { source: sa(src), destination: sa(dst) }
}

fn v2(
    command: Command,
    transport: Transport,
    a: Option<Addresses>,
    tlvs: &[(u8, &[u8])],
) -> Vec<u8> {
    let mut out = Vec::new();
    encode_v2(command, transport, a, tlvs, &mut out).expect("encodable");
    out
}

/// Every strict prefix of a valid header is "need more", never an error.
fn assert_every_prefix_incomplete(full: &[u8]) {
    for cut in 0..full.len() {
        assert_eq!(parse(&full[..cut], MAX), Ok(None), "prefix of {cut} bytes of {full:?}");
    }
}

#[test]
fn v1_tcp4_fixture() {
    let buf = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
    let (h, n) = parse(buf, MAX).unwrap().unwrap();
    assert_eq!(n, 45);
    assert_eq!(&buf[n..n + 3], b"GET");
    assert_eq!(h.version, Version::V1);
    assert_eq!(h.command, Command::Proxy);
    assert_eq!(h.family, Family::Inet);
    assert_eq!(h.transport, Transport::Stream);
    assert_eq!(h.addresses, Some(addrs("192.0.2.1:56324", "198.51.100.2:443")));
    assert_every_prefix_incomplete(&buf[..n]);
}

#[test]
fn v1_tcp6_fixture() {
    let buf = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n";
    let (h, n) = parse(buf, MAX).unwrap().unwrap();
    assert_eq!(n, buf.len());
    assert_eq!(h.family, Family::Inet6);
    assert_eq!(h.addresses, Some(addrs("[2001:db8::1]:65535", "[::1]:0")));
    assert_every_prefix_incomplete(buf);
}

#[test]
fn v1_unknown_ignores_the_rest_of_the_line() {
    for buf in [&b"PROXY UNKNOWN\r\n"[..], b"PROXY UNKNOWN whatever 1 2 3\r\nxx"] {
        let (h, n) = parse(buf, MAX).unwrap().unwrap();
        assert_eq!(h.addresses, None);
        assert_eq!(h.family, Family::Unspec);
        assert_eq!(&buf[n..], if buf.ends_with(b"xx") { &b"xx"[..] } else { b"" });
    }
}

#[test]
fn v1_longest_line_is_accepted_and_one_more_byte_is_not() {
    // The specification's worst case is UNKNOWN followed by two full-length IPv6
    // addresses and ports (107); the same with TCP6 is 104.
    let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let line = format!("PROXY UNKNOWN {ip} {ip} 65535 65535\r\n");
    assert_eq!(line.len(), V1_MAX_LEN);
    assert!(parse(line.as_bytes(), MAX).unwrap().is_some());
    let line = format!("PROXY TCP6 {ip} {ip} 65535 65535\r\n");
    let (h, n) = parse(line.as_bytes(), MAX).unwrap().unwrap();
    assert_eq!((n, h.family), (104, Family::Inet6));
    // UNKNOWN padded to 107 bytes is still fine; to 108 it is too long.
    let mut ok = b"PROXY UNKNOWN ".to_vec();
    ok.resize(V1_MAX_LEN - 2, b'x');
    ok.extend_from_slice(b"\r\n");
    assert!(parse(&ok, MAX).unwrap().is_some());
    let mut long = b"PROXY UNKNOWN ".to_vec();
    long.resize(V1_MAX_LEN - 1, b'x');
    long.extend_from_slice(b"\r\n");
    assert_eq!(parse(&long, MAX), Err(ParseError::V1TooLong));
    // Without a CRLF at all: incomplete until the limit, then too long.
    let mut endless = b"PROXY TCP4 ".to_vec();
    endless.resize(V1_MAX_LEN - 1, b'1');
    assert_eq!(parse(&endless, MAX), Ok(None));
    endless.push(b'1');
    assert_eq!(parse(&endless, MAX), Err(ParseError::V1TooLong));
}

#[test]
fn v1_malformed_lines() {
    use ParseError::*;
    let cases: &[(&[u8], ParseError)] = &[
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1BadLineEnd),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", V1BadLineEnd),
        (b"PROXY TCP4 1.2.3.4\n", V1BadLineEnd),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\t2\r\n", V1BadByte),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\0", V1BadByte),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xc3\xa9 2\r\n", V1BadByte),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", V1BadProtocol),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", V1BadProtocol),
        (b"PROXY UNKNOWNX\r\n", V1BadProtocol),
        (b"PROXY \r\n", V1BadProtocol),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", V1BadFields),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", V1BadFields),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", V1BadFields),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", V1BadFields),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", V1BadAddress),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", V1BadAddress),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", V1BadAddress),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", V1BadAddress),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", V1BadAddress),
        (b"PROXY TCP6 [::1] ::1 1 2\r\n", V1BadAddress),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n", V1BadPort),
        (b"PROXX TCP4", BadSignature),
        (b"proxy TCP4", BadSignature),
        (b"PROXYTCP4", BadSignature),
        (b"GET / HTTP/1.1\r\n", BadSignature),
        (b"\x16\x03\x01", BadSignature),
    ];
    for (buf, want) in cases {
        assert_eq!(parse(buf, MAX), Err(*want), "{:?}", String::from_utf8_lossy(buf));
    }
}

#[test]
fn v1_only_and_v2_only_refuse_each_other() {
    let h2 = v2(Command::Local, Transport::Stream, None, &[]);
    assert_eq!(parse_v1(&h2), Err(ParseError::BadSignature));
    assert_eq!(parse_v1(&h2[..1]), Err(ParseError::BadSignature));
    assert_eq!(parse_v2(b"PROXY UNKNOWN\r\n", MAX), Err(ParseError::BadSignature));
    assert_eq!(parse_v2(b"P", MAX), Err(ParseError::BadSignature));
    assert_eq!(parse_v1(b""), Ok(None));
    assert_eq!(parse_v2(b"", MAX), Ok(None));
}

#[test]
fn v2_tcp4_fixture() {
    // Written out by hand from the specification, not by our encoder.
    let mut buf = V2_SIGNATURE.to_vec();
    buf.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    buf.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb]);
    buf.extend_from_slice(b"payload");
    let (h, n) = parse(&buf, MAX).unwrap().unwrap();
    assert_eq!(n, 28);
    assert_eq!(&buf[n..], b"payload");
    assert_eq!(
        h,
        Header {
            version: Version::V2,
            command: Command::Proxy,
            family: Family::Inet,
            transport: Transport::Stream,
            addresses: Some(addrs("192.0.2.1:56324", "198.51.100.2:443")),
        }
    );
    assert_every_prefix_incomplete(&buf[..n]);
    assert_eq!(v2(Command::Proxy, Transport::Stream, h.addresses, &[]), buf[..n]);
}

#[test]
fn v2_udp6_with_tlvs() {
    let a = addrs("[2001:db8::7]:5353", "[2001:db8::1]:53");
    let buf = v2(
        Command::Proxy,
        Transport::Datagram,
        Some(a),
        &[(0x01, b"h2"), (0x04, b""), (0xEA, &[7; 300])],
    );
    let (h, n) = parse(&buf, MAX).unwrap().unwrap();
    assert_eq!(n, buf.len());
    assert_eq!(h.family, Family::Inet6);
    assert_eq!(h.transport, Transport::Datagram);
    assert_eq!(h.addresses, Some(a));
    assert_every_prefix_incomplete(&buf);
}

#[test]
fn v2_local_ignores_the_block() {
    // LOCAL with an undefined family byte and junk body: the spec says discard it.
    let mut buf = V2_SIGNATURE.to_vec();
    buf.extend_from_slice(&[0x20, 0xff, 0x00, 0x03, 1, 2, 3]);
    let (h, n) = parse(&buf, MAX).unwrap().unwrap();
    assert_eq!((h.command, h.addresses, n), (Command::Local, None, 19));
    let plain = v2(Command::Local, Transport::Unspec, None, &[]);
    assert_eq!(plain.len(), 16);
    assert_eq!(parse(&plain, MAX).unwrap().unwrap().0.command, Command::Local);
}

#[test]
fn v2_unspec_and_unix_carry_no_address() {
    let mut unspec = V2_SIGNATURE.to_vec();
    unspec.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
    let (h, _) = parse(&unspec, MAX).unwrap().unwrap();
    assert_eq!((h.family, h.command, h.addresses), (Family::Unspec, Command::Proxy, None));

    let mut unix = V2_SIGNATURE.to_vec();
    unix.extend_from_slice(&[0x21, 0x31, 0x00, 216]);
    unix.extend_from_slice(&[b'/'; 216]);
    let (h, n) = parse(&unix, MAX).unwrap().unwrap();
    assert_eq!((h.family, h.addresses, n), (Family::Unix, None, 232));
}

#[test]
fn v2_malformed_headers() {
    use ParseError::*;
    let head = |b12: u8, b13: u8, len: u16| {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(b12);
        v.push(b13);
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    let with_body = |mut h: Vec<u8>, body: &[u8]| {
        h.extend_from_slice(body);
        h
    };
    let cases: Vec<(Vec<u8>, ParseError)> = vec![
        // Bad signature at each of its bytes.
        (b"\r\n\r\n\0\r\nQUIT\r".to_vec(), BadSignature),
        (b"\r\r".to_vec(), BadSignature),
        (b"\r\n\r\n\x01".to_vec(), BadSignature),
        // Version and command, refused from the 13th byte on.
        (with_body(V2_SIGNATURE.to_vec(), &[0x11]), V2BadVersion(1)),
        (with_body(V2_SIGNATURE.to_vec(), &[0x31]), V2BadVersion(3)),
        (with_body(V2_SIGNATURE.to_vec(), &[0x22]), V2UnknownCommand(2)),
        (with_body(V2_SIGNATURE.to_vec(), &[0x2f]), V2UnknownCommand(15)),
        // Family, transport and their pairing.
        (with_body(head(0x21, 0x41, 12), &[0; 12]), V2UnknownFamily(4)),
        (with_body(head(0x21, 0xf1, 12), &[0; 12]), V2UnknownFamily(15)),
        (with_body(head(0x21, 0x13, 12), &[0; 12]), V2UnknownTransport(3)),
        (with_body(head(0x21, 0x10, 12), &[0; 12]), V2BadFamilyTransport(0x10)),
        (with_body(head(0x21, 0x01, 0), &[]), V2BadFamilyTransport(0x01)),
        // Wrong length: shorter than the family's address block.
        (with_body(head(0x21, 0x11, 11), &[0; 11]), V2AddressTooShort { need: 12, got: 11 }),
        (with_body(head(0x21, 0x21, 12), &[0; 12]), V2AddressTooShort { need: 36, got: 12 }),
        (with_body(head(0x21, 0x31, 0), &[]), V2AddressTooShort { need: 216, got: 0 }),
        // Oversized: refused from the length field alone, before the body arrives.
        (head(0x21, 0x11, 2000), V2TooLong { claimed: 2016, max: MAX }),
        (head(0x21, 0x11, 0xffff), V2TooLong { claimed: 0x1000f, max: MAX }),
        // TLVs running past the end: truncated TLV header, value longer than what is left.
        (with_body(head(0x21, 0x11, 13), &[0; 13]), V2TlvOverflow),
        (with_body(head(0x21, 0x11, 14), &[0; 14]), V2TlvOverflow),
        (
            with_body(head(0x21, 0x11, 15), &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]),
            V2TlvOverflow,
        ),
        (
            with_body(
                head(0x21, 0x11, 16),
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0],
            ),
            V2TlvOverflow,
        ),
        (with_body(head(0x21, 0x00, 4), &[1, 0, 2, 0]), V2TlvOverflow),
    ];
    for (buf, want) in &cases {
        assert_eq!(parse(buf, MAX), Err(*want), "{buf:02x?}");
    }
}

#[test]
fn v2_max_len_knob_is_exact() {
    let a = addrs("10.0.0.1:1", "10.0.0.2:2");
    let buf = v2(Command::Proxy, Transport::Stream, Some(a), &[(0xE0, &[0; 100])]);
    assert!(parse(&buf, buf.len()).unwrap().is_some());
    assert_eq!(
        parse(&buf, buf.len() - 1),
        Err(ParseError::V2TooLong { claimed: buf.len(), max: buf.len() - 1 })
    );
}

#[test]
fn encoder_refuses_what_it_cannot_write() {
    let mixed = addrs("10.0.0.1:1", "[::1]:2");
    let mut out = Vec::new();
    assert_eq!(encode_v1(Some(mixed), &mut out), Err(EncodeError::MixedFamilies));
    assert_eq!(
        encode_v2(Command::Proxy, Transport::Stream, Some(mixed), &[], &mut out),
        Err(EncodeError::MixedFamilies)
    );
    let big = vec![0u8; 65535];
    assert_eq!(
        encode_v2(Command::Proxy, Transport::Stream, None, &[(1, &big)], &mut out),
        Err(EncodeError::TooLong)
    );
    assert!(out.is_empty());
}

fn arb_addresses() -> impl Strategy<Value = Addresses> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>(), any::<[u8; 4]>(), any::<u16>()).prop_map(
            |(s, sp, d, dp)| Addresses {
                source: SocketAddr::new(IpAddr::from(s), sp),
                destination: SocketAddr::new(IpAddr::from(d), dp),
            }
        ),
        (any::<[u8; 16]>(), any::<u16>(), any::<[u8; 16]>(), any::<u16>()).prop_map(
            |(s, sp, d, dp)| Addresses {
                source: SocketAddr::new(IpAddr::from(s), sp),
                destination: SocketAddr::new(IpAddr::from(d), dp),
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..300), max in 0usize..2048) {
        if let Ok(Some((_, n))) = parse(&buf, max) {
            prop_assert!(n <= buf.len());
        }
    }

    #[test]
    fn bytes_after_a_signature_never_panic(v2sig in any::<bool>(), tail in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = if v2sig { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
        buf.extend_from_slice(&tail);
        if let Ok(Some((h, n))) = parse(&buf, MAX) {
            prop_assert!(n <= buf.len());
            // The consumed prefix alone parses to the same header.
            prop_assert_eq!(parse(&buf[..n], MAX), Ok(Some((h, n))));
        }
    }

    #[test]
    fn v1_round_trips(a in proptest::option::of(arb_addresses()), tail in proptest::collection::vec(any::<u8>(), 0..20)) {
        let mut buf = Vec::new();
        let n = encode_v1(a, &mut buf).unwrap();
        buf.extend_from_slice(&tail);
        let (h, m) = parse(&buf, MAX).unwrap().unwrap();
        prop_assert_eq!(m, n);
        prop_assert_eq!(h.addresses, a);
        prop_assert_eq!(h.version, Version::V1);
    }

    #[test]
    fn v2_round_trips(
        a in proptest::option::of(arb_addresses()),
        local in any::<bool>(),
        dgram in any::<bool>(),
        tlvs in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..5),
        tail in proptest::collection::vec(any::<u8>(), 0..20),
    ) {
        let command = if local { Command::Local } else { Command::Proxy };
        let transport = if dgram { Transport::Datagram } else { Transport::Stream };
        let tlv_refs: Vec<(u8, &[u8])> = tlvs.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        let mut buf = Vec::new();
        let n = encode_v2(command, transport, a, &tlv_refs, &mut buf).unwrap();
        buf.extend_from_slice(&tail);
        let (h, m) = parse(&buf, MAX).unwrap().unwrap();
        prop_assert_eq!(m, n);
        prop_assert_eq!(h.command, command);
        if local {
            prop_assert_eq!(h.addresses, None);
        } else {
            prop_assert_eq!(h.addresses, a);
            if a.is_some() { prop_assert_eq!(h.transport, transport); }
        }
    }
}
