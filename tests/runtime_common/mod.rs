//! The in-process data-path runtime that the test harnesses (`l4_harness`, `egress_common`)
//! build from a loaded config the way `flowgate run` does, minus the control plane: the
//! conntrack table, the policy at generation 1, the metrics registry and the flow log.

use std::sync::Arc;

use arc_swap::ArcSwap;
use flowgate::config::Config;
use flowgate::conntrack::Conntrack;
use flowgate::dataplane::{Runtime, build_snapshot};
use flowgate::policy::Generation;
use flowgate::telemetry::flowlog::{FlowLog, FlowLogWriter};
use flowgate::telemetry::metrics::Registry;

/// The runtime for `cfg`, and the flow-log writer to keep alive as long as it runs.
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
