//! The `http-connect` listener: an HTTP/1.1 forward proxy.
//!
//! Per connection: the client (peer, or a trusted PROXY header's source); one request
//! head read under the listener's size limits and one whole-handshake timeout
//! (`egress::handshake::http`: `400` malformed, `408` too slow; a malformed head is also
//! a `malformed` flow-log event); the destination decided and dialled
//! ([`ForwardProxy::open`]); then
//! - `CONNECT host:port` → `200 Connection established`, the tunnel's first bytes if the
//!   client sent them with the head (an optimistic client's ClientHello: they belong to
//!   the tunnel, as in Squid and HAProxy) forwarded, and the bytes spliced both ways. A
//!   refused tunnel forwards none of them;
//! - absolute-form `GET http://host/path` → the head rewritten in origin form (hop-by-hop
//!   and proxy headers dropped, `Connection: close`) and sent upstream with any body
//!   bytes already read, then spliced: one request per upstream connection, so each
//!   request is decided on its own.
//!
//! Refusals answer `403` (policy, SSRF guard, own listener), `502` (name does not
//! resolve, upstream refused), `504` (resolution or upstream timed out), `503` (the
//! handshake limit or a full conntrack table), each with a short reason and never the
//! resolved addresses.
//!
//! Proxy credentials (listener `credentials`, table `[[credential]]`): a
//! `Proxy-Authorization: Basic` that names a configured user with the right password
//! makes that user's workload the flow's source; a wrong one, or none where they are
//! required, is answered `407` with `Proxy-Authenticate`, counted in `auth_failed` and
//! logged as a `deny` — never ignored. Without credentials the identity is the client
//! address.
//!
//! `verify_sni` (domain fronting): after the `200`, the client's first bytes — those that
//! came with the head, then as many more as needed, at most one TLS record, within
//! `sni_timeout` — are compared with the CONNECT host
//! ([`crate::egress::verify_sni`]) before any of them go upstream; a ClientHello for
//! another host resets the tunnel, counted in `sni_refused` and logged as a `deny`
//! with the CONNECT name.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::forward::{Failure, ForwardProxy, Tunnel, unknown};
use super::listener::local_of;
use super::tcp::reset;
use crate::dataplane::tcp_flow;
use crate::egress::handshake::http::{
    ProxyRequest, RequestForm, linger, read_request, reply_established, reply_refusal, reply_status,
};
use crate::egress::{CredentialId, CredentialMode, SniVerdict, Target, verify_sni};
use crate::telemetry::metrics::ListenerCounters;
use crate::wire::http_connect;
use crate::wire::sni::MAX_RECORD;

pub use crate::config::VerifySni;

/// The longest first TLS record (header + body) `verify_sni` waits for.
const SNI_PEEK_MAX: usize = MAX_RECORD + 5;

/// One `http-connect` connection, start to end.
pub async fn connection(p: &ForwardProxy, mut stream: TcpStream, peer: SocketAddr) {
    let counters = &p.tag.counters;
    let Some(slot) = p.handshake_slot() else {
        let _ = reply_status(&mut stream, 503, "too many handshakes in progress").await;
        return;
    };
    let Some(client) = p.header.client(&mut stream, peer, &p.rt, &p.tag).await else { return };
    let mut buf = Vec::new();
    let req = match read_request(&mut stream, &p.limits, &mut buf).await {
        Ok(r) => r,
        Err(e) => {
            p.handshake_failed(&e, client, local_of(&stream));
            return;
        }
    };
    let who = match authenticate(p, &req) {
        Ok(who) => who,
        Err(reason) => {
            drop(slot);
            ListenerCounters::inc(&counters.auth_failed);
            p.refuse(tcp_flow(client, unknown(req.port)), None, req.target.name(), reason);
            let text = if reason == "auth-required" {
                "proxy credentials required"
            } else {
                "refused: wrong proxy credentials"
            };
            let _ = reply_status(&mut stream, 407, text).await;
            close_refused(&mut stream, buf.len() > req.head_len).await;
            return;
        }
    };
    let target = req.target;
    let Tunnel { admitted, mut upstream } = match p.open(client, who, req.target, req.port).await {
        Ok(t) => t,
        Err(f) => {
            drop(slot);
            let _ = match &f {
                Failure::Refused(r) => reply_refusal(&mut stream, r).await,
                Failure::Untracked => {
                    reply_status(&mut stream, 503, "refused: conntrack-full").await
                }
                Failure::UpstreamTimeout => {
                    reply_status(&mut stream, 504, "upstream timed out").await
                }
                Failure::UpstreamError(_) => {
                    reply_status(&mut stream, 502, "upstream unreachable").await
                }
                Failure::Cut => reply_status(&mut stream, 403, "refused: revoked").await,
            };
            close_refused(&mut stream, buf.len() > req.head_len).await;
            return;
        }
    };
    drop(slot);
    let mut ready = match req.form {
        RequestForm::Connect => reply_established(&mut stream).await,
        RequestForm::Absolute => {
            forward_head(&buf, req.head_len, &p.limits.head, &mut upstream).await
        }
    };
    if ready.is_ok() && req.form == RequestForm::Connect {
        // What follows the head is the tunnel's: the client's first bytes, sent without
        // waiting for the 200. With `verify_sni` they start the ClientHello checked.
        buf.drain(..req.head_len);
        if p.cfg.verify_sni != VerifySni::Off
            && !sni_agrees(p, &mut stream, &target, &mut buf).await
        {
            ListenerCounters::inc(&counters.sni_refused);
            p.rt.conntrack.remove(&admitted.key);
            p.refuse(admitted.key, who, target.name(), "sni-mismatch");
            reset(upstream);
            reset(stream);
            return;
        }
        if !buf.is_empty() {
            ready = upstream.write_all(&buf).await;
            let n = buf.len() as u64;
            admitted.entry.bytes_orig().fetch_add(n, Ordering::Relaxed);
            counters.bytes_up.fetch_add(n, Ordering::Relaxed);
        }
    }
    // The head (and any ClientHello) has gone upstream: free it rather than keep it for
    // the tunnel's lifetime.
    drop(buf);
    p.relay(stream, upstream, &admitted, ready).await;
}

/// Who the request's proxy credentials name, under the listener's `credentials`
/// mode: `Ok(None)` for "the client address"; `Err(reason)` to refuse with `407`.
fn authenticate(
    p: &ForwardProxy,
    req: &ProxyRequest,
) -> Result<Option<CredentialId>, &'static str> {
    let mode = p.cfg.credentials;
    if mode == CredentialMode::Off {
        return Ok(None);
    }
    let Some(value) = &req.proxy_authorization else {
        return match mode {
            CredentialMode::Required => Err("auth-required"),
            _ => Ok(None),
        };
    };
    // RFC 1929's limits (255 + 255) bound what any client can use for both listeners.
    let mut out = [0u8; 512];
    http_connect::basic_credentials(value, &mut out)
        .and_then(|(user, pw)| p.checker.credentials().verify(user, pw))
        .map(Some)
        .ok_or("auth-failed")
}

/// Reads the client's first bytes into `buf`, after those it already holds (bounded by one TLS record and
/// `sni_timeout`) and says whether the tunnel may carry them (see [`VerifySni`]).
async fn sni_agrees(
    p: &ForwardProxy,
    stream: &mut TcpStream,
    target: &Target,
    buf: &mut Vec<u8>,
) -> bool {
    let strict = p.cfg.verify_sni == VerifySni::Strict;
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match verify_sni(buf, target) {
                SniVerdict::NeedMore if buf.len() < SNI_PEEK_MAX => {}
                SniVerdict::NeedMore | SniVerdict::Malformed | SniVerdict::Disagrees => {
                    return false;
                }
                SniVerdict::Agrees => return true,
                SniVerdict::NoSni | SniVerdict::NotTls => return !strict,
            }
            let room = (SNI_PEEK_MAX - buf.len()).min(chunk.len());
            match stream.read(&mut chunk[..room]).await {
                // The client closed (or failed) before a verdict: nothing to carry,
                // unless `on` lets non-TLS bytes through.
                Ok(0) | Err(_) => return !strict && buf.is_empty(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(p.cfg.sni_timeout, read).await {
        Ok(v) => v,
        // Silence (a server-speaks-first protocol) or a stalled partial record.
        Err(_) => !strict && buf.is_empty(),
    }
}

/// Closes a refused client's connection after its reply. `sending`: it sent bytes behind
/// its head (an optimistic client's tunnel bytes, never forwarded) and may still be
/// sending; they are drained briefly so that closing on unread data does not reset the
/// connection and destroy the reply.
async fn close_refused(stream: &mut TcpStream, sending: bool) {
    if sending {
        linger(stream).await;
    } else {
        let _ = stream.shutdown().await;
    }
}

/// Sends an absolute-form request upstream: its head in origin form, then the body bytes
/// that arrived with the head.
async fn forward_head(
    buf: &[u8],
    head_len: usize,
    limits: &http_connect::Limits,
    upstream: &mut TcpStream,
) -> std::io::Result<()> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "request head changed");
    // The driver validated this head; parsing it again borrows its fields for the rewrite.
    let req = http_connect::parse_request(&buf[..head_len], limits)
        .map_err(|_| bad())?
        .ok_or_else(bad)?;
    let mut out = Vec::with_capacity(head_len + (buf.len() - head_len));
    http_connect::write_origin_form(&req, &mut out);
    out.extend_from_slice(&buf[head_len..]);
    upstream.write_all(&out).await
}
