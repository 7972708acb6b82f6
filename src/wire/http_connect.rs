//! HTTP/1.1 request heads as a forward proxy receives them: `CONNECT host:port` (authority
//! form) and `GET http://host/path` (absolute form).
//!
//! The tokeniser is our own rather than a general HTTP library because a proxy needs
//! stricter and more specific answers than a server does: each way a head can be wrong
//! (overlong request line, too many headers, obs-fold, userinfo in the URI, a port that is
//! missing, zero or too large) is its own [`ParseError`] so the handshake can count it and
//! answer `400`. Everything borrowed from the caller's buffer; nothing allocated.
//!
//! [`parse_head`] is the generic tokeniser (also used by [`crate::wire::sni`] to peek the
//! `Host` header of plain HTTP); [`parse_request`] adds the proxy-specific validation.

use std::net::Ipv6Addr;

use thiserror::Error;

/// Bounds on a request head. Every field has a default and is a config knob of the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Whole head including the blank line. Default 8 KiB (issue 7).
    pub max_head: usize,
    /// The request line without its CRLF. Default 4 KiB.
    pub max_request_line: usize,
    /// Header fields. Default 64.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_head: 8 * 1024, max_request_line: 4 * 1024, max_headers: 64 }
    }
}

/// Why a head was refused. Small and `Copy`: built on the handshake path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("request head larger than the limit")]
    HeadTooLarge,
    #[error("request line longer than the limit")]
    RequestLineTooLong,
    #[error("more header fields than the limit")]
    TooManyHeaders,
    #[error("obsolete line folding in a header field")]
    ObsFold,
    #[error("line ended by a bare LF")]
    BareLf,
    #[error("malformed request line")]
    BadRequestLine,
    #[error("invalid method")]
    BadMethod,
    #[error("unsupported HTTP version")]
    BadVersion,
    #[error("malformed header field")]
    BadHeader,
    #[error("request target is not in a proxy form (authority or absolute)")]
    NotProxyForm,
    #[error("CONNECT target must be host:port")]
    ConnectNotAuthority,
    #[error("absolute URI scheme other than http")]
    UnsupportedScheme,
    #[error("userinfo in the request URI")]
    Userinfo,
    #[error("port missing")]
    MissingPort,
    #[error("port not a number in 1..=65535")]
    BadPort,
    #[error("malformed host")]
    BadHost,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("malformed Host header")]
    BadHostHeader,
}

/// The host part of an authority, as spelled. Bracketed IPv6 literals are parsed here
/// (the brackets make them unambiguous); everything else stays a name, and
/// `egress::name` decides whether the name is really an address (`127.1`, `0x7f.1`…).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host<'a> {
    Name(&'a str),
    V6(Ipv6Addr),
}

/// `host[:port]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authority<'a> {
    pub host: Host<'a>,
    /// `None` when the authority had no port (only allowed where a default applies).
    pub port: Option<u16>,
}

impl Authority<'_> {
    /// True when both name the same host and port, comparing names without regard to
    /// ASCII case or one trailing dot, and taking `default_port` for an absent port.
    pub fn same_as(&self, other: &Authority<'_>, default_port: u16) -> bool {
        let port_a = self.port.unwrap_or(default_port);
        let port_b = other.port.unwrap_or(default_port);
        if port_a != port_b {
            return false;
        }
        match (self.host, other.host) {
            (Host::V6(a), Host::V6(b)) => a == b,
            (Host::Name(a), Host::Name(b)) => trim_dot(a).eq_ignore_ascii_case(trim_dot(b)),
            _ => false,
        }
    }
}

fn trim_dot(s: &str) -> &str {
    s.strip_suffix('.').unwrap_or(s)
}

/// A tokenised head: request line and the span of the header block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head<'a> {
    pub method: &'a str,
    pub target: &'a str,
    /// Minor version: `HTTP/1.0` → 0, `HTTP/1.1` → 1.
    pub version: u8,
    /// Bytes of the head including the final blank line; what follows belongs to the body
    /// or the tunnel.
    pub head_len: usize,
    pub header_count: usize,
    /// The header block (lines after the request line, each ending CRLF, without the
    /// terminating blank line). Validated; iterate with [`Head::headers`].
    header_block: &'a [u8],
}

impl<'a> Head<'a> {
    /// The header fields in order, names as sent, values without surrounding whitespace.
    pub fn headers(&self) -> Headers<'a> {
        Headers { rest: self.header_block }
    }

    /// The one value of header `name` (case-insensitive).
    ///
    /// # Errors
    /// `Err(())` when the header appears more than once.
    #[allow(clippy::result_unit_err)]
    pub fn unique_header(&self, name: &str) -> Result<Option<&'a [u8]>, ()> {
        let mut found = None;
        for (n, v) in self.headers() {
            if n.eq_ignore_ascii_case(name) {
                if found.is_some() {
                    return Err(());
                }
                found = Some(v);
            }
        }
        Ok(found)
    }
}

/// Iterator over the validated header lines of a [`Head`].
#[derive(Clone, Debug)]
pub struct Headers<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        // The block was validated by `parse_head`: every line is `name:value CRLF` with an
        // ASCII token name, so the lookups below cannot fail; a failure ends the iteration.
        let nl = self.rest.iter().position(|&b| b == b'\n')?;
        let line = self.rest.get(..nl.checked_sub(1)?)?;
        self.rest = &self.rest[nl + 1..];
        let colon = line.iter().position(|&b| b == b':')?;
        let name = std::str::from_utf8(&line[..colon]).ok()?;
        Some((name, trim_ows(&line[colon + 1..])))
    }
}

/// The request forms a forward proxy accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form<'a> {
    /// `CONNECT host:port HTTP/1.1`: open a tunnel.
    Connect,
    /// `METHOD http://host[:port]/path HTTP/1.1`: forward one request; `path` is the
    /// origin-form target to send upstream (`/` when the URI had none).
    Absolute { path: &'a str },
}

/// A validated proxy request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub head: Head<'a>,
    pub form: Form<'a>,
    /// Where the client wants to go; the port is always known (80 by default for
    /// absolute-form `http://`).
    pub host: Host<'a>,
    pub port: u16,
    /// The `Host` header, when sent, parsed as an authority.
    pub host_header: Option<Authority<'a>>,
    /// The `Proxy-Authorization` value, when sent (verified by the listener).
    pub proxy_authorization: Option<&'a [u8]>,
}

impl Request<'_> {
    /// True when a `Host` header was sent and names another host or port than the request
    /// target. An absolute-form request with a mismatch must be refused (otherwise an
    /// allowed URI could carry a request meant for another virtual host).
    pub fn host_mismatch(&self) -> bool {
        match self.host_header {
            None => false,
            Some(h) => !h.same_as(&Authority { host: self.host, port: Some(self.port) }, self.port),
        }
    }
}

/// Tokenises a request head: request line, header fields, blank line.
///
/// Returns `Ok(None)` while the head is incomplete and within the limits.
///
/// # Errors
/// [`ParseError`] for a head that breaks the grammar or a limit; more bytes cannot fix it.
pub fn parse_head<'a>(buf: &'a [u8], limits: &Limits) -> Result<Option<Head<'a>>, ParseError> {
    tokenise(buf, limits, |_, _| Ok(()))
}

/// The tokeniser behind [`parse_head`]: one pass over the head, calling `visit` with each
/// header's name and trimmed value, so [`parse_request`] picks out the headers it needs
/// without a second pass (the hot part of a CONNECT; see benches/wire.rs).
fn tokenise<'a, F>(
    buf: &'a [u8],
    limits: &Limits,
    mut visit: F,
) -> Result<Option<Head<'a>>, ParseError>
where
    F: FnMut(&'a [u8], &'a [u8]) -> Result<(), ParseError>,
{
    // Request line.
    let window = &buf[..buf.len().min(limits.max_request_line + 2)];
    let line_end = match memchr::memchr(b'\n', window) {
        Some(i) => i,
        None => {
            return if buf.len() > limits.max_request_line + 1 {
                Err(ParseError::RequestLineTooLong)
            } else if buf.len() >= limits.max_head {
                Err(ParseError::HeadTooLarge)
            } else {
                check_partial_line(buf).map(|()| None)
            };
        }
    };
    if line_end == 0 || buf[line_end - 1] != b'\r' {
        return Err(ParseError::BareLf);
    }
    let line = &buf[..line_end - 1];
    if line.len() > limits.max_request_line {
        return Err(ParseError::RequestLineTooLong);
    }
    let (method, target, version) = parse_request_line(line)?;

    // Header fields.
    let block_start = line_end + 1;
    let mut pos = block_start;
    let mut count = 0usize;
    loop {
        let rest = &buf[pos..];
        let Some(nl) = memchr::memchr(b'\n', rest) else {
            if buf.len() >= limits.max_head {
                return Err(ParseError::HeadTooLarge);
            }
            if rest.first().is_some_and(|&b| b == b' ' || b == b'\t') {
                return Err(ParseError::ObsFold);
            }
            check_partial_line(rest)?;
            return Ok(None);
        };
        if nl == 0 || rest[nl - 1] != b'\r' {
            return Err(ParseError::BareLf);
        }
        let line = &rest[..nl - 1];
        let next = pos + nl + 1;
        if next > limits.max_head {
            return Err(ParseError::HeadTooLarge);
        }
        if line.is_empty() {
            return Ok(Some(Head {
                method,
                target,
                version,
                head_len: next,
                header_count: count,
                header_block: &buf[block_start..pos],
            }));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(ParseError::ObsFold);
        }
        count += 1;
        if count > limits.max_headers {
            return Err(ParseError::TooManyHeaders);
        }
        let (name, value) = split_header_line(line)?;
        visit(name, value)?;
        pos = next;
    }
}

/// Parses and validates a forward-proxy request head.
///
/// # Errors
/// [`ParseError`]; every variant means `400 Bad Request`.
pub fn parse_request<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<Request<'a>>, ParseError> {
    let mut host_value = None;
    let mut proxy_authorization = None;
    let head = tokenise(buf, limits, |name, value| {
        if name.eq_ignore_ascii_case(b"host") {
            if host_value.replace(value).is_some() {
                return Err(ParseError::DuplicateHost);
            }
        } else if name.eq_ignore_ascii_case(b"proxy-authorization")
            && proxy_authorization.replace(value).is_some()
        {
            return Err(ParseError::BadHeader);
        }
        Ok(())
    })?;
    let Some(head) = head else {
        return Ok(None);
    };
    let host_header = match host_value {
        None => None,
        Some(v) => {
            let s = std::str::from_utf8(v).map_err(|_| ParseError::BadHostHeader)?;
            Some(parse_authority(s).map_err(|_| ParseError::BadHostHeader)?)
        }
    };

    let (form, authority, default_port) = if head.method == "CONNECT" {
        if head.target.starts_with('/') || head.target.contains("://") {
            return Err(ParseError::ConnectNotAuthority);
        }
        (Form::Connect, parse_authority(head.target)?, None)
    } else {
        let (authority, path) = split_absolute(head.target)?;
        (Form::Absolute { path }, parse_authority(authority)?, Some(80))
    };
    let port = match (authority.port, default_port) {
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => return Err(ParseError::MissingPort),
    };
    Ok(Some(Request { head, form, host: authority.host, port, host_header, proxy_authorization }))
}

/// Splits `http://authority/path` into the authority and the origin-form path.
fn split_absolute(target: &str) -> Result<(&str, &str), ParseError> {
    if target.starts_with('/') || target == "*" {
        return Err(ParseError::NotProxyForm);
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(ParseError::NotProxyForm);
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(ParseError::UnsupportedScheme);
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if path.starts_with('#') {
        return Err(ParseError::NotProxyForm);
    }
    let path = if path.is_empty() { "/" } else { path };
    Ok((authority, path))
}

/// Headers a forward proxy must not pass on: hop-by-hop (RFC 9110 §7.6.1) and the
/// proxy's own. Compared case-insensitively.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// Writes the head to send upstream for an absolute-form request: the request line in
/// origin form (`GET /path HTTP/1.1`), the client's headers without hop-by-hop and proxy
/// headers (and without any header the client's `Connection` header names), then
/// `Connection: close` — one request per upstream connection, so every request is
/// checked on its own. Appends to `out`; returns the bytes written.
///
/// A CONNECT request has no origin form; for it nothing is written and 0 returned.
pub fn write_origin_form(req: &Request<'_>, out: &mut Vec<u8>) -> usize {
    let Form::Absolute { path } = req.form else { return 0 };
    let start = out.len();
    out.extend_from_slice(req.head.method.as_bytes());
    out.push(b' ');
    if !path.starts_with('/') {
        out.push(b'/'); // `http://h?q` → `/?q`: origin form always starts with a slash
    }
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(if req.head.version == 0 { b" HTTP/1.0\r\n" } else { b" HTTP/1.1\r\n" });
    let listed: Vec<&[u8]> = req
        .head
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(trim_ows)
        .collect();
    let hop = |name: &str| {
        HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || listed.iter().any(|l| l.eq_ignore_ascii_case(name.as_bytes()))
    };
    write_fields_closing(&req.head, hop, false, out);
    out.len() - start
}

/// Appends `head`'s header fields except those `skip` names, then `Connection: close` and
/// the blank line that ends a head: the request is made its connection's last, so the
/// server answers it and closes (RFC 9112 §9.6) and the next request, on a new
/// connection, is checked on its own. With `upgrade` the field is `Connection: Upgrade,
/// close`: a server that switches protocols does so (101 is not a final response), one
/// that declines answers and closes.
pub fn write_fields_closing(
    head: &Head<'_>,
    skip: impl Fn(&str) -> bool,
    upgrade: bool,
    out: &mut Vec<u8>,
) {
    for (name, value) in head.headers() {
        if skip(name) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if upgrade {
        b"Connection: Upgrade, close\r\n\r\n".as_slice()
    } else {
        b"Connection: close\r\n\r\n".as_slice()
    });
}

/// Decodes a `Proxy-Authorization: Basic …` value into `out` and splits it at the first
/// colon: `(username, password)`. `None` for another scheme, bad base64, no colon, or an
/// `out` too small (credentials longer than `out` are refused, not truncated).
pub fn basic_credentials<'o>(value: &[u8], out: &'o mut [u8]) -> Option<(&'o [u8], &'o [u8])> {
    let sp = value.iter().position(|&b| b == b' ')?;
    if !value[..sp].eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let b64 = trim_ows(&value[sp + 1..]);
    let n = decode_base64(b64, out)?;
    let decoded = &out[..n];
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((&decoded[..colon], &decoded[colon + 1..]))
}

/// Standard base64 with padding (RFC 4648 §4), strict: no whitespace, no stray bytes.
fn decode_base64(input: &[u8], out: &mut [u8]) -> Option<usize> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    if input.is_empty() || !input.len().is_multiple_of(4) {
        return None;
    }
    let mut n = 0;
    let chunks = input.len() / 4;
    for (i, q) in input.chunks_exact(4).enumerate() {
        let last = i + 1 == chunks;
        let pad = match (q[2], q[3]) {
            (b'=', b'=') if last => 2,
            (_, b'=') if last => 1,
            _ => 0,
        };
        let mut acc = 0u32;
        for &c in &q[..4 - pad] {
            acc = (acc << 6) | val(c)?;
        }
        acc <<= 6 * pad as u32;
        let bytes = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        let take = 3 - pad;
        out.get_mut(n..n + take)?.copy_from_slice(&bytes[..take]);
        n += take;
    }
    Some(n)
}

/// Parses `host[:port]` or `[v6][:port]`.
///
/// A port, when present, must be 1..=65535 in at most five digits. Userinfo (`user@`) is
/// refused with its own error: it is how credentials and confusing targets get smuggled.
///
/// # Errors
/// [`ParseError::Userinfo`], [`ParseError::BadHost`], [`ParseError::BadPort`],
/// [`ParseError::MissingPort`] (a colon with nothing after it).
pub fn parse_authority(s: &str) -> Result<Authority<'_>, ParseError> {
    if s.contains('@') {
        return Err(ParseError::Userinfo);
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']').ok_or(ParseError::BadHost)?;
        let ip: Ipv6Addr = rest[..close].parse().map_err(|_| ParseError::BadHost)?;
        let after = &rest[close + 1..];
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(ParseError::BadHost)?),
        };
        (Host::V6(ip), port)
    } else {
        let (h, p) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if h.is_empty() || !h.bytes().all(is_host_byte) {
            return Err(ParseError::BadHost);
        }
        (Host::Name(h), p)
    };
    let port = match port {
        None => None,
        Some("") => return Err(ParseError::MissingPort),
        Some(p) => Some(parse_port(p)?),
    };
    Ok(Authority { host, port })
}

fn parse_port(p: &str) -> Result<u16, ParseError> {
    if p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadPort);
    }
    match p.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(ParseError::BadPort),
    }
}

/// Bytes allowed in a host name as sent: RFC 3986 unreserved characters, plus UTF-8 so an
/// internationalised name reaches IDNA normalisation instead of failing here.
fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || b >= 0x80
}

fn parse_request_line(line: &[u8]) -> Result<(&str, &str, u8), ParseError> {
    let sp1 = line.iter().position(|&b| b == b' ').ok_or(ParseError::BadRequestLine)?;
    let method = &line[..sp1];
    let rest = &line[sp1 + 1..];
    let sp2 = rest.iter().position(|&b| b == b' ').ok_or(ParseError::BadRequestLine)?;
    let target = &rest[..sp2];
    let version = &rest[sp2 + 1..];
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(ParseError::BadMethod);
    }
    if target.is_empty() || !target.iter().all(|&b| b > 0x20 && b != 0x7f) {
        return Err(ParseError::BadRequestLine);
    }
    let version = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        _ => return Err(ParseError::BadVersion),
    };
    // Checked above: the method is ASCII; the target must be UTF-8 to be a &str.
    let method = std::str::from_utf8(method).map_err(|_| ParseError::BadMethod)?;
    let target = std::str::from_utf8(target).map_err(|_| ParseError::BadRequestLine)?;
    Ok((method, target, version))
}

/// Validates `name: value` and returns the name and the value without surrounding
/// whitespace.
fn split_header_line(line: &[u8]) -> Result<(&[u8], &[u8]), ParseError> {
    let colon = memchr::memchr(b':', line).ok_or(ParseError::BadHeader)?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(ParseError::BadHeader);
    }
    let value = &line[colon + 1..];
    // Branch-free over the value so the compiler can vectorise it: field values are the
    // bulk of a head.
    let mut bad = false;
    for &b in value {
        bad |= (b < 0x20 && b != b'\t') | (b == 0x7f);
    }
    if bad {
        return Err(ParseError::BadHeader);
    }
    Ok((name, trim_ows(value)))
}

/// Rejects early what no further bytes could make valid (a NUL in the request line of a
/// slow client), so a slowloris sending garbage is cut at once rather than at the timeout.
fn check_partial_line(part: &[u8]) -> Result<(), ParseError> {
    if part.iter().any(|&b| b == 0 || (b < 0x20 && b != b'\t' && b != b'\r')) {
        return Err(ParseError::BadRequestLine);
    }
    Ok(())
}

/// RFC 9110 `tchar`, as a table: one load per byte on the header-name path.
fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    t
};

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<Option<Request<'_>>, ParseError> {
        parse_request(s.as_bytes(), &Limits::default())
    }

    fn ok(s: &str) -> Request<'_> {
        match req(s) {
            Ok(Some(r)) => r,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn err(s: &str) -> ParseError {
        match req(s) {
            Err(e) => e,
            other => panic!("{s:?}: expected an error, got {other:?}"),
        }
    }

    #[test]
    fn connect_authority_form() {
        let s = "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n";
        let r = ok(s);
        assert_eq!(r.form, Form::Connect);
        assert_eq!(r.host, Host::Name("api.example.com"));
        assert_eq!(r.port, 443);
        assert_eq!(r.head.head_len, s.len());
        assert_eq!(r.head.header_count, 1);
        assert!(!r.host_mismatch());
        assert_eq!(r.proxy_authorization, None);
    }

    #[test]
    fn connect_bracketed_v6() {
        let r = ok("CONNECT [::ffff:127.0.0.1]:8443 HTTP/1.1\r\n\r\n");
        assert_eq!(r.host, Host::V6("::ffff:127.0.0.1".parse().unwrap()));
        assert_eq!(r.port, 8443);
        assert_eq!(r.host_header, None);
    }

    #[test]
    fn absolute_form_defaults_port_and_path() {
        let r = ok("GET http://Example.COM HTTP/1.1\r\nHost: example.com.\r\n\r\n");
        assert_eq!(r.form, Form::Absolute { path: "/" });
        assert_eq!(r.host, Host::Name("Example.COM"));
        assert_eq!(r.port, 80);
        assert!(!r.host_mismatch(), "case and trailing dot do not make a mismatch");
        let r = ok("POST HTTP://h:8080/a/b?c=d HTTP/1.0\r\n\r\n");
        assert_eq!(r.form, Form::Absolute { path: "/a/b?c=d" });
        assert_eq!(r.port, 8080);
        assert_eq!(r.head.version, 0);
        let r = ok("GET http://h?q HTTP/1.1\r\n\r\n");
        assert_eq!(r.form, Form::Absolute { path: "?q" });
    }

    #[test]
    fn host_mismatch_is_exposed() {
        assert!(ok("GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n").host_mismatch());
        assert!(ok("GET http://a.example/ HTTP/1.1\r\nHost: a.example:81\r\n\r\n").host_mismatch());
        assert!(
            !ok("GET http://a.example/ HTTP/1.1\r\nHost: a.example:80\r\n\r\n").host_mismatch()
        );
        assert!(ok("CONNECT a:443 HTTP/1.1\r\nHost: a:444\r\n\r\n").host_mismatch());
        assert!(ok("CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:444\r\n\r\n").host_mismatch());
        assert!(!ok("CONNECT [::1]:443 HTTP/1.1\r\nHost: [0::1]:443\r\n\r\n").host_mismatch());
    }

    #[test]
    fn headers_iterate_trimmed() {
        let r = ok("CONNECT a:1 HTTP/1.1\r\nX-A:  v1 \r\nProxy-Authorization: Basic dTpw\r\n\r\n");
        let hs: Vec<_> = r.head.headers().collect();
        assert_eq!(hs, vec![("X-A", &b"v1"[..]), ("Proxy-Authorization", &b"Basic dTpw"[..])]);
        assert_eq!(r.proxy_authorization, Some(&b"Basic dTpw"[..]));
    }

    #[test]
    fn every_prefix_needs_more() {
        let s = "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nUser-Agent: t\r\n\r\n";
        for n in 0..s.len() {
            assert_eq!(req(&s[..n]), Ok(None), "prefix {n}");
        }
        assert!(ok(s).head.head_len == s.len());
    }

    #[test]
    fn bytes_after_head_are_not_consumed() {
        let s = "CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01";
        assert_eq!(ok(s).head.head_len, s.len() - 3);
    }

    #[test]
    fn bad_ports() {
        assert_eq!(err("CONNECT a.example HTTP/1.1\r\n\r\n"), ParseError::MissingPort);
        assert_eq!(err("CONNECT a.example: HTTP/1.1\r\n\r\n"), ParseError::MissingPort);
        assert_eq!(err("CONNECT a.example:0 HTTP/1.1\r\n\r\n"), ParseError::BadPort);
        assert_eq!(err("CONNECT a.example:65536 HTTP/1.1\r\n\r\n"), ParseError::BadPort);
        assert_eq!(err("CONNECT a.example:99999999999 HTTP/1.1\r\n\r\n"), ParseError::BadPort);
        assert_eq!(err("CONNECT a.example:+80 HTTP/1.1\r\n\r\n"), ParseError::BadPort);
        assert_eq!(err("CONNECT [::1] HTTP/1.1\r\n\r\n"), ParseError::MissingPort);
        assert_eq!(ok("CONNECT a:65535 HTTP/1.1\r\n\r\n").port, 65535);
    }

    #[test]
    fn userinfo_and_bad_targets() {
        assert_eq!(err("GET http://u:p@a.example/ HTTP/1.1\r\n\r\n"), ParseError::Userinfo);
        assert_eq!(err("CONNECT u@a.example:443 HTTP/1.1\r\n\r\n"), ParseError::Userinfo);
        assert_eq!(err("GET /index.html HTTP/1.1\r\n\r\n"), ParseError::NotProxyForm);
        assert_eq!(err("OPTIONS * HTTP/1.1\r\n\r\n"), ParseError::NotProxyForm);
        assert_eq!(err("GET https://a.example/ HTTP/1.1\r\n\r\n"), ParseError::UnsupportedScheme);
        assert_eq!(err("CONNECT http://a:1/ HTTP/1.1\r\n\r\n"), ParseError::ConnectNotAuthority);
        assert_eq!(err("CONNECT /a HTTP/1.1\r\n\r\n"), ParseError::ConnectNotAuthority);
        assert_eq!(err("CONNECT a%2f:1 HTTP/1.1\r\n\r\n"), ParseError::BadHost);
        assert_eq!(err("CONNECT :443 HTTP/1.1\r\n\r\n"), ParseError::BadHost);
        assert_eq!(err("CONNECT [::1:443 HTTP/1.1\r\n\r\n"), ParseError::BadHost);
        assert_eq!(err("CONNECT [zz]:443 HTTP/1.1\r\n\r\n"), ParseError::BadHost);
        assert_eq!(err("CONNECT a:1 HTTP/2.0\r\n\r\n"), ParseError::BadVersion);
        assert_eq!(err("CONNECT a:1\r\n\r\n"), ParseError::BadRequestLine);
        assert_eq!(err("CONN(ECT a:1 HTTP/1.1\r\n\r\n"), ParseError::BadMethod);
    }

    #[test]
    fn limits_bite() {
        let long = format!("CONNECT {}:443 HTTP/1.1\r\n\r\n", "a".repeat(5000));
        assert_eq!(err(&long), ParseError::RequestLineTooLong);
        // Without its CRLF yet: refused as soon as the line passes the limit.
        assert_eq!(err(&long[..4200]), ParseError::RequestLineTooLong);

        let mut many = String::from("CONNECT a:1 HTTP/1.1\r\n");
        for i in 0..65 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(err(&many), ParseError::TooManyHeaders);

        let big = format!("CONNECT a:1 HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(9000));
        assert_eq!(err(&big), ParseError::HeadTooLarge);
        assert_eq!(err(&big[..8500]), ParseError::HeadTooLarge);

        let tight = Limits { max_head: 64, max_request_line: 32, max_headers: 1 };
        let s = b"CONNECT a:1 HTTP/1.1\r\nA: b\r\n\r\n";
        assert!(parse_request(s, &tight).unwrap().is_some());
        let s = b"CONNECT a:1 HTTP/1.1\r\nA: b\r\nC: d\r\n\r\n";
        assert_eq!(parse_request(s, &tight), Err(ParseError::TooManyHeaders));
    }

    #[test]
    fn framing_errors() {
        assert_eq!(err("CONNECT a:1 HTTP/1.1\r\nA: b\r\n c\r\n\r\n"), ParseError::ObsFold);
        assert_eq!(err("CONNECT a:1 HTTP/1.1\r\nA: b\r\n\tc"), ParseError::ObsFold);
        assert_eq!(err("CONNECT a:1 HTTP/1.1\nA: b\r\n\r\n"), ParseError::BareLf);
        assert_eq!(err("CONNECT a:1 HTTP/1.1\r\nA: b\n\r\n"), ParseError::BareLf);
        assert_eq!(err("CONNECT a:1 HTTP/1.1\r\nA b\r\n\r\n"), ParseError::BadHeader);
        assert_eq!(err("CONNECT a:1 HTTP/1.1\r\n: b\r\n\r\n"), ParseError::BadHeader);
        assert_eq!(err("CONNECT a:1 HTTP/1.1\r\nA: b\0c\r\n\r\n"), ParseError::BadHeader);
        assert_eq!(err("\r\nCONNECT a:1 HTTP/1.1\r\n\r\n"), ParseError::BadRequestLine);
        assert_eq!(err("CONN\0"), ParseError::BadRequestLine);
        assert_eq!(
            err("CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nHost: a:1\r\n\r\n"),
            ParseError::DuplicateHost
        );
        assert_eq!(err("CONNECT a:1 HTTP/1.1\r\nHost: a b\r\n\r\n"), ParseError::BadHostHeader);
    }

    #[test]
    fn origin_form_drops_proxy_and_hop_by_hop_headers() {
        let r = ok(
            "GET http://a.example:8080/x?y=1 HTTP/1.1\r\nHost: a.example:8080\r\nProxy-Authorization: Basic dTpw\r\nProxy-Connection: keep-alive\r\nConnection: X-Secret, keep-alive\r\nX-Secret: s\r\nKeep-Alive: 5\r\nAccept: */*\r\nContent-Length: 3\r\n\r\n",
        );
        let mut out = b"prefix".to_vec();
        let n = write_origin_form(&r, &mut out);
        let text = std::str::from_utf8(&out[6..]).unwrap();
        assert_eq!(n, text.len());
        assert_eq!(
            text,
            "GET /x?y=1 HTTP/1.1\r\nHost: a.example:8080\r\nAccept: */*\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        // The rewritten head is itself a valid request head (origin form).
        let head = parse_head(text.as_bytes(), &Limits::default()).unwrap().unwrap();
        assert_eq!((head.method, head.target, head.head_len), ("GET", "/x?y=1", text.len()));
        let q = ok("GET http://a.example?q HTTP/1.0\r\n\r\n");
        let mut out2 = Vec::new();
        write_origin_form(&q, &mut out2);
        assert!(out2.starts_with(b"GET /?q HTTP/1.0\r\n"), "{:?}", String::from_utf8_lossy(&out2));
        let c = ok("CONNECT a:1 HTTP/1.1\r\n\r\n");
        assert_eq!(write_origin_form(&c, &mut out), 0);
    }

    #[test]
    fn basic_proxy_credentials() {
        let mut buf = [0u8; 64];
        assert_eq!(
            basic_credentials(b"Basic dTpzZWNyZXQ=", &mut buf),
            Some((&b"u"[..], &b"secret"[..]))
        );
        assert_eq!(
            basic_credentials(b"basic  YmlsbGluZzpzM2NyZXQ6eA==", &mut buf),
            Some((&b"billing"[..], &b"s3cret:x"[..]))
        );
        assert_eq!(basic_credentials(b"Basic Og==", &mut buf), Some((&b""[..], &b""[..])));
        assert_eq!(basic_credentials(b"Bearer dTpw", &mut buf), None);
        assert_eq!(basic_credentials(b"Basic dXNlcg==", &mut buf), None, "no colon");
        assert_eq!(basic_credentials(b"Basic dTp*", &mut buf), None);
        assert_eq!(basic_credentials(b"Basic dTp", &mut buf), None);
        assert_eq!(basic_credentials(b"Basic d=pw", &mut buf), None, "padding only at the end");
        assert_eq!(
            basic_credentials(b"Basic dTpzZWNyZXQ=", &mut buf[..3]),
            None,
            "too long for out"
        );
        assert_eq!(basic_credentials(b"Basic", &mut buf), None);
    }

    #[test]
    fn utf8_hosts_reach_normalisation() {
        let r = ok("CONNECT bücher.example:443 HTTP/1.1\r\n\r\n");
        assert_eq!(r.host, Host::Name("bücher.example"));
        let raw = b"CONNECT \xff\xfe:443 HTTP/1.1\r\n\r\n";
        assert_eq!(parse_request(raw, &Limits::default()), Err(ParseError::BadRequestLine));
    }
}
