//! `flowgate quarantine TARGET --ttl 15m`: cut an address or `namespace/workload` off in
//! both directions for a while (`POST /emergency`). Open flows are cut at once; the
//! quarantine lifts itself when the TTL runs out, without any file change. With the etcd
//! source the replica asked stores it for the whole fleet; when etcd cannot be written it
//! protects that replica only, and this prints a warning saying so (still exit 0: the
//! quarantine is in force there). A refusal (a
//! 401, an unknown workload …) is reported as by every admin command: `error: …` lines,
//! exit 1 ([`super::admin_target`]).

use std::process::ExitCode;

use serde_json::json;

use super::admin_target::AdminArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// An IP address or namespace/workload.
    pub target: String,
    /// How long, e.g. 30s, 15m, 2h.
    #[arg(long)]
    pub ttl: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let body = json!({ "quarantine": args.target, "ttl": args.ttl }).to_string();
    let v = match args.admin.target()?.post("/emergency", Some(body), &[201])? {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    println!(
        "{} until {} (id {}); generation {}, {} open flow(s) cut",
        v["what"].as_str().unwrap_or("quarantined"),
        v["expires_at"].as_str().unwrap_or("?"),
        v["id"].as_str().unwrap_or("?"),
        v["generation"],
        v["revoked"]
    );
    if let Some(w) = v["warning"].as_str() {
        eprintln!("warning: {w}");
    } else if v["scope"] == "fleet" {
        println!("stored in etcd: every replica of the fleet enforces it");
    }
    Ok(ExitCode::SUCCESS)
}
