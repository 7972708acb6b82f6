//! The SOCKS5 handshake: greeting and method selection, optional RFC 1929
//! username/password, then the request; answered in SOCKS's own codes.
//!
//! Replies written here: method `0xff` when no offered method is acceptable, auth status
//! `0x01` for refused credentials, `0x07` for a command other than CONNECT and UDP
//! ASSOCIATE, `0x08` for an unknown address type, `0x04` for a domain that cannot be a
//! host name, `0x01` for any other malformed request. A handshake that times out is
//! closed without a reply (the client may be mid-message).

use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{HandshakeError, HandshakeLimits, read_more};
use crate::egress::name::Target;
use crate::wire::socks5::{
    self, Command, Greeting, MAX_REPLY_LEN, ParseError, ReplyCode, UserPass, auth_reply,
    encode_reply, method, method_selection,
};

/// Greeting (2 + 255), auth (3 + 255 + 255) and request (7 + 255) each fit in this.
const MAX_MESSAGE: usize = 600;

/// Checks a username and password; `Some(identity)` accepts.
pub type VerifyFn<Id> = dyn Fn(&[u8], &[u8]) -> Option<Id> + Send + Sync;

/// How clients may authenticate.
pub struct AuthPolicy<'a, Id> {
    /// Accept clients that offer no authentication (identity from the source address).
    pub allow_no_auth: bool,
    /// Verifies username/password and names who it is; `None` refuses. Absent: the
    /// username/password method is not offered.
    pub verify: Option<&'a VerifyFn<Id>>,
}

/// A validated SOCKS5 request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocksRequest<Id> {
    /// [`Command::Connect`] or [`Command::UdpAssociate`].
    pub command: Command,
    pub target: Target,
    pub port: u16,
    /// Who the credentials named, when username/password was used.
    pub identity: Option<Id>,
    /// Bytes the client sent after the request without waiting for the reply (optimistic
    /// data); the caller forwards them once connected, or drops them on refusal.
    pub early: Vec<u8>,
}

/// Runs the handshake up to the request.
///
/// # Errors
/// [`HandshakeError`]; the protocol's reply has been written where it has one.
pub async fn read_request<S, Id>(
    io: &mut S,
    limits: &HandshakeLimits,
    auth: &AuthPolicy<'_, Id>,
) -> Result<SocksRequest<Id>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(limits.timeout, run(io, auth)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout),
    }
}

async fn run<S, Id>(
    io: &mut S,
    auth: &AuthPolicy<'_, Id>,
) -> Result<SocksRequest<Id>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(MAX_MESSAGE);

    // Greeting.
    let (chosen, used) = loop {
        match Greeting::parse(&buf) {
            Ok(Some((g, n))) => {
                let m = if auth.verify.is_some() && g.offers(method::USER_PASS) {
                    method::USER_PASS
                } else if auth.allow_no_auth && g.offers(method::NO_AUTH) {
                    method::NO_AUTH
                } else {
                    method::NO_ACCEPTABLE
                };
                break (m, n);
            }
            Ok(None) => fill(io, &mut buf).await?,
            Err(e) => {
                if e == ParseError::NoMethods {
                    let _ = io.write_all(&method_selection(method::NO_ACCEPTABLE)).await;
                }
                return Err(HandshakeError::Socks(e));
            }
        }
    };
    buf.drain(..used);
    io.write_all(&method_selection(chosen)).await?;
    if chosen == method::NO_ACCEPTABLE {
        return Err(HandshakeError::NoAcceptableMethod);
    }

    // Username/password.
    let mut identity = None;
    if chosen == method::USER_PASS {
        let (id, used) = loop {
            match UserPass::parse(&buf) {
                Ok(Some((up, n))) => {
                    let verify = auth.verify.ok_or(HandshakeError::AuthFailed)?;
                    break (verify(up.username, up.password), n);
                }
                Ok(None) => fill(io, &mut buf).await?,
                Err(e) => {
                    let _ = io.write_all(&auth_reply(false)).await;
                    return Err(HandshakeError::Socks(e));
                }
            }
        };
        buf.drain(..used);
        io.write_all(&auth_reply(id.is_some())).await?;
        match id {
            Some(id) => identity = Some(id),
            None => return Err(HandshakeError::AuthFailed),
        }
    }

    // Request.
    loop {
        match socks5::Request::parse(&buf) {
            Ok(Some((r, n))) => {
                if !matches!(r.command, Command::Connect | Command::UdpAssociate) {
                    let _ = reply(io, ReplyCode::CommandNotSupported, None).await;
                    return Err(HandshakeError::CommandNotSupported(r.command.to_u8()));
                }
                let target = match Target::from_socks(r.addr) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = reply(io, ReplyCode::HostUnreachable, None).await;
                        return Err(HandshakeError::BadName(e));
                    }
                };
                return Ok(SocksRequest {
                    command: r.command,
                    target,
                    port: r.port,
                    identity,
                    early: buf[n..].to_vec(),
                });
            }
            Ok(None) => fill(io, &mut buf).await?,
            Err(e) => {
                let code = match e {
                    ParseError::AddrTypeNotSupported(_) => ReplyCode::AddrTypeNotSupported,
                    _ => ReplyCode::GeneralFailure,
                };
                let _ = reply(io, code, None).await;
                return Err(HandshakeError::Socks(e));
            }
        }
    }
}

async fn fill<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> Result<(), HandshakeError> {
    if read_more(io, buf, MAX_MESSAGE).await? == 0 {
        return Err(HandshakeError::Closed);
    }
    Ok(())
}

/// Writes a reply; `bind` is the address flowgate dialled from (CONNECT) or the relay
/// address (UDP ASSOCIATE); error replies carry `0.0.0.0:0`.
///
/// # Errors
/// The write failed.
pub async fn reply<S: AsyncWrite + Unpin>(
    io: &mut S,
    code: ReplyCode,
    bind: Option<SocketAddr>,
) -> std::io::Result<()> {
    let mut out = [0u8; MAX_REPLY_LEN];
    let bind = bind.unwrap_or(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
    let n = encode_reply(code, bind, &mut out)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    io.write_all(&out[..n]).await?;
    io.flush().await
}
