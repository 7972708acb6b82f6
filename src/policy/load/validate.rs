//! Kubernetes' validation rules for values that appear in many places: names, label
//! keys and values, label selectors, CIDRs, protocols, port numbers and port names.
//! Each check reports through [`Report`] with the field path it was given and returns
//! `None` when the value is unusable, so callers can keep going and find more errors.

use std::collections::BTreeMap;
use std::str::FromStr;

use ipnet::IpNet;

use super::Report;
use super::k8s;
use crate::flow::Proto;
use crate::policy::ir::{LabelSelector, Labels, Requirement, SelectorOp};

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters: namespace names, label-name
/// parts of DNS subdomains.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Dot-separated DNS labels, at most 253 characters: object names, label-key prefixes.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The name part of a label key or a label value: at most 63 characters,
/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`.
fn is_qualified_name_part(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// A label key: `[prefix/]name`, prefix a DNS subdomain.
pub fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns_subdomain(p)
    {
        return Some(format!("label key {key:?}: prefix must be a DNS subdomain"));
    }
    if !is_qualified_name_part(name) {
        return Some(format!(
            "label key {key:?}: name must be 1-63 characters of [A-Za-z0-9-_.], \
             starting and ending with a letter or digit"
        ));
    }
    None
}

/// A label value: empty, or as the name part of a key.
pub fn label_value_problem(value: &str) -> Option<String> {
    if value.is_empty() || is_qualified_name_part(value) {
        None
    } else {
        Some(format!(
            "label value {value:?}: must be at most 63 characters of [A-Za-z0-9-_.], \
             starting and ending with a letter or digit"
        ))
    }
}

/// Validates a label map (`path` is e.g. `metadata.labels`).
pub fn labels(r: &mut Report<'_>, path: &str, map: Option<&BTreeMap<String, String>>) -> Labels {
    let mut out = Labels::new();
    for (k, v) in map.into_iter().flatten() {
        let field = format!("{path}.{k}");
        if let Some(p) = label_key_problem(k) {
            r.error(&field, p);
        }
        if let Some(p) = label_value_problem(v) {
            r.error(&field, p);
        }
        out.insert(k.clone(), v.clone());
    }
    out
}

/// `metav1.LabelSelector` → IR, with Kubernetes' operator rules: `In`/`NotIn` need
/// values, `Exists`/`DoesNotExist` must have none.
pub fn selector(r: &mut Report<'_>, path: &str, sel: &k8s::LabelSelector) -> LabelSelector {
    let match_labels = labels(r, &format!("{path}.matchLabels"), sel.match_labels.as_ref());
    let mut match_expressions = Vec::new();
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if let Some(problem) = label_key_problem(&req.key) {
            r.error(&format!("{p}.key"), problem);
        }
        let values = req.values.clone().unwrap_or_default();
        let op = match req.operator.as_str() {
            "In" => Some(SelectorOp::In),
            "NotIn" => Some(SelectorOp::NotIn),
            "Exists" => Some(SelectorOp::Exists),
            "DoesNotExist" => Some(SelectorOp::DoesNotExist),
            other => {
                r.error(
                    &format!("{p}.operator"),
                    format!(
                        "unknown selector operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                    ),
                );
                None
            }
        };
        match op {
            Some(SelectorOp::In | SelectorOp::NotIn) if values.is_empty() => {
                r.error(
                    &format!("{p}.values"),
                    format!("operator {} needs at least one value", req.operator),
                );
            }
            Some(SelectorOp::Exists | SelectorOp::DoesNotExist) if !values.is_empty() => {
                r.error(
                    &format!("{p}.values"),
                    format!("operator {} takes no values", req.operator),
                );
            }
            _ => {}
        }
        for (j, v) in values.iter().enumerate() {
            if let Some(problem) = label_value_problem(v) {
                r.error(&format!("{p}.values[{j}]"), problem);
            }
        }
        if let Some(op) = op {
            match_expressions.push(Requirement { key: req.key.clone(), op, values });
        }
    }
    LabelSelector { match_labels, match_expressions }
}

/// A CIDR in `a.b.c.d/n` or `x::/n` form with no host bits set, as Kubernetes'
/// ipBlock validation requires (`10.0.0.1/8` is a typo for something, so it is refused
/// rather than silently widened or narrowed).
pub fn cidr(r: &mut Report<'_>, path: &str, text: &str) -> Option<IpNet> {
    if !text.contains('/') {
        r.error(path, format!("{text:?} is not a CIDR (expected e.g. 10.0.0.0/24 or fd00::/64)"));
        return None;
    }
    network(r, path, text)
}

/// An address or a CIDR; a bare address becomes a /32 or /128 (inventory `ips`).
pub fn addr_or_cidr(r: &mut Report<'_>, path: &str, text: &str) -> Option<IpNet> {
    if text.contains('/') {
        network(r, path, text)
    } else {
        match std::net::IpAddr::from_str(text) {
            Ok(ip) => Some(IpNet::from(ip)),
            Err(_) => {
                r.error(path, format!("{text:?} is not an IP address or CIDR"));
                None
            }
        }
    }
}

fn network(r: &mut Report<'_>, path: &str, text: &str) -> Option<IpNet> {
    match IpNet::from_str(text) {
        Ok(net) if net.trunc() != net => {
            r.error(path, format!("{text:?} has host bits set (did you mean {}?)", net.trunc()));
            None
        }
        Ok(net) => Some(net),
        Err(_) => {
            r.error(path, format!("{text:?} is not a valid CIDR"));
            None
        }
    }
}

/// `TCP` (the default when absent), `UDP` or `SCTP`, case-sensitive like the API.
///
/// The default is the API server's, for every kind whose port carries a protocol:
/// - NetworkPolicy `ports[].protocol`: `SetDefaults_NetworkPolicyPort` (kubernetes
///   `pkg/apis/networking/v1/defaults.go`: "Default any undefined Protocol fields to
///   TCP", `if obj.Protocol == nil { proto := v1.ProtocolTCP ... }`);
/// - AdminNetworkPolicy / BaselineAdminNetworkPolicy `ports[].portNumber.protocol` and
///   `ports[].portRange.protocol`: `+kubebuilder:default=TCP` on `Port.Protocol` and
///   `PortRange.Protocol` (kubernetes-sigs/network-policy-api
///   `apis/v1alpha1/shared_types.go`), which the CRD's structural schema applies.
///
/// ClusterNetworkPolicy names the protocol by key (`tcp:`/`udp:`/`sctp:`) and has none
/// to default.
pub fn protocol(r: &mut Report<'_>, path: &str, text: Option<&str>) -> Option<Proto> {
    match text {
        None => Some(Proto::Tcp),
        Some(t) => Proto::from_k8s(t).or_else(|| {
            r.error(path, format!("unknown protocol {t:?} (expected TCP, UDP or SCTP)"));
            None
        }),
    }
}

/// A port number, 1–65535 (Kubernetes rejects 0).
pub fn port_number(r: &mut Report<'_>, path: &str, n: i64) -> Option<u16> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            r.error(path, format!("port {n} is out of range 1-65535"));
            None
        }
    }
}

/// An IANA service name, as container port names must be: at most 15 characters of
/// `[a-z0-9-]`, at least one letter, no leading, trailing or double hyphen.
pub fn port_name(r: &mut Report<'_>, path: &str, name: &str) -> bool {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if !ok {
        r.error(
            path,
            format!(
                "{name:?} is not a valid port name (1-15 characters of [a-z0-9-] with at \
                 least one letter, no leading, trailing or double hyphen)"
            ),
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_follow_kubernetes_rules() {
        assert!(label_key_problem("app").is_none());
        assert!(label_key_problem("kubernetes.io/metadata.name").is_none());
        assert!(label_key_problem("flowgate.dev/quarantine").is_none());
        assert!(label_key_problem("").is_some());
        assert!(label_key_problem("-app").is_some());
        assert!(label_key_problem("Bad_Prefix/app").is_some());
        assert!(label_key_problem("a/b/c").is_some());
        assert!(label_key_problem(&"x".repeat(64)).is_some());
    }

    #[test]
    fn label_values_may_be_empty_but_not_odd() {
        assert!(label_value_problem("").is_none());
        assert!(label_value_problem("v1.2_3-x").is_none());
        assert!(label_value_problem("has space").is_some());
        assert!(label_value_problem("trailing-").is_some());
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_label("payments"));
        assert!(!is_dns_label("Payments"));
        assert!(!is_dns_label("pay.ments"));
        assert!(is_dns_subdomain("pay.ments"));
        assert!(!is_dns_subdomain("pay..ments"));
    }
}
