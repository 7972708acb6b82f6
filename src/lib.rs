//! flowgate: a userspace packet-filtering proxy that enforces Kubernetes network policy
//! at a perimeter.
//!
//! # Layout
//!
//! The modules follow the data path:
//!
//! ```text
//!  bytes/packets in ──► flow key ──► conntrack lookup ──hit──► forward (counters, state)
//!  (dataplane, wire)    (flow)       (conntrack)    │ miss
//!                                                   ▼
//!                   dataplane::admit: policy.load().decide  (the one gate)
//!                           │ allow                 │ deny
//!                           ▼                       ▼
//!                 insert conntrack entry      drop / refuse + flow log event
//!                 forward (dataplane::proxy)  + counters (telemetry)
//! ```
//!
//! - [`flow`]: the shared vocabulary (`FlowKey`, `Proto`, `Direction`, address newtypes).
//! - [`policy`]: loading Kubernetes policy YAML, compiling it, deciding one flow; the
//!   reachability diff between two policy sets and policy generated from flow logs.
//! - [`wire`]: untrusted bytes (PROXY protocol, SOCKS5, CONNECT, SNI), parsed in place.
//! - [`conntrack`]: the sharded, bounded connection-tracking table.
//! - [`dataplane`]: `admit`, the one gate every new flow passes; the proxy listeners
//!   (`dataplane::proxy`, connections) and the packet filter (`dataplane::packet`: TUN and
//!   AF_PACKET front ends, classify → conntrack batch lookup → the gate per new flow).
//! - [`egress`]: names, resolution, the SSRF guard, proxy credentials and handshakes for the
//!   forward-proxy listeners.
//! - [`telemetry`]: the flow log and metrics.
//! - [`control`]: loading, swapping and re-checking policy; emergency policies; audit; the
//!   etcd policy source, its watch and the fleet's replica reports.
//! - [`admin`]: the admin HTTP API (health, metrics, policy, flows, reload).
//! - [`config`]: the main configuration file, every section's types.
//! - [`gateway`]: all of the above started, wired and stopped as one (`flowgate run`).
//! - [`shutdown`]: the stop signal and the drain; [`human_duration`]: `30s`-style config
//!   durations.
//!
//! Everything that is not on the per-flow path (loading, compiling, reloading, the admin
//! API) is control plane and never blocks the data path.
//!
//! # Layers
//!
//! A module imports only from the rows below its own (`tests/layers.rs` holds every import
//! between top-level modules to these rows, and fails on an import cycle):
//!
//! ```text
//!  gateway                       wires everything; nothing imports it
//!  admin                         HTTP over the control plane and the runtime
//!  control      dataplane        the policy's one writer | the proxies and the gate
//!  telemetry                     flow log, metrics, Prometheus text
//!  config                        every section's types
//!  egress       conntrack
//!  wire         policy
//!  flow         human_duration   shutdown
//! ```

pub mod admin;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod dataplane;
pub mod egress;
pub mod flow;
pub mod gateway;
pub mod human_duration;
pub mod policy;
pub mod shutdown;
pub mod telemetry;
pub mod wire;

/// What the fuzz targets (`fuzz/`) need that is not public API: each item is the very
/// function the gateway runs on outside bytes, re-exported here so no module widens its
/// own visibility for the fuzzer. Not a stable interface.
#[doc(hidden)]
pub mod fuzzing {
    /// `GET /explain?…`: the query string parsed and answered against a policy snapshot,
    /// as the admin handler does (`Err` is the message of its `400`).
    ///
    /// # Errors
    /// The message the handler answers `400 Bad Request` with.
    pub fn admin_explain(
        snap: &crate::policy::PolicySnapshot,
        query: &str,
    ) -> Result<serde_json::Value, String> {
        crate::admin::server::explain_answer(snap, query)
    }
}
