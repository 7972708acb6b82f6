//! What starts a reload on its own: changes to the sources (notify), SIGHUP, and the
//! next expiry of a TTL'd policy.
//!
//! Files: the policy directory is watched recursively and the inventory through its parent
//! directory, so an editor's rename-and-replace (write `x.tmp`, rename over `x`) is seen
//! as what it is, a new file under a watched directory, and the watch never goes stale on a
//! replaced inode. Access events are ignored (reading the sources must not trigger another
//! read).
//!
//! When to reload: the last change decides how long the sources must then stay quiet. A
//! change that leaves a policy file or the inventory whole — renamed into place (atomic:
//! the new name shows whole bytes) or written and closed — waits `control.settle` (default
//! 5 ms): long enough to gather a machine-made burst (a `git checkout`, a config-management
//! run) into one reload, short enough not to matter next to compiling. Any other change
//! (a create, a write still open, a removal — often the first half of a delete-and-recreate)
//! waits `control.debounce` (default 50 ms), so a half-written file or a half-done
//! replacement is not enforced, and cut flows it would deny. Reloads start at most 10
//! debounce periods after the first change, so a file rewritten continuously still gets
//! reloaded; changes that arrive during a reload lead to one more reload after it. A file
//! written in pieces through separate opens is rejected by the reload after a piece (a
//! half-written file: the last good generation stays in force) and picked up whole after
//! its last write.
//!
//! Expiry: the timer sleeps until the earliest expiry of the compiled policy or the
//! emergency overlay (re-read after every reload, and at least once a minute so a wall
//! clock step is noticed), then asks for an [`Trigger::Expiry`] reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::ControlPlane;
use super::reload::{ChangedSources, Trigger};
use crate::policy::load::is_policy_file;

/// Keeps the notify watcher alive; dropping it stops watching.
pub struct SourceWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for SourceWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceWatcher")
    }
}

/// How long the sources must be quiet before a reload, by the kind of the last change.
#[derive(Debug)]
pub struct WatchTiming {
    /// After a change that may leave a file incomplete (`control.debounce`).
    pub debounce: Duration,
    /// After a change that leaves a source file whole (`control.settle`).
    pub settle: Duration,
    /// Whether the last change left a source file whole; written by the watcher before
    /// each send, read by the debounce loop after each receive.
    pub last_complete: Arc<AtomicBool>,
    /// The paths that changed since the last reload took them (the reload reads only
    /// those); written by the watcher before each send.
    pub changes: Arc<std::sync::Mutex<ChangedSources>>,
}

/// Starts watching `dir` and `inventory`; each relevant change sends `()` on `tx` (a
/// full channel already holds a pending change, so extra sends are dropped), after
/// recording in `timing.last_complete` whether the change left a source file whole and in
/// `timing.changes` which source paths it touched.
///
/// # Errors
/// The platform watcher cannot be created or a path cannot be watched.
pub fn watch_sources(
    dir: &Path,
    inventory: &Path,
    tx: mpsc::Sender<()>,
    timing: &WatchTiming,
) -> Result<SourceWatcher, notify::Error> {
    let configured_dir = dir.to_path_buf();
    let dir = absolute(dir);
    let inventory = absolute(inventory);
    let changes = timing.changes.clone();
    let inventory_dir = inventory.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
    let inventory_name = inventory.file_name().map(|n| n.to_os_string());
    let policy_is_file = dir.is_file();
    let watched_dir = dir.clone();
    let last_complete = timing.last_complete.clone();
    let is_inventory = move |p: &Path| {
        p.parent() == Some(inventory_dir.as_path())
            && p.file_name().map(|n| n.to_os_string()) == inventory_name
    };
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                let closed_write =
                    ev.kind == EventKind::Access(AccessKind::Close(AccessMode::Write));
                // A rename inside the watched directories also comes as `From` and `To`
                // events, sent first: `Both` says nothing new (and must not make the
                // completed rename look incomplete).
                let both = ev.kind == EventKind::Modify(ModifyKind::Name(RenameMode::Both));
                if (matches!(ev.kind, EventKind::Access(_)) && !closed_write) || both {
                    return;
                }
                let relevant = ev.paths.is_empty()
                    || ev.paths.iter().any(|p| p.starts_with(&watched_dir) || is_inventory(p));
                if !relevant {
                    return;
                }
                // A policy "directory" that is one file counts whatever its name.
                let is_source = |p: &Path| {
                    is_inventory(p) || (policy_is_file && p == watched_dir) || is_policy_file(p)
                };
                {
                    let mut c = changes.lock().unwrap_or_else(|e| e.into_inner());
                    if ev.paths.is_empty() || ev.need_rescan() || policy_is_file {
                        c.everything = true;
                    }
                    for p in &ev.paths {
                        if is_inventory(p) {
                            c.inventory = true;
                        }
                        if let Ok(rel) = p.strip_prefix(&watched_dir) {
                            c.files.insert(configured_dir.join(rel));
                        }
                    }
                }
                last_complete.store(completes_a_source(&ev, &is_source), Ordering::Release);
                let _ = tx.try_send(());
            }
            // An overflowed or failed watch: reload to be safe, after the full debounce.
            Err(_) => {
                changes.lock().unwrap_or_else(|e| e.into_inner()).everything = true;
                last_complete.store(false, Ordering::Release);
                let _ = tx.try_send(());
            }
        })?;
    if policy_is_file {
        let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
        watcher.watch(&parent, RecursiveMode::NonRecursive)?;
    } else {
        watcher.watch(&dir, RecursiveMode::Recursive)?;
    }
    let inv_parent = inventory.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
    if !inv_parent.starts_with(&dir) || policy_is_file {
        watcher.watch(&inv_parent, RecursiveMode::NonRecursive)?;
    }
    Ok(SourceWatcher { _watcher: watcher })
}

/// Whether `ev` leaves a source file whole: a rename into place or the close of a write,
/// of a source (a policy file by the loader's naming rule, or the inventory). A temporary file
/// (`.x.tmp`, `x~`) being written is not a source, so an editor's rename-and-replace
/// completes at the rename. A removal does not count: it is as often the first half of a
/// delete-and-recreate.
fn completes_a_source(ev: &notify::Event, is_source: &impl Fn(&Path) -> bool) -> bool {
    let target = match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => ev.paths.first(),
        _ => None,
    };
    target.is_some_and(|p| is_source(p))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Debounces change notifications and reloads; returns when `rx` closes. The quiet time
/// is `timing.settle` or `timing.debounce` by the kind of the last change (see the module
/// doc), capped at 10 debounce periods after the first.
pub async fn debounce_loop(control: ControlPlane, mut rx: mpsc::Receiver<()>, timing: WatchTiming) {
    let quiet = |t: &WatchTiming| {
        if t.last_complete.load(Ordering::Acquire) { t.settle } else { t.debounce }
    };
    while rx.recv().await.is_some() {
        let deadline = tokio::time::Instant::now() + timing.debounce * 10;
        let mut wait_for = quiet(&timing);
        loop {
            let wait =
                wait_for.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if wait.is_zero() {
                break;
            }
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(())) => wait_for = quiet(&timing),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        control.metrics().control.watch_events.fetch_add(1, Ordering::Relaxed);
        control.reload(Trigger::Watch).await;
    }
}

/// Reloads on every SIGHUP until the task is aborted.
///
/// # Errors
/// The signal handler cannot be installed.
pub fn spawn_sighup(control: ControlPlane) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            control.reload(Trigger::Signal).await;
        }
    }))
}

/// The longest the expiry timer sleeps before looking at the clock again.
const EXPIRY_RECHECK: Duration = Duration::from_secs(60);

/// Sleeps until the next expiry and reloads then; woken early by every reload.
pub async fn expiry_loop(control: ControlPlane) {
    loop {
        let changed = control.shared.expiry_changed.notified();
        let wait = match control.next_expiry() {
            Some(at) => at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                // Never wake before the expiry by the wall clock: `now >= at` must hold
                // when the recompile runs, or it would keep the policy and spin.
                .saturating_add(Duration::from_millis(1))
                .min(EXPIRY_RECHECK),
            None => EXPIRY_RECHECK,
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {
                if control.next_expiry().is_some_and(|at| at <= SystemTime::now()) {
                    control.reload(Trigger::Expiry).await;
                }
            }
            () = changed => {}
        }
    }
}
