//! The pipeline against a real compiled policy (YAML → loader → compiler) and a real
//! resolver (static table; a DNS server address where nothing answers, for failures):
//! candidates from here, decided by the gate (`dataplane::admit`), as a forward-proxy
//! listener does it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::conntrack::FlowState;
use crate::dataplane::{self, Admission, Destination, FlowRequest, ListenerTag, Runtime};
use crate::egress::resolve::DnsConfig;
use crate::egress::ssrf::SsrfConfig;
use crate::flow::Proto;
use crate::policy::{CompileOptions, CompiledPolicy, DefaultAction};

const INVENTORY: &str = "
namespaces:
  - name: functions
workloads:
  - name: fn-a
    namespace: functions
    ips: [198.18.20.10]
";

const POLICY: &str = "
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata:
  name: functions-egress
spec:
  priority: 10
  subject:
    namespaces:
      matchLabels: {kubernetes.io/metadata.name: functions}
  egress:
    - name: apis
      action: Allow
      to:
        - domainNames: [api.example.com, \"*.allowed.example\"]
      ports:
        - portNumber: {protocol: TCP, port: 443}
    - name: local-service
      action: Allow
      to:
        - networks: [127.0.0.3/32, 10.0.0.0/8]
      ports:
        - portNumber: {protocol: TCP, port: 8080}
";

const CLIENT: &str = "198.18.20.10";

/// The gate over the test policy: a runtime with its own conntrack table.
struct Gate {
    rt: Arc<Runtime>,
    tag: ListenerTag,
}

fn compiled() -> Gate {
    let rt = Runtime::standalone(compile(), 1024);
    let tag = rt.first_listener("egress", "http-connect");
    Gate { rt, tag }
}

/// What the gate made of a request: the address to dial and the name, or the refusal.
type Outcome = Result<(SocketAddr, Option<DomainName>), Refusal>;

/// The gate's decision among `cands` for `port` (the entry it tracks is forgotten).
fn decide(g: &Gate, c: &Checker, cands: &Candidates, port: u16) -> Outcome {
    if cands.addrs.is_empty() {
        return Err(Refusal::NoAddress { fqdn: cands.fqdn });
    }
    let dst = dataplane::Candidates { addrs: &cands.addrs, port, checker: c, tracked: None };
    let req = FlowRequest {
        proto: Proto::Tcp,
        src: SocketAddr::new(ip(CLIENT), 40000),
        dst: Destination::Candidates(dst),
        fqdn: cands.fqdn.as_ref().map(DomainName::as_str),
        source: dataplane::Source::Addr,
        state: FlowState::Open,
    };
    match dataplane::admit(&g.rt, &g.tag, &req, Instant::now()) {
        Admission::Allow(a) => {
            g.rt.conntrack.remove(&a.key);
            Ok((a.key.dst, cands.fqdn))
        }
        Admission::Deny(d) => Err(Refusal::Denied { fqdn: cands.fqdn, reason: d.reason }),
        other => panic!("{other:?}"),
    }
}

fn compile() -> CompiledPolicy {
    let dir = tempfile::tempdir().expect("tempdir");
    let pol = dir.path().join("policies");
    std::fs::create_dir(&pol).expect("mkdir");
    std::fs::write(pol.join("anp.yaml"), POLICY).expect("write policy");
    let inv = dir.path().join("inventory.yaml");
    std::fs::write(&inv, INVENTORY).expect("write inventory");
    let set = crate::policy::load::load(&pol, &inv).unwrap_or_else(|e| panic!("{e}"));
    let opts = CompileOptions {
        default: DefaultAction::Deny,
        unknown: DefaultAction::Deny,
        now: SystemTime::now(),
    };
    CompiledPolicy::compile(&set, &opts).expect("compiles")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn checker(table: &[(&str, &[&str])]) -> Checker {
    let mut static_hosts = BTreeMap::new();
    for (n, addrs) in table {
        static_hosts.insert((*n).to_owned(), addrs.iter().map(|a| ip(a)).collect());
    }
    // Port 9 on loopback: nothing answers DNS there, so names outside the table fail.
    let dns = DnsConfig {
        servers: vec!["127.0.0.1:9".parse().expect("addr")],
        timeout: Duration::from_millis(300),
        static_hosts,
        ..DnsConfig::default()
    };
    let guard = Guard::new(SsrfConfig {
        enabled: true,
        treat_as_external: vec![
            "127.0.0.2/32".parse().expect("net"),
            "127.0.0.3/32".parse().expect("net"),
        ],
    });
    Checker::new(guard, Resolver::new(&dns).expect("resolver"))
}

async fn run(c: &Checker, g: &Gate, host: &str, port: u16) -> Outcome {
    let cands = c.resolve(Target::parse(host)?).await?;
    decide(g, c, &cands, port)
}

/// The flow log's reason for a request every candidate of which was refused.
fn denied(r: Outcome) -> &'static str {
    match r {
        Err(Refusal::Denied { reason, .. }) => reason,
        other => panic!("expected a denial, got {other:?}"),
    }
}

async fn transparent(c: &Checker, g: &Gate, orig: SocketAddr, name: Option<&str>) -> Outcome {
    let cands = c.transparent_candidates(orig, name).await?;
    decide(g, c, &cands, orig.port())
}

#[tokio::test]
async fn allowed_name_dials_its_checked_address() {
    let p = compiled();
    let c = checker(&[("api.example.com", &["127.0.0.2"]), ("x.allowed.example", &["127.0.0.2"])]);
    let (addr, fqdn) = run(&c, &p, "API.Example.com.", 443).await.expect("allowed");
    assert_eq!(addr, "127.0.0.2:443".parse().expect("addr"));
    assert_eq!(fqdn.map(|n| n.to_string()), Some("api.example.com".to_owned()));
    assert!(run(&c, &p, "x.allowed.example", 443).await.is_ok());
    assert_eq!(get(&p.tag.counters.allowed), 2);
}

#[tokio::test]
async fn policy_denies_other_names_and_ports() {
    let p = compiled();
    let c = checker(&[("api.example.com", &["127.0.0.2"]), ("evil.example", &["127.0.0.2"])]);
    assert_eq!(denied(run(&c, &p, "evil.example", 443).await), "default-deny");
    let err = run(&c, &p, "evil.example", 443).await.unwrap_err();
    assert_eq!(
        (err.http_status(), err.socks_reply(), err.reason()),
        (403, ReplyCode::NotAllowed, "default-deny")
    );
    assert_eq!(err.fqdn().map(|n| n.as_str()), Some("evil.example"));
    // The right name on the wrong port.
    assert_eq!(denied(run(&c, &p, "api.example.com", 80).await), "default-deny");
    // The bare parent of a wildcard is not matched by it.
    let c = checker(&[("allowed.example", &["127.0.0.2"])]);
    assert_eq!(denied(run(&c, &p, "allowed.example", 443).await), "default-deny");
    assert_eq!(get(&p.tag.counters.denied), 4);
}

#[tokio::test]
async fn ssrf_guard_refuses_what_policy_allows() {
    let p = compiled();
    // The name is allowed by policy, and 10.0.0.0/8 is allowed by a networks rule: the
    // guard still refuses both, and says which range.
    let c = checker(&[("api.example.com", &["10.0.0.1"])]);
    let err = run(&c, &p, "api.example.com", 443).await.unwrap_err();
    assert_eq!((err.reason(), err.http_status()), ("ssrf", 403));
    let Err(AddrRefusal::Ssrf(s)) = c.screen("10.0.0.1:443".parse().expect("addr")) else {
        panic!("the guard lets 10.0.0.1 through")
    };
    assert_eq!(s.range.name, "private");
    for host in ["10.0.0.1", "012.1", "167772161", "[::ffff:10.0.0.1]"] {
        assert_eq!(denied(run(&c, &p, host, 8080).await), "ssrf", "{host}");
        let cands = c.resolve(Target::parse(host).expect("addr")).await.expect("an address");
        let addr = SocketAddr::new(cands.addrs[0].to_canonical(), 8080);
        assert!(
            matches!(c.screen(addr), Err(AddrRefusal::Ssrf(s)) if s.range.name == "private"),
            "{host}"
        );
    }
    for host in [
        "2130706433",
        "0177.0.0.1",
        "0x7f.1",
        "[::ffff:127.0.0.1]",
        "169.254.169.254.",
        "[fd00:ec2::254]",
    ] {
        assert_eq!(denied(run(&c, &p, host, 443).await), "ssrf", "{host}");
    }
    assert_eq!(get(&p.tag.counters.allowed), 0);
}

#[tokio::test]
async fn addresses_however_spelled_meet_ip_rules() {
    let p = compiled();
    let c = checker(&[]);
    for host in ["127.0.0.3", "0x7f.3", "127.3", "2130706435", "[::ffff:127.0.0.3]"] {
        let (addr, fqdn) = run(&c, &p, host, 8080).await.unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(
            addr,
            "127.0.0.3:8080".parse().expect("addr"),
            "{host}: mapped form dialled as IPv4"
        );
        assert_eq!(fqdn, None);
    }
    // Lifted from the guard but not allowed by policy: lifting is not allowing.
    assert_eq!(denied(run(&c, &p, "127.0.0.2", 8080).await), "default-deny");
}

#[tokio::test]
async fn only_a_candidate_that_passed_is_dialled() {
    let p = compiled();
    let c = checker(&[("api.example.com", &["169.254.169.254", "10.0.0.1", "127.0.0.2"])]);
    let (addr, _) = run(&c, &p, "api.example.com", 443).await.expect("one candidate passes");
    assert_eq!(addr, "127.0.0.2:443".parse().expect("addr"));
    // Every candidate refused: the first one's refusal is the flow's.
    let c = checker(&[("api.example.com", &["169.254.169.254", "10.0.0.1"])]);
    assert_eq!(denied(run(&c, &p, "api.example.com", 443).await), "ssrf");
    let c = checker(&[("api.example.com", &["127.0.0.2", "10.0.0.1"])]);
    assert_eq!(denied(run(&c, &p, "api.example.com", 8080).await), "default-deny");
}

#[tokio::test]
async fn rebinding_between_requests_is_caught_on_the_second() {
    let p = compiled();
    let c = checker(&[("api.example.com", &["127.0.0.2"])]);
    assert!(run(&c, &p, "api.example.com", 443).await.is_ok());
    let mut t = BTreeMap::new();
    t.insert("api.example.com".to_owned(), vec![ip("10.0.0.1")]);
    c.resolver().replace_static(&t).expect("replace");
    assert_eq!(denied(run(&c, &p, "api.example.com", 443).await), "ssrf");
}

#[tokio::test]
async fn resolve_then_admit_dials_what_was_resolved() {
    // The listener's two-step form: candidates fixed at resolution; a later change of the
    // record does not change what the gate admits for them.
    let p = compiled();
    let c = checker(&[("api.example.com", &["127.0.0.2"])]);
    let cands = c.resolve(Target::parse("api.example.com").expect("name")).await.expect("resolves");
    let mut t = BTreeMap::new();
    t.insert("api.example.com".to_owned(), vec![ip("10.0.0.1")]);
    c.resolver().replace_static(&t).expect("replace");
    let (addr, _) = decide(&p, &c, &cands, 443).expect("allowed");
    assert_eq!(addr.ip(), ip("127.0.0.2"));
    // No candidate at all: the gate refuses (fails closed), nothing is admitted.
    let empty: &[IpAddr] = &[];
    let dst = dataplane::Candidates { addrs: empty, port: 443, checker: &c, tracked: None };
    let req = FlowRequest {
        proto: Proto::Tcp,
        src: SocketAddr::new(ip(CLIENT), 40001),
        dst: Destination::Candidates(dst),
        fqdn: None,
        source: dataplane::Source::Addr,
        state: FlowState::Open,
    };
    let got = dataplane::admit(&p.rt, &p.tag, &req, Instant::now());
    assert!(matches!(got, Admission::Deny(d) if d.reason == "no-address"), "{got:?}");
}

#[tokio::test]
async fn bad_names_and_failed_resolution() {
    let p = compiled();
    let c = checker(&[]);
    let err = run(&c, &p, "a..example", 443).await.unwrap_err();
    assert_eq!(
        (err.reason(), err.http_status(), err.socks_reply()),
        ("bad-name", 400, ReplyCode::HostUnreachable)
    );
    assert!(run(&c, &p, "1.2.3.4.5", 443).await.is_err());
    let err = run(&c, &p, "unknown.example", 443).await.unwrap_err();
    assert!(matches!(err, Refusal::Resolve { .. }), "{err:?}");
    assert!(matches!(err.http_status(), 502 | 504));
    assert_eq!(err.socks_reply(), ReplyCode::HostUnreachable);
    assert_eq!(err.fqdn().map(|n| n.as_str()), Some("unknown.example"));
}

#[tokio::test]
async fn own_listeners_are_never_dialled() {
    let p = compiled();
    let c = checker(&[]).with_own_listeners(vec!["127.0.0.3:8080".parse().expect("addr")]);
    let err = run(&c, &p, "127.0.0.3", 8080).await.unwrap_err();
    assert_eq!(err.reason(), "own-listener");
    let c = checker(&[]).with_own_listeners(vec!["0.0.0.0:8080".parse().expect("addr")]);
    assert_eq!(run(&c, &p, "127.0.0.3", 8080).await.unwrap_err().reason(), "own-listener");
    let c = checker(&[]).with_own_listeners(vec!["127.0.0.3:9901".parse().expect("addr")]);
    assert!(run(&c, &p, "127.0.0.3", 8080).await.is_ok());
}

#[tokio::test]
async fn transparent_name_must_cover_the_original_destination() {
    let p = compiled();
    let c = checker(&[
        ("api.example.com", &["127.0.0.2", "127.0.0.4"]),
        ("evil.example", &["127.0.0.2"]),
    ]);
    let orig: SocketAddr = "127.0.0.2:443".parse().expect("addr");
    let (addr, fqdn) = transparent(&c, &p, orig, Some("API.example.com")).await.expect("allowed");
    assert_eq!((addr, fqdn.map(|n| n.to_string())), (orig, Some("api.example.com".to_owned())));
    // SNI names an allowed host, but the client dialled an address the name does not
    // resolve to: spoofed.
    let spoof: SocketAddr = "127.0.0.3:443".parse().expect("addr");
    let err = transparent(&c, &p, spoof, Some("api.example.com")).await.unwrap_err();
    assert_eq!((err.reason(), err.http_status()), ("name-mismatch", 403));
    assert_eq!(err.fqdn().map(|n| n.as_str()), Some("api.example.com"));
    // An honest name that policy does not allow.
    let err = transparent(&c, &p, orig, Some("evil.example")).await.unwrap_err();
    assert_eq!(err.reason(), "default-deny");
    // No name: decided on the address (allowed by the networks rule on 8080).
    let svc: SocketAddr = "127.0.0.3:8080".parse().expect("addr");
    assert!(transparent(&c, &p, svc, None).await.is_ok());
    assert!(transparent(&c, &p, svc, Some("127.0.0.3")).await.is_ok());
    let err = transparent(&c, &p, svc, Some("127.0.0.9")).await.unwrap_err();
    assert_eq!(err.reason(), "name-mismatch");
    // The guard still applies to what was dialled.
    let meta: SocketAddr = "169.254.169.254:80".parse().expect("addr");
    assert_eq!(transparent(&c, &p, meta, None).await.unwrap_err().reason(), "ssrf");
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn sni_inside_the_tunnel_must_name_the_connect_host() {
    use crate::wire::sni::build_client_hello;
    let host = Target::parse("api.example.com").expect("name");
    let hello = build_client_hello(Some("API.example.com"), 0);
    assert_eq!(verify_sni(&hello, &host), SniVerdict::Agrees);
    assert_eq!(verify_sni(&hello[..20], &host), SniVerdict::NeedMore);
    assert_eq!(
        verify_sni(&build_client_hello(Some("evil.example"), 0), &host),
        SniVerdict::Disagrees
    );
    assert_eq!(verify_sni(&build_client_hello(Some("1.2.3.4.5"), 0), &host), SniVerdict::Disagrees);
    assert_eq!(verify_sni(&build_client_hello(None, 0), &host), SniVerdict::NoSni);
    assert_eq!(verify_sni(b"GET / HTTP/1.1\r\n", &host), SniVerdict::NotTls);
    let mut broken = hello.clone();
    broken[5] = 2;
    assert_eq!(verify_sni(&broken, &host), SniVerdict::Malformed);
    let by_addr = Target::parse("127.0.0.2").expect("addr");
    assert_eq!(verify_sni(&hello, &by_addr), SniVerdict::Disagrees);
}
