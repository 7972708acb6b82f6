//! `flowgate explain` as a user runs it: the real binary on the bundled config and on
//! tests/fixtures/tiers (an ANP that passes, one that denies, a NetworkPolicy with a named
//! port, a BANP), human and `--json` output, exit codes.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `flowgate explain ARGS` in the crate root: (exit code, stdout, stderr).
fn explain(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("explain")
        .args(args)
        .current_dir(root())
        .output()
        .expect("the flowgate binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// `explain` on the tiers fixture.
fn tiers(args: &[&str]) -> (i32, String, String) {
    let mut all = args.to_vec();
    all.extend([
        "--policies",
        "tests/fixtures/tiers/policies",
        "--inventory",
        "tests/fixtures/tiers/inventory.yaml",
    ]);
    explain(&all)
}

fn json(args: &[&str]) -> Value {
    let (code, stdout, stderr) = explain(&[args, &["--json"]].concat());
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn tiers_json(args: &[&str]) -> Value {
    let (code, stdout, stderr) = tiers(&[args, &["--json"]].concat());
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn allow_names_the_admitting_rule_on_each_side() {
    let (code, out, err) = explain(&[
        "--from",
        "payments/billing-fn",
        "--to",
        "data/payments-db",
        "--port",
        "postgres",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("verdict: ALLOW"), "{out}");
    // The named port is resolved on the destination.
    assert!(out.contains("port 5432/TCP"), "{out}");
    assert!(
        out.contains("admitted by NetworkPolicy payments/billing-to-db rule egress[0]"),
        "{out}"
    );
    assert!(out.contains("isolated by NetworkPolicy data/default-deny"), "{out}");
    assert!(
        out.contains("admitted by NetworkPolicy data/payments-db-perimeter rule ingress[0]"),
        "{out}"
    );
}

#[test]
fn deny_exits_zero_and_says_nothing_admitted() {
    let (code, out, err) =
        explain(&["--from", "payments/checkout", "--to", "data/payments-db", "--port", "5432"]);
    assert_eq!(code, 0, "a denial is an answer, not an error: {err}");
    assert!(out.contains("verdict: DENY (egress side, not-admitted)"), "{out}");
    assert!(
        out.contains("isolated by NetworkPolicy payments/default-deny; no rule admits the flow"),
        "{out}"
    );
}

#[test]
fn admin_deny_beats_a_networkpolicy_allow() {
    // prometheus' NetworkPolicy allows all egress; the block-metadata ANP still denies.
    let v = json(&["--from", "platform/prometheus", "--to", "169.254.169.254", "--port", "80"]);
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["reason"], "admin-deny");
    assert_eq!(v["direction"], "egress");
    assert_eq!(v["egress"]["decided_by"], "admin");
    assert_eq!(v["egress"]["admin"]["action"], "Deny");
    assert_eq!(v["egress"]["admin"]["kind"], "AdminNetworkPolicy");
    assert!(!v["egress"]["isolated_by"].as_array().expect("list").is_empty(), "{v}");
    assert_eq!(v["ingress"], Value::Null, "an external destination brings no policy");
}

#[test]
fn tier_trace_pass_then_networkpolicy_then_default() {
    let (code, out, err) = tiers(&["--from", "shop/web", "--to", "shop/api", "--port", "http"]);
    assert_eq!(code, 0, "{err}");
    // Egress of web: Pass, not isolated, no baseline rule, default (deny).
    assert!(out.contains("verdict: DENY (egress side, default-deny)"), "{out}");
    assert!(
        out.contains("passed by AdminNetworkPolicy pass-shop rule shop-decides (Pass)"),
        "{out}"
    );
    assert!(out.contains("not isolated"), "{out}");
    assert!(out.contains("policy.default = deny"), "{out}");
    // Ingress of api: Pass, then the NetworkPolicy admits on the named port.
    assert!(out.contains("admitted by NetworkPolicy shop/api-ingress rule ingress[0]"), "{out}");
    // With --default allow the same flow is allowed.
    let v = tiers_json(&[
        "--from",
        "shop/web",
        "--to",
        "shop/api",
        "--port",
        "http",
        "--default",
        "allow",
    ]);
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["egress"]["decided_by"], "default");
    assert_eq!(v["egress"]["default"], "allow");
    assert_eq!(v["egress"]["admin"]["action"], "Pass");
    assert_eq!(v["ingress"]["decided_by"], "networkpolicy");
    assert_eq!(v["ingress"]["admitted_by"]["policy"], "shop/api-ingress");
    assert_eq!(v["ingress"]["isolated_by"][0], "NetworkPolicy shop/api-ingress");
}

#[test]
fn baseline_rule_is_shown_for_a_non_isolated_workload() {
    let v = tiers_json(&[
        "--from",
        "ops/tool",
        "--to",
        "ops/free",
        "--port",
        "1",
        "--default",
        "allow",
    ]);
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["direction"], "ingress");
    assert_eq!(v["reason"], "baseline-deny");
    assert_eq!(v["ingress"]["decided_by"], "baseline");
    assert_eq!(v["ingress"]["baseline"]["rule"], "deny-from-workloads");
    assert_eq!(v["ingress"]["baseline"]["kind"], "BaselineAdminNetworkPolicy");
}

#[test]
fn named_port_is_resolved_on_each_destination() {
    // "http" is 9090 on shop/api and 8080 on shop/web.
    let a = tiers_json(&["--from", "ops/tool", "--to", "shop/api", "--port", "http"]);
    let w = tiers_json(&["--from", "ops/tool", "--to", "shop/web", "--port", "http"]);
    assert_eq!(a["port"], 9090);
    assert_eq!(w["port"], 8080);
    // A destination given by address is still a workload: the name resolves on it.
    let ip = tiers_json(&["--from", "ops/tool", "--to", "198.18.1.2", "--port", "http"]);
    assert_eq!(ip["port"], 9090);
    assert_eq!(ip["dst"]["workload"], "shop/api");
}

#[test]
fn domain_destination_is_normalised_and_queried_as_0_0_0_0() {
    let v = json(&[
        "--from",
        "functions/webhook-fn",
        "--to",
        "S3.EU-West-1.AmazonAWS.com.",
        "--port",
        "443",
    ]);
    assert_eq!(v["fqdn"], "s3.eu-west-1.amazonaws.com");
    assert_eq!(v["dst"]["ip"], "0.0.0.0");
    assert_eq!(v["dst"]["workload"], Value::Null);
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["egress"]["admin"]["rule"], "payment-and-cloud-apis");
    // The wildcard never matches its own suffix.
    let v = json(&["--from", "functions/webhook-fn", "--to", "amazonaws.com", "--port", "443"]);
    assert_eq!(v["verdict"], "deny");
}

#[test]
fn audit_would_deny_is_reported_while_allowed() {
    let (code, out, _) =
        explain(&["--from", "platform/prometheus", "--to", "203.0.113.50", "--port", "25"]);
    assert_eq!(code, 0);
    assert!(out.contains("verdict: ALLOW"), "{out}");
    assert!(out.contains("WOULD-DENY by AdminNetworkPolicy no-direct-smtp"), "{out}");
    assert!(
        out.contains("matched AdminNetworkPolicy no-direct-smtp rule deny-smtp (Deny)"),
        "{out}"
    );
    let v = json(&["--from", "platform/prometheus", "--to", "203.0.113.50", "--port", "25"]);
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["would_deny"], "AdminNetworkPolicy no-direct-smtp");
    assert_eq!(v["audit"]["egress"]["decided_by"], "admin");
    // Port 443 is not SMTP: no would-deny.
    let v = json(&["--from", "platform/prometheus", "--to", "203.0.113.50", "--port", "443"]);
    assert_eq!(v["would_deny"], Value::Null);
    assert_eq!(v["audit"], Value::Null);
}

#[test]
fn json_has_a_stable_shape() {
    let v = json(&[
        "--from",
        "198.51.100.1",
        "--to",
        "198.51.100.2",
        "--port",
        "1",
        "--protocol",
        "UDP",
    ]);
    let keys: Vec<&str> = v.as_object().expect("object").keys().map(String::as_str).collect();
    for k in [
        "verdict",
        "direction",
        "reason",
        "policy",
        "would_deny",
        "src",
        "dst",
        "port",
        "protocol",
        "fqdn",
        "unknown",
        "egress",
        "ingress",
        "audit",
    ] {
        assert!(keys.contains(&k), "missing {k}: {v}");
    }
    assert_eq!(v["unknown"], true);
    assert_eq!(v["reason"], "unknown-endpoints");
    assert_eq!(v["protocol"], "UDP");
}

#[test]
fn bad_input_exits_1_with_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["--from", "nope/x", "--to", "data/payments-db", "--port", "5432"], "no workload nope/x"),
        (&["--from", "payments/billing-fn", "--to", "data/payments-db", "--port", "0"], "--port"),
        (
            &["--from", "payments/billing-fn", "--to", "data/payments-db", "--port", "smtp"],
            "no TCP port named \"smtp\"",
        ),
        (
            &["--from", "payments/billing-fn", "--to", "203.0.113.10", "--port", "https"],
            "needs a workload destination",
        ),
        (
            &[
                "--from",
                "payments/billing-fn",
                "--to",
                "data/payments-db",
                "--port",
                "5432",
                "--protocol",
                "ICMP",
            ],
            "unknown protocol",
        ),
        (&["--from", "api.example.com", "--to", "data/payments-db", "--port", "5432"], "--from"),
        (&["--from", "payments/billing-fn", "--to", "not a name", "--port", "5432"], "--to"),
        (
            &[
                "--from",
                "a/b",
                "--to",
                "c/d",
                "--port",
                "1",
                "--config",
                "/nonexistent/flowgate.toml",
            ],
            "nonexistent",
        ),
    ];
    for (args, needle) in cases {
        let (code, out, err) = explain(args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
        assert!(out.is_empty(), "{args:?}: nothing on stdout: {out}");
    }
    // A policy directory that does not load: its errors, exit 1.
    let (code, _, err) = explain(&[
        "--from",
        "a/b",
        "--to",
        "c/d",
        "--port",
        "1",
        "--policies",
        "tests/fixtures/errors/policies",
        "--inventory",
        "tests/fixtures/errors/inventory.yaml",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing loaded"), "{err}");
}

/// `explain` on the issue-27 fixture (a deny-all written with `policyTypes: []`).
fn issue27(args: &[&str]) -> (i32, String, String) {
    let mut all = args.to_vec();
    all.extend([
        "--policies",
        "tests/fixtures/issue27/policies",
        "--inventory",
        "tests/fixtures/issue27/inventory.yaml",
        "--default",
        "allow",
    ]);
    explain(&all)
}

/// Issue 27: `policyTypes: []` is read as `[Ingress]`, so every pod in `x` is isolated
/// for ingress by `x/deny-all` and nothing admits; egress out of `x` is not isolated.
#[test]
fn empty_policy_types_deny_all_isolates_every_pod_for_ingress() {
    for (from, to) in [("y/c", "x/a"), ("x/b", "x/a"), ("y/c", "x/b"), ("203.0.113.9", "x/b")] {
        let (code, out, err) = issue27(&["--from", from, "--to", to, "--port", "8080", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["verdict"], "deny", "{from} -> {to}: {v}");
        assert_eq!(v["direction"], "ingress", "{v}");
        assert_eq!(v["reason"], "not-admitted", "{v}");
        assert_eq!(v["ingress"]["decided_by"], "networkpolicy", "{v}");
        assert_eq!(v["ingress"]["isolated_by"][0], "NetworkPolicy x/deny-all", "{v}");
        assert_eq!(v["ingress"]["admitted_by"], Value::Null, "{v}");
    }
    // The human output says the same.
    let (code, out, err) = issue27(&["--from", "y/c", "--to", "x/a", "--port", "http"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("verdict: DENY (ingress side, not-admitted)"), "{out}");
    assert!(out.contains("isolated by NetworkPolicy x/deny-all; no rule admits the flow"), "{out}");
    // Egress is not in the defaulted policyTypes: x/a reaches y/c.
    let (code, out, err) = issue27(&["--from", "x/a", "--to", "y/c", "--port", "80", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["verdict"], "allow", "{v}");
    assert_eq!(v["egress"]["isolated_by"].as_array().map(Vec::len), Some(0), "{v}");
}
