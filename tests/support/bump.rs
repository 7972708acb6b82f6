//! The AF_PACKET front end's test world: client — bump — server namespaces, where the bump
//! holds two veth ends with no address and no kernel bridge, so the only way across is a
//! program reading one interface and writing the other; and a trivial forwarder on
//! `flowgate::dataplane::packet::afpacket` that does so, with a per-frame hook.
//!
//! ```text
//!  client ns                     bump ns                       server ns
//!  eth0 198.18.3.1/24 ─── in0 (no IP)   out0 (no IP) ─── eth0 198.18.3.2/24
//! ```
//!
//! Client and server share one subnet: the bump is invisible at L3 (ARP crosses it).
//! Namespaces are deleted on drop, also when the test panics.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowgate::dataplane::packet::afpacket::{
    AfPacket, AfPacketError, ETH_P_ARP, Frame, FrameBatch, FrameKind, Queue, Side,
};

use super::netns::{Netns, sh};
use super::topology::in_ns;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
/// The bump's interfaces: towards the client (inside), towards the server (outside).
pub const INSIDE: &str = "in0";
pub const OUTSIDE: &str = "out0";

/// The three namespaces of a bump in the wire.
pub struct Bump {
    pub client: Netns,
    pub bump: Netns,
    pub server: Netns,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Bump {
    /// Client and server on one subnet, joined through the bump's two veth ends, which
    /// are up, without addresses or IPv6, and joined by nothing: nothing crosses yet.
    pub fn new() -> Bump {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let client = Netns::new(&format!("afp{n}c"));
        let bump = Netns::new(&format!("afp{n}b"));
        let server = Netns::new(&format!("afp{n}s"));
        let (c, b, s) = (&client.name, &bump.name, &server.name);
        sh(&format!("ip -n {b} link add {INSIDE} type veth peer name eth0 netns {c}"));
        sh(&format!("ip -n {b} link add {OUTSIDE} type veth peer name eth0 netns {s}"));
        bump.exec(&format!(
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 && \
             ip link set {INSIDE} up && ip link set {OUTSIDE} up"
        ));
        for (ns, addr) in [(&client, CLIENT), (&server, SERVER)] {
            ns.exec(&format!(
                "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 && \
                 ip addr add {addr}/24 dev eth0 && ip link set eth0 up"
            ));
        }
        Bump { client, bump, server }
    }

    /// Opens the bump's two interfaces for `workers` workers (inside its namespace).
    pub fn open(&self, workers: usize) -> AfPacket {
        in_ns(&self.bump, || AfPacket::open(INSIDE, OUTSIDE, workers))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Turns checksum and segmentation offloads off on the client's and the server's
    /// `eth0`, so their frames are complete and no larger than the MTU (what a forwarder
    /// without the virtio-net header needs).
    pub fn offloads_off(&self) {
        for ns in [&self.client, &self.server] {
            in_ns(ns, || {
                // ETHTOOL_STXCSUM, ETHTOOL_SSG, ETHTOOL_STSO, ETHTOOL_SGSO, ETHTOOL_SGRO.
                for cmd in [0x17u32, 0x19, 0x1f, 0x24, 0x2c] {
                    ethtool_set(ns, "eth0", cmd, 0);
                }
            });
        }
    }
}

/// A legacy `SIOCETHTOOL` set command (`struct ethtool_value`), from a thread inside
/// the interface's namespace; `ip` cannot change offloads and ethtool may be absent.
fn ethtool_set(ns: &Netns, dev: &str, cmd: u32, data: u32) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut v = EthtoolValue { cmd, data };
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket for the ioctl");
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in ifr.ifr_name.iter_mut().zip(dev.as_bytes()) {
        *d = *b as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
    // SAFETY: `ifr` names the device and points at a live ethtool_value for the call.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    assert_eq!(
        rc,
        0,
        "ethtool {cmd:#x} on {dev} in {}: {}",
        ns.name,
        std::io::Error::last_os_error()
    );
}

/// What the hook decides for one frame.
pub enum Action {
    Forward,
    Drop,
    /// Drop it and send this IP packet back out of the interface it came from.
    Reply(Vec<u8>),
}

/// A per-frame decision of the test forwarder (a stand-in for the filter).
pub type Hook = fn(&Frame<'_>) -> Action;

/// Forwards everything.
pub fn forward_all(_: &Frame<'_>) -> Action {
    Action::Forward
}

/// What the forwarder saw, readable while it runs.
#[derive(Default)]
pub struct Seen {
    /// Frames read on the inside and on the outside.
    pub inside: AtomicU64,
    pub outside: AtomicU64,
    pub ip: AtomicU64,
    pub arp: AtomicU64,
    pub tagged: AtomicU64,
    pub other: AtomicU64,
    /// Frames carrying a GSO super-packet, and frames over 1514 bytes.
    pub gso: AtomicU64,
    pub over_mtu: AtomicU64,
    /// Ethernet bytes read.
    pub bytes: AtomicU64,
    /// ICMPv4 echo requests client → server and replies back.
    pub echo_requests: AtomicU64,
    pub echo_replies: AtomicU64,
    /// Frames forwarded, and refused by the kernel on the way out.
    pub sent: AtomicU64,
    pub send_failed: AtomicU64,
    pub replies: AtomicU64,
    /// Frames read whose source MAC is [`Seen::record_src`], byte for byte.
    pub recorded: Mutex<Vec<Vec<u8>>>,
    pub record_src: Mutex<Option<[u8; 6]>>,
    /// Which workers read frames.
    pub per_worker: Mutex<Vec<u64>>,
}

impl Seen {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn note(&self, f: &Frame<'_>) {
        let add = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        add(match f.side {
            Side::Inside => &self.inside,
            Side::Outside => &self.outside,
        });
        self.bytes.fetch_add(f.frame.len() as u64, Ordering::Relaxed);
        if f.vnet.is_gso() {
            add(&self.gso);
        }
        if f.frame.len() > 1514 {
            add(&self.over_mtu);
        }
        match f.kind {
            FrameKind::Ip => add(&self.ip),
            FrameKind::Tagged => add(&self.tagged),
            FrameKind::Other if f.ethertype == ETH_P_ARP => add(&self.arp),
            FrameKind::Other => add(&self.other),
        }
        if let Some(src) = *self.record_src.lock().unwrap()
            && f.frame.get(6..12) == Some(&src[..])
        {
            self.recorded.lock().unwrap().push(f.frame.to_vec());
        }
        let ip = f.ip;
        if ip.len() >= 28 && ip[0] >> 4 == 4 && ip[9] == 1 {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let (src, dst) = (&ip[12..16], &ip[16..20]);
            match ip.get(ihl) {
                Some(8) if src == CLIENT.octets() && dst == SERVER.octets() => {
                    add(&self.echo_requests)
                }
                Some(0) if src == SERVER.octets() && dst == CLIENT.octets() => {
                    add(&self.echo_replies)
                }
                _ => {}
            }
        }
    }
}

/// The test forwarder: one thread per queue, waking on its rings, reading a burst,
/// asking the hook about each frame and forwarding the kept ones. Stops when finished,
/// dropped, or at `limit`.
pub struct Forwarder {
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<(), AfPacketError>>>,
}

impl Forwarder {
    pub fn start(queues: Vec<Queue>, limit: Duration, hook: Hook) -> Forwarder {
        Forwarder::start_with(queues, limit, hook, Arc::new(Seen::default()))
    }

    pub fn start_with(
        queues: Vec<Queue>,
        limit: Duration,
        hook: Hook,
        seen: Arc<Seen>,
    ) -> Forwarder {
        seen.per_worker.lock().unwrap().resize(queues.len(), 0);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = queues
            .into_iter()
            .map(|mut q| {
                let (seen, stop) = (seen.clone(), stop.clone());
                std::thread::spawn(move || forward(&mut q, &seen, &stop, limit, hook))
            })
            .collect();
        Forwarder { seen, stop, threads }
    }

    /// Stops the threads and returns the first error one of them ended with.
    pub fn finish(mut self) -> Result<Arc<Seen>, AfPacketError> {
        self.stop.store(true, Ordering::Relaxed);
        let mut result = Ok(());
        for t in self.threads.drain(..) {
            let r = t.join().expect("forwarder thread does not panic");
            if result.is_ok() {
                result = r;
            }
        }
        result.map(|()| self.seen.clone())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn forward(
    q: &mut Queue,
    seen: &Seen,
    stop: &AtomicBool,
    limit: Duration,
    hook: Hook,
) -> Result<(), AfPacketError> {
    let end = Instant::now() + limit;
    let mut batch = FrameBatch::new(64);
    let mut replies: Vec<(usize, Vec<u8>)> = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        if !q.wait_readable(Duration::from_millis(20))? {
            continue;
        }
        let n = q.recv_batch(&mut batch);
        if n == 0 {
            continue;
        }
        seen.per_worker.lock().unwrap()[q.index()] += n as u64;
        replies.clear();
        for i in 0..n {
            let Some(f) = batch.frame(i) else { continue };
            seen.note(&f);
            match hook(&f) {
                Action::Forward => {}
                Action::Drop => batch.drop_frame(i),
                Action::Reply(ip) => {
                    batch.drop_frame(i);
                    replies.push((i, ip));
                }
            }
        }
        for (i, ip) in &replies {
            if q.reply(&batch, *i, ip)? {
                seen.replies.fetch_add(1, Ordering::Relaxed);
            }
        }
        let sent = q.forward(&batch)?;
        seen.sent.fetch_add(sent.sent as u64, Ordering::Relaxed);
        seen.send_failed.fetch_add(sent.failed as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Sends `count` ICMP echo requests from the client to the server; how many were answered.
pub fn ping(b: &Bump, count: u16) -> u16 {
    super::topology::ping(&b.client, SERVER, count)
}
