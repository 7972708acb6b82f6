//! The fleet's side of the etcd source, for the CLI: `flowgate push` (a directory and an
//! inventory into the prefix, in one transaction) and `flowgate fleet status` (what each
//! replica enforces against the latest push).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::etcd::{Compare, EtcdClient, EtcdError, TxnOp, prefix_end};
use super::source::{Keys, ReplicaReport};
use crate::policy::{LoadErrors, load};

#[derive(Debug, Error)]
pub enum PushError {
    #[error("{0}")]
    Etcd(#[from] EtcdError),
    #[error("not pushed: {0}")]
    Invalid(LoadErrors),
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "not pushed: the policy under the prefix changed while pushing (another push?); try again"
    )]
    Conflict,
}

/// What a push did.
#[derive(Clone, Debug, Serialize)]
pub struct PushSummary {
    /// The etcd revision of the push: a replica enforcing it reports this or later.
    pub revision: i64,
    pub put: usize,
    pub deleted: usize,
    pub unchanged: usize,
}

/// Writes every policy file under `dir` and `inventory` under the prefix of `keys`, and
/// deletes the objects no longer present, in one transaction guarded by the revision read
/// first (a concurrent push makes it fail with [`PushError::Conflict`], never mixes).
/// What is there is known from the manifest (`P/manifest`, key → SHA-256, rewritten by
/// the same transaction) and a keys-only listing, not by reading every value.
/// The files are checked first as a replica would load them: a set with errors is not
/// pushed.
///
/// # Errors
/// [`PushError`]: the files are broken or unreadable, etcd cannot be reached or refuses
/// (a set larger than etcd's `--max-txn-ops` or `--max-request-bytes`), or a concurrent
/// change.
pub async fn push(
    client: &EtcdClient,
    keys: &Keys,
    dir: &Path,
    inventory: &Path,
) -> Result<PushSummary, PushError> {
    load::load(dir, inventory).map_err(PushError::Invalid)?;
    push_unchecked(client, keys, dir, inventory).await
}

/// [`push`] without checking the files first (the replicas still reject a broken set
/// whole): for callers that checked them already, and the propagation bench.
///
/// # Errors
/// As [`push`], except [`PushError::Invalid`] for a broken set.
pub async fn push_unchecked(
    client: &EtcdClient,
    keys: &Keys,
    dir: &Path,
    inventory: &Path,
) -> Result<PushSummary, PushError> {
    let mut wanted: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| PushError::Read { path: p.to_owned(), source })
    };
    let mut walk_errors = Vec::new();
    let is_file = std::fs::metadata(dir).is_ok_and(|m| m.is_file());
    for f in load::policy_files(dir, &mut walk_errors) {
        let rel = if is_file {
            f.file_name().map(PathBuf::from).unwrap_or_else(|| f.clone())
        } else {
            f.strip_prefix(dir).map(Path::to_path_buf).unwrap_or_else(|_| f.clone())
        };
        let name: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
        wanted.insert(format!("{}{}", keys.objects, name.join("/")), read(&f)?);
    }
    if !walk_errors.is_empty() {
        return Err(PushError::Invalid(LoadErrors(walk_errors)));
    }
    wanted.insert(keys.inventory.clone(), read(inventory)?);
    let (have, revision, manifest_revision) = current_manifest(client, keys).await?;
    let mut ops = Vec::new();
    let (mut put, mut deleted, mut unchanged) = (0, 0, 0);
    for key in have.keys() {
        if !wanted.contains_key(key) {
            ops.push(TxnOp::Delete { key: key.clone() });
            deleted += 1;
        }
    }
    let mut manifest = BTreeMap::new();
    for (key, value) in &wanted {
        let digest = digest(value);
        if have.get(key) == Some(&digest) {
            unchanged += 1;
        } else {
            ops.push(TxnOp::Put { key: key.clone(), value: value.clone(), lease: 0 });
            put += 1;
        }
        manifest.insert(key.clone(), digest);
    }
    ops.push(TxnOp::Put {
        key: keys.manifest.clone(),
        value: serde_json::to_vec(&manifest).unwrap_or_default(),
        lease: 0,
    });
    let marker = json!({
        "time": super::audit::format_time(SystemTime::now()),
        "objects": wanted.len(),
    });
    ops.push(TxnOp::Put {
        key: keys.pushed.clone(),
        value: marker.to_string().into_bytes(),
        lease: 0,
    });
    // Nothing under `P/policy/` changed since the read, and the manifest is the one read:
    // a concurrent push (or a hand edit) makes this one fail rather than mix with it.
    let guards = [
        Compare::ModifiedBefore {
            key: keys.policy.clone(),
            range_end: prefix_end(&keys.policy),
            revision: revision + 1,
        },
        Compare::ModRevision { key: keys.manifest.clone(), revision: manifest_revision },
    ];
    let (ok, revision) = client.txn(&guards, &ops).await?;
    if !ok {
        return Err(PushError::Conflict);
    }
    Ok(PushSummary { revision, put, deleted, unchanged })
}

/// SHA-256 of a value, hex: what the manifest records.
fn digest(value: &[u8]) -> String {
    hex::encode(Sha256::digest(value))
}

/// What is under `P/policy/` as the manifest says (key → digest), the revision the prefix
/// was read at, and the manifest's own `mod_revision` (0: absent). The keys are listed
/// without their values to check the manifest against them: with no manifest (a prefix
/// never pushed), one that does not parse, or keys it does not account for (added,
/// removed or rewritten after it, by hand), the values are read once and digested instead.
async fn current_manifest(
    client: &EtcdClient,
    keys: &Keys,
) -> Result<(BTreeMap<String, String>, i64, i64), EtcdError> {
    let listed = client.range(&keys.policy, &prefix_end(&keys.policy), true).await?;
    let got = client.range(&keys.manifest, "", false).await?;
    let manifest_revision = got.kvs.first().map_or(0, |kv| kv.mod_revision);
    let parsed = got
        .kvs
        .first()
        .and_then(|kv| serde_json::from_slice::<BTreeMap<String, String>>(&kv.value).ok());
    if let Some(manifest) = parsed {
        let objects: Vec<_> = listed.kvs.iter().filter(|kv| kv.key != keys.pushed).collect();
        let accounted = objects.len() == manifest.len()
            && objects
                .iter()
                .all(|kv| kv.mod_revision <= manifest_revision && manifest.contains_key(&kv.key));
        if accounted {
            return Ok((manifest, listed.revision, manifest_revision));
        }
    }
    let current = client.range(&keys.policy, &prefix_end(&keys.policy), false).await?;
    let have = current
        .kvs
        .iter()
        .filter(|kv| kv.key != keys.pushed)
        .map(|kv| (kv.key.clone(), digest(&kv.value)))
        .collect();
    Ok((have, listed.revision.min(current.revision), manifest_revision))
}

/// One replica as `fleet status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaState {
    #[serde(flatten)]
    pub report: ReplicaReport,
    /// Behind the latest push for longer than the grace period, or its last reload failed.
    pub drifting: bool,
    /// Why it drifts (empty when it does not).
    pub reasons: Vec<String>,
}

/// The fleet as etcd shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FleetStatus {
    /// The revision of the latest change to the policy (the latest push).
    pub latest_revision: i64,
    /// When the latest push was made, as its marker says.
    pub pushed_at: Option<String>,
    pub replicas: Vec<ReplicaState>,
    /// Replicas expected (`--expect`) but not reporting: their lease vanished.
    pub missing: usize,
}

impl FleetStatus {
    /// Whether any replica drifts or is missing.
    pub fn drifting(&self) -> bool {
        self.missing > 0 || self.replicas.iter().any(|r| r.drifting)
    }
}

/// Reads the replicas' reports and the latest revision. A replica drifts when it enforces a
/// revision older than the latest and the latest push is older than `grace` (a replica is
/// given that long to apply it), or when its last reload failed. `expect`: how many
/// replicas should report (missing ones make the fleet drift).
///
/// # Errors
/// [`EtcdError`] when etcd cannot be read.
pub async fn status(
    client: &EtcdClient,
    keys: &Keys,
    grace: Duration,
    expect: Option<usize>,
) -> Result<FleetStatus, EtcdError> {
    let policy = client.range(&keys.policy, &prefix_end(&keys.policy), false).await?;
    let latest = policy.kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0);
    let pushed = policy.kvs.iter().find(|kv| kv.key == keys.pushed);
    let pushed_at = pushed
        .and_then(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).ok())
        .and_then(|v| v["time"].as_str().map(str::to_owned));
    let pushed_time = pushed_at.as_deref().and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    let is_latest_push = pushed.is_some_and(|kv| kv.mod_revision == latest);
    let overdue = match pushed_time {
        Some(t) if is_latest_push => {
            SystemTime::now().duration_since(t).unwrap_or_default() > grace
        }
        _ => true,
    };
    let reports = client.range(&keys.replicas, &prefix_end(&keys.replicas), false).await?;
    let mut replicas = Vec::new();
    for kv in reports.kvs {
        let Ok(report) = serde_json::from_slice::<ReplicaReport>(&kv.value) else { continue };
        let mut reasons = Vec::new();
        if report.revision < latest && overdue {
            reasons.push(format!("enforces revision {} of {latest}", report.revision));
        }
        if let Some(e) = &report.last_error {
            reasons.push(format!("last reload failed: {e}"));
        }
        replicas.push(ReplicaState { drifting: !reasons.is_empty(), reasons, report });
    }
    let missing = expect.map_or(0, |n| n.saturating_sub(replicas.len()));
    Ok(FleetStatus { latest_revision: latest, pushed_at, replicas, missing })
}
