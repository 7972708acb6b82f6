//! flowgate built in-process from a loaded config, the way `flowgate run` builds it minus
//! the control plane and admin API, so a test can read its runtime (counters, conntrack,
//! flow log) directly.
//!
//! This file is the only place the tests wire the library's data-path pieces together
//! (`Runtime::new`, `build_snapshot`, `proxy::start_with_credentials`, `swap_policy`):
//! when that API changes, only these functions change.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use flowgate::config::Config;
use flowgate::conntrack::Conntrack;
use flowgate::dataplane::proxy::{self, EgressSettings, RunningListener};
use flowgate::dataplane::{Runtime, build_snapshot};
use flowgate::egress::Credentials;
use flowgate::policy::{Generation, PolicySnapshot};
use flowgate::shutdown::Shutdown;
use flowgate::telemetry::flowlog::{FlowLog, FlowLogWriter};
use flowgate::telemetry::metrics::Registry;

/// A gateway running in this process.
pub struct InProcess {
    pub rt: Arc<Runtime>,
    pub shutdown: Shutdown,
    pub listeners: Vec<RunningListener>,
    /// The flow-log writer: dropped (or finished) with the gateway.
    pub writer: FlowLogWriter,
}

/// Starts every listener of `cfg` in-process (on the current tokio runtime), with the
/// config's `[dns]`, `[ssrf]` and `[[credential]]`; `other_own` is treated as flowgate's
/// own addresses besides its listeners (as `flowgate run` does with the admin API's).
///
/// # Panics
/// When the config's policy does not load or a listener cannot start.
pub fn start(cfg: &Config, other_own: Vec<SocketAddr>) -> InProcess {
    let (rt, writer) = runtime(cfg);
    let shutdown = Shutdown::new();
    let egress = EgressSettings { dns: cfg.dns.clone(), ssrf: cfg.ssrf.clone(), other_own };
    let creds = Arc::new(Credentials::from_config(&cfg.credential).unwrap());
    let listeners =
        proxy::start_with_credentials(&rt, &cfg.listener, &egress, creds, &shutdown).unwrap();
    assert!(rt.readiness.is_ready());
    InProcess { rt, shutdown, listeners, writer }
}

/// The data-path runtime alone (no listener): the conntrack table, the policy at
/// generation 1, the metrics registry and the flow log — for tests that call the gate
/// directly. Keep the writer alive as long as the runtime runs.
pub fn runtime(cfg: &Config) -> (Arc<Runtime>, FlowLogWriter) {
    let registry = Arc::new(Registry::default());
    let (flowlog, writer) = FlowLog::start(&cfg.flowlog, registry.clone()).unwrap();
    let snapshot = build_snapshot(&cfg.policy, Generation(1)).unwrap();
    let rt = Runtime::new(
        Arc::new(Conntrack::new(&cfg.conntrack)),
        Arc::new(ArcSwap::from_pointee(snapshot)),
        registry,
        flowlog,
    );
    (rt, writer)
}

/// Loads `cfg`'s policy again as `generation` and puts it in force (what a reload does,
/// without revalidation); returns the snapshot it replaced.
pub fn swap_policy(rt: &Runtime, cfg: &Config, generation: u64) -> Arc<PolicySnapshot> {
    rt.swap_policy(build_snapshot(&cfg.policy, Generation(generation)).unwrap())
}
