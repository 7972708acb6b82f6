//! SIGHUP reloads. Its own test binary: the signal goes to this process, and only after
//! the control plane's handler is installed (tokio keeps it installed for the process).

mod control_common;

use std::time::Duration;

use control_common::*;
use flowgate::control::Trigger;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    let control = fx.control();
    let _tasks = control.start().await.expect("control plane starts");
    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    // Safe: the handler `start` installed is in place, so SIGHUP no longer terminates.
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    assert_eq!(rc, 0);
    let c = control.clone();
    assert!(wait_for_async(Duration::from_secs(10), || c.generation() == 2).await);
    assert_eq!(control.status().last.unwrap().trigger, Trigger::Signal);
    assert!(!allowed(&control, "127.0.10.1", "127.0.10.2", 5432));
}
