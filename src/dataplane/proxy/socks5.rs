//! The `socks5` listener: RFC 1928 CONNECT for IPv4, IPv6 and domain-name addresses.
//!
//! Per connection: the client (peer, or a trusted PROXY header's source); the greeting,
//! method selection and request read under one whole-handshake timeout
//! (`egress::handshake::socks5`, which answers malformed messages in SOCKS's codes); the
//! destination decided and dialled ([`EgressProxy::open`]); success reply with the
//! address flowgate dialled from; then any bytes the client sent early, and the splice.
//!
//! Replies: `0x02` not allowed (policy, SSRF guard, own listener), `0x04` host
//! unreachable (name invalid or unresolved, upstream unreachable or timed out), `0x05`
//! connection refused (upstream refused), `0x07` for commands other than CONNECT (UDP
//! ASSOCIATE is not served yet), `0x08` unknown address type, `0x01` for anything else
//! (port 0, handshake limit, full conntrack). Only "no authentication" is offered:
//! RFC 1929 credentials are not mapped to workloads yet, so a client that insists on them
//! gets "no acceptable method".

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::egress::{EgressProxy, Failure, Tunnel};
use super::tcp::reset;
use crate::egress::handshake::socks5::{AuthPolicy, read_request, reply};
use crate::telemetry::metrics::ListenerCounters;
use crate::wire::socks5::{Command, ReplyCode};

impl EgressProxy {
    /// One `socks5` connection, start to end.
    pub async fn socks5_connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let counters = &self.tag.counters;
        let Some(slot) = self.handshake_slot() else {
            // Not even the greeting is read: a reply would be out of turn. Close.
            return;
        };
        let client = match self.header.read(&mut stream, peer).await {
            Ok(p) => p.client.0,
            Err(e) => {
                ListenerCounters::inc(e.counter(counters));
                reset(stream);
                return;
            }
        };
        let auth: AuthPolicy<'_, ()> = AuthPolicy { allow_no_auth: true, verify: None };
        let req = match read_request(&mut stream, &self.limits, &auth).await {
            Ok(r) => r,
            Err(e) => {
                self.count_handshake_error(&e);
                let _ = stream.shutdown().await;
                return;
            }
        };
        if req.command != Command::Connect {
            ListenerCounters::inc(&counters.handshake_malformed);
            let _ = reply(&mut stream, ReplyCode::CommandNotSupported, None).await;
            return;
        }
        if req.port == 0 {
            ListenerCounters::inc(&counters.handshake_malformed);
            let _ = reply(&mut stream, ReplyCode::GeneralFailure, None).await;
            return;
        }
        let Tunnel { key, admitted, mut upstream } =
            match self.open(client, req.target, req.port).await {
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
        self.relay(stream, upstream, &key, &admitted, ready).await;
    }
}
