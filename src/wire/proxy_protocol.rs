//! PROXY protocol headers, v1 (text) and v2 (binary), as a load balancer prepends them to a
//! connection (or, v2 only, to each datagram) to tell us who the real client is.
//!
//! The parsers borrow the caller's buffer and return the decoded [`Header`] together with the
//! number of bytes it occupied, so the caller can consume exactly the header and nothing of
//! the payload behind it. `Ok(None)` means "a valid header may still follow, give me more
//! bytes"; it is only ever returned while the bytes seen so far are a strict prefix of some
//! valid header, so every byte seen by then belongs to the header. `Err` names what is wrong
//! in a small `Copy` value the caller counts.
//!
//! Limits: a v1 line is at most [`V1_MAX_LEN`] bytes including CRLF (the specification's
//! 107); a v2 header is refused as soon as its length field claims more than the caller's
//! `max_len` (default [`DEFAULT_MAX_HEADER_LEN`]), before any of it is waited for. Nothing is
//! allocated here. TLVs are walked with bounds checks and skipped; their contents (and the
//! optional CRC32c) are not interpreted. AF_UNIX addresses are accepted and reported as "no
//! address", so the caller falls back to the peer, exactly like v1 `UNKNOWN`.
//!
//! The `encode_*` functions write headers; they serve tests, the fuzz target and the load
//! test, and any future sender.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// The longest v1 header, CRLF included (specification section 2.1).
pub const V1_MAX_LEN: usize = 107;

/// The fixed part of a v2 header: signature, version/command, family/transport, length.
pub const V2_FIXED_LEN: usize = 16;

/// The v2 signature (specification section 2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The v1 prefix, including the space after `PROXY`.
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// Default for the longest v2 header accepted: the fixed part, the largest (AF_UNIX)
/// address block and room for the usual TLVs (ALPN, authority, unique id, AWS/Azure/GCP
/// endpoint ids). SSL TLVs with certificates may need more; raise the knob for those.
pub const DEFAULT_MAX_HEADER_LEN: usize = 1024;

/// The smallest `max_len` that still admits every address family (16 + 216 for AF_UNIX).
pub const MIN_MAX_HEADER_LEN: usize = V2_FIXED_LEN + UNIX_ADDR_LEN;

const INET_ADDR_LEN: usize = 12;
const INET6_ADDR_LEN: usize = 36;
const UNIX_ADDR_LEN: usize = 216;

/// Which version of the protocol a header was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    V1,
    V2,
}

/// v2 command. v1 has no command; its headers decode as [`Command::Proxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// The connection was made by the proxy itself (health check): use the real peer.
    Local,
    /// The connection is relayed on behalf of the client named in the header.
    Proxy,
}

/// The address family the header declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// AF_UNSPEC, v1 `UNKNOWN`, or a LOCAL header (whose family is ignored).
    Unspec,
    Inet,
    Inet6,
    /// AF_UNIX: accepted, but carries no address we can use.
    Unix,
}

/// The transport the relayed connection uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Unspec,
    /// TCP (v1 `TCP4`/`TCP6`, v2 SOCK_STREAM).
    Stream,
    /// UDP (v2 SOCK_DGRAM only).
    Datagram,
}

/// The client's and the proxy's original addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Addresses {
    /// The real client.
    pub source: SocketAddr,
    /// The address the client connected to on the proxy.
    pub destination: SocketAddr,
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    pub version: Version,
    pub command: Command,
    pub family: Family,
    pub transport: Transport,
    /// Present only for a PROXY command with an AF_INET/AF_INET6 (v1 TCP4/TCP6) block.
    pub addresses: Option<Addresses>,
}

impl Header {
    /// The client address the header asks us to believe, if it names one.
    pub fn source(&self) -> Option<SocketAddr> {
        self.addresses.map(|a| a.source)
    }
}

/// Why a header is malformed. Small and `Copy`: it is counted, logged, and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
pub enum ParseError {
    /// The bytes are not the start of a header of an accepted version.
    #[error("not a PROXY protocol header (bad signature)")]
    BadSignature,
    /// No CRLF within the first 107 bytes.
    #[error("PROXY v1 line longer than {V1_MAX_LEN} bytes")]
    V1TooLong,
    /// A LF not preceded by CR, or a CR followed by something other than LF.
    #[error("PROXY v1 line not terminated by CRLF")]
    V1BadLineEnd,
    /// A byte outside printable ASCII in the line.
    #[error("PROXY v1 line holds a non-printable byte")]
    V1BadByte,
    /// The protocol token is not `TCP4`, `TCP6` or `UNKNOWN`.
    #[error("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN")]
    V1BadProtocol,
    /// Wrong number of fields, or empty fields (double spaces).
    #[error("PROXY v1 line does not have the form `PROXY TCPx SRC DST SPORT DPORT`")]
    V1BadFields,
    /// An address is not a valid IPv4 (TCP4) or IPv6 (TCP6) address.
    #[error("PROXY v1 address is not valid for its protocol")]
    V1BadAddress,
    /// A port is not a decimal 0..=65535 without leading zeros.
    #[error("PROXY v1 port is not a decimal 0..=65535")]
    V1BadPort,
    /// The v2 version nibble is not 2.
    #[error("PROXY v2 header with unsupported version {0}")]
    V2BadVersion(u8),
    /// The v2 command nibble is neither LOCAL (0) nor PROXY (1).
    #[error("PROXY v2 header with unknown command {0}")]
    V2UnknownCommand(u8),
    /// The address family nibble is above AF_UNIX (3).
    #[error("PROXY v2 header with unknown address family {0}")]
    V2UnknownFamily(u8),
    /// The transport nibble is above SOCK_DGRAM (2).
    #[error("PROXY v2 header with unknown transport {0}")]
    V2UnknownTransport(u8),
    /// A family/transport pair the specification does not define (e.g. AF_INET with
    /// UNSPEC transport); the raw byte.
    #[error("PROXY v2 header with undefined family/transport byte {0:#04x}")]
    V2BadFamilyTransport(u8),
    /// The length field claims more than the configured maximum.
    #[error("PROXY v2 header of {claimed} bytes exceeds the limit of {max}")]
    V2TooLong { claimed: usize, max: usize },
    /// The length field is smaller than the address block of the declared family.
    #[error("PROXY v2 address block of {got} bytes, family needs {need}")]
    V2AddressTooShort { need: usize, got: usize },
    /// A TLV's header or value runs past the end of the header.
    #[error("PROXY v2 TLV runs past the end of the header")]
    V2TlvOverflow,
}

/// Parses a v1 or v2 header at the start of `buf`, whichever it is.
///
/// Returns the header and the number of bytes it occupies; `Ok(None)` while `buf` is a
/// strict prefix of a valid header. `max_len` bounds v2 headers (v1 is always ≤ 107).
///
/// # Errors
/// [`ParseError`] as soon as the bytes cannot begin a valid header.
pub fn parse(buf: &[u8], max_len: usize) -> Result<Option<(Header, usize)>, ParseError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf, max_len),
        Some(_) => Err(ParseError::BadSignature),
    }
}

/// Parses a v1 (text) header at the start of `buf`; anything else is `BadSignature`.
///
/// # Errors
/// [`ParseError`]; an incomplete line is rejected early when it already holds a stray CR/LF
/// or a non-printable byte, or has reached 107 bytes without CRLF.
pub fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    let sig = buf.len().min(V1_PREFIX.len());
    if buf[..sig] != V1_PREFIX[..sig] {
        return Err(ParseError::BadSignature);
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => match window.get(i + 1) {
                Some(b'\n') => {
                    // The prefix is 6 printable bytes, so `i >= 6` here.
                    let line = window.get(V1_PREFIX.len()..i).ok_or(ParseError::V1BadFields)?;
                    return parse_v1_line(line).map(|h| Some((h, i + 2)));
                }
                Some(_) => return Err(ParseError::V1BadLineEnd),
                None => {}
            },
            b'\n' => return Err(ParseError::V1BadLineEnd),
            0x20..=0x7e => {}
            _ => return Err(ParseError::V1BadByte),
        }
    }
    if buf.len() >= V1_MAX_LEN { Err(ParseError::V1TooLong) } else { Ok(None) }
}

/// The part of a v1 line after `PROXY ` and before CRLF.
fn parse_v1_line(line: &[u8]) -> Result<Header, ParseError> {
    let mut fields = line.split(|&b| b == b' ');
    let proto = fields.next().unwrap_or_default();
    let family = match proto {
        b"TCP4" => Family::Inet,
        b"TCP6" => Family::Inet6,
        // The specification says everything after UNKNOWN up to CRLF is to be ignored.
        b"UNKNOWN" => {
            return Ok(Header {
                version: Version::V1,
                command: Command::Proxy,
                family: Family::Unspec,
                transport: Transport::Unspec,
                addresses: None,
            });
        }
        _ => return Err(ParseError::V1BadProtocol),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(ParseError::V1BadFields);
    };
    let src = parse_v1_ip(src, family)?;
    let dst = parse_v1_ip(dst, family)?;
    let sport = parse_v1_port(sport)?;
    let dport = parse_v1_port(dport)?;
    Ok(Header {
        version: Version::V1,
        command: Command::Proxy,
        family,
        transport: Transport::Stream,
        addresses: Some(Addresses {
            source: SocketAddr::new(src, sport),
            destination: SocketAddr::new(dst, dport),
        }),
    })
}

fn parse_v1_ip(field: &[u8], family: Family) -> Result<IpAddr, ParseError> {
    if field.is_empty() {
        return Err(ParseError::V1BadFields);
    }
    let text = std::str::from_utf8(field).map_err(|_| ParseError::V1BadAddress)?;
    // std's parsers are strict: no leading zeros in IPv4 octets, no zone ids, no brackets.
    match family {
        Family::Inet => text.parse::<Ipv4Addr>().map(IpAddr::V4),
        _ => text.parse::<Ipv6Addr>().map(IpAddr::V6),
    }
    .map_err(|_| ParseError::V1BadAddress)
}

fn parse_v1_port(field: &[u8]) -> Result<u16, ParseError> {
    match field {
        [] => Err(ParseError::V1BadFields),
        [b'0'] => Ok(0),
        [b'0', ..] => Err(ParseError::V1BadPort),
        f if f.len() > 5 => Err(ParseError::V1BadPort),
        f => {
            let mut v: u32 = 0;
            for &b in f {
                if !b.is_ascii_digit() {
                    return Err(ParseError::V1BadPort);
                }
                v = v * 10 + u32::from(b - b'0');
            }
            u16::try_from(v).map_err(|_| ParseError::V1BadPort)
        }
    }
}

/// Parses a v2 (binary) header at the start of `buf`; anything else is `BadSignature`.
///
/// # Errors
/// [`ParseError`]; the version, command and length are checked as soon as the fixed part
/// has arrived, so an oversized or foreign header is refused without waiting for its body.
pub fn parse_v2(buf: &[u8], max_len: usize) -> Result<Option<(Header, usize)>, ParseError> {
    let sig = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig] != V2_SIGNATURE[..sig] {
        return Err(ParseError::BadSignature);
    }
    let Some(&ver_cmd) = buf.get(12) else { return Ok(None) };
    let version = ver_cmd >> 4;
    if version != 2 {
        return Err(ParseError::V2BadVersion(version));
    }
    let command = match ver_cmd & 0x0f {
        0 => Command::Local,
        1 => Command::Proxy,
        c => return Err(ParseError::V2UnknownCommand(c)),
    };
    let (Some(&fam_proto), Some(&len_hi), Some(&len_lo)) = (buf.get(13), buf.get(14), buf.get(15))
    else {
        return Ok(None);
    };
    let total = V2_FIXED_LEN + usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if total > max_len {
        return Err(ParseError::V2TooLong { claimed: total, max: max_len });
    }
    let Some(block) = buf.get(V2_FIXED_LEN..total) else { return Ok(None) };

    if command == Command::Local {
        // Section 2.2: for LOCAL the receiver must discard the protocol block, family
        // included, and use the real connection endpoints.
        let header = Header {
            version: Version::V2,
            command,
            family: Family::Unspec,
            transport: Transport::Unspec,
            addresses: None,
        };
        return Ok(Some((header, total)));
    }

    let (family, addr_len) = match fam_proto >> 4 {
        0 => (Family::Unspec, 0),
        1 => (Family::Inet, INET_ADDR_LEN),
        2 => (Family::Inet6, INET6_ADDR_LEN),
        3 => (Family::Unix, UNIX_ADDR_LEN),
        f => return Err(ParseError::V2UnknownFamily(f)),
    };
    let transport = match fam_proto & 0x0f {
        0 => Transport::Unspec,
        1 => Transport::Stream,
        2 => Transport::Datagram,
        t => return Err(ParseError::V2UnknownTransport(t)),
    };
    // Only UNSPEC/UNSPEC and a real family with a real transport are defined.
    if (family == Family::Unspec) != (transport == Transport::Unspec) {
        return Err(ParseError::V2BadFamilyTransport(fam_proto));
    }
    let (Some(addr), Some(tlvs)) = (block.get(..addr_len), block.get(addr_len..)) else {
        return Err(ParseError::V2AddressTooShort { need: addr_len, got: block.len() });
    };
    skip_tlvs(tlvs)?;

    let addresses = match family {
        Family::Inet => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(addr[o], addr[o + 1], addr[o + 2], addr[o + 3]))
            };
            Some(Addresses {
                source: SocketAddr::new(ip(0), be16(addr, 8)),
                destination: SocketAddr::new(ip(4), be16(addr, 10)),
            })
        }
        Family::Inet6 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&addr[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            Some(Addresses {
                source: SocketAddr::new(ip(0), be16(addr, 32)),
                destination: SocketAddr::new(ip(16), be16(addr, 34)),
            })
        }
        Family::Unspec | Family::Unix => None,
    };
    Ok(Some((Header { version: Version::V2, command, family, transport, addresses }, total)))
}

/// Reads a big-endian u16 at `o`; callers have checked `addr` is long enough.
fn be16(addr: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([addr[o], addr[o + 1]])
}

/// Walks the TLV list, checking that every type/length/value lies inside the header.
fn skip_tlvs(mut rest: &[u8]) -> Result<(), ParseError> {
    while !rest.is_empty() {
        let [_, hi, lo, ..] = *rest else { return Err(ParseError::V2TlvOverflow) };
        let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        rest = rest.get(end..).ok_or(ParseError::V2TlvOverflow)?;
    }
    Ok(())
}

/// Why a header cannot be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("source and destination are of different address families")]
    MixedFamilies,
    #[error("v1 cannot carry a datagram transport")]
    V1Datagram,
    #[error("header body longer than 65535 bytes")]
    TooLong,
}

/// Appends a v1 header: `TCP4`/`TCP6` for `Some(addresses)`, `UNKNOWN` for `None`.
/// Returns the number of bytes written.
///
/// # Errors
/// [`EncodeError::MixedFamilies`] for an IPv4 source with an IPv6 destination or vice versa.
pub fn encode_v1(addresses: Option<Addresses>, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
    use std::io::Write as _;
    let start = out.len();
    match addresses {
        None => out.extend_from_slice(b"PROXY UNKNOWN\r\n"),
        Some(Addresses { source: s, destination: d }) => {
            let proto = match (s.ip(), d.ip()) {
                (IpAddr::V4(_), IpAddr::V4(_)) => "TCP4",
                (IpAddr::V6(_), IpAddr::V6(_)) => "TCP6",
                _ => return Err(EncodeError::MixedFamilies),
            };
            // Writing into a Vec cannot fail.
            let _ =
                write!(out, "PROXY {proto} {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port());
        }
    }
    Ok(out.len() - start)
}

/// Appends a v2 header with the given TLVs (type, value). `addresses: None` writes an
/// AF_UNSPEC block. Returns the number of bytes written.
///
/// # Errors
/// [`EncodeError`] for mixed families or a body over 65535 bytes (nothing is written then).
pub fn encode_v2(
    command: Command,
    transport: Transport,
    addresses: Option<Addresses>,
    tlvs: &[(u8, &[u8])],
    out: &mut Vec<u8>,
) -> Result<usize, EncodeError> {
    let (family, addr_len) = match addresses.map(|a| (a.source.ip(), a.destination.ip())) {
        None => (0u8, 0usize),
        Some((IpAddr::V4(_), IpAddr::V4(_))) => (1, INET_ADDR_LEN),
        Some((IpAddr::V6(_), IpAddr::V6(_))) => (2, INET6_ADDR_LEN),
        Some(_) => return Err(EncodeError::MixedFamilies),
    };
    let transport = match (family, transport) {
        (0, _) => 0u8,
        (_, Transport::Unspec | Transport::Stream) => 1,
        (_, Transport::Datagram) => 2,
    };
    let body = addr_len + tlvs.iter().map(|(_, v)| 3 + v.len()).sum::<usize>();
    let body16 = u16::try_from(body).map_err(|_| EncodeError::TooLong)?;
    if tlvs.iter().any(|(_, v)| v.len() > usize::from(u16::MAX)) {
        return Err(EncodeError::TooLong);
    }
    let start = out.len();
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x20 | if command == Command::Proxy { 1 } else { 0 });
    out.push(family << 4 | transport);
    out.extend_from_slice(&body16.to_be_bytes());
    if let Some(a) = addresses {
        match (a.source.ip(), a.destination.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            _ => unreachable!("families were checked above"),
        }
        out.extend_from_slice(&a.source.port().to_be_bytes());
        out.extend_from_slice(&a.destination.port().to_be_bytes());
    }
    for (t, v) in tlvs {
        out.push(*t);
        // Checked above: every value fits in u16.
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
        out.extend_from_slice(v);
    }
    Ok(out.len() - start)
}

#[cfg(test)]
mod tests;
