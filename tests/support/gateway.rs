//! flowgate built in-process from a loaded config with [`flowgate::gateway::Gateway::start`],
//! the one library entry `flowgate run` uses too, so a test can read its runtime (counters,
//! conntrack, flow log) directly and reload through its control plane.
//!
//! The admin API binds the config's host on port 0 (never a fixed port); its real address
//! is one of the gateway's own, which the forward proxies refuse to dial.

use std::net::SocketAddr;
use std::sync::Arc;

use flowgate::config::Config;
use flowgate::control::ControlPlane;
use flowgate::dataplane::{ReadyState, Runtime};
use flowgate::gateway::Gateway;

/// A gateway running in this process.
pub struct InProcess {
    pub rt: Arc<Runtime>,
    /// The one writer of `rt.policy`: reload it to change the policy.
    pub control: ControlPlane,
    pub gateway: Gateway,
}

impl InProcess {
    /// The bound address of the listener called `name`.
    ///
    /// # Panics
    /// When the config has no such listener.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.gateway.listener_addr(name).unwrap_or_else(|| panic!("no listener {name}"))
    }

    /// Where the gateway's own admin API listens.
    pub fn admin(&self) -> SocketAddr {
        self.gateway.admin_addr()
    }
}

/// Starts the gateway `cfg` describes in-process (on the current tokio runtime): its admin
/// API on the config's host, port 0, and every listener with the config's `[dns]`, `[ssrf]`
/// and `[[credential]]`.
///
/// # Panics
/// When the gateway does not start (the config's policy does not load, a listener cannot
/// bind…).
pub fn start(cfg: &Config) -> InProcess {
    let mut cfg = cfg.clone();
    cfg.admin.bind.set_port(0);
    let gateway = Gateway::start(cfg).unwrap_or_else(|e| panic!("gateway start: {e:?}"));
    assert_eq!(gateway.readiness().state(), ReadyState::Ready);
    InProcess { rt: gateway.runtime().clone(), control: gateway.control().clone(), gateway }
}

/// A gateway with its own (multi-threaded) tokio runtime, for tests that call the gate
/// directly from a plain `#[test]` thread: the gateway's tasks run on the runtime's
/// workers, never on the test's thread.
pub struct Standalone {
    // Declared first: the gateway is dropped while its runtime still exists.
    pub gateway: InProcess,
    _tokio: tokio::runtime::Runtime,
}

/// [`start`] on a tokio runtime of its own: the data-path runtime (conntrack, policy
/// generation 1, metrics, flow log) and the control plane of a gateway with the config's
/// listeners (none, for a config without `[[listener]]`).
pub fn runtime(cfg: &Config) -> Standalone {
    let tokio =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let gateway = {
        let _in = tokio.enter();
        start(cfg)
    };
    Standalone { gateway, _tokio: tokio }
}
