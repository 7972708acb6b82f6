//! The main configuration file (`config/flowgate.toml`): serde structs with their
//! defaults, and `validate`, which names the field that is wrong.
//!
//! Relative paths in the file are resolved against the directory the file is in, so the
//! bundled config works from any working directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::policy::DefaultAction;

/// The default location of the config file, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/flowgate.toml";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {field}: {message}", path.display())]
    Invalid { path: PathBuf, field: String, message: String },
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub policy: PolicyConfig,
    /// `[dns]`: how the egress listeners resolve names.
    #[serde(default)]
    pub dns: crate::egress::DnsConfig,
    /// `[ssrf]`: the guard against internal and special destinations (on by default).
    #[serde(default)]
    pub ssrf: crate::egress::SsrfConfig,
    /// The file this config was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[policy]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of policy YAML, searched recursively. Default `policies`.
    #[serde(default = "default_policy_dir")]
    pub dir: PathBuf,
    /// The inventory file. Default `inventory.yaml`.
    #[serde(default = "default_inventory")]
    pub inventory: PathBuf,
    /// Workloads that no policy isolates: `deny` (default) or `allow` (Kubernetes' behaviour).
    #[serde(default)]
    pub default: DefaultAction,
    /// Flows where neither endpoint is a workload. Default `deny`.
    #[serde(default)]
    pub unknown: DefaultAction,
    /// What happens to established flows when policy changes. Default `revalidate`.
    #[serde(default)]
    pub on_change: OnChange,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: default_policy_dir(),
            inventory: default_inventory(),
            default: DefaultAction::Deny,
            unknown: DefaultAction::Deny,
            on_change: OnChange::Revalidate,
        }
    }
}

/// `policy.on_change`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnChange {
    /// Re-check established flows against the new generation and cut the ones now denied.
    #[default]
    Revalidate,
    /// Leave established flows alone.
    Keep,
}

fn default_policy_dir() -> PathBuf {
    PathBuf::from("policies")
}

fn default_inventory() -> PathBuf {
    PathBuf::from("inventory.yaml")
}

impl Config {
    /// Reads, parses and validates a config file; relative paths become relative to it.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and, where it applies, the field.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut cfg = Config::parse(&text)
            .map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
        cfg.path = path.to_owned();
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.policy.dir = base.join(&cfg.policy.dir);
        cfg.policy.inventory = base.join(&cfg.policy.inventory);
        if let Some(hosts) = &cfg.dns.hosts_file {
            cfg.dns.hosts_file = Some(base.join(hosts));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses config text without touching the file system.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.policy.default, DefaultAction::Deny);
        assert_eq!(cfg.policy.unknown, DefaultAction::Deny);
        assert_eq!(cfg.policy.on_change, OnChange::Revalidate);
    }

    #[test]
    fn egress_sections_default_safe_and_hosts_file_is_relative_to_the_config() {
        let cfg = Config::parse("").unwrap();
        assert!(cfg.ssrf.enabled);
        assert!(cfg.dns.servers.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flowgate.toml");
        std::fs::write(
            &path,
            "[dns]\nhosts_file = \"hosts\"\n[dns.static]\n\"a.example\" = [\"127.0.0.2\"]\n[ssrf]\ntreat_as_external = [\"127.0.0.2/32\"]\n",
        )
        .unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.dns.hosts_file, Some(dir.path().join("hosts")));
        assert_eq!(cfg.dns.static_hosts.len(), 1);
        assert_eq!(cfg.ssrf.treat_as_external.len(), 1);
        let err = Config::parse("[ssrf]\nenabled = \"no\"\n").unwrap_err();
        assert!(err.contains("enabled"), "{err}");
    }

    #[test]
    fn unknown_field_is_an_error() {
        let err = Config::parse("[policy]\ndefualt = \"allow\"\n").unwrap_err();
        assert!(err.contains("defualt"), "{err}");
    }
}
