//! `flowgate run` as a real process: the bundled config serves its demo out of the box,
//! SIGTERM stops accepting and drains open connections, and the drain is bounded by
//! `run.drain_timeout`. Every bind is port 0 (the bundled config runs from a copy with its
//! ports moved), so these tests pass next to the README's own gateway. Every wait is
//! bounded; the child is killed (by its pid) if a test fails half-way, and one that exits
//! early fails the test with its exit status and stderr.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::l4::*;
use support::process::{BundledCopy, Flowgate};
use support::require::{Need, skip_unless};

/// The admin token the bundled config's gateway gets (from `FLOWGATE_ADMIN_TOKEN`).
const TOKEN: &str = "l4-run-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_drains_then_exits_zero() {
    let up = Upstream::echo().await;
    let world = World::new();
    let cfg = world.write_config(&format!(
        "[run]\ndrain_timeout = \"20s\"\n\n{}",
        tcp_listener("gw", &[up.addr], "")
    ));
    let mut fg = Flowgate::run(&cfg);
    let addr = fg.listener("gw");
    fg.wait_ready();
    let mut held = connect_from(OK, addr).await.unwrap();
    assert_eq!(roundtrip(&mut held, b"before").await, b"before");

    fg.signal(libc::SIGTERM);
    fg.wait_stderr("stopped accepting", Duration::from_secs(5));
    // New connections are refused: the listening socket is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connect_from(OK, addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => assert!(Instant::now() < deadline, "still accepting after SIGTERM"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open connection keeps working while the process drains.
    assert_eq!(roundtrip(&mut held, b"during drain").await, b"during drain");
    assert!(fg.child.try_wait().unwrap().is_none(), "exited with a connection open");
    drop(held);
    let st = fg.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st:?}");
    fg.wait_stderr("drained in", Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_bounded_by_drain_timeout() {
    let up = Upstream::echo().await;
    let world = World::new();
    let cfg = world.write_config(&format!(
        "[run]\ndrain_timeout = \"300ms\"\n\n{}",
        tcp_listener("gw", &[up.addr], "")
    ));
    let mut fg = Flowgate::run(&cfg);
    let addr = fg.listener("gw");
    fg.wait_ready();
    let mut held = connect_from(OK, addr).await.unwrap();
    assert_eq!(roundtrip(&mut held, b"x").await, b"x");
    fg.signal(libc::SIGINT);
    let st = fg.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st:?}");
    fg.wait_stderr("drain timeout", Duration::from_secs(2));
}

/// The bundled config on a machine with nothing else set up: the demo client (127.0.0.1)
/// is echoed by the built-in demo upstream through port 8080, another address is reset,
/// and its denial is on stdout as a flow-log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_config_serves_the_demo() {
    let bundled = BundledCopy::new();
    let mut fg = bundled.run(TOKEN);
    let addr = fg.listener("demo");
    let mut s = connect_from("127.0.0.1", addr).await.unwrap();
    assert_eq!(roundtrip(&mut s, b"hello flowgate\n").await, b"hello flowgate\n");
    drop(s);
    expect_reset("127.0.0.3", addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let deny = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = fg.next_stdout(left).expect("a deny line on stdout");
        let v: serde_json::Value = serde_json::from_str(&line).expect("stdout is JSON lines");
        if v["event"] == "deny" {
            break v;
        }
    };
    assert_eq!(deny["listener"], "demo");
    assert!(deny["src"].as_str().unwrap().starts_with("127.0.0.3:"));
    assert_eq!(deny["dst"], format!("127.0.0.2:{}", bundled.demo_web_port));
    assert_eq!(deny["dst_workload"], "edge/demo-web");
    fg.signal(libc::SIGTERM);
    assert!(fg.wait_exit(Duration::from_secs(10)).success());
}

/// Why huge pages cannot be expected on this machine, if they cannot: transparent huge
/// pages turned off.
fn no_huge_pages() -> Option<String> {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    (!thp.contains("[always]") && !thp.contains("[madvise]"))
        .then(|| format!("they are off here ({:?})", thp.trim()))
}

/// The connection table's index and entries ask for huge pages (`conntrack/pages.rs`), and
/// get them in the binary (whose allocator hands out small pages only): once one flow has
/// gone through the bundled config's demo listener, the table's first block (the 16
/// shards' 1.7 MiB of index and a chunk of entries) is one 2 MiB page. Before a flow
/// nothing of it is written, so nothing of it is resident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_table_gets_huge_pages() {
    if skip_unless(&[Need::Machine { what: "transparent huge pages", missing: no_huge_pages() }]) {
        return;
    }
    let bundled = BundledCopy::new();
    let mut fg = bundled.run(TOKEN);
    let addr = fg.listener("demo");
    let huge_kb = |pid: u32| -> u64 {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .expect("the gateway's memory map");
        rollup
            .lines()
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("an AnonHugePages line")
    };
    let before = huge_kb(fg.pid());
    let mut s = connect_from("127.0.0.1", addr).await.unwrap();
    assert_eq!(roundtrip(&mut s, b"tracked\n").await, b"tracked\n");
    let after = huge_kb(fg.pid());
    assert!(after >= before + 2048, "no huge page for the table: {before} kB, then {after} kB");
    drop(s);
    fg.signal(libc::SIGTERM);
    assert!(fg.wait_exit(Duration::from_secs(10)).success());
}

/// Out of file descriptors (RLIMIT_NOFILE lowered for the child): accept fails with
/// EMFILE, the loop pauses and retries instead of dying, and once descriptors free up the
/// same listener serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loop_survives_running_out_of_descriptors() {
    let up = Upstream::echo().await;
    let world = World::new();
    let cfg = world.write_config(&format!(
        "[run]\nworker_threads = 1\n\n{}",
        tcp_listener("gw", &[up.addr], "idle_timeout = \"2s\"")
    ));
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!(
        "ulimit -n 48 && exec {} run --config {}",
        env!("CARGO_BIN_EXE_flowgate"),
        cfg.display()
    ));
    let mut fg = Flowgate::spawn(sh);
    let addr = fg.listener("gw");
    fg.wait_ready();
    // Far more connections than 48 descriptors allow (each served one costs two).
    let mut held = Vec::new();
    for _ in 0..60 {
        if let Ok(s) = connect_from(OK, addr).await {
            held.push(s);
        }
    }
    let mut served = 0;
    for s in &mut held {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = s.write_all(b"?").await;
        let mut b = [0u8; 1];
        if let Ok(Ok(1)) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await {
            served += 1;
        }
    }
    assert!(served > 0 && served < held.len(), "served {served} of {}", held.len());
    drop(held);
    // Descriptors come back; the same listener serves a new client.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = connect_from(OK, addr).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s.write_all(b"!").await;
            let mut b = [0u8; 1];
            if let Ok(Ok(1)) =
                tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "listener did not recover after EMFILE");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fg.assert_running();
    fg.signal(libc::SIGTERM);
    assert!(fg.wait_exit(Duration::from_secs(10)).success());
}

/// The harness's promise: a gateway that dies at start-up (here its admin port is taken)
/// fails the test with its exit status and its own error, not with a later "nothing
/// listening".
#[test]
fn a_gateway_that_exits_early_is_reported_with_its_status_and_stderr() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let world = World::new();
    let cfg = world.write_config("");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        &format!("[admin]\nbind = \"{}\"", taken.local_addr().unwrap()),
    );
    std::fs::write(&cfg, text).unwrap();
    let mut fg = Flowgate::run(&cfg);
    let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fg.wait_ready()))
        .expect_err("a gateway whose admin port is taken never gets ready");
    let msg = failure
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| failure.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_default();
    assert!(msg.contains("flowgate exited early (exit status: "), "{msg}");
    assert!(msg.contains("in use"), "the real cause is shown: {msg}");
}
