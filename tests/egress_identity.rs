//! Issue 7, the egress listeners' second half, end to end with real clients: proxy
//! credentials mapped to workloads (curl `-x http://user:pw@…`, `--proxy-user`,
//! `--socks5-hostname user:pw@…`), `verify_sni` against domain fronting (curl
//! `--connect-to`, so the SNI is not the CONNECT host), SOCKS5 UDP ASSOCIATE (a python3
//! SOCKS5 UDP client, UDP echo servers that count datagrams), and the SSRF guard for
//! every spelling of 127/8 and ::1 through both listeners.
//!
//! Identities: 127.0.0.10 is `fn/caller`, allowed `web.test`, `tls.test`, `udp.test` and
//! the networks of the counting sinks; 127.0.0.11 is `fn/other`, allowed nothing. 127.0.0.12
//! is no workload: a NAT address two functions share; the credentials `alice` (→
//! `fn/caller`) and `bob` (→ `fn/other`) tell them apart. Every server that must not be
//! reached counts its accepts (or datagrams), and the count is asserted. All traffic on
//! loopback; every wait is bounded.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flowgate::control::revalidate::RevalidateStats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

mod support;
use support::egress::*;
use support::process::Flowgate;
use support::require::{Need, skip_unless};

const SHARED: &str = "127.0.0.12";
const UDP_OK: &str = "127.0.0.24";
const UDP_NO: &str = "127.0.0.25";
/// Stands in for the admin API: lifted and allowed, so only "own listener" stops it.
const ADMIN: &str = "127.0.0.30";

const POLICY: &str = caller_egress_policy!(
    "apis" => "domainNames: [web.test, tls.test, udp.test]",
    "nets" => "networks: [127.0.0.23/32, 127.0.0.24/32, 127.0.0.30/32, 127.0.0.1/32, '::1/128']",
);

/// flowgate with every egress listener these tests use, its admin API on [`ADMIN`] (an
/// address the policy allows and `[ssrf]` lifts, so only the own-listener guard keeps the
/// proxies from dialling it).
async fn start_gate() -> Gate {
    let config = format!(
        "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"300ms\"\nhosts_file = \"hosts\"\n\
         [dns.static]\n\"web.test\" = [\"{WEB}\"]\n\"tls.test\" = [\"{TLS}\"]\n\
         \"sink.test\" = [\"{SINK}\"]\n\"udp.test\" = [\"{UDP_OK}\"]\n\
         \"udpblocked.test\" = [\"{UDP_NO}\"]\n\"fronted.test\" = [\"{TLS}\"]\n\
         [ssrf]\ntreat_as_external = [\"{WEB}/32\", \"{TLS}/32\", \"{SINK}/32\", \
         \"{UDP_OK}/32\", \"{UDP_NO}/32\", \"{ADMIN}/32\", \"127.0.0.31/32\"]\n\
         [[credential]]\nusername = \"alice\"\npassword = \"pw-a\"\nworkload = \"fn/caller\"\n\
         [[credential]]\nusername = \"bob\"\npassword = \"pw-b\"\nworkload = \"fn/other\"\n\
         [[listener]]\nname = \"connect-auth\"\nkind = \"http-connect\"\n\
         bind = \"127.0.0.1:0\"\ncredentials = \"required\"\nverify_sni = \"on\"\n\
         sni_timeout = \"1s\"\nhandshake_timeout = \"2s\"\n\
         [[listener]]\nname = \"socks-auth\"\nkind = \"socks5\"\nbind = \"127.0.0.1:0\"\n\
         credentials = \"optional\"\nhandshake_timeout = \"2s\"\n\
         [[listener]]\nname = \"connect\"\nkind = \"http-connect\"\nbind = \"127.0.0.1:0\"\n\
         handshake_timeout = \"2s\"\n\
         [[listener]]\nname = \"socks\"\nkind = \"socks5\"\nbind = \"127.0.0.1:0\"\n\
         handshake_timeout = \"2s\"\nudp_max_destinations = 8\n\
         [[listener]]\nname = \"socks-one\"\nkind = \"socks5\"\nbind = \"127.0.0.1:0\"\n\
         handshake_timeout = \"2s\"\nudp_max_associations = 1\n\
         [[listener]]\nname = \"connect-one\"\nkind = \"http-connect\"\n\
         bind = \"127.0.0.1:0\"\nhandshake_timeout = \"5s\"\nmax_handshakes = 1\n\
         [[listener]]\nname = \"self\"\nkind = \"http-connect\"\nbind = \"127.0.0.31:0\"\n\
         [[listener]]\nname = \"connect-opt\"\nkind = \"http-connect\"\n\
         bind = \"127.0.0.1:0\"\ncredentials = \"optional\"\n\
         [[listener]]\nname = \"connect-strict\"\nkind = \"http-connect\"\n\
         bind = \"127.0.0.1:0\"\nverify_sni = \"strict\"\nsni_timeout = \"1s\"\n"
    );
    let hosts = ("hosts", "127.0.0.1 localhost\n::1 localhost\n");
    Gate::start_with(INVENTORY, POLICY, &config, &[hosts], &format!("{ADMIN}:0")).await
}

/// Waits (bounded) for a `deny` event on `listener` matching `pred`; returns it.
async fn wait_deny(
    gate: &Gate,
    listener: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    gate.wait_event(&format!("deny on {listener}"), |e| {
        e["event"] == "deny" && e["listener"] == listener && pred(e)
    })
    .await
}

/// A UDP server on `ip` that counts datagrams and echoes them.
async fn udp_echo(ip: &str) -> (u16, Arc<AtomicUsize>) {
    let s = UdpSocket::bind((ip, 0)).await.unwrap();
    let port = s.local_addr().unwrap().port();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((len, from)) = s.recv_from(&mut buf).await else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let _ = s.send_to(&buf[..len], from).await;
        }
    });
    (port, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_name_the_workload_and_wrong_ones_are_refused() {
    if skip_unless(&[Need::Bin("curl"), Need::Bin("python3"), Need::Bin("openssl")]) {
        return;
    }
    let gate = start_gate().await;
    let (_web, web_port) = http_server(gate.dir.path()).await;
    let (_tls, tls_port) = https_server(gate.dir.path()).await;
    let (sink_port, accepted) = sink(SINK).await;
    let ca = gate.addr("connect-auth");
    let sa = gate.addr("socks-auth");
    let web_url = format!("http://web.test:{web_port}/hello.txt");
    let tls_url = format!("https://tls.test:{tls_port}/");
    let sink_url = format!("telnet://sink.test:{sink_port}");

    // Two functions behind one address: alice (fn/caller) is allowed, bob (fn/other) not.
    let alice = format!("http://alice:pw-a@{ca}");
    let (code, body, err) = curl(&["--interface", SHARED, "-x", &alice, &web_url]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "hello from the web server\n");
    let (code, body, err) = curl(&[
        "-k",
        "--interface",
        SHARED,
        "-x",
        &format!("http://{ca}"),
        "--proxy-user",
        "alice:pw-a",
        &tls_url,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(body.contains("s_server"), "{body}");
    let bob = format!("http://bob:pw-b@{ca}");
    let (_, _, err) = curl(&["--interface", SHARED, "-x", &bob, &web_url]).await;
    assert!(err.contains("< HTTP/1.1 403"), "{err}");
    let e = wait_deny(&gate, "connect-auth", |e| e["fqdn"] == "web.test").await;
    assert_eq!(e["src_workload"], "fn/other", "{e}");
    assert!(e["src"].as_str().unwrap().starts_with(SHARED));
    let c = gate.counters("connect-auth");
    assert_eq!(get(&c.allowed), 2);

    // Wrong password, unknown user, no credentials at all: 407 with a challenge, counted,
    // logged; the sink (which alice may reach) is never dialled.
    for proxy in [format!("http://alice:wrong@{ca}"), format!("http://eve:pw-a@{ca}")] {
        let (_, _, err) = curl(&["--interface", SHARED, "-x", &proxy, &sink_url]).await;
        assert!(err.contains("< HTTP/1.1 407"), "{err}");
        assert!(err.contains("Proxy-Authenticate: Basic"), "{err}");
    }
    let (_, _, err) =
        curl(&["--interface", CALLER, "-x", &format!("http://{ca}"), &sink_url]).await;
    assert!(err.contains("< HTTP/1.1 407"), "{err}");
    assert_eq!(get(&c.auth_failed), 3);
    let e = wait_deny(&gate, "connect-auth", |e| e["reason"] == "auth-failed").await;
    assert_eq!(e["fqdn"], "sink.test");
    wait_deny(&gate, "connect-auth", |e| e["reason"] == "auth-required").await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "no refused credential reached the sink");
    let (code, body, err) = curl(&["--interface", SHARED, "-x", &alice, &sink_url]).await;
    assert_eq!((code, body.as_str()), (0, "ok"), "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // HTTP with credentials optional: none → the address is the identity (fn/caller
    // allowed, 127.0.0.12 nobody: 403); wrong ones are still refused with 407.
    let co = gate.addr("connect-opt");
    let plain = format!("http://{co}");
    let (code, body, err) = curl(&["--interface", CALLER, "-x", &plain, &sink_url]).await;
    assert_eq!((code, body.as_str()), (0, "ok"), "{err}");
    let (_, _, err) = curl(&["--interface", SHARED, "-x", &plain, &sink_url]).await;
    assert!(err.contains("< HTTP/1.1 403"), "{err}");
    let (_, _, err) =
        curl(&["--interface", CALLER, "-x", &format!("http://alice:bad@{co}"), &sink_url]).await;
    assert!(err.contains("< HTTP/1.1 407"), "{err}");
    assert_eq!(get(&gate.counters("connect-opt").auth_failed), 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // SOCKS5 (credentials optional): alice allowed, bob refused 0x02, a wrong password
    // gets the RFC 1929 failure and never a dial; no credentials: the source address is
    // the identity (127.0.0.12 is nobody: refused; 127.0.0.10 is fn/caller: allowed).
    let s = |u: &str| format!("{u}@{sa}");
    let (code, body, err) =
        curl(&["--interface", SHARED, "--socks5-hostname", &s("alice:pw-a"), &web_url]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "hello from the web server\n");
    let (code, _, err) =
        curl(&["--interface", SHARED, "--socks5-hostname", &s("bob:pw-b"), &web_url]).await;
    assert_eq!(code, 97, "{err}");
    let e = wait_deny(&gate, "socks-auth", |e| e["fqdn"] == "web.test").await;
    assert_eq!(e["src_workload"], "fn/other", "{e}");
    let (code, _, err) =
        curl(&["--interface", SHARED, "--socks5-hostname", &s("alice:nope"), &sink_url]).await;
    assert_eq!(code, 97, "{err}");
    assert!(err.contains("rejected by the SOCKS5 server"), "{err}");
    let sc = gate.counters("socks-auth");
    wait_count(&sc.auth_failed, 1).await;
    wait_deny(&gate, "socks-auth", |e| e["reason"] == "auth-failed").await;
    let (code, _, err) =
        curl(&["--interface", SHARED, "--socks5-hostname", &sa.to_string(), &sink_url]).await;
    assert_eq!(code, 97, "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "wrong password and nobody: no dial");
    let (code, body, err) =
        curl(&["--interface", CALLER, "--socks5-hostname", &sa.to_string(), &sink_url]).await;
    assert_eq!((code, body.as_str()), (0, "ok"), "{err}");
    let (code, body, err) =
        curl(&["--interface", SHARED, "--socks5-hostname", &s("alice:pw-a"), &sink_url]).await;
    assert_eq!((code, body.as_str()), (0, "ok"), "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    assert_eq!(get(&sc.allowed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_sni_refuses_a_client_hello_for_another_host() {
    if skip_unless(&[Need::Bin("curl"), Need::Bin("openssl")]) {
        return;
    }
    let gate = start_gate().await;
    let (_tls, tls_port) = https_server(gate.dir.path()).await;
    let ca = format!("http://alice:pw-a@{}", gate.addr("connect-auth"));
    let c = gate.counters("connect-auth");

    // SNI = CONNECT host: through.
    let url = format!("https://tls.test:{tls_port}/");
    let (code, body, err) = curl(&["-k", "--interface", SHARED, "-x", &ca, &url]).await;
    assert_eq!(code, 0, "{err}");
    assert!(body.contains("s_server"));

    // Domain fronting: curl asks the proxy for tls.test (allowed) but its ClientHello
    // names fronted.test. The tunnel is reset before a byte reaches the server.
    let fronted = format!("https://fronted.test:{tls_port}/");
    let to = format!("fronted.test:{tls_port}:tls.test:{tls_port}");
    let (code, _, err) =
        curl(&["-k", "--interface", SHARED, "-x", &ca, "--connect-to", &to, &fronted]).await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("CONNECT tls.test:"), "curl did CONNECT to the real host: {err}");
    assert!(err.contains("200 Connection established"), "{err}");
    wait_count(&c.sni_refused, 1).await;
    let e = wait_deny(&gate, "connect-auth", |e| {
        e["reason"] == "sni-mismatch" && e["fqdn"] == "tls.test"
    })
    .await;
    assert_eq!(e["dst"], format!("{TLS}:{tls_port}"));
    assert_eq!(e["src_workload"], "fn/caller", "alice's workload, not the shared address");

    // openssl s_client through the same proxy with -servername: refused too.
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-proxy"])
        .arg(gate.addr("connect-auth").to_string())
        .args(["-proxy_user", "alice", "-proxy_pass", "pass:pw-a", "-connect"])
        .arg(format!("tls.test:{tls_port}"))
        .args(["-servername", "evil.test"])
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out).await.unwrap().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"));
    wait_count(&c.sni_refused, 2).await;

    // Plain bytes (not TLS) pass under `on`.
    let (port, accepted) = sink(SINK).await;
    let mut s = TcpStream::connect(gate.addr("connect-auth")).await.unwrap();
    let req = format!(
        "CONNECT sink.test:{port} HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6cHctYQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 39];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await.unwrap().unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"));
    s.write_all(b"hello").await.unwrap();
    let mut ok = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ok)).await.unwrap().unwrap();
    assert_eq!(&ok, b"ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(get(&c.sni_refused), 2);

    // `strict`: the same plain bytes are refused, and so is silence past sni_timeout; the
    // client never sees the upstream's "ok".
    for first in [&b"hello"[..], &b""[..]] {
        let mut s = from_caller(gate.addr("connect-strict")).await;
        let req = format!("CONNECT sink.test:{port} HTTP/1.1\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = [0u8; 39];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await;
        assert!(read.is_ok_and(|r| r.is_ok()) && head.starts_with(b"HTTP/1.1 200"));
        s.write_all(first).await.unwrap();
        let got = read_to_close(&mut s).await.expect("strict: not closed");
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
    assert_eq!(get(&gate.counters("connect-strict").sni_refused), 2);
}

/// The SOCKS5 UDP client: python3, stdlib only. Prints one JSON line of results.
const UDP_CLIENT: &str = r#"
import json, socket, struct, sys
proxy_host, proxy_port, src, echo_port, no_port, ssrf_port, ssrf6_port = sys.argv[1:8]
proxy_port, echo_port, no_port, ssrf_port, ssrf6_port = map(int, (proxy_port, echo_port, no_port, ssrf_port, ssrf6_port))
out = {}
t = socket.create_connection((proxy_host, proxy_port), timeout=5, source_address=(src, 0))
t.sendall(b"\x05\x01\x00"); assert t.recv(2) == b"\x05\x00"
t.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("0.0.0.0") + struct.pack(">H", 0))
rep = t.recv(10)
out["reply"] = rep[1]
relay = (socket.inet_ntoa(rep[4:8]), struct.unpack(">H", rep[8:10])[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((src, 0)); u.settimeout(0.5)
def v4(ip, port): return b"\x00\x00\x00\x01" + socket.inet_aton(ip) + struct.pack(">H", port)
def v6(ip, port): return b"\x00\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, ip) + struct.pack(">H", port)
def name(n, port): return b"\x00\x00\x00\x03" + bytes([len(n)]) + n.encode() + struct.pack(">H", port)
def ask(hdr, payload):
    u.sendto(hdr + payload, relay)
    try:
        d, _ = u.recvfrom(4096)
        return d.hex()
    except socket.timeout:
        return None
out["by_name"] = ask(name("udp.test", echo_port), b"one")
out["by_addr"] = ask(v4("127.0.0.24", echo_port), b"two")
out["denied_name"] = [ask(name("udpblocked.test", no_port), b"x") for _ in range(2)]
out["denied_addr"] = ask(v4("127.0.0.25", no_port), b"y")
out["ssrf"] = [ask(hdr, b"z") for hdr in (v4("127.0.0.1", ssrf_port), name("2130706433", ssrf_port),
    name("localhost.", ssrf_port), v6("::1", ssrf6_port), v6("::ffff:127.0.0.1", ssrf_port))]
frag = bytearray(v4("127.0.0.24", echo_port)); frag[2] = 1
out["frag"] = ask(bytes(frag), b"f")
t.close()
import time; time.sleep(0.3)
out["after_close"] = ask(v4("127.0.0.24", echo_port), b"late")
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_udp_associate_relays_allowed_datagrams_and_drops_the_rest() {
    if skip_unless(&[Need::Bin("python3")]) {
        return;
    }
    let gate = start_gate().await;
    let (echo_port, echoed) = udp_echo(UDP_OK).await;
    let (no_port, no_count) = udp_echo(UDP_NO).await;
    let (ssrf_port, ssrf_count) = udp_echo("127.0.0.1").await;
    let (ssrf6_port, ssrf6_count) = udp_echo("::1").await;
    let socks = gate.addr("socks");
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(UDP_CLIENT)
        .args([socks.ip().to_string(), socks.port().to_string(), CALLER.to_owned()])
        .args([echo_port, no_port, ssrf_port, ssrf6_port].map(|p| p.to_string()))
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(r["reply"], 0, "{r}");
    // Answers come back wrapped with the echo server's address (ATYP 1, 127.0.0.24).
    let wrapped = |payload: &str| {
        let mut h = format!("00000001{}", hex(&[127, 0, 0, 24]));
        h.push_str(&hex(&echo_port.to_be_bytes()));
        h.push_str(&hex(payload.as_bytes()));
        h
    };
    assert_eq!(r["by_name"], wrapped("one"), "{r}");
    assert_eq!(r["by_addr"], wrapped("two"), "{r}");
    assert_eq!(r["denied_name"], serde_json::json!([null, null]));
    assert!(r["denied_addr"].is_null());
    assert_eq!(r["ssrf"], serde_json::json!([null, null, null, null, null]));
    assert!(r["frag"].is_null());
    assert!(r["after_close"].is_null(), "the association ended with its control connection");
    assert_eq!(echoed.load(Ordering::SeqCst), 2, "only the two allowed datagrams");
    assert_eq!(no_count.load(Ordering::SeqCst), 0);
    assert_eq!(ssrf_count.load(Ordering::SeqCst), 0);
    assert_eq!(ssrf6_count.load(Ordering::SeqCst), 0);
    // One deny per destination (the verdict is cached), with the name where there was one.
    let e = wait_deny(&gate, "socks", |e| e["fqdn"] == "udpblocked.test").await;
    assert_eq!(e["proto"], "udp", "{e}");
    let n = gate.log().iter().filter(|e| e["fqdn"] == "udpblocked.test").count();
    assert_eq!(n, 1, "{:?}", gate.log());
    wait_deny(&gate, "socks", |e| e["fqdn"] == "localhost" && e["reason"] == "ssrf").await;
    let c = gate.counters("socks");
    wait_count(&c.datagrams_dropped, 1).await;
    assert_eq!(get(&c.allowed), 1, "one allowed destination: udp.test and its address are one");
}

/// Opens a SOCKS5 control connection, asks for a UDP association (no authentication, any
/// client address) and returns the connection, kept open, with the reply code.
async fn associate(to: SocketAddr) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut method = [0u8; 2];
    s.read_exact(&mut method).await.unwrap();
    assert_eq!(method, [5, 0], "no-authentication accepted");
    s.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
    let mut reply = [0u8; 10];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut reply)).await;
    assert!(r.is_ok(), "no reply to UDP ASSOCIATE within the bound");
    r.unwrap().unwrap();
    (s, reply[1])
}

/// `udp_max_associations` bounds the associations open at once: one more is refused with a
/// general failure and counted, and the place is free again once a control connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_udp_associations_are_bounded_and_counted() {
    let gate = start_gate().await;
    let socks = gate.addr("socks-one");
    let c = gate.counters("socks-one");
    let (first, code) = associate(socks).await;
    assert_eq!(code, 0, "the first association succeeds");
    let (_second, code) = associate(socks).await;
    assert_eq!(code, 1, "a second one while the first is open gets a general failure");
    assert_eq!(c.udp_associations_full.load(Ordering::SeqCst), 1);
    drop(first);
    // The first association ends with its control connection; its place is then free.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_third, code) = associate(socks).await;
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the place was not given back after the close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `max_handshakes` bounds the handshakes in progress: a client beyond it gets 503 at once,
/// counted under its own limit (not as `max_connections`), and the slot is free again once
/// the slow client goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_handshakes_are_bounded_and_counted() {
    let gate = start_gate().await;
    let to = gate.addr("connect-one");
    let c = gate.counters("connect-one");
    // A slow client: half a request line, then nothing; it holds the only slot.
    let mut slow = TcpStream::connect(to).await.unwrap();
    slow.write_all(b"CONNECT web.te").await.unwrap();
    wait_count(&c.accepted, 1).await;
    // Its task takes the slot as soon as it runs, within microseconds of the accept.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reply = raw_exchange(to, b"CONNECT web.test:80 HTTP/1.1\r\n\r\n").await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 503 "), "a client beyond max_handshakes: {text:?}");
    assert_eq!(c.handshakes_full.load(Ordering::SeqCst), 1);
    assert_eq!(c.limit_reached.load(Ordering::SeqCst), 0, "max_connections was never reached");
    drop(slow);
    // With the slow client gone its slot is free: the next request is read and parsed (a
    // malformed one, so the answer is an immediate 400 rather than a tunnel).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = raw_exchange(to, b"NOT A REQUEST\r\n\r\n").await;
        let text = String::from_utf8_lossy(&reply).into_owned();
        if !text.starts_with("HTTP/1.1 503 ") {
            assert!(text.starts_with("HTTP/1.1 400 "), "the request was handled: {text:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not given back after the close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.handshakes_full.load(Ordering::SeqCst) >= 1);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn raw_exchange(to: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = from_caller(to).await;
    s.write_all(bytes).await.unwrap();
    read_to_close(&mut s)
        .await
        .unwrap_or_else(|| panic!("proxy did not close within the bound after {bytes:?}"))
}

/// Sends `first` to the proxy at `to` (from [`CALLER`]); if the proxy's reply is whole
/// (`replied`) and the connection still open — a tunnel — sends `then` through it. Returns
/// everything the proxy sent back, once it closed (bounded).
async fn exchange_then(
    to: SocketAddr,
    first: &[u8],
    replied: impl Fn(&[u8]) -> bool,
    then: &[u8],
) -> Vec<u8> {
    let mut s = from_caller(to).await;
    s.write_all(first).await.unwrap();
    let mut out = Vec::new();
    let mut sent_then = false;
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if !sent_then && replied(&out) {
                sent_then = true;
                if s.write_all(then).await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
    assert!(r.is_ok(), "proxy did not close within the bound after {first:?}");
    out
}

/// Every spelling of a loopback address, and flowgate's own listeners (its admin API
/// among them), refused through both listeners with 403 / 0x02 even though the policy
/// allows 127.0.0.1, ::1 and the admin API's address: the counting servers see no
/// connection, and the admin API no request (every attempt sends one through the tunnel,
/// should the proxy open one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_spellings_and_own_listeners_are_refused_through_both_listeners() {
    let gate = start_gate().await;
    let admin_addr = gate.running.admin();
    assert_eq!(admin_addr.ip().to_string(), ADMIN);
    let admin_requests = || get(&gate.rt.registry.control.admin_requests);
    // What a client would send the admin API through an opened tunnel.
    let admin_request = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let (port, v4_hits) = sink("127.0.0.1").await;
    let v6 = TcpListener::bind(("::1", port)).await.unwrap();
    let v6_hits = Arc::new(AtomicUsize::new(0));
    let hits = v6_hits.clone();
    tokio::spawn(async move {
        while v6.accept().await.is_ok() {
            hits.fetch_add(1, Ordering::SeqCst);
        }
    });
    let own = gate.addr("self");
    let hosts: Vec<(String, &str)> = vec![
        (format!("2130706433:{port}"), "ssrf"),
        (format!("0177.0.0.1:{port}"), "ssrf"),
        (format!("0x7f.1:{port}"), "ssrf"),
        (format!("[::ffff:127.0.0.1]:{port}"), "ssrf"),
        (format!("127.1:{port}"), "ssrf"),
        (format!("[::1]:{port}"), "ssrf"),
        (format!("localhost.:{port}"), "ssrf"),
        (format!("127.0.0.1:{port}"), "ssrf"),
        (admin_addr.to_string(), "own-listener"),
        (own.to_string(), "own-listener"),
        (gate.addr("connect").to_string(), "own-listener"),
    ];
    let connect = gate.addr("connect");
    let requests = admin_requests();
    for (host, reason) in &hosts {
        let req = format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let head_done = |r: &[u8]| r.windows(4).any(|w| w == b"\r\n\r\n");
        let reply = exchange_then(connect, req.as_bytes(), head_done, admin_request).await;
        assert_eq!(admin_requests(), requests, "{host}: the proxy reached its own admin API");
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 403"), "{host}: {text}");
        assert!(text.contains(reason), "{host}: {text}");
    }
    let socks = gate.addr("socks");
    for (host, _) in &hosts {
        // The host as a SOCKS5 domain name, exactly as written (brackets stripped).
        let (h, p) = host.rsplit_once(':').unwrap();
        let h = h.trim_start_matches('[').trim_end_matches(']');
        let p: u16 = p.parse().unwrap();
        let mut msg = vec![5, 1, 0, 5, 1, 0, 3, h.len() as u8];
        msg.extend_from_slice(h.as_bytes());
        msg.extend_from_slice(&p.to_be_bytes());
        // The method reply, then a reply with an IPv4 bound address.
        let r = exchange_then(socks, &msg, |r: &[u8]| r.len() >= 12, admin_request).await;
        assert_eq!(admin_requests(), requests, "{host}: the proxy reached its own admin API");
        assert_eq!(r.get(..4), Some(&[5, 0, 5, 2][..]), "{host}: {r:?}");
    }
    // The same through IPv4/IPv6 address types.
    let mut msg = vec![5, 1, 0, 5, 1, 0, 4];
    msg.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    msg.extend_from_slice(&port.to_be_bytes());
    assert_eq!(raw_exchange(socks, &msg).await.get(..4), Some(&[5, 0, 5, 2][..]));
    let mut msg = vec![5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1];
    msg.extend_from_slice(&port.to_be_bytes());
    assert_eq!(raw_exchange(socks, &msg).await.get(..4), Some(&[5, 0, 5, 2][..]));
    assert_eq!(v4_hits.load(Ordering::SeqCst), 0);
    assert_eq!(v6_hits.load(Ordering::SeqCst), 0);
    assert_eq!(admin_requests(), requests);
    let n = hosts.len() as u64;
    assert_eq!(get(&gate.counters("connect").denied), n);
    assert_eq!(get(&gate.counters("socks").denied), n + 2);
    wait_deny(&gate, "socks", |e| e["fqdn"] == "localhost" && e["reason"] == "ssrf").await;
}

/// `flowgate run` as a process: a password from the environment (`password_env`) works
/// for a `required` SOCKS5 listener, no credentials get "no acceptable method", and a
/// variable that is not set stops start-up with an error naming the credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowgate_run_reads_passwords_from_the_environment() {
    if skip_unless(&[Need::Bin("curl")]) {
        return;
    }
    let (port, accepted) = sink(SINK).await;
    let config = format!(
        "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"300ms\"\n\
         [dns.static]\n\"sink.test\" = [\"{SINK}\"]\n\
         [ssrf]\ntreat_as_external = [\"{SINK}/32\"]\n\
         [[credential]]\nusername = \"alice\"\npassword_env = \"FG_TEST_ALICE_PW\"\n\
         workload = \"fn/caller\"\n\
         [[listener]]\nname = \"socks\"\nkind = \"socks5\"\nbind = \"127.0.0.1:0\"\n\
         credentials = \"required\"\n"
    );
    let (_dir, path) = write_world(INVENTORY, POLICY, &config, &[], "127.0.0.1:0");
    let exe = env!("CARGO_BIN_EXE_flowgate");

    // Unset: start-up fails, naming the credential and the variable.
    let out = tokio::process::Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env_remove("FG_TEST_ALICE_PW")
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await.unwrap().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("alice") && err.contains("FG_TEST_ALICE_PW"), "{err}");

    let mut cmd = Flowgate::command(&path);
    cmd.env("FG_TEST_ALICE_PW", "from-env");
    let mut fg = Flowgate::spawn(cmd);
    let socks = fg.listener("socks");
    fg.wait_ready();
    let url = format!("telnet://sink.test:{port}");
    let proxy = format!("alice:from-env@{socks}");
    let (code, body, err) = curl(&["--interface", SHARED, "--socks5-hostname", &proxy, &url]).await;
    assert_eq!((code, body.as_str()), (0, "ok"), "{err}");
    let plain = socks.to_string();
    let (code, _, err) = curl(&["--interface", CALLER, "--socks5-hostname", &plain, &url]).await;
    assert_eq!(code, 97, "required: no credentials, no tunnel: {err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A reload re-decides a credentialed tunnel as its credential's workload, not as its
/// address (127.0.0.12 is nobody, which the policy would refuse): a reload that keeps the
/// rule keeps the tunnel; one that drops the rule cuts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_re_decides_a_credentialed_tunnel_as_its_workload() {
    let gate = start_gate().await;
    let echo = TcpListener::bind((SINK, 0)).await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else { continue };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{SHARED}:0").parse().unwrap()).unwrap();
    let mut t = sock.connect(gate.addr("connect-opt")).await.unwrap();
    let req = format!(
        "CONNECT sink.test:{port} HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6cHctYQ==\r\n\r\n"
    );
    t.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 39];
    tokio::time::timeout(Duration::from_secs(5), t.read_exact(&mut head)).await.unwrap().unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    assert!(echo_ping(&mut t).await);

    // Each reload goes through the control plane, the one writer of the policy: a changed
    // source is a new generation, and the open tunnel is decided again under it.
    let policy_file = gate.dir.path().join("policies/policy.yaml");
    let reload = || async {
        let report = gate.control.reload(flowgate::control::Trigger::Api).await;
        assert_eq!(report.result, flowgate::control::ReloadResult::Ok, "{report:?}");
        RevalidateStats { checked: report.revalidated, revoked: report.revoked }
    };
    // The same policy, touched (a comment): generation 2 still lets alice's workload in.
    std::fs::write(&policy_file, format!("{POLICY}\n# generation 2\n")).unwrap();
    let stats = reload().await;
    assert_eq!((stats.checked, stats.revoked), (1, 0), "kept: alice's workload may");
    assert!(echo_ping(&mut t).await);

    // The same policy without the networks rule: fn/caller may no longer reach the sink.
    let narrowed = POLICY.replace(
        "        - networks: [127.0.0.23/32, 127.0.0.24/32, 127.0.0.30/32, 127.0.0.1/32, '::1/128']",
        "        - networks: [127.0.0.24/32]",
    );
    assert_ne!(narrowed, POLICY);
    std::fs::write(&policy_file, narrowed).unwrap();
    let stats = reload().await;
    assert_eq!((stats.checked, stats.revoked), (1, 1), "cut: the rule is gone");
    // The cut is asynchronous: the tunnel's task closes the connection when it next runs,
    // so a ping sent at once may still make the round trip. Wait (bounded) for the close
    // instead; nothing is sent, so only a cut ends the read.
    let closed = async {
        let mut b = [0u8; 64];
        while let Ok(1..) = t.read(&mut b).await {}
    };
    let closed = tokio::time::timeout(Duration::from_secs(5), closed).await;
    assert!(closed.is_ok(), "the tunnel is cut");
}

/// Sends `ping` through the tunnel and expects it back (bounded).
async fn echo_ping(t: &mut TcpStream) -> bool {
    let fut = async {
        t.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        t.read_exact(&mut b).await?;
        std::io::Result::Ok(&b == b"ping")
    };
    matches!(tokio::time::timeout(Duration::from_secs(3), fut).await, Ok(Ok(true)))
}
