#![no_main]
//! A sequence of packets through the classifier and the conntrack TCP state machine, with a
//! policy-free stand-in for the filter between them: every packet is classified
//! (`classify`); a TCP segment of an untracked flow may open one (`TcpConn::open`), one of a
//! tracked flow drives it from its side (`TcpConn::on_segment`); ICMP errors pass only for
//! tracked flows, later fragments only after a passed first fragment.
//!
//! Input: packets, each as a big-endian `u16` length and that many bytes (at most 64, the
//! filter's burst).
//!
//! Invariants: never panics; only a bare SYN opens a flow, and only the originator's bare
//! SYN reopens a closed one; a flow is past the handshake only once its
//! responder has spoken, and in LAST_ACK or TIME_WAIT only once both sides sent a FIN; the
//! side recorded as closing is one that sent a FIN.
use std::collections::HashMap;

use flowgate::conntrack::{Side, TcpConn, TcpFlags, TcpState};
use flowgate::dataplane::packet::classify::{FragmentKey, Kind, L4, classify};
use flowgate::flow::FlowKey;

const MAX_BURST: usize = 64;

struct Tracked {
    orig: FlowKey,
    conn: TcpConn,
    /// Since the flow was (re)opened: an accepted segment from the responder, and FINs.
    reply_seen: bool,
    fin: [bool; 2],
}

fn idx(side: Side) -> usize {
    match side {
        Side::Orig => 0,
        Side::Reply => 1,
    }
}

fn packets(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (len, rest) = data.split_first_chunk::<2>()?;
        let n = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        let (p, rest) = rest.split_at(n);
        data = rest;
        Some(p)
    })
    .take(MAX_BURST)
}

fn check(t: &Tracked) {
    let s = t.conn.state();
    let _ = (s.as_str(), s.flow_state());
    match s {
        TcpState::SynSent | TcpState::SynRecv | TcpState::Close => {}
        _ => assert!(t.reply_seen, "{s:?} but the responder never spoke"),
    }
    if matches!(s, TcpState::FinWait | TcpState::CloseWait | TcpState::LastAck | TcpState::TimeWait)
    {
        assert!(t.fin[idx(t.conn.closer())], "{s:?}: the closer sent no FIN");
    }
    if matches!(s, TcpState::LastAck | TcpState::TimeWait) {
        assert!(t.fin[0] && t.fin[1], "{s:?} without a FIN from each side");
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut flows: HashMap<FlowKey, Tracked> = HashMap::new();
    let mut fragments: HashMap<FragmentKey, bool> = HashMap::new();
    for p in packets(data) {
        let Ok(c) = classify(p) else { continue };
        assert!(c.l4_offset <= c.ip_len && c.ip_len <= p.len());
        match c.kind {
            Kind::Flow { l4, first_fragment } => {
                let passed = match l4 {
                    L4::Tcp(seg) => tcp(&mut flows, c.key, seg.flags),
                    _ => true,
                };
                if first_fragment.is_some()
                    && let Some(fk) = c.fragment_key()
                {
                    fragments.insert(fk, passed);
                }
            }
            Kind::Related { .. } => {
                let _passed = flows.contains_key(&c.key.canonical());
            }
            Kind::Fragment { .. } => {
                assert_eq!((c.key.src.port(), c.key.dst.port()), (0, 0));
                let fk = c.fragment_key().expect("a fragment has a fragment key");
                let _passed = fragments.get(&fk).copied().unwrap_or(false);
            }
        }
    }
});

/// The stand-in filter's TCP step; true when the segment passes.
fn tcp(flows: &mut HashMap<FlowKey, Tracked>, key: FlowKey, flags: TcpFlags) -> bool {
    let bare_syn = flags.contains(TcpFlags::SYN)
        && !flags.contains(TcpFlags::ACK)
        && !flags.contains(TcpFlags::RST)
        && !flags.contains(TcpFlags::FIN);
    let Some(t) = flows.get_mut(&key.canonical()) else {
        let opened = TcpConn::open(flags);
        assert_eq!(opened.is_ok(), bare_syn, "open({:#04x})", flags.0);
        let Ok(conn) = opened else { return false };
        let t = Tracked { orig: key, conn, reply_seen: false, fin: [false; 2] };
        check(&t);
        flows.insert(key.canonical(), t);
        return true;
    };
    let side = if key == t.orig { Side::Orig } else { Side::Reply };
    let before = t.conn;
    match before.on_segment(side, flags) {
        Err(_) => false,
        Ok(next) => {
            let reopened = next.state() == TcpState::SynSent
                && matches!(before.state(), TcpState::TimeWait | TcpState::Close);
            if reopened {
                assert!(bare_syn && side == Side::Orig);
                t.reply_seen = false;
                t.fin = [false; 2];
            }
            if side == Side::Reply {
                t.reply_seen = true;
            }
            if flags.contains(TcpFlags::FIN) {
                t.fin[idx(side)] = true;
            }
            t.conn = next;
            check(t);
            true
        }
    }
}
