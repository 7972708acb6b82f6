//! The `transparent` listener end to end, with a real nftables redirect.
//!
//! Two network namespaces joined by a veth pair:
//! - `cl` (the client, 198.18.1.2/24, default route via the gateway) runs curl, which
//!   believes it talks to the servers directly;
//! - `gw` (198.18.1.1/24) runs flowgate and the servers, whose addresses 198.18.0.10 and
//!   198.18.0.11 are on its `lo`. An nftables `prerouting` rule redirects TCP 80/443
//!   arriving on the veth to flowgate's transparent listener. flowgate's own dials
//!   start in `gw` itself (the `output` hook), so they are never redirected back.
//!
//! Each server address has a front that counts accepts (443: spliced to a real
//! `openssl s_server` with a self-signed certificate; 80: a minimal HTTP server).
//! `tls.test` and `web.test` resolve (static table) to 198.18.0.10 and are allowed by
//! name; `evil.test` resolves to 198.18.0.11 and is not. Then: an allowed SNI and an
//! allowed Host reach their servers; another SNI is refused; the allowed SNI or Host aimed
//! at 198.18.0.11 (which it does not resolve to: spoofing) is refused; a connection made
//! to the listener itself, not redirected, is refused. The same over IPv6 (2001:2::/48,
//! an `inet` table, the dual-stack listener reading `IP6T_SO_ORIGINAL_DST`). A ClientHello
//! without SNI is decided on the address alone (no rule allows it); a TLS record larger
//! than TLS allows and a ClientHello that stops half-way are refused and counted
//! (`handshake_malformed`, `handshake_timeout`). Refusals are `deny` events with the
//! name, and the counters on the decoy addresses stay at 0: a refusal never dials. And a
//! keep-alive server never sees a second request on a redirected connection (it could
//! name a refused host served from the same address).
//!
//! Needs root, `ip`, `nft`, `curl`, `openssl`, `python3`; skipped, saying so, otherwise (in CI: fails).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use support::egress::{Gate, caller_egress_policy, caller_inventory, get, tls_server_on};
use support::netns::{Netns, counting_front, counting_http, curl, sh};
use support::process::Flowgate;
use support::require::{Need, skip_unless};

const CLIENT: &str = "198.18.1.2";
const GW: &str = "198.18.1.1";
const SERVER: &str = "198.18.0.10";
const DECOY: &str = "198.18.0.11";
const CLIENT6: &str = "2001:2:1::2";
const GW6: &str = "2001:2:1::1";
const SERVER6: &str = "2001:2::10";
const DECOY6: &str = "2001:2::11";

const INVENTORY: &str = caller_inventory!("198.18.1.2, 2001:2:1::2");

const POLICY: &str = caller_egress_policy!("apis" => "domainNames: [tls.test, web.test]");

/// The client and gateway namespaces, joined by a veth pair, addressed as the module doc
/// says; `tag` keeps the names of two tests in one process apart. Returns the gateway
/// and client namespaces and the gateway side's interface name.
fn topology(tag: char) -> (Netns, Netns, String) {
    let pid = std::process::id();
    let gw = Netns::new(&format!("{tag}gw"));
    let cl = Netns::new(&format!("{tag}cl"));
    let (vg, vc) = (format!("fg{tag}g{pid}"), format!("fg{tag}c{pid}"));
    sh(&format!("ip link add {vg} type veth peer name {vc}"));
    sh(&format!("ip link set {vg} netns {}", gw.name));
    sh(&format!("ip link set {vc} netns {}", cl.name));
    gw.exec(&format!("ip addr add {GW}/24 dev {vg} && ip link set {vg} up"));
    gw.exec(&format!("ip addr add {SERVER}/32 dev lo && ip addr add {DECOY}/32 dev lo"));
    cl.exec(&format!("ip addr add {CLIENT}/24 dev {vc} && ip link set {vc} up"));
    cl.exec(&format!("ip route add default via {GW}"));
    gw.exec(&format!("ip -6 addr add {GW6}/64 dev {vg} nodad"));
    gw.exec(&format!("ip -6 addr add {SERVER6}/128 dev lo nodad"));
    gw.exec(&format!("ip -6 addr add {DECOY6}/128 dev lo nodad"));
    cl.exec(&format!("ip -6 addr add {CLIENT6}/64 dev {vc} nodad"));
    cl.exec(&format!("ip -6 route add default via {GW6}"));
    (gw, cl, vg)
}

/// Installs the redirect (IPv4 and IPv6) of TCP 80/443 arriving on `vg` to `port`. Must
/// run on a thread inside the gateway namespace (the `nft` child inherits it).
fn redirect(dir: &std::path::Path, vg: &str, port: u16) {
    let rules = dir.join("redirect.nft");
    std::fs::write(
        &rules,
        format!(
            "table inet fg {{\n  chain pre {{\n    type nat hook prerouting priority -100;\n    \
             iifname \"{vg}\" tcp dport {{ 80, 443 }} redirect to :{port}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    sh(&format!("nft -f {}", rules.display()));
}

#[test]
fn redirected_connections_pass_by_sni_or_host_and_spoofed_names_are_refused() {
    if skip_unless(&[
        Need::Root,
        Need::Bin("ip"),
        Need::Bin("nft"),
        Need::Bin("curl"),
        Need::Bin("openssl"),
        Need::Bin("python3"),
    ]) {
        return;
    }
    let (gw, cl, vg) = topology('t');

    gw.run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let backend: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let _tls = tls_server_on(tmp.path(), backend).await;
        let tls10 = counting_front(SocketAddr::new(SERVER.parse().unwrap(), 443), backend).await;
        let tls11 = counting_front(SocketAddr::new(DECOY.parse().unwrap(), 443), backend).await;
        let web10 = counting_http(SocketAddr::new(SERVER.parse().unwrap(), 80), "web 10\n").await;
        let web11 = counting_http(SocketAddr::new(DECOY.parse().unwrap(), 80), "web 11\n").await;
        let tls10v6 = counting_front(SocketAddr::new(SERVER6.parse().unwrap(), 443), backend).await;
        let tls11v6 = counting_front(SocketAddr::new(DECOY6.parse().unwrap(), 443), backend).await;

        let config = format!(
            "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"500ms\"\n\
             [dns.static]\n\"tls.test\" = [\"{SERVER}\", \"{SERVER6}\"]\n\"web.test\" = [\"{SERVER}\"]\n\
             \"evil.test\" = [\"{DECOY}\"]\n\
             [ssrf]\ntreat_as_external = [\"{SERVER}/32\", \"{DECOY}/32\", \"{SERVER6}/128\", \"{DECOY6}/128\"]\n\
             [[listener]]\nname = \"transparent\"\nkind = \"transparent\"\nbind = \"[::]:0\"\n\
             handshake_timeout = \"2s\"\n"
        );
        let gate = Gate::start(INVENTORY, POLICY, &config).await;
        let port = gate.addr("transparent").port();
        redirect(tmp.path(), &vg, port);

        let in_cl = ["ip", "netns", "exec", cl.name.as_str()];
        let resolve = |name: &str, port: u16, ip: &str| format!("{name}:{port}:{ip}");

        // Allowed: SNI tls.test to the address it resolves to; Host web.test likewise.
        let r = resolve("tls.test", 443, SERVER);
        let (code, body, err) = curl(&in_cl, &["-k", "--resolve", &r, "https://tls.test/"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(body.contains("s_server"), "{body}");
        assert_eq!(tls10.load(Ordering::SeqCst), 1);
        let r = resolve("web.test", 80, SERVER);
        let (code, body, err) = curl(&in_cl, &["--resolve", &r, "http://web.test/"]).await;
        assert_eq!((code, body.as_str()), (0, "web 10\n"), "{err}");
        assert_eq!(web10.load(Ordering::SeqCst), 1);
        assert_eq!(get(&gate.counters("transparent").allowed), 2);

        // Another SNI, which the policy does not allow.
        let r = resolve("evil.test", 443, DECOY);
        let (code, _, err) = curl(&in_cl, &["-k", "--resolve", &r, "https://evil.test/"]).await;
        assert_ne!(code, 0, "{err}");
        let e = gate
            .wait_event("deny evil.test", |e| e["event"] == "deny" && e["fqdn"] == "evil.test")
            .await;
        assert_eq!(e["dst"], format!("{DECOY}:443"));
        assert_eq!(e["src_workload"], "fn/caller");

        // SNI spoofing: the allowed name, aimed at an address it does not resolve to.
        let r = resolve("tls.test", 443, DECOY);
        let (code, _, err) = curl(&in_cl, &["-k", "--resolve", &r, "https://tls.test/"]).await;
        assert_ne!(code, 0, "{err}");
        let e = gate
            .wait_event("name-mismatch tls.test", |e| {
                e["event"] == "deny" && e["fqdn"] == "tls.test" && e["reason"] == "name-mismatch"
            })
            .await;
        assert_eq!(e["dst"], format!("{DECOY}:443"));

        // Host spoofing, in plain HTTP.
        let url = format!("http://{DECOY}/");
        let (code, body, err) = curl(&in_cl, &["-H", "Host: web.test", &url]).await;
        assert_ne!(code, 0, "{body} {err}");
        gate.wait_event("name-mismatch web.test", |e| {
            e["event"] == "deny" && e["fqdn"] == "web.test" && e["reason"] == "name-mismatch"
        })
        .await;

        // IPv6 (IP6T_SO_ORIGINAL_DST): the allowed SNI to its IPv6 address passes, aimed
        // at another IPv6 address it is refused.
        let r = resolve("tls.test", 443, &format!("[{SERVER6}]"));
        let (code, body, err) = curl(&in_cl, &["-k", "--resolve", &r, "https://tls.test/"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(body.contains("s_server"), "{body}");
        assert_eq!(tls10v6.load(Ordering::SeqCst), 1);
        let r = resolve("tls.test", 443, &format!("[{DECOY6}]"));
        let (code, _, err) = curl(&in_cl, &["-k", "--resolve", &r, "https://tls.test/"]).await;
        assert_ne!(code, 0, "{err}");
        let spoof6 = format!("[{DECOY6}]:443");
        gate.wait_event("name-mismatch over IPv6", |e| {
            e["reason"] == "name-mismatch" && e["dst"] == spoof6
        })
        .await;

        // No SNI (curl sends none to an address): decided on the address alone, which
        // no rule allows (the policy names only names).
        let url = format!("https://{SERVER}/");
        let (code, _, err) = curl(&in_cl, &["-k", &url]).await;
        assert_ne!(code, 0, "{err}");
        let dst = format!("{SERVER}:443");
        gate.wait_event("deny without a name", |e| {
            e["event"] == "deny" && e["dst"] == dst && e["fqdn"].is_null()
        })
        .await;

        // First bytes that cannot be read: a TLS record larger than TLS allows, and a
        // ClientHello that stops half-way (cut after the 2s handshake timeout).
        let c = gate.counters("transparent");
        let probe = |bytes: &str| {
            format!(
                "import socket; s = socket.create_connection(('{DECOY}', 443)); \
                 s.sendall(bytes.fromhex('{bytes}')); s.settimeout(8); \
                 print(s.recv(16) or b'closed')"
            )
        };
        for (bytes, counter) in [("1603014001", &c.handshake_malformed), ("160301010001", &c.handshake_timeout)] {
            let before = get(counter);
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", &cl.name, "python3", "-c", &probe(bytes)])
                .output()
                .await
                .expect("python3 runs");
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                text.contains("reset") || text.contains("closed"),
                "{bytes}: not refused: {text}"
            );
            assert_eq!(get(counter), before + 1, "{bytes}");
        }

        // Not redirected: straight at the listener, which would loop.
        let url = format!("http://{GW}:{port}/");
        let (code, _, err) = curl(&in_cl, &["-H", "Host: web.test", &url]).await;
        assert_ne!(code, 0, "{err}");
        let own = format!("{GW}:{port}");
        let e = gate
            .wait_event("deny to the listener itself", |e| e["event"] == "deny" && e["dst"] == own)
            .await;
        assert_eq!(e["reason"], "own-listener");

        // Nothing refused was dialled.
        assert_eq!(tls11.load(Ordering::SeqCst), 0, "a refused TLS flow reached {DECOY}");
        assert_eq!(web11.load(Ordering::SeqCst), 0, "a refused HTTP flow reached {DECOY}");
        assert_eq!(tls11v6.load(Ordering::SeqCst), 0, "a refused TLS flow reached {DECOY6}");
        assert_eq!(tls10.load(Ordering::SeqCst) + web10.load(Ordering::SeqCst), 2);
        assert_eq!((get(&c.allowed), get(&c.denied)), (3, 8));
    });
    drop(cl);
    drop(gw);
}

/// A keep-alive client (python3, in the client namespace): `GET /1` for web.test with
/// `FIRST_FIELDS`, its answer read in full, then `GET /2` for blocked.test on the same
/// connection.
const TWO_REQUESTS: &str = r#"
import socket
s = socket.create_connection(("SERVER", 80))
s.settimeout(5)
def answer():
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
        try:
            chunk = s.recv(4096)
        except OSError as e:
            return data + repr(e).encode()
        if not chunk:
            return data + b"<closed>"
        data += chunk
    return data
s.sendall(b"GET /1 HTTP/1.1\r\nHost: web.test\r\nFIRST_FIELDS\r\n")
print(answer())
try:
    s.sendall(b"GET /2 HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
except OSError as e:
    print(repr(e))
print(answer())
"#;

/// One request for blocked.test on a connection of its own.
const ONE_REQUEST: &str = r#"
import socket
s = socket.create_connection(("SERVER", 80))
s.settimeout(5)
s.sendall(b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
try:
    print(s.recv(4096) or b"<closed>")
except OSError as e:
    print(repr(e))
"#;

/// A keep-alive HTTP server on `addr`: answers every request on a connection with the
/// `Host` it named (`host=NAME`), and closes only after a request that asked to
/// (`Connection: close`), as HTTP/1.1 servers do.
async fn keep_alive_http(addr: SocketAddr) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("{addr}: {e}"));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let mut s = tokio::io::BufReader::new(s);
                loop {
                    let (mut host, mut close, mut line) = (String::new(), false, String::new());
                    loop {
                        line.clear();
                        match s.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("host:") {
                            host = v.trim().to_owned();
                        }
                        if lower.starts_with("connection:") && lower.contains("close") {
                            close = true;
                        }
                    }
                    let body = format!("host={host}\n");
                    let resp =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    if s.get_mut().write_all(resp.as_bytes()).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
}

/// Only a plain HTTP connection's first request is checked, so it is made its last: a
/// second request on the same connection, for a host the policy refuses but that is served
/// from the same address, must not reach the server. Against a keep-alive server, two
/// requests on one redirected connection get one answer; the refused host alone is denied.
#[test]
fn a_second_request_on_a_redirected_connection_never_reaches_the_server() {
    if skip_unless(&[Need::Root, Need::Bin("ip"), Need::Bin("nft"), Need::Bin("python3")]) {
        return;
    }
    let (gw, cl, vg) = topology('k');

    gw.run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        keep_alive_http(SocketAddr::new(SERVER.parse().unwrap(), 80)).await;
        let config = format!(
            "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"500ms\"\n\
             [dns.static]\n\"web.test\" = [\"{SERVER}\"]\n\"blocked.test\" = [\"{SERVER}\"]\n\
             [ssrf]\ntreat_as_external = [\"{SERVER}/32\"]\n\
             [[listener]]\nname = \"transparent\"\nkind = \"transparent\"\nbind = \"0.0.0.0:0\"\n\
             handshake_timeout = \"2s\"\n"
        );
        let gate = Gate::start(INVENTORY, POLICY, &config).await;
        redirect(tmp.path(), &vg, gate.addr("transparent").port());

        // Request by request on one connection, as a keep-alive client does: read the first
        // answer in full, then send the second.
        let python = |script: &str, first_fields: &str| {
            let script = script.replace("SERVER", SERVER).replace("FIRST_FIELDS", first_fields);
            let ns = cl.name.clone();
            async move {
                let out = tokio::process::Command::new("ip")
                    .args(["netns", "exec", &ns, "python3", "-c", &script])
                    .output()
                    .await
                    .expect("python3 runs");
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr)
            }
        };
        // Plain keep-alive, and a WebSocket upgrade that the server declines (it answers
        // 200 and would keep the connection open for the next request).
        for first in [
            r"Connection: keep-alive\r\n",
            r"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n",
        ] {
            let text = python(TWO_REQUESTS, first).await;
            assert!(text.contains("host=web.test"), "{first}: the first is answered: {text}");
            assert!(!text.contains("host=blocked.test"), "{first}: the second was served: {text}");
        }

        // The control: blocked.test on a connection of its own is refused by the policy.
        let c = gate.counters("transparent");
        let text = python(ONE_REQUEST, "").await;
        assert!(!text.contains("host=blocked.test"), "blocked.test alone was served: {text}");
        gate.wait_event("deny blocked.test", |e| {
            e["event"] == "deny" && e["fqdn"] == "blocked.test"
        })
        .await;
        assert_eq!((get(&c.allowed), get(&c.denied)), (2, 1));
    });
    drop(cl);
    drop(gw);
}

/// The same path through the real binary: `flowgate run` started with `ip netns exec` in
/// the gateway namespace, its listener's port read from its start-up lines, its refusals
/// from its flow-log file.
#[test]
fn the_binary_in_a_namespace_serves_a_redirect() {
    if skip_unless(&[
        Need::Root,
        Need::Bin("ip"),
        Need::Bin("nft"),
        Need::Bin("curl"),
        Need::Bin("openssl"),
    ]) {
        return;
    }
    let (gw, cl, vg) = topology('b');
    gw.run(|| async {
        let tmp = tempfile::tempdir().unwrap();
        let backend: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let _tls = tls_server_on(tmp.path(), backend).await;
        let tls10 = counting_front(SocketAddr::new(SERVER.parse().unwrap(), 443), backend).await;
        let tls11 = counting_front(SocketAddr::new(DECOY.parse().unwrap(), 443), backend).await;
        let dir = tmp.path();
        std::fs::write(dir.join("inventory.yaml"), INVENTORY).unwrap();
        std::fs::create_dir(dir.join("policies")).unwrap();
        std::fs::write(dir.join("policies/policy.yaml"), POLICY).unwrap();
        let config = format!(
            "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\n\
             default = \"deny\"\nunknown = \"deny\"\n\
             [flowlog]\noutput = \"flow.log\"\ndedupe_window = \"0s\"\n\
             [admin]\nbind = \"127.0.0.1:0\"\n\
             [dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"500ms\"\n\
             [dns.static]\n\"tls.test\" = [\"{SERVER}\"]\n\
             [ssrf]\ntreat_as_external = [\"{SERVER}/32\", \"{DECOY}/32\"]\n\
             [[listener]]\nname = \"tp\"\nkind = \"transparent\"\nbind = \"0.0.0.0:0\"\n\
             handshake_timeout = \"2s\"\n"
        );
        let path = dir.join("flowgate.toml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &gw.name, env!("CARGO_BIN_EXE_flowgate"), "run", "--config"])
            .arg(&path);
        // Start-up only (a bounded wait for its printed port): nothing on this thread's
        // runtime needs to run meanwhile.
        let mut fg = Flowgate::spawn(cmd);
        let port = fg.listener("tp").port();
        fg.wait_ready();
        redirect(dir, &vg, port);

        let in_cl = ["ip", "netns", "exec", cl.name.as_str()];
        let ok = format!("tls.test:443:{SERVER}");
        let (code, body, err) = curl(&in_cl, &["-k", "--resolve", &ok, "https://tls.test/"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(body.contains("s_server"), "{body}");
        let spoof = format!("tls.test:443:{DECOY}");
        let (code, _, err) = curl(&in_cl, &["-k", "--resolve", &spoof, "https://tls.test/"]).await;
        assert_ne!(code, 0, "{err}");
        assert_eq!((tls10.load(Ordering::SeqCst), tls11.load(Ordering::SeqCst)), (1, 0));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let log = std::fs::read_to_string(dir.join("flow.log")).unwrap_or_default();
            let found = log.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|e| {
                    e["event"] == "deny"
                        && e["fqdn"] == "tls.test"
                        && e["reason"] == "name-mismatch"
                })
            });
            if found {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no name-mismatch event: {log}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        fg.assert_running();
        drop(fg);
    });
    drop(cl);
    drop(gw);
}

/// Without root and without any redirect: a client that connects to the listener itself
/// is refused (reset) before anything is dialled — there is no NAT entry
/// (`no-original-dst`), or, where connection tracking is active, the entry names the
/// listener itself (`own-listener`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_was_not_redirected_is_refused() {
    let config = "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"300ms\"\n\
                  [[listener]]\nname = \"tp\"\nkind = \"transparent\"\nbind = \"127.0.0.1:0\"\n\
                  handshake_timeout = \"1s\"\n";
    let gate = Gate::start(INVENTORY, POLICY, config).await;
    let addr = gate.addr("tp");
    // The reset can beat the end of our own connect on loopback: that counts as refused.
    if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: tls.test\r\n\r\n").await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the listener did not close the connection");
        assert!(buf.is_empty(), "no byte is answered: {buf:?}");
    }
    let dst = addr.to_string();
    let e =
        gate.wait_event("deny to the listener", |e| e["event"] == "deny" && e["dst"] == dst).await;
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(reason == "no-original-dst" || reason == "own-listener", "{e}");
    let c = gate.counters("tp");
    assert_eq!((get(&c.allowed), get(&c.denied)), (0, 1));
}
