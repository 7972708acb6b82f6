//! Destination names as clients spell them, made canonical before anything matches them.
//!
//! Two jobs. First, a "name" that is really an address must be treated as that address:
//! `2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`, `[::ffff:127.0.0.1]` and
//! `169.254.169.254.` all reach `connect()` (through `inet_aton` or a resolver) as the
//! addresses they spell, so the SSRF guard and `ipBlock` rules must see those addresses,
//! not a name that matches no rule. Second, real names are normalised (IDNA to ASCII,
//! lower case, no trailing dot, RFC 1035 lengths) so `API.Example.com.` and
//! `api.example.com` are one name for `domainNames` rules and the flow log.
//!
//! A name whose last label is numeric but that is not a valid address (`1.2.3.4.5`,
//! `256.1.1.1`, `0x1g`) is refused rather than resolved, as the URL standard does: such a
//! name has no legitimate use and resolvers disagree about it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// RFC 1035: 253 characters in presentation form without the trailing dot.
pub const MAX_NAME_LEN: usize = 253;
/// RFC 1035: 63 octets per label.
pub const MAX_LABEL_LEN: usize = 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name longer than 253 characters")]
    TooLong,
    #[error("empty label")]
    EmptyLabel,
    #[error("label longer than 63 characters")]
    LabelTooLong,
    #[error("character not allowed in a host name")]
    BadChar,
    #[error("not valid UTF-8")]
    NotUtf8,
    #[error("IDNA conversion failed")]
    Idna,
    #[error("looks like an address but is not a valid one")]
    BadAddress,
}

/// A normalised domain name: lower-case ASCII (A-labels for internationalised names), no
/// trailing dot, every label 1–63 characters, at most 253 in all.
///
/// Stored inline so normalising the common (ASCII) name allocates nothing on the
/// new-flow path.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DomainName {
    len: u8,
    buf: [u8; MAX_NAME_LEN],
}

impl DomainName {
    pub fn as_str(&self) -> &str {
        // Only ever filled from validated ASCII.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }

    /// Validates an ASCII name (already lower-cased or not) and stores it lower-cased.
    fn from_ascii(s: &str) -> Result<DomainName, NameError> {
        let b = s.as_bytes();
        if b.is_empty() {
            return Err(NameError::Empty);
        }
        if b.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        let mut out = DomainName { len: b.len() as u8, buf: [0; MAX_NAME_LEN] };
        let mut label = 0usize;
        for (i, &c) in b.iter().enumerate() {
            if c == b'.' {
                if label == 0 {
                    return Err(NameError::EmptyLabel);
                }
                label = 0;
            } else if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' {
                label += 1;
                if label > MAX_LABEL_LEN {
                    return Err(NameError::LabelTooLong);
                }
            } else {
                return Err(NameError::BadChar);
            }
            out.buf[i] = c.to_ascii_lowercase();
        }
        if label == 0 {
            return Err(NameError::EmptyLabel);
        }
        Ok(out)
    }
}

impl fmt::Debug for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomainName({:?})", self.as_str())
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client asked for, once its spelling is understood.
// The name is stored inline on purpose (see `DomainName`): no allocation per flow.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Name(DomainName),
    Addr(IpAddr),
}

impl Target {
    /// Parses a host as any client may spell it (see the module doc).
    ///
    /// # Errors
    /// [`NameError`]: empty, over-long, bad characters, failed IDNA, or numeric but not a
    /// valid address.
    pub fn parse(host: &str) -> Result<Target, NameError> {
        if let Some(inner) = host.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(NameError::BadAddress)?;
            return parse_v6(inner).map(Target::Addr).ok_or(NameError::BadAddress);
        }
        if host.contains(':') {
            return parse_v6(host).map(Target::Addr).ok_or(NameError::BadAddress);
        }
        let ascii_buf;
        let ascii: &str = if host.is_ascii() && !has_ace_label(host) {
            host
        } else {
            // Rare path (internationalised or A-label names): IDNA maps, case-folds and
            // validates punycode; it allocates.
            ascii_buf = idna::domain_to_ascii(host).map_err(|_| NameError::Idna)?;
            &ascii_buf
        };
        let trimmed = ascii.strip_suffix('.').unwrap_or(ascii);
        if trimmed.is_empty() {
            return Err(NameError::Empty);
        }
        if ends_in_number(trimmed) {
            return parse_ipv4_loose(trimmed)
                .map(|a| Target::Addr(IpAddr::V4(a)))
                .ok_or(NameError::BadAddress);
        }
        DomainName::from_ascii(trimmed).map(Target::Name)
    }

    /// As [`Target::parse`] for a name given as bytes (SOCKS5 domain addresses).
    ///
    /// # Errors
    /// [`NameError::NotUtf8`] and those of [`Target::parse`].
    pub fn parse_bytes(host: &[u8]) -> Result<Target, NameError> {
        Target::parse(std::str::from_utf8(host).map_err(|_| NameError::NotUtf8)?)
    }

    /// The target of a CONNECT or absolute-form request.
    ///
    /// # Errors
    /// As [`Target::parse`].
    pub fn from_http(host: crate::wire::http_connect::Host<'_>) -> Result<Target, NameError> {
        match host {
            crate::wire::http_connect::Host::V6(a) => Ok(Target::Addr(IpAddr::V6(a))),
            crate::wire::http_connect::Host::Name(n) => Target::parse(n),
        }
    }

    /// The target of a SOCKS5 request or UDP datagram.
    ///
    /// # Errors
    /// As [`Target::parse_bytes`].
    pub fn from_socks(addr: crate::wire::socks5::Addr<'_>) -> Result<Target, NameError> {
        match addr {
            crate::wire::socks5::Addr::V4(a) => Ok(Target::Addr(IpAddr::V4(a))),
            crate::wire::socks5::Addr::V6(a) => Ok(Target::Addr(IpAddr::V6(a))),
            crate::wire::socks5::Addr::Domain(d) => Target::parse_bytes(d),
        }
    }

    /// The name, when the target is one (for `FlowQuery::fqdn` and the flow log).
    pub fn name(&self) -> Option<&str> {
        match self {
            Target::Name(n) => Some(n.as_str()),
            Target::Addr(_) => None,
        }
    }
}

fn parse_v6(s: &str) -> Option<IpAddr> {
    // A zone id (`fe80::1%eth0`) names an interface of ours: refused.
    s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

fn has_ace_label(s: &str) -> bool {
    s.split('.').any(|l| l.len() >= 4 && l[..4].eq_ignore_ascii_case("xn--"))
}

/// The URL standard's "ends in a number": the last label is all decimal digits, or
/// `0x`/`0X` followed by hex digits. Such a host is an IPv4 address or invalid.
fn ends_in_number(s: &str) -> bool {
    let last = s.rsplit('.').next().unwrap_or(s);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match last.strip_prefix("0x").or_else(|| last.strip_prefix("0X")) {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// Parses IPv4 the way `inet_aton` does: one to four parts, each decimal, octal (leading
/// `0`) or hex (`0x`); the last part fills the remaining bytes (`127.1` = 127.0.0.1,
/// `2130706433` = 127.0.0.1). `None` for anything else.
pub fn parse_ipv4_loose(s: &str) -> Option<Ipv4Addr> {
    let mut parts = [0u64; 4];
    let mut n = 0usize;
    for part in s.split('.') {
        if n == 4 {
            return None;
        }
        parts[n] = parse_ipv4_part(part)?;
        n += 1;
    }
    if n == 0 {
        return None;
    }
    let (head, last) = (&parts[..n - 1], parts[n - 1]);
    if head.iter().any(|&p| p > 255) {
        return None;
    }
    let last_bits = 8 * (5 - n as u32);
    if last >= 1u64 << last_bits {
        return None;
    }
    let mut v: u64 = 0;
    for (i, &p) in head.iter().enumerate() {
        v |= p << (24 - 8 * i as u32);
    }
    v |= last;
    Some(Ipv4Addr::from(u32::try_from(v).ok()?))
}

fn parse_ipv4_part(p: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if p.is_empty() {
        return None;
    }
    if digits.is_empty() {
        return Some(0); // `0x` alone, as inet_aton and the URL standard read it.
    }
    // Leading zeros cannot overflow; anything longer than 12 significant digits already
    // exceeds 2^32 in every radix.
    let digits = digits.trim_start_matches('0');
    if digits.len() > 12 {
        return None;
    }
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> IpAddr {
        match Target::parse(s) {
            Ok(Target::Addr(a)) => a,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn name(s: &str) -> String {
        match Target::parse(s) {
            Ok(Target::Name(n)) => n.as_str().to_owned(),
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn every_spelling_of_loopback_is_an_address() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        for s in [
            "127.0.0.1",
            "127.0.0.1.",
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "017700000001",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "0x7f.1",
            "127.1",
            "127.0.1",
            "0x7f.0x0.0x0.0x1",
            "0177.0x0.0.01",
            "0000000177.0.0.1",
            "00000000000000000000000177.1",
            "１２７.０.０.１", // full-width digits map to ASCII under IDNA
            "127。0。0。1",    // ideographic full stops are dots under IDNA
        ] {
            assert_eq!(addr(s), lo, "{s:?}");
        }
        assert_eq!(addr("[::ffff:127.0.0.1]"), "::ffff:127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(addr("::1"), "::1".parse::<IpAddr>().unwrap());
        assert_eq!(addr("[fd00:ec2::254]"), "fd00:ec2::254".parse::<IpAddr>().unwrap());
        assert_eq!(addr("169.254.169.254."), "169.254.169.254".parse::<IpAddr>().unwrap());
        assert_eq!(addr("0"), "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(addr("010.0.0.1"), "8.0.0.1".parse::<IpAddr>().unwrap(), "octal, as inet_aton");
        assert_eq!(addr("0x"), "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(addr("10.0.258"), "10.0.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(addr("4294967295"), "255.255.255.255".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn numeric_but_invalid_is_refused_not_resolved() {
        for s in [
            "1.2.3.4.5",
            "256.1.1.1",
            "1.256.1.1",
            "4294967296",
            "1.16777216",
            "08.0.0.1",
            "example.123",
            "99999999999999999999999",
            "[127.0.0.1]",
            "[::1",
            "fe80::1%eth0",
            "1::2::3",
        ] {
            assert!(Target::parse(s).is_err(), "{s:?} → {:?}", Target::parse(s));
        }
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(name("API.Example.COM."), "api.example.com");
        assert_eq!(name("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(name("BÜCHER.example"), "xn--bcher-kva.example");
        assert_eq!(name("XN--BCHER-KVA.example"), "xn--bcher-kva.example");
        assert_eq!(name("_dmarc.example"), "_dmarc.example");
        assert_eq!(name("0x7f.example"), "0x7f.example");
        assert_eq!(name("1.2.3.4.example"), "1.2.3.4.example");
        assert_eq!(name("localhost"), "localhost");
        let n = Target::parse("a.example").unwrap();
        assert_eq!(n.name(), Some("a.example"));
        assert_eq!(Target::Addr(IpAddr::V4(Ipv4Addr::LOCALHOST)).name(), None);
        use crate::wire::{http_connect::Host, socks5::Addr};
        assert_eq!(
            Target::from_http(Host::Name("0x7f.1")),
            Ok(Target::Addr(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        );
        assert_eq!(
            Target::from_http(Host::V6(Ipv6Addr::LOCALHOST)),
            Ok(Target::Addr(IpAddr::V6(Ipv6Addr::LOCALHOST)))
        );
        assert_eq!(
            Target::from_socks(Addr::Domain(b"2130706433")),
            Ok(Target::Addr(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        );
        assert_eq!(
            Target::from_socks(Addr::Domain(b"A.Example.")).unwrap().name(),
            Some("a.example")
        );
        assert_eq!(
            Target::from_socks(Addr::V4(Ipv4Addr::LOCALHOST)),
            Ok(Target::Addr(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        );
    }

    #[test]
    fn bad_names() {
        assert_eq!(Target::parse(""), Err(NameError::Empty));
        assert_eq!(Target::parse("."), Err(NameError::Empty));
        assert_eq!(Target::parse("a..b"), Err(NameError::EmptyLabel));
        assert_eq!(Target::parse(".a"), Err(NameError::EmptyLabel));
        assert_eq!(Target::parse("a.b.."), Err(NameError::EmptyLabel));
        let label = "a".repeat(64);
        assert_eq!(Target::parse(&format!("{label}.example")), Err(NameError::LabelTooLong));
        let ok63 = "a".repeat(63);
        assert!(Target::parse(&format!("{ok63}.example")).is_ok());
        let long = ["abcdefghi"; 26].join(".");
        assert_eq!(long.len(), 259);
        assert_eq!(Target::parse(&long), Err(NameError::TooLong));
        assert_eq!(Target::parse(&long[..253]).map(|t| t.name().map(str::len)), Ok(Some(253)));
        assert!(Target::parse("a b.example").is_err());
        assert!(Target::parse("a/b.example").is_err());
        assert!(Target::parse("a%2e.example").is_err());
        assert!(Target::parse("xn--zz.example").is_err(), "invalid punycode");
        assert_eq!(Target::parse_bytes(b"\xff.example"), Err(NameError::NotUtf8));
        assert!(Target::parse("a\0.example").is_err());
    }
}
