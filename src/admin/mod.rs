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
//! Layout: [`AdminServer`] (binding, the token, the task), [`server`] (accept loop,
//! routing, the handlers), [`auth`] (the bearer check), [`client`] (the tiny client the
//! `flowgate status|reload|quarantine` commands use).
//!
//! Not here: what a reload or an emergency entry does (`control`), the Prometheus text
//! (`telemetry::exposition`), and starting it next to the rest (`gateway`).
#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::task::JoinHandle;

pub use server::serve;

use crate::config::TokenEnvError;
use crate::control::ControlPlane;
use crate::dataplane::Readiness;

/// Why the admin API could not start.
#[derive(Debug, Error)]
pub enum AdminError {
    /// The cause is the error's source (printed after it by `{:#}`), not repeated here.
    #[error("admin: cannot bind {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(
        "admin: refusing to listen on non-loopback {addr} without a token \
         (set admin.token or admin.token_env)"
    )]
    NoToken { addr: SocketAddr },
    #[error(transparent)]
    TokenEnv(#[from] TokenEnvError),
}

/// What the handlers serve from: the control plane (policy, reloads, emergency entries,
/// conntrack, metrics), the gateway's readiness, and the token mutating calls need.
#[derive(Clone, Debug)]
pub struct AdminState {
    pub control: ControlPlane,
    pub readiness: Readiness,
    pub(crate) token: Option<Arc<str>>,
}

impl AdminState {
    /// Resolves the token from `[admin]` (`control.config().admin`).
    ///
    /// # Errors
    /// [`AdminError::TokenEnv`] when `token_env` names a variable set to nothing;
    /// [`AdminError::NoToken`] when `bind` is not loopback and there is no token.
    pub fn new(control: ControlPlane, readiness: Readiness) -> Result<AdminState, AdminError> {
        let cfg = &control.config().admin;
        let token = cfg.resolve_token()?;
        if token.is_none() && !cfg.bind.ip().is_loopback() {
            return Err(AdminError::NoToken { addr: cfg.bind });
        }
        Ok(AdminState { token: token.map(Arc::from), control, readiness })
    }
}

/// The admin API, serving on its own task; stopped when dropped.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Binds `admin.bind` and serves `state` there. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`AdminError::Bind`] when the address cannot be bound.
    pub fn start(state: AdminState) -> Result<AdminServer, AdminError> {
        let bind = state.control.config().admin.bind;
        let err = |source| AdminError::Bind { addr: bind, source };
        let std = std::net::TcpListener::bind(bind).map_err(err)?;
        std.set_nonblocking(true).map_err(err)?;
        let listener = tokio::net::TcpListener::from_std(std).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        Ok(AdminServer { addr, task: tokio::spawn(serve(listener, state)) })
    }

    /// Where it listens (the real port when the config said `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
