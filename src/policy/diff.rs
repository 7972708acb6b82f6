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
//! - **Sides, once per peer group.** A pair's verdict is its egress side (the source's
//!   rules towards the destination) and its ingress side (the destination's rules from
//!   the source), combined as `decide` combines them. A side tells its peers apart only
//!   by the selectors its rules name, their address class and (egress) their named ports:
//!   its outcomes are worked out once per group of peers alike in those, through the
//!   engine's own side evaluation, and shared by the group. A pair whose egress or
//!   ingress side refuses everything on both sides cannot change and costs a lookup; the
//!   others combine four short step lists. The rows are shared out between threads.
//! - **Touched sides.** When the inventory and the defaults are the same on both sides,
//!   only the policies that differ can change a verdict, and only on the sides of the
//!   workloads they select: a changed egress side re-decides that source towards
//!   everything, a changed ingress side everything towards that destination.
//!
//! Deciding is the engine's own side evaluation (the one [`CompiledPolicy::decide`] and
//! `explain` use; `explain` gives the reason), so the diff agrees with `flowgate explain`
//! flow by flow; `tests/diff_props.rs` holds it against deciding every flow by brute
//! force.
//!
//! A workload absent from one side's inventory (or owning no address there) reaches and
//! is reached by nothing on that side.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::decide::End;
use super::explain::{Explanation, SideTrace};
use super::ir::{
    DomainPattern, Inventory, Labels, NAMESPACE_NAME_LABEL, NamedPort, Namespace, NamespaceMatch,
    Peer, Peers, Policy, PolicySet, PortMatch, SelectorOp, Workload, WorkloadSelector,
};
use super::{Cause, CompiledPolicy, DenyReason, FlowQuery, PolicyId, Verdict, WorkloadId};
use crate::flow::{Direction, Proto};

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
    /// The selector ids matching the class, per inventory table (sorted).
    sels: [Vec<u32>; 2],
    /// Per direction (0 = egress, 1 = ingress) and side (before, after): the selector
    /// ids (of that side's inventory table, sorted) of the workload peers of the rules
    /// that apply to the class. Its side in that direction can only tell two peers apart
    /// by these, by their address class and (egress) by their named ports.
    peer_sels: [[Vec<u32>; 2]; 2],
    /// The class's address class on each side (`None`: absent there).
    addr: [Option<u32>; 2],
    /// Interned named ports of both sides.
    named_id: u32,
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
}

impl<'a> Builder<'a> {
    fn new(before: Side<'a>, after: Side<'a>) -> Builder<'a> {
        Builder { before, after, stats: Stats::default() }
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
        // Per side, per policy: the selector ids of its rules' workload peers, per
        // direction (0 = egress, 1 = ingress).
        let mut peer_sels: [Vec<[Vec<u32>; 2]>; 2] = [Vec::new(), Vec::new()];
        for (s, side) in [before, after].into_iter().enumerate() {
            let t = inv_of(s == 1);
            for p in &side.set.policies {
                let mut dirs: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
                for (d, rules) in [(0, &p.egress), (1, &p.ingress)] {
                    for r in rules.iter().flatten() {
                        let Peers::List(list) = &r.peers else { continue };
                        for peer in list {
                            if let Peer::Workloads(sel) = peer
                                && let Some(&id) = sel_ids[t].get(&SelKey(sel))
                            {
                                dirs[d].push(id);
                            }
                        }
                    }
                }
                peer_sels[s].push(dirs);
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
        let mut named_ids: HashMap<[NamedPorts; 2], u32> = HashMap::new();
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
                    let next = named_ids.len() as u32;
                    let named_id = *named_ids.entry(sig.named.clone()).or_insert(next);
                    let mut wc = WorkloadClass {
                        members: vec![m],
                        peer_sels: Default::default(),
                        addr: sig.addr,
                        named_id,
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
                                for (dir, ids) in wc.peer_sels.iter_mut().zip(&peer_sels[s][pi]) {
                                    dir[s].extend_from_slice(ids);
                                }
                                if let Some(rules) = &p.egress {
                                    wc.egress.add_rules(rules);
                                }
                                if let Some(rules) = &p.ingress {
                                    wc.ingress.add_rules(rules);
                                }
                            }
                        }
                    }
                    for v in wc.peer_sels.iter_mut().flatten() {
                        v.sort_unstable();
                        v.dedup();
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
        let nw = wclasses.len();
        // Rows whose egress side did not change only meet the destinations whose ingress
        // side did: list those once instead of scanning every destination per row.
        let ingress_touched: Vec<usize> =
            (0..nw).filter(|&d| wclasses[d].touched_ingress).collect();
        let sides = [before, after];
        let ends = probes
            .iter()
            .map(|p| {
                let end = |side: Side<'_>, ip: Option<IpAddr>| ip.map(|ip| side.compiled.end(ip));
                [end(before, p.before), end(after, p.after)]
            })
            .collect();
        let pairs = Pairs {
            sides,
            wclasses: &wclasses,
            probes: &probes,
            ends,
            table: [inv_of(false), inv_of(true)],
            classes: classes.len(),
            ingress_touched: &ingress_touched,
        };
        let (changes, counts) = pairs.run(dom0);
        self.stats.pairs = counts.0;
        self.stats.decisions = counts.1;
        (Diff { classes, changes, probes }, self.stats)
    }
}

// ---------------------------------------------------------------------------------------
// The pairs

/// Step 8: every (source, destination) class pair a changed side can touch.
///
/// A pair's verdict on each side is its egress side (the source's rules towards the
/// destination) and its ingress side (the destination's rules from the source), combined
/// as `decide` combines them. A side only tells its peers apart by the selectors its rules
/// name, their address class and (egress) their named ports, so its outcomes are worked
/// out once per group of peers it cannot tell apart — through the engine's own side
/// evaluation, port segment by port segment — and shared by the group. A pair whose
/// egress or ingress side refuses everything on both sides cannot change: one lookup.
/// The rows are shared out between threads (each keeps its own ingress groups).
struct Pairs<'b, 'a> {
    sides: [Side<'a>; 2],
    wclasses: &'b [WorkloadClass],
    probes: &'b [Probe],
    /// Per class and side: the endpoint as the engine resolves it (`None`: absent).
    ends: Vec<[Option<End>; 2]>,
    /// The inventory table of each side.
    table: [usize; 2],
    classes: usize,
    ingress_touched: &'b [usize],
}

/// One side's outcome, as far as a verdict goes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Out {
    allow: bool,
    cause: Cause,
    policy: Option<u32>,
}

/// Per protocol, an outcome from each listed port up to the next (the first is port 1).
type Steps = [Vec<(u16, Out)>; 3];

/// One endpoint's side (egress or ingress) towards a group of peers it cannot tell apart.
struct SideFn {
    /// Per side (before, after); `None` where it has no such side (not a workload).
    steps: [Option<Steps>; 2],
    /// Refuses everything, or an endpoint is absent, on both sides: no pair through it
    /// can change.
    dead: bool,
}

/// The groups of one endpoint's side: peer key → index into `fns`.
#[derive(Default)]
struct Groups {
    ids: HashMap<Box<[u64]>, u32>,
    fns: Vec<SideFn>,
}

/// What one thread gives back: its changes, pairs looked at, side evaluations.
type Part = (Vec<ClassChange>, usize, usize);

impl Pairs<'_, '_> {
    /// The changes of every pair of the rows `0..rows`, and (pairs, side evaluations).
    fn run(&self, rows: usize) -> (Vec<ClassChange>, (usize, usize)) {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let threads = if rows < 64 { 1 } else { threads };
        let parts: Vec<Part> = if threads == 1 {
            vec![self.rows(0, 1, rows)]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads)
                    .map(|k| scope.spawn(move || self.rows(k, threads, rows)))
                    .collect();
                // A worker only panics on a broken internal invariant: pass it on.
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            })
        };
        let (mut pairs, mut decisions) = (0, 0);
        let mut changes = Vec::new();
        for (c, p, d) in parts {
            changes.extend(c);
            pairs += p;
            decisions += d;
        }
        // Rows were interleaved between threads: back to row order (stable, so a pair's
        // changes keep their protocol order).
        changes.sort_by_key(|c| (c.from, c.to));
        (changes, (pairs, decisions))
    }

    /// Rows `first, first + step, …` below `rows`.
    fn rows(&self, first: usize, step: usize, rows: usize) -> Part {
        let nw = self.wclasses.len();
        let mut ingress: Vec<Groups> = (0..nw).map(|_| Groups::default()).collect();
        let mut out = Vec::new();
        let (mut pairs, mut decisions) = (0, 0);
        let mut key = Vec::new();
        for src in (first..rows).step_by(step) {
            let src_w = self.wclasses.get(src);
            let whole_row = src_w.is_some_and(|w| w.touched_egress);
            let row: &mut dyn Iterator<Item = usize> = if whole_row {
                &mut (0..self.classes)
            } else {
                &mut self.ingress_touched.iter().copied()
            };
            let mut egress = Groups::default();
            for dst in row {
                if src_w.is_none() && dst >= nw {
                    continue; // external → external / domain: policy.unknown, not policy
                }
                pairs += 1;
                // The ingress side first: its groups are kept across rows, so a refused
                // destination costs a lookup before the row's egress side is worked out.
                let i = match self.wclasses.get(dst) {
                    Some(w) => {
                        self.peer_key(&mut key, w, 1, src);
                        let groups = &mut ingress[dst];
                        let g = self.group(groups, &key, 1, src, dst, &mut decisions);
                        let f = &groups.fns[g];
                        if f.dead {
                            continue;
                        }
                        Some(f)
                    }
                    None => None,
                };
                let e = match src_w {
                    Some(w) => {
                        self.peer_key(&mut key, w, 0, dst);
                        let g = self.group(&mut egress, &key, 0, src, dst, &mut decisions);
                        let f = &egress.fns[g];
                        if f.dead {
                            continue;
                        }
                        Some(f)
                    }
                    None => None,
                };
                self.combine(src, dst, e, i, &mut out);
            }
        }
        (out, pairs, decisions)
    }

    /// How class `subject`'s side in direction `dir` (0 egress, 1 ingress) sees class
    /// `peer`: two peers with one key get the same outcomes from it.
    fn peer_key(&self, key: &mut Vec<u64>, subject: &WorkloadClass, dir: usize, peer: usize) {
        key.clear();
        let Some(w) = self.wclasses.get(peer) else {
            // External and domain classes: one each.
            key.extend([1, peer as u64]);
            return;
        };
        let addr = |a: Option<u32>| a.map_or(u64::MAX, u64::from);
        let named = if dir == 0 { u64::from(w.named_id) } else { 0 };
        key.extend([0, named, addr(w.addr[0]), addr(w.addr[1])]);
        for x in 0..2 {
            let sels = &w.sels[self.table[x]];
            let (mut word, mut bit) = (0u64, 0);
            for r in &subject.peer_sels[dir][x] {
                if sels.binary_search(r).is_ok() {
                    word |= 1 << bit;
                }
                bit += 1;
                if bit == 64 {
                    key.push(word);
                    (word, bit) = (0, 0);
                }
            }
            key.push(word);
        }
    }

    /// The group of `key` in `groups`, its outcomes worked out on first sight from the
    /// pair (`src`, `dst`).
    fn group(
        &self,
        groups: &mut Groups,
        key: &[u64],
        dir: usize,
        src: usize,
        dst: usize,
        decisions: &mut usize,
    ) -> usize {
        if let Some(&g) = groups.ids.get(key) {
            return g as usize;
        }
        let f = self.side_fn(dir, src, dst, decisions);
        let g = groups.fns.len();
        groups.fns.push(f);
        groups.ids.insert(key.into(), g as u32);
        g
    }

    /// The outcomes of `src`'s egress side (dir 0) or `dst`'s ingress side (dir 1) for
    /// the pair, at the start of every port segment that side's rules and the
    /// destination's named ports cut.
    fn side_fn(&self, dir: usize, src: usize, dst: usize, decisions: &mut usize) -> SideFn {
        let subject = if dir == 0 { src } else { dst };
        let wc = &self.wclasses[subject];
        let dst_named = self.wclasses.get(dst).map(|w| &w.named);
        let mut steps: [Option<Steps>; 2] = [None, None];
        let mut dead = true;
        let mut cuts: Vec<u16> = Vec::new();
        for (x, steps_x) in steps.iter_mut().enumerate() {
            let (Some(s_end), Some(d_end)) = (self.ends[src][x], self.ends[dst][x]) else {
                continue; // an endpoint is absent: nothing is allowed on this side
            };
            let (me, peer) = if dir == 0 { (s_end, d_end) } else { (d_end, s_end) };
            let Some(w) = me.workload else {
                dead = false; // no side: it lets everything through
                continue;
            };
            let (Some(src_ip), Some(dst_ip)) = (self.ip(src, x), self.ip(dst, x)) else {
                continue;
            };
            let c = self.sides[x].compiled;
            let fqdn = self.probes[dst].fqdn.as_deref();
            let mut per: Steps = Default::default();
            for (pi, &proto) in PROTOCOLS.iter().enumerate() {
                cuts.clear();
                cuts.push(1);
                cuts.extend_from_slice(if dir == 0 { &wc.egress.0[pi] } else { &wc.ingress.0[pi] });
                if let Some(n) = dst_named {
                    cuts.extend_from_slice(&n.0[pi]);
                }
                cuts.sort_unstable();
                cuts.dedup();
                cuts.retain(|&c| c >= 1);
                for &port in &cuts {
                    let q = FlowQuery { src: src_ip, dst: dst_ip, dst_port: port, proto, fqdn };
                    let o = side_outcome(c, w, dir == 0, &q, peer, d_end);
                    *decisions += 1;
                    dead &= !o.allow;
                    if per[pi].last().is_none_or(|l| l.1 != o) {
                        per[pi].push((port, o));
                    }
                }
            }
            *steps_x = Some(per);
        }
        SideFn { steps, dead }
    }

    fn ip(&self, class: usize, x: usize) -> Option<IpAddr> {
        let p = &self.probes[class];
        if x == 0 { p.before } else { p.after }
    }

    /// The pair's changes from its two sides' outcomes, merged into ranges per protocol
    /// and decision pair.
    fn combine(
        &self,
        src: usize,
        dst: usize,
        e: Option<&SideFn>,
        i: Option<&SideFn>,
        out: &mut Vec<ClassChange>,
    ) {
        let present = [0, 1].map(|x| self.ends[src][x].is_some() && self.ends[dst][x].is_some());
        let unknown_allow =
            self.sides.map(|s| s.compiled.options().unknown == super::DefaultAction::Allow);
        for (pi, &proto) in PROTOCOLS.iter().enumerate() {
            // before egress, before ingress, after egress, after ingress
            let lists =
                [steps_of(e, 0, pi), steps_of(i, 0, pi), steps_of(e, 1, pi), steps_of(i, 1, pi)];
            let mut at = [0usize; 4];
            let mut start: u32 = 1;
            // Open changes by decision pair: (key, ranges).
            let mut open: Vec<(ChangeKey, Vec<(u16, u16)>)> = Vec::new();
            loop {
                let mut next: u32 = 1 << 16;
                for (l, a) in lists.iter().zip(&mut at) {
                    while let Some(&(s, _)) = l.get(*a + 1) {
                        if u32::from(s) <= start {
                            *a += 1;
                        } else {
                            next = next.min(u32::from(s));
                            break;
                        }
                    }
                }
                let cur = |k: usize| lists[k].get(at[k]).map(|s| s.1);
                let decide = |x: usize| {
                    present[x].then(|| verdict_of(cur(2 * x), cur(2 * x + 1), unknown_allow[x]))
                };
                let (b, a) = (decide(0), decide(1));
                let allowed = |d: Option<DecisionKey>| d.is_some_and(|d| d.0.is_allow());
                let kind = match (allowed(b), allowed(a)) {
                    (false, true) => Some(ChangeKind::Opened),
                    (true, false) => Some(ChangeKind::Closed),
                    _ => None,
                };
                if let Some(kind) = kind {
                    let key = ChangeKey { kind, before: b, after: a };
                    let (first, last) = (start as u16, (next - 1) as u16);
                    match open.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, ranges)) => match ranges.last_mut() {
                            Some(l) if l.1.checked_add(1) == Some(first) => l.1 = last,
                            _ => ranges.push((first, last)),
                        },
                        None => open.push((key, vec![(first, last)])),
                    }
                }
                if next > u32::from(u16::MAX) {
                    break;
                }
                start = next;
            }
            for (key, ports) in open {
                out.push(ClassChange { kind: key.kind, from: src, to: dst, proto, ports });
            }
        }
    }
}

/// A side's outcomes on side `x` for protocol `pi`; empty where it has no such side.
fn steps_of(f: Option<&SideFn>, x: usize, pi: usize) -> &[(u16, Out)] {
    f.and_then(|f| f.steps[x].as_ref()).map_or(&[][..], |s| &s[pi][..])
}

/// One side's outcome through the engine's own side evaluation (`decide.rs`), the one
/// `decide` and `explain` use: the diff agrees with them by construction.
fn side_outcome(
    c: &CompiledPolicy,
    w: u32,
    egress: bool,
    q: &FlowQuery<'_>,
    peer: End,
    dst: End,
) -> Out {
    let dir = if egress { Direction::Egress } else { Direction::Ingress };
    let o = c.side_at(&c.sides, w, dir, q, peer, dst, c.port_segment(q));
    Out { allow: o.allow, cause: o.cause(), policy: o.policy }
}

/// A flow's verdict and deciding policy from its two sides' outcomes (`None`: no such
/// side), as `decide` combines them: the egress side first, the ingress side's policy
/// before the egress side's when both allow.
fn verdict_of(e: Option<Out>, i: Option<Out>, unknown_allow: bool) -> DecisionKey {
    let deny = |direction, cause| Verdict::Deny(DenyReason { direction, cause });
    match (e, i) {
        (None, None) if unknown_allow => (Verdict::Allow, None),
        (None, None) => (deny(None, Cause::Unknown), None),
        (Some(e), _) if !e.allow => {
            (deny(Some(Direction::Egress), e.cause), e.policy.map(PolicyId))
        }
        (_, Some(i)) if !i.allow => {
            (deny(Some(Direction::Ingress), i.cause), i.policy.map(PolicyId))
        }
        _ => (Verdict::Allow, i.and_then(|i| i.policy).or(e.and_then(|e| e.policy)).map(PolicyId)),
    }
}

/// A decision as far as a change goes: the verdict and the deciding policy.
type DecisionKey = (Verdict, Option<PolicyId>);

/// What makes two ports' changes the same change: the verdicts and deciding policies.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ChangeKey {
    kind: ChangeKind,
    before: Option<DecisionKey>,
    after: Option<DecisionKey>,
}

/// A workload's named ports, sorted, on one side (`None`: absent there).
type NamedPorts = Option<Vec<(String, u16, u8)>>;

#[derive(PartialEq, Eq, Hash)]
struct WorkloadSig {
    sels: [Vec<u32>; 2],
    addr: [Option<u32>; 2],
    named: [NamedPorts; 2],
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
