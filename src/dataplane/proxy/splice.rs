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
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;

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
        let mut buf = std::mem::take(&mut self.0);
        // A relay that ended mid-chunk (cut, idle, an error) leaves bytes in its buffer:
        // they belong to that connection and must never reach the next one.
        buf.clear();
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
    let relay =
        Relay { client, upstream, acct, up: Half::new(Side::Up), down: Half::new(Side::Down) };
    tokio::select! {
        // Fixed order (no per-poll random start): each arm is cheap to poll when not ready.
        biased;
        r = relay => match r {
            Ok(()) => SpliceEnd::Closed,
            Err(e) => SpliceEnd::Error(e),
        },
        () = cut.cut() => SpliceEnd::Cut,
        () = idle_timer(idle, acct.conntrack, acct.entry) => SpliceEnd::Idle,
    }
}

#[derive(Clone, Copy)]
enum Side {
    Up,
    Down,
}

impl Accounting<'_> {
    #[inline]
    fn count(&self, side: Side, n: usize) {
        match side {
            Side::Up => self.add(
                n,
                self.entry.bytes_orig(),
                self.entry.packets_orig(),
                &self.counters.bytes_up,
            ),
            Side::Down => self.add(
                n,
                self.entry.bytes_reply(),
                self.entry.packets_reply(),
                &self.counters.bytes_down,
            ),
        }
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

/// Both directions as one hand-written future over `&TcpStream` readiness, rather than two
/// `async` read → write loops joined: the whole relay is a few words (the per-connection
/// task stays small, and tokio copies a task's future when it spawns and finishes it), and
/// each direction knows whether the other has ended without shared flags.
struct Relay<'a, 'b> {
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    acct: &'a Accounting<'b>,
    up: Half,
    down: Half,
}

/// One direction: read a chunk, write all of it, count it; on EOF shut the writer down
/// (half-close) and stop.
struct Half {
    side: Side,
    /// Held only while there are bytes to move: taken from the thread's pool when the
    /// reader is ready, given back whenever this direction waits for its reader with
    /// nothing left to write. An idle connection holds no buffer (as HAProxy's buffers are
    /// allocated on demand), so ten thousand idle tunnels do not pin 640 MiB.
    buf: Option<Buf>,
    /// Bytes of `buf` already written.
    written: usize,
    /// The chunk in `buf` is the peer's last (its FIN is queued behind it): write it with
    /// MSG_MORE so that it leaves with our FIN in one segment.
    last: bool,
    done: bool,
}

impl Half {
    fn new(side: Side) -> Half {
        Half { side, buf: None, written: 0, last: false, done: false }
    }

    /// Moves bytes from `r` to `w` until `r` has nothing more for now (Pending), `r` ends
    /// (Ready(Ok), the writer shut down unless `other_done`), or either side fails.
    ///
    /// `other_done`: the opposite direction has already ended, so the connection is about
    /// to be dropped and its close sends the FIN: a `shutdown` would be one more syscall
    /// for the same packet.
    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        r: &TcpStream,
        w: &TcpStream,
        acct: &Accounting<'_>,
        other_done: bool,
    ) -> Poll<io::Result<()>> {
        loop {
            // Write out what was read.
            if let Some(Buf(buf)) = &mut self.buf {
                while self.written < buf.len() {
                    ready!(w.poll_write_ready(cx))?;
                    let rest = &buf[self.written..];
                    let sent = if self.last { send_more(w, rest) } else { w.try_write(rest) };
                    match sent {
                        Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Ok(n) => self.written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                if !buf.is_empty() {
                    acct.count(self.side, buf.len());
                    buf.clear();
                    self.written = 0;
                }
            }
            if r.poll_read_ready(cx)?.is_pending() {
                // Nothing to write and nothing to read: wait without a buffer.
                self.buf = None;
                return Poll::Pending;
            }
            let Buf(buf) = self.buf.get_or_insert_with(Buf::take);
            match read_chunk(r, buf, &mut self.last) {
                Ok(0) => {
                    acct.entry.set_state(FlowState::Closing);
                    self.done = true;
                    if !other_done {
                        // The peer may already be gone; its own direction reports that.
                        let _ = socket2::SockRef::from(w).shutdown(std::net::Shutdown::Write);
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    if self.last {
                        // The peer's last bytes went out with MSG_MORE, held for a FIN
                        // that will not come: the relay ends in an error and the caller
                        // resets `w`, which would discard them. Push them first, so the
                        // other side receives what this one sent before it failed (as it
                        // would without a proxy in between), and only then the reset.
                        let _ = socket2::SockRef::from(w).set_tcp_cork(false);
                    }
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl Future for Relay<'_, '_> {
    type Output = io::Result<()>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.up.done {
            let down_done = this.down.done;
            if let Poll::Ready(Err(e)) =
                this.up.poll_relay(cx, this.client, this.upstream, this.acct, down_done)
            {
                return Poll::Ready(Err(e));
            }
        }
        if !this.down.done {
            let up_done = this.up.done;
            if let Poll::Ready(Err(e)) =
                this.down.poll_relay(cx, this.upstream, this.client, this.acct, up_done)
            {
                return Poll::Ready(Err(e));
            }
        }
        if this.up.done && this.down.done { Poll::Ready(Ok(())) } else { Poll::Pending }
    }
}

/// One `recv` into `buf`'s spare capacity (never zeroed: thousands of short connections
/// each set up two buffers). Returns the byte count, 0 at EOF.
///
/// A short read drained the socket. If the sender has already closed (FIN queued behind
/// the data), these are its last bytes: `last` is set, and sent with MSG_MORE they wait for
/// our FIN and leave in one segment with it, as the sender sent them, instead of a data
/// segment, its ACK and a bare FIN (the usual short request/response where the server
/// answers and closes). Otherwise tokio is told the socket is drained (its readiness is
/// cleared as on `EAGAIN`, unless a newer epoll event has arrived meanwhile), so the next
/// poll waits for epoll's next edge instead of spending a `recv` to learn `EAGAIN`: one
/// syscall less per short read, which is most reads of a short connection.
fn read_chunk(r: &TcpStream, buf: &mut Vec<u8>, last: &mut bool) -> io::Result<usize> {
    let mut drained = None;
    let res = r.try_io(Interest::READABLE, || {
        let spare = buf.spare_capacity_mut();
        let room = spare.len();
        let n = socket2::SockRef::from(r).recv(spare)?;
        // SAFETY: `recv` initialised the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        *last = n > 0 && n < room && peer_finished(r);
        if n > 0 && n < room && !*last {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (res, drained) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (res, _) => res,
    }
}

/// Whether the peer's FIN has arrived (epoll reported RDHUP), without a syscall: tokio
/// keeps the read-closed bit once seen, so this is a look at the cached readiness.
fn peer_finished(r: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let ready = pin!(r.ready(Interest::READABLE));
    matches!(ready.poll(&mut cx), Poll::Ready(Ok(ready)) if ready.is_read_closed())
}

/// One non-blocking send with MSG_MORE: the kernel holds the bytes until the shutdown (or
/// close) that follows adds the FIN, then sends both together.
fn send_more(w: &TcpStream, data: &[u8]) -> io::Result<usize> {
    w.try_io(Interest::WRITABLE, || {
        socket2::SockRef::from(w).send_with_flags(data, libc::MSG_MORE | libc::MSG_NOSIGNAL)
    })
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::conntrack::{ConntrackConfig, EntryInit};
    use crate::flow::{FlowKey, Proto};
    use crate::policy::Generation;

    /// A client, the proxy's two sides (from the client, to the upstream) and the
    /// upstream, connected on loopback.
    async fn sockets() -> [TcpStream; 4] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = l.local_addr().unwrap();
        let client = TcpStream::connect(to).await.unwrap();
        let (proxy_in, _) = l.accept().await.unwrap();
        let proxy_out = TcpStream::connect(to).await.unwrap();
        let (upstream, _) = l.accept().await.unwrap();
        [client, proxy_in, proxy_out, upstream]
    }

    /// What a relay accounts to: a table, the client's entry, a listener's counters.
    struct Flow {
        conntrack: Conntrack,
        entry: Entry,
        counters: ListenerCounters,
    }

    impl Flow {
        fn new(client: &TcpStream) -> Flow {
            let conntrack = Conntrack::new(&ConntrackConfig { capacity: 64, ..Default::default() });
            let key =
                FlowKey::new(Proto::Tcp, client.local_addr().unwrap(), client.peer_addr().unwrap());
            let init = EntryInit::plain(FlowState::Open, Generation(1));
            let entry = Entry::new(&key, init, None, 0);
            Flow { conntrack, entry, counters: ListenerCounters::default() }
        }

        fn accounting(&self) -> Accounting<'_> {
            Accounting { conntrack: &self.conntrack, entry: &self.entry, counters: &self.counters }
        }
    }

    fn pooled() -> usize {
        POOL.with(|p| p.borrow().len())
    }

    /// An idle connection holds no relay buffer: both directions give theirs back to the
    /// thread's pool while they wait, and take one again when bytes come.
    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_relay_holds_no_buffer() {
        let [mut client, mut proxy_in, mut proxy_out, mut upstream] = sockets().await;
        let flow = Flow::new(&client);
        let (acct, cut) = (flow.accounting(), CutSignal::default());
        let counters = &flow.counters;
        POOL.with(|p| p.borrow_mut().clear());

        let relay = splice(&mut proxy_in, &mut proxy_out, Duration::from_secs(60), &cut, &acct);
        let mut relay = std::pin::pin!(relay);
        let peer = async {
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            upstream.read_exact(&mut got).await.unwrap();
            upstream.write_all(b"pong").await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
            // Both ways have carried bytes and now wait. Each direction gave its buffer
            // back before waiting, so the reply reused the request's: one buffer, pooled.
            tokio::task::yield_now().await;
            assert_eq!(pooled(), 1, "an idle relay kept its buffer");
        };
        tokio::select! {
            () = peer => {}
            end = &mut relay => panic!("the relay ended early: {end:?}"),
        }
        assert_eq!(counters.bytes_up.load(Ordering::Relaxed), 4);
        assert_eq!(counters.bytes_down.load(Ordering::Relaxed), 4);
    }

    /// An upstream that answers and then resets (it closed with the client's bytes
    /// unread): its answer reaches the client before the reset does. The answer is the
    /// upstream's last bytes, relayed with MSG_MORE; the reset that follows must not
    /// discard them.
    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_before_an_upstream_reset_reaches_the_client() {
        let [mut client, mut proxy_in, mut proxy_out, mut upstream] = sockets().await;

        // The client's bytes reach the upstream, which answers and closes without reading
        // them: the kernel sends its answer, then a reset. Both are waiting at the proxy
        // before the relay starts.
        proxy_out.write_all(b"hello").await.unwrap();
        let mut peek = [0u8; 5];
        while upstream.peek(&mut peek).await.unwrap() < 5 {}
        upstream.write_all(b"ok").await.unwrap();
        drop(upstream);
        tokio::time::sleep(Duration::from_millis(50)).await;

        let flow = Flow::new(&client);
        let (acct, cut) = (flow.accounting(), CutSignal::default());
        let end = splice(&mut proxy_in, &mut proxy_out, Duration::from_secs(5), &cut, &acct).await;
        assert!(matches!(end, SpliceEnd::Error(_)), "{end:?}");
        // What the proxy does on an error: reset both sides.
        let _ = socket2::SockRef::from(&proxy_in).set_linger(Some(Duration::ZERO));
        drop(proxy_in);
        let mut ok = [0u8; 2];
        client.read_exact(&mut ok).await.expect("the answer, before the reset");
        assert_eq!(&ok, b"ok");
    }

    #[test]
    fn a_pooled_buffer_comes_back_empty() {
        // A relay cut mid-chunk drops its buffer with bytes in it; the next connection on
        // this thread takes the same buffer from the pool.
        let mut b = Buf::take();
        b.0.extend_from_slice(b"the previous connection's bytes");
        let ptr = b.0.as_ptr();
        drop(b);
        let again = Buf::take();
        assert_eq!(again.0.as_ptr(), ptr, "the buffer should come from this thread's pool");
        assert!(again.0.is_empty(), "a pooled buffer kept {} stale bytes", again.0.len());
    }
}
