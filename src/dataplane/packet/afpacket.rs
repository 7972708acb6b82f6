//! The AF_PACKET front end's device layer: flowgate as an L2 bump in the wire between two
//! interfaces (`inside`, `outside`), each read through a `PACKET_MMAP` TPACKET_V3 receive
//! ring and written with `sendmmsg`, in bursts, through buffers the kernel and the caller
//! share.
//!
//! Responsible for: one packet socket per interface per worker, joined in a
//! `PACKET_FANOUT` hash group per interface so `workers` threads share each interface;
//! promiscuous mode; `PACKET_IGNORE_OUTGOING` so a socket never reads the frames flowgate
//! itself sends; the virtio-net header (`PACKET_VNET_HDR`) so GSO/GRO super-frames and
//! frames whose checksum is still to be filled in cross the bump intact; lending a bounded
//! burst of received frames in a [`FrameBatch`] with each frame's side, ethertype and IP
//! packet; forwarding the kept frames out of the other interface; sending a reply frame
//! (a reject) out of the interface a frame came from, its Ethernet header built by swapping
//! the MACs. Not here: parsing the IP packet (`classify`), verdicts (`filter`), the worker
//! loop (`worker`).
//!
//! # What crosses, and 802.1Q
//! Every frame read on one interface goes out of the other unless the caller drops it.
//! Frames whose ethertype is IPv4 or IPv6 are lent with their IP packet ([`Frame::ip`]) for
//! the filter; ARP and every other non-IP ethertype are [`FrameKind::Other`], for the
//! caller to forward untouched. Frames carrying an 802.1Q/802.1ad tag — in the frame, or
//! stripped by VLAN offload and reported by the ring — are [`FrameKind::Tagged`] and carry
//! no IP slice: the device layer does not look inside tags, and a caller that forwarded
//! them unfiltered would let any host bypass the filter by tagging its traffic, so the
//! worker drops them (fail closed). To filter a trunk, run flowgate on the VLAN
//! sub-interfaces (`eth1.100`), where the kernel has removed the tag.
//!
//! # Host set-up
//! Both interfaces up, with no address and no IPv6 (`sysctl
//! net.ipv6.conf.<if>.disable_ipv6=1`): the kernel must not answer or originate on them;
//! not in a bridge. A real NIC's GRO super-frames cross as they are (the virtio-net header
//! says how to segment them), so GRO may stay on; nothing here needs `ethtool`.
//! `tests/packet_afpacket.rs` builds this topology in namespaces.
//!
//! # Why rings, not pnet's datalink channel (measured)
//! pnet's Linux channel (`pnet_datalink` 0.35) pays poll + `recvfrom` per frame read and
//! poll + `sendto` per frame written, with no virtio-net header. `loadtest/afpacket_forward.rs`
//! forwards client → bump → server namespaces with a trivial loop on each (pnet: one thread
//! per direction; the ring: one worker), `AF_SECS=3 AF_ROUNDS=1`, test-profile build
//! (`cargo test --no-run --bench afpacket_forward`, then the binary with `--bench`), on the
//! shared 2-core development machine at load average ≈ 14:
//!
//! ```text
//!                                   TCP (iperf3, 1 stream)   UDP 64 B (rx pps)
//! kernel bridge (reference)              2.43 Gbit/s             13.7 k
//! pnet channel, offloads off             0.18 Gbit/s             13.5 k
//! TPACKET_V3 + sendmmsg, offloads off    0.74 Gbit/s  (4.1×)     13.3 k
//! TPACKET_V3 + sendmmsg, offloads on     1.95 Gbit/s  (0.80× the bridge)   9.3 k
//! ```
//!
//! The UDP column is bound by the iperf3 sender on that loaded machine (all four cases,
//! the bridge included, land at the same rate), so it does not separate them; TCP does:
//! the ring forwards 4× what pnet does frame for frame, and with the virtio-net header
//! (super-frames cross whole) 11× — pnet cannot carry a super-frame at all (it is larger
//! than the MTU and comes without the header that says how to segment it) nor a frame
//! whose checksum is left to offload (its bytes go out with the checksum unfilled), so
//! behind pnet both neighbours must turn checksum and segmentation offloads off. The ring
//! reads a block of frames per wake-up with no syscall per frame and lends them in place;
//! `sendmmsg` writes a burst per syscall straight from the ring (no copy in userspace).
//!
//! # TPACKET_V3 latency
//! A V3 ring hands a block to userspace when it is full or when its retire timer
//! ([`RingConfig::retire_ms`], 1 ms, the smallest) fires: a lone packet on an idle link
//! waits up to that long. Under load blocks fill long before the timer.
//!
//! # Safety
//! The `unsafe` of this front end is here: the socket options, the ring's `mmap`, the
//! `sendmmsg` calls, and reading a block of the shared mapping. A block belongs to
//! userspace from the moment its `block_status` says `TP_STATUS_USER` (read with acquire
//! ordering) until flowgate stores `TP_STATUS_KERNEL` (release ordering); slices into a
//! block exist only in between. A block is returned to the kernel when the ring's cursor
//! has walked past it *and* no [`FrameBatch`] lends a frame of it (a count per block), so a
//! frame borrowed from a batch can never be overwritten underneath the borrow.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use thiserror::Error;

use super::lent::{self, Lent};
use super::tun::{self, VNET_HDR_LEN, VnetHdr};

/// The ethertypes the device layer tells apart.
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// Bytes of an untagged Ethernet header.
pub const ETH_HDR_LEN: usize = 14;

/// How often a syscall interrupted by a signal is retried.
const EINTR_RETRIES: usize = 8;

/// Which interface a frame was read on; it leaves by the other one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// Read on `inside` (going out).
    Inside,
    /// Read on `outside` (coming in).
    Outside,
}

impl Side {
    /// The interface a frame read on this side is forwarded to.
    pub fn other(self) -> Side {
        match self {
            Side::Inside => Side::Outside,
            Side::Outside => Side::Inside,
        }
    }

    fn idx(self) -> usize {
        match self {
            Side::Inside => 0,
            Side::Outside => 1,
        }
    }
}

/// What a frame carries, by its ethertype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// IPv4 or IPv6: [`Frame::ip`] holds the packet, for the filter.
    Ip,
    /// An 802.1Q/802.1ad tag (in the frame or stripped by offload): not looked into; the
    /// worker drops it (see the module docs).
    Tagged,
    /// ARP and any other ethertype: forwarded untouched.
    Other,
}

/// Ring geometry of each socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Bytes per block: a power of two, a multiple of the page size, large enough for a
    /// 64 KiB super-frame with its headers (at least 128 KiB).
    pub block_size: u32,
    /// Blocks per ring.
    pub block_nr: u32,
    /// Milliseconds after which the kernel hands over a block that is not full.
    pub retire_ms: u32,
}

impl RingConfig {
    /// 32 blocks of 256 KiB (8 MiB per interface per worker), retired after 1 ms.
    pub const DEFAULT: RingConfig =
        RingConfig { block_size: 256 << 10, block_nr: 32, retire_ms: 1 };
}

impl Default for RingConfig {
    fn default() -> RingConfig {
        RingConfig::DEFAULT
    }
}

/// The step of opening or using a socket that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `if_nametoindex`: no such interface.
    Interface,
    Socket,
    SetVersion,
    SetVnetHdr,
    SetRxRing,
    Mmap,
    Bind,
    SetPromisc,
    SetIgnoreOutgoing,
    SetFanout,
    GetFanout,
    Poll,
    Send,
    Statistics,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Interface => "if_nametoindex",
            Step::Socket => "socket(AF_PACKET)",
            Step::SetVersion => "PACKET_VERSION",
            Step::SetVnetHdr => "PACKET_VNET_HDR",
            Step::SetRxRing => "PACKET_RX_RING",
            Step::Mmap => "mmap of the ring",
            Step::Bind => "bind",
            Step::SetPromisc => "PACKET_ADD_MEMBERSHIP (promiscuous)",
            Step::SetIgnoreOutgoing => "PACKET_IGNORE_OUTGOING",
            Step::SetFanout => "PACKET_FANOUT",
            Step::GetFanout => "getsockopt PACKET_FANOUT",
            Step::Poll => "poll",
            Step::Send => "sendmmsg",
            Step::Statistics => "PACKET_STATISTICS",
        })
    }
}

/// An AF_PACKET error, naming the interface, the worker and the step.
#[derive(Debug, Error)]
pub enum AfPacketError {
    /// The name is empty, too long for `IFNAMSIZ`, or holds a NUL.
    #[error("interface name {name:?} is invalid: {why}")]
    Name { name: String, why: &'static str },
    /// `inside` and `outside` name the same interface.
    #[error("inside and outside are the same interface {dev:?}")]
    SameInterface { dev: String },
    #[error("AF_PACKET: zero workers requested")]
    NoWorkers,
    /// The ring geometry is one the kernel would refuse.
    #[error("AF_PACKET ring: {why}")]
    Ring { why: &'static str },
    /// A system call failed.
    #[error("AF_PACKET on {dev}, worker {worker}: {step} failed: {source}")]
    Sys {
        dev: String,
        worker: usize,
        step: Step,
        #[source]
        source: io::Error,
    },
    /// A frame to send is shorter than an Ethernet header.
    #[error("AF_PACKET on {dev}: frame of {len} bytes refused (shorter than an Ethernet header)")]
    ShortFrame { dev: String, len: usize },
}

impl AfPacketError {
    /// The OS error behind a failed system call, if that is what this is.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            AfPacketError::Sys { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The two interfaces opened for `workers` workers: one [`Queue`] per worker.
#[derive(Debug)]
pub struct AfPacket {
    queues: Vec<Queue>,
}

impl AfPacket {
    /// Opens `inside` and `outside` for `workers` workers with the default ring.
    ///
    /// # Errors
    /// See [`AfPacket::open_with`].
    pub fn open(inside: &str, outside: &str, workers: usize) -> Result<AfPacket, AfPacketError> {
        AfPacket::open_with(inside, outside, workers, RingConfig::DEFAULT)
    }

    /// Opens one ring socket per interface per worker: each bound to its interface, in
    /// promiscuous mode, ignoring its own outgoing frames, with the virtio-net header on,
    /// and joined to one fanout group (hash) per interface. The interfaces must exist and
    /// be up (the host's part, see the module docs).
    ///
    /// The kernel's flow hash is symmetric and worker `k` is the `k`-th member of both
    /// groups, so both directions of a flow land on the same worker.
    ///
    /// # Errors
    /// [`AfPacketError::Name`], [`AfPacketError::SameInterface`],
    /// [`AfPacketError::NoWorkers`], [`AfPacketError::Ring`] before any syscall;
    /// [`AfPacketError::Sys`] naming the step otherwise (`EPERM` without `CAP_NET_RAW`,
    /// `ENODEV` for an unknown interface).
    pub fn open_with(
        inside: &str,
        outside: &str,
        workers: usize,
        ring: RingConfig,
    ) -> Result<AfPacket, AfPacketError> {
        let names = [check_name(inside)?, check_name(outside)?];
        if inside == outside {
            return Err(AfPacketError::SameInterface { dev: inside.to_string() });
        }
        if workers == 0 {
            return Err(AfPacketError::NoWorkers);
        }
        check_ring(ring)?;
        let devs = [inside, outside];
        let mut ifindex = [0u32; 2];
        for (i, (dev, cname)) in devs.iter().zip(&names).enumerate() {
            // SAFETY: `cname` is a NUL-terminated C string that outlives the call.
            let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            if idx == 0 {
                return Err(sys(dev, 0, Step::Interface, io::Error::last_os_error()));
            }
            ifindex[i] = idx;
        }
        let mut fanout_id: [Option<u16>; 2] = [None, None];
        let mut queues = Vec::with_capacity(workers);
        for w in 0..workers {
            let mut rings = Vec::with_capacity(2);
            for side in 0..2 {
                let r = Ring::open(devs[side], ifindex[side], w, ring, &mut fanout_id[side])?;
                rings.push(Arc::new(r));
            }
            let outside = rings.pop().expect("two rings were opened");
            let inside = rings.pop().expect("two rings were opened");
            queues.push(Queue {
                index: w,
                rings: [inside, outside],
                cursor: [Cursor::default(), Cursor::default()],
                next_first: Side::Inside,
            });
        }
        Ok(AfPacket { queues })
    }

    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Hands the queues out, one per worker thread.
    pub fn into_queues(self) -> Vec<Queue> {
        self.queues
    }
}

fn sys(dev: &str, worker: usize, step: Step, source: io::Error) -> AfPacketError {
    AfPacketError::Sys { dev: dev.to_string(), worker, step, source }
}

fn check_name(name: &str) -> Result<CString, AfPacketError> {
    tun::interface_name(name).map_err(|why| AfPacketError::Name { name: name.to_string(), why })
}

fn check_ring(r: RingConfig) -> Result<(), AfPacketError> {
    let bad = |why| Err(AfPacketError::Ring { why });
    if !r.block_size.is_power_of_two() || r.block_size < 128 << 10 {
        return bad("block_size must be a power of two of at least 128 KiB");
    }
    if r.block_size > 16 << 20 {
        return bad("block_size must be at most 16 MiB");
    }
    if r.block_nr == 0 || r.block_nr > 4096 {
        return bad("block_nr must be 1..=4096");
    }
    if r.retire_ms == 0 {
        return bad("retire_ms must be at least 1");
    }
    Ok(())
}

/// Sets an integer-like socket option.
fn setsockopt<T>(fd: RawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    let len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` points at a live, initialised `T` of `len` bytes; the kernel only
    // reads it.
    let rc = unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), len) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// One packet socket with its receive ring, mapped.
struct Ring {
    fd: OwnedFd,
    dev: String,
    worker: usize,
    map: *mut u8,
    map_len: usize,
    block_size: usize,
    block_nr: usize,
    /// Per block: who still needs it (the cursor while it walks the block, plus one per
    /// frame a batch lends). The one who brings it to zero hands the block back.
    holders: Box<[AtomicU32]>,
}

// SAFETY: the mapping is owned by the `Ring` (unmapped on drop); the fields are not
// tied to a thread; concurrent access to a block is ruled by `block_status` and
// `holders` as the module docs say.
unsafe impl Send for Ring {}
// SAFETY: as above: `&Ring` only reads blocks it holds and changes `block_status` and
// `holders` atomically.
unsafe impl Sync for Ring {}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("dev", &self.dev)
            .field("worker", &self.worker)
            .field("block_size", &self.block_size)
            .field("block_nr", &self.block_nr)
            .finish_non_exhaustive()
    }
}

/// Byte offset of `hdr.bh1.block_status` in `struct tpacket_block_desc`.
const BLOCK_STATUS_OFF: usize = 8;
const BLOCK_NUM_PKTS_OFF: usize = 12;
const BLOCK_FIRST_PKT_OFF: usize = 16;
const BLOCK_LEN_OFF: usize = 20;

impl Ring {
    fn open(
        dev: &str,
        ifindex: u32,
        worker: usize,
        cfg: RingConfig,
        fanout_id: &mut Option<u16>,
    ) -> Result<Ring, AfPacketError> {
        let err = |step| move |e| sys(dev, worker, step, e);
        // Protocol 0: the socket receives nothing until it is bound to its interface.
        // SAFETY: socket has no memory preconditions.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if raw < 0 {
            return Err(err(Step::Socket)(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly opened fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let s = fd.as_raw_fd();
        let v3 = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        setsockopt(s, libc::SOL_PACKET, libc::PACKET_VERSION, &v3)
            .map_err(err(Step::SetVersion))?;
        // Before the ring: the kernel refuses it once a ring exists.
        let one: libc::c_int = 1;
        setsockopt(s, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one)
            .map_err(err(Step::SetVnetHdr))?;
        let frame_size: u32 = 2048;
        let req = libc::tpacket_req3 {
            tp_block_size: cfg.block_size,
            tp_block_nr: cfg.block_nr,
            tp_frame_size: frame_size,
            tp_frame_nr: cfg.block_size / frame_size * cfg.block_nr,
            tp_retire_blk_tov: cfg.retire_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(s, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)
            .map_err(err(Step::SetRxRing))?;
        let block_size = cfg.block_size as usize;
        let block_nr = cfg.block_nr as usize;
        let map_len = block_size * block_nr;
        // SAFETY: maps the ring the kernel just allocated for this socket; length and
        // offset are the ring's; the result is checked against MAP_FAILED.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                s,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(err(Step::Mmap)(io::Error::last_os_error()));
        }
        // From here on the mapping is owned by `ring` and unmapped by its drop.
        let ring = Ring {
            fd,
            dev: dev.to_string(),
            worker,
            map: map.cast(),
            map_len,
            block_size,
            block_nr,
            holders: (0..block_nr).map(|_| AtomicU32::new(0)).collect(),
        };
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid, initialised sockaddr_ll of the length passed.
        let rc = unsafe {
            libc::bind(
                s,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(err(Step::Bind)(io::Error::last_os_error()));
        }
        let mreq = libc::packet_mreq {
            mr_ifindex: ifindex as i32,
            mr_type: libc::PACKET_MR_PROMISC as u16,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        setsockopt(s, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
            .map_err(err(Step::SetPromisc))?;
        setsockopt(s, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one)
            .map_err(err(Step::SetIgnoreOutgoing))?;
        ring.join_fanout(fanout_id)?;
        Ok(ring)
    }

    /// Joins the interface's hash fanout group: the first socket asks the kernel for a
    /// group id no one else uses (`PACKET_FANOUT_FLAG_UNIQUEID`), the others join it.
    fn join_fanout(&self, id: &mut Option<u16>) -> Result<(), AfPacketError> {
        let s = self.fd.as_raw_fd();
        let hash = libc::PACKET_FANOUT_HASH;
        let arg: libc::c_uint = match *id {
            Some(id) => u32::from(id) | (hash << 16),
            None => (hash | libc::PACKET_FANOUT_FLAG_UNIQUEID) << 16,
        };
        setsockopt(s, libc::SOL_PACKET, libc::PACKET_FANOUT, &arg)
            .map_err(|e| sys(&self.dev, self.worker, Step::SetFanout, e))?;
        if id.is_none() {
            let mut val: libc::c_uint = 0;
            let mut len = std::mem::size_of::<libc::c_uint>() as libc::socklen_t;
            // SAFETY: `val` and `len` are live locals of the sizes passed; the kernel
            // writes at most `len` bytes into `val`.
            let rc = unsafe {
                libc::getsockopt(
                    s,
                    libc::SOL_PACKET,
                    libc::PACKET_FANOUT,
                    (&mut val as *mut libc::c_uint).cast(),
                    &mut len,
                )
            };
            if rc < 0 {
                return Err(sys(
                    &self.dev,
                    self.worker,
                    Step::GetFanout,
                    io::Error::last_os_error(),
                ));
            }
            *id = Some((val & 0xffff) as u16);
        }
        Ok(())
    }

    fn block_ptr(&self, b: usize) -> *mut u8 {
        debug_assert!(b < self.block_nr);
        // SAFETY (of the arithmetic): b < block_nr, so the offset is inside the mapping.
        unsafe { self.map.add(b * self.block_size) }
    }

    fn status(&self, b: usize) -> &AtomicU32 {
        // SAFETY: every block starts with a tpacket_block_desc, whose block_status is a
        // 4-byte aligned u32 at BLOCK_STATUS_OFF (blocks are page aligned); the kernel and
        // flowgate access it only atomically, and the mapping lives as long as `self`.
        unsafe { AtomicU32::from_ptr(self.block_ptr(b).add(BLOCK_STATUS_OFF).cast()) }
    }

    /// Whether block `b` is new to read: the kernel has handed it over and nothing holds
    /// it. A block still held by a batch from an earlier walk reads as user-owned too, and
    /// must not be walked twice.
    fn is_fresh(&self, b: usize) -> bool {
        self.holders[b].load(Ordering::Acquire) == 0
            && self.status(b).load(Ordering::Acquire) & libc::TP_STATUS_USER != 0
    }

    /// The bytes of block `b`.
    ///
    /// Only for a block this ring holds: `holders[b] > 0` and its status `TP_STATUS_USER`.
    fn block(&self, b: usize) -> &[u8] {
        debug_assert!(self.holders[b].load(Ordering::Relaxed) > 0);
        // SAFETY: the block lies inside the mapping, which lives as long as `self`; it is
        // held (callers only ask for held blocks), so the kernel does not write it until
        // the last holder lets go, which happens only once no slice of it is alive (the
        // cursor drops its hold after its walk, a batch in `clear`/`drop`, which take it
        // mutably).
        unsafe { std::slice::from_raw_parts(self.block_ptr(b), self.block_size) }
    }

    fn hold(&self, b: usize) {
        self.holders[b].fetch_add(1, Ordering::Relaxed);
    }

    /// Drops one hold on block `b`; the last one hands the block back to the kernel.
    fn release(&self, b: usize) {
        if self.holders[b].fetch_sub(1, Ordering::AcqRel) == 1 {
            self.status(b).store(libc::TP_STATUS_KERNEL, Ordering::Release);
        }
    }

    fn stats(&self) -> Result<RingStats, AfPacketError> {
        let mut st = libc::tpacket_stats_v3 { tp_packets: 0, tp_drops: 0, tp_freeze_q_cnt: 0 };
        let mut len = std::mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `st` and `len` are live locals of the sizes passed.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats_v3).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(sys(&self.dev, self.worker, Step::Statistics, io::Error::last_os_error()));
        }
        Ok(RingStats {
            packets: u64::from(st.tp_packets),
            drops: u64::from(st.tp_drops),
            freezes: u64::from(st.tp_freeze_q_cnt),
        })
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `map`/`map_len` are the mapping made in `open`; no slice of it outlives
        // the ring (batches and queues hold the ring by `Arc`).
        unsafe {
            libc::munmap(self.map.cast(), self.map_len);
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let bytes = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_ne_bytes([bytes[0], bytes[1]]))
}

/// Where a ring's reader is: the block it walks and the next frame in it.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    block: usize,
    /// Holding `block` and walking it.
    open: bool,
    /// Frames of the block still to read.
    left: u32,
    /// Offset of the next frame in the block.
    next: usize,
}

/// The kernel's counters for one socket since the last read (reading resets them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Frames the socket received.
    pub packets: u64,
    /// Frames dropped because the ring was full.
    pub drops: u64,
    /// Times the ring was full (the kernel froze the queue).
    pub freezes: u64,
}

/// How a forward or send went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Frames the kernel took.
    pub sent: usize,
    /// Frames it refused (full send buffer, too large for the interface, malformed virtio
    /// header): dropped, to be counted by the caller.
    pub failed: usize,
}

/// One worker's share of the two interfaces: a ring socket on each. Not `Clone`; one
/// thread reads and writes it.
#[derive(Debug)]
pub struct Queue {
    index: usize,
    rings: [Arc<Ring>; 2],
    cursor: [Cursor; 2],
    /// The side read first in the next burst: alternates, so neither side starves.
    next_first: Side,
}

/// Most messages handed to one `sendmmsg`.
const SEND_CHUNK: usize = 64;

impl Queue {
    /// This worker's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The interface of `side`.
    pub fn dev(&self, side: Side) -> &str {
        &self.rings[side.idx()].dev
    }

    /// Lends the frames received since the last call, at most `batch.capacity()`, from
    /// both interfaces (the side read first alternates). The batch is cleared first, which
    /// hands the blocks of its previous frames back to the kernel. Reads no more than
    /// the ring holds and makes no syscall. A frame the ring cut short (larger than a
    /// block can hold) or without a full Ethernet header is not lent, and is counted in
    /// [`FrameBatch::dropped`].
    pub fn recv_batch(&mut self, batch: &mut FrameBatch) -> usize {
        batch.clear();
        batch.bind(&self.rings);
        let first = self.next_first;
        self.next_first = first.other();
        for side in [first, first.other()] {
            self.recv_side(side, batch);
        }
        batch.len()
    }

    fn recv_side(&mut self, side: Side, batch: &mut FrameBatch) {
        let ring = self.rings[side.idx()].clone();
        let cur = &mut self.cursor[side.idx()];
        // Bounded: each pass lends a frame, skips one, or moves to the next block, and
        // at most `block_nr` blocks are walked per call.
        let mut blocks_walked = 0;
        while !batch.lent.is_full() {
            if !cur.open {
                if blocks_walked == ring.block_nr || !ring.is_fresh(cur.block) {
                    return;
                }
                blocks_walked += 1;
                ring.hold(cur.block);
                let blk = ring.block(cur.block);
                cur.open = true;
                cur.left = u32_at(blk, BLOCK_NUM_PKTS_OFF).unwrap_or(0);
                cur.next = u32_at(blk, BLOCK_FIRST_PKT_OFF).map_or(usize::MAX, |v| v as usize);
                // blk_len bounds the walk as well as the block does.
                let _ = u32_at(blk, BLOCK_LEN_OFF);
            }
            if cur.left == 0 || cur.next >= ring.block_size {
                // The block is walked: the cursor lets go of it, and the kernel gets it
                // back as soon as no batch lends a frame of it.
                ring.release(cur.block);
                cur.open = false;
                cur.block = (cur.block + 1) % ring.block_nr;
                continue;
            }
            cur.left -= 1;
            let blk = ring.block(cur.block);
            let at = cur.next;
            let next_off = u32_at(blk, at).unwrap_or(0) as usize;
            cur.next = if next_off == 0 { usize::MAX } else { at.saturating_add(next_off) };
            match parse_frame(blk, at) {
                Some(entry) => {
                    ring.hold(cur.block);
                    let i = batch.lent.push();
                    batch.entries[i] = Entry { side, block: cur.block, ..entry };
                }
                None => batch.lent.refuse(),
            }
        }
    }

    /// Writes every frame of `batch` still kept out of the other interface, as read
    /// (virtio-net header included, so a super-frame is segmented on the way out if it must
    /// be), straight from the ring, one `sendmmsg` per interface per 64 frames.
    ///
    /// # Errors
    /// [`AfPacketError::Sys`] (step `Send`) for a failure that is not about one frame
    /// (`EBADF`, `ENXIO`: the interface went away); frames the kernel refuses one by one
    /// (`ENOBUFS`, `EAGAIN`, `EMSGSIZE`, `EINVAL`) are counted in [`Sent::failed`].
    pub fn forward(&self, batch: &FrameBatch) -> Result<Sent, AfPacketError> {
        let mut total = Sent::default();
        for out in [Side::Inside, Side::Outside] {
            let from = out.other();
            let mut iov: [libc::iovec; SEND_CHUNK] =
                [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; SEND_CHUNK];
            let mut n = 0;
            for i in 0..batch.len() {
                let e = &batch.entries[i];
                if !batch.is_kept(i) || e.side != from {
                    continue;
                }
                let bytes = batch.wire(i);
                iov[n] = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
                n += 1;
                if n == SEND_CHUNK {
                    let s = self.send_iovs(out, &iov[..n], 1)?;
                    total.sent += s.sent;
                    total.failed += s.failed;
                    n = 0;
                }
            }
            if n > 0 {
                let s = self.send_iovs(out, &iov[..n], 1)?;
                total.sent += s.sent;
                total.failed += s.failed;
            }
        }
        Ok(total)
    }

    /// Sends `iovs` out of `side` as `iovs.len() / per_msg` messages of `per_msg` iovecs.
    fn send_iovs(
        &self,
        side: Side,
        iovs: &[libc::iovec],
        per_msg: usize,
    ) -> Result<Sent, AfPacketError> {
        let ring = &self.rings[side.idx()];
        let count = iovs.len() / per_msg;
        // SAFETY: mmsghdr is plain old data; all-zero is valid (no name, no control).
        let mut msgs: [libc::mmsghdr; SEND_CHUNK] = unsafe { std::mem::zeroed() };
        for (m, chunk) in msgs.iter_mut().zip(iovs.chunks(per_msg)) {
            m.msg_hdr.msg_iov = chunk.as_ptr() as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = chunk.len();
        }
        let mut out = Sent::default();
        let mut start = 0;
        let mut retries = 0;
        // Bounded: every pass sends a message, refuses one, or is one of a few retries
        // after a signal.
        while start < count {
            let left = &mut msgs[start..count];
            // SAFETY: `left` holds `left.len()` initialised mmsghdrs whose iovecs point at
            // live buffers (ring blocks the batch holds, or the caller's slices) that
            // outlive the call; the kernel only reads them and writes `msg_len`.
            let rc = unsafe {
                libc::sendmmsg(
                    ring.fd.as_raw_fd(),
                    left.as_mut_ptr(),
                    left.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                start += rc as usize;
                out.sent += rc as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) if retries < EINTR_RETRIES => retries += 1,
                Some(
                    libc::EAGAIN | libc::ENOBUFS | libc::EMSGSIZE | libc::EINVAL | libc::EFAULT,
                ) => {
                    // This message was refused; the rest still go.
                    start += 1;
                    out.failed += 1;
                }
                _ => return Err(sys(&ring.dev, self.index, Step::Send, err)),
            }
        }
        Ok(out)
    }

    /// Sends an IP packet back out of the interface frame `i` of `batch` came from — a
    /// reject answering it — in an Ethernet frame whose MACs are the frame's swapped and
    /// whose ethertype follows the packet's version. `Ok(false)` when `i` is past the end
    /// or the packet is neither IPv4 nor IPv6 (nothing is sent).
    ///
    /// # Errors
    /// As [`Queue::send_frame`].
    pub fn reply(&self, batch: &FrameBatch, i: usize, ip: &[u8]) -> Result<bool, AfPacketError> {
        let Some(frame) = batch.frame(i) else { return Ok(false) };
        let ethertype = match ip.first().map(|b| b >> 4) {
            Some(4) => ETH_P_IPV4,
            Some(6) => ETH_P_IPV6,
            _ => return Ok(false),
        };
        let mut eth = [0u8; ETH_HDR_LEN];
        if reply_header(frame.frame, ethertype, &mut eth).is_none() {
            return Ok(false);
        }
        self.send_parts(frame.side, &eth, ip)?;
        Ok(true)
    }

    /// Sends one Ethernet frame (header included, no virtio-net header) out of `side`. For
    /// frames flowgate builds itself and for tests.
    ///
    /// # Errors
    /// [`AfPacketError::ShortFrame`] for less than an Ethernet header; [`AfPacketError::Sys`]
    /// (step `Send`) when the kernel refuses it (`ENOBUFS`/`EAGAIN` when the send buffer is
    /// full, `EMSGSIZE` when it exceeds the interface's MTU).
    pub fn send_frame(&self, side: Side, frame: &[u8]) -> Result<(), AfPacketError> {
        let Some((eth, rest)) = frame.split_at_checked(ETH_HDR_LEN) else {
            return Err(AfPacketError::ShortFrame {
                dev: self.dev(side).to_string(),
                len: frame.len(),
            });
        };
        self.send_parts(side, eth, rest)
    }

    fn send_parts(&self, side: Side, eth: &[u8], rest: &[u8]) -> Result<(), AfPacketError> {
        let ring = &self.rings[side.idx()];
        let mut vnet = [0u8; VNET_HDR_LEN];
        VnetHdr::NONE.emit(&mut vnet).expect("the buffer is VNET_HDR_LEN bytes");
        let iov = [
            libc::iovec { iov_base: vnet.as_mut_ptr().cast(), iov_len: vnet.len() },
            libc::iovec { iov_base: eth.as_ptr() as *mut _, iov_len: eth.len() },
            libc::iovec { iov_base: rest.as_ptr() as *mut _, iov_len: rest.len() },
        ];
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        let mut retries = 0;
        loop {
            // SAFETY: `msg` points at three iovecs over live buffers that outlive the
            // call; the kernel only reads them.
            let rc = unsafe { libc::sendmsg(ring.fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
            if rc >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted && retries < EINTR_RETRIES {
                retries += 1;
                continue;
            }
            return Err(sys(&ring.dev, self.index, Step::Send, err));
        }
    }

    /// Waits up to `timeout` for either interface to have a block ready; `Ok(false)` on
    /// timeout. For a worker without an event loop (and tests); [`Queue::fds`] gives the
    /// two fds to register with a reactor instead.
    ///
    /// # Errors
    /// [`AfPacketError::Sys`] (step `Poll`) when poll fails for a reason other than a
    /// signal.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool, AfPacketError> {
        // A block already handed over (or one the cursor is in the middle of) is ready
        // without asking the kernel.
        for (ring, cur) in self.rings.iter().zip(&self.cursor) {
            if cur.open || ring.is_fresh(cur.block) {
                return Ok(true);
            }
        }
        let mut pfd = self.rings.each_ref().map(|r| libc::pollfd {
            fd: r.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: two valid pollfds; poll writes only their `revents`.
        let rc = unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(sys(&self.rings[0].dev, self.index, Step::Poll, err));
        }
        Ok(rc > 0)
    }

    /// The two sockets' fds (inside, outside), to wait on.
    pub fn fds(&self) -> [RawFd; 2] {
        self.rings.each_ref().map(|r| r.fd.as_raw_fd())
    }

    /// The kernel's counters of `side`'s socket since the last call (ring-full drops).
    ///
    /// # Errors
    /// [`AfPacketError::Sys`] (step `Statistics`).
    pub fn stats(&self, side: Side) -> Result<RingStats, AfPacketError> {
        self.rings[side.idx()].stats()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        for (ring, cur) in self.rings.iter().zip(&mut self.cursor) {
            if cur.open {
                cur.open = false;
                ring.release(cur.block);
            }
        }
    }
}

/// Writes into `out` the Ethernet header of a frame answering `frame`: destination and
/// source swapped, `ethertype` after them. Returns the bytes written ([`ETH_HDR_LEN`]), or
/// `None` when `frame` is shorter than an Ethernet header.
pub fn reply_header(frame: &[u8], ethertype: u16, out: &mut [u8; ETH_HDR_LEN]) -> Option<usize> {
    let dst = frame.get(0..6)?;
    let src = frame.get(6..12)?;
    out[0..6].copy_from_slice(src);
    out[6..12].copy_from_slice(dst);
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
    Some(ETH_HDR_LEN)
}

/// Parses the frame whose `tpacket3_hdr` is at `at` in block `blk`: where its virtio-net
/// header and Ethernet frame are, and what it carries. `None` for a frame the ring cut short
/// or whose offsets do not fit the block.
fn parse_frame(blk: &[u8], at: usize) -> Option<Entry> {
    // struct tpacket3_hdr: next_offset 0, sec 4, nsec 8, snaplen 12, len 16, status 20,
    // mac 24 (u16), net 26 (u16), hv1 { rxhash 28, vlan_tci 32, vlan_tpid 36 }.
    let snaplen = u32_at(blk, at + 12)? as usize;
    let len = u32_at(blk, at + 16)? as usize;
    let status = u32_at(blk, at + 20)?;
    let mac = usize::from(u16_at(blk, at + 24)?);
    if snaplen < len || snaplen < ETH_HDR_LEN {
        return None;
    }
    let start = at.checked_add(mac)?.checked_sub(VNET_HDR_LEN)?;
    let end = at.checked_add(mac)?.checked_add(snaplen)?;
    let wire = blk.get(start..end)?;
    let frame = &wire[VNET_HDR_LEN..];
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let kind = if status & libc::TP_STATUS_VLAN_VALID != 0 {
        FrameKind::Tagged
    } else {
        match ethertype {
            ETH_P_IPV4 | ETH_P_IPV6 => FrameKind::Ip,
            ETH_P_8021Q | ETH_P_8021AD => FrameKind::Tagged,
            _ => FrameKind::Other,
        }
    };
    Some(Entry { side: Side::Inside, block: 0, start, len: wire.len(), ethertype, kind })
}

/// One frame lent by a batch: where it lies in its ring.
#[derive(Clone, Copy, Debug)]
struct Entry {
    side: Side,
    block: usize,
    /// Offset of its virtio-net header in the block.
    start: usize,
    /// Header + frame bytes.
    len: usize,
    ethertype: u16,
    kind: FrameKind,
}

impl Entry {
    const EMPTY: Entry = Entry {
        side: Side::Inside,
        block: 0,
        start: 0,
        len: 0,
        ethertype: 0,
        kind: FrameKind::Other,
    };
}

/// A worker's burst: up to `capacity` frames lent in place from the rings (no copy). The
/// frames' blocks go back to the kernel when the batch is cleared by the next
/// [`Queue::recv_batch`] or dropped, so keep a batch no longer than one burst.
pub struct FrameBatch {
    rings: Option<[Arc<Ring>; 2]>,
    entries: Box<[Entry]>,
    /// Which entries hold a frame and which are still to be forwarded: derefs to it.
    lent: Lent,
}

lent::batch_derefs_to_lent!(FrameBatch);

impl FrameBatch {
    /// Room for `capacity` frames (at least one; `filter::MAX_BURST` is the useful most).
    pub fn new(capacity: usize) -> FrameBatch {
        let capacity = capacity.max(1);
        FrameBatch {
            rings: None,
            entries: vec![Entry::EMPTY; capacity].into_boxed_slice(),
            lent: Lent::new(capacity),
        }
    }

    /// Lets go of every frame (the kernel gets their blocks back once the cursor is past).
    fn clear(&mut self) {
        if let Some(rings) = &self.rings {
            for e in &self.entries[..self.lent.len()] {
                rings[e.side.idx()].release(e.block);
            }
        }
        self.lent.reset();
    }

    fn bind(&mut self, rings: &[Arc<Ring>; 2]) {
        let same = self
            .rings
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(&r[0], &rings[0]) && Arc::ptr_eq(&r[1], &rings[1]));
        if !same {
            self.rings = Some(rings.clone());
        }
    }

    /// Virtio-net header + frame of entry `i` (which is < len).
    fn wire(&self, i: usize) -> &[u8] {
        let e = &self.entries[i];
        match &self.rings {
            Some(rings) => {
                let blk = rings[e.side.idx()].block(e.block);
                &blk[e.start..e.start + e.len]
            }
            None => &[],
        }
    }

    /// Frame `i`, or `None` past [`FrameBatch::len`].
    pub fn frame(&self, i: usize) -> Option<Frame<'_>> {
        if i >= self.len() {
            return None;
        }
        let e = &self.entries[i];
        let wire = self.wire(i);
        let (vnet, frame) = match (VnetHdr::parse(wire), wire.get(VNET_HDR_LEN..)) {
            (Ok(h), Some(rest)) => (h, rest),
            _ => (VnetHdr::NONE, &[][..]),
        };
        let ip = match e.kind {
            FrameKind::Ip => frame.get(ETH_HDR_LEN..).unwrap_or(&[]),
            _ => &[],
        };
        Some(Frame { side: e.side, ethertype: e.ethertype, kind: e.kind, vnet, frame, ip })
    }

    /// The frames of the batch, in order.
    pub fn iter(&self) -> impl Iterator<Item = Frame<'_>> {
        (0..self.len()).filter_map(|i| self.frame(i))
    }

    /// Marks frame `i` as not to be forwarded. No-op past the end.
    pub fn drop_frame(&mut self, i: usize) {
        self.lent.unmark(i);
    }
}

impl Drop for FrameBatch {
    fn drop(&mut self) {
        self.clear();
    }
}

/// One frame of a [`FrameBatch`], borrowed from the ring.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// The interface it was read on.
    pub side: Side,
    /// The ethertype of its Ethernet header.
    pub ethertype: u16,
    pub kind: FrameKind,
    /// How the kernel wants it segmented and checksummed on the way out
    /// ([`VnetHdr::NONE`] for an ordinary frame).
    pub vnet: VnetHdr,
    /// The Ethernet frame, header included.
    pub frame: &'a [u8],
    /// The IP packet after the Ethernet header when `kind` is [`FrameKind::Ip`] (a GSO
    /// super-packet when `vnet.is_gso()`), else empty.
    pub ip: &'a [u8],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_rings_and_workers_are_checked_before_any_syscall() {
        for bad in ["", "a-name-that-is-too-long", "a/b", "a b", "a\0b"] {
            assert!(
                matches!(AfPacket::open(bad, "eth2", 1), Err(AfPacketError::Name { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            AfPacket::open("eth1", "eth1", 1),
            Err(AfPacketError::SameInterface { .. })
        ));
        assert!(matches!(AfPacket::open("eth1", "eth2", 0), Err(AfPacketError::NoWorkers)));
        for ring in [
            RingConfig { block_size: 64 << 10, ..RingConfig::DEFAULT },
            RingConfig { block_size: (256 << 10) + 4096, ..RingConfig::DEFAULT },
            RingConfig { block_nr: 0, ..RingConfig::DEFAULT },
            RingConfig { retire_ms: 0, ..RingConfig::DEFAULT },
        ] {
            assert!(matches!(
                AfPacket::open_with("eth1", "eth2", 1, ring),
                Err(AfPacketError::Ring { .. })
            ));
        }
    }

    #[test]
    fn a_reply_header_swaps_the_macs() {
        let mut frame = [0u8; 20];
        frame[0..6].copy_from_slice(&[1, 1, 1, 1, 1, 1]);
        frame[6..12].copy_from_slice(&[2, 2, 2, 2, 2, 2]);
        frame[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        let mut out = [0u8; ETH_HDR_LEN];
        assert_eq!(reply_header(&frame, ETH_P_IPV6, &mut out), Some(ETH_HDR_LEN));
        assert_eq!(out, [2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 0x86, 0xdd]);
        assert_eq!(reply_header(&frame[..11], ETH_P_IPV4, &mut out), None);
    }

    /// A block as the kernel lays it out, with frames at the given offsets.
    fn frame_at(blk: &mut [u8], at: usize, ethertype: u16, snaplen: u32, len: u32, status: u32) {
        let mac: u16 = 80;
        blk[at + 12..at + 16].copy_from_slice(&snaplen.to_ne_bytes());
        blk[at + 16..at + 20].copy_from_slice(&len.to_ne_bytes());
        blk[at + 20..at + 24].copy_from_slice(&status.to_ne_bytes());
        blk[at + 24..at + 26].copy_from_slice(&mac.to_ne_bytes());
        let f = at + usize::from(mac);
        blk[f + 12..f + 14].copy_from_slice(&ethertype.to_be_bytes());
    }

    #[test]
    fn frames_are_told_apart_by_ethertype_and_cut_frames_are_refused() {
        let mut blk = vec![0u8; 4096];
        frame_at(&mut blk, 0, ETH_P_IPV4, 60, 60, libc::TP_STATUS_USER);
        let e = parse_frame(&blk, 0).unwrap();
        assert_eq!((e.kind, e.ethertype, e.start, e.len), (FrameKind::Ip, ETH_P_IPV4, 70, 70));
        frame_at(&mut blk, 0, ETH_P_ARP, 42, 42, libc::TP_STATUS_USER);
        assert_eq!(parse_frame(&blk, 0).unwrap().kind, FrameKind::Other);
        frame_at(&mut blk, 0, ETH_P_8021Q, 64, 64, libc::TP_STATUS_USER);
        assert_eq!(parse_frame(&blk, 0).unwrap().kind, FrameKind::Tagged);
        // A tag stripped by offload makes an IP-looking frame Tagged.
        frame_at(
            &mut blk,
            0,
            ETH_P_IPV6,
            64,
            64,
            libc::TP_STATUS_USER | libc::TP_STATUS_VLAN_VALID,
        );
        assert_eq!(parse_frame(&blk, 0).unwrap().kind, FrameKind::Tagged);
        // Cut short by the ring, shorter than an Ethernet header, beyond the block.
        frame_at(&mut blk, 0, ETH_P_IPV4, 100, 1500, libc::TP_STATUS_USER);
        assert!(parse_frame(&blk, 0).is_none());
        frame_at(&mut blk, 0, ETH_P_IPV4, 13, 13, libc::TP_STATUS_USER);
        assert!(parse_frame(&blk, 0).is_none());
        frame_at(&mut blk, 0, ETH_P_IPV4, 4090, 4090, libc::TP_STATUS_USER);
        assert!(parse_frame(&blk, 0).is_none());
        assert!(parse_frame(&blk, 4090).is_none());
    }

    #[test]
    fn an_unbound_batch_lends_nothing() {
        let mut b = FrameBatch::new(0);
        assert_eq!(b.capacity(), 1);
        assert!(b.is_empty() && b.frame(0).is_none() && b.iter().next().is_none());
        b.drop_frame(3);
        assert!(!b.is_kept(0));
    }
}
