//! Bad PROXY protocol input on a TCP listener that requires a header: every malformed,
//! untrusted, oversized or too-slow header closes the connection, bumps exactly the counter
//! that names why, never reaches the upstream (accepts counted on the real upstream socket),
//! and the gateway keeps serving well-formed connections afterwards.
//!
//! The "load balancer" is 127.0.0.5 (in `trusted_proxies`); 127.0.0.6 is a stranger.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flowgate::telemetry::metrics::ListenerCounters;
use flowgate::wire::proxy_protocol::{Addresses, Command, Transport, V2_SIGNATURE, encode_v2};
use support::l4::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LB: &str = "127.0.0.5";
const STRANGER: &str = "127.0.0.6";

/// How a case sends its bytes.
#[derive(Clone, Copy, Debug)]
enum Send {
    /// All at once, then wait for the gateway to close.
    Whole,
    /// All at once, then half-close (the header ends early).
    ThenFin,
    /// One byte every 40 ms (the header deadline is 300 ms).
    Slowly,
}

/// Which counter a case must bump.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Why {
    Malformed,
    Timeout,
    Untrusted,
}

fn counts(c: &ListenerCounters) -> [u64; 4] {
    [
        get(&c.handshake_malformed),
        get(&c.handshake_timeout),
        get(&c.untrusted_proxy),
        get(&c.allowed) + get(&c.denied),
    ]
}

fn v2_header(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_v2(
        Command::Proxy,
        Transport::Stream,
        Some(Addresses { source: src, destination: dst }),
        tlvs,
        &mut out,
    )
    .expect("test header is encodable");
    out
}

/// The fixed 16 bytes of a v2 header with the given family/transport byte and length.
fn v2_fixed(fam: u8, len: u16) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21);
    h.push(fam);
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// Sends `bytes` from `src` as `how`, then waits (bounded) until the gateway has closed
/// the connection. Panics if the gateway sends anything back or keeps it open.
async fn refused(src: &str, to: SocketAddr, bytes: &[u8], how: Send) {
    let mut s = match connect_from(src, to).await {
        Ok(s) => s,
        // Refused at accept (untrusted peer): the reset can beat the connect's completion.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect to the gateway: {e}"),
    };
    match how {
        Send::Whole | Send::ThenFin => {
            let _ = s.write_all(bytes).await;
            if matches!(how, Send::ThenFin) {
                let _ = s.shutdown().await;
            }
        }
        Send::Slowly => {
            for b in bytes {
                if s.write_all(std::slice::from_ref(b)).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }
    }
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the gateway closes a refused connection");
    assert!(matches!(r, Ok(0) | Err(_)), "refused connection got data back: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_header_is_closed_counted_and_never_reaches_the_upstream() {
    let up = Upstream::echo().await;
    let gw = Gateway::in_front_of(
        &up,
        &format!(
            "proxy_protocol = \"any\"\ntrusted_proxies = [\"{LB}/32\"]\n\
                 proxy_protocol_timeout = \"300ms\"\nproxy_protocol_max_len = 1024"
        ),
    );
    let addr = gw.addr("pp");
    let c = gw.counters("pp");
    let client: SocketAddr = format!("{OK}:40000").parse().expect("literal");
    let good_v2 = v2_header(client, addr, &[]);
    // Another client port than the v2 header: one client ip:port to one upstream is one
    // flow, and the two "still serving" connections below may overlap in conntrack.
    let good_v1 = format!("PROXY TCP4 {OK} {} 40009 {}\r\n", addr.ip(), addr.port());

    let mut bad_sig = good_v2.clone();
    bad_sig[8] = b'X'; // "QUIT" → "XUIT"
    let mut wrong_len = v2_fixed(0x11, 8); // AF_INET needs 12 address bytes
    wrong_len.extend_from_slice(&[127, 0, 0, 10, 127, 0, 0, 1]);
    let mut unknown_family = v2_fixed(0x41, 12);
    unknown_family.extend_from_slice(&[0; 12]);
    let mut unknown_command = good_v2.clone();
    unknown_command[12] = 0x25;
    let mut bad_version = good_v2.clone();
    bad_version[12] = 0x31;
    // A TLV that claims 0xffff bytes inside a 16-byte block.
    let mut tlv_overflow = v2_fixed(0x11, 16);
    tlv_overflow.extend_from_slice(&good_v2[16..28]);
    tlv_overflow.extend_from_slice(&[0xE0, 0xff, 0xff, 0]);
    // A well-formed header whose TLVs make it longer than proxy_protocol_max_len.
    let big = vec![0u8; 2000];
    let oversized = v2_header(client, addr, &[(0xE0, &big)]);
    let v1_lf_only = good_v1.replace("\r\n", "\n");
    let v1_too_long = format!("PROXY UNKNOWN {}\r\n", "f".repeat(100));
    let v1_no_crlf = good_v1.trim_end().to_owned();

    let cases: Vec<(&str, &str, Vec<u8>, Send, Why)> = vec![
        ("v2 truncated then FIN", LB, good_v2[..20].to_vec(), Send::ThenFin, Why::Malformed),
        ("v2 truncated in the signature", LB, good_v2[..7].to_vec(), Send::ThenFin, Why::Malformed),
        ("v2 bad signature", LB, bad_sig, Send::Whole, Why::Malformed),
        ("v2 bad version", LB, bad_version, Send::Whole, Why::Malformed),
        ("v2 unknown command", LB, unknown_command, Send::Whole, Why::Malformed),
        ("v2 wrong length", LB, wrong_len, Send::Whole, Why::Malformed),
        ("v2 unknown family", LB, unknown_family, Send::Whole, Why::Malformed),
        ("v2 TLV past the end", LB, tlv_overflow, Send::Whole, Why::Malformed),
        ("v2 over max_len", LB, oversized, Send::Whole, Why::Malformed),
        ("v1 LF without CR", LB, v1_lf_only.into_bytes(), Send::Whole, Why::Malformed),
        ("v1 over 107 bytes", LB, v1_too_long.into_bytes(), Send::Whole, Why::Malformed),
        (
            "v1 without CRLF, then FIN",
            LB,
            v1_no_crlf.clone().into_bytes(),
            Send::ThenFin,
            Why::Malformed,
        ),
        ("no header at all", LB, b"GET / HTTP/1.1\r\n\r\n".to_vec(), Send::Whole, Why::Malformed),
        ("v1 without CRLF, stalled", LB, v1_no_crlf.into_bytes(), Send::Whole, Why::Timeout),
        ("v2 byte by byte past the deadline", LB, good_v2.clone(), Send::Slowly, Why::Timeout),
        (
            "v1 byte by byte past the deadline",
            LB,
            good_v1.clone().into_bytes(),
            Send::Slowly,
            Why::Timeout,
        ),
        ("nothing sent", LB, Vec::new(), Send::Whole, Why::Timeout),
        ("valid v2 from an untrusted peer", STRANGER, good_v2.clone(), Send::Whole, Why::Untrusted),
        (
            "valid v1 from an untrusted peer",
            STRANGER,
            good_v1.clone().into_bytes(),
            Send::Whole,
            Why::Untrusted,
        ),
    ];

    for (name, src, bytes, how, why) in &cases {
        let before = counts(&c);
        let started = Instant::now();
        refused(src, addr, bytes, *how).await;
        let after = counts(&c);
        let mut want = before;
        want[match why {
            Why::Malformed => 0,
            Why::Timeout => 1,
            Why::Untrusted => 2,
        }] += 1;
        assert_eq!(after, want, "{name}: [malformed, timeout, untrusted, decided]");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 0, "{name}: upstream contacted");
        // Refusals that need no waiting do not wait for the header deadline.
        if *why != Why::Timeout && !matches!(how, Send::Slowly) {
            assert!(started.elapsed() < Duration::from_secs(2), "{name}: slow refusal");
        }
    }

    // Still serving: a well-formed header (each version) from the balancer goes through,
    // and the payload behind it arrives intact.
    for header in [good_v2, good_v1.into_bytes()] {
        let mut s = connect_from(LB, addr).await.expect("connect");
        s.write_all(&header).await.expect("header");
        assert_eq!(roundtrip(&mut s, b"still serving").await, b"still serving");
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(get(&c.allowed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_only_listener_refuses_v2_and_v2_only_refuses_v1() {
    let up = Upstream::echo().await;
    let gw = Gateway::start(
        World::new(),
        &format!(
            "{}{}",
            tcp_listener(
                "v1",
                &[up.addr],
                &format!("proxy_protocol = \"v1\"\ntrusted_proxies = [\"{LB}\"]")
            ),
            tcp_listener(
                "v2",
                &[up.addr],
                &format!("proxy_protocol = \"v2\"\ntrusted_proxies = [\"{LB}\"]")
            ),
        ),
    );
    let (a1, a2) = (gw.addr("v1"), gw.addr("v2"));
    let client: SocketAddr = format!("{OK}:40001").parse().expect("literal");
    refused(LB, a1, &v2_header(client, a1, &[]), Send::Whole).await;
    let v1 = format!("PROXY TCP4 {OK} {} 40001 {}\r\n", a2.ip(), a2.port());
    refused(LB, a2, v1.as_bytes(), Send::Whole).await;
    assert_eq!(get(&gw.counters("v1").handshake_malformed), 1);
    assert_eq!(get(&gw.counters("v2").handshake_malformed), 1);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0);

    // Each accepts its own version.
    let mut s = connect_from(LB, a2).await.expect("connect");
    s.write_all(&v2_header(client, a2, &[(0x01, b"h2")])).await.expect("header");
    assert_eq!(roundtrip(&mut s, b"v2 ok").await, b"v2 ok");
    let mut s = connect_from(LB, a1).await.expect("connect");
    // Another client port: the v2 connection above is still open, and one client ip:port
    // to one upstream is one flow.
    let v1 = format!("PROXY TCP4 {OK} {} 40002 {}\r\n", a1.ip(), a1.port());
    s.write_all(v1.as_bytes()).await.expect("header");
    assert_eq!(roundtrip(&mut s, b"v1 ok").await, b"v1 ok");
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
}
