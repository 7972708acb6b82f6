//! `flowgate status`: what a running gateway has in force (`GET /policy`): generation,
//! content hash, counts, next expiry, the last reload and any reload error, emergency
//! entries. Exit 1 while the last reload was rejected (the gateway serves an older
//! generation), so scripts can alert on it.

use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use super::admin_target::{AdminArgs, block_on};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Print the JSON answer as is.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.admin.target()?.client;
    let answer = block_on(client.get("/policy"))??;
    if answer.status != 200 {
        anyhow::bail!("admin API answered {}: {}", answer.status, answer.body.trim());
    }
    let v: Value = serde_json::from_str(&answer.body).context("the admin API sent bad JSON")?;
    if args.json {
        println!("{}", answer.body.trim_end());
    } else {
        print!("{}", render(&v));
    }
    Ok(if v["last_error"].is_null() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn render(v: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut out = format!(
        "generation {} (hash {}), loaded {}\n\
         {} policies in force ({} total) over {} workloads; default {}, unknown {}\n\
         sources: {} + {}\n\
         next expiry: {}\n",
        s(&v["generation"]),
        s(&v["hash"]).get(..12).unwrap_or(""),
        s(&v["loaded_at"]),
        s(&v["counts"]["live_policies"]),
        s(&v["counts"]["policies"]),
        s(&v["counts"]["workloads"]),
        s(&v["default"]),
        s(&v["unknown"]),
        s(&v["sources"]["policies"]),
        s(&v["sources"]["inventory"]),
        s(&v["next_expiry"]),
    );
    let last = &v["last_reload"];
    if !last.is_null() {
        out.push_str(&format!(
            "last reload: {} ({}) at {}\n",
            s(&last["result"]),
            s(&last["trigger"]),
            s(&last["time"])
        ));
    }
    if let Some(errors) = v["last_error"]["errors"].as_array() {
        out.push_str(&format!(
            "RELOAD FAILING since {}: generation {} still serving\n",
            s(&v["last_error"]["time"]),
            s(&v["generation"])
        ));
        for e in errors {
            let parts: Vec<String> = ["file", "object", "field", "message"]
                .iter()
                .filter(|k| !e[**k].is_null())
                .map(|k| s(&e[*k]))
                .collect();
            out.push_str(&format!("  error: {}\n", parts.join(": ")));
        }
    }
    for e in v["emergency"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "emergency {}: {} until {}\n",
            s(&e["id"]),
            s(&e["what"]),
            s(&e["expires_at"])
        ));
    }
    out
}
