//! `[[listener]]`: binding one data port's socket. Its config types live in
//! [`crate::config::listener`].

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

pub use crate::config::{ListenerConfig, ListenerKind, ProxyProtocolMode};

impl ListenerConfig {
    /// The egress handshake limits, in the form the handshake drivers take.
    pub fn handshake_limits(&self) -> crate::egress::handshake::HandshakeLimits {
        crate::egress::handshake::HandshakeLimits {
            head: crate::wire::http_connect::Limits {
                max_head: self.max_header_bytes,
                max_request_line: self.max_request_line,
                max_headers: self.max_headers,
            },
            timeout: self.handshake_timeout,
        }
    }
}

/// Makes the listening socket: SO_REUSEADDR, optionally SO_REUSEPORT, non-blocking; for
/// TCP also TCP_NODELAY, which Linux copies to every connection accepted from it (the relays
/// forward what they read at once), so no connection needs its own `setsockopt`.
pub(crate) fn bind_socket(
    addr: SocketAddr,
    ty: Type,
    reuse_port: bool,
    backlog: Option<u32>,
) -> io::Result<Socket> {
    let proto = if ty == Type::STREAM { Protocol::TCP } else { Protocol::UDP };
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    sock.set_nonblocking(true)?;
    if ty == Type::STREAM {
        sock.set_tcp_nodelay(true)?;
    }
    sock.bind(&addr.into())?;
    if let Some(backlog) = backlog {
        sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relays rely on it: no connection sets TCP_NODELAY itself.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let sock = bind_socket(addr, Type::STREAM, false, Some(16)).unwrap();
        let listener = tokio::net::TcpListener::from_std(sock.into()).unwrap();
        let to = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(to).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "an accepted connection must have TCP_NODELAY");
    }
}
