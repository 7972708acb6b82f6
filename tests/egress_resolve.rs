//! The egress resolver against a real DNS server: a small authoritative UDP responder
//! started in the test on 127.0.0.1 (hickory-proto encodes and decodes the messages), so
//! the resolver's real network path, cache and timeout are exercised. The responder
//! counts the queries it answers, which is how caching is observed.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowgate::egress::resolve::Source;
use flowgate::egress::{DnsConfig, DomainName, ResolveError, Resolver, Target};
use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

/// name (lower case, no trailing dot) → (addresses, ttl seconds). A name mapped to an
/// empty list is never answered (to provoke timeouts).
type Zone = Arc<Mutex<HashMap<String, (Vec<IpAddr>, u32)>>>;

struct DnsServer {
    addr: SocketAddr,
    zone: Zone,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    async fn start() -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind DNS socket");
        let addr = sock.local_addr().expect("local addr");
        let zone: Zone = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let (z, q) = (zone.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            // Bounded: a test sends far fewer than this many queries.
            for _ in 0..10_000 {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else { return };
                let Ok(req) = Message::from_vec(&buf[..n]) else { continue };
                q.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = answer(&req, &z) {
                    let bytes = reply.to_vec().expect("encode reply");
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
        });
        DnsServer { addr, zone, queries, task }
    }

    fn set(&self, name: &str, addrs: &[&str], ttl: u32) {
        let list = addrs.iter().map(|a| a.parse().expect("test address")).collect();
        self.zone.lock().expect("zone lock").insert(name.to_owned(), (list, ttl));
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    fn config(&self, timeout: Duration) -> DnsConfig {
        DnsConfig { servers: vec![self.addr], timeout, ..DnsConfig::default() }
    }
}

fn answer(req: &Message, zone: &Zone) -> Option<Message> {
    let q = req.queries.first()?;
    let qname = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let mut reply = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_desired = req.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.add_query(q.clone());
    let zone = zone.lock().expect("zone lock");
    match zone.get(&qname) {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some((addrs, _)) if addrs.is_empty() => return None,
        Some((addrs, ttl)) => {
            for a in addrs {
                let rdata = match (a, q.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                reply.add_answer(Record::from_rdata(q.name().clone(), *ttl, rdata));
            }
        }
    }
    Some(reply)
}

fn name(s: &str) -> DomainName {
    match Target::parse(s) {
        Ok(Target::Name(n)) => n,
        other => panic!("{s}: {other:?}"),
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().expect("test address")).collect()
}

#[tokio::test]
async fn resolves_every_address_from_a_real_server_and_caches_by_ttl() {
    let dns = DnsServer::start().await;
    dns.set("api.example", &["127.0.0.2", "127.0.0.3", "::1"], 300);
    let r = Resolver::new(&dns.config(Duration::from_secs(2))).expect("resolver");

    let got = r.resolve(&name("API.example.")).await.expect("resolves");
    assert_eq!(got.source, Source::Dns);
    let mut addrs = got.addrs.to_vec();
    addrs.sort();
    assert_eq!(addrs, ips(&["127.0.0.2", "127.0.0.3", "::1"]));
    let asked = dns.queries();
    assert!(asked >= 2, "A and AAAA were asked: {asked}");

    // Within the TTL the answer comes from the cache: the server is not asked again.
    dns.set("api.example", &["127.0.0.9"], 300);
    let again = r.resolve(&name("api.example")).await.expect("cached");
    assert_eq!(again.addrs.len(), 3);
    assert_eq!(dns.queries(), asked);
}

#[tokio::test]
async fn short_ttl_expires_and_the_new_record_is_seen() {
    let dns = DnsServer::start().await;
    dns.set("flip.example", &["127.0.0.2"], 1);
    let r = Resolver::new(&dns.config(Duration::from_secs(2))).expect("resolver");
    assert_eq!(
        &*r.resolve(&name("flip.example")).await.expect("first").addrs,
        &ips(&["127.0.0.2"])[..]
    );
    dns.set("flip.example", &["10.0.0.1"], 1);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let second = r.resolve(&name("flip.example")).await.expect("second");
    assert_eq!(&*second.addrs, &ips(&["10.0.0.1"])[..], "the TTL was honoured, not extended");
}

#[tokio::test]
async fn nxdomain_and_timeout_are_told_apart() {
    let dns = DnsServer::start().await;
    dns.set("silent.example", &[], 60);
    let r = Resolver::new(&dns.config(Duration::from_millis(300))).expect("resolver");
    assert_eq!(r.resolve(&name("missing.example")).await, Err(ResolveError::NotFound));
    assert_eq!(r.resolve(&name("silent.example")).await, Err(ResolveError::Timeout));
    assert!(dns.queries() >= 2);
}

#[tokio::test]
async fn static_table_and_hosts_file_come_before_dns() {
    let dns = DnsServer::start().await;
    dns.set("pinned.example", &["127.0.0.5"], 300);
    dns.set("hosted.example", &["127.0.0.5"], 300);
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.7 hosted.example pinned.example\n").expect("write hosts");
    let mut table = BTreeMap::new();
    table.insert("Pinned.Example".to_owned(), ips(&["127.0.0.6"]));
    let cfg = DnsConfig {
        static_hosts: table,
        hosts_file: Some(hosts),
        ..dns.config(Duration::from_secs(2))
    };
    let r = Resolver::new(&cfg).expect("resolver");

    let p = r.resolve(&name("pinned.example")).await.expect("static");
    assert_eq!((p.source, &*p.addrs), (Source::Static, &ips(&["127.0.0.6"])[..]));
    let h = r.resolve(&name("hosted.example")).await.expect("hosts");
    assert_eq!((h.source, &*h.addrs), (Source::HostsFile, &ips(&["127.0.0.7"])[..]));
    assert_eq!(dns.queries(), 0, "neither name reached DNS");

    // A reload replaces the static table; the next resolution sees the new record.
    let mut table = BTreeMap::new();
    table.insert("pinned.example".to_owned(), ips(&["10.0.0.1"]));
    r.replace_static(&table).expect("replace");
    assert_eq!(
        &*r.resolve(&name("pinned.example")).await.expect("static").addrs,
        &ips(&["10.0.0.1"])[..]
    );
    // A bad table is refused whole and the old one stays.
    let mut bad = BTreeMap::new();
    bad.insert("0x7f.1".to_owned(), ips(&["127.0.0.1"]));
    assert!(r.replace_static(&bad).is_err());
    assert_eq!(
        &*r.resolve(&name("pinned.example")).await.expect("static").addrs,
        &ips(&["10.0.0.1"])[..]
    );
}
