#![no_main]
//! SOCKS5 UDP ASSOCIATE datagrams from the client, as the relay reads them: the header
//! (`UdpHeader::parse`), the fragment and port checks, and the destination made canonical
//! (`egress::Target::from_socks`, the SSRF-relevant step); then the header the relay writes
//! in front of a reply from that destination (`UdpHeader::encode`, into its 262-byte room).
//! Invariants: never panics; header + payload is the whole datagram; the reply header for
//! an address parses back to the same address, port and payload; a canonical name is a
//! fixed point (spelling it again gives the same target).
use std::net::{IpAddr, SocketAddr};

use flowgate::egress::name::Target;
use flowgate::wire::socks5::{Addr, UdpHeader};

/// `dataplane::proxy::socks5::MAX_UDP_HEADER`: 3 + ATYP + 1 + 255 + 2.
const MAX_UDP_HEADER: usize = 262;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(h) = UdpHeader::parse(data) else { return };
    assert!(h.payload.len() < data.len());
    assert_eq!(&data[data.len() - h.payload.len()..], h.payload);
    if h.frag != 0 || h.port == 0 {
        return;
    }
    let Ok(target) = Target::from_socks(h.addr) else { return };
    let ip = match &target {
        Target::Addr(ip) => *ip,
        Target::Name(n) => {
            let again = Target::from_socks(Addr::Domain(n.as_str().as_bytes()));
            assert_eq!(again, Ok(target), "{:?} is not canonical", n.as_str());
            return;
        }
    };
    // The relay answers with the address the reply came from.
    let from = SocketAddr::new(ip, h.port);
    let mut dgram = vec![0u8; MAX_UDP_HEADER + h.payload.len()];
    let n = UdpHeader::encode(Addr::from(from), from.port(), &mut dgram[..MAX_UDP_HEADER])
        .expect("an address header fits the relay's room");
    dgram.copy_within(MAX_UDP_HEADER.., n);
    dgram[n..n + h.payload.len()].copy_from_slice(h.payload);
    dgram.truncate(n + h.payload.len());
    let back = UdpHeader::parse(&dgram).expect("own header parses");
    let back_ip = match back.addr {
        Addr::V4(a) => IpAddr::V4(a),
        Addr::V6(a) => IpAddr::V6(a),
        Addr::Domain(_) => panic!("an address encoded as a name"),
    };
    assert_eq!((back.frag, back_ip, back.port, back.payload), (0, ip, h.port, h.payload));
});
