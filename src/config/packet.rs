//! `[packet]`: flowgate as a packet filter — which front end reads the packets (a TUN device
//! the host routes into, or two interfaces bridged as a bump in the wire), how many workers,
//! and the filter's knobs. The types and their checks only; running the workers is
//! `dataplane::packet::worker`, which also maps these knobs onto the filter's own
//! configuration (this module sits below the dataplane and cannot name its types).
//!
//! Every knob has a default here and a comment in `config/flowgate.toml`.

use std::time::Duration;

use serde::Deserialize;

/// Most packets one read may bring in (`burst`). The filter's `MAX_BURST`; the worker
/// asserts at compile time that the two agree.
pub const MAX_BURST: usize = 64;

/// Most workers (`workers`): a multi-queue TUN device has at most 256 queues
/// (`MAX_TAP_QUEUES`).
pub const MAX_WORKERS: usize = 256;

/// Longest IPv6 extension-header chain `max_ipv6_ext_headers` may allow.
pub const MAX_IPV6_EXT_HEADERS: usize = 64;

/// `[packet]` in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacketConfig {
    /// The name flow-log events and metrics give the packet filter (its listener name).
    /// Default `packet`; must differ from every `[[listener]]`'s name.
    #[serde(default = "default_name")]
    pub name: String,
    /// Where packets come from. Default `tun`.
    #[serde(default)]
    pub frontend: Frontend,
    /// `tun`: queues of the device, one thread each; `afpacket`: fanout workers.
    /// Default: one per CPU.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Packets per read, `1..=64`. Default 64.
    #[serde(default = "default_burst")]
    pub burst: usize,
    /// What a packet denied by policy gets. Default `drop`.
    #[serde(default)]
    pub on_deny: OnDeny,
    /// Reject replies (RST / ICMP) per second per worker; beyond it denied packets are only
    /// dropped. Default 100.
    #[serde(default = "default_reject_per_second")]
    pub reject_per_second: u32,
    /// Accept TCP segments outside the tracked window (Linux `nf_conntrack_tcp_be_liberal`).
    /// Default false.
    #[serde(default)]
    pub tcp_liberal: bool,
    /// First fragments whose verdict is remembered for their later fragments at once.
    /// Default 4,096.
    #[serde(default = "default_max_fragments")]
    pub max_fragments: usize,
    /// How long a first fragment's verdict is remembered. Default `2s`.
    #[serde(default = "default_fragment_timeout", with = "crate::human_duration")]
    pub fragment_timeout: Duration,
    /// Longest IPv6 extension-header chain walked; a longer one is dropped as malformed.
    /// Default 8.
    #[serde(default = "default_max_ipv6_ext_headers")]
    pub max_ipv6_ext_headers: usize,
    /// `[packet.tun]`, for `frontend = "tun"` (defaults apply when absent).
    #[serde(default)]
    pub tun: Option<TunConfig>,
    /// `[packet.afpacket]`, required for `frontend = "afpacket"`.
    #[serde(default)]
    pub afpacket: Option<AfPacketConfig>,
}

/// `packet.frontend`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    /// flowgate owns a TUN device; the host routes forwarded traffic into it and flowgate
    /// writes allowed packets back for the kernel to route on.
    #[default]
    Tun,
    /// flowgate bridges two interfaces at L2 (a bump in the wire).
    Afpacket,
}

impl Frontend {
    /// The `frontend` metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Frontend::Tun => "tun",
            Frontend::Afpacket => "afpacket",
        }
    }
}

/// `packet.on_deny`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeny {
    /// Dropped silently.
    #[default]
    Drop,
    /// Dropped and answered: TCP RST, or ICMP "administratively prohibited".
    Reject,
}

/// `[packet.tun]`
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunConfig {
    /// The TUN device, created if missing (multi-queue, offloads always on). Default
    /// `flowgate0`.
    #[serde(default = "default_device")]
    pub device: String,
}

impl Default for TunConfig {
    fn default() -> Self {
        TunConfig { device: default_device() }
    }
}

/// `[packet.afpacket]`: the two interfaces flowgate bridges.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AfPacketConfig {
    /// The interface towards the protected side.
    pub inside: String,
    /// The interface towards the rest of the network.
    pub outside: String,
}

fn default_name() -> String {
    "packet".to_owned()
}

fn default_burst() -> usize {
    MAX_BURST
}

fn default_reject_per_second() -> u32 {
    100
}

fn default_max_fragments() -> usize {
    4096
}

fn default_fragment_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_max_ipv6_ext_headers() -> usize {
    8
}

fn default_device() -> String {
    "flowgate0".to_owned()
}

impl Default for PacketConfig {
    fn default() -> Self {
        PacketConfig {
            name: default_name(),
            frontend: Frontend::Tun,
            workers: None,
            burst: default_burst(),
            on_deny: OnDeny::Drop,
            reject_per_second: default_reject_per_second(),
            tcp_liberal: false,
            max_fragments: default_max_fragments(),
            fragment_timeout: default_fragment_timeout(),
            max_ipv6_ext_headers: default_max_ipv6_ext_headers(),
            tun: None,
            afpacket: None,
        }
    }
}

impl PacketConfig {
    /// How many workers run: `workers`, or one per CPU.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS)
        })
    }

    /// The TUN device's settings (the defaults when `[packet.tun]` is absent).
    pub fn tun(&self) -> TunConfig {
        self.tun.clone().unwrap_or_default()
    }

    /// Checks what serde cannot; `Err((field, message))` with the field under `packet.`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, message: String| Err((field.to_owned(), message));
        if self.name.is_empty() {
            return bad("name", "must not be empty".into());
        }
        if let Some(w) = self.workers
            && !(1..=MAX_WORKERS).contains(&w)
        {
            return bad("workers", format!("must be 1..={MAX_WORKERS}, not {w}"));
        }
        if !(1..=MAX_BURST).contains(&self.burst) {
            return bad("burst", format!("must be 1..={MAX_BURST}, not {}", self.burst));
        }
        if self.on_deny == OnDeny::Reject && self.reject_per_second == 0 {
            return bad(
                "reject_per_second",
                "must be at least 1 with on_deny = \"reject\" (or use on_deny = \"drop\")".into(),
            );
        }
        if self.max_fragments == 0 {
            return bad("max_fragments", "must be at least 1".into());
        }
        if self.fragment_timeout.is_zero() {
            return bad("fragment_timeout", "must be above zero".into());
        }
        if self.max_ipv6_ext_headers > MAX_IPV6_EXT_HEADERS {
            return bad(
                "max_ipv6_ext_headers",
                format!(
                    "must be at most {MAX_IPV6_EXT_HEADERS}, not {}",
                    self.max_ipv6_ext_headers
                ),
            );
        }
        match self.frontend {
            Frontend::Tun => {
                if self.afpacket.is_some() {
                    return bad(
                        "afpacket",
                        "[packet.afpacket] is for frontend = \"afpacket\", but frontend is \"tun\""
                            .into(),
                    );
                }
                check_ifname(&self.tun().device).or_else(|m| bad("tun.device", m))?;
            }
            Frontend::Afpacket => {
                if self.tun.is_some() {
                    return bad(
                        "tun",
                        "[packet.tun] is for frontend = \"tun\", but frontend is \"afpacket\""
                            .into(),
                    );
                }
                let Some(af) = &self.afpacket else {
                    return bad(
                        "afpacket",
                        "frontend = \"afpacket\" needs [packet.afpacket] with inside and outside \
                         interfaces"
                            .into(),
                    );
                };
                check_ifname(&af.inside).or_else(|m| bad("afpacket.inside", m))?;
                check_ifname(&af.outside).or_else(|m| bad("afpacket.outside", m))?;
                if af.inside == af.outside {
                    return bad(
                        "afpacket.outside",
                        format!("must differ from inside (both are {:?})", af.inside),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Whether the kernel could take `name` as an interface name.
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an interface name must not be empty".into());
    }
    if name.len() > 15 {
        return Err(format!("interface name {name:?} is longer than 15 bytes"));
    }
    if name.contains('/') || name.contains('\0') || name.chars().any(char::is_whitespace) {
        return Err(format!("interface name {name:?} holds '/', NUL or whitespace"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PacketConfig, String> {
        #[derive(Deserialize)]
        struct File {
            packet: PacketConfig,
        }
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        f.packet.validate().map_err(|(f, m)| format!("packet.{f}: {m}"))?;
        Ok(f.packet)
    }

    #[test]
    fn an_empty_section_is_a_tun_filter_with_the_documented_defaults() {
        let p = parse("[packet]\n").unwrap();
        assert_eq!(p, PacketConfig::default());
        assert_eq!(p.name, "packet");
        assert_eq!(p.frontend, Frontend::Tun);
        assert_eq!((p.burst, p.on_deny, p.reject_per_second), (64, OnDeny::Drop, 100));
        assert!(!p.tcp_liberal);
        assert_eq!((p.max_fragments, p.fragment_timeout), (4096, Duration::from_secs(2)));
        assert_eq!(p.max_ipv6_ext_headers, 8);
        assert_eq!(p.tun().device, "flowgate0");
        assert!(p.worker_count() >= 1);
    }

    #[test]
    fn the_schema_example_parses() {
        let p = parse(
            "[packet]\nname = \"edge\"\nfrontend = \"tun\"\nworkers = 2\nburst = 32\n\
             on_deny = \"reject\"\nreject_per_second = 10\ntcp_liberal = true\n\
             max_fragments = 100\nfragment_timeout = \"500ms\"\nmax_ipv6_ext_headers = 4\n\
             [packet.tun]\ndevice = \"fg1\"\n",
        )
        .unwrap();
        assert_eq!(p.name, "edge");
        assert_eq!((p.worker_count(), p.burst, p.on_deny), (2, 32, OnDeny::Reject));
        assert_eq!(p.fragment_timeout, Duration::from_millis(500));
        assert_eq!(p.tun().device, "fg1");
        let af = parse(
            "[packet]\nfrontend = \"afpacket\"\n[packet.afpacket]\ninside = \"eth1\"\n\
             outside = \"eth2\"\n",
        )
        .unwrap();
        assert_eq!(af.frontend.as_str(), "afpacket");
        assert_eq!(af.afpacket.unwrap().outside, "eth2");
    }

    #[test]
    fn mistakes_name_their_field() {
        let cases = [
            ("burst = 0\n", "packet.burst"),
            ("burst = 65\n", "packet.burst"),
            ("workers = 0\n", "packet.workers"),
            ("workers = 257\n", "packet.workers"),
            ("name = \"\"\n", "packet.name"),
            ("on_deny = \"reject\"\nreject_per_second = 0\n", "packet.reject_per_second"),
            ("max_fragments = 0\n", "packet.max_fragments"),
            ("fragment_timeout = \"0s\"\n", "packet.fragment_timeout"),
            ("max_ipv6_ext_headers = 65\n", "packet.max_ipv6_ext_headers"),
            ("frontend = \"afpacket\"\n", "packet.afpacket"),
            ("frontend = \"afpacket\"\n[packet.afpacket]\ninside = \"a\"\n", "outside"),
            (
                "frontend = \"afpacket\"\n[packet.afpacket]\ninside = \"a\"\noutside = \"a\"\n",
                "packet.afpacket.outside",
            ),
            (
                "frontend = \"afpacket\"\n[packet.afpacket]\ninside = \"\"\noutside = \"a\"\n",
                "packet.afpacket.inside",
            ),
            (
                "frontend = \"afpacket\"\n[packet.tun]\n[packet.afpacket]\ninside = \"a\"\n\
                 outside = \"b\"\n",
                "packet.tun",
            ),
            ("[packet.afpacket]\ninside = \"a\"\noutside = \"b\"\n", "packet.afpacket"),
            ("[packet.tun]\ndevice = \"a-name-too-long-x\"\n", "packet.tun.device"),
            ("[packet.tun]\ndevice = \"a/b\"\n", "packet.tun.device"),
            ("frontend = \"xdp\"\n", "frontend"),
            ("on_deny = \"ignore\"\n", "on_deny"),
            ("brust = 4\n", "brust"),
            ("[packet.tun]\ndevise = \"x\"\n", "devise"),
        ];
        for (text, field) in cases {
            let err = parse(&format!("[packet]\n{text}")).unwrap_err();
            assert!(err.contains(field), "{text:?}: {err}");
        }
    }
}
