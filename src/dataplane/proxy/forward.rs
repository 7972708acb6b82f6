//! What the three forward-proxy listeners — `http-connect` ([`super::connect`]),
//! `socks5` ([`super::socks5`]) and `transparent` ([`super::transparent`]) — share once a
//! client has said (or its redirected connection shows) where it is going: the listener's
//! state ([`ForwardProxy`]), the way a destination reaches the gate, the dial, the relay,
//! and the accounting of handshakes.
//!
//! A request, in order (each step once):
//! 1. `egress::Checker` turns the destination into candidates: a name resolved once, to
//!    every candidate address (an address is its own single candidate); in transparent
//!    mode, the address the client dialled once the name its first bytes carried covers
//!    it. Awaited before the gate loads the policy, so no snapshot is held across the
//!    resolution. A refusal here (bad name, no answer, name mismatch) goes through the
//!    gate's refusal path ([`crate::dataplane::refuse`]).
//! 2. The gate ([`crate::dataplane::admit`]) walks the candidates — own listener, SSRF
//!    guard, policy with the name as `fqdn` — and admits the first that passes: conntrack
//!    entry, counters, events, all in the gate. That address is the only one ever
//!    dialled, so a DNS answer that changes later cannot redirect the flow.
//! 3. [`ForwardProxy::dial`], then the protocol's reply, then [`ForwardProxy::relay`].
//!
//! The source is the client address, or — when the client proved itself with proxy
//! credentials (`egress::auth`) — the workload its credential names ([`Source`]).
//!
//! Not here: reading the handshakes and answering in each protocol's words
//! (`egress::handshake`, used by [`super::connect`] and [`super::socks5`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::listener::{ListenerConfig, log_malformed};
use super::proxy_header::ProxyHeaderConfig;
use super::splice::{Accounting, SpliceEnd, splice};
use super::tcp::reset;
use crate::conntrack::FlowState;
use crate::dataplane::{
    Admission, Admitted, Candidates, Destination, FlowRequest, ListenerTag, Runtime, Source, admit,
    refuse,
};
use crate::egress::check::Refusal;
use crate::egress::handshake::{HandshakeError, HandshakeLimits};
use crate::egress::{Checker, CredentialId, DomainName, Target};
use crate::flow::{FlowKey, Proto};
use crate::telemetry::flowlog::Malformed;
use crate::telemetry::metrics::ListenerCounters;

/// A forward-proxy listener's state, shared by its connection tasks.
#[derive(Debug)]
pub struct ForwardProxy {
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
    /// Refused before or by the gate (already counted and logged).
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

/// What the gate chose for a request.
#[derive(Debug)]
pub enum Chosen {
    /// A new flow, admitted and tracked.
    Admitted(Admitted),
    /// Allowed, to an address the caller already has a flow to.
    Tracked(SocketAddr),
}

/// An open upstream connection for an admitted flow. The caller splices and then
/// removes the flow from conntrack.
#[derive(Debug)]
pub struct Tunnel {
    pub admitted: Admitted,
    pub upstream: TcpStream,
}

impl ForwardProxy {
    /// The common end of a forward-proxied flow, once the client has been told the
    /// tunnel is up (`ready`: that reply, and any bytes forwarded ahead, went out): copy
    /// both ways until a side closes, the flow is cut or idles out; then forget the
    /// conntrack entry and, on anything but a clean close, reset both sides.
    pub async fn relay(
        &self,
        mut stream: TcpStream,
        mut upstream: TcpStream,
        admitted: &Admitted,
        ready: io::Result<()>,
    ) {
        if ready.is_err() {
            self.rt.conntrack.remove(&admitted.key);
            reset(upstream);
            reset(stream);
            return;
        }
        let counters = &self.tag.counters;
        let acct = Accounting { conntrack: &self.rt.conntrack, entry: &admitted.entry, counters };
        let end =
            splice(&mut stream, &mut upstream, self.cfg.idle_timeout, &admitted.cut, &acct).await;
        self.rt.conntrack.remove(&admitted.key);
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

    /// Counts a failed handshake under the counter its kind belongs to and logs a
    /// malformed one as a `malformed` event from `client` to `local` (the listener's
    /// address). A client that closed or whose connection failed is not the proxy's
    /// concern and not counted; a timeout is counted, not logged; refused credentials are
    /// the caller's (a `deny`).
    pub fn handshake_failed(&self, e: &HandshakeError, client: SocketAddr, local: SocketAddr) {
        let c = &self.tag.counters;
        match e {
            HandshakeError::Timeout => ListenerCounters::inc(&c.handshake_timeout),
            HandshakeError::Closed | HandshakeError::Io(_) => {}
            _ => ListenerCounters::inc(&c.handshake_malformed),
        }
        if let Some(why) = malformed_reason(e) {
            log_malformed(&self.rt, &self.tag, Proto::Tcp, client, local, why);
        }
    }

    /// A handshake refused as malformed that the driver did not see (a command or port
    /// the listener does not carry): counted in `handshake_malformed` and logged.
    pub fn refused_handshake(&self, why: Malformed, client: SocketAddr, local: SocketAddr) {
        ListenerCounters::inc(&self.tag.counters.handshake_malformed);
        log_malformed(&self.rt, &self.tag, Proto::Tcp, client, local, why);
    }

    /// Decides `target:port` for `client` (speaking as `who`, when credentials named a
    /// workload) and, when admitted, dials the one address that passed within
    /// `connect_timeout`.
    ///
    /// # Errors
    /// [`Failure`]; on every error the conntrack entry (if any) has been removed.
    pub async fn open(
        &self,
        client: SocketAddr,
        who: Option<CredentialId>,
        target: Target,
        port: u16,
    ) -> Result<Tunnel, Failure> {
        let admitted = match self.decide(client, who, target, port, Proto::Tcp, None).await? {
            Chosen::Admitted(a) => a,
            // No `tracked` set was given: unreachable, and fails closed.
            Chosen::Tracked(_) => return Err(Failure::Untracked),
        };
        let upstream = self.dial(&admitted).await?;
        Ok(Tunnel { admitted, upstream })
    }

    /// Connects to the admitted address within `connect_timeout`, unless the flow is cut
    /// first. On failure the entry is removed and (but for a cut) `upstream_failed`
    /// counted.
    ///
    /// # Errors
    /// [`Failure::UpstreamTimeout`], [`Failure::UpstreamError`], [`Failure::Cut`].
    pub async fn dial(&self, admitted: &Admitted) -> Result<TcpStream, Failure> {
        let connect = tokio::time::timeout(
            self.cfg.connect_timeout,
            super::upstream::connect(admitted.key.dst),
        );
        let result = tokio::select! {
            r = connect => match r {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(Failure::UpstreamError(e)),
                Err(_) => Err(Failure::UpstreamTimeout),
            },
            () = admitted.cut.cut() => Err(Failure::Cut),
        };
        if let Err(f) = &result {
            if !matches!(f, Failure::Cut) {
                ListenerCounters::inc(&self.tag.counters.upstream_failed);
            }
            self.rt.conntrack.remove(&admitted.key);
        }
        result
    }

    /// Resolves `target:port` for `client` into candidates and passes them through the
    /// gate ([`ForwardProxy::admit`]). `tracked`: addresses the caller already has a flow
    /// to (a UDP association that reached the same address under another spelling);
    /// allowed, they are [`Chosen::Tracked`] and nothing new is admitted.
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
        tracked: Option<&(dyn Fn(SocketAddr) -> bool + Sync)>,
    ) -> Result<Chosen, Failure> {
        let cands = match self.checker.resolve(target).await {
            Ok(c) => c,
            Err(r) => return Err(self.refused(client, who, unknown(port), proto, r)),
        };
        self.admit(client, who, &cands, port, proto, tracked)
    }

    /// The gate for a request's candidates (see the module doc): the admitted flow, or
    /// the refusal (counted and logged by the gate).
    ///
    /// # Errors
    /// As [`ForwardProxy::decide`].
    // `Failure` carries the name inline (see its note): once per request, no box.
    #[allow(clippy::result_large_err)]
    pub fn admit(
        &self,
        client: SocketAddr,
        who: Option<CredentialId>,
        cands: &crate::egress::Candidates,
        port: u16,
        proto: Proto,
        tracked: Option<&(dyn Fn(SocketAddr) -> bool + Sync)>,
    ) -> Result<Chosen, Failure> {
        if cands.addrs.is_empty() {
            let r = Refusal::NoAddress { fqdn: cands.fqdn };
            return Err(self.refused(client, who, unknown(port), proto, r));
        }
        let fqdn = cands.fqdn.as_ref().map(DomainName::as_str);
        let dst = Candidates { addrs: &cands.addrs, port, checker: &self.checker, tracked };
        let req = FlowRequest {
            proto,
            src: client,
            dst: Destination::Candidates(dst),
            fqdn,
            source: self.source(who),
            state: if proto == Proto::Tcp { FlowState::Open } else { FlowState::Unreplied },
        };
        match admit(&self.rt, &self.tag, &req, Instant::now()) {
            Admission::Allow(a) => Ok(Chosen::Admitted(a)),
            Admission::Tracked(addr) => Ok(Chosen::Tracked(addr)),
            Admission::Deny(d) => {
                Err(Failure::Refused(Refusal::Denied { fqdn: cands.fqdn, reason: d.reason }))
            }
            Admission::Untracked(_) => Err(Failure::Untracked),
        }
    }

    /// A refusal before the gate could decide, through its refusal path; returned as the
    /// [`Failure`] the listener answers.
    pub fn refused(
        &self,
        client: SocketAddr,
        who: Option<CredentialId>,
        dst: SocketAddr,
        proto: Proto,
        r: Refusal,
    ) -> Failure {
        let key = FlowKey::new(proto, client, dst);
        self.refuse(key, who, r.fqdn().map(DomainName::as_str), r.reason());
        Failure::Refused(r)
    }

    /// Counts and logs a refusal of `key` (through [`crate::dataplane::refuse`]), with the
    /// credential's workload as the source when the client named one.
    pub fn refuse(
        &self,
        key: FlowKey,
        who: Option<CredentialId>,
        fqdn: Option<&str>,
        reason: &'static str,
    ) {
        let req = FlowRequest {
            proto: key.proto,
            src: key.src,
            dst: Destination::Addr(key.dst),
            fqdn,
            source: self.source(who),
            state: FlowState::Open,
        };
        refuse(&self.rt, &self.tag, &req, reason);
    }

    fn source(&self, who: Option<CredentialId>) -> Source<'_> {
        match who {
            Some(id) => Source::Credential(self.checker.credentials(), id),
            None => Source::Addr,
        }
    }
}

/// The `malformed` reason of a failed handshake; `None` for those that are not logged as
/// one (timeout, close, I/O error, refused credentials).
pub fn malformed_reason(e: &HandshakeError) -> Option<Malformed> {
    use crate::wire::http_connect::ParseError as Http;
    use crate::wire::socks5::ParseError as Socks;
    Some(match e {
        HandshakeError::Timeout
        | HandshakeError::Closed
        | HandshakeError::Io(_)
        | HandshakeError::AuthFailed => return None,
        HandshakeError::Http(Http::HeadTooLarge | Http::RequestLineTooLong) => {
            Malformed::HttpTooLarge
        }
        HandshakeError::Http(Http::TooManyHeaders) => Malformed::HttpTooManyHeaders,
        HandshakeError::Http(_) => Malformed::HttpHead,
        HandshakeError::HostMismatch => Malformed::HttpHostMismatch,
        HandshakeError::BadName(_) => Malformed::BadName,
        HandshakeError::Socks(Socks::AddrTypeNotSupported(_)) => Malformed::Socks5AddrType,
        HandshakeError::Socks(_) => Malformed::Socks5Message,
        HandshakeError::NoAcceptableMethod => Malformed::Socks5NoMethod,
        HandshakeError::CommandNotSupported(_) => Malformed::Socks5Command,
    })
}

/// A destination not known yet (refused before any candidate): the port only.
pub fn unknown(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
}
