//! PROXY protocol on the gateway's TCP and UDP listeners, with headers written by hand by a
//! "load balancer" on 127.0.0.5 (the trusted proxy): the header's source is the identity the
//! policy sees and the flow log shows; a header from an untrusted peer is refused before the
//! policy is asked; a listener that requires a header refuses a connection without one.
//! (HAProxy itself in front of flowgate: tests/haproxy.rs.)

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::l4::*;
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;

const LB: &str = "127.0.0.5";
const STRANGER: &str = "127.0.0.6";

fn v1(client: &str, gw: SocketAddr) -> String {
    format!("PROXY TCP4 {client} {} 40000 {}\r\n", gw.ip(), gw.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_header_from_trusted_proxy_names_the_client() {
    let up = Upstream::echo().await;
    let gw = Gateway::in_front_of(
        &up,
        &format!("proxy_protocol = \"any\"\ntrusted_proxies = [\"{LB}/32\"]"),
    );
    let addr = gw.addr("pp");

    // The balancer relays an allowed client: forwarded, header not passed upstream.
    let mut s = connect_from(LB, addr).await.unwrap();
    s.write_all(v1(OK, addr).as_bytes()).await.unwrap();
    assert_eq!(roundtrip(&mut s, b"payload").await, b"payload");
    drop(s);

    // The balancer relays a denied client: reset, upstream untouched, the log names the
    // real client (not the balancer).
    let before = up.accepted.load(Ordering::SeqCst);
    let mut s = connect_from(LB, addr).await.unwrap();
    s.write_all(v1(BAD, addr).as_bytes()).await.unwrap();
    let mut b = [0u8; 1];
    let r =
        tokio::time::timeout(Duration::from_secs(2), tokio::io::AsyncReadExt::read(&mut s, &mut b))
            .await
            .unwrap();
    assert!(r.is_err(), "denied client reset: {r:?}");
    let line = gw.world.wait_log(Duration::from_secs(5), |l| l["event"] == "deny").await;
    assert_eq!(line["src"], format!("{BAD}:40000"));
    assert_eq!(line["src_workload"], "t/client-bad");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(up.accepted.load(Ordering::SeqCst), before);

    // A client that writes its own header claiming an allowed address is refused.
    let c = gw.counters("pp");
    // The gateway refuses an untrusted peer before reading a byte, so the reset can beat
    // the client's own connect() completion: both outcomes are a refusal.
    match connect_from(STRANGER, addr).await {
        Ok(mut s) => {
            let _ = s.write_all(v1(OK, addr).as_bytes()).await;
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::AsyncReadExt::read(&mut s, &mut b),
            )
            .await
            .unwrap();
            assert!(matches!(r, Ok(0) | Err(_)), "untrusted header refused: {r:?}");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(get(&c.untrusted_proxy), 1);

    // A trusted peer that sends no header at all is refused as malformed.
    let mut s = connect_from(LB, addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let r =
        tokio::time::timeout(Duration::from_secs(2), tokio::io::AsyncReadExt::read(&mut s, &mut b))
            .await
            .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "headerless connection refused: {r:?}");
    assert_eq!(get(&c.handshake_malformed), 1);
    assert_eq!(get(&c.allowed), 1);
    assert_eq!(up.accepted.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_header_sent_too_slowly_times_out() {
    let up = Upstream::echo().await;
    let gw = Gateway::in_front_of(
        &up,
        &format!(
            "proxy_protocol = \"v1\"\ntrusted_proxies = [\"{LB}\"]\nproxy_protocol_timeout = \"300ms\""
        ),
    );
    let addr = gw.addr("pp");
    let mut s = connect_from(LB, addr).await.unwrap();
    for byte in v1(OK, addr).bytes().take(20) {
        if s.write_all(&[byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut b = [0u8; 1];
    let r =
        tokio::time::timeout(Duration::from_secs(3), tokio::io::AsyncReadExt::read(&mut s, &mut b))
            .await
            .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "slow header cut: {r:?}");
    assert_eq!(get(&gw.counters("pp").handshake_timeout), 1);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0);
}

/// A PROXY v2 header for a UDP datagram (hand-built: signature, v2/PROXY, UDP over IPv4).
fn v2_udp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x12); // AF_INET, DGRAM
    h.extend_from_slice(&12u16.to_be_bytes());
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else { unreachable!() };
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_v2_header_names_the_client() {
    let echo = udp_echo().await;
    let gw = Gateway::start(
        World::new(),
        &format!(
            "[[listener]]\nname = \"u\"\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n\
             upstreams = [\"{echo}\"]\nproxy_protocol = \"v2\"\ntrusted_proxies = [\"{LB}\"]\n"
        ),
    );
    let addr = gw.addr("u");
    let lb = UdpSocket::bind(format!("{LB}:0")).await.unwrap();
    lb.connect(addr).await.unwrap();
    let mut dg = v2_udp(format!("{OK}:5353").parse().unwrap(), addr);
    dg.extend_from_slice(b"query");
    lb.send(&dg).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), lb.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"query", "payload after the header reached the upstream");
    let mut dg = v2_udp(format!("{BAD}:5353").parse().unwrap(), addr);
    dg.extend_from_slice(b"query");
    lb.send(&dg).await.unwrap();
    let line = gw.world.wait_log(Duration::from_secs(5), |l| l["event"] == "deny").await;
    assert_eq!(line["src"], format!("{BAD}:5353"));
    let c = gw.counters("u");
    assert_eq!((get(&c.allowed), get(&c.denied)), (1, 1));
}
