//! The pipeline against a real compiled policy (YAML → loader → compiler) and a real
//! resolver (static table; a DNS server address where nothing answers, for failures).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use super::*;
use crate::egress::resolve::DnsConfig;
use crate::egress::ssrf::SsrfConfig;
use crate::policy::{Cause, CompileOptions, DefaultAction, Verdict};

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

fn compiled() -> CompiledPolicy {
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

async fn run(c: &Checker, p: &CompiledPolicy, host: &str, port: u16) -> Result<Admitted, Refusal> {
    let target = Target::parse(host)?;
    c.check(p, ip(CLIENT), target, port, Proto::Tcp).await
}

fn denied(r: Result<Admitted, Refusal>) -> (SocketAddr, AddrRefusal) {
    match r {
        Err(Refusal::Denied { first, .. }) => first,
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[tokio::test]
async fn allowed_name_dials_its_checked_address() {
    let p = compiled();
    let c = checker(&[("api.example.com", &["127.0.0.2"]), ("x.allowed.example", &["127.0.0.2"])]);
    let a = run(&c, &p, "API.Example.com.", 443).await.expect("allowed");
    assert_eq!(a.addr, "127.0.0.2:443".parse().expect("addr"));
    assert_eq!(a.fqdn.map(|n| n.to_string()), Some("api.example.com".to_owned()));
    assert!(a.decision.verdict.is_allow());
    assert!(run(&c, &p, "x.allowed.example", 443).await.is_ok());
}

#[tokio::test]
async fn policy_denies_other_names_and_ports() {
    let p = compiled();
    let c = checker(&[("api.example.com", &["127.0.0.2"]), ("evil.example", &["127.0.0.2"])]);
    let (addr, why) = denied(run(&c, &p, "evil.example", 443).await);
    assert_eq!(addr, "127.0.0.2:443".parse().expect("addr"));
    let AddrRefusal::Policy(d) = why else { panic!("{why:?}") };
    assert!(matches!(d.verdict, Verdict::Deny(r) if r.cause == Cause::DefaultDeny), "{d:?}");
    let err = run(&c, &p, "evil.example", 443).await.unwrap_err();
    assert_eq!(
        (err.http_status(), err.socks_reply(), err.reason()),
        (403, ReplyCode::NotAllowed, "default-deny")
    );
    assert_eq!(err.fqdn().map(|n| n.as_str()), Some("evil.example"));
    // The right name on the wrong port.
    assert!(matches!(denied(run(&c, &p, "api.example.com", 80).await).1, AddrRefusal::Policy(_)));
    // The bare parent of a wildcard is not matched by it.
    let c = checker(&[("allowed.example", &["127.0.0.2"])]);
    assert!(matches!(denied(run(&c, &p, "allowed.example", 443).await).1, AddrRefusal::Policy(_)));
}

#[tokio::test]
async fn ssrf_guard_refuses_what_policy_allows() {
    let p = compiled();
    // The name is allowed by policy, and 10.0.0.0/8 is allowed by a networks rule: the
    // guard still refuses both, and says which range.
    let c = checker(&[("api.example.com", &["10.0.0.1"])]);
    let err = run(&c, &p, "api.example.com", 443).await.unwrap_err();
    let Refusal::Denied { first: (addr, AddrRefusal::Ssrf(s)), .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!((addr, s.range.name), ("10.0.0.1:443".parse().expect("addr"), "private"));
    assert_eq!((err.reason(), err.http_status()), ("ssrf", 403));
    for host in ["10.0.0.1", "012.1", "167772161", "[::ffff:10.0.0.1]"] {
        let (_, why) = denied(run(&c, &p, host, 8080).await);
        assert!(
            matches!(why, AddrRefusal::Ssrf(s) if s.range.name == "private"),
            "{host}: {why:?}"
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
        assert!(matches!(denied(run(&c, &p, host, 443).await).1, AddrRefusal::Ssrf(_)), "{host}");
    }
}

#[tokio::test]
async fn addresses_however_spelled_meet_ip_rules() {
    let p = compiled();
    let c = checker(&[]);
    for host in ["127.0.0.3", "0x7f.3", "127.3", "2130706435", "[::ffff:127.0.0.3]"] {
        let a = run(&c, &p, host, 8080).await.unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(
            a.addr,
            "127.0.0.3:8080".parse().expect("addr"),
            "{host}: mapped form dialled as IPv4"
        );
        assert_eq!(a.fqdn, None);
    }
    // Lifted from the guard but not allowed by policy: lifting is not allowing.
    assert!(matches!(denied(run(&c, &p, "127.0.0.2", 8080).await).1, AddrRefusal::Policy(_)));
}

#[tokio::test]
async fn only_a_candidate_that_passed_is_dialled() {
    let p = compiled();
    let c = checker(&[("api.example.com", &["169.254.169.254", "10.0.0.1", "127.0.0.2"])]);
    let a = run(&c, &p, "api.example.com", 443).await.expect("one candidate passes");
    assert_eq!(a.addr, "127.0.0.2:443".parse().expect("addr"));
    let c = checker(&[("api.example.com", &["169.254.169.254", "10.0.0.1"])]);
    let err = run(&c, &p, "api.example.com", 443).await.unwrap_err();
    let Refusal::Denied { first: (addr, AddrRefusal::Ssrf(s)), candidates, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!((addr.ip(), s.range.name, candidates), (ip("169.254.169.254"), "cloud-metadata", 2));
}

#[tokio::test]
async fn rebinding_between_requests_is_caught_on_the_second() {
    let p = compiled();
    let c = checker(&[("api.example.com", &["127.0.0.2"])]);
    assert!(run(&c, &p, "api.example.com", 443).await.is_ok());
    let mut t = BTreeMap::new();
    t.insert("api.example.com".to_owned(), vec![ip("10.0.0.1")]);
    c.resolver().replace_static(&t).expect("replace");
    let (addr, why) = denied(run(&c, &p, "api.example.com", 443).await);
    assert_eq!(addr.ip(), ip("10.0.0.1"));
    assert!(matches!(why, AddrRefusal::Ssrf(_)));
}

#[tokio::test]
async fn resolve_then_choose_dials_what_was_resolved() {
    // The listener's two-step form: candidates fixed at resolution; a later change of the
    // record does not change what `choose` returns for them.
    let p = compiled();
    let c = checker(&[("api.example.com", &["127.0.0.2"])]);
    let cands = c.resolve(Target::parse("api.example.com").expect("name")).await.expect("resolves");
    let mut t = BTreeMap::new();
    t.insert("api.example.com".to_owned(), vec![ip("10.0.0.1")]);
    c.resolver().replace_static(&t).expect("replace");
    let a = c.choose(&p, ip(CLIENT), &cands, 443, Proto::Tcp).expect("allowed");
    assert_eq!(a.addr.ip(), ip("127.0.0.2"));
    let empty = Candidates { fqdn: None, addrs: std::sync::Arc::new([]) };
    assert!(matches!(
        c.choose(&p, ip(CLIENT), &empty, 443, Proto::Tcp),
        Err(Refusal::NoAddress { .. })
    ));
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
    let cl = ip(CLIENT);
    let a = c
        .check_transparent(&p, cl, orig, Some("API.example.com"), Proto::Tcp)
        .await
        .expect("allowed");
    assert_eq!((a.addr, a.fqdn.map(|n| n.to_string())), (orig, Some("api.example.com".to_owned())));
    // SNI names an allowed host, but the client dialled an address the name does not
    // resolve to: spoofed.
    let spoof: SocketAddr = "127.0.0.3:443".parse().expect("addr");
    let err =
        c.check_transparent(&p, cl, spoof, Some("api.example.com"), Proto::Tcp).await.unwrap_err();
    assert_eq!((err.reason(), err.http_status()), ("name-mismatch", 403));
    assert_eq!(err.fqdn().map(|n| n.as_str()), Some("api.example.com"));
    // An honest name that policy does not allow.
    let err =
        c.check_transparent(&p, cl, orig, Some("evil.example"), Proto::Tcp).await.unwrap_err();
    assert_eq!(err.reason(), "default-deny");
    // No name: decided on the address (allowed by the networks rule on 8080).
    let svc: SocketAddr = "127.0.0.3:8080".parse().expect("addr");
    assert!(c.check_transparent(&p, cl, svc, None, Proto::Tcp).await.is_ok());
    assert!(c.check_transparent(&p, cl, svc, Some("127.0.0.3"), Proto::Tcp).await.is_ok());
    let err = c.check_transparent(&p, cl, svc, Some("127.0.0.9"), Proto::Tcp).await.unwrap_err();
    assert_eq!(err.reason(), "name-mismatch");
    // The guard still applies to what was dialled.
    let meta: SocketAddr = "169.254.169.254:80".parse().expect("addr");
    assert_eq!(
        c.check_transparent(&p, cl, meta, None, Proto::Tcp).await.unwrap_err().reason(),
        "ssrf"
    );
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
