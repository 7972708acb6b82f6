//! The `transparent` listener: connections that nftables/iptables redirected to flowgate
//! (`redirect to :PORT` / `-j REDIRECT`) without the client knowing a proxy is there.
//!
//! Per connection:
//! 1. the original destination from the kernel's NAT table (`SO_ORIGINAL_DST`, or
//!    `IP6T_SO_ORIGINAL_DST` for IPv6). A connection that was not redirected has its
//!    original destination equal to the listener itself: connecting to it would loop, so
//!    it is refused (`own-listener`), as is one whose NAT entry cannot be read;
//! 2. the client's first bytes are read — not terminated: a TLS ClientHello's
//!    `server_name` or a plain HTTP request's `Host` — under the listener's
//!    `handshake_timeout` and a byte limit (one TLS record, [`MAX_RECORD`]; or
//!    `max_header_bytes` for an HTTP head). Those bytes are sent upstream unchanged once
//!    the flow is admitted. Broken TLS, a fragmented ClientHello, an HTTP head over the
//!    limits or with two `Host` headers is refused (`handshake_malformed`): fail closed,
//!    since a name the proxy cannot read is a name it cannot check. Another protocol,
//!    HTTP without `Host`, a ClientHello without SNI, or a client that sends nothing
//!    before the timeout (server-speaks-first protocols) is decided on the address alone;
//!    a client that stops in the middle of a ClientHello or head is cut
//!    (`handshake_timeout`);
//! 3. [`crate::egress::Checker::transparent_candidates`]: with a name, the original
//!    destination must be one of the addresses the name resolves to (else
//!    `name-mismatch`: SNI/Host spoofing — an allowed name cannot carry a connection to
//!    another address); the original destination is then the one candidate;
//! 4. through the gate once ([`ForwardProxy::admit`]: own listener, SSRF guard and policy
//!    for that address with the name as `fqdn`; conntrack entry, counters, `allow`/`deny`
//!    event with the name), dial the original destination, replay the first bytes, and
//!    the shared relay ([`ForwardProxy::relay`]).
//!
//! Only the first request of a plain HTTP connection is read, so it is made the only one
//! ([`only_request`]): its head goes upstream with `Connection: close` in place of the
//! client's `Connection`, `Keep-Alive`, `Proxy-Connection`, `Upgrade` and `HTTP2-Settings`
//! fields. The server answers it and closes (RFC 9112 §9.6: it must not process a further
//! request on that connection), so a second request naming another host served from the
//! same address never reaches it unchecked; the client opens a new connection, which is
//! checked like the first. A WebSocket upgrade keeps its `Upgrade` field and gets
//! `Connection: Upgrade, close`: after a switch the connection carries WebSocket frames for
//! the checked host, and a server that declines the switch closes too. (TLS
//! has the same limit at another layer and no such remedy without terminating it: the
//! SNI is checked, not what the encrypted requests name.)
//!
//! A refusal is a reset (SO_LINGER 0): the client, which thinks it talks to the server
//! directly, gets no answer in any protocol's words, and the upstream is never dialled.
//! Its flow-log `deny` reason is the pipeline's (`name-mismatch`, `ssrf`, a policy cause,
//! a resolver error) or one of this listener's: `no-original-dst`, `own-listener`,
//! `handshake-timeout`, `malformed-first-bytes`.
//! PROXY protocol is not accepted on this kind (validated in `config`): the kernel, not a
//! header, tells where the client was going.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::forward::{Chosen, ForwardProxy};
use super::tcp::reset;
use crate::dataplane::tcp_flow;
use crate::egress::check::Refusal;
use crate::flow::Proto;
use crate::telemetry::metrics::ListenerCounters;
use crate::wire::http_connect::{Host, ParseError};
use crate::wire::sni::{HostError, MAX_RECORD, SniError, peek_client_hello, peek_http_host};

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h): both 80, at `SOL_IP` / `SOL_IPV6`.
const SO_ORIGINAL_DST: libc::c_int = 80;
/// A TLS record header, which precedes the record [`MAX_RECORD`] bounds.
const TLS_RECORD_HEADER: usize = 5;

/// The destination the client dialled before a NAT redirect brought it here.
///
/// # Errors
/// The `getsockopt` error: `ENOENT` when the kernel has no NAT entry for the connection.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    match stream.local_addr()? {
        SocketAddr::V4(_) => original_dst_v4(fd),
        // A dual-stack socket carries IPv4 connections as mapped addresses; their NAT
        // entry is an IPv4 one.
        SocketAddr::V6(l) if l.ip().to_ipv4_mapped().is_some() => original_dst_v4(fd),
        SocketAddr::V6(_) => original_dst_v6(fd),
    }
}

fn original_dst_v4(fd: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: `sockaddr_in` is plain old data (all-zero is valid), and the kernel writes
    // at most `len` bytes into it.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket owned by the caller's stream; `sa`/`len` are valid
    // for writes of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            std::ptr::addr_of_mut!(sa).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
}

fn original_dst_v6(fd: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: as in `original_dst_v4`, for `sockaddr_in6`.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: as in `original_dst_v4`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IPV6,
            SO_ORIGINAL_DST,
            std::ptr::addr_of_mut!(sa).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
    Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, 0)))
}

/// What the first bytes say about the destination's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peeked<'a> {
    /// Not enough bytes yet.
    NeedMore,
    /// A name (SNI, or an HTTP `Host` spelled as a name or IPv4 address).
    Name(&'a str),
    /// An HTTP `Host` that is an IPv6 literal.
    V6(Ipv6Addr),
    /// Nothing to check the address against: decide on the address alone.
    NoName,
    /// Bytes that claim to carry a name but cannot be read: refuse.
    Malformed,
}

/// Classifies the first bytes (see the module doc for which outcome is which).
fn classify<'a>(buf: &'a [u8], head: &crate::wire::http_connect::Limits) -> Peeked<'a> {
    match peek_client_hello(buf, MAX_RECORD) {
        Ok(None) => Peeked::NeedMore,
        Ok(Some(h)) => h.server_name.map_or(Peeked::NoName, Peeked::Name),
        Err(SniError::NotTls) => match peek_http_host(buf, head) {
            Ok(None) => Peeked::NeedMore,
            Ok(Some(a)) => match a.host {
                Host::Name(n) => Peeked::Name(n),
                Host::V6(v6) => Peeked::V6(v6),
            },
            Err(HostError::Missing) => Peeked::NoName,
            // Not an HTTP request line at all: some other protocol.
            Err(HostError::Head(
                ParseError::BadMethod | ParseError::BadRequestLine | ParseError::BadVersion,
            )) => Peeked::NoName,
            Err(_) => Peeked::Malformed,
        },
        Err(_) => Peeked::Malformed,
    }
}

/// Header fields that keep a plain HTTP connection open for more requests, or switch it
/// to a protocol that multiplexes them (`h2c`): dropped from the first request's head.
const PERSISTENCE_FIELDS: [&str; 5] =
    ["connection", "keep-alive", "proxy-connection", "upgrade", "http2-settings"];

/// The first bytes of a plain HTTP connection with its first request made the last one: the
/// request line, every header field but [`PERSISTENCE_FIELDS`], `Connection: close`, then
/// whatever followed the head. A WebSocket upgrade keeps `Upgrade: websocket` and gets
/// `Connection: Upgrade, close` (switched, or answered and closed). `None` (replay
/// unchanged) for bytes that are not a complete HTTP request head (TLS, another protocol).
fn only_request(buf: &[u8], limits: &crate::wire::http_connect::Limits) -> Option<Vec<u8>> {
    let head = crate::wire::http_connect::parse_head(buf, limits).ok()??;
    let is_upgrade = |n: &str| n.eq_ignore_ascii_case("upgrade");
    let websocket =
        head.headers().any(|(n, v)| is_upgrade(n) && v.eq_ignore_ascii_case(b"websocket"));
    let line_end = buf.windows(2).position(|w| w == b"\r\n")? + 2;
    let mut out = Vec::with_capacity(buf.len() + 27);
    out.extend_from_slice(&buf[..line_end]);
    let skip = |name: &str| {
        PERSISTENCE_FIELDS.iter().any(|f| name.eq_ignore_ascii_case(f))
            && !(websocket && is_upgrade(name))
    };
    crate::wire::http_connect::write_fields_closing(&head, skip, websocket, &mut out);
    out.extend_from_slice(&buf[head.head_len..]);
    Some(out)
}

/// One `transparent` connection, start to end.
pub async fn connection(p: &ForwardProxy, mut stream: TcpStream, peer: SocketAddr) {
    let counters = &p.tag.counters;
    let Some(slot) = p.handshake_slot() else {
        reset(stream);
        return;
    };
    let client = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let local = stream.local_addr().ok();
    let refuse = |stream: TcpStream, dst: SocketAddr, fqdn: Option<&str>, reason| {
        p.refuse(tcp_flow(client, dst), None, fqdn, reason);
        reset(stream);
    };
    let orig = match original_dst(&stream) {
        Ok(o) => SocketAddr::new(o.ip().to_canonical(), o.port()),
        Err(_) => {
            // No NAT entry: the client reached the listener directly.
            let dst = local.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
            return refuse(stream, dst, None, "no-original-dst");
        }
    };
    if local.is_some_and(|l| SocketAddr::new(l.ip().to_canonical(), l.port()) == orig) {
        return refuse(stream, orig, None, "own-listener");
    }

    // The first bytes, read (and later replayed upstream) until they name the
    // destination or show they cannot.
    let head = &p.limits.head;
    let cap = (TLS_RECORD_HEADER + MAX_RECORD).max(head.max_head);
    let mut buf = Vec::with_capacity(cap.min(4096));
    let deadline = tokio::time::Instant::now() + p.limits.timeout;
    let peeked = loop {
        let peeked = classify(&buf, head);
        if peeked != Peeked::NeedMore {
            break peeked;
        }
        if buf.len() >= cap {
            break Peeked::Malformed;
        }
        let room = cap - buf.len();
        let mut limited = (&mut stream).take(room as u64);
        let read = tokio::time::timeout_at(deadline, limited.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return, // the client left
            Ok(Ok(_)) => {}
            Err(_) if buf.is_empty() => break Peeked::NoName,
            Err(_) => {
                ListenerCounters::inc(&counters.handshake_timeout);
                return refuse(stream, orig, None, "handshake-timeout");
            }
        }
    };
    let name = match peeked {
        Peeked::Name(n) => Some(n),
        Peeked::NoName => None,
        Peeked::V6(v6) if IpAddr::V6(v6).to_canonical() == orig.ip() => None,
        Peeked::V6(_) => {
            let r = Refusal::NameMismatch { fqdn: None, addr: orig };
            return refuse(stream, orig, None, r.reason());
        }
        Peeked::Malformed | Peeked::NeedMore => {
            ListenerCounters::inc(&counters.handshake_malformed);
            return refuse(stream, orig, None, "malformed-first-bytes");
        }
    };

    // The decision, once: the name is resolved and must cover the original destination;
    // only then does the gate load the policy snapshot, so none is held across the
    // resolution.
    let chosen = match p.checker.transparent_candidates(orig, name).await {
        Ok(cands) => p.admit(client, None, &cands, orig.port(), Proto::Tcp, None),
        Err(r @ Refusal::BadName(_)) => {
            // The name in the first bytes is not a host name: refuse, with the raw name
            // out of the log (it is the client's, unchecked).
            ListenerCounters::inc(&counters.handshake_malformed);
            return refuse(stream, orig, None, r.reason());
        }
        Err(r) => Err(p.refused(client, None, orig, Proto::Tcp, r)),
    };
    let Ok(Chosen::Admitted(admitted)) = chosen else {
        reset(stream);
        return;
    };
    drop(slot);
    // A failed dial is counted (`upstream_failed`) and its entry removed by `dial`.
    let Ok(mut upstream) = p.dial(&admitted).await else {
        reset(stream);
        return;
    };
    let first = only_request(&buf, head).unwrap_or(buf);
    let ready = upstream.write_all(&first).await;
    drop(first);
    p.relay(stream, upstream, &admitted, ready).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::http_connect::Limits;
    use crate::wire::sni::build_client_hello;

    #[test]
    fn a_plain_http_request_is_made_the_connections_last() {
        let l = Limits::default();
        let keep = b"GET /a HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive\r\n\
                     Keep-Alive: timeout=5\r\nAccept: */*\r\n\r\nGET /b HTTP/1.1\r\n\
                     Host: b.test\r\n\r\n";
        let out = only_request(keep, &l).expect("an HTTP head");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\nConnection: close\r\n\r\n\
             GET /b HTTP/1.1\r\nHost: b.test\r\n\r\n",
            "persistence fields dropped, close added, the rest (a pipelined request) kept"
        );
        // h2c would multiplex requests for any host over the one connection.
        let h2c = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                    Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
        let out = only_request(h2c, &l).expect("an HTTP head");
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
        // A body that came with the head is passed on after it.
        let post = b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nhi";
        let out = only_request(post, &l).expect("an HTTP head");
        assert!(out.ends_with(b"Content-Length: 2\r\nConnection: close\r\n\r\nhi"));
        // A WebSocket upgrade may switch, but a server that declines it must close too.
        let ws = b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, Upgrade\r\n\
                   Upgrade: WebSocket\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let out = only_request(ws, &l).expect("an HTTP head");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: WebSocket\r\n\
             Sec-WebSocket-Version: 13\r\nConnection: Upgrade, close\r\n\r\n"
        );
        // Unchanged: TLS, other protocols, an incomplete head.
        assert_eq!(only_request(&build_client_hello(Some("a.test"), 0), &l), None);
        assert_eq!(only_request(b"SSH-2.0-OpenSSH_9.2\r\n", &l), None);
        assert_eq!(only_request(b"GET / HTTP/1.1\r\nHost: a.test\r\n", &l), None);
    }

    #[test]
    fn first_bytes_classified() {
        let l = Limits::default();
        let hello = build_client_hello(Some("api.example.com"), 0);
        assert_eq!(classify(&hello, &l), Peeked::Name("api.example.com"));
        assert_eq!(classify(&hello[..hello.len() - 1], &l), Peeked::NeedMore);
        assert_eq!(classify(&build_client_hello(None, 0), &l), Peeked::NoName);
        assert_eq!(classify(b"", &l), Peeked::NeedMore);
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a.test\r\n", &l), Peeked::NeedMore);
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a.test:80\r\n\r\n", &l),
            Peeked::Name("a.test")
        );
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", &l),
            Peeked::V6(Ipv6Addr::LOCALHOST)
        );
        assert_eq!(classify(b"GET / HTTP/1.0\r\n\r\n", &l), Peeked::NoName);
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", &l),
            Peeked::Malformed
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n", &l), Peeked::NoName);
        // A TLS record header announcing more than one record can hold.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0xff, 0xff], &l), Peeked::Malformed);
    }
}
