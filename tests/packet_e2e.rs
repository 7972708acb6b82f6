//! Packet mode end to end: the real `flowgate` binary runs in the gateway namespace of a
//! client — gateway — server topology, on either front end: `[packet]` TUN, the gateway's
//! policy routing sending everything it forwards into the TUN and what flowgate writes
//! back routed on; or AF_PACKET as a bump in the wire between two address-less interfaces
//! (`support::bump`, ARP crossing too). Nothing else carries traffic across. The cases
//! below run once per front end and IP version, from one body each: IPv4 on
//! 198.18.0.0/15, IPv6 on the lab fixture's 2001:db8:: addresses (`nodad`), routed with
//! `ip -6 route`/`ip -6 rule` into the TUN, or across the bump with neighbour discovery
//! crossing it as ARP does:
//!
//! - Allowed: curl to a real HTTP server (`python3 -m http.server`), a UDP exchange with
//!   replies (over IPv6 also behind a destination-options header), ICMP echo from a
//!   workload whose policy allows every protocol.
//! - Denied: a TCP flow and a UDP flow from a workload no policy lets out, and ICMP echo
//!   from a workload allowed only some ports: nothing reaches the server (nftables counts
//!   on the server side), and the flow log has a `deny` event naming the packet listener.
//! - Revoked: an established TCP flow stops carrying data once a reload denies it.
//! - `on_deny = "reject"`: curl fails at once with "connection refused" (an RST), a UDP
//!   datagram is answered with ICMP "administratively prohibited" (ICMPv6 type 1 code 1).
//!
//! TUN only:
//! - Malformed IPv4 and IPv6 packets written into the TUN (an AF_PACKET socket bound to
//!   it, from the gateway namespace) are dropped and counted by reason; flowgate keeps
//!   running and allowed flows (IPv4 and IPv6) still work.
//! - A device that cannot be opened stops start-up with an error naming it.
//!
//! Needs root, /dev/net/tun, curl, python3 and nft; skipped, saying so, otherwise (in CI:
//! fails).

mod support;

use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::bump::{self, Bump};
use support::netns::Netns;
use support::process::Flowgate;
use support::require::{Need, skip_unless};
use support::topology::{self, CLIENT, SERVER, Topology, in_ns, output_in};

/// The TUN device flowgate creates in the gateway namespace.
const TUN: &str = "fgpkt0";
/// A client address no policy lets out.
const INTRUDER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
/// A client address allowed every protocol to the server (ICMP included).
const PINGER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 4);
/// The lab's IPv6 addresses (tests/fixtures/packet_lab/inventory.yaml), the same on both
/// front ends: routed between two /64s through the TUN gateway; on the bump's one link,
/// each host reaches the other /64 on-link (neighbour discovery crosses the bump).
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const INTRUDER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3);
const PINGER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 4);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// The TUN gateway's addresses on either side.
const GW6_CLIENT_SIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const GW6_SERVER_SIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
const HTTP_PORT: u16 = 8000;
const ECHO_PORT: u16 = 9000;
const UDP_PORT: u16 = 5353;
const WAIT: Duration = Duration::from_secs(10);

/// The lab's workloads (`tests/fixtures/packet_lab/`, shared with the packet_filter fuzz
/// target).
const INVENTORY: &str = include_str!("fixtures/packet_lab/inventory.yaml");
/// The client may reach the server on TCP 8000 and 9000 and UDP 5353, the pinger on
/// anything.
const POLICY: &str = include_str!("fixtures/packet_lab/policy.yaml");

/// The same, without the client's TCP 9000: a reload to it revokes an open 9000 flow.
fn policy_without_9000() -> String {
    POLICY.replace("{port: 8000}, {port: 9000}", "{port: 8000}")
}

fn needs() -> bool {
    skip_unless(&[
        Need::Root,
        topology::need_tun(),
        Need::Bin("curl"),
        Need::Bin("python3"),
        Need::Bin("nft"),
    ])
}

/// The topology, flowgate in its gateway namespace routing through its TUN, and the
/// servers. Dropped in field order: flowgate and the servers before the namespaces.
struct World {
    fg: Flowgate,
    _http: KillOnDrop,
    _servers: Servers,
    net: Net,
    at: Addrs,
    dir: tempfile::TempDir,
    admin: SocketAddr,
}

/// The packet front end a case runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Front {
    /// Routed through a TUN device in the gateway namespace (`support::topology`).
    Tun,
    /// A bump in the wire between two address-less interfaces (`support::bump`).
    AfPacket,
}

impl Front {
    /// The `frontend` label of the packet metrics.
    fn label(self) -> &'static str {
        match self {
            Front::Tun => "tun",
            Front::AfPacket => "afpacket",
        }
    }
}

/// The IP version a case's flows use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    /// The topology is dual-stack (IPv4 as for `V4`, plus the lab's 2001:db8:: addresses,
    /// added `nodad` so duplicate address detection does not hold them back), and the
    /// flows use IPv6.
    V6,
}

/// The namespaces of either topology.
enum Net {
    Tun(Topology),
    Bump(Bump),
}

impl Net {
    fn client(&self) -> &Netns {
        match self {
            Net::Tun(t) => &t.client,
            Net::Bump(b) => &b.client,
        }
    }
    fn gateway(&self) -> &Netns {
        match self {
            Net::Tun(t) => &t.gateway,
            Net::Bump(b) => &b.bump,
        }
    }
    fn server(&self) -> &Netns {
        match self {
            Net::Tun(t) => &t.server,
            Net::Bump(b) => &b.server,
        }
    }
}

/// The lab's addresses on a topology: the client's three (allowed, intruder, pinger) and
/// the server's.
#[derive(Clone, Copy)]
struct Addrs {
    client: IpAddr,
    intruder: IpAddr,
    pinger: IpAddr,
    server: IpAddr,
    /// The server's IPv4 address, also in an IPv6 world (which is dual-stack).
    server4: Ipv4Addr,
}

impl Addrs {
    /// The IPv4 addresses of `front`'s topology.
    fn v4(front: Front) -> [Ipv4Addr; 4] {
        match front {
            Front::Tun => [CLIENT, INTRUDER, PINGER, SERVER],
            Front::AfPacket => [
                bump::CLIENT,
                Ipv4Addr::new(198, 18, 3, 3),
                Ipv4Addr::new(198, 18, 3, 4),
                bump::SERVER,
            ],
        }
    }

    fn of(front: Front, family: Family) -> Addrs {
        let [client, intruder, pinger, server]: [IpAddr; 4] = match family {
            Family::V4 => Addrs::v4(front).map(IpAddr::V4),
            Family::V6 => [CLIENT6, INTRUDER6, PINGER6, SERVER6].map(IpAddr::V6),
        };
        Addrs { client, intruder, pinger, server, server4: Addrs::v4(front)[3] }
    }
}

/// `ip:port` as the flow log writes it (`[v6]:port`).
fn sock(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// Whether a flow-log address field is `ip` (any port).
fn from_host(field: &serde_json::Value, ip: IpAddr) -> bool {
    let host = match ip {
        IpAddr::V4(a) => format!("{a}:"),
        IpAddr::V6(a) => format!("[{a}]:"),
    };
    field.as_str().is_some_and(|s| s.starts_with(&host))
}

/// Makes the topology dual-stack: the lab's IPv6 addresses (`nodad`), forwarding and
/// routes. TUN: the gateway routes between 2001:db8:1::/64 and 2001:db8:2::/64 (its own
/// ::1 on each), the hosts' default routes point at it. Bump: client and server turn IPv6
/// back on (`support::bump` turns it off) and reach each other's /64 on-link; the bump's
/// own interfaces stay without IPv6.
fn dual_stack(net: &Net) {
    let (client, server) = (net.client(), net.server());
    let nodad = "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
                 net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 \
                 net.ipv6.conf.eth0.accept_dad=0 net.ipv6.conf.eth0.disable_ipv6=0";
    client.exec(&format!(
        "{nodad} && ip -6 addr add {CLIENT6}/64 dev eth0 nodad && \
         ip -6 addr add {INTRUDER6}/64 dev eth0 nodad && \
         ip -6 addr add {PINGER6}/64 dev eth0 nodad"
    ));
    server.exec(&format!("{nodad} && ip -6 addr add {SERVER6}/64 dev eth0 nodad"));
    match net {
        Net::Tun(_) => {
            net.gateway().exec(&format!(
                "sysctl -qw net.ipv6.conf.all.forwarding=1 && \
                 ip -6 addr add {GW6_CLIENT_SIDE}/64 dev {} nodad && \
                 ip -6 addr add {GW6_SERVER_SIDE}/64 dev {} nodad",
                topology::GW_CLIENT_IF,
                topology::GW_SERVER_IF
            ));
            client.exec(&format!("ip -6 route add default via {GW6_CLIENT_SIDE}"));
            server.exec(&format!("ip -6 route add default via {GW6_SERVER_SIDE}"));
        }
        Net::Bump(_) => {
            client.exec("ip -6 route add 2001:db8:2::/64 dev eth0");
            server.exec("ip -6 route add 2001:db8:1::/64 dev eth0");
        }
    }
}

/// TUN mode for IPv6, as `Topology::route_through` does it for IPv4: everything arriving
/// on either veth goes to table 100, whose default route is the TUN (`ip -6 rule`,
/// `ip -6 route`); what flowgate writes back arrives with `iif` the TUN and is routed on
/// by the main table. The `local` table (preference 0) keeps neighbour discovery with the
/// gateway itself off the TUN.
fn route_v6_through(gateway: &Netns) {
    gateway.exec(&format!(
        "ip -6 route add default dev {TUN} table {t} && \
         ip -6 rule add iif {c} lookup {t} pref 100 && \
         ip -6 rule add iif {s} lookup {t} pref 101",
        t = topology::TUN_TABLE,
        c = topology::GW_CLIENT_IF,
        s = topology::GW_SERVER_IF,
    ));
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl World {
    /// `packet_extra` goes into the `[packet]` section.
    fn start(front: Front, family: Family, packet_extra: &str) -> World {
        let at = Addrs::of(front, family);
        let [client4, intruder4, pinger4, server4] = Addrs::v4(front);
        let net = match front {
            Front::Tun => Net::Tun(Topology::kernel()),
            Front::AfPacket => Net::Bump(Bump::new()),
        };
        net.client().exec(&format!(
            "ip addr add {intruder4}/24 dev eth0 && ip addr add {pinger4}/24 dev eth0"
        ));
        if family == Family::V6 {
            dual_stack(&net);
        }
        count_source_on_server(net.server(), at.intruder);
        let dir = tempfile::tempdir().unwrap();
        // The fixture's IPv6 addresses are the ones both topologies use.
        let inventory = INVENTORY
            .replace("198.18.1.2", &client4.to_string())
            .replace("198.18.1.3", &intruder4.to_string())
            .replace("198.18.1.4", &pinger4.to_string())
            .replace("198.18.2.2", &server4.to_string());
        std::fs::write(dir.path().join("inventory.yaml"), inventory).unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/lab.yaml"), POLICY).unwrap();
        std::fs::create_dir(dir.path().join("www")).unwrap();
        std::fs::write(dir.path().join("www/index.html"), "hello through the packet filter\n")
            .unwrap();
        let config = dir.path().join("flowgate.toml");
        std::fs::write(
            &config,
            format!(
                "[policy]\ndir = \"policies\"\ninventory = \"inventory.yaml\"\ndefault = \"deny\"\n\
                 [flowlog]\noutput = \"flow.log\"\ndedupe_window = \"0s\"\n\
                 [admin]\nbind = \"127.0.0.1:0\"\n\
                 [control]\nwatch = false\n\
                 [packet]\nworkers = 2\n{packet_extra}\n{}",
                match front {
                    Front::Tun => format!("[packet.tun]\ndevice = \"{TUN}\"\n"),
                    Front::AfPacket => format!(
                        "frontend = \"afpacket\"\n[packet.afpacket]\ninside = \"{}\"\noutside = \"{}\"\n",
                        bump::INSIDE,
                        bump::OUTSIDE
                    ),
                }
            ),
        )
        .unwrap();
        let mut fg = Flowgate::spawn(in_netns(net.gateway(), &config));
        match &net {
            Net::Tun(topo) => {
                fg.wait_stderr(&format!("flowgate: packet filter packet (tun) on {TUN}"), WAIT);
                topo.route_through(TUN);
                if family == Family::V6 {
                    route_v6_through(&topo.gateway);
                }
            }
            Net::Bump(_) => {
                let on = format!("{}+{}", bump::INSIDE, bump::OUTSIDE);
                fg.wait_stderr(&format!("flowgate: packet filter packet (afpacket) on {on}"), WAIT);
            }
        }
        fg.wait_ready();
        let admin = fg.admin();
        // Dual-stack servers (`::`, not v6-only) in an IPv6 world: the IPv4 flows of the
        // malformed-packet case still have their peers.
        let bind = match family {
            Family::V4 => at.server,
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let servers = Servers::start(net.server(), bind);
        let http = KillOnDrop(
            Command::new("ip")
                .args(["netns", "exec", &net.server().name, "python3", "-m", "http.server"])
                .arg(HTTP_PORT.to_string())
                .args(["--bind", &bind.to_string(), "--directory"])
                .arg(dir.path().join("www"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 -m http.server starts"),
        );
        wait_listening(net.server(), SocketAddr::from((at.server, HTTP_PORT)));
        World { fg, _http: http, _servers: servers, net, at, dir, admin }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("flow.log")
    }

    /// The first flow-log line `pick` accepts, waiting up to [`WAIT`].
    fn wait_log(&self, what: &str, pick: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let end = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let lines: Vec<serde_json::Value> =
                text.lines().map(|l| serde_json::from_str(l).expect("flow-log JSON")).collect();
            if let Some(l) = lines.iter().find(|l| pick(l)) {
                return l.clone();
            }
            assert!(Instant::now() < end, "no flow-log line for {what}; the log:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/metrics`, fetched from inside the gateway namespace.
    fn metrics(&self) -> String {
        let out = output_in(
            self.net.gateway(),
            &format!("curl -sS --max-time 5 http://{}/metrics", self.admin),
        );
        assert!(out.status.success(), "metrics: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// curl from the client namespace, from `src` to the server's address of the same
    /// family; exit code and stdout.
    fn curl(&self, src: IpAddr, max_time: u32) -> (i32, String, Duration) {
        let t = Instant::now();
        let server = if src.is_ipv4() { IpAddr::V4(self.at.server4) } else { self.at.server };
        // -g: the brackets of an IPv6 URL are not a glob.
        let out = output_in(
            self.net.client(),
            &format!(
                "curl -g -sS --max-time {max_time} --interface {src} http://{}/",
                sock(server, HTTP_PORT)
            ),
        );
        let body = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), body, t.elapsed())
    }
}

/// `ip netns exec NS flowgate run --config CONFIG`.
fn in_netns(ns: &Netns, config: &std::path::Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_flowgate"), "run", "--config"])
        .arg(config);
    cmd
}

/// The value of the sample `series` (name and labels as rendered), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// An nftables counter in the server namespace of every packet from `src` (the
/// intruder): what reaches the server, counted on the server. IPv6 neighbour and
/// multicast listener discovery is not counted: it is the link's, not a flow (the bump
/// passes it as it passes ARP, and the intruder's first packet makes its kernel solicit
/// the server from the intruder's address).
fn count_source_on_server(server: &Netns, src: IpAddr) {
    let ip = if src.is_ipv4() { "ip" } else { "ip6" };
    let out = output_in(
        server,
        &format!(
            "nft add table inet fgtest && \
             nft add chain inet fgtest input '{{ type filter hook input priority 0; }}' && \
             nft add rule inet fgtest input icmpv6 type '{{ nd-router-solicit, \
               nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect, \
               mld-listener-query, mld-listener-report, mld-listener-done, \
               mld2-listener-report }}' accept && \
             nft add rule inet fgtest input {ip} saddr {src} counter"
        ),
    );
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
}

fn intruder_packets_at_server(server: &Netns) -> u64 {
    let out = output_in(server, "nft list chain inet fgtest input");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("counter packets")).expect("the counter rule");
    let n = line.split("counter packets ").nth(1).and_then(|r| r.split(' ').next());
    n.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("counter in {line:?}"))
}

/// Waits until something accepts on `addr` in `ns`.
fn wait_listening(ns: &Netns, addr: SocketAddr) {
    in_ns(ns, || {
        // python3 may start slowly on a loaded machine.
        let end = Instant::now() + 3 * WAIT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < end, "nothing listens on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// A TCP echo server (port 9000) and a UDP echo server (port 5353) in the server
/// namespace, on background threads; stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &Netns, server: IpAddr) -> Servers {
        let (tcp, udp) = in_ns(ns, || {
            (
                TcpListener::bind((server, ECHO_PORT)).expect("bind TCP echo"),
                UdpSocket::bind((server, UDP_PORT)).expect("bind UDP echo"),
            )
        });
        let stop = Arc::new(AtomicBool::new(false));
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let s1 = stop.clone();
        let tcp_thread = std::thread::spawn(move || {
            while !s1.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut c, _)) => {
                        std::thread::spawn(move || {
                            c.set_nonblocking(false).unwrap();
                            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 || c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let s2 = stop.clone();
        let udp_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        });
        Servers { stop, threads: vec![tcp_thread, udp_thread] }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A UDP socket in the client namespace bound to `src`, connected to the server's echo port.
fn udp_from(w: &World, src: IpAddr) -> UdpSocket {
    let s = in_ns(w.net.client(), || UdpSocket::bind((src, 0)).expect("bind UDP client"));
    s.connect((w.at.server, UDP_PORT)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// Makes every datagram `s` sends carry an IPv6 destination-options header (8 bytes: a
/// PadN option) before its UDP header (`IPV6_DSTOPTS`; needs `CAP_NET_RAW`).
fn with_destination_options(s: &UdpSocket) {
    use std::os::fd::AsRawFd;
    // Next header (the kernel fills it in), length 0 (8 bytes), PadN with 4 bytes of data.
    let opts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: a live socket; `opts` outlives the call and its length is passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            opts.as_ptr().cast(),
            opts.len() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
}

/// Sends one datagram and waits for its echo.
fn udp_echoes(s: &UdpSocket, what: &[u8]) -> std::io::Result<Vec<u8>> {
    s.send(what)?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf)?;
    Ok(buf[..n].to_vec())
}

/// A TCP connection from `src` in the client namespace to `dst` (through flowgate).
fn connect_from(w: &World, src: IpAddr, dst: SocketAddr) -> TcpStream {
    in_ns(w.net.client(), || {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, None).expect("TCP socket");
        s.bind(&SocketAddr::new(src, 0).into()).expect("bind TCP client");
        s.connect_timeout(&dst.into(), WAIT).expect("connect through flowgate");
        TcpStream::from(s)
    })
}

/// ICMP/ICMPv6 echo requests from `src` in the client namespace to the server; how many
/// were answered.
fn ping_from(w: &World, src: IpAddr, count: u16) -> u16 {
    match (src, w.at.server) {
        (IpAddr::V4(src), IpAddr::V4(server)) => ping4(w, src, server, count),
        (IpAddr::V6(src), IpAddr::V6(server)) => ping6(w, src, server, count),
        _ => panic!("ping from {src} to {}: mixed families", w.at.server),
    }
}

/// ICMPv6 echo over a raw socket: the kernel fills in the checksum (pseudo-header and
/// all) and hands back the ICMPv6 message without the IPv6 header.
fn ping6(w: &World, src: Ipv6Addr, server: Ipv6Addr, count: u16) -> u16 {
    in_ns(w.net.client(), || {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).expect("raw socket");
        s.bind(&SocketAddr::V6(SocketAddrV6::new(src, 0, 0, 0)).into()).expect("bind raw");
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let to = SocketAddr::V6(SocketAddrV6::new(server, 0, 0, 0)).into();
        let ident = (std::process::id() & 0xffff) as u16 ^ src.segments()[7];
        let mut answered = 0;
        for seq in 0..count {
            let mut req = [0u8; 64];
            req[0] = 128;
            req[4..6].copy_from_slice(&ident.to_be_bytes());
            req[6..8].copy_from_slice(&seq.to_be_bytes());
            s.send_to(&req, &to).expect("send echo request");
            let end = Instant::now() + Duration::from_secs(1);
            while Instant::now() < end {
                let mut buf = [0u8; 1500];
                let Ok(n) = (&s).read(&mut buf) else { continue };
                let got = &buf[..n];
                if n >= 8
                    && got[0] == 129
                    && got[4..6] == ident.to_be_bytes()
                    && got[6..8] == seq.to_be_bytes()
                {
                    answered += 1;
                    break;
                }
            }
        }
        answered
    })
}

/// ICMP echo over a raw IPv4 socket from the client's address `src`.
fn ping4(w: &World, src: Ipv4Addr, server: Ipv4Addr, count: u16) -> u16 {
    topology::ping_from(w.net.client(), Some(src), server, count)
}

#[test]
fn tun_policy_decides_every_packet_flow_and_a_reload_cuts_an_established_one() {
    policy_decides_every_packet_flow_and_a_reload_cuts_an_established_one(Front::Tun, Family::V4);
}

#[test]
fn afpacket_policy_decides_every_packet_flow_and_a_reload_cuts_an_established_one() {
    policy_decides_every_packet_flow_and_a_reload_cuts_an_established_one(
        Front::AfPacket,
        Family::V4,
    );
}

#[test]
fn tun_ipv6_policy_decides_every_packet_flow_and_a_reload_cuts_an_established_one() {
    policy_decides_every_packet_flow_and_a_reload_cuts_an_established_one(Front::Tun, Family::V6);
}

/// Also: neighbour discovery crosses the bump (client and server resolve each other
/// through it, or nothing below would pass).
#[test]
fn afpacket_ipv6_policy_decides_every_packet_flow_and_a_reload_cuts_an_established_one() {
    policy_decides_every_packet_flow_and_a_reload_cuts_an_established_one(
        Front::AfPacket,
        Family::V6,
    );
}

/// Allowed TCP (curl), UDP with its reply and ICMP echo pass; denied TCP, UDP and ICMP
/// never reach the server and are logged; a reload that denies an established flow cuts
/// it. On either front end, over either IP version.
fn policy_decides_every_packet_flow_and_a_reload_cuts_an_established_one(
    front: Front,
    family: Family,
) {
    if needs() {
        return;
    }
    let mut w = World::start(front, family, "");
    let at = w.at;
    let fe = front.label();
    let icmp = match family {
        Family::V4 => "icmp",
        Family::V6 => "icmpv6",
    };

    // Allowed TCP: curl to a real HTTP server.
    let (code, body, _) = w.curl(at.client, 10);
    assert_eq!(code, 0, "allowed curl: {body}");
    assert!(body.contains("hello through the packet filter"), "{body}");
    // Allowed UDP, with its reply.
    let udp = udp_from(&w, at.client);
    assert_eq!(udp_echoes(&udp, b"ping-udp").expect("UDP echo through flowgate"), b"ping-udp");
    if family == Family::V6 {
        // A datagram behind a destination-options header: the extension-header walk
        // finds its ports, and the flow is decided and passed like any other.
        let udp = udp_from(&w, at.client);
        with_destination_options(&udp);
        let echo = udp_echoes(&udp, b"ext-hdr").expect("UDP behind destination options");
        assert_eq!(echo, b"ext-hdr");
    }
    // ICMP: allowed for the pinger (every protocol), denied for the client (ports only).
    assert_eq!(ping_from(&w, at.pinger, 3), 3, "pinger's echo requests answered");
    assert_eq!(ping_from(&w, at.client, 2), 0, "client's ICMP is denied");

    // Denied: TCP and UDP from the intruder never reach the server.
    let before = intruder_packets_at_server(w.net.server());
    let (code, body, _) = w.curl(at.intruder, 3);
    assert_ne!(code, 0, "denied curl succeeded: {body}");
    let udp_bad = udp_from(&w, at.intruder);
    assert!(udp_echoes(&udp_bad, b"nope").is_err(), "denied UDP answered");
    assert_eq!(
        intruder_packets_at_server(w.net.server()),
        before,
        "a denied packet reached the server"
    );
    let deny = w.wait_log("the intruder's TCP deny", |l| {
        l["event"] == "deny"
            && from_host(&l["src"], at.intruder)
            && l["dst"] == sock(at.server, HTTP_PORT)
    });
    assert_eq!(deny["listener"], "packet", "{deny}");
    w.wait_log("the intruder's UDP deny", |l| {
        l["event"] == "deny"
            && from_host(&l["src"], at.intruder)
            && l["dst"] == sock(at.server, UDP_PORT)
    });
    w.wait_log("the client's ICMP deny", |l| {
        l["event"] == "deny"
            && from_host(&l["src"], at.client)
            && l["proto"].as_str().is_some_and(|p| p.eq_ignore_ascii_case(icmp))
    });

    let m = w.metrics();
    assert!(
        sample(&m, &format!("flowgate_packet_packets_total{{frontend=\"{fe}\",verdict=\"pass\"}}"))
            > 0.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            &format!("flowgate_packet_dropped_total{{frontend=\"{fe}\",reason=\"policy\"}}")
        ) >= 2.0,
        "{m}"
    );
    assert!(sample(&m, "flowgate_flows_total{listener=\"packet\",verdict=\"deny\"}") >= 2.0);

    // An established flow, cut by a reload that denies it.
    let mut conn = connect_from(&w, at.client, SocketAddr::new(at.server, ECHO_PORT));
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    conn.write_all(b"before").unwrap();
    conn.read_exact(&mut buf[..6]).expect("echo before the reload");
    assert_eq!(&buf[..6], b"before");
    std::fs::write(w.dir.path().join("policies/lab.yaml"), policy_without_9000()).unwrap();
    w.fg.signal(libc::SIGHUP);
    let end = Instant::now() + WAIT;
    while sample(&w.metrics(), "flowgate_policy_generation") < 2.0 {
        assert!(Instant::now() < end, "no reload after SIGHUP:\n{}", w.fg.seen.join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let revoked = w.wait_log("the revoked echo flow", |l| {
        l["event"] == "revoked" && l["dst"] == sock(at.server, ECHO_PORT)
    });
    assert_eq!(revoked["listener"], "packet", "{revoked}");
    let _ = conn.write_all(b"after");
    let got = conn.read(&mut buf);
    assert!(
        !matches!(got, Ok(n) if n > 0),
        "the revoked flow still carries data: {got:?} {:?}",
        String::from_utf8_lossy(&buf)
    );
    // Other flows go on.
    assert_eq!(w.curl(at.client, 10).0, 0, "allowed curl after the reload");
    w.fg.assert_running();
}

#[test]
fn tun_reject_answers_a_denied_tcp_flow_with_rst_and_udp_with_icmp_prohibited() {
    reject_answers_a_denied_tcp_flow_with_rst_and_udp_with_icmp_prohibited(Front::Tun, Family::V4);
}

#[test]
fn afpacket_reject_answers_a_denied_tcp_flow_with_rst_and_udp_with_icmp_prohibited() {
    reject_answers_a_denied_tcp_flow_with_rst_and_udp_with_icmp_prohibited(
        Front::AfPacket,
        Family::V4,
    );
}

#[test]
fn tun_ipv6_reject_answers_a_denied_tcp_flow_with_rst_and_udp_with_icmpv6_prohibited() {
    reject_answers_a_denied_tcp_flow_with_rst_and_udp_with_icmp_prohibited(Front::Tun, Family::V6);
}

#[test]
fn afpacket_ipv6_reject_answers_a_denied_tcp_flow_with_rst_and_udp_with_icmpv6_prohibited() {
    reject_answers_a_denied_tcp_flow_with_rst_and_udp_with_icmp_prohibited(
        Front::AfPacket,
        Family::V6,
    );
}

/// `on_deny = "reject"`: a denied TCP flow is refused at once (RST), a denied datagram
/// answered with ICMP administratively prohibited (ICMPv6 type 1 code 1); SIGTERM then
/// stops flowgate cleanly.
fn reject_answers_a_denied_tcp_flow_with_rst_and_udp_with_icmp_prohibited(
    front: Front,
    family: Family,
) {
    if needs() {
        return;
    }
    let mut w = World::start(front, family, "on_deny = \"reject\"");
    let at = w.at;
    let (code, body, took) = w.curl(at.intruder, 10);
    // curl's exit code 7: could not connect — at once, so refused by an RST (a dropped
    // SYN would take curl's whole --max-time).
    assert_eq!(code, 7, "curl from the intruder: {body}");
    assert!(took < Duration::from_secs(3), "refusal took {took:?}: {body}");
    let udp = udp_from(&w, at.intruder);
    let err = udp_echoes(&udp, b"nope").expect_err("denied UDP answered");
    // On a connected socket, ICMP administratively prohibited (type 3 code 13) is
    // EHOSTUNREACH, ICMPv6 communication administratively prohibited (type 1 code 1)
    // EACCES; a timeout would mean no ICMP came back.
    let expected = match family {
        Family::V4 => libc::EHOSTUNREACH,
        Family::V6 => libc::EACCES,
    };
    assert_eq!(err.raw_os_error(), Some(expected), "{err}");
    assert_eq!(intruder_packets_at_server(w.net.server()), 0);
    let m = w.metrics();
    assert!(sample(&m, "flowgate_packet_rejects_total{result=\"sent\"}") >= 2.0, "{m}");
    assert_eq!(w.curl(at.client, 10).0, 0, "allowed curl");
    w.fg.assert_running();
    // SIGTERM stops the workers and exits 0; a TUN device goes with its last queue.
    w.fg.signal(libc::SIGTERM);
    let status = w.fg.wait_exit(WAIT);
    assert!(status.success(), "{status}: {}", w.fg.seen.join("\n"));
    if front == Front::Tun {
        let link = output_in(w.net.gateway(), &format!("ip link show {TUN}"));
        assert!(!link.status.success(), "{TUN} still exists after exit");
    }
}

/// What the injector writes into the TUN: each packet as hex, by name.
fn malformed_packets(
    established: Option<(SocketAddr, SocketAddr)>,
) -> Vec<(&'static str, Vec<u8>)> {
    let v4 = |proto: u8, total: u16, ihl: u8, frag: u16, rest: &[u8]| {
        let mut p = vec![0x40 | ihl, 0, 0, 0, 0x12, 0x34, 0, 0, 64, proto, 0, 0];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&INTRUDER.octets());
        p.extend_from_slice(&SERVER.octets());
        p.extend_from_slice(rest);
        p
    };
    let v6_from = |src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]| {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    };
    let v6 = |next: u8, payload: &[u8]| v6_from(INTRUDER6, SERVER6, next, payload);
    // An IPv6 fragment of a UDP datagram from the client to the server's allowed port
    // (the first fragment passes): fragment header (next UDP, offset | M, id), then data.
    let frag6 = |offset: u16, more: bool, id: u32, data: &[u8]| {
        let mut f = vec![17, 0];
        f.extend_from_slice(&(offset | u16::from(more)).to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(data);
        v6_from(CLIENT6, SERVER6, 44, &f)
    };
    let mut udp6 = vec![0u8; 24];
    udp6[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    udp6[2..4].copy_from_slice(&UDP_PORT.to_be_bytes());
    udp6[4..6].copy_from_slice(&64u16.to_be_bytes());
    let mut long6 = v6(17, &udp6[..8]);
    long6[4..6].copy_from_slice(&1000u16.to_be_bytes());
    // 20 destination-options headers (8 bytes each, next = 60), then no next header.
    let mut chain = Vec::new();
    for i in 0..20 {
        chain.extend_from_slice(&[if i == 19 { 59 } else { 60 }, 0, 1, 4, 0, 0, 0, 0]);
    }
    let tcp_hdr = |sport: u16, dport: u16, seq: u32, flags: u8| {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t
    };
    let mut out = vec![
        ("truncated_ipv4", v4(6, 20, 5, 0, &[])[..12].to_vec()),
        ("truncated_ipv6", v6(6, &[])[..24].to_vec()),
        ("truncated_tcp", v4(6, 30, 5, 0, &[0x12, 0x34, 0x1f, 0x40, 0, 0, 0, 0, 0, 0])),
        ("ihl_below_5", v4(6, 40, 4, 0, &tcp_hdr(4000, HTTP_PORT, 1, 0x02))),
        ("total_length_beyond_buffer", v4(6, 1000, 5, 0, &tcp_hdr(4000, HTTP_PORT, 1, 0x02))),
        ("zero_length", Vec::new()),
        ("endless_ipv6_extension_chain", v6(60, &chain)),
        // A TCP fragment at offset 8 bytes, overlapping the first fragment's TCP header
        // (RFC 1858).
        ("overlapping_fragment", v4(6, 36, 5, 1, &[0; 16])),
        // A last fragment (offset 800 bytes) whose first fragment never came.
        ("orphan_fragment", v4(17, 36, 5, 100, &[0; 16])),
        ("ipv6_payload_length_beyond_buffer", long6),
        ("truncated_tcp_over_ipv6", v6(6, &[0x12, 0x34, 0x1f, 0x40, 0, 0, 0, 0, 0, 0])),
        // A first fragment of an allowed flow (passes: 8 bytes of UDP header and 16 of
        // data), then a fragment at offset 8 that would rewrite the data after the header
        // the verdict was made on: dropped.
        ("ipv6_first_fragment", frag6(0, true, 0x6f67, &udp6)),
        ("ipv6_overlapping_fragment", frag6(8, false, 0x6f67, &[0; 24])),
        // An IPv6 last fragment whose first fragment never came.
        ("ipv6_orphan_fragment", frag6(800, false, 0x6f68, &[0; 16])),
    ];
    if let Some((client, server)) = established {
        // A segment of an established flow, 2^31 bytes off its window.
        let (SocketAddr::V4(c), SocketAddr::V4(s)) = (client, server) else { unreachable!() };
        let mut p = v4(6, 40, 5, 0, &tcp_hdr(c.port(), s.port(), 0x8000_0000, 0x10));
        p[12..16].copy_from_slice(&c.ip().octets());
        p[16..20].copy_from_slice(&s.ip().octets());
        out.push(("out_of_window_tcp", p));
    }
    out
}

/// Writes `packets` into the TUN from the gateway namespace: an AF_PACKET socket bound to
/// the TUN transmits each buffer, as it is, to flowgate's queues. Returns the injector's
/// report (one line per packet the kernel refused to send).
fn inject(gateway: &Netns, dir: &std::path::Path, packets: &[(&str, Vec<u8>)]) -> String {
    let script = dir.join("inject.py");
    std::fs::write(
        &script,
        "import socket, sys\n\
         dev = sys.argv[1]\n\
         s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
         for arg in sys.argv[2:]:\n\
         \x20   name, _, hexed = arg.partition('=')\n\
         \x20   data = bytes.fromhex(hexed)\n\
         \x20   proto = 0x86DD if data and data[0] >> 4 == 6 else 0x0800\n\
         \x20   try:\n\
         \x20       s.sendto(data, (dev, proto))\n\
         \x20   except OSError as e:\n\
         \x20       print('refused', name, e)\n",
    )
    .unwrap();
    let args: Vec<String> = packets
        .iter()
        .map(|(name, p)| {
            format!("{name}={}", p.iter().map(|b| format!("{b:02x}")).collect::<String>())
        })
        .collect();
    let out = output_in(gateway, &format!("python3 {} {TUN} {}", script.display(), args.join(" ")));
    assert!(out.status.success(), "injector: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// IPv4 and IPv6 alike (a dual-stack world); the IPv6 flows use the fixture's addresses.
#[test]
fn malformed_packets_are_dropped_and_counted_and_forwarding_goes_on() {
    if needs() {
        return;
    }
    let mut w = World::start(Front::Tun, Family::V6, "");
    let mut conn = in_ns(w.net.client(), || {
        TcpStream::connect_timeout(&SocketAddr::from((SERVER, ECHO_PORT)), WAIT)
            .expect("connect to the TCP echo server through flowgate")
    });
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let flow = (conn.local_addr().unwrap(), conn.peer_addr().unwrap());
    let before = w.metrics();
    let refused = inject(w.net.gateway(), w.dir.path(), &malformed_packets(Some(flow)));
    // The kernel may refuse to send an empty buffer; everything else reaches the TUN.
    for line in refused.lines() {
        assert!(line.starts_with("refused zero_length"), "injector: {refused}");
    }
    let at_least = |m: &str, series: &str, n: f64| {
        let grew = sample(m, series) - sample(&before, series);
        grew >= n
    };
    let end = Instant::now() + WAIT;
    let wanted = [
        ("flowgate_packet_malformed_total{reason=\"truncated\"}", 4.0),
        ("flowgate_packet_malformed_total{reason=\"bad_ihl\"}", 1.0),
        ("flowgate_packet_malformed_total{reason=\"bad_length\"}", 2.0),
        ("flowgate_packet_malformed_total{reason=\"ext_chain_too_long\"}", 1.0),
        ("flowgate_packet_malformed_total{reason=\"tiny_fragment\"}", 1.0),
        ("flowgate_packet_dropped_total{frontend=\"tun\",reason=\"malformed\"}", 9.0),
        ("flowgate_packet_dropped_total{frontend=\"tun\",reason=\"invalid\"}", 1.0),
        // The IPv4 orphan, the IPv6 overlap and the IPv6 orphan.
        ("flowgate_packet_dropped_total{frontend=\"tun\",reason=\"fragment\"}", 3.0),
        // The IPv6 first fragment, of an allowed flow.
        ("flowgate_packet_packets_total{frontend=\"tun\",verdict=\"pass\"}", 1.0),
    ];
    loop {
        let m = w.metrics();
        let missing: Vec<&str> =
            wanted.iter().filter(|(s, n)| !at_least(&m, s, *n)).map(|(s, _)| *s).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "counters that did not rise: {missing:?}\nbefore:\n{before}\nafter:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The empty frame: refused by the kernel, or dropped by the device layer.
    if refused.is_empty() {
        assert!(at_least(
            &w.metrics(),
            "flowgate_packet_dropped_total{frontend=\"tun\",reason=\"device\"}",
            1.0
        ));
    }
    w.fg.assert_running();
    // Forwarding goes on: the established flow and a new one.
    let mut buf = [0u8; 5];
    conn.write_all(b"still").unwrap();
    conn.read_exact(&mut buf).expect("the established flow still echoes");
    assert_eq!(&buf, b"still");
    assert_eq!(w.curl(IpAddr::V4(CLIENT), 10).0, 0, "allowed curl after the malformed packets");
    assert_eq!(w.curl(IpAddr::V6(CLIENT6), 10).0, 0, "allowed IPv6 curl after them");
}

#[test]
fn a_device_that_cannot_be_opened_stops_start_up_naming_it() {
    if skip_unless(&[Need::Root, topology::need_tun()]) {
        return;
    }
    let ns = Netns::new("pktbad");
    // An interface of that name that is not a TUN: TUNSETIFF refuses to attach to it.
    ns.exec(&format!("ip link add {TUN} type veth peer name {TUN}p"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inventory.yaml"), INVENTORY).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let config = dir.path().join("flowgate.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n[control]\nwatch = false\n\
             [packet]\nworkers = 1\n[packet.tun]\ndevice = \"{TUN}\"\n"
        ),
    )
    .unwrap();
    let mut fg = Flowgate::spawn(in_netns(&ns, &config));
    let status = fg.wait_exit(WAIT);
    assert_eq!(status.code(), Some(2), "{status}");
    let line = fg.wait_stderr("flowgate: error", WAIT);
    assert!(line.contains(TUN) && line.contains("TUNSETIFF"), "{line}");
}
