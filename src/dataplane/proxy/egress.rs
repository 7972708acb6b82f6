//! What the two forward-proxy listeners (`http-connect`, `socks5`) share once a handshake
//! has named a destination: the decision for a *named* destination, the dial, and the
//! accounting of handshakes.
//!
//! The decision for one request, in order (each step once):
//! 1. [`Checker::resolve`]: the name is resolved once, to every candidate address (an
//!    address is its own single candidate). Awaited before the policy is loaded, so no
//!    snapshot is held across the resolution.
//! 2. The policy snapshot is loaded once and [`Checker::choose`] walks the candidates
//!    (own listener, SSRF guard, then `decide` with the name as `fqdn`); the first that
//!    passes is the only address ever dialled, so a DNS answer that changes later cannot
//!    redirect the flow.
//! 3. The chosen candidate's decision goes through the gate once
//!    ([`crate::dataplane::admit_decided`]: conntrack entry, counters, events); a
//!    refusal by policy goes through the same gate as a denial (counted, `deny` event
//!    with the name), and a refusal before policy (bad name, no answer, SSRF guard, own
//!    listener) through [`crate::dataplane::refuse`]. One decision, one event.
//!
//! The source is the client address, or — when the client proved itself with proxy
//! credentials ([`EgressProxy::open_as`], `egress::auth`) — the workload its credential
//! names: `decide_as` is asked with that workload, and refusals are logged with it.
//! The workload is kept on the flow's cut signal, so a reload re-decides the flow as
//! that workload too (`control::revalidate::decide_entry`).
//!
//! Not here: reading the handshakes and answering in each protocol's words
//! (`egress::handshake`, used by [`super::connect`] and [`super::socks5`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::listener::ListenerConfig;
use super::proxy_header::ProxyHeaderConfig;
use super::splice::{Accounting, SpliceEnd, splice};
use super::tcp::reset;
use crate::conntrack::FlowState;
use crate::dataplane::{Admission, Admitted, ListenerTag, Runtime, admit_decided, refuse};
use crate::egress::check::{AddrRefusal, Refusal};
use crate::egress::handshake::{HandshakeError, HandshakeLimits};
use crate::egress::{Checker, CredentialId, Target};
use crate::flow::{FlowKey, Proto};
use crate::policy::{PolicySnapshot, WorkloadId};
use crate::telemetry::flowlog::{Event, EventKind};
use crate::telemetry::metrics::ListenerCounters;

/// A forward-proxy listener's state, shared by its connection tasks.
#[derive(Debug)]
pub struct EgressProxy {
    pub rt: Arc<Runtime>,
    pub tag: ListenerTag,
    pub cfg: ListenerConfig,
    /// `cfg`'s PROXY protocol settings (a forward proxy behind a balancer learns the
    /// client from the header, like the L4 listeners).
    pub header: ProxyHeaderConfig,
    pub limits: HandshakeLimits,
    pub checker: Arc<Checker>,
    /// Handshakes in progress (`max_handshakes`).
    pub handshakes: Arc<Semaphore>,
    /// SOCKS5 UDP associations open (`udp_max_associations`).
    pub udp_associations: Arc<Semaphore>,
}

/// Why no tunnel was opened after a request was read.
// `Refusal` carries the name inline (no allocation per refused flow); once per connection,
// the copy costs less than boxing would.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Failure {
    /// Refused by the egress pipeline or policy (already counted and logged).
    Refused(Refusal),
    /// Allowed, but conntrack could not track it (already counted and logged): the
    /// listener answers "service unavailable".
    Untracked,
    /// The upstream did not accept the connection in time.
    UpstreamTimeout,
    /// The upstream refused or was unreachable.
    UpstreamError(io::Error),
    /// The flow was revoked while dialling.
    Cut,
}

/// What [`EgressProxy::decide_or_reuse`] chose.
// Once per new destination; boxing would cost the allocation it saves.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Chosen {
    /// A new flow, admitted and tracked.
    Admitted(FlowKey, Admitted),
    /// Allowed, to an address the caller already has a flow to.
    Tracked(SocketAddr),
}

/// An open upstream connection for an admitted flow. The caller splices and then
/// removes `key` from conntrack.
#[derive(Debug)]
pub struct Tunnel {
    pub key: FlowKey,
    pub admitted: Admitted,
    pub upstream: TcpStream,
}

impl EgressProxy {
    /// The common end of a CONNECT or SOCKS5 flow, once the client has been told the
    /// tunnel is up (`ready`: that reply, and any bytes forwarded ahead, went out): copy
    /// both ways until a side closes, the flow is cut or idles out; then forget the
    /// conntrack entry and, on anything but a clean close, reset both sides.
    pub async fn relay(
        &self,
        mut stream: TcpStream,
        mut upstream: TcpStream,
        key: &FlowKey,
        admitted: &Admitted,
        ready: io::Result<()>,
    ) {
        if ready.is_err() {
            self.rt.conntrack.remove(key);
            reset(upstream);
            reset(stream);
            return;
        }
        let counters = &self.tag.counters;
        let acct = Accounting { conntrack: &self.rt.conntrack, entry: &admitted.entry, counters };
        let end =
            splice(&mut stream, &mut upstream, self.cfg.idle_timeout, &admitted.cut, &acct).await;
        self.rt.conntrack.remove(key);
        match end {
            SpliceEnd::Closed => {}
            SpliceEnd::Cut | SpliceEnd::Idle | SpliceEnd::Error(_) => {
                reset(upstream);
                reset(stream);
            }
        }
    }

    /// A handshake slot, or `None` (counted in `handshakes_full`) when `max_handshakes`
    /// are already in progress.
    pub fn handshake_slot(&self) -> Option<OwnedSemaphorePermit> {
        match self.handshakes.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                ListenerCounters::inc(&self.tag.counters.handshakes_full);
                None
            }
        }
    }

    /// Counts a failed handshake under the counter its kind belongs to. A client that
    /// closed or whose connection failed is not the proxy's concern and not counted.
    pub fn count_handshake_error(&self, e: &HandshakeError) {
        let c = &self.tag.counters;
        match e {
            HandshakeError::Timeout => ListenerCounters::inc(&c.handshake_timeout),
            HandshakeError::Closed | HandshakeError::Io(_) => {}
            _ => ListenerCounters::inc(&c.handshake_malformed),
        }
    }

    /// Decides `target:port` for `client` (see the module doc) and, when admitted,
    /// dials the one address that passed within `connect_timeout`.
    ///
    /// # Errors
    /// [`Failure`]; on every error the conntrack entry (if any) has been removed.
    pub async fn open(
        &self,
        client: SocketAddr,
        target: Target,
        port: u16,
    ) -> Result<Tunnel, Failure> {
        self.open_as(client, None, target, port).await
    }

    /// [`EgressProxy::open`] for a client that proved who it is with proxy credentials
    /// (`who`): the credential's workload is the source for `decide` and the flow log.
    ///
    /// # Errors
    /// As [`EgressProxy::open`].
    pub async fn open_as(
        &self,
        client: SocketAddr,
        who: Option<CredentialId>,
        target: Target,
        port: u16,
    ) -> Result<Tunnel, Failure> {
        let (key, admitted) = self.decide(client, who, target, port, Proto::Tcp).await?;
        let connect =
            tokio::time::timeout(self.cfg.connect_timeout, super::upstream::connect(key.dst));
        let result = tokio::select! {
            r = connect => match r {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(Failure::UpstreamError(e)),
                Err(_) => Err(Failure::UpstreamTimeout),
            },
            () = admitted.cut.cut() => Err(Failure::Cut),
        };
        match result {
            Ok(upstream) => Ok(Tunnel { key, admitted, upstream }),
            Err(f) => {
                if !matches!(f, Failure::Cut) {
                    ListenerCounters::inc(&self.tag.counters.upstream_failed);
                }
                self.rt.conntrack.remove(&key);
                Err(f)
            }
        }
    }

    /// Decides `target:port` for `client` (speaking as `who`, when credentials named a
    /// workload) and passes the verdict through the gate: the admitted flow's key and
    /// entry, or the refusal (counted and logged).
    ///
    /// # Errors
    /// [`Failure::Refused`], [`Failure::Untracked`].
    pub async fn decide(
        &self,
        client: SocketAddr,
        who: Option<CredentialId>,
        target: Target,
        port: u16,
        proto: Proto,
    ) -> Result<(FlowKey, Admitted), Failure> {
        match self.decide_or_reuse(client, who, target, port, proto, &|_| false).await? {
            Chosen::Admitted(key, admitted) => Ok((key, admitted)),
            // `tracked` said no to every address.
            Chosen::Tracked(_) => Err(Failure::Untracked),
        }
    }

    /// [`EgressProxy::decide`], except that when the chosen address is one the caller
    /// already has a flow to (`tracked`) — a UDP association that reached the same
    /// address under another spelling — nothing new is admitted: the decision for this
    /// name still had to pass, but the flow and its conntrack entry are the existing one.
    ///
    /// # Errors
    /// As [`EgressProxy::decide`].
    pub async fn decide_or_reuse(
        &self,
        client: SocketAddr,
        who: Option<CredentialId>,
        target: Target,
        port: u16,
        proto: Proto,
        tracked: &(dyn Fn(SocketAddr) -> bool + Sync),
    ) -> Result<Chosen, Failure> {
        let flow = |dst| FlowKey::new(proto, client, dst);
        let unknown_dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        let cands = match self.checker.resolve(target).await {
            Ok(c) => c,
            Err(r) => {
                let fqdn = r.fqdn().map(|n| n.as_str());
                self.refuse_as(who, flow(unknown_dst), fqdn, r.reason());
                return Err(Failure::Refused(r));
            }
        };
        let snapshot = self.rt.policy.load_full();
        let fqdn = cands.fqdn.as_ref().map(|n| n.as_str());
        let source = who.map(|id| self.source_workload(id, &snapshot));
        let chosen =
            self.checker.choose_as(&snapshot.compiled, client.ip(), source, &cands, port, proto);
        let now = Instant::now();
        let state = if proto == Proto::Tcp { FlowState::Open } else { FlowState::Unreplied };
        match chosen {
            Ok(a) if tracked(a.addr) => Ok(Chosen::Tracked(a.addr)),
            Ok(a) => {
                let key = flow(a.addr);
                match admit_decided(
                    &self.rt, &self.tag, key, fqdn, &snapshot, a.decision, state, now,
                ) {
                    Admission::Allow(admitted) => {
                        if let Some(src) = who.and_then(|id| self.checker.credentials().source(id))
                        {
                            admitted.cut.set_source(src);
                        }
                        Ok(Chosen::Admitted(key, admitted))
                    }
                    // `choose` only admits an allowed decision; a deny here would be a
                    // bug, and fails closed like a full table.
                    Admission::Deny(_) | Admission::Untracked(_) => Err(Failure::Untracked),
                }
            }
            Err(r) => {
                match &r {
                    Refusal::Denied { first: (addr, AddrRefusal::Policy(decision)), .. } => {
                        let _ = admit_decided(
                            &self.rt,
                            &self.tag,
                            flow(*addr),
                            fqdn,
                            &snapshot,
                            *decision,
                            state,
                            now,
                        );
                    }
                    Refusal::Denied { first: (addr, _), .. } => {
                        self.refuse_as(who, flow(*addr), fqdn, r.reason());
                    }
                    _ => self.refuse_as(who, flow(unknown_dst), fqdn, r.reason()),
                }
                Err(Failure::Refused(r))
            }
        }
    }

    /// The workload credential `id` names in `snapshot`. One that the inventory does not
    /// know becomes an id no compilation has, which `decide_as` treats as no workload:
    /// the flow is decided (and, under `policy.unknown = deny`, refused) as nobody's —
    /// never as the source address's workload.
    fn source_workload(&self, id: CredentialId, snapshot: &PolicySnapshot) -> WorkloadId {
        self.checker
            .credentials()
            .workload(id, &snapshot.compiled, snapshot.generation)
            .unwrap_or(WorkloadId(u32::MAX))
    }

    /// A refusal before any policy decision ([`refuse`]), logged with the credential's
    /// workload as the source when the client named one.
    pub fn refuse_as(
        &self,
        who: Option<CredentialId>,
        key: FlowKey,
        fqdn: Option<&str>,
        reason: &'static str,
    ) {
        let Some(id) = who else {
            refuse(&self.rt, &self.tag, key, fqdn, reason);
            return;
        };
        let snapshot = self.rt.policy.load_full();
        let src_workload = Some(self.source_workload(id, &snapshot))
            .filter(|w| snapshot.compiled.workload_name(*w).is_some());
        ListenerCounters::inc(&self.tag.counters.denied);
        self.rt.flowlog.emit(Event {
            ts: SystemTime::now(),
            kind: EventKind::Deny,
            listener: self.tag.name.clone(),
            proto: key.proto,
            src: key.src,
            dst: key.dst,
            fqdn: fqdn.map(Arc::from),
            src_workload,
            dst_workload: None,
            direction: None,
            reason,
            policy: None,
            snapshot,
        });
    }
}
