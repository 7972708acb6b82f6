//! Where the admin API is and which token to send, for the commands that talk to a
//! running gateway (`status`, `reload`, `quarantine`), and how they report a refusal.
//!
//! Exit codes, the same for every one of these commands: 0 done; 1 the gateway answered
//! and did not do it (a 401, a bad request, a rejected policy), with `error: …` lines on
//! stderr; 2 the gateway could not be asked (no config, nothing listening), from `main`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use flowgate::admin::client::{AdminClient, Answer, Unauthorized};
use flowgate::config::{Config, DEFAULT_CONFIG_PATH};
use serde_json::Value;

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

/// Where the token this command sends came from, to say what to change when it is refused.
#[derive(Debug, Clone)]
enum TokenFrom {
    Flag,
    /// `admin.token` in this config file.
    File(PathBuf),
    /// The variable `admin.token_env` names in this config file.
    Env {
        var: String,
        config: PathBuf,
    },
    /// None sent: `var` is the variable `admin.token_env` names, unset (or empty) here;
    /// `config` the file read, if one was.
    Nowhere {
        var: Option<String>,
        config: Option<PathBuf>,
    },
}

/// A gateway's admin API and how this command authenticates to it.
#[derive(Debug)]
pub struct Target {
    pub client: AdminClient,
    token_from: TokenFrom,
}

impl AdminArgs {
    /// The target; reads the config only for what the flags leave open.
    pub fn target(&self) -> anyhow::Result<Target> {
        if let (Some(addr), Some(token)) = (self.admin, &self.token) {
            let client = AdminClient::new(addr, Some(token.clone()));
            return Ok(Target { client, token_from: TokenFrom::Flag });
        }
        let path = self.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let cfg = match Config::load(&path) {
            Ok(cfg) => Some(cfg),
            // Without a config file the flags (or defaults) must do.
            Err(_) if self.config.is_none() => None,
            Err(e) => return Err(e).with_context(|| format!("loading {}", path.display())),
        };
        let read = cfg.is_some().then(|| path.clone());
        let admin = cfg.map(|c| c.admin).unwrap_or_default();
        let (token, token_from) = match (&self.token, admin.resolve_token().ok().flatten()) {
            (Some(t), _) => (Some(t.clone()), TokenFrom::Flag),
            (None, Some(t)) => {
                let from = match (&admin.token, &admin.token_env) {
                    (None, Some(var)) => TokenFrom::Env { var: var.clone(), config: path },
                    _ => TokenFrom::File(path),
                };
                (Some(t), from)
            }
            (None, None) => {
                (None, TokenFrom::Nowhere { var: admin.token_env.clone(), config: read })
            }
        };
        let client = AdminClient::new(self.admin.unwrap_or(admin.bind), token);
        Ok(Target { client, token_from })
    }
}

impl Target {
    /// `POST path` and sort the answer: `Ok(Ok(json))` when the status is one of `done`;
    /// otherwise the refusal is printed and `Ok(Err(exit code 1))` comes back, the same way
    /// for every command.
    ///
    /// # Errors
    /// The gateway could not be asked, or a `done` answer is not JSON.
    pub fn post(
        &self,
        path: &str,
        json: Option<String>,
        done: &[u16],
    ) -> anyhow::Result<Result<Value, ExitCode>> {
        let answer = block_on(self.client.post(path, json))??;
        if !done.contains(&answer.status) {
            for line in self.refusal(&answer) {
                eprintln!("error: {line}");
            }
            return Ok(Err(ExitCode::from(1)));
        }
        let v = serde_json::from_str(&answer.body).with_context(|| {
            format!("admin API answered {} with bad JSON: {}", answer.status, answer.body.trim())
        })?;
        Ok(Ok(v))
    }

    /// What to tell the user about an answer that is not the one asked for: for a 401, what
    /// exactly is wrong and what to change; otherwise the gateway's own reason.
    fn refusal(&self, answer: &Answer) -> Vec<String> {
        let addr = self.client.addr;
        match answer.unauthorized() {
            Some(u) if !u.token_configured => no_token_configured(addr, &u),
            Some(_) => vec![self.bad_token(addr)],
            None if answer.status == 401 => vec![format!(
                "the admin API at {addr} refused the call (401): {}",
                answer.body.trim()
            )],
            None => {
                let reason = serde_json::from_str::<Value>(&answer.body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| answer.body.trim().to_owned());
                vec![format!("{reason} ({})", answer.status)]
            }
        }
    }

    /// The gateway has a token and did not get it.
    fn bad_token(&self, addr: SocketAddr) -> String {
        let gateway = format!("the gateway at {addr}");
        match &self.token_from {
            TokenFrom::Flag => {
                format!("{gateway} refused the token given with --token (401): not its token")
            }
            TokenFrom::File(config) => format!(
                "{gateway} refused admin.token from {} (401): not its token",
                config.display()
            ),
            TokenFrom::Env { var, config } => format!(
                "{gateway} refused the token in {var} (admin.token_env in {}) (401): not the \
                 value the gateway started with",
                config.display()
            ),
            TokenFrom::Nowhere { var: Some(var), config } => format!(
                "{gateway} needs its admin token and none was sent (401): {var} (admin.token_env \
                 in {}) is not set in this shell; set it to the gateway's token",
                config.as_ref().map_or_else(|| "?".into(), |c| c.display().to_string())
            ),
            TokenFrom::Nowhere { var: None, config: Some(config) } => format!(
                "{gateway} needs its admin token and none was sent (401): {} has neither \
                 admin.token_env nor admin.token; set admin.token_env there and export that \
                 variable, or pass --token",
                config.display()
            ),
            TokenFrom::Nowhere { var: None, config: None } => format!(
                "{gateway} needs its admin token and none was sent (401): pass --config with \
                 the gateway's config (its admin.token_env), or --token"
            ),
        }
    }
}

/// The gateway has no token: every mutating call is refused and nothing this command could
/// send helps; only restarting the gateway with a token does.
fn no_token_configured(addr: SocketAddr, u: &Unauthorized) -> Vec<String> {
    let first = format!(
        "the gateway at {addr} has no admin token, so it refuses every reload and quarantine \
         (401); no --token can help until it has one"
    );
    let fix = match &u.token_env {
        Some(var) => format!(
            "its admin.token_env names {var}, which was unset when it started: stop it, \
             `export {var}=<a secret>`, start it again, and run this from a shell where {var} \
             has the same value"
        ),
        None => "give it one: set admin.token_env = \"FLOWGATE_ADMIN_TOKEN\" in its config, \
                 `export FLOWGATE_ADMIN_TOKEN=<a secret>`, and restart it"
            .to_owned(),
    };
    vec![first, fix]
}

/// Runs a future on a small runtime (these commands do one or two requests).
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}
