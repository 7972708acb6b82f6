//! The proxy dataplane (tokio): listeners of kind tcp, udp, http-connect, socks5, transparent. (Stub: being built.)

pub mod proxy_header;
