//! `flowgate fleet status [--json]`: the replicas reporting under the fleet's etcd prefix,
//! the revision each enforces against the latest push, drift flagged. Exit 0 when every
//! replica is in step; 3 when one drifts (behind the latest push for longer than
//! `--grace`, its last reload failed) or fewer than `--expect` replicas report; 2 when
//! etcd cannot be reached.

use std::process::ExitCode;
use std::time::Duration;

use flowgate::control::fleet;

use super::admin_target::block_on;
use super::etcd_target::EtcdArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// List the replicas and what each enforces; exit 3 if any drifts.
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// How long a replica may take to apply a push before it counts as drifting.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// How many replicas should report; fewer make the fleet drift.
    #[arg(long)]
    pub expect: Option<usize>,
}

/// The exit code when a replica drifts.
pub const DRIFT_EXIT: u8 = 3;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let FleetCommand::Status(args) = args.command;
    let (client, keys) = args.etcd.connect()?;
    let status = block_on(fleet::status(&client, &keys, args.grace, args.expect))??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!(
            "latest revision {} (pushed {})",
            status.latest_revision,
            status.pushed_at.as_deref().unwrap_or("-")
        );
        for r in &status.replicas {
            let p = &r.report;
            println!(
                "{} {} revision {} generation {} hash {}{}{}",
                if r.drifting { "DRIFT" } else { "ok   " },
                p.id,
                p.revision,
                p.generation,
                p.hash.get(..12).unwrap_or(""),
                if p.connected { "" } else { " (etcd unreachable)" },
                if r.reasons.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.reasons.join("; "))
                },
            );
        }
        if status.missing > 0 {
            println!("missing: {} replica(s) expected but not reporting", status.missing);
        }
    }
    Ok(if status.drifting() { ExitCode::from(DRIFT_EXIT) } else { ExitCode::SUCCESS })
}
