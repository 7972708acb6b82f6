//! Proxy credentials → workload: `[[credential]]` in the config maps a username (and its
//! password, from the config or an environment variable) to a workload `namespace/name`
//! of the inventory. Functions that share NAT addresses cannot be told apart by source
//! address; with credentials (`Proxy-Authorization: Basic`, SOCKS5 RFC 1929) each one is
//! decided, and logged, as itself.
//!
//! A credential that is presented and wrong is refused — never ignored and never
//! downgraded to the source-address identity — so a typo cannot silently widen access.
//! Each listener says whether credentials are `off`, `optional` or `required`
//! ([`CredentialMode`]).
//!
//! The per-flow path neither allocates nor locks: the table is built once at start-up;
//! a credential's workload id is cached per policy generation in one atomic word (the
//! name lookup, a linear scan of the inventory, runs once per generation).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use thiserror::Error;

use crate::policy::{CompiledPolicy, Generation, WorkloadId};

/// One `[[credential]]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    pub username: String,
    /// The password, inline. Exactly one of `password` / `password_env`.
    #[serde(default)]
    pub password: Option<String>,
    /// The environment variable holding the password (kept out of the config file).
    #[serde(default)]
    pub password_env: Option<String>,
    /// The workload this username is, `namespace/name` as in the inventory.
    pub workload: String,
}

/// Whether a listener asks for credentials. Default `off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialMode {
    /// Not asked for; the identity is the source address. A SOCKS5 client is not offered
    /// username/password; an HTTP `Proxy-Authorization` header is not looked at.
    #[default]
    Off,
    /// Used when presented (and then must be right); without them the identity is the
    /// source address.
    Optional,
    /// Every request must carry valid credentials (`407` / SOCKS5 no acceptable method).
    Required,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("credential {0:?}: give exactly one of password and password_env")]
    PasswordSource(String),
    #[error("credential {user:?}: environment variable {var} is not set")]
    MissingEnv { user: String, var: String },
    #[error("credential {0:?}: workload must be namespace/name")]
    Workload(String),
    #[error("credential {0:?}: username listed twice")]
    Duplicate(String),
    #[error("credential {0:?}: username must be 1-255 bytes without ':'")]
    Username(String),
}

/// Who a valid credential names: an index into [`Credentials`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CredentialId(pub usize);

#[derive(Debug)]
struct Credential {
    password: Box<[u8]>,
    /// `namespace/name`, shared with every flow it admits (see `source`).
    full: std::sync::Arc<str>,
    namespace: Box<str>,
    name: Box<str>,
    /// `(generation + 1) << 32 | id` of the last lookup (`0xffff_ffff`: not in the
    /// inventory); 0 = none yet. A race only redoes the scan.
    cache: AtomicU64,
}

/// The credential table, built once from the config.
#[derive(Debug, Default)]
pub struct Credentials {
    by_user: HashMap<Box<[u8]>, usize>,
    all: Vec<Credential>,
}

impl Credentials {
    /// Builds the table, reading `password_env` variables now (a missing one is a
    /// start-up error, not a credential that can never match).
    ///
    /// # Errors
    /// [`CredentialError`] naming the username.
    pub fn from_config(cfgs: &[CredentialConfig]) -> Result<Credentials, CredentialError> {
        let mut out = Credentials::default();
        for c in cfgs {
            let user = c.username.clone();
            if c.username.is_empty() || c.username.len() > 255 || c.username.contains(':') {
                return Err(CredentialError::Username(user));
            }
            let password = match (&c.password, &c.password_env) {
                (Some(p), None) => p.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    CredentialError::MissingEnv { user: user.clone(), var: var.clone() }
                })?,
                _ => return Err(CredentialError::PasswordSource(user)),
            };
            let Some((ns, name)) = c.workload.split_once('/') else {
                return Err(CredentialError::Workload(user));
            };
            if ns.is_empty() || name.is_empty() || name.contains('/') {
                return Err(CredentialError::Workload(user));
            }
            let idx = out.all.len();
            if out.by_user.insert(c.username.as_bytes().into(), idx).is_some() {
                return Err(CredentialError::Duplicate(user));
            }
            out.all.push(Credential {
                password: password.into_bytes().into_boxed_slice(),
                full: std::sync::Arc::from(c.workload.as_str()),
                namespace: ns.into(),
                name: name.into(),
                cache: AtomicU64::new(0),
            });
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The credential `username` / `password` name, or `None` (unknown user or wrong
    /// password; the comparison of the password takes the same time wherever it
    /// differs).
    pub fn verify(&self, username: &[u8], password: &[u8]) -> Option<CredentialId> {
        let &idx = self.by_user.get(username)?;
        let c = &self.all[idx];
        constant_time_eq(&c.password, password).then_some(CredentialId(idx))
    }

    /// `namespace/name` of a credential's workload, for the flow log.
    pub fn workload_name(&self, id: CredentialId) -> Option<(&str, &str)> {
        self.all.get(id.0).map(|c| (&*c.namespace, &*c.name))
    }

    /// `namespace/name` of the credential's workload, shared (an `Arc` clone): kept on
    /// each admitted flow so a reload re-decides it as that workload.
    pub fn source(&self, id: CredentialId) -> Option<std::sync::Arc<str>> {
        self.all.get(id.0).map(|c| c.full.clone())
    }

    /// The credential's workload in `policy` (of `generation`), or `None` when the
    /// inventory has no such workload (the caller fails closed).
    pub fn workload(
        &self,
        id: CredentialId,
        policy: &CompiledPolicy,
        generation: Generation,
    ) -> Option<WorkloadId> {
        let c = self.all.get(id.0)?;
        // The low 32 bits of the generation (plus one, so the tag is never 0).
        let tag = (generation.0.wrapping_add(1) & 0xffff_ffff) << 32;
        let cached = c.cache.load(Ordering::Relaxed);
        if cached != 0 && cached & !0xffff_ffff == tag {
            return match cached & 0xffff_ffff {
                0xffff_ffff => None,
                v => Some(WorkloadId(v as u32)),
            };
        }
        let found = policy.find_workload(&c.namespace, &c.name);
        let low = found.map_or(0xffff_ffff, |w| u64::from(w.0));
        c.cache.store(tag | low, Ordering::Relaxed);
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(user: &str, pw: &str, wl: &str) -> CredentialConfig {
        CredentialConfig {
            username: user.into(),
            password: Some(pw.into()),
            password_env: None,
            workload: wl.into(),
        }
    }

    #[test]
    fn verify_accepts_only_the_exact_pair() {
        let c =
            Credentials::from_config(&[cfg("a", "pw", "fn/a"), cfg("b", "pw2", "fn/b")]).unwrap();
        assert_eq!(c.verify(b"a", b"pw"), Some(CredentialId(0)));
        assert_eq!(c.verify(b"b", b"pw2"), Some(CredentialId(1)));
        assert_eq!(c.verify(b"a", b"pw2"), None);
        assert_eq!(c.verify(b"a", b"p"), None);
        assert_eq!(c.verify(b"a", b"pw "), None);
        assert_eq!(c.verify(b"c", b"pw"), None);
        assert_eq!(c.workload_name(CredentialId(1)), Some(("fn", "b")));
    }

    #[test]
    fn config_mistakes_are_errors() {
        let mut both = cfg("a", "pw", "fn/a");
        both.password_env = Some("X".into());
        assert!(matches!(
            Credentials::from_config(&[both]),
            Err(CredentialError::PasswordSource(_))
        ));
        assert!(matches!(
            Credentials::from_config(&[cfg("a", "pw", "fn")]),
            Err(CredentialError::Workload(_))
        ));
        assert!(matches!(
            Credentials::from_config(&[cfg("a", "pw", "fn/a"), cfg("a", "x", "fn/b")]),
            Err(CredentialError::Duplicate(_))
        ));
        assert!(matches!(
            Credentials::from_config(&[cfg("a:b", "pw", "fn/a")]),
            Err(CredentialError::Username(_))
        ));
        let env = CredentialConfig {
            username: "e".into(),
            password: None,
            password_env: Some("FLOWGATE_TEST_SURELY_UNSET_VAR".into()),
            workload: "fn/e".into(),
        };
        assert!(matches!(
            Credentials::from_config(&[env]),
            Err(CredentialError::MissingEnv { .. })
        ));
    }
}
