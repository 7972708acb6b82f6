//! Where etcd is, for the commands that talk to it directly (`push`, `fleet status`): the
//! config's `[source]`, each part overridable by a flag.

use std::path::PathBuf;
use std::time::Duration;

use flowgate::config::{Config, DEFAULT_CONFIG_PATH, SourceConfig};
use flowgate::control::etcd::EtcdClient;
use flowgate::control::source::Keys;

#[derive(Debug, clap::Args)]
pub struct EtcdArgs {
    /// The config whose `[source]` to use (default: config/flowgate.toml when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// etcd endpoints, comma-separated (`http://host:port`), instead of `source.endpoints`.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// The fleet's key prefix, instead of `source.prefix`.
    #[arg(long)]
    pub prefix: Option<String>,
}

impl EtcdArgs {
    /// The client and the keys of the prefix.
    ///
    /// # Errors
    /// The config cannot be read or an endpoint is not plain HTTP.
    pub fn connect(&self) -> anyhow::Result<(EtcdClient, Keys)> {
        let mut source = match &self.config {
            Some(p) => Config::load(p)?.source,
            None if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Config::load(std::path::Path::new(DEFAULT_CONFIG_PATH))?.source
            }
            None => SourceConfig::default(),
        };
        if !self.endpoints.is_empty() {
            source.endpoints = self.endpoints.clone();
        }
        if let Some(p) = &self.prefix {
            source.prefix = p.clone();
        }
        let timeout = source.dial_timeout.max(Duration::from_millis(100));
        let client = EtcdClient::new(&source.endpoints, timeout, source.credentials())?
            .with_max_answer(source.max_answer_bytes);
        Ok((client, Keys::new(source.prefix())))
    }
}
