//! Command-line front end: each subcommand parses its arguments and calls the library.
//! Thin on purpose: anything worth testing lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin_target;
pub mod check;
pub mod diff;
mod etcd_target;
pub mod explain;
pub mod fleet;
pub mod generate;
pub mod push;
pub mod quarantine;
pub mod reload;
pub mod run;
pub mod status;
pub mod test;

/// flowgate: Kubernetes network policy, enforced at the perimeter.
#[derive(Debug, Parser)]
#[command(name = "flowgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (default config: config/flowgate.toml).
    Run(run::Args),
    /// Validate and lint policy; exit 1 on errors.
    Check(check::Args),
    /// Show the verdict for one flow and the rules behind it.
    Explain(explain::Args),
    /// Run connectivity assertions from a YAML file.
    Test(test::Args),
    /// Show which flows a policy change opens and closes.
    Diff(diff::Args),
    /// Write NetworkPolicies that allow exactly the flows an observe-mode gateway logged.
    Generate(generate::Args),
    /// Show what a running gateway has in force (admin API).
    Status(status::Args),
    /// Make a running gateway reload its policy now (admin API).
    Reload(reload::Args),
    /// Cut an address or namespace/workload off for a while (admin API).
    Quarantine(quarantine::Args),
    /// Write a policy directory and inventory into the fleet's etcd prefix (one transaction).
    Push(push::Args),
    /// What each replica of an etcd fleet enforces, and which drift.
    Fleet(fleet::Args),
}

/// Runs the chosen subcommand and returns the process exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Check(args) => check::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Test(args) => test::run(args),
        Command::Diff(args) => diff::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Status(args) => status::run(args),
        Command::Reload(args) => reload::run(args),
        Command::Quarantine(args) => quarantine::run(args),
        Command::Push(args) => push::run(args),
        Command::Fleet(args) => fleet::run(args),
    }
}
