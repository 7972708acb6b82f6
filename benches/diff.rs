//! `flowgate diff` at scale (issue 23's targets), on the realistic GitOps-shaped sets of
//! benches/support/realistic.rs written to disk:
//! - `diff/one-change/10k`: one app policy removed from the 10k set (10,302
//!   NetworkPolicies over 10,002 workloads); target ≤ 1 s;
//! - `diff/unrelated/1k`: the 1k set against an unrelated one over the same inventory
//!   (every app policy wired to other apps: the app names in its text permuted); target
//!   ≤ 5 s.
//!
//! Each is timed as the user sees it: the real binary, `flowgate diff --from A --to B
//! --inventory I --json` (load, compile both sides, diff, explain every change, print).
//! The `diff-only` variants time `policy::diff` alone on the loaded and compiled sets, to
//! profile the library.
//!
//! `cargo bench --bench diff`

#[path = "support/realistic.rs"]
mod realistic;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::policy::diff::{self, Side};
use flowgate::policy::ir::PolicySet;
use flowgate::policy::{CompileOptions, CompiledPolicy, DefaultAction, load};
use realistic::Shape;

/// Two policy directories and an inventory on disk.
struct Case {
    _dir: tempfile::TempDir,
    from: PathBuf,
    to: PathBuf,
    inventory: PathBuf,
}

/// The app policy of `(n, a)` with every app name in its text moved to another app: the
/// same shapes, wired to other workloads.
fn rewired(shape: &Shape, n: usize, a: usize) -> String {
    let text = realistic::app_policy(shape, n, a, 0);
    let apps = shape.apps;
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let word_end =
            rest.find(|c: char| !c.is_ascii_alphanumeric() && c != '-').unwrap_or(rest.len());
        let word_end =
            if word_end == 0 { rest.chars().next().map_or(1, char::len_utf8) } else { word_end };
        let (word, tail) = rest.split_at(word_end);
        let index = ["web", "svc", "db"].iter().find_map(|p| {
            let digits = word.strip_prefix(p)?;
            (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| digits.parse::<usize>().ok())
                .flatten()
        });
        match index {
            Some(i) => out.push_str(&realistic::app_name((i * 37 + 11) % apps)),
            None => out.push_str(word),
        }
        rest = tail;
    }
    out
}

/// The realistic set of `shape` written twice, under `a/` and `b/`.
fn two_copies(shape: &Shape) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for root in [&a, &b] {
        std::fs::create_dir_all(root).expect("mkdir");
        realistic::write(root, shape);
    }
    (dir, a, b)
}

fn one_change() -> Case {
    let shape = Shape::by_label("10k").expect("10k shape");
    let (dir, a, b) = two_copies(&shape);
    // The change: one backend's policy removed (its namespace's default deny still
    // isolates it, so what that policy allowed closes).
    std::fs::remove_file(realistic::app_file(&b.join("policies"), 0, 1)).expect("remove");
    Case {
        from: a.join("policies"),
        to: b.join("policies"),
        inventory: a.join("inventory.yaml"),
        _dir: dir,
    }
}

fn unrelated() -> Case {
    let shape = Shape::by_label("1k").expect("1k shape");
    let (dir, a, b) = two_copies(&shape);
    let policies = b.join("policies");
    for n in 0..shape.namespaces {
        for app in 0..shape.apps {
            std::fs::write(realistic::app_file(&policies, n, app), rewired(&shape, n, app))
                .expect("write");
        }
    }
    Case {
        from: a.join("policies"),
        to: b.join("policies"),
        inventory: a.join("inventory.yaml"),
        _dir: dir,
    }
}

/// `flowgate diff` end to end; its exit status checked, its output discarded.
fn run_binary(case: &Case) {
    let status = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("diff")
        .arg("--from")
        .arg(&case.from)
        .arg("--to")
        .arg(&case.to)
        .arg("--inventory")
        .arg(&case.inventory)
        .args(["--default", "deny", "--json"])
        .stdout(Stdio::null())
        .status()
        .expect("flowgate runs");
    assert!(status.success(), "flowgate diff failed: {status}");
}

/// Both sides loaded and compiled, as the CLI does.
fn load_and_compile(case: &Case) -> [(PolicySet, CompiledPolicy); 2] {
    let inventory = Arc::new(load::load_inventory(&case.inventory).expect("inventory loads"));
    let opts = CompileOptions {
        default: DefaultAction::Deny,
        unknown: DefaultAction::Deny,
        now: SystemTime::now(),
    };
    [&case.from, &case.to].map(|dir: &PathBuf| {
        let policies = load::load_policies(Path::new(dir)).expect("policies load");
        let set = PolicySet {
            inventory: inventory.clone(),
            policies: policies.into_iter().map(Arc::new).collect(),
        };
        let compiled = CompiledPolicy::compile(&set, &opts).expect("compiles");
        (set, compiled)
    })
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("diff");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for (name, case) in [("one-change/10k", one_change()), ("unrelated/1k", unrelated())] {
        let [(sb, cb), (sa, ca)] = load_and_compile(&case);
        let (before, after) = (Side { set: &sb, compiled: &cb }, Side { set: &sa, compiled: &ca });
        let (d, stats) = diff::diff(before, after);
        eprintln!(
            "{name}: {} class changes, {} endpoint changes; {stats:?}",
            d.changes.len(),
            d.expand().len()
        );
        g.bench_function(name, |b| b.iter(|| run_binary(&case)));
        g.bench_function(format!("{name}/diff-only"), |b| {
            b.iter(|| diff::diff(before, after).0.changes.len())
        });
    }
    g.finish();
}

criterion_group!(diff_benches, benches);
criterion_main!(diff_benches);
