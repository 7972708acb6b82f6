//! Moving bytes both ways between an admitted client and its upstream.
//!
//! Each direction is a read → write loop with its own buffer; when one side reaches EOF the
//! other side's write half is shut down (FIN), and the opposite direction keeps flowing
//! until it ends too, so half-close is carried through. Byte and read counts go straight
//! into the conntrack entry's atomics and the listener's counters as they happen (so
//! `/flows` and metrics see live numbers), and every chunk refreshes the entry's
//! last-seen time, which the idle timer reads. The whole exchange ends early when the
//! connection is idle for `idle`, or when the flow's cut signal fires (a reload revoked
//! it).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conntrack::{Conntrack, CutSignal, Entry, FlowState};
use crate::telemetry::metrics::ListenerCounters;

/// Per direction. 32 KiB keeps a thousand idle connections at 64 MiB of buffers while
/// bulk transfers still move large chunks per syscall.
const BUF_SIZE: usize = 32 * 1024;

/// Why a splice ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Both directions reached EOF.
    Closed,
    /// No bytes either way for the idle timeout.
    Idle,
    /// The flow was cut (revoked by a policy change).
    Cut,
    /// One side failed (reset, broken pipe); the other is closed with it.
    Error(io::Error),
}

/// What the splice needs to account for the flow.
pub struct Accounting<'a> {
    pub conntrack: &'a Conntrack,
    pub entry: &'a Entry,
    pub counters: &'a ListenerCounters,
}

/// Copies both ways until both sides close, the connection idles out, or `cut` fires.
/// (The PROXY header reader consumes exactly the header, so nothing read before the splice
/// is owed to the upstream.)
pub async fn splice(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    cut: &CutSignal,
    acct: &Accounting<'_>,
) -> SpliceEnd {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let up = pump(&mut cr, &mut uw, acct, Side::Up);
    let down = pump(&mut ur, &mut cw, acct, Side::Down);
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => match r {
            Ok(_) => SpliceEnd::Closed,
            Err(e) => SpliceEnd::Error(e),
        },
        () = idle_timer(idle, acct.conntrack, acct.entry) => SpliceEnd::Idle,
        () = cut.cut() => SpliceEnd::Cut,
    }
}

#[derive(Clone, Copy)]
enum Side {
    Up,
    Down,
}

impl Accounting<'_> {
    #[inline]
    fn up(&self, n: usize) {
        self.add(n, &self.entry.bytes_orig, &self.entry.packets_orig, &self.counters.bytes_up);
    }

    #[inline]
    fn down(&self, n: usize) {
        self.add(n, &self.entry.bytes_reply, &self.entry.packets_reply, &self.counters.bytes_down);
    }

    #[inline]
    fn add(&self, n: usize, bytes: &AtomicU64, reads: &AtomicU64, listener: &AtomicU64) {
        let n = n as u64;
        bytes.fetch_add(n, Ordering::Relaxed);
        reads.fetch_add(1, Ordering::Relaxed);
        listener.fetch_add(n, Ordering::Relaxed);
        self.conntrack.touch(self.entry, Instant::now());
    }
}

/// One direction: read, write, count; on EOF shut the writer down (half-close).
async fn pump<R, W>(r: &mut R, w: &mut W, acct: &Accounting<'_>, side: Side) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Read into spare capacity (`read_buf`): the buffer is never zeroed, which matters
    // when thousands of short connections each set up two of them (l4_vs_haproxy conn/s).
    let mut buf = Vec::with_capacity(BUF_SIZE);
    loop {
        buf.clear();
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            acct.entry.set_state(FlowState::Closing);
            // The peer may already be gone; its own direction reports that.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        match side {
            Side::Up => acct.up(n),
            Side::Down => acct.down(n),
        }
    }
}

/// Completes once the entry has seen no traffic for `idle` (both directions refresh it
/// through `Conntrack::touch`, so one timer serves both).
pub(crate) async fn idle_timer(idle: Duration, conntrack: &Conntrack, entry: &Entry) {
    let idle_ms = idle.as_millis() as u64;
    let mut wait = idle;
    loop {
        tokio::time::sleep(wait).await;
        let now = conntrack.now_ms(Instant::now());
        let quiet = now.saturating_sub(entry.last_seen_ms());
        if quiet >= idle_ms {
            return;
        }
        wait = Duration::from_millis(idle_ms - quiet);
    }
}
