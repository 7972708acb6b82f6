//! The etcd policy source: list the prefix, watch it, and report this replica.
//!
//! Layout under `source.prefix` (`P`):
//! - `P/policy/objects/<path>`: one policy file's YAML per key (the path it had under the
//!   pushed directory);
//! - `P/policy/inventory`: the inventory's YAML;
//! - `P/policy/pushed`: written by every `flowgate push` in its transaction, so the newest
//!   `mod_revision` under `P/policy/` is the revision of the latest push;
//! - `P/replicas/<id>`: each replica's report ([`ReplicaReport`]), bound to a lease.
//!
//! A replica lists `P/policy/` at start-up (generation 1 comes from it; no etcd means no
//! start), then watches it from the next revision. Each watch answer (one push is one
//! revision, so one answer) updates the objects held in memory and reloads through the same
//! path as a file change ([`super::reload::Reloader::set_objects`]): a broken object is
//! rejected whole and the last good generation stays. A broken watch is resumed from the
//! revision in force; a compacted one lists again. While etcd is unreachable the policy in
//! force stays (it never fails open), and `/readyz`, `/policy` and
//! `flowgate_source_connected` say so.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::ControlPlane;
use super::etcd::{EtcdClient, EtcdError, Event, prefix_end};
use super::reload::{Objects, ReloadResult, Trigger};
use crate::config::SourceConfig;

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
}

impl EtcdSource {
    /// # Errors
    /// [`EtcdError::BadEndpoint`] for an endpoint that is not plain HTTP.
    pub fn new(cfg: &SourceConfig) -> Result<EtcdSource, EtcdError> {
        let client = EtcdClient::new(&cfg.endpoints, cfg.dial_timeout, cfg.credentials())?;
        let replica_id = cfg.replica_id.clone().unwrap_or_else(default_replica_id);
        Ok(EtcdSource {
            client,
            keys: Keys::new(cfg.prefix()),
            replica_id,
            report_ttl: cfg.report_ttl,
        })
    }

    /// Lists `P/policy/`: the objects and the revision of the latest change under it.
    ///
    /// # Errors
    /// [`EtcdError`] when etcd cannot be read.
    pub async fn list(&self) -> Result<(Objects, i64), EtcdError> {
        let range =
            self.client.range(&self.keys.policy, &prefix_end(&self.keys.policy), false).await?;
        let mut objects = self.empty_objects();
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

/// Watches `P/policy/` from `revision + 1` and reloads on every change, until aborted.
pub async fn watch_loop(control: ControlPlane, mut objects: Objects, mut revision: i64) {
    let Some(src) = control.shared.source.clone() else { return };
    let (key, end) = (src.keys.policy.clone(), prefix_end(&src.keys.policy));
    let mut retry = RETRY_MIN;
    let mut relist = false;
    loop {
        if relist {
            match src.list().await {
                Ok((fresh, rev)) => {
                    objects = fresh;
                    revision = rev;
                    relist = false;
                    control.apply_objects(Arc::new(objects.clone()), revision).await;
                }
                Err(e) => {
                    control.source_down(&e);
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            }
        }
        let mut watch = match src.client.watch(&key, &end, revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                control.source_down(&e);
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
                    control.source_down(&e);
                    break;
                }
            };
            control.source_up();
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
            for ev in events {
                let rev = match &ev {
                    Event::Put(kv) => kv.mod_revision,
                    Event::Delete { revision, .. } => *revision,
                };
                revision = revision.max(rev);
                src.apply(&mut objects, ev);
            }
            control.apply_objects(Arc::new(objects.clone()), revision).await;
        }
        tokio::time::sleep(RETRY_MIN).await;
    }
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

impl ControlPlane {
    /// Hands the objects read from etcd at `revision` to the reloader and reloads (in a
    /// blocking thread, serialised with every other reload). The revision counts as in
    /// force unless the reload was rejected.
    pub async fn apply_objects(&self, objects: Arc<Objects>, revision: i64) {
        let this = self.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut reloader = super::lock(&this.shared.reloader);
            reloader.set_objects(objects);
            let report = this.reload_locked(&mut reloader, Trigger::Watch);
            if report.result != ReloadResult::Error {
                this.set_revision(revision);
            }
        })
        .await;
        if let Err(e) = applied
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        self.shared.report_changed.notify_one();
    }

    pub(crate) fn set_revision(&self, revision: i64) {
        super::lock(&self.shared.source_status).revision = revision;
        let gauge = &self.shared.metrics.control.source_revision;
        gauge.store(u64::try_from(revision).unwrap_or(0), Ordering::Relaxed);
    }

    fn source_down(&self, e: &EtcdError) {
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
        self.shared.source.as_ref()?;
        Some(super::lock(&self.shared.source_status).clone())
    }

    /// What this replica reports under `P/replicas/<id>`.
    pub fn replica_report(&self) -> ReplicaReport {
        // The revision first: it is set after the swap, so it is never newer than the
        // snapshot read after it.
        let source = super::lock(&self.shared.source_status).clone();
        let snap = self.shared.handle.load();
        let status = self.status();
        ReplicaReport {
            id: source.replica_id,
            revision: source.revision,
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
