//! The etcd policy source: list the prefix, watch it, and report this replica.
//!
//! Layout under `source.prefix` (`P`):
//! - `P/policy/objects/<path>`: one policy file's YAML per key (the path it had under the
//!   pushed directory);
//! - `P/policy/inventory`: the inventory's YAML;
//! - `P/policy/pushed`: written by every `flowgate push` in its transaction, so the newest
//!   `mod_revision` under `P/policy/` is the revision of the latest push;
//! - `P/manifest`: the push's own record (key → SHA-256 of the value), written in the same
//!   transaction, so a push reads one small key instead of every value;
//! - `P/replicas/<id>`: each replica's report ([`ReplicaReport`]), bound to a lease;
//! - `P/emergency/<id>`: each fleet-wide emergency entry (quarantine or policy body) as
//!   JSON, bound to a lease of the entry's TTL so etcd drops it when it expires.
//!
//! A replica lists `P/policy/` at start-up (generation 1 comes from it; no etcd means no
//! start), then watches it from the next revision. Each watch answer (one push is one
//! revision, so one answer) updates the objects held in memory and reloads through the same
//! path as a file change ([`super::reload::Reloader::set_objects`]): a broken object is
//! rejected whole and the last good generation stays. A broken watch is resumed from the
//! revision in force; a compacted one lists again. While etcd is unreachable the policy in
//! force stays (it never fails open), and `/readyz`, `/policy` and
//! `flowgate_source_connected` say so.
//!
//! Emergencies: `POST /emergency` on any replica adds the entry to its own overlay first
//! (so it protects that replica whatever etcd does), then stores it under
//! `P/emergency/`; a lift deletes the key. Every replica lists `P/emergency/` at start-up
//! (generation 1 enforces them) and watches it ([`emergency_loop`]), inserting and lifting
//! entries through the same overlay and recompile as a local request, so open flows to a
//! quarantined address are cut on every replica. When etcd cannot be written the entry
//! stays in force on the replica that took it and the answer says it is local only.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ControlPlane;
use super::emergency::{EmergencyEntry, EmergencyError, EmergencyRequest};
use super::etcd::{EtcdClient, EtcdError, Event, TxnOp, prefix_end};
use super::reload::{Objects, ReloadReport, ReloadResult, Trigger};
use crate::config::SourceConfig;
use crate::policy::PolicySnapshot;

/// The keys of one fleet's prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    /// `P/policy/`: what replicas list and watch.
    pub policy: String,
    /// `P/policy/objects/`
    pub objects: String,
    /// `P/policy/inventory`
    pub inventory: String,
    /// `P/policy/pushed`
    pub pushed: String,
    /// `P/replicas/`
    pub replicas: String,
    /// `P/emergency/`
    pub emergency: String,
    /// `P/manifest`: what the last push wrote (key → SHA-256 of the value), so the next
    /// push diffs against it without reading every value. Outside `P/policy/`: replicas
    /// do not watch it.
    pub manifest: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let p = prefix.trim_end_matches('/');
        Keys {
            policy: format!("{p}/policy/"),
            objects: format!("{p}/policy/objects/"),
            inventory: format!("{p}/policy/inventory"),
            pushed: format!("{p}/policy/pushed"),
            replicas: format!("{p}/replicas/"),
            emergency: format!("{p}/emergency/"),
            manifest: format!("{p}/manifest"),
        }
    }
}

/// What a replica keeps under `P/replicas/<id>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub id: String,
    /// The etcd revision of the policy in force.
    pub revision: i64,
    /// Content hash of the policy in force (`/policy`'s `hash`).
    pub hash: String,
    pub generation: u64,
    /// The last reload's problems, while it is failing.
    pub last_error: Option<String>,
    /// Whether the replica's watch is connected.
    pub connected: bool,
    /// `name bind` of each listener.
    pub listeners: Vec<String>,
    pub version: String,
    /// When the report was written (RFC 3339).
    pub updated_at: String,
}

/// The etcd source as `/policy` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub kind: &'static str,
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub replica_id: String,
    /// Whether the watch runs (etcd reachable).
    pub connected: bool,
    /// The etcd revision of the policy in force.
    pub revision: i64,
    /// Since when etcd is unreachable (RFC 3339), while it is.
    pub unreachable_since: Option<String>,
    /// The last error talking to etcd.
    pub last_error: Option<String>,
}

/// A replica's link to etcd.
#[derive(Debug)]
pub struct EtcdSource {
    pub client: EtcdClient,
    pub keys: Keys,
    pub replica_id: String,
    pub report_ttl: Duration,
    /// Ids of the emergency entries known to be stored under `P/emergency/` (a re-list
    /// lifts those that are gone, and only those: an entry that etcd never took stays).
    fleet_ids: Mutex<BTreeSet<String>>,
    /// The revision `P/emergency/` was listed at start-up, for [`emergency_loop`].
    emergency_listed: Mutex<Option<i64>>,
}

impl EtcdSource {
    /// # Errors
    /// [`EtcdError::BadEndpoint`] for an endpoint that is not plain HTTP.
    pub fn new(cfg: &SourceConfig) -> Result<EtcdSource, EtcdError> {
        let client = EtcdClient::new(&cfg.endpoints, cfg.dial_timeout, cfg.credentials())?
            .with_max_answer(cfg.max_answer_bytes);
        let replica_id = cfg.replica_id.clone().unwrap_or_else(default_replica_id);
        Ok(EtcdSource {
            client,
            keys: Keys::new(cfg.prefix()),
            replica_id,
            report_ttl: cfg.report_ttl,
            fleet_ids: Mutex::new(BTreeSet::new()),
            emergency_listed: Mutex::new(None),
        })
    }

    /// The prefix of the emergency ids this replica hands out: short, and different for
    /// every replica and every start (a restarted replica must not reuse a live id).
    pub fn emergency_id_prefix(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.replica_id.as_bytes());
        h.update(std::process::id().to_le_bytes());
        h.update(super::emergency::unix_ms(SystemTime::now()).to_le_bytes());
        let mut tag = hex::encode(h.finalize());
        tag.truncate(8);
        tag.push('-');
        tag
    }

    fn emergency_key(&self, id: &str) -> String {
        format!("{}{id}", self.keys.emergency)
    }

    /// Lists `P/emergency/` at start-up: the entries to lay over generation 1. The
    /// revision is kept for the watch that [`emergency_loop`] begins.
    ///
    /// # Errors
    /// [`EtcdError`] when etcd cannot be read.
    pub async fn list_emergencies(&self) -> Result<Vec<EmergencyEntry>, EtcdError> {
        let (entries, revision) = self.read_emergencies().await?;
        *super::lock(&self.emergency_listed) = Some(revision);
        super::lock(&self.fleet_ids).extend(entries.iter().map(|e| e.id.clone()));
        Ok(entries)
    }

    async fn read_emergencies(&self) -> Result<(Vec<EmergencyEntry>, i64), EtcdError> {
        let (key, end) = (&self.keys.emergency, prefix_end(&self.keys.emergency));
        let range = self.client.range(key, &end, false).await?;
        // A value that is not an entry (written by hand) cannot be enforced: skipped.
        let entries =
            range.kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect();
        Ok((entries, range.revision))
    }

    /// Stores `entry` under `P/emergency/<id>`, bound to a lease of the time it has left
    /// (rounded up to a second): etcd deletes it when it expires, on every replica alike.
    ///
    /// # Errors
    /// [`EtcdError`] when etcd cannot be written.
    pub async fn store_emergency(&self, entry: &EmergencyEntry) -> Result<i64, EtcdError> {
        let left = entry.expires_at().duration_since(SystemTime::now()).unwrap_or_default();
        let ttl = Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0));
        let lease = self.client.lease_grant(ttl).await?;
        let value = serde_json::to_vec(entry).unwrap_or_default();
        let revision = self.client.put(&self.emergency_key(&entry.id), &value, lease).await?;
        super::lock(&self.fleet_ids).insert(entry.id.clone());
        Ok(revision)
    }

    /// Deletes `P/emergency/<id>`; returns whether it was there.
    ///
    /// # Errors
    /// [`EtcdError`] when etcd cannot be read or written.
    pub async fn delete_emergency(&self, id: &str) -> Result<bool, EtcdError> {
        let key = self.emergency_key(id);
        if self.client.range(&key, "", true).await?.kvs.is_empty() {
            return Ok(false);
        }
        self.client.txn(&[], &[TxnOp::Delete { key }]).await?;
        Ok(true)
    }

    /// Lists `P/policy/`: the objects and the revision of the latest change under it.
    ///
    /// # Errors
    /// [`EtcdError`] when etcd cannot be read.
    pub async fn list(&self) -> Result<(Objects, i64), EtcdError> {
        let range =
            self.client.range(&self.keys.policy, &prefix_end(&self.keys.policy), false).await?;
        let mut objects = self.empty_objects();
        objects.revision = range.revision;
        for kv in range.kvs {
            self.apply(&mut objects, Event::Put(kv));
        }
        Ok((objects, range.revision))
    }

    fn empty_objects(&self) -> Objects {
        Objects {
            root: self.keys.objects.clone(),
            inventory_key: self.keys.inventory.clone(),
            ..Objects::default()
        }
    }

    /// Applies one change to the objects held in memory; keys outside the objects and the
    /// inventory (the push marker) change nothing.
    fn apply(&self, objects: &mut Objects, event: Event) {
        match event {
            Event::Put(kv) if kv.key == self.keys.inventory => {
                objects.inventory = Some(Arc::from(kv.value));
            }
            Event::Put(kv) if kv.key.starts_with(&self.keys.objects) => {
                objects.policies.insert(kv.key, Arc::from(kv.value));
            }
            Event::Delete { key, .. } if key == self.keys.inventory => objects.inventory = None,
            Event::Delete { key, .. } => {
                objects.policies.remove(&key);
            }
            Event::Put(_) => {}
        }
    }
}

fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "flowgate".into());
    format!("{host}-{}", std::process::id())
}

/// The first revision retried after a failure waits this long, doubling up to the max.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What one watcher of the store does with what it reads. Both watchers (the policy objects
/// and the fleet's emergencies) run the same cycle in [`follow`]: list, watch from the
/// listed revision, re-list when etcd compacted past it, back off while etcd is away.
trait Follower {
    /// Reads the whole prefix anew and takes it in; the revision it was read at.
    async fn relist(&mut self, control: &ControlPlane) -> Result<i64, EtcdError>;
    /// Takes in the events of one or more watch answers, up to `revision`.
    async fn take(&mut self, control: &ControlPlane, events: Vec<Event>, revision: i64);
    /// The store could not be reached or read.
    fn failed(&self, control: &ControlPlane, e: &EtcdError);
    /// A watch answer arrived.
    fn reached(&self, _control: &ControlPlane) {}
}

/// Follows `prefix` from `revision + 1` (after a listing first when `relist`) until aborted.
async fn follow(
    control: &ControlPlane,
    src: &EtcdSource,
    prefix: &str,
    mut revision: i64,
    mut relist: bool,
    f: &mut impl Follower,
) {
    let end = prefix_end(prefix);
    let mut retry = RETRY_MIN;
    loop {
        if relist {
            match f.relist(control).await {
                Ok(rev) => {
                    revision = rev;
                    relist = false;
                }
                Err(e) => {
                    f.failed(control, &e);
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            }
        }
        let mut watch = match src.client.watch(prefix, &end, revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                f.failed(control, &e);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        loop {
            let batch = match watch.next().await {
                Ok(b) => b,
                Err(EtcdError::Compacted { .. }) => {
                    relist = true;
                    break;
                }
                Err(e) => {
                    f.failed(control, &e);
                    break;
                }
            };
            f.reached(control);
            retry = RETRY_MIN;
            let mut events = batch.events;
            // Gather answers already received, so a burst of pushes is one reload.
            while watch.has_buffered() {
                match watch.next().await {
                    Ok(more) => events.extend(more.events),
                    Err(_) => break,
                }
            }
            if events.is_empty() {
                continue;
            }
            for ev in &events {
                revision = revision.max(match ev {
                    Event::Put(kv) => kv.mod_revision,
                    Event::Delete { revision, .. } => *revision,
                });
            }
            f.take(control, events, revision).await;
        }
        tokio::time::sleep(RETRY_MIN).await;
    }
}

/// The policy objects under `P/policy/`: every change is compiled and swapped in.
struct PolicyFollower {
    src: Arc<EtcdSource>,
    objects: Objects,
}

impl Follower for PolicyFollower {
    async fn relist(&mut self, control: &ControlPlane) -> Result<i64, EtcdError> {
        // `fresh.revision` is `rev`.
        let (fresh, rev) = self.src.list().await?;
        self.objects = fresh;
        control.apply_objects(Arc::new(self.objects.clone())).await;
        Ok(rev)
    }

    async fn take(&mut self, control: &ControlPlane, events: Vec<Event>, revision: i64) {
        for ev in events {
            self.src.apply(&mut self.objects, ev);
        }
        self.objects.revision = revision;
        control.apply_objects(Arc::new(self.objects.clone())).await;
    }

    fn failed(&self, control: &ControlPlane, e: &EtcdError) {
        control.source_down(e);
    }

    fn reached(&self, control: &ControlPlane) {
        control.source_up();
    }
}

/// Watches `P/policy/` from `revision + 1` and reloads on every change, until aborted.
pub async fn watch_loop(control: ControlPlane, objects: Objects, revision: i64) {
    let Some(src) = control.shared.source.clone() else { return };
    let prefix = src.keys.policy.clone();
    let mut f = PolicyFollower { src: src.clone(), objects };
    follow(&control, &src, &prefix, revision, false, &mut f).await;
}

/// Keeps `P/replicas/<id>` written (after every reload) and its lease alive, until
/// aborted. Failures are retried on the next tick; a lease that vanished (etcd was away
/// longer than its TTL) is granted anew.
pub async fn report_loop(control: ControlPlane) {
    let Some(src) = control.shared.source.clone() else { return };
    let key = format!("{}{}", src.keys.replicas, src.replica_id);
    let tick = (src.report_ttl / 3).max(Duration::from_millis(100));
    let mut lease = 0i64;
    let mut dirty = true;
    loop {
        if lease == 0 {
            lease = src.client.lease_grant(src.report_ttl).await.unwrap_or(0);
            dirty = true;
        }
        if dirty && lease != 0 {
            let report = serde_json::to_vec(&control.replica_report()).unwrap_or_default();
            match src.client.put(&key, &report, lease).await {
                Ok(_) => dirty = false,
                Err(EtcdError::Server { message, .. }) if message.contains("lease not found") => {
                    lease = 0;
                    continue;
                }
                Err(_) => {}
            }
        }
        let changed = control.shared.report_changed.notified();
        tokio::select! {
            () = changed => dirty = true,
            () = tokio::time::sleep(tick) => {
                if lease != 0 {
                    match src.client.lease_keepalive(lease).await {
                        Ok(ttl) if ttl > 0 => {}
                        Ok(_) => lease = 0,
                        Err(EtcdError::Server { message, .. }) if message.contains("not found") => {
                            lease = 0;
                        }
                        Err(_) => dirty = true,
                    }
                }
            }
        }
    }
}

/// One change to the fleet's emergency entries, in the order etcd made them.
#[derive(Clone, Debug)]
enum FleetChange {
    Put(Box<EmergencyEntry>),
    Delete(String),
}

/// The fleet's emergency entries under `P/emergency/`.
struct EmergencyFollower {
    src: Arc<EtcdSource>,
}

impl Follower for EmergencyFollower {
    async fn relist(&mut self, control: &ControlPlane) -> Result<i64, EtcdError> {
        let (entries, rev) = self.src.read_emergencies().await?;
        let changes = entries.into_iter().map(|e| FleetChange::Put(Box::new(e)));
        control.apply_fleet_emergencies(changes.collect(), true).await;
        Ok(rev)
    }

    async fn take(&mut self, control: &ControlPlane, events: Vec<Event>, _revision: i64) {
        let mut changes = Vec::new();
        for ev in events {
            match ev {
                Event::Put(kv) => {
                    if let Ok(entry) = serde_json::from_slice::<EmergencyEntry>(&kv.value) {
                        changes.push(FleetChange::Put(Box::new(entry)));
                    }
                }
                Event::Delete { key, .. } => {
                    if let Some(id) = key.strip_prefix(&self.src.keys.emergency) {
                        changes.push(FleetChange::Delete(id.to_owned()));
                    }
                }
            }
        }
        if !changes.is_empty() {
            control.apply_fleet_emergencies(changes, false).await;
        }
    }

    fn failed(&self, control: &ControlPlane, e: &EtcdError) {
        control.source_error(e);
    }
}

/// Watches `P/emergency/` from the start-up list on and lays each entry another replica
/// stored over this replica's policy (lifting each one deleted or expired), until aborted.
/// A compacted watch lists again and lifts the entries that are gone.
pub async fn emergency_loop(control: ControlPlane) {
    let Some(src) = control.shared.source.clone() else { return };
    let prefix = src.keys.emergency.clone();
    let listed = super::lock(&src.emergency_listed).take();
    let mut f = EmergencyFollower { src: src.clone() };
    follow(&control, &src, &prefix, listed.unwrap_or(0), listed.is_none(), &mut f).await;
}

/// How far an emergency request reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The files source: there is no fleet, this replica is all there is.
    Replica,
    /// Stored in etcd: every replica of the fleet enforces it (or lifts it).
    Fleet,
    /// etcd could not be written: in force (or lifted) on this replica only; why.
    LocalOnly(String),
}

impl Reach {
    /// `scope` in the admin API's answer.
    pub fn scope(&self) -> &'static str {
        match self {
            Reach::Replica | Reach::LocalOnly(_) => "local",
            Reach::Fleet => "fleet",
        }
    }

    /// What the answer warns about, when the request did not reach the fleet.
    pub fn warning(&self) -> Option<String> {
        match self {
            Reach::LocalOnly(why) => Some(format!(
                "done on this replica only, not on the fleet: etcd could not be written ({why})"
            )),
            _ => None,
        }
    }
}

impl ControlPlane {
    /// [`ControlPlane::emergency`], then, with the etcd source, the entry stored in etcd
    /// for the whole fleet. The entry is in force here before etcd is asked, and stays in
    /// force here when etcd cannot be written (fail closed): the [`Reach`] says so.
    ///
    /// # Errors
    /// As [`ControlPlane::emergency`]; nothing changes then, here or in etcd.
    pub async fn emergency_everywhere(
        &self,
        req: EmergencyRequest,
    ) -> Result<(EmergencyEntry, ReloadReport, Reach), EmergencyError> {
        let (entry, report) = self.emergency(req).await?;
        let Some(src) = self.shared.source.clone() else {
            return Ok((entry, report, Reach::Replica));
        };
        let reach = match src.store_emergency(&entry).await {
            Ok(_) => Reach::Fleet,
            Err(e) => {
                self.source_error(&e);
                Reach::LocalOnly(e.to_string())
            }
        };
        Ok((entry, report, reach))
    }

    /// Lifts emergency entry `id` here and, with the etcd source, deletes it from etcd so
    /// every replica lifts it. Flows cut meanwhile stay cut; new ones are decided by the
    /// policy without the entry. Returns the reload that lifted it here (`None` when this
    /// replica did not hold it but etcd did).
    ///
    /// # Errors
    /// [`EmergencyError::UnknownEntry`] when neither this replica nor etcd holds `id`.
    pub async fn lift(&self, id: &str) -> Result<(Option<ReloadReport>, Reach), EmergencyError> {
        let this = self.clone();
        let owned = id.to_owned();
        let local = match tokio::task::spawn_blocking(move || this.lift_blocking(&owned)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(EmergencyError::BadRequest("shutting down".into())),
        };
        let (stored, reach) = match &self.shared.source {
            None => (false, Reach::Replica),
            Some(src) => match src.delete_emergency(id).await {
                Ok(found) => (found, Reach::Fleet),
                Err(e) => {
                    self.source_error(&e);
                    (false, Reach::LocalOnly(e.to_string()))
                }
            },
        };
        if local.is_none() && !stored {
            return Err(EmergencyError::UnknownEntry(id.to_owned()));
        }
        Ok((local, reach))
    }

    fn lift_blocking(&self, id: &str) -> Option<ReloadReport> {
        let mut reloader = super::lock(&self.shared.reloader);
        if !super::lock(&self.shared.overlay).remove(id) {
            return None;
        }
        if let Some(src) = &self.shared.source {
            super::lock(&src.fleet_ids).remove(id);
        }
        let report = self.reload_locked(&mut reloader, Trigger::Emergency);
        let _ = self.shared.audit.write(&serde_json::json!({
            "event": "emergency_lifted",
            "time": super::audit::format_time(SystemTime::now()),
            "id": id,
            "generation": report.generation,
        }));
        Some(report)
    }

    /// Applies changes to the fleet's entries seen in etcd (`listed`: `changes` is the
    /// whole list, so the fleet entries not in it are lifted) and recompiles once when
    /// anything changed. An entry whose policy does not compile here is dropped again
    /// rather than left to fail every later reload.
    async fn apply_fleet_emergencies(&self, changes: Vec<FleetChange>, listed: bool) {
        let this = self.clone();
        let done = tokio::task::spawn_blocking(move || {
            let Some(src) = this.shared.source.clone() else { return };
            let now = SystemTime::now();
            let mut reloader = super::lock(&this.shared.reloader);
            let mut added = Vec::new();
            let mut changed = false;
            {
                let mut overlay = super::lock(&this.shared.overlay);
                let mut ids = super::lock(&src.fleet_ids);
                if listed {
                    let keep: BTreeSet<&str> = changes
                        .iter()
                        .filter_map(|c| match c {
                            FleetChange::Put(e) => Some(e.id.as_str()),
                            FleetChange::Delete(_) => None,
                        })
                        .collect();
                    let gone: Vec<String> =
                        ids.iter().filter(|id| !keep.contains(id.as_str())).cloned().collect();
                    for id in gone {
                        ids.remove(&id);
                        changed |= overlay.remove(&id);
                    }
                }
                for change in changes {
                    match change {
                        FleetChange::Put(entry) => {
                            ids.insert(entry.id.clone());
                            let id = entry.id.clone();
                            if overlay.insert(*entry, now) {
                                added.push(id);
                                changed = true;
                            }
                        }
                        FleetChange::Delete(id) => {
                            ids.remove(&id);
                            changed |= overlay.remove(&id);
                        }
                    }
                }
            }
            if !changed {
                return;
            }
            let report = this.reload_locked(&mut reloader, Trigger::Emergency);
            if report.result == ReloadResult::Error && !added.is_empty() {
                let mut overlay = super::lock(&this.shared.overlay);
                for id in &added {
                    overlay.remove(id);
                }
            }
        })
        .await;
        if let Err(e) = done
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Counts the errors `flowgate_source_errors_total` has a reason for.
    fn count_source_error(&self, e: &EtcdError) {
        if let EtcdError::TooLarge { .. } = e {
            self.shared.metrics.control.source_too_large.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records an etcd error met outside the watch (the watch says whether etcd is
    /// reachable; this only keeps the message for `/policy`).
    fn source_error(&self, e: &EtcdError) {
        self.count_source_error(e);
        super::lock(&self.shared.source_status).last_error = Some(e.to_string());
    }

    /// Hands the objects read from etcd (at `objects.revision`) to the reloader and
    /// reloads (in a blocking thread, serialised with every other reload). The snapshot
    /// compiled from them carries their revision; a rejected reload leaves the snapshot,
    /// and so the revision, in force as it was.
    pub async fn apply_objects(&self, objects: Arc<Objects>) {
        let this = self.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut reloader = super::lock(&this.shared.reloader);
            reloader.set_objects(objects);
            this.reload_locked(&mut reloader, Trigger::Watch);
            this.publish_revision();
        })
        .await;
        if let Err(e) = applied
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        self.shared.report_changed.notify_one();
    }

    /// Sets `flowgate_source_revision` to the revision of the snapshot in force.
    fn publish_revision(&self) {
        let revision = self.shared.handle.load().source_revision.load(Ordering::Relaxed);
        let gauge = &self.shared.metrics.control.source_revision;
        gauge.store(u64::try_from(revision).unwrap_or(0), Ordering::Relaxed);
    }

    fn source_down(&self, e: &EtcdError) {
        self.count_source_error(e);
        let mut s = super::lock(&self.shared.source_status);
        if s.connected || s.unreachable_since.is_none() {
            s.unreachable_since = Some(super::audit::format_time(SystemTime::now()));
        }
        s.connected = false;
        s.last_error = Some(e.to_string());
        self.shared.metrics.control.source_connected.store(0, Ordering::Relaxed);
    }

    fn source_up(&self) {
        let mut s = super::lock(&self.shared.source_status);
        if !s.connected {
            s.connected = true;
            s.unreachable_since = None;
            self.shared.report_changed.notify_one();
        }
        self.shared.metrics.control.source_connected.store(1, Ordering::Relaxed);
    }

    /// The etcd source's state, for `/policy` and `/readyz` (`None` for the files source).
    pub fn source_status(&self) -> Option<SourceStatus> {
        self.source_status_of(&self.shared.handle.load())
    }

    /// [`ControlPlane::source_status`] with the revision of `snap`, so a caller that
    /// shows `snap` shows the revision it was compiled from, never another.
    pub fn source_status_of(&self, snap: &PolicySnapshot) -> Option<SourceStatus> {
        self.shared.source.as_ref()?;
        let mut status = super::lock(&self.shared.source_status).clone();
        status.revision = snap.source_revision.load(Ordering::Relaxed);
        Some(status)
    }

    /// What this replica reports under `P/replicas/<id>`.
    pub fn replica_report(&self) -> ReplicaReport {
        // Revision, hash and generation all from one snapshot: they belong together.
        let snap = self.shared.handle.load();
        let source = super::lock(&self.shared.source_status).clone();
        let status = self.status();
        ReplicaReport {
            id: source.replica_id,
            revision: snap.source_revision.load(Ordering::Relaxed),
            hash: snap.content_hash.clone(),
            generation: snap.generation.0,
            last_error: status
                .failing
                .map(|r| r.errors.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")),
            connected: source.connected,
            listeners: self
                .shared
                .cfg
                .listener
                .iter()
                .map(|l| format!("{} {}", l.name, l.bind))
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            updated_at: super::audit::format_time(SystemTime::now()),
        }
    }
}
