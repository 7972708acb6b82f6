//! Reloading: a good change comes into force as a new generation; broken input (bad YAML,
//! a half-written file, a deleted inventory) is rejected whole and the last good generation
//! keeps serving; fixing the file recovers without a restart; the watcher follows
//! rename-and-replace; a TTL'd policy expires on time. Real files, real inotify.

mod support;

use std::time::Duration;

use flowgate::control::{ReloadResult, Trigger};
use support::control::*;

const WEB: &str = "127.0.10.1";
const DB: &str = "127.0.10.2";

fn no_watch() -> String {
    format!("[control]\nwatch = false\naudit_log = \"audit.jsonl\"\n{}", admin_toml())
}

#[test]
fn good_change_bumps_generation_and_is_audited() {
    let fx = Fixture::new(&no_watch());
    let control = fx.control();
    assert_eq!(control.generation(), 1);
    assert!(allowed(&control, WEB, DB, 5432));

    std::fs::write(fx.path("policies/deny-db.yaml"), DENY_DB).unwrap();
    let report = control.reload_blocking(Trigger::Api);
    assert_eq!(report.result, ReloadResult::Ok, "{report:?}");
    assert_eq!(report.generation, 2);
    assert_eq!(control.generation(), 2);
    assert!(!allowed(&control, WEB, DB, 5432), "the new generation denies web → db");
    let changes = report.changes.as_ref().expect("a change summary");
    assert_eq!(changes.policies_added, 1);
    assert_eq!(changes.added, vec!["AdminNetworkPolicy deny-db".to_string()]);

    // Nothing changed on disk: no new generation.
    let again = control.reload_blocking(Trigger::Signal);
    assert_eq!(again.result, ReloadResult::Unchanged);
    assert_eq!(control.generation(), 2);

    // A relabelled workload is reported as such.
    std::fs::write(fx.path("inventory.yaml"), INVENTORY.replace("{app: web}", "{app: web2}"))
        .unwrap();
    let relabel = control.reload_blocking(Trigger::Api);
    assert_eq!(relabel.result, ReloadResult::Ok);
    assert_eq!(relabel.changes.unwrap().relabelled, vec!["apps/web".to_string()]);

    let audit = std::fs::read_to_string(fx.path("audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> =
        audit.lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    assert_eq!(lines.len(), 4, "startup + 3 attempts: {audit}");
    assert_eq!(lines[0]["trigger"], "startup");
    assert_eq!(lines[1]["result"], "ok");
    assert_eq!(lines[1]["generation"], 2);
    assert_eq!(lines[1]["changes"]["policies_added"], 1);
    assert!(lines[1]["hash"].as_str().unwrap().len() == 64);
    assert!(lines[1]["duration"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[2]["result"], "unchanged");
    assert_eq!(lines[3]["changes"]["workloads_relabelled"], 1);
}

#[test]
fn broken_yaml_is_rejected_and_fixing_it_recovers() {
    let fx = Fixture::new(&no_watch());
    let control = fx.control();
    let bad = fx.path("policies/deny-db.yaml");
    std::fs::write(&bad, "kind: AdminNetworkPolicy\nmetadata: [unclosed\n").unwrap();
    let report = control.reload_blocking(Trigger::Api);
    assert_eq!(report.result, ReloadResult::Error);
    assert_eq!(control.generation(), 1, "last good generation stays in force");
    assert!(allowed(&control, WEB, DB, 5432));
    assert!(
        report
            .errors
            .iter()
            .any(|p| p.file.as_deref().is_some_and(|f| f.ends_with("deny-db.yaml"))),
        "the error names the file: {:?}",
        report.errors
    );
    let status = control.status();
    assert!(status.failing.is_some());
    assert_eq!(fx.metrics.control.reload_failing.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(fx.metrics.control.reloads_error.load(std::sync::atomic::Ordering::Relaxed), 1);

    std::fs::write(&bad, DENY_DB).unwrap();
    let fixed = control.reload_blocking(Trigger::Api);
    assert_eq!(fixed.result, ReloadResult::Ok);
    assert_eq!(control.generation(), 2);
    assert!(!allowed(&control, WEB, DB, 5432));
    assert!(control.status().failing.is_none());
    assert_eq!(fx.metrics.control.reload_failing.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn half_written_file_is_rejected_then_picked_up_whole() {
    let fx = Fixture::new(&no_watch());
    let control = fx.control();
    let file = fx.path("policies/deny-db.yaml");
    // Cut the file inside the rule list: valid YAML prefix, invalid policy.
    let cut = DENY_DB.find("      action").unwrap();
    std::fs::write(&file, &DENY_DB[..cut]).unwrap();
    let half = control.reload_blocking(Trigger::Watch);
    assert_eq!(half.result, ReloadResult::Error, "{half:?}");
    assert_eq!(control.generation(), 1);
    assert!(allowed(&control, WEB, DB, 5432));
    std::fs::write(&file, DENY_DB).unwrap();
    assert_eq!(control.reload_blocking(Trigger::Watch).result, ReloadResult::Ok);
    assert!(!allowed(&control, WEB, DB, 5432));
}

#[test]
fn deleted_inventory_is_rejected_and_restoring_it_recovers() {
    let fx = Fixture::new(&no_watch());
    let control = fx.control();
    std::fs::remove_file(fx.path("inventory.yaml")).unwrap();
    let report = control.reload_blocking(Trigger::Api);
    assert_eq!(report.result, ReloadResult::Error);
    assert!(
        report
            .errors
            .iter()
            .any(|p| p.file.as_deref().is_some_and(|f| f.ends_with("inventory.yaml"))),
        "{:?}",
        report.errors
    );
    assert_eq!(control.generation(), 1);
    assert!(allowed(&control, WEB, DB, 5432), "still decided by generation 1");
    std::fs::write(fx.path("inventory.yaml"), INVENTORY).unwrap();
    let back = control.reload_blocking(Trigger::Api);
    // Same content as generation 1: nothing to swap, and the failure is over.
    assert_eq!(back.result, ReloadResult::Unchanged);
    assert!(control.status().failing.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_follows_rename_and_replace_of_policies_and_inventory() {
    let fx = Fixture::new(&format!(
        "[control]\ndebounce = \"20ms\"\naudit_log = \"audit.jsonl\"\n{}",
        admin_toml()
    ));
    let control = fx.control();
    let _tasks = control.start().expect("control plane starts");

    replace_file(&fx.path("policies/deny-db.yaml"), DENY_DB);
    let c = control.clone();
    assert!(
        wait_for_async(Duration::from_secs(10), || c.generation() == 2).await,
        "a renamed-in policy file is picked up"
    );
    assert!(!allowed(&control, WEB, DB, 5432));

    // The inventory replaced by rename: db moves to another address.
    replace_file(&fx.path("inventory.yaml"), &INVENTORY.replace("127.0.10.2", "127.0.10.3"));
    let c = control.clone();
    assert!(
        wait_for_async(Duration::from_secs(10), || c.generation() == 3).await,
        "a renamed-in inventory is picked up"
    );
    let snap = control.policy().load_full();
    let db = snap.compiled.find_workload("apps", "db").unwrap();
    assert_eq!(snap.compiled.workload_of("127.0.10.3".parse().unwrap()), Some(db));
    assert_eq!(snap.compiled.workload_of(DB.parse().unwrap()), None);
    assert!(!allowed(&control, WEB, "127.0.10.3", 5432));

    // A broken write is rejected by the watcher's reload; the fix is picked up too.
    replace_file(&fx.path("policies/deny-db.yaml"), "spec: [");
    let m = fx.metrics.clone();
    assert!(
        wait_for_async(Duration::from_secs(10), || {
            m.control.reloads_error.load(std::sync::atomic::Ordering::Relaxed) >= 1
        })
        .await
    );
    assert_eq!(control.generation(), 3);
    assert!(control.status().failing.is_some());
    // Restoring what is in force ends the failure without a new generation.
    replace_file(&fx.path("policies/deny-db.yaml"), DENY_DB);
    let c = control.clone();
    assert!(wait_for_async(Duration::from_secs(10), || c.status().failing.is_none()).await);
    assert_eq!(control.generation(), 3);
    assert_eq!(control.status().last.unwrap().result, ReloadResult::Unchanged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_policy_expires_on_time_without_a_file_change() {
    let fx = Fixture::new(&format!("[control]\nwatch = false\n{}", admin_toml()));
    let ttl_policy = DENY_DB.replace(
        "metadata: {name: deny-db}",
        "metadata:\n  name: deny-db\n  annotations: {flowgate.dev/ttl: 1s}",
    );
    std::fs::write(fx.path("policies/deny-db.yaml"), ttl_policy).unwrap();
    let control = fx.control();
    assert!(!allowed(&control, WEB, DB, 5432), "in force before its TTL");
    assert!(control.next_expiry().is_some());
    let _tasks = control.start().expect("control plane starts");
    let c = control.clone();
    assert!(
        wait_for_async(Duration::from_secs(5), || c.generation() == 2).await,
        "the expiry timer recompiled"
    );
    assert!(allowed(&control, WEB, DB, 5432), "expired: web → db allowed again");
    assert!(control.next_expiry().is_none());
    assert_eq!(control.status().last.unwrap().trigger, Trigger::Expiry);
}

/// A change that leaves a file whole — a rename into place, the close of a write — reloads
/// after `control.settle` (5 ms), while a file still being written is held by the
/// debounce. The debounce here is an hour, so every reload below came from a completed
/// file, and no half-written state was ever tried (no rejected reload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_files_reload_at_once_and_open_writes_wait() {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let fx = Fixture::new(&format!(
        "[control]\ndebounce = \"1h\"\naudit_log = \"audit.jsonl\"\n{}",
        admin_toml()
    ));
    let control = fx.control();
    let _tasks = control.start().expect("control plane starts");

    replace_file(&fx.path("policies/deny-db.yaml"), DENY_DB);
    let c = control.clone();
    assert!(
        wait_for_async(Duration::from_secs(10), || c.generation() == 2).await,
        "a renamed-in file reloads without the hour of debounce"
    );
    assert!(!allowed(&control, WEB, DB, 5432));

    // Written in place in two parts; the first alone is not a valid policy.
    let text = DENY_DB.replace("deny-db", "deny-db-2").replace("priority: 10", "priority: 11");
    let cut = text.find("      action").unwrap();
    let mut file = std::fs::File::create(fx.path("policies/second.yaml")).unwrap();
    file.write_all(&text.as_bytes()[..cut]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(control.generation(), 2, "no reload while the writer holds the file open");
    file.write_all(&text.as_bytes()[cut..]).unwrap();
    drop(file);
    let c = control.clone();
    assert!(
        wait_for_async(Duration::from_secs(10), || c.generation() == 3).await,
        "closing the write reloads"
    );
    // The status is recorded just after the swap makes the generation visible.
    let c = control.clone();
    assert!(
        wait_for_async(Duration::from_secs(10), || {
            c.status().last.is_some_and(|r| r.generation == 3)
        })
        .await
    );
    assert_eq!(
        fx.metrics.control.reloads_error.load(Ordering::Relaxed),
        0,
        "{}",
        std::fs::read_to_string(fx.path("audit.jsonl")).unwrap()
    );
    let last = control.status().last.unwrap();
    assert_eq!(last.trigger, Trigger::Watch);
    assert_eq!(last.changes.unwrap().added, vec!["AdminNetworkPolicy deny-db-2".to_string()]);
}

/// A file deleted and written again (as some tools replace files) is one reload that sees
/// the new file: the removal alone must not come into force, or revalidation would cut the
/// flows the missing policy allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_recreate_is_one_reload_of_the_new_file() {
    let fx = Fixture::new(&format!(
        "[control]\ndebounce = \"2s\"\naudit_log = \"audit.jsonl\"\n{}",
        admin_toml()
    ));
    let file = fx.path("policies/deny-db.yaml");
    std::fs::write(&file, DENY_DB).unwrap();
    let control = fx.control();
    let _tasks = control.start().expect("control plane starts");
    assert!(!allowed(&control, WEB, DB, 5432));

    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, DENY_DB.replace("priority: 10", "priority: 12")).unwrap();
    let c = control.clone();
    assert!(
        wait_for_async(Duration::from_secs(10), || {
            c.status().last.is_some_and(|r| r.generation == 2)
        })
        .await
    );
    let changes = control.status().last.unwrap().changes.unwrap();
    assert_eq!(
        (changes.policies_added, changes.policies_removed, changes.policies_modified),
        (0, 0, 1),
        "{changes:?}"
    );
    assert!(!allowed(&control, WEB, DB, 5432), "db stayed denied");
    assert_eq!(control.generation(), 2, "no generation without the file");
}
