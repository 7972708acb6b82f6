//! `flowgate diff --from A --to B`: what a policy change does to reachability. A and B are
//! policy directories (or files) or git revisions of one (`git:REV[:PATH]`, read with
//! `git ls-tree` and one `git cat-file --batch`, the work tree untouched); both are read
//! over the inventory (`--inventory`, or `--from-inventory`/`--to-inventory` when it
//! changed too; default: the config's) and compiled with the config's `policy.default`
//! unless `--default` says.
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

use super::check::DefaultArg;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy before the change: a directory or file, or `git:REV[:PATH]`.
    #[arg(long, value_name = "DIR|git:REV[:PATH]")]
    pub from: String,
    /// The policy after the change: a directory or file, or `git:REV[:PATH]`.
    #[arg(long, value_name = "DIR|git:REV[:PATH]")]
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
    // `--default`, applied to both sides.
    #[command(flatten)]
    pub default: DefaultArg,
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
    let inventory_spec = |given: &Option<String>| -> anyhow::Result<String> {
        let spec = given.clone().or_else(|| args.inventory.clone()).or(config_inventory.clone());
        let Some(spec) = spec else {
            bail!("no inventory: give --inventory (or a config with policy.inventory)")
        };
        Ok(spec)
    };
    let (before_spec, after_spec) =
        (inventory_spec(&args.from_inventory)?, inventory_spec(&args.to_inventory)?);
    let before_inv = read_inventory(&before_spec)?;
    // One inventory shared when it is the same: the diff then only recomputes the sides
    // of the policies that changed. One spec is read once.
    let after_inv =
        if after_spec == before_spec { None } else { Some(read_inventory(&after_spec)?) };
    let before_inv = Arc::new(before_inv);
    let after_inv = match after_inv {
        Some(inv) if inv != *before_inv => Arc::new(inv),
        _ => before_inv.clone(),
    };
    let default = args
        .default
        .action()
        .unwrap_or_else(|| config.as_ref().map_or(DefaultAction::Deny, |c| c.policy.default));
    let unknown = config.as_ref().map_or(DefaultAction::Deny, |c| c.policy.unknown);
    let opts = CompileOptions { default, unknown, now: SystemTime::now() };
    // Each side read and compiled on a thread of its own: half the wall time on two cores.
    // Two directories: the files of --to that --from has too, byte for byte, are parsed
    // once (on the --from thread) and copied.
    let dirs = git_spec(&args.from).is_none()
        && git_spec(&args.to).is_none()
        && Path::new(&args.from).is_dir()
        && Path::new(&args.to).is_dir();
    let compile = |policies: Vec<Policy>, inventory: Arc<Inventory>, what: &str| {
        let set = PolicySet { inventory, policies: policies.into_iter().map(Arc::new).collect() };
        let compiled =
            CompiledPolicy::compile(&set, &opts).with_context(|| format!("compiling {what}"))?;
        anyhow::Ok((set, compiled))
    };
    let config_dir = config_dir.as_deref();
    let (before_side, after_side) = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Policy>>();
        let from = scope.spawn(move || {
            let policies = read_policies(&args.from, config_dir).context("--from")?;
            if dirs {
                // The --to thread takes what it shares; a closed channel only means it
                // did not need it.
                let _ = tx.send(policies.clone());
            }
            compile(policies, before_inv, "--from")
        });
        let to = if dirs {
            read_dir_sharing(Path::new(&args.from), Path::new(&args.to), rx)
        } else {
            read_policies(&args.to, config_dir)
        };
        let to = to.context("--to").and_then(|p| compile(p, after_inv, "--to"));
        // `side` does not panic on input; a panic is a bug: pass it on.
        (from.join().unwrap_or_else(|e| std::panic::resume_unwind(e)), to)
    });
    let (before_set, before_c) = before_side?;
    let (after_set, after_c) = after_side?;
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
    let names: Vec<String> = files.iter().map(|f| format!("{rev}:./{f}")).collect();
    let blobs = git_blobs(&names)?;
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for (f, bytes) in files.into_iter().zip(blobs) {
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

/// The policies of directory `to` as [`load::load_policies`] reads them, but a file that
/// `from` holds at the same relative path with the same bytes is not parsed again: its
/// policies are taken from `from`'s (sent on `from_policies` once parsed) with their
/// source set to the file in `to`. A file's policies depend on its path and bytes alone.
/// Any problem reading `to` falls back to the plain load, for its exact errors.
fn read_dir_sharing(
    from: &Path,
    to: &Path,
    from_policies: std::sync::mpsc::Receiver<Vec<Policy>>,
) -> anyhow::Result<Vec<Policy>> {
    let plain = || load::load_policies(to).map_err(|e| anyhow::anyhow!("{e}"));
    let mut walk_errors = Vec::new();
    let files = load::policy_files(to, &mut walk_errors);
    if !walk_errors.is_empty() {
        return plain();
    }
    // Per file of `to`: its policies, or the file of `from` it is a copy of.
    enum Read {
        Parsed(Vec<Policy>),
        Same(PathBuf),
    }
    let mut read = Vec::with_capacity(files.len());
    let mut errors = Vec::new();
    for file in &files {
        let Ok(bytes) = std::fs::read(file) else { return plain() };
        let twin = file.strip_prefix(to).ok().map(|rel| from.join(rel));
        if let Some(twin) = twin
            && std::fs::read(&twin).is_ok_and(|b| b == bytes)
        {
            read.push(Read::Same(twin));
            continue;
        }
        match load::parse_policy_file(&bytes, file) {
            Ok(p) => read.push(Read::Parsed(p)),
            Err(e) => errors.extend(e.0),
        }
    }
    if !errors.is_empty() {
        return Err(anyhow::anyhow!("{}", load::LoadErrors(errors)));
    }
    let mut by_source: std::collections::HashMap<PathBuf, Vec<Policy>> =
        std::collections::HashMap::new();
    if read.iter().any(|r| matches!(r, Read::Same(_))) {
        // `from` failed to load when nothing arrives: then so does the diff, on its error.
        let Ok(parsed) = from_policies.recv() else { return plain() };
        for p in parsed {
            by_source.entry(p.source.clone()).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    for (file, r) in files.iter().zip(read) {
        match r {
            Read::Parsed(p) => out.extend(p),
            Read::Same(twin) => match by_source.remove(&twin) {
                Some(policies) => out.extend(policies.into_iter().map(|mut p| {
                    p.source = file.clone();
                    p
                })),
                // No policy came from the twin (an empty file): parse this one.
                None => {
                    let bytes = std::fs::read(file).with_context(|| file.display().to_string())?;
                    out.extend(
                        load::parse_policy_file(&bytes, file)
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                    );
                }
            },
        }
    }
    Ok(out)
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

/// The contents of the blobs `names` (`REV:./PATH`), in order, read through one
/// `git cat-file --batch` process instead of one `git show` each (10,000 processes were
/// most of a diff against a revision). A name the batch protocol cannot carry (a line
/// break in it) is read with `git show`.
fn git_blobs(names: &[String]) -> anyhow::Result<Vec<Vec<u8>>> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let batch: Vec<&String> = names.iter().filter(|n| !n.contains('\n')).collect();
    let mut read: std::collections::HashMap<&str, Vec<u8>> = std::collections::HashMap::new();
    if !batch.is_empty() {
        let mut child = Command::new("git")
            .args(["cat-file", "--batch"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running git cat-file --batch")?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("git cat-file --batch: no pipes");
        };
        let blobs = std::thread::scope(|s| {
            // Written from a thread of its own: git answers while it reads, and a full
            // pipe each way would otherwise stop both.
            let names = &batch;
            let writer = s.spawn(move || -> std::io::Result<()> {
                let mut w = std::io::BufWriter::new(&mut stdin);
                for n in names {
                    writeln!(w, "{n}")?;
                }
                w.flush()
            });
            let mut out = BufReader::new(stdout);
            let mut blobs = Vec::with_capacity(batch.len());
            let mut header = String::new();
            for n in &batch {
                header.clear();
                out.read_line(&mut header)?;
                // `<oid> blob <size>`, or `<name> missing` / `ambiguous`.
                let size = match header.trim_end().rsplit_once(' ') {
                    Some((head, size)) if head.ends_with(" blob") => size.parse::<usize>().ok(),
                    _ => None,
                };
                let Some(size) = size else {
                    bail!("git cat-file: {n}: {}", header.trim_end());
                };
                let mut bytes = vec![0; size + 1];
                out.read_exact(&mut bytes)?;
                bytes.pop(); // the line break after the contents
                blobs.push((n.as_str(), bytes));
            }
            writer.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
            anyhow::Ok(blobs)
        });
        let status = child.wait().context("git cat-file --batch")?;
        let blobs = blobs?;
        if !status.success() {
            bail!("git cat-file --batch exited with {status}");
        }
        read.extend(blobs);
    }
    names
        .iter()
        .map(|n| match read.remove(n.as_str()) {
            Some(bytes) => Ok(bytes),
            None => git(&["show", n]),
        })
        .collect()
}

/// Runs git in the working directory; its stdout, or its stderr as the error.
fn git(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("git").args(args).output().context("running git")?;
    if !out.status.success() {
        bail!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}
