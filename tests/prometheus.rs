//! A real Prometheus scrapes flowgate's admin `/metrics`; the test asks Prometheus' HTTP
//! API for flowgate's metrics, and `promtool check metrics` lints the exposition.
//!
//! Needs the Debian package `prometheus` (scripts/setup.sh installs it); without
//! `prometheus`/`promtool` on PATH the test is skipped, saying so (and fails in CI).
//!
//! To check more metrics once the listeners are wired in, add `(query, expected)` pairs to
//! `EXPECTED` (or query in the test body with `query_value`).

mod support;

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flowgate::admin::client::AdminClient;
use serde_json::Value;
use support::control::*;
use support::require::{Need, skip_unless};

/// PromQL query → the value Prometheus must report (after the scrape).
const EXPECTED: &[(&str, f64)] = &[
    ("flowgate_policy_generation", 2.0),
    ("flowgate_policy_reloads_total{result=\"ok\"}", 2.0),
    ("flowgate_flows_total{listener=\"demo\",verdict=\"allow\"}", 3.0),
    ("flowgate_flows_total{listener=\"demo\",verdict=\"deny\"}", 1.0),
    ("flowgate_conntrack_capacity", 262144.0),
    ("flowgate_flowlog_dropped_total", 0.0),
];

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn query_value(prom: std::net::SocketAddr, q: &str) -> Option<f64> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let r = AdminClient::new(prom, None).get(&format!("/api/v1/query?query={enc}")).await.ok()?;
    let v: Value = serde_json::from_str(&r.body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_flowgate() {
    if skip_unless(&[Need::Bin("prometheus"), Need::Bin("promtool")]) {
        return;
    }
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    let control = fx.control();
    let tasks = start(&control);
    // Counters as the listeners will bump them.
    let demo = fx.metrics.listener("demo", "tcp");
    for _ in 0..3 {
        flowgate::telemetry::metrics::ListenerCounters::inc(&demo.allowed);
    }
    flowgate::telemetry::metrics::ListenerCounters::inc(&demo.denied);
    for ns in [800u64, 1200, 90_000] {
        fx.metrics.decision.record(Duration::from_nanos(ns));
    }
    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    assert_eq!(control.reload(flowgate::control::Trigger::Api).await.generation, 2);

    // promtool lints the exposition exactly as served.
    let exposition = AdminClient::new(tasks.admin_addr, None).get("/metrics").await.unwrap().body;
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    lint.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    let cfg_path = data.path().join("prometheus.yml");
    std::fs::write(
        &cfg_path,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: flowgate\n    static_configs:\n      - targets: ['{}']\n",
            tasks.admin_addr
        ),
    )
    .unwrap();
    let log = std::fs::File::create(data.path().join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg_path.display()))
        .arg(format!("--storage.tsdb.path={}", data.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus starts");
    let _prom = KillOnDrop(child);
    let prom: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Bounded: Prometheus needs a few seconds to start and scrape.
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    let mut last = Vec::new();
    loop {
        last.clear();
        for (q, want) in EXPECTED {
            let got = query_value(prom, q).await;
            if got != Some(*want) {
                last.push(format!("{q}: got {got:?}, want {want}"));
            }
        }
        if last.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let log =
                std::fs::read_to_string(data.path().join("prometheus.log")).unwrap_or_default();
            let tail: String = log.lines().rev().take(15).collect::<Vec<_>>().join("\n");
            panic!(
                "Prometheus never reported: {last:?}\nprometheus log (last lines, reversed):\n{tail}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let count = query_value(prom, "flowgate_policy_decision_seconds_count").await;
    assert_eq!(count, Some(3.0));
    let up = query_value(prom, "up{job=\"flowgate\"}").await;
    assert_eq!(up, Some(1.0));
}
