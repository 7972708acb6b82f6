//! `flowgate generate --flowlog FILE...`: NetworkPolicies that allow exactly the flows a
//! gateway in observe mode (`policy.mode = "observe"`) logged as `allow`, one YAML file per
//! namespace in `--out` (the library: `policy::generate`). Prints the files written to
//! stdout and what could not be expressed to stderr (`note: …`). Exit 0; 1 on bad input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use flowgate::config::{Config, DEFAULT_CONFIG_PATH};
use flowgate::policy::generate::{self, Options};
use flowgate::policy::load;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Flow log files (JSON lines) of a gateway run in observe mode.
    #[arg(long, num_args = 1.., required = true)]
    pub flowlog: Vec<PathBuf>,
    /// The inventory (default: the config's `policy.inventory`).
    #[arg(long)]
    pub inventory: Option<PathBuf>,
    /// The config to take the inventory from (default: config/flowgate.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where to write `<namespace>.yaml` (created if missing).
    #[arg(long, default_value = "generated")]
    pub out: PathBuf,
    /// Select workloads and peers by this label (when they carry it).
    #[arg(long, default_value = "app", conflicts_with = "own_labels")]
    pub label: String,
    /// Select workloads and peers by all their own labels instead of one label.
    #[arg(long)]
    pub own_labels: bool,
    /// Prefix length of the `ipBlock`s for external IPv4 addresses (32: each address).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(0..=32))]
    pub prefix_len: u8,
    /// Prefix length for external IPv6 addresses.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u8).range(0..=128))]
    pub prefix_len_v6: u8,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match generate_files(&args) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

fn generate_files(args: &Args) -> anyhow::Result<()> {
    let inventory_path = match &args.inventory {
        Some(p) => p.clone(),
        None => {
            let path = args.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            Config::load(&path)
                .with_context(|| format!("loading {} (or give --inventory)", path.display()))?
                .policy
                .inventory
        }
    };
    let inventory = load::load_inventory(&inventory_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut flows = Vec::new();
    for file in &args.flowlog {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        flows.extend(generate::parse_flowlog(&text, file)?);
    }
    let opts = Options {
        label: (!args.own_labels).then(|| args.label.clone()),
        prefix_v4: args.prefix_len,
        prefix_v6: args.prefix_len_v6,
    };
    let out = generate::generate(&inventory, &flows, &opts);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for (ns, yaml) in &out.files {
        let path = args.out.join(format!("{}.yaml", file_stem(ns)));
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        println!(
            "wrote {} ({} policies)",
            path.display(),
            yaml.matches("\nkind: NetworkPolicy").count()
        );
    }
    if out.files.is_empty() {
        println!("no allowed flow between inventory workloads in {} file(s)", args.flowlog.len());
    }
    for note in &out.unexpressed {
        eprintln!("note: not expressed: {note}");
    }
    Ok(())
}

/// A namespace name is already a safe file name (DNS-1123); keep it that way.
fn file_stem(ns: &str) -> String {
    let s: String =
        ns.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    if Path::new(&s).components().count() == 1 && !s.is_empty() { s } else { "_".into() }
}
