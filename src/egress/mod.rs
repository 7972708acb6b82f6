//! What the egress (forward-proxy) listeners stand on, independent of sockets: destination
//! names made canonical ([`name`]), the SSRF guard ([`ssrf`]), name resolution that
//! returns every candidate address once ([`resolve`]), and the decision pipeline that
//! turns "client X asks for name N port P" into the one address to dial or a typed
//! refusal ([`check`]); and the handshake drivers that read a CONNECT or SOCKS5 request
//! from any async stream under a size limit and a timeout and answer errors in the
//! protocol's own words ([`handshake`]).
//!
//! Not here: listeners, accept loops, dialling and flow logging (`dataplane::proxy`), the
//! byte formats (`wire`), the policy itself (`policy`). Limits are counted by the caller:
//! every handshake error and refusal has a stable label (`HandshakeError::as_str`,
//! `Refusal::reason`) to count it under.
#![forbid(unsafe_code)]

pub mod auth;
pub mod check;
pub mod handshake;
pub mod name;
pub mod resolve;
pub mod ssrf;

pub use auth::{CredentialConfig, CredentialId, CredentialMode, Credentials};
pub use check::{AddrRefusal, Admitted, Candidates, Checker, Refusal, SniVerdict, verify_sni};
pub use name::{DomainName, NameError, Target};
pub use resolve::{DnsConfig, ResolveError, Resolved, Resolver};
pub use ssrf::{Guard, SsrfConfig, SsrfRefusal};
