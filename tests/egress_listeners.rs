//! The `http-connect` and `socks5` listeners end to end: flowgate in-process, built from
//! real config text the way `flowgate run` builds it; real curl processes as clients; a
//! real HTTP server (`python3 -m http.server`) and a real HTTPS server (`openssl
//! s_server`, self-signed cert made by `openssl req` here) on loopback, reached by names
//! from the static DNS table; `[ssrf] treat_as_external` lifts exactly their addresses.
//!
//! Identities: 127.0.0.10 is `fn/caller` (an AdminNetworkPolicy allows it the names
//! `web.test`, `tls.test` and the network 127.0.0.23/32, the counting sink); 127.0.0.11 is
//! `fn/other` (nothing allows it). `blocked.test` resolves to the web server's address
//! but is not an allowed name; `private.test` resolves to 10.0.0.1 (SSRF guard).
//!
//! Bad input goes to a sink on 127.0.0.23 that counts accepts: after one allowed
//! control connection, no malformed handshake may add to it. Every wait is bounded.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;
use support::egress::*;
use support::process::Flowgate;
use support::require::{Need, skip_unless};

const POLICY: &str = caller_egress_policy!(
    "apis" => "domainNames: [web.test, tls.test]",
    "sink" => "networks: [127.0.0.23/32]",
);

/// flowgate with an `http-connect` and a `socks5` listener, static names for the peers.
async fn start_gate() -> Gate {
    let config = format!(
        "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"300ms\"\n\
         [dns.static]\n\"web.test\" = [\"{WEB}\"]\n\"tls.test\" = [\"{TLS}\"]\n\
         \"blocked.test\" = [\"{WEB}\"]\n\"sink.test\" = [\"{SINK}\"]\n\
         \"private.test\" = [\"10.0.0.1\"]\n\
         [ssrf]\ntreat_as_external = [\"{WEB}/32\", \"{TLS}/32\", \"{SINK}/32\"]\n\
         [[listener]]\nname = \"connect\"\nkind = \"http-connect\"\nbind = \"127.0.0.1:0\"\n\
         handshake_timeout = \"1s\"\nmax_header_bytes = 4096\nmax_headers = 16\n\
         [[listener]]\nname = \"socks\"\nkind = \"socks5\"\nbind = \"127.0.0.1:0\"\n\
         handshake_timeout = \"1s\"\n"
    );
    Gate::start(INVENTORY, POLICY, &config).await
}

/// Waits (bounded) for a `deny` event carrying `fqdn` from `src`; returns it.
async fn wait_deny(gate: &Gate, fqdn: &str, src: &str) -> serde_json::Value {
    gate.wait_event(&format!("deny {fqdn} from {src}"), |e| {
        e["event"] == "deny"
            && e["fqdn"] == fqdn
            && e["src"].as_str().is_some_and(|s| s.starts_with(src))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_allowed_names_and_is_refused_otherwise() {
    if skip_unless(&[Need::Bin("curl"), Need::Bin("python3"), Need::Bin("openssl")]) {
        return;
    }
    let gate = start_gate().await;
    let (_web, web_port) = http_server(gate.dir.path()).await;
    let (_tls, tls_port) = https_server(gate.dir.path()).await;
    let connect = format!("http://{}", gate.addr("connect"));
    let socks = gate.addr("socks").to_string();
    let web_url = format!("http://web.test:{web_port}/hello.txt");
    let tls_url = format!("https://tls.test:{tls_port}/");

    // Allowed: HTTP through CONNECT-proxy (absolute form), HTTPS through a CONNECT tunnel,
    // both through SOCKS5 with the name resolved by flowgate.
    let (code, body, err) = curl(&["--interface", CALLER, "-x", &connect, &web_url]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "hello from the web server\n");
    let (code, body, err) = curl(&["-k", "--interface", CALLER, "-x", &connect, &tls_url]).await;
    assert_eq!(code, 0, "{err}");
    assert!(body.contains("s_server"), "{body}");
    assert!(err.contains("200 Connection established"), "{err}");
    let (code, body, err) =
        curl(&["--interface", CALLER, "--socks5-hostname", &socks, &web_url]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "hello from the web server\n");
    let (code, body, err) =
        curl(&["-k", "--interface", CALLER, "--socks5-hostname", &socks, &tls_url]).await;
    assert_eq!(code, 0, "{err}");
    assert!(body.contains("s_server"), "{body}");
    assert_eq!(get(&gate.counters("connect").allowed), 2);
    assert_eq!(get(&gate.counters("socks").allowed), 2);

    // Refused: a name the policy does not allow (same address as an allowed one), an
    // allowed name from a client the policy does not cover, a name resolving to a
    // private address.
    let blocked = format!("https://blocked.test:{tls_port}/");
    let (code, _, err) = curl(&["-k", "--interface", CALLER, "-x", &connect, &blocked]).await;
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    let e = wait_deny(&gate, "blocked.test", CALLER).await;
    assert_eq!(e["listener"], "connect");
    assert_eq!(e["src_workload"], "fn/caller");
    assert_eq!(e["dst"], format!("{WEB}:{tls_port}"));

    let (code, _, err) = curl(&["--interface", OTHER, "-x", &connect, &web_url]).await;
    assert_eq!(code, 0, "curl gets the 403 response itself: {err}");
    assert!(err.contains("< HTTP/1.1 403"), "{err}");
    wait_deny(&gate, "web.test", OTHER).await;

    let private = format!("http://private.test:{web_port}/");
    let (_, _, err) = curl(&["--interface", CALLER, "-x", &connect, &private]).await;
    assert!(err.contains("< HTTP/1.1 403"), "{err}");
    let e = wait_deny(&gate, "private.test", CALLER).await;
    assert_eq!(e["reason"], "ssrf");

    let (code, _, err) =
        curl(&["--interface", CALLER, "--socks5-hostname", &socks, &blocked]).await;
    assert_eq!(code, 97, "CURLE_PROXY: {err}");
    assert!(err.contains("(2)") || err.contains("not allowed"), "SOCKS reply 0x02: {err}");
    let e = wait_deny(&gate, "blocked.test", CALLER).await;
    assert!(gate.log().iter().any(|l| l["listener"] == "socks" && l["fqdn"] == "blocked.test"));
    assert_eq!(e["event"], "deny");
    assert_eq!(get(&gate.counters("connect").denied), 3);
    assert_eq!(get(&gate.counters("socks").denied), 1);
}

/// Sends `bytes` (optionally half-closing), then reads until the proxy closes (bounded:
/// the handshake timeout is 1s, so 5s means "never closed").
async fn exchange(to: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = from_caller(to).await;
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    read_to_close(&mut s)
        .await
        .unwrap_or_else(|| panic!("proxy did not close within the bound after {bytes:?}"))
}

fn status(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply).lines().next().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_get_their_error_and_never_reach_the_upstream() {
    let gate = start_gate().await;
    let (port, accepted) = sink(SINK).await;
    let connect = gate.addr("connect");
    let socks = gate.addr("socks");

    // Control: a well-formed CONNECT to the sink is tunnelled (the counter can move).
    let ok = format!("CONNECT sink.test:{port} HTTP/1.1\r\nHost: sink.test:{port}\r\n\r\n");
    let reply = exchange(connect, ok.as_bytes(), false).await;
    assert!(status(&reply).contains("200"), "{}", String::from_utf8_lossy(&reply));
    assert!(reply.ends_with(b"ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    let long_line = format!("CONNECT sink.test:{port}/{} HTTP/1.1\r\n\r\n", "a".repeat(5000));
    let many_headers = format!(
        "CONNECT sink.test:{port} HTTP/1.1\r\n{}\r\n",
        (0..40).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
    );
    let cases: Vec<(String, &str)> = vec![
        ("CONNECT sink.test HTTP/1.1\r\nHost: sink.test\r\n\r\n".into(), "400"),
        ("CONNECT sink.test:0 HTTP/1.1\r\n\r\n".into(), "400"),
        ("CONNECT sink.test:65536 HTTP/1.1\r\n\r\n".into(), "400"),
        (
            format!("GET http://u:p@sink.test:{port}/ HTTP/1.1\r\nHost: sink.test:{port}\r\n\r\n"),
            "400",
        ),
        (format!("GET http://sink.test:{port}/ HTTP/1.1\r\nHost: web.test\r\n\r\n"), "400"),
        (long_line, "400"),
        (many_headers, "400"),
        // Slowloris: half a request line, then nothing: 408 after the 1s handshake timeout.
        ("CONNECT sink.te".into(), "408"),
    ];
    for (req, want) in &cases {
        let reply = exchange(connect, req.as_bytes(), false).await;
        assert!(status(&reply).contains(want), "{req:?} → {:?}", String::from_utf8_lossy(&reply));
    }
    let c = gate.counters("connect");
    wait_count(&c.handshake_timeout, 1).await;
    wait_count(&c.handshake_malformed, 7).await;

    // Bytes glued behind a CONNECT head belong to the tunnel (an optimistic client, issue
    // 22): it is opened and they go through; this is the one more connection the sink sees.
    let glued = format!("CONNECT sink.test:{port} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n");
    let reply = exchange(connect, glued.as_bytes(), false).await;
    assert!(status(&reply).contains("200"), "{}", String::from_utf8_lossy(&reply));
    assert!(reply.ends_with(b"ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // SOCKS5. Zero methods: "no acceptable method" (0xff), close.
    assert_eq!(exchange(socks, &[5, 0], false).await, vec![5, 0xff]);
    // Truncated address (IPv4 cut after two bytes), then EOF: method reply only, close.
    assert_eq!(exchange(socks, &[5, 1, 0, 5, 1, 0, 1, 127, 0], true).await, vec![5, 0]);
    // Unknown address type: reply 0x08.
    let r = exchange(socks, &[5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80], false).await;
    assert_eq!(r.get(..4), Some(&[5, 0, 5, 8][..]), "{r:?}");
    // Port 0 to an allowed address: general failure.
    let r = exchange(socks, &[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 23, 0, 0], false).await;
    assert_eq!(r.get(..4), Some(&[5, 0, 5, 1][..]), "{r:?}");
    // Slowloris: the greeting's first byte only; closed after the timeout.
    assert!(exchange(socks, &[5], false).await.is_empty());
    let s = gate.counters("socks");
    wait_count(&s.handshake_timeout, 1).await;

    // Control again through SOCKS5 (address form), so the sink is shown reachable there.
    let p = port.to_be_bytes();
    let r = exchange(socks, &[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 23, p[0], p[1]], false).await;
    assert_eq!(r.get(..4), Some(&[5, 0, 5, 0][..]), "{r:?}");
    assert!(r.ends_with(b"ok"));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "only the two controls and the optimistic tunnel reached the sink"
    );
}

/// `flowgate run` as a process builds the resolver and guard from `[dns]`/`[ssrf]`: the
/// static name reaches the sink through its SOCKS5 listener, and a name it does not
/// allow is refused with 0x02 and logged with the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowgate_run_serves_socks5_from_its_config() {
    if skip_unless(&[Need::Bin("curl")]) {
        return;
    }
    let (port, accepted) = sink(SINK).await;
    let config = format!(
        "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"300ms\"\n\
         [dns.static]\n\"sink.test\" = [\"{SINK}\"]\n\"blocked.test\" = [\"{WEB}\"]\n\
         [ssrf]\ntreat_as_external = [\"{WEB}/32\", \"{SINK}/32\"]\n\
         [[listener]]\nname = \"socks\"\nkind = \"socks5\"\nbind = \"127.0.0.1:0\"\n"
    );
    let (dir, path) = write_world(INVENTORY, POLICY, &config, &[], "127.0.0.1:0");
    let mut fg = Flowgate::run(&path);
    let socks = fg.listener("socks").to_string();
    fg.wait_ready();

    let url = format!("telnet://sink.test:{port}");
    let (code, body, err) = curl(&["--interface", CALLER, "--socks5-hostname", &socks, &url]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    let url = format!("telnet://blocked.test:{port}");
    let (code, _, err) = curl(&["--interface", CALLER, "--socks5-hostname", &socks, &url]).await;
    assert_eq!(code, 97, "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(dir.path().join("flow.log")).unwrap_or_default();
        if log.lines().any(|l| l.contains("\"deny\"") && l.contains("blocked.test")) {
            break;
        }
        assert!(Instant::now() < deadline, "no deny with the name: {log}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// Polls `path` (bounded) until it has a line with all of `needles`.
async fn wait_line(path: &std::path::Path, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no line with {needles:?} in {}: {text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends `ping` through the tunnel and expects the echo back (bounded).
async fn ping(tunnel: &mut TcpStream) -> bool {
    if tunnel.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping"
    )
}

/// A CONNECT tunnel allowed only by a `domainNames` rule stays up across a SIGHUP reload
/// that keeps the rule (the entry remembers the name it was admitted for), and is cut,
/// with a `revoked` event naming it, by one that removes the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnel_for_an_allowed_name_survives_a_reload() {
    // An echo server on WEB: reachable by the name web.test only (no rule allows WEB's
    // address by itself).
    let echo = TcpListener::bind((WEB, 0)).await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else { continue };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let config = format!(
        "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"300ms\"\n\
         [dns.static]\n\"web.test\" = [\"{WEB}\"]\n\
         [ssrf]\ntreat_as_external = [\"{WEB}/32\"]\n\
         [[listener]]\nname = \"connect\"\nkind = \"http-connect\"\n\
         bind = \"127.0.0.1:0\"\n"
    );
    let (dir, path) = write_world(INVENTORY, POLICY, &config, &[], "127.0.0.1:0");
    // The audit trail (one JSON line per reload) goes to flowgate's stderr.
    let mut fg = Flowgate::run(&path);
    let connect = fg.listener("connect");
    fg.wait_ready();

    let mut tunnel = from_caller(connect).await;
    let target = format!("web.test:{echo_port}");
    tunnel
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut byte))
            .await
            .expect("CONNECT answered within 5 s")
            .unwrap();
        assert!(n == 1 && head.len() < 4096, "proxy closed during CONNECT: {head:?}");
        head.push(byte[0]);
    }
    assert!(status(&head).contains(" 200"), "CONNECT refused: {}", status(&head));
    assert!(ping(&mut tunnel).await, "the tunnel carries data");

    // Reload 1: a policy change elsewhere; the name rule stays.
    let other =
        POLICY.replace("caller-egress", "caller-egress-2").replace("priority: 10", "priority: 20");
    std::fs::write(dir.path().join("policies/other.yaml"), other).unwrap();
    fg.signal(libc::SIGHUP);
    fg.wait_stderr_all(
        &["\"result\":\"ok\"", "\"generation\":2", "\"revalidated\":1"],
        Duration::from_secs(10),
    );
    assert!(ping(&mut tunnel).await, "a reload that keeps the name rule keeps the tunnel");

    // Reload 2: the name rule goes (from both policies); the tunnel is cut.
    let without = |p: &str| p.replace("[web.test, tls.test]", "[tls.test]");
    std::fs::write(dir.path().join("policies/policy.yaml"), without(POLICY)).unwrap();
    let other = without(POLICY)
        .replace("caller-egress", "caller-egress-2")
        .replace("priority: 10", "priority: 20");
    std::fs::write(dir.path().join("policies/other.yaml"), other).unwrap();
    fg.signal(libc::SIGHUP);
    fg.wait_stderr_all(
        &["\"result\":\"ok\"", "\"generation\":3", "\"revoked\":1"],
        Duration::from_secs(10),
    );
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tunnel.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the revoked tunnel closes");
    wait_line(&dir.path().join("flow.log"), &["\"revoked\"", "\"fqdn\":\"web.test\""]).await;
}
