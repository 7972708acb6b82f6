//! `flowgate status`, `flowgate reload` and `flowgate quarantine` as real processes against
//! a control plane serving the admin API on a loopback port.

mod control_common;

use std::process::Command;

use control_common::*;

async fn flowgate(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_flowgate")).args(&args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reload_quarantine() {
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    let control = fx.control();
    let tasks = start(&control);
    let admin = tasks.admin_addr.to_string();
    let with = |cmd: &[&str], token: Option<&str>| {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend(["--admin".to_string(), admin.clone()]);
        if let Some(t) = token {
            v.extend(["--token".to_string(), t.to_string()]);
        }
        v
    };

    let (code, out, err) = flowgate(with(&["status"], None)).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("generation 1 "), "{out}");
    assert!(out.contains("1 policies in force (1 total) over 2 workloads"), "{out}");

    // reload with a wrong token: refused, nothing changes.
    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    let (code, _, err) = flowgate(with(&["reload"], Some("nope"))).await;
    assert_ne!(code, 0);
    assert!(err.contains("401"), "{err}");
    assert_eq!(control.generation(), 1);

    let (code, out, err) = flowgate(with(&["reload"], Some(TOKEN))).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("reloaded: generation 2 (1 added"), "{out}");

    // A broken file: reload exits 1 naming the file, status exits 1 and shows it.
    std::fs::write(fx.path("policies/broken.yaml"), "spec: [").unwrap();
    let (code, _, err) = flowgate(with(&["reload"], Some(TOKEN))).await;
    assert_eq!(code, 1);
    assert!(err.contains("broken.yaml"), "{err}");
    let (code, out, _) = flowgate(with(&["status"], None)).await;
    assert_eq!(code, 1);
    assert!(out.contains("RELOAD FAILING"), "{out}");
    std::fs::remove_file(fx.path("policies/broken.yaml")).unwrap();

    let (code, out, err) =
        flowgate(with(&["quarantine", "127.0.10.1", "--ttl", "10m"], Some(TOKEN))).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("quarantine 127.0.10.1 until "), "{out}");
    assert_eq!(control.emergency_entries().len(), 1);
    let (code, _, err) =
        flowgate(with(&["quarantine", "apps/ghost", "--ttl", "1m"], Some(TOKEN))).await;
    assert_eq!(code, 1);
    assert!(err.contains("no workload apps/ghost"), "{err}");
    let (_, out, _) = flowgate(with(&["status"], None)).await;
    assert!(out.contains("emergency q1: quarantine 127.0.10.1 until"), "{out}");
}
