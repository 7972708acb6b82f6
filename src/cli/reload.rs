//! `flowgate reload`: ask a running gateway to reload its policy now (`POST /reload`).
//! Prints the new generation and what changed, or every error (exit 1; the old generation
//! keeps serving). A refusal (a 401 …) is reported as by every admin command: `error: …`
//! lines saying what to change, exit 1 ([`super::admin_target`]).

use std::process::ExitCode;

use super::admin_target::AdminArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub admin: AdminArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // 422 carries the rejected reload's errors; anything else not 200 is a refusal.
    let v = match args.admin.target()?.post("/reload", None, &[200, 422])? {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
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
