//! Idle timeouts per protocol and state, and the incremental expiry sweep.
//!
//! The sweep walks a cursor (shard, slot id) across the shards' slabs, examining at most
//! `budget` slots per call, so it never stops the world: lookups never wait for it (they
//! take no lock), inserts into the shard being swept wait for at most one batch of
//! [`SWEEP_BATCH`] slots. While it walks it also re-queues entries that became evictable
//! after they were inserted (a closing flow) so eviction finds them. Slots do not move, so
//! one rotation sees every entry that was live throughout it.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::flow::Proto;

use super::entry::{Entry, FlowState, QUEUED};
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

/// Where the sweep resumes: a shard and a slot id in it.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    shard: usize,
    pos: u32,
}

/// Slots examined per hold of a shard's writer lock: bounds how long an insert into the
/// shard being swept can wait.
const SWEEP_BATCH: u32 = 512;

impl Conntrack {
    /// Expires idle entries, examining no more than `budget` slots; returns how many
    /// entries were removed. A background task calls this repeatedly (e.g. every 100 ms
    /// with a budget of a few thousand); a full rotation visits every slot once. Expired
    /// proxied flows are cut through their handle. If another call is already sweeping,
    /// returns 0 at once.
    pub fn expire_step(&self, now: Instant, budget: usize) -> usize {
        let Ok(mut cur) = self.cursor.try_lock() else {
            return 0;
        };
        let cur = &mut *cur;
        let now_ms = self.ms(now);
        let mut examined = 0usize;
        let mut removed = 0;
        let mut shards_done = 0;
        while examined < budget && shards_done < self.shards.len() {
            let shard = &self.shards[cur.shard];
            let high = shard.high.load(Ordering::Acquire);
            if cur.pos >= high {
                cur.shard = (cur.shard + 1) & self.mask;
                cur.pos = 0;
                shards_done += 1;
                continue;
            }
            let left = u32::try_from(budget - examined).unwrap_or(u32::MAX);
            let end = high.min(cur.pos.saturating_add(left.min(SWEEP_BATCH)));
            let mut w = shard.lock();
            for id in cur.pos..end {
                let Some(e) = shard.slot(id) else { continue };
                if !e.is_live() {
                    continue;
                }
                if self.timeouts.is_expired(&e, now_ms) {
                    e.trigger_cut();
                    shard.remove_slot(&mut w, id, &e);
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    removed += 1;
                } else if e.is_evictable() && e.swap_flag(QUEUED, true) & QUEUED == 0 {
                    // Became evictable after it was inserted (a closing flow).
                    shard.enqueue(&mut w, id, self.shard_cap);
                }
            }
            drop(w);
            examined += (end - cur.pos) as usize;
            cur.pos = end;
        }
        self.stats.expired.fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }
}
