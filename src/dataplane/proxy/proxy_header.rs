//! Learning the real client of an accepted connection (or datagram) from the PROXY protocol
//! header a load balancer puts in front of it.
//!
//! Invariants:
//! - A header is believed only from a peer inside `trusted_proxies`; any other peer on a
//!   listener that expects a header is refused before a byte is read ([`HeaderError::Untrusted`]),
//!   so a client cannot claim an allowed address by writing its own header. An empty list
//!   trusts nobody (fail closed).
//! - A listener that expects a header refuses a connection without a valid one.
//! - Exactly the header is consumed, never a byte of the payload behind it: bytes are looked at
//!   with `MSG_PEEK` and only those that belong to the header are read. So there are never
//!   leftover bytes to forward; the splice starts on an untouched stream.
//! - The whole header must arrive within `proxy_protocol_timeout` (one deadline for the whole
//!   header, not per read), so a byte-at-a-time sender cannot hold a slot open.
//!
//! Parsing itself is [`crate::wire::proxy_protocol`]; this module is the I/O around it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use ipnet::IpNet;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::dataplane::{ListenerTag, Runtime};
use crate::flow::{ClientAddr, Proto};
use crate::telemetry::flowlog::Malformed;
use crate::telemetry::metrics::ListenerCounters;
use crate::wire::proxy_protocol::{
    self, Command, DEFAULT_MAX_HEADER_LEN, Header, MIN_MAX_HEADER_LEN, ParseError, Transport,
};

use crate::config::listener::MAX_MAX_HEADER_LEN;
pub use crate::config::listener::{DEFAULT_HEADER_TIMEOUT, ProxyHeaderConfig, ProxyProtocolMode};

impl ProxyHeaderConfig {
    /// The client of a new TCP connection ([`ProxyHeaderConfig::read`]), or `None`
    /// when its header is refused: the error is counted under its counter (on `tag`),
    /// logged as a `malformed` event when it is one ([`HeaderError::malformed`]), and the
    /// connection is set to close with a reset (SO_LINGER 0) when the caller drops it.
    pub async fn client(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        rt: &Runtime,
        tag: &ListenerTag,
    ) -> Option<SocketAddr> {
        match self.read(stream, peer).await {
            Ok(p) => Some(p.client.0),
            Err(e) => {
                ListenerCounters::inc(e.counter(&tag.counters));
                if let Some(why) = e.malformed() {
                    let local = super::listener::local_of(stream);
                    super::listener::log_malformed(rt, tag, Proto::Tcp, peer, local, why);
                }
                super::tcp::reset_on_drop(stream);
                None
            }
        }
    }

    /// [`read_header`] with this config's fields.
    ///
    /// The reader's state (its header buffer) is boxed, and only for a listener that
    /// expects a header: inline, it would make every connection's task of every listener
    /// a kilobyte larger, and tokio copies a task's future when it spawns it and again
    /// when it finishes.
    ///
    /// # Errors
    /// See [`read_header`].
    pub async fn read(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<ProxiedClient, HeaderError> {
        if self.proxy_protocol == ProxyProtocolMode::Off {
            return Ok(ProxiedClient { client: ClientAddr(peer), header: None });
        }
        Box::pin(read_header(
            stream,
            self.proxy_protocol,
            peer,
            &self.trusted_proxies,
            self.proxy_protocol_timeout,
            self.proxy_protocol_max_len,
        ))
        .await
    }

    /// [`parse_datagram`] with this config's fields.
    ///
    /// # Errors
    /// See [`parse_datagram`].
    pub fn datagram<'a>(
        &self,
        datagram: &'a [u8],
        peer: SocketAddr,
    ) -> Result<(ProxiedClient, &'a [u8]), HeaderError> {
        parse_datagram(
            datagram,
            self.proxy_protocol,
            peer,
            &self.trusted_proxies,
            self.proxy_protocol_max_len,
        )
    }
}

/// Who the client is, once the header (if any) has been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxiedClient {
    /// The address to decide and log with: the header's source for a PROXY header with
    /// addresses, otherwise (LOCAL, UNKNOWN, AF_UNSPEC, AF_UNIX, mode `off`) the TCP peer.
    pub client: ClientAddr,
    /// The header, when one was read.
    pub header: Option<Header>,
}

/// Why a connection was refused before its flow was decided. Every variant is counted
/// ([`HeaderError::counter`]); the connection is then closed.
#[derive(Debug, Error)]
pub enum HeaderError {
    /// The peer is not in `trusted_proxies`.
    #[error("PROXY header expected from {peer}, which is not in trusted_proxies")]
    Untrusted { peer: SocketAddr },
    /// Not a valid header of an accepted version (including: no header at all).
    #[error("malformed PROXY header: {0}")]
    Malformed(#[from] ParseError),
    /// A datagram shorter than the header it starts.
    #[error("datagram ends inside its PROXY header")]
    Truncated,
    /// A valid header for the wrong transport (a DGRAM header on a TCP connection, a STREAM
    /// header on a datagram).
    #[error("PROXY header declares a {declared:?} transport on a {actual:?} listener")]
    WrongTransport { declared: Transport, actual: Transport },
    /// The whole header did not arrive in time.
    #[error("PROXY header not complete within {0:?}")]
    Timeout(Duration),
    /// The peer closed before the header was complete.
    #[error("connection closed after {got} bytes of a PROXY header")]
    Closed { got: usize },
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

impl HeaderError {
    /// The listener counter this refusal increments: `untrusted_proxy`, `handshake_timeout`,
    /// or `handshake_malformed` for everything else.
    pub fn counter<'a>(&self, counters: &'a ListenerCounters) -> &'a AtomicU64 {
        match self {
            HeaderError::Untrusted { .. } => &counters.untrusted_proxy,
            HeaderError::Timeout(_) => &counters.handshake_timeout,
            _ => &counters.handshake_malformed,
        }
    }

    /// The `malformed` flow-log reason of this refusal: a header that does not parse,
    /// comes from an untrusted peer or names the wrong transport. `None` for a timeout, a
    /// peer that closed or an I/O error (counted, not logged).
    pub fn malformed(&self) -> Option<Malformed> {
        match self {
            HeaderError::Untrusted { .. } => Some(Malformed::ProxyUntrusted),
            HeaderError::Malformed(_) | HeaderError::Truncated => Some(Malformed::ProxyHeader),
            HeaderError::WrongTransport { .. } => Some(Malformed::ProxyTransport),
            HeaderError::Timeout(_) | HeaderError::Closed { .. } | HeaderError::Io(_) => None,
        }
    }
}

/// Whether `peer` may send a header. IPv4-mapped IPv6 peers (dual-stack listeners) are
/// compared as IPv4.
pub fn is_trusted(peer: SocketAddr, trusted: &[IpNet]) -> bool {
    let ip = peer.ip().to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// Size of the header buffer kept inside the connection's future; larger `max_len`s use a
/// heap buffer (one allocation per connection, sized by config, never by the peer).
const INLINE_BUF: usize = DEFAULT_MAX_HEADER_LEN;

/// Reads the PROXY header that `mode` requires from a freshly accepted connection and
/// returns the client to use for it.
///
/// `peer` is the TCP peer (the load balancer). With `mode` off this returns the peer at
/// once without I/O. Otherwise the peer must be inside `trusted`, and a complete, valid
/// header must arrive within `timeout` (for the whole header). Exactly the header's bytes
/// are consumed: the stream is positioned at the first payload byte. `max_len` bounds a v2
/// header and is clamped to 232..=65551.
///
/// # Errors
/// [`HeaderError`]; the caller counts it ([`HeaderError::counter`]) and closes the
/// connection without contacting an upstream.
pub async fn read_header(
    stream: &mut TcpStream,
    mode: ProxyProtocolMode,
    peer: SocketAddr,
    trusted: &[IpNet],
    timeout: Duration,
    max_len: usize,
) -> Result<ProxiedClient, HeaderError> {
    if mode == ProxyProtocolMode::Off {
        return Ok(ProxiedClient { client: ClientAddr(peer), header: None });
    }
    if !is_trusted(peer, trusted) {
        return Err(HeaderError::Untrusted { peer });
    }
    let max_len = max_len.clamp(MIN_MAX_HEADER_LEN, MAX_MAX_HEADER_LEN);
    let mut inline = [0u8; INLINE_BUF];
    let mut heap;
    let buf: &mut [u8] = if max_len <= INLINE_BUF {
        &mut inline[..max_len]
    } else {
        heap = vec![0u8; max_len];
        &mut heap
    };
    let header = tokio::time::timeout(timeout, consume_header(stream, mode, buf))
        .await
        .map_err(|_| HeaderError::Timeout(timeout))??;
    if header.transport == Transport::Datagram {
        return Err(HeaderError::WrongTransport {
            declared: Transport::Datagram,
            actual: Transport::Stream,
        });
    }
    Ok(ProxiedClient { client: client_of(&header, peer), header: Some(header) })
}

/// The header's source for a PROXY command with addresses; the peer otherwise.
fn client_of(header: &Header, peer: SocketAddr) -> ClientAddr {
    match (header.command, header.source()) {
        (Command::Proxy, Some(source)) => ClientAddr(source),
        _ => ClientAddr(peer),
    }
}

fn parse_for(
    mode: ProxyProtocolMode,
    bytes: &[u8],
    max_len: usize,
) -> Result<Option<(Header, usize)>, ParseError> {
    match mode {
        ProxyProtocolMode::V1 => proxy_protocol::parse_v1(bytes),
        ProxyProtocolMode::V2 => proxy_protocol::parse_v2(bytes, max_len),
        ProxyProtocolMode::Any | ProxyProtocolMode::Off => proxy_protocol::parse(bytes, max_len),
    }
}

/// Peeks, parses, and reads exactly the bytes that belong to the header.
///
/// The parser returns `Ok(None)` only while everything seen is a strict prefix of a valid
/// header, so every peeked byte of an incomplete header is a header byte and can be read
/// (consumed) at once; the next peek then waits for new data instead of spinning on the same
/// bytes. In the usual case (the whole header in the first segment) this is one peek and
/// one read.
async fn consume_header(
    stream: &mut TcpStream,
    mode: ProxyProtocolMode,
    buf: &mut [u8],
) -> Result<Header, HeaderError> {
    let max_len = buf.len();
    let mut have = 0;
    loop {
        let Some(window) = buf.get_mut(have..).filter(|w| !w.is_empty()) else {
            // Unreachable with a correct parser (it errs at max_len); fail closed anyway.
            return Err(HeaderError::Malformed(ParseError::V2TooLong {
                claimed: max_len + 1,
                max: max_len,
            }));
        };
        let got = stream.peek(window).await?;
        if got == 0 {
            return Err(HeaderError::Closed { got: have });
        }
        match parse_for(mode, &buf[..have + got], max_len)? {
            Some((header, len)) => {
                // `len > have`: the first `have` bytes alone were incomplete.
                if let Some(rest) = buf.get_mut(have..len) {
                    stream.read_exact(rest).await?;
                }
                return Ok(header);
            }
            None => {
                stream.read_exact(&mut buf[have..have + got]).await?;
                have += got;
            }
        }
    }
}

/// Reads the v2 header at the start of a datagram (a UDP load balancer prepends one to each)
/// and returns the client and the payload behind the header.
///
/// With `mode` off the whole datagram is payload and the peer is the client. Otherwise the
/// peer must be trusted and the datagram must start with a complete v2 header (v1 has no
/// datagram form) whose transport is DGRAM (or a LOCAL/UNSPEC one, which means the peer).
///
/// # Errors
/// [`HeaderError`]; the caller counts it and drops the datagram.
pub fn parse_datagram<'a>(
    datagram: &'a [u8],
    mode: ProxyProtocolMode,
    peer: SocketAddr,
    trusted: &[IpNet],
    max_len: usize,
) -> Result<(ProxiedClient, &'a [u8]), HeaderError> {
    if mode == ProxyProtocolMode::Off {
        return Ok((ProxiedClient { client: ClientAddr(peer), header: None }, datagram));
    }
    if !is_trusted(peer, trusted) {
        return Err(HeaderError::Untrusted { peer });
    }
    let max_len = max_len.clamp(MIN_MAX_HEADER_LEN, MAX_MAX_HEADER_LEN);
    let (header, len) =
        proxy_protocol::parse_v2(datagram, max_len)?.ok_or(HeaderError::Truncated)?;
    if header.transport == Transport::Stream {
        return Err(HeaderError::WrongTransport {
            declared: Transport::Stream,
            actual: Transport::Datagram,
        });
    }
    let payload = datagram.get(len..).unwrap_or_default();
    Ok((ProxiedClient { client: client_of(&header, peer), header: Some(header) }, payload))
}

#[cfg(test)]
mod tests;
