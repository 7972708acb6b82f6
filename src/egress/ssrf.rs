//! The SSRF guard: addresses an egress proxy must never dial on a client's behalf, even
//! when policy would allow them and however the client spelled them.
//!
//! Internal and special-purpose ranges (loopback, RFC 1918, CGNAT, link-local with the
//! cloud metadata services, ULA, multicast, broadcast, reserved, documentation,
//! benchmarking, IETF protocol assignments) are refused, and so are the IPv6 forms that
//! carry an IPv4 address inside (IPv4-mapped, IPv4-compatible, NAT64 `64:ff9b::/96`,
//! 6to4 `2002::/16`): the embedded address is checked against the IPv4 table. Forms whose
//! embedding cannot be known or that tunnel elsewhere (`64:ff9b:1::/48` local-use NAT64,
//! Teredo `2001::/32`) are refused whole.
//!
//! On by default. `[ssrf] treat_as_external` lifts exactly the ranges it lists (tests use
//! it to reach servers on 127.0.0.0/8): a lifted address is then an ordinary external
//! address, still subject to policy. The IPv4-mapped form of a lifted IPv4 address is
//! lifted too, because the kernel dials it as that IPv4 address; NAT64 and 6to4 forms
//! are not, because they reach a translator, not the lifted host.
//!
//! The check is a scan of two short constant tables with mask arithmetic: no allocation,
//! no lock, so it runs on every candidate address of every new flow.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

/// `[ssrf]`
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsrfConfig {
    /// Refuse internal and special addresses. Default `true`; turning it off is for
    /// networks where the proxy itself is the only way in.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Ranges to treat as ordinary external addresses (still subject to policy), e.g.
    /// `["127.0.0.2/32"]`. Default empty.
    #[serde(default)]
    pub treat_as_external: Vec<IpNet>,
}

fn default_true() -> bool {
    true
}

impl Default for SsrfConfig {
    fn default() -> Self {
        SsrfConfig { enabled: true, treat_as_external: Vec::new() }
    }
}

/// A special-purpose range: its name for logs and counters, and its CIDR as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpecialRange {
    /// Short, stable, lower-case: `loopback`, `private`, `cloud-metadata`… (a log field).
    pub name: &'static str,
    pub cidr: &'static str,
    bits: u128,
    prefix: u8,
}

const fn v4(name: &'static str, cidr: &'static str, a: [u8; 4], prefix: u8) -> SpecialRange {
    let bits = u32::from_be_bytes(a) as u128;
    SpecialRange { name, cidr, bits, prefix }
}

const fn v6(name: &'static str, cidr: &'static str, bits: u128, prefix: u8) -> SpecialRange {
    SpecialRange { name, cidr, bits, prefix }
}

impl SpecialRange {
    fn contains_v4(&self, a: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
        (u32::from(a) & mask) as u128 == self.bits
    }

    fn contains_v6(&self, a: Ipv6Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
        u128::from(a) & mask == self.bits
    }
}

/// IPv4 special-purpose ranges (IANA registry, RFC 6890 and successors). Ordered so the
/// most specific name wins where ranges nest.
pub const V4_RANGES: &[SpecialRange] = &[
    v4("unspecified", "0.0.0.0/32", [0, 0, 0, 0], 32),
    v4("this-network", "0.0.0.0/8", [0, 0, 0, 0], 8),
    v4("private", "10.0.0.0/8", [10, 0, 0, 0], 8),
    v4("cgnat", "100.64.0.0/10", [100, 64, 0, 0], 10),
    v4("loopback", "127.0.0.0/8", [127, 0, 0, 0], 8),
    v4("cloud-metadata", "169.254.169.254/32", [169, 254, 169, 254], 32),
    v4("link-local", "169.254.0.0/16", [169, 254, 0, 0], 16),
    v4("private", "172.16.0.0/12", [172, 16, 0, 0], 12),
    v4("ietf-protocol", "192.0.0.0/24", [192, 0, 0, 0], 24),
    v4("documentation", "192.0.2.0/24", [192, 0, 2, 0], 24),
    v4("6to4-relay", "192.88.99.0/24", [192, 88, 99, 0], 24),
    v4("private", "192.168.0.0/16", [192, 168, 0, 0], 16),
    v4("benchmarking", "198.18.0.0/15", [198, 18, 0, 0], 15),
    v4("documentation", "198.51.100.0/24", [198, 51, 100, 0], 24),
    v4("documentation", "203.0.113.0/24", [203, 0, 113, 0], 24),
    v4("multicast", "224.0.0.0/4", [224, 0, 0, 0], 4),
    v4("broadcast", "255.255.255.255/32", [255, 255, 255, 255], 32),
    v4("reserved", "240.0.0.0/4", [240, 0, 0, 0], 4),
];

/// IPv6 special-purpose ranges refused outright. The embedding prefixes (mapped,
/// compatible, NAT64, 6to4) are handled before this table; what they embed is checked
/// against [`V4_RANGES`].
pub const V6_RANGES: &[SpecialRange] = &[
    v6("unspecified", "::/128", 0, 128),
    v6("loopback", "::1/128", 1, 128),
    v6("nat64-local", "64:ff9b:1::/48", 0x0064_ff9b_0001 << 80, 48),
    v6("reserved", "::/8", 0, 8),
    v6("discard", "100::/64", 0x0100 << 112, 64),
    v6("teredo", "2001::/32", 0x2001 << 112, 32),
    v6("ietf-protocol", "2001::/23", 0x2001 << 112, 23),
    v6("documentation", "2001:db8::/32", 0x2001_0db8 << 96, 32),
    v6("documentation", "3fff::/20", 0x3fff << 112, 20),
    v6("cloud-metadata", "fd00:ec2::254/128", (0xfd00_0ec2 << 96) | 0x254, 128),
    v6("unique-local", "fc00::/7", 0xfc00 << 112, 7),
    v6("link-local", "fe80::/10", 0xfe80 << 112, 10),
    v6("site-local", "fec0::/10", 0xfec0 << 112, 10),
    v6("multicast", "ff00::/8", 0xff00 << 112, 8),
];

/// How an IPv4 address was carried inside an IPv6 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Embedding {
    /// `::ffff:a.b.c.d`
    Mapped,
    /// `::a.b.c.d` (deprecated)
    Compatible,
    /// `64:ff9b::a.b.c.d`
    Nat64,
    /// `2002:AABB:CCDD::/48`
    SixToFour,
}

impl Embedding {
    pub const fn as_str(self) -> &'static str {
        match self {
            Embedding::Mapped => "ipv4-mapped",
            Embedding::Compatible => "ipv4-compatible",
            Embedding::Nat64 => "nat64",
            Embedding::SixToFour => "6to4",
        }
    }
}

/// A refusal by the guard: which range matched and, for an embedded IPv4 address, how it
/// was embedded and what it was. Small and `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
pub struct SsrfRefusal {
    pub range: &'static SpecialRange,
    pub embedded: Option<(Embedding, Ipv4Addr)>,
}

impl fmt::Display for SsrfRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.range.name, self.range.cidr)?;
        if let Some((how, a)) = self.embedded {
            write!(f, " via {} {a}", how.as_str())?;
        }
        Ok(())
    }
}

/// The guard as configured. Built once per config; `check` is read-only.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    config: SsrfConfig,
}

impl Guard {
    pub fn new(config: SsrfConfig) -> Guard {
        Guard { config }
    }

    pub fn config(&self) -> &SsrfConfig {
        &self.config
    }

    /// `Ok` when `ip` may be dialled: external, lifted, or the guard is off.
    ///
    /// # Errors
    /// [`SsrfRefusal`] naming the range (a value for the flow log, not a failure).
    pub fn check(&self, ip: IpAddr) -> Result<(), SsrfRefusal> {
        if !self.config.enabled || self.lifted(ip) {
            return Ok(());
        }
        match classify(ip) {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }

    fn lifted(&self, ip: IpAddr) -> bool {
        let lifted = |a: IpAddr| self.config.treat_as_external.iter().any(|n| n.contains(&a));
        if lifted(ip) {
            return true;
        }
        match ip {
            IpAddr::V6(v) => v.to_ipv4_mapped().is_some_and(|a| lifted(IpAddr::V4(a))),
            IpAddr::V4(_) => false,
        }
    }
}

/// The special range `ip` belongs to, in any spelling; `None` for an ordinary external
/// address. Ignores configuration (see [`Guard::check`]).
pub fn classify(ip: IpAddr) -> Option<SsrfRefusal> {
    match ip {
        IpAddr::V4(a) => classify_v4(a).map(|range| SsrfRefusal { range, embedded: None }),
        IpAddr::V6(a) => classify_v6(a),
    }
}

fn classify_v4(a: Ipv4Addr) -> Option<&'static SpecialRange> {
    V4_RANGES.iter().find(|r| r.contains_v4(a))
}

fn classify_v6(a: Ipv6Addr) -> Option<SsrfRefusal> {
    let bits = u128::from(a);
    let low32 = Ipv4Addr::from(bits as u32);
    let embedded = if bits >> 32 == 0xffff {
        Some((Embedding::Mapped, low32))
    } else if bits >> 32 == 0 && bits > 1 {
        Some((Embedding::Compatible, low32))
    } else if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        Some((Embedding::Nat64, low32))
    } else if bits >> 112 == 0x2002 {
        Some((Embedding::SixToFour, Ipv4Addr::from((bits >> 80) as u32)))
    } else {
        None
    };
    if let Some((how, v4)) = embedded {
        if let Some(range) = classify_v4(v4) {
            return Some(SsrfRefusal { range, embedded: Some((how, v4)) });
        }
        // The mapped form is the IPv4 address itself to a dual-stack socket, and NAT64
        // reaches it through a translator: external when the embedded address is. (The
        // deprecated compatible form falls through to `::/8`; 6to4 to the table.)
        if matches!(how, Embedding::Mapped | Embedding::Nat64) {
            return None;
        }
    }
    V6_RANGES.iter().find(|r| r.contains_v6(a)).map(|range| SsrfRefusal { range, embedded: None })
}

#[cfg(test)]
mod tests;
