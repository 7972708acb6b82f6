//! The main configuration file (`config/flowgate.toml`): serde structs with their
//! defaults, and `validate`, which names the field that is wrong.
//!
//! Relative paths in the file are resolved against the directory the file is in, so the
//! bundled config works from any working directory.
//!
//! Every section's types live here (one file per section: [`listener`], [`admin`],
//! [`control`], [`flowlog`], [`packet`]), except those of the modules below this one (`[conntrack]`,
//! `[dns]`, `[ssrf]`, `[[credential]]`, which their modules read themselves): config imports
//! from `policy`, `conntrack`, `egress` and `wire`, and is imported by the modules that run
//! what it describes (`telemetry`, `dataplane`, `control`, `admin`, `gateway`), never the
//! other way round.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::policy::DefaultAction;

pub mod admin;
pub mod control;
pub mod flowlog;
pub mod listener;
pub mod packet;
pub mod source;

pub use admin::{AdminConfig, TokenEnvError};
pub use control::ControlConfig;
pub use flowlog::FlowLogConfig;
pub use listener::{ListenerConfig, ListenerKind, ProxyHeaderConfig, ProxyProtocolMode, VerifySni};
pub use packet::PacketConfig;
pub use source::{DEFAULT_MAX_ANSWER, SourceConfig, SourceKind};

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
    /// `[conntrack]`: table size and timeouts.
    #[serde(default)]
    pub conntrack: crate::conntrack::ConntrackConfig,
    /// `[[listener]]`: the data ports, in order (a listener's index is its id in conntrack).
    #[serde(default)]
    pub listener: Vec<ListenerConfig>,
    /// `[flowlog]`: where deny events go and how they are folded.
    #[serde(default)]
    pub flowlog: FlowLogConfig,
    /// `[run]`: process-wide settings of `flowgate run`.
    #[serde(default)]
    pub run: RunConfig,
    /// `[admin]`: the admin HTTP API (bind, bearer token).
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[control]`: reload debounce, audit log, revalidation batches, emergency overlay.
    #[serde(default)]
    pub control: ControlConfig,
    /// `[dns]`: how the egress listeners resolve names.
    #[serde(default)]
    pub dns: crate::egress::DnsConfig,
    /// `[ssrf]`: the guard against internal and special destinations (on by default).
    #[serde(default)]
    pub ssrf: crate::egress::SsrfConfig,
    /// `[[credential]]`: proxy usernames mapped to workloads, for the egress listeners
    /// whose `credentials` is `optional` or `required`.
    #[serde(default)]
    pub credential: Vec<crate::egress::CredentialConfig>,
    /// `[packet]`: the packet filter (TUN or AF_PACKET front end); absent: off.
    #[serde(default)]
    pub packet: Option<PacketConfig>,
    /// `[source]`: the policy directory (default) or a prefix in etcd shared by a fleet.
    #[serde(default)]
    pub source: SourceConfig,
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
    /// `enforce` (default) or `observe`: `default` becomes `allow` and every allowed flow
    /// is logged as an `allow` event (`flowlog.allow_sample = 1`), the input of
    /// `flowgate generate`. Applied by [`Config::parse`].
    #[serde(default)]
    pub mode: PolicyMode,
}

/// `policy.mode`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    /// Learn the flows: allow what no policy isolates and log every allowed flow.
    Observe,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: default_policy_dir(),
            inventory: default_inventory(),
            default: DefaultAction::Deny,
            unknown: DefaultAction::Deny,
            on_change: OnChange::Revalidate,
            mode: PolicyMode::Enforce,
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

/// `[run]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// After SIGTERM/SIGINT: how long open connections may take to finish before the
    /// process exits anyway. Default 30s.
    #[serde(with = "crate::human_duration")]
    pub drain_timeout: Duration,
    /// Tokio worker threads; 0 (default) means one per CPU.
    pub worker_threads: usize,
    /// How often the conntrack expiry task runs. Default 1s.
    #[serde(with = "crate::human_duration")]
    pub expiry_interval: Duration,
    /// Entries the expiry task looks at per run (it never scans the whole table at once).
    /// Default 4,096.
    pub expiry_budget: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            drain_timeout: Duration::from_secs(30),
            worker_threads: 0,
            expiry_interval: Duration::from_secs(1),
            expiry_budget: 4096,
        }
    }
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
        if cfg.flowlog.output != "-" {
            cfg.flowlog.output = base.join(&cfg.flowlog.output).to_string_lossy().into_owned();
        }
        cfg.control.resolve_paths(base);
        if let Some(hosts) = &cfg.dns.hosts_file {
            cfg.dns.hosts_file = Some(base.join(hosts));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses config text without touching the file system.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if cfg.policy.mode == PolicyMode::Observe {
            cfg.policy.default = DefaultAction::Allow;
            cfg.flowlog.allow_sample = 1;
        }
        Ok(cfg)
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: self.path.clone(),
            field,
            message,
        };
        if self.listener.len() > usize::from(u16::MAX) {
            return Err(invalid("listener".into(), "too many listeners".into()));
        }
        let mut names = HashSet::new();
        for (i, l) in self.listener.iter().enumerate() {
            let field = |f: &str| format!("listener[{i}] ({}).{f}", l.name);
            if l.name.is_empty() {
                return Err(invalid(format!("listener[{i}].name"), "must not be empty".into()));
            }
            if !names.insert(l.name.as_str()) {
                return Err(invalid(field("name"), "two listeners have this name".into()));
            }
            match l.kind {
                ListenerKind::Tcp | ListenerKind::Udp if l.upstreams.is_empty() => {
                    return Err(invalid(field("upstreams"), "needs at least one upstream".into()));
                }
                ListenerKind::HttpConnect | ListenerKind::Socks5 | ListenerKind::Transparent
                    if !l.upstreams.is_empty() =>
                {
                    return Err(invalid(
                        field("upstreams"),
                        "a forward proxy dials what the client asks for; it takes none".into(),
                    ));
                }
                ListenerKind::HttpConnect | ListenerKind::Socks5 | ListenerKind::Transparent
                    if l.handshake_timeout.is_zero() || l.max_handshakes == 0 =>
                {
                    return Err(invalid(
                        field("handshake_timeout"),
                        "handshake_timeout and max_handshakes must be above zero".into(),
                    ));
                }
                ListenerKind::Echo if !l.upstreams.is_empty() => {
                    return Err(invalid(
                        field("upstreams"),
                        "an echo listener is its own upstream; it takes none".into(),
                    ));
                }
                _ => {}
            }
            if l.kind == ListenerKind::Echo && l.proxy_protocol != ProxyProtocolMode::Off {
                return Err(invalid(field("proxy_protocol"), "not for an echo listener".into()));
            }
            if l.kind == ListenerKind::Transparent && l.proxy_protocol != ProxyProtocolMode::Off {
                // The kernel's NAT entry says where the client was going; a balancer in
                // front could not have redirected the connection.
                return Err(invalid(
                    field("proxy_protocol"),
                    "not for a transparent listener (the destination comes from NAT)".into(),
                ));
            }
            if let Err((f, message)) = l.proxy_header().validate(l.kind == ListenerKind::Udp) {
                return Err(invalid(field(f), message));
            }
            if l.credentials != crate::egress::CredentialMode::Off && !l.kind.is_egress() {
                return Err(invalid(
                    field("credentials"),
                    "only for http-connect and socks5".into(),
                ));
            }
            if l.credentials == crate::egress::CredentialMode::Required
                && self.credential.is_empty()
            {
                return Err(invalid(
                    field("credentials"),
                    "required, but no [[credential]] is configured".into(),
                ));
            }
            if l.verify_sni != VerifySni::Off
                && (l.kind != ListenerKind::HttpConnect || l.sni_timeout.is_zero())
            {
                return Err(invalid(
                    field("verify_sni"),
                    "only for http-connect, with sni_timeout above zero".into(),
                ));
            }
            if l.udp_max_destinations == 0 {
                return Err(invalid(field("udp_max_destinations"), "must be at least 1".into()));
            }
            if l.udp_max_associations == 0 {
                return Err(invalid(field("udp_max_associations"), "must be at least 1".into()));
            }
            if l.max_connections == 0 {
                return Err(invalid(field("max_connections"), "must be at least 1".into()));
            }
        }
        for (i, c) in self.credential.iter().enumerate() {
            let ok = c.password.is_some() != c.password_env.is_some()
                && c.workload.split_once('/').is_some_and(|(a, b)| !a.is_empty() && !b.is_empty());
            if !ok {
                return Err(invalid(
                    format!("credential[{i}] ({})", c.username),
                    "needs one of password / password_env, and workload = \"namespace/name\""
                        .into(),
                ));
            }
        }
        if self.flowlog.channel_capacity == 0 {
            return Err(invalid("flowlog.channel_capacity".into(), "must be at least 1".into()));
        }
        self.conntrack.validate().map_err(|e| ConfigError::Invalid {
            path: self.path.clone(),
            field: "conntrack".into(),
            message: e.to_string(),
        })?;
        self.admin.validate().map_err(|(field, message)| ConfigError::Invalid {
            path: self.path.clone(),
            field: format!("admin.{field}"),
            message,
        })?;
        if let Some(p) = &self.packet {
            p.validate().map_err(|(f, message)| invalid(format!("packet.{f}"), message))?;
            if self.listener.iter().any(|l| l.name == p.name) {
                return Err(invalid(
                    "packet.name".into(),
                    format!("{:?} is also a [[listener]]'s name", p.name),
                ));
            }
        }
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

    fn validated(text: &str) -> Result<Config, String> {
        let cfg = Config::parse(text)?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn observe_mode_allows_by_default_and_logs_every_allowed_flow() {
        let cfg = validated("[policy]\nmode = \"observe\"\ndefault = \"deny\"\n").unwrap();
        assert_eq!(cfg.policy.default, DefaultAction::Allow);
        assert_eq!(cfg.flowlog.allow_sample, 1);
        let cfg = validated("[policy]\n").unwrap();
        assert_eq!(cfg.policy.mode, PolicyMode::Enforce);
        assert_eq!(cfg.flowlog.allow_sample, 0);
    }

    #[test]
    fn listeners_parse_with_defaults() {
        let cfg = validated(
            "[[listener]]\nname = \"a\"\nkind = \"tcp\"\nbind = \"127.0.0.1:1\"\n\
             upstreams = [\"127.0.0.2:2\"]\n",
        )
        .unwrap();
        let l = &cfg.listener[0];
        assert_eq!(l.connect_timeout, Duration::from_secs(5));
        assert_eq!(l.max_connections, 10_000);
        assert_eq!(l.proxy_protocol, ProxyProtocolMode::Off);
        assert_eq!(l.proxy_protocol_timeout, Duration::from_secs(5));
        assert!(l.reuse_port);
        assert_eq!(cfg.run.drain_timeout, Duration::from_secs(30));
        assert_eq!(cfg.flowlog.allow_sample, 0);
    }

    #[test]
    fn listener_mistakes_name_the_field() {
        let base = "name = \"a\"\nbind = \"127.0.0.1:1\"\n";
        let cases = [
            ("kind = \"tcp\"\n", "upstreams"),
            ("kind = \"echo\"\nupstreams = [\"127.0.0.2:2\"]\n", "upstreams"),
            (
                "kind = \"tcp\"\nupstreams = [\"127.0.0.2:2\"]\nproxy_protocol = \"v2\"\n",
                "trusted_proxies",
            ),
            (
                "kind = \"udp\"\nupstreams = [\"127.0.0.2:2\"]\nproxy_protocol = \"v1\"\n\
                 trusted_proxies = [\"10.0.0.0/8\"]\n",
                "proxy_protocol",
            ),
            (
                "kind = \"tcp\"\nupstreams = [\"127.0.0.2:2\"]\nmax_connections = 0\n",
                "max_connections",
            ),
            ("kind = \"socks5\"\nupstreams = [\"127.0.0.2:2\"]\n", "upstreams"),
            ("kind = \"http-connect\"\nhandshake_timeout = \"0s\"\n", "handshake_timeout"),
            ("kind = \"transparent\"\nupstreams = [\"127.0.0.2:2\"]\n", "upstreams"),
            ("kind = \"transparent\"\nmax_handshakes = 0\n", "handshake_timeout"),
            (
                "kind = \"transparent\"\nproxy_protocol = \"v2\"\n\
                 trusted_proxies = [\"10.0.0.0/8\"]\n",
                "proxy_protocol",
            ),
            ("kind = \"echo\"\ncredentials = \"optional\"\n", "credentials"),
            ("kind = \"http-connect\"\ncredentials = \"required\"\n", "credentials"),
            ("kind = \"socks5\"\nverify_sni = \"on\"\n", "verify_sni"),
            ("kind = \"socks5\"\nudp_max_destinations = 0\n", "udp_max_destinations"),
            ("kind = \"socks5\"\nudp_max_associations = 0\n", "udp_max_associations"),
        ];
        for (extra, field) in cases {
            let err = validated(&format!("[[listener]]\n{base}{extra}")).unwrap_err();
            assert!(err.contains(field), "{extra}: {err}");
        }
        let dup =
            format!("[[listener]]\n{base}kind = \"echo\"\n[[listener]]\n{base}kind = \"echo\"\n");
        assert!(validated(&dup).unwrap_err().contains("name"));
        let typo = format!("[[listener]]\n{base}kind = \"echo\"\nidle_timout = \"1s\"\n");
        assert!(validated(&typo).unwrap_err().contains("idle_timout"));
    }

    #[test]
    fn credentials_parse_and_name_their_mistakes() {
        let ok = validated(
            "[[credential]]\nusername = \"a\"\npassword = \"p\"\nworkload = \"fn/a\"\n\
             [[listener]]\nname = \"s\"\nkind = \"socks5\"\nbind = \"127.0.0.1:1\"\n\
             credentials = \"required\"\n",
        )
        .unwrap();
        assert_eq!(ok.credential[0].workload, "fn/a");
        assert_eq!(ok.listener[0].credentials, crate::egress::CredentialMode::Required);
        let err = validated("[[credential]]\nusername = \"a\"\nworkload = \"fn/a\"\n").unwrap_err();
        assert!(err.contains("credential[0]"), "{err}");
        let err =
            validated("[[credential]]\nusername = \"a\"\npassword = \"p\"\nworkload = \"a\"\n")
                .unwrap_err();
        assert!(err.contains("namespace/name"), "{err}");
    }

    #[test]
    fn packet_section_is_optional_and_validated_with_the_rest() {
        assert!(validated("").unwrap().packet.is_none());
        let cfg = validated("[packet]\nworkers = 1\n").unwrap();
        assert_eq!(cfg.packet.unwrap().worker_count(), 1);
        let err = validated("[packet]\nburst = 0\n").unwrap_err();
        assert!(err.contains("packet.burst"), "{err}");
        let clash = "[packet]\nname = \"e\"\n[[listener]]\nname = \"e\"\nkind = \"echo\"\n\
                     bind = \"127.0.0.1:1\"\n";
        assert!(validated(clash).unwrap_err().contains("packet.name"));
    }

    #[test]
    fn bundled_config_is_valid_and_runs_the_demo() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/flowgate.toml");
        let cfg = Config::load(&path).unwrap();
        assert!(cfg.listener.iter().any(|l| l.name == "demo" && l.kind == ListenerKind::Tcp));
        assert!(cfg.listener.iter().any(|l| l.kind == ListenerKind::Echo));
    }
}
