//! Least-privilege NetworkPolicy from observed flows: the `allow` events of a gateway run
//! with `policy.mode = "observe"` in, kubectl-ready YAML out (one document list per
//! namespace), allowing exactly the observed flows at the chosen granularity.
//!
//! Granularity, and nothing wider:
//! - workloads are selected by one label (`app` by default) when they carry it, otherwise
//!   by all their own labels; a rule's peers are selected the same way (with a
//!   `namespaceSelector` on `kubernetes.io/metadata.name` for another namespace);
//! - external addresses become `ipBlock`s of the observed address truncated to the chosen
//!   prefix length;
//! - ports are the observed ones, per protocol; consecutive ports become `port`/`endPort`;
//! - one rule per set of peers with the same observed ports, so no peer gains a port
//!   another peer was seen on.
//!
//! Every selected workload is isolated for both directions (`policyTypes: [Ingress,
//! Egress]`): a direction with no observed flow gets an empty rule list. A flow that
//! NetworkPolicy cannot express (external to external, a workload the inventory does not
//! know, a protocol other than TCP/UDP/SCTP, a workload with no labels sharing its
//! namespace) is listed in [`Generated::unexpressed`] instead.
//!
//! Not here: reading files (the CLI) and deciding whether the result is right
//! (`flowgate diff`, `flowgate check`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

use super::ir::{Inventory, Labels, NAMESPACE_NAME_LABEL, Workload};
use crate::flow::Proto;

/// A flow log line that cannot be read.
#[derive(Debug, Error)]
#[error("{file}:{line}: {message}")]
pub struct FlowLogError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// One observed flow (a folded flow log line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// RFC 3339, as logged (sorts as time).
    pub ts: String,
    pub proto: Proto,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub fqdn: Option<String>,
    pub count: u64,
}

/// The flow log fields read here (docs/DESIGN.md §5.1); others are ignored.
#[derive(Deserialize)]
struct Line {
    ts: String,
    event: String,
    proto: String,
    src: String,
    dst: String,
    fqdn: Option<String>,
    src_workload: Option<String>,
    dst_workload: Option<String>,
    count: Option<u64>,
}

/// Reads the `allow` events of a flow log's text; other events are skipped.
///
/// # Errors
/// A line that is not a flow log event, naming the file and line.
pub fn parse_flowlog(text: &str, file: &Path) -> Result<Vec<Observed>, FlowLogError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |message: String| FlowLogError {
            file: file.display().to_string(),
            line: i + 1,
            message,
        };
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line =
            serde_json::from_str(raw).map_err(|e| err(format!("not a flow log event: {e}")))?;
        if line.event != "allow" {
            continue;
        }
        let src: SocketAddr =
            line.src.parse().map_err(|_| err(format!("src {:?} is not ip:port", line.src)))?;
        let dst: SocketAddr =
            line.dst.parse().map_err(|_| err(format!("dst {:?} is not ip:port", line.dst)))?;
        let proto = match line.proto.as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "sctp" => Proto::Sctp,
            "icmp" => Proto::Icmp,
            "icmpv6" => Proto::Icmpv6,
            _ => Proto::Unknown(0),
        };
        out.push(Observed {
            ts: line.ts,
            proto,
            src: src.ip(),
            dst: dst.ip(),
            dst_port: dst.port(),
            src_workload: line.src_workload,
            dst_workload: line.dst_workload,
            fqdn: line.fqdn,
            count: line.count.unwrap_or(1).max(1),
        });
    }
    Ok(out)
}

/// How coarse the result may be.
#[derive(Clone, Debug)]
pub struct Options {
    /// Select workloads by this label when they carry it; `None`: by all their labels.
    pub label: Option<String>,
    /// `ipBlock` prefix length for external IPv4 / IPv6 addresses.
    pub prefix_v4: u8,
    pub prefix_v6: u8,
}

impl Default for Options {
    fn default() -> Self {
        Options { label: Some("app".into()), prefix_v4: 32, prefix_v6: 128 }
    }
}

/// The result: YAML per namespace, and what could not be expressed.
#[derive(Clone, Debug, Default)]
pub struct Generated {
    /// `(namespace, YAML)`, by namespace.
    pub files: Vec<(String, String)>,
    /// One line per kind of flow left out, with how many flows.
    pub unexpressed: Vec<String>,
}

/// Who a rule or policy selects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PeerKey {
    Workloads { namespace: String, labels: Labels },
    Block(IpNet),
}

/// Per protocol, the observed ports; per port, (flows, first seen).
type Ports = BTreeMap<(u8, u16), (u64, String)>;

/// A peer and its observed ports, as grouped into one rule.
type PeerPorts<'a> = (&'a PeerKey, &'a Ports);

/// One generated policy: its subject and per direction its peers' ports.
#[derive(Default)]
struct Draft {
    ingress: BTreeMap<PeerKey, Ports>,
    egress: BTreeMap<PeerKey, Ports>,
}

/// Generates NetworkPolicies allowing the observed flows over `inventory`.
pub fn generate(inventory: &Inventory, flows: &[Observed], opts: &Options) -> Generated {
    let by_name: BTreeMap<String, &Workload> =
        inventory.workloads.iter().map(|w| (format!("{}/{}", w.namespace, w.name), w)).collect();
    // (namespace, subject labels) → draft.
    let mut drafts: BTreeMap<(String, Labels), Draft> = BTreeMap::new();
    let mut left_out: BTreeMap<String, u64> = BTreeMap::new();
    let mut skip = |why: String, n: u64| *left_out.entry(why).or_default() += n;
    for f in flows {
        let Some(proto) = proto_k8s(f.proto) else {
            skip(format!("{} flows (NetworkPolicy has no ports for it)", f.proto), f.count);
            continue;
        };
        let resolve = |name: &Option<String>| -> Result<Option<&Workload>, String> {
            match name {
                None => Ok(None),
                Some(n) => by_name.get(n).copied().map(Some).ok_or_else(|| n.clone()),
            }
        };
        let (src, dst) = match (resolve(&f.src_workload), resolve(&f.dst_workload)) {
            (Ok(s), Ok(d)) => (s, d),
            (Err(n), _) | (_, Err(n)) => {
                skip(format!("flows of {n}, which is not in the inventory"), f.count);
                continue;
            }
        };
        if src.is_none() && dst.is_none() {
            skip("flows between two external addresses (no workload to select)".into(), f.count);
            continue;
        }
        let port = ((proto.0), f.dst_port);
        let mut unselectable = false;
        for w in [src, dst].into_iter().flatten() {
            if selector(w, opts).is_empty()
                && inventory.workloads.iter().filter(|o| o.namespace == w.namespace).count() > 1
            {
                skip(
                    format!(
                        "flows of {}/{}, which has no labels to select it apart from its namespace",
                        w.namespace, w.name
                    ),
                    f.count,
                );
                unselectable = true;
            }
        }
        if unselectable {
            continue;
        }
        let peer_of = |w: Option<&Workload>, ip: IpAddr| match w {
            Some(w) => {
                PeerKey::Workloads { namespace: w.namespace.clone(), labels: selector(w, opts) }
            }
            None => PeerKey::Block(block(ip, opts)),
        };
        let note = |ports: &mut Ports| {
            let e = ports.entry(port).or_insert((0, f.ts.clone()));
            e.0 += f.count;
            if f.ts < e.1 {
                e.1 = f.ts.clone();
            }
        };
        if let Some(s) = src {
            let d = drafts.entry((s.namespace.clone(), selector(s, opts))).or_default();
            note(d.egress.entry(peer_of(dst, f.dst)).or_default());
        }
        if let Some(d) = dst {
            let draft = drafts.entry((d.namespace.clone(), selector(d, opts))).or_default();
            note(draft.ingress.entry(peer_of(src, f.src)).or_default());
        }
    }
    // Render, one file per namespace.
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    let mut names: BTreeSet<(String, String)> = BTreeSet::new();
    for ((ns, labels), draft) in &drafts {
        let mut name = policy_name(labels);
        let base = name.clone();
        let mut k = 2;
        while !names.insert((ns.clone(), name.clone())) {
            name = format!("{base}-{k}");
            k += 1;
        }
        let out = files.entry(ns.clone()).or_insert_with(|| {
            format!(
                "# Generated by `flowgate generate` from observed flows: allows exactly what was\n\
                 # seen in namespace {ns} (peers by {}, external addresses as /{} or /{} blocks).\n",
                opts.label.as_deref().map_or("their own labels".into(), |l| format!("label {l:?}")),
                opts.prefix_v4,
                opts.prefix_v6
            )
        });
        render(out, ns, &name, labels, draft);
    }
    Generated {
        files: files.into_iter().collect(),
        unexpressed: left_out.into_iter().map(|(why, n)| format!("{n} {why}")).collect(),
    }
}

/// `(protocol number, TCP|UDP|SCTP)`.
fn proto_k8s(p: Proto) -> Option<(u8, &'static str)> {
    match p {
        Proto::Tcp | Proto::Udp | Proto::Sctp => Some((p.number(), p.as_str())),
        _ => None,
    }
}

/// The labels that select `w`: the chosen key, else all its own labels.
fn selector(w: &Workload, opts: &Options) -> Labels {
    if let Some(key) = &opts.label
        && let Some(v) = w.labels.get(key)
    {
        return Labels::from([(key.clone(), v.clone())]);
    }
    w.labels.clone()
}

fn block(ip: IpAddr, opts: &Options) -> IpNet {
    let (len, max) = match ip {
        IpAddr::V4(_) => (opts.prefix_v4, 32),
        IpAddr::V6(_) => (opts.prefix_v6, 128),
    };
    IpNet::new(ip, len.min(max)).map(|n| n.trunc()).unwrap_or_else(|_| IpNet::from(ip))
}

/// A DNS-1123 name from the selector's values: `allow-web`, `allow-api-front`.
fn policy_name(labels: &Labels) -> String {
    let mut s = String::from("allow");
    for v in labels.values() {
        s.push('-');
        s.extend(v.chars().map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() { c } else { '-' }
        }));
    }
    let mut name: String = s.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-");
    name.truncate(200);
    name.trim_end_matches('-').to_string()
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

fn match_labels(out: &mut String, indent: &str, labels: &Labels) {
    if labels.is_empty() {
        let _ = writeln!(out, "{indent}matchLabels: {{}}");
        return;
    }
    let _ = writeln!(out, "{indent}matchLabels:");
    for (k, v) in labels {
        let _ = writeln!(out, "{indent}  {}: {}", q(k), q(v));
    }
}

fn render(out: &mut String, ns: &str, name: &str, labels: &Labels, draft: &Draft) {
    out.push_str("---\n");
    let _ = writeln!(out, "apiVersion: networking.k8s.io/v1");
    let _ = writeln!(out, "kind: NetworkPolicy");
    let _ = writeln!(out, "metadata:\n  name: {}\n  namespace: {}", q(name), q(ns));
    let _ = writeln!(out, "spec:\n  podSelector:");
    match_labels(out, "    ", labels);
    let _ = writeln!(out, "  policyTypes: [Ingress, Egress]");
    for (dir, peer_field, peers) in
        [("ingress", "from", &draft.ingress), ("egress", "to", &draft.egress)]
    {
        // Peers with the same observed ports share a rule.
        let mut rules: BTreeMap<Vec<(u8, u16)>, Vec<PeerPorts<'_>>> = BTreeMap::new();
        for (peer, ports) in peers {
            rules.entry(ports.keys().copied().collect()).or_default().push((peer, ports));
        }
        if rules.is_empty() {
            let _ = writeln!(out, "  {dir}: []");
            continue;
        }
        let _ = writeln!(out, "  {dir}:");
        for (ports, peers) in &rules {
            let (count, since) = peers
                .iter()
                .flat_map(|(_, ports)| ports.values())
                .fold((0u64, String::new()), |(n, s), (c, ts)| {
                    (n + c, if s.is_empty() || *ts < s { ts.clone() } else { s })
                });
            let _ = writeln!(out, "    # {count} flow(s) observed, first at {since}");
            let _ = writeln!(out, "    - {peer_field}:");
            for (p, _) in peers {
                match p {
                    PeerKey::Block(net) => {
                        let _ = writeln!(out, "        - ipBlock:\n            cidr: {net}");
                    }
                    PeerKey::Workloads { namespace, labels: l } if namespace == ns => {
                        let _ = writeln!(out, "        - podSelector:");
                        match_labels(out, "            ", l);
                    }
                    PeerKey::Workloads { namespace, labels: l } => {
                        let _ = writeln!(out, "        - namespaceSelector:");
                        match_labels(
                            out,
                            "            ",
                            &Labels::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.clone())]),
                        );
                        let _ = writeln!(out, "          podSelector:");
                        match_labels(out, "            ", l);
                    }
                }
            }
            let _ = writeln!(out, "      ports:");
            for (proto, first, last) in ranges(ports) {
                let name = proto_k8s(Proto::from_number(proto)).map_or("TCP", |p| p.1);
                let _ = write!(out, "        - protocol: {name}\n          port: {first}\n");
                if last > first {
                    let _ = writeln!(out, "          endPort: {last}");
                }
            }
        }
    }
}

/// Consecutive ports of one protocol merged: `(proto, first, last)`.
fn ranges(ports: &[(u8, u16)]) -> Vec<(u8, u16, u16)> {
    let mut out: Vec<(u8, u16, u16)> = Vec::new();
    for &(proto, port) in ports {
        match out.last_mut() {
            Some(last) if last.0 == proto && last.2.checked_add(1) == Some(port) => last.2 = port,
            _ => out.push((proto, port, port)),
        }
    }
    out
}
