//! `flowgate check` as a user runs it: the real binary on the bundled config, on
//! fixture directories under tests/fixtures/, and on a realistic set
//! (benches/support/realistic.rs).

#[path = "../benches/support/realistic.rs"]
mod realistic;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

fn check(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("check")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("the flowgate binary runs")
}

fn check_fixture(name: &str) -> (i32, String, String) {
    let dir = fixture(name);
    let out = check(&["--policies", "policies", "--inventory", "inventory.yaml"], &dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn bundled_config_passes() {
    let out = check(&["--config", "config/flowgate.toml"], &root());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    assert!(stdout.contains("NetworkPolicy") && stdout.contains("AdminNetworkPolicy"), "{stdout}");
    assert!(!stderr.contains("warning:"), "the bundled example should be lint-clean: {stderr}");
}

#[test]
fn default_config_path_is_config_flowgate_toml() {
    let out = check(&[], &root());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // From elsewhere, the default path does not exist: an error, not a panic.
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = check(&[], tmp.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
}

#[test]
fn every_error_is_printed_with_file_object_and_field() {
    let (code, stdout, stderr) = check_fixture("errors");
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty(), "no summary on errors: {stdout}");
    let expected = [
        "inventory.yaml: Workload shop/api: workloads[1].ips[0]: 10.0.0.1/32 is already owned by shop/web",
        "policies/kind.yaml: Deployment web: kind: unknown kind \"Deployment\"",
        "policies/netpol.yaml: NetworkPolicy shop/broken: spec.podSelector.matchExpressions[0].operator: unknown selector operator",
        "policies/netpol.yaml: NetworkPolicy shop/broken: spec.ingress[0].from[1].ipBlock.cidr: \"10.0.0.300/8\" is not a valid CIDR",
        "policies/netpol.yaml: NetworkPolicy shop/broken: spec.ingress[0].ports[0].endPort: endPort 8000 is below port 9000",
        "policies/netpol.yaml: NetworkPolicy shop/broken: spec.ingress[0].ports[1].protocol: unknown protocol \"ICMP\"",
        "policies/netpol.yaml: NetworkPolicy shop/broken: spec.ingress[1].from[0].ipBlock.except[0]: 10.1.0.0/24 is not strictly inside",
        "policies/nested/admin.yaml: AdminNetworkPolicy too-low: spec.priority: priority 2000 is out of range",
        "policies/nested/admin.yaml: AdminNetworkPolicy too-low: metadata.annotations.flowgate.dev/ttl:",
        "policies/nested/admin.yaml: AdminNetworkPolicy too-low: spec.egress[0].to[0].domainNames: domainNames is only allowed in Allow",
        "policies/nested/admin.yaml: BaselineAdminNetworkPolicy default: spec.ingress[0].action: Pass is not allowed",
    ];
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    for want in expected {
        assert!(errors.iter().any(|l| l.contains(want)), "missing {want:?} in:\n{stderr}");
    }
    assert_eq!(errors.len(), expected.len(), "{stderr}");
    assert!(stderr.contains("11 error(s); nothing loaded"), "{stderr}");
}

#[test]
fn malformed_yaml_is_reported_with_its_file() {
    let (code, _, stderr) = check_fixture("malformed");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("error: policies/bad.yaml: malformed YAML:"), "{stderr}");
    assert!(stderr.contains("line"), "the position helps: {stderr}");
}

#[test]
fn warnings_do_not_fail_the_check() {
    let (code, stdout, stderr) = check_fixture("warnings");
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning: policies/typo.yaml: NetworkPolicy shop/typo: spec.podSelector: selects no workload"), "{stderr}");
    assert!(stderr.contains("spec.egress[0].to[0]: allows egress to 0.0.0.0/0"), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "ok: 1 policies (1 NetworkPolicy) over 1 workloads in 1 namespaces, 2 warning(s); \
         compiled with default deny, 1 in force"
    );
}

#[test]
fn check_compiles_with_the_chosen_default() {
    let dir = fixture("warnings");
    let args = ["--policies", "policies", "--inventory", "inventory.yaml"];
    for (flag, expect) in
        [(None, "default deny"), (Some("allow"), "default allow"), (Some("deny"), "default deny")]
    {
        let mut all = args.to_vec();
        if let Some(f) = flag {
            all.extend(["--default", f]);
        }
        let out = check(&all, &dir);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0));
        assert!(stdout.contains(&format!("compiled with {expect}")), "{flag:?}: {stdout}");
    }
    // The config's own default is used when no flag is given.
    let out = check(&["--config", "config/flowgate.toml"], &root());
    assert!(String::from_utf8_lossy(&out.stdout).contains("compiled with default deny"));
}

#[test]
fn no_fixture_makes_it_panic() {
    for entry in std::fs::read_dir(root().join("tests/fixtures")).expect("fixtures dir") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        let (code, _, stderr) = check_fixture(&name);
        assert!(code == 0 || code == 1, "{name}: exit {code}: {stderr}");
    }
    let (code, _, stderr) = check_fixture("odd");
    assert_eq!(code, 1);
    assert!(stderr.contains("recursion limit"), "{stderr}");
    assert!(stderr.contains("binary.yaml: cannot read"), "{stderr}");
}

#[test]
fn policies_and_inventory_go_together() {
    let out = check(&["--policies", "config/policies"], &root());
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    let out = check(
        &[
            "--policies",
            "config/policies",
            "--inventory",
            "config/inventory.yaml",
            "--default",
            "allow",
        ],
        &root(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Issue 27: `policyTypes: []` looks like "no direction" and is read as `[Ingress]`; the
/// check loads it (it is valid Kubernetes) and says how it is read, so a reviewer sees
/// that it isolates the whole namespace.
#[test]
fn empty_policy_types_is_a_warning_saying_how_it_is_read() {
    let (code, stdout, stderr) = check_fixture("issue27");
    assert_eq!(code, 0, "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(
        warnings,
        ["warning: policies/deny-all.yaml: NetworkPolicy x/deny-all: spec.policyTypes: \
             empty policyTypes is read as [Ingress], exactly as if it were absent (Kubernetes \
             defaults an empty list): this policy isolates the selected pods for ingress"],
        "{stderr}"
    );
    assert!(stdout.contains("1 warning(s)"), "{stdout}");
}

/// With egress rules the same spelling is read as `[Ingress, Egress]`, and the warning
/// says so; a list that is not empty is read as written and draws no warning.
#[test]
fn empty_policy_types_with_egress_rules_is_read_as_both_directions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(tmp.path().join("policies")).expect("mkdir");
    std::fs::copy(fixture("issue27").join("inventory.yaml"), tmp.path().join("inventory.yaml"))
        .expect("copy inventory");
    let np = |name: &str, types: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: {types}\n  egress: [{{to: [{{namespaceSelector: {{}}}}]}}]\n"
        )
    };
    let text = format!("{}{}", np("both", "[]"), np("written", "[Ingress, Egress]"));
    std::fs::write(tmp.path().join("policies/p.yaml"), text).expect("write");
    let out = check(&["--policies", "policies", "--inventory", "inventory.yaml"], tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains(
            "NetworkPolicy x/both: spec.policyTypes: empty policyTypes is read as [Ingress, Egress]"
        ),
        "{stderr}"
    );
    assert!(warnings[0].ends_with("for ingress and egress"), "{stderr}");
}

/// A NetworkPolicy file with every spelling warning, added to the realistic set so the
/// spelling pass is part of what is compared.
const SPELLED: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: spelled, namespace: team0-ns0}
spec:
  podSelector: {matchLabels: {app: web0}}
  policyTypes: [ ]
  ingress:
    - from: [ # nobody?
      ]
  egress: []
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: typo, namespace: team0-ns0}
spec:
  podSelector: {matchLabels: {app: web00}}
  egress:
    - to:
        - ipBlock: {cidr: 0.0.0.0/0}
";

/// FNV-1a, to compare long outputs with the ones recorded.
fn fnv(text: &str) -> u64 {
    text.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Issue 25: `check` was reworked for speed (the lint's spelling pass reads the files
/// beside the load, only those that can hold a spelling are parsed again, the lint runs
/// beside the compile). On the realistic 1k × 1k set with its cluster tiers, plus a file
/// with every spelling, it prints exactly what the binary before the change printed:
/// the summary, and the warnings whose count and digest are recorded here.
#[test]
fn realistic_set_output_is_what_it_was_before_the_speedup() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let shape = realistic::Shape::new(10, 100).with_cluster_tiers();
    realistic::write(tmp.path(), &shape);
    std::fs::create_dir(tmp.path().join("policies/extra")).expect("mkdir");
    std::fs::write(tmp.path().join("policies/extra/spelled.yaml"), SPELLED).expect("write");
    let out = check(&["--policies", "policies", "--inventory", "inventory.yaml"], tmp.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout.trim(), EXPECTED_SUMMARY, "{stderr}");
    let lines = stderr.lines().count();
    assert_eq!((lines, fnv(&stderr)), EXPECTED_WARNINGS, "{stderr}");
    for want in EXPECTED_SOME {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
}

/// Recorded with the binary before the speedup (commit 60d2d43).
const EXPECTED_SUMMARY: &str = "ok: 1135 policies (1034 NetworkPolicy, 100 AdminNetworkPolicy, 1 BaselineAdminNetworkPolicy) over 1002 workloads in 12 namespaces, 81 warning(s); compiled with default deny, 1135 in force";
const EXPECTED_WARNINGS: (usize, u64) = (81, 0x229019ccd2dba540);
const EXPECTED_SOME: [&str; 5] = [
    "warning: policies/extra/spelled.yaml: NetworkPolicy team0-ns0/spelled: spec.policyTypes: empty policyTypes is read as [Ingress], exactly as if it were absent (Kubernetes defaults an empty list): this policy isolates the selected pods for ingress",
    "warning: policies/extra/spelled.yaml: NetworkPolicy team0-ns0/spelled: spec.egress: empty egress without Egress in policyTypes is read as no egress section: egress is not isolated (list Egress in policyTypes to deny all egress)",
    "warning: policies/extra/spelled.yaml: NetworkPolicy team0-ns0/spelled: spec.ingress[0].from: empty from is read as no from: this rule admits every source (not none)",
    "warning: policies/extra/spelled.yaml: NetworkPolicy team0-ns0/typo: spec.podSelector: selects no workload in the inventory",
    "warning: policies/extra/spelled.yaml: NetworkPolicy team0-ns0/typo: spec.egress[0].to[0]: allows egress to 0.0.0.0/0: the whole internet",
];
