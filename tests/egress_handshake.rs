//! The handshake drivers over real TCP sockets on 127.0.0.1, against raw clients that
//! send exactly the bad input the issue lists, and against curl as the real client for
//! CONNECT, absolute-form and SOCKS5 (with and without credentials).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::process::Command as Process;
use std::time::Duration;

use flowgate::egress::Target;
use flowgate::egress::handshake::http::{self, ProxyRequest, RequestForm};
use flowgate::egress::handshake::socks5::{self as socks_hs, AuthPolicy, SocksRequest, VerifyFn};
use flowgate::egress::handshake::{HandshakeError, HandshakeLimits};
use flowgate::wire::http_connect::{Limits, ParseError};
use flowgate::wire::socks5::{self, Command, ReplyCode};
use support::require::{Need, skip_unless};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

fn limits(timeout_ms: u64) -> HandshakeLimits {
    HandshakeLimits { head: Limits::default(), timeout: Duration::from_millis(timeout_ms) }
}

/// Accepts one connection and runs the HTTP driver on it; on success answers 403, as a
/// listener would for a refused destination.
async fn http_server(
    l: HandshakeLimits,
) -> (SocketAddr, JoinHandle<Result<ProxyRequest, HandshakeError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = Vec::new();
        let r = http::read_request(&mut s, &l, &mut buf).await;
        if r.is_ok() {
            http::reply_status(&mut s, 403, "refused: test").await.expect("reply");
        }
        r
    });
    (addr, task)
}

/// Sends `bytes`, half-closes nothing, reads until the server closes (bounded).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(bytes).await.expect("send");
    read_to_close(&mut c).await
}

async fn read_to_close(c: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    out
}

fn status_of(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply).lines().next().unwrap_or("").to_owned()
}

async fn http_case(bytes: &[u8]) -> (String, Result<ProxyRequest, HandshakeError>) {
    let (addr, task) = http_server(limits(2_000)).await;
    let reply = exchange(addr, bytes).await;
    (status_of(&reply), task.await.expect("server task"))
}

#[tokio::test]
async fn connect_request_is_parsed_and_normalised() {
    let (status, r) =
        http_case(b"CONNECT API.Example.com.:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n")
            .await;
    let r = r.expect("valid");
    assert_eq!(status, "HTTP/1.1 403 Forbidden");
    assert_eq!(r.form, RequestForm::Connect);
    assert_eq!(r.target.name(), Some("api.example.com"));
    assert_eq!(r.port, 443);
    let (_, r) = http_case(b"CONNECT 0x7f.1:8443 HTTP/1.1\r\n\r\n").await;
    assert_eq!(r.expect("valid").target, Target::Addr(IpAddr::from([127, 0, 0, 1])));
}

/// An optimistic client's first tunnel bytes behind the CONNECT head are the tunnel's:
/// the request is valid and the bytes stay in the buffer after the head.
#[tokio::test]
async fn bytes_after_a_connect_head_are_kept_for_the_tunnel() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = Vec::new();
        let r = http::read_request(&mut s, &limits(2_000), &mut buf).await;
        (r, buf)
    });
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n\x16\x03\x01\x00\x05hello")
        .await
        .expect("send");
    let (r, buf) = task.await.expect("server task");
    let r = r.expect("a CONNECT with early bytes is valid");
    assert_eq!(r.form, RequestForm::Connect);
    assert_eq!(&buf[r.head_len..], b"\x16\x03\x01\x00\x05hello");
}

#[tokio::test]
async fn bad_requests_get_400_and_the_reason() {
    let overlong = format!("CONNECT {}.example:443 HTTP/1.1\r\n\r\n", "a".repeat(5_000));
    let mut many = String::from("CONNECT a.example:443 HTTP/1.1\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"CONNECT a.example HTTP/1.1\r\n\r\n".to_vec(), "malformed"),
        (b"CONNECT a.example:0 HTTP/1.1\r\n\r\n".to_vec(), "malformed"),
        (b"CONNECT a.example:65536 HTTP/1.1\r\n\r\n".to_vec(), "malformed"),
        (b"GET http://user:pw@a.example/ HTTP/1.1\r\n\r\n".to_vec(), "malformed"),
        (overlong.into_bytes(), "too-large"),
        (many.into_bytes(), "too-many-headers"),
        (b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n".to_vec(), "host-mismatch"),
        (b"CONNECT a..example:443 HTTP/1.1\r\n\r\n".to_vec(), "bad-name"),
        (b"CONNECT 1.2.3.4.5:443 HTTP/1.1\r\n\r\n".to_vec(), "bad-name"),
        (b"\x05\x01\x00".to_vec(), "malformed"),
    ];
    for (bytes, label) in cases {
        let (status, r) = http_case(&bytes).await;
        let err = r.expect_err(&String::from_utf8_lossy(&bytes[..bytes.len().min(60)]));
        assert_eq!(err.as_str(), label, "{err}");
        assert_eq!(status, "HTTP/1.1 400 Bad Request", "{err}");
    }
}

#[tokio::test]
async fn overlong_head_is_refused_before_the_client_finishes() {
    // The server answers once the limit is passed, while the client is still sending: it
    // neither waits for the rest nor buffers it.
    let (addr, task) = http_server(limits(5_000)).await;
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"CONNECT a.example:443 HTTP/1.1\r\n").await.expect("send");
    let filler = format!("X-Filler: {}\r\n", "v".repeat(1_000));
    for _ in 0..9 {
        if c.write_all(filler.as_bytes()).await.is_err() {
            break;
        }
    }
    let reply = read_to_close(&mut c).await;
    assert_eq!(status_of(&reply), "HTTP/1.1 400 Bad Request");
    assert!(matches!(
        task.await.expect("task"),
        Err(HandshakeError::Http(ParseError::HeadTooLarge))
    ));
}

#[tokio::test]
async fn slowloris_is_cut_at_the_timeout() {
    let (addr, task) = http_server(limits(300)).await;
    let mut c = TcpStream::connect(addr).await.expect("connect");
    let drip = b"CONNECT a.example:443 HTTP/1.1\r\nX: ";
    let mut sent = 0;
    // Bounded: at most 100 bytes, one every 20 ms (2 s) — far past the 300 ms timeout.
    for b in drip.iter().chain(std::iter::repeat_n(&b'v', 100 - drip.len())) {
        if c.write_all(&[*b]).await.is_err() {
            break;
        }
        sent += 1;
        if task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = task.await.expect("task");
    assert!(matches!(r, Err(HandshakeError::Timeout)), "{r:?}");
    assert!(sent < 100, "the server gave up before the client did");
    let reply = read_to_close(&mut c).await;
    assert_eq!(status_of(&reply), "HTTP/1.1 408 Request Timeout");
}

#[tokio::test]
async fn client_closing_midway_is_not_answered() {
    let (addr, task) = http_server(limits(2_000)).await;
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"CONNECT a.exa").await.expect("send");
    c.shutdown().await.expect("shutdown");
    let reply = read_to_close(&mut c).await;
    assert!(reply.is_empty());
    assert!(matches!(task.await.expect("task"), Err(HandshakeError::Closed)));
}

/// Runs curl off the async runtime and returns (exit code, stdout).
async fn curl(args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let out = Process::new("curl")
            .args(["-sS", "--max-time", "5", "--noproxy", ""])
            .args(&args)
            .output()
            .expect("run curl");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .expect("curl task")
}

#[tokio::test]
async fn curl_connect_and_absolute_form() {
    if skip_unless(&[Need::Bin("curl")]) {
        return;
    }
    let (addr, task) = http_server(limits(5_000)).await;
    let (code, out) = curl(vec![
        "-x".into(),
        format!("http://{addr}"),
        "-w".into(),
        "%{http_connect}".into(),
        "https://Api.Example.com/v1".into(),
    ])
    .await;
    let r = task.await.expect("task").expect("curl's CONNECT parses");
    assert_eq!(
        (r.form, r.target.name(), r.port),
        (RequestForm::Connect, Some("api.example.com"), 443)
    );
    assert_ne!(code, 0, "a refused tunnel fails curl");
    assert_eq!(out, "403");

    let (addr, task) = http_server(limits(5_000)).await;
    let (_, out) = curl(vec![
        "-x".into(),
        format!("http://{addr}"),
        "-w".into(),
        "%{http_code}".into(),
        "-o".into(),
        "/dev/null".into(),
        "http://api.example.com:8080/path?q=1".into(),
    ])
    .await;
    let r = task.await.expect("task").expect("curl's absolute-form request parses");
    assert_eq!(
        (r.form, r.target.name(), r.port),
        (RequestForm::Absolute, Some("api.example.com"), 8080)
    );
    assert_eq!(out, "403");

    let (addr, task) = http_server(limits(5_000)).await;
    let _ = curl(vec![
        "-x".into(),
        format!("http://u:secret@{addr}"),
        "-o".into(),
        "/dev/null".into(),
        "http://api.example.com/".into(),
    ])
    .await;
    let r = task.await.expect("task").expect("parses");
    assert_eq!(r.proxy_authorization.as_deref(), Some(&b"Basic dTpzZWNyZXQ="[..]));
}

// --- SOCKS5 ---

type SocksResult = Result<SocksRequest<String>, HandshakeError>;

fn check_creds(user: &[u8], pass: &[u8]) -> Option<String> {
    (user == b"billing" && pass == b"s3cret").then(|| "payments/billing-fn".to_owned())
}

/// Accepts one connection, runs the SOCKS5 driver, and on success answers `answer`.
async fn socks_server(
    timeout_ms: u64,
    with_auth: bool,
    answer: ReplyCode,
) -> (SocketAddr, JoinHandle<SocksResult>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let verify: &VerifyFn<String> = &check_creds;
        let auth = AuthPolicy { allow_no_auth: !with_auth, verify: with_auth.then_some(verify) };
        let r = socks_hs::read_request(&mut s, &limits(timeout_ms), &auth).await;
        if r.is_ok() {
            let bind =
                (answer == ReplyCode::Succeeded).then(|| "127.0.0.1:40000".parse().expect("addr"));
            socks_hs::reply(&mut s, answer, bind).await.expect("reply");
        }
        r
    });
    (addr, task)
}

async fn socks_case(bytes: &[u8]) -> (Vec<u8>, SocksResult) {
    let (addr, task) = socks_server(2_000, false, ReplyCode::NotAllowed).await;
    let reply = exchange(addr, bytes).await;
    (reply, task.await.expect("task"))
}

#[tokio::test]
async fn socks_requests_every_address_type() {
    let (reply, r) = socks_case(b"\x05\x01\x00\x05\x01\x00\x03\x0fAPI.example.com\x01\xbb").await;
    let r = r.expect("valid");
    assert_eq!(
        (r.command, r.target.name(), r.port),
        (Command::Connect, Some("api.example.com"), 443)
    );
    assert_eq!(&reply[..2], &[5, 0], "method selection: no auth");
    assert_eq!(&reply[2..], &[5, 2, 0, 1, 0, 0, 0, 0, 0, 0], "not allowed by ruleset");

    let (_, r) = socks_case(b"\x05\x01\x00\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50").await;
    assert_eq!(r.expect("valid").target, Target::Addr(IpAddr::from([10, 0, 0, 1])));
    let (_, r) =
        socks_case(b"\x05\x01\x00\x05\x03\x00\x04\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01\x00\x35").await;
    let r = r.expect("valid");
    assert_eq!(
        (r.command, r.target),
        (Command::UdpAssociate, Target::Addr("::1".parse().expect("ip")))
    );
    let (_, r) = socks_case(b"\x05\x01\x00\x05\x01\x00\x03\x060x7f.1\x00\x50").await;
    assert_eq!(r.expect("valid").target, Target::Addr(IpAddr::from([127, 0, 0, 1])));
    let (_, r) =
        socks_case(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50GET / HTTP/1.1\r\n").await;
    assert_eq!(r.expect("valid").early, b"GET / HTTP/1.1\r\n");
}

#[tokio::test]
async fn socks_bad_input_gets_its_reply_code() {
    // (bytes, the server's reply, the error label)
    let cases: [(&[u8], &[u8], &str); 6] = [
        (b"\x05\x00", &[5, 0xff], "malformed"),
        (b"\x05\x01\x01", &[5, 0xff], "no-acceptable-method"),
        (
            b"\x05\x01\x00\x05\x01\x00\x02\x00\x00",
            &[5, 0, 5, 8, 0, 1, 0, 0, 0, 0, 0, 0],
            "malformed",
        ),
        (
            b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50",
            &[5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0],
            "command-not-supported",
        ),
        (
            b"\x05\x01\x00\x05\x01\x00\x03\x04a..b\x00\x50",
            &[5, 0, 5, 4, 0, 1, 0, 0, 0, 0, 0, 0],
            "bad-name",
        ),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", &[], "malformed"),
    ];
    for (bytes, want, label) in cases {
        let (reply, r) = socks_case(bytes).await;
        let err = r.expect_err(label);
        assert_eq!(err.as_str(), label, "{err}");
        assert_eq!(reply, want, "{err}");
    }
}

#[tokio::test]
async fn socks_truncated_address_then_close_or_stall() {
    let (addr, task) = socks_server(2_000, false, ReplyCode::NotAllowed).await;
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"\x05\x01\x00\x05\x01\x00\x03\x0fapi.exa").await.expect("send");
    c.shutdown().await.expect("shutdown");
    let _ = read_to_close(&mut c).await;
    assert!(matches!(task.await.expect("task"), Err(HandshakeError::Closed)));

    let (addr, task) = socks_server(300, false, ReplyCode::NotAllowed).await;
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"\x05\x01\x00\x05\x01\x00\x03\x0fapi.exa").await.expect("send");
    let reply = read_to_close(&mut c).await;
    assert_eq!(reply, [5, 0], "only the method selection; the stalled request is closed");
    assert!(matches!(task.await.expect("task"), Err(HandshakeError::Timeout)));
}

#[tokio::test]
async fn socks_credentials_map_to_an_identity_and_wrong_ones_are_refused() {
    let (addr, task) = socks_server(2_000, true, ReplyCode::NotAllowed).await;
    let reply = exchange(
        addr,
        b"\x05\x02\x00\x02\x01\x07billing\x06s3cret\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    )
    .await;
    assert_eq!(&reply[..4], &[5, 2, 1, 0], "user/pass chosen, accepted");
    assert_eq!(
        task.await.expect("task").expect("valid").identity.as_deref(),
        Some("payments/billing-fn")
    );

    let (addr, task) = socks_server(2_000, true, ReplyCode::NotAllowed).await;
    let reply = exchange(addr, b"\x05\x01\x02\x01\x07billing\x05wrong").await;
    assert_eq!(reply, [5, 2, 1, 1]);
    assert!(matches!(task.await.expect("task"), Err(HandshakeError::AuthFailed)));

    // Credentials required: a client offering only no-auth is refused, not let in.
    let (addr, task) = socks_server(2_000, true, ReplyCode::NotAllowed).await;
    assert_eq!(exchange(addr, b"\x05\x01\x00").await, [5, 0xff]);
    assert!(matches!(task.await.expect("task"), Err(HandshakeError::NoAcceptableMethod)));
}

#[tokio::test]
async fn curl_socks5_hostname_with_and_without_credentials() {
    if skip_unless(&[Need::Bin("curl")]) {
        return;
    }
    let (addr, task) = socks_server(5_000, false, ReplyCode::NotAllowed).await;
    let (code, _) = curl(vec![
        "--socks5-hostname".into(),
        addr.to_string(),
        "http://API.example.com:8080/".into(),
    ])
    .await;
    let r = task.await.expect("task").expect("curl's request parses");
    assert_eq!(
        (r.command, r.target.name(), r.port),
        (Command::Connect, Some("api.example.com"), 8080)
    );
    assert_eq!(code, 97, "curl reports the SOCKS refusal (CURLE_PROXY)");

    let (addr, task) = socks_server(5_000, true, ReplyCode::NotAllowed).await;
    let _ = curl(vec![
        "-x".into(),
        format!("socks5h://billing:s3cret@{addr}"),
        "http://api.example.com/".into(),
    ])
    .await;
    assert_eq!(
        task.await.expect("task").expect("parses").identity.as_deref(),
        Some("payments/billing-fn")
    );

    let (addr, task) = socks_server(5_000, true, ReplyCode::NotAllowed).await;
    let (code, _) = curl(vec![
        "-x".into(),
        format!("socks5h://billing:nope@{addr}"),
        "http://api.example.com/".into(),
    ])
    .await;
    assert!(matches!(task.await.expect("task"), Err(HandshakeError::AuthFailed)));
    assert_ne!(code, 0);
}

#[tokio::test]
async fn socks_success_reply_is_read_back_by_the_client_parser() {
    let (addr, task) = socks_server(2_000, false, ReplyCode::Succeeded).await;
    let reply = exchange(addr, b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50").await;
    let (r, n) = socks5::Reply::parse(&reply[2..]).expect("well-formed").expect("complete");
    assert_eq!(
        (r.code, r.addr, r.port, n),
        (0, socks5::Addr::V4([127, 0, 0, 1].into()), 40000, 10)
    );
    assert!(task.await.expect("task").is_ok());
}
