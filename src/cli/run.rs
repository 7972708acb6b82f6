//! `flowgate run`: load the config and the policy, start the listeners and the conntrack
//! expiry task, and serve until SIGTERM/SIGINT; then stop accepting, drain open
//! connections for up to `run.drain_timeout`, flush the flow log and exit 0.
//!
//! Status lines go to stderr (`flowgate: …`); the flow log goes where `[flowlog] output`
//! says (stdout by default).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::Context;
use flowgate::config::{Config, DEFAULT_CONFIG_PATH};
use flowgate::conntrack::{Conntrack, Entry};
use flowgate::control::{ControlPlane, RevokeFn};
use flowgate::dataplane::{Runtime, proxy};
use flowgate::policy::Decision;
use flowgate::shutdown::Shutdown;
use flowgate::telemetry::flowlog::FlowLog;
use flowgate::telemetry::metrics::Registry;
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
    let registry = Arc::new(Registry::default());
    let (flowlog, writer) = FlowLog::start(&cfg.flowlog, registry.clone())
        .with_context(|| format!("flow log {}", cfg.flowlog.output))?;
    let conntrack = Arc::new(Conntrack::new(&cfg.conntrack));
    // The control plane owns the policy handle (generation 1 is loaded here; a bad policy
    // stops start-up). Revocations it finds are logged through the data path's runtime,
    // which exists only once the handle does: hence the cell.
    let runtime_cell: Arc<OnceLock<Arc<Runtime>>> = Arc::new(OnceLock::new());
    let on_revoke: RevokeFn = {
        let cell = runtime_cell.clone();
        Arc::new(move |entry: &Entry, decision: &Decision| {
            if let Some(rt) = cell.get() {
                let snapshot = rt.policy.load_full();
                rt.revoke(entry, &snapshot, decision);
            }
        })
    };
    let control = ControlPlane::new(cfg.clone(), conntrack.clone(), registry.clone(), on_revoke)
        .context("control plane")?;
    let rt = Runtime::new(conntrack.clone(), control.policy(), registry, flowlog);
    let _ = runtime_cell.set(rt.clone());
    let mut shutdown = Shutdown::new();
    // Install the handlers before binding, so a signal right after start-up is not lost.
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;

    // The admin API first, so the egress listeners know its real address and never dial it.
    let control_tasks = control.start().await.context("control plane")?;
    eprintln!("flowgate: admin API on http://{}", control_tasks.admin_addr);
    let egress = proxy::EgressSettings {
        dns: cfg.dns.clone(),
        ssrf: cfg.ssrf.clone(),
        other_own: vec![control_tasks.admin_addr],
    };
    let credentials =
        flowgate::egress::Credentials::from_config(&cfg.credential).context("[[credential]]")?;
    let listeners = proxy::start_with_credentials(
        &rt,
        &cfg.listener,
        &egress,
        std::sync::Arc::new(credentials),
        &shutdown,
    )?;
    for l in &listeners {
        eprintln!("flowgate: listener {} ({}) on {}", l.name, l.kind.as_str(), l.local_addr);
    }
    control.readiness().store(true, Ordering::Release);
    let snap = rt.policy.load();
    eprintln!(
        "flowgate: ready: {} listener(s), policy generation {} ({} policies, {} workloads)",
        listeners.len(),
        snap.generation.0,
        snap.compiled.live_policy_count(),
        snap.compiled.workload_count(),
    );
    drop(snap);

    let expiry = {
        let mut stop = shutdown.signal();
        let every = cfg.run.expiry_interval;
        let budget = cfg.run.expiry_budget;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => { conntrack.expire_step(Instant::now(), budget); }
                    () = stop.recv() => return,
                }
            }
        })
    };

    let which = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    rt.readiness.set(false);
    control.readiness().store(false, Ordering::Release);
    let open = rt
        .registry
        .listeners()
        .iter()
        .map(|c| c.active.load(std::sync::atomic::Ordering::Relaxed))
        .sum::<u64>();
    eprintln!(
        "flowgate: {which}: stopped accepting; draining {open} open connection(s) for up to {}",
        humantime::format_duration(cfg.run.drain_timeout)
    );
    let started = Instant::now();
    let drained = shutdown.drain(cfg.run.drain_timeout).await;
    let _ = expiry.await;
    for l in listeners {
        l.task.abort();
    }
    drop(control_tasks);
    writer.finish();
    if drained {
        eprintln!("flowgate: drained in {} ms; exiting", started.elapsed().as_millis());
    } else {
        eprintln!(
            "flowgate: drain timeout after {} ms; closing the remaining connections; exiting",
            started.elapsed().as_millis()
        );
    }
    Ok(ExitCode::SUCCESS)
}
