//! `flowgate push DIR --inventory FILE`: a directory's policy files and an inventory into
//! the fleet's etcd prefix, in one transaction (adds, changes and removals together);
//! prints the new revision. Exit 0 pushed; 1 not pushed (broken files, a concurrent push,
//! etcd refused); 2 etcd could not be reached.

use std::path::PathBuf;
use std::process::ExitCode;

use flowgate::control::fleet::{self, PushError};

use super::admin_target::block_on;
use super::etcd_target::EtcdArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy directory (searched recursively, as `policy.dir`).
    pub dir: PathBuf,
    /// The inventory file.
    #[arg(long)]
    pub inventory: PathBuf,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (client, keys) = args.etcd.connect()?;
    match block_on(fleet::push(&client, &keys, &args.dir, &args.inventory))? {
        Ok(s) => {
            println!(
                "pushed revision {} ({} put, {} deleted, {} unchanged)",
                s.revision, s.put, s.deleted, s.unchanged
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(PushError::Etcd(e @ flowgate::control::etcd::EtcdError::Unreachable { .. })) => {
            Err(e.into())
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}
