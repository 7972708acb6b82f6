//! The simulator behind `flowgate explain` and `flowgate test`: turning what a user writes
//! (`payments/billing-fn`, `203.0.113.10`, `api.example.com`, `postgres`) into the
//! [`FlowQuery`] the engine answers, and reading connectivity case files.
//!
//! Endpoints: `namespace/workload` stands for the workload's first address
//! ([`CompiledPolicy::workload_addr`]); an IP address is itself; a domain name (only as a
//! destination) is queried as `0.0.0.0` with the name set, normalised (lower case, no
//! trailing dot), the way a forward-proxy listener asks before it has resolved anything.
//! A named port is resolved on the destination workload for the flow's protocol, so a
//! name that means 8443 on one workload and 9443 on another gives each its own number.
//!
//! Case files are rejected whole on any problem, each error naming the case (its `name`,
//! or `from→to:port`) and the field: a CI assertion that silently skips a case is worse
//! than none.
//!
//! Not here: the evaluation (`decide`/`explain`) and printing (`cli`).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use serde::Deserialize;
use serde_norway::Value;
use thiserror::Error;

use super::{CompiledPolicy, FlowQuery, WorkloadId, load};
use crate::flow::Proto;

/// One end of a simulated flow, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `namespace/name`.
    Workload {
        namespace: String,
        name: String,
    },
    Ip(IpAddr),
    /// A normalised domain name (destination only).
    Domain(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Workload { namespace, name } => write!(f, "{namespace}/{name}"),
            Endpoint::Ip(ip) => write!(f, "{ip}"),
            Endpoint::Domain(d) => f.write_str(d),
        }
    }
}

/// A destination port as written: a number, or a named port of the destination workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    Number(u16),
    Named(String),
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Number(n) => write!(f, "{n}"),
            PortSpec::Named(n) => f.write_str(n),
        }
    }
}

/// Why an endpoint, port or protocol cannot be turned into a flow.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SimulateError {
    #[error("{value:?} is not namespace/workload, an IP address{}", if *domain_ok { " or a domain name" } else { "" })]
    BadEndpoint { value: String, domain_ok: bool },
    #[error("no workload {0} in the inventory")]
    UnknownWorkload(String),
    #[error("workload {0} owns no address of its own")]
    NoAddress(String),
    #[error("port {0:?} is neither a number 1-65535 nor a port name")]
    BadPort(String),
    #[error("named port {name:?} needs a workload destination, and {dst} is not one")]
    NamedPortWithoutWorkload { name: String, dst: String },
    #[error("destination {dst} has no {proto} port named {name:?}")]
    UnknownNamedPort { name: String, dst: String, proto: Proto },
    #[error("unknown protocol {0:?} (TCP, UDP or SCTP)")]
    BadProtocol(String),
}

/// Parses `namespace/name`, an IP address, or (when `domain_ok`) a domain name.
///
/// # Errors
/// [`SimulateError::BadEndpoint`] for anything else.
pub fn parse_endpoint(s: &str, domain_ok: bool) -> Result<Endpoint, SimulateError> {
    let bad = || SimulateError::BadEndpoint { value: s.to_string(), domain_ok };
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Endpoint::Ip(ip));
    }
    if let Some((ns, name)) = s.split_once('/') {
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return Err(bad());
        }
        return Ok(Endpoint::Workload { namespace: ns.to_string(), name: name.to_string() });
    }
    if domain_ok && let Some(d) = normalise_domain(s) {
        return Ok(Endpoint::Domain(d));
    }
    Err(bad())
}

/// Lower case, trailing dot removed, and checked: labels of letters, digits and `-`,
/// 1-63 characters, not starting or ending with `-`, at most 253 characters in all.
/// `None` when the text is not a domain name.
pub fn normalise_domain(s: &str) -> Option<String> {
    let d = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    ok.then_some(d)
}

/// Parses a port as written: digits are a number (1-65535), anything else a port name
/// (Kubernetes' IANA_SVC_NAME: lower-case letters, digits and `-`, at most 15).
///
/// # Errors
/// [`SimulateError::BadPort`].
pub fn parse_port(s: &str) -> Result<PortSpec, SimulateError> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u16>() {
            Ok(n) if n > 0 => Ok(PortSpec::Number(n)),
            _ => Err(SimulateError::BadPort(s.to_string())),
        };
    }
    let name_ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase());
    if name_ok {
        Ok(PortSpec::Named(s.to_string()))
    } else {
        Err(SimulateError::BadPort(s.to_string()))
    }
}

/// `TCP`, `UDP` or `SCTP`, any case (a convenience for the command line and case files;
/// policy files themselves are strict, like the Kubernetes API).
///
/// # Errors
/// [`SimulateError::BadProtocol`].
pub fn parse_protocol(s: &str) -> Result<Proto, SimulateError> {
    Proto::from_k8s(&s.trim().to_ascii_uppercase())
        .ok_or_else(|| SimulateError::BadProtocol(s.to_string()))
}

/// A flow ready to ask about: owned, so it outlives the strings it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimFlow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub fqdn: Option<String>,
}

impl SimFlow {
    pub fn query(&self) -> FlowQuery<'_> {
        FlowQuery {
            src: self.src,
            dst: self.dst,
            dst_port: self.port,
            proto: self.proto,
            fqdn: self.fqdn.as_deref(),
        }
    }
}

/// Resolves both endpoints and the port against a compiled policy.
///
/// # Errors
/// An unknown workload, a workload without an address, a named port that the
/// destination does not have for `proto` (or a named port towards a non-workload).
pub fn resolve(
    policy: &CompiledPolicy,
    from: &Endpoint,
    to: &Endpoint,
    port: &PortSpec,
    proto: Proto,
) -> Result<SimFlow, SimulateError> {
    resolve_by(policy, |ns, name| policy.find_workload(ns, name), from, to, port, proto)
}

/// Resolves many flows against one compiled policy: `namespace/name` → workload through a
/// hash map built once (`flowgate test` resolves thousands of cases; the map makes a name
/// one hash lookup, see `benches/check_test.rs`). Gives exactly what [`resolve`] gives.
pub struct Resolver<'p> {
    policy: &'p CompiledPolicy,
    by_name: HashMap<(&'p str, &'p str), WorkloadId>,
}

impl<'p> Resolver<'p> {
    pub fn new(policy: &'p CompiledPolicy) -> Resolver<'p> {
        let count = policy.workload_count();
        let mut by_name = HashMap::with_capacity(count);
        for id in (0..count as u32).map(WorkloadId) {
            if let Some(n) = policy.workload_name(id) {
                // The lowest id of equal names, as `find_workload` finds.
                by_name.entry((n.namespace, n.name)).or_insert(id);
            }
        }
        Resolver { policy, by_name }
    }

    /// [`resolve`], through the name map.
    ///
    /// # Errors
    /// As [`resolve`].
    pub fn resolve(
        &self,
        from: &Endpoint,
        to: &Endpoint,
        port: &PortSpec,
        proto: Proto,
    ) -> Result<SimFlow, SimulateError> {
        let find = |ns: &str, name: &str| self.by_name.get(&(ns, name)).copied();
        resolve_by(self.policy, find, from, to, port, proto)
    }
}

/// [`resolve`] with the workload lookup by name given.
fn resolve_by(
    policy: &CompiledPolicy,
    find: impl Fn(&str, &str) -> Option<WorkloadId>,
    from: &Endpoint,
    to: &Endpoint,
    port: &PortSpec,
    proto: Proto,
) -> Result<SimFlow, SimulateError> {
    let (src, _) = address(policy, &find, from)?;
    let (dst, fqdn) = match to {
        Endpoint::Domain(d) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), Some(d.clone())),
        other => (address(policy, &find, other)?.0, None),
    };
    let port = match port {
        PortSpec::Number(n) => *n,
        PortSpec::Named(name) => {
            let Some(w) = policy.workload_of(dst).filter(|_| fqdn.is_none()) else {
                return Err(SimulateError::NamedPortWithoutWorkload {
                    name: name.clone(),
                    dst: to.to_string(),
                });
            };
            policy.named_port(w, name, proto).ok_or_else(|| SimulateError::UnknownNamedPort {
                name: name.clone(),
                dst: to.to_string(),
                proto,
            })?
        }
    };
    Ok(SimFlow { src, dst, port, proto, fqdn })
}

/// The address an endpoint stands for, and the workload behind a `ns/name`.
fn address(
    policy: &CompiledPolicy,
    find: &impl Fn(&str, &str) -> Option<WorkloadId>,
    e: &Endpoint,
) -> Result<(IpAddr, Option<WorkloadId>), SimulateError> {
    match e {
        Endpoint::Ip(ip) => Ok((*ip, policy.workload_of(*ip))),
        Endpoint::Workload { namespace, name } => {
            let id = find(namespace, name)
                .ok_or_else(|| SimulateError::UnknownWorkload(e.to_string()))?;
            let ip =
                policy.workload_addr(id).ok_or_else(|| SimulateError::NoAddress(e.to_string()))?;
            Ok((ip, Some(id)))
        }
        Endpoint::Domain(_) => {
            Err(SimulateError::BadEndpoint { value: e.to_string(), domain_ok: false })
        }
    }
}

/// What a case expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Allow,
    Deny,
}

impl Expect {
    pub const fn as_str(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
        }
    }
}

/// One connectivity assertion, parsed (endpoints not yet resolved: that needs a policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub name: Option<String>,
    pub from: Endpoint,
    pub to: Endpoint,
    pub port: PortSpec,
    pub protocol: Proto,
    pub expect: Expect,
}

impl Case {
    /// The case's name, or `from→to:port` when it has none.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("{}→{}:{}", self.from, self.to, self.port),
        }
    }

    /// Resolves the case against `policy`.
    ///
    /// # Errors
    /// As [`resolve`].
    pub fn flow(&self, policy: &CompiledPolicy) -> Result<SimFlow, SimulateError> {
        resolve(policy, &self.from, &self.to, &self.port, self.protocol)
    }

    /// [`Case::flow`], through a [`Resolver`] (for many cases).
    ///
    /// # Errors
    /// As [`resolve`].
    pub fn flow_in(&self, resolver: &Resolver<'_>) -> Result<SimFlow, SimulateError> {
        resolver.resolve(&self.from, &self.to, &self.port, self.protocol)
    }
}

/// A problem with one case (or the file as a whole, `case: None`).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{}{}{}: {message}", file.display(), case.as_ref().map(|c| format!(": case {c}")).unwrap_or_default(), field.as_ref().map(|f| format!(": {f}")).unwrap_or_default())]
pub struct CaseError {
    pub file: std::path::PathBuf,
    /// `#index (label)`.
    pub case: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

/// The file as written. Strict: an unknown key is a typo that would silently change a test.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cases: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: Option<String>,
    from: Value,
    to: Value,
    port: Value,
    protocol: Option<String>,
    expect: Value,
}

/// Reads a case file. All or nothing.
///
/// # Errors
/// Every problem found, each naming the file, the case and the field.
pub fn load_cases(path: &Path) -> Result<Vec<Case>, Vec<CaseError>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_cases(&text, path),
        Err(e) => Err(vec![CaseError {
            file: path.to_owned(),
            case: None,
            field: None,
            message: format!("cannot read: {e}"),
        }]),
    }
}

/// Parses case-file text; `file` is only used in messages.
///
/// # Errors
/// Every problem found, each naming the file, the case and the field.
pub fn parse_cases(text: &str, file: &Path) -> Result<Vec<Case>, Vec<CaseError>> {
    // The fast path: the file straight into typed cases (no `Value` per case; it was most
    // of a case's cost, see `benches/check_test.rs`). Any doubt or any bad case goes the
    // slow way below, which names every problem.
    if let Some(Some(file)) = load::strict::document::<FastFile>(text) {
        let cases: Result<Vec<Case>, _> = file.cases.into_iter().map(FastCase::case).collect();
        if let Ok(cases) = cases
            && !cases.is_empty()
        {
            return Ok(cases);
        }
    }
    let whole = |message: String| {
        vec![CaseError { file: file.to_owned(), case: None, field: None, message }]
    };
    let value: Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => return Err(whole(format!("malformed YAML: {e}"))),
    };
    let raw: RawFile = match serde_path_to_error::deserialize(value) {
        Ok(r) => r,
        Err(e) => {
            return Err(whole(format!("{} (expected `cases:` with a list of cases)", e.inner())));
        }
    };
    let mut errors = Vec::new();
    let mut cases = Vec::with_capacity(raw.cases.len());
    for (i, v) in raw.cases.iter().enumerate() {
        match parse_case(v, i) {
            Ok(c) => cases.push(c),
            Err((case, field, message)) => {
                errors.push(CaseError { file: file.to_owned(), case: Some(case), field, message });
            }
        }
    }
    if cases.is_empty() && errors.is_empty() {
        errors.extend(whole("no cases".into()));
    }
    if errors.is_empty() { Ok(cases) } else { Err(errors) }
}

type CaseFault = (String, Option<String>, String);

/// One case; on error, `(label, field, message)`. Read in place from the file's value
/// (no copy of it), and the label for messages is only made for a case in error.
fn parse_case(v: &Value, i: usize) -> Result<Case, CaseFault> {
    // Label for messages before the case is understood: its name or its position.
    let early = || {
        let name = v.get("name").and_then(Value::as_str);
        let from = v.get("from").map(scalar);
        let to = v.get("to").map(scalar);
        let port = v.get("port").map(scalar);
        match (name, from, to, port) {
            (Some(n), ..) => format!("#{} ({n})", i + 1),
            (None, Some(f), Some(t), Some(p)) => format!("#{} ({f}→{t}:{p})", i + 1),
            _ => format!("#{}", i + 1),
        }
    };
    let raw: RawCase = match serde_path_to_error::deserialize(v) {
        Ok(r) => r,
        Err(e) => {
            let path = e.path().to_string();
            let field = (path != ".").then_some(path);
            return Err((early(), field, e.into_inner().to_string()));
        }
    };
    let fields = CaseFields {
        from: &scalar(&raw.from),
        to: &scalar(&raw.to),
        port: &scalar(&raw.port),
        protocol: raw.protocol.as_deref(),
        expect: &scalar(&raw.expect),
    };
    fields.case(raw.name).map_err(|(field, message)| (early(), Some(field.to_string()), message))
}

/// A case's fields as text, before they are understood.
struct CaseFields<'a> {
    from: &'a str,
    to: &'a str,
    port: &'a str,
    protocol: Option<&'a str>,
    expect: &'a str,
}

impl CaseFields<'_> {
    /// The case; on error, `(field, message)`.
    fn case(&self, name: Option<String>) -> Result<Case, (&'static str, String)> {
        let from = parse_endpoint(self.from, false).map_err(|e| ("from", e.to_string()))?;
        let to = parse_endpoint(self.to, true).map_err(|e| ("to", e.to_string()))?;
        let port = parse_port(self.port).map_err(|e| ("port", e.to_string()))?;
        let protocol = match self.protocol {
            None => Proto::Tcp,
            Some(p) => parse_protocol(p).map_err(|e| ("protocol", e.to_string()))?,
        };
        let expect = match self.expect {
            "allow" => Expect::Allow,
            "deny" => Expect::Deny,
            other => return Err(("expect", format!("{other:?} is neither allow nor deny"))),
        };
        Ok(Case { name, from, to, port, protocol, expect })
    }
}

/// The case file on the fast path ([`load::strict`]): it accepts only what [`RawFile`]
/// and [`RawCase`] accept, with each scalar as [`scalar`] writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FastFile {
    cases: Vec<FastCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FastCase {
    name: Option<String>,
    from: Scalar,
    to: Scalar,
    port: Scalar,
    protocol: Option<String>,
    expect: Scalar,
}

impl FastCase {
    fn case(self) -> Result<Case, (&'static str, String)> {
        let fields = CaseFields {
            from: &self.from.0,
            to: &self.to.0,
            port: &self.port.0,
            protocol: self.protocol.as_deref(),
            expect: &self.expect.0,
        };
        fields.case(self.name)
    }
}

/// A string or an integer, as text (what [`scalar`] makes of them; other scalars are
/// left to the slow path).
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A YAML scalar as text (numbers included), for fields that take either.
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        _ => "<not a scalar>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_by_shape() {
        assert_eq!(parse_endpoint("10.0.0.1", true), Ok(Endpoint::Ip("10.0.0.1".parse().unwrap())));
        assert_eq!(
            parse_endpoint("2001:db8::1", false),
            Ok(Endpoint::Ip("2001:db8::1".parse().unwrap()))
        );
        assert_eq!(
            parse_endpoint("payments/billing-fn", false),
            Ok(Endpoint::Workload { namespace: "payments".into(), name: "billing-fn".into() })
        );
        // A domain: lower-cased, trailing dot dropped; only as a destination.
        assert_eq!(
            parse_endpoint("API.Example.COM.", true),
            Ok(Endpoint::Domain("api.example.com".into()))
        );
        assert!(parse_endpoint("api.example.com", false).is_err());
        for bad in ["", "a/b/c", "/x", "x/", "exa mple.com", "-a.com", "a..com", "*.example.com"] {
            assert!(parse_endpoint(bad, true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ports_are_numbers_or_names() {
        assert_eq!(parse_port("443"), Ok(PortSpec::Number(443)));
        assert_eq!(parse_port("postgres"), Ok(PortSpec::Named("postgres".into())));
        for bad in ["0", "65536", "", "Postgres", "a-very-long-port-name", "-1"] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_protocol("udp"), Ok(Proto::Udp));
        assert!(parse_protocol("ICMP").is_err());
    }

    #[test]
    fn case_errors_name_the_case_and_field() {
        let text = "cases:\n  - name: one\n    from: a/b\n    to: c/d\n    port: 80\n    expect: maybe\n  - from: a/b\n    to: c/d\n    port: 0\n    expect: deny\n  - name: three\n    from: a/b\n    to: c/d\n    port: 80\n    protocol: ICMP\n    expect: allow\n  - name: four\n    from: a/b\n    to: c/d\n    port: 80\n    expect: allow\n    extra: 1\n";
        let errs = parse_cases(text, Path::new("c.yaml")).unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:#?}");
        let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(msgs[0].starts_with("c.yaml: case #1 (one): expect:"), "{}", msgs[0]);
        assert!(msgs[1].contains("case #2 (a/b→c/d:0): port:"), "{}", msgs[1]);
        assert!(msgs[2].contains("case #3 (three): protocol:"), "{}", msgs[2]);
        assert!(msgs[3].contains("case #4 (four)") && msgs[3].contains("extra"), "{}", msgs[3]);
    }

    #[test]
    fn malformed_and_empty_files_are_errors() {
        assert!(parse_cases("cases: [", Path::new("c.yaml")).is_err());
        assert!(parse_cases("cases: []", Path::new("c.yaml")).is_err());
        assert!(parse_cases("- a\n- b\n", Path::new("c.yaml")).is_err());
        assert!(parse_cases("", Path::new("c.yaml")).is_err());
    }
}
