//! Control plane: everything that changes what the data path does, done off the data path.
//!
//! [`ControlPlane`] owns the policy handle the data path reads and is the only writer of
//! it. It loads generation 1 at start-up ([`ControlPlane::new`]), then reloads on file
//! changes, SIGHUP, `POST /reload`, emergency requests and expiries ([`ControlPlane::start`]
//! spawns those triggers and the admin API). Each reload is load → compile → swap
//! ([`reload`]), serialised (one at a time, in a blocking thread), written to the audit
//! trail ([`audit`]), counted in the metrics, and followed by a re-check of established
//! flows ([`revalidate`]) when `policy.on_change = "revalidate"`. Emergency policies and
//! quarantines live in an overlay ([`emergency`]) that every reload lays over the files.
//!
//! Not here: deciding (`policy`), admitting flows (`dataplane`), HTTP (`admin`, which
//! calls into this module), and writing the `revoked` flow-log event (the caller's
//! callback does, so this module stays independent of the flow log).
//!
//! # Wiring (what `flowgate run` does)
//!
//! ```ignore
//! let conntrack = Arc::new(Conntrack::new(&cfg.conntrack));
//! let metrics = Arc::new(Registry::default());
//! let on_revoke: RevokeFn = Arc::new(move |entry, decision| { /* flow log: revoked */ });
//! let control = ControlPlane::new(cfg.clone(), conntrack.clone(), metrics.clone(), on_revoke)?;
//! let policy = control.policy();      // PolicyHandle for dataplane::admit
//! let tasks = control.start().await?; // admin API, watcher, SIGHUP, expiry timer
//! // … bind every listener …
//! control.readiness().store(true, Ordering::Release);
//! // on shutdown: drop(tasks) (or tasks.shutdown())
//! ```

pub mod audit;
pub mod emergency;
pub mod reload;
pub mod revalidate;
pub mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use thiserror::Error;

use crate::config::{Config, OnChange};
use crate::conntrack::{Conntrack, Entry};
use crate::policy::{Decision, PolicyHandle};
use crate::telemetry::metrics::Registry;

pub use emergency::{EmergencyEntry, EmergencyError, EmergencyRequest, Overlay, OverlayLimits};
pub use reload::{ReloadError, ReloadReport, ReloadResult, Reloader, Sources, Trigger};

/// `[control]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Quiet time after a change that may leave a file incomplete (a create, a write still
    /// open, a removal) before reloading. Default `50ms`.
    #[serde(with = "duration_text")]
    pub debounce: Duration,
    /// Append audit events (one JSON line per reload attempt) to this file; default: stderr.
    pub audit_log: Option<PathBuf>,
    /// Entries re-checked between yields during revalidation. Default 4096.
    pub revalidate_batch: usize,
    /// Keep emergency policies in this JSON file so they survive a restart; default: none
    /// (memory only).
    pub emergency_state: Option<PathBuf>,
    /// Most emergency entries active at once. Default 64.
    pub emergency_max: usize,
    /// Longest TTL an emergency entry may have. Default `24h`.
    #[serde(with = "duration_text")]
    pub emergency_max_ttl: Duration,
    /// Watch the policy sources for changes. Default true.
    pub watch: bool,
    /// Quiet time after a change that leaves a policy file or the inventory whole (renamed
    /// into place, written and closed) before reloading: gathers a machine-made burst into
    /// one reload. Default `5ms`; set it to `debounce` to wait alike for every change.
    #[serde(with = "duration_text")]
    pub settle: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            debounce: Duration::from_millis(50),
            audit_log: None,
            revalidate_batch: 4096,
            emergency_state: None,
            emergency_max: 64,
            emergency_max_ttl: Duration::from_secs(24 * 3600),
            watch: true,
            settle: Duration::from_millis(5),
        }
    }
}

impl ControlConfig {
    /// Makes relative paths relative to the config file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.audit_log, &mut self.emergency_state].into_iter().flatten() {
            *p = base.join(&*p);
        }
    }
}

/// Durations written the human way (`50ms`, `24h`).
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Start-up and task errors of the control plane.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("initial policy rejected: {0}")]
    InitialPolicy(#[source] ReloadError),
    #[error(transparent)]
    Emergency(#[from] EmergencyError),
    #[error("{}: cannot open audit log: {source}", path.display())]
    AuditLog { path: PathBuf, source: std::io::Error },
    #[error("admin: cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(
        "admin: refusing to listen on non-loopback {addr} without a token \
         (set admin.token or admin.token_env)"
    )]
    NoToken { addr: SocketAddr },
    #[error("admin: environment variable {var} (admin.token_env) is not set or empty")]
    TokenEnv { var: String },
    #[error("watching policy sources: {0}")]
    Watch(#[from] notify::Error),
    #[error("installing the SIGHUP handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Called once for every flow a reload cuts, with the entry and the new decision, so the
/// caller can write the `revoked` flow-log event. Runs on the reload thread.
pub type RevokeFn = Arc<dyn Fn(&Entry, &Decision) + Send + Sync>;

/// What `/policy` shows about recent reloads.
#[derive(Clone, Debug, Default)]
pub struct ReloadStatus {
    /// The most recent attempt.
    pub last: Option<ReloadReport>,
    /// The most recent rejected attempt, while no later attempt has succeeded.
    pub failing: Option<ReloadReport>,
}

pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) handle: PolicyHandle,
    pub(crate) conntrack: Arc<Conntrack>,
    pub(crate) metrics: Arc<Registry>,
    pub(crate) ready: Arc<AtomicBool>,
    pub(crate) token: Option<String>,
    on_revoke: RevokeFn,
    /// Lock order: `reloader`, then `overlay`, then `status`.
    reloader: Mutex<Reloader>,
    overlay: Mutex<Overlay>,
    status: Mutex<ReloadStatus>,
    audit: audit::AuditLog,
    pub(crate) expiry_changed: tokio::sync::Notify,
}

/// The control plane. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct ControlPlane {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").field("generation", &self.generation()).finish()
    }
}

/// The background tasks [`ControlPlane::start`] spawned; aborted on drop.
#[derive(Debug)]
pub struct ControlTasks {
    /// Where the admin API listens (the real port when the config said `:0`).
    pub admin_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _watcher: Option<watch::SourceWatcher>,
}

impl ControlTasks {
    /// Stops every task (admin API, watcher, signal handler, expiry timer).
    pub fn shutdown(self) {}
}

impl Drop for ControlTasks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ControlPlane {
    /// Loads and compiles generation 1 (with the emergency overlay from
    /// `control.emergency_state`, if any) and resolves the admin token.
    ///
    /// # Errors
    /// [`ControlError`]: the policy or inventory is bad (each problem names file, object
    /// and field), the emergency state file is unreadable, the audit log cannot be opened,
    /// or the admin token cannot be resolved / is required and missing.
    pub fn new(
        cfg: Config,
        conntrack: Arc<Conntrack>,
        metrics: Arc<Registry>,
        on_revoke: RevokeFn,
    ) -> Result<ControlPlane, ControlError> {
        let now = SystemTime::now();
        let token = cfg.admin.resolve_token()?;
        if token.is_none() && !cfg.admin.bind.ip().is_loopback() {
            return Err(ControlError::NoToken { addr: cfg.admin.bind });
        }
        let audit = audit::AuditLog::open(cfg.control.audit_log.as_deref()).map_err(|source| {
            ControlError::AuditLog {
                path: cfg.control.audit_log.clone().unwrap_or_default(),
                source,
            }
        })?;
        let overlay = Overlay::open(
            cfg.control.emergency_state.clone(),
            OverlayLimits {
                max_entries: cfg.control.emergency_max,
                max_ttl: cfg.control.emergency_max_ttl,
            },
            now,
        )?;
        let sources = Sources {
            dir: cfg.policy.dir.clone(),
            inventory: cfg.policy.inventory.clone(),
            default: cfg.policy.default,
            unknown: cfg.policy.unknown,
        };
        let (reloader, report) =
            Reloader::initial(sources, &overlay, now).map_err(ControlError::InitialPolicy)?;
        let handle = reloader.handle().clone();
        metrics.control.record_reload(&report);
        let _ = audit.write(&report);
        let shared = Shared {
            cfg,
            handle,
            conntrack,
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            token,
            on_revoke,
            reloader: Mutex::new(reloader),
            overlay: Mutex::new(overlay),
            status: Mutex::new(ReloadStatus { last: Some(report), failing: None }),
            audit,
            expiry_changed: tokio::sync::Notify::new(),
        };
        Ok(ControlPlane { shared: Arc::new(shared) })
    }

    /// The handle the data path reads (`handle.load()` once per new flow).
    pub fn policy(&self) -> PolicyHandle {
        self.shared.handle.clone()
    }

    /// Set to `true` by the caller once every listener is bound; `/readyz` needs it.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        self.shared.ready.clone()
    }

    pub fn metrics(&self) -> &Arc<Registry> {
        &self.shared.metrics
    }

    pub fn conntrack(&self) -> &Arc<Conntrack> {
        &self.shared.conntrack
    }

    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// The generation in force.
    pub fn generation(&self) -> u64 {
        self.shared.handle.load().generation.0
    }

    /// Recent reload results, for `/policy`.
    pub fn status(&self) -> ReloadStatus {
        lock(&self.shared.status).clone()
    }

    /// Active emergency entries.
    pub fn emergency_entries(&self) -> Vec<EmergencyEntry> {
        lock(&self.shared.overlay).entries().to_vec()
    }

    /// The earliest expiry of the policy in force or of an emergency entry.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        let compiled = self.shared.handle.load().compiled.next_expiry();
        let overlay = lock(&self.shared.overlay).next_expiry();
        match (compiled, overlay) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Starts the triggers and the admin API: binds `admin.bind`, watches the sources
    /// (unless `control.watch = false`), installs the SIGHUP handler and the expiry timer.
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`ControlError`] when the admin address cannot be bound, the watcher cannot start or
    /// the signal handler cannot be installed; nothing is left running then.
    pub async fn start(&self) -> Result<ControlTasks, ControlError> {
        let bind = self.shared.cfg.admin.bind;
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|source| ControlError::Bind { addr: bind, source })?;
        let admin_addr =
            listener.local_addr().map_err(|source| ControlError::Bind { addr: bind, source })?;
        let mut tasks = Vec::new();
        let mut watcher = None;
        if self.shared.cfg.control.watch {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let timing = watch::WatchTiming {
                debounce: self.shared.cfg.control.debounce,
                settle: self.shared.cfg.control.settle,
                last_complete: Arc::new(AtomicBool::new(false)),
            };
            watcher = Some(watch::watch_sources(
                &self.shared.cfg.policy.dir,
                &self.shared.cfg.policy.inventory,
                tx,
                &timing,
            )?);
            tasks.push(tokio::spawn(watch::debounce_loop(self.clone(), rx, timing)));
        }
        tasks.push(watch::spawn_sighup(self.clone()).map_err(ControlError::Signal)?);
        tasks.push(tokio::spawn(watch::expiry_loop(self.clone())));
        tasks.push(tokio::spawn(crate::admin::serve(listener, self.clone())));
        Ok(ControlTasks { admin_addr, tasks, _watcher: watcher })
    }

    /// One reload attempt, serialised with every other, in a blocking thread. Never fails:
    /// the report says what happened (and on error, the old generation stays in force).
    pub async fn reload(&self, trigger: Trigger) -> ReloadReport {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.reload_blocking(trigger)).await {
            Ok(report) => report,
            // Only when the runtime shuts down under us (a panic in the reload would be a
            // bug and is passed on): report the attempt as failed, nothing was swapped.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => self.cancelled_report(trigger),
        }
    }

    fn cancelled_report(&self, trigger: Trigger) -> ReloadReport {
        let snap = self.shared.handle.load();
        ReloadReport {
            time: SystemTime::now(),
            trigger,
            result: ReloadResult::Error,
            generation: snap.generation.0,
            hash: snap.content_hash.clone(),
            rejected_hash: None,
            duration: Duration::ZERO,
            compile_duration: Duration::ZERO,
            changes: None,
            errors: vec![reload::Problem {
                file: None,
                object: None,
                field: None,
                message: "reload cancelled: the runtime is shutting down".into(),
            }],
            revalidated: 0,
            revoked: 0,
            phases: reload::Phases::default(),
        }
    }

    /// [`ControlPlane::reload`] for callers outside a runtime (tests, benches, tools).
    pub fn reload_blocking(&self, trigger: Trigger) -> ReloadReport {
        let mut reloader = lock(&self.shared.reloader);
        self.reload_locked(&mut reloader, trigger)
    }

    fn reload_locked(&self, reloader: &mut Reloader, trigger: Trigger) -> ReloadReport {
        let now = SystemTime::now();
        let mut report = {
            let mut overlay = lock(&self.shared.overlay);
            overlay.prune(now);
            reloader.apply(trigger, &overlay, now)
        };
        if report.result == ReloadResult::Ok
            && self.shared.cfg.policy.on_change == OnChange::Revalidate
        {
            let snapshot = self.shared.handle.load_full();
            let on_revoke = &self.shared.on_revoke;
            let stats = revalidate::revalidate(
                &self.shared.conntrack,
                &snapshot,
                self.shared.cfg.control.revalidate_batch,
                &|entry, decision| on_revoke(entry, decision),
            );
            report.revalidated = stats.checked;
            report.revoked = stats.revoked;
        }
        self.shared.metrics.control.record_reload(&report);
        if self.shared.audit.write(&report).is_err() {
            self.shared.metrics.control.audit_write_errors.fetch_add(1, Ordering::Relaxed);
        }
        {
            let mut status = lock(&self.shared.status);
            match report.result {
                ReloadResult::Error => status.failing = Some(report.clone()),
                _ => status.failing = None,
            }
            status.last = Some(report.clone());
        }
        self.shared.expiry_changed.notify_waiters();
        report
    }

    /// Adds an emergency entry and recompiles with it (a quarantine cuts the target's open
    /// flows through revalidation). Nothing changes on error.
    ///
    /// # Errors
    /// [`EmergencyError`] naming what is wrong with the request.
    pub async fn emergency(
        &self,
        req: EmergencyRequest,
    ) -> Result<(EmergencyEntry, ReloadReport), EmergencyError> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.emergency_blocking(&req)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(EmergencyError::BadRequest("shutting down".into())),
        }
    }

    /// [`ControlPlane::emergency`] for callers outside a runtime.
    ///
    /// # Errors
    /// As [`ControlPlane::emergency`].
    pub fn emergency_blocking(
        &self,
        req: &EmergencyRequest,
    ) -> Result<(EmergencyEntry, ReloadReport), EmergencyError> {
        let mut reloader = lock(&self.shared.reloader);
        let entry = {
            let mut overlay = lock(&self.shared.overlay);
            overlay.add(req, reloader.applied(), SystemTime::now())
        };
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                self.shared.metrics.control.emergency_rejected.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let report = self.reload_locked(&mut reloader, Trigger::Emergency);
        if report.result == ReloadResult::Error {
            lock(&self.shared.overlay).remove(&entry.id);
            self.shared.metrics.control.emergency_rejected.fetch_add(1, Ordering::Relaxed);
            let message = report.errors.iter().map(|p| p.to_string()).collect::<Vec<_>>();
            return Err(EmergencyError::BadRequest(format!(
                "the policy with this entry does not compile: {}",
                message.join("; ")
            )));
        }
        self.shared.metrics.control.emergency_accepted.fetch_add(1, Ordering::Relaxed);
        let _ = self.shared.audit.write(&serde_json::json!({
            "event": "emergency",
            "time": audit::format_time(SystemTime::now()),
            "id": entry.id,
            "what": entry.describe(),
            "expires_at": audit::format_time(entry.expires_at()),
            "generation": report.generation,
        }));
        Ok((entry, report))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
