//! Real loopback sockets: a client task writes (whole, split, byte by byte, too slowly),
//! the accepted side reads the header, and the test checks the client address, the error,
//! and that the payload behind the header is untouched.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::wire::proxy_protocol::{Addresses, encode_v1, encode_v2};

const LOOPBACK: &str = "127.0.0.0/8";

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().expect("test CIDR literal")).collect()
}

fn addrs(src: &str, dst: &str) -> Addresses {
    Addresses {
        source: src.parse().expect("test address"),
        destination: dst.parse().expect("test address"),
    }
}

fn v2_stream(a: Addresses) -> Vec<u8> {
    let mut out = Vec::new();
    encode_v2(Command::Proxy, Transport::Stream, Some(a), &[(0x05, b"unique-id")], &mut out)
        .expect("encodable");
    out
}

fn v1(a: Addresses) -> Vec<u8> {
    let mut out = Vec::new();
    encode_v1(Some(a), &mut out).expect("encodable");
    out
}

/// How the client side sends its bytes.
#[derive(Clone, Copy)]
enum Pace {
    Whole,
    /// One byte at a time with this pause between bytes.
    Bytewise(Duration),
}

/// Connects a client that sends `bytes` at `pace` and then keeps the connection open for a
/// while; returns the accepted server side and its peer address.
async fn pair(bytes: Vec<u8>, pace: Pace) -> (TcpStream, SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let client = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.expect("connect loopback");
        s.set_nodelay(true).expect("nodelay");
        match pace {
            Pace::Whole => {
                let _ = s.write_all(&bytes).await;
            }
            Pace::Bytewise(gap) => {
                for b in bytes {
                    if s.write_all(&[b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(gap).await;
                }
            }
        }
        // Keep the socket open so the server sees a stalled, not a closed, peer.
        tokio::time::sleep(Duration::from_secs(3)).await;
    });
    let (server, peer) = listener.accept().await.expect("accept");
    (server, peer, client)
}

async fn read_with(
    bytes: Vec<u8>,
    pace: Pace,
    mode: ProxyProtocolMode,
    trusted: &[&str],
    timeout: Duration,
) -> (Result<ProxiedClient, HeaderError>, TcpStream) {
    let (mut server, peer, client) = pair(bytes, pace).await;
    let r =
        read_header(&mut server, mode, peer, &nets(trusted), timeout, DEFAULT_MAX_HEADER_LEN).await;
    // Not aborted: the client may still have payload to send; the runtime drops it at the
    // end of the test.
    drop(client);
    (r, server)
}

/// Reads whatever follows the header (the client sent it all at once).
async fn rest(server: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(2), server.read_exact(&mut v))
        .await
        .expect("payload in time")
        .expect("payload");
    v
}

#[tokio::test]
async fn v2_header_gives_the_client_and_leaves_the_payload() {
    let a = addrs("198.18.7.9:40000", "127.0.0.1:8080");
    let mut bytes = v2_stream(a);
    bytes.extend_from_slice(b"hello upstream");
    let (r, mut server) =
        read_with(bytes, Pace::Whole, ProxyProtocolMode::V2, &[LOOPBACK], Duration::from_secs(2))
            .await;
    let got = r.expect("valid header");
    assert_eq!(got.client, ClientAddr(a.source));
    assert_eq!(got.header.map(|h| h.version), Some(proxy_protocol::Version::V2));
    assert_eq!(rest(&mut server, 14).await, b"hello upstream");
}

#[tokio::test]
async fn v1_header_any_mode_and_payload_untouched() {
    let a = addrs("[2001:db8::5]:1234", "[::1]:80");
    let mut bytes = v1(a);
    bytes.extend_from_slice(b"PROXY looks like a header but is payload\r\n");
    for mode in [ProxyProtocolMode::V1, ProxyProtocolMode::Any] {
        let (r, mut server) =
            read_with(bytes.clone(), Pace::Whole, mode, &[LOOPBACK], Duration::from_secs(2)).await;
        assert_eq!(r.expect("valid header").client, ClientAddr(a.source));
        assert_eq!(rest(&mut server, 42).await, b"PROXY looks like a header but is payload\r\n");
    }
}

#[tokio::test]
async fn bytewise_header_within_the_deadline_is_fine() {
    let a = addrs("198.18.1.1:9", "127.0.0.1:1");
    let mut bytes = v2_stream(a);
    bytes.extend_from_slice(b"x");
    let (r, mut server) = read_with(
        bytes,
        Pace::Bytewise(Duration::from_millis(2)),
        ProxyProtocolMode::Any,
        &[LOOPBACK],
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(r.expect("valid header").client, ClientAddr(a.source));
    assert_eq!(rest(&mut server, 1).await, b"x");
}

#[tokio::test]
async fn slowloris_is_cut_at_the_whole_header_deadline() {
    // Every gap (40 ms) is far below the deadline (300 ms), so only a whole-header deadline
    // can fire: 28+ bytes take over a second.
    let bytes = v2_stream(addrs("198.18.1.1:9", "127.0.0.1:1"));
    for (mode, bytes) in [
        (ProxyProtocolMode::V2, bytes),
        (ProxyProtocolMode::V1, v1(addrs("198.18.1.1:9", "127.0.0.1:1"))),
    ] {
        let (r, _) = read_with(
            bytes,
            Pace::Bytewise(Duration::from_millis(40)),
            mode,
            &[LOOPBACK],
            Duration::from_millis(300),
        )
        .await;
        let err = r.expect_err("too slow");
        assert!(matches!(err, HeaderError::Timeout(_)), "{err}");
        let counters = ListenerCounters::default();
        assert!(std::ptr::eq(err.counter(&counters), &counters.handshake_timeout));
    }
}

#[tokio::test]
async fn a_peer_that_sends_nothing_times_out() {
    let (r, _) = read_with(
        Vec::new(),
        Pace::Whole,
        ProxyProtocolMode::Any,
        &[LOOPBACK],
        Duration::from_millis(100),
    )
    .await;
    assert!(matches!(r, Err(HeaderError::Timeout(_))), "{r:?}");
}

#[tokio::test]
async fn untrusted_peer_is_refused_even_with_a_valid_header() {
    let bytes = v2_stream(addrs("198.18.0.1:1", "127.0.0.1:2"));
    for trusted in [&["10.0.0.0/8", "::1/128"][..], &[]] {
        let (r, _) = read_with(
            bytes.clone(),
            Pace::Whole,
            ProxyProtocolMode::Any,
            trusted,
            Duration::from_secs(1),
        )
        .await;
        let err = r.expect_err("untrusted");
        assert!(matches!(err, HeaderError::Untrusted { .. }), "{err}");
        let counters = ListenerCounters::default();
        assert!(std::ptr::eq(err.counter(&counters), &counters.untrusted_proxy));
    }
}

#[tokio::test]
async fn missing_or_wrong_version_header_is_malformed() {
    let v2h = v2_stream(addrs("198.18.0.1:1", "127.0.0.1:2"));
    let v1h = v1(addrs("198.18.0.1:1", "127.0.0.1:2"));
    let cases: Vec<(Vec<u8>, ProxyProtocolMode)> = vec![
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), ProxyProtocolMode::Any),
        (v2h, ProxyProtocolMode::V1),
        (v1h, ProxyProtocolMode::V2),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(), ProxyProtocolMode::V1),
    ];
    for (bytes, mode) in cases {
        let (r, _) = read_with(bytes, Pace::Whole, mode, &[LOOPBACK], Duration::from_secs(2)).await;
        let err = r.expect_err("malformed");
        assert!(matches!(err, HeaderError::Malformed(_)), "{err}");
        let counters = ListenerCounters::default();
        assert!(std::ptr::eq(err.counter(&counters), &counters.handshake_malformed));
    }
}

#[tokio::test]
async fn local_and_unknown_use_the_peer() {
    let mut local = Vec::new();
    encode_v2(Command::Local, Transport::Unspec, None, &[], &mut local).expect("encodable");
    let mut unknown = Vec::new();
    encode_v1(None, &mut unknown).expect("encodable");
    for bytes in [local, unknown] {
        let (mut server, peer, client) = pair(bytes, Pace::Whole).await;
        let got = read_header(
            &mut server,
            ProxyProtocolMode::Any,
            peer,
            &nets(&[LOOPBACK]),
            Duration::from_secs(2),
            DEFAULT_MAX_HEADER_LEN,
        )
        .await
        .expect("valid header");
        client.abort();
        assert_eq!(got.client, ClientAddr(peer));
        assert!(got.header.is_some());
    }
}

#[tokio::test]
async fn early_close_and_datagram_header_on_tcp_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(&proxy_protocol::V2_SIGNATURE[..5]).await;
    });
    let (mut server, peer) = listener.accept().await.expect("accept");
    client.await.expect("client task");
    let r = read_header(
        &mut server,
        ProxyProtocolMode::V2,
        peer,
        &nets(&[LOOPBACK]),
        Duration::from_secs(2),
        DEFAULT_MAX_HEADER_LEN,
    )
    .await;
    assert!(matches!(r, Err(HeaderError::Closed { got: 5 })), "{r:?}");

    let mut dgram = Vec::new();
    encode_v2(
        Command::Proxy,
        Transport::Datagram,
        Some(addrs("198.18.0.1:1", "127.0.0.1:2")),
        &[],
        &mut dgram,
    )
    .expect("encodable");
    let (r, _) =
        read_with(dgram, Pace::Whole, ProxyProtocolMode::V2, &[LOOPBACK], Duration::from_secs(2))
            .await;
    assert!(matches!(r, Err(HeaderError::WrongTransport { .. })), "{r:?}");
}

#[tokio::test]
async fn oversized_header_is_refused_before_its_body_arrives() {
    // The length field claims 2000 bytes; only the fixed part is ever sent.
    let mut bytes = proxy_protocol::V2_SIGNATURE.to_vec();
    bytes.extend_from_slice(&[0x21, 0x11, 0x07, 0xd0]);
    let (r, _) =
        read_with(bytes, Pace::Whole, ProxyProtocolMode::V2, &[LOOPBACK], Duration::from_secs(2))
            .await;
    assert!(
        matches!(r, Err(HeaderError::Malformed(ParseError::V2TooLong { claimed: 2016, .. }))),
        "{r:?}"
    );
}

#[tokio::test]
async fn off_mode_reads_nothing() {
    let (r, mut server) =
        read_with(b"raw".to_vec(), Pace::Whole, ProxyProtocolMode::Off, &[], Duration::ZERO).await;
    assert!(r.expect("off").header.is_none());
    assert_eq!(rest(&mut server, 3).await, b"raw");
}

#[test]
fn datagram_headers() {
    let peer: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
    let trusted = nets(&[LOOPBACK]);
    let a = addrs("198.18.3.3:5353", "127.0.0.1:53");
    let mut dgram = Vec::new();
    encode_v2(Command::Proxy, Transport::Datagram, Some(a), &[], &mut dgram).expect("encodable");
    dgram.extend_from_slice(b"query");
    let max = DEFAULT_MAX_HEADER_LEN;

    let (c, payload) =
        parse_datagram(&dgram, ProxyProtocolMode::V2, peer, &trusted, max).expect("valid");
    assert_eq!((c.client, payload), (ClientAddr(a.source), &b"query"[..]));

    let untrusted: SocketAddr = "10.1.1.1:5000".parse().expect("addr");
    assert!(matches!(
        parse_datagram(&dgram, ProxyProtocolMode::Any, untrusted, &trusted, max),
        Err(HeaderError::Untrusted { .. })
    ));
    assert!(matches!(
        parse_datagram(&dgram[..20], ProxyProtocolMode::V2, peer, &trusted, max),
        Err(HeaderError::Truncated)
    ));
    assert!(matches!(
        parse_datagram(b"query", ProxyProtocolMode::V2, peer, &trusted, max),
        Err(HeaderError::Malformed(ParseError::BadSignature))
    ));
    let stream = v2_stream(a);
    assert!(matches!(
        parse_datagram(&stream, ProxyProtocolMode::V2, peer, &trusted, max),
        Err(HeaderError::WrongTransport { .. })
    ));
    let (c, payload) = parse_datagram(b"raw", ProxyProtocolMode::Off, peer, &[], max).expect("off");
    assert_eq!((c.client, payload), (ClientAddr(peer), &b"raw"[..]));
}

#[test]
fn ipv4_mapped_peers_match_ipv4_cidrs() {
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().expect("addr");
    assert!(is_trusted(mapped, &nets(&[LOOPBACK])));
    assert!(!is_trusted(mapped, &nets(&["10.0.0.0/8"])));
}

#[test]
fn config_fields_parse_with_defaults_and_validate() {
    // The fields are read as part of a `[[listener]]` table.
    let parse = |fields: &str| {
        let table = format!("name = \"a\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n{fields}");
        toml::from_str::<crate::config::ListenerConfig>(&table).map(|l| l.proxy_header())
    };
    let proxy = parse("").expect("minimal");
    assert_eq!(proxy, ProxyHeaderConfig::default());
    assert!(proxy.validate(false).is_ok());

    let proxy = parse(
        "proxy_protocol = \"v2\"\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]\n\
         proxy_protocol_timeout = \"250ms\"\nproxy_protocol_max_len = 4096\n",
    )
    .expect("full");
    assert_eq!(proxy.proxy_protocol, ProxyProtocolMode::V2);
    assert_eq!(proxy.trusted_proxies, nets(&["10.0.0.0/8", "127.0.0.1/32"]));
    assert_eq!(proxy.proxy_protocol_timeout, Duration::from_millis(250));
    assert!(proxy.validate(true).is_ok());

    for (text, field) in [
        ("proxy_protocol = \"any\"", "trusted_proxies"),
        ("proxy_protocol = \"v1\"\ntrusted_proxies = [\"::1\"]", "proxy_protocol"),
        ("proxy_protocol_max_len = 100", "proxy_protocol_max_len"),
    ] {
        let proxy = parse(text).expect("parses");
        assert_eq!(proxy.validate(true).map_err(|e| e.0), Err(field), "{text}");
    }
    assert!(parse("proxy_protocol = \"v3\"").is_err());
    assert!(parse("trusted_proxies = [\"nope\"]").is_err());
}
