//! Load → compile → swap: the one way a new policy generation comes into force.
//!
//! A [`Reloader`] owns the last good [`PolicySet`] read from disk and the generation
//! counter. [`Reloader::apply`] scans the sources (reading and hashing only the files whose
//! `stat` stamp moved), loads and validates them (all or nothing; only changed files are
//! parsed, the rest are shared from the parse cache), lays the emergency overlay on top,
//! compiles, and only then stores the new snapshot with one `ArcSwap::swap`. Any error
//! leaves the snapshot in force untouched: the data path never sees half a reload.
//!
//! Everything but compile is kept near zero for a 10,000-policy set, because a file
//! change must be enforced within 100 ms: see `ParseCache`, [`ChangeSummary::between`]
//! and `Reaper`.
//!
//! Triggers that change nothing on disk (an emergency policy, an expiry) recompile the
//! last good set instead of reading the disk again, so a file broken in the meantime never
//! blocks a quarantine or keeps an expired policy alive.
//!
//! TTL policies without `metadata.creationTimestamp` count their TTL from the moment this
//! reloader first saw them (`first_seen`), so a reload never restarts their clock.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::emergency::Overlay;
use crate::policy::ir::{Expiry, Inventory, Policy, PolicySet};
use crate::policy::{
    CompileCache, CompileError, CompileOptions, CompiledPolicy, DefaultAction, Generation,
    LoadErrors, PolicyHandle, PolicySnapshot, load,
};
use crate::telemetry::metrics::{ReloadOutcome, ReloadSample};

/// What asked for a reload; recorded in the audit trail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The first load at start-up.
    Startup,
    /// A change under the policy directory or to the inventory file.
    Watch,
    /// SIGHUP.
    Signal,
    /// `POST /reload` (or `flowgate reload`).
    Api,
    /// A policy's TTL or `expires-at` was reached.
    Expiry,
    /// `POST /emergency` changed the overlay.
    Emergency,
}

impl Trigger {
    /// Whether this trigger means "the sources may have changed": those reloads read the
    /// disk and are skipped when the content hash is unchanged. The others recompile the
    /// last good set because something other than the files changed.
    const fn reads_disk(self) -> bool {
        matches!(self, Trigger::Startup | Trigger::Watch | Trigger::Signal | Trigger::Api)
    }
}

/// What the watcher saw change since the last reload took the list: a reload with it
/// reads only these files instead of listing and `stat`ing every policy file (at 10,000
/// files the listing and `stat`s were a quarter of a reload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangedSources {
    /// Paths under the policy directory (as the loader names them: the configured
    /// directory joined with the path below it) that were created, written, renamed or
    /// removed.
    pub files: std::collections::BTreeSet<PathBuf>,
    /// The inventory file changed.
    pub inventory: bool,
    /// Something the list cannot describe happened (a watch overflowed or failed, a
    /// directory changed): the next reload scans everything.
    pub everything: bool,
}

impl Default for ChangedSources {
    /// Everything: nothing is known about what happened before the watch started.
    fn default() -> Self {
        ChangedSources { files: Default::default(), inventory: false, everything: true }
    }
}

impl ChangedSources {
    /// Nothing changed yet: what a reload leaves behind after taking the list.
    pub fn none() -> ChangedSources {
        ChangedSources { files: Default::default(), inventory: false, everything: false }
    }
}

/// Where the policy comes from, and how flows nothing decides are treated.
#[derive(Clone, Debug)]
pub struct Sources {
    pub dir: PathBuf,
    pub inventory: PathBuf,
    pub default: DefaultAction,
    pub unknown: DefaultAction,
}

/// Policy objects held in memory instead of files: the etcd source's view of its prefix.
/// Keys stand where file paths stand in error messages and in the content hash.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// The key the policy keys are under (they are hashed relative to it).
    pub root: String,
    /// Policy object key → YAML bytes.
    pub policies: std::collections::BTreeMap<String, Arc<[u8]>>,
    /// The inventory's key.
    pub inventory_key: String,
    /// The inventory's YAML; `None` while the key is absent (which rejects the load).
    pub inventory: Option<Arc<[u8]>>,
    /// The etcd revision these objects were read at (the snapshot compiled from them
    /// carries it).
    pub revision: i64,
}

/// One problem with a reload, in the shape `/policy` and the audit log show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub file: Option<String>,
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for part in [&self.file, &self.object, &self.field].into_iter().flatten() {
            write!(f, "{part}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Why a reload was rejected. The snapshot in force is unchanged whenever this is returned.
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("{0}")]
    Load(LoadErrors),
    #[error("compiling: {0}")]
    Compile(#[from] CompileError),
}

impl ReloadError {
    /// Every problem, each naming file, object and field where known.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ReloadError::Load(errors) => errors
                .0
                .iter()
                .map(|e| Problem {
                    file: Some(e.file.display().to_string()),
                    object: e.object.clone(),
                    field: e.field.clone(),
                    message: e.message.clone(),
                })
                .collect(),
            ReloadError::Compile(e) => {
                vec![Problem { file: None, object: None, field: None, message: e.to_string() }]
            }
        }
    }
}

/// How a reload attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadResult {
    /// A new generation is in force.
    Ok,
    /// The sources hash as before: nothing was swapped.
    Unchanged,
    /// Rejected; the previous generation stays in force.
    Error,
}

impl ReloadResult {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Error => "error",
        }
    }
}

/// What changed between two applied policy sets. Lists are capped at
/// [`ChangeSummary::LIST_CAP`] names; the counts are exact.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChangeSummary {
    pub policies_added: usize,
    pub policies_removed: usize,
    pub policies_modified: usize,
    pub workloads_added: usize,
    pub workloads_removed: usize,
    /// Workloads whose labels, addresses or ports changed.
    pub workloads_relabelled: usize,
    /// `Kind name` / `ns/name`, at most `LIST_CAP` of each.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub modified: Vec<String>,
    pub relabelled: Vec<String>,
}

impl ChangeSummary {
    /// Names listed per category; beyond that only the count grows.
    pub const LIST_CAP: usize = 20;

    /// Compares two sets: policies by kind and name, workloads by `ns/name`.
    ///
    /// Runs on the reload thread after every swap, so it is cheap when little changed.
    /// Both sets list policies file by file in path order, and the parse cache hands out
    /// the same `Arc`s for every file that did not change, so the runs of shared policies
    /// at the start and the end are skipped by address and only the range between them
    /// is compared (one file's policies when one file changed). The inventory is not walked
    /// at all when both sets share it; keys are borrowed, and only the names that differ
    /// are formatted and sorted. A policy whose kind and name appear twice (in two files)
    /// is, as before, compared by its last appearance within what is compared.
    pub fn between(old: &PolicySet, new: &PolicySet) -> ChangeSummary {
        type Key<'a> = (&'static str, Option<&'a str>, &'a str);
        fn key(p: &Policy) -> Key<'_> {
            (p.kind.as_str(), p.namespace.as_deref(), p.name.as_str())
        }
        fn name(p: &Policy) -> String {
            format!("{} {}", p.kind.as_str(), p.display_name())
        }
        fn capped(mut names: Vec<String>) -> Vec<String> {
            // Sorted so the capped lists are deterministic.
            names.sort_unstable();
            names.truncate(ChangeSummary::LIST_CAP);
            names
        }
        let mut s = ChangeSummary::default();
        fn index(policies: &[Arc<Policy>]) -> HashMap<Key<'_>, &Arc<Policy>> {
            policies.iter().map(|p| (key(p), p)).collect()
        }
        let (o, n) = (old.policies.as_slice(), new.policies.as_slice());
        let same = |(a, b): (&Arc<Policy>, &Arc<Policy>)| Arc::ptr_eq(a, b);
        let head = o.iter().zip(n).take_while(|&pair| same(pair)).count();
        let (o, n) = (&o[head..], &n[head..]);
        let tail = o.iter().rev().zip(n.iter().rev()).take_while(|&pair| same(pair)).count();
        let (o, n) = (&o[..o.len() - tail], &n[..n.len() - tail]);
        let (old_p, new_p) = (index(o), index(n));
        let (mut added, mut removed, mut modified) = (Vec::new(), Vec::new(), Vec::new());
        for (k, a) in &old_p {
            match new_p.get(k) {
                None => removed.push(name(a)),
                Some(b) if !Arc::ptr_eq(a, b) && !same_policy(a, b) => modified.push(name(a)),
                Some(_) => {}
            }
        }
        for (k, b) in &new_p {
            if !old_p.contains_key(k) {
                added.push(name(b));
            }
        }
        (s.policies_added, s.policies_removed, s.policies_modified) =
            (added.len(), removed.len(), modified.len());
        (s.added, s.removed, s.modified) = (capped(added), capped(removed), capped(modified));
        if Arc::ptr_eq(&old.inventory, &new.inventory) {
            return s;
        }
        fn wkey(w: &crate::policy::ir::Workload) -> (&str, &str) {
            (w.namespace.as_str(), w.name.as_str())
        }
        let old_w: HashMap<_, _> = old.inventory.workloads.iter().map(|w| (wkey(w), w)).collect();
        let new_w: HashMap<_, _> = new.inventory.workloads.iter().map(|w| (wkey(w), w)).collect();
        let mut relabelled = Vec::new();
        for (k, a) in &old_w {
            match new_w.get(k) {
                None => s.workloads_removed += 1,
                Some(b) if a != b => relabelled.push(format!("{}/{}", k.0, k.1)),
                Some(_) => {}
            }
        }
        s.workloads_added = new_w.keys().filter(|k| !old_w.contains_key(*k)).count();
        s.workloads_relabelled = relabelled.len();
        s.relabelled = capped(relabelled);
        s
    }

    pub fn is_empty(&self) -> bool {
        self.policies_added == 0
            && self.policies_removed == 0
            && self.policies_modified == 0
            && self.workloads_added == 0
            && self.workloads_removed == 0
            && self.workloads_relabelled == 0
    }
}

/// Equal in everything but the file it came from and the runtime-filled creation time.
fn same_policy(a: &Policy, b: &Policy) -> bool {
    a.kind == b.kind
        && a.name == b.name
        && a.namespace == b.namespace
        && a.tier == b.tier
        && a.subject == b.subject
        && a.ingress == b.ingress
        && a.egress == b.egress
        && a.mode == b.mode
        && a.expiry == b.expiry
}

/// The outcome of one reload attempt: what the audit trail, `/policy` and the metrics show.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    #[serde(serialize_with = "super::audit::rfc3339")]
    pub time: SystemTime,
    pub trigger: Trigger,
    pub result: ReloadResult,
    /// The generation in force after the attempt.
    pub generation: u64,
    /// Content hash of what is in force after the attempt (on error: of the old one).
    pub hash: String,
    /// Hash of the sources that were rejected, on error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_hash: Option<String>,
    #[serde(serialize_with = "super::audit::seconds")]
    pub duration: Duration,
    /// Load + compile only (the rest is hashing and bookkeeping).
    #[serde(serialize_with = "super::audit::seconds")]
    pub compile_duration: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangeSummary>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Problem>,
    /// Filled in by the control plane after revalidation (0 with `on_change = keep`).
    pub revalidated: usize,
    pub revoked: usize,
    /// Where the time up to the swap went (not in the audit line: benchmarks read it).
    #[serde(skip)]
    pub phases: Phases,
}

impl ReloadReport {
    /// This attempt as the metrics count it.
    pub fn sample(&self) -> ReloadSample {
        ReloadSample {
            outcome: match self.result {
                ReloadResult::Ok => ReloadOutcome::Ok,
                ReloadResult::Unchanged => ReloadOutcome::Unchanged,
                ReloadResult::Error => ReloadOutcome::Error,
            },
            time: self.time,
            duration: self.duration,
            revalidated: self.revalidated,
            revoked: self.revoked,
        }
    }
}

/// The steps of one reload up to the swap, each timed on the reload thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    /// Listing the sources, `stat` of each, reading and hashing the files whose stamp moved.
    pub scan: Duration,
    /// Parsing changed files and assembling the set (pointer copies for the rest), with
    /// the emergency overlay laid on.
    pub load: Duration,
    /// `CompiledPolicy::compile`.
    pub compile: Duration,
    /// Storing the new snapshot (the old one is dropped on the reaper thread).
    pub swap: Duration,
    /// Files read and hashed because their stamp moved (or was too recent to trust).
    pub files_read: usize,
    /// Files (the inventory included) parsed because their content changed.
    pub files_parsed: usize,
}

/// Owns the generation counter and the last good sources.
#[derive(Debug)]
pub struct Reloader {
    sources: Sources,
    handle: PolicyHandle,
    /// The last good set read from disk (without the overlay).
    disk: Arc<PolicySet>,
    disk_hash: String,
    /// The last set compiled (with the overlay), for change summaries.
    applied: Arc<PolicySet>,
    overlay_hash: String,
    first_seen: HashMap<String, SystemTime>,
    generation: u64,
    cache: ParseCache,
    /// What earlier compilations built (see [`CompileCache`]): the compiled inventory,
    /// its label index and every policy's compiled part, so a one-file reload compiles
    /// that file's policies and lays the rest out from the cache.
    compiled: CompileCache,
    reaper: Reaper,
    /// Set for the etcd source: reloads that read the sources read these instead of the
    /// disk.
    objects: Option<Arc<Objects>>,
    /// The revision of the objects the set in force was read from (0 for files).
    revision: i64,
}

impl Reloader {
    /// Loads and compiles generation 1. Start-up fails on a bad policy: there is no last
    /// good generation to fall back on, and running with none would mean guessing.
    ///
    /// # Errors
    /// [`ReloadError`] with every problem found.
    pub fn initial(
        sources: Sources,
        overlay: &Overlay,
        now: SystemTime,
    ) -> Result<(Reloader, ReloadReport), ReloadError> {
        Reloader::initial_with(sources, None, overlay, now)
    }

    /// [`Reloader::initial`] from objects held in memory (the etcd source) instead of the
    /// files of `sources` when `objects` is given; later reloads read the objects last
    /// handed over with [`Reloader::set_objects`].
    ///
    /// # Errors
    /// As [`Reloader::initial`].
    pub fn initial_with(
        sources: Sources,
        objects: Option<Arc<Objects>>,
        overlay: &Overlay,
        now: SystemTime,
    ) -> Result<(Reloader, ReloadReport), ReloadError> {
        let started = Instant::now();
        let mut cache = ParseCache::default();
        let scan = match &objects {
            Some(o) => cache.scan_objects(o),
            None => cache.scan(&sources.dir, &sources.inventory),
        };
        let disk_hash = scan.hash.clone();
        let mut phases = Phases { files_read: scan.files_read, ..Phases::default() };
        phases.scan = started.elapsed();
        let disk = Arc::new(cache.load(scan).map_err(ReloadError::Load)?);
        let mut first_seen = HashMap::new();
        let (applied, overlay_hash) = compose(&disk, overlay, &mut first_seen, now);
        phases.files_parsed = cache.parsed;
        phases.load = started.elapsed() - phases.scan;
        let mut compile_cache = CompileCache::default();
        let compiled =
            CompiledPolicy::compile_with(&applied, &options(&sources, now), &mut compile_cache)?;
        let compile_duration = started.elapsed();
        phases.compile = compile_duration - phases.scan - phases.load;
        let hash = combined_hash(&disk_hash, &overlay_hash);
        let revision = objects.as_ref().map_or(0, |o| o.revision);
        let snapshot = PolicySnapshot {
            compiled,
            generation: Generation(1),
            content_hash: hash.clone(),
            loaded_at: now,
            source_revision: AtomicI64::new(revision),
        };
        let stored = Instant::now();
        let handle: PolicyHandle = Arc::new(arc_swap::ArcSwap::from_pointee(snapshot));
        phases.swap = stored.elapsed();
        let reloader = Reloader {
            sources,
            handle,
            disk,
            disk_hash,
            applied,
            overlay_hash,
            first_seen,
            generation: 1,
            cache,
            compiled: compile_cache,
            reaper: Reaper::start(),
            objects,
            revision,
        };
        let report = ReloadReport {
            time: now,
            trigger: Trigger::Startup,
            result: ReloadResult::Ok,
            generation: 1,
            hash,
            rejected_hash: None,
            duration: started.elapsed(),
            compile_duration,
            changes: None,
            errors: Vec::new(),
            revalidated: 0,
            revoked: 0,
            phases,
        };
        Ok((reloader, report))
    }

    /// Hands over the objects the next reload that reads the sources compiles (the etcd
    /// source, after a list or a watch event).
    pub fn set_objects(&mut self, objects: Arc<Objects>) {
        self.objects = Some(objects);
    }

    /// The handle the data path reads.
    pub fn handle(&self) -> &PolicyHandle {
        &self.handle
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The set last compiled (disk + overlay): emergency requests resolve targets in it.
    pub fn applied(&self) -> &PolicySet {
        &self.applied
    }

    /// One reload attempt. Never panics on input and never leaves a partial state: on
    /// error the snapshot in force, the last good set and the counter are untouched.
    ///
    /// The work after the swap is kept small because the next reload waits for it: the
    /// change summary compares shared `Arc`s by address, and the old snapshot and sets
    /// are dropped on the reaper thread (freeing a 10,000-policy compiled policy took
    /// longer than compiling the next one).
    pub fn apply(&mut self, trigger: Trigger, overlay: &Overlay, now: SystemTime) -> ReloadReport {
        self.apply_changes(trigger, overlay, now, None)
    }

    /// [`Reloader::apply`] told what changed on disk since the last reload (the watcher's
    /// list): only those files are `stat`ed and read; every other file counts as it was.
    /// `None`, or a list that says `everything`, scans every file as `apply` does.
    pub fn apply_changes(
        &mut self,
        trigger: Trigger,
        overlay: &Overlay,
        now: SystemTime,
        changes: Option<&ChangedSources>,
    ) -> ReloadReport {
        let started = Instant::now();
        let mut report = ReloadReport {
            time: now,
            trigger,
            result: ReloadResult::Unchanged,
            generation: self.generation,
            hash: combined_hash(&self.disk_hash, &self.overlay_hash),
            rejected_hash: None,
            duration: Duration::ZERO,
            compile_duration: Duration::ZERO,
            changes: None,
            errors: Vec::new(),
            revalidated: 0,
            revoked: 0,
            phases: Phases::default(),
        };
        let mut disk = self.disk.clone();
        let mut disk_hash = self.disk_hash.clone();
        let mut revision = self.revision;
        if trigger.reads_disk() {
            let scanned_revision = self.objects.as_ref().map(|o| o.revision);
            let scan = match changes.filter(|c| !c.everything) {
                _ if self.objects.is_some() => {
                    let objects = self.objects.clone().unwrap_or_default();
                    self.cache.scan_objects(&objects)
                }
                Some(c) => self.cache.scan_changed(&self.sources.dir, &self.sources.inventory, c),
                None => self.cache.scan(&self.sources.dir, &self.sources.inventory),
            };
            report.phases.files_read = scan.files_read;
            report.phases.scan = started.elapsed();
            if scan.hash == self.disk_hash && overlay.content_hash() == self.overlay_hash {
                // The same objects at a later revision: that revision is in force too.
                if let Some(r) = scanned_revision.filter(|r| *r > self.revision) {
                    self.revision = r;
                    self.handle.load().source_revision.fetch_max(r, Ordering::Relaxed);
                }
                report.duration = started.elapsed();
                return report;
            }
            if scan.hash != self.disk_hash {
                let fresh_hash = scan.hash.clone();
                let parsed_before = self.cache.parsed;
                let loaded = self.cache.load(scan);
                report.phases.files_parsed = self.cache.parsed - parsed_before;
                match loaded {
                    Ok(set) => disk = Arc::new(set),
                    Err(errors) => {
                        return self.rejected(
                            report,
                            ReloadError::Load(errors),
                            fresh_hash,
                            started,
                        );
                    }
                }
                disk_hash = fresh_hash;
            }
            revision = scanned_revision.unwrap_or(revision);
        }
        let mut first_seen = self.first_seen.clone();
        let (applied, overlay_hash) = compose(&disk, overlay, &mut first_seen, now);
        let hash = combined_hash(&disk_hash, &overlay_hash);
        let loaded = started.elapsed();
        report.phases.load = loaded - report.phases.scan;
        let opts = options(&self.sources, now);
        let compiled = match CompiledPolicy::compile_with(&applied, &opts, &mut self.compiled) {
            Ok(c) => c,
            Err(e) => return self.rejected(report, ReloadError::Compile(e), hash, started),
        };
        report.compile_duration = started.elapsed();
        report.phases.compile = report.compile_duration - loaded;
        let generation = self.generation + 1;
        let old = self.handle.swap(Arc::new(PolicySnapshot {
            compiled,
            generation: Generation(generation),
            content_hash: hash.clone(),
            loaded_at: now,
            source_revision: AtomicI64::new(revision),
        }));
        report.phases.swap = started.elapsed() - report.compile_duration;
        // Bookkeeping after the swap: the new generation is already in force.
        report.changes = Some(ChangeSummary::between(&self.applied, &applied));
        self.generation = generation;
        self.revision = revision;
        let old_disk = std::mem::replace(&mut self.disk, disk);
        self.disk_hash = disk_hash;
        let old_applied = std::mem::replace(&mut self.applied, applied);
        self.overlay_hash = overlay_hash;
        self.reaper.drop_later(Box::new((old, old_disk, old_applied)));
        // Forget first sightings of policies that are gone, so the map stays bounded.
        if !first_seen.is_empty() {
            let present: std::collections::HashSet<String> =
                self.applied.policies.iter().map(|p| seen_key(p)).collect();
            first_seen.retain(|k, _| present.contains(k));
        }
        self.first_seen = first_seen;
        report.result = ReloadResult::Ok;
        report.generation = generation;
        report.hash = hash;
        report.duration = started.elapsed();
        report
    }

    fn rejected(
        &self,
        mut report: ReloadReport,
        err: ReloadError,
        rejected_hash: String,
        started: Instant,
    ) -> ReloadReport {
        report.result = ReloadResult::Error;
        report.errors = err.problems();
        report.rejected_hash = Some(rejected_hash);
        report.duration = started.elapsed();
        report
    }
}

/// Drops what a swap replaced (the old compiled policy, the old sets) on a thread of its
/// own, so the reload thread is free for the next reload at once. The queue is short: when
/// it is full (the reaper is behind by that many generations) the reload thread drops the
/// value itself, which only costs time, never memory beyond that bound.
struct Reaper {
    tx: Option<std::sync::mpsc::SyncSender<Box<dyn Send>>>,
}

/// Generations waiting to be freed at most; beyond that the reload thread frees inline.
const REAPER_QUEUE: usize = 4;

impl Reaper {
    fn start() -> Reaper {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Box<dyn Send>>(REAPER_QUEUE);
        // A reaper that cannot be started only means freeing on the reload thread.
        let spawned = std::thread::Builder::new()
            .name("flowgate-reaper".into())
            .spawn(move || {
                while let Ok(garbage) = rx.recv() {
                    drop(garbage);
                }
            })
            .is_ok();
        Reaper { tx: spawned.then_some(tx) }
    }

    fn drop_later(&self, garbage: Box<dyn Send>) {
        if let Some(tx) = &self.tx
            && let Err(e) = tx.try_send(garbage)
        {
            drop(e);
        }
    }
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reaper")
    }
}

/// What `stat` says about a file: when any of it moves, the content may have changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How long after its last change a file's stamp is trusted to move on the next change.
/// File times tick at the kernel's coarse clock (up to 10 ms), so two writes of the same
/// size inside one tick leave the stamp as it was; a file read that soon after a change is
/// therefore read and hashed again on the next reload, until it has been quiet this long.
const STAMP_SETTLE: Duration = Duration::from_secs(2);

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether a change after `read_at` is sure to show in the stamp: the last change is
    /// at least `settle` before it.
    fn settled(&self, read_at: SystemTime, settle: Duration) -> bool {
        let latest = self.mtime.max(self.ctime);
        let (Ok(secs), Ok(nanos)) = (u64::try_from(latest.0), u32::try_from(latest.1)) else {
            return false;
        };
        (UNIX_EPOCH + Duration::new(secs, nanos)).checked_add(settle).is_some_and(|t| t < read_at)
    }
}

/// One source file as the cache last saw it.
#[derive(Debug)]
struct Seen<T> {
    stamp: Stamp,
    /// The stamp was settled when the file was read: an equal stamp means equal bytes.
    trusted: bool,
    digest: Digest32,
    parsed: T,
}

/// Parsed files from earlier loads, keyed by path, with each file's `stat` stamp and the
/// SHA-256 of the bytes read, so a reload after one file changed reads, hashes and parses
/// only that file. At 10,000 policies in 100 files plus a 10,000-workload inventory,
/// parsing everything took ~1.5 s of a reload, and reading and hashing every file ~10 ms;
/// a file's result depends on its path and bytes alone, so reusing it changes nothing
/// but time.
///
/// A file is read again when its stamp (device, inode, size, mtime, ctime) moved — a
/// rename-and-replace always changes the inode — or when it was read within
/// [`STAMP_SETTLE`] of its last change; it is parsed again when its bytes hash
/// differently. Parsed policies are held as `Arc`s, so assembling the set is pointer
/// copies. Only files that parsed cleanly are kept (a broken file is parsed, and
/// rejected, on every attempt), and entries for files no longer present are dropped after
/// each load, so the cache holds at most one entry per file in the directory.
#[derive(Debug)]
struct ParseCache {
    files: HashMap<PathBuf, Seen<Vec<Arc<Policy>>>>,
    inventory: Option<(PathBuf, Seen<Arc<Inventory>>)>,
    /// Files parsed so far (for [`Phases::files_parsed`]).
    parsed: usize,
    /// [`STAMP_SETTLE`] (tests shorten it).
    settle: Duration,
    /// The policy files of the directory as the last scan found them, sorted, while that
    /// listing is complete (a directory walked without errors); `scan_changed` updates
    /// it from the watcher's list instead of walking the directory again.
    listing: Option<(PathBuf, Vec<PathBuf>)>,
}

impl Default for ParseCache {
    fn default() -> Self {
        ParseCache {
            files: HashMap::new(),
            inventory: None,
            parsed: 0,
            settle: STAMP_SETTLE,
            listing: None,
        }
    }
}

type Digest32 = [u8; 32];

fn digest(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// One source file as a scan found it.
enum Found {
    /// Stamp unchanged and trusted: the cached digest and parse hold.
    Cached(Digest32),
    /// Read (stamp moved, untrusted, or not cached).
    Read { stamp: Stamp, trusted: bool, digest: Digest32, bytes: Vec<u8> },
    /// Could not be read: the message, as the loader words it.
    Unreadable(String),
}

impl Found {
    fn digest(&self) -> Option<&Digest32> {
        match self {
            Found::Cached(d) | Found::Read { digest: d, .. } => Some(d),
            Found::Unreadable(_) => None,
        }
    }
}

/// The sources as they are now: what [`ParseCache::load`] turns into a set, and their
/// content hash.
struct Scan {
    hash: String,
    inventory_path: PathBuf,
    inventory: Found,
    /// Problems listing the policy directory, worded as the loader words them.
    walk_errors: Vec<load::LoadError>,
    files: Vec<(PathBuf, Found)>,
    files_read: usize,
}

impl ParseCache {
    /// Lists the sources and finds what changed, reading only files whose stamp moved.
    /// The hash covers the inventory and every policy file the loader would read (same
    /// rules: recursive, hidden and editor backup files skipped, `.yaml`/`.yml`), in sorted
    /// order, each by its path relative to the directory and the SHA-256 of its bytes.
    /// Unreadable files and directories hash as an error marker, so a reload is attempted
    /// and the loader's message names the problem.
    fn scan(&mut self, dir: &Path, inventory: &Path) -> Scan {
        let mut files_read = 0;
        let cached_inv = self.inventory.as_mut().filter(|(p, _)| p == inventory).map(|(_, s)| s);
        let inv =
            look(inventory, cached_inv, self.settle, &mut files_read, "cannot read inventory");
        let mut walk_errors = Vec::new();
        let listed = load::policy_files(dir, &mut walk_errors);
        self.listing = (walk_errors.is_empty() && std::fs::metadata(dir).is_ok_and(|m| m.is_dir()))
            .then(|| {
                let mut sorted = listed.clone();
                sorted.sort_unstable();
                sorted.dedup();
                (dir.to_owned(), sorted)
            });
        let files: Vec<(PathBuf, Found)> = listed
            .into_iter()
            .map(|f| {
                let found =
                    look(&f, self.files.get_mut(&f), self.settle, &mut files_read, "cannot read");
                (f, found)
            })
            .collect();
        Scan::of(dir, inventory, inv, walk_errors, files, files_read)
    }

    /// [`ParseCache::scan`] when the watcher says what changed: the listing of the last
    /// scan is updated with the changed paths, and only those paths (and files the cache
    /// holds no parse for: a file that failed before is looked at again) are `stat`ed and
    /// read; the others count as cached. Falls back to a full scan when the last listing
    /// is not complete or a change is not a policy file's (a directory created, removed
    /// or renamed: its files are not named).
    fn scan_changed(&mut self, dir: &Path, inventory: &Path, changes: &ChangedSources) -> Scan {
        let Some((listed_dir, mut listing)) = self.listing.take() else {
            return self.scan(dir, inventory);
        };
        if listed_dir != dir {
            return self.scan(dir, inventory);
        }
        for path in &changes.files {
            let Ok(rel) = path.strip_prefix(dir) else { continue };
            let names: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
            if names.len() != rel.iter().count() {
                return self.scan(dir, inventory);
            }
            // The loader skips hidden entries at every level (editors' temporary files).
            if names.iter().any(|n| n.starts_with('.')) {
                continue;
            }
            if !load::is_policy_file(path) {
                return self.scan(dir, inventory);
            }
            match (std::fs::metadata(path), listing.binary_search(path)) {
                (Ok(m), Err(at)) if m.is_file() => listing.insert(at, path.clone()),
                (Ok(m), Ok(_)) if m.is_file() => {}
                (Err(e), found) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Ok(at) = found {
                        listing.remove(at);
                    }
                }
                // A directory named like a policy file, or a path that cannot be looked at:
                // the full scan words the problem as the loader does.
                _ => return self.scan(dir, inventory),
            }
        }
        let mut files_read = 0;
        let inv = match self.inventory.as_mut().filter(|(p, _)| p == inventory) {
            Some((_, seen)) if !changes.inventory => Found::Cached(seen.digest),
            cached => look(
                inventory,
                cached.map(|(_, s)| s),
                self.settle,
                &mut files_read,
                "cannot read inventory",
            ),
        };
        // The positions of the named files in the listing, found once by binary search,
        // so the walk below compares indexes instead of looking every listed path up in
        // the list of changes (component-wise path comparisons, per file, per reload).
        let mut named: Vec<usize> =
            changes.files.iter().filter_map(|p| listing.binary_search(p).ok()).collect();
        named.sort_unstable();
        let mut named = named.into_iter().peekable();
        let files: Vec<(PathBuf, Found)> = listing
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let is_named = named.next_if_eq(&i).is_some();
                let found = match self.files.get_mut(f) {
                    Some(seen) if !is_named => Found::Cached(seen.digest),
                    seen => look(f, seen, self.settle, &mut files_read, "cannot read"),
                };
                (f.clone(), found)
            })
            .collect();
        self.listing = Some((listed_dir, listing));
        Scan::of(dir, inventory, inv, Vec::new(), files, files_read)
    }
}

impl ParseCache {
    /// [`ParseCache::scan`] over objects held in memory: each object counts as read unless
    /// its bytes hash as the cached parse's did.
    fn scan_objects(&mut self, objects: &Objects) -> Scan {
        self.listing = None;
        let stamp = Stamp { dev: 0, ino: 0, size: 0, mtime: (0, 0), ctime: (0, 0) };
        let mut files_read = 0;
        let mut found = |bytes: &[u8], cached: Option<Digest32>| {
            let d = digest(bytes);
            if cached == Some(d) {
                Found::Cached(d)
            } else {
                files_read += 1;
                Found::Read { stamp, trusted: false, digest: d, bytes: bytes.to_vec() }
            }
        };
        let inventory = PathBuf::from(&objects.inventory_key);
        let inv = match &objects.inventory {
            Some(bytes) => found(
                bytes,
                self.inventory.as_ref().filter(|(p, _)| *p == inventory).map(|(_, s)| s.digest),
            ),
            None => Found::Unreadable("cannot read inventory: no such key".into()),
        };
        let files: Vec<(PathBuf, Found)> = objects
            .policies
            .iter()
            .map(|(key, bytes)| {
                let path = PathBuf::from(key);
                let cached = self.files.get(&path).map(|s| s.digest);
                let f = found(bytes, cached);
                (path, f)
            })
            .collect();
        Scan::of(Path::new(&objects.root), &inventory, inv, Vec::new(), files, files_read)
    }
}

impl Scan {
    /// The scan's content hash over what was found (see [`ParseCache::scan`]).
    fn of(
        dir: &Path,
        inventory: &Path,
        inv: Found,
        walk_errors: Vec<load::LoadError>,
        files: Vec<(PathBuf, Found)>,
        files_read: usize,
    ) -> Scan {
        let mut h = Sha256::new();
        h.update(b"inventory\0");
        match inv.digest() {
            Some(d) => h.update(d),
            None => h.update(b"\0unreadable"),
        }
        for e in &walk_errors {
            h.update(b"\0walk\0");
            h.update(e.to_string().as_bytes());
        }
        for (f, found) in &files {
            let rel = relative(f, dir);
            h.update(b"\0file\0");
            match rel.to_str() {
                Some(name) => h.update(name.as_bytes()),
                None => h.update(rel.to_string_lossy().as_bytes()),
            }
            h.update(b"\0");
            match found.digest() {
                Some(d) => h.update(d),
                None => h.update(b"unreadable"),
            }
        }
        Scan {
            hash: hex::encode(h.finalize()),
            inventory_path: inventory.to_owned(),
            inventory: inv,
            walk_errors,
            files,
            files_read,
        }
    }
}

/// `file` below `dir`, as `Path::strip_prefix` gives it (`file` itself when it is not
/// below). Every listed file is `dir` joined with a name, so the bytes after `dir` and one
/// separator are that name; taking them directly instead of comparing component by
/// component (and formatting each path lossily) was a sixth of a one-file reload at
/// 10,000 files. Anything unusual (`.`, doubled or trailing separators) takes the
/// component-wise path.
fn relative<'a>(file: &'a Path, dir: &Path) -> &'a Path {
    use std::os::unix::ffi::OsStrExt;
    let (f, d) = (file.as_os_str().as_bytes(), dir.as_os_str().as_bytes());
    let rest = f.strip_prefix(d).and_then(|rest| {
        if d.last() == Some(&b'/') { Some(rest) } else { rest.strip_prefix(b"/") }
    });
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !d.is_empty()
                && !rest.starts_with(b"/")
                && !rest.starts_with(b"./")
                && rest != b"."
                && !rest.ends_with(b"/")
                && !rest.ends_with(b"/.")
                && !rest.windows(2).any(|w| w == b"//")
                && !rest.windows(3).any(|w| w == b"/./")
                && !d.windows(2).any(|w| w == b"//" || w == b"/.") =>
        {
            Path::new(std::ffi::OsStr::from_bytes(rest))
        }
        _ => file.strip_prefix(dir).unwrap_or(file),
    }
}

impl ParseCache {
    /// What [`load::load`] returns for the scanned files, reusing cached parses. All or
    /// nothing, and every problem in every file reported, exactly like the full load.
    fn load(&mut self, scan: Scan) -> Result<PolicySet, LoadErrors> {
        let mut errors = Vec::new();
        let inventory_path = scan.inventory_path;
        let inv = match scan.inventory {
            Found::Cached(_) => self.inventory.as_ref().map(|(_, seen)| seen.parsed.clone()),
            Found::Read { stamp, trusted, digest, bytes } => {
                self.parsed += 1;
                match load::parse_inventory_file(&bytes, &inventory_path) {
                    Ok(inv) => {
                        let parsed = Arc::new(inv);
                        let seen = Seen { stamp, trusted, digest, parsed: parsed.clone() };
                        self.inventory = Some((inventory_path.clone(), seen));
                        Some(parsed)
                    }
                    Err(e) => {
                        self.inventory = None;
                        errors.extend(e.0);
                        None
                    }
                }
            }
            Found::Unreadable(message) => {
                errors.push(file_error(&inventory_path, message));
                None
            }
        };
        errors.extend(scan.walk_errors);
        let mut policies = Vec::with_capacity(self.files.len());
        // The paths scanned, moved (not hashed) here: only when the cache holds more
        // entries than were kept below are there entries of files that are gone, and
        // only then is a set of paths built to find them (hashing 10,000 paths on every
        // reload was a tenth of a one-file reload).
        let mut scanned = Vec::with_capacity(scan.files.len());
        let mut kept = 0usize;
        let mut parsed = parse_all(&scan.files).into_iter();
        for (file, found) in scan.files {
            let result = parsed.next().flatten();
            match found {
                Found::Cached(_) => {
                    if let Some(seen) = self.files.get(&file) {
                        policies.extend(seen.parsed.iter().cloned());
                        kept += 1;
                    }
                }
                Found::Read { stamp, trusted, digest, bytes } => {
                    self.parsed += 1;
                    let result = result.unwrap_or_else(|| load::parse_policy_file(&bytes, &file));
                    match result {
                        Ok(parsed) => {
                            let parsed: Vec<Arc<Policy>> =
                                parsed.into_iter().map(Arc::new).collect();
                            policies.extend(parsed.iter().cloned());
                            self.files
                                .insert(file.clone(), Seen { stamp, trusted, digest, parsed });
                            kept += 1;
                        }
                        Err(e) => {
                            self.files.remove(&file);
                            errors.extend(e.0);
                        }
                    }
                }
                Found::Unreadable(message) => {
                    self.files.remove(&file);
                    errors.push(file_error(&file, message));
                }
            }
            scanned.push(file);
        }
        if self.files.len() > kept {
            let present: std::collections::HashSet<&PathBuf> = scanned.iter().collect();
            self.files.retain(|k, _| present.contains(k));
        }
        match inv {
            Some(inventory) if errors.is_empty() => Ok(PolicySet { inventory, policies }),
            _ => Err(LoadErrors(errors)),
        }
    }
}

/// Files read above which parsing is spread over threads (start-up, a `git checkout`):
/// below it, starting threads costs more than it saves.
const PARALLEL_PARSE_MIN: usize = 64;

/// The parse of every file that was read, in `files` order (`None` for the others), on
/// as many threads as the machine offers when there are many: at start-up 10,000 policy
/// files are most of the time to the first policy served. A file's parse depends on its
/// path and bytes alone, so the order of parsing changes nothing.
fn parse_all(files: &[(PathBuf, Found)]) -> Vec<Option<Result<Vec<Policy>, LoadErrors>>> {
    let read = files.iter().filter(|(_, f)| matches!(f, Found::Read { .. })).count();
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(8);
    if read < PARALLEL_PARSE_MIN || threads < 2 {
        return Vec::new();
    }
    let chunk = files.len().div_ceil(threads);
    let parse = |part: &[(PathBuf, Found)]| -> Vec<Option<Result<Vec<Policy>, LoadErrors>>> {
        part.iter()
            .map(|(file, found)| match found {
                Found::Read { bytes, .. } => Some(load::parse_policy_file(bytes, file)),
                _ => None,
            })
            .collect()
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> =
            files.chunks(chunk).map(|part| scope.spawn(move || parse(part))).collect();
        // A thread that panicked (a parser bug) leaves its files to the sequential path.
        handles
            .into_iter()
            .zip(files.chunks(chunk))
            .flat_map(|(h, part)| {
                h.join().unwrap_or_else(|_| (0..part.len()).map(|_| None).collect())
            })
            .collect()
    })
}

/// `stat`s `path` and reads it unless `seen` says its bytes are known. A file read again
/// whose bytes hash as cached (touched, or rewritten with the same content) updates the
/// cached stamp and counts as cached: the parse belongs to the bytes, whatever happens to
/// the reload.
fn look<T>(
    path: &Path,
    seen: Option<&mut Seen<T>>,
    settle: Duration,
    files_read: &mut usize,
    what: &str,
) -> Found {
    let stamp = match std::fs::metadata(path) {
        Ok(m) => Stamp::of(&m),
        Err(e) => return Found::Unreadable(format!("{what}: {e}")),
    };
    if let Some(seen) = &seen
        && seen.trusted
        && seen.stamp == stamp
    {
        return Found::Cached(seen.digest);
    }
    // The clock is read before the bytes: a change after it leaves a newer ctime.
    let read_at = SystemTime::now();
    *files_read += 1;
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => return Found::Unreadable(format!("{what}: {e}")),
    };
    let (digest, trusted) = (digest(&bytes), stamp.settled(read_at, settle));
    match seen {
        Some(seen) if seen.digest == digest => {
            (seen.stamp, seen.trusted) = (stamp, trusted);
            Found::Cached(digest)
        }
        _ => Found::Read { stamp, trusted, digest, bytes },
    }
}

fn file_error(file: &Path, message: String) -> load::LoadError {
    load::LoadError { file: file.to_owned(), object: None, field: None, message }
}

fn options(sources: &Sources, now: SystemTime) -> CompileOptions {
    CompileOptions { default: sources.default, unknown: sources.unknown, now }
}

fn seen_key(p: &Policy) -> String {
    format!("{} {}", p.kind.as_str(), p.display_name())
}

/// Disk set + overlay, with TTL clocks pinned to first sight. Shares the disk set when
/// nothing must change (the common case); otherwise the copy shares every policy and the
/// inventory that the overlay leaves alone (`Arc`s), so it costs pointer copies.
fn compose(
    disk: &Arc<PolicySet>,
    overlay: &Overlay,
    first_seen: &mut HashMap<String, SystemTime>,
    now: SystemTime,
) -> (Arc<PolicySet>, String) {
    let needs_clock =
        |p: &Policy| matches!(p.expiry, Some(Expiry::Ttl(_))) && p.created_at.is_none();
    if overlay.entries().is_empty() && !disk.policies.iter().any(|p| needs_clock(p)) {
        return (disk.clone(), overlay.content_hash());
    }
    let mut set = PolicySet::clone(disk);
    let overlay_hash = overlay.apply(&mut set, now);
    for p in &mut set.policies {
        if needs_clock(p) {
            let at = *first_seen.entry(seen_key(p)).or_insert(now);
            Arc::make_mut(p).created_at = Some(at);
        }
    }
    (Arc::new(set), overlay_hash)
}

fn combined_hash(disk: &str, overlay: &str) -> String {
    if overlay.is_empty() {
        return disk.to_owned();
    }
    let mut h = Sha256::new();
    h.update(disk.as_bytes());
    h.update(b"\0overlay\0");
    h.update(overlay.as_bytes());
    hex::encode(h.finalize())
}

/// The content hash of the sources as a reload computes it (see `ParseCache::scan`),
/// from scratch: every file read and hashed.
pub fn hash_sources(dir: &Path, inventory: &Path) -> String {
    ParseCache::default().scan(dir, inventory).hash
}

#[cfg(test)]
mod tests {
    //! The per-file parse cache: a reload after one file of many changed sees exactly that
    //! change, and a file that parsed (and was cached) before and is now broken still
    //! rejects the whole reload. Real files in a temporary directory.

    use super::*;

    fn policy(i: usize, port: u16) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: p{i}, namespace: ns}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: w{i}}}}}\n  policyTypes: [Ingress]\n  \
             ingress:\n    - ports: [{{port: {port}}}]\n"
        )
    }

    fn setup(dir: &Path, files: usize) -> Sources {
        let mut inv = String::from("namespaces:\n  - name: ns\nworkloads:\n");
        for i in 0..files {
            inv.push_str(&format!(
                "  - {{name: w{i}, namespace: ns, labels: {{app: w{i}}}, ips: [127.0.20.{}]}}\n",
                i + 1
            ));
        }
        std::fs::write(dir.join("inventory.yaml"), inv).unwrap();
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        for i in 0..files {
            std::fs::write(dir.join(format!("policies/f{i:02}.yaml")), policy(i, 80)).unwrap();
        }
        Sources {
            dir: dir.join("policies"),
            inventory: dir.join("inventory.yaml"),
            default: DefaultAction::Deny,
            unknown: DefaultAction::Deny,
        }
    }

    fn port_of(set: &PolicySet, name: &str) -> String {
        let p = set.policies.iter().find(|p| p.name == name).expect("policy present");
        format!("{:?}", p.ingress)
    }

    /// Objects held in memory (the etcd source) reload like files: a changed object is
    /// parsed, the others come from the cache, a broken one rejects the whole reload and
    /// the last good generation stays; the hash is the same for the same objects.
    #[test]
    fn objects_in_memory_reload_like_files_and_a_broken_one_is_rejected_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sources = setup(dir.path(), 3);
        let inventory: Arc<[u8]> = std::fs::read(&sources.inventory).unwrap().into();
        let objects = |ports: [u16; 3], revision: i64| Objects {
            root: "/f/policy/objects/".into(),
            policies: (0..3)
                .map(|i| {
                    (
                        format!("/f/policy/objects/f{i}.yaml"),
                        policy(i, ports[i]).into_bytes().into(),
                    )
                })
                .collect(),
            inventory_key: "/f/policy/inventory".into(),
            inventory: Some(inventory.clone()),
            revision,
        };
        let revision = |r: &Reloader| r.handle().load().source_revision.load(Ordering::Relaxed);
        let overlay = Overlay::in_memory();
        let now = SystemTime::now();
        let (mut r, _) = Reloader::initial_with(
            sources.clone(),
            Some(Arc::new(objects([80; 3], 10))),
            &overlay,
            now,
        )
        .unwrap();
        assert_eq!(r.applied().policies.len(), 3);
        assert_eq!(revision(&r), 10);
        r.set_objects(Arc::new(objects([80, 81, 80], 11)));
        let report = r.apply(Trigger::Watch, &overlay, now);
        assert_eq!(report.result, ReloadResult::Ok);
        assert_eq!(report.phases.files_parsed, 1, "only the changed object is parsed");
        assert!(port_of(r.applied(), "p1").contains("81"));
        let good = report.hash.clone();
        assert_eq!(revision(&r), 11);

        let mut broken = objects([80, 82, 80], 12);
        broken.policies.insert("/f/policy/objects/f2.yaml".into(), b"kind: [".to_vec().into());
        r.set_objects(Arc::new(broken));
        let report = r.apply(Trigger::Watch, &overlay, now);
        assert_eq!(report.result, ReloadResult::Error);
        assert!(
            report.errors.iter().any(|p| p.file.as_deref() == Some("/f/policy/objects/f2.yaml"))
        );
        assert_eq!(r.generation(), 2, "the last good generation stays");
        assert!(port_of(r.applied(), "p1").contains("81"), "nothing of the broken push applied");
        assert_eq!(revision(&r), 11, "the revision of the policy in force, not the broken one");
        let report = r.apply(Trigger::Emergency, &overlay, now);
        assert_ne!(report.result, ReloadResult::Error);
        assert_eq!(revision(&r), 11, "a reload that reads no objects keeps their revision");

        let mut no_inventory = objects([80, 81, 80], 13);
        no_inventory.inventory = None;
        r.set_objects(Arc::new(no_inventory));
        assert_eq!(r.apply(Trigger::Watch, &overlay, now).result, ReloadResult::Error);

        assert_eq!(revision(&r), 11);

        r.set_objects(Arc::new(objects([80, 81, 80], 14)));
        let report = r.apply(Trigger::Watch, &overlay, now);
        assert_eq!(report.result, ReloadResult::Unchanged);
        assert_eq!(report.hash, good);
        assert_eq!(revision(&r), 14, "the same objects at a later revision: that one is in force");
    }

    /// A watch reload reads only the files the watcher named, and ends where a full scan
    /// ends: same set, same content hash (edits, a new file, a removed file, a new
    /// subdirectory, the inventory).
    #[test]
    fn named_changes_read_only_those_files_and_equal_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        let sources = setup(dir.path(), 20);
        let overlay = Overlay::in_memory();
        let now = SystemTime::now();
        let (mut r, _) = Reloader::initial(sources, &overlay, now).unwrap();
        let pol = dir.path().join("policies");
        let full_hash = || hash_sources(&pol, &dir.path().join("inventory.yaml"));
        let changed = |files: &[&str], inventory: bool| ChangedSources {
            files: files.iter().map(|f| pol.join(f)).collect(),
            inventory,
            everything: false,
        };

        std::fs::write(pol.join("f07.yaml"), policy(7, 9443)).unwrap();
        let report =
            r.apply_changes(Trigger::Watch, &overlay, now, Some(&changed(&["f07.yaml"], false)));
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert_eq!(report.phases.files_read, 1, "only the named file is read");
        assert!(port_of(r.applied(), "p7").contains("9443"));
        assert_eq!(report.hash, full_hash());

        // A new file, a removed one and a temporary file in one batch.
        std::fs::write(pol.join("g00.yaml"), policy(100, 7000)).unwrap();
        std::fs::remove_file(pol.join("f03.yaml")).unwrap();
        let c = changed(&["g00.yaml", "f03.yaml", ".g00.yaml.tmp"], false);
        let report = r.apply_changes(Trigger::Watch, &overlay, now, Some(&c));
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert_eq!(report.hash, full_hash());
        let full = load::load(&pol, &dir.path().join("inventory.yaml")).unwrap();
        assert_eq!(r.applied().policies, full.policies);

        // A new directory is not a file the list can describe: everything is scanned.
        std::fs::create_dir(pol.join("sub")).unwrap();
        std::fs::write(pol.join("sub/h.yaml"), policy(101, 7001)).unwrap();
        let report =
            r.apply_changes(Trigger::Watch, &overlay, now, Some(&changed(&["sub"], false)));
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert_eq!(report.hash, full_hash());
        assert!(r.applied().policies.iter().any(|p| p.name == "p101"));

        // A broken file rejects the reload; naming another file later still rejects it
        // (the broken one has no cached parse, so it is read again).
        std::fs::write(pol.join("f05.yaml"), "kind: [").unwrap();
        let report =
            r.apply_changes(Trigger::Watch, &overlay, now, Some(&changed(&["f05.yaml"], false)));
        assert_eq!(report.result, ReloadResult::Error);
        std::fs::write(pol.join("f06.yaml"), policy(6, 6006)).unwrap();
        let report =
            r.apply_changes(Trigger::Watch, &overlay, now, Some(&changed(&["f06.yaml"], false)));
        assert_eq!(report.result, ReloadResult::Error, "the broken file still counts");
        std::fs::write(pol.join("f05.yaml"), policy(5, 5005)).unwrap();
        let report =
            r.apply_changes(Trigger::Watch, &overlay, now, Some(&changed(&["f05.yaml"], false)));
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert_eq!(report.hash, full_hash());

        // The inventory.
        let inv = std::fs::read_to_string(dir.path().join("inventory.yaml")).unwrap();
        std::fs::write(
            dir.path().join("inventory.yaml"),
            inv.replace("127.0.20.1]", "127.0.21.1]"),
        )
        .unwrap();
        let report = r.apply_changes(Trigger::Watch, &overlay, now, Some(&changed(&[], true)));
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert_eq!(report.hash, full_hash());
    }

    /// The byte-wise shortcut names every file as `Path::strip_prefix` does.
    #[test]
    fn relative_equals_strip_prefix() {
        let cases = [
            ("policies/a.yaml", "policies"),
            ("policies/ns/a.yaml", "policies"),
            ("policies/ns/a.yaml", "policies/"),
            ("/f/policy/objects/f0.yaml", "/f/policy/objects/"),
            ("./p/a.yaml", "./p"),
            ("./a.yaml", "."),
            ("p/./a.yaml", "p"),
            ("p//a.yaml", "p"),
            ("p/a/.", "p"),
            ("p/../q/a.yaml", "p"),
            ("/w/.hidden/p/a.yaml", "/w/.hidden/p"),
            ("other/a.yaml", "policies"),
            ("policiesX/a.yaml", "policies"),
            ("p", "p"),
            ("p/a.yaml", ""),
        ];
        for (file, dir) in cases {
            let (file, dir) = (Path::new(file), Path::new(dir));
            assert_eq!(
                relative(file, dir).to_string_lossy(),
                file.strip_prefix(dir).unwrap_or(file).to_string_lossy(),
                "{file:?} under {dir:?}"
            );
        }
    }

    #[test]
    fn one_edited_file_among_many_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let sources = setup(dir.path(), 20);
        let overlay = Overlay::in_memory();
        let now = SystemTime::now();
        let (mut r, _) = Reloader::initial(sources, &overlay, now).unwrap();
        let before_7 = port_of(r.applied(), "p7");
        let before_8 = port_of(r.applied(), "p8");
        assert_eq!(r.cache.files.len(), 20, "every file cached after the first load");

        std::fs::write(dir.path().join("policies/f07.yaml"), policy(7, 9443)).unwrap();
        let report = r.apply(Trigger::Api, &overlay, now);
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        let changes = report.changes.unwrap();
        assert_eq!(changes.policies_modified, 1);
        assert_eq!(changes.modified, vec!["NetworkPolicy ns/p7".to_string()]);
        assert_ne!(port_of(r.applied(), "p7"), before_7, "the edit is in the new set");
        assert!(port_of(r.applied(), "p7").contains("9443"));
        assert_eq!(port_of(r.applied(), "p8"), before_8, "untouched files are unchanged");
        assert_eq!(r.applied().policies.len(), 20);
        // The result equals a full load from scratch.
        let full =
            load::load(&dir.path().join("policies"), &dir.path().join("inventory.yaml")).unwrap();
        assert_eq!(r.applied().policies, full.policies);
        assert_eq!(r.applied().inventory, full.inventory);

        // A removed file leaves the set and the cache.
        std::fs::remove_file(dir.path().join("policies/f03.yaml")).unwrap();
        let report = r.apply(Trigger::Api, &overlay, now);
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert_eq!(r.applied().policies.len(), 19);
        assert_eq!(r.cache.files.len(), 19);
    }

    #[test]
    fn unchanged_files_are_not_read_again_and_a_quick_same_size_rewrite_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let sources = setup(dir.path(), 20);
        let overlay = Overlay::in_memory();
        let now = SystemTime::now();
        let (mut r, _) = Reloader::initial(sources, &overlay, now).unwrap();

        // Just written: no stamp is trusted yet, so every file is read (and none parsed).
        let f7 = dir.path().join("policies/f07.yaml");
        std::fs::write(&f7, policy(7, 9443)).unwrap();
        let report = r.apply(Trigger::Api, &overlay, now);
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert_eq!(report.phases.files_read, 21, "20 policy files and the inventory");
        assert_eq!(report.phases.files_parsed, 1);
        // At once, in place, the same size: the stamp may not move (one clock tick), but
        // the file was read too soon after its last change to trust the stamp.
        std::fs::write(&f7, policy(7, 9444)).unwrap();
        let report = r.apply(Trigger::Api, &overlay, now);
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert!(port_of(r.applied(), "p7").contains("9444"));

        // Stamps settled (the wait shortened for the test): only a replaced file is read.
        r.cache.settle = Duration::ZERO;
        assert_eq!(r.apply(Trigger::Api, &overlay, now).result, ReloadResult::Unchanged);
        let tmp = dir.path().join("policies/.f09.tmp");
        std::fs::write(&tmp, policy(9, 7000)).unwrap();
        std::fs::rename(&tmp, dir.path().join("policies/f09.yaml")).unwrap();
        let report = r.apply(Trigger::Api, &overlay, now);
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert_eq!((report.phases.files_read, report.phases.files_parsed), (1, 1));
        assert!(port_of(r.applied(), "p9").contains("7000"));
        assert_eq!(report.changes.unwrap().modified, vec!["NetworkPolicy ns/p9".to_string()]);
        // Touched, same bytes: read again (the stamp moved), not parsed, nothing swapped.
        let f3 = dir.path().join("policies/f03.yaml");
        std::fs::write(&f3, std::fs::read(&f3).unwrap()).unwrap();
        let report = r.apply(Trigger::Api, &overlay, now);
        assert_eq!(report.result, ReloadResult::Unchanged, "{report:?}");
        assert_eq!(report.phases.files_read, 1);
        // The same content as a full load from scratch.
        let full =
            load::load(&dir.path().join("policies"), &dir.path().join("inventory.yaml")).unwrap();
        assert_eq!(r.applied().policies, full.policies);
        assert_eq!(
            r.handle().load().content_hash,
            hash_sources(&r.sources.dir, &r.sources.inventory)
        );
    }

    #[test]
    fn change_summary_compares_only_what_is_not_shared() {
        let dir = tempfile::tempdir().unwrap();
        let set = load::load(&setup(dir.path(), 6).dir, &dir.path().join("inventory.yaml"))
            .expect("loads");
        let p = |i: usize| set.policies[i].clone();
        let edited = |i: usize| {
            let mut changed = Policy::clone(&set.policies[i]);
            changed.ingress = Some(Vec::new());
            assert!(!same_policy(&changed, &set.policies[i]));
            Arc::new(changed)
        };
        let with =
            |policies: Vec<Arc<Policy>>| PolicySet { inventory: set.inventory.clone(), policies };
        // p1 modified, p2 removed, p3 replaced by an equal copy (not shared, not changed),
        // p4 and p5 swapped (shared, only moved), a copy of p0 under a new name added.
        let mut renamed = Policy::clone(&set.policies[0]);
        renamed.name = "p0-copy".into();
        let equal_p3 = Arc::new(Policy::clone(&set.policies[3]));
        let new = with(vec![p(0), edited(1), equal_p3, p(5), p(4), Arc::new(renamed)]);
        let s = ChangeSummary::between(&set, &new);
        assert_eq!((s.policies_added, s.policies_removed, s.policies_modified), (1, 1, 1));
        assert_eq!(s.added, vec!["NetworkPolicy ns/p0-copy".to_string()]);
        assert_eq!(s.removed, vec!["NetworkPolicy ns/p2".to_string()]);
        assert_eq!(s.modified, vec!["NetworkPolicy ns/p1".to_string()]);
        assert_eq!((s.workloads_added, s.workloads_relabelled), (0, 0), "shared inventory");
        // Identical sets, and the same policies in another order: no change.
        assert!(ChangeSummary::between(&set, &set.clone()).is_empty());
        let mut reordered = set.policies.clone();
        reordered.reverse();
        assert!(ChangeSummary::between(&set, &with(reordered)).is_empty());
    }

    #[test]
    fn cached_then_broken_file_still_rejects_the_reload() {
        let dir = tempfile::tempdir().unwrap();
        let sources = setup(dir.path(), 10);
        let overlay = Overlay::in_memory();
        let now = SystemTime::now();
        let (mut r, _) = Reloader::initial(sources, &overlay, now).unwrap();
        let bad = dir.path().join("policies/f04.yaml");
        assert!(r.cache.files.contains_key(&bad), "parsed and cached before it breaks");

        // A field error inside an object, and then bad YAML: both name the file.
        let broken = policy(4, 80).replace("podSelector", "podSelectr");
        for text in [broken.as_str(), "kind: NetworkPolicy\nmetadata: [unclosed\n"] {
            std::fs::write(&bad, text).unwrap();
            let report = r.apply(Trigger::Api, &overlay, now);
            assert_eq!(report.result, ReloadResult::Error, "{report:?}");
            assert_eq!(r.generation(), 1, "the last good generation stays in force");
            assert_eq!(r.handle().load().generation, Generation(1));
            assert!(
                report
                    .errors
                    .iter()
                    .any(|p| p.file.as_deref().is_some_and(|f| f.ends_with("f04.yaml"))),
                "the error names the file: {:?}",
                report.errors
            );
            assert!(!r.cache.files.contains_key(&bad), "a broken file is not cached");
        }
        // An edit of another file does not get through while f04 is broken.
        std::fs::write(dir.path().join("policies/f01.yaml"), policy(1, 81)).unwrap();
        assert_eq!(r.apply(Trigger::Api, &overlay, now).result, ReloadResult::Error);

        // Fixing it recovers, with both edits.
        std::fs::write(&bad, policy(4, 8080)).unwrap();
        let report = r.apply(Trigger::Api, &overlay, now);
        assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
        assert_eq!(r.generation(), 2);
        assert!(port_of(r.applied(), "p4").contains("8080"));
        assert!(port_of(r.applied(), "p1").contains("81"));

        // A broken inventory after a cached one is rejected too.
        std::fs::write(dir.path().join("inventory.yaml"), "workloads: [unclosed\n").unwrap();
        let report = r.apply(Trigger::Api, &overlay, now);
        assert_eq!(report.result, ReloadResult::Error, "{report:?}");
        assert_eq!(r.generation(), 2);
    }
}
