//! The AF_PACKET front end's device layer end to end: client — bump — server namespaces
//! where the bump's two interfaces have no address and no bridge, and a trivial forwarder
//! on `flowgate::dataplane::packet::afpacket` (read a burst from the rings, forward the
//! kept frames out of the other interface) is the only way across.
//!
//! - ARP and ICMP echo cross, and the forwarder saw them: the path runs through the rings.
//! - A 64 MiB TCP transfer completes byte for byte with the hosts' offloads on: the
//!   forwarder read super-frames with a GSO virtio-net header and forwarded them as read.
//! - Malformed frames written raw on the client's wire arrive at the bump byte for byte
//!   (what the packet filter's malformed-packet tests rely on), tagged frames are told
//!   apart, nothing panics, and the bump keeps forwarding.
//! - A reply sent back out of the interface a frame came from reaches its sender, with
//!   the MACs swapped.
//! - Two workers share each interface through the fanout group.
//!
//! Needs root; skipped, saying so, otherwise (in CI: fails).

mod support;

use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate::dataplane::packet::afpacket::{AfPacket, AfPacketError, Frame, FrameKind};
use support::bump::{self, Action, Bump, CLIENT, Forwarder, SERVER, Seen};
use support::require::{Need, skip_unless};
use support::topology::{self, in_ns};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn arp_ping_and_tcp_cross_the_bump_as_super_frames() {
    if skip_unless(&[Need::Root]) {
        return;
    }
    let b = Bump::new();
    // Nothing crosses before the forwarder runs: the bump has no bridge.
    assert_eq!(bump::ping(&b, 1), 0, "the bump forwards nothing by itself");
    let afp = b.open(1);
    let fwd = Forwarder::start(afp.into_queues(), LIMIT, bump::forward_all);

    assert_eq!(bump::ping(&b, 5), 5, "echo through the bump");
    let seen = fwd.seen.clone();
    assert!(Seen::get(&seen.arp) >= 2, "ARP request and reply crossed: {}", Seen::get(&seen.arp));
    assert!(Seen::get(&seen.echo_requests) >= 5 && Seen::get(&seen.echo_replies) >= 5);

    const BYTES: u64 = 64 << 20;
    let got = topology::tcp_transfer_between(&b.client, &b.server, SERVER, BYTES, LIMIT / 2);
    assert_eq!(got, BYTES);
    let seen = fwd.finish().unwrap_or_else(|e| panic!("forwarder: {e}"));
    assert!(Seen::get(&seen.bytes) > BYTES, "the transfer went through the bump");
    assert!(Seen::get(&seen.inside) > 0 && Seen::get(&seen.outside) > 0);
    assert!(
        Seen::get(&seen.gso) > 0 && Seen::get(&seen.over_mtu) > 0,
        "super-frames: {} GSO, {} over 1514 bytes",
        Seen::get(&seen.gso),
        Seen::get(&seen.over_mtu)
    );
    assert_eq!(Seen::get(&seen.send_failed), 0, "every frame was taken on the way out");
    assert_eq!(Seen::get(&seen.tagged) + Seen::get(&seen.other), 0, "only IP and ARP here");
    eprintln!(
        "forwarder: {} in, {} out, {} ip, {} arp, {} GSO, {} MB",
        Seen::get(&seen.inside),
        Seen::get(&seen.outside),
        Seen::get(&seen.ip),
        Seen::get(&seen.arp),
        Seen::get(&seen.gso),
        Seen::get(&seen.bytes) >> 20
    );
}

/// An AF_PACKET socket bound to `dev` in the calling thread's namespace.
fn raw_socket(dev: &str) -> OwnedFd {
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ALL as u16).to_be()))
    };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "{dev}");
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: a valid sockaddr_ll of the length passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

fn send_raw(fd: &OwnedFd, frame: &[u8]) -> std::io::Result<()> {
    // SAFETY: a live buffer of the length passed.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

const MARK: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MARK);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn malformed_frames_arrive_intact_and_the_bump_keeps_forwarding() {
    if skip_unless(&[Need::Root]) {
        return;
    }
    let b = Bump::new();
    let fwd = Forwarder::start(b.open(1).into_queues(), LIMIT, bump::forward_all);
    *fwd.seen.record_src.lock().unwrap() = Some(MARK);

    let mut ipv4 = vec![0x45, 0, 0, 40, 0, 1, 0, 0, 64, 6, 0, 0];
    ipv4.extend_from_slice(&CLIENT.octets());
    ipv4.extend_from_slice(&SERVER.octets());
    ipv4.extend_from_slice(&[0u8; 20]);
    let mut ihl_small = ipv4.clone();
    ihl_small[0] = 0x41;
    let mut too_long = ipv4.clone();
    too_long[2..4].copy_from_slice(&9000u16.to_be_bytes());
    // IPv6 whose hop-by-hop headers chain to one another past any bound.
    let mut endless6 = vec![0x60, 0, 0, 0, 0, 240, 0, 64];
    endless6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    endless6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    for _ in 0..30 {
        endless6.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let garbage: Vec<u8> = (0..200)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let frames = vec![
        eth(0x0800, &[]),             // an Ethernet header and nothing else
        eth(0x0800, &ipv4[..10]),     // a truncated IPv4 header
        eth(0x0800, &ihl_small),      // IHL < 5
        eth(0x0800, &too_long),       // total length beyond the frame
        eth(0x86dd, &endless6[..20]), // a truncated IPv6 header
        eth(0x86dd, &endless6),       // an endless extension-header chain
        eth(0x0800, &garbage),        // garbage behind an IPv4 ethertype
        eth(0x1234, &garbage[..50]),  // an unknown ethertype
    ];
    in_ns(&b.client, || {
        let s = raw_socket("eth0");
        for f in &frames {
            send_raw(&s, f).unwrap_or_else(|e| panic!("{} bytes: {e}", f.len()));
        }
        // An 802.1Q-tagged IPv4 frame.
        let mut tagged = eth(0x8100, &[0, 100, 0x08, 0x00]);
        tagged.extend_from_slice(&ipv4);
        send_raw(&s, &tagged).unwrap();
    });
    let end = Instant::now() + Duration::from_secs(10);
    while fwd.seen.recorded.lock().unwrap().len() < frames.len() + 1 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(bump::ping(&b, 3), 3, "still forwarding");
    let seen = fwd.finish().unwrap_or_else(|e| panic!("forwarder: {e}"));
    let recorded = seen.recorded.lock().unwrap();
    for f in &frames {
        assert!(recorded.contains(f), "frame of {} bytes arrived intact: {f:02x?}", f.len());
    }
    assert_eq!(Seen::get(&seen.tagged), 1, "the tagged frame is told apart");
    assert!(Seen::get(&seen.other) >= 1, "the unknown ethertype");
}

/// Answers a UDP datagram to port 9 with an IPv4 packet (protocol 253) from its
/// destination back to its source, and drops it.
fn reject_discard(f: &Frame<'_>) -> Action {
    let ip = f.ip;
    if f.kind != FrameKind::Ip || ip.len() < 28 || ip[0] != 0x45 || ip[9] != 17 {
        return Action::Forward;
    }
    if ip[22..24] != 9u16.to_be_bytes() {
        return Action::Forward;
    }
    let mut reply = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 253, 0, 0];
    reply.extend_from_slice(&ip[16..20]);
    reply.extend_from_slice(&ip[12..16]);
    reply.extend_from_slice(b"rejected");
    let sum = checksum(&reply[..20]);
    reply[10..12].copy_from_slice(&sum.to_be_bytes());
    Action::Reply(reply)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn a_reply_goes_back_to_the_sender_with_the_macs_swapped() {
    if skip_unless(&[Need::Root]) {
        return;
    }
    let b = Bump::new();
    let fwd = Forwarder::start(b.open(1).into_queues(), LIMIT, reject_discard);
    assert_eq!(bump::ping(&b, 1), 1, "ARP resolved through the bump");
    // `ip netns exec` mounts the namespace's own /sys.
    let out = topology::output_in(&b.client, "cat /sys/class/net/eth0/address");
    let client_mac = String::from_utf8(out.stdout).unwrap();
    let frame = in_ns(&b.client, || {
        let raw = raw_socket("eth0");
        let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        // SAFETY: a live timeval of the size passed.
        unsafe {
            libc::setsockopt(
                raw.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let u = UdpSocket::bind(SocketAddrV4::new(CLIENT, 0)).unwrap();
        u.send_to(b"to be rejected", SocketAddrV4::new(SERVER, 9)).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            // SAFETY: a live buffer of the length passed.
            let n = unsafe { libc::recv(raw.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 34 && buf[12..14] == [0x08, 0x00] && buf[14 + 9] == 253 {
                return buf[..n as usize].to_vec();
            }
        }
        panic!("no reply within 5 s");
    });
    let seen = fwd.finish().unwrap_or_else(|e| panic!("forwarder: {e}"));
    assert_eq!(Seen::get(&seen.replies), 1);
    let mac: Vec<u8> =
        client_mac.trim().split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    assert_eq!(frame[0..6], mac[..], "to the client's MAC");
    assert_ne!(frame[6..12], mac[..], "from the MAC the client had sent to");
    assert_eq!(&frame[14 + 20..14 + 28], b"rejected");
    assert_eq!(frame[14 + 12..14 + 16], SERVER.octets());
}

#[test]
fn two_workers_share_each_interface_through_fanout() {
    if skip_unless(&[Need::Root]) {
        return;
    }
    let b = Bump::new();
    let afp = b.open(2);
    assert_eq!(afp.queues().len(), 2);
    let fwd = Forwarder::start(afp.into_queues(), LIMIT, bump::forward_all);
    assert_eq!(bump::ping(&b, 1), 1);
    // 32 UDP flows (different source ports): the hash spreads them over both workers.
    let received = std::thread::scope(|s| {
        let server = s.spawn(|| {
            in_ns(&b.server, || {
                let u = UdpSocket::bind(SocketAddrV4::new(SERVER, 5000)).unwrap();
                u.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                let mut n = 0;
                let mut buf = [0u8; 64];
                while u.recv(&mut buf).is_ok() {
                    n += 1;
                }
                n
            })
        });
        std::thread::sleep(Duration::from_millis(100));
        in_ns(&b.client, || {
            for _ in 0..32 {
                let u = UdpSocket::bind(SocketAddrV4::new(CLIENT, 0)).unwrap();
                u.send_to(b"flow", SocketAddrV4::new(SERVER, 5000)).unwrap();
            }
        });
        server.join().unwrap()
    });
    assert_eq!(received, 32);
    let got = topology::tcp_transfer_between(&b.client, &b.server, SERVER, 8 << 20, LIMIT / 2);
    assert_eq!(got, 8 << 20);
    let seen: Arc<Seen> = fwd.finish().unwrap_or_else(|e| panic!("forwarder: {e}"));
    let per = seen.per_worker.lock().unwrap().clone();
    assert!(per.iter().all(|&n| n > 0), "both workers read frames: {per:?}");
}

#[test]
fn missing_interfaces_are_named_errors() {
    if skip_unless(&[Need::Root]) {
        return;
    }
    let b = Bump::new();
    let err = in_ns(&b.bump, || AfPacket::open(bump::INSIDE, "nosuch0", 1))
        .expect_err("no such interface");
    assert!(matches!(err, AfPacketError::Sys { .. }), "{err}");
    assert!(err.to_string().contains("nosuch0"), "{err}");
}
