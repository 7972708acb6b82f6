//! `flowgate test` as CI runs it: the real binary on the bundled config/tests.yaml, on
//! case files with a wrong expectation, and on broken case files.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn flowgate_test(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("test")
        .args(args)
        .current_dir(root())
        .output()
        .expect("the flowgate binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write case file");
    p.to_string_lossy().into_owned()
}

const TIERS: [&str; 4] = [
    "--policies",
    "tests/fixtures/tiers/policies",
    "--inventory",
    "tests/fixtures/tiers/inventory.yaml",
];

#[test]
fn bundled_cases_pass() {
    let (code, out, err) = flowgate_test(&["config/tests.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    let last = out.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed"), "{out}");
    let passed: usize = last.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(passed >= 30, "{out}");
    assert_eq!(out.lines().count(), 1, "no line for passing cases: {out}");
}

#[test]
fn a_wrong_expectation_fails_and_names_the_case() {
    let text = std::fs::read_to_string(root().join("config/tests.yaml")).expect("read");
    let total = text.matches("expect:").count();
    // Flip the expectation of one named case.
    let needle = "  - name: checkout (same namespace, other label) may not reach the DB\n    from: payments/checkout\n    to: data/payments-db\n    port: 5432\n    expect: deny";
    assert!(text.contains(needle), "the bundled case file changed; update this test");
    let flipped = text.replace(needle, &needle.replace("expect: deny", "expect: allow"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(tmp.path(), "cases.yaml", &flipped);
    let (code, out, err) = flowgate_test(&[&file]);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("FAIL checkout (same namespace, other label) may not reach the DB: expected allow, got deny"),
        "{out}"
    );
    assert!(lines[0].contains("egress: not-admitted"), "{out}");
    assert_eq!(lines[1], format!("{} passed, 1 failed", total - 1));
}

#[test]
fn an_unnamed_failing_case_is_named_by_its_flow() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "cases.yaml",
        "cases:\n  - from: ops/tool\n    to: shop/api\n    port: http\n    expect: allow\n  - from: ops/tool\n    to: shop/api\n    port: http\n    expect: deny\n",
    );
    let (code, out, err) = flowgate_test(&[&[file.as_str()][..], &TIERS].concat());
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("FAIL ops/tool→shop/api:http: expected allow, got deny"), "{out}");
    assert!(out.ends_with("1 passed, 1 failed\n"), "{out}");
}

#[test]
fn json_gives_per_case_results() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "cases.yaml",
        "cases:\n  - name: pass then NP admits\n    from: shop/web\n    to: shop/api\n    port: http\n    expect: allow\n  - name: baseline denies\n    from: ops/tool\n    to: ops/free\n    port: 22\n    protocol: UDP\n    expect: deny\n",
    );
    let args = [&[file.as_str(), "--json", "--default", "allow"][..], &TIERS].concat();
    let (code, out, err) = flowgate_test(&args);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["passed"], 2);
    assert_eq!(v["failed"], 0);
    let cases = v["cases"].as_array().expect("cases");
    assert_eq!(cases[0]["name"], "pass then NP admits");
    assert_eq!(cases[0]["port"], 9090, "named port resolved on shop/api");
    assert_eq!(cases[0]["got"], "allow");
    assert_eq!(cases[1]["protocol"], "UDP");
    assert_eq!(cases[1]["got"], "deny");
    assert_eq!(cases[1]["reason"], "baseline-deny");
    assert_eq!(cases[1]["passed"], true);
    // The same file under the default deny: the first case fails.
    let args = [&[file.as_str(), "--json"][..], &TIERS].concat();
    let (code, out, _) = flowgate_test(&args);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["failed"], 1);
    assert_eq!(v["cases"][0]["passed"], false);
}

#[test]
fn bad_case_files_name_the_case_and_run_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, &[&str])] = &[
        (
            "cases:\n  - name: ghost\n    from: shop/ghost\n    to: shop/api\n    port: 80\n    expect: allow\n",
            &["case #1 (ghost)", "no workload shop/ghost"],
        ),
        (
            "cases:\n  - name: fine\n    from: shop/web\n    to: shop/api\n    port: 80\n    expect: deny\n  - name: unsure\n    from: shop/web\n    to: shop/api\n    port: 80\n    expect: maybe\n",
            &["case #2 (unsure)", "expect", "\"maybe\""],
        ),
        (
            "cases:\n  - name: no such port\n    from: shop/web\n    to: shop/api\n    port: postgres\n    expect: deny\n",
            &["case #1 (no such port)", "no TCP port named \"postgres\""],
        ),
        (
            "cases:\n  - from: shop/web\n    to: ops/tool\n    port: http\n    expect: deny\n",
            &["case #1 (shop/web→ops/tool:http)", "port named \"http\""],
        ),
        (
            "cases:\n  - {from: shop/web, to: shop/api, port: 80, expect: deny, protocl: UDP}\n",
            &["case #1", "protocl"],
        ),
        ("cases: [\n", &["malformed YAML"]),
        ("tests: []\n", &["cases"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let file = write(tmp.path(), &format!("bad{i}.yaml"), text);
        let (code, out, err) = flowgate_test(&[&[file.as_str()][..], &TIERS].concat());
        assert_eq!(code, 1, "{text}: {out}{err}");
        assert!(out.is_empty(), "no case may run: {out}");
        for n in *needles {
            assert!(err.contains(n), "{text}: expected {n:?} in {err}");
        }
        assert!(err.contains(&file), "the file is named: {err}");
    }
    // A missing file.
    let (code, _, err) = flowgate_test(&["/nonexistent/cases.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/cases.yaml"), "{err}");
}

/// Issue 27: the deny-all written with `policyTypes: []` isolates every pod in `x` for
/// ingress (and nothing else). `--default allow`, so only the policy can deny.
#[test]
fn empty_policy_types_deny_all_isolates_the_namespace() {
    let args = [
        "tests/fixtures/issue27/cases.yaml",
        "--json",
        "--default",
        "allow",
        "--policies",
        "tests/fixtures/issue27/policies",
        "--inventory",
        "tests/fixtures/issue27/inventory.yaml",
    ];
    let (code, out, err) = flowgate_test(&args);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["failed"], 0, "{v}");
    let cases = v["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 5, "{v}");
    for case in &cases[..4] {
        assert_eq!(case["got"], "deny", "{case}");
        assert_eq!(case["reason"], "not-admitted", "{case}");
        assert_eq!(case["direction"], "ingress", "{case}");
    }
    assert_eq!(cases[4]["got"], "allow", "egress from x is untouched: {}", cases[4]);
}
