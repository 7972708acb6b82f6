//! The gate on its own: `dataplane::admit` for a denied flow (decide + counters + a
//! flow-log `try_send`) and an allowed one (decide + conntrack insert, then remove), on the
//! bundled policy (config/flowgate.toml: 16 policies, 11 workloads).
//!
//! `cargo bench --bench admit -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::config::Config;
use flowgate::conntrack::{Conntrack, FlowState};
use flowgate::control::ControlPlane;
use flowgate::dataplane::{FlowRequest, ListenerTag, Runtime, admit, tcp_flow};
use flowgate::telemetry::flowlog::{FlowLog, FlowLogConfig};
use flowgate::telemetry::metrics::Registry;

fn bench(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/flowgate.toml");
    let cfg = Config::load(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log_cfg = FlowLogConfig {
        output: dir.path().join("flow.log").to_string_lossy().into_owned(),
        ..FlowLogConfig::default()
    };
    let registry = Arc::new(Registry::default());
    let (flowlog, writer) = FlowLog::start(&log_cfg, registry.clone()).unwrap();
    let conntrack = Arc::new(Conntrack::new(&cfg.conntrack));
    // The policy at generation 1, loaded the one way there is: by the control plane.
    let control =
        ControlPlane::new(cfg.clone(), conntrack.clone(), registry.clone(), Arc::new(|_, _, _| {}))
            .unwrap();
    let rt = Runtime::new(conntrack, control.policy(), registry.clone(), flowlog);
    let tag = ListenerTag {
        index: 0,
        name: Arc::from("demo"),
        counters: registry.listener("demo", "tcp"),
    };
    let web = "127.0.0.2:8081".parse().unwrap();
    let denied = tcp_flow("127.0.0.3:40000".parse().unwrap(), web);
    let mut g = c.benchmark_group("admit");
    g.bench_function("deny", |b| {
        b.iter(|| {
            black_box(admit(
                &rt,
                &tag,
                &FlowRequest::to(black_box(denied), FlowState::Open),
                Instant::now(),
            ))
        })
    });
    let mut port = 0u16;
    g.bench_function("allow+remove", |b| {
        b.iter(|| {
            port = port.wrapping_add(1).max(1);
            let k = tcp_flow(std::net::SocketAddr::from(([127, 0, 0, 1], port)), web);
            let a = admit(&rt, &tag, &FlowRequest::to(k, FlowState::Open), Instant::now());
            rt.conntrack.remove(&k);
            black_box(a)
        })
    });
    g.finish();
    writer.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
