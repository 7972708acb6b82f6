//! The operations files checked against the real thing: `config/prometheus/alerts.yaml`
//! (`promtool check rules`, `promtool test rules alerts_test.yaml`, a firing and a quiet case
//! for every alert), `config/grafana/flowgate.json` (provisioning-ready: valid JSON, the
//! schema-level rules Grafana relies on, every query parsed by Prometheus' own parser and run
//! against a real Prometheus scraping a real flowgate), `docs/runbooks.md` (every alert's
//! anchor, every internal link, every `flowgate` command and flag, every admin path).
//!
//! Every metric name and label a query or a unit-test series uses must be in a scrape of
//! the real binary (`flowgate run` on port-0 binds), so a renamed metric breaks this test
//! rather than a dashboard in production.
//!
//! Grafana itself is not in the package registries this project uses (no Debian package,
//! nothing on PyPI or npm that runs Grafana's provisioning), so the dashboard is checked at
//! the schema level. `promtool` and `prometheus` come from the Debian package `prometheus`
//! (scripts/setup.sh); without them the tests that need them fail when `CI=true` and
//! otherwise print why and return.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use support::require::{Need, skip_unless};

const ALERTS: &str = "config/prometheus/alerts.yaml";
const ALERT_TESTS: &str = "config/prometheus/alerts_test.yaml";
const DASHBOARD: &str = "config/grafana/flowgate.json";
const PROVIDER: &str = "config/grafana/provisioning/flowgate.yaml";
const RUNBOOKS: &str = "docs/runbooks.md";
const TOKEN: &str = "ops-config-test-token";

/// Labels Prometheus adds to every target (not in flowgate's exposition).
const TARGET_LABELS: &[&str] = &["job", "instance"];
/// Labels whose values are the deployment's own (listener names): the name must exist, any
/// value goes.
const FREE_VALUE_LABELS: &[&str] = &["listener"];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// True when every tool is on PATH; otherwise the shared rule decides (fail in CI, a visible
/// skip elsewhere).
fn require(tools: &[&'static str]) -> bool {
    let needs: Vec<Need> = tools.iter().map(|t| Need::Bin(t)).collect();
    !skip_unless(&needs)
}

fn ok_output(what: &str, out: Output) -> String {
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

fn yaml(rel: &str) -> Yaml {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// (alert name, rule) for every alerting rule of alerts.yaml.
fn alert_rules() -> Vec<(String, Yaml)> {
    let doc = yaml(ALERTS);
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups: a list") {
        for rule in group["rules"].as_sequence().expect("rules: a list") {
            if let Some(name) = rule["alert"].as_str() {
                out.push((name.to_string(), rule.clone()));
            }
        }
    }
    out
}

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, rows' nested panels included.
fn all_panels(dash: &Json) -> Vec<&Json> {
    fn walk<'a>(panels: &'a Json, out: &mut Vec<&'a Json>) {
        for p in panels.as_array().map(Vec::as_slice).unwrap_or_default() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// (where, PromQL) for every query of the dashboard: panel targets and annotations.
fn dashboard_queries(dash: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dash) {
        for t in p["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((
                format!("panel {} {:?} target {}", p["id"], p["title"], t["refId"]),
                expr.into(),
            ));
        }
    }
    for a in dash["annotations"]["list"].as_array().map(Vec::as_slice).unwrap_or_default() {
        if let Some(expr) = a["expr"].as_str() {
            out.push((format!("annotation {:?}", a["name"]), expr.into()));
        }
    }
    out
}

/// (variable, metric selector, label) for every `label_values(selector, label)` variable.
fn dashboard_label_values(dash: &Json) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for v in dash["templating"]["list"].as_array().map(Vec::as_slice).unwrap_or_default() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_default();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: not a label_values query: {q}", v["name"]));
        let (sel, label) = inner.rsplit_once(',').expect("label_values(selector, label)");
        out.push((v["name"].to_string(), sel.trim().to_string(), label.trim().to_string()));
    }
    out
}

/// Grafana's variables replaced by values Prometheus accepts.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$job", ".*")
        .replace("$instance", ".*")
        .replace("$listener", ".*")
}

// --- PromQL, just enough of it -------------------------------------------------------------

#[derive(Debug, Default)]
struct Promql {
    selectors: Vec<Selector>,
    /// Labels named in `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`.
    grouping: Vec<String>,
    /// Labels the expression itself creates (`count_values`).
    made: Vec<String>,
}

#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
const KEYWORDS: &[&str] = &["and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"];

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

fn find(b: &[u8], from: usize, c: u8) -> Result<usize, String> {
    b[from..]
        .iter()
        .position(|&x| x == c)
        .map(|p| from + p)
        .ok_or_else(|| format!("no closing {:?} after byte {from}", c as char))
}

/// A quoted string at `i`: its text and the index after it.
fn string_lit(b: &[u8], i: usize) -> Result<(String, usize), String> {
    let quote = b[i];
    let mut out = Vec::new();
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if quote != b'`' && j + 1 < b.len() => {
                out.push(b[j + 1]);
                j += 2;
            }
            c if c == quote => return Ok((String::from_utf8_lossy(&out).into_owned(), j + 1)),
            c => {
                out.push(c);
                j += 1;
            }
        }
    }
    Err(format!("unterminated string at byte {i}"))
}

/// `{label op "value", …}` at `i`: pushes the matchers, returns the index after `}`.
fn matchers(
    b: &[u8],
    mut i: usize,
    out: &mut Vec<(String, String, String)>,
) -> Result<usize, String> {
    i += 1;
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b'}') => return Ok(i + 1),
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(&c) if is_ident_start(c) => {}
            other => return Err(format!("bad label matcher at byte {i}: {other:?}")),
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let label = String::from_utf8_lossy(&b[start..i]).into_owned();
        i = skip_ws(b, i);
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| b[i..].starts_with(op.as_bytes()))
            .ok_or_else(|| format!("no matcher operator after {label:?}"))?;
        i = skip_ws(b, i + op.len());
        if !matches!(b.get(i), Some(b'"' | b'\'' | b'`')) {
            return Err(format!("label {label:?}: value is not a string"));
        }
        let (value, next) = string_lit(b, i)?;
        out.push((label, op.to_string(), value));
        i = next;
    }
}

/// The selectors, grouping labels and created labels of a PromQL expression.
fn promql(expr: &str) -> Result<Promql, String> {
    let b = expr.as_bytes();
    let mut out = Promql::default();
    let mut count_values_label = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => {
                let (s, next) = string_lit(b, i)?;
                if count_values_label {
                    out.made.push(s);
                    count_values_label = false;
                }
                i = next;
            }
            // Ranges, subqueries, durations (Grafana's `$__rate_interval` included).
            b'[' => i = find(b, i, b']')? + 1,
            b'{' => return Err(format!("a selector without a metric name at byte {i}")),
            b'$' => {
                i += 1;
                while i < b.len() && (is_ident(b[i]) || b[i] == b'{' || b[i] == b'}') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let j = skip_ws(b, i);
                let next = b.get(j).copied();
                if LABEL_LISTS.contains(&word) {
                    if next == Some(b'(') {
                        let end = find(b, j, b')')?;
                        out.grouping.extend(
                            expr[j + 1..end]
                                .split(',')
                                .map(str::trim)
                                .filter(|l| !l.is_empty())
                                .map(String::from),
                        );
                        i = end + 1;
                    }
                } else if AGGREGATIONS.contains(&word) {
                    count_values_label = word == "count_values";
                } else if KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                    || next == Some(b'(')
                {
                    // An operator or a function.
                } else {
                    let mut sel = Selector { metric: word.to_string(), matchers: Vec::new() };
                    if next == Some(b'{') {
                        i = matchers(b, j, &mut sel.matchers)?;
                    }
                    out.selectors.push(sel);
                }
            }
            _ => i += 1,
        }
    }
    Ok(out)
}

// --- A real flowgate and its scrape --------------------------------------------------------

/// Series of one scrape: metric name → the label sets it was exported with.
#[derive(Debug, Default)]
struct Scrape(BTreeMap<String, Vec<BTreeMap<String, String>>>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, _value) = line.rsplit_once(' ').expect("`series value`");
            let p = promql(series).unwrap_or_else(|e| panic!("exposition line {line:?}: {e}"));
            let [sel] = <[Selector; 1]>::try_from(p.selectors).expect("one series per line");
            let labels = sel.matchers.into_iter().map(|(l, _, v)| (l, v)).collect();
            s.0.entry(sel.metric).or_default().push(labels);
        }
        s
    }

    fn label_values(&self, metric: &str, label: &str) -> Option<BTreeSet<&str>> {
        let series = self.0.get(metric)?;
        let values: BTreeSet<&str> =
            series.iter().filter_map(|l| l.get(label).map(String::as_str)).collect();
        (!values.is_empty()).then_some(values)
    }

    fn labels(&self) -> BTreeSet<&str> {
        self.0.values().flatten().flat_map(|l| l.keys().map(String::as_str)).collect()
    }

    /// Problems with one selector: unknown metric, unknown label, a literal value no series has.
    fn check_selector(&self, sel: &Selector) -> Vec<String> {
        let mut problems = Vec::new();
        if !sel.metric.starts_with("flowgate_") {
            problems.push(format!("{}: not a flowgate metric", sel.metric));
            return problems;
        }
        if !self.0.contains_key(&sel.metric) {
            problems.push(format!("{}: not in flowgate's /metrics", sel.metric));
            return problems;
        }
        for (label, op, value) in &sel.matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            let Some(values) = self.label_values(&sel.metric, label) else {
                problems.push(format!("{}: has no label {label:?}", sel.metric));
                continue;
            };
            if FREE_VALUE_LABELS.contains(&label.as_str()) || value.contains('$') {
                continue;
            }
            let wanted: Vec<&str> = match op.as_str() {
                "=" | "!=" => vec![value.as_str()],
                _ if value.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.-|".contains(&c)) => {
                    value.split('|').collect()
                }
                _ => Vec::new(), // a real regex: nothing literal to look up
            };
            for w in wanted {
                if !values.contains(w) {
                    problems.push(format!(
                        "{}{{{label}{op}{value:?}}}: no series has {label}={w:?} (it has {values:?})",
                        sel.metric
                    ));
                }
            }
        }
        problems
    }

    /// Problems with a whole expression.
    fn check_expr(&self, expr: &str) -> Vec<String> {
        let p = match promql(expr) {
            Ok(p) => p,
            Err(e) => return vec![format!("cannot read the expression: {e}")],
        };
        if p.selectors.is_empty() {
            return vec!["selects no metric".into()];
        }
        let mut problems: Vec<String> =
            p.selectors.iter().flat_map(|s| self.check_selector(s)).collect();
        let known = self.labels();
        for l in &p.grouping {
            if !TARGET_LABELS.contains(&l.as_str())
                && !known.contains(l.as_str())
                && !p.made.contains(l)
            {
                problems.push(format!("groups by {l:?}, a label no flowgate metric has"));
            }
        }
        problems
    }
}

/// A child process killed by its own pid when dropped, however the test ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Gateway {
    _proc: Proc,
    _dir: tempfile::TempDir,
    config: PathBuf,
    admin: SocketAddr,
}

/// The bundled config (config/flowgate.toml, its inventory and policies), with every bind on
/// port 0 and an admin token, run by the real binary.
fn start_gateway() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let src = repo("config");
    copy_dir(&src.join("policies"), &dir.path().join("policies"));
    std::fs::copy(src.join("inventory.yaml"), dir.path().join("inventory.yaml")).unwrap();
    let mut cfg = String::new();
    for line in read("config/flowgate.toml").lines() {
        match line.strip_prefix("bind = \"").and_then(|r| r.rsplit_once(':')) {
            Some((host, _port)) => cfg.push_str(&format!("bind = \"{host}:0\"")),
            None => cfg.push_str(line),
        }
        cfg.push('\n');
        if line.trim() == "[admin]" {
            cfg.push_str(&format!("token = \"{TOKEN}\"\n"));
        }
    }
    assert!(cfg.contains(":0\""), "no bind rewritten in config/flowgate.toml");
    let config = dir.path().join("flowgate.toml");
    std::fs::write(&config, cfg).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env_remove("FLOWGATE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowgate");
    let stderr = child.stderr.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut admin, mut ready, mut seen) = (None, false, Vec::new());
    while admin.is_none() || !ready {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("flowgate did not start; stderr: {seen:#?}"));
        if let Some(addr) = line.split("admin API on http://").nth(1) {
            admin = Some(addr.trim().parse().unwrap_or_else(|e| panic!("{line:?}: {e}")));
        }
        ready |= line.contains("ready");
        seen.push(line);
    }
    Gateway { _proc: proc, _dir: dir, config, admin: admin.unwrap() }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

impl Gateway {
    /// `flowgate quarantine` (the runbook's command) so the TTL'd-policy metrics exist.
    fn quarantine(&self, target: &str) {
        let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["quarantine", "--ttl", "10m", target, "--admin"])
            .arg(self.admin.to_string())
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        ok_output("flowgate quarantine", out);
    }

    fn scrape(&self) -> Scrape {
        let (status, body) = http_get(self.admin, "/metrics");
        assert_eq!(status, 200, "{body}");
        Scrape::parse(&body)
    }
}

/// One HTTP/1.0 GET (no chunking, the body ends at close): status and body; `None` when
/// nothing answers.
fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Some((status, body.to_string()))
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|| panic!("GET http://{addr}{path}: no answer"))
}

fn url_encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// --- Markdown anchors ----------------------------------------------------------------------

/// GitHub's heading anchors: lower case, punctuation dropped, spaces to `-`, `-N` for repeats.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let Some(title) = line.strip_prefix('#').filter(|_| !fenced) else { continue };
        let title = title.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_default();
        out.insert(if *n == 0 { slug.clone() } else { format!("{slug}-{n}") });
        *n += 1;
    }
    out
}

// --- The tests -----------------------------------------------------------------------------

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !require(&["promtool"]) {
        return;
    }
    let out = Command::new("promtool").args(["check", "rules"]).arg(repo(ALERTS)).output().unwrap();
    let text = ok_output("promtool check rules", out);
    assert!(text.contains("SUCCESS"), "{text}");
    // Relative rule_files resolve against the test file's directory.
    let out = Command::new("promtool")
        .args(["test", "rules", "alerts_test.yaml"])
        .current_dir(repo("config/prometheus"))
        .output()
        .unwrap();
    let text = ok_output("promtool test rules", out);
    assert!(text.contains("SUCCESS"), "{text}");
    // The example Prometheus configuration, and the rule file it loads.
    let out = Command::new("promtool")
        .args(["check", "config", "prometheus.yml"])
        .current_dir(repo("config/prometheus"))
        .output()
        .unwrap();
    let text = ok_output("promtool check config", out);
    assert!(text.contains("1 rule files found"), "{text}");
}

#[test]
fn every_alert_is_documented_and_unit_tested_firing_and_quiet() {
    let runbooks = read(RUNBOOKS);
    let anchors = anchors(&runbooks);
    let rules = alert_rules();
    assert!(rules.len() >= 6, "alerts.yaml has only {} alerts", rules.len());

    // Which alerts the unit tests see firing and see quiet.
    let (mut fired, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    let tests = yaml(ALERT_TESTS);
    for t in tests["tests"].as_sequence().expect("tests: a list") {
        for case in t["alert_rule_test"].as_sequence().map(Vec::as_slice).unwrap_or_default() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let n = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if n == 0 {
                quiet.insert(name)
            } else {
                fired.insert(name)
            };
        }
    }

    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for (name, rule) in &rules {
        if !names.insert(name.clone()) {
            problems.push(format!("{name}: defined twice"));
        }
        let sev = rule["labels"]["severity"].as_str().unwrap_or_default();
        if !["critical", "warning", "info"].contains(&sev) {
            problems.push(format!("{name}: severity {sev:?} (critical, warning or info)"));
        }
        for key in ["summary", "description", "runbook_url"] {
            if rule["annotations"][key].as_str().is_none_or(|s| s.trim().is_empty()) {
                problems.push(format!("{name}: no {key} annotation"));
            }
        }
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_default();
        match url.strip_prefix("docs/runbooks.md#") {
            Some(anchor) if anchors.contains(anchor) => {}
            Some(anchor) => problems.push(format!("{name}: docs/runbooks.md has no #{anchor}")),
            None => problems.push(format!("{name}: runbook_url {url:?} is not docs/runbooks.md#…")),
        }
        if !runbooks.contains(&format!("`{name}`")) {
            problems.push(format!("{name}: docs/runbooks.md does not name it"));
        }
        if !fired.contains(name) {
            problems.push(format!("{name}: no unit test where it fires"));
        }
        if !quiet.contains(name) {
            problems.push(format!("{name}: no unit test where it stays quiet"));
        }
    }
    for tested in fired.union(&quiet) {
        if !names.contains(tested) {
            problems.push(format!("alerts_test.yaml tests {tested}, which alerts.yaml lacks"));
        }
    }
    // The runbook's own links.
    for (i, _) in runbooks.match_indices("](#") {
        let rest = &runbooks[i + 3..];
        let anchor = &rest[..rest.find(')').unwrap_or(rest.len())];
        if !anchors.contains(anchor) {
            problems.push(format!("docs/runbooks.md links to #{anchor}, which it lacks"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}\nanchors: {anchors:?}");
}

#[test]
fn the_dashboard_is_provisioning_ready() {
    let dash = dashboard();
    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };

    // Provisioning keys: a stable uid, no database id, a title, a current classic schema
    // (Grafana 11 writes 39-41, 12 and 13 write 42, the last of the classic model).
    check(
        dash["id"].is_null(),
        format!("id {} (provisioned dashboards leave it null)", dash["id"]),
    );
    let uid = dash["uid"].as_str().unwrap_or_default();
    check(
        !uid.is_empty()
            && uid.len() <= 40
            && uid.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
        format!("uid {uid:?}"),
    );
    check(dash["title"].as_str().is_some_and(|t| !t.is_empty()), "no title".into());
    let schema = dash["schemaVersion"].as_u64().unwrap_or(0);
    check((39..=42).contains(&schema), format!("schemaVersion {schema}"));

    // The data source is a variable, so the file provisions against any Prometheus.
    let vars = dash["templating"]["list"].as_array().cloned().unwrap_or_default();
    let var_names: BTreeSet<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    check(
        vars.iter().any(|v| {
            v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"
        }),
        "no datasource variable DS_PROMETHEUS of type prometheus".into(),
    );
    let ds = serde_json::json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    for v in vars.iter().filter(|v| v["type"] == "query") {
        check(
            v["datasource"] == ds,
            format!("variable {}: datasource {}", v["name"], v["datasource"]),
        );
    }

    // Rows for the three audiences.
    let panels = all_panels(&dash);
    let rows: Vec<&str> =
        panels.iter().filter(|p| p["type"] == "row").filter_map(|p| p["title"].as_str()).collect();
    for audience in ["Overview", "On-call", "Debug"] {
        check(
            rows.iter().any(|r| r.starts_with(audience)),
            format!("no {audience} row in {rows:?}"),
        );
    }

    let known_types = ["row", "timeseries", "stat", "gauge", "bargauge", "table", "state-timeline"];
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        let id = p["id"].as_u64();
        check(
            id.is_some_and(|id| ids.insert(id)),
            format!("panel {title:?}: id {} missing or repeated", p["id"]),
        );
        let kind = p["type"].as_str().unwrap_or_default();
        check(known_types.contains(&kind), format!("panel {title:?}: type {kind:?}"));
        let g = &p["gridPos"];
        let (x, y, w, h) = (g["x"].as_u64(), g["y"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        let Some((x, y, w, h)) = x.zip(y).zip(w).zip(h).map(|(((x, y), w), h)| (x, y, w, h)) else {
            check(false, format!("panel {title:?}: gridPos {g}"));
            continue;
        };
        check(
            w > 0 && h > 0 && x + w <= 24,
            format!("panel {title:?}: gridPos {g} off the 24-column grid"),
        );
        for (bx, by, bw, bh, other) in &boxes {
            let overlap = x < bx + bw && *bx < x + w && y < by + bh && *by < y + h;
            check(!overlap, format!("panels {title:?} and {other:?} overlap"));
        }
        boxes.push((x, y, w, h, title.clone()));
        if kind == "row" {
            continue;
        }
        check(p["datasource"] == ds, format!("panel {title:?}: datasource {}", p["datasource"]));
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        check(!targets.is_empty(), format!("panel {title:?}: no query"));
        let mut refs = BTreeSet::new();
        for t in &targets {
            check(
                t["datasource"] == ds,
                format!("panel {title:?}: target datasource {}", t["datasource"]),
            );
            check(
                t["refId"].as_str().is_some_and(|r| refs.insert(r.to_string())),
                format!("panel {title:?}: refId {} missing or repeated", t["refId"]),
            );
            let expr = t["expr"].as_str().unwrap_or_default();
            check(!expr.trim().is_empty(), format!("panel {title:?}: empty expr"));
            // Every `$variable` a query uses is defined (Grafana's own `$__…` aside).
            for var in expr.split('$').skip(1) {
                let name: String =
                    var.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                check(
                    name.starts_with("__") || var_names.contains(name.as_str()),
                    format!("panel {title:?}: ${name} is not a dashboard variable"),
                );
            }
        }
    }
    if let Some(repeat) = panels.iter().find_map(|p| p["repeat"].as_str()) {
        let v = vars.iter().find(|v| v["name"] == repeat);
        check(
            v.is_some_and(|v| v["multi"] == true || v["includeAll"] == true),
            format!("a row repeats over ${repeat}, which is not a multi-value variable"),
        );
    }
    // The provider file that provisions it.
    let provider = yaml(PROVIDER);
    let file_provider = provider["providers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|p| p["type"].as_str() == Some("file") && p["options"]["path"].as_str().is_some());
    check(provider["apiVersion"].as_u64() == Some(1), format!("{PROVIDER}: apiVersion 1"));
    check(file_provider, format!("{PROVIDER}: no file provider with options.path"));
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn dashboard_and_alerts_use_only_what_a_running_flowgate_exports() {
    let gw = start_gateway();
    gw.quarantine("127.0.0.9");
    let scrape = gw.scrape();
    // The checker must be able to fail: a misspelt metric, a made-up label value, an
    // unknown grouping label.
    assert!(!scrape.check_expr("sum(rate(flowgate_flows_totl[5m]))").is_empty());
    assert!(!scrape.check_expr("rate(flowgate_flows_total{verdict=\"denied\"}[5m])").is_empty());
    assert!(!scrape.check_expr("sum by (policy) (rate(flowgate_flows_total[5m]))").is_empty());
    assert!(!scrape.check_expr("up == 0").is_empty());
    assert!(
        scrape
            .check_expr("sum by (job, listener) (rate(flowgate_flows_total{verdict=\"deny\"}[5m]))")
            .is_empty()
    );

    let mut problems = Vec::new();
    let dash = dashboard();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() > 20, "only {} dashboard queries", queries.len());
    for (at, expr) in &queries {
        problems
            .extend(scrape.check_expr(expr).into_iter().map(|p| format!("{DASHBOARD} {at}: {p}")));
    }
    for (var, sel, label) in dashboard_label_values(&dash) {
        problems
            .extend(scrape.check_expr(&sel).into_iter().map(|p| format!("variable {var}: {p}")));
        let metric =
            promql(&sel).ok().and_then(|p| p.selectors.into_iter().next()).map(|s| s.metric);
        let has = metric.as_deref().is_some_and(|m| scrape.label_values(m, &label).is_some());
        if !TARGET_LABELS.contains(&label.as_str()) && !has {
            problems.push(format!("variable {var}: {sel} has no label {label}"));
        }
    }
    for (name, rule) in alert_rules() {
        let expr = rule["expr"].as_str().unwrap_or_default();
        problems
            .extend(scrape.check_expr(expr).into_iter().map(|p| format!("{ALERTS} {name}: {p}")));
    }
    // The unit tests' input series look like real ones.
    let tests = yaml(ALERT_TESTS);
    for t in tests["tests"].as_sequence().expect("tests") {
        for s in t["input_series"].as_sequence().map(Vec::as_slice).unwrap_or_default() {
            let series = s["series"].as_str().unwrap_or_default();
            problems.extend(
                scrape
                    .check_expr(series)
                    .into_iter()
                    .map(|p| format!("{ALERT_TESTS} {series}: {p}")),
            );
        }
    }
    // The admin paths the runbooks send operators to exist (a 404 would be a dead end).
    let runbooks = read(RUNBOOKS);
    let mut paths = BTreeSet::new();
    for (i, _) in runbooks.match_indices("http://127.0.0.1:9901/") {
        let rest = &runbooks[i + "http://127.0.0.1:9901".len()..];
        let end =
            rest.find(|c: char| c == '\'' || c == '`' || c.is_whitespace()).unwrap_or(rest.len());
        paths.insert(rest[..end].to_string());
    }
    assert!(paths.len() >= 4, "runbook admin paths: {paths:?}");
    for path in &paths {
        if path == "/emergency" || path == "/reload" {
            continue; // POST only; used with a token
        }
        let (status, body) = http_get(gw.admin, path);
        if status == 0 || status == 404 || status == 405 {
            problems.push(format!("{RUNBOOKS}: GET {path} answers {status}: {body}"));
        }
    }

    // Prometheus' own parser reads every dashboard query (Grafana variables substituted).
    if require(&["promtool"]) {
        let dir = tempfile::tempdir().unwrap();
        let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (n, (_, expr)) in queries.iter().enumerate() {
            let expr = substitute(expr);
            rules.push_str(&format!(
                "      - record: dashboard:query_{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
        let file = dir.path().join("dashboard_rules.yaml");
        std::fs::write(&file, rules).unwrap();
        let out = Command::new("promtool").args(["check", "rules"]).arg(&file).output().unwrap();
        ok_output("promtool check rules (dashboard queries)", out);
    }
    assert!(
        problems.is_empty(),
        "{problems:#?}\nexported: {:?}",
        scrape.0.keys().collect::<Vec<_>>()
    );
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    if !require(&["prometheus"]) {
        return;
    }
    let gw = start_gateway();
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = data.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: flowgate\n    static_configs:\n      - targets: ['{}']\n",
            gw.admin
        ),
    )
    .unwrap();
    let log = std::fs::File::create(data.path().join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", data.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus starts");
    let _prom = Proc(child);
    let prom: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let query = |q: &str| -> Option<Json> {
        let path = format!("/api/v1/query?query={}", url_encode(q));
        let (status, body) = try_http_get(prom, &path)?;
        (status == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    };
    let value = |q: &str| -> Option<f64> {
        query(q)?["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let wait_for = |q: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while value(q).is_none_or(|v| v < want) {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(data.path().join("prometheus.log")).unwrap_or_default();
                panic!("Prometheus never reported {q} >= {want}; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    // Enough scrapes for rate() over a minute; then a quarantine, so the generation changes
    // (the dashboard's annotation) and the TTL'd-policy series exist.
    wait_for("count_over_time(flowgate_policy_generation[1m])", 3.0);
    gw.quarantine("127.0.0.9");
    wait_for("flowgate_emergency_entries", 1.0);
    wait_for("count_over_time(flowgate_policy_next_expiry_timestamp_seconds[1m])", 2.0);

    let dash = dashboard();
    let mut problems = Vec::new();
    let mut queries = dashboard_queries(&dash);
    for (var, sel, _) in dashboard_label_values(&dash) {
        queries.push((format!("variable {var}"), sel));
    }
    for (at, expr) in &queries {
        let q = substitute(expr);
        match query(&q) {
            Some(v) if v["status"] == "success" => {
                if v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
                    problems.push(format!("{at}: no data for {q}"));
                }
            }
            other => problems.push(format!("{at}: {q} failed: {other:?}")),
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn runbook_commands_and_flags_exist() {
    let help = |args: &[&str]| -> String {
        let out =
            Command::new(env!("CARGO_BIN_EXE_flowgate")).args(args).arg("--help").output().unwrap();
        ok_output(&format!("flowgate {} --help", args.join(" ")), out)
    };
    let top = help(&[]);
    let runbooks = read(RUNBOOKS);
    // Code only: fenced blocks and `inline` spans.
    let mut code = Vec::new();
    let mut fenced = false;
    for line in runbooks.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if fenced {
            code.push(line.to_string());
        } else {
            code.extend(line.split('`').skip(1).step_by(2).map(String::from));
        }
    }
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for snippet in &code {
        for (i, _) in snippet.match_indices("flowgate ") {
            let rest = &snippet[i + "flowgate ".len()..];
            let words: Vec<&str> = rest.split_whitespace().collect();
            let Some(&sub) = words.first() else { continue };
            if sub.starts_with('-') || !sub.bytes().all(|c| c.is_ascii_lowercase()) {
                continue;
            }
            if !top.lines().any(|l| l.trim_start().starts_with(&format!("{sub} "))) {
                problems.push(format!("`flowgate {sub}` is not a command: {snippet}"));
                continue;
            }
            used.insert(sub.to_string());
            let sub_help = help(&[sub]);
            for flag in words.iter().skip(1).take_while(|w| !["|", "#", "&&", ";"].contains(w)) {
                if flag.starts_with("--") {
                    let flag = flag.split('=').next().unwrap_or(flag);
                    if !sub_help.contains(&format!("{flag} ")) {
                        problems.push(format!("`flowgate {sub}` has no {flag}: {snippet}"));
                    }
                }
            }
        }
    }
    for needed in ["explain", "quarantine", "status", "reload", "check"] {
        if !used.contains(needed) {
            problems.push(format!("the runbooks never show `flowgate {needed}`"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_promql_reader_finds_selectors_labels_and_made_labels() {
    let p = promql(
        "count by (job) (count_values by (job) (\"policies\", flowgate_policy_policies)) > 1 \
         or sum without (instance) (rate(flowgate_flows_total{verdict=\"deny\", listener=~\"$listener\"}[$__rate_interval] offset 5m)) > 3 * time()",
    )
    .unwrap();
    let metrics: Vec<&str> = p.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(metrics, ["flowgate_policy_policies", "flowgate_flows_total"]);
    assert_eq!(p.grouping, ["job", "job", "instance"]);
    assert_eq!(p.made, ["policies"]);
    assert_eq!(
        p.selectors[1].matchers,
        [
            ("verdict".to_string(), "=".to_string(), "deny".to_string()),
            ("listener".to_string(), "=~".to_string(), "$listener".to_string())
        ]
    );
    assert!(promql("rate(flowgate_flows_total{verdict=deny}[5m])").is_err());
}
