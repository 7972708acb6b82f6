//! PROXY protocol parsing cost per new connection: v1 and v2, IPv4 and IPv6, with and
//! without TLVs, plus the cheapest refusal (a bad signature). The parser runs once per
//! accepted connection on a listener with `proxy_protocol` on.
//!
//! `cargo bench --bench wire_proxy -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::wire::proxy_protocol::{
    Addresses, Command, DEFAULT_MAX_HEADER_LEN, Transport, encode_v1, encode_v2, parse,
};

fn addrs(src: &str, dst: &str) -> Addresses {
    Addresses {
        source: src.parse::<SocketAddr>().expect("bench address"),
        destination: dst.parse::<SocketAddr>().expect("bench address"),
    }
}

fn bench(c: &mut Criterion) {
    let v4 = addrs("198.18.10.20:54321", "10.0.0.1:443");
    let v6 = addrs("[2001:db8:1234:5678::abcd]:54321", "[2001:db8::1]:443");
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut b = Vec::new();
    encode_v1(Some(v4), &mut b).expect("encodable");
    cases.push(("v1_tcp4", b));
    let mut b = Vec::new();
    encode_v1(Some(v6), &mut b).expect("encodable");
    cases.push(("v1_tcp6", b));
    let mut b = Vec::new();
    encode_v2(Command::Proxy, Transport::Stream, Some(v4), &[], &mut b).expect("encodable");
    cases.push(("v2_tcp4", b));
    let mut b = Vec::new();
    let tlvs: &[(u8, &[u8])] = &[(0x01, b"h2"), (0x02, b"api.example.com"), (0x05, &[0xab; 32])];
    encode_v2(Command::Proxy, Transport::Stream, Some(v6), tlvs, &mut b).expect("encodable");
    cases.push(("v2_tcp6_3tlvs", b));
    cases.push(("reject_bad_signature", b"GET / HTTP/1.1\r\n".to_vec()));

    let mut g = c.benchmark_group("proxy_protocol_parse");
    for (name, mut bytes) in cases {
        // Payload behind the header, as on a real connection.
        bytes.extend_from_slice(&[0u8; 64]);
        g.bench_function(name, |bench| {
            bench.iter(|| parse(black_box(&bytes), DEFAULT_MAX_HEADER_LEN))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
