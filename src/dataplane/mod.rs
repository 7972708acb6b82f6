//! Dataplanes: turning connections and packets into flows, admitting each new flow through
//! the one gate ([`admit`]), and forwarding what is allowed.
//!
//! [`admit`] is the only place on the data path that asks the policy. It loads the current
//! snapshot once, decides, times the decision, and then either tracks the flow in conntrack
//! (allow: generation, both workloads and a cut signal the control plane can fire) or
//! refuses it (deny: counted and sent to the flow log). Dataplanes build a [`FlowKey`] their
//! own way, call [`admit`], and act on the [`Admission`]; none of them decides on its own.
//! The one exception is the forward proxies (`http-connect`, `socks5`): a name resolves to
//! several addresses and the first that policy allows is dialled, so they decide each
//! candidate through `egress::Checker::choose` and hand the chosen decision (or the policy
//! denial) to [`admit_decided`], and refusals before policy (SSRF guard, bad or unresolved
//! name) to [`refuse`]: what happens on a decision — conntrack, counters, flow log — stays
//! here, and each flow is decided once and logged once.
//!
//! [`Runtime`] (`runtime.rs`) holds what every dataplane and the control plane share: the
//! conntrack table, the policy handle (read here, written only by the control plane), the
//! metrics registry, the flow log and readiness.
//!
//! Not here: the policy itself (`policy`), reloading it (`control`), the proxy listeners'
//! sockets (`proxy`).

pub mod proxy;
mod runtime;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::conntrack::{CutSignal, EntryInit, EntryRef, FlowState, InsertError};
use crate::flow::{FlowKey, Proto};
use crate::policy::{Decision, DenyReason, FlowQuery, Generation, PolicySnapshot, Verdict};
use crate::telemetry::flowlog::{Event, EventKind};
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

/// A flow the gate let through: its conntrack entry and the signal that cuts it.
#[derive(Debug)]
pub struct Admitted {
    pub entry: EntryRef,
    pub cut: Arc<CutSignal>,
    pub generation: Generation,
}

/// The gate's answer.
#[derive(Debug)]
pub enum Admission {
    Allow(Admitted),
    /// The policy refused the flow (already counted and logged).
    Deny(DenyReason),
    /// The policy allowed it but conntrack could not track it (table full, or the same
    /// 5-tuple is already open); refused, counted and logged. Fail closed.
    Untracked(InsertError),
}

/// The one gate: decide a new flow and act on the decision.
///
/// - allow → a conntrack entry (state `state`, the generation and both workloads, a fresh
///   cut signal); `allowed` counted; an `allow` event if sampled and a `would-deny` event
///   if an audit-mode policy objects.
/// - deny → `denied` counted and a `deny` event; nothing is tracked.
///
/// The policy snapshot is loaded once; the decision is timed into `Registry::decision`.
/// Besides the two objects that outlive the call on allow (the conntrack entry and its
/// cut signal), nothing is allocated on allow; on deny the event holds only `Arc` clones.
pub fn admit(
    rt: &Runtime,
    tag: &ListenerTag,
    key: FlowKey,
    fqdn: Option<&Arc<str>>,
    state: FlowState,
    now: Instant,
) -> Admission {
    let snapshot = rt.policy.load();
    let query = FlowQuery {
        src: key.src.ip(),
        dst: key.dst.ip(),
        dst_port: key.dst.port(),
        proto: key.proto,
        fqdn: fqdn.map(|f| &**f),
    };
    let t0 = Instant::now();
    let decision = snapshot.compiled.decide(&query);
    rt.registry.decision.record(t0.elapsed());
    settle(rt, tag, key, fqdn.map(|f| &**f), || fqdn.cloned(), &snapshot, decision, state, now)
}

/// The gate for a flow whose decision was already made against `snapshot` by a caller
/// that had to choose among candidate destinations first (the egress listeners: a name
/// resolves to several addresses, each decided with the name as `fqdn`, and the first
/// that passes is dialled — `egress::Checker::choose`). It acts on that decision exactly
/// as [`admit`] does (conntrack entry, counters, `deny` / `would-deny` / sampled `allow`
/// events), so the flow is decided once and logged once, in this one place.
///
/// `decision` must come from `snapshot.compiled.decide` for `key` (with `fqdn`); the
/// name is turned into an `Arc` when the flow is tracked (the entry keeps it for
/// revalidation) or an event is written.
#[allow(clippy::too_many_arguments)]
pub fn admit_decided(
    rt: &Runtime,
    tag: &ListenerTag,
    key: FlowKey,
    fqdn: Option<&str>,
    snapshot: &Arc<PolicySnapshot>,
    decision: Decision,
    state: FlowState,
    now: Instant,
) -> Admission {
    settle(rt, tag, key, fqdn, || fqdn.map(Arc::from), snapshot, decision, state, now)
}

/// A flow refused before any policy decision could apply to it: the egress listeners'
/// SSRF guard, an invalid or unresolvable name, flowgate's own listener as destination.
/// Counted as `denied` and logged as a `deny` event with `reason` and the name; no
/// workload is named for the destination (`dst` may be unknown: port only).
pub fn refuse(
    rt: &Runtime,
    tag: &ListenerTag,
    key: FlowKey,
    fqdn: Option<&str>,
    reason: &'static str,
) {
    let snapshot = rt.policy.load();
    let src_workload = snapshot.compiled.workload_of(key.src.ip());
    ListenerCounters::inc(&tag.counters.denied);
    rt.flowlog.emit(Event {
        ts: SystemTime::now(),
        kind: EventKind::Deny,
        listener: tag.name.clone(),
        proto: key.proto,
        src: key.src,
        dst: key.dst,
        fqdn: fqdn.map(Arc::from),
        src_workload,
        dst_workload: None,
        direction: None,
        reason,
        policy: None,
        snapshot: Arc::clone(&snapshot),
    });
}

/// Acts on a decision: the shared second half of [`admit`] and [`admit_decided`].
#[allow(clippy::too_many_arguments)]
fn settle(
    rt: &Runtime,
    tag: &ListenerTag,
    key: FlowKey,
    name: Option<&str>,
    fqdn: impl Fn() -> Option<Arc<str>>,
    snapshot: &Arc<PolicySnapshot>,
    decision: Decision,
    state: FlowState,
    now: Instant,
) -> Admission {
    let event = |kind: EventKind,
                 reason: &'static str,
                 direction,
                 policy,
                 snapshot: &Arc<PolicySnapshot>| Event {
        ts: SystemTime::now(),
        kind,
        listener: tag.name.clone(),
        proto: key.proto,
        src: key.src,
        dst: key.dst,
        fqdn: fqdn(),
        src_workload: decision.src_workload,
        dst_workload: decision.dst_workload,
        direction,
        reason,
        policy,
        snapshot: snapshot.clone(),
    };
    match decision.verdict {
        Verdict::Deny(reason) => {
            ListenerCounters::inc(&tag.counters.denied);
            rt.flowlog.emit(event(
                EventKind::Deny,
                reason.cause.as_str(),
                reason.direction,
                decision.policy,
                snapshot,
            ));
            Admission::Deny(reason)
        }
        Verdict::Allow => {
            let cut = Arc::new(CutSignal::default());
            let init = || EntryInit {
                state,
                generation: snapshot.generation,
                src_workload: decision.src_workload,
                dst_workload: decision.dst_workload,
                listener: tag.index,
                cut: Some(cut.clone()),
                // Kept with the entry so a reload re-decides the flow with the name it was
                // admitted for (a `domainNames` rule may be all that allows it).
                fqdn: fqdn(),
            };
            let mut inserted = rt.conntrack.insert(key, init(), now);
            if matches!(inserted, Err(InsertError::Exists)) && replace_stale(rt, &key) {
                inserted = rt.conntrack.insert(key, init(), now);
            }
            match inserted {
                Ok(entry) => {
                    // A reload may have swapped in a new generation between the decision
                    // and the insert; its revalidation pass may already have walked the
                    // table without this entry. Decide again on the generation now in
                    // force (one extra snapshot load, no allocation), so no flow is ever
                    // tracked under a generation that denies it.
                    let current = rt.policy.load();
                    if current.generation != snapshot.generation {
                        let query = FlowQuery {
                            src: key.src.ip(),
                            dst: key.dst.ip(),
                            dst_port: key.dst.port(),
                            proto: key.proto,
                            fqdn: name,
                        };
                        let again = current.compiled.decide(&query);
                        if let Verdict::Deny(reason) = again.verdict {
                            rt.conntrack.remove(&key);
                            ListenerCounters::inc(&tag.counters.denied);
                            let current = Arc::clone(&current);
                            rt.flowlog.emit(Event {
                                src_workload: again.src_workload,
                                dst_workload: again.dst_workload,
                                ..event(
                                    EventKind::Deny,
                                    reason.cause.as_str(),
                                    reason.direction,
                                    again.policy,
                                    &current,
                                )
                            });
                            return Admission::Deny(reason);
                        }
                        entry.set_generation(current.generation);
                    }
                    ListenerCounters::inc(&tag.counters.allowed);
                    if decision.would_deny.is_some() {
                        rt.flowlog.emit(event(
                            EventKind::WouldDeny,
                            "audit",
                            None,
                            decision.would_deny,
                            snapshot,
                        ));
                    }
                    if rt.flowlog.sample_allow() {
                        rt.flowlog.emit(event(
                            EventKind::Allow,
                            "allowed",
                            None,
                            decision.policy,
                            snapshot,
                        ));
                    }
                    Admission::Allow(Admitted { entry, cut, generation: snapshot.generation })
                }
                Err(err) => {
                    let reason = match err {
                        InsertError::Full { .. } => {
                            ListenerCounters::inc(&tag.counters.conntrack_full);
                            "conntrack-full"
                        }
                        InsertError::Exists => "duplicate-flow",
                    };
                    ListenerCounters::inc(&tag.counters.denied);
                    rt.flowlog.emit(event(EventKind::Deny, reason, None, None, snapshot));
                    Admission::Untracked(err)
                }
            }
        }
    }
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
