//! Control plane: everything that changes what the data path does, done off the data path.
//!
//! [`ControlPlane`] owns the policy handle the data path reads and is the only writer of
//! it. It loads generation 1 at start-up ([`ControlPlane::new`]), then reloads on file
//! changes, SIGHUP, `POST /reload`, emergency requests and expiries ([`ControlPlane::start`]
//! spawns the triggers). Each reload is load → compile → swap ([`reload`]), serialised (one
//! at a time, in a blocking thread), written to the audit trail ([`audit`]), counted in the
//! metrics, and followed by a re-check of established flows ([`revalidate`]) when
//! `policy.on_change = "revalidate"`: the re-check cuts each flow the new generation denies
//! (once) and tells the caller's [`RevokeFn`], which logs it. Emergency policies and
//! quarantines live in an overlay ([`emergency`]) that every reload lays over the files.
//! With `source.kind = "etcd"` the objects come from etcd instead of the files ([`source`]
//! lists and watches a key prefix through the small JSON-gateway client in [`etcd`]; each
//! replica reports what it enforces, and [`fleet`] reads those reports back).
//!
//! Not here: deciding (`policy`), admitting flows (`dataplane`), HTTP (`admin`, which
//! calls into this module; this module knows nothing of it), writing the `revoked`
//! flow-log event (the caller's callback does, so this module stays independent of the flow
//! log), and wiring it all together (`gateway`).
#![forbid(unsafe_code)]

pub mod audit;
pub mod emergency;
pub mod etcd;
pub mod fleet;
pub mod reload;
pub mod revalidate;
pub mod source;
pub mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::config::{Config, OnChange, SourceKind};
use crate::conntrack::{Conntrack, Entry};
use crate::policy::{Decision, PolicyHandle, PolicySnapshot};
use crate::telemetry::metrics::Registry;

pub use emergency::{EmergencyEntry, EmergencyError, EmergencyRequest, Overlay, OverlayLimits};
pub use reload::{
    ChangedSources, ReloadError, ReloadReport, ReloadResult, Reloader, Sources, Trigger,
};

/// Start-up and task errors of the control plane.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("initial policy rejected: {0}")]
    InitialPolicy(#[source] ReloadError),
    #[error(transparent)]
    Emergency(#[from] EmergencyError),
    #[error("{}: cannot open audit log: {source}", path.display())]
    AuditLog { path: PathBuf, source: std::io::Error },
    #[error("watching policy sources: {0}")]
    Watch(#[from] notify::Error),
    #[error("installing the SIGHUP handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("policy source: {0}")]
    Source(#[from] etcd::EtcdError),
    #[error("starting the runtime of the start-up list: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Called once for every flow a reload cut (after the cut: the callback only reports it),
/// with the entry, the new decision and the snapshot that gave it, so the caller can write
/// the `revoked` flow-log event. Runs on the reload thread.
pub type RevokeFn = Arc<dyn Fn(&Entry, &Decision, &Arc<PolicySnapshot>) + Send + Sync>;

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
    on_revoke: RevokeFn,
    /// Lock order: `reloader`, then `overlay`, then `changes`, then `status`.
    reloader: Mutex<Reloader>,
    overlay: Mutex<Overlay>,
    status: Mutex<ReloadStatus>,
    audit: audit::AuditLog,
    pub(crate) expiry_changed: tokio::sync::Notify,
    /// What the watcher saw change since the last watch-triggered reload (see
    /// [`ChangedSources`]); starts as "everything", since nothing is known of changes
    /// made before the watch began.
    changes: Arc<Mutex<ChangedSources>>,
    /// The etcd source (`source.kind = "etcd"`); `None` for files.
    pub(crate) source: Option<Arc<source::EtcdSource>>,
    source_status: Mutex<source::SourceStatus>,
    /// What the start-up list read, for the watch that [`ControlPlane::start`] begins.
    listed: Mutex<Option<(reload::Objects, i64)>>,
    /// Wakes the replica report after a reload or a change of connection.
    pub(crate) report_changed: tokio::sync::Notify,
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
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _watcher: Option<watch::SourceWatcher>,
}

impl ControlTasks {
    /// Stops every task (watcher, signal handler, expiry timer).
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
    /// `control.emergency_state`, if any).
    ///
    /// # Errors
    /// [`ControlError`]: the policy or inventory is bad (each problem names file, object
    /// and field), the emergency state file is unreadable, or the audit log cannot be
    /// opened.
    pub fn new(
        cfg: Config,
        conntrack: Arc<Conntrack>,
        metrics: Arc<Registry>,
        on_revoke: RevokeFn,
    ) -> Result<ControlPlane, ControlError> {
        let now = SystemTime::now();
        let audit = audit::AuditLog::open(cfg.control.audit_log.as_deref()).map_err(|source| {
            ControlError::AuditLog {
                path: cfg.control.audit_log.clone().unwrap_or_default(),
                source,
            }
        })?;
        let mut overlay = Overlay::open(
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
        let source = match cfg.source.kind {
            SourceKind::Files => None,
            SourceKind::Etcd => Some(Arc::new(source::EtcdSource::new(&cfg.source)?)),
        };
        let listed = match &source {
            Some(src) => Some(block_on(src.list())??),
            None => None,
        };
        if let Some(src) = &source {
            // The fleet's emergencies are in force from generation 1 on.
            overlay.set_id_prefix(&src.emergency_id_prefix());
            for entry in block_on(src.list_emergencies())?? {
                overlay.insert(entry, now);
            }
        }
        let objects = listed.as_ref().map(|(o, _)| Arc::new(o.clone()));
        let (reloader, report) = Reloader::initial_with(sources, objects, &overlay, now)
            .map_err(ControlError::InitialPolicy)?;
        let source_status = source::SourceStatus {
            kind: if source.is_some() { "etcd" } else { "files" },
            endpoints: source.as_ref().map(|s| s.client.endpoints().to_vec()).unwrap_or_default(),
            prefix: cfg.source.prefix().to_owned(),
            replica_id: source.as_ref().map(|s| s.replica_id.clone()).unwrap_or_default(),
            connected: source.is_some(),
            revision: listed.as_ref().map_or(0, |(_, r)| *r),
            unreachable_since: None,
            last_error: None,
        };
        if source.is_some() {
            let c = &metrics.control;
            c.source_remote.store(1, Ordering::Relaxed);
            c.source_connected.store(1, Ordering::Relaxed);
            c.source_revision
                .store(u64::try_from(source_status.revision).unwrap_or(0), Ordering::Relaxed);
        }
        let handle = reloader.handle().clone();
        metrics.control.record_reload(&report.sample());
        let _ = audit.write(&report);
        let shared = Shared {
            cfg,
            handle,
            conntrack,
            metrics,
            on_revoke,
            reloader: Mutex::new(reloader),
            overlay: Mutex::new(overlay),
            status: Mutex::new(ReloadStatus { last: Some(report), failing: None }),
            audit,
            expiry_changed: tokio::sync::Notify::new(),
            changes: Arc::new(Mutex::new(ChangedSources::default())),
            source,
            source_status: Mutex::new(source_status),
            listed: Mutex::new(listed),
            report_changed: tokio::sync::Notify::new(),
        };
        Ok(ControlPlane { shared: Arc::new(shared) })
    }

    /// The handle the data path reads (`handle.load()` once per new flow).
    pub fn policy(&self) -> PolicyHandle {
        self.shared.handle.clone()
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

    /// Starts the triggers: watches the sources (unless `control.watch = false`), installs
    /// the SIGHUP handler and the expiry timer. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`ControlError`] when the watcher cannot start or the signal handler cannot be
    /// installed; nothing is left running then.
    pub fn start(&self) -> Result<ControlTasks, ControlError> {
        // Built first, so an error below drops (aborts) whatever was already spawned.
        let mut running = ControlTasks { tasks: Vec::new(), _watcher: None };
        if self.shared.source.is_some() {
            if let Some((objects, revision)) = lock(&self.shared.listed).take() {
                running.tasks.push(tokio::spawn(source::watch_loop(
                    self.clone(),
                    objects,
                    revision,
                )));
            }
            running.tasks.push(tokio::spawn(source::report_loop(self.clone())));
            running.tasks.push(tokio::spawn(source::emergency_loop(self.clone())));
        } else if self.shared.cfg.control.watch {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let timing = watch::WatchTiming {
                debounce: self.shared.cfg.control.debounce,
                settle: self.shared.cfg.control.settle,
                last_complete: Arc::new(AtomicBool::new(false)),
                changes: self.shared.changes.clone(),
            };
            running._watcher = Some(watch::watch_sources(
                &self.shared.cfg.policy.dir,
                &self.shared.cfg.policy.inventory,
                tx,
                &timing,
            )?);
            running.tasks.push(tokio::spawn(watch::debounce_loop(self.clone(), rx, timing)));
        }
        running.tasks.push(watch::spawn_sighup(self.clone()).map_err(ControlError::Signal)?);
        running.tasks.push(tokio::spawn(watch::expiry_loop(self.clone())));
        Ok(running)
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
            // A watch reload reads only what the watcher saw change; the others scan all.
            let changes = (trigger == Trigger::Watch).then(|| {
                std::mem::replace(&mut *lock(&self.shared.changes), ChangedSources::none())
            });
            reloader.apply_changes(trigger, &overlay, now, changes.as_ref())
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
                &|entry, decision| on_revoke(entry, decision, &snapshot),
            );
            report.revalidated = stats.checked;
            report.revoked = stats.revoked;
        }
        self.shared.metrics.control.record_reload(&report.sample());
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
        self.shared.report_changed.notify_one();
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

/// Runs `f` to completion on a runtime of its own, in a thread of its own, so a caller
/// inside or outside a runtime can wait for it (the start-up list of the etcd source).
fn block_on<F>(f: F) -> Result<F::Output, ControlError>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                Ok(rt.block_on(f))
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the start-up list panicked")))
    })
    .map_err(ControlError::Runtime)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
