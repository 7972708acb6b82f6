//! The shared vocabulary of the data path: protocols, flow keys, directions and the
//! address newtypes that say which side of a connection an address belongs to.
//!
//! Every dataplane turns what it receives (a proxied connection, a datagram, a packet)
//! into a [`FlowKey`]; policy, conntrack and telemetry speak only these types.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// An L4 protocol as it appears on the wire. Unknown protocol numbers are kept, not
/// rejected, so that policy (default deny) decides about them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    Unknown(u8),
}

impl Proto {
    /// The IANA protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Icmp => 1,
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmpv6 => 58,
            Proto::Sctp => 132,
            Proto::Unknown(n) => n,
        }
    }

    /// The protocol for an IANA protocol number.
    pub const fn from_number(n: u8) -> Proto {
        match n {
            1 => Proto::Icmp,
            6 => Proto::Tcp,
            17 => Proto::Udp,
            58 => Proto::Icmpv6,
            132 => Proto::Sctp,
            n => Proto::Unknown(n),
        }
    }

    /// The name Kubernetes uses (`TCP`, `UDP`, `SCTP`); lower-case for the flow log.
    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
            Proto::Icmp => "ICMP",
            Proto::Icmpv6 => "ICMPv6",
            Proto::Unknown(_) => "UNKNOWN",
        }
    }

    /// Parses the protocol names policy files use. Case-sensitive, like the Kubernetes API.
    pub fn from_k8s(s: &str) -> Option<Proto> {
        match s {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proto::Unknown(n) => write!(f, "proto-{n}"),
            p => f.write_str(p.as_str()),
        }
    }
}

/// Which way traffic goes relative to the workload whose policy is being applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// The address of the client that opened a flow (after PROXY protocol, if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The address flowgate dials (or forwards packets to) on behalf of the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamAddr(pub SocketAddr);

/// The destination a client originally addressed, recovered from the kernel
/// (SO_ORIGINAL_DST) in transparent mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

/// A flow as both dataplanes and conntrack see it: the 5-tuple in the direction of the
/// first packet (initiator → responder).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: Proto,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl FlowKey {
    pub const fn new(proto: Proto, src: SocketAddr, dst: SocketAddr) -> FlowKey {
        FlowKey { proto, src, dst }
    }

    /// The same flow seen from the responder's side.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey { proto: self.proto, src: self.dst, dst: self.src }
    }

    /// A direction-independent form: both `k` and `k.reversed()` canonicalise to the
    /// same key, so one conntrack entry serves both directions.
    pub fn canonical(&self) -> FlowKey {
        if (self.src.ip(), self.src.port()) <= (self.dst.ip(), self.dst.port()) {
            *self
        } else {
            self.reversed()
        }
    }

    pub const fn src_ip(&self) -> IpAddr {
        self.src.ip()
    }

    pub const fn dst_ip(&self) -> IpAddr {
        self.dst.ip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_is_direction_independent() {
        let a: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let b: SocketAddr = "198.18.0.2:443".parse().unwrap();
        let k = FlowKey::new(Proto::Tcp, a, b);
        assert_eq!(k.canonical(), k.reversed().canonical());
        assert_ne!(k, k.reversed());
    }

    #[test]
    fn proto_numbers_round_trip() {
        for n in 0..=255u8 {
            assert_eq!(Proto::from_number(n).number(), n);
        }
    }
}
