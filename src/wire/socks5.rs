//! SOCKS5 (RFC 1928) and its username/password subnegotiation (RFC 1929).
//!
//! Client messages are parsed from the caller's buffer without copying: `Ok(None)` while
//! more bytes are needed, `Err` when no further bytes could make the message valid. The
//! server's messages are encoded into a caller-owned buffer and the length written is
//! returned. Datagrams of UDP ASSOCIATE carry a header of their own ([`UdpHeader`]); a
//! datagram is complete by construction, so a short one is an error, never *need more*.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// The protocol version byte of every SOCKS5 message.
pub const VERSION: u8 = 0x05;
/// The version byte of the RFC 1929 subnegotiation.
pub const AUTH_VERSION: u8 = 0x01;

/// Authentication methods (RFC 1928 §3).
pub mod method {
    pub const NO_AUTH: u8 = 0x00;
    pub const GSSAPI: u8 = 0x01;
    pub const USER_PASS: u8 = 0x02;
    /// The server's answer when none of the offered methods is acceptable.
    pub const NO_ACCEPTABLE: u8 = 0xff;
}

/// Address types (RFC 1928 §5).
pub mod atyp {
    pub const V4: u8 = 0x01;
    pub const DOMAIN: u8 = 0x03;
    pub const V6: u8 = 0x04;
}

/// The largest server reply: header 4 + IPv6 16 + port 2.
pub const MAX_REPLY_LEN: usize = 22;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("version byte {0:#04x}, expected SOCKS5")]
    BadVersion(u8),
    #[error("greeting offers no authentication method")]
    NoMethods,
    #[error("username/password subnegotiation version {0:#04x}")]
    BadAuthVersion(u8),
    #[error("empty username")]
    EmptyUsername,
    #[error("reserved byte is not zero")]
    BadReserved,
    /// Reply 0x08. The rest of the request cannot be framed, so the connection closes.
    #[error("address type {0:#04x} not supported")]
    AddrTypeNotSupported(u8),
    #[error("empty domain name")]
    EmptyDomain,
    #[error("datagram shorter than its header")]
    Truncated,
    #[error("output buffer too small")]
    BufferTooSmall,
}

/// The client's first message: the methods it offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting<'a> {
    pub methods: &'a [u8],
}

impl<'a> Greeting<'a> {
    /// Parses `VER NMETHODS METHODS…`; returns the greeting and the bytes it took.
    ///
    /// # Errors
    /// [`ParseError::BadVersion`], [`ParseError::NoMethods`].
    pub fn parse(buf: &'a [u8]) -> Result<Option<(Greeting<'a>, usize)>, ParseError> {
        let Some(&ver) = buf.first() else { return Ok(None) };
        if ver != VERSION {
            return Err(ParseError::BadVersion(ver));
        }
        let Some(&n) = buf.get(1) else { return Ok(None) };
        if n == 0 {
            return Err(ParseError::NoMethods);
        }
        let len = 2 + usize::from(n);
        match buf.get(2..len) {
            Some(methods) => Ok(Some((Greeting { methods }, len))),
            None => Ok(None),
        }
    }

    pub fn offers(&self, m: u8) -> bool {
        self.methods.contains(&m)
    }
}

/// The server's method selection: `VER METHOD`.
pub const fn method_selection(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// RFC 1929 username/password request. Bytes, not strings: the RFC does not say UTF-8.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UserPass<'a> {
    pub username: &'a [u8],
    pub password: &'a [u8],
}

impl std::fmt::Debug for UserPass<'_> {
    // Never print the password: this reaches logs through error contexts.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPass")
            .field("username", &String::from_utf8_lossy(self.username))
            .field("password", &"<redacted>")
            .finish()
    }
}

impl<'a> UserPass<'a> {
    /// Parses `VER ULEN UNAME PLEN PASSWD`. An empty password is accepted (clients send
    /// one for `user:`); an empty username is not.
    ///
    /// # Errors
    /// [`ParseError::BadAuthVersion`], [`ParseError::EmptyUsername`].
    pub fn parse(buf: &'a [u8]) -> Result<Option<(UserPass<'a>, usize)>, ParseError> {
        let Some(&ver) = buf.first() else { return Ok(None) };
        if ver != AUTH_VERSION {
            return Err(ParseError::BadAuthVersion(ver));
        }
        let Some(&ulen) = buf.get(1) else { return Ok(None) };
        if ulen == 0 {
            return Err(ParseError::EmptyUsername);
        }
        let uend = 2 + usize::from(ulen);
        let Some(username) = buf.get(2..uend) else { return Ok(None) };
        let Some(&plen) = buf.get(uend) else { return Ok(None) };
        let end = uend + 1 + usize::from(plen);
        let Some(password) = buf.get(uend + 1..end) else { return Ok(None) };
        Ok(Some((UserPass { username, password }, end)))
    }

    /// Encodes the request (for tests and clients). Returns the length written.
    ///
    /// # Errors
    /// [`ParseError::BufferTooSmall`]; [`ParseError::EmptyUsername`] for an empty or
    /// over-long (> 255 bytes) field, which the format cannot carry.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, ParseError> {
        let (ul, pl) = (self.username.len(), self.password.len());
        if ul == 0 || ul > 255 || pl > 255 {
            return Err(ParseError::EmptyUsername);
        }
        let len = 3 + ul + pl;
        let out = out.get_mut(..len).ok_or(ParseError::BufferTooSmall)?;
        out[0] = AUTH_VERSION;
        out[1] = ul as u8;
        out[2..2 + ul].copy_from_slice(self.username);
        out[2 + ul] = pl as u8;
        out[3 + ul..].copy_from_slice(self.password);
        Ok(len)
    }
}

/// The subnegotiation answer: `VER STATUS`, status 0 = success.
pub const fn auth_reply(success: bool) -> [u8; 2] {
    [AUTH_VERSION, if success { 0x00 } else { 0x01 }]
}

/// The request's command. Unknown values are kept so the server can answer 0x07.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
    UdpAssociate,
    Unknown(u8),
}

impl Command {
    pub const fn from_u8(b: u8) -> Command {
        match b {
            1 => Command::Connect,
            2 => Command::Bind,
            3 => Command::UdpAssociate,
            n => Command::Unknown(n),
        }
    }

    pub const fn to_u8(self) -> u8 {
        match self {
            Command::Connect => 1,
            Command::Bind => 2,
            Command::UdpAssociate => 3,
            Command::Unknown(n) => n,
        }
    }
}

/// A destination as SOCKS5 spells it. A domain is raw bytes (1–255) as sent: the
/// egress layer normalises it and notices when it is really an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr<'a> {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    Domain(&'a [u8]),
}

impl<'a> Addr<'a> {
    /// Parses `ATYP ADDR PORT` at the start of `buf`; returns the address, the port and
    /// the bytes taken, or `Ok(None)` when the buffer ends inside it.
    fn parse(buf: &'a [u8]) -> Result<Option<(Addr<'a>, u16, usize)>, ParseError> {
        let Some(&t) = buf.first() else { return Ok(None) };
        let (addr, alen) = match t {
            atyp::V4 => {
                let Some(b) = buf.get(1..5) else { return Ok(None) };
                (Addr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])), 4)
            }
            atyp::V6 => {
                let Some(b) = buf.get(1..17) else { return Ok(None) };
                let mut o = [0u8; 16];
                o.copy_from_slice(b);
                (Addr::V6(Ipv6Addr::from(o)), 16)
            }
            atyp::DOMAIN => {
                let Some(&n) = buf.get(1) else { return Ok(None) };
                if n == 0 {
                    return Err(ParseError::EmptyDomain);
                }
                let Some(d) = buf.get(2..2 + usize::from(n)) else { return Ok(None) };
                (Addr::Domain(d), 1 + usize::from(n))
            }
            other => return Err(ParseError::AddrTypeNotSupported(other)),
        };
        let p = 1 + alen;
        let Some(pb) = buf.get(p..p + 2) else { return Ok(None) };
        Ok(Some((addr, u16::from_be_bytes([pb[0], pb[1]]), p + 2)))
    }

    fn encoded_len(&self) -> usize {
        match self {
            Addr::V4(_) => 1 + 4,
            Addr::V6(_) => 1 + 16,
            Addr::Domain(d) => 2 + d.len(),
        }
    }

    /// Writes `ATYP ADDR PORT`; returns the length.
    fn encode(&self, port: u16, out: &mut [u8]) -> Result<usize, ParseError> {
        let len = self.encoded_len() + 2;
        let out = out.get_mut(..len).ok_or(ParseError::BufferTooSmall)?;
        match self {
            Addr::V4(ip) => {
                out[0] = atyp::V4;
                out[1..5].copy_from_slice(&ip.octets());
            }
            Addr::V6(ip) => {
                out[0] = atyp::V6;
                out[1..17].copy_from_slice(&ip.octets());
            }
            Addr::Domain(d) => {
                if d.is_empty() || d.len() > 255 {
                    return Err(ParseError::EmptyDomain);
                }
                out[0] = atyp::DOMAIN;
                out[1] = d.len() as u8;
                out[2..2 + d.len()].copy_from_slice(d);
            }
        }
        out[len - 2..].copy_from_slice(&port.to_be_bytes());
        Ok(len)
    }
}

impl From<SocketAddr> for Addr<'_> {
    fn from(s: SocketAddr) -> Self {
        match s {
            SocketAddr::V4(a) => Addr::V4(*a.ip()),
            SocketAddr::V6(a) => Addr::V6(*a.ip()),
        }
    }
}

/// `VER CMD RSV ATYP DST.ADDR DST.PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub command: Command,
    pub addr: Addr<'a>,
    pub port: u16,
}

impl<'a> Request<'a> {
    /// Parses a request; returns it and the bytes it took.
    ///
    /// # Errors
    /// [`ParseError::BadVersion`], [`ParseError::BadReserved`],
    /// [`ParseError::AddrTypeNotSupported`] (answer 0x08), [`ParseError::EmptyDomain`].
    pub fn parse(buf: &'a [u8]) -> Result<Option<(Request<'a>, usize)>, ParseError> {
        let Some(&ver) = buf.first() else { return Ok(None) };
        if ver != VERSION {
            return Err(ParseError::BadVersion(ver));
        }
        let Some(&cmd) = buf.get(1) else { return Ok(None) };
        let Some(&rsv) = buf.get(2) else { return Ok(None) };
        if rsv != 0 {
            return Err(ParseError::BadReserved);
        }
        let Some((addr, port, n)) = Addr::parse(&buf[3..])? else { return Ok(None) };
        Ok(Some((Request { command: Command::from_u8(cmd), addr, port }, 3 + n)))
    }

    /// Encodes the request (for tests and clients). Returns the length written.
    ///
    /// # Errors
    /// [`ParseError::BufferTooSmall`], [`ParseError::EmptyDomain`].
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, ParseError> {
        let head = out.get_mut(..3).ok_or(ParseError::BufferTooSmall)?;
        head.copy_from_slice(&[VERSION, self.command.to_u8(), 0]);
        Ok(3 + self.addr.encode(self.port, &mut out[3..])?)
    }
}

/// Reply codes (RFC 1928 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReplyCode {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    /// Policy or the SSRF guard refused the destination.
    NotAllowed = 0x02,
    NetworkUnreachable = 0x03,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    TtlExpired = 0x06,
    CommandNotSupported = 0x07,
    AddrTypeNotSupported = 0x08,
}

impl ReplyCode {
    /// Every code, in wire order: `ALL[n] as u8 == n` (the RFC numbers them 0..=8).
    const ALL: [ReplyCode; 9] = [
        ReplyCode::Succeeded,
        ReplyCode::GeneralFailure,
        ReplyCode::NotAllowed,
        ReplyCode::NetworkUnreachable,
        ReplyCode::HostUnreachable,
        ReplyCode::ConnectionRefused,
        ReplyCode::TtlExpired,
        ReplyCode::CommandNotSupported,
        ReplyCode::AddrTypeNotSupported,
    ];

    /// The code a reply carries in `REP`; `None` for one the RFC does not assign.
    pub const fn from_u8(b: u8) -> Option<ReplyCode> {
        let i = b as usize;
        if i < ReplyCode::ALL.len() { Some(ReplyCode::ALL[i]) } else { None }
    }
}

/// Encodes `VER REP RSV ATYP BND.ADDR BND.PORT` into `out` (at least [`MAX_REPLY_LEN`]
/// bytes serve every address); returns the length. Error replies carry `0.0.0.0:0`.
///
/// # Errors
/// [`ParseError::BufferTooSmall`].
pub fn encode_reply(
    code: ReplyCode,
    bind: SocketAddr,
    out: &mut [u8],
) -> Result<usize, ParseError> {
    let head = out.get_mut(..3).ok_or(ParseError::BufferTooSmall)?;
    head.copy_from_slice(&[VERSION, code as u8, 0]);
    Ok(3 + Addr::from(bind).encode(bind.port(), &mut out[3..])?)
}

/// A server reply as a client reads it (for tests and clients).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply<'a> {
    pub code: u8,
    pub addr: Addr<'a>,
    pub port: u16,
}

impl<'a> Reply<'a> {
    /// # Errors
    /// As [`Request::parse`].
    pub fn parse(buf: &'a [u8]) -> Result<Option<(Reply<'a>, usize)>, ParseError> {
        let Some(&ver) = buf.first() else { return Ok(None) };
        if ver != VERSION {
            return Err(ParseError::BadVersion(ver));
        }
        let Some(&code) = buf.get(1) else { return Ok(None) };
        if buf.len() < 3 {
            return Ok(None);
        }
        let Some((addr, port, n)) = Addr::parse(&buf[3..])? else { return Ok(None) };
        Ok(Some((Reply { code, addr, port }, 3 + n)))
    }
}

/// The header of a UDP ASSOCIATE datagram: `RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHeader<'a> {
    /// Fragment number; flowgate supports none, so a non-zero value means drop.
    pub frag: u8,
    pub addr: Addr<'a>,
    pub port: u16,
    pub payload: &'a [u8],
}

impl<'a> UdpHeader<'a> {
    /// Parses a whole datagram.
    ///
    /// # Errors
    /// [`ParseError::Truncated`] for a datagram that ends inside its header,
    /// [`ParseError::BadReserved`], [`ParseError::AddrTypeNotSupported`],
    /// [`ParseError::EmptyDomain`].
    pub fn parse(dgram: &'a [u8]) -> Result<UdpHeader<'a>, ParseError> {
        let head = dgram.get(..3).ok_or(ParseError::Truncated)?;
        if head[0] != 0 || head[1] != 0 {
            return Err(ParseError::BadReserved);
        }
        let (addr, port, n) = Addr::parse(&dgram[3..])?.ok_or(ParseError::Truncated)?;
        Ok(UdpHeader { frag: head[2], addr, port, payload: &dgram[3 + n..] })
    }

    /// Writes the header for `addr:port` (fragment 0) in front of a payload the caller
    /// places after it; returns the header length.
    ///
    /// # Errors
    /// [`ParseError::BufferTooSmall`], [`ParseError::EmptyDomain`].
    pub fn encode(addr: Addr<'_>, port: u16, out: &mut [u8]) -> Result<usize, ParseError> {
        let head = out.get_mut(..3).ok_or(ParseError::BufferTooSmall)?;
        head.copy_from_slice(&[0, 0, 0]);
        Ok(3 + addr.encode(port, &mut out[3..])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting() {
        let b = [5, 2, 0, 2, 0xaa];
        let (g, n) = Greeting::parse(&b).unwrap().unwrap();
        assert_eq!(n, 4);
        assert_eq!(g.methods, &[0, 2]);
        assert!(g.offers(method::USER_PASS));
        assert!(!g.offers(method::GSSAPI));
        for k in 0..4 {
            assert_eq!(Greeting::parse(&b[..k]), Ok(None), "prefix {k}");
        }
        assert_eq!(Greeting::parse(&[5, 0]), Err(ParseError::NoMethods));
        assert_eq!(Greeting::parse(&[4, 1, 0]), Err(ParseError::BadVersion(4)));
        assert_eq!(Greeting::parse(b"CONNECT"), Err(ParseError::BadVersion(b'C')));
        assert_eq!(method_selection(method::NO_ACCEPTABLE), [5, 0xff]);
    }

    #[test]
    fn userpass_round_trip() {
        let up = UserPass { username: b"billing", password: b"s3cret" };
        let mut buf = [0u8; 64];
        let n = up.encode(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"\x01\x07billing\x06s3cret");
        assert_eq!(UserPass::parse(&buf[..n]), Ok(Some((up, n))));
        for k in 0..n {
            assert_eq!(UserPass::parse(&buf[..k]), Ok(None), "prefix {k}");
        }
        assert!(!format!("{up:?}").contains("s3cret"));
        let empty_pw = b"\x01\x01u\x00";
        assert_eq!(UserPass::parse(empty_pw).unwrap().unwrap().0.password, b"");
        assert_eq!(UserPass::parse(b"\x01\x00\x00"), Err(ParseError::EmptyUsername));
        assert_eq!(UserPass::parse(b"\x05\x01u\x01p"), Err(ParseError::BadAuthVersion(5)));
        assert_eq!(auth_reply(true), [1, 0]);
        assert_eq!(auth_reply(false), [1, 1]);
    }

    #[test]
    fn request_every_address_type() {
        let cases: [(&[u8], Request<'_>); 3] = [
            (
                b"\x05\x01\x00\x01\x7f\x00\x00\x01\x01\xbb",
                Request { command: Command::Connect, addr: Addr::V4(Ipv4Addr::LOCALHOST), port: 443 },
            ),
            (
                b"\x05\x03\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x35",
                Request {
                    command: Command::UdpAssociate,
                    addr: Addr::V6(Ipv6Addr::LOCALHOST),
                    port: 53,
                },
            ),
            (
                b"\x05\x01\x00\x03\x0bexample.com\x00\x50",
                Request { command: Command::Connect, addr: Addr::Domain(b"example.com"), port: 80 },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Request::parse(bytes), Ok(Some((want, bytes.len()))));
            for k in 0..bytes.len() {
                assert_eq!(Request::parse(&bytes[..k]), Ok(None), "{want:?} prefix {k}");
            }
            let mut out = [0u8; 300];
            let n = want.encode(&mut out).unwrap();
            assert_eq!(&out[..n], bytes);
        }
    }

    #[test]
    fn request_errors() {
        assert_eq!(
            Request::parse(b"\x05\x01\x00\x02\x00"),
            Err(ParseError::AddrTypeNotSupported(2))
        );
        assert_eq!(Request::parse(b"\x05\x01\x00\x03\x00\x00\x50"), Err(ParseError::EmptyDomain));
        assert_eq!(Request::parse(b"\x05\x01\x01\x01"), Err(ParseError::BadReserved));
        assert_eq!(Request::parse(b"\x04\x01\x00\x01"), Err(ParseError::BadVersion(4)));
        let (r, _) = Request::parse(b"\x05\x09\x00\x01\x01\x02\x03\x04\x00\x01").unwrap().unwrap();
        assert_eq!(r.command, Command::Unknown(9));
        let (r, _) = Request::parse(b"\x05\x02\x00\x01\x01\x02\x03\x04\x00\x01").unwrap().unwrap();
        assert_eq!(r.command, Command::Bind);
    }

    #[test]
    fn replies() {
        let mut out = [0u8; MAX_REPLY_LEN];
        let codes = [
            (ReplyCode::Succeeded, 0x00),
            (ReplyCode::GeneralFailure, 0x01),
            (ReplyCode::NotAllowed, 0x02),
            (ReplyCode::HostUnreachable, 0x04),
            (ReplyCode::ConnectionRefused, 0x05),
            (ReplyCode::CommandNotSupported, 0x07),
            (ReplyCode::AddrTypeNotSupported, 0x08),
        ];
        for (code, byte) in codes {
            let n = encode_reply(code, "0.0.0.0:0".parse().unwrap(), &mut out).unwrap();
            assert_eq!(&out[..n], &[5, byte, 0, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(ReplyCode::from_u8(byte), Some(code));
        }
        for byte in 0..=u8::MAX {
            let back = ReplyCode::from_u8(byte).map(|c| c as u8);
            assert_eq!(back, (byte <= 0x08).then_some(byte), "code {byte:#04x}");
        }
        let n =
            encode_reply(ReplyCode::Succeeded, "[::1]:1080".parse().unwrap(), &mut out).unwrap();
        assert_eq!(n, MAX_REPLY_LEN);
        let (r, m) = Reply::parse(&out[..n]).unwrap().unwrap();
        assert_eq!((r.code, r.addr, r.port, m), (0, Addr::V6(Ipv6Addr::LOCALHOST), 1080, n));
        assert_eq!(
            encode_reply(ReplyCode::Succeeded, "[::1]:1".parse().unwrap(), &mut out[..10]),
            Err(ParseError::BufferTooSmall)
        );
    }

    #[test]
    fn udp_header() {
        let mut buf = [0u8; 64];
        let n = UdpHeader::encode(Addr::Domain(b"dns.example"), 53, &mut buf).unwrap();
        buf[n..n + 3].copy_from_slice(b"abc");
        let h = UdpHeader::parse(&buf[..n + 3]).unwrap();
        assert_eq!(
            h,
            UdpHeader { frag: 0, addr: Addr::Domain(b"dns.example"), port: 53, payload: b"abc" }
        );
        for k in 0..n {
            assert_eq!(UdpHeader::parse(&buf[..k]), Err(ParseError::Truncated), "prefix {k}");
        }
        let h = UdpHeader::parse(b"\x00\x00\x02\x01\x0a\x00\x00\x01\x00\x35").unwrap();
        assert_eq!((h.frag, h.payload), (2, &b""[..]));
        assert_eq!(
            UdpHeader::parse(b"\x00\x01\x00\x01\x0a\x00\x00\x01\x00\x35"),
            Err(ParseError::BadReserved)
        );
        assert_eq!(UdpHeader::parse(b"\x00\x00\x00\x07"), Err(ParseError::AddrTypeNotSupported(7)));
    }
}
