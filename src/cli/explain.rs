//! `flowgate explain`: the verdict for one flow and, per side, the walk through the tiers
//! that produced it (Admin rule matched or passed, isolating NetworkPolicies and the rule
//! that admitted or the fact that none did, Baseline rule, the default), plus any audit-mode
//! would-deny. `--json` prints the library's [`Explanation`] as one stable object.
//!
//! Exit 0 for allow and deny alike (a denial is an answer, not a failure); 1 when the
//! input is bad (unknown workload, bad port, policy that does not load).

use std::process::ExitCode;

use flowgate::policy::explain::{Explanation, RuleRef, SideTrace};
use flowgate::policy::simulate::{self, Endpoint};

use super::check::Source;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The source: namespace/workload or an IP address.
    #[arg(long, value_name = "NS/WORKLOAD|IP")]
    pub from: String,
    /// The destination: namespace/workload, an IP address, or a domain name.
    #[arg(long, value_name = "NS/WORKLOAD|IP|NAME")]
    pub to: String,
    /// Destination port: a number, or a named port of the destination workload.
    #[arg(long, value_name = "PORT|NAME")]
    pub port: String,
    /// TCP (default), UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// Print the explanation as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: Source,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let input = (|| {
        let from =
            simulate::parse_endpoint(&args.from, false).map_err(|e| format!("--from: {e}"))?;
        let to = simulate::parse_endpoint(&args.to, true).map_err(|e| format!("--to: {e}"))?;
        let port = simulate::parse_port(&args.port).map_err(|e| format!("--port: {e}"))?;
        let proto =
            simulate::parse_protocol(&args.protocol).map_err(|e| format!("--protocol: {e}"))?;
        Ok::<_, String>((from, to, port, proto))
    })();
    let (from, to, port, proto) = match input {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let loaded = match args.source.load() {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let flow = match simulate::resolve(&loaded.compiled, &from, &to, &port, proto) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let ex = loaded.compiled.explain(&flow.query());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&ex)?);
    } else {
        print!("{}", render(&ex, &from, &to));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human form. One block per side, one line per tier, in evaluation order; tiers
/// after the deciding one are shown as not reached.
pub fn render(ex: &Explanation, from: &Endpoint, to: &Endpoint) -> String {
    let mut out = String::new();
    let end = |written: &Endpoint, info: &flowgate::policy::explain::EndpointInfo| match (
        &info.workload,
        written,
    ) {
        (_, Endpoint::Domain(d)) => format!("{d} (domain)"),
        (Some(w), _) => format!("{w} ({})", info.ip),
        (None, _) => format!("{} (external)", info.ip),
    };
    out.push_str(&format!(
        "flow:    {} → {} port {}/{}\n",
        end(from, &ex.src),
        end(to, &ex.dst),
        ex.port,
        ex.protocol
    ));
    let mut verdict = format!("verdict: {}", ex.verdict.to_uppercase());
    if let Some(dir) = ex.direction {
        verdict.push_str(&format!(" ({dir} side"));
        if let Some(r) = ex.reason {
            verdict.push_str(&format!(", {r}"));
        }
        verdict.push(')');
    } else if let Some(r) = ex.reason {
        verdict.push_str(&format!(" ({r})"));
    }
    if let Some(p) = &ex.policy {
        verdict.push_str(&format!(" — {p}"));
    }
    out.push_str(&verdict);
    out.push('\n');
    if ex.unknown {
        out.push_str("neither endpoint is an inventory workload: policy.unknown decided\n");
    }
    side(&mut out, "egress", "source", ex.egress.as_ref(), &end(from, &ex.src));
    side(&mut out, "ingress", "destination", ex.ingress.as_ref(), &end(to, &ex.dst));
    match (&ex.would_deny, &ex.audit) {
        (Some(p), Some(audit)) => {
            out.push_str(&format!("audit:   WOULD-DENY by {p} (audit mode: not enforced)\n"));
            side(&mut out, "  egress (audit)", "source", audit.egress.as_ref(), "");
            side(&mut out, "  ingress (audit)", "destination", audit.ingress.as_ref(), "");
        }
        (Some(p), None) => out.push_str(&format!("audit:   WOULD-DENY by {p}\n")),
        _ => out.push_str("audit:   no audit-mode policy would deny\n"),
    }
    out
}

fn rule(r: &RuleRef) -> String {
    format!("{} {} rule {} ({})", r.kind, r.policy, r.rule, r.action)
}

fn side(out: &mut String, label: &str, role: &str, trace: Option<&SideTrace>, who: &str) {
    let Some(t) = trace else {
        if !who.is_empty() {
            out.push_str(&format!(
                "{label}: {role} {who} is not a workload — no policy of its own\n"
            ));
        }
        return;
    };
    let note = if t.informational { " (not needed: the other side already denied)" } else { "" };
    out.push_str(&format!(
        "{label} of {}: {} by {}{note}\n",
        t.workload,
        t.verdict.to_uppercase(),
        t.decided_by
    ));
    let reached = |tier: u8| {
        let decided = match t.decided_by {
            "admin" => 1,
            "networkpolicy" => 2,
            "baseline" => 3,
            _ => 4,
        };
        tier <= decided
    };
    let pad = if label.starts_with(' ') { "    " } else { "  " };
    // 1. Admin.
    let admin = match (&t.admin, t.decided_by) {
        (Some(r), "admin") => format!("matched {}", rule(r)),
        (Some(r), _) => format!("passed by {} → NetworkPolicy tier", rule(r)),
        (None, _) => "no rule matched".to_string(),
    };
    out.push_str(&format!("{pad}1 admin:         {admin}\n"));
    // 2. NetworkPolicy.
    let np = if !reached(2) {
        "not reached".to_string()
    } else if t.isolated_by.is_empty() {
        "not isolated (no NetworkPolicy selects it for this direction)".to_string()
    } else {
        let iso = format!("isolated by {}", t.isolated_by.join(", "));
        match &t.admitted_by {
            Some(r) => format!("{iso}; admitted by {}", rule(r)),
            None => format!("{iso}; no rule admits the flow"),
        }
    };
    out.push_str(&format!("{pad}2 networkpolicy: {np}\n"));
    // 3. Baseline.
    let banp = if !reached(3) {
        "not reached".to_string()
    } else {
        match &t.baseline {
            Some(r) => format!("matched {}", rule(r)),
            None => "no rule matched".to_string(),
        }
    };
    out.push_str(&format!("{pad}3 baseline:      {banp}\n"));
    // 4. Default.
    let default = match t.default {
        Some(d) => format!("policy.default = {d}"),
        None => "not reached".to_string(),
    };
    out.push_str(&format!("{pad}4 default:       {default}\n"));
}
