//! `flowgate test FILE`: connectivity assertions for CI. Every case is resolved first (a
//! bad case file fails whole, naming each bad case, and runs nothing); then each case is
//! decided and compared with its `expect`. Prints one line per failing case and a closing
//! `N passed, N failed`; exit 1 if any case failed. `--json` prints per-case results.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use flowgate::policy::simulate::{self, Case, Expect, Resolver, SimFlow};
use flowgate::policy::{CompiledPolicy, Decision, PolicyId, Verdict};
use serde::Serialize;

use super::check::Source;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The case file (YAML, `cases:` list; see docs/DESIGN.md).
    pub file: PathBuf,
    /// Print per-case results as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: Source,
}

/// One case's result, as `--json` prints it.
#[derive(Serialize)]
struct CaseResult {
    name: String,
    from: String,
    to: String,
    port: u16,
    protocol: String,
    expect: &'static str,
    got: &'static str,
    passed: bool,
    /// `egress`/`ingress` for a denial.
    direction: Option<&'static str>,
    reason: Option<&'static str>,
    policy: Option<String>,
    would_deny: Option<String>,
}

#[derive(Serialize)]
struct Report {
    passed: usize,
    failed: usize,
    cases: Vec<CaseResult>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cases = match simulate::load_cases(&args.file) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s) in {}; no case run", errors.len(), args.file.display());
            return Ok(ExitCode::from(1));
        }
    };
    let loaded = match args.source.load() {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    // Resolve every case before running any: a typo in one case fails the file.
    let compiled = &loaded.compiled;
    let resolver = Resolver::new(compiled);
    let mut flows: Vec<(&Case, SimFlow)> = Vec::with_capacity(cases.len());
    let mut bad = 0;
    for (i, case) in cases.iter().enumerate() {
        match case.flow_in(&resolver) {
            Ok(f) => flows.push((case, f)),
            Err(e) => {
                bad += 1;
                eprintln!(
                    "error: {}: case #{} ({}): {e}",
                    args.file.display(),
                    i + 1,
                    case.label()
                );
            }
        }
    }
    if bad > 0 {
        eprintln!("{bad} error(s) in {}; no case run", args.file.display());
        return Ok(ExitCode::from(1));
    }
    // `decide`, not `explain`: the result names the deciding policy and the cause, which
    // the decision carries; the trace `explain` builds would be thrown away. Per case only
    // the decision: the printed result (strings) is made for the cases that are printed,
    // every case with `--json`, only the failing ones otherwise.
    let decided: Vec<(&Case, &SimFlow, Decision, bool)> = flows
        .iter()
        .map(|(case, flow)| {
            let d = compiled.decide(&flow.query());
            let passed = d.verdict.is_allow() == (case.expect == Expect::Allow);
            (*case, flow, d, passed)
        })
        .collect();
    let failed = decided.iter().filter(|(.., passed)| !passed).count();
    let passed = decided.len() - failed;
    let result = |(case, flow, d, passed): &(&Case, &SimFlow, Decision, bool)| {
        case_result(compiled, case, flow, d, *passed)
    };
    if args.json {
        let cases = decided.iter().map(result).collect();
        let report = Report { passed, failed, cases };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mut out = std::io::stdout().lock();
        for r in decided.iter().filter(|(.., passed)| !passed).map(result) {
            writeln!(out, "FAIL {}: expected {}, got {}{}", r.name, r.expect, r.got, why(&r))?;
        }
        writeln!(out, "{passed} passed, {failed} failed")?;
    }
    Ok(if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// One case's printed result.
fn case_result(
    compiled: &CompiledPolicy,
    case: &Case,
    flow: &SimFlow,
    d: &Decision,
    passed: bool,
) -> CaseResult {
    let got = if d.verdict.is_allow() { Expect::Allow } else { Expect::Deny };
    let (direction, reason) = match d.verdict {
        Verdict::Allow => (None, None),
        Verdict::Deny(r) => (r.direction.map(|d| d.as_str()), Some(r.cause.as_str())),
    };
    CaseResult {
        name: case.label(),
        from: case.from.to_string(),
        to: case.to.to_string(),
        port: flow.port,
        protocol: flow.proto.to_string(),
        expect: case.expect.as_str(),
        got: got.as_str(),
        passed,
        direction,
        reason,
        policy: d.policy.map(|p| policy_label(compiled, p)),
        would_deny: d.would_deny.map(|p| policy_label(compiled, p)),
    }
}
/// `Kind name`, as `explain` labels a policy.
fn policy_label(compiled: &CompiledPolicy, id: PolicyId) -> String {
    match (compiled.policy_kind(id), compiled.policy_name(id)) {
        (Some(kind), Some(name)) => format!("{} {name}", kind.as_str()),
        _ => format!("policy #{}", id.0),
    }
}

/// ` (ingress: not-admitted, NetworkPolicy data/default-deny)` for a denial, the
/// admitting policy for an allow.
fn why(r: &CaseResult) -> String {
    let mut parts = Vec::new();
    if let Some(d) = r.direction {
        parts.push(format!("{d}: {}", r.reason.unwrap_or("denied")));
    } else if let Some(reason) = r.reason {
        parts.push(reason.to_string());
    }
    if let Some(p) = &r.policy {
        parts.push(p.clone());
    }
    if parts.is_empty() { String::new() } else { format!(" ({})", parts.join(", ")) }
}
