//! The gateway: every running part of flowgate, started in one place and stopped in one
//! place. `flowgate run` is a [`Gateway`] between two signals; tests start the same one.
//!
//! [`Gateway::start`] wires, in order: the metrics registry and the flow log; the conntrack
//! table; the control plane (generation 1 of the policy; a bad policy stops start-up here),
//! whose revalidation cuts a revoked flow once and hands it to [`log_revoked`] for the
//! flow log; the data path's [`Runtime`] over the control plane's policy handle (the control
//! plane stays its one writer); the admin API (first, so the forward proxies know its real
//! address and never dial it); the control plane's triggers (source watcher, SIGHUP,
//! expiry timer); every listener; the packet filter's workers when `[packet]` is
//! configured; and the conntrack expiry task. Readiness moves
//! `Starting` → `Ready` once the listeners serve, and to `Draining` when
//! [`Gateway::stop_accepting`] or [`Gateway::drain`] begins.
//!
//! This module is the top of the crate's layers: it imports the others, none imports it.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::task::JoinHandle;

use crate::admin::{AdminError, AdminServer, AdminState};
use crate::config::Config;
use crate::conntrack::Conntrack;
use crate::control::{ControlError, ControlPlane, ControlTasks, RevokeFn};
use crate::dataplane::packet::worker::{PacketError, PacketWorkers};
use crate::dataplane::proxy::{self, EgressSettings, ProxyError, RunningListener};
use crate::dataplane::{Readiness, Runtime, log_revoked};
use crate::egress::Credentials;
use crate::egress::auth::CredentialError;
use crate::shutdown::Shutdown;
use crate::telemetry::flowlog::{FlowLog, FlowLogWriter};
use crate::telemetry::metrics::Registry;

/// Why the gateway did not start. Whatever was started before the failing step is stopped
/// again.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("flow log {output}")]
    FlowLog {
        output: String,
        #[source]
        source: std::io::Error,
    },
    #[error("[[credential]]")]
    Credentials(#[source] CredentialError),
    #[error("control plane")]
    Control(#[source] ControlError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Listeners(#[from] ProxyError),
    #[error("packet filter")]
    Packet(#[source] PacketError),
}

/// A running gateway. Dropping it without [`Gateway::drain`] stops its tasks at once.
#[derive(Debug)]
pub struct Gateway {
    runtime: Arc<Runtime>,
    control: ControlPlane,
    listeners: Vec<RunningListener>,
    /// The packet filter's worker threads (`[packet]`); stopped at the end of a drain.
    packet: Option<PacketWorkers>,
    shutdown: Shutdown,
    expiry: Option<JoinHandle<()>>,
    flowlog: Option<FlowLogWriter>,
    // Declared last: dropped after the listeners stop, so `/readyz` answers while draining.
    admin: AdminServer,
    _triggers: ControlTasks,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Every connection finished within the grace period.
    pub in_time: bool,
    /// From the start of the drain to its end.
    pub elapsed: Duration,
}

impl Gateway {
    /// Starts everything `cfg` describes. Must be called inside a (multi-threaded) tokio
    /// runtime; returns once every listener is bound and serving (readiness `Ready`).
    ///
    /// # Errors
    /// [`StartError`] naming the step that failed: the flow-log output cannot be opened,
    /// a `[[credential]]` is wrong, the policy is rejected (or the control plane's audit log,
    /// emergency state, watcher or SIGHUP handler cannot be set up), the admin API cannot
    /// bind or has no token on a non-loopback address, the packet filter's device cannot be
    /// opened, or a listener cannot bind.
    pub fn start(cfg: Config) -> Result<Gateway, StartError> {
        let registry = Arc::new(Registry::default());
        let (flowlog, writer) = FlowLog::start(&cfg.flowlog, registry.clone())
            .map_err(|source| StartError::FlowLog { output: cfg.flowlog.output.clone(), source })?;
        let credentials =
            Credentials::from_config(&cfg.credential).map_err(StartError::Credentials)?;
        let conntrack = Arc::new(Conntrack::new(&cfg.conntrack));
        let on_revoke: RevokeFn = {
            let (flowlog, registry) = (flowlog.clone(), registry.clone());
            Arc::new(move |entry, decision, snapshot| {
                log_revoked(&flowlog, &registry, entry, decision, snapshot);
            })
        };
        let control =
            ControlPlane::new(cfg.clone(), conntrack.clone(), registry.clone(), on_revoke)
                .map_err(StartError::Control)?;
        let runtime = Runtime::new(conntrack, control.policy(), registry, flowlog);
        let admin =
            AdminServer::start(AdminState::new(control.clone(), runtime.readiness.clone())?)?;
        let triggers = control.start().map_err(StartError::Control)?;
        let shutdown = Shutdown::new();
        let egress = EgressSettings {
            dns: cfg.dns.clone(),
            ssrf: cfg.ssrf.clone(),
            other_own: vec![admin.local_addr()],
        };
        let listeners = proxy::start_with_credentials(
            &runtime,
            &cfg.listener,
            &egress,
            Arc::new(credentials),
            &shutdown,
        )?;
        // After the listeners, so a listener's conntrack id stays its config index.
        let packet = match cfg.packet.as_ref().map(|p| PacketWorkers::start(&runtime, p)) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                // The listeners already serve: stop them again.
                runtime.readiness.set_draining();
                shutdown.trigger();
                for l in &listeners {
                    l.task.abort();
                }
                return Err(StartError::Packet(e));
            }
        };
        let expiry = spawn_expiry(&runtime.conntrack, &cfg, &shutdown);
        Ok(Gateway {
            runtime,
            control,
            listeners,
            packet,
            shutdown,
            expiry: Some(expiry),
            flowlog: Some(writer),
            admin,
            _triggers: triggers,
        })
    }

    /// Where the admin API listens (the real port when the config said `:0`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// The listeners, in config order, with their bound addresses.
    pub fn listeners(&self) -> &[RunningListener] {
        &self.listeners
    }

    /// The bound address of the listener called `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|l| l.name == name).map(|l| l.local_addr)
    }

    /// The packet filter, when `[packet]` is configured.
    pub fn packet(&self) -> Option<&PacketWorkers> {
        self.packet.as_ref()
    }

    /// What the data path shares: conntrack, the policy handle, metrics, the flow log.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The control plane (reloads, emergency entries, status).
    pub fn control(&self) -> &ControlPlane {
        &self.control
    }

    pub fn readiness(&self) -> &Readiness {
        &self.runtime.readiness
    }

    /// Connections (and UDP sessions) open now, over every listener.
    pub fn open_connections(&self) -> u64 {
        self.runtime.registry.listeners().iter().map(|c| c.active.load(Ordering::Relaxed)).sum()
    }

    /// Starts shutting down: readiness becomes `Draining` and every listener stops
    /// accepting. Open connections go on until [`Gateway::drain`] ends.
    pub fn stop_accepting(&self) {
        self.runtime.readiness.set_draining();
        self.shutdown.trigger();
    }

    /// Stops accepting (if not yet), waits up to `grace` for open connections to finish,
    /// then stops every task and flushes the flow log. The admin API answers (`/readyz`:
    /// draining) until the end.
    pub async fn drain(mut self, grace: Duration) -> Drained {
        self.stop_accepting();
        let started = Instant::now();
        let in_time = self.shutdown.drain(grace).await;
        let elapsed = started.elapsed();
        if let Some(expiry) = self.expiry.take() {
            let _ = expiry.await;
        }
        for l in &self.listeners {
            l.task.abort();
        }
        if let Some(packet) = self.packet.take() {
            // Joining waits up to one wake interval per worker: off the async workers.
            let _ = tokio::task::spawn_blocking(move || packet.stop()).await;
        }
        if let Some(writer) = self.flowlog.take() {
            writer.finish();
        }
        Drained { in_time, elapsed }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.runtime.readiness.set_draining();
        self.shutdown.trigger();
        for l in &self.listeners {
            l.task.abort();
        }
        if let Some(expiry) = &self.expiry {
            expiry.abort();
        }
    }
}

/// The conntrack expiry task: every `run.expiry_interval`, at most `run.expiry_budget`
/// entries are looked at (the table is never scanned whole at once). Stops on shutdown.
fn spawn_expiry(conntrack: &Arc<Conntrack>, cfg: &Config, shutdown: &Shutdown) -> JoinHandle<()> {
    let conntrack = conntrack.clone();
    let mut stop = shutdown.signal();
    let every = cfg.run.expiry_interval;
    let budget = cfg.run.expiry_budget;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => { conntrack.expire_step(Instant::now(), budget); }
                () = stop.recv() => return,
            }
        }
    })
}
