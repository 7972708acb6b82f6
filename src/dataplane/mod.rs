//! Dataplanes: turning connections and packets into flows, admitting each new flow through
//! the one gate ([`admit`]), and forwarding what is allowed.
//!
//! [`admit`] is the only place on the data path that asks the policy (through
//! [`decide`], which nothing else calls). Every listener kind describes a new flow the same
//! way, as a [`FlowRequest`]: who is asking ([`Source`]: the address, or the workload a
//! proxy credential names), the name it asked for if any, and where it may go
//! ([`Destination`]: one address the dataplane chose, or a forward proxy's candidate
//! addresses for a name). The gate loads the policy snapshot once, decides — for
//! candidates, in order: the first that passes the forward proxy's screen (SSRF guard,
//! flowgate's own listeners) and policy is the flow, and the address that is dialled —
//! times the decision, and then either tracks the flow in conntrack (allow: generation,
//! both workloads and a cut signal the control plane can fire) or refuses it (deny:
//! counted and sent to the flow log). A refusal before any decision could apply (a bad or
//! unresolvable name, a name that does not cover the address dialled, failed
//! credentials) goes through [`refuse`], which shares the gate's one refusal path. So
//! every flow of every listener kind is counted, timed and logged by the same code, and
//! decided and logged once.
//!
//! [`Runtime`] (`runtime.rs`) holds what every dataplane and the control plane share: the
//! conntrack table, the policy handle (read here, written only by the control plane), the
//! metrics registry, the flow log and readiness.
//!
//! Not here: the policy itself (`policy`), reloading it (`control`), the listeners'
//! sockets and protocols (`proxy`), turning a destination name into candidates
//! (`egress`).

pub mod packet;
pub mod proxy;
mod runtime;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::conntrack::{CutSignal, EntryInit, EntryRef, FlowState, InsertError, TcpConn};
use crate::egress::{Checker, CredentialId, Credentials};
use crate::flow::{FlowKey, Proto};
use crate::policy::{Decision, FlowQuery, Generation, PolicySnapshot, WorkloadId};
use crate::telemetry::flowlog::{Denied, Event, Flow};
use crate::telemetry::metrics::ListenerCounters;

pub use runtime::{Readiness, ReadyState, Runtime, log_revoked};

/// Which listener a flow came in on: its conntrack index, its name for the flow log and
/// its counters. Built once per listener at start-up; cloned into its tasks.
#[derive(Clone, Debug)]
pub struct ListenerTag {
    pub index: u16,
    pub name: Arc<str>,
    pub counters: Arc<ListenerCounters>,
}

impl ListenerTag {
    /// A flow on this listener, as its flow-log events name it.
    fn flow<'k>(
        &self,
        key: &'k FlowKey,
        fqdn: Option<&str>,
        snapshot: &Arc<PolicySnapshot>,
    ) -> Flow<'k> {
        Flow {
            listener: self.name.clone(),
            key,
            fqdn: fqdn.map(Arc::from),
            snapshot: snapshot.clone(),
        }
    }
}

/// A flow the gate let through: its key (for a forward proxy, the candidate admitted:
/// the one address to dial), its conntrack entry and the signal that cuts it.
#[derive(Debug)]
pub struct Admitted {
    pub key: FlowKey,
    pub entry: EntryRef,
    pub cut: Arc<CutSignal>,
    pub generation: Generation,
}

/// A refused flow (already counted and logged): where it was going and the flow log's
/// reason (a policy cause, `ssrf`, `own-listener`, `no-address`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denial {
    pub dst: SocketAddr,
    pub reason: &'static str,
}

/// The gate's answer.
#[derive(Debug)]
pub enum Admission {
    Allow(Admitted),
    /// Refused by policy, or every candidate refused (already counted and logged).
    Deny(Denial),
    /// The policy allowed it but conntrack could not track it (table full, or the same
    /// 5-tuple is already open); refused, counted and logged. Fail closed.
    Untracked(InsertError),
    /// Allowed, to an address the caller already has a flow to ([`Candidates::tracked`]):
    /// nothing new is tracked, counted or logged.
    Tracked(SocketAddr),
}

/// Who is asking for a flow: what the policy takes as its source workload.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// The workload the inventory places at the flow's source address, if any.
    Addr,
    /// The workload a proxy credential names (`egress::auth`; functions that share NAT
    /// addresses): decided with `decide_as`, logged with it, and kept on the flow's cut
    /// signal so a reload re-decides the flow as that workload too. A workload the
    /// inventory does not know is nobody's — never the source address's.
    Credential(&'a Credentials, CredentialId),
}

impl Source<'_> {
    /// The source workload to decide as in `snapshot` (`None`: by address).
    fn workload(self, snapshot: &PolicySnapshot) -> Option<WorkloadId> {
        match self {
            Source::Addr => None,
            Source::Credential(creds, id) => Some(
                creds
                    .workload(id, &snapshot.compiled, snapshot.generation)
                    .unwrap_or(WorkloadId(u32::MAX)),
            ),
        }
    }
}

/// Where a new flow may go.
#[derive(Clone, Copy)]
pub enum Destination<'a> {
    /// The one address the dataplane chose (an L4 upstream).
    Addr(SocketAddr),
    /// A forward proxy's candidates for a name or address.
    Candidates(Candidates<'a>),
}

/// A forward proxy's destination: every address the name resolved to, in order (an
/// address is its own one candidate). Each is made canonical (IPv4-mapped → IPv4) and
/// screened ([`Checker::screen`]: flowgate's own listeners, the SSRF guard), then decided;
/// the first that passes both is admitted, and it is the only address the caller dials —
/// never resolving again, so a DNS answer that changes between check and connect
/// (rebinding) cannot redirect the flow. When every candidate is refused, the first one's
/// refusal is the flow's.
#[derive(Clone, Copy)]
pub struct Candidates<'a> {
    pub addrs: &'a [IpAddr],
    pub port: u16,
    pub checker: &'a Checker,
    /// Addresses the caller already has a flow to (a SOCKS5 UDP association that reached
    /// one under another spelling): allowed, they come back as [`Admission::Tracked`].
    pub tracked: Option<&'a (dyn Fn(SocketAddr) -> bool + Sync)>,
}

/// A new flow, as every listener kind asks the gate about it.
#[derive(Clone, Copy)]
pub struct FlowRequest<'a> {
    pub proto: Proto,
    /// The client (the peer, or a trusted PROXY header's source).
    pub src: SocketAddr,
    pub dst: Destination<'a>,
    /// The destination's name where the listener knows it (CONNECT, SOCKS5, SNI, Host),
    /// normalised; kept on the entry so a reload re-decides the flow with it.
    pub fqdn: Option<&'a str>,
    pub source: Source<'a>,
    /// The conntrack state the flow starts in.
    pub state: FlowState,
}

impl FlowRequest<'static> {
    /// A flow to one address, decided by its addresses alone (the L4 listeners).
    pub const fn to(key: FlowKey, state: FlowState) -> FlowRequest<'static> {
        FlowRequest {
            proto: key.proto,
            src: key.src,
            dst: Destination::Addr(key.dst),
            fqdn: None,
            source: Source::Addr,
            state,
        }
    }
}

impl FlowRequest<'_> {
    /// The flow's key when its destination is known; a forward proxy's flow that has none
    /// yet (refused before any candidate) has the unspecified address and the port asked
    /// for.
    pub fn key(&self) -> FlowKey {
        let dst = match self.dst {
            Destination::Addr(a) => a,
            Destination::Candidates(c) => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), c.port)
            }
        };
        FlowKey::new(self.proto, self.src, dst)
    }
}

/// The one gate: decide a new flow and act on the decision.
///
/// - allow → a conntrack entry (state `req.state`, the generation and both workloads, a
///   fresh cut signal carrying a credential's workload); `allowed` counted; an `allow`
///   event if sampled and a `would-deny` event if an audit-mode policy objects.
/// - deny → `denied` counted and a `deny` event; nothing is tracked.
///
/// The policy snapshot is loaded once; the decision (for candidates, the walk over them)
/// is timed into `Registry::decision`, once per flow. Besides the two objects that
/// outlive the call on allow (the conntrack entry and its cut signal) and the name kept
/// with the entry, nothing is allocated on allow; on deny the event holds only `Arc`
/// clones (and the name).
pub fn admit(rt: &Runtime, tag: &ListenerTag, req: &FlowRequest<'_>, now: Instant) -> Admission {
    gate(rt, tag, req, Tracking::Proxied, now)
}

/// How the gate tracks a flow it allows.
#[derive(Clone, Copy, Debug)]
enum Tracking {
    /// A connection a proxy task holds: its cut signal closes it, revalidation removes it.
    Proxied,
    /// A packet flow (`packet::filter`): the entry is all there is. Its cut signal is
    /// [`CutSignal::packet`] (revalidation leaves the entry marked revoked, so its next
    /// packets are dropped as such); a TCP flow gets its state machine, started by the SYN
    /// that opened it, and window tracking (`insert_tcp`).
    Packet(Option<TcpConn>),
}

/// [`admit`] for the packet dataplane: the same gate (decision, counters, latency, flow
/// log), tracking the flow as a packet flow. `tcp` is the state machine the flow's first
/// segment opened (`TcpConn::open` of a bare SYN), `None` for other protocols.
/// `req.state` is the flow state a non-TCP flow starts in (`Unreplied`). On allow it
/// allocates what [`admit`] does (the entry's side allocation, which also holds a TCP
/// flow's window bounds, and the cut signal); on deny nothing.
pub fn admit_packet(
    rt: &Runtime,
    tag: &ListenerTag,
    req: &FlowRequest<'_>,
    tcp: Option<TcpConn>,
    now: Instant,
) -> Admission {
    gate(rt, tag, req, Tracking::Packet(tcp), now)
}

/// The one gate's body ([`admit`], [`admit_packet`]).
fn gate(
    rt: &Runtime,
    tag: &ListenerTag,
    req: &FlowRequest<'_>,
    tracking: Tracking,
    now: Instant,
) -> Admission {
    let snapshot = rt.policy.load();
    let t0 = Instant::now();
    let source = req.source.workload(&snapshot);
    let chosen = match req.dst {
        Destination::Addr(dst) => {
            let key = FlowKey::new(req.proto, req.src, dst);
            let decision = decide(&snapshot, &key, req.fqdn, source);
            if decision.verdict.is_allow() {
                Chosen::Allowed(key, decision)
            } else {
                Chosen::Refused(key, Refused::Policy(decision))
            }
        }
        Destination::Candidates(c) => choose(&snapshot, req, &c, source),
    };
    rt.registry.decision.record(t0.elapsed());
    match chosen {
        Chosen::Allowed(key, decision) => {
            settle(rt, tag, req, key, &snapshot, decision, tracking, now)
        }
        Chosen::Tracked(addr) => Admission::Tracked(addr),
        Chosen::Refused(key, why) => {
            let denied = match why {
                Refused::Policy(d) => Denied::Policy(d),
                Refused::Screen(reason) => {
                    let src_workload = logged_source(&snapshot, &key, source);
                    Denied::DataPath { reason, src_workload, dst_workload: None }
                }
            };
            deny(rt, tag, &key, req.fqdn, denied, &snapshot);
            Admission::Deny(Denial { dst: key.dst, reason: denied.reason() })
        }
    }
}

/// A flow refused before any policy decision could apply to it (a forward proxy's bad,
/// unresolvable or mismatched name, its client's failed credentials, a redirected
/// connection without an original destination): through the gate's refusal path —
/// counted as `denied`, logged as a `deny` event with `reason`, the name and the source
/// workload; no destination workload (`req.key()` may have the port only).
pub fn refuse(rt: &Runtime, tag: &ListenerTag, req: &FlowRequest<'_>, reason: &'static str) {
    let snapshot = rt.policy.load();
    let key = req.key();
    let src_workload = logged_source(&snapshot, &key, req.source.workload(&snapshot));
    let why = Denied::DataPath { reason, src_workload, dst_workload: None };
    deny(rt, tag, &key, req.fqdn, why, &snapshot);
}

/// What the gate chose for a flow.
enum Chosen {
    Allowed(FlowKey, Decision),
    Tracked(SocketAddr),
    Refused(FlowKey, Refused),
}

/// Why a candidate was refused.
#[derive(Clone, Copy)]
enum Refused {
    Policy(Decision),
    /// By the forward proxy's screen, before policy.
    Screen(&'static str),
}

/// The first of `c`'s candidates that passes the screen and policy, or the first
/// candidate's refusal (`no-address` when there is none).
fn choose(
    snapshot: &PolicySnapshot,
    req: &FlowRequest<'_>,
    c: &Candidates<'_>,
    source: Option<WorkloadId>,
) -> Chosen {
    let mut first = None;
    for &raw in c.addrs {
        let key = FlowKey::new(req.proto, req.src, SocketAddr::new(raw.to_canonical(), c.port));
        let refused = match c.checker.screen(key.dst) {
            Err(r) => Refused::Screen(r.reason()),
            Ok(()) => {
                let decision = decide(snapshot, &key, req.fqdn, source);
                if decision.verdict.is_allow() {
                    return match c.tracked {
                        Some(tracked) if tracked(key.dst) => Chosen::Tracked(key.dst),
                        _ => Chosen::Allowed(key, decision),
                    };
                }
                Refused::Policy(decision)
            }
        };
        first.get_or_insert((key, refused));
    }
    match first {
        Some((key, why)) => Chosen::Refused(key, why),
        None => Chosen::Refused(req.key(), Refused::Screen("no-address")),
    }
}

/// The one call into the policy on the data path: `decide`, or `decide_as` when a
/// credential named the source workload.
#[inline]
fn decide(
    snapshot: &PolicySnapshot,
    key: &FlowKey,
    fqdn: Option<&str>,
    source: Option<WorkloadId>,
) -> Decision {
    let query = FlowQuery::from_key(key, fqdn);
    match source {
        Some(w) => snapshot.compiled.decide_as(&query, w),
        None => snapshot.compiled.decide(&query),
    }
}

/// The source workload a refusal is logged with: the credential's (when the inventory
/// knows it), else the one at the source address.
fn logged_source(
    snapshot: &PolicySnapshot,
    key: &FlowKey,
    source: Option<WorkloadId>,
) -> Option<WorkloadId> {
    match source {
        Some(w) => Some(w).filter(|w| snapshot.compiled.workload_name(*w).is_some()),
        None => snapshot.compiled.workload_of(key.src.ip()),
    }
}

/// The gate's one refusal path: `denied` counted, a `deny` event emitted.
fn deny(
    rt: &Runtime,
    tag: &ListenerTag,
    key: &FlowKey,
    fqdn: Option<&str>,
    why: Denied,
    snapshot: &Arc<PolicySnapshot>,
) {
    ListenerCounters::inc(&tag.counters.denied);
    rt.flowlog.emit(Event::deny(tag.flow(key, fqdn, snapshot), why));
}

/// Acts on an allowing decision: the flow tracked, or refused when conntrack cannot take
/// it or the generation that replaced `snapshot` meanwhile denies it.
#[allow(clippy::too_many_arguments)]
fn settle(
    rt: &Runtime,
    tag: &ListenerTag,
    req: &FlowRequest<'_>,
    key: FlowKey,
    snapshot: &Arc<PolicySnapshot>,
    decision: Decision,
    tracking: Tracking,
    now: Instant,
) -> Admission {
    let cut = Arc::new(match tracking {
        Tracking::Proxied => CutSignal::default(),
        Tracking::Packet(_) => CutSignal::packet(),
    });
    if let Source::Credential(creds, id) = req.source
        && let Some(workload) = creds.source(id)
    {
        cut.set_source(workload);
    }
    let init = || EntryInit {
        state: req.state,
        generation: snapshot.generation,
        src_workload: decision.src_workload,
        dst_workload: decision.dst_workload,
        listener: tag.index,
        cut: Some(cut.clone()),
        // Kept with the entry so a reload re-decides the flow with the name it was
        // admitted for (a `domainNames` rule may be all that allows it).
        fqdn: req.fqdn.map(Arc::from),
    };
    let inserted = match tracking {
        Tracking::Proxied => {
            let mut inserted = rt.conntrack.insert(key, init(), now);
            if matches!(inserted, Err(InsertError::Exists)) && replace_stale(rt, &key) {
                inserted = rt.conntrack.insert(key, init(), now);
            }
            inserted
        }
        Tracking::Packet(Some(conn)) => rt.conntrack.insert_tcp(key, init(), conn, now),
        Tracking::Packet(None) => rt.conntrack.insert(key, init(), now),
    };
    let entry = match inserted {
        Ok(entry) => entry,
        // A packet flow another packet (another worker's, the same burst's) has just
        // opened: not a refusal; the filter looks it up again and follows that entry.
        Err(InsertError::Exists) if matches!(tracking, Tracking::Packet(_)) => {
            return Admission::Untracked(InsertError::Exists);
        }
        Err(err) => {
            let reason = match err {
                InsertError::Full { .. } => {
                    ListenerCounters::inc(&tag.counters.conntrack_full);
                    "conntrack-full"
                }
                InsertError::Exists => "duplicate-flow",
            };
            let why = Denied::DataPath {
                reason,
                src_workload: decision.src_workload,
                dst_workload: decision.dst_workload,
            };
            deny(rt, tag, &key, req.fqdn, why, snapshot);
            return Admission::Untracked(err);
        }
    };
    // A reload may have swapped in a new generation between the decision and the
    // insert; its revalidation pass may already have walked the table without this
    // entry. Decide again on the generation now in force (one extra snapshot load, no
    // allocation), so no flow is ever tracked under a generation that denies it.
    let current = rt.policy.load();
    if current.generation != snapshot.generation {
        let again = decide(&current, &key, req.fqdn, req.source.workload(&current));
        if !again.verdict.is_allow() {
            rt.conntrack.remove(&key);
            let why = Denied::Policy(again);
            deny(rt, tag, &key, req.fqdn, why, &current);
            return Admission::Deny(Denial { dst: key.dst, reason: why.reason() });
        }
        entry.set_generation(current.generation);
    }
    ListenerCounters::inc(&tag.counters.allowed);
    if decision.would_deny.is_some() {
        rt.flowlog.emit(Event::would_deny(tag.flow(&key, req.fqdn, snapshot), &decision));
    }
    if rt.flowlog.sample_allow() {
        rt.flowlog.emit(Event::allow(tag.flow(&key, req.fqdn, snapshot), &decision));
    }
    Admission::Allow(Admitted { key, entry, cut, generation: snapshot.generation })
}

/// A new TCP connection whose 4-tuple is still tracked: when the client's port is
/// reused right after a connection the upstream closed first, the kernel accepts the new
/// SYN while the old connection's task is still tearing down (its entry is `Closing`).
/// That entry belongs to a connection that is over; cut it and let the new one in. An
/// entry that is still open is left alone (the new flow is then refused as a duplicate).
fn replace_stale(rt: &Runtime, key: &FlowKey) -> bool {
    if key.proto != Proto::Tcp {
        return false;
    }
    let Some(old) = rt.conntrack.lookup(key) else {
        return true;
    };
    if old.state() != FlowState::Closing {
        return false;
    }
    old.trigger_cut();
    rt.conntrack.remove(key);
    true
}

/// A TCP flow key (proxied TCP connections).
pub const fn tcp_flow(src: std::net::SocketAddr, dst: std::net::SocketAddr) -> FlowKey {
    FlowKey::new(Proto::Tcp, src, dst)
}
