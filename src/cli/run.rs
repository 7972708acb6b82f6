//! `flowgate run`: load the config, start the [`Gateway`] and serve until SIGTERM/SIGINT;
//! then stop accepting, drain open connections for up to `run.drain_timeout`, flush the
//! flow log and exit 0.
//!
//! Status lines go to stderr (`flowgate: …`); the flow log goes where `[flowlog] output`
//! says (stdout by default).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use flowgate::config::{Config, DEFAULT_CONFIG_PATH};
use flowgate::gateway::Gateway;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config file (default: config/flowgate.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = args.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let cfg = Config::load(&path)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if cfg.run.worker_threads > 0 {
        builder.worker_threads(cfg.run.worker_threads);
    }
    let runtime = builder.build().context("cannot start the async runtime")?;
    runtime.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<ExitCode> {
    // Installed before anything binds, so a signal right after start-up is not lost.
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let drain_timeout = cfg.run.drain_timeout;
    let gateway = Gateway::start(cfg)?;
    eprintln!("flowgate: admin API on http://{}", gateway.admin_addr());
    for l in gateway.listeners() {
        eprintln!("flowgate: listener {} ({}) on {}", l.name, l.kind.as_str(), l.local_addr);
    }
    if let Some(p) = gateway.packet() {
        eprintln!(
            "flowgate: packet filter {} ({}) on {}, {} worker(s)",
            p.name(),
            p.frontend().as_str(),
            p.device(),
            p.workers()
        );
    }
    let snap = gateway.runtime().policy.load();
    eprintln!(
        "flowgate: ready: {} listener(s), policy generation {} ({} policies, {} workloads)",
        gateway.listeners().len(),
        snap.generation.0,
        snap.compiled.live_policy_count(),
        snap.compiled.workload_count(),
    );
    drop(snap);

    let which = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    gateway.stop_accepting();
    eprintln!(
        "flowgate: {which}: stopped accepting; draining {} open connection(s) for up to {}",
        gateway.open_connections(),
        humantime::format_duration(drain_timeout)
    );
    let drained = gateway.drain(drain_timeout).await;
    let ms = drained.elapsed.as_millis();
    if drained.in_time {
        eprintln!("flowgate: drained in {ms} ms; exiting");
    } else {
        eprintln!(
            "flowgate: drain timeout after {ms} ms; closing the remaining connections; exiting"
        );
    }
    Ok(ExitCode::SUCCESS)
}
