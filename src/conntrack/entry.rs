//! One tracked flow, laid out to fit the memory budget (≤ 128 bytes per entry at 1M entries,
//! table overhead included; see BENCHMARKS.md, "Connection tracking").
//!
//! An entry is 88 bytes in place in its shard's slab (the table allocates nothing per
//! flow): a 64-byte [`Hot`] line with what a packet touches and a 24-byte [`Cold`] part
//! with what only the control plane reads; an [`Entry`] is a handle on both. The
//! per-direction counters and last-seen time are atomics the
//! forwarding path bumps without a lock; the key is stored IPv4-compact (two `u32`s and two
//! ports) with IPv6 addresses moved out to [`EntryExt`], which also holds the cut handle of
//! proxied and packet flows, the domain name an egress flow was admitted for and a packet
//! TCP flow's window bounds (`tcp_window.rs`) (one allocation for those flows only). A
//! packet flow that revalidation revoked stays marked in its state byte
//! ([`Entry::revoke`]) until it expires. Mutable flow state lives in one byte (`state`), updated with
//! compare-and-swap so the TCP state machine, the flow state and the table's bookkeeping
//! bits never tear. Two words belong to the table: `pins` (who is using the slot) and
//! `link` (live, or the free-list link).

use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering,
};
use std::sync::{Arc, OnceLock};

use crate::flow::{FlowKey, Proto};
use crate::policy::{Generation, WorkloadId};

use super::tcp_state::{Side, TcpConn, TcpFlags, TcpInvalid, TcpState};
use super::tcp_window::TcpWindow;

/// Lifecycle of a tracked flow, as the proxy dataplane and `/flows` see it.
///
/// The discriminants (0..=3, in the order below) are the flow state's two bits in an
/// entry's packed state byte (`FLOW_BITS`): not a wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FlowState {
    /// A proxied connection (or an established TCP flow) carrying data.
    Open,
    /// A proxied connection with one side shut down, or TCP FIN seen.
    Closing,
    /// UDP / ICMP / TCP handshake: only the originator has sent so far.
    Unreplied,
    /// UDP / ICMP: both sides have sent; evicted last.
    Assured,
}

impl FlowState {
    /// Every state, in discriminant order: `ALL[n] as u8 == n`.
    const ALL: [FlowState; 4] =
        [FlowState::Open, FlowState::Closing, FlowState::Unreplied, FlowState::Assured];

    /// The state in a packed state byte's `FLOW_BITS`.
    fn from_bits(v: u8) -> FlowState {
        FlowState::ALL[usize::from(v & FLOW_BITS)]
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
/// evicted or expired). Proxied connections `select!` on [`CutSignal::cut`]. A packet flow
/// has no task to tell: its signal is made with [`CutSignal::packet`], and revalidation
/// then leaves the entry in the table marked revoked ([`Entry::revoke`]) until it expires,
/// so the flow's later packets are dropped as revoked (not re-decided, and not logged
/// again).
#[derive(Debug, Default)]
pub struct CutSignal {
    cut: AtomicBool,
    /// A packet flow's: revocation keeps the entry as a marker ([`CutSignal::packet`]).
    packet: bool,
    notify: tokio::sync::Notify,
    /// The workload (`namespace/name`) the flow's client proved to be with proxy
    /// credentials (egress listeners), which its address does not say: a reload
    /// re-decides the flow as that workload. Kept here, on the proxied flow's own
    /// allocation, so packet flows pay nothing for it.
    source: OnceLock<Arc<str>>,
}

impl CutSignal {
    /// A packet flow's signal: on revocation its entry stays, marked revoked.
    pub fn packet() -> CutSignal {
        CutSignal { packet: true, ..CutSignal::default() }
    }

    /// Whether this is a packet flow's signal ([`CutSignal::packet`]).
    pub fn is_packet(&self) -> bool {
        self.packet
    }

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
    /// A flow known only by its state and the generation that allowed it: no workloads,
    /// no cut handle, no name, listener 0. Fill in the rest with struct update syntax.
    pub fn plain(state: FlowState, generation: Generation) -> EntryInit {
        EntryInit {
            state,
            generation,
            src_workload: None,
            dst_workload: None,
            listener: 0,
            cut: None,
            fqdn: None,
        }
    }

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

/// The parts of an entry that most flows do not need, kept out of the slab.
#[derive(Debug)]
struct EntryExt {
    cut: Option<Arc<CutSignal>>,
    /// IPv6 (or mixed-family, v4-mapped) addresses, originator side first.
    v6: Option<(u128, u128)>,
    /// The domain name the flow was admitted for (egress listeners).
    fqdn: Option<Arc<str>>,
    /// Sequence-space bounds of a packet TCP flow (`insert_tcp`).
    window: Option<TcpWindow>,
}

/// `state` byte layout: which bits hold what.
const FLOW_BITS: u8 = 0b0000_0011;
const TCP_SHIFT: u8 = 2;
const TCP_BITS: u8 = 0b0011_1100;
/// The value of the TCP bits (for any protocol) of a flow revalidation revoked: no TCP
/// state is 15, so the machine stops, and the flow state is `Closing` (short timeout,
/// evictable).
const REVOKED: u8 = 0b0011_1100;
/// Set when the first FIN came from the reply side (meaningful in closing TCP states).
const CLOSER_REPLY: u8 = 0b0100_0000;
/// Set while the entry's slot id sits in its shard's eviction queue (table bookkeeping).
pub(crate) const QUEUED: u8 = 0b1000_0000;

/// Sentinel for "no workload" in the packed identity fields.
const NO_WORKLOAD: u32 = u32::MAX;

/// `link` value of a slot that holds a live flow. Any other value means the slot is free
/// (and is then the next free slot's id, or [`NIL`]).
pub(crate) const LIVE: u32 = u32::MAX;
/// End of a shard's free list.
pub(crate) const NIL: u32 = u32::MAX - 1;

/// One tracked flow: a handle on its two parts in its shard's slab (no allocation per
/// flow). What a packet touches ([`Hot`]) is one cache line by itself; what only the
/// control plane reads ([`Cold`]) lives in a parallel array, so a batch lookup's hit costs
/// two cache lines (the index bucket and the hot line), not three.
///
/// The table hands out `&Entry` only while the slot's memory lives and the slot holds one
/// flow (a pin, a batch reader's grace period, or the writer lock), which is why an
/// `Entry` cannot be made, cloned or kept outside the table.
///
/// Every field of both parts is an atomic: the forwarding path bumps counters without a
/// lock, readers (`/flows`, revalidation) see a recent value, and the table
/// re-initialises a slot for a new flow while a late reader may still look at it (it then
/// sees the slot is not live, or a key that does not match, and moves on).
pub struct Entry {
    hot: NonNull<Hot>,
    cold: NonNull<Cold>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = Ordering::Relaxed;
        f.debug_struct("Entry")
            .field("key", &self.key())
            .field("state", &self.state())
            .field("tcp", &self.tcp_state())
            .field("live", &self.is_live())
            .field("generation", &self.generation())
            .field("bytes", &(self.bytes_orig().load(r), self.bytes_reply().load(r)))
            .field("packets", &(self.packets_orig().load(r), self.packets_reply().load(r)))
            .field("last_seen_ms", &self.last_seen_ms())
            .finish_non_exhaustive()
    }
}

// SAFETY: an `Entry` is two pointers into a slab of atomics (`Sync`), valid for as long as
// the `Entry` is (see `Entry::from_parts`): as shareable as `&Hot` and `&Cold`.
unsafe impl Send for Entry {}
// SAFETY: as above.
unsafe impl Sync for Entry {}

/// The part of an entry a packet touches, in the order it needs it: first what a lookup
/// compares (IPv4 addresses 8, ports 4, protocol 1, state 1, listener 2, link 4, pins 4),
/// then what forwarding updates (counters 32, last seen 8). Exactly one cache line and
/// aligned to one (checked by a test), so a batch lookup prefetches one line per entry.
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct Hot {
    src_ip: AtomicU32,
    dst_ip: AtomicU32,
    src_port: AtomicU16,
    dst_port: AtomicU16,
    proto: AtomicU8,
    state: AtomicU8,
    listener: AtomicU16,
    /// [`LIVE`], or the free-list link of a free slot.
    link: AtomicU32,
    /// Readers and handles currently using this slot: a slot with pins is never re-used.
    pins: AtomicU32,
    /// Bytes and packets, originator → responder and back.
    bytes_orig: AtomicU64,
    bytes_reply: AtomicU64,
    packets_orig: AtomicU64,
    packets_reply: AtomicU64,
    last_seen_ms: AtomicU64,
}

/// The part of an entry only the control plane reads (24 bytes): revalidation, `/flows`,
/// cutting a flow. Kept off the packet's cache line.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Cold {
    /// `Box<EntryExt>` or null. Replaced only when the slot is re-used, which happens only
    /// while nobody holds a pin on it and no batch reader can still see it.
    ext: AtomicPtr<EntryExt>,
    /// The low 32 bits of the allowing policy generation: a reload a second for 136 years.
    generation: AtomicU32,
    /// Seconds since the table's epoch.
    created_s: AtomicU32,
    src_wl: AtomicU32,
    dst_wl: AtomicU32,
}

impl Drop for Cold {
    fn drop(&mut self) {
        let p = *self.ext.get_mut();
        if !p.is_null() {
            // SAFETY: a non-null `ext` always comes from `Box::into_raw` in `init`, and
            // `&mut self` means nobody else can see it any more.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

impl Hot {
    /// A free slot's hot part.
    pub(crate) fn empty() -> Hot {
        Hot {
            src_ip: AtomicU32::new(0),
            dst_ip: AtomicU32::new(0),
            src_port: AtomicU16::new(0),
            dst_port: AtomicU16::new(0),
            proto: AtomicU8::new(0),
            state: AtomicU8::new(0),
            listener: AtomicU16::new(0),
            link: AtomicU32::new(NIL),
            pins: AtomicU32::new(0),
            bytes_orig: AtomicU64::new(0),
            bytes_reply: AtomicU64::new(0),
            packets_orig: AtomicU64::new(0),
            packets_reply: AtomicU64::new(0),
            last_seen_ms: AtomicU64::new(0),
        }
    }
}

impl Cold {
    /// A free slot's cold part.
    pub(crate) fn empty() -> Cold {
        Cold {
            ext: AtomicPtr::new(std::ptr::null_mut()),
            generation: AtomicU32::new(0),
            created_s: AtomicU32::new(0),
            src_wl: AtomicU32::new(NO_WORKLOAD),
            dst_wl: AtomicU32::new(NO_WORKLOAD),
        }
    }
}

impl Entry {
    /// The entry made of a slot's two parts.
    ///
    /// # Safety
    /// Both must outlive the returned `Entry` and every reference to it: slab memory, which
    /// the table frees only with the shard, or leaked test storage.
    #[inline]
    pub(crate) unsafe fn from_parts(hot: &Hot, cold: &Cold) -> Entry {
        Entry { hot: NonNull::from(hot), cold: NonNull::from(cold) }
    }

    #[inline(always)]
    fn hot(&self) -> &Hot {
        // SAFETY: see `from_parts`: the slot outlives this `Entry`.
        unsafe { self.hot.as_ref() }
    }

    #[inline(always)]
    fn cold(&self) -> &Cold {
        // SAFETY: as in `hot`.
        unsafe { self.cold.as_ref() }
    }

    /// Another handle on the same slot.
    ///
    /// # Safety
    /// As [`Entry::from_parts`]: the slot's memory must outlive the copy.
    pub(crate) unsafe fn alias(&self) -> Entry {
        Entry { hot: self.hot, cold: self.cold }
    }

    /// Which slot of the table this entry lives in, as a number (its address): equal for
    /// two handles on the same slot, different for two slots live at once. A slot is
    /// re-used for other flows over time, so this names a place, not a flow.
    pub fn slot_id(&self) -> usize {
        self.hot.as_ptr() as usize
    }

    /// Bytes and packets, originator → responder and back: the forwarding path adds to
    /// them (relaxed), readers see a recent value.
    pub fn bytes_orig(&self) -> &AtomicU64 {
        &self.hot().bytes_orig
    }

    pub fn bytes_reply(&self) -> &AtomicU64 {
        &self.hot().bytes_reply
    }

    pub fn packets_orig(&self) -> &AtomicU64 {
        &self.hot().packets_orig
    }

    pub fn packets_reply(&self) -> &AtomicU64 {
        &self.hot().packets_reply
    }

    /// A standalone live entry (unit tests).
    #[cfg(test)]
    pub(crate) fn new(key: &FlowKey, init: EntryInit, tcp: Option<TcpConn>, now_ms: u64) -> Entry {
        let (hot, cold) = (Box::leak(Box::new(Hot::empty())), Box::leak(Box::new(Cold::empty())));
        // SAFETY: leaked storage lives for the rest of the test process.
        let e = unsafe { Entry::from_parts(hot, cold) };
        e.init(key, init, tcp, now_ms);
        e
    }

    /// Makes this free, unpinned slot hold a new flow, then publishes it as live. The
    /// caller (the shard's writer) guarantees no pin is held: nobody reads `ext` while it
    /// is replaced.
    pub(crate) fn init(&self, key: &FlowKey, init: EntryInit, tcp: Option<TcpConn>, now_ms: u64) {
        let (h, c) = (self.hot(), self.cold());
        let (src_bits, dst_bits, v6) = addr_bits(key);
        let ext = if v6 || init.cut.is_some() || init.fqdn.is_some() || tcp.is_some() {
            Box::into_raw(Box::new(EntryExt {
                cut: init.cut,
                v6: v6.then_some((src_bits, dst_bits)),
                fqdn: init.fqdn,
                window: tcp.map(|_| TcpWindow::new()),
            }))
        } else {
            std::ptr::null_mut()
        };
        let old = c.ext.swap(ext, Ordering::Relaxed);
        if !old.is_null() {
            // SAFETY: `old` came from `Box::into_raw` above (an earlier flow in this slot);
            // the slot is free and unpinned, so no reader holds a reference into it.
            drop(unsafe { Box::from_raw(old) });
        }
        let mut state = init.state as u8;
        if let Some(conn) = tcp {
            state = (state & !(TCP_BITS | CLOSER_REPLY)) | conn_bits(conn);
            state = (state & !FLOW_BITS) | conn.state().flow_state() as u8;
        }
        let r = Ordering::Relaxed;
        h.bytes_orig.store(0, r);
        h.bytes_reply.store(0, r);
        h.packets_orig.store(0, r);
        h.packets_reply.store(0, r);
        h.last_seen_ms.store(now_ms, r);
        c.generation.store(init.generation.0 as u32, r);
        c.created_s.store(u32::try_from(now_ms / 1000).unwrap_or(u32::MAX), r);
        h.src_ip.store(if v6 { 0 } else { src_bits as u32 }, r);
        h.dst_ip.store(if v6 { 0 } else { dst_bits as u32 }, r);
        c.src_wl.store(init.src_workload.map_or(NO_WORKLOAD, |w| w.0), r);
        c.dst_wl.store(init.dst_workload.map_or(NO_WORKLOAD, |w| w.0), r);
        h.src_port.store(key.src.port(), r);
        h.dst_port.store(key.dst.port(), r);
        h.listener.store(init.listener, r);
        h.proto.store(key.proto.number(), r);
        h.state.store(state, r);
        // Publishes every store above to a reader that sees `LIVE` (Acquire in `pin`).
        h.link.store(LIVE, Ordering::Release);
    }

    /// Takes a pin if the slot holds a live flow. A pinned slot is not re-used, so the
    /// flow's fields stay those of one flow until [`Entry::unpin`] (the flow may still be
    /// removed meanwhile, like an `Arc` outliving its map entry).
    ///
    /// Pairs with [`Entry::free`] + the writer's `pins` check (both `SeqCst`): either the
    /// writer sees this pin and leaves the slot alone, or this sees the slot is not live.
    #[inline]
    pub(crate) fn pin(&self) -> bool {
        self.hot().pins.fetch_add(1, Ordering::SeqCst);
        if self.hot().link.load(Ordering::SeqCst) == LIVE {
            // Orders the field reads after the `Release` in `init`.
            std::sync::atomic::fence(Ordering::Acquire);
            true
        } else {
            self.unpin();
            false
        }
    }

    /// Another pin on a slot already pinned by the caller (cloning a handle).
    #[inline]
    pub(crate) fn pin_again(&self) {
        self.hot().pins.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn unpin(&self) {
        self.hot().pins.fetch_sub(1, Ordering::Release);
    }

    /// Whether some reader or handle holds this slot (the writer's side of `pin`).
    #[inline]
    pub(crate) fn is_pinned(&self) -> bool {
        self.hot().pins.load(Ordering::SeqCst) != 0
    }

    #[inline]
    pub(crate) fn is_live(&self) -> bool {
        self.hot().link.load(Ordering::Acquire) == LIVE
    }

    /// Marks the slot free; `next` is its free-list link.
    pub(crate) fn free(&self, next: u32) {
        self.hot().link.store(next, Ordering::SeqCst);
    }

    pub(crate) fn next_free(&self) -> u32 {
        self.hot().link.load(Ordering::Relaxed)
    }

    #[inline]
    fn ext(&self) -> Option<&EntryExt> {
        let p = self.cold().ext.load(Ordering::Relaxed);
        // SAFETY: a non-null `ext` points to a box owned by this slot; it is replaced
        // (and the old one freed) only in `init`, which runs only while the slot is
        // unpinned — and every `&Entry` handed out is pinned (or is the writer's own).
        unsafe { p.as_ref() }
    }

    /// The key as the originator sent it (not canonicalised). Mixed-family keys come back
    /// with the IPv4 side v4-mapped.
    pub fn key(&self) -> FlowKey {
        let (h, r) = (self.hot(), Ordering::Relaxed);
        let (src, dst) = match self.v6_addrs() {
            Some((s, d)) => {
                (IpAddr::V6(Ipv6Addr::from_bits(s)), IpAddr::V6(Ipv6Addr::from_bits(d)))
            }
            None => (
                IpAddr::V4(Ipv4Addr::from_bits(h.src_ip.load(r))),
                IpAddr::V4(Ipv4Addr::from_bits(h.dst_ip.load(r))),
            ),
        };
        FlowKey::new(
            Proto::from_number(h.proto.load(r)),
            SocketAddr::new(src, h.src_port.load(r)),
            SocketAddr::new(dst, h.dst_port.load(r)),
        )
    }

    pub fn proto(&self) -> Proto {
        Proto::from_number(self.hot().proto.load(Ordering::Relaxed))
    }

    pub fn src_workload(&self) -> Option<WorkloadId> {
        let w = self.cold().src_wl.load(Ordering::Relaxed);
        (w != NO_WORKLOAD).then_some(WorkloadId(w))
    }

    pub fn dst_workload(&self) -> Option<WorkloadId> {
        let w = self.cold().dst_wl.load(Ordering::Relaxed);
        (w != NO_WORKLOAD).then_some(WorkloadId(w))
    }

    /// Index of the listener (or packet port) that admitted the flow.
    pub fn listener(&self) -> u16 {
        self.hot().listener.load(Ordering::Relaxed)
    }

    /// The cut handle of a proxied flow.
    pub fn cut(&self) -> Option<&Arc<CutSignal>> {
        self.ext().and_then(|x| x.cut.as_ref())
    }

    /// The normalised domain name the flow was admitted for, if it came through an egress
    /// listener that was given one (revalidation re-decides with it).
    pub fn fqdn(&self) -> Option<&str> {
        self.ext().and_then(|x| x.fqdn.as_deref())
    }

    /// A packet TCP flow's window tracker (entries made by `insert_tcp`).
    pub fn tcp_window(&self) -> Option<&TcpWindow> {
        self.ext().and_then(|x| x.window.as_ref())
    }

    /// Marks the flow revoked (revalidation, for a packet flow): its TCP machine stops, its
    /// state is `Closing`, and [`Entry::is_revoked`] says so to the packets that follow,
    /// until the entry expires or is evicted.
    pub fn revoke(&self) {
        self.update_state(|b| {
            (b & !(TCP_BITS | CLOSER_REPLY | FLOW_BITS)) | REVOKED | FlowState::Closing as u8
        });
    }

    /// Whether [`Entry::revoke`] marked the flow (read from the packet's own cache line).
    #[inline]
    pub fn is_revoked(&self) -> bool {
        self.hot().state.load(Ordering::Relaxed) & TCP_BITS == REVOKED
    }

    /// Cuts the flow if it has a handle (eviction, expiry, revocation).
    pub fn trigger_cut(&self) {
        if let Some(c) = self.cut() {
            c.trigger();
        }
    }

    #[inline]
    fn v6_addrs(&self) -> Option<(u128, u128)> {
        self.ext().and_then(|x| x.v6)
    }

    pub fn state(&self) -> FlowState {
        FlowState::from_bits(self.hot().state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, s: FlowState) {
        self.update_state(|b| (b & !FLOW_BITS) | s as u8);
    }

    /// The TCP state when the packet dataplane drives this flow's state machine.
    pub fn tcp_state(&self) -> Option<TcpState> {
        self.tcp_conn().map(|c| c.state())
    }

    fn tcp_conn(&self) -> Option<TcpConn> {
        tcp_conn_of(self.hot().state.load(Ordering::Relaxed))
    }

    /// Feeds one TCP segment seen on `side` into the flow's state machine (packet dataplane).
    /// The flow state follows (handshake → `Unreplied`, established → `Open`, FIN → `Closing`).
    ///
    /// # Errors
    /// [`TcpInvalid`] when the segment is not valid in the current state (data before the
    /// handshake, SYN on an established flow, …) or the flow has no TCP machine; the state
    /// is left unchanged and the caller drops the packet.
    pub fn on_tcp_segment(&self, side: Side, flags: TcpFlags) -> Result<TcpState, TcpInvalid> {
        let mut cur = self.hot().state.load(Ordering::Relaxed);
        loop {
            let conn = tcp_conn_of(cur).ok_or(TcpInvalid::NotTracked)?;
            let next = conn.on_segment(side, flags)?;
            let bits = (cur & !(TCP_BITS | CLOSER_REPLY | FLOW_BITS))
                | conn_bits(next)
                | next.state().flow_state() as u8;
            // Most segments (data, ACKs of an established flow) change nothing: no write,
            // so the packet's cache line stays shared with the other direction's worker.
            if bits == cur {
                return Ok(next.state());
            }
            match self.hot().state.compare_exchange_weak(
                cur,
                bits,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
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
        let h = self.hot();
        let (b, p) = match side {
            Side::Orig => (&h.bytes_orig, &h.packets_orig),
            Side::Reply => (&h.bytes_reply, &h.packets_reply),
        };
        b.fetch_add(bytes, Ordering::Relaxed);
        p.fetch_add(1, Ordering::Relaxed);
    }

    fn update_state(&self, f: impl Fn(u8) -> u8) -> u8 {
        let mut cur = self.hot().state.load(Ordering::Relaxed);
        loop {
            let next = f(cur);
            match self.hot().state.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Sets or clears table bookkeeping bits; returns the previous byte.
    pub(crate) fn swap_flag(&self, flag: u8, on: bool) -> u8 {
        if on {
            self.hot().state.fetch_or(flag, Ordering::Relaxed)
        } else {
            self.hot().state.fetch_and(!flag, Ordering::Relaxed)
        }
    }

    /// Whether the table may evict this flow to make room: the flow has not proven itself
    /// (UDP/ICMP unreplied, TCP not established) or is on its way out (closing).
    pub fn is_evictable(&self) -> bool {
        let b = self.hot().state.load(Ordering::Relaxed);
        match tcp_conn_of(b) {
            Some(c) => c.state() != TcpState::Established,
            None => matches!(FlowState::from_bits(b), FlowState::Unreplied | FlowState::Closing),
        }
    }

    /// The policy generation that last allowed this flow.
    pub fn generation(&self) -> Generation {
        Generation(u64::from(self.cold().generation.load(Ordering::Relaxed)))
    }

    pub fn set_generation(&self, g: Generation) {
        self.cold().generation.store(g.0 as u32, Ordering::Relaxed);
    }

    /// Milliseconds since the table was created, when the entry was created (second
    /// resolution) / last used.
    pub fn created_ms(&self) -> u64 {
        u64::from(self.cold().created_s.load(Ordering::Relaxed)) * 1000
    }

    pub fn last_seen_ms(&self) -> u64 {
        self.hot().last_seen_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn set_last_seen_ms(&self, ms: u64) {
        self.hot().last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// Which side of this flow a packet with key `key` travels on, if it belongs to it.
    pub fn side_of(&self, key: &FlowKey) -> Option<Side> {
        self.matches(&Probe::unhashed(key))
    }

    /// The direction-independent keyed hash of this entry's key (same as its [`Probe`]'s):
    /// what the table's writers use to find the entry's index word.
    pub(crate) fn hash(&self, seeds: &Seeds) -> u64 {
        seeds.hash(self.hot().proto.load(Ordering::Relaxed), &self.ends().0)
    }

    /// The entry's canonical ends and whether its source is the lower one.
    fn ends(&self) -> (Ends, bool) {
        let (h, r) = (self.hot(), Ordering::Relaxed);
        let (sp, dp) = (h.src_port.load(r), h.dst_port.load(r));
        match self.v6_addrs() {
            Some((s, d)) => Ends::v6((s, sp), (d, dp)),
            None => Ends::v4(
                v4_end(Ipv4Addr::from_bits(h.src_ip.load(r)), sp),
                v4_end(Ipv4Addr::from_bits(h.dst_ip.load(r)), dp),
            ),
        }
    }

    /// Which side of this flow a packet with probe `p` travels on, if it belongs to it.
    #[inline]
    pub(crate) fn matches(&self, p: &Probe) -> Option<Side> {
        let (h, r) = (self.hot(), Ordering::Relaxed);
        if h.proto.load(r) != p.proto {
            return None;
        }
        let forward = match p.ends {
            Ends::V4 { lo, hi } => {
                let (src_ip, dst_ip) = (h.src_ip.load(r), h.dst_ip.load(r));
                let src = v4_end(Ipv4Addr::from_bits(src_ip), h.src_port.load(r));
                let dst = v4_end(Ipv4Addr::from_bits(dst_ip), h.dst_port.load(r));
                let forward = if src == lo && dst == hi {
                    true
                } else if src == hi && dst == lo {
                    false
                } else {
                    return None;
                };
                // An IPv6 entry stores 0.0.0.0 for both IPv4 addresses, so only a probe
                // for those can reach here with one; asking `ext` only then keeps the
                // lookup off the entry's cold part.
                if src_ip == 0 && dst_ip == 0 && self.v6_addrs().is_some() {
                    return None;
                }
                forward
            }
            Ends::V6 { .. } => {
                let (ends, lo_is_src) = self.ends();
                if ends != p.ends {
                    return None;
                }
                lo_is_src
            }
        };
        // `forward`: the entry's source is the probe's lower end.
        Some(if forward == p.lo_is_src { Side::Orig } else { Side::Reply })
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

/// One endpoint of an IPv6 (or mixed-family) key: address bits, port.
type End6 = (u128, u16);

/// The canonical endpoints of a key: the lower endpoint first, so both directions of a flow
/// give the same ends. IPv4 endpoints are packed `address << 16 | port`, so ordering and
/// comparing one is a single integer operation (the common case on the packet path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ends {
    V4 { lo: u64, hi: u64 },
    V6 { lo: End6, hi: End6 },
}

impl Ends {
    /// The ends of an IPv4 key from its source and destination (packed, [`v4_end`]), and
    /// whether the source is the lower one.
    #[inline]
    fn v4(src: u64, dst: u64) -> (Ends, bool) {
        let (lo, hi, lo_is_src) = order(src, dst);
        (Ends::V4 { lo, hi }, lo_is_src)
    }

    /// The same for an IPv6 (or mixed-family) key.
    #[inline]
    fn v6(src: End6, dst: End6) -> (Ends, bool) {
        let (lo, hi, lo_is_src) = order(src, dst);
        (Ends::V6 { lo, hi }, lo_is_src)
    }
}

#[inline]
fn v4_end(ip: Ipv4Addr, port: u16) -> u64 {
    (u64::from(ip.to_bits()) << 16) | u64::from(port)
}

/// Orders two endpoints; the flag says whether the first one was the lower.
#[inline]
fn order<T: PartialOrd>(src: T, dst: T) -> (T, T, bool) {
    if src <= dst { (src, dst, true) } else { (dst, src, false) }
}

/// A looked-up key, canonicalised and hashed once: what the table compares entries with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Probe {
    pub(crate) hash: u64,
    proto: u8,
    lo_is_src: bool,
    ends: Ends,
}

impl Probe {
    /// `key` canonicalised and hashed with the table's `seeds`.
    #[inline]
    pub(crate) fn new(key: &FlowKey, seeds: &Seeds) -> Probe {
        let mut p = Probe::unhashed(key);
        p.hash = seeds.hash(p.proto, &p.ends);
        p
    }

    /// `key` canonicalised, with the hash [`Probe::new`] gave it earlier.
    #[inline]
    pub(crate) fn with_hash(key: &FlowKey, hash: u64) -> Probe {
        Probe { hash, ..Probe::unhashed(key) }
    }

    /// `key` canonicalised, for comparing only (no hash).
    #[inline]
    pub(crate) fn unhashed(key: &FlowKey) -> Probe {
        let proto = key.proto.number();
        let (ends, lo_is_src) = match (key.src, key.dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                Ends::v4(v4_end(*s.ip(), s.port()), v4_end(*d.ip(), d.port()))
            }
            (s, d) => Ends::v6((v6_bits(s.ip()), s.port()), (v6_bits(d.ip()), d.port())),
        };
        Probe { hash: 0, proto, lo_is_src, ends }
    }
}

/// A [`Probe`] in 24 bytes, for a batch lookup to carry between its stages: IPv4 probes
/// whole, others as their hash alone (the rare IPv6 key is canonicalised again from the
/// key when compared), so the batch neither copies 96-byte probes nor canonicalises an
/// IPv4 key twice.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PackedProbe {
    pub(crate) hash: u64,
    /// The IPv4 ends when `hi` carries `PACK_V4` (with the protocol and side flag in
    /// `hi`'s top bits); both 0 for other probes.
    lo: u64,
    hi: u64,
}

/// Where a packed IPv4 probe keeps its protocol and side flag: `hi`'s top 16 bits, which
/// an IPv4 end (address << 16 | port, 48 bits) never uses.
const PACK_SHIFT: u32 = 48;
const PACK_V4: u64 = 1 << 63;
const PACK_LO_IS_SRC: u64 = 1 << 62;

impl PackedProbe {
    #[inline]
    pub(crate) fn pack(p: &Probe) -> PackedProbe {
        match p.ends {
            Ends::V4 { lo, hi } => PackedProbe {
                hash: p.hash,
                lo,
                hi: hi
                    | u64::from(p.proto) << PACK_SHIFT
                    | PACK_V4
                    | if p.lo_is_src { PACK_LO_IS_SRC } else { 0 },
            },
            Ends::V6 { .. } => PackedProbe { hash: p.hash, lo: 0, hi: 0 },
        }
    }

    /// The probe again; `key` is the key it was made from (used only for IPv6).
    #[inline]
    pub(crate) fn unpack(&self, key: &FlowKey) -> Probe {
        if self.hi & PACK_V4 == 0 {
            return Probe::with_hash(key, self.hash);
        }
        Probe {
            hash: self.hash,
            proto: (self.hi >> PACK_SHIFT) as u8,
            lo_is_src: self.hi & PACK_LO_IS_SRC != 0,
            ends: Ends::V4 { lo: self.lo, hi: self.hi & ((1 << PACK_SHIFT) - 1) },
        }
    }
}

/// A table's random hash keys, so nobody outside can aim flows at one bucket or shard.
/// Each table draws its own; lookups read them from the table they search (no global to
/// check on every key).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seeds([u64; 4]);

impl Seeds {
    pub(crate) fn random() -> Seeds {
        let rs = std::collections::hash_map::RandomState::new();
        Seeds(std::array::from_fn(|i| rs.hash_one(i as u64) | 1))
    }

    /// Keyed hash of canonical ends. An IPv4 key is two folded multiplies. The table takes
    /// the shard from the low bits, the slot tag from bits 16..47 and the bucket from the
    /// top bits, so the three are independent.
    #[inline]
    fn hash(&self, proto: u8, ends: &Ends) -> u64 {
        let s = &self.0;
        match *ends {
            Ends::V4 { lo, hi } => {
                fold(fold(lo ^ s[0], (hi | u64::from(proto) << 48) ^ s[1]), s[2])
            }
            Ends::V6 { lo, hi } => {
                let ports = (u64::from(lo.1) << 16) | u64::from(hi.1) | (u64::from(proto) << 32);
                let h = fold((lo.0 as u64) ^ s[0], ((lo.0 >> 64) as u64) ^ s[1]);
                let h = fold(h ^ (hi.0 as u64), ((hi.0 >> 64) as u64) ^ s[2]);
                fold(h ^ ports ^ (1 << 40), s[3])
            }
        }
    }
}

/// Folded 64×64→128 multiply: the mixing step of fast keyed hashes.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
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
    fn flow_states_unpack_from_their_bits_and_ignore_the_rest() {
        for s in FlowState::ALL {
            assert_eq!(FlowState::from_bits(s as u8), s);
            assert_eq!(FlowState::from_bits(s as u8 | !FLOW_BITS), s);
        }
        assert_eq!(FlowState::ALL.map(|s| s as u8), [0, 1, 2, 3]);
    }

    /// What a packet touches is one aligned cache line; the rest (24 bytes) is apart.
    /// Together 88 bytes a slot, which with the index keeps the table under 128 bytes an
    /// entry at 1M (tests/conntrack_memory.rs).
    #[test]
    fn hot_part_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Hot>(), 64);
        assert_eq!(std::mem::align_of::<Hot>(), 64);
        assert_eq!(std::mem::size_of::<Cold>(), 24);
    }

    #[test]
    fn key_round_trips_v4_and_v6() {
        for (s, d) in
            [("198.18.0.1:4000", "198.18.0.2:53"), ("[2001:db8::1]:4000", "[2001:db8::2]:53")]
        {
            let k = FlowKey::new(Proto::Udp, s.parse().unwrap(), d.parse().unwrap());
            let e = Entry::new(&k, init(), None, 1500);
            let seeds = Seeds::random();
            assert_eq!(e.key(), k);
            assert_eq!(e.side_of(&k), Some(Side::Orig));
            assert_eq!(e.side_of(&k.reversed()), Some(Side::Reply));
            assert_eq!(e.hash(&seeds), Probe::new(&k, &seeds).hash);
            assert_eq!(e.hash(&seeds), Probe::new(&k.reversed(), &seeds).hash);
            assert_eq!(e.src_workload(), Some(WorkloadId(3)));
            assert_eq!(e.dst_workload(), None);
            assert_eq!(e.generation(), Generation(7));
            assert_eq!(e.created_ms(), 1000);
            let other = FlowKey::new(Proto::Tcp, k.src, k.dst);
            assert_eq!(e.side_of(&other), None);
        }
    }

    /// A packed probe unpacks to the probe it was made from: IPv4 in both directions up to
    /// the widest address and port (the protocol and flags share `hi` with them), any
    /// protocol number, and IPv6, which is made again from the key.
    #[test]
    fn packed_probe_round_trips() {
        let seeds = Seeds::random();
        let cases = [
            (Proto::Tcp, "198.18.0.1:4000", "198.18.0.2:443"),
            (Proto::Udp, "255.255.255.255:65535", "0.0.0.0:0"),
            (Proto::Unknown(255), "255.255.255.254:65535", "255.255.255.255:65534"),
            (Proto::Icmp, "198.18.0.9:7", "198.18.0.1:0"),
            (Proto::Udp, "[2001:db8::1]:4000", "[2001:db8::2]:53"),
            (Proto::Tcp, "[::ffff:198.18.0.1]:1", "[2001:db8::2]:2"),
        ];
        for (proto, s, d) in cases {
            let k = FlowKey::new(proto, s.parse().unwrap(), d.parse().unwrap());
            for k in [k, k.reversed()] {
                let p = Probe::new(&k, &seeds);
                let u = PackedProbe::pack(&p).unpack(&k);
                assert_eq!(
                    (u.hash, u.proto, u.lo_is_src, u.ends),
                    (p.hash, p.proto, p.lo_is_src, p.ends),
                    "{k:?}"
                );
            }
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
        assert!(plain.ext().is_none(), "an IPv4 entry without a name needs no side allocation");
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
        // An IPv6 entry's IPv4 fields are 0.0.0.0, so this probe passes the address and
        // port compare: only the entry's family (in `ext`) tells them apart.
        let zeros =
            FlowKey::new(Proto::Udp, "0.0.0.0:1".parse().unwrap(), "0.0.0.0:2".parse().unwrap());
        let unspecified =
            FlowKey::new(Proto::Udp, "[::]:1".parse().unwrap(), "[::]:2".parse().unwrap());
        let e = Entry::new(&unspecified, init(), None, 0);
        assert_eq!(e.side_of(&zeros), None);
        assert_eq!(Entry::new(&zeros, init(), None, 0).side_of(&zeros), Some(Side::Orig));
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
