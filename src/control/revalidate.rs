//! Re-checking established flows against a new policy generation.
//!
//! After a swap, every conntrack entry admitted by an older generation is decided again
//! with the new tables. Still allowed: its generation is moved forward. Now denied: its
//! [`CutSignal`](crate::conntrack::CutSignal) is triggered (the proxy task closes both
//! sockets) and the entry removed — except a packet flow's, which stays marked revoked
//! ([`Entry::revoke`]) until it expires, so the packet filter drops its next packets as
//! revoked — and the caller's callback hears about it so it can log `revoked`, once: a
//! revoked entry is never decided again.
//!
//! Bounded and off the hot path: entries are collected first (a clone of each `Arc`,
//! holding each table shard only for that), then decided in batches of
//! `control.revalidate_batch` with a yield between batches, so a table of 262,144 flows
//! never holds a shard or a CPU for long. Flows admitted by the old generation while the
//! first pass ran are caught by a second pass over entries still below the new generation.
//!
//! A flow admitted through an egress listener for a name is re-decided with that name
//! (kept on its entry, [`Entry::fqdn`]), so a reload that keeps the `domainNames` rule
//! allowing it keeps the flow, and one that drops the rule cuts it.

use crate::conntrack::{Conntrack, Entry, EntryRef};
use crate::policy::{Decision, FlowQuery, Generation, PolicySnapshot};

/// Counts from one revalidation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevalidateStats {
    /// Entries decided again.
    pub checked: usize,
    /// Entries cut.
    pub revoked: usize,
}

/// The question `decide` is asked for an established flow: its addresses, port and
/// protocol, and the name it was admitted for, if any.
pub fn query_of(entry: &Entry) -> FlowQuery<'_> {
    FlowQuery::from_key(&entry.key(), entry.fqdn())
}

/// Decides an established flow again: as the workload its proxy credentials named when
/// it has one ([`crate::conntrack::CutSignal::source`]; a workload gone from the
/// inventory is nobody's, so it fails closed), else by its addresses.
pub fn decide_entry(compiled: &crate::policy::CompiledPolicy, entry: &Entry) -> Decision {
    let q = query_of(entry);
    match entry.cut().and_then(|c| c.source()).and_then(|w| w.split_once('/')) {
        Some((ns, name)) => {
            let id =
                compiled.find_workload(ns, name).unwrap_or(crate::policy::WorkloadId(u32::MAX));
            compiled.decide_as(&q, id)
        }
        None => compiled.decide(&q),
    }
}

/// Re-checks every entry older than `snapshot`'s generation; cuts and reports the ones it
/// now denies. `batch` is the number of entries decided between yields (at least 1).
pub fn revalidate(
    conntrack: &Conntrack,
    snapshot: &PolicySnapshot,
    batch: usize,
    on_revoke: &dyn Fn(&Entry, &Decision),
) -> RevalidateStats {
    let generation = snapshot.generation;
    let mut stats = RevalidateStats::default();
    for _pass in 0..2 {
        let stale = collect_stale(conntrack, generation);
        if stale.is_empty() {
            break;
        }
        for chunk in stale.chunks(batch.max(1)) {
            for entry in chunk {
                stats.checked += 1;
                let decision = decide_entry(&snapshot.compiled, entry);
                if decision.verdict.is_allow() {
                    entry.set_generation(generation);
                } else {
                    // Mark it first, so a concurrent pass never reports it twice.
                    entry.set_generation(generation);
                    match entry.cut() {
                        // A packet flow has no task to close: its entry stays, marked, so
                        // its next packets are dropped as revoked until it expires (and a
                        // later revalidation skips it: one `revoked` event per flow).
                        Some(cut) if cut.is_packet() => {
                            entry.revoke();
                            cut.trigger();
                        }
                        cut => {
                            if let Some(cut) = cut {
                                cut.trigger();
                            }
                            conntrack.remove(&entry.key());
                        }
                    }
                    stats.revoked += 1;
                    on_revoke(entry, &decision);
                }
            }
            std::thread::yield_now();
        }
    }
    stats
}

fn collect_stale(conntrack: &Conntrack, generation: Generation) -> Vec<EntryRef> {
    let mut stale = Vec::new();
    conntrack.for_each(|e| {
        if e.generation() < generation && !e.is_revoked() {
            stale.push(e.clone());
        }
    });
    stale
}
