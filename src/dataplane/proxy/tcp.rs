//! The L4 TCP listener (`tcp`): one task per accepted connection, to the upstreams.
//!
//! Per connection: learn the client (the peer, or the PROXY header's source from a trusted
//! proxy), choose an upstream, [`admit`]. Denied → reset at once (SO_LINGER 0), the upstream
//! is never contacted. Allowed → connect within `connect_timeout` (a failed upstream is
//! cooled down and the next one is tried, through the gate again), splice, and remove the
//! conntrack entry when the connection ends. Also the built-in `echo` upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::listener::ListenerConfig;
use super::proxy_header::ProxyHeaderConfig;
use super::splice::{Accounting, SpliceEnd, splice};
use super::upstream::Upstreams;
use crate::conntrack::FlowState;
use crate::dataplane::{Admission, FlowRequest, ListenerTag, Runtime, admit, tcp_flow};
use crate::telemetry::metrics::ListenerCounters;

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

/// Closes with a reset (SO_LINGER 0): a denied client learns at once, nothing lingers in
/// TIME_WAIT, and no byte of ours reaches it.
pub fn reset(stream: TcpStream) {
    reset_on_drop(&stream);
    drop(stream);
}

/// Makes the connection close with a reset when it is dropped (see [`reset`]).
pub fn reset_on_drop(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

impl TcpProxy {
    /// One connection, start to end.
    pub async fn connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let counters = &self.tag.counters;
        // The client: the peer, or the source of a trusted proxy's PROXY header. The
        // reader consumes exactly the header, so the stream is untouched payload after it.
        let Some(client) = self.header.client(&mut stream, peer, &self.rt, &self.tag).await else {
            return;
        };
        // One try per upstream at most: each goes through the gate, since another
        // upstream is another destination.
        for _ in 0..self.upstreams.len() {
            let Some((i, up)) = self.upstreams.pick(Instant::now()) else { break };
            let key = tcp_flow(client, up);
            let req = FlowRequest::to(key, FlowState::Open);
            let admitted = match admit(&self.rt, &self.tag, &req, Instant::now()) {
                Admission::Allow(a) => a,
                Admission::Deny(_) | Admission::Untracked(_) | Admission::Tracked(_) => {
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
pub async fn echo(mut stream: TcpStream, idle: Duration) {
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
