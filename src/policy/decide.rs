//! The hot path: [`CompiledPolicy::decide`].
//!
//! Pure: no I/O, no clock, no allocation, no lock. Two LPM lookups, then for each side
//! that involves a workload a walk over that workload's precomputed rule lists (see
//! `compile.rs`), first match wins. Every step returns `Copy` values, and the same
//! functions feed `explain`, so the two cannot disagree.

use super::compile::{
    CPort, CRule, NONE, PortCheck, SideTable, TierList, WPort, WorkloadSet, dir_index, port_class,
};
use super::inventory::Key;
use super::ir::Action;
use super::{
    Cause, CompiledPolicy, Decision, DefaultAction, DenyReason, FlowQuery, PolicyId, Verdict,
    WorkloadId,
};
use crate::flow::Direction;

/// The tier that decided one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DecidedBy {
    Admin,
    NetworkPolicy,
    Baseline,
    Default,
}

/// The outcome of one side, with what `explain` needs to show it.
#[derive(Clone, Copy, Debug)]
pub(super) struct SideOutcome {
    pub(super) allow: bool,
    pub(super) by: DecidedBy,
    /// The deciding policy (None for a default).
    pub(super) policy: Option<u32>,
    /// The rule that matched (Admin, NetworkPolicy admit, Baseline).
    pub(super) rule: Option<u32>,
    /// The Admin rule whose `Pass` sent evaluation on to the NetworkPolicy tier.
    pub(super) passed: Option<u32>,
}

impl SideOutcome {
    /// What rule `r` of tier `by` (the rule that matched) decides.
    #[inline]
    fn matched(allow: bool, by: DecidedBy, rule: &CRule, r: u32, passed: Option<u32>) -> Self {
        SideOutcome { allow, by, policy: Some(rule.policy), rule: Some(r), passed }
    }

    pub(super) fn cause(&self) -> Cause {
        match self.by {
            DecidedBy::Admin => Cause::AdminDeny,
            DecidedBy::NetworkPolicy => Cause::NotAdmitted,
            DecidedBy::Baseline => Cause::BaselineDeny,
            DecidedBy::Default => Cause::DefaultDeny,
        }
    }
}

/// One endpoint, resolved.
#[derive(Clone, Copy, Debug)]
pub(super) struct End {
    pub(super) key: Key,
    pub(super) workload: Option<u32>,
}

/// What one side's rules are matched against: the flow, the other end, the destination's
/// named ports and the flow's protocol class and port segment.
#[derive(Clone, Copy)]
struct Probe<'q> {
    q: &'q FlowQuery<'q>,
    peer: End,
    /// The destination workload's named ports (empty for no workload), looked up once
    /// per side instead of once per rule with a named port.
    dst_ports: &'q [WPort],
    class: usize,
    seg: usize,
}

/// A full evaluation in one view: the decision and both sides.
#[derive(Clone, Copy, Debug)]
pub(super) struct Evaluation {
    pub(super) decision: Decision,
    pub(super) egress: Option<SideOutcome>,
    pub(super) ingress: Option<SideOutcome>,
}

/// Domain masks one flow's name may bring in before `decide` falls back to the mask of
/// every domain rule (a name with more matching wildcard suffixes than this is rare).
const DOMAIN_HITS: usize = 4;

/// May rule `r` match a flow whose port prefilter bitset is `bits`? `false` is certain;
/// `true` still needs [`CompiledPolicy::rule_matches`].
#[inline]
fn candidate(bits: &[u64], r: u32) -> bool {
    bits.get(r as usize >> 6).is_some_and(|w| w & (1 << (r & 63)) != 0)
}

impl CompiledPolicy {
    /// Decides one flow. No allocation, no lock; `&self` only, so any number of threads
    /// may call it on one shared `CompiledPolicy`.
    ///
    /// Audit mode: the verdict ignores audit-mode policies; when the set has some and the
    /// verdict is allow, the flow is evaluated again with them enforced and a denial
    /// there fills `would_deny` with the policy behind it.
    #[inline]
    pub fn decide(&self, q: &FlowQuery<'_>) -> Decision {
        Self::verdict(self.evaluate(q))
    }

    /// [`CompiledPolicy::decide`] for a flow whose source workload is known by other
    /// means than its address: the egress listeners' proxy credentials, for functions
    /// that share NAT addresses. The source address still keys `ipBlock` matching on the
    /// destination's ingress side; the source *workload* is `src`. An id that is not of
    /// this compilation (a stale cache) counts as no workload, so it fails closed under
    /// `policy.unknown`.
    #[inline]
    pub fn decide_as(&self, q: &FlowQuery<'_>, src: WorkloadId) -> Decision {
        let workload = ((src.0 as usize) < self.workload_count()).then_some(src.0);
        let src = End { key: Key::of(q.src), workload };
        Self::verdict(self.evaluate_ends(q, src, self.end(q.dst)))
    }

    /// The verdict view's decision, with the audit view's denial as `would_deny`.
    #[inline]
    fn verdict((real, audit): (Evaluation, Option<Evaluation>)) -> Decision {
        let mut d = real.decision;
        if let Some(audit) = audit
            && !audit.decision.verdict.is_allow()
        {
            d.would_deny = audit.decision.policy;
        }
        d
    }

    /// Both evaluations: the verdict view, and the audit view when it is needed.
    #[inline]
    pub(super) fn evaluate(&self, q: &FlowQuery<'_>) -> (Evaluation, Option<Evaluation>) {
        self.evaluate_ends(q, self.end(q.src), self.end(q.dst))
    }

    /// [`CompiledPolicy::evaluate`] with both ends already resolved to workloads.
    #[inline]
    fn evaluate_ends(
        &self,
        q: &FlowQuery<'_>,
        src: End,
        dst: End,
    ) -> (Evaluation, Option<Evaluation>) {
        // The port segment depends on the flow only: one binary search for both sides
        // and both views.
        let at = self.port_segment(q);
        let real = self.evaluate_view(&self.sides, q, src, dst, at);
        let audit = (!self.audit_sides.is_empty() && real.decision.verdict.is_allow())
            .then(|| self.evaluate_view(&self.audit_sides, q, src, dst, at));
        (real, audit)
    }

    #[inline]
    pub(super) fn end(&self, ip: std::net::IpAddr) -> End {
        let key = Key::of(ip);
        End { key, workload: self.inv.lpm.lookup(key) }
    }

    #[inline]
    fn evaluate_view(
        &self,
        sides: &[SideTable],
        q: &FlowQuery<'_>,
        src: End,
        dst: End,
        at: (usize, usize),
    ) -> Evaluation {
        let mut d = Decision {
            verdict: Verdict::Allow,
            src_workload: src.workload.map(WorkloadId),
            dst_workload: dst.workload.map(WorkloadId),
            policy: None,
            would_deny: None,
        };
        if src.workload.is_none() && dst.workload.is_none() {
            if self.opts.unknown == DefaultAction::Deny {
                d.verdict = Verdict::Deny(DenyReason { direction: None, cause: Cause::Unknown });
            }
            return Evaluation { decision: d, egress: None, ingress: None };
        }
        let (class, seg) = at;
        let dst_ports = self.named_ports_of(dst);
        let (e, i) = (dir_index(Direction::Egress), dir_index(Direction::Ingress));
        let te = src.workload.map(|w| &sides[w as usize * 2 + e]);
        let egress = te.map(|t| self.side(t, e, &Probe { q, peer: dst, dst_ports, class, seg }));
        if refuses(&mut d, egress, Direction::Egress) {
            // Both sides denying reports the egress side; the ingress side is still
            // worked out for `explain` (cold) but skipped here.
            return Evaluation { decision: d, egress, ingress: None };
        }
        let ti = dst.workload.map(|w| &sides[w as usize * 2 + i]);
        let ingress = ti.map(|t| self.side(t, i, &Probe { q, peer: src, dst_ports, class, seg }));
        if refuses(&mut d, ingress, Direction::Ingress) {
            return Evaluation { decision: d, egress, ingress };
        }
        d.policy = ingress.and_then(|s| s.policy).or(egress.and_then(|s| s.policy)).map(PolicyId);
        Evaluation { decision: d, egress, ingress }
    }

    /// One side of workload `w` in direction `dir`; `peer` is the other end, `at` the
    /// flow's port segment ([`Self::port_segment`], worked out once per flow).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) fn side_at(
        &self,
        sides: &[SideTable],
        w: u32,
        dir: Direction,
        q: &FlowQuery<'_>,
        peer: End,
        dst: End,
        (class, seg): (usize, usize),
    ) -> SideOutcome {
        let d = dir_index(dir);
        let dst_ports = self.named_ports_of(dst);
        self.side(&sides[w as usize * 2 + d], d, &Probe { q, peer, dst_ports, class, seg })
    }

    /// One side from its table `t`, in direction `d` (`dir_index`).
    #[inline]
    fn side(&self, t: &SideTable, d: usize, p: &Probe<'_>) -> SideOutcome {
        let ports = self.port_candidates(p.class, p.seg);
        let (class, seg) = (p.class, p.seg);
        let p = *p;
        let mut passed = None;
        // 1. Admin tier: first matching rule; Pass leaves the tier.
        let hit = if t.admin_bits == NONE {
            self.first_admin_walk(t, ports, &p)
        } else {
            self.first_admin_bits(t, d, &p)
        };
        if let Some(r) = hit {
            let rule = &self.rules[r as usize];
            match rule.action {
                Action::Pass => passed = Some(r),
                action => {
                    let allow = action == Action::Allow;
                    return SideOutcome::matched(allow, DecidedBy::Admin, rule, r, None);
                }
            }
        }
        // 2. NetworkPolicy tier: isolated → admitted or not, final.
        // The policy list itself is read only for a denial: an admitted flow saves that
        // cache miss (benches/decide.rs, `decide_realistic`).
        if t.np_policies.len > 0 {
            for &r in t.np_rules.of(&self.lists) {
                let rule = &self.rules[r as usize];
                if candidate(ports, r) && self.rule_matches(rule, &p) {
                    return SideOutcome::matched(true, DecidedBy::NetworkPolicy, rule, r, passed);
                }
            }
            return SideOutcome {
                allow: false,
                by: DecidedBy::NetworkPolicy,
                policy: t.np_policies.of(&self.lists).first().copied(),
                rule: None,
                passed,
            };
        }
        // 3. Baseline tier: first matching Allow/Deny (a Pass leaves the tier).
        let (baseline, split) = self.tier_rules(t.baseline, class, seg);
        for &r in baseline {
            let rule = &self.rules[r as usize];
            if (split || candidate(ports, r)) && self.rule_matches(rule, &p) {
                match rule.action {
                    Action::Pass => break,
                    action => {
                        let allow = action == Action::Allow;
                        return SideOutcome::matched(allow, DecidedBy::Baseline, rule, r, passed);
                    }
                }
            }
        }
        // 4. The default.
        SideOutcome {
            allow: self.opts.default == DefaultAction::Allow,
            by: DecidedBy::Default,
            policy: None,
            rule: None,
            passed,
        }
    }

    /// The first matching Admin rule by walking the side's list.
    #[inline]
    fn first_admin_walk(&self, t: &SideTable, ports: &[u64], p: &Probe<'_>) -> Option<u32> {
        let (admin, split) = self.tier_rules(t.admin, p.class, p.seg);
        admin.iter().copied().find(|&r| {
            (split || candidate(ports, r)) && self.rule_matches(&self.rules[r as usize], p)
        })
    }

    /// The first matching Admin rule from the bitsets (see `CompiledPolicy::admin_words`):
    /// candidates in rank order, each verified by [`Self::rule_matches`].
    #[inline]
    fn first_admin_bits(&self, t: &SideTable, d: usize, probe: &Probe<'_>) -> Option<u32> {
        let Probe { q, peer, class, seg, .. } = *probe;
        let words = self.admin_words[d];
        let pool = &self.admin_pool;
        let at = t.admin_bits as usize;
        let subject = pool.get(at..at + words)?;
        let c = match peer.workload {
            Some(w) => self.admin_class.get(w as usize)?[d],
            None => {
                let (f, a) = match peer.key {
                    Key::V4(a) => (0, u128::from(a)),
                    Key::V6(a) => (1, a),
                };
                let k = self.admin_ext_starts[f].partition_point(|&s| s <= a).checked_sub(1)?;
                self.admin_ext_class[f].get(k)?[d]
            }
        } as usize;
        let peers = pool.get(c..c + words)?;
        // Without a name, domain rules cannot match: no mask adds nothing. With one, the
        // masks of the patterns it can match, or past `DOMAIN_HITS` of them every
        // domain rule (a superset is always safe: candidates are verified).
        let mut hits = [0u32; DOMAIN_HITS];
        let mut found = 0usize;
        if let Some(name) = q.fqdn {
            found = self.domain_hits(d, name, &mut hits);
            if found > DOMAIN_HITS {
                hits[0] = self.admin_domains[d];
                found = 1;
            }
        }
        let hits = &hits[..found];
        let ports = self.admin_port[d][class].get(seg * words..(seg + 1) * words)?;
        let ranks = &self.admin_rank[d];
        for (i, ((s, p), o)) in subject.iter().zip(peers).zip(ports).enumerate() {
            let mut n = 0;
            for &h in hits {
                n |= pool.get(h as usize + i).copied().unwrap_or(0);
            }
            let mut m = s & (p | n) & o;
            while m != 0 {
                let rank = i * 64 + m.trailing_zeros() as usize;
                m &= m - 1;
                let r = *ranks.get(rank)?;
                if self.rule_matches(&self.rules[r as usize], probe) {
                    return Some(r);
                }
            }
        }
        None
    }

    /// Fills `hits` with the `admin_pool` offsets of the domain masks `name` brings in:
    /// its exact pattern and every wildcard whose suffix follows one of its dots (not the
    /// first character: a wildcard needs at least one label in front). Returns how many
    /// there are; more than `hits.len()` means the caller must use every domain rule.
    #[inline]
    fn domain_hits(&self, d: usize, name: &str, hits: &mut [u32; DOMAIN_HITS]) -> usize {
        let mut found = 0usize;
        let mut push = |off: u32| {
            if let Some(slot) = hits.get_mut(found) {
                *slot = off;
            }
            found += 1;
        };
        if let Some(&off) = self.admin_dom_exact[d].get(name) {
            push(off);
        }
        let suffixes = &self.admin_dom_suffix[d];
        if !suffixes.is_empty() {
            for (i, b) in name.bytes().enumerate() {
                if b == b'.'
                    && i > 0
                    && let Some(&off) = name.get(i + 1..).and_then(|s| suffixes.get(s))
                {
                    push(off);
                }
            }
        }
        found
    }

    /// The flow's protocol class and port segment: one binary search over the segment
    /// starts.
    #[inline]
    pub(super) fn port_segment(&self, q: &FlowQuery<'_>) -> (usize, usize) {
        let c = port_class(q.proto);
        let port = if c == 3 { 0 } else { q.dst_port };
        (c, self.port_starts[c].partition_point(|&s| s <= port).saturating_sub(1))
    }

    /// The port prefilter's bitset for a segment.
    #[inline]
    fn port_candidates(&self, class: usize, seg: usize) -> &[u64] {
        let words = self.rule_words;
        self.port_bits[class].get(seg * words..(seg + 1) * words).unwrap_or(&[])
    }

    /// A cluster tier's rules for this port segment: the pre-split list when there is
    /// one, else the whole list (the bitset prefilter then does the skipping). The flag
    /// says the list is pre-split: its rules already passed the prefilter, so the caller
    /// skips the bit test.
    #[inline]
    fn tier_rules(&self, list: TierList, class: usize, seg: usize) -> (&[u32], bool) {
        if list.seg != NONE
            && let Some(table) = self.seg_tables.get(list.seg as usize)
            && let Some(span) = self.seg_spans.get(table[class] as usize + seg)
        {
            return (span.of(&self.lists), true);
        }
        (list.rules.of(&self.lists), false)
    }

    /// The named ports of `end`'s workload.
    #[inline]
    fn named_ports_of(&self, end: End) -> &[WPort] {
        end.workload
            .and_then(|w| self.inv.workload_ports.get(w as usize))
            .map_or(&[], |span| span.of(&self.inv.ports))
    }

    /// Whether `rule` matches, for a rule that passed the port prefilter (every caller
    /// tests the prefilter first): that is exact for numeric ports, so only a rule with a
    /// named port has its ports checked again. Ports first: they are one or two compares
    /// and rule out most rules of a list.
    #[inline]
    fn rule_matches(&self, rule: &CRule, p: &Probe<'_>) -> bool {
        let Probe { q, peer, .. } = *p;
        if rule.port_check == PortCheck::Named
            && !rule.ports.of(&self.cports).iter().any(|c| port_matches(c, q, p.dst_ports))
        {
            return false;
        }
        if rule.any_peer {
            return true;
        }
        if let Some(w) = peer.workload
            && self.set_contains(rule.workloads, w)
        {
            return true;
        }
        if rule.cidrs.of(&self.cidrs).iter().any(|c| {
            c.net.contains(peer.key)
                && !c.except.of(&self.excepts).iter().any(|e| e.contains(peer.key))
        }) {
            return true;
        }
        match q.fqdn {
            Some(name) => rule.domains.of(&self.domains).iter().any(|d| d.matches(name)),
            None => false,
        }
    }

    #[inline]
    pub(super) fn set_contains(&self, set: WorkloadSet, w: u32) -> bool {
        match set {
            WorkloadSet::Empty => false,
            WorkloadSet::Sorted(span) => span.of(&self.set_ids).binary_search(&w).is_ok(),
            WorkloadSet::Bits(k) => {
                let word = k as usize * self.bits_words + (w as usize >> 6);
                self.set_bits[word] & (1 << (w & 63)) != 0
            }
        }
    }
}

/// Whether port clause `p` admits the flow; `dst_ports` are the destination workload's
/// named ports.
#[inline]
fn port_matches(p: &CPort, q: &FlowQuery<'_>, dst_ports: &[WPort]) -> bool {
    match *p {
        CPort::Range { proto, first, last } => {
            proto == q.proto && first <= q.dst_port && q.dst_port <= last
        }
        CPort::Named { proto, name } => {
            if name == NONE || proto.is_some_and(|p| p != q.proto) {
                return false;
            }
            dst_ports
                .iter()
                .any(|np| np.name == name && np.proto == q.proto && np.port == q.dst_port)
        }
    }
}

/// Whether `side` (when the end is a workload) refuses the flow; if so, `d` says so,
/// with the side's direction, cause and deciding policy.
#[inline]
fn refuses(d: &mut Decision, side: Option<SideOutcome>, direction: Direction) -> bool {
    match side {
        Some(s) if !s.allow => {
            d.verdict = Verdict::Deny(DenyReason { direction: Some(direction), cause: s.cause() });
            d.policy = s.policy.map(PolicyId);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
