//! The SSRF guard end to end, against real listeners on the forbidden addresses.
//!
//! flowgate runs inside a network namespace of its own whose only interface is `lo`,
//! which carries the addresses a forged request would aim at — 10.0.0.1, 169.254.169.254
//! (cloud metadata), fd00:ec2::254 (its IPv6 twin), 100.64.0.1 (CGNAT), 192.168.1.1,
//! documentation addresses, 198.18.0.11 (benchmarking, next to the one lifted address),
//! plus loopback itself (which `0.0.0.0` and `::` reach) — each with a server on port 80
//! that counts accepts. Nothing can
//! leave the machine; a faulty dial is seen as an accept. 198.18.0.10 carries the one
//! allowed server (`[ssrf] treat_as_external` lifts exactly it).
//!
//! The policy allows the client every address (`networks: 0.0.0.0/0, ::/0`), so the only
//! thing between a request and the forbidden servers is the guard: each spelling of each
//! address (decimal, octal, hex, short forms, trailing dot, IPv4-mapped, IPv4-compatible,
//! NAT64, a name in the static table, a DNS answer that rebinds) through the
//! `http-connect` and `socks5` listeners must be refused — `403` / SOCKS `0x02` and a
//! `deny` event with reason `ssrf` — and every forbidden counter must stay at 0.
//!
//! DNS rebinding: a tiny DNS server in the namespace answers `rebind.test` with TTL 0,
//! first with the allowed address, then (after the test flips it) with 10.0.0.1. The
//! first request reaches the allowed server; the second is refused.
//!
//! Needs root (namespaces); skipped, saying so, otherwise (in CI: fails).

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::egress::{Gate, caller_egress_policy, caller_inventory, get};
use support::netns::{Netns, counting_http, curl};
use support::require::{Need, skip_unless};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const ALLOWED: &str = "198.18.0.10";

const INVENTORY: &str = caller_inventory!("127.0.0.1");

/// Everything is allowed by policy: the guard alone must refuse.
const POLICY: &str = caller_egress_policy!("anywhere" => "networks: ['0.0.0.0/0', '::/0']");

/// The forbidden servers, by the address they listen on.
const FORBIDDEN: [&str; 12] = [
    "10.0.0.1",
    "169.254.169.254",
    "fd00:ec2::254",
    "100.64.0.1",
    "192.168.1.1",
    "127.0.0.1",
    "::1",
    // Documentation ranges, and a benchmarking address next to the one lifted: the lift
    // covers exactly its /32.
    "192.0.2.1",
    "198.51.100.1",
    "203.0.113.1",
    "2001:db8::1",
    "198.18.0.11",
];

/// The addresses of `FORBIDDEN` that are not on `lo` already.
const ON_LO: [&str; 10] = [
    "10.0.0.1/32",
    "169.254.169.254/32",
    "100.64.0.1/32",
    "192.168.1.1/32",
    "192.0.2.1/32",
    "198.51.100.1/32",
    "203.0.113.1/32",
    "198.18.0.11/32",
    "fd00:ec2::254/128",
    "2001:db8::1/128",
];

/// Host spellings (as a CONNECT authority's host / a SOCKS5 domain name), each of which
/// means one of the forbidden addresses.
const SPELLINGS: &[&str] = &[
    // 10.0.0.1
    "10.0.0.1",
    "167772161",
    "012.0.0.1",
    "0xa.0.0.1",
    "0x0a000001",
    "10.1",
    "10.0.1",
    "10.0.0.1.",
    "[::ffff:10.0.0.1]",
    "[::ffff:a00:1]",
    "[::a00:1]",
    "[64:ff9b::a00:1]",
    "[2002:a00:1::]",
    "private.test",
    "PRIVATE.test.",
    // 169.254.169.254
    "169.254.169.254",
    "169.254.169.254.",
    "2852039166",
    "0251.0376.0251.0376",
    "0xa9.0xfe.0xa9.0xfe",
    "169.254.43518",
    "[::ffff:169.254.169.254]",
    "[::ffff:a9fe:a9fe]",
    "metadata.test",
    // fd00:ec2::254
    "[fd00:ec2::254]",
    "[FD00:0EC2:0:0:0:0:0:254]",
    "metadata6.test",
    // 100.64.0.1, 192.168.1.1
    "100.64.0.1",
    "1681915905",
    "cgnat.test",
    "192.168.1.1",
    "0xc0a80101",
    "192.168.257",
    "0300.0250.1.1",
    // loopback
    "127.0.0.1",
    "2130706433",
    "0177.0.0.1",
    "0x7f.1",
    "127.1",
    "[::ffff:127.0.0.1]",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "localhost.test",
    // unspecified: the kernel dials 0.0.0.0 / :: as the local host (counted by the
    // loopback servers)
    "0.0.0.0",
    "0",
    "0x0",
    "[::]",
    "[::ffff:0.0.0.0]",
    // documentation and benchmarking
    "192.0.2.1",
    "3221225985",
    "[::ffff:c000:201]",
    "198.51.100.1",
    "203.0.113.1",
    "[2001:db8::1]",
    "198.18.0.11",
    "[::ffff:198.18.0.11]",
];

/// A DNS server for one name, `rebind.test`: A queries are answered with TTL 0 with
/// `first` until `rebound` is set, then with `then`; everything else gets an empty
/// answer. Returns its address.
async fn rebinding_dns(first: Ipv4Addr, then: Ipv4Addr, rebound: Arc<AtomicBool>) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else { continue };
            if let Some(reply) = dns_answer(&buf[..n], |name, qtype| {
                (name.eq_ignore_ascii_case("rebind.test") && qtype == 1)
                    .then(|| if rebound.load(Ordering::SeqCst) { then } else { first })
            }) {
                let _ = sock.send_to(&reply, from).await;
            }
        }
    });
    addr
}

/// Builds the response to one DNS query: the question echoed, and one A record (TTL 0)
/// when `lookup` has an address for (name, qtype). `None` for a packet that is not a
/// one-question query.
fn dns_answer(q: &[u8], lookup: impl Fn(&str, u16) -> Option<Ipv4Addr>) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(std::str::from_utf8(q.get(pos..pos + len)?).ok()?.to_owned());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*q.get(pos)?, *q.get(pos + 1)?]);
    let question_end = pos + 4;
    let question = q.get(12..question_end)?;
    let answer = lookup(&labels.join("."), qtype);
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(&q[0..2]); // id
    r.extend_from_slice(&[0x81, 0x80]); // response, recursion desired + available, NOERROR
    r.extend_from_slice(&[0, 1, 0, u8::from(answer.is_some()), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if let Some(a) = answer {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]); // A IN TTL 0
        r.extend_from_slice(&a.octets());
    }
    Some(r)
}

/// One raw CONNECT; returns the status line.
async fn connect_status(proxy: SocketAddr, host: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let req = format!("CONNECT {host}:80 HTTP/1.1\r\nHost: {host}:80\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_owned()
}

/// How a SOCKS5 request names its destination.
enum SocksAddr<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

/// One raw SOCKS5 CONNECT (no auth); returns the reply code (`None`: no reply).
async fn socks_reply(proxy: SocketAddr, to: SocksAddr<'_>) -> Option<u8> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut req = vec![5, 1, 0, 5, 1, 0];
    match to {
        SocksAddr::Name(n) => {
            req.push(3);
            req.push(u8::try_from(n.len()).unwrap());
            req.extend_from_slice(n.as_bytes());
        }
        SocksAddr::Ip(IpAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        SocksAddr::Ip(IpAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
    }
    req.extend_from_slice(&80u16.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut reply)).await;
    match r {
        // The method selection (`05 00`), then the reply's version and code.
        Ok(Ok(_)) if reply[..3] == [5, 0, 5] => Some(reply[3]),
        _ => None,
    }
}

#[test]
fn every_spelling_of_a_forbidden_address_is_refused_and_never_dialled() {
    if skip_unless(&[Need::Root, Need::Bin("ip"), Need::Bin("curl")]) {
        return;
    }
    let ns = Netns::new("ssrf");
    for a in ON_LO {
        ns.exec(&format!("ip addr add {a} dev lo nodad"));
    }
    ns.exec(&format!("ip addr add {ALLOWED}/32 dev lo"));
    ns.exec("ip link show | grep -c \"^[0-9]\" | grep -qx 1"); // lo is the only interface
    ns.run(|| async {
        let mut counters = Vec::new();
        for a in FORBIDDEN {
            let addr = SocketAddr::new(a.parse().unwrap(), 80);
            counters.push((a, counting_http(addr, "FORBIDDEN SERVER REACHED\n").await));
        }
        let allowed =
            counting_http(SocketAddr::new(ALLOWED.parse().unwrap(), 80), "allowed\n").await;
        let rebound = Arc::new(AtomicBool::new(false));
        let dns =
            rebinding_dns(ALLOWED.parse().unwrap(), "10.0.0.1".parse().unwrap(), rebound.clone())
                .await;
        let config = format!(
            "[dns]\nservers = [\"{dns}\"]\ntimeout = \"1s\"\n\
             [dns.static]\n\"private.test\" = [\"10.0.0.1\"]\n\
             \"metadata.test\" = [\"169.254.169.254\"]\n\"metadata6.test\" = [\"fd00:ec2::254\"]\n\
             \"cgnat.test\" = [\"100.64.0.1\"]\n\"localhost.test\" = [\"127.0.0.1\", \"::1\"]\n\
             \"ok.test\" = [\"{ALLOWED}\"]\n\
             [ssrf]\ntreat_as_external = [\"{ALLOWED}/32\"]\n\
             [[listener]]\nname = \"connect\"\nkind = \"http-connect\"\nbind = \"127.0.0.1:0\"\n\
             handshake_timeout = \"2s\"\n\
             [[listener]]\nname = \"socks\"\nkind = \"socks5\"\nbind = \"127.0.0.1:0\"\n\
             handshake_timeout = \"2s\"\n"
        );
        let gate = Gate::start(INVENTORY, POLICY, &config).await;
        let connect = gate.addr("connect");
        let socks = gate.addr("socks");
        let forbidden_total =
            || counters.iter().map(|(_, c)| c.load(Ordering::SeqCst)).sum::<usize>();

        // Control: the allowed server is reachable through both listeners, so a refusal
        // below is the guard's and not a broken setup.
        assert!(connect_status(connect, "ok.test").await.contains(" 200 "));
        assert_eq!(socks_reply(socks, SocksAddr::Name("ok.test")).await, Some(0));
        assert_eq!(allowed.load(Ordering::SeqCst), 2);

        for &h in SPELLINGS {
            let status = connect_status(connect, h).await;
            assert!(status.contains(" 403 "), "CONNECT {h}: {status:?}");
            // SOCKS5 carries a spelling as a domain name (ATYP 3).
            let code = socks_reply(socks, SocksAddr::Name(h)).await;
            assert_eq!(code, Some(2), "SOCKS5 {h}: reply {code:?}");
            assert_eq!(forbidden_total(), 0, "{h} reached a forbidden server");
        }
        // SOCKS5 with binary addresses (ATYP 1 / 4).
        for a in FORBIDDEN.iter().map(|a| a.parse::<IpAddr>().unwrap()).chain([
            IpAddr::V6("::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap()),
            IpAddr::V6("64:ff9b::a9fe:a9fe".parse::<Ipv6Addr>().unwrap()),
        ]) {
            assert_eq!(socks_reply(socks, SocksAddr::Ip(a)).await, Some(2), "SOCKS5 {a}");
        }

        // Real clients where curl can spell it (curl normalises numeric IPv4 hosts
        // itself, so those spellings are sent raw above).
        let px = format!("http://{connect}");
        let sx = socks.to_string();
        let curl_cases: [&[&str]; 7] = [
            &["-p", "-x", &px, "http://10.0.0.1/"],
            &["-x", &px, "http://169.254.169.254./latest/meta-data/"],
            &["-x", &px, "http://[fd00:ec2::254]/"],
            &["-x", &px, "http://private.test/"],
            &["--socks5-hostname", &sx, "http://metadata.test/"],
            &["--socks5-hostname", &sx, "http://[fd00:ec2::254]/"],
            &["--socks5", &sx, "http://192.168.1.1/"],
        ];
        for args in curl_cases {
            let (code, body, err) = curl(&[], args).await;
            assert!(!body.contains("FORBIDDEN"), "{args:?}: {body}");
            assert!(
                err.contains("403") || err.contains("(2)") || err.contains("not allowed"),
                "{args:?} (exit {code}): {err}"
            );
        }
        assert_eq!(forbidden_total(), 0);

        // DNS rebinding: the same name, first allowed, then 10.0.0.1 (TTL 0, so the
        // resolver asks again).
        let (code, body, err) = curl(&[], &["-x", &px, "http://rebind.test/"]).await;
        assert_eq!((code, body.as_str()), (0, "allowed\n"), "{err}");
        assert_eq!(socks_reply(socks, SocksAddr::Name("rebind.test")).await, Some(0));
        let before = allowed.load(Ordering::SeqCst);
        rebound.store(true, Ordering::SeqCst);
        let (_, body, err) = curl(&[], &["-x", &px, "http://rebind.test/"]).await;
        assert!(err.contains("< HTTP/1.1 403"), "{body} {err}");
        assert_eq!(socks_reply(socks, SocksAddr::Name("rebind.test")).await, Some(2));
        assert_eq!(allowed.load(Ordering::SeqCst), before, "rebound requests dialled nothing");
        let e = gate
            .wait_event("deny rebind.test", |e| e["event"] == "deny" && e["fqdn"] == "rebind.test")
            .await;
        assert_eq!(e["reason"], "ssrf");
        assert_eq!(e["dst"], "10.0.0.1:80");

        // Every counter on a forbidden address is still 0, and every refusal was logged
        // as the guard's, with the name where there was one.
        for (a, c) in &counters {
            assert_eq!(c.load(Ordering::SeqCst), 0, "{a} was dialled");
        }
        // The flow log is written by its own task: wait (bounded) until it has caught up.
        let expected = 2 * SPELLINGS.len() + FORBIDDEN.len() + 2 + curl_cases.len() + 2;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let log = loop {
            let log = gate.log();
            let ssrf = log.iter().filter(|e| e["event"] == "deny" && e["reason"] == "ssrf").count();
            if ssrf >= expected || std::time::Instant::now() > deadline {
                assert_eq!(ssrf, expected, "{log:#?}");
                break log;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        for name in ["private.test", "metadata.test", "metadata6.test", "cgnat.test"] {
            assert!(
                log.iter().any(|e| e["event"] == "deny" && e["fqdn"] == name),
                "no deny event with fqdn {name}"
            );
        }
        assert_eq!(
            get(&gate.counters("connect").denied) + get(&gate.counters("socks").denied),
            expected as u64
        );
    });
}
