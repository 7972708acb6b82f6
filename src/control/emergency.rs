//! Emergency policies: TTL'd policy laid over the policy directory without touching it.
//!
//! An entry is either a policy body (Kubernetes YAML, as `POST /emergency` received it) or a
//! quarantine: an address or a `namespace/workload` cut off in both directions by an
//! AdminNetworkPolicy at priority 0, before anything the directory says.
//!
//! How a quarantine selects exactly its target: an AdminNetworkPolicy subject is a label
//! selector, so the overlay marks the target with a label of its own
//! (`flowgate.dev/quarantine-<id>`) in the inventory it lays over. A workload gets the
//! label; an address gets a synthetic `/32` (or `/128`) workload in the namespace
//! `flowgate-emergency`, placed first in the inventory so it wins every longest-prefix tie.
//! That also quarantines an address that no workload owns, which no policy could otherwise
//! name as a subject.
//!
//! Entries carry an absolute expiry; the control plane recompiles at the earliest one and
//! drops entries that have expired ([`Overlay::prune`]). The overlay is kept in memory and,
//! when `control.emergency_state` is set, in a JSON file written atomically after every
//! change, so a restart keeps quarantines (and their expiry) in force.
//!
//! In a fleet (`source.kind = "etcd"`) the same entries are also kept in etcd, one key per
//! entry bound to a lease of its TTL ([`super::source`]); each replica inserts the entries
//! the others made ([`Overlay::insert`]) with their id and absolute expiry, so the whole
//! fleet enforces and lifts them together. Ids then carry a per-replica prefix
//! ([`Overlay::set_id_prefix`]) so two replicas never hand out the same one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::policy::ir::{
    Action, Expiry, LabelSelector, Mode, NamespaceMatch, Peer, Peers, Policy, PolicyKind,
    PolicySet, Rule, Tier, Workload, WorkloadSelector,
};
use crate::policy::load;

/// The namespace synthetic quarantine workloads live in.
pub const EMERGENCY_NAMESPACE: &str = "flowgate-emergency";
/// Prefix of the label that marks a quarantine target.
pub const QUARANTINE_LABEL_PREFIX: &str = "flowgate.dev/quarantine-";

/// Why an emergency request was refused. Nothing changes when one is returned.
#[derive(Debug, Error)]
pub enum EmergencyError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("policy body rejected: {0}")]
    Policy(load::LoadErrors),
    #[error("no workload {0} in the inventory")]
    UnknownWorkload(String),
    #[error(
        "{active} emergency entries are active (control.emergency_max); wait for one to expire"
    )]
    Full { active: usize },
    #[error("{}: {message}", path.display())]
    State { path: PathBuf, message: String },
    #[error("no emergency entry {0}")]
    UnknownEntry(String),
}

/// `POST /emergency` body. Exactly one of `quarantine` and `policy`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmergencyRequest {
    /// An IP address or `namespace/workload`.
    #[serde(default)]
    pub quarantine: Option<String>,
    /// Kubernetes policy YAML (one or more documents).
    #[serde(default)]
    pub policy: Option<String>,
    /// How long it stays in force, e.g. `15m`. Required for a quarantine; for a policy body
    /// it overrides the policies' own `flowgate.dev/ttl` / `expires-at`.
    #[serde(default)]
    pub ttl: Option<String>,
}

/// What an entry does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Cut off one address in both directions.
    Address(IpAddr),
    /// Cut off a workload (`namespace/name`) in both directions.
    Workload { namespace: String, name: String },
    /// Policy YAML, enforced as written until the entry expires.
    Policy { yaml: String },
}

/// One emergency entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmergencyEntry {
    /// Short, unique within the overlay: `q1`, `q2`, … (used in names and labels).
    pub id: String,
    pub target: Target,
    /// Unix milliseconds.
    pub created_ms: u64,
    pub expires_ms: u64,
}

impl EmergencyEntry {
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.expires_ms)
    }

    fn live(&self, now: SystemTime) -> bool {
        self.expires_at() > now
    }

    /// A human name for the target.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Address(ip) => format!("quarantine {ip}"),
            Target::Workload { namespace, name } => format!("quarantine {namespace}/{name}"),
            Target::Policy { .. } => "policy".to_owned(),
        }
    }

    fn label(&self) -> String {
        format!("{QUARANTINE_LABEL_PREFIX}{}", self.id)
    }
}

/// Limits, from `[control]`.
#[derive(Clone, Debug)]
pub struct OverlayLimits {
    pub max_entries: usize,
    pub max_ttl: Duration,
}

/// The set of emergency entries.
#[derive(Debug)]
pub struct Overlay {
    entries: Vec<EmergencyEntry>,
    next_id: u64,
    /// Put before the number of every id this overlay hands out: a fleet's replicas each
    /// have their own, so ids stay unique across the fleet.
    id_prefix: String,
    state_file: Option<PathBuf>,
    limits: OverlayLimits,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    next_id: u64,
    entries: Vec<EmergencyEntry>,
}

impl Overlay {
    /// An overlay; with a state file, the entries saved there that have not expired.
    ///
    /// # Errors
    /// [`EmergencyError::State`] when the file exists but cannot be read or parsed: starting
    /// without a quarantine someone set would fail open, so the caller refuses to start.
    pub fn open(
        state_file: Option<PathBuf>,
        limits: OverlayLimits,
        now: SystemTime,
    ) -> Result<Overlay, EmergencyError> {
        let mut overlay = Overlay {
            entries: Vec::new(),
            next_id: 1,
            id_prefix: String::new(),
            state_file,
            limits,
        };
        if let Some(path) = overlay.state_file.clone() {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let state: StateFile = serde_json::from_str(&text).map_err(|e| {
                        EmergencyError::State { path: path.clone(), message: e.to_string() }
                    })?;
                    overlay.next_id = state.next_id.max(1);
                    overlay.entries = state.entries;
                    overlay.prune(now);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(EmergencyError::State { path, message: e.to_string() });
                }
            }
        }
        Ok(overlay)
    }

    /// An in-memory overlay with default limits (tests, tools).
    pub fn in_memory() -> Overlay {
        Overlay {
            entries: Vec::new(),
            next_id: 1,
            id_prefix: String::new(),
            state_file: None,
            limits: OverlayLimits { max_entries: 64, max_ttl: Duration::from_secs(24 * 3600) },
        }
    }

    pub fn entries(&self) -> &[EmergencyEntry] {
        &self.entries
    }

    /// Makes every id handed out from now on start with `prefix` (`[a-z0-9-]` kept, the
    /// rest dropped, since the id goes into a label name).
    pub fn set_id_prefix(&mut self, prefix: &str) {
        self.id_prefix = prefix
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .map(|c| c.to_ascii_lowercase())
            .collect();
    }

    /// Adds an entry made elsewhere (another replica of the fleet), as it is: same id,
    /// same expiry. Returns whether it was added (not when it is already here or has
    /// expired). Not bounded by `control.emergency_max`: refusing a quarantine the fleet
    /// enforces would fail open. The caller recompiles afterwards.
    pub fn insert(&mut self, entry: EmergencyEntry, now: SystemTime) -> bool {
        if !entry.live(now) || self.entries.iter().any(|e| e.id == entry.id) {
            return false;
        }
        self.entries.push(entry);
        // As in `prune`: a failed save only matters after a restart, which lists the
        // fleet's entries again.
        let _ = self.save();
        true
    }

    /// The earliest expiry among the entries.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.entries.iter().map(EmergencyEntry::expires_at).min()
    }

    /// Checks a request against the current policy set and adds it. Nothing changes on
    /// error. The caller recompiles afterwards.
    ///
    /// # Errors
    /// [`EmergencyError`] naming what is wrong with the request.
    pub fn add(
        &mut self,
        req: &EmergencyRequest,
        current: &PolicySet,
        now: SystemTime,
    ) -> Result<EmergencyEntry, EmergencyError> {
        self.prune(now);
        if self.entries.len() >= self.limits.max_entries {
            return Err(EmergencyError::Full { active: self.entries.len() });
        }
        let ttl = req.ttl.as_deref().map(|t| self.parse_ttl(t)).transpose()?;
        let (target, ttl) = match (&req.quarantine, &req.policy) {
            (Some(q), None) => {
                let ttl = ttl.ok_or_else(|| {
                    EmergencyError::BadRequest("a quarantine needs a ttl, e.g. \"15m\"".into())
                })?;
                (parse_target(q, current)?, ttl)
            }
            (None, Some(yaml)) => {
                let policies = load::parse_policies(yaml, Path::new("emergency"))
                    .map_err(EmergencyError::Policy)?;
                if policies.is_empty() {
                    return Err(EmergencyError::BadRequest(
                        "the policy body holds no policy".into(),
                    ));
                }
                let ttl = match ttl {
                    Some(t) => t,
                    None => {
                        let mut longest = Duration::ZERO;
                        for p in &policies {
                            let d = match p.expiry {
                                Some(Expiry::Ttl(d)) => d,
                                Some(Expiry::At(at)) => at.duration_since(now).map_err(|_| {
                                    EmergencyError::BadRequest(format!(
                                        "policy {}: expires-at is in the past",
                                        p.display_name()
                                    ))
                                })?,
                                None => {
                                    return Err(EmergencyError::BadRequest(format!(
                                        "policy {}: an emergency policy needs a ttl (request field \
                                         or flowgate.dev/ttl)",
                                        p.display_name()
                                    )));
                                }
                            };
                            longest = longest.max(d);
                        }
                        self.check_ttl(longest)?
                    }
                };
                (Target::Policy { yaml: yaml.clone() }, ttl)
            }
            _ => {
                return Err(EmergencyError::BadRequest(
                    "give exactly one of \"quarantine\" and \"policy\"".into(),
                ));
            }
        };
        let created_ms = unix_ms(now);
        // Skips ids already taken (entries inserted from the fleet share the space).
        while self.entries.iter().any(|e| e.id == format!("{}q{}", self.id_prefix, self.next_id)) {
            self.next_id += 1;
        }
        let entry = EmergencyEntry {
            id: format!("{}q{}", self.id_prefix, self.next_id),
            target,
            created_ms,
            expires_ms: created_ms.saturating_add(ttl.as_millis() as u64),
        };
        self.entries.push(entry.clone());
        self.next_id += 1;
        if let Err(e) = self.save() {
            self.entries.pop();
            self.next_id -= 1;
            return Err(e);
        }
        Ok(entry)
    }

    fn parse_ttl(&self, text: &str) -> Result<Duration, EmergencyError> {
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            EmergencyError::BadRequest(format!("ttl {text:?} is not a duration like 15m: {e}"))
        })?;
        self.check_ttl(d)
    }

    fn check_ttl(&self, d: Duration) -> Result<Duration, EmergencyError> {
        if d.is_zero() {
            return Err(EmergencyError::BadRequest("ttl must be longer than zero".into()));
        }
        if d > self.limits.max_ttl {
            return Err(EmergencyError::BadRequest(format!(
                "ttl {} exceeds control.emergency_max_ttl ({})",
                humantime::format_duration(d),
                humantime::format_duration(self.limits.max_ttl)
            )));
        }
        Ok(d)
    }

    /// Removes an entry (rolling back an [`Overlay::add`] whose recompile failed).
    pub fn remove(&mut self, id: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.id != id);
        let removed = self.entries.len() != before;
        if removed {
            let _ = self.save();
        }
        removed
    }

    /// Drops expired entries; returns how many. Saves the state file when any went.
    pub fn prune(&mut self, now: SystemTime) -> usize {
        let before = self.entries.len();
        self.entries.retain(|e| e.live(now));
        let gone = before - self.entries.len();
        if gone > 0 {
            // A failed save only means expired entries reappear after a restart, where they
            // are pruned again on open: not worth failing a reload for.
            let _ = self.save();
        }
        gone
    }

    fn save(&self) -> Result<(), EmergencyError> {
        let Some(path) = &self.state_file else { return Ok(()) };
        let state = StateFile { next_id: self.next_id, entries: self.entries.clone() };
        let err = |e: std::io::Error| EmergencyError::State {
            path: path.clone(),
            message: format!("cannot save: {e}"),
        };
        let text = serde_json::to_string_pretty(&state)
            .map_err(|e| EmergencyError::State { path: path.clone(), message: e.to_string() })?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Hash of the live entries; empty when there are none, so an empty overlay leaves the
    /// content hash of the sources as it is.
    pub fn content_hash(&self) -> String {
        if self.entries.is_empty() {
            return String::new();
        }
        let mut h = Sha256::new();
        for e in &self.entries {
            h.update(serde_json::to_vec(e).unwrap_or_default());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// Lays the entries live at `now` over `set`; returns [`Overlay::content_hash`].
    pub fn apply(&self, set: &mut PolicySet, now: SystemTime) -> String {
        let mut synthetic = Vec::new();
        for e in self.entries.iter().filter(|e| e.live(now)) {
            let created = UNIX_EPOCH + Duration::from_millis(e.created_ms);
            let expires = e.expires_at();
            match &e.target {
                Target::Address(ip) => {
                    synthetic.push(Workload {
                        name: format!("quarantine-{}", e.id),
                        namespace: EMERGENCY_NAMESPACE.to_owned(),
                        labels: BTreeMap::from([(e.label(), "true".to_owned())]),
                        addrs: vec![IpNet::from(*ip)],
                        ports: Vec::new(),
                    });
                    set.policies.push(Arc::new(quarantine_policy(e, created, expires)));
                }
                Target::Workload { namespace, name } => {
                    // Copies the inventory only here (the other workloads are shared
                    // with the disk set otherwise).
                    if let Some(w) = Arc::make_mut(&mut set.inventory)
                        .workloads
                        .iter_mut()
                        .find(|w| &w.namespace == namespace && &w.name == name)
                    {
                        w.labels.insert(e.label(), "true".to_owned());
                    }
                    set.policies.push(Arc::new(quarantine_policy(e, created, expires)));
                }
                Target::Policy { yaml } => {
                    let source = PathBuf::from(format!("emergency:{}", e.id));
                    // Checked when the entry was added; a body that no longer parses (a
                    // hand-edited state file) is left out rather than half-applied.
                    if let Ok(policies) = load::parse_policies(yaml, &source) {
                        for mut p in policies {
                            p.expiry = Some(Expiry::At(expires));
                            p.created_at = Some(created);
                            set.policies.push(Arc::new(p));
                        }
                    }
                }
            }
        }
        if !synthetic.is_empty() {
            // First, so the synthetic /32 wins a longest-prefix tie with a workload that
            // owns the same address.
            let inventory = Arc::make_mut(&mut set.inventory);
            synthetic.append(&mut inventory.workloads);
            inventory.workloads = synthetic;
        }
        self.content_hash()
    }
}

/// The priority-0 AdminNetworkPolicy that cuts a marked target off both ways.
fn quarantine_policy(e: &EmergencyEntry, created: SystemTime, expires: SystemTime) -> Policy {
    let everyone = || WorkloadSelector {
        namespaces: NamespaceMatch::Selector(LabelSelector::default()),
        pods: LabelSelector::default(),
    };
    let anything = || {
        Peers::List(vec![
            Peer::Workloads(everyone()),
            Peer::Cidr { net: "0.0.0.0/0".parse().expect("literal CIDR"), except: vec![] },
            Peer::Cidr { net: "::/0".parse().expect("literal CIDR"), except: vec![] },
        ])
    };
    Policy {
        kind: PolicyKind::AdminNetworkPolicy,
        name: format!("flowgate-quarantine-{}", e.id),
        namespace: None,
        source: PathBuf::from(format!("emergency:{}", e.id)),
        tier: Tier::Admin { priority: 0 },
        subject: WorkloadSelector {
            namespaces: NamespaceMatch::Selector(LabelSelector::default()),
            pods: LabelSelector {
                match_labels: BTreeMap::from([(e.label(), "true".to_owned())]),
                match_expressions: Vec::new(),
            },
        },
        ingress: Some(vec![Rule {
            name: Some("quarantine-ingress".to_owned()),
            action: Action::Deny,
            peers: anything(),
            ports: None,
        }]),
        egress: Some(vec![Rule {
            name: Some("quarantine-egress".to_owned()),
            action: Action::Deny,
            peers: anything(),
            ports: None,
        }]),
        mode: Mode::Enforce,
        expiry: Some(Expiry::At(expires)),
        created_at: Some(created),
    }
}

/// An address, or `namespace/workload` that must exist in `current`.
fn parse_target(text: &str, current: &PolicySet) -> Result<Target, EmergencyError> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(Target::Address(ip));
    }
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            if current.inventory.workloads.iter().any(|w| w.namespace == ns && w.name == name) {
                Ok(Target::Workload { namespace: ns.to_owned(), name: name.to_owned() })
            } else {
                Err(EmergencyError::UnknownWorkload(text.to_owned()))
            }
        }
        _ => Err(EmergencyError::BadRequest(format!(
            "quarantine target {text:?}: expected an IP address or namespace/workload"
        ))),
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
