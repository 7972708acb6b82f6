//! The `flowgate` binary: parse the command line and hand over to `cli`. The only place
//! where `anyhow` errors meet the user.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("flowgate: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
