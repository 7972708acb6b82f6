//! `flowgate quarantine TARGET --ttl 15m`: cut an address or `namespace/workload` off in
//! both directions for a while (`POST /emergency`). Open flows are cut at once; the
//! quarantine lifts itself when the TTL runs out, without any file change.

use std::process::ExitCode;

use anyhow::Context;
use serde_json::{Value, json};

use super::admin_target::{AdminArgs, block_on};

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
    let client = args.admin.client()?;
    let body = json!({ "quarantine": args.target, "ttl": args.ttl }).to_string();
    let answer = block_on(client.post("/emergency", Some(body)))??;
    let v: Value = serde_json::from_str(&answer.body)
        .with_context(|| format!("admin API answered {}: {}", answer.status, answer.body.trim()))?;
    if answer.status != 201 {
        eprintln!("error: {} ({})", v["error"].as_str().unwrap_or("refused"), answer.status);
        return Ok(ExitCode::from(1));
    }
    println!(
        "{} until {} (id {}); generation {}, {} open flow(s) cut",
        v["what"].as_str().unwrap_or("quarantined"),
        v["expires_at"].as_str().unwrap_or("?"),
        v["id"].as_str().unwrap_or("?"),
        v["generation"],
        v["revoked"]
    );
    Ok(ExitCode::SUCCESS)
}
