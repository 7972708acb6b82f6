//! `loadtest/run`, the one command behind BENCHMARKS.md's table and charts (issue 22), in a
//! smoke run: two cheap criterion scenarios with `--quick` (dev build, short measurements)
//! against a copy of BENCHMARKS.md, checking that the table rows between the markers and
//! an SVG chart come out, and that the text outside the markers is kept.
//!
//! It builds the runner and the two benches in the dev profile on first use (tens of
//! seconds on a loaded machine); the runs themselves take a few seconds.

use std::path::Path;
use std::process::Command;

#[test]
fn quick_run_writes_the_table_rows_and_a_chart() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("BENCHMARKS.md");
    let charts = dir.path().join("bench");
    let original = std::fs::read_to_string(root.join("BENCHMARKS.md")).unwrap();
    std::fs::write(&out, &original).unwrap();

    let run = Command::new(root.join("loadtest/run"))
        .args(["--quick", "--no-setup", "--only", "wire,admit", "--out"])
        .arg(&out)
        .arg("--charts")
        .arg(&charts)
        .current_dir(root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "loadtest/run failed: {}\n{stderr}", run.status);

    let doc = std::fs::read_to_string(&out).unwrap();
    let (start, end) = ("<!-- loadtest/run:table -->", "<!-- /loadtest/run:table -->");
    let table = &doc[doc.find(start).expect("table marker")..doc.find(end).expect("end marker")];
    let rows: Vec<&str> =
        table.lines().filter(|l| l.starts_with("| ") && !l.contains("---")).collect();
    for (capability, peer) in [
        ("HTTP CONNECT head parse", "httparse"),
        ("TLS ClientHello SNI peek", "tls-parser"),
        ("`admit` deny", ""),
        ("`admit` allow", ""),
    ] {
        let row = rows
            .iter()
            .find(|r| r.contains(capability))
            .unwrap_or_else(|| panic!("no row for {capability:?} in\n{table}\n{stderr}"));
        // capability, target, result, peer, ratio, met?, command, machine, date: 9 cells.
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 9, "{row}");
        assert!(cells[2].ends_with(" ns") || cells[2].ends_with(" µs"), "result: {row}");
        assert!(cells[3].contains(peer), "peer: {row}");
        if !peer.is_empty() {
            assert!(cells[4].ends_with('×'), "ratio: {row}");
        }
        assert!(cells[6].contains("loadtest/run --quick --only"), "command: {row}");
        assert!(cells[7].contains("CPUs"), "machine: {row}");
    }
    // The chart of ratios is there, is an SVG, and the markdown links it.
    let svg = std::fs::read_to_string(charts.join("ratios.svg")).expect("ratios.svg drawn");
    assert!(
        svg.starts_with("<svg") && svg.contains("flowgate / peer"),
        "{}",
        &svg[..svg.len().min(300)]
    );
    assert!(doc.contains("ratios.svg)"), "chart not linked");
    // Outside the markers, the document is as it was.
    let before = &original[..original.find(start).unwrap_or(0)];
    assert!(doc.starts_with(before));
    let tail = original.lines().last().unwrap_or_default();
    assert!(doc.trim_end().ends_with(tail.trim_end()), "the end of the document changed");
    // The results store beside the charts holds the rows for the next run to merge with.
    let store = std::fs::read_to_string(charts.join("results.json")).unwrap();
    assert!(store.contains("\"scenario\": \"wire\"") && store.contains("\"scenario\": \"admit\""));
}

/// The loadtest crate's lock is the root's, pruned: every package it pins is pinned by the
/// root lock at the same version, so a build sharing target/ reuses the root's compiled
/// dependencies instead of compiling a second set (loadtest/Cargo.toml says how to
/// regenerate it).
#[test]
fn the_loadtest_lock_pins_the_root_versions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let packages = |file: &str| -> Vec<(String, String)> {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        text.split("[[package]]")
            .skip(1)
            .filter_map(|p| {
                let field = |k: &str| {
                    p.lines().find_map(|l| {
                        let v = l.strip_prefix(k)?.trim().strip_prefix('=')?;
                        Some(v.trim().trim_matches('"').to_string())
                    })
                };
                Some((field("name")?, field("version")?))
            })
            .collect()
    };
    let main = packages("Cargo.lock");
    let lt = packages("loadtest/Cargo.lock");
    assert!(lt.len() > 10, "{lt:?}");
    let strays: Vec<_> =
        lt.iter().filter(|p| p.0 != "flowgate-loadtest" && !main.contains(p)).collect();
    assert!(
        strays.is_empty(),
        "loadtest/Cargo.lock pins versions the root lock does not: {strays:?}"
    );
}
