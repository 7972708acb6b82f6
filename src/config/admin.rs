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

/// `admin.token_env` names a variable that is set but empty (or blank, or not Unicode).
#[derive(Debug, Error)]
#[error("admin: environment variable {var} (admin.token_env) is set but empty or not Unicode")]
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

    /// The token from `token`, else from the variable `token_env` names. A variable that
    /// is not set means no token (`Ok(None)`): the gateway still starts, on loopback, and
    /// refuses every mutating call with a 401 that says it has no token and names the
    /// variable. That keeps the bundled config (which names `FLOWGATE_ADMIN_TOKEN`)
    /// runnable before anyone has exported it. The same call gives `flowgate
    /// reload`/`quarantine` the token to send.
    ///
    /// # Errors
    /// [`TokenEnvError`] when the variable is set but empty (or blank) or not Unicode: a
    /// token that was meant to be there and is not is a mistake to report, not to paper
    /// over.
    pub fn resolve_token(&self) -> Result<Option<String>, TokenEnvError> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        let Some(var) = &self.token_env else { return Ok(None) };
        match std::env::var(var) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
            Err(std::env::VarError::NotPresent) => Ok(None),
            _ => Err(TokenEnvError { var: var.clone() }),
        }
    }
}
