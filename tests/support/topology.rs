//! The packet dataplane's test world: three network namespaces, client — gateway — server,
//! joined by two veth pairs, with the gateway either forwarding in the kernel or routing
//! everything it forwards through a TUN device; a trivial TUN forwarder (read a batch,
//! write it back unchanged) and a ping and a TCP transfer run from inside the namespaces.
//!
//! ```text
//!  client ns                 gateway ns                          server ns
//!  eth0 198.18.1.2/24 ─── gw-c 198.18.1.1   gw-s 198.18.2.1 ─── eth0 198.18.2.2/24
//!                               └── iif gw-c|gw-s → table 100 → TUN ──┘ (TUN mode)
//! ```
//!
//! Namespace names carry the test process's pid and a per-process counter, so tests (and
//! test binaries) run in parallel; each namespace is deleted when the [`Topology`] drops —
//! also when the test panics — which removes its interfaces with it. Interface names are
//! fixed: they only need to be unique inside their namespace, and every link is created
//! directly in the namespace it lives in (`ip -n`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowgate::dataplane::packet::tun::{Batch, Offloads, Queue, Tun, TunError, VnetHdr};

use super::netns::{Netns, sh};
use super::require::Need;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const GW_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const GW_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// The gateway's interface towards the client, and towards the server.
pub const GW_CLIENT_IF: &str = "gw-c";
pub const GW_SERVER_IF: &str = "gw-s";
/// The routing table the gateway's policy rules send forwarded traffic to (TUN mode).
pub const TUN_TABLE: u32 = 100;

/// What the TUN tests need besides root: the TUN driver.
pub fn need_tun() -> Need {
    Need::Machine {
        what: "the TUN driver (/dev/net/tun)",
        missing: (!std::path::Path::new("/dev/net/tun").exists())
            .then(|| "/dev/net/tun is missing (modprobe tun)".to_string()),
    }
}

/// The three namespaces. Built in kernel-forwarding mode; [`Topology::route_through`]
/// turns it into TUN mode once the TUN device exists in the gateway.
pub struct Topology {
    pub client: Netns,
    pub gateway: Netns,
    pub server: Netns,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Topology {
    /// Client — gateway — server, addressed and routed, with IPv4 forwarding on in the
    /// gateway: traffic from the client to the server is forwarded by the kernel.
    pub fn kernel() -> Topology {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Declared (and so dropped) one by one: a panic half-way deletes what exists.
        let client = Netns::new(&format!("pkt{n}c"));
        let gateway = Netns::new(&format!("pkt{n}g"));
        let server = Netns::new(&format!("pkt{n}s"));
        let (c, g, s) = (&client.name, &gateway.name, &server.name);
        sh(&format!("ip -n {g} link add {GW_CLIENT_IF} type veth peer name eth0 netns {c}"));
        sh(&format!("ip -n {g} link add {GW_SERVER_IF} type veth peer name eth0 netns {s}"));
        gateway.exec(&format!(
            "ip addr add {GW_CLIENT_SIDE}/24 dev {GW_CLIENT_IF} && \
             ip addr add {GW_SERVER_SIDE}/24 dev {GW_SERVER_IF} && \
             ip link set {GW_CLIENT_IF} up && ip link set {GW_SERVER_IF} up && \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
               net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.all.send_redirects=0"
        ));
        client.exec(&format!(
            "ip addr add {CLIENT}/24 dev eth0 && ip link set eth0 up && \
             ip route add default via {GW_CLIENT_SIDE}"
        ));
        server.exec(&format!(
            "ip addr add {SERVER}/24 dev eth0 && ip link set eth0 up && \
             ip route add default via {GW_SERVER_SIDE}"
        ));
        Topology { client, gateway, server }
    }

    /// TUN mode: brings `tun` (already created in the gateway namespace) up and routes
    /// everything arriving on either veth into it; what the TUN writes back arrives with
    /// `iif tun`, matches neither rule and is routed on by the main table. The gateway's
    /// own addresses stay reachable (the `local` table's rule, preference 0, comes first).
    pub fn route_through(&self, tun: &str) {
        self.gateway.exec(&format!(
            "ip link set {tun} up && \
             sysctl -qw net.ipv4.conf.{tun}.rp_filter=0 && \
             ip route add default dev {tun} table {TUN_TABLE} && \
             ip rule add iif {GW_CLIENT_IF} lookup {TUN_TABLE} pref 100 && \
             ip rule add iif {GW_SERVER_IF} lookup {TUN_TABLE} pref 101"
        ));
    }
}

/// Runs a command in `ns` and returns its output (bounded by the command itself: give it
/// a timeout).
pub fn output_in(ns: &Netns, cmd: &str) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c", cmd])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ip netns exec runs")
}

/// Runs `f` on a new thread that has entered `ns` (`setns(CLONE_NEWNET)`), and returns
/// its result: sockets and TUN devices it opens live in the namespace. Panics propagate.
pub fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            enter(ns);
            f()
        });
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn enter(ns: &Netns) {
    let f = std::fs::File::open(format!("/var/run/netns/{}", ns.name)).expect("netns file");
    // SAFETY: a valid namespace fd; CLONE_NEWNET changes only this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {}: {}", ns.name, std::io::Error::last_os_error());
}

/// Creates the TUN device `name` inside `ns` (the device belongs to the namespace of the
/// thread that opens it).
pub fn open_tun(ns: &Netns, name: &str, queues: usize, offloads: Offloads) -> Tun {
    in_ns(ns, || Tun::open(name, queues, offloads)).unwrap_or_else(|e| panic!("{e}"))
}

/// What a forwarder saw, readable while it runs.
#[derive(Default)]
pub struct Seen {
    /// Frames read (and written back).
    pub frames: AtomicU64,
    /// IP bytes read (without the virtio-net header).
    pub bytes: AtomicU64,
    /// Frames that were GSO super-packets (`gso_type != NONE`).
    pub gso_frames: AtomicU64,
    /// Frames of more than 1500 IP bytes.
    pub over_mtu: AtomicU64,
    /// The largest IP packet read.
    pub max_packet: AtomicU64,
    /// ICMPv4 echo requests from the client to the server, and replies back.
    pub echo_requests: AtomicU64,
    pub echo_replies: AtomicU64,
    /// Writes the kernel refused (a full backlog: dropped, as a real worker would).
    pub write_errors: AtomicU64,
    /// The header of the first super-packet seen.
    pub first_gso: Mutex<Option<(VnetHdr, usize)>>,
}

impl Seen {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn note(&self, vnet: VnetHdr, ip: &[u8]) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(ip.len() as u64, Ordering::Relaxed);
        self.max_packet.fetch_max(ip.len() as u64, Ordering::Relaxed);
        if ip.len() > 1500 {
            self.over_mtu.fetch_add(1, Ordering::Relaxed);
        }
        if vnet.is_gso() && self.gso_frames.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.first_gso.lock().unwrap() = Some((vnet, ip.len()));
        }
        // IPv4, protocol ICMP: count echo requests client→server and replies back.
        if ip.len() >= 28 && ip[0] >> 4 == 4 && ip[9] == 1 {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let (src, dst) = (&ip[12..16], &ip[16..20]);
            match ip.get(ihl) {
                Some(8) if src == CLIENT.octets() && dst == SERVER.octets() => {
                    self.echo_requests.fetch_add(1, Ordering::Relaxed);
                }
                Some(0) if src == SERVER.octets() && dst == CLIENT.octets() => {
                    self.echo_replies.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
}

/// The trivial TUN forwarder: one thread per queue, each waking on its fd, reading a
/// batch and writing every frame back unchanged. Stops when dropped (or at `limit`).
pub struct Forwarder {
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<(), TunError>>>,
}

impl Forwarder {
    /// Starts one thread per queue; each stops by itself after `limit`.
    pub fn start(queues: Vec<Queue>, limit: Duration) -> Forwarder {
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = queues
            .into_iter()
            .map(|q| {
                let (seen, stop) = (seen.clone(), stop.clone());
                std::thread::spawn(move || forward(&q, &seen, &stop, limit))
            })
            .collect();
        Forwarder { seen, stop, threads }
    }

    /// Stops the threads and returns the first error one of them ended with.
    pub fn finish(mut self) -> Result<Arc<Seen>, TunError> {
        self.stop.store(true, Ordering::Relaxed);
        let mut result = Ok(());
        for t in self.threads.drain(..) {
            let r = t.join().expect("forwarder thread does not panic");
            if result.is_ok() {
                result = r;
            }
        }
        result.map(|()| self.seen.clone())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// read batch → note → write back unchanged, until `stop` or `limit`.
fn forward(q: &Queue, seen: &Seen, stop: &AtomicBool, limit: Duration) -> Result<(), TunError> {
    let end = Instant::now() + limit;
    let mut batch = Batch::new(32);
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        if !q.wait_readable(Duration::from_millis(20))? {
            continue;
        }
        q.recv_batch(&mut batch)?;
        for p in batch.iter() {
            seen.note(p.vnet, p.bytes);
        }
        if let Err(e) = q.send_batch(&batch) {
            // A full backlog drops the rest of the burst, as a real worker would.
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
            seen.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Sends `count` ICMP echo requests (raw socket) from inside `ns` to `dst`, one at a
/// time, each waiting up to a second for its reply; returns how many were answered.
pub fn ping(ns: &Netns, dst: Ipv4Addr, count: u16) -> u16 {
    ping_from(ns, None, dst, count)
}

/// [`ping`] from the source address `src` when given (a namespace with several addresses:
/// each source gets its own echo identifier, and only replies to that address count).
pub fn ping_from(ns: &Netns, src: Option<Ipv4Addr>, dst: Ipv4Addr, count: u16) -> u16 {
    in_ns(ns, || {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).expect("raw socket");
        if let Some(src) = src {
            s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into()).expect("bind raw socket");
        }
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let to = SocketAddr::V4(SocketAddrV4::new(dst, 0)).into();
        let ident =
            (std::process::id() & 0xffff) as u16 ^ src.map_or(0, |a| u16::from(a.octets()[3]));
        let mut answered = 0;
        for seq in 0..count {
            let mut req = [0u8; 64];
            req[0] = 8; // echo request
            req[4..6].copy_from_slice(&ident.to_be_bytes());
            req[6..8].copy_from_slice(&seq.to_be_bytes());
            let sum = inet_checksum(&req);
            req[2..4].copy_from_slice(&sum.to_be_bytes());
            s.send_to(&req, &to).expect("send echo request");
            let end = Instant::now() + Duration::from_secs(1);
            while Instant::now() < end {
                let mut buf = [0u8; 1500];
                let Ok(n) = (&s).read(&mut buf) else { continue };
                let got = &buf[..n];
                if n < 20 {
                    continue;
                }
                // A raw IPv4 socket returns the IP header too.
                let ihl = usize::from(got[0] & 0x0f) * 4;
                let Some(icmp) = got.get(ihl..) else { continue };
                if got[12..16] == dst.octets()
                    && src.is_none_or(|a| got[16..20] == a.octets())
                    && icmp.len() >= 8
                    && icmp[0] == 0
                    && icmp[4..6] == ident.to_be_bytes()
                    && icmp[6..8] == seq.to_be_bytes()
                {
                    answered += 1;
                    break;
                }
            }
        }
        answered
    })
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP transfer of `bytes` from the client namespace to a server in the server
/// namespace (port chosen by the kernel), which answers with the count it received.
/// Returns that count; every step is bounded by `limit`.
pub fn tcp_transfer(topo: &Topology, bytes: u64, limit: Duration) -> u64 {
    tcp_transfer_between(&topo.client, &topo.server, SERVER, bytes, limit)
}

/// [`tcp_transfer`] between any two namespaces, the server listening on `server_addr`.
pub fn tcp_transfer_between(
    client: &Netns,
    server_ns: &Netns,
    server_addr: Ipv4Addr,
    bytes: u64,
    limit: Duration,
) -> u64 {
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            in_ns(server_ns, || {
                let l = TcpListener::bind((server_addr, 0)).expect("bind in server ns");
                port_tx.send(l.local_addr().unwrap().port()).unwrap();
                l.set_nonblocking(true).unwrap();
                let end = Instant::now() + limit;
                let mut conn = loop {
                    match l.accept() {
                        Ok((c, _)) => break c,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            assert!(Instant::now() < end, "no connection within {limit:?}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(limit)).unwrap();
                let mut got = 0u64;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got += n as u64,
                        Err(e) => panic!("server read after {got} bytes: {e}"),
                    }
                }
                conn.write_all(&got.to_be_bytes()).expect("server answers");
                got
            })
        });
        let port = port_rx.recv_timeout(limit).expect("server bound");
        let counted = in_ns(client, || {
            let to = SocketAddr::V4(SocketAddrV4::new(server_addr, port));
            let mut c = TcpStream::connect_timeout(&to, limit).expect("connect through gateway");
            c.set_write_timeout(Some(limit)).unwrap();
            c.set_read_timeout(Some(limit)).unwrap();
            let chunk = vec![0x5au8; 256 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                c.write_all(&chunk[..n]).expect("client writes");
                left -= n as u64;
            }
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = [0u8; 8];
            c.read_exact(&mut answer).expect("server's count");
            u64::from_be_bytes(answer)
        });
        let at_server = server.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        assert_eq!(counted, at_server);
        counted
    })
}

/// iperf3 TCP throughput (bits/s) from the client to the server for `secs` seconds, as
/// the server measured it. `iperf3 -s -1` serves one test and exits; the server port is
/// iperf3's default, which is free: the server namespace is the test's own.
pub fn iperf3(topo: &Topology, secs: u32) -> f64 {
    iperf3_between(&topo.client, &topo.server, SERVER, secs)
}

/// [`iperf3`] between any two namespaces, the server listening on `server_addr`.
pub fn iperf3_between(client: &Netns, server_ns: &Netns, server_addr: Ipv4Addr, secs: u32) -> f64 {
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &server_ns.name, "iperf3", "-s", "-1", "-B"])
        .arg(server_addr.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 -s starts");
    // The server needs a moment to listen: retry a refused connect for up to 10 s. A run
    // that fails after connecting (it took longer than a refusal) is not retried.
    let start = Instant::now();
    let mut rate = None;
    let mut last = String::new();
    while rate.is_none() && start.elapsed() < Duration::from_secs(10) {
        let t0 = Instant::now();
        let o = output_in(
            client,
            &format!("timeout {} iperf3 -J -c {server_addr} -t {secs}", secs + 10),
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        rate = v["end"]["sum_received"]["bits_per_second"].as_f64().filter(|_| o.status.success());
        last = format!("{} {}", o.status, v["error"]);
        if rate.is_none() {
            assert!(t0.elapsed() < Duration::from_secs(2), "iperf3 -c failed: {last}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    rate.unwrap_or_else(|| panic!("iperf3 -c never ran: {last}"))
}

/// UDP packets per second with a `payload`-byte payload from `client` to `server_addr` in
/// `server_ns` (`iperf3 -u -b 0`, one stream, `secs` seconds): (sent, received) per
/// second, received as the iperf3 server counted it (sent less lost). Bounded like
/// [`iperf3_between`].
pub fn udp_pps_between(
    client: &Netns,
    server_ns: &Netns,
    server_addr: Ipv4Addr,
    payload: u32,
    secs: u32,
) -> (f64, f64) {
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &server_ns.name, "iperf3", "-s", "-1", "-B"])
        .arg(server_addr.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 -s starts");
    let start = Instant::now();
    let mut rate = None;
    let mut last = String::new();
    while rate.is_none() && start.elapsed() < Duration::from_secs(10) {
        let t0 = Instant::now();
        let o = output_in(
            client,
            &format!(
                "timeout {} iperf3 -J -u -b 0 -l {payload} -c {server_addr} -t {secs}",
                secs + 10
            ),
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let sum = &v["end"]["sum"];
        rate = match (
            sum["packets"].as_f64(),
            sum["lost_packets"].as_f64(),
            sum["seconds"].as_f64(),
        ) {
            (Some(p), Some(l), Some(s)) if o.status.success() && s > 0.0 => {
                Some((p / s, (p - l).max(0.0) / s))
            }
            _ => None,
        };
        last = format!("{} {}", o.status, v["error"]);
        if rate.is_none() {
            assert!(t0.elapsed() < Duration::from_secs(2), "iperf3 -u -c failed: {last}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    rate.unwrap_or_else(|| panic!("iperf3 -u -c never ran: {last}"))
}
