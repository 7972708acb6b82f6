//! `flowgate check` and `flowgate test` on a realistic set (issue 25: `check` ≤ 1 s wall
//! and `test` ≤ 2 µs per case at 10k × 10k). A plain program (`harness = false`): the
//! acceptance is on wall time of the real binary, not on a criterion sample.
//!
//! For each shape (`FLOWGATE_BENCH_REALISTIC=1k,10k,100k`, `+tiers` for 100 ANPs and a
//! BANP; default `10k`) the set is written to a tempdir with `support/realistic.rs`, then:
//! - end to end: the `flowgate` binary's `check` and `test` (10,000 cases and 1 case),
//!   median wall time over `FLOWGATE_BENCH_RUNS` runs (default 5); the per-case figure of
//!   `test` is the difference of the two runs over 9,999 cases, so load and compile cancel;
//! - in process, the same phases one by one (median): load, compile, lint (and lint without
//!   the spelling pass that reads the files), the case file's parse, resolving and deciding
//!   every case.
//!
//! `cargo bench --bench check_test`; numbers on a loaded machine are pessimistic.
//! `FLOWGATE_BIN=path` times another build of the binary end to end (a before/after
//! comparison); `FLOWGATE_BENCH_KEEP=dir` writes the set there and keeps it.

#[path = "support/realistic.rs"]
mod realistic;

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use flowgate::policy::simulate::{self, Case};
use flowgate::policy::{CompileOptions, CompiledPolicy, DefaultAction, lint, load};

const CASES: usize = 10_000;

fn runs() -> usize {
    std::env::var("FLOWGATE_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1)
}

/// Median of `runs` timings of `f`; the last result is returned beside it.
fn median<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let out = f();
        times.push(t.elapsed());
        last = Some(black_box(out));
    }
    times.sort();
    (times[times.len() / 2], last.expect("runs ≥ 1"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the binary in `dir`; the output is checked to be a success (or, for `test`, a
/// clean run of the cases) so a broken command cannot pass for a fast one.
fn flowgate(dir: &Path, args: &[&str]) -> std::process::Output {
    let bin = std::env::var_os("FLOWGATE_BIN")
        .map_or_else(|| env!("CARGO_BIN_EXE_flowgate").into(), std::path::PathBuf::from);
    let out = Command::new(bin)
        .args(args)
        .args(["--policies", "policies", "--inventory", "inventory.yaml"])
        .current_dir(dir)
        .output()
        .expect("the flowgate binary runs");
    assert!(
        out.status.success(),
        "flowgate {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn main() {
    let runs = runs();
    for shape in realistic::Shape::from_env("10k") {
        let label = shape.label();
        let tmp = tempfile::tempdir().expect("tempdir");
        let keep = std::env::var_os("FLOWGATE_BENCH_KEEP").map(std::path::PathBuf::from);
        let dir = keep.as_deref().unwrap_or(tmp.path());
        std::fs::create_dir_all(dir).expect("mkdir");
        realistic::write(dir, &shape);
        std::fs::write(dir.join("cases.yaml"), realistic::cases(&shape, CASES)).expect("write");
        std::fs::write(dir.join("one.yaml"), realistic::cases(&shape, 1)).expect("write");
        let (policies, inventory) = (dir.join("policies"), dir.join("inventory.yaml"));

        // End to end, the figure of the acceptance.
        let (check, out) = median(runs, || flowgate(dir, &["check"]));
        let summary = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let warnings = String::from_utf8_lossy(&out.stderr).lines().count();
        let (test_many, out) = median(runs, || flowgate(dir, &["test", "cases.yaml"]));
        let tested = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let (test_one, _) = median(runs, || flowgate(dir, &["test", "one.yaml"]));
        let per_case = test_many.saturating_sub(test_one).as_secs_f64() * 1e6 / (CASES - 1) as f64;
        println!("{label}: {summary} ({warnings} stderr lines)");
        println!(
            "{label}: flowgate check {:.0} ms wall; flowgate test {CASES} cases {:.0} ms, 1 case \
             {:.0} ms: {per_case:.2} µs per case ({tested}) — median of {runs}",
            ms(check),
            ms(test_many),
            ms(test_one),
        );

        // In process, phase by phase.
        let (t_load, set) =
            median(runs, || load::load(&policies, &inventory).expect("the realistic set loads"));
        let opts = CompileOptions {
            default: DefaultAction::Deny,
            unknown: DefaultAction::Deny,
            now: SystemTime::now(),
        };
        let (t_compile, compiled) =
            median(runs, || CompiledPolicy::compile(&set, &opts).expect("compiles"));
        let now = SystemTime::now();
        let (t_lint, ws) = median(runs, || lint::lint(&set, now));
        let (t_lint_mem, _) = median(runs, || lint::lint_with(&set, now, |_| None));
        println!(
            "{label}: load {:.0} ms, compile {:.0} ms, lint {:.0} ms ({} warnings; without the \
             spelling pass {:.0} ms)",
            ms(t_load),
            ms(t_compile),
            ms(t_lint),
            ws.len(),
            ms(t_lint_mem),
        );

        let text = std::fs::read_to_string(dir.join("cases.yaml")).expect("read");
        let (t_parse, cases) = median(runs, || {
            simulate::parse_cases(&text, Path::new("cases.yaml")).expect("the cases parse")
        });
        let (t_resolve, flows) = median(runs, || resolve_all(&compiled, &cases));
        let (t_decide, allowed) = median(runs, || {
            flows.iter().filter(|f| compiled.decide(&f.query()).verdict.is_allow()).count()
        });
        let us = |d: Duration| d.as_secs_f64() * 1e6 / CASES as f64;
        println!(
            "{label}: test in process, per case: parse {:.2} µs, resolve {:.2} µs, decide {:.2} \
             µs ({allowed} of {CASES} allowed)",
            us(t_parse),
            us(t_resolve),
            us(t_decide),
        );
    }
}

/// As `flowgate test` resolves: the name map built once, then each case through it.
fn resolve_all(compiled: &CompiledPolicy, cases: &[Case]) -> Vec<simulate::SimFlow> {
    let resolver = simulate::Resolver::new(compiled);
    cases.iter().map(|c| c.flow_in(&resolver).expect("every case resolves")).collect()
}
