//! `[[listener]]`: what one data port is. The types only; binding and serving a listener
//! is `dataplane::proxy`.
//!
//! Every knob has a default here and a comment in `config/flowgate.toml`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::wire::proxy_protocol::{DEFAULT_MAX_HEADER_LEN, MIN_MAX_HEADER_LEN, V2_FIXED_LEN};

/// The kind of listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerKind {
    /// TCP: each accepted connection is a flow to one of `upstreams`.
    Tcp,
    /// UDP: each client address is a session (a flow) to one of `upstreams`.
    Udp,
    /// A built-in TCP echo server (writes back what it reads). A demo and test upstream,
    /// so the bundled config shows real traffic on a machine with nothing else running.
    /// It is a destination, not a gateway: no policy is applied on it.
    Echo,
    /// HTTP forward proxy: `CONNECT host:port` tunnels and absolute-form `http://`
    /// requests; the destination is whatever the client asks for, decided by the egress
    /// pipeline (`egress::Checker`) and the gate. Takes no `upstreams`.
    HttpConnect,
    /// SOCKS5 (RFC 1928) CONNECT and UDP ASSOCIATE with IPv4, IPv6 and domain-name
    /// addresses, no authentication or RFC 1929 (`credentials`); decided like
    /// `http-connect`. Takes no `upstreams`.
    Socks5,
    /// Connections redirected here by nftables/iptables: the destination is the original
    /// one (`SO_ORIGINAL_DST`), checked against the TLS SNI or HTTP `Host` the client
    /// sends, and decided like `http-connect`. Takes no `upstreams`, no PROXY header.
    Transparent,
}

impl ListenerKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Udp => "udp",
            ListenerKind::Echo => "echo",
            ListenerKind::HttpConnect => "http-connect",
            ListenerKind::Socks5 => "socks5",
            ListenerKind::Transparent => "transparent",
        }
    }

    /// An egress kind: the client's request (or its redirected connection) names the
    /// destination, decided by the egress pipeline.
    pub const fn is_egress(self) -> bool {
        matches!(self, ListenerKind::HttpConnect | ListenerKind::Socks5 | ListenerKind::Transparent)
    }
}

/// One `[[listener]]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name; appears in the flow log and metrics.
    pub name: String,
    pub kind: ListenerKind,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Where flows go, round-robin. An upstream whose connect fails is skipped for
    /// `upstream_cooldown`.
    #[serde(default)]
    pub upstreams: Vec<SocketAddr>,
    /// Time allowed for connecting to an upstream. Default 5s.
    #[serde(default = "default_connect_timeout", with = "crate::human_duration")]
    pub connect_timeout: Duration,
    /// A connection (TCP) or session (UDP) with no traffic either way for this long is
    /// closed. Default 5m for TCP; UDP sessions use `udp_idle_timeout`.
    #[serde(default = "default_idle_timeout", with = "crate::human_duration")]
    pub idle_timeout: Duration,
    /// UDP sessions idle for this long are closed. Default 60s.
    #[serde(default = "default_udp_idle_timeout", with = "crate::human_duration")]
    pub udp_idle_timeout: Duration,
    /// How long a failed upstream is skipped. Default 10s.
    #[serde(default = "default_cooldown", with = "crate::human_duration")]
    pub upstream_cooldown: Duration,
    /// Open connections (TCP) or sessions (UDP) at once; at the limit, accepting pauses
    /// (TCP) or new clients' datagrams are dropped (UDP), and `limit_reached` counts it.
    /// Default 10,000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// SO_REUSEPORT, so several processes (or replicas) can share the port. Default true.
    #[serde(default = "default_true")]
    pub reuse_port: bool,
    /// Listen backlog. Default 1024.
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// PROXY protocol: `off` (default), `v1`, `v2` or `any`.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocolMode,
    /// Peers whose PROXY header is believed (CIDRs or addresses). A header from anyone
    /// else is refused and counted. Required when `proxy_protocol` is not `off`.
    #[serde(default, deserialize_with = "deserialize_nets")]
    pub trusted_proxies: Vec<IpNet>,
    /// The whole PROXY header must arrive within this time. Default 5s.
    #[serde(default = "default_header_timeout", with = "crate::human_duration")]
    pub proxy_protocol_timeout: Duration,
    /// Longest PROXY header accepted (v2 with TLVs), in bytes. Default 1024, range
    /// 232..=65551.
    #[serde(default = "default_max_header_len")]
    pub proxy_protocol_max_len: usize,
    /// Egress kinds: the whole handshake (first byte to parsed request) must complete in
    /// this time, or the client gets `408` (HTTP) / is closed (SOCKS5), counted in
    /// `handshake_timeout`. Default 10s.
    #[serde(default = "default_handshake_timeout", with = "crate::human_duration")]
    pub handshake_timeout: Duration,
    /// `http-connect`: largest request head (request line and headers), bytes; beyond it
    /// `400`, counted in `handshake_malformed`. Default 8192.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// `http-connect`: longest request line, bytes. Default 4096.
    #[serde(default = "default_max_request_line")]
    pub max_request_line: usize,
    /// `http-connect`: most header fields. Default 64.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Egress kinds: proxy credentials (`[[credential]]`) mapped to workloads: `off`
    /// (default; the source address is the identity), `optional` (used when sent, and
    /// then they must be right), `required` (`407` / SOCKS5 refused without them). Wrong
    /// credentials are refused and counted in `auth_failed`.
    #[serde(default)]
    pub credentials: crate::egress::CredentialMode,
    /// `http-connect`: look at the first bytes inside a CONNECT tunnel and refuse a TLS
    /// ClientHello whose SNI is not the CONNECT host (domain fronting): `off` (default),
    /// `on` (a mismatch or broken TLS is refused; no SNI or not TLS passes), `strict`
    /// (only a ClientHello naming the CONNECT host passes). Counted in `sni_refused`.
    #[serde(default)]
    pub verify_sni: VerifySni,
    /// `verify_sni`: how long to wait for the client's first bytes (at most one TLS
    /// record, 16 KiB). On timeout `on` lets the tunnel through (a server-speaks-first
    /// protocol), `strict` refuses. Default 5s.
    #[serde(default = "default_sni_timeout", with = "crate::human_duration")]
    pub sni_timeout: Duration,
    /// `socks5` UDP ASSOCIATE: destinations one association may send to (each decided
    /// once, verdict cached); datagrams to further ones are dropped and counted in
    /// `datagrams_dropped`. Default 256.
    #[serde(default = "default_udp_max_destinations")]
    pub udp_max_destinations: usize,
    /// `socks5` UDP ASSOCIATE: associations open at once on this listener. Each holds a
    /// relay socket, two upstream sockets and ~200 KB of datagram buffers for as long as
    /// its control connection lives, so `max_connections` alone would let idle control
    /// connections pin gigabytes. Beyond it a request gets a general failure reply,
    /// counted in `flowgate_limit_reached_total{limit="udp_max_associations"}`.
    /// Default 128.
    #[serde(default = "default_udp_max_associations")]
    pub udp_max_associations: usize,
    /// `socks5`: whether UDP ASSOCIATE is carried. `false` answers it `0x07` (command not
    /// supported), like BIND, for a listener that should only do CONNECT; counted in
    /// `handshake_malformed` and logged as a `malformed` event. Default true.
    #[serde(default = "default_true")]
    pub udp_associate: bool,
    /// `socks5` UDP ASSOCIATE: an association with no datagram relayed either way for this
    /// long is closed, with its TCP control connection (which may otherwise idle forever);
    /// counted in `flowgate_udp_associations_idle_closed_total`.
    /// `"0s"` turns it off (the association then lives as long as its control
    /// connection). Default 5m.
    #[serde(default = "default_idle_timeout", with = "crate::human_duration")]
    pub udp_associate_idle_timeout: Duration,
    /// Egress kinds: handshakes in progress at once; beyond it a new client is refused at
    /// once (`503` / SOCKS5 general failure) and `handshakes_full` counts it. Default 1024.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_udp_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_true() -> bool {
    true
}
fn default_backlog() -> u32 {
    1024
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_header_bytes() -> usize {
    8 * 1024
}
fn default_max_request_line() -> usize {
    4 * 1024
}
fn default_max_headers() -> usize {
    64
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_sni_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_udp_max_destinations() -> usize {
    256
}
fn default_udp_max_associations() -> usize {
    128
}

impl ListenerConfig {
    /// The PROXY protocol settings, in the form the header reader takes.
    pub fn proxy_header(&self) -> ProxyHeaderConfig {
        ProxyHeaderConfig {
            proxy_protocol: self.proxy_protocol,
            trusted_proxies: self.trusted_proxies.clone(),
            proxy_protocol_timeout: self.proxy_protocol_timeout,
            proxy_protocol_max_len: self.proxy_protocol_max_len,
        }
    }
}

/// `verify_sni` on an `http-connect` listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifySni {
    /// The tunnel's bytes are not looked at.
    #[default]
    Off,
    /// A TLS ClientHello must name the CONNECT host; broken TLS is refused; a ClientHello
    /// without SNI, bytes that are not TLS, or silence until `sni_timeout` pass.
    On,
    /// Only a ClientHello that names the CONNECT host passes.
    Strict,
}

/// `proxy_protocol` on a listener: which header versions it requires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolMode {
    /// Require a v1 (text) header.
    V1,
    /// Require a v2 (binary) header. The only choice for UDP listeners.
    V2,
    /// Require a header of either version.
    Any,
    /// No header: the TCP peer is the client (default).
    #[default]
    Off,
}

impl ProxyProtocolMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            ProxyProtocolMode::V1 => "v1",
            ProxyProtocolMode::V2 => "v2",
            ProxyProtocolMode::Any => "any",
            ProxyProtocolMode::Off => "off",
        }
    }
}

/// The default for `proxy_protocol_timeout`: 5 s for the whole header.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest header the v2 length field can describe.
pub(crate) const MAX_MAX_HEADER_LEN: usize = V2_FIXED_LEN + u16::MAX as usize;

/// The PROXY protocol settings of one listener, in the form the header reader takes:
/// [`ListenerConfig::proxy_header`] builds it from the four `[[listener]]` fields, which
/// are read (with their defaults) and documented only there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeaderConfig {
    pub proxy_protocol: ProxyProtocolMode,
    pub trusted_proxies: Vec<IpNet>,
    pub proxy_protocol_timeout: Duration,
    pub proxy_protocol_max_len: usize,
}

impl Default for ProxyHeaderConfig {
    fn default() -> Self {
        ProxyHeaderConfig {
            proxy_protocol: ProxyProtocolMode::Off,
            trusted_proxies: Vec::new(),
            proxy_protocol_timeout: DEFAULT_HEADER_TIMEOUT,
            proxy_protocol_max_len: DEFAULT_MAX_HEADER_LEN,
        }
    }
}

/// serde default for `proxy_protocol_timeout`.
pub fn default_header_timeout() -> Duration {
    DEFAULT_HEADER_TIMEOUT
}

/// serde default for `proxy_protocol_max_len`.
pub fn default_max_header_len() -> usize {
    DEFAULT_MAX_HEADER_LEN
}

/// Reads a list of CIDRs; a bare address is taken as a single-host network.
pub fn deserialize_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a CIDR or address")))
        })
        .collect()
}

impl ProxyHeaderConfig {
    /// Checks the fields for a listener; `datagram` for a UDP listener. Returns the field
    /// name and a message, for `ConfigError::Invalid`.
    ///
    /// # Errors
    /// `max_len` out of range; an empty `trusted_proxies` while a header is required (every
    /// connection would be refused); `v1` on a UDP listener (v1 has no datagram form); a zero
    /// timeout.
    pub fn validate(&self, datagram: bool) -> Result<(), (&'static str, String)> {
        if !(MIN_MAX_HEADER_LEN..=MAX_MAX_HEADER_LEN).contains(&self.proxy_protocol_max_len) {
            return Err((
                "proxy_protocol_max_len",
                format!(
                    "{} is outside {MIN_MAX_HEADER_LEN}..={MAX_MAX_HEADER_LEN}",
                    self.proxy_protocol_max_len
                ),
            ));
        }
        if self.proxy_protocol == ProxyProtocolMode::Off {
            return Ok(());
        }
        if self.trusted_proxies.is_empty() {
            return Err((
                "trusted_proxies",
                "empty while proxy_protocol is on: every connection would be refused; list the \
                 load balancers' addresses"
                    .to_owned(),
            ));
        }
        if datagram && self.proxy_protocol == ProxyProtocolMode::V1 {
            return Err((
                "proxy_protocol",
                "v1 has no datagram form; use v2 (or any) on a udp listener".to_owned(),
            ));
        }
        if self.proxy_protocol_timeout.is_zero() {
            return Err(("proxy_protocol_timeout", "must be greater than zero".to_owned()));
        }
        Ok(())
    }
}
