//! Running the packet filter: one OS thread per worker, each looping *wait → read a burst →
//! [`Filter::run`] → answer rejects → write the kept packets back*, until the gateway stops it.
//!
//! Responsible for: starting the workers `[packet]` describes ([`PacketWorkers::start`]),
//! the loop every front end shares ([`run_worker`], generic over [`FrontEnd`]), the TUN
//! front end's side of that loop ([`TunFront`]), mapping `[packet]` onto the filter's knobs
//! ([`filter_config`]), and the per-worker counters the metrics scrape sums
//! ([`PacketStats`]). Not here: deciding (`filter`), the device I/O (`tun`, `afpacket`),
//! the routing that brings packets to the device (the host's; see `tun`'s module docs).
//!
//! # Why OS threads
//! A worker spends its life in one device's read/write syscalls and the filter's pure code;
//! it never awaits anything. A plain thread per queue keeps the kernel's per-queue
//! steering, and the async runtime's workers free for the proxies and the admin API. Each
//! wakes at least every [`WAKE_INTERVAL`] to notice the stop flag.
//!
//! # Adding a front end
//! A front end is a [`FrontEnd`]: it lends a burst of IP packets from buffers it owns,
//! forgets the ones the filter refused, writes the rest on, and sends reply frames built
//! in the headroom it asked for. `PacketWorkers::start` opens its devices and spawns one
//! [`run_worker`] per worker. Two do so: [`TunFront`] (a TUN queue) and [`AfPacketFront`]
//! (a worker's share of two interfaces' rings, which also passes ARP and IPv6 neighbour
//! discovery itself).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::afpacket::{self, AfPacket, AfPacketError, FrameBatch, FrameKind};
use super::classify::{DropReason, Limits, is_link_control};
use super::filter::{self, DropCause, Filter, FilterConfig, MAX_BURST, PacketCounters, Verdict};
use super::tun::{Batch, Offloads, Queue, Tun, TunError, VnetHdr};
use crate::config::packet::{self as packet_config, Frontend, PacketConfig};
use crate::dataplane::{ListenerTag, Runtime};
use crate::telemetry::metrics::{PacketSource, PacketTotals};

// `[packet] burst` is checked against the config's copy of the filter's limit.
const _: () = assert!(packet_config::MAX_BURST == filter::MAX_BURST);

/// Longest a worker waits for packets before it looks at its stop flag again.
pub const WAKE_INTERVAL: Duration = Duration::from_millis(100);

/// After a failed wait, how long a worker pauses before trying again (a device error does
/// not end the worker; it must not spin on one either).
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Room for a reject reply: the front end's headroom (at most an Ethernet or virtio-net
/// header) and the reply itself (`Filter::reject_reply` needs 1,280 bytes).
const REPLY_BUF: usize = 64 + 1280;

/// The filter's knobs from `[packet]`.
pub fn filter_config(cfg: &PacketConfig) -> FilterConfig {
    FilterConfig {
        on_deny: match cfg.on_deny {
            packet_config::OnDeny::Drop => filter::OnDeny::Drop,
            packet_config::OnDeny::Reject => filter::OnDeny::Reject,
        },
        tcp_liberal: cfg.tcp_liberal,
        max_fragments: cfg.max_fragments,
        fragment_timeout: cfg.fragment_timeout,
        reject_per_second: cfg.reject_per_second,
        limits: Limits { max_ipv6_ext_headers: cfg.max_ipv6_ext_headers },
    }
}

/// What a front end lends the worker loop. One per worker; the loop is the only caller.
pub trait FrontEnd {
    /// A device error (counted, never fatal to the worker).
    type Error: std::error::Error;

    /// Bytes a frame this front end writes carries in front of the IP packet (the TUN's
    /// virtio-net header, an Ethernet header): [`FrontEnd::send_reply`] gets them free.
    fn reply_headroom(&self) -> usize;

    /// Waits up to `timeout` for packets; `Ok(false)` when none came.
    fn wait(&mut self, timeout: Duration) -> Result<bool, Self::Error>;

    /// Reads a burst (at most the `burst` the front end was made with); returns how many
    /// IP packets it holds for the filter. Every packet starts out kept. Frames that are
    /// not IP (ARP on a bridge) are the front end's own business: passed or dropped by
    /// it, never counted here.
    fn recv(&mut self) -> Result<usize, Self::Error>;

    /// Packet `i` of the burst: one IP packet (a GSO super-packet counts as one). Empty
    /// past the burst.
    fn packet(&self, i: usize) -> &[u8];

    /// Sends a reply to the sender of packet `to`: `frame` holds
    /// [`FrontEnd::reply_headroom`] bytes for the front end to fill, then the IP packet.
    fn send_reply(&self, to: usize, frame: &mut [u8]) -> Result<(), Self::Error>;

    /// Forgets packet `i`: it is not written on.
    fn drop_packet(&mut self, i: usize);

    /// Writes on every packet (and frame) of the burst still kept; nothing when none is.
    fn forward(&mut self) -> Result<(), Self::Error>;

    /// Frames the device layer itself dropped since the last call (too large, empty).
    fn take_device_drops(&mut self) -> u64;
}

/// One worker's device counters, beside the filter's [`PacketCounters`]: written by its
/// worker only, summed at scrape.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Waits, reads and writes that failed.
    pub errors: AtomicU64,
    /// Frames the device layer dropped before the filter saw them (larger than a slot,
    /// empty after their header).
    pub dropped: AtomicU64,
}

/// The `reason` label of frames the device layer dropped.
pub const DEVICE_DROP_LABEL: &str = "device";

/// The worker loop: until `stop` is set, wait (at most [`WAKE_INTERVAL`]), then
/// `run_burst`. Device errors are counted in `device` and the loop goes on.
pub fn run_worker<F: FrontEnd>(
    front: &mut F,
    filter: &mut Filter,
    device: &DeviceCounters,
    stop: &AtomicBool,
) {
    let mut verdicts = [Verdict::Pass; MAX_BURST];
    let mut reply = [0u8; REPLY_BUF];
    while !stop.load(Ordering::Relaxed) {
        let waited = Instant::now();
        match front.wait(WAKE_INTERVAL) {
            Ok(true) => run_burst(front, filter, device, &mut verdicts, &mut reply),
            // Nothing to read, but the wait did not wait (a device gone away reports an
            // error condition at once, every time): pause rather than spin.
            Ok(false) if waited.elapsed() < WAKE_INTERVAL / 2 => {
                std::thread::sleep(ERROR_PAUSE);
            }
            Ok(false) => {}
            Err(_) => {
                device.errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(ERROR_PAUSE);
            }
        }
    }
}

/// One burst: read, decide (one clock read for the burst), answer rejects, forget what is
/// not passed, write the rest on. No allocation: the burst is a stack array of borrowed
/// slices into the front end's buffers.
fn run_burst<F: FrontEnd>(
    front: &mut F,
    filter: &mut Filter,
    device: &DeviceCounters,
    verdicts: &mut [Verdict; MAX_BURST],
    reply: &mut [u8; REPLY_BUF],
) {
    let read = front.recv();
    let lost = front.take_device_drops();
    if lost > 0 {
        device.dropped.fetch_add(lost, Ordering::Relaxed);
    }
    let n = match read {
        Ok(n) => n.min(MAX_BURST),
        Err(_) => {
            device.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if n > 0 {
        decide(front, filter, device, &mut verdicts[..n], reply);
    }
    // Also with no IP packet: a front end may hold frames it passes itself (ARP).
    if front.forward().is_err() {
        // The write stops at the failing frame; what was not written is lost, as the
        // kernel would drop it.
        device.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Decides the `verdicts.len()` packets the front end holds, answers rejects and forgets
/// every packet not passed.
fn decide<F: FrontEnd>(
    front: &mut F,
    filter: &mut Filter,
    device: &DeviceCounters,
    verdicts: &mut [Verdict],
    reply: &mut [u8; REPLY_BUF],
) {
    let n = verdicts.len();
    let now = Instant::now();
    {
        let mut burst: [&[u8]; MAX_BURST] = [&[]; MAX_BURST];
        for (i, slot) in burst[..n].iter_mut().enumerate() {
            *slot = front.packet(i);
        }
        filter.run(&burst[..n], verdicts, now);
        let head = front.reply_headroom().min(REPLY_BUF);
        for i in 0..n {
            if !matches!(verdicts[i], Verdict::Reject(_)) {
                continue;
            }
            if let Some(len) = filter.reject_reply(burst[i], &mut reply[head..], now) {
                let end = (head + len).min(REPLY_BUF);
                if front.send_reply(i, &mut reply[..end]).is_err() {
                    device.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    for (i, v) in verdicts.iter().enumerate() {
        if *v != Verdict::Pass {
            front.drop_packet(i);
        }
    }
}

/// The TUN front end for one queue: its [`Batch`] of receive buffers, allocated once.
#[derive(Debug)]
pub struct TunFront {
    queue: Queue,
    batch: Batch,
    /// `batch.dropped()` when last reported.
    dropped_seen: u64,
}

impl TunFront {
    /// A front end over `queue`, reading bursts of up to `burst` frames.
    pub fn new(queue: Queue, burst: usize) -> TunFront {
        TunFront { queue, batch: Batch::new(burst.clamp(1, MAX_BURST)), dropped_seen: 0 }
    }
}

impl FrontEnd for TunFront {
    type Error = TunError;

    fn reply_headroom(&self) -> usize {
        self.queue.hdr_len()
    }

    fn wait(&mut self, timeout: Duration) -> Result<bool, TunError> {
        self.queue.wait_readable(timeout)
    }

    fn recv(&mut self) -> Result<usize, TunError> {
        self.queue.recv_batch(&mut self.batch)
    }

    fn packet(&self, i: usize) -> &[u8] {
        self.batch.packet(i).map_or(&[], |p| p.bytes)
    }

    fn send_reply(&self, _to: usize, frame: &mut [u8]) -> Result<(), TunError> {
        // A reply is an ordinary packet with its checksums complete: the NONE header.
        if self.queue.hdr_len() > 0 {
            let _ = VnetHdr::NONE.emit(frame);
        }
        self.queue.send_frame(frame)
    }

    fn drop_packet(&mut self, i: usize) {
        self.batch.drop_packet(i);
    }

    fn forward(&mut self) -> Result<(), TunError> {
        self.queue.send_batch(&self.batch).map(|_| ())
    }

    fn take_device_drops(&mut self) -> u64 {
        let now = self.batch.dropped();
        let new = now.saturating_sub(self.dropped_seen);
        self.dropped_seen = now;
        new
    }
}

/// The AF_PACKET front end for one worker: its share of both interfaces and a
/// [`FrameBatch`] lent from their rings. IP frames go to the filter (the `ip` index maps a
/// burst position to its frame); ARP, other untagged non-IP frames and IPv6 neighbour and
/// multicast listener discovery (IPv6's ARP) are passed as they are; VLAN-tagged frames are dropped (fail closed: the filter does not look inside a tag)
/// and counted as device drops.
#[derive(Debug)]
pub struct AfPacketFront {
    queue: afpacket::Queue,
    batch: FrameBatch,
    /// Frame index of each IP packet of the burst.
    ip: [u16; MAX_BURST],
    /// Device drops not reported yet: tagged frames and frames a send refused.
    pending_drops: u64,
    dropped_seen: u64,
}

impl AfPacketFront {
    /// A front end over `queue`, reading bursts of up to `burst` frames.
    pub fn new(queue: afpacket::Queue, burst: usize) -> AfPacketFront {
        AfPacketFront {
            queue,
            batch: FrameBatch::new(burst.clamp(1, MAX_BURST)),
            ip: [0; MAX_BURST],
            pending_drops: 0,
            dropped_seen: 0,
        }
    }

    fn frame_of(&self, i: usize) -> usize {
        self.ip.get(i).map_or(usize::MAX, |f| usize::from(*f))
    }
}

impl FrontEnd for AfPacketFront {
    type Error = AfPacketError;

    fn reply_headroom(&self) -> usize {
        // `Queue::reply` writes the Ethernet header itself.
        0
    }

    fn wait(&mut self, timeout: Duration) -> Result<bool, AfPacketError> {
        self.queue.wait_readable(timeout)
    }

    fn recv(&mut self) -> Result<usize, AfPacketError> {
        let frames = self.queue.recv_batch(&mut self.batch).min(MAX_BURST);
        let mut n = 0;
        for f in 0..frames {
            let frame = self.batch.frame(f);
            match frame.as_ref().map(|fr| fr.kind) {
                // IPv6's ARP (neighbour and multicast listener discovery): passed as it is,
                // like ARP, never a flow (`classify::is_link_control` says what qualifies).
                Some(FrameKind::Ip) if frame.as_ref().is_some_and(|fr| is_link_control(fr.ip)) => {}
                Some(FrameKind::Ip) => {
                    // f < MAX_BURST (64): fits.
                    self.ip[n] = f as u16;
                    n += 1;
                }
                Some(FrameKind::Other) => {}
                Some(FrameKind::Tagged) | None => {
                    self.batch.drop_frame(f);
                    self.pending_drops += 1;
                }
            }
        }
        Ok(n)
    }

    fn packet(&self, i: usize) -> &[u8] {
        self.batch.frame(self.frame_of(i)).map_or(&[], |f| f.ip)
    }

    fn send_reply(&self, to: usize, frame: &mut [u8]) -> Result<(), AfPacketError> {
        self.queue.reply(&self.batch, self.frame_of(to), frame).map(|_| ())
    }

    fn drop_packet(&mut self, i: usize) {
        let f = self.frame_of(i);
        self.batch.drop_frame(f);
    }

    fn forward(&mut self) -> Result<(), AfPacketError> {
        let sent = self.queue.forward(&self.batch)?;
        self.pending_drops += sent.failed as u64;
        Ok(())
    }

    fn take_device_drops(&mut self) -> u64 {
        let now = self.batch.dropped();
        let new = now.saturating_sub(self.dropped_seen) + self.pending_drops;
        self.dropped_seen = now;
        self.pending_drops = 0;
        new
    }
}

/// Every worker's counters of one front end, summed when `/metrics` is scraped.
#[derive(Debug)]
pub struct PacketStats {
    frontend: Frontend,
    workers: Vec<(Arc<PacketCounters>, Arc<DeviceCounters>)>,
}

impl PacketStats {
    /// The sum over the workers now (also what the metrics render).
    pub fn totals(&self) -> PacketTotals {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut t = PacketTotals {
            frontend: self.frontend.as_str(),
            dropped: DropCause::LABELS.iter().map(|l| (*l, 0)).collect(),
            malformed: DropReason::ALL.iter().map(|r| (r.as_str(), 0)).collect(),
            ..PacketTotals::default()
        };
        t.dropped.push((DEVICE_DROP_LABEL, 0));
        for (p, d) in &self.workers {
            t.passed_packets += get(&p.passed_packets);
            t.passed_bytes += get(&p.passed_bytes);
            t.dropped_packets += get(&p.dropped_packets);
            t.dropped_bytes += get(&p.dropped_bytes);
            for (slot, c) in t.dropped.iter_mut().zip(p.dropped.iter()) {
                slot.1 += get(c);
            }
            if let Some(device) = t.dropped.last_mut() {
                device.1 += get(&d.dropped);
            }
            for (slot, c) in t.malformed.iter_mut().zip(p.malformed.iter()) {
                slot.1 += get(c);
            }
            t.rejects_sent += get(&p.rejects_sent);
            t.rejects_limited += get(&p.rejects_limited);
            t.device_errors += get(&d.errors);
        }
        t
    }
}

impl PacketSource for PacketStats {
    fn totals(&self) -> PacketTotals {
        PacketStats::totals(self)
    }
}

/// Why the packet filter did not start.
#[derive(Debug, Error)]
pub enum PacketError {
    /// The TUN device could not be created or attached (the source names the device, the
    /// step and the OS error: `EPERM` without `CAP_NET_ADMIN`, `EINVAL` when an interface of
    /// that name exists and is not a multi-queue TUN).
    #[error("[packet] {name}: cannot open TUN device {device:?}")]
    Tun {
        name: String,
        device: String,
        #[source]
        source: TunError,
    },
    /// The AF_PACKET sockets could not be opened (the source names the interface, the
    /// worker, the step and the OS error).
    #[error("[packet] {name}: cannot open AF_PACKET on {inside:?} and {outside:?}")]
    AfPacket {
        name: String,
        inside: String,
        outside: String,
        #[source]
        source: AfPacketError,
    },
    /// `frontend = "afpacket"` without `[packet.afpacket]` (validation refuses it first).
    #[error("[packet] {name}: frontend \"afpacket\" needs [packet.afpacket]")]
    NoInterfaces { name: String },
    /// A worker thread could not be started.
    #[error("[packet] {name}: cannot start worker thread {worker}")]
    Spawn {
        name: String,
        worker: usize,
        #[source]
        source: io::Error,
    },
}

/// The running packet filter: its worker threads and what names it. Dropping it stops and
/// joins them (each notices within [`WAKE_INTERVAL`]); the TUN device goes with its last
/// queue.
#[derive(Debug)]
pub struct PacketWorkers {
    name: String,
    frontend: Frontend,
    device: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<PacketStats>,
}

impl PacketWorkers {
    /// Opens the front end `cfg` names, registers the packet filter as a listener of kind
    /// `packet` (its flow-log name and counters) and its counters with the metrics, and
    /// starts one worker thread per queue.
    ///
    /// # Errors
    /// [`PacketError`]: the device cannot be opened (naming it and the OS error), the
    /// front end is not available, or a thread cannot be spawned (the ones started are
    /// stopped again).
    pub fn start(rt: &Arc<Runtime>, cfg: &PacketConfig) -> Result<PacketWorkers, PacketError> {
        let workers = cfg.worker_count();
        match cfg.frontend {
            Frontend::Tun => {
                let device = cfg.tun().device;
                let tun = Tun::open(&device, workers, Offloads::On).map_err(|source| {
                    PacketError::Tun { name: cfg.name.clone(), device: device.clone(), source }
                })?;
                let fronts: Vec<TunFront> =
                    tun.into_queues().into_iter().map(|q| TunFront::new(q, cfg.burst)).collect();
                let mut running = PacketWorkers::register(rt, cfg, device, fronts.len());
                running.spawn_all(rt, cfg, fronts)?;
                Ok(running)
            }
            Frontend::Afpacket => {
                let Some(af) = &cfg.afpacket else {
                    return Err(PacketError::NoInterfaces { name: cfg.name.clone() });
                };
                let open = AfPacket::open(&af.inside, &af.outside, workers).map_err(|source| {
                    PacketError::AfPacket {
                        name: cfg.name.clone(),
                        inside: af.inside.clone(),
                        outside: af.outside.clone(),
                        source,
                    }
                })?;
                let fronts: Vec<AfPacketFront> = open
                    .into_queues()
                    .into_iter()
                    .map(|q| AfPacketFront::new(q, cfg.burst))
                    .collect();
                let device = format!("{}+{}", af.inside, af.outside);
                let mut running = PacketWorkers::register(rt, cfg, device, fronts.len());
                running.spawn_all(rt, cfg, fronts)?;
                Ok(running)
            }
        }
    }

    /// The listener tag and the counters, before any worker runs.
    fn register(
        rt: &Arc<Runtime>,
        cfg: &PacketConfig,
        device: String,
        workers: usize,
    ) -> PacketWorkers {
        let workers = (0..workers)
            .map(|_| (Arc::new(PacketCounters::default()), Arc::new(DeviceCounters::default())))
            .collect();
        let stats = Arc::new(PacketStats { frontend: cfg.frontend, workers });
        rt.registry.packet_source(stats.clone());
        PacketWorkers {
            name: cfg.name.clone(),
            frontend: cfg.frontend,
            device,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            stats,
        }
    }

    fn spawn_all<F: FrontEnd + Send + 'static>(
        &mut self,
        rt: &Arc<Runtime>,
        cfg: &PacketConfig,
        fronts: Vec<F>,
    ) -> Result<(), PacketError> {
        // A listener's id (in conntrack entries) is its position in the registry:
        // `dataplane::log_revoked` finds its name that way.
        let index = rt.registry.listeners().len();
        let tag = ListenerTag {
            index: u16::try_from(index).unwrap_or(u16::MAX),
            name: Arc::from(cfg.name.as_str()),
            counters: rt.registry.listener(&cfg.name, "packet"),
        };
        let fcfg = filter_config(cfg);
        for (i, (mut front, (counters, device))) in
            fronts.into_iter().zip(self.stats.workers.iter().cloned()).enumerate()
        {
            let mut filter = Filter::new(rt.clone(), tag.clone(), fcfg, counters);
            let stop = self.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("flowgate-pkt{i}"))
                .spawn(move || run_worker(&mut front, &mut filter, &device, &stop))
                .map_err(|source| PacketError::Spawn {
                    name: cfg.name.clone(),
                    worker: i,
                    source,
                })?;
            self.threads.push(thread);
        }
        Ok(())
    }

    /// The filter's name (`[packet] name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn frontend(&self) -> Frontend {
        self.frontend
    }

    /// The device read: the TUN device's name, or `inside+outside`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Worker threads running.
    pub fn workers(&self) -> usize {
        self.threads.len()
    }

    /// The counters, summed now.
    pub fn totals(&self) -> PacketTotals {
        self.stats.totals()
    }

    /// Stops the workers and waits for them (each notices within [`WAKE_INTERVAL`]).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for PacketWorkers {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::time::SystemTime;

    use super::*;
    use crate::policy::{CompileOptions, CompiledPolicy, DefaultAction, PolicySet};

    /// A front end over packets in memory that records what the loop did with them.
    #[derive(Default)]
    struct Fake {
        bursts: Vec<Vec<Vec<u8>>>,
        current: Vec<Vec<u8>>,
        kept: Vec<bool>,
        forwarded: Vec<Vec<u8>>,
        replies: RefCell<Vec<(usize, Vec<u8>)>>,
        fail_recv: bool,
    }

    #[derive(Debug, Error)]
    #[error("fake device error")]
    struct FakeError;

    impl FrontEnd for Fake {
        type Error = FakeError;
        fn reply_headroom(&self) -> usize {
            4
        }
        fn wait(&mut self, _: Duration) -> Result<bool, FakeError> {
            Ok(!self.bursts.is_empty())
        }
        fn recv(&mut self) -> Result<usize, FakeError> {
            if self.fail_recv {
                return Err(FakeError);
            }
            self.current = self.bursts.pop().unwrap_or_default();
            self.kept = vec![true; self.current.len()];
            Ok(self.current.len())
        }
        fn packet(&self, i: usize) -> &[u8] {
            self.current.get(i).map_or(&[], Vec::as_slice)
        }
        fn send_reply(&self, to: usize, frame: &mut [u8]) -> Result<(), FakeError> {
            self.replies.borrow_mut().push((to, frame.to_vec()));
            Ok(())
        }
        fn drop_packet(&mut self, i: usize) {
            self.kept[i] = false;
        }
        fn forward(&mut self) -> Result<(), FakeError> {
            for (p, k) in self.current.iter().zip(&self.kept) {
                if *k {
                    self.forwarded.push(p.clone());
                }
            }
            Ok(())
        }
        fn take_device_drops(&mut self) -> u64 {
            2
        }
    }

    fn filter(on_deny: filter::OnDeny) -> Filter {
        let opts = CompileOptions {
            default: DefaultAction::Deny,
            unknown: DefaultAction::Deny,
            now: SystemTime::now(),
        };
        let rt = Runtime::standalone(
            CompiledPolicy::compile(&PolicySet::default(), &opts).unwrap(),
            1024,
        );
        let tag = rt.first_listener("packet", "packet");
        let cfg = FilterConfig { on_deny, ..FilterConfig::default() };
        Filter::new(rt, tag, cfg, Arc::new(PacketCounters::default()))
    }

    /// An IPv4 UDP datagram 198.18.1.2:4000 → 198.18.2.2:53 with `payload` (checksums
    /// left zero: UDP over IPv4 allows it, the filter does not verify the IP one).
    fn udp4(payload: &[u8]) -> Vec<u8> {
        let len = 28 + payload.len();
        let mut p = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 198, 18, 1, 2, 198, 18, 2, 2];
        p[2..4].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        p.extend_from_slice(&4000u16.to_be_bytes());
        p.extend_from_slice(&53u16.to_be_bytes());
        p.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn a_burst_forwards_exactly_what_the_filter_passes_and_never_a_malformed_packet() {
        for on_deny in [filter::OnDeny::Drop, filter::OnDeny::Reject] {
            let mut f = filter(on_deny);
            let good = udp4(b"hello");
            let mut ihl4 = good.clone();
            ihl4[0] = 0x44;
            let burst = vec![good.clone(), vec![], ihl4, good[..12].to_vec(), vec![0x60; 3]];
            let mut front = Fake { bursts: vec![burst.clone()], ..Fake::default() };
            let device = DeviceCounters::default();
            let mut verdicts = [Verdict::Pass; MAX_BURST];
            let mut reply = [0u8; REPLY_BUF];
            run_burst(&mut front, &mut f, &device, &mut verdicts, &mut reply);
            let passed: Vec<Vec<u8>> = burst
                .iter()
                .zip(&verdicts)
                .filter(|(_, v)| **v == Verdict::Pass)
                .map(|(p, _)| p.clone())
                .collect();
            assert_eq!(front.forwarded, passed, "{on_deny:?}: {:?}", &verdicts[..5]);
            for v in &verdicts[1..5] {
                assert!(matches!(v, Verdict::Drop(DropCause::Malformed(_))), "{v:?}");
            }
            let c = f.counters();
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            assert_eq!(get(&c.passed_packets) + get(&c.dropped_packets), 5);
            assert_eq!(get(&c.dropped[DropCause::Malformed(DropReason::ALL[0]).index()]), 4);
            // Replies only ever answer a packet given Reject.
            for (to, _) in front.replies.borrow().iter() {
                assert!(matches!(verdicts[*to], Verdict::Reject(_)), "{:?}", verdicts[*to]);
            }
            assert_eq!(device.dropped.load(Ordering::Relaxed), 2);
            assert_eq!(device.errors.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn a_device_error_is_counted_and_the_worker_goes_on_until_stopped() {
        let mut f = filter(filter::OnDeny::Drop);
        let mut front = Fake { bursts: vec![vec![udp4(b"x")]], fail_recv: true, ..Fake::default() };
        let device = DeviceCounters::default();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| run_worker(&mut front, &mut f, &device, &stop));
            let end = Instant::now() + Duration::from_secs(10);
            while device.errors.load(Ordering::Relaxed) < 3 {
                assert!(Instant::now() < end, "errors not counted");
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(front.forwarded.is_empty());
    }

    #[test]
    fn filter_config_carries_every_knob() {
        let cfg = PacketConfig {
            on_deny: packet_config::OnDeny::Reject,
            tcp_liberal: true,
            max_fragments: 7,
            fragment_timeout: Duration::from_millis(300),
            reject_per_second: 9,
            max_ipv6_ext_headers: 3,
            ..PacketConfig::default()
        };
        let f = filter_config(&cfg);
        assert_eq!(f.on_deny, filter::OnDeny::Reject);
        assert!(f.tcp_liberal);
        assert_eq!((f.max_fragments, f.reject_per_second), (7, 9));
        assert_eq!(f.fragment_timeout, Duration::from_millis(300));
        assert_eq!(f.limits.max_ipv6_ext_headers, 3);
        // The defaults agree with the filter's own.
        assert_eq!(filter_config(&PacketConfig::default()), FilterConfig::default());
    }
}
