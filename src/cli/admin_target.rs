//! Where the admin API is and which token to send, for the commands that talk to a
//! running gateway (`status`, `reload`, `quarantine`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use flowgate::admin::client::AdminClient;
use flowgate::config::{Config, DEFAULT_CONFIG_PATH};

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The config whose `[admin]` bind and token to use (default: config/flowgate.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The admin API address, instead of the config's `admin.bind`.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// The bearer token, instead of the config's (`admin.token` / `admin.token_env`).
    /// Prefer the config's `token_env`: a flag shows in the process list.
    #[arg(long)]
    pub token: Option<String>,
}

impl AdminArgs {
    /// The client; reads the config only for what the flags leave open.
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        if let (Some(addr), Some(token)) = (self.admin, &self.token) {
            return Ok(AdminClient::new(addr, Some(token.clone())));
        }
        let path = self.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let cfg = match Config::load(&path) {
            Ok(cfg) => Some(cfg),
            // Without a config file the flags (or defaults) must do.
            Err(_) if self.config.is_none() => None,
            Err(e) => return Err(e).with_context(|| format!("loading {}", path.display())),
        };
        let admin = cfg.map(|c| c.admin).unwrap_or_default();
        let token = match &self.token {
            Some(t) => Some(t.clone()),
            None => admin.resolve_token().ok().flatten(),
        };
        Ok(AdminClient::new(self.admin.unwrap_or(admin.bind), token))
    }
}

/// Runs a future on a small runtime (these commands do one or two requests).
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}
