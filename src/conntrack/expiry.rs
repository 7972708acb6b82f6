//! Idle timeouts per protocol and state, and the incremental expiry sweep.
//!
//! The sweep walks a cursor (shard, position) across the shards, examining at most `budget`
//! entries per call, so it never stops the world: lookups never wait for it (they take no
//! lock), inserts into the shard being swept wait only for the few removals it makes. While
//! it walks it also re-queues entries that became evictable after they were inserted (a
//! closing flow) so eviction finds them.
//!
//! The cursor counts positions in the shard's iteration order; inserts and removals in the
//! shard between two calls can shift that order, so an entry may be seen twice or missed in
//! one rotation. A missed entry is seen in the next one: expiry is late by at most one
//! rotation, never wrong (an entry is only removed after re-checking it is still idle).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::flow::Proto;

use super::entry::{Entry, Exact, FlowState, QUEUED};
use super::tcp_state::TcpState;
use super::{Conntrack, ConntrackConfig};

/// Timeouts in milliseconds, resolved once from the config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    tcp_established: u64,
    tcp_transitory: u64,
    tcp: [u64; 8],
    udp_unreplied: u64,
    udp_assured: u64,
    icmp: u64,
    other: u64,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Timeouts {
    pub(crate) fn new(c: &ConntrackConfig) -> Timeouts {
        Timeouts {
            tcp_established: ms(c.tcp_established),
            tcp_transitory: ms(c.tcp_transitory),
            tcp: [
                ms(c.tcp_syn_sent),
                ms(c.tcp_syn_recv),
                ms(c.tcp_established),
                ms(c.tcp_fin_wait),
                ms(c.tcp_close_wait),
                ms(c.tcp_last_ack),
                ms(c.tcp_time_wait),
                ms(c.tcp_close),
            ],
            udp_unreplied: ms(c.udp_unreplied),
            udp_assured: ms(c.udp_assured),
            icmp: ms(c.icmp),
            other: ms(c.other),
        }
    }

    /// How long `e` may stay idle in its current protocol and state.
    pub(crate) fn for_entry(&self, e: &Entry) -> u64 {
        if let Some(t) = e.tcp_state() {
            return self.tcp_state(t);
        }
        match (e.proto(), e.state()) {
            (Proto::Tcp, FlowState::Open | FlowState::Assured) => self.tcp_established,
            (Proto::Tcp, FlowState::Closing) => self.tcp_transitory,
            (Proto::Tcp, FlowState::Unreplied) => self.tcp[0],
            (Proto::Udp, FlowState::Open | FlowState::Assured) => self.udp_assured,
            (Proto::Udp, _) => self.udp_unreplied,
            (Proto::Icmp | Proto::Icmpv6, _) => self.icmp,
            _ => self.other,
        }
    }

    pub(crate) fn tcp_state(&self, t: TcpState) -> u64 {
        self.tcp[t as usize - 1]
    }

    pub(crate) fn is_expired(&self, e: &Entry, now_ms: u64) -> bool {
        now_ms.saturating_sub(e.last_seen_ms()) > self.for_entry(e)
    }
}

/// Where the sweep resumes.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    shard: usize,
    pos: usize,
    dead: Vec<Arc<Entry>>,
    requeue: Vec<u32>,
}

impl Conntrack {
    /// Expires idle entries, examining no more than `budget` of them; returns how many were
    /// removed. A background task calls this repeatedly (e.g. every 100 ms with a budget of
    /// a few thousand); a full rotation visits every entry once. Expired proxied flows are
    /// cut through their handle. If another call is already sweeping, returns 0 at once.
    pub fn expire_step(&self, now: Instant, budget: usize) -> usize {
        let Ok(mut cur) = self.cursor.try_lock() else {
            return 0;
        };
        let cur = &mut *cur;
        let now_ms = self.ms(now);
        let mut examined = 0;
        let mut removed = 0;
        let mut shards_done = 0;
        while examined < budget && shards_done < self.shards.len() {
            let shard = &self.shards[cur.shard];
            let mut pos = 0;
            let mut finished = true;
            {
                let guard = scc::Guard::new();
                for (slot, ()) in shard.map.iter(&guard) {
                    if pos < cur.pos {
                        pos += 1;
                        continue;
                    }
                    if examined == budget {
                        finished = false;
                        break;
                    }
                    pos += 1;
                    examined += 1;
                    let e = &slot.0;
                    if self.timeouts.is_expired(e, now_ms) {
                        cur.dead.push(e.clone());
                    } else if e.is_evictable() && e.swap_flag(QUEUED, true) & QUEUED == 0 {
                        cur.requeue.push(e.hash32());
                    }
                }
            }
            let mut gone = 0;
            for e in cur.dead.drain(..) {
                let exact = Exact { hash: e.hash64(), entry: &e };
                if shard.map.remove_if_sync(&exact, |()| self.timeouts.is_expired(&e, now_ms)) {
                    shard.len.fetch_sub(1, Ordering::Relaxed);
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    e.trigger_cut();
                    gone += 1;
                }
            }
            if !cur.requeue.is_empty() {
                let mut q = shard.lock();
                for h in cur.requeue.drain(..) {
                    shard.enqueue(&mut q, h, self.shard_cap);
                }
            }
            removed += gone;
            if finished {
                cur.shard = (cur.shard + 1) & self.mask;
                cur.pos = 0;
                shards_done += 1;
            } else {
                cur.pos = pos - gone;
            }
        }
        self.stats.expired.fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }
}
