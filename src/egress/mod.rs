//! What the egress (forward-proxy) listeners stand on, independent of sockets: destination
//! names made canonical ([`name`]), the SSRF guard ([`ssrf`]), name resolution that
//! returns every candidate address once ([`resolve`]), and the decision pipeline that
//! turns "client X asks for name N port P" into the one address to dial or a typed
//! refusal ([`check`]).
//!
//! Not here: sockets, accept loops and flow logging (`dataplane::proxy`), the byte
//! formats (`wire`), the policy itself (`policy`).

pub mod check;
pub mod handshake;
pub mod name;
pub mod resolve;
pub mod ssrf;

pub use check::{AddrRefusal, Admitted, Candidates, Checker, Refusal, SniVerdict, verify_sni};
pub use name::{DomainName, NameError, Target};
pub use resolve::{DnsConfig, ResolveError, Resolved, Resolver};
pub use ssrf::{Guard, SsrfConfig, SsrfRefusal};
