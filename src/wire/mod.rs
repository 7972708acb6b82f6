//! Untrusted bytes from the network, parsed without copying.
//!
//! Safety contract for every parser here: input is arbitrary bytes from an untrusted
//! peer. A parser checks lengths before it reads, never panics, never allocates in
//! proportion to what the peer claims, and keeps *need more bytes* (`Ok(None)`) apart
//! from *malformed* (`Err`). Parsers do no I/O and read no clock; the dataplanes drive them.
#![forbid(unsafe_code)]

pub mod http_connect;
pub mod proxy_protocol;
pub mod sni;
pub mod socks5;
