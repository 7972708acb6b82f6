//! What every dataplane and the control plane share ([`Runtime`]), the gateway's one
//! readiness state ([`Readiness`]), and the `revoked` flow-log event for a flow the control
//! plane cut ([`log_revoked`]).
//!
//! The policy handle here is read-only for the data path: the control plane's reload is its
//! one writer.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::conntrack::{Conntrack, ConntrackConfig, Entry};
use crate::policy::{CompiledPolicy, Decision, Generation, PolicyHandle, PolicySnapshot};
use crate::telemetry::flowlog::{Event, Flow, FlowLog};
use crate::telemetry::metrics::Registry;

/// What the data path and the control plane share. Built once by the gateway (or a test);
/// every listener task holds an `Arc` of it.
#[derive(Debug)]
pub struct Runtime {
    pub conntrack: Arc<Conntrack>,
    /// The policy in force: the control plane's handle (`ControlPlane::policy`), which only
    /// its reload swaps.
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

    /// A runtime of its own over one compiled policy (generation 1, no control plane to
    /// swap it): a conntrack table of `capacity` entries, a fresh registry and no flow log.
    /// What unit tests, benches and the fuzz targets decide against without a gateway.
    pub fn standalone(compiled: CompiledPolicy, capacity: usize) -> Arc<Runtime> {
        let registry = Arc::new(Registry::default());
        let snapshot = PolicySnapshot {
            compiled,
            generation: Generation(1),
            content_hash: String::new(),
            loaded_at: std::time::SystemTime::now(),
            source_revision: Default::default(),
        };
        Runtime::new(
            Arc::new(Conntrack::new(&ConntrackConfig { capacity, ..Default::default() })),
            Arc::new(arc_swap::ArcSwap::from_pointee(snapshot)),
            registry.clone(),
            FlowLog::disabled(registry),
        )
    }

    /// The tag of the first listener (conntrack index 0) of `kind` named `name`, its
    /// counters registered in this runtime's registry; for a [`Runtime::standalone`].
    pub fn first_listener(&self, name: &str, kind: &str) -> crate::dataplane::ListenerTag {
        crate::dataplane::ListenerTag {
            index: 0,
            name: Arc::from(name),
            counters: self.registry.listener(name, kind),
        }
    }

    /// The generation of the policy in force.
    pub fn generation(&self) -> Generation {
        self.policy.load().generation
    }
}

/// Logs the `revoked` event for an established flow the control plane's revalidation has
/// just cut (the cut is the revalidation's, done once; this only reports it): the new
/// decision's reason and policy, the listener's name from the registry (an entry's listener
/// id is its index there), and `snapshot`, the generation that denied it. The gateway hands
/// this to the control plane as its `RevokeFn`.
pub fn log_revoked(
    flowlog: &FlowLog,
    registry: &Registry,
    entry: &Entry,
    decision: &Decision,
    snapshot: &Arc<PolicySnapshot>,
) {
    let listener = registry
        .listeners()
        .get(usize::from(entry.listener()))
        .map_or_else(|| Arc::from("?"), |c| Arc::from(c.name.as_str()));
    let key = entry.key();
    let fqdn = entry.fqdn().map(Arc::from);
    let flow = Flow { listener, key: &key, fqdn, snapshot: snapshot.clone() };
    flowlog.emit(Event::revoked(flow, decision));
}

/// Where the gateway is in its life, as `/readyz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyState {
    /// Listeners not bound yet.
    Starting,
    /// Every configured listener is bound and serving.
    Ready,
    /// Shutdown has begun: no new connections are accepted, open ones are finishing.
    Draining,
}

impl ReadyState {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReadyState::Starting => "starting",
            ReadyState::Ready => "ready",
            ReadyState::Draining => "draining",
        }
    }
}

/// The gateway's one readiness state: `Starting` → `Ready` (the listeners are up) →
/// `Draining` (shutdown began). It only moves forward. Cheap to clone; every clone shares
/// the state.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicU8>);

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

impl Readiness {
    pub fn state(&self) -> ReadyState {
        match self.0.load(Ordering::Acquire) {
            STARTING => ReadyState::Starting,
            READY => ReadyState::Ready,
            _ => ReadyState::Draining,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.state() == ReadyState::Ready
    }

    /// Every listener is serving. No effect once draining.
    pub fn set_ready(&self) {
        let _ = self.0.compare_exchange(STARTING, READY, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Shutdown began; for good.
    pub fn set_draining(&self) {
        self.0.store(DRAINING, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_only_moves_forward() {
        let r = Readiness::default();
        let seen = r.clone();
        assert_eq!(seen.state(), ReadyState::Starting);
        r.set_ready();
        assert!(seen.is_ready());
        r.set_draining();
        r.set_ready();
        assert_eq!(seen.state(), ReadyState::Draining, "a drain is never undone");
    }
}
