//! Load → compile → swap: the one way a new policy generation comes into force.
//!
//! A [`Reloader`] owns the last good [`PolicySet`] read from disk and the generation
//! counter. [`Reloader::apply`] reads the sources, hashes them, loads and validates them
//! (all or nothing), lays the emergency overlay on top, compiles, and only then stores the
//! new snapshot with one `ArcSwap::store`. Any error leaves the snapshot in force
//! untouched: the data path never sees half a reload.
//!
//! Triggers that change nothing on disk (an emergency policy, an expiry) recompile the
//! last good set instead of reading the disk again, so a file broken in the meantime never
//! blocks a quarantine or keeps an expired policy alive.
//!
//! TTL policies without `metadata.creationTimestamp` count their TTL from the moment this
//! reloader first saw them (`first_seen`), so a reload never restarts their clock.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::emergency::Overlay;
use crate::policy::ir::{Expiry, Inventory, Policy, PolicySet};
use crate::policy::{
    CompileError, CompileOptions, CompiledPolicy, DefaultAction, Generation, LoadErrors,
    PolicyHandle, PolicySnapshot, load,
};

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

/// Where the policy comes from, and how flows nothing decides are treated.
#[derive(Clone, Debug)]
pub struct Sources {
    pub dir: PathBuf,
    pub inventory: PathBuf,
    pub default: DefaultAction,
    pub unknown: DefaultAction,
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
    pub fn between(old: &PolicySet, new: &PolicySet) -> ChangeSummary {
        fn key(p: &Policy) -> String {
            format!("{} {}", p.kind.as_str(), p.display_name())
        }
        fn push(list: &mut Vec<String>, name: String) {
            if list.len() < ChangeSummary::LIST_CAP {
                list.push(name);
            }
        }
        let mut s = ChangeSummary::default();
        let old_p: HashMap<String, &Policy> = old.policies.iter().map(|p| (key(p), p)).collect();
        let new_p: HashMap<String, &Policy> = new.policies.iter().map(|p| (key(p), p)).collect();
        // Sorted so the capped lists are deterministic.
        let names: BTreeSet<&String> = old_p.keys().chain(new_p.keys()).collect();
        for name in names {
            match (old_p.get(name), new_p.get(name)) {
                (None, Some(_)) => {
                    s.policies_added += 1;
                    push(&mut s.added, name.clone());
                }
                (Some(_), None) => {
                    s.policies_removed += 1;
                    push(&mut s.removed, name.clone());
                }
                (Some(a), Some(b)) if !same_policy(a, b) => {
                    s.policies_modified += 1;
                    push(&mut s.modified, name.clone());
                }
                _ => {}
            }
        }
        let wkey = |w: &crate::policy::ir::Workload| format!("{}/{}", w.namespace, w.name);
        let old_w: HashMap<String, _> =
            old.inventory.workloads.iter().map(|w| (wkey(w), w)).collect();
        let new_w: HashMap<String, _> =
            new.inventory.workloads.iter().map(|w| (wkey(w), w)).collect();
        let names: BTreeSet<&String> = old_w.keys().chain(new_w.keys()).collect();
        for name in names {
            match (old_w.get(name), new_w.get(name)) {
                (None, Some(_)) => s.workloads_added += 1,
                (Some(_), None) => s.workloads_removed += 1,
                (Some(a), Some(b)) if a != b => {
                    s.workloads_relabelled += 1;
                    push(&mut s.relabelled, name.clone());
                }
                _ => {}
            }
        }
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
        let started = Instant::now();
        let disk_hash = hash_sources(&sources.dir, &sources.inventory);
        let mut cache = ParseCache::default();
        let disk =
            Arc::new(cache.load(&sources.dir, &sources.inventory).map_err(ReloadError::Load)?);
        let mut first_seen = HashMap::new();
        let (applied, overlay_hash) = compose(&disk, overlay, &mut first_seen, now);
        let compiled = CompiledPolicy::compile(&applied, &options(&sources, now))?;
        let compile_duration = started.elapsed();
        let hash = combined_hash(&disk_hash, &overlay_hash);
        let snapshot = PolicySnapshot {
            compiled,
            generation: Generation(1),
            content_hash: hash.clone(),
            loaded_at: now,
        };
        let handle: PolicyHandle = Arc::new(arc_swap::ArcSwap::from_pointee(snapshot));
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
        };
        Ok((reloader, report))
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
    pub fn apply(&mut self, trigger: Trigger, overlay: &Overlay, now: SystemTime) -> ReloadReport {
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
        };
        let mut disk = self.disk.clone();
        let mut disk_hash = self.disk_hash.clone();
        if trigger.reads_disk() {
            let fresh_hash = hash_sources(&self.sources.dir, &self.sources.inventory);
            if fresh_hash == self.disk_hash && overlay.content_hash() == self.overlay_hash {
                report.duration = started.elapsed();
                return report;
            }
            if fresh_hash != self.disk_hash {
                match self.cache.load(&self.sources.dir, &self.sources.inventory) {
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
        }
        let mut first_seen = self.first_seen.clone();
        let (applied, overlay_hash) = compose(&disk, overlay, &mut first_seen, now);
        let hash = combined_hash(&disk_hash, &overlay_hash);
        let compiled = match CompiledPolicy::compile(&applied, &options(&self.sources, now)) {
            Ok(c) => c,
            Err(e) => return self.rejected(report, ReloadError::Compile(e), hash, started),
        };
        report.compile_duration = started.elapsed();
        let generation = self.generation + 1;
        self.handle.store(Arc::new(PolicySnapshot {
            compiled,
            generation: Generation(generation),
            content_hash: hash.clone(),
            loaded_at: now,
        }));
        // Bookkeeping after the swap: the new generation is already in force.
        report.changes = Some(ChangeSummary::between(&self.applied, &applied));
        self.generation = generation;
        self.disk = disk;
        self.disk_hash = disk_hash;
        self.applied = applied;
        self.overlay_hash = overlay_hash;
        // Forget first sightings of policies that are gone, so the map stays bounded.
        if !first_seen.is_empty() {
            let present: std::collections::HashSet<String> =
                self.applied.policies.iter().map(seen_key).collect();
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

/// Parsed files from earlier loads, keyed by path and the SHA-256 of the bytes read, so a
/// reload after one file changed parses only that file. At 10,000 policies in 100 files
/// plus a 10,000-workload inventory, parsing everything took ~1.5 s of a reload; a file's
/// result depends on its path and bytes alone, so reusing it changes nothing but time.
///
/// Only files that parsed cleanly are kept (a broken file is parsed, and rejected, on every
/// attempt), and entries for files no longer present are dropped after each load, so the
/// cache holds at most one entry per file in the directory.
#[derive(Debug, Default)]
struct ParseCache {
    files: HashMap<PathBuf, (Digest32, Vec<Policy>)>,
    inventory: Option<(PathBuf, Digest32, Arc<Inventory>)>,
}

type Digest32 = [u8; 32];

fn digest(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

impl ParseCache {
    /// What [`load::load`] returns for the same files, reusing cached parses. All or
    /// nothing, and every problem in every file reported, exactly like the full load.
    fn load(&mut self, dir: &Path, inventory: &Path) -> Result<PolicySet, LoadErrors> {
        let mut errors = Vec::new();
        let inv = match std::fs::read(inventory) {
            Ok(bytes) => {
                let d = digest(&bytes);
                match &self.inventory {
                    Some((p, h, inv)) if p == inventory && *h == d => Some(Inventory::clone(inv)),
                    _ => match load::parse_inventory_file(&bytes, inventory) {
                        Ok(inv) => {
                            let keep = Arc::new(inv.clone());
                            self.inventory = Some((inventory.to_owned(), d, keep));
                            Some(inv)
                        }
                        Err(e) => {
                            self.inventory = None;
                            errors.extend(e.0);
                            None
                        }
                    },
                }
            }
            Err(e) => {
                errors.push(load::LoadError {
                    file: inventory.to_owned(),
                    object: None,
                    field: None,
                    message: format!("cannot read inventory: {e}"),
                });
                None
            }
        };
        let files = load::policy_files(dir, &mut errors);
        let mut policies = Vec::new();
        for file in &files {
            let bytes = match std::fs::read(file) {
                Ok(b) => b,
                Err(e) => {
                    self.files.remove(file);
                    errors.push(load::LoadError {
                        file: file.clone(),
                        object: None,
                        field: None,
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            let d = digest(&bytes);
            if let Some((h, parsed)) = self.files.get(file)
                && *h == d
            {
                policies.extend(parsed.iter().cloned());
                continue;
            }
            match load::parse_policy_file(&bytes, file) {
                Ok(parsed) => {
                    policies.extend(parsed.iter().cloned());
                    self.files.insert(file.clone(), (d, parsed));
                }
                Err(e) => {
                    self.files.remove(file);
                    errors.extend(e.0);
                }
            }
        }
        let present: std::collections::HashSet<&PathBuf> = files.iter().collect();
        self.files.retain(|k, _| present.contains(k));
        match inv {
            Some(inventory) if errors.is_empty() => Ok(PolicySet { inventory, policies }),
            _ => Err(LoadErrors(errors)),
        }
    }
}

fn options(sources: &Sources, now: SystemTime) -> CompileOptions {
    CompileOptions { default: sources.default, unknown: sources.unknown, now }
}

fn seen_key(p: &Policy) -> String {
    format!("{} {}", p.kind.as_str(), p.display_name())
}

/// Disk set + overlay, with TTL clocks pinned to first sight. Shares the disk set when
/// nothing must change (the common case), so a reload of 10,000 policies does not copy
/// them (a clone of that set costs about as much as hashing every source file).
fn compose(
    disk: &Arc<PolicySet>,
    overlay: &Overlay,
    first_seen: &mut HashMap<String, SystemTime>,
    now: SystemTime,
) -> (Arc<PolicySet>, String) {
    let needs_clock =
        |p: &Policy| matches!(p.expiry, Some(Expiry::Ttl(_))) && p.created_at.is_none();
    if overlay.entries().is_empty() && !disk.policies.iter().any(needs_clock) {
        return (disk.clone(), overlay.content_hash());
    }
    let mut set = PolicySet::clone(disk);
    let overlay_hash = overlay.apply(&mut set, now);
    for p in &mut set.policies {
        if needs_clock(p) {
            p.created_at = Some(*first_seen.entry(seen_key(p)).or_insert(now));
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

/// SHA-256 over the inventory and every policy file the loader would read (same rules:
/// recursive, hidden and editor backup files skipped, `.yaml`/`.yml`), in sorted order,
/// each preceded by its path relative to the directory. Unreadable files hash as an
/// error marker, so a reload is attempted and the loader names the problem.
pub fn hash_sources(dir: &Path, inventory: &Path) -> String {
    let mut h = Sha256::new();
    h.update(b"inventory\0");
    match std::fs::read(inventory) {
        Ok(bytes) => h.update(&bytes),
        Err(e) => h.update(format!("\0unreadable: {e}").as_bytes()),
    }
    let mut files = Vec::new();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_file() => files.push(dir.to_owned()),
        Ok(_) => walk(dir, 0, &mut files),
        Err(e) => h.update(format!("\0policy dir unreadable: {e}").as_bytes()),
    }
    files.sort();
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(&f);
        h.update(b"\0file\0");
        h.update(rel.to_string_lossy().as_bytes());
        h.update(b"\0");
        match std::fs::read(&f) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(e) => h.update(format!("unreadable: {e}").as_bytes()),
        }
    }
    hex::encode(h.finalize())
}

/// Same limit as the loader's.
const MAX_DEPTH: usize = 32;

fn walk(dir: &Path, depth: usize, files: &mut Vec<PathBuf>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if name.starts_with('.') {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, depth + 1, files),
            Ok(_) if is_policy_file(name) => files.push(path),
            _ => {}
        }
    }
}

/// The loader's rule for which files hold policy.
pub(crate) fn is_policy_file(name: &str) -> bool {
    !name.starts_with('.')
        && !name.ends_with('~')
        && !name.ends_with(".swp")
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
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
