//! The README's newcomer path, run as written: the commands are read from README.md's
//! ```sh blocks, not copied here, so a README edit that breaks them fails this test.
//!
//! The offline commands (`check`, `explain`, `test`) run from the repository's root on the
//! bundled config itself. The gateway runs on a copy of the bundled `config/` whose fixed
//! ports are moved (admin API and `demo` on port 0, the echo upstream on a free port), so
//! this passes while the README's own gateway runs on 8080/9901; the commands that talk to
//! it run from the copy's root, where `config/flowgate.toml` is the default config. Every
//! command runs with `sh`, `flowgate` on `PATH`. The only edits are the ones the moved
//! ports force: the demo's `nc` lines get the `demo` listener's real port instead of 8080,
//! and the copy's `admin.bind` is set to the admin API's real address once the gateway
//! printed it (the running gateway does not re-read its config; `status`, `reload` and
//! `quarantine` read it to find the API).
//!
//! What README.md must contain (in ```sh blocks), found by these prefixes:
//! - `export FLOWGATE_ADMIN_TOKEN=…` before the gateway runs: the bundled config reads the
//!   admin token from that variable (`admin.token_env`), the CLI too;
//! - `cargo run --release -- run` (replaced here by the built binary on the copy);
//! - `printf 'hello\n' | nc … 127.0.0.1 8080` (allowed: echoed) and the same with
//!   `-s 127.0.0.3` (denied: reset, a `deny` line in the flow log on stdout);
//! - `flowgate status`, `flowgate reload`, `flowgate quarantine …`, `flowgate check`,
//!   `flowgate explain …` (each), `flowgate test config/tests.yaml`: each exits 0.
//!
//! Lines that set up the machine (`cargo`, `scripts/`, `nft`, `curl` through an egress
//! listener the bundled config does not enable) are not run.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::process::{ADMIN_TOKEN_ENV, BundledCopy, Flowgate};
use support::require::{Need, skip_unless};

/// Every line of README.md's ```sh blocks, in order, trimmed.
fn readme_sh_lines() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let mut lines = Vec::new();
    let mut in_sh = false;
    for l in text.lines() {
        let t = l.trim();
        if in_sh {
            if t.starts_with("```") {
                in_sh = false;
            } else if !t.is_empty() && !t.starts_with('#') {
                lines.push(t.to_string());
            }
        } else if t == "```sh" || t == "```bash" || t == "```shell" {
            in_sh = true;
        }
    }
    lines
}

/// The README's command lines that start with `prefix`; fails naming what README lacks.
fn readme_commands(lines: &[String], prefix: &str) -> Vec<String> {
    let found: Vec<String> = lines.iter().filter(|l| l.starts_with(prefix)).cloned().collect();
    assert!(!found.is_empty(), "README.md has no ```sh line starting with `{prefix}`");
    found
}

/// The token the README's `export FLOWGATE_ADMIN_TOKEN=…` line sets, evaluated by `sh` as
/// the reader's shell would (it may be a literal or a command substitution).
fn readme_token(lines: &[String]) -> String {
    let export = format!("export {ADMIN_TOKEN_ENV}=");
    let line = lines.iter().find(|l| l.starts_with(&export)).unwrap_or_else(|| {
        panic!(
            "README.md has no ```sh line `{export}…`: the bundled config reads the admin token \
             from {ADMIN_TOKEN_ENV}, and a reader who does not set it gets 401 from \
             `flowgate reload` / `flowgate quarantine`"
        )
    });
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{line}\nprintf %s \"${ADMIN_TOKEN_ENV}\""))
        .output()
        .unwrap();
    assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(!token.trim().is_empty(), "`{line}` sets an empty token");
    token
}

/// Runs one README command with `sh` in `root`, `flowgate` on PATH and the token in the
/// environment; bounded.
fn sh(root: &Path, token: Option<&str>, line: &str) -> Output {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_flowgate")).parent().unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin_dir.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(line)
        .current_dir(root)
        .env("PATH", std::env::join_paths(dirs).unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match token {
        Some(t) => cmd.env(ADMIN_TOKEN_ENV, t),
        None => cmd.env_remove(ADMIN_TOKEN_ENV),
    };
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`{line}` did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// [`sh`], expecting exit 0; returns stdout.
fn sh_ok(root: &Path, token: Option<&str>, line: &str) -> String {
    let out = sh(root, token, line);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "`{line}` failed ({}):\n{stdout}{stderr}", out.status);
    stdout.into_owned()
}

/// A README demo line with the demo listener's real address instead of 127.0.0.1:8080.
fn with_demo_port(line: &str, demo: SocketAddr) -> String {
    let written = "127.0.0.1 8080";
    assert!(line.contains(written), "the README demo line `{line}` no longer dials `{written}`");
    line.replace(written, &format!("{} {}", demo.ip(), demo.port()))
}

/// The next flow-log line on the gateway's stdout for which `pred` holds (bounded).
fn wait_flow_log(
    fg: &mut Flowgate,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = fg.next_stdout(left).expect("the flow-log line on the gateway's stdout");
        let v: serde_json::Value = serde_json::from_str(&line).expect("stdout is JSON lines");
        if pred(&v) {
            return v;
        }
    }
}

/// "Running the gateway" and "Checking policy as code": the demo's allowed and denied
/// connections, `flowgate status`, and the offline commands `check`, `explain`, `test`.
#[test]
fn readme_demo_and_policy_commands_work_as_written() {
    if skip_unless(&[Need::Bin("nc")]) {
        return;
    }
    let lines = readme_sh_lines();
    readme_commands(&lines, "cargo run --release -- run");
    // The gateway's token does not matter to these commands; the README's own is used
    // when it gives one.
    let export = format!("export {ADMIN_TOKEN_ENV}=");
    let token = if lines.iter().any(|l| l.starts_with(&export)) {
        readme_token(&lines)
    } else {
        "t".into()
    };
    let copy = BundledCopy::new();
    let mut fg = copy.run(&token);
    let demo = fg.listener("demo");
    copy.point_cli_at_admin(fg.admin());
    let root = copy.root();

    let demo_lines: Vec<String> = readme_commands(&lines, "printf 'hello\\n' | nc ");
    let allowed = demo_lines.iter().find(|l| !l.contains(" -s ")).expect("the allowed demo line");
    let denied =
        demo_lines.iter().find(|l| l.contains(" -s 127.0.0.3 ")).expect("the denied demo line");
    let echoed = sh_ok(root, Some(&token), &with_demo_port(allowed, demo));
    assert_eq!(echoed, "hello\n", "`{allowed}` is echoed back");
    let refused = sh(root, Some(&token), &with_demo_port(denied, demo));
    assert!(refused.stdout.is_empty(), "`{denied}` got an answer: {refused:?}");
    let deny = wait_flow_log(&mut fg, |v| {
        v["event"] == "deny" && v["src"].as_str().is_some_and(|s| s.starts_with("127.0.0.3:"))
    });
    assert_eq!(deny["listener"], "demo", "{deny}");

    for line in readme_commands(&lines, "flowgate status") {
        let out = sh_ok(root, Some(&token), &line);
        assert!(out.contains("generation"), "`{line}`: {out}");
    }
    fg.assert_running();
    drop(fg);

    // The offline commands, on the bundled config itself.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for line in readme_commands(&lines, "flowgate check") {
        let out = sh_ok(repo, None, &line);
        assert!(out.starts_with("ok:"), "`{line}`: {out}");
    }
    for line in readme_commands(&lines, "flowgate explain ") {
        let out = sh_ok(repo, None, &line);
        if line.contains("--json") {
            let v: serde_json::Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("`{line}` prints one JSON object ({e}): {out}"));
            assert!(v["verdict"].is_string(), "`{line}`: {out}");
        } else {
            assert!(out.contains("verdict: "), "`{line}`: {out}");
        }
    }
    let test = readme_commands(&lines, "flowgate test ");
    assert!(test.iter().any(|l| l.starts_with("flowgate test config/tests.yaml")), "{test:?}");
    for line in test {
        let out = sh_ok(repo, None, &line);
        assert!(out.trim_end().ends_with(" 0 failed"), "`{line}`: {out}");
    }
}

/// "Operating it": with the token the README exports, `flowgate reload` and
/// `flowgate quarantine` succeed against the bundled config's gateway (they answered 401
/// when nothing said how to set a token).
#[test]
fn readme_reload_and_quarantine_work_with_the_exported_token() {
    let lines = readme_sh_lines();
    let token = readme_token(&lines);
    let copy = BundledCopy::new();
    let mut fg = copy.run(&token);
    copy.point_cli_at_admin(fg.admin());
    let root = copy.root();
    for line in readme_commands(&lines, "flowgate reload") {
        let out = sh_ok(root, Some(&token), &line);
        assert!(out.starts_with("reloaded:") || out.starts_with("unchanged:"), "`{line}`: {out}");
    }
    for line in readme_commands(&lines, "flowgate quarantine ") {
        let out = sh_ok(root, Some(&token), &line);
        assert!(out.starts_with("quarantine "), "`{line}`: {out}");
    }
    // Without the token the same command is refused: the test above is not passing
    // because nothing is checked.
    let reload = &readme_commands(&lines, "flowgate reload")[0];
    let out = sh(root, None, reload);
    assert!(!out.status.success(), "`{reload}` without {ADMIN_TOKEN_ENV} succeeded");
    fg.assert_running();
}
