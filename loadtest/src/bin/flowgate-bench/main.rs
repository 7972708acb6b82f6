//! The benchmark runner behind `loadtest/run`: one command for BENCHMARKS.md's results table
//! and the charts under docs/bench/.
//!
//! For each scenario selected (all by default, `--only a,b`), it runs the driver — a
//! criterion bench through `cargo bench` (figures read from
//! `target/criterion/**/new/estimates.json`, never scraped from text), an end-to-end
//! driver that prints one JSON line (`{"bench": …}`), or packet_vs_nft's median table —
//! and turns its figures into rows: capability, target, result, peer (same run), ratio,
//! met?, command, machine, date. Rows are kept in `<charts>/results.json`, so a run of
//! some scenarios replaces only their rows; then the table between BENCHMARKS.md's
//! `loadtest/run` markers is rewritten and the charts are redrawn (plotters, SVG, no font
//! files needed: text is left to the viewer).
//!
//! ```text
//! loadtest/run                                   # everything, release build (~1 h with the soak)
//! loadtest/run --only l4,egress                  # some scenarios
//! loadtest/run --skip soak                       # all but some
//! loadtest/run --quick --only wire,admit         # smoke run: short durations, dev build
//! loadtest/run --soak-secs 1800 --only soak
//! loadtest/run --only soak --soak-from FILE      # record a soak run separately (its stdout)
//! loadtest/run --list
//! ```

mod charts;
mod criterion;
mod report;
mod scenarios;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

/// One row of the results table.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Row {
    pub scenario: String,
    pub capability: String,
    pub target: String,
    pub result: String,
    pub peer: String,
    /// flowgate / peer, same run.
    pub ratio: Option<f64>,
    /// Whether the target is met, when the target is a number the runner can check.
    pub met: Option<bool>,
    pub command: String,
    pub machine: String,
    pub date: String,
    pub commit: String,
}

/// What the runner was asked to do.
pub struct Opts {
    pub root: PathBuf,
    pub profile: String,
    pub quick: bool,
    pub only: Option<Vec<String>>,
    pub skip: Vec<String>,
    pub soak_secs: u64,
    pub soak_from: Option<PathBuf>,
    pub out: PathBuf,
    pub charts: PathBuf,
}

impl Opts {
    /// Where cargo puts this profile's binaries and criterion its estimates.
    pub fn target_dir(&self) -> PathBuf {
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| self.root.join("target"), PathBuf::from)
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.target_dir().join(if self.profile == "dev" { "debug" } else { &self.profile })
    }
}

/// What every row of one run shares.
pub struct RunInfo {
    pub machine: String,
    pub date: String,
    pub commit: String,
}

fn usage() -> &'static str {
    "usage: loadtest/run [--quick] [--only NAME[,NAME]] [--skip NAME[,NAME]] [--soak-secs N] [--soak-from FILE]\n\
     \x20                   [--out BENCHMARKS.md] [--charts DIR] [--profile dev|release] [--no-setup] [--list]"
}

fn parse_args() -> Result<Option<Opts>, String> {
    let mut root = PathBuf::from(".");
    let (mut profile, mut quick, mut only, mut soak_secs) = (None, false, None, None);
    let mut skip = Vec::new();
    let (mut soak_from, mut out, mut charts) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--root" => root = v()?.into(),
            "--profile" => profile = Some(v()?),
            "--quick" => quick = true,
            "--only" => {
                only = Some(v()?.split(',').map(str::trim).map(String::from).collect::<Vec<_>>())
            }
            "--skip" => skip.extend(v()?.split(',').map(str::trim).map(String::from)),
            "--soak-secs" => {
                soak_secs = Some(v()?.parse::<u64>().map_err(|e| format!("--soak-secs: {e}"))?)
            }
            "--soak-from" => soak_from = Some(PathBuf::from(v()?)),
            "--out" => out = Some(PathBuf::from(v()?)),
            "--charts" => charts = Some(PathBuf::from(v()?)),
            // Handled by loadtest/run (the script) before the runner starts.
            "--no-setup" => {}
            "--list" => {
                for s in scenarios::ALL {
                    println!("{:<18} {}", s.name, s.about);
                }
                return Ok(None);
            }
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(None);
            }
            _ => return Err(format!("unknown argument {k}\n{}", usage())),
        }
    }
    for name in only.iter().flatten().chain(&skip) {
        if !scenarios::ALL.iter().any(|s| s.name == name) {
            return Err(format!("no scenario {name:?} (see --list)"));
        }
    }
    let profile = profile.unwrap_or_else(|| if quick { "dev" } else { "release" }.into());
    let out = out.unwrap_or_else(|| root.join("BENCHMARKS.md"));
    let charts = charts.unwrap_or_else(|| root.join("docs/bench"));
    let soak_secs = soak_secs.unwrap_or(if quick { 60 } else { 1800 });
    Ok(Some(Opts { root, profile, quick, only, skip, soak_secs, soak_from, out, charts }))
}

/// "AMD EPYC 7B13, 2 CPUs, 23.5 GiB" from /proc/cpuinfo, nproc and /proc/meminfo.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim()))
        .unwrap_or("unknown CPU");
    let model = model.replace("(R)", "").replace("(TM)", "");
    let model = model.split(" Processor").next().unwrap_or_default().trim().to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().split(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    format!("{model}, {cpus} CPUs, {:.1} GiB", mem_kib / 1024.0 / 1024.0)
}

/// The 1-minute load average, for the machine column: a loaded host slows every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split(' ').next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

fn commit(root: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}+") } else { head }
}

fn utc_now() -> String {
    // `date` keeps a date crate out of the runner.
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn run() -> Result<bool, String> {
    let Some(opts) = parse_args()? else {
        return Ok(true);
    };
    std::fs::create_dir_all(&opts.charts).map_err(|e| format!("{}: {e}", opts.charts.display()))?;
    let store = opts.charts.join("results.json");
    let mut rows: Vec<Row> = match std::fs::read_to_string(&store) {
        Ok(s) => serde_json::from_str(&s).map_err(|e| format!("{}: {e}", store.display()))?,
        Err(_) => Vec::new(),
    };
    let info = RunInfo { machine: machine(), date: utc_now(), commit: commit(&opts.root) };
    eprintln!(
        "loadtest/run: {} at {} ({}), profile {}",
        info.machine, info.commit, info.date, opts.profile
    );
    let mut all_ok = true;
    for s in scenarios::ALL {
        if let Some(only) = &opts.only
            && !only.iter().any(|n| n == s.name)
        {
            continue;
        }
        if opts.skip.iter().any(|n| n == s.name) {
            continue;
        }
        eprintln!("loadtest/run: === {} ({})", s.name, s.about);
        let new = match (s.run)(&opts, &info) {
            Ok(new) => new,
            Err(e) => {
                eprintln!("loadtest/run: {}: FAILED: {e}", s.name);
                all_ok = false;
                vec![Row {
                    scenario: s.name.into(),
                    capability: s.about.into(),
                    result: format!("failed: {}", e.lines().next().unwrap_or_default()),
                    machine: format!("{}, load {}", info.machine, load_average()),
                    date: info.date.clone(),
                    commit: info.commit.clone(),
                    ..Row::default()
                }]
            }
        };
        if new.iter().any(|r| r.result.starts_with("failed")) {
            all_ok = false;
        }
        for r in &new {
            eprintln!(
                "loadtest/run:   {}: {} | peer {} | ratio {}",
                r.capability,
                r.result,
                r.peer,
                r.ratio.map_or("—".into(), |x| format!("{x:.2}"))
            );
        }
        rows.retain(|r| r.scenario != s.name);
        rows.extend(new);
        // Keep what is done so far, in case a later scenario is interrupted.
        let order = |r: &Row| scenarios::ALL.iter().position(|s| s.name == r.scenario);
        rows.sort_by_key(|r| order(r).unwrap_or(usize::MAX));
        let json = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        std::fs::write(&store, json + "\n").map_err(|e| format!("{}: {e}", store.display()))?;
    }
    let drawn = charts::draw_all(&opts, &rows, &info)?;
    report::rewrite(&opts, &rows, &drawn)?;
    eprintln!("loadtest/run: table in {}, charts in {}", opts.out.display(), opts.charts.display());
    Ok(all_ok)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest/run: {e}");
            ExitCode::from(2)
        }
    }
}
