//! Compilation: [`PolicySet`] → [`CompiledPolicy`], every selector resolved.
//!
//! What the tables hold, so that [`CompiledPolicy::decide`] only indexes and compares:
//! - identity: an [`Lpm`] table from address to workload;
//! - per workload and direction, a [`SideTable`]: the flattened, already ordered list of
//!   Admin rules that apply (policies in tier order, rules in order), the NetworkPolicies
//!   that isolate it and all their rules, and the Baseline rules. Lists are interned:
//!   workloads that the same policies select share one list;
//! - per rule ([`CRule`]), its peers as an interned workload set ([`WorkloadSet`]: a
//!   sorted id list when small, a bitset when large), its CIDRs as address ranges, its
//!   domain patterns, and its ports as ranges or interned port names;
//! - per workload, its named ports with interned names.
//!
//! Two views of the side tables exist when the set has audit-mode policies: one without
//! them (the verdict) and one with every live policy (the would-be verdict). Expired
//! policies are left out of both; their ids stay valid for names.
//!
//! Incremental: each policy is first compiled on its own into a `PolicyPart` (selectors
//! resolved, rules in compiled form, names), which depends on that policy and the
//! inventory only; the [`CompileCache`] keeps the parts by the policy's `Arc`, and the
//! compiled inventory (`InventoryTables`: LPM, workload names, named ports) and its label
//! index per inventory. A reload after one file changed builds that file's parts and
//! shares the inventory tables with the generation before by `Arc`; the whole-set pass
//! that remains (rule ids, interning, side tables, prefilters) only copies and looks up.
//! The result equals a compilation from scratch table by table
//! (tests/incremental_props.rs).
//!
//! Not here: the evaluation itself (`decide.rs`) and its trace (`explain.rs`).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;

use super::inventory::{Key, Lpm, Range};
use super::ir::{
    Action, DomainPattern, Inventory, Labels, Mode, NAMESPACE_NAME_LABEL, NamespaceMatch, Peer,
    Peers, Policy, PolicyKind, PolicySet, PortMatch, Rule, SelectorOp, Tier, WorkloadSelector,
};
use super::{DefaultAction, PolicyId, WorkloadId};
use crate::flow::{Direction, Proto};

/// Inputs to compilation besides the policy set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    pub default: DefaultAction,
    pub unknown: DefaultAction,
    /// Policies that have expired by `now` are left out; TTLs without `created_at` count from it.
    pub now: SystemTime,
}

#[derive(Debug, Error)]
pub enum CompileError {
    #[error("policy {policy}: {message}")]
    Invalid { policy: String, message: String },
    #[error("inventory: {message}")]
    Inventory { message: String },
}

/// A workload's name, borrowed from the compiled tables. Displays as `ns/name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadName<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

impl std::fmt::Display for WorkloadName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// "No such entry" in the u32-indexed tables.
pub(super) const NONE: u32 = u32::MAX;

/// A multiply-rotate hasher (the FxHash scheme) for the compiler's maps and the hot
/// path's domain index. SipHash was a quarter of compile time at 10,000 policies
/// (benches/decide.rs, `compile/*`); its flooding resistance buys nothing here: every
/// key is written by the policy author, never by the traffic (a flow's name is only
/// looked up, and a lookup costs at most the length of one chain of author keys).
#[derive(Clone, Copy, Default)]
pub(super) struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    /// The product's high bits are the well-mixed ones; the table indexes by the low
    /// bits, so rotate them down.
    #[inline]
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

pub(super) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

/// A slice of one of the pools, by offset and length (half the size of a `Range<usize>`,
/// and `Copy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(super) struct Span {
    pub(super) off: u32,
    pub(super) len: u32,
}

impl Span {
    #[inline]
    pub(super) fn of<T>(self, pool: &[T]) -> &[T] {
        &pool[self.off as usize..(self.off + self.len) as usize]
    }
}

/// A set of workloads, resolved from selectors at compile time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum WorkloadSet {
    Empty,
    /// Sorted ids in `CompiledPolicy::set_ids`.
    Sorted(Span),
    /// A bitset over all workloads in `CompiledPolicy::set_bits`.
    Bits(u32),
}

/// One port clause, compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum CPort {
    Range {
        proto: Proto,
        first: u16,
        last: u16,
    },
    /// A named port: interned name (`NONE` if no workload has it), optional protocol.
    Named {
        proto: Option<Proto>,
        name: u32,
    },
}

/// A CIDR peer with its exceptions (spans into `CompiledPolicy::excepts`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct CCidr {
    pub(super) net: Range,
    pub(super) except: Span,
}

/// What the port prefilter (`CompiledPolicy::port_bits`) leaves to check of a rule's
/// ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PortCheck {
    /// No `ports` list: every port.
    None,
    /// Numbers and ranges only: the prefilter is exact, so `decide` does not read the
    /// rule's ports again (a cache miss per rule on the realistic sets:
    /// benches/decide.rs `decide_realistic`).
    Exact,
    /// Some clause is named: the prefilter admits every number a workload gives that
    /// name, so `decide` checks the destination's own.
    Named,
}

/// One rule, compiled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct CRule {
    pub(super) action: Action,
    /// `Peers::Any`.
    pub(super) any_peer: bool,
    pub(super) port_check: PortCheck,
    pub(super) workloads: WorkloadSet,
    pub(super) cidrs: Span,
    pub(super) domains: Span,
    pub(super) ports: Span,
    pub(super) policy: u32,
    /// Position of the rule in its policy's `ingress`/`egress` list.
    pub(super) index: u32,
}

/// An Admin or Baseline rule list with its port-segmented form.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct TierList {
    /// Rule ids, in evaluation order.
    pub(super) rules: Span,
    /// Index into `CompiledPolicy::seg_tables` of the port-segmented form of `rules`, or
    /// `NONE` (then `decide` walks `rules` with the bitset prefilter).
    pub(super) seg: u32,
}

impl TierList {
    /// A list not (yet) split by port segment.
    fn whole(rules: Span) -> TierList {
        TierList { rules, seg: NONE }
    }
}

/// What applies to one workload in one direction. Spans into `CompiledPolicy::lists`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct SideTable {
    pub(super) admin: TierList,
    pub(super) baseline: TierList,
    /// Isolating NetworkPolicy ids, by policy index; empty = not isolated.
    pub(super) np_policies: Span,
    /// The rules of those NetworkPolicies, in the same order.
    pub(super) np_rules: Span,
    /// Offset in `CompiledPolicy::admin_pool` of this side's subject bitset over Admin
    /// rule ranks (`admin_words[dir]` words), or `NONE` (then `decide` walks `admin`).
    pub(super) admin_bits: u32,
}

/// Names and metadata of a policy (every policy of the set, live or not).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PolicyMeta {
    pub(super) name: String,
    pub(super) kind: PolicyKind,
    /// Rule names (ANP) per direction, for `explain`.
    pub(super) ingress_names: Vec<Option<String>>,
    pub(super) egress_names: Vec<Option<String>>,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct WorkloadMeta {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) addrs: Vec<ipnet::IpNet>,
    /// Into `CompiledPolicy::ports`.
    pub(super) ports: Span,
}

/// A named port of a workload: interned name, protocol, number.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct WPort {
    pub(super) name: u32,
    pub(super) proto: Proto,
    pub(super) port: u16,
}

/// The immutable, shareable result of compilation. `Send + Sync`: plain owned data
/// (the one cell, the name index, is written once on first use); share it behind an
/// `Arc` (the `PolicySnapshot`). Equality is structural, table by table: two compilations
/// of the same set are equal, however they were reached (`compile` or `compile_with`).
#[derive(Debug, PartialEq)]
pub struct CompiledPolicy {
    pub(super) opts: CompileOptions,
    /// The compiled inventory, shared with every compilation of the same inventory.
    pub(super) inv: Arc<InventoryTables>,
    /// Shared with the policy's [`PolicyPart`].
    pub(super) policies: Vec<Arc<PolicyMeta>>,
    pub(super) rules: Vec<CRule>,
    pub(super) cidrs: Vec<CCidr>,
    pub(super) excepts: Vec<Range>,
    pub(super) domains: Vec<DomainPattern>,
    pub(super) cports: Vec<CPort>,
    pub(super) set_ids: Vec<u32>,
    pub(super) set_bits: Vec<u64>,
    /// Words per bitset.
    pub(super) bits_words: usize,
    pub(super) lists: Vec<u32>,
    /// `[workload * 2 + dir]`, dir 0 = ingress, 1 = egress: the verdict view.
    pub(super) sides: Vec<SideTable>,
    /// The same with audit-mode policies enforced; empty when the set has none live.
    pub(super) audit_sides: Vec<SideTable>,
    /// The port prefilter, per protocol class ([`port_class`]): segment start ports,
    /// ascending from 0, and per segment a bitset over rule ids of the rules whose ports
    /// could match a port in that segment (`rule_words` words each). `decide` tests one
    /// bit before looking at a rule, so the rules of other ports cost one load each
    /// instead of a full match (see benches/decide.rs, `decide/*/…+100anp+banp`).
    pub(super) port_starts: [Vec<u16>; 4],
    pub(super) port_bits: [Vec<u64>; 4],
    pub(super) rule_words: usize,
    /// Cluster-tier rule lists split by port segment: `seg_tables[i][class]` is the offset
    /// in `seg_spans` of one span per segment of that class (`port_starts[class]`), each
    /// the rules of the list that may match a port in the segment, in list order. With
    /// 100 ANPs a workload's Admin list has dozens of rules, of which a given port
    /// concerns a handful (benches/decide.rs, `…+100anp+banp`).
    pub(super) seg_tables: Vec<[u32; 4]>,
    pub(super) seg_spans: Vec<Span>,
    /// Admin tier as bitsets (see `Builder::admin_index`): per direction, Admin rules get
    /// a rank (their evaluation order across all Admin policies); a side's candidates are
    /// the ranks set in its subject bitset, the peer's class bitset and the port
    /// segment's bitset, all supersets of what can match, so `decide` verifies each
    /// candidate in rank order and the first that matches is the first match of the
    /// list walk. With 100 ANPs this replaces a walk over dozens of rules by a few word
    /// ANDs (benches/decide.rs, `…+100anp+banp`).
    pub(super) admin_words: [usize; 2],
    /// Rank → rule id, per direction.
    pub(super) admin_rank: [Vec<u32>; 2],
    /// Subject and peer-class bitsets.
    pub(super) admin_pool: Vec<u64>,
    /// Per workload and direction, offset in `admin_pool` of its peer class bitset.
    pub(super) admin_class: Vec<[u32; 2]>,
    /// The classes of a peer that is no workload, by address: per family (0 = IPv4,
    /// 1 = IPv6) the starts of the elementary intervals of all Admin CIDRs (first is 0)
    /// and per interval its class offsets per direction.
    pub(super) admin_ext_starts: [Vec<u128>; 2],
    pub(super) admin_ext_class: [Vec<[u32; 2]>; 2],
    /// Offset in `admin_pool` of the ranks with domain peers: candidates only when the
    /// flow carries a name, so they are kept out of the classes.
    pub(super) admin_domains: [u32; 2],
    /// The same split by pattern, so that a flow's name brings in only the rules that
    /// can match it: per direction, an exact name → offset in `admin_pool` of the ranks
    /// with that `Exact` pattern, and a wildcard's suffix → the ranks with that
    /// `Wildcard`. `decide` looks up the name and each suffix after one of its dots
    /// instead of comparing the name with every domain rule of the subject (with 100
    /// ANPs that was most of the time of a flow with a name: benches/decide.rs,
    /// `decide/*/…+100anp+banp`).
    pub(super) admin_dom_exact: [FastMap<Box<str>, u32>; 2],
    pub(super) admin_dom_suffix: [FastMap<Box<str>, u32>; 2],
    /// Per direction and protocol class, per port segment: ranks whose ports may match.
    pub(super) admin_port: [[Vec<u64>; 4]; 2],
    next_expiry: Option<SystemTime>,
    live_policies: usize,
    /// Workload ids sorted by (namespace, name), for [`CompiledPolicy::find_workload`];
    /// built on first use (the CLI and the admin API ask, a reload does not).
    by_name: NameIndex,
}

/// The lazily built index behind [`CompiledPolicy::find_workload`]. Derived from the
/// workloads, so it takes no part in equality.
#[derive(Debug, Default)]
struct NameIndex(std::sync::OnceLock<Vec<u32>>);

impl PartialEq for NameIndex {
    fn eq(&self, _: &NameIndex) -> bool {
        true
    }
}

/// Index of `dir` in the side tables.
#[inline]
pub(super) const fn dir_index(dir: Direction) -> usize {
    match dir {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// A selector by value with its hash worked out once (see [`SelKey::of`]), so that
/// identical selectors are resolved once and a miss (the lookup, then the insert) walks
/// the selector's label maps once, not twice.
struct SelKey<'a>(&'a WorkloadSelector, u64);

impl<'a> SelKey<'a> {
    fn of(sel: &'a WorkloadSelector) -> SelKey<'a> {
        let mut h = FastHasher::default();
        SelContent(sel).hash(&mut h);
        SelKey(sel, h.finish())
    }
}

impl PartialEq for SelKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.1 == other.1 && self.0 == other.0
    }
}
impl Eq for SelKey<'_> {}
impl Hash for SelKey<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.1);
    }
}

/// The content hash behind [`SelKey`].
struct SelContent<'a>(&'a WorkloadSelector);

impl Hash for SelContent<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        fn labels<H: Hasher>(sel: &super::ir::LabelSelector, h: &mut H) {
            sel.match_labels.hash(h);
            for r in &sel.match_expressions {
                r.key.hash(h);
                (r.op as u8).hash(h);
                r.values.hash(h);
            }
        }
        match &self.0.namespaces {
            NamespaceMatch::Named(n) => {
                0u8.hash(h);
                n.hash(h);
            }
            NamespaceMatch::Selector(s) => {
                1u8.hash(h);
                labels(s, h);
            }
        }
        labels(&self.0.pods, h);
    }
}

/// The inventory's indexes for resolving workload selectors. Built once per inventory:
/// the [`CompileCache`] keeps it, so a reload that changed policies only does not index
/// 10,000 workloads' labels again.
#[derive(Debug)]
pub(super) struct LabelIndex {
    /// Namespaces unique by name (first wins), plus those only workloads mention.
    ns_labels: Vec<Labels>,
    ns_index: FastMap<String, usize>,
    /// Workload ids per namespace, ascending.
    ns_workloads: Vec<Vec<u32>>,
    /// Per workload, its namespace index.
    workload_ns: Vec<u32>,
    /// Label index over workloads: key → value → workload ids, ascending. A selector
    /// with a `matchLabels` pair or an `In`/`Exists` requirement only looks at the
    /// workloads of its shortest posting list instead of every workload: at 10,000
    /// workloads and ~30,000 distinct selectors this is what keeps compile well under a
    /// second (benches/decide.rs, `compile/*/diverse`).
    label_index: FastMap<String, FastMap<String, Vec<u32>>>,
    /// Key → workloads that carry it, ascending (`Exists`).
    key_index: FastMap<String, Vec<u32>>,
}

/// The inventory's indexes and every selector resolved so far. The compiler resolves
/// subjects and peers through it, and `lint` asks it whether a selector selects
/// anything: both look at posting lists, never at every workload per selector.
pub(super) struct Selectors<'a> {
    workloads: &'a [super::ir::Workload],
    index: Arc<LabelIndex>,
    /// Selector → index in `selections`: callers borrow the ids instead of cloning them.
    selected: FastMap<SelKey<'a>, usize>,
    selections: Vec<Ids>,
}

/// A sorted, duplicate-free workload id list with its content hash worked out once, shared
/// by `Arc`: a selection, a rule's peers, a policy's subject. Compilations after the first
/// hand these around by pointer, and interning one costs a lookup by the stored hash.
#[derive(Clone, Debug)]
pub(super) struct Ids {
    hash: u64,
    ids: Arc<[u32]>,
}

impl Ids {
    fn new(ids: Vec<u32>) -> Ids {
        let mut h = FastHasher::default();
        ids.hash(&mut h);
        Ids { hash: h.finish(), ids: ids.into() }
    }

    pub(super) fn as_slice(&self) -> &[u32] {
        &self.ids
    }
}

impl PartialEq for Ids {
    fn eq(&self, other: &Ids) -> bool {
        self.hash == other.hash && (Arc::ptr_eq(&self.ids, &other.ids) || self.ids == other.ids)
    }
}
impl Eq for Ids {}
impl Hash for Ids {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

/// One policy compiled on its own: everything about it that depends only on the policy
/// and the inventory (its selectors resolved, its rules' peers and ports in compiled form,
/// its names). A reload after one file changed builds parts for that file's policies only;
/// every other policy's part is taken from the [`CompileCache`] by pointer, so the
/// whole-set pass that follows only copies and interns (see `Builder::rule`).
#[derive(Debug)]
struct PolicyPart {
    meta: Arc<PolicyMeta>,
    subject: Ids,
    rules: [Option<Vec<RulePart>>; 2],
}

/// A rule of a [`PolicyPart`]: what `Builder::rule` lays into the pools.
#[derive(Debug)]
struct RulePart {
    action: Action,
    matches: RuleMatch,
    /// Hash of `matches`: the key of `Builder::match_classes`, worked out once per part.
    match_hash: u64,
}

/// What a rule matches (peers and ports, not its action): rules with equal ones are in
/// one match class.
#[derive(Debug, PartialEq, Hash)]
struct RuleMatch {
    any_peer: bool,
    has_ports: bool,
    peers: Ids,
    cidrs: Vec<(Range, Vec<Range>)>,
    domains: Vec<DomainPattern>,
    ports: Vec<CPort>,
}

/// A [`RulePart`] as a key of `Builder::match_classes`.
#[derive(Clone, Copy)]
struct MatchKey<'p>(&'p RulePart);

impl PartialEq for MatchKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.match_hash == other.0.match_hash && self.0.matches == other.0.matches
    }
}
impl Eq for MatchKey<'_> {}
impl Hash for MatchKey<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.0.match_hash);
    }
}

/// The inventory in compiled form: shared by `Arc` between every compilation of one
/// inventory, so a reload that changed policies only neither rebuilds nor copies the
/// 10,000 workload entries.
#[derive(Debug, PartialEq)]
pub(super) struct InventoryTables {
    pub(super) lpm: Lpm,
    pub(super) workloads: Vec<WorkloadMeta>,
    /// `WorkloadMeta::ports` of each workload again, packed: the hot path reads 8 bytes
    /// here instead of a cache line of names and addresses.
    pub(super) workload_ports: Vec<Span>,
    pub(super) ports: Vec<WPort>,
    pub(super) port_names: Vec<String>,
    /// Port name → index in `port_names`.
    port_index: FastMap<String, u32>,
}

/// What one compilation leaves for the next, valid while the inventory is the same
/// (`Arc::ptr_eq`): the compiled inventory, its label index, and every policy's
/// `PolicyPart` by the address of its `Arc` (the parse cache hands out the same `Arc`
/// for every file that did not change). The reloader keeps one, so a reload after one
/// policy file changed resolves and compiles only that file's policies. The result is
/// exactly that of [`CompiledPolicy::compile`] (tests/incremental_props.rs compares the
/// two over random edit sequences).
#[derive(Debug, Default)]
pub struct CompileCache {
    inventory: Option<Arc<super::ir::Inventory>>,
    index: Option<Arc<LabelIndex>>,
    tables: Option<Arc<InventoryTables>>,
    /// Keyed by `Arc::as_ptr`; the `Arc<Policy>` is kept so the address cannot be reused
    /// by another policy while the entry lives.
    /// The third field is the last compilation (`epoch`) whose set held the policy.
    parts: FastMap<usize, (Arc<Policy>, Arc<PolicyPart>, u64)>,
    epoch: u64,
}

/// The state of one compilation.
struct Builder<'a> {
    set: &'a PolicySet,
    /// `set.policies[i]`'s part at `i`.
    parts: &'a [Arc<PolicyPart>],
    interned_sets: FastMap<Ids, WorkloadSet>,
    interned_lists: FastMap<Vec<u32>, Span>,
    /// What a rule matches (peers and ports, not its action or policy) → a class id, so
    /// that a rule identical in what it matches to an earlier one in the same list can
    /// be dropped: it can never be the first match.
    match_classes: FastMap<MatchKey<'a>, u32>,
    /// Per rule id, its match class.
    rule_class: Vec<u32>,
    /// Interned bitsets in `CompiledPolicy::admin_pool`.
    interned_bits: FastMap<Vec<u64>, u32>,
    out: CompiledPolicy,
}

/// The protocol class the port prefilter is kept per: TCP, UDP, SCTP, anything else
/// (which only rules without ports can match).
#[inline]
pub(super) const fn port_class(p: Proto) -> usize {
    match p {
        Proto::Tcp => 0,
        Proto::Udp => 1,
        Proto::Sctp => 2,
        _ => 3,
    }
}

/// Admin rules per direction above which the bitset path is not built (64 words = 4,096
/// rules): subject and class bitsets cost words × 8 bytes per workload and direction.
const ADMIN_MAX_WORDS: usize = 64;

const CLASS_PROTOS: [Option<Proto>; 4] =
    [Some(Proto::Tcp), Some(Proto::Udp), Some(Proto::Sctp), None];

impl CompiledPolicy {
    /// Resolves every selector and builds the decision tables.
    ///
    /// # Errors
    /// [`CompileError`] when the set breaks an invariant the engine relies on (see
    /// [`super::ir`]): the loader guarantees them, so this only fires for sets built in
    /// code. Failing here keeps the last good policy in force.
    pub fn compile(set: &PolicySet, opts: &CompileOptions) -> Result<CompiledPolicy, CompileError> {
        Self::build(set, opts, &mut CompileCache::default())
    }

    /// [`CompiledPolicy::compile`] reusing what earlier compilations with `cache` built
    /// (see [`CompileCache`]): the same result, faster when the set shares its inventory
    /// with the last one and most of its policies (by `Arc`).
    ///
    /// # Errors
    /// As [`CompiledPolicy::compile`]; the cache keeps what it held.
    pub fn compile_with(
        set: &PolicySet,
        opts: &CompileOptions,
        cache: &mut CompileCache,
    ) -> Result<CompiledPolicy, CompileError> {
        Self::build(set, opts, cache)
    }

    fn build(
        set: &PolicySet,
        opts: &CompileOptions,
        cache: &mut CompileCache,
    ) -> Result<CompiledPolicy, CompileError> {
        let n = set.inventory.workloads.len();
        if n >= NONE as usize {
            return Err(CompileError::Inventory { message: format!("{n} workloads is too many") });
        }
        if !cache.inventory.as_ref().is_some_and(|i| Arc::ptr_eq(i, &set.inventory)) {
            *cache =
                CompileCache { inventory: Some(set.inventory.clone()), ..CompileCache::default() };
        }
        let tables = cache
            .tables
            .get_or_insert_with(|| Arc::new(InventoryTables::build(&set.inventory)))
            .clone();
        // Every policy's part: the cached one when the set still holds the same `Arc`,
        // else built here (validated first; the label index only when one is needed).
        let mut sel: Option<Selectors<'_>> = None;
        let mut parts: Vec<Arc<PolicyPart>> = Vec::with_capacity(set.policies.len());
        cache.epoch += 1;
        let epoch = cache.epoch;
        for p in &set.policies {
            // The entry holds the `Arc`, so its address is this policy's and no other's.
            if let Some(entry) = cache.parts.get_mut(&(Arc::as_ptr(p) as usize)) {
                entry.2 = epoch;
                parts.push(entry.1.clone());
                continue;
            }
            validate(p)?;
            let sel = sel.get_or_insert_with(|| {
                let index = cache
                    .index
                    .get_or_insert_with(|| Arc::new(LabelIndex::build(&set.inventory)))
                    .clone();
                Selectors::with_index(&set.inventory, index, 64)
            });
            parts.push(Arc::new(PolicyPart::build(p, sel, &tables)));
        }
        drop(sel);
        let out = CompiledPolicy {
            opts: *opts,
            inv: tables,
            policies: Vec::with_capacity(set.policies.len()),
            rules: Vec::new(),
            cidrs: Vec::new(),
            excepts: Vec::new(),
            domains: Vec::new(),
            cports: Vec::new(),
            set_ids: Vec::new(),
            set_bits: Vec::new(),
            bits_words: n.div_ceil(64),
            lists: Vec::new(),
            sides: Vec::new(),
            audit_sides: Vec::new(),
            port_starts: Default::default(),
            port_bits: Default::default(),
            rule_words: 0,
            seg_tables: Vec::new(),
            seg_spans: Vec::new(),
            admin_words: [0; 2],
            admin_rank: Default::default(),
            admin_pool: Vec::new(),
            admin_class: Vec::new(),
            admin_ext_starts: Default::default(),
            admin_ext_class: Default::default(),
            admin_domains: [NONE; 2],
            admin_dom_exact: Default::default(),
            admin_dom_suffix: Default::default(),
            admin_port: Default::default(),
            next_expiry: None,
            live_policies: 0,
            by_name: NameIndex::default(),
        };
        // Capacities from the input's size: growing these maps rehashed every entry a
        // dozen times over at 10,000 policies.
        let rules_hint: usize = set
            .policies
            .iter()
            .map(|p| p.ingress.as_ref().map_or(0, Vec::len) + p.egress.as_ref().map_or(0, Vec::len))
            .sum();
        let mut b = Builder {
            set,
            parts: &parts,
            interned_sets: FastMap::with_capacity_and_hasher(rules_hint, Default::default()),
            interned_lists: FastMap::with_capacity_and_hasher(n * 2, Default::default()),
            match_classes: FastMap::with_capacity_and_hasher(rules_hint, Default::default()),
            rule_class: Vec::new(),
            interned_bits: FastMap::default(),
            out,
        };
        b.policies();
        b.port_filter();
        b.segment_lists();
        b.admin_index();
        let out = b.out;
        // New parts in; then, when some entry is no longer in the set (a file changed or
        // was removed), drop those: parts of policies gone must not pile up. Updated in
        // place, because building and dropping a 10,000-entry map per reload was a tenth
        // of a one-file reload's compile.
        for (p, part) in set.policies.iter().zip(parts) {
            cache.parts.entry(Arc::as_ptr(p) as usize).or_insert_with(|| (p.clone(), part, epoch));
        }
        if cache.parts.len() > set.policies.len() {
            cache.parts.retain(|_, e| e.2 == epoch);
        }
        Ok(out)
    }

    /// The workload that owns `ip` (longest prefix match), or `None` for an external
    /// address. A binary search; no allocation.
    #[inline]
    pub fn workload_of(&self, ip: IpAddr) -> Option<WorkloadId> {
        self.inv.lpm.lookup(Key::of(ip)).map(WorkloadId)
    }

    /// `namespace/name` of a workload; `None` for an id from another compilation.
    pub fn workload_name(&self, id: WorkloadId) -> Option<WorkloadName<'_>> {
        self.inv
            .workloads
            .get(id.0 as usize)
            .map(|w| WorkloadName { namespace: &w.namespace, name: &w.name })
    }

    /// Finds a workload by namespace and name: a binary search of an index sorted by
    /// name, built on the first call (`flowgate test` resolves thousands of cases; a scan
    /// of 10,000 workloads per case was most of its time). For the CLI and the admin API,
    /// not the data path.
    pub fn find_workload(&self, namespace: &str, name: &str) -> Option<WorkloadId> {
        let key = |i: u32| {
            let w = &self.inv.workloads[i as usize];
            (w.namespace.as_str(), w.name.as_str())
        };
        let index = self.by_name.0.get_or_init(|| {
            let mut v: Vec<u32> = (0..self.inv.workloads.len() as u32).collect();
            v.sort_by(|&a, &b| key(a).cmp(&key(b)));
            v
        });
        // The first of equal names (a stable sort of ascending ids): what a scan found.
        let at = index.partition_point(|&i| key(i) < (namespace, name));
        index.get(at).filter(|&&i| key(i) == (namespace, name)).map(|&i| WorkloadId(i))
    }

    /// An address that stands for the workload: its first address entry; for a CIDR the
    /// first usable host (network + 1 unless the prefix is /31, /32, /127 or /128). An
    /// address that a more specific prefix gives to another workload is skipped, so
    /// `workload_of(workload_addr(w)) == Some(w)` always holds. `None` if the workload
    /// owns no address of its own.
    pub fn workload_addr(&self, id: WorkloadId) -> Option<IpAddr> {
        let w = self.inv.workloads.get(id.0 as usize)?;
        for net in &w.addrs {
            let r = Range::of(net);
            let host_bits = if r.v6 { 128 } else { 32 } - u32::from(net.prefix_len());
            let preferred = if host_bits >= 2 { r.first + 1 } else { r.first };
            let to_ip = |v: u128| -> IpAddr {
                if r.v6 { IpAddr::V6(v.into()) } else { IpAddr::V4((v as u32).into()) }
            };
            if self.workload_of(to_ip(preferred)) == Some(id) {
                return Some(to_ip(preferred));
            }
            if let Some(&start) = self.inv.lpm.owned_starts(r, id.0).first() {
                return Some(to_ip(start));
            }
        }
        None
    }

    /// The number of the workload's port named `name` for protocol `proto`.
    pub fn named_port(&self, id: WorkloadId, name: &str, proto: Proto) -> Option<u16> {
        let w = self.inv.workloads.get(id.0 as usize)?;
        w.ports
            .of(&self.inv.ports)
            .iter()
            .find(|p| p.proto == proto && self.inv.port_names[p.name as usize] == name)
            .map(|p| p.port)
    }

    /// `namespace/name` of a NetworkPolicy, `name` of a cluster-scoped policy.
    pub fn policy_name(&self, id: PolicyId) -> Option<&str> {
        self.policies.get(id.0 as usize).map(|p| p.name.as_str())
    }

    pub fn policy_kind(&self, id: PolicyId) -> Option<PolicyKind> {
        self.policies.get(id.0 as usize).map(|p| p.kind)
    }

    /// The earliest expiry still in the future: the control plane recompiles then.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.next_expiry
    }

    pub fn workload_count(&self) -> usize {
        self.inv.workloads.len()
    }

    /// Every policy of the set, expired ones included (their ids stay valid).
    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    /// Policies in force (not expired), audit ones included.
    pub fn live_policy_count(&self) -> usize {
        self.live_policies
    }

    pub fn options(&self) -> &CompileOptions {
        &self.opts
    }

    /// Whether the set has live audit-mode policies (then `decide` evaluates twice when
    /// the verdict is allow).
    pub fn has_audit(&self) -> bool {
        !self.audit_sides.is_empty()
    }
}

/// The union of two ascending, duplicate-free id lists, ascending and duplicate-free.
fn merge_sorted(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) {
        out.push(x.min(y));
        i += usize::from(x <= y);
        j += usize::from(y <= x);
    }
    out.extend_from_slice(a.get(i..).unwrap_or(&[]));
    out.extend_from_slice(b.get(j..).unwrap_or(&[]));
    out
}

/// Checks the invariants of [`super::ir`] the engine relies on, for one policy.
fn validate(p: &Policy) -> Result<(), CompileError> {
    let invalid = |message: String| CompileError::Invalid { policy: p.display_name(), message };
    for (dir, rules) in [("ingress", &p.ingress), ("egress", &p.egress)] {
        for (i, r) in rules.iter().flatten().enumerate() {
            if r.action == Action::Pass && !matches!(p.tier, Tier::Admin { .. }) {
                return Err(invalid(format!("{dir}[{i}]: Pass outside the Admin tier")));
            }
            for port in r.ports.iter().flatten() {
                if let PortMatch::Range { first, last, .. } = port
                    && first > last
                {
                    return Err(invalid(format!("{dir}[{i}]: port range {first}-{last}")));
                }
            }
            if let Peers::List(peers) = &r.peers {
                for peer in peers {
                    if let Peer::Cidr { net, except } = peer
                        && let Some(e) = except.iter().find(|e| !net.contains(*e))
                    {
                        return Err(invalid(format!("{dir}[{i}]: except {e} not inside {net}")));
                    }
                }
            }
        }
    }
    Ok(())
}

impl LabelIndex {
    fn build(inv: &Inventory) -> LabelIndex {
        let mut s = LabelIndex {
            ns_labels: Vec::new(),
            ns_index: FastMap::default(),
            ns_workloads: Vec::new(),
            workload_ns: Vec::with_capacity(inv.workloads.len()),
            label_index: FastMap::default(),
            key_index: FastMap::default(),
        };
        for ns in &inv.namespaces {
            if !s.ns_index.contains_key(ns.name.as_str()) {
                s.ns_index.insert(ns.name.clone(), s.ns_labels.len());
                s.ns_labels.push(ns.labels.clone());
                s.ns_workloads.push(Vec::new());
            }
        }
        for (i, w) in inv.workloads.iter().enumerate() {
            let ns = match s.ns_index.get(w.namespace.as_str()) {
                Some(&ns) => ns,
                None => {
                    // A namespace the inventory does not list carries only its name label.
                    let ns = s.ns_labels.len();
                    s.ns_index.insert(w.namespace.clone(), ns);
                    s.ns_labels.push(Labels::from([(
                        NAMESPACE_NAME_LABEL.to_string(),
                        w.namespace.clone(),
                    )]));
                    s.ns_workloads.push(Vec::new());
                    ns
                }
            };
            s.ns_workloads[ns].push(i as u32);
            s.workload_ns.push(ns as u32);
            for (k, v) in &w.labels {
                // Owned keys, cloned only on first sight.
                if !s.label_index.contains_key(k.as_str()) {
                    s.label_index.insert(k.clone(), FastMap::default());
                    s.key_index.insert(k.clone(), Vec::new());
                }
                if let Some(values) = s.label_index.get_mut(k.as_str()) {
                    match values.get_mut(v.as_str()) {
                        Some(ids) => ids.push(i as u32),
                        None => {
                            values.insert(v.clone(), vec![i as u32]);
                        }
                    }
                }
                if let Some(ids) = s.key_index.get_mut(k.as_str()) {
                    ids.push(i as u32);
                }
            }
        }
        s
    }
}

impl<'a> Selectors<'a> {
    /// Indexes `inv`'s namespaces and labels; `capacity`: distinct selectors expected.
    pub(super) fn new(inv: &'a Inventory, capacity: usize) -> Selectors<'a> {
        Selectors::with_index(inv, Arc::new(LabelIndex::build(inv)), capacity)
    }

    /// As [`Selectors::new`] with `inv`'s index already built.
    fn with_index(inv: &'a Inventory, index: Arc<LabelIndex>, capacity: usize) -> Selectors<'a> {
        Selectors {
            workloads: &inv.workloads,
            index,
            selected: FastMap::with_capacity_and_hasher(capacity, Default::default()),
            selections: Vec::new(),
        }
    }

    /// The ids of selection `k` (as [`Selectors::select`] returned it), ascending.
    pub(super) fn ids(&self, k: usize) -> &[u32] {
        self.selections[k].as_slice()
    }

    /// The workloads `sel` selects, ascending. Resolved once per distinct selector.
    ///
    /// The namespaces are matched first (a handful of label maps); then the candidates
    /// are the shortest of: the workloads of those namespaces, or a posting list of the
    /// label index for one of the selector's positive constraints (`matchLabels` pair,
    /// `In` — the union of its values' lists —, `Exists`). Each candidate is then checked
    /// against the whole selector, so negative constraints (`NotIn`, `DoesNotExist`) need
    /// no index of their own: they only ever narrow the candidates.
    pub(super) fn select(&mut self, sel: &'a WorkloadSelector) -> usize {
        let key = SelKey::of(sel);
        if let Some(&k) = self.selected.get(&key) {
            return k;
        }
        let ids = self.resolve(sel);
        let k = self.selections.len();
        self.selections.push(Ids::new(ids));
        self.selected.insert(key, k);
        k
    }

    fn resolve(&self, sel: &WorkloadSelector) -> Vec<u32> {
        let ix = &*self.index;
        let workloads = self.workloads;
        // `namespaceSelector: {}` (every workload's namespace is known here): no list of
        // namespaces to build, and no namespace test per candidate.
        let every_ns = matches!(&sel.namespaces, NamespaceMatch::Selector(s) if s.is_empty());
        let nss: Vec<usize> = match &sel.namespaces {
            _ if every_ns => Vec::new(),
            NamespaceMatch::Named(name) => {
                ix.ns_index.get(name.as_str()).copied().into_iter().collect()
            }
            NamespaceMatch::Selector(s) => {
                (0..ix.ns_labels.len()).filter(|&ns| s.matches(&ix.ns_labels[ns])).collect()
            }
        };
        let in_ns: usize = if every_ns {
            workloads.len()
        } else {
            nss.iter().map(|&ns| ix.ns_workloads[ns].len()).sum()
        };
        // The shortest posting list of a positive constraint, if shorter than `in_ns`.
        let empty: &[u32] = &[];
        let mut best: Option<std::borrow::Cow<'_, [u32]>> = None;
        let mut best_len = in_ns;
        let posting = |k: &str, v: &str| -> &[u32] {
            ix.label_index.get(k).and_then(|m| m.get(v)).map_or(empty, Vec::as_slice)
        };
        for (k, v) in &sel.pods.match_labels {
            let p = posting(k, v);
            if p.len() < best_len {
                best_len = p.len();
                best = Some(p.into());
            }
        }
        for r in &sel.pods.match_expressions {
            match r.op {
                SelectorOp::Exists => {
                    let p = ix.key_index.get(r.key.as_str()).map_or(empty, Vec::as_slice);
                    if p.len() < best_len {
                        best_len = p.len();
                        best = Some(p.into());
                    }
                }
                SelectorOp::In => {
                    let len: usize = r.values.iter().map(|v| posting(&r.key, v).len()).sum();
                    if len < best_len {
                        let mut u: Vec<u32> =
                            r.values.iter().flat_map(|v| posting(&r.key, v)).copied().collect();
                        u.sort_unstable();
                        u.dedup();
                        best_len = u.len();
                        best = Some(u.into());
                    }
                }
                SelectorOp::NotIn | SelectorOp::DoesNotExist => {}
            }
        }
        let mut ids = Vec::new();
        match best {
            Some(cands) if every_ns => {
                ids.extend(
                    cands
                        .iter()
                        .copied()
                        .filter(|&w| sel.pods.matches(&workloads[w as usize].labels)),
                );
            }
            Some(cands) => {
                let mut ns_ok = vec![false; ix.ns_labels.len()];
                for &ns in &nss {
                    ns_ok[ns] = true;
                }
                ids.extend(cands.iter().copied().filter(|&w| {
                    ns_ok[ix.workload_ns[w as usize] as usize]
                        && sel.pods.matches(&workloads[w as usize].labels)
                }));
            }
            // Every namespace: all workloads in id order, no merge or sort needed.
            None if every_ns || nss.len() == ix.ns_labels.len() => {
                ids.extend((0..workloads.len() as u32).filter(|&w| {
                    sel.pods.is_empty() || sel.pods.matches(&workloads[w as usize].labels)
                }));
            }
            None => {
                for &ns in &nss {
                    for &w in &ix.ns_workloads[ns] {
                        if sel.pods.is_empty() || sel.pods.matches(&workloads[w as usize].labels) {
                            ids.push(w);
                        }
                    }
                }
                if nss.len() > 1 {
                    ids.sort_unstable();
                }
            }
        }
        ids
    }
}

impl InventoryTables {
    fn build(inv: &Inventory) -> InventoryTables {
        let n = inv.workloads.len();
        let mut t = InventoryTables {
            lpm: Lpm::default(),
            workloads: Vec::with_capacity(n),
            workload_ports: Vec::with_capacity(n),
            ports: Vec::new(),
            port_names: Vec::new(),
            port_index: FastMap::default(),
        };
        for w in &inv.workloads {
            let off = t.ports.len() as u32;
            for p in &w.ports {
                let name = t.port_name(&p.name);
                t.ports.push(WPort { name, proto: p.protocol, port: p.port });
            }
            let ports = Span { off, len: w.ports.len() as u32 };
            t.workload_ports.push(ports);
            t.workloads.push(WorkloadMeta {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                addrs: w.addrs.clone(),
                ports,
            });
        }
        t.lpm = Lpm::build(
            inv.workloads
                .iter()
                .enumerate()
                .flat_map(|(i, w)| w.addrs.iter().map(move |a| (*a, i as u32))),
        );
        t
    }

    fn port_name(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.port_index.get(name) {
            return id;
        }
        let id = self.port_names.len() as u32;
        self.port_names.push(name.to_string());
        self.port_index.insert(name.to_string(), id);
        id
    }
}

impl PolicyPart {
    fn build<'a>(p: &'a Policy, sel: &mut Selectors<'a>, inv: &InventoryTables) -> PolicyPart {
        let names = |rules: &Option<Vec<Rule>>| {
            rules.iter().flatten().map(|r| r.name.clone()).collect::<Vec<_>>()
        };
        let meta = Arc::new(PolicyMeta {
            name: p.display_name(),
            kind: p.kind,
            ingress_names: names(&p.ingress),
            egress_names: names(&p.egress),
        });
        let k = sel.select(&p.subject);
        let subject = sel.selections[k].clone();
        let rules = [&p.ingress, &p.egress].map(|list| {
            list.as_ref().map(|list| list.iter().map(|r| RulePart::build(r, sel, inv)).collect())
        });
        PolicyPart { meta, subject, rules }
    }
}

impl RulePart {
    fn build<'a>(rule: &'a Rule, sel: &mut Selectors<'a>, inv: &InventoryTables) -> RulePart {
        let mut peers: Option<Ids> = None;
        let mut cidrs = Vec::new();
        let mut domains = Vec::new();
        if let Peers::List(list) = &rule.peers {
            for peer in list {
                match peer {
                    Peer::Workloads(s) => {
                        let k = sel.select(s);
                        let got = &sel.selections[k];
                        // Each selection is sorted and unique: merge instead of sorting
                        // the concatenation (that sort was a third of compile time).
                        peers = Some(match peers {
                            None => got.clone(),
                            Some(prev) => Ids::new(merge_sorted(prev.as_slice(), got.as_slice())),
                        });
                    }
                    Peer::Cidr { net, except } => {
                        cidrs.push((Range::of(net), except.iter().map(Range::of).collect()));
                    }
                    Peer::Domain(d) => domains.push(d.clone()),
                }
            }
        }
        let peers = peers.unwrap_or_else(|| Ids::new(Vec::new()));
        let ports: Vec<CPort> = rule
            .ports
            .iter()
            .flatten()
            .map(|p| match p {
                PortMatch::Range { protocol, first, last } => {
                    CPort::Range { proto: *protocol, first: *first, last: *last }
                }
                PortMatch::Named { protocol, name } => CPort::Named {
                    proto: *protocol,
                    name: inv.port_index.get(name.as_str()).copied().unwrap_or(NONE),
                },
            })
            .collect();
        let matches = RuleMatch {
            any_peer: rule.peers == Peers::Any,
            has_ports: rule.ports.is_some(),
            peers,
            cidrs,
            domains,
            ports,
        };
        let mut h = FastHasher::default();
        matches.hash(&mut h);
        RulePart { action: rule.action, matches, match_hash: h.finish() }
    }
}

impl<'a> Builder<'a> {
    /// Interns a sorted, deduplicated id list as a workload set: a sorted list while it
    /// is at most 1/32 of the workloads (same size as a bitset), a bitset above.
    fn intern_set(&mut self, set: &Ids) -> WorkloadSet {
        let ids = set.as_slice();
        if ids.is_empty() {
            return WorkloadSet::Empty;
        }
        if let Some(&s) = self.interned_sets.get(set) {
            return s;
        }
        let n = self.out.inv.workloads.len();
        let s = if ids.len() * 32 <= n {
            let off = self.out.set_ids.len() as u32;
            self.out.set_ids.extend_from_slice(ids);
            WorkloadSet::Sorted(Span { off, len: ids.len() as u32 })
        } else {
            let words = self.out.bits_words;
            let off = self.out.set_bits.len();
            self.out.set_bits.resize(off + words, 0);
            for &w in ids {
                self.out.set_bits[off + (w as usize >> 6)] |= 1 << (w & 63);
            }
            WorkloadSet::Bits((off / words.max(1)) as u32)
        };
        self.interned_sets.insert(set.clone(), s);
        s
    }

    /// Drops every rule that matches exactly what an earlier rule of the list matches:
    /// first match wins, so it could never decide (nor admit, in the NetworkPolicy tier,
    /// where the earlier rule admits first). Many ANPs repeating one guardrail (say, a
    /// metadata-service block) then cost one rule per flow, not one per ANP.
    fn first_of_class(&self, mut list: Vec<u32>) -> Vec<u32> {
        if list.len() < 2 {
            return list;
        }
        if list.len() <= 16 {
            // Short lists (nearly all): a quadratic scan beats allocating a set.
            let mut kept = 0;
            for i in 0..list.len() {
                let c = self.rule_class[list[i] as usize];
                if !list[..kept].iter().any(|&r| self.rule_class[r as usize] == c) {
                    list[kept] = list[i];
                    kept += 1;
                }
            }
            list.truncate(kept);
            return list;
        }
        let mut seen = FastSet::with_capacity_and_hasher(list.len(), Default::default());
        list.retain(|&r| seen.insert(self.rule_class[r as usize]));
        list
    }

    /// Builds the port prefilter (see `CompiledPolicy::port_starts`).
    fn port_filter(&mut self) {
        let out = &mut self.out;
        let words = out.rules.len().div_ceil(64).max(1);
        out.rule_words = words;
        // Per (name, protocol): every number some workload gives that port name.
        let mut numbers: FastMap<(u32, Proto), Vec<u16>> = FastMap::default();
        for p in &out.inv.ports {
            numbers.entry((p.name, p.proto)).or_default().push(p.port);
        }
        for v in numbers.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        let named = |name: u32, want: Option<Proto>, class: Proto| -> &[u16] {
            if name == NONE || want.is_some_and(|w| w != class) {
                return &[];
            }
            numbers.get(&(name, class)).map_or(&[], Vec::as_slice)
        };
        for (c, proto) in CLASS_PROTOS.iter().enumerate() {
            // Segment boundaries: every range's ends and every named port's numbers.
            let mut starts: Vec<u32> = vec![0];
            if let Some(proto) = *proto {
                for rule in &out.rules {
                    for p in rule.ports.of(&out.cports) {
                        match *p {
                            CPort::Range { proto: rp, first, last } if rp == proto => {
                                starts.push(u32::from(first));
                                starts.push(u32::from(last) + 1);
                            }
                            CPort::Range { .. } => {}
                            CPort::Named { proto: want, name } => {
                                for &n in named(name, want, proto) {
                                    starts.push(u32::from(n));
                                    starts.push(u32::from(n) + 1);
                                }
                            }
                        }
                    }
                }
            }
            starts.retain(|&s| s <= u32::from(u16::MAX));
            starts.sort_unstable();
            starts.dedup();
            let starts: Vec<u16> = starts.into_iter().map(|s| s as u16).collect();
            let seg_of = |port: u16| starts.partition_point(|&s| s <= port) - 1;
            let mut bits = vec![0u64; starts.len() * words];
            for (r, rule) in out.rules.iter().enumerate() {
                let mut set = |seg: usize| bits[seg * words + (r >> 6)] |= 1 << (r & 63);
                if rule.port_check == PortCheck::None {
                    (0..starts.len()).for_each(&mut set);
                    continue;
                }
                let Some(proto) = *proto else { continue };
                for p in rule.ports.of(&out.cports) {
                    match *p {
                        CPort::Range { proto: rp, first, last } if rp == proto => {
                            (seg_of(first)..=seg_of(last)).for_each(&mut set);
                        }
                        CPort::Range { .. } => {}
                        CPort::Named { proto: want, name } => {
                            for &n in named(name, want, proto) {
                                set(seg_of(n));
                            }
                        }
                    }
                }
            }
            out.port_starts[c] = starts;
            out.port_bits[c] = bits;
        }
    }

    /// Splits the Admin and Baseline lists of every side table by port segment (see
    /// `CompiledPolicy::seg_tables`). Only lists long enough to gain, and only while the
    /// total work stays bounded: past the budget the remaining lists keep the bitset path,
    /// which gives the same answers.
    fn segment_lists(&mut self) {
        const MIN_LEN: u32 = 2;
        const BUDGET: usize = 4_000_000;
        let mut done: FastMap<Span, u32> = FastMap::default();
        let mut spent = 0usize;
        let segs: usize = self.out.port_starts.iter().map(Vec::len).sum();
        for view in [false, true] {
            let n = if view { self.out.audit_sides.len() } else { self.out.sides.len() };
            for i in 0..n {
                let t = if view { self.out.audit_sides[i] } else { self.out.sides[i] };
                let mut seg = [NONE, NONE];
                for (k, span) in [t.admin.rules, t.baseline.rules].into_iter().enumerate() {
                    if span.len < MIN_LEN {
                        continue;
                    }
                    if let Some(&idx) = done.get(&span) {
                        seg[k] = idx;
                        continue;
                    }
                    spent += segs * span.len as usize;
                    if spent > BUDGET {
                        continue;
                    }
                    let ids = span.of(&self.out.lists).to_vec();
                    let words = self.out.rule_words;
                    let mut table = [0u32; 4];
                    for (c, slot) in table.iter_mut().enumerate() {
                        *slot = self.out.seg_spans.len() as u32;
                        for s in 0..self.out.port_starts[c].len() {
                            let bits = &self.out.port_bits[c][s * words..(s + 1) * words];
                            let kept: Vec<u32> = ids
                                .iter()
                                .copied()
                                .filter(|&r| bits[r as usize >> 6] & (1 << (r & 63)) != 0)
                                .collect();
                            let sp = self.intern_list(kept);
                            self.out.seg_spans.push(sp);
                        }
                    }
                    let idx = self.out.seg_tables.len() as u32;
                    self.out.seg_tables.push(table);
                    done.insert(span, idx);
                    seg[k] = idx;
                }
                let t = if view { &mut self.out.audit_sides[i] } else { &mut self.out.sides[i] };
                t.admin.seg = seg[0];
                t.baseline.seg = seg[1];
            }
        }
    }

    /// Interns a bitset into `CompiledPolicy::admin_pool`; returns its offset.
    fn intern_bits(&mut self, bits: Vec<u64>) -> u32 {
        if let Some(&off) = self.interned_bits.get(&bits) {
            return off;
        }
        let off = self.out.admin_pool.len() as u32;
        self.out.admin_pool.extend_from_slice(&bits);
        self.interned_bits.insert(bits, off);
        off
    }

    /// Builds the peer classes and port bitsets of the Admin bitset path (see
    /// `CompiledPolicy::admin_words`). A rule's bit is set in a peer's class when the rule
    /// could match that peer: any peer, the workload in its set, one of its CIDRs
    /// overlapping one of the workload's addresses (the external class: any CIDR).
    /// Domain rules go in a set of their own, added when the flow carries a name. Peers of equal bitsets share
    /// one interned copy, so the pool holds classes × words.
    fn admin_index(&mut self) {
        let words = self.out.admin_words;
        if self.out.sides.first().is_none_or(|t| t.admin_bits == NONE) {
            return;
        }
        let n = self.out.inv.workloads.len();
        let addrs: Vec<Vec<Range>> = self
            .out
            .inv
            .workloads
            .iter()
            .map(|w| w.addrs.iter().map(Range::of).collect())
            .collect();
        let overlaps =
            |a: &Range, b: &Range| a.v6 == b.v6 && a.first <= b.last && b.first <= a.last;
        let mut classes: Vec<[u32; 2]> = vec![[NONE; 2]; n];
        // Elementary intervals of every Admin CIDR, per family.
        let mut starts: [Vec<u128>; 2] = [vec![0], vec![0]];
        for d in 0..2 {
            for &r in &self.out.admin_rank[d] {
                for c in self.out.rules[r as usize].cidrs.of(&self.out.cidrs) {
                    let f = usize::from(c.net.v6);
                    starts[f].push(c.net.first);
                    if let Some(next) = c.net.last.checked_add(1) {
                        starts[f].push(next);
                    }
                }
            }
        }
        for v in &mut starts {
            v.sort_unstable();
            v.dedup();
        }
        let mut ext_class: [Vec<[u32; 2]>; 2] =
            [vec![[NONE; 2]; starts[0].len()], vec![[NONE; 2]; starts[1].len()]];
        for d in 0..2 {
            let ranks = self.out.admin_rank[d].clone();
            let mut per_w: Vec<Vec<u64>> = vec![vec![0u64; words[d]]; n];
            let mut external: [Vec<Vec<u64>>; 2] = [
                vec![vec![0u64; words[d]]; starts[0].len()],
                vec![vec![0u64; words[d]]; starts[1].len()],
            ];
            let mut domains = vec![0u64; words[d]];
            // (wildcard?, name) → ranks, in first-seen order so the pool is deterministic.
            let mut by_pattern: FastMap<(bool, &str), usize> = FastMap::default();
            let mut pattern_bits: Vec<((bool, &str), Vec<u64>)> = Vec::new();
            for (rank, &r) in ranks.iter().enumerate() {
                let rule = self.out.rules[r as usize];
                let (word, bit) = (rank >> 6, 1u64 << (rank & 63));
                let cidrs = rule.cidrs.of(&self.out.cidrs);
                let all = rule.any_peer;
                if rule.domains.len > 0 {
                    domains[word] |= bit;
                }
                for p in rule.domains.of(&self.out.domains) {
                    let key = match p {
                        DomainPattern::Exact(s) => (false, s.as_str()),
                        DomainPattern::Wildcard(s) => (true, s.as_str()),
                    };
                    let k = *by_pattern.entry(key).or_insert_with(|| {
                        pattern_bits.push((key, vec![0u64; words[d]]));
                        pattern_bits.len() - 1
                    });
                    pattern_bits[k].1[word] |= bit;
                }
                for (f, segs) in external.iter_mut().enumerate() {
                    for (k, bits) in segs.iter_mut().enumerate() {
                        let first = starts[f][k];
                        if all
                            || cidrs.iter().any(|c| {
                                usize::from(c.net.v6) == f
                                    && c.net.first <= first
                                    && first <= c.net.last
                            })
                        {
                            bits[word] |= bit;
                        }
                    }
                }
                if all || !cidrs.is_empty() {
                    for (w, bits) in per_w.iter_mut().enumerate() {
                        if all || cidrs.iter().any(|c| addrs[w].iter().any(|a| overlaps(&c.net, a)))
                        {
                            bits[word] |= bit;
                        }
                    }
                }
                // The rule's own workloads: walk its members, not every workload.
                match rule.workloads {
                    WorkloadSet::Empty => {}
                    WorkloadSet::Sorted(span) => {
                        for &w in span.of(&self.out.set_ids) {
                            if let Some(bits) = per_w.get_mut(w as usize) {
                                bits[word] |= bit;
                            }
                        }
                    }
                    WorkloadSet::Bits(k) => {
                        let bw = self.out.bits_words;
                        let set = self.out.set_bits.get(k as usize * bw..(k as usize + 1) * bw);
                        for (i, &x) in set.unwrap_or(&[]).iter().enumerate() {
                            let mut x = x;
                            while x != 0 {
                                let w = i * 64 + x.trailing_zeros() as usize;
                                x &= x - 1;
                                if let Some(bits) = per_w.get_mut(w) {
                                    bits[word] |= bit;
                                }
                            }
                        }
                    }
                }
            }
            drop(by_pattern);
            // Owned keys now: the pool is about to grow, and the patterns are borrowed.
            let pattern_bits: Vec<(bool, Box<str>, Vec<u64>)> =
                pattern_bits.into_iter().map(|((w, s), b)| (w, Box::from(s), b)).collect();
            for (w, bits) in per_w.into_iter().enumerate() {
                classes[w][d] = self.intern_bits(bits);
            }
            for (f, segs) in external.into_iter().enumerate() {
                for (k, bits) in segs.into_iter().enumerate() {
                    ext_class[f][k][d] = self.intern_bits(bits);
                }
            }
            self.out.admin_domains[d] = self.intern_bits(domains);
            for (wildcard, name, bits) in pattern_bits {
                let off = self.intern_bits(bits);
                if wildcard {
                    self.out.admin_dom_suffix[d].insert(name, off);
                } else {
                    self.out.admin_dom_exact[d].insert(name, off);
                }
            }
            let rw = self.out.rule_words;
            for c in 0..4 {
                let segs = self.out.port_starts[c].len();
                let mut bits = vec![0u64; segs * words[d]];
                for s in 0..segs {
                    let pb = &self.out.port_bits[c][s * rw..(s + 1) * rw];
                    for (rank, &r) in ranks.iter().enumerate() {
                        if pb[r as usize >> 6] & (1 << (r & 63)) != 0 {
                            bits[s * words[d] + (rank >> 6)] |= 1 << (rank & 63);
                        }
                    }
                }
                self.out.admin_port[d][c] = bits;
            }
        }
        self.out.admin_class = classes;
        self.out.admin_ext_starts = starts;
        self.out.admin_ext_class = ext_class;
    }

    fn intern_list(&mut self, list: Vec<u32>) -> Span {
        if list.is_empty() {
            return Span::default();
        }
        if let Some(&s) = self.interned_lists.get(&list) {
            return s;
        }
        let s = Span { off: self.out.lists.len() as u32, len: list.len() as u32 };
        self.out.lists.extend_from_slice(&list);
        self.interned_lists.insert(list, s);
        s
    }

    /// Lays one rule's part into the pools; returns its rule id.
    fn rule(&mut self, policy: u32, index: u32, part: &'a RulePart) -> u32 {
        let rule = &part.matches;
        let workloads = self.intern_set(&rule.peers);
        let cidr_off = self.out.cidrs.len() as u32;
        for (net, except) in &rule.cidrs {
            let off = self.out.excepts.len() as u32;
            self.out.excepts.extend_from_slice(except);
            let except = Span { off, len: except.len() as u32 };
            self.out.cidrs.push(CCidr { net: *net, except });
        }
        let dom_off = self.out.domains.len() as u32;
        self.out.domains.extend(rule.domains.iter().cloned());
        let port_off = self.out.cports.len() as u32;
        self.out.cports.extend_from_slice(&rule.ports);
        let next = self.match_classes.len() as u32;
        let class = *self.match_classes.entry(MatchKey(part)).or_insert(next);
        self.rule_class.push(class);
        let id = self.out.rules.len() as u32;
        self.out.rules.push(CRule {
            action: part.action,
            any_peer: rule.any_peer,
            port_check: if !rule.has_ports {
                PortCheck::None
            } else if rule.ports.iter().any(|p| matches!(p, CPort::Named { .. })) {
                PortCheck::Named
            } else {
                PortCheck::Exact
            },
            workloads,
            cidrs: Span { off: cidr_off, len: rule.cidrs.len() as u32 },
            domains: Span { off: dom_off, len: rule.domains.len() as u32 },
            ports: Span { off: port_off, len: rule.ports.len() as u32 },
            policy,
            index,
        });
        id
    }

    fn policies(&mut self) {
        let set = self.set;
        let now = self.out.opts.now;
        let n = self.out.inv.workloads.len();
        // Per live policy: its subject and its compiled rule ids per direction.
        struct Live<'p> {
            index: u32,
            subject: &'p [u32],
            rules: [Option<Vec<u32>>; 2],
        }
        let mut live: Vec<Live> = Vec::new();
        let parts = self.parts;
        for (i, (p, part)) in set.policies.iter().zip(parts).enumerate() {
            let is_live = p.is_live(now);
            self.out.policies.push(part.meta.clone());
            if let Some(at) = p.expires_at(now).filter(|at| *at > now) {
                self.out.next_expiry = Some(self.out.next_expiry.map_or(at, |e| e.min(at)));
            }
            if !is_live {
                continue;
            }
            let mut rules: [Option<Vec<u32>>; 2] = [None, None];
            for (d, list) in part.rules.iter().enumerate() {
                rules[d] = list.as_ref().map(|list| {
                    list.iter().enumerate().map(|(k, r)| self.rule(i as u32, k as u32, r)).collect()
                });
            }
            live.push(Live { index: i as u32, subject: part.subject.as_slice(), rules });
        }
        self.out.live_policies = live.len();

        // Cluster tiers in evaluation order: priority, name, namespace, source, index.
        let order = |tier_of: fn(Tier) -> Option<u32>| {
            let mut v: Vec<usize> = (0..live.len())
                .filter(|&k| tier_of(set.policies[live[k].index as usize].tier).is_some())
                .collect();
            v.sort_by(|&a, &b| {
                let (pa, pb) =
                    (&set.policies[live[a].index as usize], &set.policies[live[b].index as usize]);
                (tier_of(pa.tier), &pa.name, &pa.namespace, &pa.source, live[a].index).cmp(&(
                    tier_of(pb.tier),
                    &pb.name,
                    &pb.namespace,
                    &pb.source,
                    live[b].index,
                ))
            });
            v
        };
        let admin = order(|t| match t {
            Tier::Admin { priority } => Some(priority),
            _ => None,
        });
        let baseline = order(|t| match t {
            Tier::Baseline { priority } => Some(priority),
            _ => None,
        });
        let namespaced: Vec<usize> = (0..live.len())
            .filter(|&k| set.policies[live[k].index as usize].tier == Tier::Namespaced)
            .collect();

        // Admin rule ranks per direction, and per live Admin policy its first rank.
        let mut first_rank: FastMap<usize, [u32; 2]> = FastMap::default();
        for &k in &admin {
            let mut at = [0u32; 2];
            for (d, slot) in at.iter_mut().enumerate() {
                *slot = self.out.admin_rank[d].len() as u32;
                if let Some(r) = &live[k].rules[d] {
                    self.out.admin_rank[d].extend_from_slice(r);
                }
            }
            first_rank.insert(k, at);
        }
        let words = self.out.admin_rank.clone().map(|r| r.len().div_ceil(64));
        let use_bits = words.iter().all(|&w| w <= ADMIN_MAX_WORDS) && words.iter().any(|&w| w > 0);
        self.out.admin_words = words;

        let any_audit = live.iter().any(|l| set.policies[l.index as usize].mode == Mode::Audit);
        for view in [false, true] {
            if view && !any_audit {
                break;
            }
            // Audit-mode policies take part only in the audit view.
            let takes_part =
                |l: &Live| view || set.policies[l.index as usize].mode == Mode::Enforce;
            // [workload*2+dir] → (admin rules, np policies, np rules, baseline rules).
            let mut lists: Vec<[Vec<u32>; 4]> = vec![Default::default(); n * 2];
            let mut subject_bits: Vec<Vec<u64>> = if use_bits {
                (0..n * 2).map(|i| vec![0u64; words[i % 2]]).collect()
            } else {
                Vec::new()
            };
            // Each tier fills its own slots of a side's lists, in its policies' order.
            for (tier, ks) in [&admin, &namespaced, &baseline].into_iter().enumerate() {
                for &k in ks {
                    let l = &live[k];
                    if !takes_part(l) {
                        continue;
                    }
                    for &w in l.subject {
                        for (d, r) in l.rules.iter().enumerate() {
                            let Some(r) = r else { continue };
                            let side = w as usize * 2 + d;
                            let slot = &mut lists[side];
                            match tier {
                                0 => {
                                    slot[0].extend_from_slice(r);
                                    if let Some(bits) = subject_bits.get_mut(side) {
                                        let at = first_rank.get(&k).map_or(0, |a| a[d]) as usize;
                                        for rank in at..at + r.len() {
                                            bits[rank >> 6] |= 1 << (rank & 63);
                                        }
                                    }
                                }
                                1 => {
                                    slot[1].push(l.index);
                                    slot[2].extend_from_slice(r);
                                }
                                _ => slot[3].extend_from_slice(r),
                            }
                        }
                    }
                }
            }
            let mut subject_bits = subject_bits.into_iter();
            let sides: Vec<SideTable> = lists
                .into_iter()
                .map(|[a, p, r, b]| {
                    let admin_bits = subject_bits.next().map_or(NONE, |b| self.intern_bits(b));
                    let (a, r, b) =
                        (self.first_of_class(a), self.first_of_class(r), self.first_of_class(b));
                    let admin = TierList::whole(self.intern_list(a));
                    let (np_policies, np_rules) = (self.intern_list(p), self.intern_list(r));
                    let baseline = TierList::whole(self.intern_list(b));
                    SideTable { admin, baseline, np_policies, np_rules, admin_bits }
                })
                .collect();
            if view {
                self.out.audit_sides = sides;
            } else {
                self.out.sides = sides;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn compiled_policy_is_send_and_sync() {
        assert_send_sync::<CompiledPolicy>();
    }

    #[test]
    fn merge_sorted_is_the_sorted_union() {
        assert_eq!(merge_sorted(&[1, 3, 5], &[2, 3, 6, 9]), vec![1, 2, 3, 5, 6, 9]);
        assert_eq!(merge_sorted(&[], &[4]), vec![4]);
        assert_eq!(merge_sorted(&[4, 7], &[]), vec![4, 7]);
        assert_eq!(merge_sorted(&[1, 2], &[1, 2]), vec![1, 2]);
    }

    #[test]
    fn fast_hasher_tells_apart_lengths_and_contents() {
        let h = |b: &[u8]| {
            let mut x = FastHasher::default();
            x.write(b);
            x.finish()
        };
        assert_ne!(h(b"a"), h(b"a\0"));
        assert_ne!(h(b"api1.example.com"), h(b"api2.example.com"));
        assert_ne!(h(b"12345678"), h(b"12345678\0"));
    }
}
