//! TCP window tracking for the packet dataplane: which sequence and acknowledgement numbers a
//! tracked connection may carry, so a segment far outside the window (a blind injection, a
//! stale duplicate, a desynchronised peer) is refused instead of passed.
//!
//! The checks are the four of Guido van Rooij's "Real Stateful TCP Packet Filtering in IP
//! Filter", as Linux's `nf_conntrack_proto_tcp.c` (`tcp_in_window`) applies them. Per side
//! (the sender of a segment) the tracker keeps:
//! - `end`: the highest sequence number the side has sent, plus one (SYN and FIN count);
//! - `maxend`: the highest sequence number it may send: the other side's highest
//!   acknowledgement plus the window it advertised with it;
//! - `maxwin`: the largest window it has advertised (scaled);
//! - `scale`: its window scale (RFC 7323), used only when both SYNs carried the option.
//!
//! A segment `seq .. seq + len` with acknowledgement `ack` from side S to side R passes when
//! (I) `seq <= S.maxend` — it starts inside the window R offered (II) `seq + len >= S.end -
//! R.maxwin` — it is not older than one window (III) `ack <= R.end` — it acknowledges
//! nothing R has not sent (IV) `ack >= R.end - max(S.maxwin, 66000)` — nor something
//! acknowledged long ago. All in sequence-space (wrapping) arithmetic. A GSO super-packet
//! counts all its segments' payload as one segment's: they are contiguous.
//!
//! Liberal mode (`[packet] tcp_liberal`, Linux's `nf_conntrack_tcp_be_liberal`) still
//! tracks the numbers but passes every segment the state machine accepts.
//!
//! Pure: no I/O, no clock. The fields are atomics because the two directions of a flow may
//! be filtered by two workers at once; each update is a compare-and-swap that only moves a
//! bound forward, so a race costs at most a bound that is one segment stale (the check is
//! then a little more or less generous for that segment), never a torn value.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use thiserror::Error;

use super::tcp_state::{Side, TcpFlags};

/// Linux's `MAXACKWINDOW` floor: how far behind the newest data an acknowledgement may lag.
const MAX_ACK_WINDOW: u32 = 66_000;
/// RFC 7323 §2.3: a shift above 14 is treated as 14.
const MAX_SCALE: u8 = 14;

/// What the window tracker reads of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub flags: TcpFlags,
    pub seq: u32,
    pub ack: u32,
    /// The window field as on the wire (unscaled).
    pub window: u16,
    /// Payload bytes (a GSO super-packet: all its segments').
    pub payload_len: u32,
    /// The window-scale option of a SYN, if it carried one.
    pub wscale: Option<u8>,
}

impl Segment {
    /// Sequence space the segment occupies: its payload, plus one each for SYN and FIN.
    fn len(&self) -> u32 {
        let mut n = self.payload_len;
        if self.flags.contains(TcpFlags::SYN) {
            n = n.wrapping_add(1);
        }
        if self.flags.contains(TcpFlags::FIN) {
            n = n.wrapping_add(1);
        }
        n
    }
}

/// Which check a segment failed.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum OutOfWindow {
    #[error("data beyond the receiver's window")]
    AboveWindow,
    #[error("data older than one window")]
    BelowWindow,
    #[error("acknowledges data never sent")]
    AckAhead,
    #[error("acknowledgement too old")]
    AckBehind,
}

/// `SideWindow::flags`: the side has sent its first segment (its numbers are known).
const SEEN: u8 = 1;
/// The side's SYN carried a window-scale option.
const SCALE_OFFERED: u8 = 2;

/// One side's bounds.
#[derive(Debug, Default)]
struct SideWindow {
    end: AtomicU32,
    maxend: AtomicU32,
    maxwin: AtomicU32,
    scale: AtomicU8,
    flags: AtomicU8,
}

/// Both sides' bounds of one TCP flow (28 bytes; kept with the entry's side allocation,
/// which every packet TCP flow has for its cut signal).
#[derive(Debug, Default)]
pub struct TcpWindow {
    sides: [SideWindow; 2],
}

const fn idx(side: Side) -> usize {
    match side {
        Side::Orig => 0,
        Side::Reply => 1,
    }
}

/// `a` is before `b` in sequence space.
#[inline]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline]
fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// Moves `bound` forward to `to` if `to` is after it (sequence space).
#[inline]
fn advance(bound: &AtomicU32, to: u32) {
    let mut cur = bound.load(Ordering::Relaxed);
    while after(to, cur) {
        match bound.compare_exchange_weak(cur, to, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

impl TcpWindow {
    pub fn new() -> TcpWindow {
        TcpWindow::default()
    }

    /// Checks a segment from `side` against the window and, when it passes (or `liberal`),
    /// moves the bounds. The state machine (`tcp_state.rs`) is asked separately; this only
    /// judges the numbers.
    ///
    /// # Errors
    /// [`OutOfWindow`] naming the failed check; nothing is updated then.
    pub fn on_segment(&self, side: Side, seg: &Segment, liberal: bool) -> Result<(), OutOfWindow> {
        let r = Ordering::Relaxed;
        let (s, o) = (&self.sides[idx(side)], &self.sides[idx(side.other())]);
        let syn = seg.flags.contains(TcpFlags::SYN);
        let ack_flag = seg.flags.contains(TcpFlags::ACK);
        let end = seg.seq.wrapping_add(seg.len());
        let sflags = s.flags.load(r);

        if sflags & SEEN == 0 {
            // The side's first segment. Only a SYN (the originator's, or the responder's
            // SYN+ACK) tells us its numbers; anything else (a RST refusing the SYN) is left
            // to the state machine and teaches nothing.
            if !syn {
                return Ok(());
            }
            let mut f = SEEN;
            if let Some(shift) = seg.wscale {
                s.scale.store(shift.min(MAX_SCALE), r);
                f |= SCALE_OFFERED;
            }
            s.end.store(end, r);
            s.maxend.store(end, r);
            s.maxwin.store(u32::from(seg.window).max(1), r);
            s.flags.store(f, r);
            if side == Side::Reply {
                // Window scaling is on only if both SYNs offered it (RFC 7323 §2.2).
                let both = f & SCALE_OFFERED != 0 && o.flags.load(r) & SCALE_OFFERED != 0;
                if !both {
                    s.scale.store(0, r);
                    o.scale.store(0, r);
                }
            }
            // A SYN+ACK acknowledges the originator's SYN and offers it a window.
            if ack_flag && o.flags.load(r) & SEEN != 0 {
                advance(&o.maxend, seg.ack.wrapping_add(u32::from(seg.window).max(1)));
            }
            return Ok(());
        }

        // A retransmitted SYN is judged by its own numbers: its window is not scaled.
        let scale = if syn { 0 } else { s.scale.load(r) };
        let win = u32::from(seg.window) << scale;
        let (o_end, o_maxwin) = (o.end.load(r), o.maxwin.load(r));
        let o_seen = o.flags.load(r) & SEEN != 0;
        // Without ACK the segment acknowledges nothing: judge it as acknowledging all.
        let ack = if ack_flag && o_seen { seg.ack } else { o_end };

        if !liberal {
            let maxend = s.maxend.load(r);
            // Before the peer has said anything its window is unknown: nothing to check.
            if o_seen && after(seg.seq, maxend) {
                return Err(OutOfWindow::AboveWindow);
            }
            if o_seen && before(end, s.end.load(r).wrapping_sub(o_maxwin.max(1))) {
                return Err(OutOfWindow::BelowWindow);
            }
            if o_seen && after(ack, o_end.wrapping_add(1)) {
                return Err(OutOfWindow::AckAhead);
            }
            let lag = s.maxwin.load(r).max(MAX_ACK_WINDOW);
            if o_seen && before(ack, o_end.wrapping_sub(lag).wrapping_sub(1)) {
                return Err(OutOfWindow::AckBehind);
            }
        }

        // Passed: move the bounds.
        if win > s.maxwin.load(r) {
            s.maxwin.store(win, r);
        }
        advance(&s.end, end);
        if after(end, s.maxend.load(r)) {
            // Liberal mode, or before the peer spoke: the sender's reach is what it sent.
            advance(&s.maxend, end);
        }
        if ack_flag && o_seen {
            // The peer may send up to what this side acknowledged plus its window.
            advance(&o.maxend, ack.wrapping_add(win.max(1)));
        }
        Ok(())
    }

    /// One side's (end, maxend, maxwin, scale), for tests and `/flows`.
    pub fn bounds(&self, side: Side) -> (u32, u32, u32, u8) {
        let s = &self.sides[idx(side)];
        let r = Ordering::Relaxed;
        (s.end.load(r), s.maxend.load(r), s.maxwin.load(r), s.scale.load(r))
    }
}

#[cfg(test)]
mod tests {
    use super::Side::{Orig, Reply};
    use super::*;

    fn seg(flags: TcpFlags, seq: u32, ack: u32, window: u16, len: u32) -> Segment {
        Segment { flags, seq, ack, window, payload_len: len, wscale: None }
    }

    const A: TcpFlags = TcpFlags::ACK;

    /// A handshake from ISNs near the wrap, then data both ways.
    fn established(liberal: bool) -> TcpWindow {
        let w = TcpWindow::new();
        let (c, s) = (u32::MAX - 10, 1_000);
        w.on_segment(Orig, &seg(TcpFlags::SYN, c, 0, 64_000, 0), liberal).unwrap();
        w.on_segment(Reply, &seg(TcpFlags::SYN_ACK, s, c.wrapping_add(1), 60_000, 0), liberal)
            .unwrap();
        w.on_segment(Orig, &seg(A, c.wrapping_add(1), s + 1, 64_000, 0), liberal).unwrap();
        w.on_segment(Orig, &seg(A, c.wrapping_add(1), s + 1, 64_000, 1000), liberal).unwrap();
        w.on_segment(Reply, &seg(A, s + 1, c.wrapping_add(1001), 60_000, 500), liberal).unwrap();
        w
    }

    #[test]
    fn in_window_traffic_passes_across_the_wrap() {
        let w = established(false);
        let c = (u32::MAX - 10).wrapping_add(1001);
        // A retransmission of the last segment and the next one both pass.
        w.on_segment(Orig, &seg(A, c.wrapping_sub(1000), 1501, 64_000, 1000), false).unwrap();
        w.on_segment(Orig, &seg(A, c, 1501, 64_000, 1000), false).unwrap();
        assert_eq!(w.bounds(Orig).0, c.wrapping_add(1000));
    }

    #[test]
    fn far_outside_the_window_is_refused_unless_liberal() {
        let w = established(false);
        let c = (u32::MAX - 10).wrapping_add(1001);
        let far = c.wrapping_add(1 << 30);
        assert_eq!(
            w.on_segment(Orig, &seg(A, far, 1501, 64_000, 100), false),
            Err(OutOfWindow::AboveWindow)
        );
        let old = c.wrapping_sub(1 << 30);
        assert_eq!(
            w.on_segment(Orig, &seg(A, old, 1501, 64_000, 100), false),
            Err(OutOfWindow::BelowWindow)
        );
        assert_eq!(
            w.on_segment(Orig, &seg(A, c, 1501 + (1 << 20), 64_000, 0), false),
            Err(OutOfWindow::AckAhead)
        );
        assert_eq!(
            w.on_segment(Orig, &seg(A, c, 1501u32.wrapping_sub(1 << 20), 64_000, 0), false),
            Err(OutOfWindow::AckBehind)
        );
        // Nothing moved.
        assert_eq!(w.bounds(Orig).0, c);
        let l = established(true);
        assert_eq!(l.on_segment(Orig, &seg(A, far, 1501, 64_000, 100), true), Ok(()));
    }

    #[test]
    fn window_scale_applies_only_when_both_offer_it() {
        let w = TcpWindow::new();
        let syn = Segment { wscale: Some(7), ..seg(TcpFlags::SYN, 100, 0, 1000, 0) };
        w.on_segment(Orig, &syn, false).unwrap();
        let sa = Segment { wscale: Some(9), ..seg(TcpFlags::SYN_ACK, 5000, 101, 1000, 0) };
        w.on_segment(Reply, &sa, false).unwrap();
        assert_eq!(w.bounds(Orig).3, 7);
        assert_eq!(w.bounds(Reply).3, 9);
        // A SYN's window is never scaled; the responder's next window 1000 << 9 lets the
        // originator send ~512 KB ahead.
        w.on_segment(Orig, &seg(A, 101, 5001, 1000, 0), false).unwrap();
        assert_eq!(
            w.on_segment(Orig, &seg(A, 101 + 400_000, 5001, 1000, 1000), false),
            Err(OutOfWindow::AboveWindow)
        );
        w.on_segment(Reply, &seg(A, 5001, 101, 1000, 0), false).unwrap();
        w.on_segment(Orig, &seg(A, 101 + 400_000, 5001, 1000, 1000), false).unwrap();

        let w = TcpWindow::new();
        w.on_segment(Orig, &syn, false).unwrap();
        w.on_segment(Reply, &seg(TcpFlags::SYN_ACK, 5000, 101, 1000, 0), false).unwrap();
        assert_eq!((w.bounds(Orig).3, w.bounds(Reply).3), (0, 0));
        w.on_segment(Orig, &seg(A, 101, 5001, 1000, 0), false).unwrap();
        w.on_segment(Reply, &seg(A, 5001, 101, 1000, 0), false).unwrap();
        assert_eq!(
            w.on_segment(Orig, &seg(A, 101 + 400_000, 5001, 1000, 1000), false),
            Err(OutOfWindow::AboveWindow)
        );
    }
}
