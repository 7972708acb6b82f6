//! The admin HTTP API: health, readiness, metrics, the policy in force, flows, explain,
//! reload and emergency policies. Its own bind (default `127.0.0.1:9901`), never a data
//! port; it refuses to start on a non-loopback address without a token.
//!
//! Read-only endpoints are open (as a Prometheus target must be); mutating ones
//! (`POST /reload`, `POST /emergency`) need `Authorization: Bearer <token>` and get 401,
//! with nothing changed, otherwise. With no token configured (including `token_env`
//! naming an unset variable) every mutating call is refused: fail closed, with a 401 body
//! that says so ([`auth::Unauthorized`]).
//!
//! Layout: [`server`] (accept loop, routing, the handlers), [`auth`] (the bearer check),
//! [`exposition`] (Prometheus text format), [`client`] (the tiny client the `flowgate
//! status|reload|quarantine` commands use).
//!
//! Not here: what a reload or an emergency entry does (`control`).

pub mod auth;
pub mod client;
pub mod exposition;
pub mod server;

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

pub use server::serve;

use crate::control::ControlError;

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
    #[serde(with = "duration_text")]
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

mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
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
    /// [`ControlError::TokenEnv`] when the variable is set but empty (or blank) or not
    /// Unicode: a token that was meant to be there and is not is a mistake to report,
    /// not to paper over.
    pub fn resolve_token(&self) -> Result<Option<String>, ControlError> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        let Some(var) = &self.token_env else { return Ok(None) };
        match std::env::var(var) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
            Err(std::env::VarError::NotPresent) => Ok(None),
            _ => Err(ControlError::TokenEnv { var: var.clone() }),
        }
    }
}
