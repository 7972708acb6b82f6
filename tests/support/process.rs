//! `flowgate` as a child process: started on a config, its printed addresses read from
//! stderr (`flowgate: admin API on http://ADDR`, `flowgate: listener NAME (KIND) on ADDR`),
//! every wait bounded, and an early exit reported with the exit status and everything the
//! process printed on stderr (a port already in use, a config error) instead of a later
//! "nothing listening". The process is killed, by its pid, when the handle drops.
//!
//! Also: a copy of the bundled `config/` with every bind on port 0, so tests of the bundled
//! config never collide with the README's gateway running on 8080/9901.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The token the bundled config's `admin.token_env` variable is given in tests.
pub const ADMIN_TOKEN_ENV: &str = "FLOWGATE_ADMIN_TOKEN";

/// How long a gateway may take to print `ready`.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `flowgate` process.
pub struct Flowgate {
    pub child: Child,
    stderr: mpsc::Receiver<String>,
    stdout: Option<mpsc::Receiver<String>>,
    /// Every stderr line read so far.
    pub seen: Vec<String>,
}

/// Forwards `r`'s lines to a channel from a thread; the channel disconnects at EOF (the
/// process exited or closed the stream).
fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

impl Flowgate {
    /// `flowgate run --config CONFIG`, stdout (the default flow log) piped.
    pub fn run(config: &Path) -> Flowgate {
        Flowgate::spawn(Flowgate::command(config))
    }

    /// [`Flowgate::run`] with `env` set (`None`: removed from what the test inherited).
    pub fn run_with_env(config: &Path, env: &[(&str, Option<&str>)]) -> Flowgate {
        let mut cmd = Flowgate::command(config);
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        Flowgate::spawn(cmd)
    }

    /// The command [`Flowgate::run`] spawns, to adjust (environment) before
    /// [`Flowgate::spawn`].
    pub fn command(config: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowgate"));
        cmd.arg("run").arg("--config").arg(config);
        cmd
    }

    /// Spawns `cmd` (a `flowgate run`, or a command that execs one: `sh -c 'ulimit …; exec
    /// flowgate …'`, `ip netns exec`) with stdin closed and stdout and stderr piped, each
    /// read by a thread.
    pub fn spawn(mut cmd: Command) -> Flowgate {
        cmd.stdin(Stdio::null()).stderr(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let stderr = lines(child.stderr.take().expect("stderr is piped"));
        let stdout = child.stdout.take().map(lines);
        Flowgate { child, stderr, stdout, seen: Vec::new() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process ended while a test waited on it: fail with its exit status and stderr.
    fn died(&mut self, waiting_for: &str) -> ! {
        // Stderr is at EOF: the process is exiting; give it a moment to be reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break format!("{st}"),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None) => break "stderr closed, still running".to_string(),
                Err(e) => break format!("wait failed: {e}"),
            }
        };
        panic!(
            "flowgate exited early ({status}) while waiting for {waiting_for}; its stderr:\n{}",
            self.seen.join("\n")
        );
    }

    /// The first stderr line containing `needle` (lines already read are searched first:
    /// start-up lines come in whatever order the gateway prints them), waiting up to
    /// `within`.
    ///
    /// # Panics
    /// On timeout (with the lines seen), or when the process exits first (with its exit
    /// status and stderr).
    pub fn wait_stderr(&mut self, needle: &str, within: Duration) -> String {
        self.wait_stderr_all(&[needle], within)
    }

    /// The first stderr line containing every one of `needles` (see [`Flowgate::wait_stderr`]).
    pub fn wait_stderr_all(&mut self, needles: &[&str], within: Duration) -> String {
        let hit = |l: &str| needles.iter().all(|n| l.contains(n));
        if let Some(l) = self.seen.iter().find(|l| hit(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if hit(&l) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.died(&format!("a stderr line with {needles:?}"))
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        self.died(&format!("a stderr line with {needles:?}"));
                    }
                    panic!(
                        "no stderr line with {needles:?} within {within:?}; flowgate's stderr:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Waits until the gateway printed `ready` (bounded by [`START_TIMEOUT`]).
    pub fn wait_ready(&mut self) {
        self.wait_stderr("flowgate: ready", START_TIMEOUT);
    }

    /// The address listener `name` is bound on, from its start-up line.
    pub fn listener(&mut self, name: &str) -> SocketAddr {
        let line = self.wait_stderr(&format!("flowgate: listener {name} ("), START_TIMEOUT);
        parse_addr(&line)
    }

    /// Every listener's address, once the gateway is ready.
    pub fn listeners(&mut self) -> HashMap<String, SocketAddr> {
        self.wait_ready();
        self.seen
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix("flowgate: listener ")?;
                Some((rest.split(' ').next()?.to_string(), parse_addr(l)))
            })
            .collect()
    }

    /// The admin API's address, from its start-up line.
    pub fn admin(&mut self) -> SocketAddr {
        let line = self.wait_stderr("flowgate: admin API on http://", START_TIMEOUT);
        parse_addr(&line)
    }

    /// The next stdout line (the flow log when `[flowlog] output = "-"`), waiting up to
    /// `within`; `None` on timeout or when stdout closed.
    pub fn next_stdout(&mut self, within: Duration) -> Option<String> {
        self.stdout.as_ref()?.recv_timeout(within).ok()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("a pid fits in pid_t");
        // SAFETY: kill(2) on the pid of the child this test spawned and still owns.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait on our child") {
                return st;
            }
            assert!(Instant::now() < deadline, "flowgate did not exit in {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running; if it exited, fails with its status and stderr.
    pub fn assert_running(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            // Collect what it printed before dying.
            while let Ok(l) = self.stderr.recv_timeout(Duration::from_millis(200)) {
                self.seen.push(l);
            }
            self.died("nothing (it should still be running)");
        }
    }
}

impl Drop for Flowgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address at the end of a start-up line (`… on ADDR` or `… on http://ADDR`).
fn parse_addr(line: &str) -> SocketAddr {
    let last = line.rsplit(' ').next().unwrap_or_default();
    let last = last.strip_prefix("http://").unwrap_or(last);
    last.parse().unwrap_or_else(|e| panic!("no address at the end of {line:?}: {e}"))
}

/// A port nothing listens on right now on `ip` (bound, then released). Only for an
/// address a config must name before the process starts (an upstream that is itself one
/// of the gateway's listeners); everything else binds port 0 and reads the real port.
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// The repository's `config/` directory.
pub fn bundled_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// A copy of the bundled `config/` (policies, inventory, tests.yaml) in a temp dir, with
/// every fixed bind moved off its port: the admin API and the `demo` listener on port 0,
/// the built-in echo upstream `demo-web` on a free port of 127.0.0.2 (the `demo` listener
/// and the inventory's named port `http` must name it before start-up). Everything else —
/// policy, inventory, flow log on stdout, token handling — is the bundled config's.
pub struct BundledCopy {
    pub dir: tempfile::TempDir,
    /// The echo upstream's port (8081 in the bundled config).
    pub demo_web_port: u16,
}

/// The fixed binds of the bundled config that [`BundledCopy`] rewrites; the test fails if
/// one of them is no longer there (the config changed: update this list).
const BUNDLED_BINDS: [&str; 3] =
    ["bind = \"127.0.0.1:9901\"", "bind = \"127.0.0.1:8080\"", "bind = \"127.0.0.2:8081\""];

impl BundledCopy {
    pub fn new() -> BundledCopy {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&bundled_config_dir(), &dir.path().join("config"));
        let port = free_port("127.0.0.2");
        let toml_path = dir.path().join("config/flowgate.toml");
        let mut toml = std::fs::read_to_string(&toml_path).unwrap();
        for bind in BUNDLED_BINDS {
            assert!(toml.contains(bind), "config/flowgate.toml no longer has `{bind}`");
        }
        toml = toml
            .replace(BUNDLED_BINDS[0], "bind = \"127.0.0.1:0\"")
            .replace(BUNDLED_BINDS[1], "bind = \"127.0.0.1:0\"")
            .replace("127.0.0.2:8081", &format!("127.0.0.2:{port}"));
        // Nothing else binds a fixed port.
        for l in toml.lines().filter(|l| l.trim_start().starts_with("bind")) {
            assert!(
                l.contains(":0\"") || l.contains(&format!(":{port}\"")),
                "fixed bind left: {l}"
            );
        }
        std::fs::write(&toml_path, toml).unwrap();
        let inv_path = dir.path().join("config/inventory.yaml");
        let inv = std::fs::read_to_string(&inv_path).unwrap();
        let http = "{name: http, port: 8081}";
        assert!(inv.contains(http), "config/inventory.yaml no longer has demo-web's `{http}`");
        std::fs::write(&inv_path, inv.replace(http, &format!("{{name: http, port: {port}}}")))
            .unwrap();
        BundledCopy { dir, demo_web_port: port }
    }

    /// The copy's root: run README commands here (`config/flowgate.toml` is the default).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config/flowgate.toml")
    }

    /// Sets the copy's `admin.bind` to the running gateway's real address, so the CLI
    /// commands that read the config to find the admin API (`status`, `reload`,
    /// `quarantine`) reach it. The running gateway does not re-read this file.
    pub fn point_cli_at_admin(&self, admin: SocketAddr) {
        let path = self.config();
        let toml = std::fs::read_to_string(&path).unwrap();
        let admin_bind = "[admin]\n";
        let at = toml.find(admin_bind).expect("an [admin] section");
        let (head, tail) = toml.split_at(at);
        let tail = tail.replacen("bind = \"127.0.0.1:0\"", &format!("bind = \"{admin}\""), 1);
        std::fs::write(&path, format!("{head}{tail}")).unwrap();
    }

    /// `flowgate run` on the copy, with the admin token variable set (the bundled config
    /// reads the token from it), started and ready.
    pub fn run(&self, token: &str) -> Flowgate {
        let mut cmd = Flowgate::command(&self.config());
        cmd.env(ADMIN_TOKEN_ENV, token);
        let mut fg = Flowgate::spawn(cmd);
        fg.wait_ready();
        fg
    }
}

/// Copies the directory tree `from` to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}
