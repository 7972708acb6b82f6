//! Control-plane benchmarks (numbers and commands in BENCHMARKS.md, "Control plane").
//!
//! - `reload/watch_to_enforce_10k`: a policy file of a 10,000-policy, 10,000-workload set is
//!   rewritten (rename-and-replace, as editors do); the time until the new generation is in
//!   force as seen through the policy handle (watch → debounce → load → compile → swap).
//! - `reload/direct_10k`: the same reload called directly (no watcher, no debounce): the
//!   peer that shows what watching and debouncing add.
//! - `hot/load_decide`: the data path's per-flow cost, `handle.load()` + `decide`, against
//!   `hot/decide_only` (the compiled policy already in hand) as the peer.
//! - `hot/latency_record`: `Registry::decision.record`, against a relaxed atomic add.
//! - realistic sets (`support/realistic.rs`; `FLOWGATE_BENCH_REALISTIC=1k,10k,100k`,
//!   default `10k`): start-up (`ControlPlane::new`: load + compile of generation 1), one
//!   app policy file rewritten → new generation in force, directly and through the watcher
//!   (p50/p99 over `FLOWGATE_BENCH_RELOADS` rewrites, default 50), and the RSS after the
//!   first reload and after all of them. Printed, not criterion-sampled: the acceptance is
//!   on percentiles.
//! - `FLOWGATE_REALISTIC_WRITE=DIR` (with `FLOWGATE_BENCH_REALISTIC=10k`): writes the set,
//!   a 1,000-case `cases.yaml` and a `flowgate.toml` under DIR for the CLI measurements
//!   (`flowgate check`, `flowgate test`, `flowgate run`), then exits.

#[path = "support/realistic.rs"]
mod realistic;

/// The binary's allocator (src/main.rs), so reload times and RSS are what `flowgate run`
/// sees.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::config::Config;
use flowgate::conntrack::Conntrack;
use flowgate::control::{ControlPlane, Trigger};
use flowgate::flow::Proto;
use flowgate::policy::FlowQuery;
use flowgate::telemetry::metrics::Registry;

/// Policies and workloads in the set: 10,000 each (the acceptance size) unless
/// `FLOWGATE_BENCH_SCALE` says otherwise (a smaller run shows how reload time scales).
fn scale() -> usize {
    std::env::var("FLOWGATE_BENCH_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}
const FILES: usize = 100;

fn ip(i: usize) -> String {
    format!("198.18.{}.{}", i / 256, i % 256)
}

fn policy_file(f: usize, version: usize) -> String {
    // The version comment makes every rewrite a new content hash even when the ports
    // come round to an earlier value.
    let mut out = format!("# version {version}\n");
    for i in (f * scale() / FILES)..((f + 1) * scale() / FILES) {
        let port = 8000 + (i + version) % 1000;
        out.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: p{i}, namespace: ns{ns}}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: w{i}}}}}\n  policyTypes: [Ingress, Egress]\n  \
             ingress:\n    - from:\n        - namespaceSelector: {{}}\n          \
             podSelector: {{matchLabels: {{app: w{prev}}}}}\n      ports: [{{port: {port}}}]\n  \
             egress:\n    - to:\n        - namespaceSelector: {{}}\n          \
             podSelector: {{matchLabels: {{app: w{next}}}}}\n      ports: [{{port: {port}}}]\n",
            ns = i % 100,
            prev = (i + scale() - 1) % scale(),
            next = (i + 1) % scale(),
        ));
    }
    out
}

fn write_set(dir: &Path) {
    let mut inv = String::from("namespaces:\n");
    for n in 0..100 {
        inv.push_str(&format!("  - name: ns{n}\n    labels: {{team: t{}}}\n", n % 7));
    }
    inv.push_str("workloads:\n");
    for i in 0..scale() {
        inv.push_str(&format!(
            "  - {{name: w{i}, namespace: ns{}, labels: {{app: w{i}, tier: t{}}}, ips: [{}]}}\n",
            i % 100,
            i % 3,
            ip(i)
        ));
    }
    std::fs::write(dir.join("inventory.yaml"), inv).unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    for f in 0..FILES {
        std::fs::write(dir.join(format!("policies/f{f:03}.yaml")), policy_file(f, 0)).unwrap();
    }
}

fn control(dir: &Path, watch: bool) -> ControlPlane {
    let toml = format!(
        "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\n\
         [control]\nwatch = {watch}\naudit_log = \"audit.jsonl\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\ntoken = \"bench\"\n"
    );
    std::fs::write(dir.join("flowgate.toml"), toml).unwrap();
    let cfg = Config::load(&dir.join("flowgate.toml")).unwrap();
    let ct = Arc::new(Conntrack::new(&cfg.conntrack));
    ControlPlane::new(cfg, ct, Arc::new(Registry::default()), Arc::new(|_, _, _| {})).unwrap()
}

fn replace(path: &Path, text: &str) {
    let tmp = path.with_file_name(".bench.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Where a reload's time goes: hashing, loading (YAML → IR), compiling.
fn breakdown(dir: &Path) {
    let t = Instant::now();
    let hash =
        flowgate::control::reload::hash_sources(&dir.join("policies"), &dir.join("inventory.yaml"));
    let hashing = t.elapsed();
    let t = Instant::now();
    let set =
        flowgate::policy::load::load(&dir.join("policies"), &dir.join("inventory.yaml")).unwrap();
    let loading = t.elapsed();
    let t = Instant::now();
    let opts = flowgate::policy::CompileOptions {
        default: flowgate::policy::DefaultAction::Deny,
        unknown: flowgate::policy::DefaultAction::Deny,
        now: std::time::SystemTime::now(),
    };
    let compiled = flowgate::policy::CompiledPolicy::compile(&set, &opts).unwrap();
    let compiling = t.elapsed();
    let t = Instant::now();
    let cloned = set.clone();
    let cloning = t.elapsed();
    black_box((hash, &compiled, cloned));
    let t = Instant::now();
    drop(compiled);
    let freeing = t.elapsed();
    eprintln!(
        "breakdown (cold, whole set): hash {:.1} ms, load {:.1} ms, compile {:.1} ms, \
         clone {:.1} ms, free compiled {:.1} ms",
        hashing.as_secs_f64() * 1e3,
        loading.as_secs_f64() * 1e3,
        compiling.as_secs_f64() * 1e3,
        cloning.as_secs_f64() * 1e3,
        freeing.as_secs_f64() * 1e3
    );
    // The steps of a reload after one file of the 100 changed, as the reloader times them.
    let control = control(dir, false);
    let mut reports = Vec::new();
    for version in 1..=PHASE_RUNS {
        let f = version % FILES;
        replace(&dir.join(format!("policies/f{f:03}.yaml")), &policy_file(f, 100_000 + version));
        let report = control.reload_blocking(Trigger::Api);
        assert_eq!(report.result, flowgate::control::ReloadResult::Ok);
        reports.push(report);
    }
    print_phases("direct reload, one file changed", &reports);
}

/// Reloads whose phases are printed (median of each phase).
const PHASE_RUNS: usize = 11;

fn print_phases(what: &str, reports: &[flowgate::control::ReloadReport]) {
    let median = |f: &dyn Fn(&flowgate::control::ReloadReport) -> Duration| {
        let mut v: Vec<Duration> = reports.iter().map(f).collect();
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let p = |r: &flowgate::control::ReloadReport| r.phases;
    eprintln!(
        "phases ({what}; median of {}): scan {:.2} ms, load {:.2} ms, compile {:.1} ms, \
         swap {:.3} ms, to swap {:.1} ms, whole apply {:.1} ms; files read {}, parsed {}",
        reports.len(),
        median(&|r| p(r).scan),
        median(&|r| p(r).load),
        median(&|r| p(r).compile),
        median(&|r| p(r).swap),
        median(&|r| p(r).scan + p(r).load + p(r).compile + p(r).swap),
        median(&|r| r.duration),
        reports.last().map_or(0, |r| p(r).files_read),
        reports.last().map_or(0, |r| p(r).files_parsed),
    );
}

fn reload_benches(c: &mut Criterion) {
    if std::env::var_os("FLOWGATE_BENCH_REALISTIC_ONLY").is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path());
    breakdown(dir.path());
    if std::env::var_os("FLOWGATE_BENCH_BREAKDOWN_ONLY").is_some() {
        return;
    }
    let mut group = c.benchmark_group("reload");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));

    {
        let control = control(dir.path(), false);
        let mut version = 0;
        group.bench_function(format!("direct_{}", scale()), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    version += 1;
                    let f = version % FILES;
                    let path = dir.path().join(format!("policies/f{f:03}.yaml"));
                    replace(&path, &policy_file(f, version));
                    let start = Instant::now();
                    let report = control.reload_blocking(Trigger::Api);
                    total += start.elapsed();
                    assert_eq!(report.result, flowgate::control::ReloadResult::Ok);
                }
                total
            })
        });
    }

    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let control = control(dir.path(), true);
    let tasks = {
        let _in_runtime = rt.enter();
        control.start().unwrap()
    };
    let handle = control.policy();
    let mut version = 1_000;
    group.bench_function(format!("watch_to_enforce_{}", scale()), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                version += 1;
                let f = version % FILES;
                let path = dir.path().join(format!("policies/f{f:03}.yaml"));
                let text = policy_file(f, version);
                let before = handle.load().generation;
                let start = Instant::now();
                replace(&path, &text);
                while handle.load().generation == before {
                    assert!(start.elapsed() < Duration::from_secs(300), "reload never came");
                    std::thread::sleep(Duration::from_micros(200));
                }
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
    // The same watched rewrites again, each waited for until its reload is recorded, to
    // see where the time to the swap goes.
    let mut reports = Vec::new();
    for _ in 0..PHASE_RUNS {
        version += 1;
        let f = version % FILES;
        let before = handle.load().generation;
        replace(&dir.path().join(format!("policies/f{f:03}.yaml")), &policy_file(f, version));
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < Duration::from_secs(300), "reload never came");
            if let Some(r) = control.status().last
                && r.generation > before.0
            {
                reports.push(r);
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    drop(tasks);
    print_phases("watched reload", &reports);
}

fn hot_path(c: &mut Criterion) {
    if std::env::var_os("FLOWGATE_BENCH_REALISTIC_ONLY").is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path());
    let control = control(dir.path(), false);
    let handle = control.policy();
    let queries: Vec<(std::net::IpAddr, std::net::IpAddr, u16)> = (0..1024)
        .map(|k| {
            let i = (k * 7919) % scale();
            (
                ip(i).parse().unwrap(),
                ip((i + 1) % scale()).parse().unwrap(),
                8000 + (i % 1000) as u16,
            )
        })
        .collect();
    let mut group = c.benchmark_group("hot");
    let mut k = 0usize;
    group.bench_function("load_decide", |b| {
        b.iter(|| {
            k = (k + 1) & 1023;
            let (src, dst, port) = queries[k];
            let snap = handle.load();
            let d = snap.compiled.decide(&FlowQuery {
                src,
                dst,
                dst_port: port,
                proto: Proto::Tcp,
                fqdn: None,
            });
            black_box((d, snap.generation))
        })
    });
    let snap = handle.load_full();
    group.bench_function("decide_only", |b| {
        b.iter(|| {
            k = (k + 1) & 1023;
            let (src, dst, port) = queries[k];
            black_box(snap.compiled.decide(&FlowQuery {
                src,
                dst,
                dst_port: port,
                proto: Proto::Tcp,
                fqdn: None,
            }))
        })
    });
    // Recording a decision's latency: the per-worker hdrhistogram slot against a bare
    // relaxed atomic add (the cheapest possible recording) as the peer.
    let registry = Registry::default();
    group.bench_function("latency_record", |b| {
        b.iter(|| registry.decision.record(black_box(Duration::from_nanos(137))))
    });
    let counter = std::sync::atomic::AtomicU64::new(0);
    group.bench_function("atomic_add_peer", |b| {
        b.iter(|| counter.fetch_add(black_box(137), std::sync::atomic::Ordering::Relaxed))
    });
    group.finish();
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99), at(1.0))
}

/// Writes a realistic set for the CLI measurements and exits, when asked to.
fn write_only(_: &mut Criterion) {
    let Some(dir) = std::env::var_os("FLOWGATE_REALISTIC_WRITE") else { return };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shape = realistic::Shape::from_env("10k")[0];
    realistic::write(&dir, &shape);
    std::fs::write(dir.join("cases.yaml"), realistic::cases(&shape, 1000)).unwrap();
    let toml = "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\n\
                [control]\nwatch = true\n\
                [admin]\nbind = \"127.0.0.1:0\"\ntoken = \"bench\"\n";
    std::fs::write(dir.join("flowgate.toml"), toml).unwrap();
    eprintln!("wrote {} under {}", shape.label(), dir.display());
    std::process::exit(0);
}

fn realistic_reload(_: &mut Criterion) {
    let runs: usize =
        std::env::var("FLOWGATE_BENCH_RELOADS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    for shape in realistic::Shape::from_env("10k") {
        let label = shape.label();
        let dir = tempfile::tempdir().unwrap();
        realistic::write(dir.path(), &shape);
        let rss0 = rss_kib();
        let t = Instant::now();
        let plane = control(dir.path(), false);
        let start = t.elapsed();
        eprintln!(
            "{label}: start (load + compile generation 1) {:.0} ms, RSS +{} MiB",
            start.as_secs_f64() * 1e3,
            rss_kib().saturating_sub(rss0) / 1024
        );
        if let Some(first) = plane.status().last {
            print_phases(&format!("{label} start-up"), &[first]);
        }
        // Direct reloads: one app policy rewritten each time (each scans every file, as
        // SIGHUP and `POST /reload` do, so at most 50 unless asked for more).
        let direct: usize = std::env::var("FLOWGATE_BENCH_DIRECT_RELOADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(runs.min(50));
        let mut times = Vec::new();
        let mut reports = Vec::new();
        let mut rss_first = 0;
        for v in 1..=direct {
            let (n, a) = (v * 7 % shape.namespaces, v * 13 % shape.apps);
            realistic::rewrite(dir.path(), &shape, n, a, v);
            let t = Instant::now();
            let report = plane.reload_blocking(Trigger::Api);
            times.push(t.elapsed());
            assert_eq!(report.result, flowgate::control::ReloadResult::Ok, "{:?}", report.errors);
            reports.push(report);
            if v == 1 {
                std::thread::sleep(Duration::from_millis(50));
                rss_first = rss_kib();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let rss_last = rss_kib();
        let (p50, p99, max) = percentiles(times);
        eprintln!(
            "{label}: direct reload, one file changed: p50 {p50:.1} ms, p99 {p99:.1} ms, \
             max {max:.1} ms ({direct} runs); RSS after 1st reload {} MiB, after {direct} {} MiB",
            rss_first / 1024,
            rss_last / 1024
        );
        print_phases(&format!("{label} direct reload"), &reports);
        drop(plane);

        // Through the watcher: rename-and-replace → new generation seen through the handle.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let plane = control(dir.path(), true);
        let tasks = {
            let _in_runtime = rt.enter();
            plane.start().unwrap()
        };
        let handle = plane.policy();
        let mut times = Vec::new();
        let mut reports = Vec::new();
        let mut rss_first = 0;
        for v in 1..=runs {
            let version = 100_000 + v;
            let (n, a) = (v * 11 % shape.namespaces, v * 17 % shape.apps);
            let before = handle.load().generation;
            let t = Instant::now();
            realistic::rewrite(dir.path(), &shape, n, a, version);
            while handle.load().generation == before {
                assert!(t.elapsed() < Duration::from_secs(300), "reload never came");
                std::thread::sleep(Duration::from_micros(200));
            }
            times.push(t.elapsed());
            // Let the reload's bookkeeping finish before the next change.
            std::thread::sleep(Duration::from_millis(20));
            if let Some(r) = plane.status().last
                && r.generation > before.0
            {
                reports.push(r);
            }
            if v == 1 {
                std::thread::sleep(Duration::from_millis(50));
                rss_first = rss_kib();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let rss_last = rss_kib();
        let (p50, p99, max) = percentiles(times);
        eprintln!(
            "{label}: file change → enforced (watcher): p50 {p50:.1} ms, p99 {p99:.1} ms, \
             max {max:.1} ms ({runs} runs); RSS after 1st reload {} MiB, after {runs} {} MiB",
            rss_first / 1024,
            rss_last / 1024
        );
        print_phases(&format!("{label} watched reload"), &reports);
        let slow: Vec<String> = reports
            .iter()
            .filter(|r| r.duration > Duration::from_millis(100))
            .map(|r| {
                let p = r.phases;
                format!(
                    "{:.0} ms (scan {:.0}, load {:.0}, compile {:.0}, read {})",
                    r.duration.as_secs_f64() * 1e3,
                    p.scan.as_secs_f64() * 1e3,
                    p.load.as_secs_f64() * 1e3,
                    p.compile.as_secs_f64() * 1e3,
                    p.files_read
                )
            })
            .collect();
        if !slow.is_empty() {
            eprintln!("{label}: watched reloads over 100 ms: {}", slow.join("; "));
        }
        drop(tasks);
    }
}

/// `FLOWGATE_BENCH_COMPILE_LOOP=N`: only the compiler, N times, on the realistic set with
/// one app policy replaced each time (the reloader's `compile_with` and its cache), then
/// exits. What `perf record` is pointed at to see where a reload's compile goes.
fn compile_loop(_: &mut Criterion) {
    let Some(n) = std::env::var("FLOWGATE_BENCH_COMPILE_LOOP").ok().and_then(|v| v.parse().ok())
    else {
        return;
    };
    let shape = realistic::Shape::from_env("10k")[0];
    let dir = tempfile::tempdir().unwrap();
    realistic::write(dir.path(), &shape);
    let policies = dir.path().join("policies");
    let inventory = dir.path().join("inventory.yaml");
    let t = Instant::now();
    let mut set = flowgate::policy::load::load(&policies, &inventory).unwrap();
    let load = t.elapsed();
    let opts = flowgate::policy::CompileOptions {
        default: flowgate::policy::DefaultAction::Deny,
        unknown: flowgate::policy::DefaultAction::Deny,
        now: std::time::SystemTime::now(),
    };
    let mut cache = flowgate::policy::CompileCache::default();
    let t = Instant::now();
    let first = flowgate::policy::CompiledPolicy::compile_with(&set, &opts, &mut cache).unwrap();
    eprintln!(
        "{}: load {:.0} ms, first compile {:.1} ms",
        shape.label(),
        load.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut keep = Some(first);
    let mut times = Vec::new();
    for v in 1..=n {
        let (ns, app) = (v * 7 % shape.namespaces, v * 13 % shape.apps);
        let file = realistic::app_file(&policies, ns, app);
        let text = realistic::app_policy(&shape, ns, app, v);
        let fresh = flowgate::policy::load::parse_policies(&text, &file).unwrap();
        let at = set.policies.iter().position(|p| p.source == file).unwrap();
        let mut next = set.clone();
        next.policies[at] = Arc::new(fresh.into_iter().next().unwrap());
        set = next;
        let t = Instant::now();
        let c = flowgate::policy::CompiledPolicy::compile_with(&set, &opts, &mut cache).unwrap();
        times.push(t.elapsed());
        drop(keep.replace(c));
    }
    let (p50, p99, max) = percentiles(times);
    eprintln!(
        "{}: compile, one policy replaced: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms ({n} runs)",
        shape.label()
    );
    std::process::exit(0);
}

criterion_group!(benches, write_only, compile_loop, realistic_reload, reload_benches, hot_path);
criterion_main!(benches);
