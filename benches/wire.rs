//! Parsers on the new-connection path, ns per parse, each beside a peer where one exists
//! (httparse for request heads, tls-parser for the ClientHello) so the ratio is measured
//! in the same run. Also the per-flow name normalisation and SSRF check.
//!
//! `cargo bench --bench wire -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::egress::name::Target;
use flowgate::egress::ssrf::Guard;
use flowgate::wire::http_connect::{Limits, parse_request};
use flowgate::wire::sni::{MAX_RECORD, build_client_hello, peek_client_hello};
use flowgate::wire::socks5::{Addr, Command, Greeting, Request};

const CURL_CONNECT: &[u8] = b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nUser-Agent: curl/8.5.0\r\nProxy-Connection: Keep-Alive\r\n\r\n";

const BROWSER_GET: &[u8] = b"GET http://www.example.com/assets/app.js?v=1234 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\nAccept: */*\r\nAccept-Language: en-GB,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\nReferer: http://www.example.com/\r\nConnection: keep-alive\r\nCookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\nCache-Control: no-cache\r\nPragma: no-cache\r\n\r\n";

fn httparse_peer(buf: &[u8]) -> usize {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n + req.path.map_or(0, str::len),
        _ => 0,
    }
}

fn http(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("http_connect");
    for (name, buf) in [("curl_connect", CURL_CONNECT), ("browser_get", BROWSER_GET)] {
        assert!(parse_request(buf, &limits).expect("valid").is_some());
        assert!(httparse_peer(buf) > 0);
        g.bench_function(format!("flowgate/{name}"), |b| {
            b.iter(|| parse_request(black_box(buf), &limits).map(|r| r.map(|r| r.port)))
        });
        g.bench_function(format!("httparse/{name}"), |b| b.iter(|| httparse_peer(black_box(buf))));
    }
    g.finish();
}

fn tls_parser_peer(buf: &[u8]) -> usize {
    use tls_parser::{
        TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extensions, parse_tls_plaintext,
    };
    let Ok((_, rec)) = parse_tls_plaintext(buf) else { return 0 };
    for m in &rec.msg {
        if let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) = m {
            let Ok((_, exts)) = parse_tls_extensions(ch.ext.unwrap_or(&[])) else { return 0 };
            for e in exts {
                if let TlsExtension::SNI(names) = e {
                    return names.first().map_or(0, |(_, n)| n.len());
                }
            }
        }
    }
    0
}

fn sni(c: &mut Criterion) {
    let mut g = c.benchmark_group("sni");
    for (name, pad) in [("hello_300B", 200usize), ("hello_1800B", 1700)] {
        let rec = build_client_hello(Some("api.example.com"), pad);
        assert_eq!(
            peek_client_hello(&rec, MAX_RECORD).expect("valid").and_then(|h| h.server_name),
            Some("api.example.com")
        );
        assert_eq!(tls_parser_peer(&rec), 15);
        g.bench_function(format!("flowgate/{name}"), |b| {
            b.iter(|| {
                peek_client_hello(black_box(&rec), MAX_RECORD).map(|h| h.map(|h| h.record_len))
            })
        });
        g.bench_function(format!("tls-parser/{name}"), |b| {
            b.iter(|| tls_parser_peer(black_box(&rec)))
        });
    }
    g.finish();
}

fn socks5(c: &mut Criterion) {
    let mut req = [0u8; 300];
    let n =
        Request { command: Command::Connect, addr: Addr::Domain(b"api.example.com"), port: 443 }
            .encode(&mut req)
            .expect("encodes");
    let req = &req[..n];
    let mut g = c.benchmark_group("socks5");
    g.bench_function("greeting", |b| {
        b.iter(|| Greeting::parse(black_box(&[5, 2, 0, 2])).map(|g| g.map(|g| g.1)))
    });
    g.bench_function("request_domain", |b| {
        b.iter(|| Request::parse(black_box(req)).map(|r| r.map(|r| r.1)))
    });
    g.finish();
}

fn name_and_guard(c: &mut Criterion) {
    let guard = Guard::default();
    let mut g = c.benchmark_group("egress_name");
    for (name, host) in
        [("ascii", "API.Example.com."), ("inet_aton", "0x7f.1"), ("idna", "bücher.example")]
    {
        g.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| Target::parse(black_box(host)).is_ok())
        });
    }
    let addrs = [
        "8.8.8.8".parse().expect("ip"),
        "::ffff:10.0.0.1".parse().expect("ip"),
        "2606:4700::1111".parse().expect("ip"),
    ];
    g.bench_function("ssrf_check/3_addrs", |b| {
        b.iter(|| addrs.iter().filter(|a| guard.check(black_box(**a)).is_ok()).count())
    });
    g.finish();
}

criterion_group!(benches, http, sni, socks5, name_and_guard);
criterion_main!(benches);
