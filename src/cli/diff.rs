//! `flowgate diff --from A --to B`: what a policy change does to reachability. A and B are
//! policy directories (or files) or git revisions of one (`git:REV[:PATH]`, read with
//! `git ls-tree`/`git show`, the work tree untouched); both are read over the inventory
//! (`--inventory`, or `--from-inventory`/`--to-inventory` when it changed too; default: the
//! config's) and compiled with the config's `policy.default` unless `--default` says.
//!
//! Prints every opened and closed flow, `source → destination ports/PROTOCOL`, with the
//! rules that allow it on the side where it is allowed (the library: `policy::diff`).
//! `--json` prints `{"opened": [...], "closed": [...]}`, each entry `{from, to, protocol,
//! ports, reason}`. Exit 0; 1 on bad input; 3 when `--fail-on` names a kind of change
//! that exists (for CI gates).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, bail};
use flowgate::config::{Config, DEFAULT_CONFIG_PATH};
use flowgate::policy::diff::{self, ChangeKind, Side};
use flowgate::policy::ir::{Inventory, Policy, PolicySet};
use flowgate::policy::{CompileOptions, CompiledPolicy, DefaultAction, load};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy before the change: a directory or file, or `git:REV[:PATH]`.
    #[arg(long)]
    pub from: String,
    /// The policy after the change: a directory or file, or `git:REV[:PATH]`.
    #[arg(long)]
    pub to: String,
    /// The inventory of both sides (a file or `git:REV:PATH`; default: the config's).
    #[arg(long, conflicts_with_all = ["from_inventory", "to_inventory"])]
    pub inventory: Option<String>,
    /// The inventory before the change (default: the config's).
    #[arg(long)]
    pub from_inventory: Option<String>,
    /// The inventory after the change (default: the config's).
    #[arg(long)]
    pub to_inventory: Option<String>,
    /// The config whose `policy.inventory`, `dir`, `default` and `unknown` fill in what is
    /// not given (default: config/flowgate.toml, if it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override `policy.default` on both sides: allow | deny.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub default: Option<String>,
    /// Print one JSON object: `opened`, `closed`.
    #[arg(long)]
    pub json: bool,
    /// Exit 3 when a change of this kind exists: opened | closed | any.
    #[arg(long, value_parser = ["opened", "closed", "any"])]
    pub fail_on: Option<String>,
}

/// One change as printed.
#[derive(Serialize)]
struct Entry {
    from: String,
    to: String,
    protocol: String,
    ports: String,
    reason: String,
}

#[derive(Serialize, Default)]
struct Report {
    opened: Vec<Entry>,
    closed: Vec<Entry>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match compute(&args) {
        Ok(report) => {
            print(&args, &report)?;
            let hit = match args.fail_on.as_deref() {
                Some("opened") => !report.opened.is_empty(),
                Some("closed") => !report.closed.is_empty(),
                Some(_) => !report.opened.is_empty() || !report.closed.is_empty(),
                None => false,
            };
            Ok(if hit { ExitCode::from(3) } else { ExitCode::SUCCESS })
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

fn compute(args: &Args) -> anyhow::Result<Report> {
    let config = match &args.config {
        Some(path) => {
            Some(Config::load(path).with_context(|| format!("loading {}", path.display()))?)
        }
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => Some(
            Config::load(Path::new(DEFAULT_CONFIG_PATH))
                .with_context(|| format!("loading {DEFAULT_CONFIG_PATH}"))?,
        ),
        None => None,
    };
    let config_inventory = config.as_ref().map(|c| c.policy.inventory.display().to_string());
    let config_dir = config.as_ref().map(|c| c.policy.dir.clone());
    let inventory_of = |given: &Option<String>| -> anyhow::Result<Inventory> {
        let spec = given.clone().or_else(|| args.inventory.clone()).or(config_inventory.clone());
        let Some(spec) = spec else {
            bail!("no inventory: give --inventory (or a config with policy.inventory)")
        };
        read_inventory(&spec)
    };
    let before_inv = inventory_of(&args.from_inventory)?;
    let after_inv = inventory_of(&args.to_inventory)?;
    let before_policies = read_policies(&args.from, config_dir.as_deref()).context("--from")?;
    let after_policies = read_policies(&args.to, config_dir.as_deref()).context("--to")?;
    let default = match args.default.as_deref() {
        Some("allow") => DefaultAction::Allow,
        Some(_) => DefaultAction::Deny,
        None => config.as_ref().map_or(DefaultAction::Deny, |c| c.policy.default),
    };
    let unknown = config.as_ref().map_or(DefaultAction::Deny, |c| c.policy.unknown);
    let opts = CompileOptions { default, unknown, now: SystemTime::now() };
    // One inventory shared when it is the same: the diff then only recomputes the sides
    // of the policies that changed.
    let shared = before_inv == after_inv;
    let after_inv = Arc::new(after_inv);
    let before_inv = if shared { after_inv.clone() } else { Arc::new(before_inv) };
    let arcs = |v: Vec<Policy>| v.into_iter().map(Arc::new).collect();
    let before_set = PolicySet { inventory: before_inv, policies: arcs(before_policies) };
    let after_set = PolicySet { inventory: after_inv, policies: arcs(after_policies) };
    let compile = |set: &PolicySet, what: &str| {
        CompiledPolicy::compile(set, &opts).with_context(|| format!("compiling {what}"))
    };
    let before_c = compile(&before_set, "--from")?;
    let after_c = compile(&after_set, "--to")?;
    let before = Side { set: &before_set, compiled: &before_c };
    let after = Side { set: &after_set, compiled: &after_c };
    let (d, _stats) = diff::diff(before, after);
    let mut report = Report::default();
    let mut reasons: Vec<Option<String>> = vec![None; d.changes.len()];
    for c in d.expand() {
        let i = c.index;
        let reason = reasons[i].get_or_insert_with(|| d.reason(c.class_change, before, after));
        let entry = Entry {
            from: c.from.label().to_string(),
            to: c.to.label().to_string(),
            protocol: c.proto.to_string(),
            ports: ports(c.ports),
            reason: reason.clone(),
        };
        match c.kind {
            ChangeKind::Opened => report.opened.push(entry),
            ChangeKind::Closed => report.closed.push(entry),
        }
    }
    Ok(report)
}

/// `80,443,8000-8100`.
fn ports(ranges: &[(u16, u16)]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
        .collect();
    parts.join(",")
}

fn print(args: &Args, report: &Report) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for (kind, list) in [("opened", &report.opened), ("closed", &report.closed)] {
        for e in list {
            println!("{kind}: {} → {} {}/{}", e.from, e.to, e.ports, e.protocol);
            println!("    {}", e.reason);
        }
    }
    if report.opened.is_empty() && report.closed.is_empty() {
        println!("no reachability change");
    } else {
        println!("{} opened, {} closed", report.opened.len(), report.closed.len());
    }
    Ok(())
}

/// `git:REV[:PATH]` split; `None` for a plain path.
fn git_spec(spec: &str) -> Option<(&str, Option<&str>)> {
    let rest = spec.strip_prefix("git:")?;
    Some(match rest.split_once(':') {
        Some((rev, path)) => (rev, Some(path)),
        None => (rest, None),
    })
}

fn read_inventory(spec: &str) -> anyhow::Result<Inventory> {
    let result = match git_spec(spec) {
        Some((rev, Some(path))) => {
            let bytes = git(&["show", &format!("{rev}:./{path}")])?;
            load::parse_inventory_file(&bytes, Path::new(spec))
        }
        Some((_, None)) => bail!("{spec}: an inventory from git needs a path (git:REV:PATH)"),
        None => load::load_inventory(Path::new(spec)),
    };
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

fn read_policies(spec: &str, config_dir: Option<&Path>) -> anyhow::Result<Vec<Policy>> {
    let Some((rev, path)) = git_spec(spec) else {
        return load::load_policies(Path::new(spec)).map_err(|e| anyhow::anyhow!("{e}"));
    };
    let path = match (path, config_dir) {
        (Some(p), _) => p.to_string(),
        (None, Some(dir)) => dir.display().to_string(),
        (None, None) => bail!("{spec}: no path, and no config to take policy.dir from"),
    };
    // Fails with git's message when the revision or the path does not exist.
    git(&["cat-file", "-e", &format!("{rev}:./{path}")])?;
    let listing = git(&["ls-tree", "-r", "-z", "--name-only", rev, "--", &path])?;
    let mut files: Vec<&str> = listing
        .split(|&b| b == 0)
        .filter_map(|f| std::str::from_utf8(f).ok())
        .filter(|f| is_policy_file(f))
        .collect();
    files.sort_unstable();
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        let bytes = git(&["show", &format!("{rev}:./{f}")])?;
        match load::parse_policy_file(&bytes, Path::new(&format!("{rev}:{f}"))) {
            Ok(p) => policies.extend(p),
            Err(e) => errors.extend(e.0),
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(anyhow::anyhow!("{}", load::LoadErrors(errors)))
    }
}

/// What a directory load reads: `*.yaml`/`*.yml`, nothing hidden, no editor leftovers.
fn is_policy_file(path: &str) -> bool {
    let mut parts = path.split('/');
    let name = parts.next_back().unwrap_or_default();
    let hidden_dir =
        path.split('/').rev().skip(1).any(|c| c.starts_with('.') && c != "." && c != "..");
    !hidden_dir
        && !name.starts_with('.')
        && !name.ends_with('~')
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Runs git in the working directory; its stdout, or its stderr as the error.
fn git(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("git").args(args).output().context("running git")?;
    if !out.status.success() {
        bail!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}
