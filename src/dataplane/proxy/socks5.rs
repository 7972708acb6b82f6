//! The `socks5` listener: RFC 1928 CONNECT for IPv4, IPv6 and domain-name addresses, and
//! UDP ASSOCIATE (§7).
//!
//! Per connection: the client (peer, or a trusted PROXY header's source); the greeting,
//! method selection, optional RFC 1929 username/password and request read under one
//! whole-handshake timeout (`egress::handshake::socks5`, which answers malformed
//! messages in SOCKS's codes); then
//! - CONNECT: the destination decided and dialled ([`ForwardProxy::open`]); success
//!   reply with the address flowgate dialled from; then any bytes the client sent early,
//!   and the splice;
//! - UDP ASSOCIATE (unless the listener says `udp_associate = false`: then `0x07`, like
//!   BIND): a relay socket bound for this association only, on the listener's address;
//!   it lives as long as the TCP control connection, and no longer than
//!   `udp_associate_idle_timeout` without a datagram either way (see [`udp_associate`]).
//!
//! Replies: `0x02` not allowed (policy, SSRF guard, own listener), `0x04` host
//! unreachable (name invalid or unresolved, upstream unreachable or timed out), `0x05`
//! connection refused (upstream refused), `0x07` for BIND (and UDP ASSOCIATE where it is
//! off), `0x08` unknown address type, `0x01` for anything else (port 0, handshake limit,
//! full conntrack). A malformed greeting or request, an unacceptable method offered
//! without credentials being required, an unsupported command or port 0 is also a
//! `malformed` flow-log event.
//!
//! Pipelining: a client may send its greeting, authentication and request (and the
//! first tunnel bytes) without waiting for the replies (RFC 1928 clients commonly send
//! greeting and request in one segment); each message is taken from what has arrived, and
//! bytes after the request are forwarded once the tunnel is up.
//!
//! Credentials (listener `credentials`): `off` offers only "no authentication";
//! `optional` offers username/password and no authentication; `required` only
//! username/password (a client without it gets "no acceptable method"). A username and
//! password that are wrong get the RFC 1929 failure status and the connection is closed,
//! counted in `auth_failed` and logged as a `deny`; right ones make the configured
//! workload the flow's source.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::forward::{Chosen, Failure, ForwardProxy, Tunnel, unknown};
use super::listener::local_of;
use crate::dataplane::Admitted;
use crate::egress::handshake::HandshakeError;
use crate::egress::handshake::socks5::{AuthPolicy, SocksRequest, VerifyFn, read_request, reply};
use crate::egress::{CredentialId, CredentialMode, Target};
use crate::flow::{FlowKey, Proto};
use crate::telemetry::flowlog::Malformed;
use crate::telemetry::metrics::ListenerCounters;
use crate::wire::socks5::{Addr, Command, ReplyCode, UdpHeader};

/// Largest UDP payload relayed, plus the largest SOCKS UDP header (3 + 1 + 1 + 255 + 2).
const MAX_DATAGRAM: usize = 65_535;
const MAX_UDP_HEADER: usize = 262;

/// One `socks5` connection, start to end.
pub async fn connection(p: &ForwardProxy, mut stream: TcpStream, peer: SocketAddr) {
    let Some(slot) = p.handshake_slot() else {
        // Not even the greeting is read: a reply would be out of turn. Close.
        return;
    };
    let Some(client) = p.header.client(&mut stream, peer, &p.rt, &p.tag).await else { return };
    let creds = p.checker.shared_credentials();
    let verify = move |u: &[u8], p: &[u8]| creds.verify(u, p);
    let verify: &VerifyFn<CredentialId> = &verify;
    let mode = p.cfg.credentials;
    let auth = AuthPolicy {
        allow_no_auth: mode != CredentialMode::Required,
        verify: (mode != CredentialMode::Off).then_some(verify),
    };
    let req = match read_request(&mut stream, &p.limits, &auth).await {
        Ok(r) => r,
        Err(e) => {
            match e {
                HandshakeError::AuthFailed => auth_refused(p, client, "auth-failed"),
                HandshakeError::NoAcceptableMethod if mode == CredentialMode::Required => {
                    auth_refused(p, client, "auth-required");
                }
                _ => p.handshake_failed(&e, client, local_of(&stream)),
            }
            let _ = stream.shutdown().await;
            return;
        }
    };
    if req.command == Command::UdpAssociate && p.cfg.udp_associate {
        drop(slot);
        udp_associate(p, stream, client, peer, req).await;
        return;
    }
    if req.command != Command::Connect {
        // BIND, or UDP ASSOCIATE on a listener that only does CONNECT.
        p.refused_handshake(Malformed::Socks5Command, client, local_of(&stream));
        let _ = reply(&mut stream, ReplyCode::CommandNotSupported, None).await;
        let _ = stream.shutdown().await;
        return;
    }
    if req.port == 0 {
        p.refused_handshake(Malformed::Socks5PortZero, client, local_of(&stream));
        let _ = reply(&mut stream, ReplyCode::GeneralFailure, None).await;
        return;
    }
    let Tunnel { admitted, mut upstream } =
        match p.open(client, req.identity, req.target, req.port).await {
            Ok(t) => t,
            Err(f) => {
                drop(slot);
                let code = match &f {
                    Failure::Refused(r) => r.socks_reply(),
                    Failure::Untracked => ReplyCode::GeneralFailure,
                    Failure::UpstreamTimeout => ReplyCode::HostUnreachable,
                    Failure::UpstreamError(e) => match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => ReplyCode::ConnectionRefused,
                        std::io::ErrorKind::NetworkUnreachable => ReplyCode::NetworkUnreachable,
                        _ => ReplyCode::HostUnreachable,
                    },
                    Failure::Cut => ReplyCode::NotAllowed,
                };
                let _ = reply(&mut stream, code, None).await;
                let _ = stream.shutdown().await;
                return;
            }
        };
    drop(slot);
    let bind = upstream.local_addr().ok();
    let mut ready = reply(&mut stream, ReplyCode::Succeeded, bind).await;
    if ready.is_ok() && !req.early.is_empty() {
        ready = upstream.write_all(&req.early).await;
    }
    p.relay(stream, upstream, &admitted, ready).await;
}

/// Wrong or missing credentials: counted in `auth_failed`, logged as a `deny` (no
/// destination is known yet).
fn auth_refused(p: &ForwardProxy, client: SocketAddr, reason: &'static str) {
    ListenerCounters::inc(&p.tag.counters.auth_failed);
    p.refuse(FlowKey::new(Proto::Tcp, client, unknown(0)), None, None, reason);
}

/// UDP ASSOCIATE (RFC 1928 §7) for one control connection.
///
/// A relay socket is bound on the listener's address for this association alone and
/// its address is the success reply. Datagrams are taken only from the control
/// connection's peer address (and the address and port the request named, when it
/// named them); the first one fixes the client's UDP address. Each datagram's
/// destination (IPv4, IPv6 or a name) is decided by the same pipeline as CONNECT —
/// resolution once, own listeners, SSRF guard, policy — once per destination: the
/// verdict is cached for the association (at most `udp_max_destinations`), so a
/// denied destination is logged once and its datagrams are dropped without another
/// lookup. An allowed destination is a conntrack flow (a reload that revokes it
/// makes the next datagram be decided again). Fragments (FRAG ≠ 0) and malformed
/// headers are dropped and counted in `datagrams_dropped`. Answers come back only
/// from allowed destinations, wrapped with their source address.
///
/// Ends when the control connection closes (or fails), or after
/// `udp_associate_idle_timeout` without a datagram relayed either way (counted in
/// `flowgate_udp_associations_idle_closed_total`; the control connection is then
/// closed): the relay socket and every flow of the association go with it.
pub async fn udp_associate(
    p: &ForwardProxy,
    mut stream: TcpStream,
    client: SocketAddr,
    peer: SocketAddr,
    req: SocksRequest<CredentialId>,
) {
    let counters = &p.tag.counters;
    // Held until the association ends (the end of this function).
    let Ok(_association) = p.udp_associations.clone().try_acquire_owned() else {
        ListenerCounters::inc(&counters.udp_associations_full);
        let _ = reply(&mut stream, ReplyCode::GeneralFailure, None).await;
        return;
    };
    let Ok(local) = stream.local_addr() else { return };
    let relay = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(s) => s,
        Err(_) => {
            let _ = reply(&mut stream, ReplyCode::GeneralFailure, None).await;
            return;
        }
    };
    let up4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.ok();
    let up6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).await.ok();
    if reply(&mut stream, ReplyCode::Succeeded, relay.local_addr().ok()).await.is_err() {
        return;
    }
    // Where the client said it will send from: an address (not a name), port if set.
    let want_ip = match req.target {
        Target::Addr(ip) if !ip.is_unspecified() => Some(ip.to_canonical()),
        _ => None,
    };
    let want_port = (req.port != 0).then_some(req.port);
    let mut assoc =
        Association { dests: HashMap::new(), by_addr: HashMap::new(), client_udp: None };
    let mut inbuf = vec![0u8; MAX_DATAGRAM + MAX_UDP_HEADER];
    let mut out4 = vec![0u8; MAX_DATAGRAM + MAX_UDP_HEADER];
    let mut out6 = vec![0u8; MAX_DATAGRAM + MAX_UDP_HEADER];
    let mut ctl = [0u8; 64];
    // The idle timer: one deadline, moved on only when it fires (a datagram just records
    // the time, no timer operation per datagram). Off for `0s`, or for a timeout too far
    // out to be a point in time.
    let idle_after = p.cfg.udp_associate_idle_timeout;
    let mut last = tokio::time::Instant::now();
    let mut idle_on = !idle_after.is_zero() && last.checked_add(idle_after).is_some();
    let idle = tokio::time::sleep(idle_after);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = stream.read(&mut ctl) => match r {
                // Anything the client sends on the control connection is ignored;
                // its end ends the association.
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            () = &mut idle, if idle_on => match last.checked_add(idle_after) {
                Some(due) if due <= tokio::time::Instant::now() => {
                    ListenerCounters::inc(&counters.udp_associations_idle);
                    break;
                }
                Some(due) => idle.as_mut().reset(due),
                None => idle_on = false,
            },
            r = relay.recv_from(&mut inbuf) => {
                let Ok((n, from)) = r else { continue };
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                let source_ok = from.ip() == peer.ip().to_canonical()
                    && want_ip.is_none_or(|ip| ip == from.ip())
                    && want_port.is_none_or(|p| p == from.port())
                    && assoc.client_udp.is_none_or(|c| c == from);
                if !source_ok {
                    ListenerCounters::inc(&counters.datagrams_dropped);
                    continue;
                }
                assoc.client_udp = Some(from);
                last = tokio::time::Instant::now();
                udp_up(p, &mut assoc, client, req.identity, &inbuf[..n], [&up4, &up6]).await;
            }
            r = recv_opt(&up4, &mut out4[MAX_UDP_HEADER..]) => {
                if udp_down(p, &assoc, &relay, &mut out4, r) {
                    last = tokio::time::Instant::now();
                }
            }
            r = recv_opt(&up6, &mut out6[MAX_UDP_HEADER..]) => {
                if udp_down(p, &assoc, &relay, &mut out6, r) {
                    last = tokio::time::Instant::now();
                }
            }
        }
    }
    for d in assoc.dests.values() {
        if let Dest::Allowed { key, .. } = d {
            p.rt.conntrack.remove(key);
        }
    }
}

/// One client datagram: parse, decide its destination (cached), send the payload.
async fn udp_up(
    p: &ForwardProxy,
    assoc: &mut Association,
    client: SocketAddr,
    who: Option<CredentialId>,
    dgram: &[u8],
    ups: [&Option<UdpSocket>; 2],
) {
    let counters = &p.tag.counters;
    let drop_it = || ListenerCounters::inc(&counters.datagrams_dropped);
    let Ok(h) = UdpHeader::parse(dgram) else { return drop_it() };
    if h.frag != 0 || h.port == 0 {
        return drop_it();
    }
    let Ok(target) = Target::from_socks(h.addr) else { return drop_it() };
    let dkey = (target, h.port);
    // A flow revoked by a reload (or expired) is decided again: its owner entry and
    // this spelling are forgotten.
    let owner = match assoc.dests.get(&dkey) {
        Some(Dest::Allowed { .. }) => Some(dkey),
        Some(Dest::Same(addr)) => assoc.by_addr.get(addr).copied(),
        _ => None,
    };
    let live = owner.and_then(|o| assoc.dests.get(&o)).map(|d| match d {
        Dest::Allowed { admitted, .. } => !admitted.cut.is_cut(),
        _ => false,
    });
    if live == Some(false)
        || (owner.is_none() && matches!(assoc.dests.get(&dkey), Some(Dest::Same(_))))
    {
        if let Some(Dest::Allowed { key, .. }) = owner.and_then(|o| assoc.dests.remove(&o)) {
            p.rt.conntrack.remove(&key);
            assoc.by_addr.remove(&key.dst);
        }
        assoc.dests.remove(&dkey);
    }
    if !assoc.dests.contains_key(&dkey) {
        if assoc.dests.len() >= p.cfg.udp_max_destinations {
            return drop_it();
        }
        // The flow's source is the client's UDP address (its port) on the client IP.
        let src = SocketAddr::new(client.ip(), assoc.client_udp.map_or(0, |c| c.port()));
        let by_addr = &assoc.by_addr;
        let tracked = |a: SocketAddr| by_addr.contains_key(&a);
        let decided = p.decide(src, who, target, h.port, Proto::Udp, Some(&tracked));
        let dest = match decided.await {
            Ok(Chosen::Admitted(admitted)) => Dest::Allowed { key: admitted.key, admitted },
            Ok(Chosen::Tracked(addr)) => Dest::Same(addr),
            // Refused: logged once by `decide`; every later datagram is dropped.
            Err(Failure::Refused(_)) => Dest::Denied,
            // Not tracked (full table): not cached, the next datagram tries again.
            Err(_) => return drop_it(),
        };
        if let Dest::Allowed { key, .. } = &dest {
            assoc.by_addr.insert(key.dst, dkey);
        }
        assoc.dests.insert(dkey, dest);
    }
    let mut dest = assoc.dests.get(&dkey);
    if let Some(Dest::Same(addr)) = dest {
        dest = assoc.by_addr.get(addr).and_then(|k| assoc.dests.get(k));
    }
    match dest {
        Some(Dest::Allowed { key, admitted }) => {
            let sock = if key.dst.is_ipv4() { ups[0] } else { ups[1] };
            let sent = sock
                .as_ref()
                .map(|s| socket2::SockRef::from(s).send_to(h.payload, &key.dst.into()));
            match sent {
                Some(Ok(n)) => {
                    admitted.entry.bytes_orig().fetch_add(n as u64, Ordering::Relaxed);
                    admitted.entry.packets_orig().fetch_add(1, Ordering::Relaxed);
                    counters.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                    p.rt.conntrack.touch(&admitted.entry, Instant::now());
                }
                _ => drop_it(),
            }
        }
        _ => drop_it(),
    }
}

/// One answer from upstream: only from an allowed destination of this association,
/// wrapped in the SOCKS UDP header (its source address) and sent to the client. Whether
/// it was relayed.
fn udp_down(
    p: &ForwardProxy,
    assoc: &Association,
    relay: &UdpSocket,
    outbuf: &mut [u8],
    r: std::io::Result<(usize, SocketAddr)>,
) -> bool {
    let counters = &p.tag.counters;
    let Ok((n, from)) = r else { return false };
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let (Some(client), Some(Dest::Allowed { admitted, .. })) =
        (assoc.client_udp, assoc.by_addr.get(&from).and_then(|k| assoc.dests.get(k)))
    else {
        ListenerCounters::inc(&counters.datagrams_dropped);
        return false;
    };
    let mut head = [0u8; MAX_UDP_HEADER];
    let Ok(hl) = UdpHeader::encode(Addr::from(from), from.port(), &mut head) else {
        return false;
    };
    let start = MAX_UDP_HEADER - hl;
    outbuf[start..MAX_UDP_HEADER].copy_from_slice(&head[..hl]);
    let dgram = &outbuf[start..MAX_UDP_HEADER + n];
    match socket2::SockRef::from(relay).send_to(dgram, &client.into()) {
        Ok(_) => {
            admitted.entry.bytes_reply().fetch_add(n as u64, Ordering::Relaxed);
            admitted.entry.packets_reply().fetch_add(1, Ordering::Relaxed);
            counters.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
            p.rt.conntrack.touch(&admitted.entry, Instant::now());
            true
        }
        Err(_) => {
            ListenerCounters::inc(&counters.datagrams_dropped);
            false
        }
    }
}

/// A destination's cached verdict for one association.
enum Dest {
    Allowed {
        key: FlowKey,
        admitted: Admitted,
    },
    /// Allowed, to the address of another destination's flow (another spelling of it).
    Same(SocketAddr),
    Denied,
}

/// What one UDP association knows: verdicts by destination as the client named it, the
/// allowed ones by address (to accept answers), and the client's UDP address.
struct Association {
    dests: HashMap<(Target, u16), Dest>,
    by_addr: HashMap<SocketAddr, (Target, u16)>,
    client_udp: Option<SocketAddr>,
}

/// `recv_from` on a socket that may not exist (that address family could not be bound):
/// then never ready.
async fn recv_opt(
    sock: &Option<UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}
