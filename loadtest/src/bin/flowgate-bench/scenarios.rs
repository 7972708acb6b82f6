//! Every scenario of the results table: how to run its driver (full and `--quick`) and how
//! its figures become rows. The order here is the table's order.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use crate::criterion::{self, fmt_ns, sig3};
use crate::{Opts, Row, RunInfo, load_average};

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Opts, &RunInfo) -> Result<Vec<Row>, String>,
}

pub const ALL: &[Scenario] = &[
    Scenario { name: "l4", about: "L4 TCP gateway vs HAProxy (bulk, conn/s, p99, CPU)", run: l4 },
    Scenario {
        name: "egress",
        about: "CONNECT proxy vs Squid (tunnels/s, bulk, idle memory)",
        run: egress,
    },
    Scenario {
        name: "reload_storm",
        about: "connections during back-to-back reloads",
        run: reload_storm,
    },
    Scenario {
        name: "soak",
        about: "soak: mixed traffic and reloads, RSS/fds/latency sampled",
        run: soak,
    },
    Scenario {
        name: "decide",
        about: "policy decide and compile, 10k x 10k (criterion)",
        run: decide,
    },
    Scenario { name: "reload", about: "policy file change -> enforced (criterion)", run: reload },
    Scenario {
        name: "conntrack",
        about: "conntrack lookup, 1M entries (criterion)",
        run: conntrack,
    },
    Scenario { name: "admit", about: "the gate: deny, allow + remove (criterion)", run: admit },
    Scenario {
        name: "wire",
        about: "CONNECT head and SNI parsers vs httparse, tls-parser (criterion)",
        run: wire,
    },
    Scenario {
        name: "wire_proxy",
        about: "PROXY protocol header parse (criterion)",
        run: wire_proxy,
    },
    Scenario { name: "classify", about: "packet classify vs pnet walk (criterion)", run: classify },
    Scenario {
        name: "packet_filter",
        about: "packet filter, conntrack hit and new SYN (criterion)",
        run: packet_filter,
    },
    Scenario {
        name: "diff",
        about: "flowgate diff, 10k one change and 1k unrelated (criterion)",
        run: diff,
    },
    Scenario {
        name: "check_test",
        about: "flowgate check and test end to end, realistic 10k x 10k",
        run: check_test,
    },
    Scenario {
        name: "fleet",
        about: "flowgate push -> enforced on 3 replicas, 3-member etcd, 1k",
        run: fleet,
    },
    Scenario {
        name: "tun_forward",
        about: "TUN device layer vs kernel forwarding (root)",
        run: tun_forward,
    },
    Scenario {
        name: "afpacket_forward",
        about: "AF_PACKET ring vs pnet and a kernel bridge (root)",
        run: afpacket_forward,
    },
    Scenario {
        name: "packet_vs_nft",
        about: "packet mode vs kernel + nftables (root)",
        run: packet_vs_nft,
    },
];

/// What a row is held to.
#[derive(Clone, Copy)]
enum Goal {
    None,
    RatioAtLeast(f64),
    RatioAtMost(f64),
    /// The result, in the row's own unit (ns for criterion rows), at most this.
    AtMost(f64),
}

impl Goal {
    fn met(self, value: f64, ratio: Option<f64>) -> Option<bool> {
        match self {
            Goal::None => None,
            Goal::RatioAtLeast(x) => ratio.map(|r| r >= x),
            Goal::RatioAtMost(x) => ratio.map(|r| r <= x),
            Goal::AtMost(x) => Some(value <= x),
        }
    }
}

/// The row skeleton every scenario fills in.
fn row(opts: &Opts, info: &RunInfo, scenario: &str, capability: &str, target: &str) -> Row {
    let quick = if opts.quick { "--quick " } else { "" };
    let soak =
        if scenario == "soak" { format!(" --soak-secs {}", opts.soak_secs) } else { String::new() };
    Row {
        scenario: scenario.into(),
        capability: capability.into(),
        target: target.into(),
        command: format!("`loadtest/run {quick}--only {scenario}{soak}`"),
        machine: format!("{}, load {}", info.machine, load_average()),
        date: info.date.clone(),
        commit: info.commit.clone(),
        ..Row::default()
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b != 0.0).then(|| a / b)
}

/// Runs `cmd` in the repository, its stdout echoed to stderr as it comes and returned.
/// A failed exit is returned as `Err` with the output, unless `keep_failed`.
fn run_cmd(opts: &Opts, cmd: &mut Command, keep_failed: bool) -> Result<String, String> {
    eprintln!("loadtest/run: $ {cmd:?}");
    let mut child = cmd
        .current_dir(&opts.root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("    {line}");
            out.push_str(&line);
            out.push('\n');
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() && !keep_failed {
        return Err(format!("{cmd:?} exited with {status}"));
    }
    Ok(out)
}

/// `cargo bench --bench NAME -- ARGS` in the runner's profile, with `env`.
fn cargo_bench(
    opts: &Opts,
    bench: &str,
    env: &[(&str, String)],
    args: &[&str],
    keep_failed: bool,
) -> Result<String, String> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["bench", "--locked", "--bench", bench]);
    if opts.profile != "release" {
        cmd.args(["--profile", &opts.profile]);
    }
    cmd.arg("--").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_cmd(opts, &mut cmd, keep_failed)
}

/// The driver's `{"bench": NAME, …}` line.
fn json_line(out: &str, bench: &str) -> Result<serde_json::Value, String> {
    out.lines()
        .rev()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["bench"] == bench)
        .ok_or_else(|| format!("{bench} printed no result line (skipped? its output is above)"))
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn pick(quick: bool, full: u64, short: u64) -> String {
    if quick { short.to_string() } else { full.to_string() }
}

// ---- end-to-end drivers -------------------------------------------------------------------

fn l4(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    // The flowgate binary the benches run (`CARGO_BIN_EXE_flowgate`), built the way they
    // build it: a plain `cargo build --bin flowgate` resolves features without the
    // dev-dependencies and would compile the whole crate a second time.
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["bench", "--locked", "--no-run", "--bench", "reload_storm"]);
    if opts.profile != "release" {
        build.args(["--profile", &opts.profile]);
    }
    run_cmd(opts, &mut build, false)?;
    let bins = opts.bin_dir();
    let mut cmd = Command::new(bins.join("flowgate-loadtest"));
    cmd.arg("--flowgate").arg(bins.join("flowgate"));
    if opts.quick {
        cmd.args(["--seconds", "2", "--rounds", "1"]);
    }
    let v = json_line(&run_cmd(opts, &mut cmd, false)?, "l4")?;
    let ha = v["haproxy"].as_str().unwrap_or("HAProxy").replace(" - https://haproxy.org/", "");
    let ha = ha.split(" version ").nth(1).map_or("HAProxy".to_string(), |x| {
        format!("HAProxy {}", x.split(' ').next().unwrap_or_default())
    });
    let conc = v["concurrency"].as_u64().unwrap_or(64);
    let pair = |k: &str| (f(&v[k]["flowgate"]), f(&v[k]["haproxy"]));
    let mut rows = Vec::new();
    let mut push = |cap: String,
                    target: &str,
                    goal: Goal,
                    (fg, hp): (f64, f64),
                    fmt: &dyn Fn(f64) -> String| {
        if fg.is_nan() {
            return;
        }
        let mut r = row(opts, info, "l4", &cap, target);
        r.result = fmt(fg);
        r.peer = format!("{ha}: {}", fmt(hp));
        r.ratio = ratio(fg, hp);
        r.met = goal.met(fg, r.ratio);
        rows.push(r);
    };
    push(
        "L4 TCP bulk throughput (iperf3, one stream)".into(),
        "≥ 1.0× HAProxy",
        Goal::RatioAtLeast(1.0),
        pair("tput_gbps"),
        &|x| format!("{x:.2} Gbit/s"),
    );
    push(
        format!("L4 TCP new conn/s, {conc} concurrent"),
        "≥ 1.0× HAProxy",
        Goal::RatioAtLeast(1.0),
        pair("cps"),
        &|x| format!("{x:.0}/s"),
    );
    push(
        "L4 TCP p99 latency (connect → 64 B → close)".into(),
        "≤ HAProxy's",
        Goal::RatioAtMost(1.0),
        pair("p99_ms"),
        &|x| format!("{} ms", sig3(x)),
    );
    push("L4 proxy CPU per connection".into(), "—", Goal::None, pair("cpu_per_conn_us"), &|x| {
        format!("{x:.1} µs")
    });
    Ok(rows)
}

/// How a figure is written in the table.
type Fmt<'a> = &'a dyn Fn(f64) -> String;

fn egress(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    let q = opts.quick;
    let env = [
        ("EG_SECS", pick(q, 5, 1)),
        ("EG_CONC", "64".into()),
        ("EG_MIB", pick(q, 1024, 32)),
        ("EG_IDLE", "1000".into()),
    ];
    let v = json_line(&cargo_bench(opts, "egress_vs_squid", &env, &[], false)?, "egress_vs_squid")?;
    let conc = v["concurrency"].as_u64().unwrap_or(64);
    let cases: [(String, &str, Goal, &str, Fmt); 3] = [
        (
            format!("Egress CONNECT tunnels/s, {conc} concurrent"),
            "≥ 1.0× Squid",
            Goal::RatioAtLeast(1.0),
            "tunnels_per_s",
            &|x| format!("{x:.0}/s"),
        ),
        (
            "Egress bulk through one tunnel".into(),
            "≥ 1.0× Squid",
            Goal::RatioAtLeast(1.0),
            "bulk_mib_s",
            &|x| format!("{x:.1} MiB/s"),
        ),
        (
            format!("Memory per idle tunnel ({} tunnels)", v["idle"]),
            "below Squid's",
            Goal::RatioAtMost(1.0),
            "idle_tunnel_bytes",
            &|x| format!("{:.1} KB", x / 1000.0),
        ),
    ];
    Ok(cases
        .into_iter()
        .map(|(cap, target, goal, key, fmt)| {
            let (fg, sq) = (f(&v["flowgate"][key]), f(&v["squid"][key]));
            let mut r = row(opts, info, "egress", &cap, target);
            r.result = fmt(fg);
            r.peer = format!("Squid: {}", fmt(sq));
            r.ratio = ratio(fg, sq);
            r.met = goal.met(fg, r.ratio);
            r
        })
        .collect())
}

fn reload_storm(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    let env = [("STORM_SECS", pick(opts.quick, 20, 3)), ("STORM_CONC", "32".into())];
    // A failed storm still prints its figures; the row says it failed.
    let v = json_line(&cargo_bench(opts, "reload_storm", &env, &[], true)?, "reload_storm")?;
    let (q, s) = (&v["quiet"], &v["reloads_phase"]);
    let failed = s["failed"].as_u64().unwrap_or(0) + q["failed"].as_u64().unwrap_or(0);
    let bad = v["client_denials"].as_u64().unwrap_or(0) + v["rejected"].as_u64().unwrap_or(0);
    let mut r = row(
        opts,
        info,
        "reload_storm",
        &format!("connections during back-to-back reloads, {} clients", v["concurrency"]),
        "no loss",
    );
    r.result = format!(
        "{:.0} conn/s, p99 {} µs, {failed} failed, {} reloads",
        f(&s["cps"]),
        s["p99_us"],
        v["reloads"]
    );
    r.peer = format!("no reloads: {:.0} conn/s, p99 {} µs", f(&q["cps"]), q["p99_us"]);
    r.ratio = ratio(f(&s["cps"]), f(&q["cps"]));
    r.met = Some(failed == 0 && bad == 0);
    Ok(vec![r])
}

fn soak(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    let csv = opts.charts.join("soak.csv");
    let out = match &opts.soak_from {
        Some(file) => {
            std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?
        }
        None => {
            let secs = opts.soak_secs.to_string();
            let csv = csv.to_string_lossy().to_string();
            cargo_bench(opts, "soak", &[], &["--secs", &secs, "--csv", &csv], true)?
        }
    };
    let v = json_line(&out, "soak")?;
    let secs = v["secs"].as_u64().unwrap_or(0);
    let mut r = row(
        opts,
        info,
        "soak",
        &format!(
            "soak, {} min: mixed TCP/UDP/CONNECT, allowed and denied, a reload every 5 s",
            secs / 60
        ),
        "no error, no growth, no lost log line",
    );
    if opts.soak_from.is_some() {
        r.command =
            format!("`cargo bench --bench soak -- --secs {secs} --csv docs/bench/soak.csv`");
    }
    let mib = |x: &serde_json::Value| f(x) / 1024.0;
    let pass = v["pass"].as_bool().unwrap_or(false);
    r.result = format!(
        "**{}**: {} exchanges, {} errors, {} reloads; RSS {:.1} → {:.1} MiB (max {:.1}); fds {} → {} (max {})",
        if pass { "PASS" } else { "FAIL" },
        v["ok"],
        v["errors"],
        v["reloads"],
        mib(&v["rss_kib"]["first"]),
        mib(&v["rss_kib"]["last"]),
        mib(&v["rss_kib"]["max"]),
        v["fds"]["first"],
        v["fds"]["last"],
        v["fds"]["max"],
    );
    if !pass {
        r.result.push_str(&format!(" — {}", v["failures"]));
    }
    r.peer = "—".into();
    r.met = Some(pass);
    Ok(vec![r])
}

fn tun_forward(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    let env = [("TF_SECS", pick(opts.quick, 5, 1)), ("TF_ROUNDS", pick(opts.quick, 3, 1))];
    let v = json_line(&cargo_bench(opts, "tun_forward", &env, &[], false)?, "tun_forward")?;
    let kernel = f(&v["kernel_gbps"]);
    let cases = [
        ("TUN device layer, TCP forwarded unchanged, offloads on", "tun_on_gbps"),
        ("TUN device layer, TCP forwarded unchanged, offloads off", "tun_off_gbps"),
    ];
    Ok(cases
        .into_iter()
        .map(|(cap, key)| {
            let x = f(&v[key]);
            let mut r = row(opts, info, "tun_forward", cap, "—");
            r.result = format!("{x:.2} Gbit/s");
            r.peer = format!("kernel forwarding: {kernel:.2} Gbit/s");
            r.ratio = ratio(x, kernel);
            r
        })
        .collect())
}

fn afpacket_forward(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    let env = [("AF_SECS", pick(opts.quick, 4, 1)), ("AF_ROUNDS", pick(opts.quick, 3, 1))];
    let v =
        json_line(&cargo_bench(opts, "afpacket_forward", &env, &[], false)?, "afpacket_forward")?;
    let figs = |k: &str| (f(&v[k]["tcp_gbps"]), f(&v[k]["udp_pps"]));
    let cases = [
        (
            "AF_PACKET TPACKET_V3 ring, TCP, offloads off",
            "ring_off",
            "pnet channel",
            "pnet_off",
            "choose by measurement",
        ),
        ("AF_PACKET TPACKET_V3 ring, TCP, offloads on", "ring_on", "kernel bridge", "bridge", "—"),
    ];
    Ok(cases
        .into_iter()
        .map(|(cap, key, peer, peer_key, target)| {
            let ((t, u), (pt, pu)) = (figs(key), figs(peer_key));
            let mut r = row(opts, info, "afpacket_forward", cap, target);
            r.result = format!("{t:.2} Gbit/s; UDP 64 B {u:.0} pps");
            r.peer = format!("{peer}: {pt:.2} Gbit/s; {pu:.0} pps");
            r.ratio = ratio(t, pt);
            r
        })
        .collect())
}

/// packet_vs_nft's JSON line: every case's median UDP pps (flowgate-udpblast, built with
/// this runner, 64-byte datagrams) and TCP Gbit/s (iperf3), or the case's error. Rows per
/// front end, protocol and comparison, the issue's targets: 1 policy ≥ 0.5× the kernel with
/// 1 nft rule; 10,000 policies ≥ 10× nft as a linear chain and ≥ 0.9× nft as a set.
///
/// The linear chain compared against is the one without conntrack, so every packet walks
/// it: behind `ct state established accept` only a flow's first packet does, and that
/// chain forwards at the 1-rule rate (its figure is in the peer cell beside).
fn packet_vs_nft(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    let blast = opts.bin_dir().join("flowgate-udpblast").to_string_lossy().to_string();
    let env = [
        ("PV_SECS", pick(opts.quick, 4, 1)),
        ("PV_ROUNDS", pick(opts.quick, 3, 1)),
        ("PV_BLAST", blast),
    ];
    let v = json_line(&cargo_bench(opts, "packet_vs_nft", &env, &[], false)?, "packet_vs_nft")?;
    Ok(pv_rows(opts, info, &v))
}

fn pv_rows(opts: &Opts, info: &RunInfo, v: &serde_json::Value) -> Vec<Row> {
    let rules = v["rules"].as_u64().unwrap_or(10_000);
    let udp_driver = v["udp_driver"].as_str().unwrap_or("?");
    let fig = |name: &str| -> Result<(f64, f64), String> {
        let c = &v["cases"][name];
        match c["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None if c.is_null() => Err(format!("no case {name:?} in the result")),
            None => Ok((f(&c["udp_pps"]), f(&c["tcp_gbps"]))),
        }
    };
    let linear_ct = fig(&format!("nft, {rules} rules, linear"));
    let linear_note = match &linear_ct {
        Ok((p, g)) => format!(" (with conntrack first: {g:.2} Gbit/s, {p:.0} pps)"),
        Err(_) => String::new(),
    };
    let mut rows = Vec::new();
    for fe in ["tun", "afpacket"] {
        let one = [("nft, 1 rule".to_string(), "kernel + nft, 1 rule".to_string(), 0.5)];
        let many = [
            (
                format!("nft, {rules} linear, no ct"),
                format!("kernel + nft, {rules} rules as a linear chain{linear_note}"),
                10.0,
            ),
            (
                format!("nft, {rules} rules, set"),
                format!("kernel + nft, {rules} rules as a set"),
                0.9,
            ),
        ];
        for (policies, peers) in [(1, &one[..]), (rules, &many[..])] {
            let what =
                if policies == 1 { "1 policy".into() } else { format!("{policies} policies") };
            let (pps, gbps) = match fig(&format!("flowgate {fe}, {policies} pol.")) {
                Ok(x) => x,
                Err(e) => {
                    let mut r = row(
                        opts,
                        info,
                        "packet_vs_nft",
                        &format!("packet mode ({fe}), {what}"),
                        "—",
                    );
                    r.result = format!("failed: {e}");
                    rows.push(r);
                    continue;
                }
            };
            for (peer_case, peer_name, goal) in peers {
                let peer = fig(peer_case);
                let target =
                    format!("≥ {goal}× {}", peer_name.split(" (").next().unwrap_or_default());
                for (proto, x, px, fmt) in [
                    (
                        "TCP throughput (iperf3, one stream)".to_string(),
                        gbps,
                        peer.as_ref().map(|p| p.1),
                        (|x: f64| format!("{x:.2} Gbit/s")) as fn(f64) -> String,
                    ),
                    (
                        format!("UDP 64 B pps ({udp_driver})"),
                        pps,
                        peer.as_ref().map(|p| p.0),
                        |x: f64| format!("{x:.0} pps"),
                    ),
                ] {
                    let cap = format!("packet mode ({fe}), {what}: {proto}");
                    let mut r = row(opts, info, "packet_vs_nft", &cap, &target);
                    r.result = fmt(x);
                    match px {
                        Ok(px) => {
                            r.peer = format!("{peer_name}: {}", fmt(px));
                            r.ratio = ratio(x, px);
                            r.met = Goal::RatioAtLeast(*goal).met(x, r.ratio);
                        }
                        Err(e) => r.peer = format!("{peer_name}: n/a ({e})"),
                    }
                    rows.push(r);
                }
            }
        }
    }
    rows
}

// ---- plain programs printing text ----------------------------------------------------------

/// The number right after `prefix` in `line` ("p99 12.5 ms" with "p99 " gives 12.5).
fn number_after(line: &str, prefix: &str) -> Option<f64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The number right before `suffix` in `line` ("1630 ms wall" with " ms wall" gives 1630).
fn number_before(line: &str, suffix: &str) -> Option<f64> {
    let head = &line[..line.find(suffix)?];
    head.rsplit(' ').next()?.parse().ok()
}

/// benches/check_test.rs (a plain program): the binary's `check` wall time and `test`'s
/// per-case time from its line `LABEL: flowgate check N ms wall; … X µs per case (…)`, with
/// the in-process phases of its next two lines beside. The per-case figure is the
/// difference of two end-to-end runs (10,000 cases and 1) over 9,999: on a loaded machine
/// the noise of two 3-s loads can swallow it, and a run that comes out ≤ 0 says so.
fn check_test(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    let env = [
        ("FLOWGATE_BENCH_REALISTIC", "10k".to_string()),
        ("FLOWGATE_BENCH_RUNS", pick(opts.quick, 5, 3)),
    ];
    let out = cargo_bench(opts, "check_test", &env, &[], false)?;
    let find = |needles: &[&str]| out.lines().find(|l| needles.iter().all(|n| l.contains(n)));
    let line = find(&["flowgate check", "per case"])
        .ok_or("check_test printed no `flowgate check … per case` line (its output is above)")?;
    let label = line.split(':').next().unwrap_or_default().trim().to_string();
    let phases = find(&["load ", "compile ", "lint "]).map(|l| {
        let ms = |k: &str| number_after(l, k).map_or("?".into(), sig3);
        format!(
            " (in process: load {} ms, compile {} ms, lint {} ms)",
            ms("load "),
            ms("compile "),
            ms("lint ")
        )
    });
    let per_case = find(&["in process, per case"]).map(|l| {
        let us = |k: &str| number_after(l, k).map_or("?".into(), sig3);
        format!(
            " (in process: parse {} µs, resolve {} µs, decide {} µs)",
            us("parse "),
            us("resolve "),
            us("decide ")
        )
    });
    let mut rows = Vec::new();
    let cases = [
        (
            "`flowgate check`, wall, the binary end to end",
            "≤ 1 s",
            number_before(line, " ms wall"),
            1000.0,
            "ms",
            phases,
        ),
        (
            "`flowgate test`, per case (10,000 cases less 1, the binary end to end)",
            "≤ 2 µs",
            number_before(line, " µs per case").filter(|x| *x > 0.0),
            2.0,
            "µs",
            per_case,
        ),
    ];
    for (what, target, value, at_most, unit, detail) in cases {
        let mut r = row(opts, info, "check_test", &format!("{what}, {label}"), target);
        match value {
            Some(x) => {
                r.result = format!("{} {unit}", sig3(x));
                r.met = Goal::AtMost(at_most).met(x, None);
            }
            None if line.contains("µs per case") => {
                r.result = "n/a: 10,000 cases ran no slower than 1 (noise; more runs)".into()
            }
            None => r.result = format!("failed: no figure in {line:?}"),
        }
        r.result.push_str(detail.as_deref().unwrap_or_default());
        r.peer = "—".into();
        rows.push(r);
    }
    Ok(rows)
}

/// benches/fleet_propagation.rs at 1k × 1k only (10k takes minutes to push and load three
/// times): p50/p99 of push → enforced on all three replicas.
fn fleet(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    let env = [
        ("FLOWGATE_FLEET_SETS", "1k".to_string()),
        ("FLOWGATE_FLEET_PUSHES", pick(opts.quick, 200, 5)),
    ];
    let out = cargo_bench(opts, "fleet_propagation", &env, &[], false)?;
    let line = out
        .lines()
        .find(|l| l.starts_with("fleet_propagation 1k"))
        .ok_or("fleet_propagation printed no result line (etcd missing? its output is above)")?;
    let pushes = number_before(line, " pushes").unwrap_or(0.0);
    let mut r = row(
        opts,
        info,
        "fleet",
        &format!(
            "fleet: `flowgate push` → enforced on 3 replicas, 3-member etcd, 1k × 1k, p50 / p99 ({pushes:.0} pushes)"
        ),
        "≤ 50 ms p99",
    );
    match (number_after(line, "p50 "), number_after(line, "p99 ")) {
        (Some(p50), Some(p99)) => {
            r.result = format!("{} / {} ms", sig3(p50), sig3(p99));
            r.met = Goal::AtMost(50.0).met(p99, None);
        }
        _ => r.result = format!("failed: no p50/p99 in {line:?}"),
    }
    r.peer = "—".into();
    Ok(vec![r])
}

// ---- criterion benches --------------------------------------------------------------------

/// A table row read from criterion's estimates.
struct Crit {
    capability: &'static str,
    id: &'static str,
    /// Per-element divisor (a burst of 64 packets timed as one iteration).
    per: f64,
    peer: Option<(&'static str, &'static str)>,
    target: &'static str,
    goal: Goal,
}

const fn c(capability: &'static str, id: &'static str, target: &'static str, goal: Goal) -> Crit {
    Crit { capability, id, per: 1.0, peer: None, target, goal }
}

const fn cp(
    capability: &'static str,
    id: &'static str,
    peer: (&'static str, &'static str),
    target: &'static str,
    goal: Goal,
) -> Crit {
    Crit { capability, id, per: 1.0, peer: Some(peer), target, goal }
}

/// Runs one criterion bench (filter `filter`) and turns the estimates it wrote into rows.
fn criterion_rows(
    opts: &Opts,
    info: &RunInfo,
    scenario: &str,
    bench: &str,
    env: &[(&str, String)],
    filter: &str,
    rows: &[Crit],
) -> Result<Vec<Row>, String> {
    let since = SystemTime::now();
    let mut args = vec!["--noplot"];
    if opts.quick {
        args.extend(["--warm-up-time", "0.2", "--measurement-time", "0.5", "--sample-size", "10"]);
    } else {
        args.extend(["--warm-up-time", "1", "--measurement-time", "3"]);
    }
    args.push(filter);
    cargo_bench(opts, bench, env, &args, false)?;
    let medians: HashMap<String, f64> =
        criterion::medians(&opts.target_dir().join("criterion"), since);
    let mut out = Vec::new();
    for c in rows {
        let Some(ns) = criterion::find(&medians, c.id) else {
            // The bench was renamed or a case dropped: a row that says so, not a gap.
            eprintln!("loadtest/run: {scenario}: no estimate for {} in this run", c.id);
            let mut r = row(opts, info, scenario, c.capability, c.target);
            r.result = format!("failed: no criterion estimate `{}` in this run", c.id);
            out.push(r);
            continue;
        };
        let ns = ns / c.per;
        let mut r = row(opts, info, scenario, c.capability, c.target);
        r.result = fmt_ns(ns);
        r.peer = "—".into();
        if let Some((name, id)) = c.peer
            && let Some(p) = criterion::find(&medians, id)
        {
            let p = p / c.per;
            r.peer = format!("{name}: {}", fmt_ns(p));
            r.ratio = ratio(ns, p);
        }
        r.met = c.goal.met(ns, r.ratio);
        out.push(r);
    }
    if out.iter().all(|r| r.result.starts_with("failed")) {
        return Err(format!("{bench}: criterion wrote no estimate for the table's rows"));
    }
    Ok(out)
}

fn decide(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    const ROWS: &[Crit] = &[
        c(
            "`decide`, 10k NetworkPolicies × 10k workloads (thread CPU)",
            "decide/cpu/10000np",
            "≤ 100 ns",
            Goal::AtMost(100.0),
        ),
        c(
            "`decide`, + 100 ANPs + BANP",
            "decide/cpu/10000np+100anp+banp",
            "≤ 100 ns",
            Goal::AtMost(100.0),
        ),
        c(
            "snapshot `load()` + `decide` (with ANPs)",
            "handle/cpu/load+decide/*",
            "≤ 100 ns",
            Goal::AtMost(100.0),
        ),
        c("compile 10k × 10k", "compile/cpu/10000np", "≤ 500 ms", Goal::AtMost(500e6)),
    ];
    criterion_rows(
        opts,
        info,
        "decide",
        "decide",
        &[],
        "^(decide/cpu/10000|handle/cpu|compile/cpu/10000np$)",
        ROWS,
    )
}

fn reload(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    const ROWS: &[Crit] = &[cp(
        "policy file change → enforced, 10k × 10k",
        "reload/watch_to_enforce_*",
        ("direct reload, no watcher", "reload/direct_*"),
        "≤ 100 ms",
        Goal::AtMost(100e6),
    )];
    let env = [("FLOWGATE_BENCH_SCALE", pick(opts.quick, 10_000, 1_000))];
    let rows = criterion_rows(opts, info, "reload", "reload", &env, "^reload/", ROWS)?;
    Ok(rows
        .into_iter()
        .map(|mut r| {
            if opts.quick {
                r.capability = r.capability.replace("10k × 10k", "1k × 1k (--quick)");
            }
            r
        })
        .collect())
}

fn conntrack(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    const ROWS: &[Crit] = &[
        cp(
            "conntrack lookup, 1M entries, random hits, batched, 1 thread",
            "conntrack_1M/lookup_many_hit/1",
            ("memory floor", "memory_floor_1M/floor_hit/1"),
            "median ≤ 50 ns",
            Goal::AtMost(50.0),
        ),
        cp(
            "conntrack lookup, same, 2 threads",
            "conntrack_1M/lookup_many_hit/2",
            ("memory floor", "memory_floor_1M/floor_hit/2"),
            "median ≤ 50 ns",
            Goal::AtMost(50.0),
        ),
    ];
    let env = [("CT_SKIP_MEMORY", "1".to_string())];
    criterion_rows(
        opts,
        info,
        "conntrack",
        "conntrack",
        &env,
        "^(conntrack_1M/lookup_many_hit/|memory_floor_1M/floor_hit/)",
        ROWS,
    )
}

fn admit(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    const ROWS: &[Crit] = &[
        c("`admit` deny: decide, counters, flow-log `try_send`", "admit/deny", "—", Goal::None),
        c("`admit` allow + conntrack insert + remove", "admit/allow+remove", "—", Goal::None),
    ];
    criterion_rows(opts, info, "admit", "admit", &[], "^admit/", ROWS)
}

fn wire(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    const ROWS: &[Crit] = &[
        cp(
            "HTTP CONNECT head parse (curl, 120 B)",
            "http_connect/flowgate/curl_connect",
            ("httparse (tokenises only)", "http_connect/httparse/curl_connect"),
            "—",
            Goal::None,
        ),
        cp(
            "TLS ClientHello SNI peek (~300 B)",
            "sni/flowgate/hello_300B",
            ("tls-parser", "sni/tls-parser/hello_300B"),
            "—",
            Goal::None,
        ),
    ];
    criterion_rows(opts, info, "wire", "wire", &[], "^(http_connect|sni)/", ROWS)
}

fn wire_proxy(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    const ROWS: &[Crit] = &[
        c("PROXY protocol header v2 (TCP4)", "proxy_protocol_parse/v2_tcp4", "—", Goal::None),
        c("PROXY protocol header v1 (TCP4)", "proxy_protocol_parse/v1_tcp4", "—", Goal::None),
    ];
    criterion_rows(opts, info, "wire_proxy", "wire_proxy", &[], "^proxy_protocol_parse/", ROWS)
}

fn classify(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    const ROWS: &[Crit] = &[
        cp(
            "packet classify, IPv4/TCP",
            "classify/flowgate/ipv4_tcp",
            ("pnet walk only", "classify/pnet/ipv4_tcp"),
            "—",
            Goal::None,
        ),
        cp(
            "packet classify, IPv6/UDP + ext. header",
            "classify/flowgate/ipv6_udp_ext",
            ("pnet walk only", "classify/pnet/ipv6_udp_ext"),
            "—",
            Goal::None,
        ),
    ];
    criterion_rows(opts, info, "classify", "classify", &[], "^classify/(flowgate|pnet)/", ROWS)
}

fn packet_filter(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    const ROWS: &[Crit] = &[
        Crit {
            per: 64.0,
            ..c(
                "packet filter, conntrack hit, TCP (burst of 64), per packet",
                "packet_filter/hit/tcp",
                "≤ 100 ns a packet",
                Goal::AtMost(100.0),
            )
        },
        Crit {
            per: 64.0,
            ..c(
                "packet filter, conntrack hit, UDP (burst of 64), per packet",
                "packet_filter/hit/udp",
                "≤ 100 ns a packet",
                Goal::AtMost(100.0),
            )
        },
        c(
            "packet filter, a new flow's SYN through the gate",
            "packet_filter/new/syn",
            "—",
            Goal::None,
        ),
    ];
    criterion_rows(opts, info, "packet_filter", "packet_filter", &[], "^packet_filter/", ROWS)
}

fn diff(opts: &Opts, info: &RunInfo) -> Result<Vec<Row>, String> {
    const ROWS: &[Crit] = &[
        c(
            "`flowgate diff`, one changed NetworkPolicy, 10k × 10k (diff alone, wall)",
            "diff/one-change/10k/diff-only",
            "≤ 1 s",
            Goal::AtMost(1e9),
        ),
        c(
            "`flowgate diff`, two unrelated 1k × 1k sets (diff alone, wall)",
            "diff/unrelated/1k/diff-only",
            "≤ 5 s",
            Goal::AtMost(5e9),
        ),
    ];
    criterion_rows(opts, info, "diff", "diff", &[], "diff-only", ROWS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_vs_nft_rows() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"bench":"packet_vs_nft","rules":10000,"udp_driver":"blast","cases":{
                "nft, 1 rule":{"udp_pps":100000.0,"tcp_gbps":2.0},
                "nft, 10000 rules, linear":{"udp_pps":90000.0,"tcp_gbps":1.9},
                "nft, 10000 rules, set":{"udp_pps":95000.0,"tcp_gbps":2.0},
                "nft, 10000 linear, no ct":{"udp_pps":9000.0,"tcp_gbps":0.1},
                "flowgate tun, 1 pol.":{"udp_pps":60000.0,"tcp_gbps":1.5},
                "flowgate tun, 10000 pol.":{"udp_pps":91000.0,"tcp_gbps":1.4},
                "flowgate afpacket, 1 pol.":{"error":"flowgate died"},
                "flowgate afpacket, 10000 pol.":{"error":"flowgate died"}}}"#,
        )
        .unwrap();
        let opts = Opts {
            root: ".".into(),
            profile: "dev".into(),
            quick: true,
            only: None,
            skip: Vec::new(),
            soak_secs: 1,
            soak_from: None,
            out: "x".into(),
            charts: "y".into(),
        };
        let info = RunInfo { machine: "m".into(), date: "d".into(), commit: "c".into() };
        let rows = pv_rows(&opts, &info, &v);
        // tun: 2 protocols × (1 + 2 comparisons); afpacket: one failed row per size.
        assert_eq!(rows.len(), 8, "{rows:#?}");
        let tcp1 = &rows[0];
        assert!(tcp1.capability.contains("(tun), 1 policy: TCP"), "{tcp1:?}");
        assert_eq!((tcp1.ratio, tcp1.met), (Some(0.75), Some(true)));
        let udp_linear = rows
            .iter()
            .find(|r| r.capability.contains("UDP") && r.target.contains("linear"))
            .unwrap();
        assert!(udp_linear.target.starts_with("≥ 10× "), "{udp_linear:?}");
        assert_eq!(udp_linear.met, Some(true));
        assert!(udp_linear.peer.contains("with conntrack first"), "{udp_linear:?}");
        let udp_set =
            rows.iter().find(|r| r.capability.contains("UDP") && r.target.contains("set")).unwrap();
        assert_eq!(udp_set.met, Some(true));
        assert!(rows[6].result.starts_with("failed: flowgate died"), "{:?}", rows[6]);
    }

    #[test]
    fn reads_numbers_from_text_lines() {
        let l = "realistic-10kx10k: flowgate check 1630 ms wall; flowgate test 10000 cases 120 ms, \
                 1 case 2 ms: 11.80 µs per case (ok) — median of 5";
        assert_eq!(number_before(l, " ms wall"), Some(1630.0));
        assert_eq!(number_before(l, " µs per case"), Some(11.8));
        let f = "fleet_propagation 1k (1000 workloads): 5 pushes, push→enforced on 3 replicas \
                 p50 218.0 ms, p99 709.5 ms, max 800.0 ms";
        assert_eq!(number_after(f, "p50 "), Some(218.0));
        assert_eq!(number_after(f, "p99 "), Some(709.5));
        assert_eq!(number_before(f, " pushes"), Some(5.0));
        assert_eq!(number_after(f, "p90 "), None);
    }

    #[test]
    fn finds_the_json_line() {
        let out = "text\n{\"bench\":\"l4\",\"x\":1}\nmore\n";
        assert_eq!(json_line(out, "l4").unwrap()["x"], 1);
        assert!(json_line(out, "soak").is_err());
    }
}
