//! `flowgate status`, `flowgate reload` and `flowgate quarantine` as real processes against
//! a control plane serving the admin API on a loopback port.

mod support;

use std::process::Command;

use flowgate::admin::client::AdminClient;
use support::control::*;
use support::process::Flowgate;

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

/// `flowgate run --config CONFIG` with `env` set (`None`: removed), ready; returns it with
/// its admin address.
fn run_gateway(config: &std::path::Path, env: &[(&str, Option<&str>)]) -> (Flowgate, String) {
    let mut gw = Flowgate::run_with_env(config, env);
    gw.wait_ready();
    let admin = gw.admin().to_string();
    (gw, admin)
}

/// `flowgate ARGS` with `env` set (`None`: removed) → (exit code, stdout, stderr).
async fn flowgate_env(
    args: Vec<String>,
    env: Vec<(&'static str, Option<String>)>,
) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowgate"));
        cmd.args(&args);
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

const VAR: &str = "FLOWGATE_ADMIN_TOKEN";

/// The bundled config/flowgate.toml with its fixed ports made `:0` and its policy paths
/// made absolute, in a temp dir; everything else (the `[admin]` section above all) as
/// shipped. Each rewrite must find its text, so a change to the bundled file shows here.
fn bundled_config(dir: &std::path::Path) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut text = std::fs::read_to_string(root.join("flowgate.toml")).unwrap();
    assert!(
        text.lines().any(|l| l.trim() == format!("token_env = \"{VAR}\"")),
        "the bundled config reads the admin token from {VAR}"
    );
    for (from, to) in [
        ("bind = \"127.0.0.1:9901\"".to_owned(), "bind = \"127.0.0.1:0\"".to_owned()),
        ("bind = \"127.0.0.1:8080\"".to_owned(), "bind = \"127.0.0.1:0\"".to_owned()),
        ("bind = \"127.0.0.2:8081\"".to_owned(), "bind = \"127.0.0.2:0\"".to_owned()),
        ("dir = \"policies\"".to_owned(), format!("dir = \"{}\"", root.join("policies").display())),
        (
            "inventory = \"inventory.yaml\"".to_owned(),
            format!("inventory = \"{}\"", root.join("inventory.yaml").display()),
        ),
    ] {
        assert!(text.contains(&from), "bundled config has no {from}");
        text = text.replace(&from, &to);
    }
    let path = dir.join("flowgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The README's path: the bundled config starts with FLOWGATE_ADMIN_TOKEN unset, and then
/// `reload` and `quarantine` are refused the same way (exit 1, the same words) with a
/// message that says the gateway has no token and how to give it one — not `--token`.
/// Started with the variable set, the same commands from a shell with the same variable
/// work; a shell without it, or with another value, is told exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_config_token_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = bundled_config(dir.path());
    let cmd = |words: &[&str], admin: &str| {
        let mut v: Vec<String> = words.iter().map(|s| s.to_string()).collect();
        v.extend(["--config".into(), config.display().to_string(), "--admin".into(), admin.into()]);
        v
    };
    let reload = ["reload"];
    let quarantine = ["quarantine", "127.0.0.3", "--ttl", "15m"];

    // Unset: the gateway starts; both commands are refused alike, whatever this shell has.
    let (gw, admin) = run_gateway(&config, &[(VAR, None)]);
    for shell in [None, Some("s3cret-from-this-shell".to_owned())] {
        let env = vec![(VAR, shell.clone())];
        let (rc, out, r_err) = flowgate_env(cmd(&reload, &admin), env.clone()).await;
        assert_eq!(rc, 1, "{out}{r_err}");
        let (qc, out, q_err) = flowgate_env(cmd(&quarantine, &admin), env).await;
        assert_eq!(qc, 1, "{out}{q_err}");
        assert_eq!(r_err, q_err, "reload and quarantine report a refusal the same way");
        assert!(r_err.contains(&format!("the gateway at {admin} has no admin token")), "{r_err}");
        assert!(r_err.contains("(401)"), "{r_err}");
        assert!(r_err.contains(&format!("its admin.token_env names {VAR}, which was unset")));
        assert!(r_err.contains(&format!("`export {VAR}=<a secret>`")), "{r_err}");
        assert!(!r_err.contains("pass --token"), "--token cannot help here: {r_err}");
    }
    // Reading is open: status works without any token.
    let (code, out, err) = flowgate_env(cmd(&["status"], &admin), vec![(VAR, None)]).await;
    assert_eq!(code, 0, "{out}{err}");
    drop(gw);

    // Set: the same commands from a shell with the same value work.
    let token = Some("s3cret-4b8e".to_owned());
    let (_gw, admin) = run_gateway(&config, &[(VAR, token.as_deref())]);
    let (code, out, err) = flowgate_env(cmd(&reload, &admin), vec![(VAR, token.clone())]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("unchanged: generation 1 is current"), "{out}");
    let (code, out, err) = flowgate_env(cmd(&quarantine, &admin), vec![(VAR, token.clone())]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("quarantine 127.0.0.3 until "), "{out}");

    // A shell without the variable, or with another value: refused alike, told which.
    for (shell, needle) in [
        (None, format!("needs its admin token and none was sent (401): {VAR} (admin.token_env")),
        (Some("not-it".to_owned()), format!("refused the token in {VAR} (admin.token_env")),
    ] {
        let env = vec![(VAR, shell)];
        let (rc, _, r_err) = flowgate_env(cmd(&reload, &admin), env.clone()).await;
        let (qc, _, q_err) = flowgate_env(cmd(&quarantine, &admin), env).await;
        assert_eq!((rc, qc), (1, 1), "{r_err}{q_err}");
        assert_eq!(r_err, q_err);
        assert!(r_err.contains(&needle), "{r_err}");
    }
}

/// `/flows` names each flow's listener as the flow log does: a real gateway with two
/// listeners, a connection held open through the second, and its `allow` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_name_the_listener_like_the_flow_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The echo upstream is apps/db (127.0.10.2); apps/web (127.0.10.1) may reach it.
    let upstream = tokio::net::TcpListener::bind("127.0.10.2:0").await.unwrap();
    let up = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let listener = |name: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\nupstreams = [\"{up}\"]\n"
        )
    };
    let fx = Fixture::new(&format!(
        "[control]\nwatch = false\n[flowlog]\noutput = \"flow.log\"\nallow_sample = 1\n\
         dedupe_window = \"10ms\"\n{}\n{}\n{}",
        admin_toml(),
        listener("first"),
        listener("second")
    ));
    let (mut gw, admin) = run_gateway(&fx.path("flowgate.toml"), &[]);
    let second = gw.listener("second");

    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.10.1:0".parse().unwrap()).unwrap();
    let mut held = sock.connect(second).await.unwrap();
    held.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    let c = AdminClient::new(admin.parse().unwrap(), None);
    let flows: serde_json::Value =
        serde_json::from_str(&c.get("/flows?src=127.0.10.1").await.unwrap().body).unwrap();
    assert_eq!(flows["matched"], 1, "{flows}");
    let logged = wait_for_async(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(fx.path("flow.log")).is_ok_and(|t| t.contains("\"allow\""))
    })
    .await;
    assert!(logged, "the allow event reaches the flow log");
    let log = std::fs::read_to_string(fx.path("flow.log")).unwrap();
    let event: serde_json::Value = serde_json::from_str(
        log.lines().find(|l| l.contains("\"allow\"") && l.contains("127.0.10.1:")).unwrap(),
    )
    .unwrap();
    assert_eq!(event["listener"], "second");
    assert_eq!(flows["flows"][0]["listener"], event["listener"], "{flows}");
}
