//! Object metadata every policy kind shares: the name (and namespace), and flowgate's own
//! annotations, which are how flowgate extends Kubernetes' policy language without a
//! private dialect:
//!
//! - `flowgate.dev/expires-at`: RFC 3339 with any offset → [`Expiry::At`];
//! - `flowgate.dev/ttl`: a duration such as `15m` or `2h` → [`Expiry::Ttl`], counted from
//!   `metadata.creationTimestamp` when present (else from first sight, by the runtime);
//! - `flowgate.dev/mode`: `enforce` (default) or `audit` → [`Mode`].
//!
//! Any other `flowgate.dev/` annotation is an error: a misspelt `ttl` silently ignored would
//! leave an emergency policy in force for ever.

use std::time::{Duration, SystemTime};

use super::validate;
use super::{Report, k8s};
use crate::policy::ir::{Expiry, Mode};

pub const EXPIRES_AT: &str = "flowgate.dev/expires-at";
pub const TTL: &str = "flowgate.dev/ttl";
pub const MODE: &str = "flowgate.dev/mode";
const PREFIX: &str = "flowgate.dev/";

/// What a policy takes from `metadata`.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyMeta {
    pub name: String,
    pub namespace: Option<String>,
    pub mode: Mode,
    pub expiry: Option<Expiry>,
    pub created_at: Option<SystemTime>,
}

/// Checks `metadata` of a policy. `namespaced`: NetworkPolicy (its namespace is already
/// defaulted to `default`); cluster-scoped kinds ignore a namespace, as the API server does.
pub fn policy_meta(
    r: &mut Report<'_>,
    meta: &k8s::ObjectMeta,
    namespaced: bool,
) -> Option<PolicyMeta> {
    let name = match meta.name.as_deref() {
        None | Some("") => {
            r.error("metadata.name", "missing");
            None
        }
        Some(n) if !validate::is_dns_subdomain(n) => {
            r.error(
                "metadata.name",
                format!(
                    "{n:?} is not a valid name (lower-case DNS subdomain, at most 253 characters)"
                ),
            );
            None
        }
        Some(n) => Some(n.to_owned()),
    };
    let namespace = if namespaced {
        match meta.namespace.as_deref() {
            Some(ns) if validate::is_dns_label(ns) => Some(ns.to_owned()),
            Some(ns) => {
                r.error(
                    "metadata.namespace",
                    format!("{ns:?} is not a valid namespace name (DNS label)"),
                );
                None
            }
            None => Some("default".to_owned()),
        }
    } else {
        None
    };
    validate::labels(r, "metadata.labels", meta.labels.as_ref());

    let created_at = meta.creation_timestamp.as_deref().and_then(|t| {
        rfc3339(t).or_else(|| {
            r.error("metadata.creationTimestamp", format!("{t:?} is not an RFC 3339 timestamp"));
            None
        })
    });

    let mut mode = Mode::Enforce;
    let mut expires_at = None;
    let mut ttl = None;
    for (key, value) in meta.annotations.iter().flatten() {
        let field = format!("metadata.annotations.{key}");
        match key.as_str() {
            EXPIRES_AT => match rfc3339(value) {
                Some(t) => expires_at = Some(t),
                None => r.error(
                    &field,
                    format!("{value:?} is not an RFC 3339 timestamp (e.g. 2026-01-31T18:00:00Z)"),
                ),
            },
            TTL => match humantime::parse_duration(value.trim()) {
                Ok(d) if d > Duration::ZERO => ttl = Some(d),
                Ok(_) => r.error(&field, "a TTL must be longer than zero"),
                Err(e) => {
                    r.error(&field, format!("{value:?} is not a duration like 15m or 2h: {e}"))
                }
            },
            MODE => match value.as_str() {
                "enforce" => mode = Mode::Enforce,
                "audit" => mode = Mode::Audit,
                other => r.error(&field, format!("{other:?}: expected audit or enforce")),
            },
            k if k.starts_with(PREFIX) => r.error(
                &field,
                format!("unknown flowgate annotation (known: {EXPIRES_AT}, {TTL}, {MODE})"),
            ),
            _ => {}
        }
    }
    let expiry = match (expires_at, ttl) {
        (Some(_), Some(_)) => {
            r.error(
                "metadata.annotations",
                format!("{EXPIRES_AT} and {TTL} are both set; use one"),
            );
            None
        }
        (Some(t), None) => Some(Expiry::At(t)),
        (None, Some(d)) => Some(Expiry::Ttl(d)),
        (None, None) => None,
    };
    Some(PolicyMeta { name: name?, namespace, mode, expiry, created_at })
}

/// RFC 3339 with any offset, to a `SystemTime` (which can also lie before 1970).
fn rfc3339(text: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(text.trim()).ok().map(SystemTime::from)
}
