//! What starts a reload on its own: changes to the sources (notify), SIGHUP, and the
//! next expiry of a TTL'd policy.
//!
//! Files: the policy directory is watched recursively and the inventory through its parent
//! directory, so an editor's rename-and-replace (write `x.tmp`, rename over `x`) is seen
//! as what it is, a new file under a watched directory, and the watch never goes stale on a
//! replaced inode. Access events are ignored (reading the sources must not trigger another
//! read).
//!
//! When to reload: a change that completes a file — a policy file or the inventory renamed
//! into place (atomic: the new name shows whole bytes), the close of a write to one, or a
//! removal — reloads at once (`control.immediate`, default on): waiting for quiet would
//! only add `control.debounce` to every edit. Changes that arrive while a reload runs are
//! coalesced into one more reload after it, so a burst (a `git checkout` of many files)
//! costs about two reloads, the second seeing the whole burst. Every other event (a
//! create, a write still open) is debounced: the reload starts once the sources have been
//! quiet for `control.debounce` (at most 10 debounce periods after the first event, so a
//! file that is rewritten continuously still gets reloaded), unless a completing change
//! arrives first. A file written in pieces is rejected by the reload of a piece (a
//! half-written file: the last good generation stays in force) and picked up whole by the
//! reload its last write triggers.
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
use super::reload::{Trigger, is_policy_file};

/// Keeps the notify watcher alive; dropping it stops watching.
pub struct SourceWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for SourceWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceWatcher")
    }
}

/// What the watcher tells the debounce loop besides "something changed".
#[derive(Debug)]
pub struct WatchTiming {
    /// Quiet time before reloading on an incomplete change (`control.debounce`).
    pub quiet: Duration,
    /// Reload at once on a change that completes a source file (`control.immediate`).
    pub immediate: bool,
    /// Set with the send when that change was seen; taken by the debounce loop.
    pub urgent: Arc<AtomicBool>,
}

/// Starts watching `dir` and `inventory`; each relevant change sends `()` on `tx` (a
/// full channel already holds a pending change, so extra sends are dropped), after setting
/// `timing.urgent` when the change completes a source file.
///
/// # Errors
/// The platform watcher cannot be created or a path cannot be watched.
pub fn watch_sources(
    dir: &Path,
    inventory: &Path,
    tx: mpsc::Sender<()>,
    timing: &WatchTiming,
) -> Result<SourceWatcher, notify::Error> {
    let dir = absolute(dir);
    let inventory = absolute(inventory);
    let inventory_dir = inventory.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
    let inventory_name = inventory.file_name().map(|n| n.to_os_string());
    let policy_is_file = dir.is_file();
    let watched_dir = dir.clone();
    let (immediate, urgent) = (timing.immediate, timing.urgent.clone());
    let is_inventory = move |p: &Path| {
        p.parent() == Some(inventory_dir.as_path())
            && p.file_name().map(|n| n.to_os_string()) == inventory_name
    };
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                let closed_write =
                    ev.kind == EventKind::Access(AccessKind::Close(AccessMode::Write));
                if matches!(ev.kind, EventKind::Access(_)) && !closed_write {
                    return;
                }
                let relevant = ev.paths.is_empty()
                    || ev.paths.iter().any(|p| p.starts_with(&watched_dir) || is_inventory(p));
                if !relevant {
                    return;
                }
                if immediate && completes_a_source(&ev, &is_inventory) {
                    urgent.store(true, Ordering::Release);
                }
                let _ = tx.try_send(());
            }
            // An overflowed or failed watch: reload to be safe.
            Err(_) => {
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

/// Whether `ev` leaves a source file whole: a rename into place, the close of a write, or
/// a removal, of a policy file (by the loader's naming rule) or the inventory. A temporary
/// file (`.x.tmp`, `x~`) being written is not a source, so an editor's rename-and-replace
/// counts once, at the rename.
fn completes_a_source(ev: &notify::Event, is_inventory: &impl Fn(&Path) -> bool) -> bool {
    // A rename inside the watched directories comes as `To` (the new name) and then
    // `Both` (old and new): only `To` counts, or one rename would reload twice.
    let target = match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(RenameMode::To))
        | EventKind::Remove(_) => ev.paths.first(),
        _ => None,
    };
    target.is_some_and(|p| {
        is_inventory(p) || p.file_name().and_then(|n| n.to_str()).is_some_and(is_policy_file)
    })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Debounces change notifications and reloads; returns when `rx` closes. A notification
/// that comes with `urgent` set reloads at once, also in the middle of a quiet wait.
pub async fn debounce_loop(
    control: ControlPlane,
    mut rx: mpsc::Receiver<()>,
    quiet: Duration,
    urgent: Arc<AtomicBool>,
) {
    while rx.recv().await.is_some() {
        let deadline = tokio::time::Instant::now() + quiet * 10;
        while !urgent.swap(false, Ordering::AcqRel) {
            let wait = quiet.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if wait.is_zero() {
                break;
            }
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(())) => continue,
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
