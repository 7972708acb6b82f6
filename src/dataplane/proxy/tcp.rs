//! TCP listeners: the accept loop and one task per connection.
//!
//! The accept loop never dies on a transient error (EMFILE and friends: pause and retry)
//! and never accepts more than `max_connections` at once (a semaphore in front of
//! `accept`: at the limit, accepting pauses and `limit_reached` counts it). On shutdown it
//! stops accepting and drops the listening socket; open connections keep their drain
//! guard until they finish.
//!
//! Per connection: learn the client (the peer, or the PROXY header's source from a trusted
//! proxy), choose an upstream, [`admit`]. Denied → reset at once (SO_LINGER 0), the upstream
//! is never contacted. Allowed → connect within `connect_timeout` (a failed upstream is
//! cooled down and the next one is tried, through the gate again), splice, and remove the
//! conntrack entry when the connection ends.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::listener::ListenerConfig;
use super::proxy_header::ProxyHeaderConfig;
use super::splice::{Accounting, SpliceEnd, splice};
use super::upstream::Upstreams;
use crate::conntrack::FlowState;
use crate::dataplane::{Admission, ListenerTag, Runtime, admit, tcp_flow};
use crate::shutdown::{DrainGuard, Signal};
use crate::telemetry::metrics::ListenerCounters;

/// What a TCP listener does with an accepted connection.
#[derive(Debug)]
pub enum Handler {
    /// Gate and forward to the upstreams.
    Proxy(Arc<TcpProxy>),
    /// The built-in echo upstream (demo and tests): no policy, writes back what it reads.
    Echo { idle: Duration },
    /// `http-connect`: a forward proxy for CONNECT and absolute-form requests.
    HttpConnect(Arc<super::egress::EgressProxy>),
    /// `socks5`: a SOCKS5 CONNECT proxy.
    Socks5(Arc<super::egress::EgressProxy>),
    /// `transparent`: NAT-redirected connections to their original destination.
    Transparent(Arc<super::egress::EgressProxy>),
}

/// A gateway TCP listener's state, shared by its connection tasks.
#[derive(Debug)]
pub struct TcpProxy {
    pub rt: Arc<Runtime>,
    pub tag: ListenerTag,
    pub cfg: ListenerConfig,
    pub upstreams: Upstreams,
    /// `cfg`'s PROXY protocol settings, resolved once.
    pub header: ProxyHeaderConfig,
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
        // largest egress handshake, and that state is moved on every spawn.
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
                    echo(stream, idle).await;
                    drop(slot);
                });
            }
            Handler::HttpConnect(p) => {
                let p = p.clone();
                tokio::spawn(async move {
                    p.http_connection(stream, peer).await;
                    drop(slot);
                });
            }
            Handler::Socks5(p) => {
                let p = p.clone();
                tokio::spawn(async move {
                    p.socks5_connection(stream, peer).await;
                    drop(slot);
                });
            }
            Handler::Transparent(p) => {
                let p = p.clone();
                tokio::spawn(async move {
                    p.transparent_connection(stream, peer).await;
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

/// Closes with a reset (SO_LINGER 0): a denied client learns at once, nothing lingers in
/// TIME_WAIT, and no byte of ours reaches it.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

impl TcpProxy {
    async fn connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let counters = &self.tag.counters;
        // The client: the peer, or the source of a trusted proxy's PROXY header. The
        // reader consumes exactly the header, so the stream is untouched payload after it.
        let client = match self.header.read(&mut stream, peer).await {
            Ok(p) => p.client.0,
            Err(e) => {
                ListenerCounters::inc(e.counter(counters));
                reset(stream);
                return;
            }
        };
        // One try per upstream at most: each goes through the gate, since another
        // upstream is another destination.
        for _ in 0..self.upstreams.len() {
            let Some((i, up)) = self.upstreams.pick(Instant::now()) else { break };
            let key = tcp_flow(client, up);
            let admitted =
                match admit(&self.rt, &self.tag, key, None, FlowState::Open, Instant::now()) {
                    Admission::Allow(a) => a,
                    Admission::Deny(_) | Admission::Untracked(_) => {
                        reset(stream);
                        return;
                    }
                };
            let connect =
                tokio::time::timeout(self.cfg.connect_timeout, super::upstream::connect(up));
            let mut upstream = tokio::select! {
                r = connect => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(_)) | Err(_) => {
                        self.upstreams.mark_failed(i, Instant::now());
                        ListenerCounters::inc(&counters.upstream_failed);
                        self.rt.conntrack.remove(&key);
                        continue;
                    }
                },
                () = admitted.cut.cut() => {
                    self.rt.conntrack.remove(&key);
                    reset(stream);
                    return;
                }
            };
            self.upstreams.mark_ok(i);
            let acct =
                Accounting { conntrack: &self.rt.conntrack, entry: &admitted.entry, counters };
            let end =
                splice(&mut stream, &mut upstream, self.cfg.idle_timeout, &admitted.cut, &acct)
                    .await;
            self.rt.conntrack.remove(&key);
            match end {
                SpliceEnd::Closed => {}
                // Cut by policy, idle, or one side failed: neither side gets a clean FIN.
                SpliceEnd::Cut | SpliceEnd::Idle | SpliceEnd::Error(_) => {
                    reset(upstream);
                    reset(stream);
                }
            }
            return;
        }
        // No upstream could be reached.
        reset(stream);
    }
}

/// The echo upstream: read, write back, until EOF (then FIN) or idle.
async fn echo(mut stream: TcpStream, idle: Duration) {
    let mut buf = Vec::with_capacity(32 * 1024);
    loop {
        buf.clear();
        let n = match tokio::time::timeout(idle, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) => {
                let _ = stream.shutdown().await;
                return;
            }
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
