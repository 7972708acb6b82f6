//! Handshake drivers: read a forward-proxy request from a client stream under a size
//! limit and one whole-handshake timeout, and answer malformed or refused requests in
//! the protocol's own words. Generic over `AsyncRead + AsyncWrite + Unpin`, so the
//! listeners hand in a `TcpStream` and tests can hand in anything.
//!
//! The drivers own no sockets and make no decisions: they return the parsed request
//! (target already normalised into a [`Target`]) and the caller runs
//! [`crate::egress::Checker`] on it, then answers with [`http::reply_established`] /
//! [`http::reply_refusal`] or [`socks5::reply`]. When a driver returns `Err` it has
//! already written the error reply (best effort) and the caller just closes.

pub mod http;
pub mod socks5;

use std::io;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::name::NameError;
use crate::wire;

/// Bounds on one handshake. Defaults from issue 7; every field is a listener knob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Request head limits (header bytes 8 KiB, request line, header count).
    pub head: wire::http_connect::Limits,
    /// The whole handshake, first byte to parsed request. Default 10 s.
    pub timeout: Duration,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            head: wire::http_connect::Limits::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a handshake ended without a request. Each variant is a counter label
/// ([`HandshakeError::as_str`]).
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("handshake timed out")]
    Timeout,
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("i/o error during the handshake: {0}")]
    Io(#[from] io::Error),
    #[error("malformed HTTP request: {0}")]
    Http(wire::http_connect::ParseError),
    #[error("Host header names another host than the request target")]
    HostMismatch,
    #[error("invalid destination: {0}")]
    BadName(NameError),
    #[error("malformed SOCKS5 message: {0}")]
    Socks(wire::socks5::ParseError),
    #[error("no acceptable SOCKS5 authentication method offered")]
    NoAcceptableMethod,
    #[error("proxy credentials refused")]
    AuthFailed,
    #[error("SOCKS5 command {0:#04x} not supported")]
    CommandNotSupported(u8),
}

impl HandshakeError {
    /// A stable label for counters and the flow log.
    pub fn as_str(&self) -> &'static str {
        use wire::http_connect::ParseError as P;
        match self {
            HandshakeError::Timeout => "timeout",
            HandshakeError::Closed => "closed",
            HandshakeError::Io(_) => "io",
            HandshakeError::Http(P::HeadTooLarge | P::RequestLineTooLong) => "too-large",
            HandshakeError::Http(P::TooManyHeaders) => "too-many-headers",
            HandshakeError::Http(_) => "malformed",
            HandshakeError::HostMismatch => "host-mismatch",
            HandshakeError::BadName(_) => "bad-name",
            HandshakeError::Socks(_) => "malformed",
            HandshakeError::NoAcceptableMethod => "no-acceptable-method",
            HandshakeError::AuthFailed => "auth-failed",
            HandshakeError::CommandNotSupported(_) => "command-not-supported",
        }
    }
}

/// Reads more bytes into `buf`, never beyond `cap` bytes in total. `Ok(0)` only at EOF.
async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<usize> {
    let room = cap.saturating_sub(buf.len());
    if room == 0 {
        // The parser refuses before this: a full buffer is always a verdict. Guard anyway.
        return Err(io::Error::new(io::ErrorKind::InvalidData, "handshake buffer full"));
    }
    let start = buf.len();
    buf.resize(start + room.min(4096), 0);
    let n = match io.read(&mut buf[start..]).await {
        Ok(n) => n,
        Err(e) => {
            buf.truncate(start);
            return Err(e);
        }
    };
    buf.truncate(start + n);
    Ok(n)
}
