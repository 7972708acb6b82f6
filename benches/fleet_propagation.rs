//! Propagation through an etcd fleet (issue 24): `push` → enforced on all three replicas.
//!
//! A three-member etcd cluster on loopback (as `tests/fleet_etcd.rs` starts it) and three
//! `flowgate run` replicas (the real binary) with `[source] kind = "etcd"`; a realistic set
//! (`support/realistic.rs`) pushed once, then N pushes that each rewrite one app's policy.
//! For each push: the time from starting `fleet::push_unchecked` (reading the files,
//! reading the prefix, one transaction; the CLI's local check of the set first is left
//! out: at 10,000 policies it is a full parse) until every replica's `/policy`
//! says it enforces the push's revision (polled every 2 ms, so up to 2 ms of it is the
//! poll). Prints p50, p99 and max per set size.
//!
//! `FLOWGATE_FLEET_SETS=1k,10k` (default), `FLOWGATE_FLEET_PUSHES=200` (default).
//! Run: `cargo bench --bench fleet_propagation` (skipped, saying so, without `etcd`).

#[path = "../tests/support/etcd.rs"]
#[allow(dead_code)]
mod etcd;
#[path = "support/realistic.rs"]
mod realistic;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowgate::admin::client::AdminClient;
use flowgate::control::fleet;
use flowgate::control::source::Keys;

const PREFIX: &str = "/bench";

struct Replica {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_replica(dir: &std::path::Path, i: usize, endpoints: &[String]) -> Replica {
    let eps = endpoints.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    let cfg = format!(
        "[policy]\ndefault = \"deny\"\n\n[source]\nkind = \"etcd\"\nendpoints = [{eps}]\n\
         prefix = \"{PREFIX}\"\nreplica_id = \"r{i}\"\n\n[control]\naudit_log = \"audit-{i}.jsonl\"\n\n\
         [flowlog]\noutput = \"flow-{i}.log\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n"
    );
    let path = dir.join(format!("r{i}.toml"));
    std::fs::write(&path, cfg).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowgate");
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut admin = None;
    for l in lines.by_ref() {
        let l = l.expect("stderr");
        if let Some(a) = l.strip_prefix("flowgate: admin API on http://") {
            admin = Some(a.trim().parse().expect("admin addr"));
        }
        if l.starts_with("flowgate: ready") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Replica { child, admin: admin.expect("admin address printed") }
}

async fn revision_of(admin: SocketAddr) -> i64 {
    match AdminClient::new(admin, None).get("/policy").await {
        Ok(a) => serde_json::from_str::<serde_json::Value>(&a.body)
            .ok()
            .and_then(|v| v["source"]["revision"].as_i64())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") && std::env::args().count() > 1 {
        return;
    }
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("SKIPPED fleet_propagation: `etcd` is not installed (scripts/setup.sh)");
        return;
    }
    let sets = std::env::var("FLOWGATE_FLEET_SETS").unwrap_or_else(|_| "1k,10k".into());
    let pushes: usize =
        std::env::var("FLOWGATE_FLEET_PUSHES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for label in sets.split(',') {
        let Some(shape) = realistic::Shape::by_label(label.trim()) else { continue };
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster = etcd::Cluster::start(dir.path(), 3);
        realistic::write(dir.path(), &shape);
        let client = cluster.client();
        let keys = Keys::new(PREFIX);
        let (pdir, inv) = (dir.path().join("policies"), dir.path().join("inventory.yaml"));
        let first = rt.block_on(fleet::push(&client, &keys, &pdir, &inv)).expect("first push");
        let replicas: Vec<Replica> =
            (0..3).map(|i| start_replica(dir.path(), i, &cluster.urls())).collect();
        eprintln!("{label}: {} objects pushed at revision {}", first.put, first.revision);
        let mut took = Vec::with_capacity(pushes);
        let mut pushed = Vec::with_capacity(pushes);
        for k in 0..pushes {
            let (n, a) = (k % shape.namespaces, (k / shape.namespaces) % shape.apps);
            realistic::rewrite(dir.path(), &shape, n, a, k + 1);
            let started = Instant::now();
            let s = rt.block_on(fleet::push_unchecked(&client, &keys, &pdir, &inv)).expect("push");
            pushed.push(started.elapsed());
            rt.block_on(async {
                for r in &replicas {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while revision_of(r.admin).await < s.revision {
                        assert!(
                            Instant::now() < deadline,
                            "replica {} never got {}",
                            r.admin,
                            s.revision
                        );
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            });
            took.push(started.elapsed());
        }
        took.sort();
        pushed.sort();
        let reloads: Vec<f64> = (0..3)
            .flat_map(|i| {
                std::fs::read_to_string(dir.path().join(format!("audit-{i}.jsonl")))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["trigger"] == "watch")
                    .filter_map(|v| v["duration"].as_f64())
                    .collect::<Vec<_>>()
            })
            .collect();
        let mean_reload = reloads.iter().sum::<f64>() / reloads.len().max(1) as f64;
        println!(
            "  of which the push (read files + prefix, one txn): p50 {:.1} ms, p99 {:.1} ms; \
             a replica's reload: mean {:.1} ms over {} reloads",
            pct(&pushed, 0.5).as_secs_f64() * 1e3,
            pct(&pushed, 0.99).as_secs_f64() * 1e3,
            mean_reload * 1e3,
            reloads.len(),
        );
        println!(
            "fleet_propagation {label} ({} workloads): {pushes} pushes, push→enforced on 3 replicas \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            shape.workloads(),
            pct(&took, 0.5).as_secs_f64() * 1e3,
            pct(&took, 0.99).as_secs_f64() * 1e3,
            took.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
        drop(replicas);
        drop(cluster);
    }
}
