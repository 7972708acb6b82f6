//! The packet dataplane: flowgate as a stateful packet filter. Packets arrive from a TUN
//! device (routed) or an AF_PACKET pair (bump in the wire); each is classified into the
//! flow it belongs to ([`classify`]), matched against conntrack, and a new flow is admitted
//! through the one gate (`dataplane::admit`) like every proxied flow; allowed packets are
//! written back out, the rest dropped or rejected and counted.
//!
//! Not here: the policy decision (`policy`, reached only through `dataplane::admit`), the
//! flow table and the TCP state machine (`conntrack`), the proxy dataplane (`proxy`), which
//! sees connections, not packets.
//!
//! - [`afpacket`]: the AF_PACKET front end's device layer (bump in the wire between two
//!   interfaces, TPACKET_V3 rings, fanout, batched send).
//! - [`classify`]: pure header parsing, no I/O.
//! - [`filter`]: a worker's verdicts for a burst, front-end independent: conntrack batch
//!   lookup, TCP state and window, the one gate for new flows, revoked flows.
//! - [`fragments`]: a worker's bounded table of first-fragment verdicts.
//! - [`lent`]: the bookkeeping both front ends' receive batches share (frames lent, kept,
//!   refused).
//! - [`reject`]: TCP RST / ICMP "administratively prohibited" replies and their rate limit.
//! - [`tun`]: the TUN front end's device layer (multi-queue, virtio-net header offloads,
//!   batched I/O).
//! - [`worker`]: the worker threads that run a front end through the filter.

pub mod afpacket;
pub mod classify;
pub mod filter;
pub mod fragments;
pub mod lent;
pub mod reject;
pub mod tun;
pub mod worker;
