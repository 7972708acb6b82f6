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

use std::cell::RefCell;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::conntrack::{Conntrack, CutSignal, Entry, FlowState};
use crate::telemetry::metrics::ListenerCounters;

/// Per direction. 32 KiB keeps a thousand idle connections at 64 MiB of buffers while
/// bulk transfers still move large chunks per syscall.
const BUF_SIZE: usize = 32 * 1024;

/// Relay buffers a worker thread keeps for the next connection, at most. A short
/// connection takes two buffers and gives them back within milliseconds; from the
/// allocator each is a large chunk (no thread cache, bin bookkeeping on every malloc and
/// free, ~1 µs a connection in the l4 conn/s profile), from here a pop. 16 per thread bounds
/// what is held while idle at 512 KiB a worker.
const POOL_MAX: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// One direction's buffer, from the current thread's pool when it has one, and back to the
/// pool of whichever thread drops it (tasks move between workers; each pool stays bounded).
struct Buf(Vec<u8>);

impl Buf {
    fn take() -> Buf {
        let pooled = POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        Buf(pooled.unwrap_or_else(|| Vec::with_capacity(BUF_SIZE)))
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.0.capacity() != BUF_SIZE {
            return;
        }
        let buf = std::mem::take(&mut self.0);
        // At thread exit the pool may be gone: the buffer is simply freed.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(buf);
            }
        });
    }
}

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
    let (up_done, down_done) = (AtomicBool::new(false), AtomicBool::new(false));
    let up = pump(&mut cr, &mut uw, acct, Side::Up, [&up_done, &down_done]);
    let down = pump(&mut ur, &mut cw, acct, Side::Down, [&down_done, &up_done]);
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
///
/// `[mine, other]`: this direction's and the opposite one's "reached EOF" flags. When the
/// opposite direction has already ended, the connection is about to be dropped, and the
/// close sends the FIN: the `shutdown` would be one more syscall for the same packet.
async fn pump(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    acct: &Accounting<'_>,
    side: Side,
    [mine, other]: [&AtomicBool; 2],
) -> io::Result<()> {
    // Read into spare capacity (`read_buf`): the buffer is never zeroed, which matters
    // when thousands of short connections each set up two of them (l4_vs_haproxy conn/s).
    let mut pooled = Buf::take();
    let buf = &mut pooled.0;
    loop {
        buf.clear();
        let n = r.read_buf(buf).await?;
        if n == 0 {
            acct.entry.set_state(FlowState::Closing);
            mine.store(true, Ordering::Relaxed);
            if !other.load(Ordering::Relaxed) {
                // The peer may already be gone; its own direction reports that.
                let _ = w.shutdown().await;
            }
            return Ok(());
        }
        // A short read whose sender has already closed (FIN queued behind the data): these
        // are the last bytes, and the FIN follows as soon as the next read returns 0. Sent
        // with MSG_MORE, they wait for that FIN and leave in one segment with it, as the
        // sender sent them, instead of a data segment, its ACK and a bare FIN (the usual
        // short request/response where the server answers and closes).
        if n < buf.capacity() && peer_finished(r) {
            write_before_fin(w, &buf[..n]).await?;
        } else {
            w.write_all(&buf[..n]).await?;
        }
        match side {
            Side::Up => acct.up(n),
            Side::Down => acct.down(n),
        }
    }
}

/// Whether the peer's FIN has arrived (epoll reported RDHUP), without a syscall: tokio
/// keeps the read-closed bit once seen, so this is a look at the cached readiness.
fn peer_finished(r: &ReadHalf<'_>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let ready = pin!(r.ready(Interest::READABLE));
    matches!(ready.poll(&mut cx), Poll::Ready(Ok(ready)) if ready.is_read_closed())
}

/// Writes all of `data` with MSG_MORE: the kernel holds it until the shutdown (or close)
/// that follows adds the FIN, then sends both together.
async fn write_before_fin(w: &WriteHalf<'_>, mut data: &[u8]) -> io::Result<()> {
    let stream: &TcpStream = w.as_ref();
    while !data.is_empty() {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                socket2::SockRef::from(stream)
                    .send_with_flags(data, libc::MSG_MORE | libc::MSG_NOSIGNAL)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
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
