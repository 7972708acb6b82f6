//! `[[listener]]`: binding one data port's socket (its config types live in
//! [`crate::config::listener`]), and the accept loop every TCP listener kind runs
//! ([`serve`]), which hands each connection to its kind's task: L4 ([`super::tcp`]), the
//! forward proxies ([`super::connect`], [`super::socks5`], [`super::transparent`]) or the
//! echo upstream.
//!
//! The accept loop never dies on a transient error (EMFILE and friends: pause and retry)
//! and never accepts more than `max_connections` at once (a semaphore in front of
//! `accept`: at the limit, accepting pauses and `limit_reached` counts it). On shutdown it
//! stops accepting and drops the listening socket; open connections keep their drain
//! guard until they finish.
//!
//! Also the one way a listener logs a handshake it refused as malformed
//! ([`log_malformed`]): every kind's broken PROXY headers, CONNECT heads and SOCKS5
//! messages become the same `malformed` flow-log event.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::forward::ForwardProxy;
use super::tcp::TcpProxy;
use crate::dataplane::{ListenerTag, Runtime};
use crate::flow::{FlowKey, Proto};
use crate::shutdown::{DrainGuard, Signal};
use crate::telemetry::flowlog::{Event, Flow, Malformed};
use crate::telemetry::metrics::ListenerCounters;

pub use crate::config::{ListenerConfig, ListenerKind, ProxyProtocolMode};

impl ListenerConfig {
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

/// Logs a handshake refused as malformed (the caller has counted it): a `malformed`
/// flow-log event from `src` (the peer, or the client a trusted PROXY header named) to
/// `local` (the listener's address the bytes came in on), folded with its repeats like a
/// denial. Never blocks (see [`crate::telemetry::flowlog::FlowLog::emit`]).
pub fn log_malformed(
    rt: &Runtime,
    tag: &ListenerTag,
    proto: Proto,
    src: SocketAddr,
    local: SocketAddr,
    why: Malformed,
) {
    let key = FlowKey::new(proto, src, local);
    let flow =
        Flow { listener: tag.name.clone(), key: &key, fqdn: None, snapshot: rt.policy.load_full() };
    rt.flowlog.emit(Event::malformed(flow, why));
}

/// The local address of an accepted connection, for [`log_malformed`]; unspecified if
/// the socket cannot say (it has failed already).
pub fn local_of(stream: &tokio::net::TcpStream) -> SocketAddr {
    stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0))
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
