//! The HTTP forward-proxy handshake: read one request head (CONNECT or absolute-form
//! `http://`), validate it, answer errors with a status line.
//!
//! Statuses: `400` malformed head, invalid host, Host mismatch (absolute form); `408`
//! handshake timeout; and, from the caller via
//! [`reply_refusal`], `403` refused, `502` name did not resolve or upstream failed, `504`
//! resolution or upstream timed out. Every error reply closes the connection.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{HandshakeError, HandshakeLimits, read_more};
use crate::egress::check::Refusal;
use crate::egress::name::Target;
use crate::wire::http_connect::{self, Form, Limits, ParseError};

/// A reply is small; a client that does not read it within this time is not waited for.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long and how much a refused client's remaining bytes are drained (see [`linger`]).
const LINGER_TIME: Duration = Duration::from_millis(200);
const LINGER_BYTES: usize = 64 * 1024;

/// Which request form arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestForm {
    /// Open a tunnel; answer [`reply_established`] after dialling. `buf[head_len..]`
    /// holds the tunnel's first bytes when the client sent them with the head (an
    /// optimistic client's TLS ClientHello): the caller forwards them once the tunnel is
    /// allowed, and drops them otherwise.
    Connect,
    /// Forward one request. The head is `buf[..head_len]` (re-parse it with
    /// [`http_connect::parse_request`] to rewrite it in origin form); `buf[head_len..]`
    /// holds body bytes already read.
    Absolute,
}

/// A validated request with its destination normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRequest {
    pub form: RequestForm,
    pub target: Target,
    pub port: u16,
    /// Length of the head in the caller's buffer.
    pub head_len: usize,
    /// `Proxy-Authorization`, when sent (for credential → workload mapping).
    pub proxy_authorization: Option<Vec<u8>>,
}

/// Reads and validates one request head into `buf` (cleared first).
///
/// # Errors
/// [`HandshakeError`]; the matching reply (400/408) has been written, except when the
/// client closed or the connection failed.
pub async fn read_request<S>(
    io: &mut S,
    limits: &HandshakeLimits,
    buf: &mut Vec<u8>,
) -> Result<ProxyRequest, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    buf.clear();
    let err = match tokio::time::timeout(limits.timeout, read_and_validate(io, &limits.head, buf))
        .await
    {
        Ok(Ok(req)) => return Ok(req),
        Ok(Err(e)) => e,
        Err(_) => HandshakeError::Timeout,
    };
    let status = match &err {
        HandshakeError::Timeout => Some(408),
        HandshakeError::Closed | HandshakeError::Io(_) => None,
        _ => Some(400),
    };
    if let Some(status) = status
        && reply_status(io, status, &err.to_string()).await.is_ok()
    {
        linger(io).await;
    }
    Err(err)
}

/// After an error reply to a client that may still be sending (a malformed head, or an
/// optimistic client's refused tunnel bytes): send FIN, then read and
/// discard briefly, so closing with unread data does not reset the connection and
/// destroy the reply before the client reads it. Bounded in time and bytes.
pub async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = io.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

async fn read_and_validate<S: AsyncRead + Unpin>(
    io: &mut S,
    limits: &Limits,
    buf: &mut Vec<u8>,
) -> Result<ProxyRequest, HandshakeError> {
    // One byte past the head limit lets the parser see that the limit was passed.
    let cap = limits.max_head + 1;
    loop {
        if let Some(r) = http_connect::parse_request(buf, limits).map_err(HandshakeError::Http)? {
            let head_len = r.head.head_len;
            let form = match r.form {
                Form::Connect => RequestForm::Connect,
                Form::Absolute { .. } if r.host_mismatch() => {
                    return Err(HandshakeError::HostMismatch);
                }
                Form::Absolute { .. } => RequestForm::Absolute,
            };
            let target = Target::from_http(r.host).map_err(HandshakeError::BadName)?;
            return Ok(ProxyRequest {
                form,
                target,
                port: r.port,
                head_len,
                proxy_authorization: r.proxy_authorization.map(<[u8]>::to_vec),
            });
        }
        if buf.len() >= cap {
            return Err(HandshakeError::Http(ParseError::HeadTooLarge));
        }
        if read_more(io, buf, cap).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

/// `200 Connection established`: the tunnel is open, bytes flow both ways from here.
///
/// # Errors
/// The write failed.
pub async fn reply_established<S: AsyncWrite + Unpin>(io: &mut S) -> std::io::Result<()> {
    write_bounded(io, b"HTTP/1.1 200 Connection established\r\n\r\n").await
}

/// The answer to a refusal from [`crate::egress::Checker`]: its status and reason.
///
/// # Errors
/// The write failed.
pub async fn reply_refusal<S: AsyncWrite + Unpin>(
    io: &mut S,
    refusal: &Refusal,
) -> std::io::Result<()> {
    // The short reason only: the full refusal names resolved addresses, which a client
    // probing the internal network must not learn. The flow log has the detail.
    reply_status(io, refusal.http_status(), &format!("refused: {}", refusal.reason())).await
}

/// An error status with a one-line plain-text body, then close.
///
/// # Errors
/// The write failed.
pub async fn reply_status<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: u16,
    reason: &str,
) -> std::io::Result<()> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    // The reason is ours (never echoes client bytes), single line, short.
    let body = format!("flowgate: {}\n", reason.replace(['\r', '\n'], " "));
    let auth = if status == 407 { "Proxy-Authenticate: Basic realm=\"flowgate\"\r\n" } else { "" };
    let msg = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        body.len()
    );
    write_bounded(io, msg.as_bytes()).await
}

async fn write_bounded<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(REPLY_TIMEOUT, async {
        io.write_all(bytes).await?;
        io.flush().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => {
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client did not read the reply"))
        }
    }
}
