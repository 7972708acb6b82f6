//! The in-process data-path runtime that the test harnesses (`l4_harness`, `egress_common`)
//! build from a loaded config the way the gateway does, minus the admin API and the
//! control plane's triggers: the conntrack table, the control plane (policy generation 1;
//! reload it to change the policy), the metrics registry and the flow log.

use std::sync::Arc;

use flowgate::config::Config;
use flowgate::conntrack::Conntrack;
use flowgate::control::{ControlPlane, RevokeFn};
use flowgate::dataplane::{Runtime, log_revoked};
use flowgate::telemetry::flowlog::{FlowLog, FlowLogWriter};
use flowgate::telemetry::metrics::Registry;

/// The runtime for `cfg`, the control plane that writes its policy, and the flow-log
/// writer to keep alive as long as it runs.
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
