//! What the egress (forward-proxy) listeners stand on, independent of sockets and of the
//! policy: destination names made canonical ([`name`]), the SSRF guard ([`ssrf`]), name
//! resolution that returns every candidate address once ([`resolve`]), the step that turns
//! "client X asks for name N port P" into the candidate addresses the gate decides among,
//! or a typed refusal ([`check`]), proxy credentials ([`auth`]), and the handshake drivers
//! that read a CONNECT or SOCKS5 request from any async stream under a size limit and a
//! timeout and answer errors in the protocol's own words ([`handshake`]).
//!
//! Not here: the decision (`dataplane::admit`); listeners, accept loops, dialling and flow
//! logging (`dataplane::proxy`, whose forward-proxy kinds use this); the byte formats
//! (`wire`); the policy itself (`policy`). Limits are counted by the caller: every
//! handshake error and refusal has a stable label (`HandshakeError::as_str`,
//! `Refusal::reason`) to count it under.
#![forbid(unsafe_code)]

pub mod auth;
pub mod check;
pub mod handshake;
pub mod name;
pub mod resolve;
pub mod ssrf;

pub use auth::{CredentialConfig, CredentialId, CredentialMode, Credentials};
pub use check::{AddrRefusal, Candidates, Checker, Refusal, SniVerdict, verify_sni};
pub use name::{DomainName, NameError, Target};
pub use resolve::{DnsConfig, ResolveError, Resolved, Resolver};
pub use ssrf::{Guard, SsrfConfig, SsrfRefusal};
