//! SIGHUP reloads. Its own test binary: the signal goes to this process, and only after
//! the control plane's handler is installed (tokio keeps it installed for the process).

mod support;

use std::time::Duration;

use flowgate::control::Trigger;
use support::control::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    let control = fx.control();
    let _tasks = control.start().expect("control plane starts");
    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    // Safe: the handler `start` installed is in place, so SIGHUP no longer terminates.
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    assert_eq!(rc, 0);
    let c = control.clone();
    assert!(wait_for_async(Duration::from_secs(10), || c.generation() == 2).await);
    // The status is recorded just after the swap makes the generation visible.
    assert!(
        wait_for_async(Duration::from_secs(10), || {
            c.status().last.is_some_and(|r| r.generation == 2)
        })
        .await
    );
    assert_eq!(control.status().last.unwrap().trigger, Trigger::Signal);
    assert!(!allowed(&control, "127.0.10.1", "127.0.10.2", 5432));
}

/// 200 reloads (file rewrites picked up by the watcher, SIGHUPs, API calls, mixed) while a
/// reader thread decides flows through the handle the whole time: an allowed flow is never
/// denied, a denied one never allowed, an established allowed flow is never revoked, and
/// the generation advances. (The end-to-end version with real connections is the load test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_never_denies_an_allowed_flow() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use flowgate::flow::Proto;
    use flowgate::policy::FlowQuery;

    let fx = Fixture::new(&format!("[control]\ndebounce = \"5ms\"\n{}", admin_toml()));
    let control = fx.control();
    let _tasks = control.start().expect("control plane starts");
    let (_, cut) = fx.track("127.0.10.1:40000", "127.0.10.2:5432", 1);

    let done = Arc::new(AtomicBool::new(false));
    let decisions = Arc::new(AtomicU64::new(0));
    let reader = {
        let (handle, done, decisions) = (control.policy(), done.clone(), decisions.clone());
        std::thread::spawn(move || {
            let allowed = FlowQuery {
                src: "127.0.10.1".parse().unwrap(),
                dst: "127.0.10.2".parse().unwrap(),
                dst_port: 5432,
                proto: Proto::Tcp,
                fqdn: None,
            };
            // Neither end is a workload: policy.unknown (deny) decides.
            let denied = FlowQuery {
                src: "203.0.113.1".parse().unwrap(),
                dst: "203.0.113.2".parse().unwrap(),
                ..allowed
            };
            let mut wrong = 0u64;
            while !done.load(Ordering::Relaxed) {
                let snap = handle.load();
                if !snap.compiled.decide(&allowed).verdict.is_allow() {
                    wrong += 1;
                }
                if snap.compiled.decide(&denied).verdict.is_allow() {
                    wrong += 1;
                }
                decisions.fetch_add(2, Ordering::Relaxed);
            }
            wrong
        })
    };

    let start_generation = control.generation();
    for i in 0..200u32 {
        // Each version changes an unrelated policy, so every reload is a real new generation.
        let text = BASE_POLICY.replace("web-egress", &format!("web-egress-{}", i % 7))
            + &format!("# version {i}\n");
        let before = control.generation();
        replace_file(&fx.path("policies/extra.yaml"), &text);
        match i % 3 {
            0 => {} // the watcher picks it up
            1 => {
                let rc = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
                assert_eq!(rc, 0);
            }
            _ => {
                control.reload(Trigger::Api).await;
            }
        }
        let c = control.clone();
        assert!(
            wait_for_async(Duration::from_secs(10), || c.generation() > before).await,
            "reload {i} came into force"
        );
    }
    done.store(true, Ordering::Relaxed);
    let wrong = reader.join().unwrap();
    assert_eq!(wrong, 0, "a decision contradicted the policy during reloads");
    assert!(decisions.load(Ordering::Relaxed) > 200);
    assert!(control.generation() >= start_generation + 200);
    assert!(!cut.is_cut(), "the allowed established flow was never revoked");
    assert!(fx.revoked.lock().unwrap().is_empty());
}
