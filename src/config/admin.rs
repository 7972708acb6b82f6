//! `[admin]`: where the admin API listens and the token its mutating calls need.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// `[admin]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the admin API listens. Default `127.0.0.1:9901`.
    pub bind: SocketAddr,
    /// The bearer token mutating calls need. Prefer `token_env` outside tests.
    pub token: Option<String>,
    /// Name of an environment variable holding the token (used when `token` is unset).
    pub token_env: Option<String>,
    /// Most entries one `/flows` answer lists. Default 1000.
    pub flows_limit: usize,
    /// Largest request body accepted (`POST /emergency`). Default 1 MiB.
    pub max_body: usize,
    /// Concurrent admin connections; more wait to be accepted. Default 64.
    pub max_connections: usize,
    /// Time allowed to send the request headers. Default `10s`.
    #[serde(with = "crate::human_duration")]
    pub header_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 9901)),
            token: None,
            token_env: None,
            flows_limit: 1000,
            max_body: 1 << 20,
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// `admin.token_env` names a variable that is not set (or is empty).
#[derive(Debug, Error)]
#[error("admin: environment variable {var} (admin.token_env) is not set or empty")]
pub struct TokenEnvError {
    pub var: String,
}

impl AdminConfig {
    /// Field checks; `(field, message)` on error.
    ///
    /// # Errors
    /// The first field that is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(("token".into(), "must not be empty (or leave it out)".into()));
        }
        if self.token_env.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(("token_env".into(), "must name an environment variable".into()));
        }
        for (field, v) in [
            ("flows_limit", self.flows_limit),
            ("max_body", self.max_body),
            ("max_connections", self.max_connections),
        ] {
            if v == 0 {
                return Err((field.into(), "must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// The token from `token`, else from the variable `token_env` names.
    ///
    /// # Errors
    /// [`TokenEnvError`] when `token_env` is set but the variable is not.
    pub fn resolve_token(&self) -> Result<Option<String>, TokenEnvError> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        match &self.token_env {
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
                _ => Err(TokenEnvError { var: var.clone() }),
            },
        }
    }
}
