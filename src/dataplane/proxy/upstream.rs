//! Choosing an upstream: round robin over the listener's list, skipping an upstream whose
//! last connect failed until its cool-down has passed. Lock-free: one atomic cursor and
//! one atomic "failed until" timestamp per upstream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One listener's upstreams.
#[derive(Debug)]
pub struct Upstreams {
    addrs: Vec<SocketAddr>,
    /// Per upstream: milliseconds since `epoch` before which it is skipped (0 = healthy).
    failed_until: Vec<AtomicU64>,
    next: AtomicUsize,
    cooldown: Duration,
    epoch: Instant,
}

impl Upstreams {
    pub fn new(addrs: Vec<SocketAddr>, cooldown: Duration) -> Upstreams {
        let failed_until = addrs.iter().map(|_| AtomicU64::new(0)).collect();
        Upstreams {
            addrs,
            failed_until,
            next: AtomicUsize::new(0),
            cooldown,
            epoch: Instant::now(),
        }
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The next upstream in turn that is not cooling down; when all are, the next in turn
    /// anyway (trying beats refusing). `None` only for an empty list.
    pub fn pick(&self, now: Instant) -> Option<(usize, SocketAddr)> {
        let n = self.addrs.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now_ms = self.ms(now);
        (0..n)
            .map(|i| (start.wrapping_add(i)) % n)
            .find(|&i| self.failed_until[i].load(Ordering::Relaxed) <= now_ms)
            .or(Some(start % n))
            .map(|i| (i, self.addrs[i]))
    }

    /// A connect to upstream `i` failed: skip it for the cool-down.
    pub fn mark_failed(&self, i: usize, now: Instant) {
        if let Some(f) = self.failed_until.get(i) {
            let until = self.ms(now) + self.cooldown.as_millis() as u64;
            f.store(until.max(1), Ordering::Relaxed);
        }
    }

    /// A connect to upstream `i` succeeded.
    pub fn mark_ok(&self, i: usize) {
        if let Some(f) = self.failed_until.get(i)
            && f.load(Ordering::Relaxed) != 0
        {
            f.store(0, Ordering::Relaxed);
        }
    }
}

/// Opens a TCP connection to `addr` with `TCP_NODELAY` set, the way the relays want it.
///
/// Unlike `TcpStream::connect`, a successful connect costs no `getsockopt(SO_ERROR)`: on
/// Linux a non-blocking connect that fails reports `EPOLLERR`/`EPOLLHUP` with its
/// writability, so the readiness alone tells success from failure, and the error is read
/// only on the failure path. One syscall less per proxied connection (the L4 conn/s
/// profile against HAProxy, which does the same).
pub async fn connect(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    use tokio::io::Interest;
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    sock.set_tcp_nodelay(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = tokio::net::TcpStream::from_std(std::net::TcpStream::from(sock))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        let err = stream.take_error()?;
        return Err(err.unwrap_or_else(|| std::io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connect that succeeds yields a stream with TCP_NODELAY that carries bytes; one to
    /// a closed port fails (learnt from readiness, not from a `getsockopt` on success).
    #[tokio::test]
    async fn connect_succeeds_with_nodelay_and_reports_refusal() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = l.local_addr().unwrap();
        let (mut s, accepted) = tokio::join!(async { connect(to).await.unwrap() }, l.accept());
        let (mut a, _) = accepted.unwrap();
        assert!(s.nodelay().unwrap(), "an upstream connection must have TCP_NODELAY");
        s.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");

        // A port nobody listens on: take one from a listener, then close it.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let r = tokio::time::timeout(Duration::from_secs(5), connect(dead)).await;
        let err = r.expect("a refused connect must not hang").expect_err("nobody listens there");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[test]
    fn round_robin_skips_failed_until_cooldown() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let u = Upstreams::new(vec![a, b], Duration::from_secs(10));
        let t = Instant::now();
        let picks: Vec<_> = (0..4).map(|_| u.pick(t).unwrap().1).collect();
        assert_eq!(picks, vec![a, b, a, b]);
        u.mark_failed(0, t);
        assert!((0..4).all(|_| u.pick(t).unwrap().1 == b));
        let later = t + Duration::from_secs(11);
        let picks: Vec<_> = (0..2).map(|_| u.pick(later).unwrap().1).collect();
        assert!(picks.contains(&a));
        u.mark_failed(0, t);
        u.mark_failed(1, t);
        assert!(u.pick(t).is_some(), "all cooling down still yields one");
    }
}
