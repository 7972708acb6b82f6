//! The L4 UDP listener (`udp`): one session per client address.
//!
//! The listener task owns the session map (no lock: nothing else touches it). The first
//! datagram from a new client goes through [`admit`]: denied → dropped, counted and logged
//! (the flow log folds the repeats); allowed → a session with its own connected upstream
//! socket and a task that carries replies back, refreshes the conntrack entry and ends the
//! session after `udp_idle_timeout` of silence, on a cut, or on shutdown. Later datagrams
//! from that client go straight to its upstream socket. At `max_connections` sessions, new
//! clients' datagrams are dropped and `limit_reached` counts them.
//!
//! Behind a PROXY-speaking balancer (`proxy_protocol = "v2"`), every datagram carries a v2
//! header naming the client; sessions are keyed by (balancer, client) and replies go back
//! to the balancer as plain datagrams (the protocol defines no header for that direction).
//!
//! UDP has no connection to drain: on shutdown, sessions end at once.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::listener::{ListenerConfig, log_malformed};
use super::proxy_header::ProxyHeaderConfig;
use super::splice::idle_timer;
use super::upstream::Upstreams;
use crate::conntrack::{EntryRef, FlowState};
use crate::dataplane::{Admission, Admitted, FlowRequest, ListenerTag, Runtime, admit};
use crate::flow::{FlowKey, Proto};
use crate::shutdown::{DrainGuard, Signal};
use crate::telemetry::metrics::ListenerCounters;

/// Largest datagram we accept (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;

/// A gateway UDP listener's state.
#[derive(Debug)]
pub struct UdpProxy {
    pub rt: Arc<Runtime>,
    pub tag: ListenerTag,
    pub cfg: ListenerConfig,
    pub upstreams: Upstreams,
    /// `cfg`'s PROXY protocol settings, resolved once.
    pub header: ProxyHeaderConfig,
}

struct Session {
    id: u64,
    upstream: Arc<UdpSocket>,
    entry: EntryRef,
}

impl UdpProxy {
    /// Receives until shutdown.
    pub async fn serve(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        mut signal: Signal,
        _guard: DrainGuard,
    ) {
        // Keyed by (peer, client): behind a PROXY-speaking balancer one peer carries many clients.
        let mut sessions: HashMap<(SocketAddr, SocketAddr), Session> = HashMap::new();
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<((SocketAddr, SocketAddr), u64)>();
        let mut next_id = 0u64;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let counters = self.tag.counters.clone();
        // Where refused datagrams came in, for their `malformed` events.
        let local = socket.local_addr().unwrap_or_else(|_| self.cfg.bind);
        loop {
            let (n, peer) = tokio::select! {
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    // ICMP errors surface here on some kernels; they concern one peer.
                    Err(_) => continue,
                },
                Some((key, id)) = ended_rx.recv() => {
                    if sessions.get(&key).is_some_and(|s| s.id == id) {
                        sessions.remove(&key);
                    }
                    continue;
                }
                () = signal.recv() => break,
            };
            let Some((client, payload)) = self.client_of(peer, local, &buf[..n]) else {
                ListenerCounters::inc(&counters.datagrams_dropped);
                continue;
            };
            if let Some(s) = sessions.get(&(peer, client)) {
                forward_up(&self.rt, s, payload, &counters);
                continue;
            }
            if sessions.len() >= self.cfg.max_connections {
                ListenerCounters::inc(&counters.limit_reached);
                ListenerCounters::inc(&counters.datagrams_dropped);
                continue;
            }
            ListenerCounters::inc(&counters.accepted);
            let Some(session) = self.open(client, peer, &socket, &signal, &ended_tx, next_id).await
            else {
                continue;
            };
            next_id += 1;
            forward_up(&self.rt, &session, payload, &counters);
            sessions.insert((peer, client), session);
        }
        // Dropping the map and the channel ends every session task (they watch `signal`).
    }

    /// The client a datagram is from and its payload: the peer itself, or (behind a
    /// trusted proxy) what the PROXY v2 header says. `None` drops the datagram: counted,
    /// and a refused header logged as `malformed` (folded per peer like a denial).
    fn client_of<'a>(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        datagram: &'a [u8],
    ) -> Option<(SocketAddr, &'a [u8])> {
        match self.header.datagram(datagram, peer) {
            Ok((p, payload)) => Some((p.client.0, payload)),
            Err(e) => {
                ListenerCounters::inc(e.counter(&self.tag.counters));
                if let Some(why) = e.malformed() {
                    log_malformed(&self.rt, &self.tag, Proto::Udp, peer, local, why);
                }
                None
            }
        }
    }

    /// Admits a new client and starts its session; `None` if denied or unreachable.
    async fn open(
        self: &Arc<Self>,
        client: SocketAddr,
        peer: SocketAddr,
        listener: &Arc<UdpSocket>,
        signal: &Signal,
        ended: &mpsc::UnboundedSender<((SocketAddr, SocketAddr), u64)>,
        id: u64,
    ) -> Option<Session> {
        let (i, up) = self.upstreams.pick(Instant::now())?;
        let key = FlowKey::new(Proto::Udp, client, up);
        let req = FlowRequest::to(key, FlowState::Unreplied);
        let Admitted { entry, cut, .. } = match admit(&self.rt, &self.tag, &req, Instant::now()) {
            Admission::Allow(a) => a,
            Admission::Deny(_) | Admission::Untracked(_) | Admission::Tracked(_) => return None,
        };
        let local: SocketAddr = match up.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = match UdpSocket::bind(local).await {
            Ok(s) if s.connect(up).await.is_ok() => Arc::new(s),
            _ => {
                self.upstreams.mark_failed(i, Instant::now());
                ListenerCounters::inc(&self.tag.counters.upstream_failed);
                self.rt.conntrack.remove(&key);
                return None;
            }
        };
        let counters = self.tag.counters.clone();
        counters.active.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let task_sock = sock.clone();
        let task_entry = entry.clone();
        let listener = listener.clone();
        let mut signal = signal.clone();
        let ended = ended.clone();
        tokio::spawn(async move {
            let entry = task_entry;
            let ct = &me.rt.conntrack;
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                tokio::select! {
                    r = task_sock.recv(&mut buf) => match r {
                        Ok(n) => {
                            if entry.state() == FlowState::Unreplied {
                                entry.set_state(FlowState::Assured);
                            }
                            entry.bytes_reply().fetch_add(n as u64, Ordering::Relaxed);
                            entry.packets_reply().fetch_add(1, Ordering::Relaxed);
                            counters.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                            ct.touch(&entry, Instant::now());
                            if send_now_to(&listener, &buf[..n], peer).is_err() {
                                ListenerCounters::inc(&counters.datagrams_dropped);
                            }
                        }
                        Err(_) => {
                            // ECONNREFUSED: the upstream port is closed.
                            me.upstreams.mark_failed(i, Instant::now());
                            break;
                        }
                    },
                    () = idle_timer(me.cfg.udp_idle_timeout, ct, &entry) => break,
                    () = cut.cut() => break,
                    () = signal.recv() => break,
                }
            }
            ct.remove(&key);
            counters.active.fetch_sub(1, Ordering::Relaxed);
            let _ = ended.send(((peer, client), id));
        });
        Some(Session { id, upstream: sock, entry })
    }
}

/// Client → upstream for an open session. Never waits: a full socket buffer drops the
/// datagram (UDP semantics) and counts it.
fn forward_up(rt: &Runtime, s: &Session, payload: &[u8], counters: &ListenerCounters) {
    match send_now(&s.upstream, payload) {
        Ok(n) => {
            s.entry.bytes_orig().fetch_add(n as u64, Ordering::Relaxed);
            s.entry.packets_orig().fetch_add(1, Ordering::Relaxed);
            counters.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
            rt.conntrack.touch(&s.entry, Instant::now());
        }
        Err(_) => ListenerCounters::inc(&counters.datagrams_dropped),
    }
}

/// Binds a UDP listener's socket.
pub fn bind(cfg: &ListenerConfig) -> std::io::Result<UdpSocket> {
    let sock = super::listener::bind_socket(cfg.bind, socket2::Type::DGRAM, cfg.reuse_port, None)?;
    UdpSocket::from_std(sock.into())
}

/// One non-blocking `send` on a connected socket, straight to the kernel. (Tokio's
/// `try_send` answers `WouldBlock` until its reactor has seen the socket writable once,
/// which drops the first datagram of every fresh session.)
fn send_now(sock: &UdpSocket, buf: &[u8]) -> std::io::Result<usize> {
    socket2::SockRef::from(sock).send(buf)
}

/// One non-blocking `sendto`, straight to the kernel (see [`send_now`]).
fn send_now_to(sock: &UdpSocket, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    socket2::SockRef::from(sock).send_to(buf, &to.into())
}
