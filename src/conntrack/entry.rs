//! One tracked flow, laid out to fit the memory budget (≤ 128 bytes per entry at 1M entries,
//! table overhead included; see BENCHMARKS-conntrack.md).
//!
//! An [`Entry`] is 80 bytes: the per-direction counters and last-seen time are atomics the
//! forwarding path bumps without a lock; the key is stored IPv4-compact (two `u32`s and two
//! ports) with IPv6 addresses moved out to [`EntryExt`], which also holds the cut handle of
//! proxied flows and the domain name an egress flow was admitted for. Packet flows over IPv4 therefore cost one allocation: the `Arc<Entry>`.
//! All mutable state lives in one byte (`state`), updated with compare-and-swap so the TCP
//! state machine, the flow state and the table's bookkeeping bits never tear.

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::flow::{FlowKey, Proto};
use crate::policy::{Generation, WorkloadId};

use super::tcp_state::{Side, TcpConn, TcpFlags, TcpInvalid, TcpState};

/// Lifecycle of a tracked flow, as the proxy dataplane and `/flows` see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FlowState {
    /// A proxied connection (or an established TCP flow) carrying data.
    Open = 0,
    /// A proxied connection with one side shut down, or TCP FIN seen.
    Closing = 1,
    /// UDP / ICMP / TCP handshake: only the originator has sent so far.
    Unreplied = 2,
    /// UDP / ICMP: both sides have sent; evicted last.
    Assured = 3,
}

impl FlowState {
    fn from_bits(v: u8) -> FlowState {
        match v & 0b11 {
            1 => FlowState::Closing,
            2 => FlowState::Unreplied,
            3 => FlowState::Assured,
            _ => FlowState::Open,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            FlowState::Open => "open",
            FlowState::Closing => "closing",
            FlowState::Unreplied => "unreplied",
            FlowState::Assured => "assured",
        }
    }
}

/// Tells a forwarding task that its flow has been cut (revoked by a reload, quarantined,
/// evicted or expired). Proxied connections `select!` on [`CutSignal::cut`]; packet flows
/// simply lose their entry.
#[derive(Debug, Default)]
pub struct CutSignal {
    cut: AtomicBool,
    notify: tokio::sync::Notify,
    /// The workload (`namespace/name`) the flow's client proved to be with proxy
    /// credentials (egress listeners), which its address does not say: a reload
    /// re-decides the flow as that workload. Kept here, on the proxied flow's own
    /// allocation, so packet flows pay nothing for it.
    source: OnceLock<Arc<str>>,
}

impl CutSignal {
    /// Marks the flow as cut and wakes its task. Idempotent.
    pub fn trigger(&self) {
        self.cut.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Records the source workload named by proxy credentials (first call wins).
    pub fn set_source(&self, workload: Arc<str>) {
        let _ = self.source.set(workload);
    }

    /// The source workload named by proxy credentials, `namespace/name`.
    pub fn source(&self) -> Option<&str> {
        self.source.get().map(|s| &**s)
    }

    /// Completes once the flow is cut.
    pub async fn cut(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_cut() {
                return;
            }
            notified.await;
        }
    }
}

/// What the dataplane knows when it admits a flow.
#[derive(Debug)]
pub struct EntryInit {
    pub state: FlowState,
    pub generation: Generation,
    pub src_workload: Option<WorkloadId>,
    pub dst_workload: Option<WorkloadId>,
    /// Index of the listener (or packet port) that admitted the flow.
    pub listener: u16,
    /// Present for proxied flows, which a reload cuts through it.
    pub cut: Option<Arc<CutSignal>>,
    /// The (normalised) domain name an egress flow was admitted for, so a reload re-decides
    /// it against `domainNames` rules instead of by address alone.
    pub fqdn: Option<Arc<str>>,
}

impl EntryInit {
    /// A packet-dataplane TCP flow opened by `flags` (the first segment, originator side).
    /// The flow state starts at `Unreplied`; the TCP machine drives it from there.
    ///
    /// # Errors
    /// [`TcpInvalid`] when the first segment cannot open a connection (no SYN, SYN+ACK,
    /// RST, …): the packet is dropped and no entry is made (fail closed).
    pub fn tcp_packet(
        flags: TcpFlags,
        generation: Generation,
        src_workload: Option<WorkloadId>,
        dst_workload: Option<WorkloadId>,
        listener: u16,
    ) -> Result<(EntryInit, TcpConn), TcpInvalid> {
        let conn = TcpConn::open(flags)?;
        Ok((
            EntryInit {
                state: FlowState::Unreplied,
                generation,
                src_workload,
                dst_workload,
                listener,
                cut: None,
                fqdn: None,
            },
            conn,
        ))
    }
}

/// The parts of an entry that most flows do not need, kept off the 80-byte entry.
#[derive(Debug)]
struct EntryExt {
    cut: Option<Arc<CutSignal>>,
    /// IPv6 (or mixed-family, v4-mapped) addresses, originator side first.
    v6: Option<(u128, u128)>,
    /// The domain name the flow was admitted for (egress listeners).
    fqdn: Option<Arc<str>>,
}

/// `state` byte layout: which bits hold what.
const FLOW_BITS: u8 = 0b0000_0011;
const TCP_SHIFT: u8 = 2;
const TCP_BITS: u8 = 0b0011_1100;
/// Set when the first FIN came from the reply side (meaningful in closing TCP states).
const CLOSER_REPLY: u8 = 0b0100_0000;
/// Set while a reference to the entry sits in its shard's eviction queue (table bookkeeping).
pub(crate) const QUEUED: u8 = 0b1000_0000;

/// Sentinel for "no workload" in the packed identity fields.
const NO_WORKLOAD: u32 = u32::MAX;

/// One tracked flow. Counters and timestamps are atomics: the forwarding task updates them
/// without a lock, readers (`/flows`, revalidation) see a recent value.
///
/// Layout (80 bytes, checked by a test): counters 32, last seen 8, ext 8, generation 4,
/// created 4, IPv4 addresses 8, workloads 8, ports + listener 6, protocol 1, state 1.
#[derive(Debug)]
pub struct Entry {
    /// Bytes and packets, originator → responder and back.
    pub bytes_orig: AtomicU64,
    pub bytes_reply: AtomicU64,
    pub packets_orig: AtomicU64,
    pub packets_reply: AtomicU64,
    last_seen_ms: AtomicU64,
    ext: Option<Box<EntryExt>>,
    /// The low 32 bits of the allowing policy generation: a reload a second for 136 years.
    generation: AtomicU32,
    /// Seconds since the table's epoch.
    created_s: u32,
    src_ip: u32,
    dst_ip: u32,
    src_wl: u32,
    dst_wl: u32,
    src_port: u16,
    dst_port: u16,
    listener: u16,
    proto: u8,
    state: AtomicU8,
}

impl Entry {
    pub(crate) fn new(key: &FlowKey, init: EntryInit, tcp: Option<TcpConn>, now_ms: u64) -> Entry {
        let (src_bits, dst_bits, v6) = addr_bits(key);
        let ext = if v6 || init.cut.is_some() || init.fqdn.is_some() {
            Some(Box::new(EntryExt {
                cut: init.cut,
                v6: v6.then_some((src_bits, dst_bits)),
                fqdn: init.fqdn,
            }))
        } else {
            None
        };
        let mut state = init.state as u8;
        if let Some(conn) = tcp {
            state = (state & !(TCP_BITS | CLOSER_REPLY)) | conn_bits(conn);
            state = (state & !FLOW_BITS) | conn.state().flow_state() as u8;
        }
        Entry {
            bytes_orig: AtomicU64::new(0),
            bytes_reply: AtomicU64::new(0),
            packets_orig: AtomicU64::new(0),
            packets_reply: AtomicU64::new(0),
            last_seen_ms: AtomicU64::new(now_ms),
            ext,
            generation: AtomicU32::new(init.generation.0 as u32),
            created_s: u32::try_from(now_ms / 1000).unwrap_or(u32::MAX),
            src_ip: if v6 { 0 } else { src_bits as u32 },
            dst_ip: if v6 { 0 } else { dst_bits as u32 },
            src_wl: init.src_workload.map_or(NO_WORKLOAD, |w| w.0),
            dst_wl: init.dst_workload.map_or(NO_WORKLOAD, |w| w.0),
            src_port: key.src.port(),
            dst_port: key.dst.port(),
            listener: init.listener,
            proto: key.proto.number(),
            state: AtomicU8::new(state),
        }
    }

    /// The key as the originator sent it (not canonicalised). Mixed-family keys come back
    /// with the IPv4 side v4-mapped.
    pub fn key(&self) -> FlowKey {
        let (src, dst) = match self.v6_addrs() {
            Some((s, d)) => {
                (IpAddr::V6(Ipv6Addr::from_bits(s)), IpAddr::V6(Ipv6Addr::from_bits(d)))
            }
            None => (
                IpAddr::V4(Ipv4Addr::from_bits(self.src_ip)),
                IpAddr::V4(Ipv4Addr::from_bits(self.dst_ip)),
            ),
        };
        FlowKey::new(
            Proto::from_number(self.proto),
            SocketAddr::new(src, self.src_port),
            SocketAddr::new(dst, self.dst_port),
        )
    }

    pub fn proto(&self) -> Proto {
        Proto::from_number(self.proto)
    }

    pub fn src_workload(&self) -> Option<WorkloadId> {
        (self.src_wl != NO_WORKLOAD).then_some(WorkloadId(self.src_wl))
    }

    pub fn dst_workload(&self) -> Option<WorkloadId> {
        (self.dst_wl != NO_WORKLOAD).then_some(WorkloadId(self.dst_wl))
    }

    /// Index of the listener (or packet port) that admitted the flow.
    pub fn listener(&self) -> u16 {
        self.listener
    }

    /// The cut handle of a proxied flow.
    pub fn cut(&self) -> Option<&Arc<CutSignal>> {
        self.ext.as_ref().and_then(|x| x.cut.as_ref())
    }

    /// The normalised domain name the flow was admitted for, if it came through an egress
    /// listener that was given one (revalidation re-decides with it).
    pub fn fqdn(&self) -> Option<&str> {
        self.ext.as_ref().and_then(|x| x.fqdn.as_deref())
    }

    /// Cuts the flow if it has a handle (eviction, expiry, revocation).
    pub fn trigger_cut(&self) {
        if let Some(c) = self.cut() {
            c.trigger();
        }
    }

    fn v6_addrs(&self) -> Option<(u128, u128)> {
        self.ext.as_ref().and_then(|x| x.v6)
    }

    pub fn state(&self) -> FlowState {
        FlowState::from_bits(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, s: FlowState) {
        self.update_state(|b| (b & !FLOW_BITS) | s as u8);
    }

    /// The TCP state when the packet dataplane drives this flow's state machine.
    pub fn tcp_state(&self) -> Option<TcpState> {
        self.tcp_conn().map(|c| c.state())
    }

    fn tcp_conn(&self) -> Option<TcpConn> {
        tcp_conn_of(self.state.load(Ordering::Relaxed))
    }

    /// Feeds one TCP segment seen on `side` into the flow's state machine (packet dataplane).
    /// The flow state follows (handshake → `Unreplied`, established → `Open`, FIN → `Closing`).
    ///
    /// # Errors
    /// [`TcpInvalid`] when the segment is not valid in the current state (data before the
    /// handshake, SYN on an established flow, …) or the flow has no TCP machine; the state
    /// is left unchanged and the caller drops the packet.
    pub fn on_tcp_segment(&self, side: Side, flags: TcpFlags) -> Result<TcpState, TcpInvalid> {
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let conn = tcp_conn_of(cur).ok_or(TcpInvalid::NotTracked)?;
            let next = conn.on_segment(side, flags)?;
            let bits = (cur & !(TCP_BITS | CLOSER_REPLY | FLOW_BITS))
                | conn_bits(next)
                | next.state().flow_state() as u8;
            match self.state.compare_exchange_weak(cur, bits, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(next.state()),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Records a packet from the reply side for a UDP / ICMP / other flow: an unreplied flow
    /// becomes assured (and is then evicted last). Returns the new state.
    pub fn mark_reply(&self) -> FlowState {
        let b = self.update_state(|b| {
            if FlowState::from_bits(b) == FlowState::Unreplied && tcp_conn_of(b).is_none() {
                (b & !FLOW_BITS) | FlowState::Assured as u8
            } else {
                b
            }
        });
        FlowState::from_bits(b)
    }

    /// Counts one packet of `bytes` bytes travelling on `side`.
    pub fn count(&self, side: Side, bytes: u64) {
        let (b, p) = match side {
            Side::Orig => (&self.bytes_orig, &self.packets_orig),
            Side::Reply => (&self.bytes_reply, &self.packets_reply),
        };
        b.fetch_add(bytes, Ordering::Relaxed);
        p.fetch_add(1, Ordering::Relaxed);
    }

    fn update_state(&self, f: impl Fn(u8) -> u8) -> u8 {
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let next = f(cur);
            match self.state.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Sets or clears table bookkeeping bits; returns the previous byte.
    pub(crate) fn swap_flag(&self, flag: u8, on: bool) -> u8 {
        if on {
            self.state.fetch_or(flag, Ordering::Relaxed)
        } else {
            self.state.fetch_and(!flag, Ordering::Relaxed)
        }
    }

    /// Whether the table may evict this flow to make room: the flow has not proven itself
    /// (UDP/ICMP unreplied, TCP not established) or is on its way out (closing).
    pub fn is_evictable(&self) -> bool {
        let b = self.state.load(Ordering::Relaxed);
        match tcp_conn_of(b) {
            Some(c) => c.state() != TcpState::Established,
            None => matches!(FlowState::from_bits(b), FlowState::Unreplied | FlowState::Closing),
        }
    }

    /// The policy generation that last allowed this flow.
    pub fn generation(&self) -> Generation {
        Generation(u64::from(self.generation.load(Ordering::Relaxed)))
    }

    pub fn set_generation(&self, g: Generation) {
        self.generation.store(g.0 as u32, Ordering::Relaxed);
    }

    /// Milliseconds since the table was created, when the entry was created (second
    /// resolution) / last used.
    pub fn created_ms(&self) -> u64 {
        u64::from(self.created_s) * 1000
    }

    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn set_last_seen_ms(&self, ms: u64) {
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// Which side of this flow a packet with key `key` travels on, if it belongs to it.
    pub fn side_of(&self, key: &FlowKey) -> Option<Side> {
        self.matches(&Probe::new(key))
    }

    /// The direction-independent hash of this entry's key (same as its [`Probe`]'s).
    pub(crate) fn hash64(&self) -> u64 {
        spread(self.hash32())
    }

    /// The 32 bits the map hash is made from (what the eviction queue stores).
    pub(crate) fn hash32(&self) -> u32 {
        let (s, d) = match self.v6_addrs() {
            Some(p) => p,
            None => (u128::from(self.src_ip), u128::from(self.dst_ip)),
        };
        let v6 = self.v6_addrs().is_some();
        let (lo, hi) = order((s, self.src_port), (d, self.dst_port));
        key_hash32(self.proto, v6, lo, hi)
    }

    pub(crate) fn matches(&self, p: &Probe) -> Option<Side> {
        if self.proto != p.proto {
            return None;
        }
        let (s, d) = if p.v6 {
            self.v6_addrs()?
        } else {
            if self.ext.as_ref().is_some_and(|x| x.v6.is_some()) {
                return None;
            }
            (u128::from(self.src_ip), u128::from(self.dst_ip))
        };
        let src = (s, self.src_port);
        let dst = (d, self.dst_port);
        if src == p.lo && dst == p.hi {
            Some(if p.lo_is_src { Side::Orig } else { Side::Reply })
        } else if src == p.hi && dst == p.lo {
            Some(if p.lo_is_src { Side::Reply } else { Side::Orig })
        } else {
            None
        }
    }
}

fn tcp_conn_of(b: u8) -> Option<TcpConn> {
    let closer = if b & CLOSER_REPLY != 0 { Side::Reply } else { Side::Orig };
    TcpConn::from_parts((b & TCP_BITS) >> TCP_SHIFT, closer)
}

fn conn_bits(c: TcpConn) -> u8 {
    let (state, closer) = c.to_parts();
    ((state << TCP_SHIFT) & TCP_BITS) | if closer == Side::Reply { CLOSER_REPLY } else { 0 }
}

/// Address bits of both endpoints and whether they need the IPv6 form (either side is v6).
fn addr_bits(key: &FlowKey) -> (u128, u128, bool) {
    match (key.src.ip(), key.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (u128::from(s.to_bits()), u128::from(d.to_bits()), false),
        (s, d) => (v6_bits(s), v6_bits(d), true),
    }
}

fn v6_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().to_bits(),
        IpAddr::V6(a) => a.to_bits(),
    }
}

type End = (u128, u16);

fn order(a: End, b: End) -> (End, End) {
    if a <= b { (a, b) } else { (b, a) }
}

/// A looked-up key, canonicalised and hashed once: what the table compares entries with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Probe {
    pub(crate) hash: u64,
    pub(crate) h32: u32,
    proto: u8,
    v6: bool,
    lo_is_src: bool,
    lo: End,
    hi: End,
}

impl Probe {
    pub(crate) fn new(key: &FlowKey) -> Probe {
        let (s, d, v6) = addr_bits(key);
        let src = (s, key.src.port());
        let dst = (d, key.dst.port());
        let lo_is_src = src <= dst;
        let (lo, hi) = if lo_is_src { (src, dst) } else { (dst, src) };
        let proto = key.proto.number();
        let h32 = key_hash32(proto, v6, lo, hi);
        Probe { hash: spread(h32), h32, proto, v6, lo_is_src, lo, hi }
    }
}

/// Per-process random keys, so nobody outside can aim flows at one bucket or shard.
fn seeds() -> &'static [u64; 4] {
    static SEEDS: OnceLock<[u64; 4]> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let rs = std::collections::hash_map::RandomState::new();
        std::array::from_fn(|i| rs.hash_one(i as u64) | 1)
    })
}

/// Folded 64×64→128 multiply: the mixing step of fast keyed hashes.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// The map hash made from a 32-bit key hash: a bijective spread, so the 32 bits stored in
/// the eviction queue (4 bytes per entry instead of 8) find the entry again. Both the top
/// bits (bucket) and the low byte (tag) vary with the input.
#[inline]
pub(crate) fn spread(h32: u32) -> u64 {
    let x = u64::from(h32);
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ (x << 32)
}

/// Keyed hash of a canonical key. IPv4 keys fold two words (a few nanoseconds); the
/// spread hash picks the shard and, passed straight through, the bucket (no second
/// hashing). 32 bits are plenty to spread a table of millions; equality is always checked
/// on the full key.
#[inline]
fn key_hash32(proto: u8, v6: bool, lo: End, hi: End) -> u32 {
    (key_hash(proto, v6, lo, hi) >> 32) as u32
}

#[inline]
fn key_hash(proto: u8, v6: bool, lo: End, hi: End) -> u64 {
    let s = seeds();
    let ports = (u64::from(lo.1) << 16) | u64::from(hi.1) | (u64::from(proto) << 32);
    if v6 {
        let h = fold((lo.0 as u64) ^ s[0], ((lo.0 >> 64) as u64) ^ s[1]);
        let h = fold(h ^ (hi.0 as u64), ((hi.0 >> 64) as u64) ^ s[2]);
        fold(h ^ ports ^ (1 << 40), s[3])
    } else {
        let a = ((lo.0 as u64) << 32) | (hi.0 as u64);
        fold(fold(a ^ s[0], ports ^ s[1]), s[2])
    }
}

/// Map key: the entry itself, hashed and compared by its canonical flow key, so the key is
/// stored once (inside the entry) and the map slot is one pointer.
#[derive(Clone, Debug)]
pub(crate) struct Slot(pub(crate) Arc<Entry>);

impl Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash64());
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Slot) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || {
            let k = other.0.key();
            self.0.matches(&Probe::new(&k)).is_some()
        }
    }
}

impl Eq for Slot {}

impl Hash for Probe {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl scc::Equivalent<Slot> for Probe {
    fn equivalent(&self, key: &Slot) -> bool {
        key.0.matches(self).is_some()
    }
}

/// Finds one exact entry (eviction and expiry remove precisely what they examined).
pub(crate) struct Exact<'a> {
    pub(crate) hash: u64,
    pub(crate) entry: &'a Entry,
}

impl Hash for Exact<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl scc::Equivalent<Slot> for Exact<'_> {
    fn equivalent(&self, key: &Slot) -> bool {
        std::ptr::eq(Arc::as_ptr(&key.0), self.entry)
    }
}

/// Finds an entry by its 32-bit hash alone: the eviction queue stores 4-byte hashes, not
/// keys. Two live flows sharing 32 bits in one shard is rare and harmless: whichever is
/// found is checked for evictability like any other candidate.
pub(crate) struct ByHash(pub(crate) u32);

impl Hash for ByHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(spread(self.0));
    }
}

impl scc::Equivalent<Slot> for ByHash {
    fn equivalent(&self, key: &Slot) -> bool {
        key.0.hash32() == self.0
    }
}

/// The keys hash themselves (keyed, see [`key_hash`]); the map uses that value as is.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PassThrough;

#[derive(Default)]
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than our key types is hashed; stay correct.
        for b in bytes {
            self.0 = fold(self.0 ^ u64::from(*b), 0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;

    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> EntryInit {
        EntryInit {
            state: FlowState::Unreplied,
            generation: Generation(7),
            src_workload: Some(WorkloadId(3)),
            dst_workload: None,
            listener: 2,
            cut: None,
            fqdn: None,
        }
    }

    #[test]
    fn entry_is_80_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 80);
    }

    #[test]
    fn key_round_trips_v4_and_v6() {
        for (s, d) in
            [("198.18.0.1:4000", "198.18.0.2:53"), ("[2001:db8::1]:4000", "[2001:db8::2]:53")]
        {
            let k = FlowKey::new(Proto::Udp, s.parse().unwrap(), d.parse().unwrap());
            let e = Entry::new(&k, init(), None, 1500);
            assert_eq!(e.key(), k);
            assert_eq!(e.side_of(&k), Some(Side::Orig));
            assert_eq!(e.side_of(&k.reversed()), Some(Side::Reply));
            assert_eq!(e.hash64(), Probe::new(&k).hash);
            assert_eq!(e.hash64(), Probe::new(&k.reversed()).hash);
            assert_eq!(e.src_workload(), Some(WorkloadId(3)));
            assert_eq!(e.dst_workload(), None);
            assert_eq!(e.generation(), Generation(7));
            assert_eq!(e.created_ms(), 1000);
            let other = FlowKey::new(Proto::Tcp, k.src, k.dst);
            assert_eq!(e.side_of(&other), None);
        }
    }

    #[test]
    fn fqdn_lives_in_the_side_allocation() {
        let k = FlowKey::new(
            Proto::Tcp,
            "198.18.0.1:4000".parse().unwrap(),
            "198.18.0.2:443".parse().unwrap(),
        );
        let plain = Entry::new(&k, init(), None, 0);
        assert_eq!(plain.fqdn(), None);
        assert!(plain.ext.is_none(), "an IPv4 entry without a name needs no side allocation");
        let named = Entry::new(
            &k,
            EntryInit { fqdn: Some(Arc::from("api.example.com")), ..init() },
            None,
            0,
        );
        assert_eq!(named.fqdn(), Some("api.example.com"));
        assert_eq!(named.key(), k, "a name must not turn the entry into an IPv6 one");
        assert_eq!(named.side_of(&k), Some(Side::Orig));
    }

    #[test]
    fn v4_probe_never_matches_v6_entry() {
        let v4 =
            FlowKey::new(Proto::Udp, "0.0.0.1:1".parse().unwrap(), "0.0.0.2:2".parse().unwrap());
        let v6 = FlowKey::new(Proto::Udp, "[::1]:1".parse().unwrap(), "[::2]:2".parse().unwrap());
        let e = Entry::new(&v6, init(), None, 0);
        assert_eq!(e.side_of(&v4), None);
    }

    #[test]
    fn udp_reply_assures() {
        let k = FlowKey::new(
            Proto::Udp,
            "198.18.0.1:1".parse().unwrap(),
            "198.18.0.2:2".parse().unwrap(),
        );
        let e = Entry::new(&k, init(), None, 0);
        assert!(e.is_evictable());
        assert_eq!(e.mark_reply(), FlowState::Assured);
        assert!(!e.is_evictable());
        // Bookkeeping bits do not disturb the flow state.
        e.swap_flag(QUEUED, true);
        assert_eq!(e.state(), FlowState::Assured);
        assert!(e.tcp_state().is_none());
        assert!(e.on_tcp_segment(Side::Orig, TcpFlags::ACK).is_err());
    }
}
