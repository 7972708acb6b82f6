//! The TUN front end's device layer: a multi-queue TUN device with offloads, read and
//! written in batches through buffers the caller owns.
//!
//! Responsible for: opening (or creating) the device by name, one non-blocking fd per
//! queue; turning on the virtio-net header and the offloads (checksum, TSO4/TSO6, USO
//! where the kernel has it) so one read carries a GSO super-packet of up to 64 KiB; reading
//! a bounded burst per wake-up into a [`Batch`] allocated once per worker; parsing the
//! [`VnetHdr`] in front of each packet; and writing the kept packets back *byte for byte*,
//! header included. Not here: parsing the IP packet (`classify`), deciding (`admit`),
//! answering denials (`reject`), the worker loop and its wake-ups (`worker`).
//!
//! # Why offloads are not optional
//! Without `IFF_VNET_HDR` + `TUNSETOFFLOAD` the kernel segments every TCP super-packet to
//! MTU-sized packets before it reaches the TUN, and the loop pays two syscalls per 1500
//! bytes (≈0.07× the kernel's forwarding rate on the development machine; with offloads
//! ≈0.7× — `loadtest/tun_forward.rs` measures both). With offloads the kernel hands over
//! the super-packet as the sender's TCP stack built it, with a header saying how to segment
//! it and where its checksum goes. A verdict is per flow, so every segment of a
//! super-packet shares it: an allowed super-packet is written back unchanged — same header,
//! same bytes — and the kernel segments (or passes on to a GSO-capable device) on the way
//! out. Nothing here ever splits a packet.
//!
//! # Routing a user must set up
//! The kernel decides what enters the TUN; flowgate only sees what is routed to it. On the
//! gateway, with the client side on `veth-c` and the server side on `veth-s` (any
//! interfaces: one rule per interface whose traffic is filtered):
//!
//! ```text
//! sysctl -w net.ipv4.ip_forward=1                       # and net.ipv6.conf.all.forwarding=1
//! ip link set fg0 up                                    # after flowgate created the TUN
//! ip route add default dev fg0 table 100                # the filter table: everything to the TUN
//! ip rule add iif veth-c lookup 100 pref 100            # forwarded traffic from the client side…
//! ip rule add iif veth-s lookup 100 pref 101            # …and from the server side, into the TUN
//! sysctl -w net.ipv4.conf.fg0.rp_filter=0 net.ipv4.conf.all.rp_filter=0
//! ```
//!
//! A packet written back into the TUN arrives with `iif fg0`, matches neither rule and is
//! routed on by the main table, out of the interface its destination is on. Replies come
//! in on the other veth and enter the TUN by the other rule, so both directions of a flow
//! pass the filter. Traffic to the gateway's own addresses never enters the TUN: the
//! `local` table's rule (preference 0) is looked up before these, so it is delivered
//! locally, unfiltered — protect the gateway itself by other means. `rp_filter` must be off
//! (or loose) on the TUN: the sources of what it writes back are other hosts', reached
//! through the veths. `tests/support/topology.rs` (`Topology::route_through`) runs this
//! recipe. The same recipe with `ip -6` and `net.ipv6` applies to
//! IPv6.
//!
//! # Wire format
//! Each frame read or written is a 10-byte `struct virtio_net_hdr` (little-endian: the
//! device is put in LE mode with `TUNSETVNETLE`) followed by the IP packet; without
//! offloads ([`Offloads::Off`]) there is no header and a frame is just the IP packet.
//! [`VnetHdr::parse`] checks the length once and reads the fields in place.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use thiserror::Error;

use super::lent::{self, Lent};

/// Length of `struct virtio_net_hdr` (without `num_buffers`), the header in front of
/// every frame when offloads are on.
pub const VNET_HDR_LEN: usize = 10;

/// The largest packet a read can carry: a GSO super-packet is at most 64 KiB
/// (`GSO_LEGACY_MAX_SIZE`, the TUN's default `gso_max_size`).
pub const MAX_PACKET: usize = 65_536;

/// Bytes per batch slot: header, the largest packet, and one byte to detect a frame that
/// did not fit (a read that fills the slot is dropped as truncated, never forwarded cut).
const SLOT_LEN: usize = VNET_HDR_LEN + MAX_PACKET + 1;

/// How often a read or write interrupted by a signal is retried before giving up.
const EINTR_RETRIES: usize = 8;

/// `virtio_net_hdr.flags`: the checksum still has to be computed (from `csum_start`, stored
/// at `csum_start + csum_offset`).
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags`: the checksum was verified.
pub const VNET_F_DATA_VALID: u8 = 2;

/// What kind of GSO super-packet a frame is (`virtio_net_hdr.gso_type`, without the ECN
/// bit, which [`VnetHdr::gso_ecn`] reports). Unknown values are kept, not rejected: the
/// header is written back as read, and the kernel is the judge of what it sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoType {
    /// An ordinary packet.
    None,
    TcpV4,
    Udp,
    TcpV6,
    /// UDP segmentation offload (USO), IPv4 or IPv6.
    UdpL4,
    Unknown(u8),
}

impl GsoType {
    const ECN: u8 = 0x80;

    fn from_wire(v: u8) -> GsoType {
        match v & !Self::ECN {
            0 => GsoType::None,
            1 => GsoType::TcpV4,
            3 => GsoType::Udp,
            4 => GsoType::TcpV6,
            5 => GsoType::UdpL4,
            n => GsoType::Unknown(n),
        }
    }

    fn to_wire(self) -> u8 {
        match self {
            GsoType::None => 0,
            GsoType::TcpV4 => 1,
            GsoType::Udp => 3,
            GsoType::TcpV6 => 4,
            GsoType::UdpL4 => 5,
            GsoType::Unknown(n) => n,
        }
    }
}

/// The virtio-net header in front of a frame: how the kernel wants the packet segmented
/// and checksummed. Read from the frame, never needed to write it back (the header bytes
/// are forwarded as they are); used to account for super-packets and by code that builds
/// frames of its own (an RST or ICMP reply carries [`VnetHdr::NONE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: GsoType,
    /// The ECN bit of `gso_type` (the super-packet carries CWR and must be segmented with
    /// it).
    pub gso_ecn: bool,
    /// Length of the headers (IP + L4) every segment repeats.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The header of an ordinary packet with a complete checksum.
    pub const NONE: VnetHdr = VnetHdr {
        flags: 0,
        gso_type: GsoType::None,
        gso_ecn: false,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Parses the header at the start of `frame`.
    ///
    /// # Errors
    /// [`ShortFrame`] when `frame` is shorter than [`VNET_HDR_LEN`].
    pub fn parse(frame: &[u8]) -> Result<VnetHdr, ShortFrame> {
        let Some(h) = frame.first_chunk::<VNET_HDR_LEN>() else {
            return Err(ShortFrame { len: frame.len() });
        };
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Ok(VnetHdr {
            flags: h[0],
            gso_type: GsoType::from_wire(h[1]),
            gso_ecn: h[1] & GsoType::ECN != 0,
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out`; returns how many
    /// bytes it wrote.
    ///
    /// # Errors
    /// [`ShortFrame`] when `out` is shorter than [`VNET_HDR_LEN`].
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, ShortFrame> {
        let len = out.len();
        let Some(h) = out.first_chunk_mut::<VNET_HDR_LEN>() else {
            return Err(ShortFrame { len });
        };
        h[0] = self.flags;
        h[1] = self.gso_type.to_wire() | if self.gso_ecn { GsoType::ECN } else { 0 };
        h[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        Ok(VNET_HDR_LEN)
    }

    /// Whether this frame is a GSO super-packet (the kernel will cut it into segments of
    /// `gso_size`).
    pub fn is_gso(&self) -> bool {
        self.gso_type != GsoType::None
    }
}

/// A frame too short to hold a virtio-net header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("frame of {len} bytes is shorter than the {VNET_HDR_LEN}-byte virtio-net header")]
pub struct ShortFrame {
    pub len: usize,
}

/// Whether the device carries the virtio-net header and offloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offloads {
    /// `IFF_VNET_HDR` with checksum, TSO4/TSO6 (+ECN) and, where the kernel has it, USO:
    /// reads carry super-packets. The mode to run in.
    On,
    /// A plain TUN: one MTU-sized packet per read, no header. For measurement only (it is
    /// an order of magnitude slower for TCP).
    Off,
}

/// What the device ended up with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadSet {
    /// The virtio-net header is on (frames start with it).
    pub vnet_hdr: bool,
    /// `TUN_F_*` bits the kernel accepted.
    pub flags: u32,
    /// UDP segmentation offload (`TUN_F_USO4 | TUN_F_USO6`) is on: the kernel knew it.
    pub uso: bool,
}

/// The step of opening or using a device that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `open("/dev/net/tun")`.
    Open,
    /// `TUNSETIFF` (create or attach a queue).
    SetIff,
    /// `TUNSETVNETHDRSZ`.
    SetVnetHdrSz,
    /// `TUNSETVNETLE`.
    SetVnetLe,
    /// `TUNSETOFFLOAD`.
    SetOffload,
    /// `read` of a queue.
    Read,
    /// `write` of a queue.
    Write,
    /// `poll` of a queue.
    Poll,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Open => "open /dev/net/tun",
            Step::SetIff => "TUNSETIFF",
            Step::SetVnetHdrSz => "TUNSETVNETHDRSZ",
            Step::SetVnetLe => "TUNSETVNETLE",
            Step::SetOffload => "TUNSETOFFLOAD",
            Step::Read => "read",
            Step::Write => "write",
            Step::Poll => "poll",
        })
    }
}

/// A TUN device error, naming the device and the step.
#[derive(Debug, Error)]
pub enum TunError {
    /// The name is empty, too long for `IFNAMSIZ` or holds a NUL.
    #[error("TUN device name {name:?} is invalid: {why}")]
    Name { name: String, why: &'static str },
    /// A multi-queue device needs at least one queue.
    #[error("TUN device {dev}: zero queues requested")]
    NoQueues { dev: String },
    /// A system call failed.
    #[error("TUN device {dev}, queue {queue}: {step} failed: {source}")]
    Sys {
        dev: String,
        queue: usize,
        step: Step,
        #[source]
        source: io::Error,
    },
    /// A frame to write is too short for the device's header (or empty).
    #[error("TUN device {dev}: frame of {len} bytes refused (needs more than {need} bytes)")]
    ShortWrite { dev: String, len: usize, need: usize },
    /// The kernel took fewer bytes than the frame held.
    #[error("TUN device {dev}: wrote {wrote} of {len} bytes")]
    PartialWrite { dev: String, wrote: usize, len: usize },
}

impl TunError {
    /// The OS error behind a failed system call, if that is what this is.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            TunError::Sys { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A multi-queue TUN device: one [`Queue`] per worker. Dropping every queue detaches them;
/// the device itself disappears with its last queue (it is not made persistent).
#[derive(Debug)]
pub struct Tun {
    name: String,
    queues: Vec<Queue>,
    offloads: OffloadSet,
}

impl Tun {
    /// Creates the TUN device `name` (or attaches to an existing multi-queue one of that
    /// name) with `queues` queues, each a non-blocking fd, and sets up `offloads`. The
    /// device is left down: bringing it up and routing into it is the host's part (see the
    /// module docs).
    ///
    /// # Errors
    /// [`TunError::Name`] for a name the kernel cannot take, [`TunError::NoQueues`] for
    /// `queues == 0`, [`TunError::Sys`] naming the failing step otherwise (`EPERM` without
    /// `CAP_NET_ADMIN`, `EINVAL` when a device of that name exists with other flags).
    pub fn open(name: &str, queues: usize, offloads: Offloads) -> Result<Tun, TunError> {
        let cname = check_name(name)?;
        if queues == 0 {
            return Err(TunError::NoQueues { dev: name.to_string() });
        }
        let vnet = offloads == Offloads::On;
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE;
        if vnet {
            flags |= libc::IFF_VNET_HDR;
        }
        let mut opened = Vec::with_capacity(queues);
        for q in 0..queues {
            let fd = open_queue(name, q, &cname, flags)?;
            opened.push(Queue {
                fd,
                dev: name.to_string(),
                index: q,
                hdr_len: if vnet { VNET_HDR_LEN } else { 0 },
            });
        }
        // The header size, endianness and offloads belong to the device, not the queue:
        // set once, through the first queue.
        let set = match opened.first() {
            Some(first) if vnet => first.enable_offloads()?,
            _ => OffloadSet { vnet_hdr: false, flags: 0, uso: false },
        };
        Ok(Tun { name: name.to_string(), queues: opened, offloads: set })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the kernel accepted.
    pub fn offloads(&self) -> OffloadSet {
        self.offloads
    }

    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Hands the queues out, one per worker thread.
    pub fn into_queues(self) -> Vec<Queue> {
        self.queues
    }
}

/// Checks that `name` fits `ifr_name` and turns it into a C string.
fn check_name(name: &str) -> Result<CString, TunError> {
    interface_name(name).map_err(|why| TunError::Name { name: name.to_string(), why })
}

/// An interface name as the kernel takes it (`ifr_name`, `sll_ifindex` lookups), or why
/// it is not one; both front ends check their device names with it.
pub(super) fn interface_name(name: &str) -> Result<CString, &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err("longer than 15 bytes (IFNAMSIZ)");
    }
    if name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err("holds '/' or whitespace");
    }
    CString::new(name).map_err(|_| "holds a NUL byte")
}

/// Opens `/dev/net/tun` and attaches it as one queue of `name`.
fn open_queue(name: &str, q: usize, cname: &CString, flags: i32) -> Result<OwnedFd, TunError> {
    let sys = |step| move |source| TunError::Sys { dev: name.to_string(), queue: q, step, source };
    // SAFETY: the path is a NUL-terminated literal; open has no other preconditions.
    let raw = unsafe {
        libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC)
    };
    if raw < 0 {
        return Err(sys(Step::Open)(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a freshly opened fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value (empty name, zero flags).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // The flag set fits in a c_short (the highest, IFF_VNET_HDR, is 0x4000).
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: `fd` is an open /dev/net/tun fd and `ifr` a valid, initialised ifreq that
    // lives across the call; TUNSETIFF reads it and writes the final name back into it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc < 0 {
        return Err(sys(Step::SetIff)(io::Error::last_os_error()));
    }
    Ok(fd)
}

/// One queue of a TUN device: a non-blocking fd a single worker reads and writes.
#[derive(Debug)]
pub struct Queue {
    fd: OwnedFd,
    dev: String,
    index: usize,
    /// Bytes of virtio-net header in front of every frame (0 or [`VNET_HDR_LEN`]).
    hdr_len: usize,
}

impl Queue {
    fn sys(&self, step: Step, source: io::Error) -> TunError {
        TunError::Sys { dev: self.dev.clone(), queue: self.index, step, source }
    }

    /// Sets the header size, little-endian headers and the offloads, probing USO: a kernel
    /// that does not know `TUN_F_USO*` refuses the whole set with `EINVAL`, so it is tried
    /// first and dropped on refusal.
    fn enable_offloads(&self) -> Result<OffloadSet, TunError> {
        let fd = self.fd.as_raw_fd();
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: `fd` is an attached TUN queue; TUNSETVNETHDRSZ reads one c_int through
        // the pointer, which points at a live local.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(self.sys(Step::SetVnetHdrSz, io::Error::last_os_error()));
        }
        let le: libc::c_int = 1;
        // SAFETY: as above; TUNSETVNETLE reads one c_int.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETLE, &le) } < 0 {
            return Err(self.sys(Step::SetVnetLe, io::Error::last_os_error()));
        }
        let base = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        let with_uso = base | libc::TUN_F_USO4 | libc::TUN_F_USO6;
        let set_offload = |flags: libc::c_uint| {
            // SAFETY: `fd` is an attached TUN queue; TUNSETOFFLOAD takes its argument by
            // value (an unsigned long of TUN_F_* bits), no pointer is passed.
            let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
            if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
        };
        match set_offload(with_uso) {
            Ok(()) => Ok(OffloadSet { vnet_hdr: true, flags: with_uso, uso: true }),
            // A kernel older than 6.2 does not know TUN_F_USO* and refuses the whole set.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match set_offload(base) {
                Ok(()) => Ok(OffloadSet { vnet_hdr: true, flags: base, uso: false }),
                Err(e) => Err(self.sys(Step::SetOffload, e)),
            },
            Err(e) => Err(self.sys(Step::SetOffload, e)),
        }
    }

    /// The device's name.
    pub fn dev(&self) -> &str {
        &self.dev
    }

    /// This queue's index within the device.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Bytes of header in front of each frame: [`VNET_HDR_LEN`] with offloads, else 0.
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }

    /// Reads frames into `batch` until the queue is empty (`EAGAIN`) or the batch is full —
    /// a bounded burst per wake-up, since TUN has no `recvmmsg`. The batch is cleared
    /// first; returns how many frames it now holds. A frame that filled its slot (larger
    /// than [`MAX_PACKET`]) or holds no packet after its header is dropped and counted in
    /// [`Batch::dropped`].
    ///
    /// # Errors
    /// [`TunError::Sys`] (step `Read`) when the first read fails with anything but
    /// `EAGAIN`; an error after some frames were read ends the burst early and returns
    /// those frames (the next call sees the error again).
    pub fn recv_batch(&self, batch: &mut Batch) -> Result<usize, TunError> {
        batch.clear(self.hdr_len);
        let fd = self.fd.as_raw_fd();
        let cap = batch.slots.len();
        let mut retries = 0;
        // Bounded work per wake-up even when reads do not fill slots (dropped frames,
        // signals): at most two reads per slot.
        for _ in 0..cap * 2 {
            if batch.lent.is_full() {
                break;
            }
            let slot = &mut batch.slots[batch.lent.len()];
            // SAFETY: `slot` is a live, exclusively borrowed buffer of `slot.len()` bytes;
            // read writes at most that many bytes into it.
            let n = unsafe { libc::read(fd, slot.as_mut_ptr().cast(), slot.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted if retries < EINTR_RETRIES => {
                        retries += 1;
                        continue;
                    }
                    _ if !batch.lent.is_empty() => break,
                    _ => return Err(self.sys(Step::Read, err)),
                }
            }
            // n >= 0 here, and at most slot.len().
            let n = n.unsigned_abs();
            if n >= slot.len() || n <= self.hdr_len {
                batch.lent.refuse();
                continue;
            }
            let i = batch.lent.push();
            batch.lens[i] = n;
        }
        Ok(batch.lent.len())
    }

    /// Writes back every frame of `batch` still marked kept (see [`Batch::drop_packet`]),
    /// each exactly as read, header included. Stops at the first failure.
    ///
    /// # Errors
    /// What [`Queue::send_frame`] returns for the frame that failed; the frames before it
    /// were written. A full queue (`EAGAIN`: the kernel's backlog is full) is such an error;
    /// the caller counts it as a drop.
    pub fn send_batch(&self, batch: &Batch) -> Result<usize, TunError> {
        let mut sent = 0;
        for i in 0..batch.len() {
            if batch.is_kept(i) {
                self.send_frame(&batch.slots[i][..batch.lens[i]])?;
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Writes one frame (the header, when offloads are on, then the IP packet). For frames
    /// flowgate builds itself (RST, ICMP) and for tests.
    ///
    /// # Errors
    /// [`TunError::ShortWrite`] for a frame with no packet after its header (nothing is
    /// written); [`TunError::Sys`] (step `Write`) when the kernel refuses it — `EINVAL` for
    /// a header or packet it cannot make sense of, `EAGAIN` when its backlog is full;
    /// [`TunError::PartialWrite`] if it took less than the whole frame.
    pub fn send_frame(&self, frame: &[u8]) -> Result<(), TunError> {
        if frame.len() <= self.hdr_len {
            return Err(TunError::ShortWrite {
                dev: self.dev.clone(),
                len: frame.len(),
                need: self.hdr_len,
            });
        }
        let mut retries = 0;
        loop {
            // SAFETY: `frame` is a live slice of `frame.len()` bytes; write only reads it.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                let n = n.unsigned_abs();
                if n != frame.len() {
                    return Err(TunError::PartialWrite {
                        dev: self.dev.clone(),
                        wrote: n,
                        len: frame.len(),
                    });
                }
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted && retries < EINTR_RETRIES {
                retries += 1;
                continue;
            }
            return Err(self.sys(Step::Write, err));
        }
    }

    /// Waits up to `timeout` for the queue to become readable; `Ok(false)` on timeout. For
    /// a worker without an event loop (and tests); an async worker registers [`AsFd`] with
    /// its reactor instead.
    ///
    /// # Errors
    /// [`TunError::Sys`] (step `Poll`) when poll fails for a reason other than a signal.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool, TunError> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, count 1; poll writes only its `revents`.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(self.sys(Step::Poll, err));
        }
        Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
    }
}

impl AsFd for Queue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Queue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A worker's receive buffers: `capacity` slots of 64 KiB + header, allocated once and
/// lent to [`Queue::recv_batch`] on every wake-up (smoltcp's `RxToken`, quinn's recvmmsg
/// buffers). Each frame is forwarded from its slot in place: [`Queue::send_batch`] writes
/// the kept ones back without copying.
pub struct Batch {
    slots: Box<[Box<[u8]>]>,
    lens: Box<[usize]>,
    hdr_len: usize,
    /// Which slots hold a frame and which are still to be written back: derefs to it.
    lent: Lent,
}

lent::batch_derefs_to_lent!(Batch);

impl Batch {
    /// `capacity` slots (at least one), each big enough for a 64 KiB super-packet: about
    /// 64 KiB of memory per slot. 32–64 slots amortise the wake-up without holding much.
    pub fn new(capacity: usize) -> Batch {
        let capacity = capacity.max(1);
        Batch {
            slots: (0..capacity).map(|_| vec![0u8; SLOT_LEN].into_boxed_slice()).collect(),
            lens: vec![0; capacity].into_boxed_slice(),
            hdr_len: 0,
            lent: Lent::new(capacity),
        }
    }

    fn clear(&mut self, hdr_len: usize) {
        self.lent.reset();
        self.hdr_len = hdr_len;
    }

    /// Frame `i`: its parsed header and the IP packet after it. `None` past [`Batch::len`].
    pub fn packet(&self, i: usize) -> Option<Packet<'_>> {
        if i >= self.len() {
            return None;
        }
        let frame = &self.slots[i][..self.lens[i]];
        let (vnet, bytes) = if self.hdr_len == 0 {
            (VnetHdr::NONE, frame)
        } else {
            // recv_batch lends no frame without a packet after its header; should one
            // appear, it is an empty, ordinary packet, which the classifier drops.
            match (VnetHdr::parse(frame), frame.get(self.hdr_len..)) {
                (Ok(h), Some(rest)) => (h, rest),
                _ => (VnetHdr::NONE, &[][..]),
            }
        };
        Some(Packet { vnet, bytes })
    }

    /// The frames of the batch, in order.
    pub fn iter(&self) -> impl Iterator<Item = Packet<'_>> {
        (0..self.len()).filter_map(|i| self.packet(i))
    }

    /// Marks frame `i` as not to be written back (denied, invalid). No-op past the end.
    pub fn drop_packet(&mut self, i: usize) {
        self.lent.unmark(i);
    }
}

/// One frame of a [`Batch`], borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    /// The virtio-net header ([`VnetHdr::NONE`] without offloads).
    pub vnet: VnetHdr,
    /// The IP packet (a super-packet when `vnet.is_gso()`).
    pub bytes: &'a [u8],
}

#[cfg(test)]
mod tests {
    use super::*;

    // A TCPv4 super-packet header as the kernel writes it: NEEDS_CSUM, gso TCPv4,
    // hdr_len 66, gso_size 1448, csum_start 20, csum_offset 16.
    const TSO4: [u8; 10] = [0x01, 0x01, 66, 0, 0xa8, 0x05, 20, 0, 16, 0];

    #[test]
    fn parses_a_tso_header() {
        let h = VnetHdr::parse(&TSO4).unwrap();
        assert_eq!(
            h,
            VnetHdr {
                flags: VNET_F_NEEDS_CSUM,
                gso_type: GsoType::TcpV4,
                gso_ecn: false,
                hdr_len: 66,
                gso_size: 1448,
                csum_start: 20,
                csum_offset: 16,
            }
        );
        assert!(h.is_gso());
    }

    #[test]
    fn emit_round_trips_including_ecn_and_unknown_types() {
        for wire in [TSO4, [0, 0x84, 0, 0, 0, 0, 0, 0, 0, 0], [2, 0x7e, 1, 2, 3, 4, 5, 6, 7, 8]] {
            let h = VnetHdr::parse(&wire).unwrap();
            let mut out = [0u8; 12];
            assert_eq!(h.emit(&mut out), Ok(VNET_HDR_LEN));
            assert_eq!(out[..10], wire);
        }
        let ecn = VnetHdr::parse(&[0, 0x84, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!((ecn.gso_type, ecn.gso_ecn), (GsoType::TcpV6, true));
        let odd = VnetHdr::parse(&[0, 0x7e, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(odd.gso_type, GsoType::Unknown(0x7e));
    }

    #[test]
    fn short_frames_are_errors() {
        for len in 0..VNET_HDR_LEN {
            assert_eq!(VnetHdr::parse(&TSO4[..len]), Err(ShortFrame { len }));
            let mut out = vec![0u8; len];
            assert_eq!(VnetHdr::NONE.emit(&mut out), Err(ShortFrame { len }));
        }
    }

    #[test]
    fn names_the_kernel_cannot_take_are_refused_before_any_syscall() {
        for bad in ["", "a-name-that-is-too-long", "a/b", "a b", "a\0b"] {
            assert!(matches!(check_name(bad), Err(TunError::Name { .. })), "{bad:?}");
        }
        assert!(check_name("fg0").is_ok());
        assert!(matches!(Tun::open("fg0", 0, Offloads::On), Err(TunError::NoQueues { .. })));
    }

    #[test]
    fn an_empty_batch_lends_nothing() {
        let mut b = Batch::new(0);
        assert_eq!(b.capacity(), 1);
        assert!(b.is_empty() && b.packet(0).is_none() && b.iter().next().is_none());
        b.drop_packet(5);
        assert!(!b.is_kept(0));
    }
}
