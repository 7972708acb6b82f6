//! `flowgate check`: load and validate the policy directory and the inventory, compile the
//! set with the chosen default, print every error (exit 1) or the lint warnings and a
//! one-line summary (exit 0). Meant for CI and pre-commit hooks, so it never stops at the
//! first problem.
//!
//! Output: errors and warnings go to stderr, one per line (`error: …`, `warning: …`),
//! each naming file, object and field; the `ok:` summary goes to stdout.
//!
//! This file also holds [`Source`], the policy-input arguments `check`, `explain` and
//! `test` share, and [`Source::load`], so all three read policy the same way.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use flowgate::config::{Config, DEFAULT_CONFIG_PATH};
use flowgate::policy::ir::{PolicyKind, PolicySet};
use flowgate::policy::{CompileOptions, CompiledPolicy, DefaultAction};
use flowgate::policy::{lint, load};

/// Where policy comes from, and the default to compile it with.
#[derive(Debug, clap::Args)]
pub struct Source {
    /// The config file whose `[policy] dir`, `inventory`, `default` and `unknown` to use
    /// (default: config/flowgate.toml).
    #[arg(long, conflicts_with_all = ["policies", "inventory"])]
    pub config: Option<PathBuf>,
    /// A policy directory (searched recursively) or file, instead of the config's.
    #[arg(long, requires = "inventory")]
    pub policies: Option<PathBuf>,
    /// An inventory file, instead of the config's.
    #[arg(long, requires = "policies")]
    pub inventory: Option<PathBuf>,
    #[command(flatten)]
    pub default: DefaultArg,
}

/// `--default`, the one policy option every command that compiles policy shares
/// (`check`, `explain`, `test` through [`Source`], and `diff`).
#[derive(Debug, clap::Args)]
pub struct DefaultArg {
    /// Override `policy.default` (workloads no policy isolates): allow | deny.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub default: Option<String>,
}

impl DefaultArg {
    /// The default given, if any.
    pub fn action(&self) -> Option<DefaultAction> {
        match self.default.as_deref() {
            Some("allow") => Some(DefaultAction::Allow),
            Some(_) => Some(DefaultAction::Deny),
            None => None,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub source: Source,
}

/// What to read, after the config file (if any) has been read.
struct Target {
    policies: PathBuf,
    inventory: PathBuf,
    default: DefaultAction,
    unknown: DefaultAction,
}

/// A loaded and compiled policy set.
pub struct Loaded {
    pub set: PolicySet,
    pub compiled: CompiledPolicy,
}

impl Source {
    fn target(&self) -> anyhow::Result<Target> {
        let flag = self.default.action();
        if let (Some(policies), Some(inventory)) = (&self.policies, &self.inventory) {
            return Ok(Target {
                policies: policies.clone(),
                inventory: inventory.clone(),
                default: flag.unwrap_or_default(),
                unknown: DefaultAction::Deny,
            });
        }
        let path = self.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let cfg = Config::load(&path).with_context(|| format!("loading {}", path.display()))?;
        Ok(Target {
            policies: cfg.policy.dir,
            inventory: cfg.policy.inventory,
            default: flag.unwrap_or(cfg.policy.default),
            unknown: cfg.policy.unknown,
        })
    }

    /// Loads and compiles, printing every error to stderr. `Err` carries the exit code
    /// (1: bad input, nothing loaded).
    pub fn load(&self) -> Result<Loaded, ExitCode> {
        let target = self.checked_target()?;
        let set = target.load()?;
        let compiled = target.compile(&set, SystemTime::now())?;
        Ok(Loaded { set, compiled })
    }

    /// [`Source::target`], printing its error.
    fn checked_target(&self) -> Result<Target, ExitCode> {
        self.target().map_err(|e| {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        })
    }
}

impl Target {
    /// Loads the set, printing every error.
    fn load(&self) -> Result<PolicySet, ExitCode> {
        self.load_spelled().map(|(set, _)| set)
    }

    /// Loads the set and the spellings the lint reports, printing every error.
    fn load_spelled(&self) -> Result<(PolicySet, load::FileSpellings), ExitCode> {
        load::load_spelled(&self.policies, &self.inventory).map_err(|errors| {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s); nothing loaded", errors.0.len());
            ExitCode::from(1)
        })
    }

    /// Compiles `set` with the target's defaults, printing the error.
    fn compile(&self, set: &PolicySet, now: SystemTime) -> Result<CompiledPolicy, ExitCode> {
        let opts = CompileOptions { default: self.default, unknown: self.unknown, now };
        CompiledPolicy::compile(set, &opts).map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(1)
        })
    }
}

/// Load, then compile and lint. The work is split over threads where it is independent
/// (for speed; `benches/check_test.rs` measures it): the load reads the files over the
/// cores and finds the lint's spellings as it parses (no file is read twice), and the
/// lint runs beside the compile. What is printed, and in which order, is what a
/// sequential run prints: errors stop everything before a warning is printed.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let target = match args.source.checked_target() {
        Ok(t) => t,
        Err(code) => return Ok(code),
    };
    let now = SystemTime::now();
    let outcome = (|| -> Result<_, ExitCode> {
        let (set, spellings) = target.load_spelled()?;
        let (compiled, warnings) = std::thread::scope(|inner| {
            let compiled = inner.spawn(|| target.compile(&set, now));
            let warnings = lint::lint_spelled(&set, now, lint::Spellings::from_load(spellings));
            (joined(compiled), warnings)
        });
        Ok((Loaded { set, compiled: compiled? }, warnings))
    })();
    let (loaded, warnings) = match outcome {
        Ok(done) => done,
        Err(code) => return Ok(code),
    };
    let mut err = std::io::BufWriter::new(std::io::stderr().lock());
    for w in &warnings {
        writeln!(err, "warning: {w}")?;
    }
    err.flush()?;
    drop(err);
    println!("{}", summary(&loaded, warnings.len()));
    Ok(ExitCode::SUCCESS)
}

/// A scoped thread's result; its panic goes on in this thread.
fn joined<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `ok: N policies (x NetworkPolicy, …) over M workloads in K namespaces, W warning(s);
/// compiled with default deny, L in force`.
fn summary(loaded: &Loaded, warnings: usize) -> String {
    let set = &loaded.set;
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
    let default = match loaded.compiled.options().default {
        DefaultAction::Allow => "allow",
        DefaultAction::Deny => "deny",
    };
    format!(
        "ok: {} policies{counts} over {} workloads in {} namespaces, {warnings} warning(s); \
         compiled with default {default}, {} in force",
        set.policies.len(),
        set.inventory.workloads.len(),
        set.inventory.namespaces.len(),
        loaded.compiled.live_policy_count(),
    )
}
