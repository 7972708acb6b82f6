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
//! [`Runtime`] holds what every dataplane and the control plane share: the conntrack
//! table, the policy handle, the metrics registry, the flow log and readiness.
//!
//! Not here: the policy itself (`policy`), reloading it (`control`), the proxy listeners'
//! sockets (`proxy`).

pub mod packet;
pub mod proxy;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use crate::conntrack::{Conntrack, CutSignal, Entry, EntryInit, EntryRef, FlowState, InsertError};
use crate::flow::{FlowKey, Proto};
use crate::policy::{
    Decision, DenyReason, FlowQuery, Generation, PolicyHandle, PolicySnapshot, Verdict,
};
use crate::telemetry::flowlog::{Event, EventKind, FlowLog};
use crate::telemetry::metrics::{ListenerCounters, Registry};

/// What the data path and the control plane share. Built once by `flowgate run` (or a
/// test); every listener task holds an `Arc` of it.
#[derive(Debug)]
pub struct Runtime {
    pub conntrack: Arc<Conntrack>,
    pub policy: PolicyHandle,
    pub registry: Arc<Registry>,
    pub flowlog: FlowLog,
    pub readiness: Readiness,
}

impl Runtime {
    pub fn new(
        conntrack: Arc<Conntrack>,
        policy: PolicyHandle,
        registry: Arc<Registry>,
        flowlog: FlowLog,
    ) -> Arc<Runtime> {
        Arc::new(Runtime { conntrack, policy, registry, flowlog, readiness: Readiness::default() })
    }

    /// The generation of the policy in force.
    pub fn generation(&self) -> Generation {
        self.policy.load().generation
    }

    /// Swaps in a new policy (built and compiled off the data path). New flows see it at
    /// once; established flows keep their entries until the caller revalidates them.
    /// Returns the snapshot it replaced.
    pub fn swap_policy(&self, snapshot: PolicySnapshot) -> Arc<PolicySnapshot> {
        self.policy.swap(Arc::new(snapshot))
    }

    /// Cuts an established flow that `snapshot` (the new generation) no longer allows:
    /// fires the entry's cut signal (its forwarding task resets both sides and removes the
    /// entry) and logs a `revoked` event with the new decision's reason and policy. The
    /// control plane's revalidation calls this for every entry whose re-decision
    /// (`snapshot.compiled.decide(..)` on `entry.key` and `entry.fqdn`) is a denial; entries still allowed
    /// just get `entry.set_generation(snapshot.generation)`. An entry without a cut handle
    /// (a packet-dataplane flow) is not removed here: the caller removes it from conntrack.
    pub fn revoke(&self, entry: &Entry, snapshot: &Arc<PolicySnapshot>, decision: &Decision) {
        entry.trigger_cut();
        let (direction, reason) = match decision.verdict {
            Verdict::Deny(r) => (r.direction, r.cause.as_str()),
            Verdict::Allow => (None, "revoked"),
        };
        let listener = self
            .registry
            .listeners()
            .get(usize::from(entry.listener()))
            .map_or_else(|| Arc::from("?"), |c| Arc::from(c.name.as_str()));
        let key = entry.key();
        self.flowlog.emit(Event {
            ts: SystemTime::now(),
            kind: EventKind::Revoked,
            listener,
            proto: key.proto,
            src: key.src,
            dst: key.dst,
            fqdn: entry.fqdn().map(Arc::from),
            src_workload: decision.src_workload,
            dst_workload: decision.dst_workload,
            direction,
            reason,
            policy: decision.policy,
            snapshot: snapshot.clone(),
        });
    }
}

/// Whether every configured listener is bound and serving (for `/readyz`). Set by the
/// proxy once all listeners are up, cleared when shutdown starts.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}

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

/// Why the policy could not be turned into a snapshot at start-up.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Load(#[from] crate::policy::LoadErrors),
    #[error("{0}")]
    Compile(#[from] crate::policy::CompileError),
}

/// Loads and compiles the configured policy into a snapshot of `generation` (cold path;
/// start-up uses generation 1). The content hash covers the inventory and every file
/// under the policy directory, in path order.
///
/// # Errors
/// Every load problem at once, or the compile error.
pub fn build_snapshot(
    cfg: &crate::config::PolicyConfig,
    generation: Generation,
) -> Result<PolicySnapshot, SnapshotError> {
    use sha2::{Digest, Sha256};
    let set = crate::policy::load::load(&cfg.dir, &cfg.inventory)?;
    let now = SystemTime::now();
    let opts = crate::policy::CompileOptions { default: cfg.default, unknown: cfg.unknown, now };
    let compiled = crate::policy::CompiledPolicy::compile(&set, &opts)?;
    let mut hasher = Sha256::new();
    let mut files = vec![cfg.inventory.clone()];
    collect_files(&cfg.dir, &mut files);
    files[1..].sort();
    for f in &files {
        hasher.update(f.to_string_lossy().as_bytes());
        hasher.update(std::fs::read(f).unwrap_or_default());
    }
    Ok(PolicySnapshot {
        compiled,
        generation,
        content_hash: hex::encode(hasher.finalize()),
        loaded_at: now,
    })
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    if dir.is_file() {
        out.push(dir.to_owned());
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}
