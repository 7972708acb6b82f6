//! The three mends of issue 22, each against real sockets and a real flowgate (in-process,
//! built from config text the way `flowgate run` builds it):
//!
//! 1. Optimistic CONNECT: a client that sends its first tunnel bytes glued to the CONNECT
//!    head. A real TLS exchange — `openssl s_client` through a relay that holds its first
//!    flight (the ClientHello) and sends it behind the head in one write — completes with
//!    a real `openssl s_server`; `verify_sni` checks those very bytes; a refused tunnel
//!    forwards none of them. SOCKS5 clients that pipeline greeting, request and data.
//! 2. Malformed handshakes (CONNECT head, SOCKS5 greeting and request, PROXY header that
//!    does not parse or comes from an untrusted peer) are `malformed` flow-log events.
//! 3. SOCKS5 UDP ASSOCIATE: an idle association is closed with its control connection;
//!    `udp_associate = false` answers `0x07`.
//!
//! Identities: 127.0.0.10 is `fn/caller` (allowed `tls.test` and the network
//! 127.0.0.23/32, where an echo server and a UDP echo listen); 127.0.0.11 is `fn/other`
//! (nothing allows it). 127.0.0.5 is a trusted load balancer, 127.0.0.6 a stranger.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

use support::egress::*;
use support::require::{Need, skip_unless};

const LB: &str = "127.0.0.5";
const STRANGER: &str = "127.0.0.6";

const POLICY: &str = caller_egress_policy!(
    "tls" => "domainNames: [tls.test]",
    "sink" => "networks: [127.0.0.23/32]",
);

/// flowgate with static names for the peers and the given `[[listener]]` tables.
async fn start_gate(listeners: &str) -> Gate {
    let config = format!(
        "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"300ms\"\n\
         [dns.static]\n\"tls.test\" = [\"{TLS}\"]\n\"fronted.test\" = [\"{TLS}\"]\n\
         \"sink.test\" = [\"{SINK}\"]\n\
         [ssrf]\ntreat_as_external = [\"{TLS}/32\", \"{SINK}/32\"]\n{listeners}"
    );
    Gate::start(INVENTORY, POLICY, &config).await
}

fn listener(name: &str, kind: &str, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nkind = \"{kind}\"\nbind = \"127.0.0.1:0\"\n\
         handshake_timeout = \"2s\"\n{extra}\n"
    )
}

async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    try_connect_from(ip, to).await.unwrap()
}

async fn try_connect_from(ip: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
    s.connect(to).await
}

/// A TCP echo server on `ip` that counts the connections it accepts.
async fn tcp_echo(ip: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, n)
}

/// A UDP server on `ip` that echoes datagrams.
async fn udp_echo(ip: &str) -> SocketAddr {
    let s = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((len, from)) = s.recv_from(&mut buf).await else { continue };
            let _ = s.send_to(&buf[..len], from).await;
        }
    });
    addr
}

/// Reads a response head (bounded); returns its status line and the bytes after it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let status = String::from_utf8_lossy(&buf[..end]).lines().next().unwrap().to_owned();
            return (status, buf[end + 4..].to_vec());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => return (format!("no response head: {other:?}"), buf),
        }
    }
}

/// `openssl s_client` for `sni`, through a relay that holds its first flight (the TLS
/// ClientHello) and sends it to `proxy` glued behind `CONNECT target`, in one write, from
/// `src`. Then the relay splices. Returns the proxy's status line and s_client's stdout
/// (what the server sent inside TLS in answer to `GET /`).
async fn optimistic_s_client(
    proxy: SocketAddr,
    src: &str,
    target: &str,
    sni: &str,
) -> (String, String) {
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    // `-quiet` implies `-ign_eof`: the request is written once the handshake is done and
    // the client waits for the server to close.
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &relay_addr, "-servername", sni])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl s_client runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    drop(stdin);

    let (mut client, _) =
        tokio::time::timeout(Duration::from_secs(10), relay.accept()).await.unwrap().unwrap();
    // The first flight: one TLS record, the ClientHello.
    let mut hello = vec![0u8; 5];
    client.read_exact(&mut hello).await.unwrap();
    assert_eq!(hello[0], 0x16, "s_client starts with a handshake record");
    let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
    hello.resize(5 + len, 0);
    client.read_exact(&mut hello[5..]).await.unwrap();

    let mut up = connect_from(src, proxy).await;
    let mut glued = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
    glued.extend_from_slice(&hello);
    up.write_all(&glued).await.unwrap();
    let (status, rest) = read_head(&mut up).await;
    if !status.starts_with("HTTP/1.1 200 ") {
        return (status, String::new());
    }
    client.write_all(&rest).await.unwrap();
    tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
    });
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("s_client finishes")
        .unwrap();
    (status, String::from_utf8_lossy(&out.stdout).into_owned())
}

// --- 1. Optimistic CONNECT ------------------------------------------------------------

/// A ClientHello glued to the CONNECT head: the tunnel is opened, the ClientHello is
/// forwarded and the TLS handshake with the real server completes; with `verify_sni` the
/// glued ClientHello is the one checked, and one for another host is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimistic_connect_carries_a_real_tls_handshake() {
    if skip_unless(&[Need::Bin("openssl")]) {
        return;
    }
    let gate = start_gate(&format!(
        "{}{}",
        listener("connect", "http-connect", ""),
        listener("strict", "http-connect", "verify_sni = \"strict\"\nsni_timeout = \"2s\""),
    ))
    .await;
    let (_tls, tls_port) = https_server(gate.dir.path()).await;
    let target = format!("tls.test:{tls_port}");

    let (status, out) =
        optimistic_s_client(gate.addr("connect"), CALLER, &target, "tls.test").await;
    assert!(status.starts_with("HTTP/1.1 200 "), "the tunnel opens: {status}");
    assert!(out.contains("s_server"), "the TLS exchange completed through the tunnel: {out:?}");
    let c = gate.counters("connect");
    assert_eq!(get(&c.handshake_malformed), 0);

    // verify_sni = strict: the glued ClientHello names the CONNECT host, so it passes.
    let (status, out) = optimistic_s_client(gate.addr("strict"), CALLER, &target, "tls.test").await;
    assert!(status.starts_with("HTTP/1.1 200 "), "{status}");
    assert!(out.contains("s_server"), "verify_sni let the matching ClientHello through: {out:?}");

    // The glued ClientHello names another host: the tunnel is reset, counted, logged.
    let (_, out) = optimistic_s_client(gate.addr("strict"), CALLER, &target, "fronted.test").await;
    assert!(!out.contains("s_server"), "a fronted handshake must not complete: {out:?}");
    let s = gate.counters("strict");
    wait_count(&s.sni_refused, 1).await;
    let e = gate
        .wait_event("sni-mismatch deny", |e| e["event"] == "deny" && e["reason"] == "sni-mismatch")
        .await;
    assert_eq!(e["fqdn"], "tls.test", "{e}");
    assert_eq!(e["listener"], "strict", "{e}");
}

/// Plain optimistic bytes reach an allowed upstream behind the 200; a refused tunnel
/// forwards none of them (the upstream is never contacted) and its 403 arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimistic_bytes_go_through_an_allowed_tunnel_only() {
    let gate = start_gate(&listener("connect", "http-connect", "")).await;
    let (echo, accepted) = tcp_echo(SINK).await;
    let head = format!("CONNECT {echo} HTTP/1.1\r\n\r\nping-in-the-first-segment");

    let mut s = connect_from(CALLER, gate.addr("connect")).await;
    s.write_all(head.as_bytes()).await.unwrap();
    let (status, mut rest) = read_head(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 200 "), "{status}");
    let want = b"ping-in-the-first-segment";
    let mut chunk = [0u8; 64];
    while rest.len() < want.len() {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("echo within the bound")
            .unwrap();
        assert!(n > 0, "tunnel closed before the echo: {rest:?}");
        rest.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(rest, want, "the glued bytes went upstream (and came back)");
    drop(s);

    let before = accepted.load(Ordering::SeqCst);
    let mut s = connect_from(OTHER, gate.addr("connect")).await;
    s.write_all(head.as_bytes()).await.unwrap();
    let (status, _) = read_head(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 403 "), "a denied client gets its 403: {status}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), before, "nothing went upstream");
}

/// RFC 1928 clients pipeline: greeting, request and the first data in one segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_pipelined_greeting_request_and_data_work() {
    let gate = start_gate(&listener("socks", "socks5", "")).await;
    let (echo, _) = tcp_echo(SINK).await;
    let std::net::IpAddr::V4(ip) = echo.ip() else { unreachable!() };
    let mut msg = vec![5, 1, 0, 5, 1, 0, 1];
    msg.extend_from_slice(&ip.octets());
    msg.extend_from_slice(&echo.port().to_be_bytes());
    msg.extend_from_slice(b"pipelined");
    let mut s = connect_from(CALLER, gate.addr("socks")).await;
    s.write_all(&msg).await.unwrap();
    let mut replies = [0u8; 2 + 10 + 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut replies))
        .await
        .expect("replies and echo within the bound")
        .unwrap();
    assert_eq!(&replies[..2], &[5, 0], "no authentication chosen");
    assert_eq!(&replies[2..4], &[5, 0], "CONNECT succeeded");
    assert_eq!(&replies[12..], b"pipelined", "the pipelined data went through");
}

// --- 2. Malformed handshakes in the flow log ------------------------------------------

/// Waits for the `malformed` event with `reason` on `listener`; checks its peer and the
/// listener address it names.
async fn wait_malformed(
    gate: &Gate,
    listener: &str,
    reason: &str,
    src_ip: &str,
    proto: &str,
) -> serde_json::Value {
    let e = gate
        .wait_event(&format!("malformed {reason} on {listener}"), |e| {
            e["event"] == "malformed" && e["listener"] == listener && e["reason"] == reason
        })
        .await;
    let src = e["src"].as_str().unwrap();
    assert!(src.starts_with(&format!("{src_ip}:")), "the peer address: {e}");
    assert_eq!(e["dst"], gate.addr(listener).to_string(), "the listener's address: {e}");
    assert_eq!(e["proto"], proto, "{e}");
    assert_eq!(e["fqdn"], serde_json::Value::Null, "{e}");
    assert_eq!(e["policy"], serde_json::Value::Null, "{e}");
    assert_eq!(e["count"], 1, "{e}");
    e
}

/// Sends `bytes` and waits for the close. A listener that refuses the peer before reading
/// (an untrusted PROXY peer) may reset the connection before `connect` has returned.
async fn send_and_wait_close(from: &str, to: SocketAddr, bytes: &[u8]) {
    let Ok(mut s) = try_connect_from(from, to).await else { return };
    let _ = s.write_all(bytes).await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_handshakes_are_flow_log_events() {
    let pp = format!(
        "upstreams = [\"127.0.0.1:9\"]\nproxy_protocol = \"v1\"\ntrusted_proxies = [\"{LB}/32\"]"
    );
    let udp_pp = format!(
        "upstreams = [\"127.0.0.1:9\"]\nproxy_protocol = \"v2\"\ntrusted_proxies = [\"{LB}/32\"]"
    );
    let gate = start_gate(&format!(
        "{}{}{}{}",
        listener("connect", "http-connect", ""),
        listener("socks", "socks5", ""),
        listener("pp", "tcp", &pp),
        listener("udp-pp", "udp", &udp_pp),
    ))
    .await;
    let connect = gate.addr("connect");
    let socks = gate.addr("socks");

    // A broken CONNECT head (no port).
    send_and_wait_close(OTHER, connect, b"CONNECT a.example HTTP/1.1\r\n\r\n").await;
    let e = wait_malformed(&gate, "connect", "http-malformed", OTHER, "tcp").await;
    assert_eq!(e["src_workload"], "fn/other", "the peer's workload: {e}");
    // A bad SOCKS5 greeting (SOCKS4 version byte).
    send_and_wait_close(OTHER, socks, b"\x04\x01\x00\x50\x01\x02\x03\x04\x00").await;
    wait_malformed(&gate, "socks", "socks5-malformed", OTHER, "tcp").await;
    // A SOCKS5 request with an unknown address type.
    send_and_wait_close(CALLER, socks, b"\x05\x01\x00\x05\x01\x00\x09\x00\x00").await;
    wait_malformed(&gate, "socks", "socks5-address-type", CALLER, "tcp").await;
    // BIND.
    send_and_wait_close(CALLER, socks, b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x17\x00\x50")
        .await;
    wait_malformed(&gate, "socks", "socks5-command", CALLER, "tcp").await;
    // A PROXY header that does not parse, from the trusted balancer.
    send_and_wait_close(LB, gate.addr("pp"), b"PROXY NONSENSE\r\n").await;
    wait_malformed(&gate, "pp", "proxy-header", LB, "tcp").await;
    // A PROXY header from a peer that is not trusted.
    let header = format!("PROXY TCP4 {CALLER} 127.0.0.1 40000 80\r\n");
    send_and_wait_close(STRANGER, gate.addr("pp"), header.as_bytes()).await;
    wait_malformed(&gate, "pp", "proxy-untrusted", STRANGER, "tcp").await;
    // A datagram from an untrusted peer on a UDP listener.
    let u = UdpSocket::bind((STRANGER, 0)).await.unwrap();
    u.send_to(b"not from the balancer", gate.addr("udp-pp")).await.unwrap();
    wait_malformed(&gate, "udp-pp", "proxy-untrusted", STRANGER, "udp").await;

    // Counters move as before.
    assert!(get(&gate.counters("connect").handshake_malformed) >= 1);
    assert_eq!(get(&gate.counters("pp").untrusted_proxy), 1);
    // A client that closes without a word is not an event.
    drop(connect_from(OTHER, connect).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = gate.log().iter().filter(|e| e["event"] == "malformed").count();
    assert_eq!(n, 7, "one event per malformed handshake: {:#?}", gate.log());
}

// --- 3. SOCKS5 UDP ASSOCIATE ---------------------------------------------------------

/// Greeting and UDP ASSOCIATE from CALLER; the reply code and the relay address.
async fn associate(socks: SocketAddr) -> (TcpStream, u8, SocketAddr) {
    let mut s = connect_from(CALLER, socks).await;
    s.write_all(b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00").await.unwrap();
    let mut reply = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut reply))
        .await
        .expect("a reply within the bound")
        .unwrap();
    assert_eq!(&reply[..2], &[5, 0], "no authentication");
    let ip = std::net::Ipv4Addr::new(reply[6], reply[7], reply[8], reply[9]);
    let port = u16::from_be_bytes([reply[10], reply[11]]);
    (s, reply[3], SocketAddr::new(ip.into(), port))
}

/// One datagram through the association to `to` and its echo back (bounded).
async fn udp_roundtrip(u: &UdpSocket, relay: SocketAddr, to: SocketAddr, payload: &[u8]) -> bool {
    let std::net::IpAddr::V4(ip) = to.ip() else { unreachable!() };
    let mut d = vec![0, 0, 0, 1];
    d.extend_from_slice(&ip.octets());
    d.extend_from_slice(&to.port().to_be_bytes());
    d.extend_from_slice(payload);
    u.send_to(&d, relay).await.unwrap();
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(Duration::from_secs(2), u.recv(&mut buf)).await {
        Ok(Ok(n)) => n >= 10 && &buf[10..n] == payload,
        _ => false,
    }
}

/// An association with no datagram for `udp_associate_idle_timeout` is closed with its
/// control connection and counted; traffic keeps it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_udp_association_is_closed_with_its_control_connection() {
    let gate =
        start_gate(&listener("socks", "socks5", "udp_associate_idle_timeout = \"1s\"")).await;
    let echo = udp_echo(SINK).await;
    let (mut ctl, code, relay) = associate(gate.addr("socks")).await;
    assert_eq!(code, 0, "UDP ASSOCIATE is on by default");
    let u = UdpSocket::bind((CALLER, 0)).await.unwrap();
    // Traffic every 200 ms for 2.5 s: well past the timeout, never idle that long.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert!(udp_roundtrip(&u, relay, echo, b"keepalive").await, "the association relays");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = gate.counters("socks");
    assert_eq!(get(&c.udp_associations_idle), 0, "a busy association is not idle");
    // Silence: the proxy closes the control connection.
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(10), ctl.read(&mut b)).await;
    assert!(matches!(r, Ok(Ok(0) | Err(_))), "the control connection was closed: {r:?}");
    assert_eq!(get(&c.udp_associations_idle), 1);
    assert!(!udp_roundtrip(&u, relay, echo, b"late").await, "the relay is gone");
}

/// `udp_associate = false`: UDP ASSOCIATE is answered "command not supported" (0x07);
/// CONNECT still works on that listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_associate_off_refuses_with_command_not_supported() {
    let gate = start_gate(&listener("tcp-only", "socks5", "udp_associate = false")).await;
    let (mut ctl, code, _) = associate(gate.addr("tcp-only")).await;
    assert_eq!(code, 7, "REP 07: command not supported");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), ctl.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "closed after the reply: {rest:?}");
    wait_malformed(&gate, "tcp-only", "socks5-command", CALLER, "tcp").await;

    let (echo, _) = tcp_echo(SINK).await;
    let std::net::IpAddr::V4(ip) = echo.ip() else { unreachable!() };
    let mut msg = vec![5, 1, 0, 5, 1, 0, 1];
    msg.extend_from_slice(&ip.octets());
    msg.extend_from_slice(&echo.port().to_be_bytes());
    let mut s = connect_from(CALLER, gate.addr("tcp-only")).await;
    s.write_all(&msg).await.unwrap();
    let mut replies = [0u8; 12];
    s.read_exact(&mut replies).await.unwrap();
    assert_eq!(replies[3], 0, "CONNECT succeeds");
}
