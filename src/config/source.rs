//! `[source]`: where the policy comes from — the policy directory and inventory file
//! (`files`, the default) or a key prefix in etcd (`etcd`), shared by a fleet of replicas.

use std::time::Duration;

use serde::Deserialize;

/// `source.kind`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// `policy.dir` and `policy.inventory`, watched on disk.
    #[default]
    Files,
    /// Objects under `source.prefix` in etcd, watched there.
    Etcd,
}

/// `[source]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `files` (default) or `etcd`.
    pub kind: SourceKind,
    /// etcd client URLs (`http://host:port`); tried in turn. Default `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet: objects under `<prefix>/policy/objects/`, the inventory at
    /// `<prefix>/policy/inventory`, replica reports under `<prefix>/replicas/`.
    /// Default `/flowgate`.
    pub prefix: String,
    /// How long one etcd call may take on one endpoint before the next is tried.
    /// Default `2s`.
    #[serde(with = "crate::human_duration")]
    pub dial_timeout: Duration,
    /// etcd user (authentication off when absent).
    pub username: Option<String>,
    /// Environment variable holding the etcd user's password. Default `FLOWGATE_ETCD_PASSWORD`.
    pub password_env: String,
    /// This replica's id in `<prefix>/replicas/`. Default: `<hostname>-<pid>`.
    pub replica_id: Option<String>,
    /// TTL of the lease that keeps the replica's report alive. Default `10s`.
    #[serde(with = "crate::human_duration")]
    pub report_ttl: Duration,
    /// The largest etcd answer (a range read, one watch message) the client buffers, in
    /// bytes; a larger one is refused with an error naming this knob and counted in
    /// `flowgate_source_errors_total{reason="too_large"}`. Default 64 MiB (above etcd's
    /// own `--max-request-bytes` and the gRPC gateway's message cap).
    pub max_answer_bytes: usize,
}

/// The largest etcd answer (or watch message) a replica buffers unless told otherwise:
/// 64 MiB, well above etcd's own 1.5 MiB request cap.
pub const DEFAULT_MAX_ANSWER: usize = 64 << 20;

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            kind: SourceKind::Files,
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/flowgate".into(),
            dial_timeout: Duration::from_secs(2),
            username: None,
            password_env: "FLOWGATE_ETCD_PASSWORD".into(),
            replica_id: None,
            report_ttl: Duration::from_secs(10),
            max_answer_bytes: DEFAULT_MAX_ANSWER,
        }
    }
}

impl SourceConfig {
    /// The prefix without a trailing `/`.
    pub fn prefix(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }

    /// The user and password (from `password_env`; empty when unset), when a user is set.
    pub fn credentials(&self) -> Option<(String, String)> {
        let user = self.username.clone()?;
        Some((user, std::env::var(&self.password_env).unwrap_or_default()))
    }
}
