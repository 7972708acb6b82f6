//! Every listener kind's flows are timed by the gate: a CONNECT, a SOCKS5 and a
//! transparent flow each move the decision-latency histogram (`Registry::decision`,
//! exported as `flowgate_policy_decision_seconds`), allowed or refused by policy, and are
//! counted by the same code.
//!
//! flowgate runs in-process, built from config text; clients are real sockets. The
//! CONNECT and SOCKS5 flows go to a listener on loopback that the policy allows for
//! `fn/caller` (127.0.0.10) and not for `fn/other` (127.0.0.11). The transparent flow
//! needs a NAT redirect: it runs in a network namespace of its own with an nftables
//! `output` rule (root, `ip` and `nft`; skips with a reason otherwise).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use flowgate::telemetry::metrics::ListenerCounters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use support::egress::{Gate, caller_egress_policy, caller_inventory, get};

const CALLER: &str = "127.0.0.10";
const OTHER: &str = "127.0.0.11";
const SINK: &str = "127.0.0.24";

const INVENTORY: &str = caller_inventory!("127.0.0.10, 198.18.0.2", "127.0.0.11");

const POLICY: &str = caller_egress_policy!("sink" => "networks: [127.0.0.24/32, 198.18.0.10/32]");

/// Decisions timed so far.
fn timed(gate: &Gate) -> u64 {
    gate.rt.registry.decision.snapshot().count
}

/// A listener that accepts and holds every connection (so a tunnel stays up).
async fn sink() -> SocketAddr {
    let l = TcpListener::bind((SINK, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

/// Reads whatever arrives within a few seconds, until the peer closes.
async fn read_some(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while got < n {
            match s.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
    })
    .await;
    buf.truncate(got);
    buf
}

/// Waits (bounded) until `c` reaches `at_least`.
async fn wait_count(c: &std::sync::atomic::AtomicU64, at_least: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while get(c) < at_least {
        assert!(std::time::Instant::now() < deadline, "counter at {} < {at_least}", get(c));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config(kind: &str) -> String {
    format!(
        "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"300ms\"\n\
         [ssrf]\ntreat_as_external = [\"{SINK}/32\"]\n\
         [[listener]]\nname = \"fwd\"\nkind = \"{kind}\"\nbind = \"127.0.0.1:0\"\n"
    )
}

/// The listener's (allowed, denied) counters.
fn counted(c: &ListenerCounters) -> (u64, u64) {
    (get(&c.allowed), get(&c.denied))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_flow_is_timed_by_the_gate() {
    let gate = Gate::start(INVENTORY, POLICY, &config("http-connect")).await;
    let to = sink().await;
    let c = gate.counters("fwd");
    let before = timed(&gate);

    let mut s = connect_from(CALLER, gate.addr("fwd")).await;
    s.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes()).await.unwrap();
    let reply = read_some(&mut s, 12).await;
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&reply));
    assert_eq!(counted(&c), (1, 0));
    assert_eq!(timed(&gate), before + 1, "an allowed CONNECT is timed once");

    let mut s = connect_from(OTHER, gate.addr("fwd")).await;
    s.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes()).await.unwrap();
    let reply = read_some(&mut s, 12).await;
    assert!(reply.starts_with(b"HTTP/1.1 403"), "{}", String::from_utf8_lossy(&reply));
    assert_eq!(counted(&c), (1, 1));
    assert_eq!(timed(&gate), before + 2, "a refused CONNECT is timed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socks5_flow_is_timed_by_the_gate() {
    let gate = Gate::start(INVENTORY, POLICY, &config("socks5")).await;
    let to = sink().await;
    let c = gate.counters("fwd");
    let before = timed(&gate);
    let SocketAddr::V4(v4) = to else { unreachable!("the sink is IPv4") };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());

    for (src, code, want) in [(CALLER, 0u8, (1, 0)), (OTHER, 2, (1, 1))] {
        let mut s = connect_from(src, gate.addr("fwd")).await;
        s.write_all(&[5, 1, 0]).await.unwrap();
        assert_eq!(read_some(&mut s, 2).await, [5, 0], "no authentication chosen");
        s.write_all(&request).await.unwrap();
        let reply = read_some(&mut s, 10).await;
        assert_eq!(reply.get(1), Some(&code), "{src}: {reply:?}");
        assert_eq!(counted(&c), want, "{src}");
    }
    assert_eq!(timed(&gate), before + 2, "an allowed and a refused SOCKS5 flow, timed once each");
}

#[test]
fn a_transparent_flow_is_timed_by_the_gate() {
    use support::netns::{Netns, counting_http, sh};
    use support::require::{Need, skip_unless};
    if skip_unless(&[Need::Root, Need::Bin("ip"), Need::Bin("nft")]) {
        return;
    }
    const CLIENT: &str = "198.18.0.2";
    const SERVER: &str = "198.18.0.10";
    const DECOY: &str = "198.18.0.11";
    let ns = Netns::new("lat");
    ns.exec(&format!(
        "ip addr add {CLIENT}/32 dev lo && ip addr add {SERVER}/32 dev lo && \
         ip addr add {DECOY}/32 dev lo"
    ));
    ns.run(|| async {
        let server = counting_http(format!("{SERVER}:80").parse().unwrap(), "served\n").await;
        let decoy = counting_http(format!("{DECOY}:80").parse().unwrap(), "decoy\n").await;
        let config = format!(
            "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"300ms\"\n\
             [ssrf]\ntreat_as_external = [\"{SERVER}/32\", \"{DECOY}/32\"]\n\
             [[listener]]\nname = \"fwd\"\nkind = \"transparent\"\nbind = \"127.0.0.1:0\"\n\
             handshake_timeout = \"1s\"\n"
        );
        let gate = Gate::start(INVENTORY, POLICY, &config).await;
        let port = gate.addr("fwd").port();
        // Only the client's own connections are redirected: flowgate's dial to the server
        // leaves from another source address and must not come back to it.
        let rules = gate.dir.path().join("redirect.nft");
        std::fs::write(
            &rules,
            format!(
                "table ip fglat {{\n  chain out {{\n    type nat hook output priority -100;\n    \
                 ip saddr {CLIENT} tcp dport 80 redirect to :{port}\n  }}\n}}\n"
            ),
        )
        .unwrap();
        sh(&format!("nft -f {}", rules.display()));
        let c = gate.counters("fwd");
        let before = timed(&gate);

        let mut s = connect_from(CLIENT, format!("{SERVER}:80").parse().unwrap()).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: 198.18.0.10\r\n\r\n").await.unwrap();
        let reply = read_some(&mut s, 4096).await;
        assert!(reply.ends_with(b"served\n"), "{}", String::from_utf8_lossy(&reply));
        assert_eq!(server.load(std::sync::atomic::Ordering::SeqCst), 1);
        wait_count(&c.allowed, 1).await;
        assert_eq!(timed(&gate), before + 1, "an allowed transparent flow is timed once");

        // The policy does not allow the decoy: reset, never dialled, timed all the same.
        let mut s = connect_from(CLIENT, format!("{DECOY}:80").parse().unwrap()).await;
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: 198.18.0.11\r\n\r\n").await;
        assert!(read_some(&mut s, 4096).await.is_empty(), "a refusal answers nothing");
        wait_count(&c.denied, 1).await;
        assert_eq!(decoy.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(counted(&c), (1, 1));
        assert_eq!(timed(&gate), before + 2, "a refused transparent flow is timed once");
    });
}
