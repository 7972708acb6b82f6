//! Name resolution for the egress listeners: the static table, then the hosts file, then
//! DNS (hickory-resolver, whose cache honours record TTLs), under one timeout.
//!
//! A resolution returns every candidate address at once, and the caller dials one of
//! *those* addresses: nothing ever resolves the same name a second time for the same
//! flow. That is what makes DNS rebinding harmless — the addresses that were checked are
//! the addresses that are dialled (see `egress::check`).
//!
//! The static table can be replaced at run time ([`Resolver::replace_static`]) without
//! losing the DNS cache, so a reload that changes `[dns.static]` takes effect for the
//! next flow.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use serde::Deserialize;
use thiserror::Error;

use super::name::{DomainName, Target};

/// `[dns]`
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers (`"ip:port"`, UDP with TCP fallback). Empty (default): the system's
    /// `/etc/resolv.conf`.
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
    /// Time allowed for one resolution, all servers and retries included. Default `2s`.
    #[serde(default = "default_timeout", with = "crate::human_duration")]
    pub timeout: Duration,
    /// A hosts(5) file consulted after the static table and before DNS. Relative paths are
    /// relative to the config file. Default none (the system's `/etc/hosts` is not read).
    #[serde(default)]
    pub hosts_file: Option<PathBuf>,
    /// Fixed answers, consulted first: `"api.example.com" = ["127.0.0.2"]`. For tests and
    /// split-horizon setups. Default empty.
    #[serde(default, rename = "static")]
    pub static_hosts: BTreeMap<String, Vec<IpAddr>>,
    /// At most this many candidate addresses are considered per name. Default 16.
    #[serde(default = "default_max_addresses")]
    pub max_addresses: usize,
    /// DNS cache entries. Default 8192.
    #[serde(default = "default_cache_size")]
    pub cache_size: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout: default_timeout(),
            hosts_file: None,
            static_hosts: BTreeMap::new(),
            max_addresses: default_max_addresses(),
            cache_size: default_cache_size(),
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_max_addresses() -> usize {
    16
}

fn default_cache_size() -> u64 {
    8192
}

/// Building the resolver failed: the configuration is wrong. Names the entry.
#[derive(Debug, Error)]
pub enum BuildError {
    #[error("dns.static: {name:?}: {message}")]
    Static { name: String, message: String },
    #[error("dns.hosts_file: {}: cannot read: {source}", path.display())]
    HostsRead { path: PathBuf, source: std::io::Error },
    #[error("dns.hosts_file: {}:{line}: {message}", path.display())]
    HostsLine { path: PathBuf, line: usize, message: String },
    #[error("dns: system resolver configuration: {0}")]
    System(String),
    #[error("dns: {0}")]
    Resolver(String),
    #[error("dns.timeout must be more than zero")]
    ZeroTimeout,
}

/// Why a name has no addresses. A value for the flow log (`reason`), cheap to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ResolveError {
    #[error("name does not exist or has no addresses")]
    NotFound,
    #[error("resolution timed out")]
    Timeout,
    #[error("resolution failed")]
    Failed,
}

impl ResolveError {
    pub const fn as_str(self) -> &'static str {
        match self {
            ResolveError::NotFound => "dns-not-found",
            ResolveError::Timeout => "dns-timeout",
            ResolveError::Failed => "dns-failed",
        }
    }
}

/// Where an answer came from (for the flow log and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Static,
    HostsFile,
    Dns,
}

/// Every candidate address for a name, deduplicated, in the order the source gave them,
/// at most `max_addresses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub addrs: Arc<[IpAddr]>,
    pub source: Source,
}

type Table = HashMap<DomainName, Arc<[IpAddr]>>;

/// The resolver the listeners share (cheap to clone: everything inside is shared).
#[derive(Clone)]
pub struct Resolver {
    static_table: Arc<ArcSwap<Table>>,
    hosts: Arc<Table>,
    dns: TokioResolver,
    timeout: Duration,
    max_addresses: usize,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("static", &self.static_table.load().len())
            .field("hosts", &self.hosts.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Resolver {
    /// Builds the resolver: validates the static table, reads the hosts file, sets up DNS.
    /// Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`BuildError`] naming the entry, file line or setting that is wrong.
    pub fn new(cfg: &DnsConfig) -> Result<Resolver, BuildError> {
        if cfg.timeout.is_zero() {
            return Err(BuildError::ZeroTimeout);
        }
        let static_table = static_table(&cfg.static_hosts)?;
        let hosts = match &cfg.hosts_file {
            Some(p) => read_hosts_file(p)?,
            None => Table::new(),
        };
        let mut opts = ResolverOpts::default();
        opts.timeout = cfg.timeout;
        opts.attempts = 1;
        opts.cache_size = cfg.cache_size;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ndots = 0;
        let builder = if cfg.servers.is_empty() {
            let mut b =
                TokioResolver::builder_tokio().map_err(|e| BuildError::System(e.to_string()))?;
            *b.options_mut() = opts;
            b
        } else {
            let servers = cfg
                .servers
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
            .with_options(opts)
        };
        let dns = builder.build().map_err(|e| BuildError::Resolver(e.to_string()))?;
        Ok(Resolver {
            static_table: Arc::new(ArcSwap::from_pointee(static_table)),
            hosts: Arc::new(hosts),
            dns,
            timeout: cfg.timeout,
            max_addresses: cfg.max_addresses.max(1),
        })
    }

    /// Replaces the static table (on reload); the DNS cache is kept.
    ///
    /// # Errors
    /// [`BuildError::Static`]; the old table stays in force.
    pub fn replace_static(
        &self,
        entries: &BTreeMap<String, Vec<IpAddr>>,
    ) -> Result<(), BuildError> {
        let t = static_table(entries)?;
        self.static_table.store(Arc::new(t));
        Ok(())
    }

    /// All candidate addresses for `name`: static table, hosts file, then DNS.
    ///
    /// # Errors
    /// [`ResolveError`]: not found, timed out (after the configured `timeout`), failed.
    pub async fn resolve(&self, name: &DomainName) -> Result<Resolved, ResolveError> {
        if let Some(a) = self.static_table.load().get(name) {
            return Ok(Resolved { addrs: a.clone(), source: Source::Static });
        }
        if let Some(a) = self.hosts.get(name) {
            return Ok(Resolved { addrs: a.clone(), source: Source::HostsFile });
        }
        // A trailing dot: the name is absolute, no search domains are tried.
        let fqdn = format!("{}.", name.as_str());
        let lookup = match tokio::time::timeout(self.timeout, self.dns.lookup_ip(fqdn)).await {
            Err(_) => return Err(ResolveError::Timeout),
            Ok(Err(e)) if e.is_no_records_found() => return Err(ResolveError::NotFound),
            Ok(Err(hickory_resolver::net::NetError::Timeout)) => return Err(ResolveError::Timeout),
            Ok(Err(_)) => return Err(ResolveError::Failed),
            Ok(Ok(l)) => l,
        };
        let mut addrs: Vec<IpAddr> = Vec::new();
        for a in lookup.iter() {
            if addrs.len() == self.max_addresses {
                break;
            }
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        if addrs.is_empty() {
            return Err(ResolveError::NotFound);
        }
        Ok(Resolved { addrs: addrs.into(), source: Source::Dns })
    }
}

fn static_table(entries: &BTreeMap<String, Vec<IpAddr>>) -> Result<Table, BuildError> {
    let mut t = Table::new();
    for (name, addrs) in entries {
        let err = |message: String| BuildError::Static { name: name.clone(), message };
        let n = match Target::parse(name) {
            Ok(Target::Name(n)) => n,
            Ok(Target::Addr(_)) => return Err(err("is an address, not a name".into())),
            Err(e) => return Err(err(e.to_string())),
        };
        if addrs.is_empty() {
            return Err(err("no addresses".into()));
        }
        let mut list: Vec<IpAddr> = Vec::with_capacity(addrs.len());
        for a in addrs {
            if !list.contains(a) {
                list.push(*a);
            }
        }
        if t.insert(n, list.into()).is_some() {
            return Err(err("listed twice (after normalisation)".into()));
        }
    }
    Ok(t)
}

/// Reads a hosts(5) file: `address name [alias…]`, `#` comments. Strict: a line that is
/// not understood is an error naming the line, not silently skipped.
fn read_hosts_file(path: &Path) -> Result<Table, BuildError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| BuildError::HostsRead { path: path.to_owned(), source })?;
    let mut acc: HashMap<DomainName, Vec<IpAddr>> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(addr) = fields.next() else { continue };
        let err =
            |message: String| BuildError::HostsLine { path: path.to_owned(), line: i + 1, message };
        let ip: IpAddr = addr.parse().map_err(|_| err(format!("{addr:?} is not an IP address")))?;
        let mut any = false;
        for name in fields {
            any = true;
            let n = match Target::parse(name) {
                Ok(Target::Name(n)) => n,
                _ => return Err(err(format!("{name:?} is not a host name"))),
            };
            let v = acc.entry(n).or_default();
            if !v.contains(&ip) {
                v.push(ip);
            }
        }
        if !any {
            return Err(err("address without a name".into()));
        }
    }
    Ok(acc.into_iter().map(|(k, v)| (k, v.into())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> DomainName {
        match Target::parse(s) {
            Ok(Target::Name(n)) => n,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn config_defaults_and_durations() {
        let c: DnsConfig = toml::from_str("").unwrap();
        assert_eq!(c, DnsConfig::default());
        let c: DnsConfig = toml::from_str(
            "servers = [\"127.0.0.1:5353\"]\ntimeout = \"250ms\"\n[static]\n\"API.example.\" = [\"127.0.0.2\", \"::1\"]\n",
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.static_hosts.len(), 1);
        assert!(toml::from_str::<DnsConfig>("timeout = \"soon\"").is_err());
        assert!(toml::from_str::<DnsConfig>("server = []").is_err());
    }

    #[test]
    fn static_table_is_normalised_and_validated() {
        let mut m = BTreeMap::new();
        m.insert(
            "API.Example.".to_owned(),
            vec!["127.0.0.2".parse().unwrap(), "127.0.0.2".parse().unwrap()],
        );
        let t = static_table(&m).unwrap();
        assert_eq!(&*t[&name("api.example")], &["127.0.0.2".parse::<IpAddr>().unwrap()]);
        m.insert("api.example".to_owned(), vec!["127.0.0.3".parse().unwrap()]);
        assert!(matches!(static_table(&m), Err(BuildError::Static { .. })));
        let mut m = BTreeMap::new();
        m.insert("127.1".to_owned(), vec!["127.0.0.3".parse().unwrap()]);
        let e = static_table(&m).unwrap_err().to_string();
        assert!(e.contains("is an address"), "{e}");
        let mut m = BTreeMap::new();
        m.insert("a.example".to_owned(), vec![]);
        assert!(static_table(&m).unwrap_err().to_string().contains("no addresses"));
    }

    #[test]
    fn hosts_file_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        std::fs::write(
            &p,
            "# comment\n127.0.0.2 a.example B.example # trailing\n\n::1 a.example\n",
        )
        .unwrap();
        let t = read_hosts_file(&p).unwrap();
        assert_eq!(t[&name("a.example")].len(), 2);
        assert_eq!(&*t[&name("b.example")], &["127.0.0.2".parse::<IpAddr>().unwrap()]);
        std::fs::write(&p, "127.0.0.2 a.example\nnot-an-ip b.example\n").unwrap();
        let e = read_hosts_file(&p).unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("not-an-ip"), "{e}");
        std::fs::write(&p, "127.0.0.2\n").unwrap();
        assert!(read_hosts_file(&p).unwrap_err().to_string().contains("without a name"));
        assert!(matches!(
            read_hosts_file(&dir.path().join("missing")),
            Err(BuildError::HostsRead { .. })
        ));
    }
}
