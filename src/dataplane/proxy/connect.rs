//! The `http-connect` listener: an HTTP/1.1 forward proxy.
//!
//! Per connection: the client (peer, or a trusted PROXY header's source); one request
//! head read under the listener's size limits and one whole-handshake timeout
//! (`egress::handshake::http`: `400` malformed, `408` too slow, and `400` for bytes sent
//! after a CONNECT head before the `200`); the destination decided and dialled
//! ([`EgressProxy::open`]); then
//! - `CONNECT host:port` → `200 Connection established` and the bytes spliced both ways;
//! - absolute-form `GET http://host/path` → the head rewritten in origin form (hop-by-hop
//!   and proxy headers dropped, `Connection: close`) and sent upstream with any body
//!   bytes already read, then spliced: one request per upstream connection, so each
//!   request is decided on its own.
//!
//! Refusals answer `403` (policy, SSRF guard, own listener), `502` (name does not
//! resolve, upstream refused), `504` (resolution or upstream timed out), `503` (the
//! handshake limit or a full conntrack table), each with a short reason and never the
//! resolved addresses. Proxy credentials (`Proxy-Authorization`) are not mapped to
//! workloads yet: the identity is the client address.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::egress::{EgressProxy, Failure, Tunnel};
use super::tcp::reset;
use crate::egress::handshake::http::{
    RequestForm, read_request, reply_established, reply_refusal, reply_status,
};
use crate::telemetry::metrics::ListenerCounters;
use crate::wire::http_connect;

impl EgressProxy {
    /// One `http-connect` connection, start to end.
    pub async fn http_connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let counters = &self.tag.counters;
        let Some(slot) = self.handshake_slot() else {
            let _ = reply_status(&mut stream, 503, "too many handshakes in progress").await;
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
        let mut buf = Vec::new();
        let req = match read_request(&mut stream, &self.limits, &mut buf).await {
            Ok(r) => r,
            Err(e) => {
                self.count_handshake_error(&e);
                return;
            }
        };
        let Tunnel { key, admitted, mut upstream } =
            match self.open(client, req.target, req.port).await {
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
                    let _ = stream.shutdown().await;
                    return;
                }
            };
        drop(slot);
        if req.form == RequestForm::Connect && sent_early(&stream) {
            // Bytes that arrived while the destination was being decided and dialled:
            // the client did not wait for the 200, refuse as the driver does when they
            // come with the head.
            ListenerCounters::inc(&counters.handshake_malformed);
            self.rt.conntrack.remove(&key);
            reset(upstream);
            let _ =
                reply_status(&mut stream, 400, "data sent before the tunnel was established").await;
            let _ = stream.shutdown().await;
            return;
        }
        let ready = match req.form {
            RequestForm::Connect => reply_established(&mut stream).await,
            RequestForm::Absolute => {
                forward_head(&buf, req.head_len, &self.limits.head, &mut upstream).await
            }
        };
        self.relay(stream, upstream, &key, &admitted, ready).await;
    }
}

/// Whether the client has sent anything since its CONNECT head (without blocking: only
/// bytes already in the socket buffer count). End of stream is not data.
fn sent_early(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Ok(n) if n > 0)
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
