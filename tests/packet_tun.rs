//! The TUN front end's device layer end to end: a client — gateway — server topology in
//! network namespaces whose gateway routes everything it forwards into a multi-queue TUN
//! with offloads, and a trivial forwarder on `flowgate::dataplane::packet::tun` (read a batch,
//! write every frame back unchanged) as the only way across.
//!
//! - ICMP echo from the client reaches the server and comes back, and the forwarder saw
//!   each request and reply: the path really runs through the TUN.
//! - A 64 MiB TCP transfer completes byte for byte, and the forwarder read GSO
//!   super-packets — frames of more than 1500 bytes with a parsed TCP GSO header — and
//!   wrote them back as they were.
//! - Frames the kernel cannot take (empty, header only, a nonsense GSO header) are
//!   refused with typed errors, garbage it takes is dropped by the kernel, nothing panics,
//!   and the gateway keeps forwarding.
//!
//! Needs root and /dev/net/tun; skipped, saying so, otherwise (in CI: fails).

mod support;

use std::time::Duration;

use flowgate::dataplane::packet::tun::{
    GsoType, Offloads, Tun, TunError, VNET_F_NEEDS_CSUM, VNET_HDR_LEN, VnetHdr,
};
use support::require::{Need, skip_unless};
use support::topology::{self, Forwarder, SERVER, Seen, Topology};

const TUN: &str = "fg0";
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn ping_and_tcp_pass_through_the_tun_as_gso_super_packets() {
    if skip_unless(&[Need::Root, topology::need_tun()]) {
        return;
    }
    let topo = Topology::kernel();
    let tun = topology::open_tun(&topo.gateway, TUN, 2, Offloads::On);
    let offloads = tun.offloads();
    assert!(offloads.vnet_hdr, "{offloads:?}");
    assert_eq!(tun.queues().len(), 2);
    topo.route_through(TUN);
    let fwd = Forwarder::start(tun.into_queues(), LIMIT);

    assert_eq!(topology::ping(&topo.client, SERVER, 5), 5, "echo through the TUN");
    let seen = fwd.seen.clone();
    assert!(
        Seen::get(&seen.echo_requests) >= 5,
        "requests seen: {}",
        Seen::get(&seen.echo_requests)
    );
    assert!(Seen::get(&seen.echo_replies) >= 5, "replies seen: {}", Seen::get(&seen.echo_replies));

    const BYTES: u64 = 64 << 20;
    assert_eq!(topology::tcp_transfer(&topo, BYTES, Duration::from_secs(30)), BYTES);

    let seen = fwd.finish().unwrap_or_else(|e| panic!("forwarder: {e}"));
    assert!(Seen::get(&seen.bytes) > BYTES, "the transfer went through the TUN");
    assert!(
        Seen::get(&seen.over_mtu) > 0 && Seen::get(&seen.gso_frames) > 0,
        "super-packets: {} over 1500 bytes, {} GSO, largest {}",
        Seen::get(&seen.over_mtu),
        Seen::get(&seen.gso_frames),
        Seen::get(&seen.max_packet)
    );
    eprintln!(
        "forwarder: {} frames, {} bytes, {} GSO, {} over 1500, largest {}; offloads {offloads:?}",
        Seen::get(&seen.frames),
        Seen::get(&seen.bytes),
        Seen::get(&seen.gso_frames),
        Seen::get(&seen.over_mtu),
        Seen::get(&seen.max_packet)
    );
    let (hdr, len) = seen.first_gso.lock().unwrap().expect("a GSO header was recorded");
    eprintln!("first super-packet: {len} bytes, {hdr:?}");
    assert_eq!(hdr.gso_type, GsoType::TcpV4, "{hdr:?}");
    assert_eq!(hdr.flags & VNET_F_NEEDS_CSUM, VNET_F_NEEDS_CSUM, "{hdr:?}");
    // IPv4 (20) + TCP (20 + options) headers; segments no larger than the veth MTU allows.
    assert!((40..=120).contains(&hdr.hdr_len), "{hdr:?}");
    assert!(hdr.gso_size > 0 && usize::from(hdr.gso_size) <= 1500 - 40, "{hdr:?}");
    assert!(
        len > usize::from(hdr.gso_size),
        "a super-packet holds several segments: {len}, {hdr:?}"
    );
    assert_eq!(usize::from(hdr.csum_start), 20, "TCP checksum starts after the IPv4 header");
    assert_eq!(hdr.csum_offset, 16, "TCP checksum field offset");
}

#[test]
fn bad_frames_are_errors_and_the_gateway_keeps_forwarding() {
    if skip_unless(&[Need::Root, topology::need_tun()]) {
        return;
    }
    let topo = Topology::kernel();
    let tun = topology::open_tun(&topo.gateway, TUN, 2, Offloads::On);
    topo.route_through(TUN);
    let mut queues = tun.into_queues();
    let writer = queues.pop().expect("two queues");
    let fwd = Forwarder::start(queues, LIMIT);

    // Nothing, and a header with nothing after it: refused before the syscall.
    for frame in [&[][..], &[0u8; VNET_HDR_LEN][..]] {
        match writer.send_frame(frame) {
            Err(TunError::ShortWrite { dev, len, need }) => {
                assert_eq!((dev.as_str(), len, need), (TUN, frame.len(), VNET_HDR_LEN));
            }
            other => panic!("{} bytes: {other:?}", frame.len()),
        }
    }
    // A packet whose first nibble is no IP version: the kernel says EINVAL.
    let mut frame = [0u8; VNET_HDR_LEN + 40];
    VnetHdr::NONE.emit(&mut frame).unwrap();
    frame[VNET_HDR_LEN] = 0x00;
    let err = writer.send_frame(&frame).expect_err("version 0");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    assert!(err.to_string().contains(TUN) && err.to_string().contains("write"), "{err}");
    // A header that claims TCP segmentation of a packet far shorter than its headers.
    let bogus = VnetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: GsoType::TcpV4,
        gso_ecn: false,
        hdr_len: 9000,
        gso_size: 1,
        csum_start: 60_000,
        csum_offset: 60_000,
    };
    bogus.emit(&mut frame).unwrap();
    frame[VNET_HDR_LEN] = 0x45;
    let err = writer.send_frame(&frame).expect_err("nonsense GSO header");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    // Garbage that looks like IPv4 or IPv6 to the TUN is taken and dropped by the kernel's
    // IP input (bad header checksum, bad lengths): a write may succeed, must not panic.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..200usize {
        let len = VNET_HDR_LEN + 1 + i % 120;
        let mut g = vec![0u8; len];
        for b in g.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        VnetHdr::NONE.emit(&mut g).unwrap();
        g[VNET_HDR_LEN] = if i % 2 == 0 { 0x45 } else { 0x60 } | (g[VNET_HDR_LEN] & 0x0f);
        let _ = writer.send_frame(&g);
    }
    // A garbage virtio header in front of a garbage packet.
    let mut g = [0xffu8; VNET_HDR_LEN + 64];
    g[VNET_HDR_LEN] = 0x45;
    let _ = writer.send_frame(&g);

    assert_eq!(topology::ping(&topo.client, SERVER, 3), 3, "still forwarding");
    let seen = fwd.finish().unwrap_or_else(|e| panic!("forwarder: {e}"));
    assert!(Seen::get(&seen.echo_requests) >= 3);
}

#[test]
fn a_plain_tun_carries_no_header_and_no_super_packets() {
    if skip_unless(&[Need::Root, topology::need_tun()]) {
        return;
    }
    let topo = Topology::kernel();
    let tun = topology::open_tun(&topo.gateway, TUN, 1, Offloads::Off);
    assert!(!tun.offloads().vnet_hdr);
    assert_eq!(tun.queues()[0].hdr_len(), 0);
    topo.route_through(TUN);
    let fwd = Forwarder::start(tun.into_queues(), LIMIT);
    const BYTES: u64 = 4 << 20;
    assert_eq!(topology::tcp_transfer(&topo, BYTES, Duration::from_secs(30)), BYTES);
    let seen = fwd.finish().unwrap_or_else(|e| panic!("forwarder: {e}"));
    assert!(Seen::get(&seen.bytes) > BYTES);
    assert_eq!(Seen::get(&seen.gso_frames), 0);
    assert!(Seen::get(&seen.max_packet) <= 1500, "largest {}", Seen::get(&seen.max_packet));
}

#[test]
fn a_name_held_by_another_kind_of_interface_is_a_named_error() {
    if skip_unless(&[Need::Root, topology::need_tun()]) {
        return;
    }
    let topo = Topology::kernel();
    // gw-c is the gateway's veth: TUNSETIFF refuses to attach a TUN queue to it.
    let err = topology::in_ns(&topo.gateway, || Tun::open(topology::GW_CLIENT_IF, 1, Offloads::On))
        .expect_err("a veth is no TUN");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(topology::GW_CLIENT_IF) && msg.contains("TUNSETIFF"), "{msg}");
}
