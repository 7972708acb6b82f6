//! The TCP connection-tracking state machine for the packet dataplane: pure, no I/O, no
//! clock. It is driven by (side, flags) of each segment and answers with the next state or
//! [`TcpInvalid`], in which case the state is unchanged and the caller drops the segment.
//!
//! The states are the familiar conntrack ones (SYN_SENT … TIME_WAIT, CLOSE). Sequence
//! numbers are not read here: this machine decides which segments make sense in which
//! state (no data before the handshake, no SYN on an established flow) and which timeout
//! applies; the packet filter asks window tracking (`tcp_window.rs`) about the numbers
//! first.
//!
//! Fail closed: a flow can only be opened by a bare SYN from the originator.
#![forbid(unsafe_code)]

use thiserror::Error;

use super::entry::FlowState;

/// Which side of a tracked flow sent a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The originator (the side that sent the first packet).
    Orig,
    /// The responder.
    Reply,
}

impl Side {
    pub const fn other(self) -> Side {
        match self {
            Side::Orig => Side::Reply,
            Side::Reply => Side::Orig,
        }
    }
}

/// TCP header flags, as the wire carries them (only the bits the machine reads matter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const PSH: TcpFlags = TcpFlags(0x08);
    pub const ACK: TcpFlags = TcpFlags(0x10);
    pub const SYN_ACK: TcpFlags = TcpFlags(0x12);
    pub const FIN_ACK: TcpFlags = TcpFlags(0x11);

    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | other.0)
    }

    fn has(self, f: TcpFlags) -> bool {
        self.0 & f.0 != 0
    }
}

impl std::ops::BitOr for TcpFlags {
    type Output = TcpFlags;

    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        self.union(rhs)
    }
}

/// Where a tracked TCP connection is in its life.
///
/// The discriminants (1..=8, in the order below) are the state's number in an entry's
/// packed state byte (`entry.rs`), where 0 means "no machine": not a wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TcpState {
    /// The originator's SYN seen.
    SynSent = 1,
    /// The responder's SYN+ACK seen.
    SynRecv,
    /// The originator's ACK completed the handshake.
    Established,
    /// One side sent FIN.
    FinWait,
    /// The other side acknowledged that FIN (it may still send).
    CloseWait,
    /// The other side sent its FIN too.
    LastAck,
    /// The last FIN acknowledged; waiting for stray segments.
    TimeWait,
    /// Reset; the entry only lingers briefly.
    Close,
}

impl TcpState {
    /// Every state, in discriminant order: `ALL[n - 1] as u8 == n`.
    const ALL: [TcpState; 8] = [
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::TimeWait,
        TcpState::Close,
    ];

    /// The state numbered `v`; `None` for 0 or a number past the last state.
    const fn from_u8(v: u8) -> Option<TcpState> {
        let i = v.wrapping_sub(1) as usize;
        if i < TcpState::ALL.len() { Some(TcpState::ALL[i]) } else { None }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            TcpState::SynSent => "syn_sent",
            TcpState::SynRecv => "syn_recv",
            TcpState::Established => "established",
            TcpState::FinWait => "fin_wait",
            TcpState::CloseWait => "close_wait",
            TcpState::LastAck => "last_ack",
            TcpState::TimeWait => "time_wait",
            TcpState::Close => "close",
        }
    }

    /// The coarse flow state shown next to proxied flows.
    pub const fn flow_state(self) -> FlowState {
        match self {
            TcpState::SynSent | TcpState::SynRecv => FlowState::Unreplied,
            TcpState::Established => FlowState::Open,
            _ => FlowState::Closing,
        }
    }
}

/// Why a segment was not accepted. The state is unchanged.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum TcpInvalid {
    #[error("segment cannot open a connection (a bare SYN is required)")]
    NotSyn,
    #[error("impossible flag combination")]
    BadFlags,
    #[error("{flags:#04x} from {side:?} is not valid in {state:?}")]
    Unexpected { state: TcpState, side: Side, flags: u8 },
    #[error("the flow has no TCP state machine")]
    NotTracked,
}

/// A connection's tracked state: the state plus which side closed first (meaningful once a
/// FIN has been seen). Small and `Copy`; the table packs it into one byte of the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpConn {
    state: TcpState,
    closer: Side,
}

impl TcpConn {
    /// The state after the first segment from the originator.
    ///
    /// # Errors
    /// [`TcpInvalid::NotSyn`] unless the segment is a bare SYN (no ACK, FIN or RST).
    pub fn open(flags: TcpFlags) -> Result<TcpConn, TcpInvalid> {
        check_flags(flags)?;
        if flags.has(TcpFlags::SYN) && !flags.has(TcpFlags::ACK) && !flags.has(TcpFlags::RST) {
            Ok(TcpConn { state: TcpState::SynSent, closer: Side::Orig })
        } else {
            Err(TcpInvalid::NotSyn)
        }
    }

    pub const fn state(self) -> TcpState {
        self.state
    }

    /// The side that sent the first FIN (only meaningful in closing states).
    pub const fn closer(self) -> Side {
        self.closer
    }

    /// The state after a segment with `flags` from `side`.
    ///
    /// # Errors
    /// [`TcpInvalid`] when the segment makes no sense in this state.
    pub fn on_segment(self, side: Side, flags: TcpFlags) -> Result<TcpConn, TcpInvalid> {
        use Side::{Orig, Reply};
        use TcpState::*;

        check_flags(flags)?;
        let syn = flags.has(TcpFlags::SYN);
        let ack = flags.has(TcpFlags::ACK);
        let fin = flags.has(TcpFlags::FIN);
        let rst = flags.has(TcpFlags::RST);
        let to = |state| Ok(TcpConn { state, closer: self.closer });
        let fin_by = |closer| Ok(TcpConn { state: FinWait, closer });
        let invalid = Err(TcpInvalid::Unexpected { state: self.state, side, flags: flags.0 });

        // A reset ends the flow in any state but CLOSE, where there is nothing left to end.
        if rst {
            return if self.state == Close { invalid } else { to(Close) };
        }
        let other = side != self.closer;
        match (self.state, side) {
            // Handshake: the originator may retransmit its SYN; the responder answers with
            // SYN+ACK (or a bare SYN: simultaneous open). Anything else is data before the
            // handshake.
            (SynSent, Orig) if syn && !ack => to(SynSent),
            (SynSent, Reply) if syn => to(SynRecv),
            (SynSent, _) => invalid,
            (SynRecv, Reply) if syn && ack => to(SynRecv),
            (SynRecv, Orig) if syn && !ack => to(SynRecv),
            (SynRecv, Orig) if ack && fin => fin_by(Orig),
            (SynRecv, Orig) if ack && !syn => to(Established),
            (SynRecv, _) => invalid,
            // Established: a SYN+ACK retransmitted by the responder (our ACK was lost) is
            // harmless; any other SYN is not.
            (Established, Reply) if syn && ack => to(Established),
            (Established, _) if syn => invalid,
            (Established, s) if fin => fin_by(s),
            (Established, _) => to(Established),
            // Closing: track the FIN of each side.
            (FinWait | CloseWait | LastAck, _) if syn => invalid,
            (FinWait, _) if fin && other => to(LastAck),
            (FinWait, _) if ack && other => to(CloseWait),
            (FinWait, _) => to(FinWait),
            (CloseWait, _) if fin && other => to(LastAck),
            (CloseWait, _) => to(CloseWait),
            (LastAck, _) if ack && !fin && !other => to(TimeWait),
            (LastAck, _) => to(LastAck),
            // After the close, only a new SYN from the originator reopens (port reuse).
            (TimeWait | Close, Orig) if syn && !ack => Ok(TcpConn { state: SynSent, closer: Orig }),
            (TimeWait, _) if syn => invalid,
            (TimeWait, _) => to(TimeWait),
            (Close, _) => invalid,
        }
    }

    /// Packed form: (state number 1..=8, closer).
    pub(crate) const fn to_parts(self) -> (u8, Side) {
        (self.state as u8, self.closer)
    }

    /// Unpacks [`TcpConn::to_parts`]; `None` for 0 (no machine) or a bad number.
    pub(crate) const fn from_parts(state: u8, closer: Side) -> Option<TcpConn> {
        match TcpState::from_u8(state) {
            Some(state) => Some(TcpConn { state, closer }),
            None => None,
        }
    }
}

fn check_flags(flags: TcpFlags) -> Result<(), TcpInvalid> {
    let syn = flags.has(TcpFlags::SYN);
    if syn && (flags.has(TcpFlags::FIN) || flags.has(TcpFlags::RST)) {
        Err(TcpInvalid::BadFlags)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Side::{Orig, Reply};
    use super::TcpState::*;
    use super::*;

    const S: TcpFlags = TcpFlags::SYN;
    const SA: TcpFlags = TcpFlags::SYN_ACK;
    const A: TcpFlags = TcpFlags::ACK;
    const PA: TcpFlags = TcpFlags(0x18);
    const FA: TcpFlags = TcpFlags::FIN_ACK;
    const R: TcpFlags = TcpFlags::RST;
    const RA: TcpFlags = TcpFlags(0x14);

    /// Plays an exchange: each step is (side, flags, expected state or `None` = invalid).
    fn play(steps: &[(Side, TcpFlags, Option<TcpState>)]) -> TcpConn {
        let (first, rest) = steps.split_first().expect("an exchange has a first segment");
        let mut c = TcpConn::open(first.1).expect("first segment opens");
        assert_eq!(Some(c.state()), first.2);
        for (i, &(side, flags, want)) in rest.iter().enumerate() {
            match (c.on_segment(side, flags), want) {
                (Ok(next), Some(w)) => {
                    assert_eq!(
                        next.state(),
                        w,
                        "step {i}: {side:?} {flags:?} from {:?}",
                        c.state()
                    );
                    c = next;
                }
                (Err(_), None) => {}
                (got, want) => panic!(
                    "step {i}: {side:?} {flags:?} in {:?}: got {got:?}, want {want:?}",
                    c.state()
                ),
            }
        }
        c
    }

    #[test]
    fn handshake_data_and_orderly_close_by_originator() {
        let c = play(&[
            (Orig, S, Some(SynSent)),
            (Reply, SA, Some(SynRecv)),
            (Orig, A, Some(Established)),
            (Orig, PA, Some(Established)),
            (Reply, PA, Some(Established)),
            (Orig, FA, Some(FinWait)),
            (Orig, FA, Some(FinWait)), // retransmitted FIN
            (Reply, A, Some(CloseWait)),
            (Reply, PA, Some(CloseWait)), // half-closed: the responder may still send
            (Reply, FA, Some(LastAck)),
            (Orig, A, Some(TimeWait)),
            (Reply, FA, Some(TimeWait)), // stray retransmission
        ]);
        assert_eq!(c.closer(), Orig);
        assert_eq!(c.state().flow_state(), FlowState::Closing);
    }

    #[test]
    fn close_initiated_by_responder_and_simultaneous_fins() {
        play(&[
            (Orig, S, Some(SynSent)),
            (Reply, SA, Some(SynRecv)),
            (Orig, A, Some(Established)),
            (Reply, FA, Some(FinWait)),
            (Reply, A, Some(FinWait)), // the closer's own ACKs change nothing
            (Orig, FA, Some(LastAck)), // both FINs crossed
            (Orig, A, Some(LastAck)),  // the second closer's ACK is not the last ACK
            (Reply, A, Some(TimeWait)),
        ]);
    }

    #[test]
    fn data_before_handshake_is_invalid() {
        play(&[
            (Orig, S, Some(SynSent)),
            (Orig, PA, None), // data before the SYN+ACK
            (Orig, A, None),  // ACK of nothing
            (Reply, A, None), // responder ACK without SYN
            (Orig, FA, None), // FIN before the handshake
            (Reply, SA, Some(SynRecv)),
            (Reply, PA, None), // responder data before the final ACK
            (Orig, A, Some(Established)),
        ]);
        assert_eq!(TcpConn::open(A), Err(TcpInvalid::NotSyn));
        assert_eq!(TcpConn::open(PA), Err(TcpInvalid::NotSyn));
        assert_eq!(TcpConn::open(SA), Err(TcpInvalid::NotSyn));
        assert_eq!(TcpConn::open(R), Err(TcpInvalid::NotSyn));
        assert_eq!(TcpConn::open(TcpFlags(0x03)), Err(TcpInvalid::BadFlags)); // SYN+FIN
    }

    #[test]
    fn rst_handling() {
        // Refused connection: RST+ACK answers the SYN.
        let c = play(&[(Orig, S, Some(SynSent)), (Reply, RA, Some(Close)), (Reply, RA, None)]);
        assert_eq!(c.state().flow_state(), FlowState::Closing);
        // Reset mid-stream from either side.
        for side in [Orig, Reply] {
            play(&[
                (Orig, S, Some(SynSent)),
                (Reply, SA, Some(SynRecv)),
                (Orig, A, Some(Established)),
                (side, R, Some(Close)),
                (side.other(), PA, None), // nothing flows after the reset
                (Orig, S, Some(SynSent)), // the originator may reuse the ports
            ]);
        }
        // SYN+RST is nonsense in any state.
        let est = play(&[
            (Orig, S, Some(SynSent)),
            (Reply, SA, Some(SynRecv)),
            (Orig, A, Some(Established)),
        ]);
        assert_eq!(est.on_segment(Orig, TcpFlags(0x06)), Err(TcpInvalid::BadFlags));
    }

    #[test]
    fn syn_on_established_is_invalid_but_synack_retransmit_is_not() {
        play(&[
            (Orig, S, Some(SynSent)),
            (Orig, S, Some(SynSent)), // SYN retransmit
            (Reply, SA, Some(SynRecv)),
            (Reply, SA, Some(SynRecv)), // SYN+ACK retransmit
            (Orig, A, Some(Established)),
            (Reply, SA, Some(Established)), // our ACK was lost; harmless
            (Orig, S, None),
            (Reply, S, None),
        ]);
    }

    #[test]
    fn simultaneous_open_and_fin_during_handshake() {
        play(&[(Orig, S, Some(SynSent)), (Reply, S, Some(SynRecv)), (Orig, A, Some(Established))]);
        play(&[(Orig, S, Some(SynSent)), (Reply, SA, Some(SynRecv)), (Orig, FA, Some(FinWait))]);
    }

    #[test]
    fn time_wait_reopen_and_close_rejects() {
        let tw = play(&[
            (Orig, S, Some(SynSent)),
            (Reply, SA, Some(SynRecv)),
            (Orig, A, Some(Established)),
            (Orig, FA, Some(FinWait)),
            (Reply, FA, Some(LastAck)),
            (Orig, A, Some(TimeWait)),
            (Reply, S, None), // only the originator reopens
        ]);
        assert_eq!(tw.on_segment(Orig, S).map(TcpConn::state), Ok(SynSent));
    }

    #[test]
    fn parts_round_trip() {
        for n in 1..=8u8 {
            for side in [Orig, Reply] {
                let c = TcpConn::from_parts(n, side).expect("1..=8 are states");
                assert_eq!(c.to_parts(), (n, side));
            }
        }
        assert!(TcpConn::from_parts(0, Orig).is_none());
        assert!(TcpConn::from_parts(9, Orig).is_none());
    }
}
