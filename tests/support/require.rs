//! What a test needs from the machine (root, a peer binary, a kernel feature), and the one
//! place that decides what happens when it is missing.
//!
//! - In CI (`CI=true`, which CI services set, or `FLOWGATE_REQUIRE_ALL=1`, which `.ci/run`
//!   exports) a missing requirement fails the test, naming what is missing: a CI run that
//!   skipped its real peers would pass without testing them.
//! - Elsewhere the test is skipped, and says so on the terminal. libtest captures what
//!   `println!`/`eprintln!` print (and shows it only for failures), so the reason is written
//!   to the process's stderr handle directly, which libtest does not capture: the line
//!   `SKIPPED <test>: <reason>` shows in a plain `cargo test` run next to the test's `ok`.

use std::io::Write;

/// One thing a test needs.
pub enum Need {
    /// Effective uid 0 (network namespaces, addresses on `lo`, nftables).
    Root,
    /// An executable on `PATH` (a real peer: curl, haproxy, prometheus, etcd…).
    Bin(&'static str),
    /// A property of this machine; `missing` says why it is absent here, `None` if present.
    Machine { what: &'static str, missing: Option<String> },
}

impl Need {
    /// Why this need is not met here, or `None` when it is.
    fn missing(&self) -> Option<String> {
        match self {
            // SAFETY: geteuid has no preconditions.
            Need::Root => (unsafe { libc::geteuid() } != 0)
                .then(|| "needs root (network namespaces, addresses on lo, nftables)".to_string()),
            Need::Bin(bin) => (!on_path(bin))
                .then(|| format!("`{bin}` is not installed (scripts/setup.sh installs it)")),
            Need::Machine { what, missing } => {
                missing.as_ref().map(|why| format!("needs {what}: {why}"))
            }
        }
    }
}

/// Whether `bin` is an executable file in one of `PATH`'s directories.
pub fn on_path(bin: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(bin))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Whether this run wants every requirement met (CI): `CI=true` or `FLOWGATE_REQUIRE_ALL=1`.
pub fn strict() -> bool {
    let set = |var: &str| {
        std::env::var(var).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True" | "yes"))
    };
    set("CI") || set("FLOWGATE_REQUIRE_ALL")
}

/// The name libtest gave the running test (its thread's name).
fn test_name() -> String {
    std::thread::current().name().unwrap_or("<unnamed test>").to_string()
}

/// `true` when the calling test must stop here because something in `needs` is missing;
/// the caller then returns. In CI this panics instead (the test fails, naming what is
/// missing); elsewhere it writes `SKIPPED <test>: <reasons>` to the terminal.
///
/// ```ignore
/// if skip_unless(&[Need::Root, Need::Bin("nft")]) {
///     return;
/// }
/// ```
///
/// # Panics
/// When something is missing and [`strict`] holds.
#[must_use = "return from the test when it is skipped"]
pub fn skip_unless(needs: &[Need]) -> bool {
    let missing: Vec<String> = needs.iter().filter_map(Need::missing).collect();
    if missing.is_empty() {
        return false;
    }
    let test = test_name();
    let why = missing.join("; ");
    assert!(
        !strict(),
        "{test}: {why} — this run requires every peer (CI=true or FLOWGATE_REQUIRE_ALL=1); \
         run scripts/setup.sh as root"
    );
    // Not through print!/eprint!: libtest captures those. A direct write to the stderr
    // handle reaches the terminal.
    let _ = std::io::stderr().write_all(format!("SKIPPED {test}: {why}\n").as_bytes());
    true
}

/// Whether an optional peer is here, for a test that has a fallback without it (curl as
/// an independent HTTP client, else the crate's own). In CI its absence fails the test like
/// a skip would; elsewhere the fallback is announced on the terminal as `FALLBACK`.
///
/// # Panics
/// When `need` is not met and [`strict`] holds.
pub fn have(need: &Need) -> bool {
    let Some(why) = need.missing() else { return true };
    let test = test_name();
    assert!(
        !strict(),
        "{test}: {why} — this run requires every peer (CI=true or FLOWGATE_REQUIRE_ALL=1); \
         run scripts/setup.sh as root"
    );
    let _ = std::io::stderr()
        .write_all(format!("FALLBACK {test}: {why}; using the fallback\n").as_bytes());
    false
}
