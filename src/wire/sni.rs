//! The destination name a client is about to talk to, peeked from the first bytes of a
//! connection without terminating anything: the `server_name` of a TLS ClientHello, or
//! the `Host` header of a plain HTTP request.
//!
//! Only the first TLS record is read, and the whole ClientHello must fit in it. A
//! ClientHello split across records is legal TLS but rare in practice and a known way to
//! slip past SNI filters, so it is refused ([`SniError::Fragmented`]): fail closed.
//!
//! Outcomes kept apart, because the transparent listener acts differently on each:
//! `Ok(None)` need more bytes, `Err(NotTls)` this is some other protocol (try HTTP),
//! `Err(Malformed)` broken TLS (refuse), `Ok(Some(hello))` with or without a name.

use thiserror::Error;

use super::http_connect::{self, Authority, Limits};

/// The TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const NAME_TYPE_HOST: u8 = 0x00;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
pub const MAX_RECORD: usize = 1 << 14;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum SniError {
    #[error("not a TLS handshake")]
    NotTls,
    #[error("ClientHello does not fit in the first record")]
    Fragmented,
    #[error("TLS record larger than the limit")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// What the first record said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The `host_name` entry of the server_name extension, as sent (not normalised).
    pub server_name: Option<&'a str>,
    /// The bytes of the first record, header included.
    pub record_len: usize,
}

/// Peeks a TLS ClientHello at the start of `buf`.
///
/// `max_record` bounds the record length accepted (at most [`MAX_RECORD`] is
/// meaningful); the caller peeks at most `RECORD_HEADER + max_record` bytes.
///
/// # Errors
/// See the module doc.
pub fn peek_client_hello(
    buf: &[u8],
    max_record: usize,
) -> Result<Option<ClientHello<'_>>, SniError> {
    // Decide not-TLS on as few bytes as possible, so HTTP is recognised from "G".
    let Some(&ct) = buf.first() else { return Ok(None) };
    if ct != CONTENT_HANDSHAKE {
        return Err(SniError::NotTls);
    }
    let Some(&major) = buf.get(1) else { return Ok(None) };
    if major != 0x03 {
        return Err(SniError::NotTls);
    }
    let Some(h) = buf.get(..RECORD_HEADER) else { return Ok(None) };
    let rec_len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if rec_len > max_record.min(MAX_RECORD) {
        return Err(SniError::TooLarge);
    }
    if rec_len < 4 {
        return Err(SniError::Malformed("record too short for a handshake header"));
    }
    // The handshake header can tell us early that the hello does not fit.
    let Some(hs) = buf.get(RECORD_HEADER..RECORD_HEADER + 4) else { return Ok(None) };
    if hs[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(SniError::Malformed("first handshake message is not a ClientHello"));
    }
    let hs_len = (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
    if 4 + hs_len > rec_len {
        return Err(SniError::Fragmented);
    }
    let Some(record) = buf.get(RECORD_HEADER..RECORD_HEADER + rec_len) else { return Ok(None) };
    let body = &record[4..4 + hs_len];
    let server_name = parse_hello_body(body)?;
    Ok(Some(ClientHello { server_name, record_len: RECORD_HEADER + rec_len }))
}

/// A bounds-checked reader over a borrowed slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if n > self.buf.len() {
            return Err(SniError::Malformed(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

fn parse_hello_body(body: &[u8]) -> Result<Option<&str>, SniError> {
    let mut r = Reader { buf: body };
    let version = r.take(2, "version")?;
    if version[0] != 0x03 {
        return Err(SniError::Malformed("legacy_version"));
    }
    r.take(32, "random")?;
    let session = r.vec8("session id")?;
    if session.len() > 32 {
        return Err(SniError::Malformed("session id longer than 32"));
    }
    let suites = r.vec16("cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher suites"));
    }
    if r.vec8("compression methods")?.is_empty() {
        return Err(SniError::Malformed("compression methods"));
    }
    if r.buf.is_empty() {
        return Ok(None); // No extensions at all (TLS 1.0-era hello).
    }
    let exts = r.vec16("extensions")?;
    if !r.buf.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let mut e = Reader { buf: exts };
    let mut name = None;
    let mut seen_sni = false;
    while !e.buf.is_empty() {
        let ty = e.u16("extension type")?;
        let data = e.vec16("extension data")?;
        if ty != EXT_SERVER_NAME {
            continue;
        }
        if seen_sni {
            return Err(SniError::Malformed("server_name extension twice"));
        }
        seen_sni = true;
        name = parse_server_name(data)?;
    }
    Ok(name)
}

fn parse_server_name(data: &[u8]) -> Result<Option<&str>, SniError> {
    let mut d = Reader { buf: data };
    let list = d.vec16("server name list")?;
    if !d.buf.is_empty() {
        return Err(SniError::Malformed("bytes after the server name list"));
    }
    let mut l = Reader { buf: list };
    let mut host = None;
    while !l.buf.is_empty() {
        let ty = l.u8("name type")?;
        let name = l.vec16("host name")?;
        if ty != NAME_TYPE_HOST {
            continue;
        }
        if host.is_some() {
            return Err(SniError::Malformed("two host names"));
        }
        // RFC 6066: ASCII, no trailing NUL; an LDH name. Anything else fails closed.
        if name.is_empty()
            || !name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(SniError::Malformed("host name characters"));
        }
        host = std::str::from_utf8(name).ok();
    }
    Ok(host)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum HostError {
    #[error("request head: {0}")]
    Head(#[from] http_connect::ParseError),
    #[error("no Host header")]
    Missing,
    #[error("more than one Host header")]
    Duplicate,
}

/// Peeks a plain HTTP request head and returns its `Host` header as an authority.
///
/// # Errors
/// [`HostError`]: a malformed head, no `Host`, or more than one.
pub fn peek_http_host<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<Authority<'a>>, HostError> {
    let Some(head) = http_connect::parse_head(buf, limits)? else { return Ok(None) };
    let value = match head.unique_header("host") {
        Ok(Some(v)) => v,
        Ok(None) => return Err(HostError::Missing),
        Err(()) => return Err(HostError::Duplicate),
    };
    let s = std::str::from_utf8(value)
        .map_err(|_| HostError::Head(http_connect::ParseError::BadHostHeader))?;
    let a = http_connect::parse_authority(s)
        .map_err(|_| HostError::Head(http_connect::ParseError::BadHostHeader))?;
    Ok(Some(a))
}

/// Builds a minimal but well-formed ClientHello record (for tests, fuzz seeds and
/// benches): one cipher suite, null compression, a server_name extension when `sni` is
/// set, and `extra_ext` bytes of padding extension so sizes can be varied.
pub fn build_client_hello(sni: Option<&str>, extra_ext: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(name) = sni {
        let n = name.len() as u16;
        exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
        exts.extend_from_slice(&(n + 5).to_be_bytes());
        exts.extend_from_slice(&(n + 3).to_be_bytes());
        exts.push(NAME_TYPE_HOST);
        exts.extend_from_slice(&n.to_be_bytes());
        exts.extend_from_slice(name.as_bytes());
    }
    if extra_ext > 0 {
        exts.extend_from_slice(&0x0015u16.to_be_bytes()); // padding
        exts.extend_from_slice(&(extra_ext as u16).to_be_bytes());
        exts.resize(exts.len() + extra_ext, 0);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x42; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![CONTENT_HANDSHAKE, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::http_connect::Host;

    fn peek(b: &[u8]) -> Result<Option<ClientHello<'_>>, SniError> {
        peek_client_hello(b, MAX_RECORD)
    }

    #[test]
    fn extracts_sni_and_needs_more_on_every_prefix() {
        let rec = build_client_hello(Some("api.example.com"), 100);
        let h = peek(&rec).unwrap().unwrap();
        assert_eq!(h.server_name, Some("api.example.com"));
        assert_eq!(h.record_len, rec.len());
        for k in 0..rec.len() {
            assert_eq!(peek(&rec[..k]), Ok(None), "prefix {k}");
        }
        // Application data after the record does not matter.
        let mut more = rec.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(peek(&more).unwrap().unwrap().record_len, rec.len());
    }

    #[test]
    fn no_sni_is_not_an_error() {
        let rec = build_client_hello(None, 0);
        assert_eq!(peek(&rec).unwrap().unwrap().server_name, None);
        let rec = build_client_hello(None, 16);
        assert_eq!(peek(&rec).unwrap().unwrap().server_name, None);
    }

    #[test]
    fn not_tls_is_decided_early() {
        assert_eq!(peek(b"G"), Err(SniError::NotTls));
        assert_eq!(peek(b"\x16\x01"), Err(SniError::NotTls));
        assert_eq!(peek(b"SSH-2.0-"), Err(SniError::NotTls));
    }

    #[test]
    fn malformed_and_limits() {
        let rec = build_client_hello(Some("a.example"), 0);
        // Record claims less than the handshake needs: the hello spans records.
        let mut frag = rec.clone();
        let short = (rec.len() - 5 - 10) as u16;
        frag[3..5].copy_from_slice(&short.to_be_bytes());
        assert_eq!(peek(&frag), Err(SniError::Fragmented));
        // Not a ClientHello.
        let mut sh = rec.clone();
        sh[5] = 0x02;
        assert!(matches!(peek(&sh), Err(SniError::Malformed(_))));
        // Over the bound.
        assert_eq!(peek_client_hello(&rec, 16), Err(SniError::TooLarge));
        assert_eq!(peek(b"\x16\x03\x01\xff\xff"), Err(SniError::TooLarge));
        // Extension length running past the end.
        let mut bad = rec.clone();
        let ext_len_at = 5 + 4 + 2 + 32 + 1 + 4 + 2;
        bad[ext_len_at..ext_len_at + 2].copy_from_slice(&0xfff0u16.to_be_bytes());
        assert!(matches!(peek(&bad), Err(SniError::Malformed(_))));
        // A NUL inside the name.
        let nul = build_client_hello(Some("a.exam\0le"), 0);
        assert!(matches!(peek(&nul), Err(SniError::Malformed(_))));
        // Two server_name extensions.
        let twice = {
            let one = build_client_hello(Some("a.example"), 0);
            let ext = &one[one.len() - (4 + 5 + 9)..];
            let mut exts = ext.to_vec();
            exts.extend_from_slice(ext);
            let mut body = one[9..one.len() - ext.len() - 2].to_vec();
            body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
            body.extend_from_slice(&exts);
            let mut r = vec![0x16, 3, 1];
            r.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
            r.push(1);
            r.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
            r.extend_from_slice(&body);
            r
        };
        assert_eq!(peek(&twice), Err(SniError::Malformed("server_name extension twice")));
    }

    #[test]
    fn http_host_peek() {
        let l = Limits::default();
        let a = peek_http_host(b"GET / HTTP/1.1\r\nHost: Api.Example:8080\r\n\r\n", &l)
            .unwrap()
            .unwrap();
        assert_eq!((a.host, a.port), (Host::Name("Api.Example"), Some(8080)));
        assert_eq!(peek_http_host(b"GET / HTTP/1.1\r\nHost: a", &l), Ok(None));
        assert_eq!(peek_http_host(b"GET / HTTP/1.1\r\n\r\n", &l), Err(HostError::Missing));
        assert_eq!(
            peek_http_host(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", &l),
            Err(HostError::Duplicate)
        );
        assert!(peek_http_host(b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", &l).is_err());
    }
}
