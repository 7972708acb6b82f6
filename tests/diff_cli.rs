//! `flowgate diff` as a user runs it: the real binary on the bundled config (the README's
//! example: removing the demo's policies closes demo-client → demo-web 8081/TCP), on git
//! revisions of a temporary repository (read without touching its work tree), `--json`,
//! `--fail-on` and bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `flowgate diff ARGS` in `dir`: (exit code, stdout, stderr).
fn diff_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("diff")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the flowgate binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The bundled policies without the demo's file.
fn without_demo() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&root().join("config/policies"), tmp.path());
    std::fs::remove_file(tmp.path().join("edge/demo.yaml")).unwrap();
    tmp
}

const DEMO_CLOSED: &str = "closed: edge/demo-client → edge/demo-web 8081/TCP";

#[test]
fn removing_the_demo_policies_closes_the_demo_flow() {
    let tmp = without_demo();
    let to = tmp.path().to_str().unwrap();
    let (code, out, err) = diff_in(&root(), &["--from", "config/policies", "--to", to]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l == DEMO_CLOSED), "{out}");
    // The reason names the rules that allowed it before and what denies it now.
    assert!(out.contains("NetworkPolicy edge/demo-client-egress egress[0]"), "{out}");
    assert!(out.contains("now: denied"), "{out}");
    assert!(!out.contains("opened:"), "removing allow rules opens nothing: {out}");
    // The other direction opens exactly what this closed.
    let (code, back, err) = diff_in(&root(), &["--from", to, "--to", "config/policies"]);
    assert_eq!(code, 0, "{err}");
    assert!(back.lines().any(|l| l == DEMO_CLOSED.replace("closed:", "opened:")), "{back}");
    assert!(!back.contains("closed:"), "{back}");
    // README shows this very command and line.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains("flowgate diff --from config/policies --to"),
        "README lacks the example"
    );
    assert!(readme.contains(DEMO_CLOSED), "README lacks the example's output");
}

#[test]
fn same_policy_is_no_change_and_json_has_every_field() {
    let (code, out, err) =
        diff_in(&root(), &["--from", "config/policies", "--to", "config/policies"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "no reachability change");
    let tmp = without_demo();
    let (code, out, err) = diff_in(
        &root(),
        &["--from", "config/policies", "--to", tmp.path().to_str().unwrap(), "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["opened"], Value::Array(vec![]));
    let closed = v["closed"].as_array().unwrap();
    assert!(!closed.is_empty());
    for e in closed {
        for field in ["from", "to", "protocol", "ports", "reason"] {
            assert!(e[field].is_string(), "{field} missing in {e}");
        }
    }
    assert!(closed.iter().any(|e| e["from"] == "edge/demo-client"
        && e["to"] == "edge/demo-web"
        && e["ports"] == "8081"
        && e["protocol"] == "TCP"));
}

#[test]
fn fail_on_says_whether_a_change_of_that_kind_exists() {
    let tmp = without_demo();
    let to = tmp.path().to_str().unwrap();
    let run = |kind: &str| {
        diff_in(&root(), &["--from", "config/policies", "--to", to, "--fail-on", kind]).0
    };
    assert_eq!(run("closed"), 3);
    assert_eq!(run("any"), 3);
    assert_eq!(run("opened"), 0);
}

#[test]
fn bad_input_exits_1() {
    let (code, _, err) = diff_in(&root(), &["--from", "config/policies", "--to", "no/such/dir"]);
    assert_eq!(code, 1);
    assert!(err.contains("no/such/dir"), "{err}");
    let (code, _, err) =
        diff_in(&root(), &["--from", "git:no-such-rev:config/policies", "--to", "config/policies"]);
    assert_eq!(code, 1);
    assert!(err.contains("no-such-rev"), "{err}");
    let (code, _, _) = diff_in(
        &root(),
        &["--from", "config/policies", "--to", "config/policies", "--fail-on", "both"],
    );
    assert_ne!(code, 0);
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t.invalid"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn git_revisions_are_read_without_touching_the_work_tree() {
    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path();
    git(dir, &["init", "-q"]);
    copy_dir(&root().join("config/policies"), &dir.join("policies"));
    std::fs::copy(root().join("config/inventory.yaml"), dir.join("inventory.yaml")).unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "all"]);
    git(dir, &["rm", "-q", "policies/edge/demo.yaml"]);
    git(dir, &["commit", "-qm", "no demo"]);
    // An uncommitted edit in the work tree must neither be read nor be touched.
    std::fs::write(dir.join("policies/scratch.yaml"), "not: [valid").unwrap();
    let before = git(dir, &["status", "--porcelain"]);
    let (code, out, err) = diff_in(
        dir,
        &[
            "--from",
            "git:HEAD~1:policies",
            "--to",
            "git:HEAD:policies",
            "--inventory",
            "inventory.yaml",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l == DEMO_CLOSED), "{out}");
    // The inventory may come from git too.
    let (code, out, err) = diff_in(
        dir,
        &[
            "--from",
            "git:HEAD~1:policies",
            "--to",
            "git:HEAD:policies",
            "--inventory",
            "git:HEAD:inventory.yaml",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l == DEMO_CLOSED), "{out}");
    // From a subdirectory, paths are relative to it.
    let (code, out, err) = diff_in(
        &dir.join("policies"),
        &["--from", "git:HEAD~1:.", "--to", "git:HEAD:.", "--inventory", "../inventory.yaml"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l == DEMO_CLOSED), "{out}");
    assert_eq!(git(dir, &["status", "--porcelain"]), before, "work tree changed");
    assert!(dir.join("policies/scratch.yaml").exists());
}

/// The README's "Policy review" commands, run as written (with `sh`, `flowgate` on PATH,
/// from the crate root): each exits 0, and the outputs the README quotes appear.
#[test]
fn readme_policy_review_commands_run_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("## Policy review")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Policy review section");
    let mut lines = Vec::new();
    let mut in_sh = false;
    for l in section.lines() {
        let t = l.trim();
        if in_sh {
            if t.starts_with("```") {
                in_sh = false;
            } else if !t.is_empty() && !t.starts_with('#') {
                lines.push(t.to_string());
            }
        } else if t == "```sh" {
            in_sh = true;
        }
    }
    assert!(lines.iter().any(|l| l.starts_with("flowgate generate")), "{lines:?}");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_flowgate"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut all = String::new();
    for line in &lines {
        let out = Command::new("sh")
            .args(["-c", line])
            .env("PATH", &path)
            .current_dir(root())
            .output()
            .expect("sh runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{line}: {text}{}", String::from_utf8_lossy(&out.stderr));
        all.push_str(&text);
    }
    assert!(all.lines().any(|l| l == DEMO_CLOSED), "{all}");
    assert!(all.lines().any(|l| l == "opened: 127.0.0.3/32 → edge/demo-web 8081/TCP"), "{all}");
}
