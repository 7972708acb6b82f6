//! What starts a reload on its own: changes to the sources (notify), SIGHUP, and the
//! next expiry of a TTL'd policy.
//!
//! Files: the policy directory is watched recursively and the inventory through its parent
//! directory, so an editor's rename-and-replace (write `x.tmp`, rename over `x`) is seen
//! as what it is, a new file under a watched directory, and the watch never goes stale on a
//! replaced inode. Access events are ignored (reading the sources must not trigger another
//! read). Events are debounced: the reload starts once the sources have been quiet for
//! `control.debounce` (at most 10 debounce periods after the first event, so a file that
//! is rewritten continuously still gets reloaded). A half-written file is simply rejected
//! by that reload and picked up by the one its final write triggers.
//!
//! Expiry: the timer sleeps until the earliest expiry of the compiled policy or the
//! emergency overlay (re-read after every reload, and at least once a minute so a wall
//! clock step is noticed), then asks for an [`Trigger::Expiry`] reload.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::ControlPlane;
use super::reload::Trigger;

/// Keeps the notify watcher alive; dropping it stops watching.
pub struct SourceWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for SourceWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceWatcher")
    }
}

/// Starts watching `dir` and `inventory`; each relevant change sends `()` on `tx` (a
/// full channel already holds a pending change, so extra sends are dropped).
///
/// # Errors
/// The platform watcher cannot be created or a path cannot be watched.
pub fn watch_sources(
    dir: &Path,
    inventory: &Path,
    tx: mpsc::Sender<()>,
) -> Result<SourceWatcher, notify::Error> {
    let dir = absolute(dir);
    let inventory = absolute(inventory);
    let inventory_dir = inventory.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
    let inventory_name = inventory.file_name().map(|n| n.to_os_string());
    let policy_is_file = dir.is_file();
    let watched_dir = dir.clone();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                if matches!(ev.kind, EventKind::Access(_)) {
                    return;
                }
                let relevant = ev.paths.is_empty()
                    || ev.paths.iter().any(|p| {
                        p.starts_with(&watched_dir)
                            || (p.parent() == Some(inventory_dir.as_path())
                                && p.file_name().map(|n| n.to_os_string()) == inventory_name)
                    });
                if relevant {
                    let _ = tx.try_send(());
                }
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

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Debounces change notifications and reloads; returns when `rx` closes.
pub async fn debounce_loop(control: ControlPlane, mut rx: mpsc::Receiver<()>, quiet: Duration) {
    while rx.recv().await.is_some() {
        let deadline = tokio::time::Instant::now() + quiet * 10;
        loop {
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
        control.metrics().control.watch_events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
