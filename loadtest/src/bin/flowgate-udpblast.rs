//! A UDP packet-rate driver for packet_vs_nft's 64-byte pps rows: one `iperf3 -u` sender is
//! a single thread doing one `sendto` per datagram and caps at its own rate, well below what
//! a forwarding path carries, so the row would measure iperf3, not the path.
//!
//! ```text
//! flowgate-udpblast recv --bind 198.18.2.2:5201 [--threads 2] [--secs 10]
//! flowgate-udpblast send --to 198.18.2.2:5201 [--threads 2] [--secs 4] [--size 64] [--count N]
//! ```
//!
//! - `recv`: `--threads` sockets bound to one address with SO_REUSEPORT (the kernel spreads
//!   the senders' flows over them by 4-tuple), each draining with `recvmmsg` in batches of
//!   64. The first datagram of every new source is answered once, so the flow has seen a
//!   reply (the kernel's conntrack calls it established, as it does iperf3's UDP test, whose
//!   server answers too). Prints `ready` once bound, then, when no datagram came for 1 s
//!   after the first or at `--secs`, one JSON line: `{"bench":"udpblast_recv","received":N,
//!   "secs":S,"pps":P}` with S from the first datagram to the last.
//! - `send`: `--threads` threads, each with its own connected socket (its own source port,
//!   so its own flow), sends one datagram and waits up to 2 s for the answer (retrying every
//!   200 ms), then sends `--size`-byte datagrams with `sendmmsg` in batches of 64 for
//!   `--secs` or until `--count` datagrams in all. Prints `{"bench":"udpblast_send",
//!   "sent":N,"secs":S,"pps":P,"answered":K}`.
//!
//! Every loop is bounded by its time limit; a sender that gets no answer still sends (the
//! receiver counts what arrives either way).

use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

const BATCH: usize = 64;
/// The largest datagram `recv` takes whole; larger ones are truncated (and still counted).
const RECV_BUF: usize = 2048;

struct Args {
    mode: String,
    addr: SocketAddr,
    threads: usize,
    secs: f64,
    size: usize,
    count: u64,
}

fn usage() -> String {
    "usage: flowgate-udpblast recv --bind ADDR:PORT [--threads N] [--secs S]\n\
     \x20      flowgate-udpblast send --to ADDR:PORT [--threads N] [--secs S] [--size B] [--count N]"
        .into()
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or_else(usage)?;
    if mode != "recv" && mode != "send" {
        return Err(usage());
    }
    let (mut addr, mut threads, mut secs, mut size, mut count) = (None, 2, 4.0, 64, u64::MAX);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{k} {v}: {e}");
        match k.as_str() {
            "--bind" | "--to" => addr = Some(v.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--threads" => threads = v.parse::<usize>().map_err(|e| bad(&e))?.clamp(1, 64),
            "--secs" => secs = v.parse::<f64>().map_err(|e| bad(&e))?.clamp(0.1, 600.0),
            "--size" => size = v.parse::<usize>().map_err(|e| bad(&e))?.clamp(1, 1472),
            "--count" => count = v.parse::<u64>().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown argument {k}\n{}", usage())),
        }
    }
    let addr = addr.ok_or_else(|| format!("{mode} needs an address\n{}", usage()))?;
    Ok(Args { mode, addr, threads, secs, size, count })
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flowgate-udpblast: {e}");
            std::process::exit(2);
        }
    };
    let r = if args.mode == "recv" { recv(&args) } else { send(&args) };
    if let Err(e) = r {
        eprintln!("flowgate-udpblast {}: {e}", args.mode);
        std::process::exit(1);
    }
}

fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
}

/// SO_RCVBUFFORCE/SO_SNDBUFFORCE (root: past the sysctl cap), else the capped option.
fn big_buffers(s: &Socket) {
    const BYTES: libc::c_int = 8 << 20;
    for (force, plain) in
        [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)]
    {
        let set = |opt| {
            // SAFETY: a valid socket and a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&BYTES as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            set(plain);
        }
    }
}

/// What one receiving socket saw.
#[derive(Default)]
struct Seen {
    received: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

fn recv(a: &Args) -> io::Result<()> {
    let mut socks = Vec::with_capacity(a.threads);
    for _ in 0..a.threads {
        let s = udp_socket(a.addr)?;
        s.set_reuse_port(true)?;
        big_buffers(&s);
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        s.bind(&a.addr.into())?;
        socks.push(UdpSocket::from(s));
    }
    println!("ready");
    let deadline = Instant::now() + Duration::from_secs_f64(a.secs);
    // The newest datagram any socket saw, in µs since `t0`: a socket whose share of the
    // flows is empty must not end the run while the others still receive.
    let t0 = Instant::now();
    let newest = Arc::new(AtomicU64::new(0));
    let seen: Vec<Seen> = std::thread::scope(|sc| {
        let handles: Vec<_> = socks
            .iter()
            .map(|s| {
                let newest = Arc::clone(&newest);
                sc.spawn(move || drain(s, deadline, t0, &newest))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let received: u64 = seen.iter().map(|s| s.received).sum();
    let first = seen.iter().filter_map(|s| s.first).min();
    let last = seen.iter().filter_map(|s| s.last).max();
    let secs = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    let pps = if secs > 0.0 { received as f64 / secs } else { 0.0 };
    println!(
        "{{\"bench\":\"udpblast_recv\",\"received\":{received},\"secs\":{secs:.6},\"pps\":{pps:.0}}}"
    );
    Ok(())
}

/// One socket's loop: `recvmmsg` until `deadline`, or 1 s of silence on every socket after
/// the first datagram.
fn drain(s: &UdpSocket, deadline: Instant, t0: Instant, newest: &AtomicU64) -> Seen {
    let mut seen = Seen::default();
    let mut bufs = vec![[0u8; RECV_BUF]; BATCH];
    let mut names: Vec<libc::sockaddr_storage> =
        // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
        vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: RECV_BUF })
        .collect();
    // SAFETY: mmsghdr is plain data; all zeroes is a valid (empty) value, filled below.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut answered: HashSet<SocketAddr> = HashSet::new();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let newest_us = newest.load(Ordering::Relaxed);
        if newest_us > 0 && now.duration_since(t0) > Duration::from_micros(newest_us + 1_000_000) {
            break;
        }
        for i in 0..BATCH {
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msgs[i].msg_len = 0;
        }
        // SAFETY: `msgs` holds BATCH headers whose iovecs and names point into `bufs` and
        // `names`, which outlive the call; the timeout (SO_RCVTIMEO) bounds the wait.
        let n = unsafe {
            libc::recvmmsg(
                s.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let at = Instant::now();
        seen.received += n as u64;
        seen.first.get_or_insert(at);
        seen.last = Some(at);
        newest.fetch_max(at.duration_since(t0).as_micros() as u64, Ordering::Relaxed);
        for name in &names[..n as usize] {
            if let Some(from) = sockaddr(name)
                && answered.len() < 4096
                && answered.insert(from)
            {
                let _ = s.send_to(b"ok", from);
            }
        }
    }
    seen
}

fn sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4 = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(v4.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6 = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(v6.sin6_port))))
        }
        _ => None,
    }
}

fn send(a: &Args) -> io::Result<()> {
    let mut socks = Vec::with_capacity(a.threads);
    for _ in 0..a.threads {
        let s = udp_socket(a.addr)?;
        big_buffers(&s);
        s.connect(&a.addr.into())?;
        socks.push(UdpSocket::from(s));
    }
    let per_thread = a.count.div_ceil(a.threads as u64).max(1);
    let payload = vec![0x5au8; a.size];
    let secs = Duration::from_secs_f64(a.secs);
    let started = Instant::now();
    let results: Vec<io::Result<(u64, bool)>> = std::thread::scope(|sc| {
        let handles: Vec<_> =
            socks.iter().map(|s| sc.spawn(|| blast(s, &payload, secs, per_thread))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("sender panicked"))))
            .collect()
    });
    let took = started.elapsed().as_secs_f64();
    let (mut sent, mut answered) = (0, 0);
    for r in results {
        let (n, ok) = r?;
        sent += n;
        answered += u64::from(ok);
    }
    println!(
        "{{\"bench\":\"udpblast_send\",\"sent\":{sent},\"secs\":{took:.6},\"pps\":{:.0},\"answered\":{answered}}}",
        sent as f64 / took.max(1e-9)
    );
    Ok(())
}

/// One sender: the hello and its answer, then batches until `secs` or `count`.
fn blast(s: &UdpSocket, payload: &[u8], secs: Duration, count: u64) -> io::Result<(u64, bool)> {
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut answered = false;
    let hello = Instant::now();
    let mut buf = [0u8; 64];
    while !answered && hello.elapsed() < Duration::from_secs(2) {
        // Refused (ICMP port unreachable before the receiver binds) is worth a retry too.
        let _ = s.send(payload);
        answered = s.recv(&mut buf).is_ok();
    }
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec { iov_base: payload.as_ptr() as *mut _, iov_len: payload.len() })
        .collect();
    // SAFETY: mmsghdr is plain data; all zeroes is a valid (empty) value, filled below.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < count && start.elapsed() < secs {
        let want = (count - sent).min(BATCH as u64) as libc::c_uint;
        // SAFETY: the first `want` headers point at `payload` (read only, outlives the
        // call); the socket is connected, so no address.
        let n = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), want, 0) };
        if n > 0 {
            sent += n as u64;
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            // A full queue or a refused datagram (ICMP from the path): keep sending.
            Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED | libc::EINTR) => {}
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok((sent, answered))
}
