//! flowgate built in-process from a loaded config, the way [`flowgate::gateway::Gateway`]
//! builds it minus the admin API and the control plane's triggers, so a test can read its
//! runtime (counters, conntrack, flow log) directly and reload through its control plane.
//!
//! This file is the only place the tests wire the library's data-path pieces together
//! (`ControlPlane::new`, `Runtime::new`, `proxy::start_with_credentials`): when that API
//! changes, only these functions change.

use std::net::SocketAddr;
use std::sync::Arc;

use flowgate::config::Config;
use flowgate::conntrack::Conntrack;
use flowgate::control::{ControlPlane, RevokeFn};
use flowgate::dataplane::proxy::{self, EgressSettings, RunningListener};
use flowgate::dataplane::{ReadyState, Runtime, log_revoked};
use flowgate::egress::Credentials;
use flowgate::shutdown::Shutdown;
use flowgate::telemetry::flowlog::{FlowLog, FlowLogWriter};
use flowgate::telemetry::metrics::Registry;

/// A gateway running in this process.
pub struct InProcess {
    pub rt: Arc<Runtime>,
    /// The one writer of `rt.policy`: reload it to change the policy.
    pub control: ControlPlane,
    pub shutdown: Shutdown,
    pub listeners: Vec<RunningListener>,
    /// The flow-log writer: dropped (or finished) with the gateway.
    pub writer: FlowLogWriter,
}

/// Starts every listener of `cfg` in-process (on the current tokio runtime), with the
/// config's `[dns]`, `[ssrf]` and `[[credential]]`; `other_own` is treated as flowgate's
/// own addresses besides its listeners (as the gateway does with the admin API's).
///
/// # Panics
/// When the config's policy does not load or a listener cannot start.
pub fn start(cfg: &Config, other_own: Vec<SocketAddr>) -> InProcess {
    let (rt, control, writer) = runtime(cfg);
    let shutdown = Shutdown::new();
    let egress = EgressSettings { dns: cfg.dns.clone(), ssrf: cfg.ssrf.clone(), other_own };
    let creds = Arc::new(Credentials::from_config(&cfg.credential).unwrap());
    let listeners =
        proxy::start_with_credentials(&rt, &cfg.listener, &egress, creds, &shutdown).unwrap();
    assert_eq!(rt.readiness.state(), ReadyState::Ready);
    InProcess { rt, control, shutdown, listeners, writer }
}

/// The data-path runtime alone (no listener): the conntrack table, the control plane
/// (policy generation 1; reload it to change the policy), the metrics registry and the
/// flow log — for tests that call the gate directly. Keep the writer alive as long as the
/// runtime runs.
pub fn runtime(cfg: &Config) -> (Arc<Runtime>, ControlPlane, FlowLogWriter) {
    let registry = Arc::new(Registry::default());
    let (flowlog, writer) = FlowLog::start(&cfg.flowlog, registry.clone()).unwrap();
    let conntrack = Arc::new(Conntrack::new(&cfg.conntrack));
    let on_revoke: RevokeFn = {
        let (flowlog, registry) = (flowlog.clone(), registry.clone());
        Arc::new(move |e, d, s| log_revoked(&flowlog, &registry, e, d, s))
    };
    let control =
        ControlPlane::new(cfg.clone(), conntrack.clone(), registry.clone(), on_revoke).unwrap();
    let rt = Runtime::new(conntrack, control.policy(), registry, flowlog);
    (rt, control, writer)
}
