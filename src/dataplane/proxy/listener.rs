//! `[[listener]]`: what one data port is (its config types), binding its socket, and the
//! accept loop every TCP listener kind runs ([`serve`]), which hands each connection to
//! its kind's task: L4 ([`super::tcp`]), the forward proxies ([`super::connect`],
//! [`super::socks5`], [`super::transparent`]) or the echo upstream.
//!
//! The accept loop never dies on a transient error (EMFILE and friends: pause and retry)
//! and never accepts more than `max_connections` at once (a semaphore in front of
//! `accept`: at the limit, accepting pauses and `limit_reached` counts it). On shutdown it
//! stops accepting and drops the listening socket; open connections keep their drain
//! guard until they finish.
//!
//! Every knob has a default here and a comment in `config/flowgate.toml`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::forward::ForwardProxy;
use super::tcp::TcpProxy;
use crate::shutdown::{DrainGuard, Signal};
use crate::telemetry::metrics::ListenerCounters;

use crate::config::human_duration;

/// The kind of listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerKind {
    /// TCP: each accepted connection is a flow to one of `upstreams`.
    Tcp,
    /// UDP: each client address is a session (a flow) to one of `upstreams`.
    Udp,
    /// A built-in TCP echo server (writes back what it reads). A demo and test upstream,
    /// so the bundled config shows real traffic on a machine with nothing else running.
    /// It is a destination, not a gateway: no policy is applied on it.
    Echo,
    /// HTTP forward proxy: `CONNECT host:port` tunnels and absolute-form `http://`
    /// requests; the destination is whatever the client asks for, decided by the egress
    /// pipeline (`egress::Checker`) and the gate. Takes no `upstreams`.
    HttpConnect,
    /// SOCKS5 (RFC 1928) CONNECT and UDP ASSOCIATE with IPv4, IPv6 and domain-name
    /// addresses, no authentication or RFC 1929 (`credentials`); decided like
    /// `http-connect`. Takes no `upstreams`.
    Socks5,
    /// Connections redirected here by nftables/iptables: the destination is the original
    /// one (`SO_ORIGINAL_DST`), checked against the TLS SNI or HTTP `Host` the client
    /// sends, and decided like `http-connect`. Takes no `upstreams`, no PROXY header.
    Transparent,
}

impl ListenerKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Udp => "udp",
            ListenerKind::Echo => "echo",
            ListenerKind::HttpConnect => "http-connect",
            ListenerKind::Socks5 => "socks5",
            ListenerKind::Transparent => "transparent",
        }
    }

    /// An egress kind: the client's request (or its redirected connection) names the
    /// destination, decided by the egress pipeline.
    pub const fn is_egress(self) -> bool {
        matches!(self, ListenerKind::HttpConnect | ListenerKind::Socks5 | ListenerKind::Transparent)
    }
}

pub use super::proxy_header::ProxyProtocolMode;
use super::proxy_header::{ProxyHeaderConfig, default_max_header_len, deserialize_nets};

/// One `[[listener]]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name; appears in the flow log and metrics.
    pub name: String,
    pub kind: ListenerKind,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Where flows go, round-robin. An upstream whose connect fails is skipped for
    /// `upstream_cooldown`.
    #[serde(default)]
    pub upstreams: Vec<SocketAddr>,
    /// Time allowed for connecting to an upstream. Default 5s.
    #[serde(default = "default_connect_timeout", with = "human_duration")]
    pub connect_timeout: Duration,
    /// A connection (TCP) or session (UDP) with no traffic either way for this long is
    /// closed. Default 5m for TCP; UDP sessions use `udp_idle_timeout`.
    #[serde(default = "default_idle_timeout", with = "human_duration")]
    pub idle_timeout: Duration,
    /// UDP sessions idle for this long are closed. Default 60s.
    #[serde(default = "default_udp_idle_timeout", with = "human_duration")]
    pub udp_idle_timeout: Duration,
    /// How long a failed upstream is skipped. Default 10s.
    #[serde(default = "default_cooldown", with = "human_duration")]
    pub upstream_cooldown: Duration,
    /// Open connections (TCP) or sessions (UDP) at once; at the limit, accepting pauses
    /// (TCP) or new clients' datagrams are dropped (UDP), and `limit_reached` counts it.
    /// Default 10,000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// SO_REUSEPORT, so several processes (or replicas) can share the port. Default true.
    #[serde(default = "default_true")]
    pub reuse_port: bool,
    /// Listen backlog. Default 1024.
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// PROXY protocol: `off` (default), `v1`, `v2` or `any`.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocolMode,
    /// Peers whose PROXY header is believed (CIDRs or addresses). A header from anyone
    /// else is refused and counted. Required when `proxy_protocol` is not `off`.
    #[serde(default, deserialize_with = "deserialize_nets")]
    pub trusted_proxies: Vec<IpNet>,
    /// The whole PROXY header must arrive within this time. Default 5s.
    #[serde(default = "default_pp_timeout", with = "human_duration")]
    pub proxy_protocol_timeout: Duration,
    /// Longest PROXY header accepted (v2 with TLVs), in bytes. Default 1024.
    #[serde(default = "default_max_header_len")]
    pub proxy_protocol_max_len: usize,
    /// Egress kinds: the whole handshake (first byte to parsed request) must complete in
    /// this time, or the client gets `408` (HTTP) / is closed (SOCKS5), counted in
    /// `handshake_timeout`. Default 10s.
    #[serde(default = "default_handshake_timeout", with = "human_duration")]
    pub handshake_timeout: Duration,
    /// `http-connect`: largest request head (request line and headers), bytes; beyond it
    /// `400`, counted in `handshake_malformed`. Default 8192.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// `http-connect`: longest request line, bytes. Default 4096.
    #[serde(default = "default_max_request_line")]
    pub max_request_line: usize,
    /// `http-connect`: most header fields. Default 64.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Egress kinds: proxy credentials (`[[credential]]`) mapped to workloads: `off`
    /// (default; the source address is the identity), `optional` (used when sent, and
    /// then they must be right), `required` (`407` / SOCKS5 refused without them). Wrong
    /// credentials are refused and counted in `auth_failed`.
    #[serde(default)]
    pub credentials: crate::egress::CredentialMode,
    /// `http-connect`: look at the first bytes inside a CONNECT tunnel and refuse a TLS
    /// ClientHello whose SNI is not the CONNECT host (domain fronting): `off` (default),
    /// `on` (a mismatch or broken TLS is refused; no SNI or not TLS passes), `strict`
    /// (only a ClientHello naming the CONNECT host passes). Counted in `sni_refused`.
    #[serde(default)]
    pub verify_sni: super::connect::VerifySni,
    /// `verify_sni`: how long to wait for the client's first bytes (at most one TLS
    /// record, 16 KiB). On timeout `on` lets the tunnel through (a server-speaks-first
    /// protocol), `strict` refuses. Default 5s.
    #[serde(default = "default_sni_timeout", with = "human_duration")]
    pub sni_timeout: Duration,
    /// `socks5` UDP ASSOCIATE: destinations one association may send to (each decided
    /// once, verdict cached); datagrams to further ones are dropped and counted in
    /// `datagrams_dropped`. Default 256.
    #[serde(default = "default_udp_max_destinations")]
    pub udp_max_destinations: usize,
    /// `socks5` UDP ASSOCIATE: associations open at once on this listener. Each holds a
    /// relay socket, two upstream sockets and ~200 KB of datagram buffers for as long as
    /// its control connection lives, so `max_connections` alone would let idle control
    /// connections pin gigabytes. Beyond it a request gets a general failure reply,
    /// counted in `flowgate_limit_reached_total{limit="udp_max_associations"}`.
    /// Default 128.
    #[serde(default = "default_udp_max_associations")]
    pub udp_max_associations: usize,
    /// Egress kinds: handshakes in progress at once; beyond it a new client is refused at
    /// once (`503` / SOCKS5 general failure) and `handshakes_full` counts it. Default 1024.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_udp_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_true() -> bool {
    true
}
fn default_backlog() -> u32 {
    1024
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_header_bytes() -> usize {
    8 * 1024
}
fn default_max_request_line() -> usize {
    4 * 1024
}
fn default_max_headers() -> usize {
    64
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_sni_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_udp_max_destinations() -> usize {
    256
}
fn default_udp_max_associations() -> usize {
    128
}
fn default_pp_timeout() -> Duration {
    Duration::from_secs(5)
}

impl ListenerConfig {
    /// The PROXY protocol settings, in the form the header reader takes.
    pub fn proxy_header(&self) -> ProxyHeaderConfig {
        ProxyHeaderConfig {
            proxy_protocol: self.proxy_protocol,
            trusted_proxies: self.trusted_proxies.clone(),
            proxy_protocol_timeout: self.proxy_protocol_timeout,
            proxy_protocol_max_len: self.proxy_protocol_max_len,
        }
    }

    /// The egress handshake limits, in the form the handshake drivers take.
    pub fn handshake_limits(&self) -> crate::egress::handshake::HandshakeLimits {
        crate::egress::handshake::HandshakeLimits {
            head: crate::wire::http_connect::Limits {
                max_head: self.max_header_bytes,
                max_request_line: self.max_request_line,
                max_headers: self.max_headers,
            },
            timeout: self.handshake_timeout,
        }
    }
}

/// Makes the listening socket: SO_REUSEADDR, optionally SO_REUSEPORT, non-blocking; for
/// TCP also TCP_NODELAY, which Linux copies to every connection accepted from it (the relays
/// forward what they read at once), so no connection needs its own `setsockopt`.
pub(crate) fn bind_socket(
    addr: SocketAddr,
    ty: Type,
    reuse_port: bool,
    backlog: Option<u32>,
) -> io::Result<Socket> {
    let proto = if ty == Type::STREAM { Protocol::TCP } else { Protocol::UDP };
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    sock.set_nonblocking(true)?;
    if ty == Type::STREAM {
        sock.set_tcp_nodelay(true)?;
    }
    sock.bind(&addr.into())?;
    if let Some(backlog) = backlog {
        sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    }
    Ok(sock)
}

// The accept loop: every TCP listener kind's connections start here.

/// What a TCP listener does with an accepted connection.
#[derive(Debug)]
pub enum Handler {
    /// Gate and forward to the upstreams.
    Proxy(Arc<TcpProxy>),
    /// The built-in echo upstream (demo and tests): no policy, writes back what it reads.
    Echo { idle: Duration },
    /// `http-connect`: a forward proxy for CONNECT and absolute-form requests.
    HttpConnect(Arc<ForwardProxy>),
    /// `socks5`: a SOCKS5 CONNECT proxy.
    Socks5(Arc<ForwardProxy>),
    /// `transparent`: NAT-redirected connections to their original destination.
    Transparent(Arc<ForwardProxy>),
}

/// Accepts until shutdown. Holds `guard` while running; each connection holds a clone.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    counters: Arc<ListenerCounters>,
    max_connections: usize,
    mut signal: Signal,
    guard: DrainGuard,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    // One shutdown future for the listener's lifetime: it registers its waker once, not
    // on every accept.
    let mut stop = std::pin::pin!(signal.recv());
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                ListenerCounters::inc(&counters.limit_reached);
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break, // never closed; leave rather than spin
                    },
                    () = &mut stop => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut stop => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    ListenerCounters::inc(&counters.accept_errors);
                    pause_on_accept_error(&e).await;
                    continue;
                }
            },
        };
        ListenerCounters::inc(&counters.accepted);
        counters.active.fetch_add(1, Ordering::Relaxed);
        let slot = Slot { counters: counters.clone(), _permit: permit, _guard: guard.clone() };
        // One spawn per kind, so that a task is the size of its own kind's future: behind
        // a single `match` every plain TCP connection's task would be as large as the
        // largest forward-proxy handshake, and that state is moved on every spawn.
        match &handler {
            Handler::Proxy(p) => {
                let p = p.clone();
                tokio::spawn(async move {
                    p.connection(stream, peer).await;
                    drop(slot);
                });
            }
            Handler::Echo { idle } => {
                let idle = *idle;
                tokio::spawn(async move {
                    super::tcp::echo(stream, idle).await;
                    drop(slot);
                });
            }
            Handler::HttpConnect(p) => {
                let p = p.clone();
                tokio::spawn(async move {
                    super::connect::connection(&p, stream, peer).await;
                    drop(slot);
                });
            }
            Handler::Socks5(p) => {
                let p = p.clone();
                tokio::spawn(async move {
                    super::socks5::connection(&p, stream, peer).await;
                    drop(slot);
                });
            }
            Handler::Transparent(p) => {
                let p = p.clone();
                tokio::spawn(async move {
                    super::transparent::connection(&p, stream, peer).await;
                    drop(slot);
                });
            }
        }
    }
}

/// What a connection's task holds until it ends: its `max_connections` permit, the drain
/// guard, and its place in the `active` gauge. Released on drop, so also when the task
/// panics or is dropped at runtime shutdown.
struct Slot {
    counters: Arc<ListenerCounters>,
    _permit: OwnedSemaphorePermit,
    _guard: DrainGuard,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Out of file descriptors or memory: the condition lasts, so wait before the next
/// accept instead of spinning. Other errors (a connection aborted before accept) concern
/// one connection only.
async fn pause_on_accept_error(e: &io::Error) {
    let resource = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if resource {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relays rely on it: no connection sets TCP_NODELAY itself.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let sock = bind_socket(addr, Type::STREAM, false, Some(16)).unwrap();
        let listener = tokio::net::TcpListener::from_std(sock.into()).unwrap();
        let to = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(to).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "an accepted connection must have TCP_NODELAY");
    }
}
