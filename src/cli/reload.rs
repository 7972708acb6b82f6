//! `flowgate reload`: ask a running gateway to reload its policy now (`POST /reload`).
//! Prints the new generation and what changed, or every error (exit 1; the old generation
//! keeps serving).

use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use super::admin_target::{AdminArgs, block_on};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub admin: AdminArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.admin.client()?;
    let answer = block_on(client.post("/reload", None))??;
    if answer.status == 401 {
        anyhow::bail!("admin API refused the token (401): pass --token or set admin.token_env");
    }
    let v: Value = serde_json::from_str(&answer.body)
        .with_context(|| format!("admin API answered {}: {}", answer.status, answer.body.trim()))?;
    match v["result"].as_str() {
        Some("ok") => {
            let c = &v["changes"];
            println!(
                "reloaded: generation {} ({} added, {} removed, {} modified policies; {} workloads \
                 relabelled; {} flows revoked)",
                v["generation"],
                c["policies_added"],
                c["policies_removed"],
                c["policies_modified"],
                c["workloads_relabelled"],
                v["revoked"]
            );
            Ok(ExitCode::SUCCESS)
        }
        Some("unchanged") => {
            println!("unchanged: generation {} is current", v["generation"]);
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            for e in v["errors"].as_array().into_iter().flatten() {
                let parts: Vec<&str> = ["file", "object", "field", "message"]
                    .iter()
                    .filter_map(|k| e[*k].as_str())
                    .collect();
                eprintln!("error: {}", parts.join(": "));
            }
            eprintln!("reload rejected; generation {} keeps serving", v["generation"]);
            Ok(ExitCode::from(1))
        }
    }
}
