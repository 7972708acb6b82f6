//! The egress decision, independent of sockets: "client C asks for host H port P" → the
//! one address to dial, or a typed refusal the listener turns into its protocol's answer
//! and a flow-log `deny` event.
//!
//! The sequence, in one place so every listener gets it the same:
//! 1. the host is parsed and normalised ([`Target`]); a name that spells an address is
//!    that address;
//! 2. a name is resolved once, to every candidate address ([`Resolver`]); an address is
//!    its own single candidate;
//! 3. each candidate, in order, is made canonical (IPv4-mapped → IPv4), refused if it is
//!    one of flowgate's own listeners, checked by the SSRF guard, then by policy
//!    (`CompiledPolicy::decide` with the name as `fqdn`);
//! 4. the first candidate that passes everything is the address to dial — and the only
//!    one: the caller dials exactly [`Admitted::addr`], never resolving again, so a DNS
//!    answer that changes between check and connect (rebinding) cannot redirect the flow.
//!
//! Resolution (async) and choosing (sync, pure) are separate steps so the listener can
//! load the policy snapshot *after* the await and never hold it across one:
//! [`Checker::resolve`] then [`Checker::choose`]; [`Checker::check`] does both.

// `Refusal` and `Admitted` carry the name inline (no allocation per flow), which makes
// them a few hundred bytes: a copy that costs less than the allocation it replaces.
#![allow(clippy::result_large_err)]

use std::net::{IpAddr, SocketAddr};

use thiserror::Error;

use super::auth::Credentials;
use super::name::{DomainName, NameError, Target};
use super::resolve::{ResolveError, Resolver};
use super::ssrf::{Guard, SsrfRefusal};
use crate::flow::Proto;
use crate::policy::{CompiledPolicy, Decision, FlowQuery, WorkloadId};
use crate::wire::socks5::ReplyCode;

/// The candidates for one request: the normalised name (if any) and its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidates {
    pub fqdn: Option<DomainName>,
    pub addrs: std::sync::Arc<[IpAddr]>,
}

/// A request that may proceed: dial `addr`, log with `fqdn` and `decision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub addr: SocketAddr,
    pub fqdn: Option<DomainName>,
    pub decision: Decision,
}

/// Why a candidate address was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrRefusal {
    /// The SSRF guard matched a special range.
    Ssrf(SsrfRefusal),
    /// Policy denied the flow; the decision says who and why.
    Policy(Decision),
    /// The address and port are one of flowgate's own listeners (admin, proxy).
    OwnListener,
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
    /// Every candidate was refused; `first` is the first candidate and why (the one the
    /// flow log reports), `candidates` how many there were.
    #[error("{}: {}", first.0, describe(&first.1))]
    Denied { fqdn: Option<DomainName>, first: (SocketAddr, AddrRefusal), candidates: usize },
}

fn describe(r: &AddrRefusal) -> String {
    match r {
        AddrRefusal::Ssrf(s) => format!("ssrf guard: {s}"),
        AddrRefusal::Policy(d) => match d.verdict {
            crate::policy::Verdict::Deny(reason) => format!("policy: {}", reason.cause.as_str()),
            crate::policy::Verdict::Allow => "policy".to_owned(),
        },
        AddrRefusal::OwnListener => "flowgate's own listener".to_owned(),
    }
}

impl Refusal {
    /// The flow log's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadName(_) => "bad-name",
            Refusal::NoAddress { .. } => "no-address",
            Refusal::NameMismatch { .. } => "name-mismatch",
            Refusal::Resolve { error, .. } => error.as_str(),
            Refusal::Denied { first: (_, AddrRefusal::Ssrf(_)), .. } => "ssrf",
            Refusal::Denied { first: (_, AddrRefusal::OwnListener), .. } => "own-listener",
            Refusal::Denied { first: (_, AddrRefusal::Policy(d)), .. } => match d.verdict {
                crate::policy::Verdict::Deny(r) => r.cause.as_str(),
                crate::policy::Verdict::Allow => "policy",
            },
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

    /// Steps 3–4: the first candidate that passes, under `policy`. Pure: no I/O, no clock.
    ///
    /// # Errors
    /// [`Refusal::Denied`] when no candidate passes (or there are none).
    pub fn choose(
        &self,
        policy: &CompiledPolicy,
        client: IpAddr,
        cands: &Candidates,
        port: u16,
        proto: Proto,
    ) -> Result<Admitted, Refusal> {
        self.choose_as(policy, client, None, cands, port, proto)
    }

    /// [`Checker::choose`] with the source workload given (`Some`: proxy credentials
    /// named it) instead of looked up from `client`'s address.
    ///
    /// # Errors
    /// As [`Checker::choose`].
    pub fn choose_as(
        &self,
        policy: &CompiledPolicy,
        client: IpAddr,
        source: Option<WorkloadId>,
        cands: &Candidates,
        port: u16,
        proto: Proto,
    ) -> Result<Admitted, Refusal> {
        let fqdn = cands.fqdn.as_ref().map(DomainName::as_str);
        let mut first = None;
        for &raw in cands.addrs.iter() {
            let ip = raw.to_canonical();
            let addr = SocketAddr::new(ip, port);
            let refusal = if self.is_own(addr) {
                Some(AddrRefusal::OwnListener)
            } else if let Err(s) = self.guard.check(ip) {
                Some(AddrRefusal::Ssrf(s))
            } else {
                let q =
                    FlowQuery { src: client.to_canonical(), dst: ip, dst_port: port, proto, fqdn };
                let decision = match source {
                    Some(w) => policy.decide_as(&q, w),
                    None => policy.decide(&q),
                };
                if decision.verdict.is_allow() {
                    return Ok(Admitted { addr, fqdn: cands.fqdn, decision });
                }
                Some(AddrRefusal::Policy(decision))
            };
            if first.is_none() {
                first = refusal.map(|r| (addr, r));
            }
        }
        let Some(first) = first else {
            return Err(Refusal::NoAddress { fqdn: cands.fqdn });
        };
        Err(Refusal::Denied { fqdn: cands.fqdn, first, candidates: cands.addrs.len() })
    }

    /// The whole pipeline for a raw host as the client wrote it.
    ///
    /// The policy is borrowed across the resolution's await; a listener that holds its
    /// policy in an `ArcSwap` should call [`Checker::resolve`], load the snapshot, then
    /// [`Checker::choose`].
    ///
    /// # Errors
    /// [`Refusal`].
    pub async fn check(
        &self,
        policy: &CompiledPolicy,
        client: IpAddr,
        target: Target,
        port: u16,
        proto: Proto,
    ) -> Result<Admitted, Refusal> {
        let cands = self.resolve(target).await?;
        self.choose(policy, client, &cands, port, proto)
    }

    /// Transparent mode: the client dialled `orig_dst` itself (SO_ORIGINAL_DST) and its
    /// first bytes named `name` (TLS SNI or HTTP Host), if they named anything.
    ///
    /// With a name, `orig_dst` must be one of the addresses the name resolves to —
    /// otherwise an allowed SNI could carry a connection to any address (SNI spoofing) —
    /// and the flow is then decided for `orig_dst` with the name as `fqdn`. Without one it
    /// is decided on the address alone.
    ///
    /// # Errors
    /// [`Refusal`]; [`Refusal::NameMismatch`] when the name does not cover `orig_dst`.
    pub async fn check_transparent(
        &self,
        policy: &CompiledPolicy,
        client: IpAddr,
        orig_dst: SocketAddr,
        name: Option<&str>,
        proto: Proto,
    ) -> Result<Admitted, Refusal> {
        let cands = self.transparent_candidates(orig_dst, name).await?;
        self.choose(policy, client, &cands, orig_dst.port(), proto)
    }

    /// The resolving half of [`Checker::check_transparent`]: the single candidate
    /// `orig_dst` (with the name as `fqdn`), once the name is known to cover it. A listener
    /// that holds its policy in an `ArcSwap` awaits this, then loads the snapshot and
    /// calls [`Checker::choose`], so no snapshot is held across the resolution.
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
