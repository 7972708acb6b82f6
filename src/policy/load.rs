//! Loading the inventory and the policy directory into the [`ir`](super::ir) model.
//!
//! All or nothing: every file is read and every object checked, every problem is
//! collected as a [`LoadError`] naming the file, the object (`Kind ns/name`) and the field
//! path, and only when there are none is a [`PolicySet`] returned. A gateway that
//! reloads therefore never enforces half a policy directory.
//!
//! Layout: [`k8s`] holds the serde types (strict: unknown fields are errors, like
//! `kubectl --validate=strict`); [`validate`] the Kubernetes value rules shared by all
//! kinds; [`netpol`] and [`admin`] map NetworkPolicy and the cluster-scoped kinds onto the
//! IR; [`annotations`] reads flowgate's `flowgate.dev/*` annotations; [`inventory`]
//! reads `inventory.yaml`. Nothing here panics on input: every value from a file goes
//! through a check that reports instead.
//!
//! Paths: `load` takes the directory and file it is given as they are; relative paths
//! are relative to the working directory (`config::Config::load` has already made the
//! config's paths relative to the config file). `Policy::source` is the path of the file
//! as found under the directory.

mod admin;
mod annotations;
mod inventory;
mod k8s;
mod netpol;
pub(crate) mod strict;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_norway::Value;
use thiserror::Error;

use super::ir::{Inventory, Policy, PolicySet};

/// One problem in one input file, with enough context for a human to fix it.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    /// `Kind ns/name` of the object, when the error is inside one.
    pub object: Option<String>,
    /// The field path inside the object, e.g. `spec.ingress[0].from[1].ipBlock.cidr`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadError {
    /// `file: Kind ns/name: field: message`, leaving out the parts that are unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found; loading reports them all at once.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error(s) in policy input", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Loads the policy directory (recursively) and the inventory. All or nothing.
///
/// # Errors
/// Every problem in every file, as [`LoadErrors`]; nothing partial is returned.
pub fn load(policy_dir: &Path, inventory: &Path) -> Result<PolicySet, LoadErrors> {
    load_spelled(policy_dir, inventory).map(|(set, _)| set)
}

/// The [`Spelling`]s of the files of a load, by file (files without any left out), in
/// file and document order.
pub type FileSpellings = Vec<(PathBuf, Vec<Spelling>)>;

/// [`load`], also giving the [`Spelling`]s of the files it read, found while parsing
/// them (so `flowgate check` does not read and parse every file a second time for its
/// lint). The inventory and the policy files are read and parsed in parallel (the files
/// over the machine's cores, each file's results kept in file order): the messages and
/// their order are those of a sequential load.
///
/// # Errors
/// Every problem in every file, as [`LoadErrors`]; nothing partial is returned.
pub fn load_spelled(
    policy_dir: &Path,
    inventory: &Path,
) -> Result<(PolicySet, FileSpellings), LoadErrors> {
    let ((inventory, mut errors), (policies, spellings, policy_errors)) = std::thread::scope(|s| {
        let inv = s.spawn(|| {
            let mut errors = Vec::new();
            (inventory::load_file(inventory, &mut errors), errors)
        });
        let policies = policies_from_dir(policy_dir);
        // A panic is a bug, not input: pass it on.
        (inv.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), policies)
    });
    errors.extend(policy_errors);
    if errors.is_empty() {
        Ok((PolicySet::new(inventory, policies), spellings))
    } else {
        Err(LoadErrors(errors))
    }
}

/// Loads only the inventory file.
///
/// # Errors
/// Every problem in the file.
pub fn load_inventory(path: &Path) -> Result<Inventory, LoadErrors> {
    let mut errors = Vec::new();
    let inv = inventory::load_file(path, &mut errors);
    if errors.is_empty() { Ok(inv) } else { Err(LoadErrors(errors)) }
}

/// Parses inventory YAML text; `file` is only used in messages.
///
/// # Errors
/// Every problem in the text.
pub fn parse_inventory(text: &str, file: &Path) -> Result<Inventory, LoadErrors> {
    let mut errors = Vec::new();
    let inv = inventory::parse(text, file, &mut errors);
    if errors.is_empty() { Ok(inv) } else { Err(LoadErrors(errors)) }
}

/// Loads a policy directory (or a single file) without an inventory.
///
/// # Errors
/// Every problem in every file.
pub fn load_policies(dir: &Path) -> Result<Vec<Policy>, LoadErrors> {
    let (p, _, errors) = policies_from_dir(dir);
    if errors.is_empty() { Ok(p) } else { Err(LoadErrors(errors)) }
}

/// Parses policy YAML text (one or more documents); `file` becomes `Policy::source`.
/// The admin API uses this for emergency policies that never touch the disk.
///
/// # Errors
/// Every problem in the text.
pub fn parse_policies(text: &str, file: &Path) -> Result<Vec<Policy>, LoadErrors> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    documents(text, file, &mut errors, &mut out, &mut Vec::new());
    if errors.is_empty() { Ok(out) } else { Err(LoadErrors(errors)) }
}

/// Collects errors for one object of one file. Checks report through it and carry on,
/// so one pass finds every problem in the object.
pub(crate) struct Report<'a> {
    file: &'a Path,
    object: Option<String>,
    errors: &'a mut Vec<LoadError>,
    found: usize,
}

impl<'a> Report<'a> {
    fn new(file: &'a Path, object: Option<String>, errors: &'a mut Vec<LoadError>) -> Self {
        Report { file, object, errors, found: 0 }
    }

    /// Records a problem at `field` (empty: the object as a whole).
    pub(crate) fn error(&mut self, field: &str, message: impl Into<String>) {
        self.found += 1;
        self.errors.push(LoadError {
            file: self.file.to_owned(),
            object: self.object.clone(),
            field: (!field.is_empty()).then(|| field.to_owned()),
            message: message.into(),
        });
    }

    /// True once any problem was recorded through this report.
    pub(crate) fn failed(&self) -> bool {
        self.found > 0
    }

    pub(crate) fn file(&self) -> &Path {
        self.file
    }

    /// Deserialises `value` into `T`, reporting serde's first problem with its path.
    pub(crate) fn typed<T: DeserializeOwned>(&mut self, value: Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." { String::new() } else { path };
                self.error(&field, e.into_inner().to_string());
                None
            }
        }
    }
}

/// Files a policy directory walk picks up: `*.yaml`/`*.yml`, not hidden, not an editor
/// leftover (`.#x.yaml` lock files, `x.yaml~` backups, `x.swp` swap files).
pub(crate) fn is_policy_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && !name.ends_with('~')
        && !name.ends_with(".swp")
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Deep enough for any sane layout, shallow enough to stop a symlink loop.
const MAX_DEPTH: usize = 32;

/// The policy files a directory load reads, sorted (a file given as `dir` is the only
/// one). Walk problems go to `errors` exactly as a full [`load`] reports them, so a
/// caller that parses the files itself (the reloader's per-file cache) stays all or
/// nothing with the same messages.
pub fn policy_files(dir: &Path, errors: &mut Vec<LoadError>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_file() => files.push(dir.to_owned()),
        Ok(_) => walk(dir, 0, &mut files, errors),
        Err(e) => errors.push(file_error(dir, format!("cannot read policy directory: {e}"))),
    }
    files.sort();
    files
}

/// One policy file's bytes, as read from `file`, into its policies (`Policy::source` is
/// `file`). What a directory load does per file, for callers that read and cache files
/// themselves: a file's result depends on its path and bytes alone.
///
/// # Errors
/// Every problem in the file (text that is not UTF-8 included).
pub fn parse_policy_file(bytes: &[u8], file: &Path) -> Result<Vec<Policy>, LoadErrors> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_policies(text, file),
        Err(e) => Err(LoadErrors(vec![file_error(file, format!("cannot read: not UTF-8: {e}"))])),
    }
}

/// The inventory file's bytes, as read from `file`, into the inventory; see
/// [`parse_policy_file`].
///
/// # Errors
/// Every problem in the file (text that is not UTF-8 included).
pub fn parse_inventory_file(bytes: &[u8], file: &Path) -> Result<Inventory, LoadErrors> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_inventory(text, file),
        Err(e) => Err(LoadErrors(vec![file_error(
            file,
            format!("cannot read inventory: not UTF-8: {e}"),
        )])),
    }
}

/// What one policy file gave: its policies, its spellings and its problems.
#[derive(Default)]
struct FileLoad {
    policies: Vec<Policy>,
    spellings: Vec<Spelling>,
    errors: Vec<LoadError>,
}

fn load_one(file: &Path) -> FileLoad {
    let mut out = FileLoad::default();
    match std::fs::read_to_string(file) {
        Ok(text) => {
            documents(&text, file, &mut out.errors, &mut out.policies, &mut out.spellings);
        }
        Err(e) => out.errors.push(file_error(file, format!("cannot read: {e}"))),
    }
    out
}

/// Files per thread below which a directory is read on one thread (a thread costs more
/// than reading a few files).
const FILES_PER_THREAD: usize = 64;

/// Every policy file of `dir`, read and parsed over the machine's cores (threads take the
/// next file from a shared counter; the results are put back in file order).
fn policies_from_dir(dir: &Path) -> (Vec<Policy>, FileSpellings, Vec<LoadError>) {
    let mut errors = Vec::new();
    let files = policy_files(dir, &mut errors);
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(files.len() / FILES_PER_THREAD)
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(file) = files.get(i) else { break done };
            done.push((i, load_one(file)));
        }
    };
    let mut loads: Vec<(usize, FileLoad)> = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut all = work();
        for h in helpers {
            // A panic is a bug, not input: pass it on.
            all.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        all
    });
    loads.sort_unstable_by_key(|(i, _)| *i);
    let mut policies = Vec::new();
    let mut spellings = Vec::new();
    for (i, load) in loads {
        policies.extend(load.policies);
        errors.extend(load.errors);
        if !load.spellings.is_empty() {
            spellings.push((files[i].clone(), load.spellings));
        }
    }
    (policies, spellings, errors)
}

fn walk(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, errors: &mut Vec<LoadError>) {
    if depth > MAX_DEPTH {
        errors.push(file_error(dir, format!("directories nested deeper than {MAX_DEPTH}")));
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(file_error(dir, format!("cannot read directory: {e}")));
            return;
        }
    };
    for entry in entries {
        let path = match entry {
            Ok(e) => e.path(),
            Err(e) => {
                errors.push(file_error(dir, format!("cannot read directory: {e}")));
                continue;
            }
        };
        let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, depth + 1, files, errors),
            Ok(_) if is_policy_file(&path) => files.push(path),
            Ok(_) => {}
            Err(e) => errors.push(file_error(&path, format!("cannot read: {e}"))),
        }
    }
}

fn file_error(file: &Path, message: String) -> LoadError {
    LoadError { file: file.to_owned(), object: None, field: None, message }
}

/// Every YAML document of one file; empty documents are skipped, a syntax error ends the
/// file (the parser cannot resynchronise reliably after one). The [`Spelling`]s of its
/// NetworkPolicies go to `spellings`.
///
/// A file of NetworkPolicies only is read straight into the typed objects
/// ([`strict`], for speed: `benches/check_test.rs`); anything else, and any file with a
/// problem, goes through a `Value` per document, which gives every message its field
/// path. Both give the same policies (the fast path accepts only what the slow one does).
fn documents(
    text: &str,
    file: &Path,
    errors: &mut Vec<LoadError>,
    out: &mut Vec<Policy>,
    spellings: &mut Vec<Spelling>,
) {
    if !documents_fast(text, file, errors, out, spellings) {
        documents_slow(text, file, errors, out, spellings);
    }
}

/// [`documents`] on the fast path; `false` (and nothing written) when the text is not
/// for it.
fn documents_fast(
    text: &str,
    file: &Path,
    errors: &mut Vec<LoadError>,
    out: &mut Vec<Policy>,
    spellings: &mut Vec<Spelling>,
) -> bool {
    let Some(docs) = strict::documents::<k8s::Object<k8s::NetworkPolicySpec>>(text) else {
        return false;
    };
    if !docs.iter().flatten().all(|d| d.kind == "NetworkPolicy" && d.api_version == NETWORKING_V1) {
        return false;
    }
    for (i, doc) in docs.into_iter().enumerate() {
        let Some(obj) = doc else { continue };
        let meta = &obj.metadata;
        let label = match &meta.name {
            Some(n) => {
                format!("NetworkPolicy {}/{n}", meta.namespace.as_deref().unwrap_or("default"))
            }
            None => format!("NetworkPolicy (document {})", i + 1),
        };
        let spelt = netpol::spellings_of(&obj).into_iter();
        spellings.extend(spelt.map(|(field, message)| Spelling {
            object: label.clone(),
            field,
            message,
        }));
        let mut r = Report::new(file, Some(label), errors);
        if let Some(p) = netpol::convert_object(obj, &mut r)
            && !r.failed()
        {
            out.push(p);
        }
    }
    true
}

/// [`documents`] through a `Value` per document: every kind, every message.
fn documents_slow(
    text: &str,
    file: &Path,
    errors: &mut Vec<LoadError>,
    out: &mut Vec<Policy>,
    spellings: &mut Vec<Spelling>,
) {
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(doc) {
            Ok(Value::Null) => {}
            Ok(value) => {
                object(value, file, &format!("document {}", i + 1), errors, out, spellings);
            }
            Err(e) => {
                errors.push(file_error(file, format!("malformed YAML: {e}")));
                break;
            }
        }
    }
}

pub(crate) const NETWORKING_V1: &str = "networking.k8s.io/v1";
pub(crate) const POLICY_V1ALPHA1: &str = "policy.networking.k8s.io/v1alpha1";
pub(crate) const POLICY_V1ALPHA2: &str = "policy.networking.k8s.io/v1alpha2";

/// One Kubernetes object (or a List of them); `place` says where it is in the file for
/// messages about objects that have no usable name.
fn object(
    mut value: Value,
    file: &Path,
    place: &str,
    errors: &mut Vec<LoadError>,
    out: &mut Vec<Policy>,
    spellings: &mut Vec<Spelling>,
) {
    if !value.is_mapping() {
        errors.push(LoadError {
            file: file.to_owned(),
            object: Some(place.to_owned()),
            field: None,
            message: "expected a Kubernetes object (a mapping with apiVersion and kind)".into(),
        });
        return;
    }
    let kind = value.get("kind").and_then(Value::as_str).map(str::to_owned);
    let api_version = value.get("apiVersion").and_then(Value::as_str).map(str::to_owned);
    let label = object_label(&value, kind.as_deref(), place);
    let mut r = Report::new(file, Some(label.clone()), errors);
    let Some(kind) = kind else {
        r.error("kind", "missing or not a string");
        return;
    };
    let Some(api_version) = api_version else {
        r.error("apiVersion", "missing or not a string");
        return;
    };
    if kind == "List" || kind.ends_with("List") {
        list(value, &kind, &api_version, r, place, out, spellings);
        return;
    }
    let expected = match kind.as_str() {
        "NetworkPolicy" => NETWORKING_V1,
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => POLICY_V1ALPHA1,
        "ClusterNetworkPolicy" => POLICY_V1ALPHA2,
        other => {
            r.error(
                "kind",
                format!(
                    "unknown kind {other:?} (flowgate reads NetworkPolicy, AdminNetworkPolicy, \
                     BaselineAdminNetworkPolicy, ClusterNetworkPolicy and Lists of them)"
                ),
            );
            return;
        }
    };
    if api_version != expected {
        r.error("apiVersion", format!("{kind} must be apiVersion {expected}, not {api_version:?}"));
        return;
    }
    // Kubernetes defaults the namespace of a namespaced object to `default` (kubectl's
    // context namespace); make it explicit so the typed pass sees it.
    if kind == "NetworkPolicy" {
        value = with_default_namespace(value);
    }
    let policy = match kind.as_str() {
        "NetworkPolicy" => {
            let mut spelt = Vec::new();
            let policy = netpol::convert(value, &mut r, &mut spelt);
            spellings.extend(spelt.into_iter().map(|(field, message)| Spelling {
                object: label.clone(),
                field,
                message,
            }));
            policy
        }
        "AdminNetworkPolicy" => admin::convert_anp(value, &mut r),
        "BaselineAdminNetworkPolicy" => admin::convert_banp(value, &mut r),
        _ => admin::convert_cnp(value, &mut r),
    };
    if let Some(p) = policy
        && !r.failed()
    {
        out.push(p);
    }
}

/// `kind: List` or `kind: XList`: each of `items` is an object. Items of a typed list
/// may leave out `kind`/`apiVersion` (they are implied by the list).
fn list(
    value: Value,
    kind: &str,
    api_version: &str,
    mut r: Report<'_>,
    place: &str,
    out: &mut Vec<Policy>,
    spellings: &mut Vec<Spelling>,
) {
    let implied = kind.strip_suffix("List").filter(|k| !k.is_empty());
    let items = match value.get("items") {
        None | Some(Value::Null) => return,
        Some(Value::Sequence(items)) => items.clone(),
        Some(_) => {
            r.error("items", "expected a list of objects");
            return;
        }
    };
    let file = r.file.to_owned();
    let errors = &mut *r.errors;
    for (i, item) in items.into_iter().enumerate() {
        let item = list_item(item, implied, api_version);
        object(item, &file, &format!("{place} items[{i}]"), errors, out, spellings);
    }
}

/// An item of a List as an object: the items of a typed `XList` (`implied`: `X`) may
/// leave out `kind` and `apiVersion`, which are the list's.
fn list_item(mut item: Value, implied: Option<&str>, api_version: &str) -> Value {
    if let (Some(k), Value::Mapping(m)) = (implied, &mut item) {
        if !m.contains_key("kind") {
            m.insert(Value::from("kind"), Value::from(k));
        }
        if !m.contains_key("apiVersion") {
            m.insert(Value::from("apiVersion"), Value::from(api_version));
        }
    }
    item
}

/// A spelling the API server reads differently from how it looks: `policyTypes: []`
/// looks like "no direction" and is read as `[Ingress]`. `flowgate check` warns about
/// these so a reviewer sees what the cluster will enforce; they never fail a load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spelling {
    /// `Kind ns/name`, as in [`LoadError::object`].
    pub object: String,
    /// The field path, e.g. `spec.policyTypes`.
    pub field: String,
    pub message: String,
}

/// Every [`Spelling`] in one policy file's text, in document order. Documents that do
/// not load are skipped here: [`load`] reports them.
pub fn spellings(text: &str) -> Vec<Spelling> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(doc) {
            Ok(value) => spellings_of(value, &format!("document {}", i + 1), &mut out),
            Err(_) => break,
        }
    }
    out
}

/// [`spellings`] of one object, or of each item of a List.
fn spellings_of(value: Value, place: &str, out: &mut Vec<Spelling>) {
    let kind = value.get("kind").and_then(Value::as_str).map(str::to_owned);
    match kind.as_deref() {
        Some("NetworkPolicy") => {
            let value = with_default_namespace(value);
            let object = object_label(&value, kind.as_deref(), place);
            for (field, message) in netpol::spellings(value) {
                out.push(Spelling { object: object.clone(), field, message });
            }
        }
        Some(list) if list.ends_with("List") => {
            let implied = list.strip_suffix("List").filter(|k| !k.is_empty());
            let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
            if let Some(Value::Sequence(items)) = value.get("items") {
                for (i, item) in items.iter().enumerate() {
                    let item = list_item(item.clone(), implied, api_version);
                    spellings_of(item, &format!("{place} items[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

fn with_default_namespace(mut value: Value) -> Value {
    if let Value::Mapping(m) = &mut value {
        let meta =
            m.entry(Value::from("metadata")).or_insert_with(|| Value::Mapping(Default::default()));
        if let Value::Mapping(meta) = meta
            && !meta.contains_key("namespace")
        {
            meta.insert(Value::from("namespace"), Value::from("default"));
        }
    }
    value
}

/// `Kind ns/name` (or `Kind name` for cluster-scoped kinds), falling back to the place in
/// the file when the object has no name.
fn object_label(value: &Value, kind: Option<&str>, place: &str) -> String {
    let kind = kind.unwrap_or("object");
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str);
    match (name, kind) {
        (Some(n), "NetworkPolicy") => format!("{kind} {}/{n}", ns.unwrap_or("default")),
        (Some(n), _) => format!("{kind} {n}"),
        (None, _) => format!("{kind} ({place})"),
    }
}

#[cfg(test)]
mod tests;
