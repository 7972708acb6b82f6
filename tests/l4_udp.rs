//! The UDP gateway with real sockets: echo through a session, denied datagrams dropped and
//! logged (folded), session idle timeout, session limit.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::l4::*;
use tokio::net::UdpSocket;

fn udp_listener(name: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nkind = \"udp\"\nbind = \"127.0.0.1:0\"\n\
         upstreams = [\"{upstream}\"]\n{extra}\n"
    )
}

async fn client(src: &str, to: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(format!("{src}:0")).await.unwrap();
    s.connect(to).await.unwrap();
    s
}

/// Sends and waits (bounded) for one reply.
async fn ask(s: &UdpSocket, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    s.send(msg).await.unwrap();
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(wait, s.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_client_echoes_denied_client_is_dropped_and_logged_once() {
    let echo = udp_echo().await;
    let gw = Gateway::start(World::new(), &udp_listener("u", echo, ""));
    let ok = client(OK, gw.addr("u")).await;
    for i in 0..5u8 {
        let back = ask(&ok, &[i; 100], Duration::from_secs(2)).await;
        assert_eq!(back.as_deref(), Some(&[i; 100][..]));
    }
    // One session, one conntrack entry, assured once the upstream replied.
    assert_eq!(gw.rt.conntrack.len(), 1);
    gw.rt.conntrack.for_each(|e| {
        assert_eq!(e.state(), flowgate::conntrack::FlowState::Assured);
        assert_eq!(get(e.packets_orig()), 5);
        assert_eq!(get(e.bytes_reply()), 500);
    });

    let bad = client(BAD, gw.addr("u")).await;
    for _ in 0..4 {
        assert_eq!(ask(&bad, b"let me in", Duration::from_millis(100)).await, None);
    }
    let c = gw.counters("u");
    assert_eq!(get(&c.denied), 4);
    assert_eq!(get(&c.allowed), 1);
    let line = gw.world.wait_log(Duration::from_secs(5), |l| l["event"] == "deny").await;
    assert_eq!(line["proto"], "udp");
    assert_eq!(line["src"], bad.local_addr().unwrap().to_string());
    assert_eq!(line["src_workload"], "t/client-bad");
    assert_eq!(line["dst"], echo.to_string());
    // Folded lines arrive as their windows close; wait (bounded) for all of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let total: u64 = gw
            .world
            .log_lines()
            .iter()
            .filter(|l| l["event"] == "deny")
            .map(|l| l["count"].as_u64().unwrap())
            .sum();
        if total == 4 {
            break;
        }
        assert!(total < 4, "more denials logged than sent: {total}");
        assert!(std::time::Instant::now() < deadline, "only {total} of 4 denials logged");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_ends_and_a_new_one_starts() {
    let echo = udp_echo().await;
    let gw = Gateway::start(World::new(), &udp_listener("u", echo, "udp_idle_timeout = \"300ms\""));
    let ok = client(OK, gw.addr("u")).await;
    assert!(ask(&ok, b"1", Duration::from_secs(2)).await.is_some());
    assert_eq!(get(&gw.counters("u").active), 1);
    gw.wait_conntrack_empty(Duration::from_secs(5)).await;
    assert_eq!(get(&gw.counters("u").active), 0);
    assert_eq!(ask(&ok, b"2", Duration::from_secs(2)).await.as_deref(), Some(&b"2"[..]));
    assert_eq!(get(&gw.counters("u").allowed), 2, "a fresh session, admitted again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limit_drops_new_clients() {
    let echo = udp_echo().await;
    let gw = Gateway::start(World::new(), &udp_listener("u", echo, "max_connections = 1"));
    let a = client(OK, gw.addr("u")).await;
    let b = client(OK, gw.addr("u")).await; // same identity, another port: another session
    assert!(ask(&a, b"a", Duration::from_secs(2)).await.is_some());
    assert_eq!(ask(&b, b"b", Duration::from_millis(200)).await, None);
    let c = gw.counters("u");
    assert_eq!(get(&c.limit_reached), 1);
    assert_eq!(get(&c.datagrams_dropped), 1);
    assert!(ask(&a, b"a2", Duration::from_secs(2)).await.is_some(), "existing session unaffected");
}
