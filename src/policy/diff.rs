//! Reachability diff: every flow whose verdict differs between two policy sets (or two
//! inventories), computed exactly without deciding every flow.
//!
//! The universe is: every inventory workload (by `namespace/name`, standing for its first
//! address as `explain` does), the external address blocks the policies name (`ipBlock`
//! CIDRs and their `except`s, cut into the blocks no policy tells apart), and the domain
//! names the policies name (as destinations). External-to-external flows are left out
//! (`policy.unknown` decides them, not policy).
//!
//! How it stays small:
//! - **Workload classes.** Two workloads that every selector of both sets matches alike,
//!   whose addresses fall in the same CIDR class and that have the same named ports get
//!   the same verdict towards and from everything; one member is decided for the class.
//!   Selectors are resolved through a label index, then checked with the IR's own matcher
//!   ([`WorkloadSelector::matches`]), so the classes follow Kubernetes' semantics exactly.
//! - **Port segments.** A side's verdict only depends on the rules of the policies that
//!   select that workload in that direction; for one (source, destination) pair the ports
//!   are cut where those rules' port ranges (and the destination's named ports) start and
//!   end, and one port per segment is decided.
//! - **Touched sides.** When the inventory and the defaults are the same on both sides,
//!   only the policies that differ can change a verdict, and only on the sides of the
//!   workloads they select: a changed egress side re-decides that source towards
//!   everything, a changed ingress side everything towards that destination.
//!
//! Deciding is the engine's public API ([`CompiledPolicy::decide`], `explain` for the
//! reason), so the diff agrees with `flowgate explain` flow by flow; `tests/diff_props.rs`
//! holds it against deciding every flow by brute force.
//!
//! A workload absent from one side's inventory (or owning no address there) reaches and
//! is reached by nothing on that side.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::explain::{Explanation, SideTrace};
use super::ir::{
    DomainPattern, Inventory, Labels, NAMESPACE_NAME_LABEL, NamedPort, Namespace, NamespaceMatch,
    Peer, Peers, Policy, PolicySet, PortMatch, SelectorOp, Workload, WorkloadSelector,
};
use super::{CompiledPolicy, Decision, FlowQuery, Verdict, WorkloadId};
use crate::flow::Proto;

/// The protocols a policy can name; each gets its own port segments.
pub const PROTOCOLS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

/// One side of the diff: a loaded set and its compilation.
#[derive(Clone, Copy)]
pub struct Side<'a> {
    pub set: &'a PolicySet,
    pub compiled: &'a CompiledPolicy,
}

/// Whether a change lets a flow through that was refused, or the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangeKind {
    Opened,
    Closed,
}

impl ChangeKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Opened => "opened",
            ChangeKind::Closed => "closed",
        }
    }
}

/// An endpoint of a reported change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `namespace/name`.
    Workload(String),
    /// External addresses no policy tells apart: `label` names them by the blocks the
    /// policies wrote; `ranges` are the inclusive address ranges of the class (which may
    /// contain workload addresses: those are workloads, not this endpoint).
    Addresses { label: String, ranges: Vec<(IpAddr, IpAddr)> },
    /// A destination name: `label` is the name or `*.suffix`; `patterns` are the
    /// `domainNames` entries (of either side) that match it.
    Domain { label: String, patterns: Vec<DomainPattern> },
}

impl Endpoint {
    pub fn label(&self) -> &str {
        match self {
            Endpoint::Workload(name) => name,
            Endpoint::Addresses { label, .. } | Endpoint::Domain { label, .. } => label,
        }
    }
}

/// A set of endpoints that no policy of either side tells apart.
#[derive(Clone, Debug)]
pub struct Class {
    pub members: Vec<Endpoint>,
}

/// One change between two classes on one protocol: the port ranges where the verdicts
/// of both sides are the same pair of decisions (same verdicts, same deciding policies).
#[derive(Clone, Debug)]
pub struct ClassChange {
    pub kind: ChangeKind,
    /// Index into [`Diff::classes`].
    pub from: usize,
    pub to: usize,
    pub proto: Proto,
    /// Inclusive, ascending, not adjacent.
    pub ports: Vec<(u16, u16)>,
}

/// A change between two endpoints, as reported.
#[derive(Clone, Copy, Debug)]
pub struct Change<'a> {
    pub kind: ChangeKind,
    pub from: &'a Endpoint,
    pub to: &'a Endpoint,
    pub proto: Proto,
    pub ports: &'a [(u16, u16)],
    /// The class change it expands, for [`Diff::reason`], and its index in
    /// [`Diff::changes`].
    pub class_change: &'a ClassChange,
    pub index: usize,
}

/// The result: classes and the changes between them.
#[derive(Clone, Debug, Default)]
pub struct Diff {
    pub classes: Vec<Class>,
    pub changes: Vec<ClassChange>,
    /// How each class is asked about, per side.
    probes: Vec<Probe>,
}

/// How a class is put into a query on each side: its address (or name) there, `None`
/// when it does not exist on that side.
#[derive(Clone, Debug)]
struct Probe {
    before: Option<IpAddr>,
    after: Option<IpAddr>,
    fqdn: Option<String>,
}

/// Counts of the work done, for the bench and `--stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub workload_classes: usize,
    pub external_classes: usize,
    pub domain_classes: usize,
    pub pairs: usize,
    pub decisions: usize,
    /// True when every side had to be recomputed (inventory or defaults differ).
    pub full: bool,
}

/// Computes the reachability diff from `before` to `after`.
pub fn diff(before: Side<'_>, after: Side<'_>) -> (Diff, Stats) {
    Builder::new(before, after).run()
}

impl Diff {
    /// Every change between endpoints, in the order (kind, from, to, protocol).
    pub fn expand(&self) -> Vec<Change<'_>> {
        let mut out = Vec::new();
        for (index, c) in self.changes.iter().enumerate() {
            for from in &self.classes[c.from].members {
                for to in &self.classes[c.to].members {
                    out.push(Change {
                        kind: c.kind,
                        from,
                        to,
                        proto: c.proto,
                        ports: &c.ports,
                        class_change: c,
                        index,
                    });
                }
            }
        }
        out.sort_by(|a, b| {
            (a.kind, a.from.label(), a.to.label(), a.proto.number(), a.ports.first()).cmp(&(
                b.kind,
                b.from.label(),
                b.to.label(),
                b.proto.number(),
                b.ports.first(),
            ))
        });
        out
    }

    /// The explanations of both sides for the change's first port, `None` for a side
    /// where an endpoint does not exist.
    pub fn explain(
        &self,
        change: &ClassChange,
        before: Side<'_>,
        after: Side<'_>,
    ) -> (Option<Explanation>, Option<Explanation>) {
        let port = change.ports.first().map_or(1, |r| r.0);
        let (src, dst) = (&self.probes[change.from], &self.probes[change.to]);
        let ask = |side: Side<'_>, s: Option<IpAddr>, d: Option<IpAddr>| {
            let q = FlowQuery {
                src: s?,
                dst: d?,
                dst_port: port,
                proto: change.proto,
                fqdn: dst.fqdn.as_deref(),
            };
            Some(side.compiled.explain(&q))
        };
        (ask(before, src.before, dst.before), ask(after, src.after, dst.after))
    }

    /// Why the change happened, in one line: the rules that allow the flow on the side
    /// where it is allowed, and why the other side refuses it.
    pub fn reason(&self, change: &ClassChange, before: Side<'_>, after: Side<'_>) -> String {
        let (b, a) = self.explain(change, before, after);
        let missing = |side: &str| format!("{side}: an endpoint is not in the inventory");
        match change.kind {
            ChangeKind::Opened => format!(
                "now allowed by {}; before: {}",
                a.as_ref().map_or_else(|| "?".to_string(), allowed_by),
                b.as_ref().map_or_else(|| missing("absent"), denied_by)
            ),
            ChangeKind::Closed => format!(
                "before allowed by {}; now: {}",
                b.as_ref().map_or_else(|| "?".to_string(), allowed_by),
                a.as_ref().map_or_else(|| missing("absent"), denied_by)
            ),
        }
    }
}

/// `egress: <rule>; ingress: <rule>` for an allowed flow.
fn allowed_by(ex: &Explanation) -> String {
    let mut parts = Vec::new();
    for (dir, side) in [("egress", &ex.egress), ("ingress", &ex.ingress)] {
        if let Some(t) = side {
            parts.push(format!("{dir}: {}", how(t)));
        }
    }
    if parts.is_empty() {
        parts.push("policy.unknown = allow".to_string());
    }
    parts.join("; ")
}

/// How one side decided.
fn how(t: &SideTrace) -> String {
    let rule = |r: &super::explain::RuleRef| format!("{} {} {}", r.kind, r.policy, r.rule);
    match t.decided_by {
        "admin" => t.admin.as_ref().map_or_else(|| "admin tier".into(), rule),
        "networkpolicy" => t
            .admitted_by
            .as_ref()
            .map_or_else(|| format!("not admitted ({})", t.isolated_by.join(", ")), rule),
        "baseline" => t.baseline.as_ref().map_or_else(|| "baseline tier".into(), rule),
        _ => format!("policy.default = {}", t.default.unwrap_or(t.verdict)),
    }
}

/// `denied (ingress not-admitted by NetworkPolicy ns/p)`.
fn denied_by(ex: &Explanation) -> String {
    let mut s = String::from("denied (");
    if let Some(d) = ex.direction {
        s.push_str(d);
        s.push(' ');
    }
    s.push_str(ex.reason.unwrap_or("denied"));
    if let Some(p) = &ex.policy {
        s.push_str(" by ");
        s.push_str(p);
    }
    s.push(')');
    s
}

// ---------------------------------------------------------------------------------------
// Selectors

/// A selector as a hash key: the IR types have `Eq` but not `Hash`.
#[derive(Clone, Copy)]
struct SelKey<'a>(&'a WorkloadSelector);

impl PartialEq for SelKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for SelKey<'_> {}

impl Hash for SelKey<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let s = self.0;
        match &s.namespaces {
            NamespaceMatch::Named(n) => {
                0u8.hash(h);
                n.hash(h);
            }
            NamespaceMatch::Selector(sel) => {
                1u8.hash(h);
                sel.match_labels.hash(h);
                sel.match_expressions.len().hash(h);
            }
        }
        s.pods.match_labels.hash(h);
        for r in &s.pods.match_expressions {
            r.key.hash(h);
            r.values.hash(h);
        }
    }
}

/// A label index over one inventory, to resolve selectors without a full scan.
struct Index<'a> {
    inv: &'a Inventory,
    /// Namespace objects by name (missing ones carry only their name label).
    namespaces: HashMap<&'a str, Namespace>,
    by_ns: HashMap<&'a str, Vec<u32>>,
    postings: HashMap<(&'a str, &'a str), Vec<u32>>,
}

impl<'a> Index<'a> {
    fn new(inv: &'a Inventory) -> Index<'a> {
        let mut namespaces: HashMap<&str, Namespace> =
            inv.namespaces.iter().map(|n| (n.name.as_str(), n.clone())).collect();
        let mut by_ns: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut postings: HashMap<(&str, &str), Vec<u32>> = HashMap::new();
        for (i, w) in inv.workloads.iter().enumerate() {
            namespaces.entry(w.namespace.as_str()).or_insert_with(|| Namespace {
                name: w.namespace.clone(),
                labels: Labels::from([(NAMESPACE_NAME_LABEL.to_string(), w.namespace.clone())]),
            });
            by_ns.entry(w.namespace.as_str()).or_default().push(i as u32);
            for (k, v) in &w.labels {
                postings.entry((k.as_str(), v.as_str())).or_default().push(i as u32);
            }
        }
        Index { inv, namespaces, by_ns, postings }
    }

    /// The workloads (inventory indices, ascending) `sel` selects.
    fn resolve(&self, sel: &WorkloadSelector) -> Vec<u32> {
        let namespaces: Vec<&str> = match &sel.namespaces {
            NamespaceMatch::Named(n) => {
                self.by_ns.get_key_value(n.as_str()).map(|(k, _)| *k).into_iter().collect()
            }
            NamespaceMatch::Selector(s) => self
                .by_ns
                .keys()
                .copied()
                .filter(|n| self.namespaces.get(n).is_some_and(|ns| s.matches(&ns.labels)))
                .collect(),
        };
        if namespaces.is_empty() {
            return Vec::new();
        }
        // The smallest posting list a required label gives, if any.
        let mut candidates: Option<Vec<u32>> = None;
        let empty = Vec::new();
        for (k, v) in &sel.pods.match_labels {
            let p = self.postings.get(&(k.as_str(), v.as_str())).unwrap_or(&empty);
            if candidates.as_ref().is_none_or(|c| p.len() < c.len()) {
                candidates = Some(p.clone());
            }
        }
        if candidates.is_none() {
            for r in &sel.pods.match_expressions {
                if r.op == SelectorOp::In {
                    let mut c: Vec<u32> = r
                        .values
                        .iter()
                        .filter_map(|v| self.postings.get(&(r.key.as_str(), v.as_str())))
                        .flatten()
                        .copied()
                        .collect();
                    c.sort_unstable();
                    c.dedup();
                    candidates = Some(c);
                    break;
                }
            }
        }
        let candidates = match candidates {
            Some(c) => c,
            None => {
                let mut c: Vec<u32> = namespaces
                    .iter()
                    .filter_map(|n| self.by_ns.get(n))
                    .flatten()
                    .copied()
                    .collect();
                c.sort_unstable();
                c
            }
        };
        candidates
            .into_iter()
            .filter(|&i| {
                let w: &Workload = &self.inv.workloads[i as usize];
                self.namespaces.get(w.namespace.as_str()).is_some_and(|ns| sel.matches(ns, w))
            })
            .collect()
    }
}

/// Every workload selector a policy uses: its subject and its rules' workload peers.
fn selectors(p: &Policy) -> impl Iterator<Item = &WorkloadSelector> {
    let rules = p.ingress.iter().flatten().chain(p.egress.iter().flatten());
    std::iter::once(&p.subject).chain(
        rules
            .flat_map(|r| match &r.peers {
                Peers::Any => [].iter(),
                Peers::List(l) => l.iter(),
            })
            .filter_map(|peer| match peer {
                Peer::Workloads(s) => Some(s),
                _ => None,
            }),
    )
}

/// Equal as policies, wherever they were read from.
fn same_policy(a: &Policy, b: &Policy) -> bool {
    let Policy {
        kind,
        name,
        namespace,
        source: _,
        tier,
        subject,
        ingress,
        egress,
        mode,
        expiry,
        created_at,
    } = a;
    *kind == b.kind
        && *name == b.name
        && *namespace == b.namespace
        && *tier == b.tier
        && *subject == b.subject
        && *ingress == b.ingress
        && *egress == b.egress
        && *mode == b.mode
        && *expiry == b.expiry
        && *created_at == b.created_at
}

// ---------------------------------------------------------------------------------------
// Addresses

/// `(v6, first, last)`: an inclusive range in one family.
type Span = (bool, u128, u128);

fn span(net: &IpNet) -> Span {
    match net {
        IpNet::V4(n) => {
            (false, u128::from(u32::from(n.network())), u128::from(u32::from(n.broadcast())))
        }
        IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

fn ip_of(v6: bool, v: u128) -> IpAddr {
    if v6 { IpAddr::V6(Ipv6Addr::from(v)) } else { IpAddr::V4(Ipv4Addr::from(v as u32)) }
}

fn key_of(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

const fn family_max(v6: bool) -> u128 {
    if v6 { u128::MAX } else { u32::MAX as u128 }
}

/// The address space cut at every boundary of every CIDR the policies name; each piece
/// (an atom) belongs to a class of atoms that every CIDR peer contains alike.
struct Atoms {
    /// Per family (v4, v6): atom starts, ascending, the first is 0.
    starts: [Vec<u128>; 2],
    /// Per family: the class of each atom.
    class: [Vec<u32>; 2],
    /// Per class: its CIDR peers (ids), and its atoms as (v6, first, last).
    members: Vec<Vec<Span>>,
    /// Every net written (peer nets and excepts), for labels.
    named: Vec<IpNet>,
}

impl Atoms {
    fn build(peers: &[(IpNet, Vec<IpNet>)]) -> Atoms {
        let mut cuts: [BTreeSet<u128>; 2] = [BTreeSet::from([0]), BTreeSet::from([0])];
        let mut named: Vec<IpNet> = Vec::new();
        for (net, except) in peers {
            for n in std::iter::once(net).chain(except) {
                let (v6, first, last) = span(n);
                let f = usize::from(v6);
                cuts[f].insert(first);
                if last < family_max(v6) {
                    cuts[f].insert(last + 1);
                }
                named.push(*n);
            }
        }
        named.sort_by_key(|n| (n.prefix_len(), *n));
        named.dedup();
        let starts: [Vec<u128>; 2] =
            [cuts[0].iter().copied().collect(), cuts[1].iter().copied().collect()];
        // Per atom, the sorted list of peers containing it.
        let mut sigs: [Vec<Vec<u32>>; 2] =
            [vec![Vec::new(); starts[0].len()], vec![Vec::new(); starts[1].len()]];
        for (pid, (net, except)) in peers.iter().enumerate() {
            let (v6, first, last) = span(net);
            let f = usize::from(v6);
            let a0 = starts[f].partition_point(|&s| s < first);
            let a1 = starts[f].partition_point(|&s| s <= last);
            let ex: Vec<Span> = except.iter().map(span).collect();
            for a in a0..a1 {
                let at = starts[f][a];
                if !ex.iter().any(|&(ev6, ef, el)| ev6 == v6 && ef <= at && at <= el) {
                    sigs[f][a].push(pid as u32);
                }
            }
        }
        let mut ids: HashMap<Vec<u32>, u32> = HashMap::new();
        let mut members: Vec<Vec<Span>> = Vec::new();
        let mut class: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        for f in 0..2 {
            let v6 = f == 1;
            for (a, sig) in std::mem::take(&mut sigs[f]).into_iter().enumerate() {
                let id = *ids.entry(sig).or_insert_with(|| {
                    members.push(Vec::new());
                    (members.len() - 1) as u32
                });
                let first = starts[f][a];
                let last = starts[f].get(a + 1).map_or(family_max(v6), |s| s - 1);
                members[id as usize].push((v6, first, last));
                class[f].push(id);
            }
        }
        Atoms { starts, class, members, named }
    }

    fn class_of(&self, ip: IpAddr) -> u32 {
        let (v6, v) = key_of(ip);
        let f = usize::from(v6);
        let a = self.starts[f].partition_point(|&s| s <= v).saturating_sub(1);
        self.class[f][a]
    }

    /// A human name for an address class: one CIDR when it is one, otherwise the
    /// smallest named block holding it with the named blocks carved out of it.
    fn label(&self, class: usize) -> String {
        let spans = &self.members[class];
        let mut parts = Vec::new();
        for v6 in [false, true] {
            let fam: Vec<Span> = spans.iter().copied().filter(|s| s.0 == v6).collect();
            if fam.is_empty() {
                continue;
            }
            let lo = fam.iter().map(|s| s.1).min().unwrap_or(0);
            let hi = fam.iter().map(|s| s.2).max().unwrap_or(0);
            let whole: IpNet = if v6 {
                IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::UNSPECIFIED, 0).unwrap_or_default())
            } else {
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).unwrap_or_default())
            };
            // The smallest named net (or the whole family) containing lo..=hi.
            let outer = self
                .named
                .iter()
                .rev()
                .find(|n| {
                    let (nv6, f, l) = span(n);
                    nv6 == v6 && f <= lo && hi <= l
                })
                .copied()
                .unwrap_or(whole);
            let (_, of, ol) = span(&outer);
            let inside = |s: &Span| fam.iter().any(|m| m.1 <= s.2 && s.1 <= m.2);
            // Named nets inside `outer` that hold none of the class, outermost first.
            let mut carved: Vec<Span> = Vec::new();
            let mut carved_nets: Vec<IpNet> = Vec::new();
            for n in &self.named {
                let s = span(n);
                if s.0 != v6 || s.1 < of || s.2 > ol || (s.1 == of && s.2 == ol) {
                    continue;
                }
                if inside(&s) || carved.iter().any(|c| c.1 <= s.1 && s.2 <= c.2) {
                    continue;
                }
                carved.push(s);
                carved_nets.push(*n);
            }
            if carved_nets.is_empty() {
                parts.push(outer.to_string());
            } else {
                let list: Vec<String> = carved_nets.iter().map(ToString::to_string).collect();
                parts.push(format!("{outer} except {}", list.join(", ")));
            }
        }
        parts.join(" and ")
    }
}

/// Every workload address range of an inventory, merged, per family.
fn workload_spans(invs: &[&Inventory]) -> [Vec<(u128, u128)>; 2] {
    let mut out: [Vec<(u128, u128)>; 2] = [Vec::new(), Vec::new()];
    for inv in invs {
        for w in &inv.workloads {
            for n in &w.addrs {
                let (v6, f, l) = span(n);
                out[usize::from(v6)].push((f, l));
            }
        }
    }
    for fam in &mut out {
        fam.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(fam.len());
        for &(f, l) in fam.iter() {
            match merged.last_mut() {
                Some(last) if f <= last.1.saturating_add(1) => last.1 = last.1.max(l),
                _ => merged.push((f, l)),
            }
        }
        *fam = merged;
    }
    out
}

/// The first address of `first..=last` no workload range covers.
fn first_free(spans: &[(u128, u128)], first: u128, last: u128) -> Option<u128> {
    let mut at = first;
    let mut i = spans.partition_point(|s| s.1 < at);
    while let Some(&(f, l)) = spans.get(i) {
        if f > at {
            break;
        }
        at = l.checked_add(1)?;
        i += 1;
    }
    (at <= last).then_some(at)
}

// ---------------------------------------------------------------------------------------
// The computation

/// One workload of the union of both inventories.
struct Member {
    name: String,
    /// Inventory index and representative address on each side.
    before: Option<(u32, IpAddr)>,
    after: Option<(u32, IpAddr)>,
}

/// Per class and direction, the port cut points (per protocol) its policies' rules make.
#[derive(Clone, Default)]
struct Cuts([Vec<u16>; 3]);

impl Cuts {
    fn add_rules(&mut self, rules: &[super::ir::Rule]) {
        for r in rules {
            for m in r.ports.iter().flatten() {
                if let PortMatch::Range { protocol, first, last } = m
                    && let Some(i) = proto_index(*protocol)
                {
                    self.0[i].push(*first);
                    if let Some(next) = last.checked_add(1) {
                        self.0[i].push(next);
                    }
                }
            }
        }
    }

    fn add_named(&mut self, ports: &[NamedPort]) {
        // An ANP `namedPort` matches whatever the protocol: cut every protocol.
        for p in ports {
            for i in 0..3 {
                self.0[i].push(p.port);
                if let Some(next) = p.port.checked_add(1) {
                    self.0[i].push(next);
                }
            }
        }
    }

    fn finish(&mut self) {
        for v in &mut self.0 {
            v.sort_unstable();
            v.dedup();
        }
    }
}

fn proto_index(p: Proto) -> Option<usize> {
    PROTOCOLS.iter().position(|&q| q == p)
}

struct WorkloadClass {
    members: Vec<usize>,
    /// The selector ids matching the class, per inventory table.
    sels: [Vec<u32>; 2],
    egress: Cuts,
    ingress: Cuts,
    named: Cuts,
    touched_egress: bool,
    touched_ingress: bool,
}

struct Builder<'a> {
    before: Side<'a>,
    after: Side<'a>,
    stats: Stats,
    cuts: Vec<u16>,
}

impl<'a> Builder<'a> {
    fn new(before: Side<'a>, after: Side<'a>) -> Builder<'a> {
        Builder { before, after, stats: Stats::default(), cuts: Vec::new() }
    }

    fn run(mut self) -> (Diff, Stats) {
        let (before, after) = (self.before, self.after);
        let shared_inventory = std::sync::Arc::ptr_eq(&before.set.inventory, &after.set.inventory)
            || before.set.inventory == after.set.inventory;
        let (ob, oa) = (before.compiled.options(), after.compiled.options());
        let full = !shared_inventory || ob.default != oa.default || ob.unknown != oa.unknown;
        self.stats.full = full;

        // 1. The workloads of both inventories, by name.
        let mut members: Vec<Member> = Vec::new();
        let mut by_name: HashMap<(&str, &str), usize> = HashMap::new();
        for (after_side, side) in [(false, before), (true, after)] {
            for (i, w) in side.set.inventory.workloads.iter().enumerate() {
                let id = compiled_id(side.compiled, w, i);
                let rep =
                    id.and_then(|id| side.compiled.workload_addr(id)).map(|ip| (i as u32, ip));
                let m =
                    *by_name.entry((w.namespace.as_str(), w.name.as_str())).or_insert_with(|| {
                        members.push(Member {
                            name: format!("{}/{}", w.namespace, w.name),
                            before: None,
                            after: None,
                        });
                        members.len() - 1
                    });
                if after_side {
                    members[m].after = rep;
                } else {
                    members[m].before = rep;
                }
            }
        }

        // 2. Selectors: interned per inventory, resolved once each.
        let mut sel_ids: [HashMap<SelKey<'a>, u32>; 2] = [HashMap::new(), HashMap::new()];
        let mut sel_list: [Vec<&'a WorkloadSelector>; 2] = [Vec::new(), Vec::new()];
        let inv_of = |after_side: bool| if shared_inventory { 0 } else { usize::from(after_side) };
        // Per side, per policy: its subject's selector id.
        let mut subject_sel: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        for (s, side) in [before, after].into_iter().enumerate() {
            let t = inv_of(s == 1);
            for p in &side.set.policies {
                for (k, sel) in selectors(p).enumerate() {
                    let n = sel_list[t].len() as u32;
                    let id = *sel_ids[t].entry(SelKey(sel)).or_insert(n);
                    if id == n {
                        sel_list[t].push(sel);
                    }
                    if k == 0 {
                        subject_sel[s].push(id);
                    }
                }
            }
        }
        // Per side, the policies whose subject is each selector.
        let mut subject_policies: [HashMap<u32, Vec<usize>>; 2] = [HashMap::new(), HashMap::new()];
        for (s, subjects) in subject_sel.iter().enumerate() {
            for (pi, &sel) in subjects.iter().enumerate() {
                subject_policies[s].entry(sel).or_default().push(pi);
            }
        }
        // Per member, the selector ids matching it in each inventory table.
        let mut matched: [Vec<Vec<u32>>; 2] =
            [vec![Vec::new(); members.len()], vec![Vec::new(); members.len()]];
        let tables = if shared_inventory { 1 } else { 2 };
        for (t, matched_t) in matched.iter_mut().enumerate().take(tables) {
            let side = if t == 0 { before } else { after };
            let index = Index::new(&side.set.inventory);
            let to_member: Vec<usize> = side
                .set
                .inventory
                .workloads
                .iter()
                .map(|w| by_name[&(w.namespace.as_str(), w.name.as_str())])
                .collect();
            for (id, sel) in sel_list[t].iter().enumerate() {
                for w in index.resolve(sel) {
                    matched_t[to_member[w as usize]].push(id as u32);
                }
            }
        }

        // 3. CIDR peers of both sides, cut into address classes.
        let mut peer_ids: HashMap<(IpNet, Vec<IpNet>), u32> = HashMap::new();
        let mut peers: Vec<(IpNet, Vec<IpNet>)> = Vec::new();
        let mut patterns: Vec<DomainPattern> = Vec::new();
        let mut seen_patterns: HashSet<DomainPattern> = HashSet::new();
        for side in [before, after] {
            for p in &side.set.policies {
                for r in p.ingress.iter().flatten().chain(p.egress.iter().flatten()) {
                    let Peers::List(list) = &r.peers else { continue };
                    for peer in list {
                        match peer {
                            Peer::Cidr { net, except } => {
                                let key = (*net, except.clone());
                                if !peer_ids.contains_key(&key) {
                                    peer_ids.insert(key.clone(), peers.len() as u32);
                                    peers.push(key);
                                }
                            }
                            Peer::Domain(d) => {
                                if seen_patterns.insert(d.clone()) {
                                    patterns.push(d.clone());
                                }
                            }
                            Peer::Workloads(_) => {}
                        }
                    }
                }
            }
        }
        let atoms = Atoms::build(&peers);

        // 4. Workload classes.
        let mut class_of_sig: HashMap<WorkloadSig, usize> = HashMap::new();
        let mut wclasses: Vec<WorkloadClass> = Vec::new();
        for (m, member) in members.iter().enumerate() {
            if member.before.is_none() && member.after.is_none() {
                continue;
            }
            let named = |side: Side<'_>, at: Option<(u32, IpAddr)>| {
                at.map(|(i, _)| {
                    let mut p: Vec<(String, u16, u8)> = side.set.inventory.workloads[i as usize]
                        .ports
                        .iter()
                        .map(|p| (p.name.clone(), p.port, p.protocol.number()))
                        .collect();
                    p.sort();
                    p
                })
            };
            let sig = WorkloadSig {
                sels: [std::mem::take(&mut matched[0][m]), std::mem::take(&mut matched[1][m])],
                addr: [
                    member.before.map(|(_, ip)| atoms.class_of(ip)),
                    member.after.map(|(_, ip)| atoms.class_of(ip)),
                ],
                named: [named(before, member.before), named(after, member.after)],
            };
            match class_of_sig.get(&sig) {
                Some(&c) => wclasses[c].members.push(m),
                None => {
                    let mut wc = WorkloadClass {
                        members: vec![m],
                        egress: Cuts::default(),
                        ingress: Cuts::default(),
                        named: Cuts::default(),
                        touched_egress: full,
                        touched_ingress: full,
                        sels: [Vec::new(), Vec::new()],
                    };
                    for (s, side, at) in [(0, before, member.before), (1, after, member.after)] {
                        let Some((i, _)) = at else { continue };
                        wc.named.add_named(&side.set.inventory.workloads[i as usize].ports);
                        for sel in &sig.sels[inv_of(s == 1)] {
                            for &pi in subject_policies[s].get(sel).into_iter().flatten() {
                                let p = &side.set.policies[pi];
                                if let Some(rules) = &p.egress {
                                    wc.egress.add_rules(rules);
                                }
                                if let Some(rules) = &p.ingress {
                                    wc.ingress.add_rules(rules);
                                }
                            }
                        }
                    }
                    wc.sels = sig.sels.clone();
                    wc.egress.finish();
                    wc.ingress.finish();
                    wc.named.finish();
                    class_of_sig.insert(sig, wclasses.len());
                    wclasses.push(wc);
                }
            }
        }

        // 5. Touched sides: the subjects of every policy that differs.
        if !full {
            let key = |p: &Policy| (p.kind.as_str(), p.namespace.clone(), p.name.clone());
            let after_by_key: HashMap<_, &Policy> =
                after.set.policies.iter().map(|p| (key(p), &**p)).collect();
            let before_by_key: HashMap<_, &Policy> =
                before.set.policies.iter().map(|p| (key(p), &**p)).collect();
            let mut changed: Vec<(usize, usize)> = Vec::new();
            for (pi, p) in before.set.policies.iter().enumerate() {
                if !after_by_key.get(&key(p)).is_some_and(|q| same_policy(p, q)) {
                    changed.push((0, pi));
                }
            }
            for (pi, p) in after.set.policies.iter().enumerate() {
                if !before_by_key.get(&key(p)).is_some_and(|q| same_policy(p, q)) {
                    changed.push((1, pi));
                }
            }
            // Two policies with one key on one side: compare multisets the slow way.
            if after_by_key.len() != after.set.policies.len()
                || before_by_key.len() != before.set.policies.len()
            {
                changed = (0..before.set.policies.len())
                    .map(|i| (0, i))
                    .chain((0..after.set.policies.len()).map(|i| (1, i)))
                    .collect();
            }
            // Per inventory table and selector: (egress, ingress) touched.
            let mut touched: [HashMap<u32, (bool, bool)>; 2] = [HashMap::new(), HashMap::new()];
            for (s, pi) in changed {
                let side = if s == 0 { before } else { after };
                let p = &side.set.policies[pi];
                let e = touched[inv_of(s == 1)].entry(subject_sel[s][pi]).or_default();
                e.0 |= p.egress.is_some();
                e.1 |= p.ingress.is_some();
            }
            for wc in &mut wclasses {
                for (sels, touched) in wc.sels.iter().zip(&touched).take(tables) {
                    for sel in sels {
                        if let Some(&(e, i)) = touched.get(sel) {
                            wc.touched_egress |= e;
                            wc.touched_ingress |= i;
                        }
                    }
                }
            }
        }

        // 6. External address classes and domain classes.
        let free = workload_spans(&[&before.set.inventory, &after.set.inventory]);
        let mut externals: Vec<(usize, IpAddr)> = Vec::new();
        for (c, spans) in atoms.members.iter().enumerate() {
            let rep = spans.iter().find_map(|&(v6, f, l)| {
                first_free(&free[usize::from(v6)], f, l).map(|a| ip_of(v6, a))
            });
            if let Some(ip) = rep
                && before.compiled.workload_of(ip).is_none()
                && after.compiled.workload_of(ip).is_none()
            {
                externals.push((c, ip));
            }
        }
        // (label, probe name, matching patterns)
        let mut domains: Vec<(String, String, Vec<DomainPattern>)> = Vec::new();
        let mut domain_sigs: HashSet<Vec<usize>> = HashSet::new();
        for p in &patterns {
            let (label, name) = match p {
                DomainPattern::Exact(n) => (n.clone(), n.clone()),
                DomainPattern::Wildcard(s) => (format!("*.{s}"), format!("flowgate-other.{s}")),
            };
            let sig: Vec<usize> = patterns
                .iter()
                .enumerate()
                .filter(|(_, q)| q.matches(&name))
                .map(|(i, _)| i)
                .collect();
            if !sig.is_empty() && domain_sigs.insert(sig.clone()) {
                let matching = sig.iter().map(|&i| patterns[i].clone()).collect();
                domains.push((label, name, matching));
            }
        }

        // 7. The classes as reported, and how each is probed.
        let mut classes: Vec<Class> = Vec::new();
        let mut probes: Vec<Probe> = Vec::new();
        for wc in &wclasses {
            let m0 = &members[wc.members[0]];
            classes.push(Class {
                members: wc
                    .members
                    .iter()
                    .map(|&m| Endpoint::Workload(members[m].name.clone()))
                    .collect(),
            });
            probes.push(Probe {
                before: m0.before.map(|x| x.1),
                after: m0.after.map(|x| x.1),
                fqdn: None,
            });
        }
        let ext0 = classes.len();
        for &(c, ip) in &externals {
            let ranges =
                atoms.members[c].iter().map(|&(v6, f, l)| (ip_of(v6, f), ip_of(v6, l))).collect();
            classes.push(Class {
                members: vec![Endpoint::Addresses { label: atoms.label(c), ranges }],
            });
            probes.push(Probe { before: Some(ip), after: Some(ip), fqdn: None });
        }
        let dom0 = classes.len();
        for (label, name, pats) in &domains {
            classes.push(Class {
                members: vec![Endpoint::Domain { label: label.clone(), patterns: pats.clone() }],
            });
            let any = Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            probes.push(Probe { before: any, after: any, fqdn: Some(name.clone()) });
        }
        self.stats.workload_classes = wclasses.len();
        self.stats.external_classes = dom0 - ext0;
        self.stats.domain_classes = classes.len() - dom0;

        // 8. Decide the pairs a changed side can touch.
        let mut changes = Vec::new();
        let nw = wclasses.len();
        // Rows whose egress side did not change only meet the destinations whose ingress
        // side did: list those once instead of scanning every destination per row.
        let ingress_touched: Vec<usize> =
            (0..nw).filter(|&d| wclasses[d].touched_ingress).collect();
        for src in 0..dom0 {
            let src_w = (src < nw).then(|| &wclasses[src]);
            let whole_row = src_w.is_some_and(|w| w.touched_egress);
            let row: Box<dyn Iterator<Item = usize>> = if whole_row {
                Box::new(0..classes.len())
            } else {
                Box::new(ingress_touched.iter().copied())
            };
            for dst in row {
                let dst_w = (dst < nw).then(|| &wclasses[dst]);
                if src_w.is_none() && dst_w.is_none() {
                    continue; // external → external / domain: policy.unknown, not policy
                }
                self.stats.pairs += 1;
                self.pair(src, dst, src_w, dst_w, &probes, &mut changes);
            }
        }
        (Diff { classes, changes, probes }, self.stats)
    }

    /// Every changed segment between two classes, merged into ranges per protocol and
    /// decision pair.
    fn pair(
        &mut self,
        src: usize,
        dst: usize,
        src_w: Option<&WorkloadClass>,
        dst_w: Option<&WorkloadClass>,
        probes: &[Probe],
        out: &mut Vec<ClassChange>,
    ) {
        // One buffer for every pair's cut points.
        let mut cuts = std::mem::take(&mut self.cuts);
        let (ps, pd) = (&probes[src], &probes[dst]);
        let fqdn = pd.fqdn.as_deref();
        for (pi, &proto) in PROTOCOLS.iter().enumerate() {
            cuts.clear();
            cuts.push(1);
            if let Some(w) = src_w {
                cuts.extend_from_slice(&w.egress.0[pi]);
            }
            if let Some(w) = dst_w {
                cuts.extend_from_slice(&w.ingress.0[pi]);
                cuts.extend_from_slice(&w.named.0[pi]);
            }
            cuts.sort_unstable();
            cuts.dedup();
            cuts.retain(|&c| c >= 1);
            // Open changes by decision pair: (key, ranges).
            let mut open: Vec<(ChangeKey, Vec<(u16, u16)>)> = Vec::new();
            for (k, &start) in cuts.iter().enumerate() {
                let end = cuts.get(k + 1).map_or(u16::MAX, |n| n - 1);
                let ask =
                    |side: Side<'_>, s: Option<IpAddr>, d: Option<IpAddr>| -> Option<Decision> {
                        let q = FlowQuery { src: s?, dst: d?, dst_port: start, proto, fqdn };
                        Some(side.compiled.decide(&q))
                    };
                let b = ask(self.before, ps.before, pd.before);
                let a = ask(self.after, ps.after, pd.after);
                self.stats.decisions += 2;
                let allowed = |d: Option<Decision>| d.is_some_and(|d| d.verdict.is_allow());
                let kind = match (allowed(b), allowed(a)) {
                    (false, true) => ChangeKind::Opened,
                    (true, false) => ChangeKind::Closed,
                    _ => continue,
                };
                let key =
                    ChangeKey { kind, before: b.map(decision_key), after: a.map(decision_key) };
                match open.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, ranges)) => match ranges.last_mut() {
                        Some(last) if last.1.checked_add(1) == Some(start) => last.1 = end,
                        _ => ranges.push((start, end)),
                    },
                    None => open.push((key, vec![(start, end)])),
                }
            }
            for (key, ports) in open {
                out.push(ClassChange { kind: key.kind, from: src, to: dst, proto, ports });
            }
        }
        self.cuts = cuts;
    }
}

/// What makes two ports' changes the same change: the verdicts and deciding policies.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ChangeKey {
    kind: ChangeKind,
    before: Option<(Verdict, Option<super::PolicyId>)>,
    after: Option<(Verdict, Option<super::PolicyId>)>,
}

fn decision_key(d: Decision) -> (Verdict, Option<super::PolicyId>) {
    (d.verdict, d.policy)
}

#[derive(PartialEq, Eq, Hash)]
struct WorkloadSig {
    sels: [Vec<u32>; 2],
    addr: [Option<u32>; 2],
    named: [Option<Vec<(String, u16, u8)>>; 2],
}

/// The compiled id of inventory workload `i` (the compiler numbers workloads in
/// inventory order; checked by name, with a search as the fallback).
fn compiled_id(c: &CompiledPolicy, w: &Workload, i: usize) -> Option<WorkloadId> {
    let id = WorkloadId(i as u32);
    match c.workload_name(id) {
        Some(n) if n.namespace == w.namespace && n.name == w.name => Some(id),
        _ => c.find_workload(&w.namespace, &w.name),
    }
}
