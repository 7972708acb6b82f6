//! `flowgate check`: load and validate the policy directory and the inventory, print every
//! error (exit 1) or the lint warnings and a one-line summary (exit 0). Meant for CI and
//! pre-commit hooks, so it never stops at the first problem.
//!
//! Output: errors and warnings go to stderr, one per line (`error: …`, `warning: …`),
//! each naming file, object and field; the `ok:` summary goes to stdout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use flowgate::config::{Config, DEFAULT_CONFIG_PATH};
use flowgate::policy::DefaultAction;
use flowgate::policy::ir::{PolicyKind, PolicySet};
use flowgate::policy::{lint, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config file whose `[policy] dir` and `inventory` to check
    /// (default: config/flowgate.toml).
    #[arg(long, conflicts_with_all = ["policies", "inventory"])]
    pub config: Option<PathBuf>,
    /// A policy directory (searched recursively) or file, instead of the config's.
    #[arg(long, requires = "inventory")]
    pub policies: Option<PathBuf>,
    /// An inventory file, instead of the config's.
    #[arg(long, requires = "policies")]
    pub inventory: Option<PathBuf>,
    /// Override `policy.default` (workloads no policy isolates): allow | deny.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub default: Option<String>,
}

/// What to check, after the config file (if any) has been read.
struct Target {
    policies: PathBuf,
    inventory: PathBuf,
    /// Not used until the engine lands: `check` will then also compile the set with it.
    #[allow(dead_code)]
    default: DefaultAction,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let target = match target(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(1));
        }
    };
    let set = match load::load(&target.policies, &target.inventory) {
        Ok(set) => set,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s); nothing loaded", errors.0.len());
            return Ok(ExitCode::from(1));
        }
    };
    let warnings = lint::lint(&set, SystemTime::now());
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    println!("{}", summary(&set, warnings.len()));
    Ok(ExitCode::SUCCESS)
}

fn target(args: &Args) -> anyhow::Result<Target> {
    let flag = match args.default.as_deref() {
        Some("allow") => Some(DefaultAction::Allow),
        Some(_) => Some(DefaultAction::Deny),
        None => None,
    };
    if let (Some(policies), Some(inventory)) = (&args.policies, &args.inventory) {
        return Ok(Target {
            policies: policies.clone(),
            inventory: inventory.clone(),
            default: flag.unwrap_or_default(),
        });
    }
    let path = args.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let cfg = Config::load(&path).with_context(|| format!("loading {}", path.display()))?;
    Ok(Target {
        policies: cfg.policy.dir,
        inventory: cfg.policy.inventory,
        default: flag.unwrap_or(cfg.policy.default),
    })
}

/// `ok: N policies (x NetworkPolicy, …) over M workloads in K namespaces, W warning(s)`.
fn summary(set: &PolicySet, warnings: usize) -> String {
    let kinds = [
        PolicyKind::NetworkPolicy,
        PolicyKind::AdminNetworkPolicy,
        PolicyKind::BaselineAdminNetworkPolicy,
        PolicyKind::ClusterNetworkPolicy,
    ];
    let counts: Vec<String> = kinds
        .iter()
        .map(|k| (k, set.policies.iter().filter(|p| p.kind == *k).count()))
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{n} {}", k.as_str()))
        .collect();
    let counts =
        if counts.is_empty() { String::new() } else { format!(" ({})", counts.join(", ")) };
    format!(
        "ok: {} policies{counts} over {} workloads in {} namespaces, {warnings} warning(s)",
        set.policies.len(),
        set.inventory.workloads.len(),
        set.inventory.namespaces.len(),
    )
}
