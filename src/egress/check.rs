//! Where a forward-proxy request may go, independent of sockets and of policy: "client C
//! asks for host H port P" → the candidate addresses the gate decides among
//! (`dataplane::admit`), or a typed refusal before any decision could apply, which the
//! listener turns into its protocol's answer and a flow-log `deny` event.
//!
//! The sequence, in one place so every listener gets it the same:
//! 1. the host is parsed and normalised ([`Target`]); a name that spells an address is
//!    that address;
//! 2. a name is resolved once, to every candidate address ([`Checker::resolve`]); an
//!    address is its own single candidate. In transparent mode the candidate is the
//!    address the client dialled, once the name its first bytes carried is known to
//!    resolve to it ([`Checker::transparent_candidates`]);
//! 3. the gate walks the candidates in order: each is made canonical (IPv4-mapped →
//!    IPv4), screened here ([`Checker::screen`]: one of flowgate's own listeners, the
//!    SSRF guard), then decided by policy with the name as `fqdn`;
//! 4. the first candidate that passes everything is the address to dial — and the only
//!    one: the caller dials exactly the admitted address, never resolving again, so a DNS
//!    answer that changes between check and connect (rebinding) cannot redirect the flow.
//!
//! Resolution (async) happens here, before the gate loads the policy snapshot, so no
//! snapshot is ever held across an await.

// `Refusal` carries the name inline (no allocation per flow), which makes it a few
// hundred bytes: a copy that costs less than the allocation it replaces.
#![allow(clippy::result_large_err)]

use std::net::{IpAddr, SocketAddr};

use thiserror::Error;

use super::auth::Credentials;
use super::name::{DomainName, NameError, Target};
use super::resolve::{ResolveError, Resolver};
use super::ssrf::{Guard, SsrfRefusal};
use crate::wire::socks5::ReplyCode;

/// The candidates for one request: the normalised name (if any) and its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidates {
    pub fqdn: Option<DomainName>,
    pub addrs: std::sync::Arc<[IpAddr]>,
}

/// Why a candidate address is refused before policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum AddrRefusal {
    /// The SSRF guard matched a special range.
    #[error("ssrf guard: {0}")]
    Ssrf(SsrfRefusal),
    /// The address and port are one of flowgate's own listeners (admin, proxy).
    #[error("flowgate's own listener")]
    OwnListener,
}

impl AddrRefusal {
    /// The flow log's `reason`.
    pub const fn reason(&self) -> &'static str {
        match self {
            AddrRefusal::Ssrf(_) => "ssrf",
            AddrRefusal::OwnListener => "own-listener",
        }
    }
}

/// A refused request. A value for the flow log and the protocol's answer, not a failure
/// of flowgate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("invalid destination name: {0}")]
    BadName(#[from] NameError),
    #[error("{fqdn}: {error}")]
    Resolve { fqdn: DomainName, error: ResolveError },
    /// Transparent mode: the name the client's first bytes carried (SNI or Host) does not
    /// resolve to the address it actually dialled — an allowed name used as cover.
    /// `fqdn` is `None` when the first bytes named an address other than the one dialled.
    #[error("the name in the first bytes does not resolve to {addr}")]
    NameMismatch { fqdn: Option<DomainName>, addr: SocketAddr },
    /// No candidate address at all (not produced by [`Resolver`], which never answers an
    /// empty list; kept so a hand-built [`Candidates`] fails closed).
    #[error("no candidate address")]
    NoAddress { fqdn: Option<DomainName> },
    /// The gate refused every candidate: `reason` is the first candidate's (a policy
    /// cause, `ssrf`, `own-listener`), as the flow log has it.
    #[error("refused: {reason}")]
    Denied { fqdn: Option<DomainName>, reason: &'static str },
}

impl Refusal {
    /// The flow log's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadName(_) => "bad-name",
            Refusal::NoAddress { .. } => "no-address",
            Refusal::NameMismatch { .. } => "name-mismatch",
            Refusal::Resolve { error, .. } => error.as_str(),
            Refusal::Denied { reason, .. } => reason,
        }
    }

    /// The name that was asked for, when there was one (the flow log's `fqdn`).
    pub fn fqdn(&self) -> Option<&DomainName> {
        match self {
            Refusal::BadName(_) => None,
            Refusal::Resolve { fqdn, .. } => Some(fqdn),
            Refusal::NameMismatch { fqdn, .. } => fqdn.as_ref(),
            Refusal::Denied { fqdn, .. } | Refusal::NoAddress { fqdn } => fqdn.as_ref(),
        }
    }

    /// The HTTP status a CONNECT / forward-proxy listener answers with: `400` for a name
    /// that cannot be a host, `403` for a refusal, `502` when the name does not resolve,
    /// `504` when resolution timed out.
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::BadName(_) => 400,
            Refusal::Resolve { error: ResolveError::Timeout, .. } => 504,
            Refusal::Resolve { .. } | Refusal::NoAddress { .. } => 502,
            Refusal::Denied { .. } | Refusal::NameMismatch { .. } => 403,
        }
    }

    /// The SOCKS5 reply: `0x02` not allowed by ruleset for every refusal by policy or
    /// guard, `0x04` host unreachable when the name is invalid or does not resolve.
    pub fn socks_reply(&self) -> ReplyCode {
        match self {
            Refusal::BadName(_) | Refusal::Resolve { .. } | Refusal::NoAddress { .. } => {
                ReplyCode::HostUnreachable
            }
            Refusal::Denied { .. } | Refusal::NameMismatch { .. } => ReplyCode::NotAllowed,
        }
    }
}

/// The pipeline's fixed parts: guard, resolver, and flowgate's own listening addresses.
#[derive(Clone, Debug)]
pub struct Checker {
    guard: Guard,
    resolver: Resolver,
    own: Vec<SocketAddr>,
    credentials: std::sync::Arc<Credentials>,
}

impl Checker {
    pub fn new(guard: Guard, resolver: Resolver) -> Checker {
        Checker { guard, resolver, own: Vec::new(), credentials: Default::default() }
    }

    /// The `[[credential]]` table the listeners check proxy credentials against.
    pub fn with_credentials(mut self, credentials: std::sync::Arc<Credentials>) -> Checker {
        self.credentials = credentials;
        self
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The table, shared (for a verifier that must own what it borrows).
    pub fn shared_credentials(&self) -> std::sync::Arc<Credentials> {
        self.credentials.clone()
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// flowgate's own listeners (admin and every proxy listener). The proxy never dials
    /// them, even when the guard is lifted for their addresses: a client must not reach
    /// the admin API or loop the proxy through itself. A listener bound to an unspecified
    /// address protects its port on every loopback and unspecified address.
    pub fn with_own_listeners(mut self, own: Vec<SocketAddr>) -> Checker {
        self.own = own;
        self
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// Steps 1–2: the target's candidates, resolving a name once.
    ///
    /// # Errors
    /// [`Refusal::Resolve`].
    pub async fn resolve(&self, target: Target) -> Result<Candidates, Refusal> {
        match target {
            Target::Addr(a) => Ok(Candidates { fqdn: None, addrs: std::sync::Arc::new([a]) }),
            Target::Name(n) => match self.resolver.resolve(&n).await {
                Ok(r) => Ok(Candidates { fqdn: Some(n), addrs: r.addrs }),
                Err(error) => Err(Refusal::Resolve { fqdn: n, error }),
            },
        }
    }

    /// Step 3's screen for one candidate (canonical already): flowgate's own listeners,
    /// then the SSRF guard. Pure: no I/O, no clock, no policy.
    ///
    /// # Errors
    /// [`AddrRefusal`].
    pub fn screen(&self, addr: SocketAddr) -> Result<(), AddrRefusal> {
        if self.is_own(addr) {
            return Err(AddrRefusal::OwnListener);
        }
        self.guard.check(addr.ip()).map_err(AddrRefusal::Ssrf)
    }

    /// Transparent mode: the client dialled `orig_dst` itself (SO_ORIGINAL_DST) and its
    /// first bytes named `name` (TLS SNI or HTTP Host), if they named anything.
    ///
    /// With a name, `orig_dst` must be one of the addresses the name resolves to —
    /// otherwise an allowed SNI could carry a connection to any address (SNI spoofing) —
    /// and the one candidate is then `orig_dst` with the name as `fqdn`. Without one it
    /// is `orig_dst` alone, decided on the address.
    ///
    /// # Errors
    /// [`Refusal::BadName`], [`Refusal::Resolve`], [`Refusal::NameMismatch`].
    pub async fn transparent_candidates(
        &self,
        orig_dst: SocketAddr,
        name: Option<&str>,
    ) -> Result<Candidates, Refusal> {
        let dst = orig_dst.ip().to_canonical();
        let single = std::sync::Arc::new([dst]);
        Ok(match name {
            None => Candidates { fqdn: None, addrs: single },
            Some(raw) => match Target::parse(raw)? {
                Target::Addr(a) if a.to_canonical() == dst => {
                    Candidates { fqdn: None, addrs: single }
                }
                Target::Addr(_) => {
                    return Err(Refusal::NameMismatch { fqdn: None, addr: orig_dst });
                }
                Target::Name(n) => {
                    let resolved = self.resolve(Target::Name(n)).await?;
                    if !resolved.addrs.iter().any(|a| a.to_canonical() == dst) {
                        return Err(Refusal::NameMismatch { fqdn: Some(n), addr: orig_dst });
                    }
                    Candidates { fqdn: Some(n), addrs: single }
                }
            },
        })
    }

    fn is_own(&self, dst: SocketAddr) -> bool {
        self.own.iter().any(|o| {
            o.port() == dst.port()
                && (o.ip().to_canonical() == dst.ip()
                    || (o.ip().is_unspecified()
                        && (dst.ip().is_loopback() || dst.ip().is_unspecified())))
        })
    }
}

/// What the first bytes inside a CONNECT tunnel say about where they are going, for
/// `verify_sni` (domain fronting): a TLS ClientHello must name the CONNECT host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SniVerdict {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// A ClientHello whose server_name is the CONNECT host.
    Agrees,
    /// A ClientHello that names another host (or any host, when CONNECT named an
    /// address), or whose name is not a valid host name: refuse.
    Disagrees,
    /// A ClientHello without server_name: the listener's `verify_sni` setting decides.
    NoSni,
    /// Not TLS at all: nothing to compare.
    NotTls,
    /// Broken or fragmented TLS: refuse (fail closed).
    Malformed,
}

/// Compares the SNI of the first bytes in a tunnel with the CONNECT target.
pub fn verify_sni(first_bytes: &[u8], target: &Target) -> SniVerdict {
    use crate::wire::sni::{MAX_RECORD, SniError, peek_client_hello};
    match peek_client_hello(first_bytes, MAX_RECORD) {
        Ok(None) => SniVerdict::NeedMore,
        Err(SniError::NotTls) => SniVerdict::NotTls,
        Err(_) => SniVerdict::Malformed,
        Ok(Some(h)) => match h.server_name {
            None => SniVerdict::NoSni,
            Some(sni) => match (Target::parse(sni), target) {
                (Ok(Target::Name(a)), Target::Name(b)) if a == *b => SniVerdict::Agrees,
                _ => SniVerdict::Disagrees,
            },
        },
    }
}

#[cfg(test)]
mod tests;
