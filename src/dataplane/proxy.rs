//! The proxy dataplane (tokio): listeners that accept connections or datagrams, learn the
//! client (peer or PROXY header), pass each new flow through [`crate::dataplane::admit`]
//! and forward what is allowed. One file per listener kind:
//!
//! - [`listener`]: socket binding and the accept loop every TCP kind runs (the
//!   `[[listener]]` config types live in [`crate::config::listener`]);
//! - L4: [`tcp`] (and the `echo` upstream) and [`udp`] (per-client sessions), to
//!   configured upstreams ([`upstream`]: round robin with cool-down);
//! - the forward proxies, where the client names the destination: [`connect`]
//!   (`http-connect`), [`socks5`] (CONNECT and UDP ASSOCIATE) and [`transparent`]
//!   (NAT-redirected connections), which share [`forward`]: their listener state, how a
//!   destination reaches the gate, the dial and the relay;
//! - shared by all: [`proxy_header`] (the PROXY protocol header in front of a connection
//!   or datagram) and [`splice`] (moving the bytes).
//!
//! [`start`] binds every configured listener first (so a bad address fails start-up
//! before anything is served), then spawns them and marks the runtime ready.
//!
//! Not here: the decision (`dataplane::admit`, `policy`), destination names, resolution,
//! the SSRF guard and handshake parsing (`crate::egress`), packets.

pub mod connect;
pub mod forward;
pub mod listener;
pub mod proxy_header;
pub mod socks5;
pub mod splice;
pub mod tcp;
pub mod transparent;
pub mod udp;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use self::forward::ForwardProxy;
use self::listener::{Handler, ListenerConfig, ListenerKind, bind_socket};
use self::tcp::TcpProxy;
use self::udp::UdpProxy;
use self::upstream::Upstreams;
use super::{ListenerTag, Runtime};
use crate::shutdown::Shutdown;

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind { name: String, addr: SocketAddr, source: std::io::Error },
    #[error("[dns]: {0}")]
    Resolver(#[from] crate::egress::resolve::BuildError),
}

/// What the forward-proxy listeners (`http-connect`, `socks5`) need besides their own
/// `[[listener]]` table: `[dns]`, `[ssrf]`, and flowgate's other listening addresses
/// (the admin API) that the proxy must never dial.
#[derive(Clone, Debug, Default)]
pub struct EgressSettings {
    pub dns: crate::egress::DnsConfig,
    pub ssrf: crate::egress::SsrfConfig,
    pub other_own: Vec<SocketAddr>,
}

/// A listener that is up.
#[derive(Debug)]
pub struct RunningListener {
    pub name: String,
    pub kind: ListenerKind,
    /// The bound address (with the real port when the config said `:0`).
    pub local_addr: SocketAddr,
    pub task: JoinHandle<()>,
}

/// Binds and starts every listener, in config order (a listener's id in conntrack is its
/// index in the registry). Must be called inside a tokio runtime. Marks
/// `rt.readiness` once all are serving.
///
/// # Errors
/// [`ProxyError::Bind`] for the first listener that cannot bind; none is started then.
pub fn start(
    rt: &Arc<Runtime>,
    listeners: &[ListenerConfig],
    shutdown: &Shutdown,
) -> Result<Vec<RunningListener>, ProxyError> {
    start_with_egress(rt, listeners, &EgressSettings::default(), shutdown)
}

/// [`start`], with the settings the forward-proxy kinds use. The resolver is built only
/// when such a listener is configured; every bound listener address (and
/// `egress.other_own`) is refused as a destination.
///
/// # Errors
/// [`ProxyError::Bind`]; [`ProxyError::Resolver`] when `[dns]` cannot be set up.
pub fn start_with_egress(
    rt: &Arc<Runtime>,
    listeners: &[ListenerConfig],
    egress: &EgressSettings,
    shutdown: &Shutdown,
) -> Result<Vec<RunningListener>, ProxyError> {
    start_with_credentials(rt, listeners, egress, Arc::default(), shutdown)
}

/// [`start_with_egress`], with the `[[credential]]` table the egress listeners check
/// proxy credentials against.
///
/// # Errors
/// As [`start_with_egress`].
pub fn start_with_credentials(
    rt: &Arc<Runtime>,
    listeners: &[ListenerConfig],
    egress: &EgressSettings,
    credentials: Arc<crate::egress::Credentials>,
    shutdown: &Shutdown,
) -> Result<Vec<RunningListener>, ProxyError> {
    enum Bound {
        Tcp(TcpListener),
        Udp(tokio::net::UdpSocket),
    }
    let mut bound = Vec::with_capacity(listeners.len());
    for cfg in listeners {
        let err = |source| ProxyError::Bind { name: cfg.name.clone(), addr: cfg.bind, source };
        let b = match cfg.kind {
            ListenerKind::Tcp
            | ListenerKind::Echo
            | ListenerKind::HttpConnect
            | ListenerKind::Socks5
            | ListenerKind::Transparent => {
                let sock =
                    bind_socket(cfg.bind, socket2::Type::STREAM, cfg.reuse_port, Some(cfg.backlog))
                        .map_err(err)?;
                Bound::Tcp(TcpListener::from_std(sock.into()).map_err(err)?)
            }
            ListenerKind::Udp => Bound::Udp(udp::bind(cfg).map_err(err)?),
        };
        bound.push(b);
    }
    let checker = if listeners.iter().any(|l| l.kind.is_egress()) {
        let mut own = egress.other_own.clone();
        for b in &bound {
            match b {
                Bound::Tcp(l) => own.extend(l.local_addr().ok()),
                Bound::Udp(s) => own.extend(s.local_addr().ok()),
            }
        }
        let resolver = crate::egress::Resolver::new(&egress.dns)?;
        let guard = crate::egress::Guard::new(egress.ssrf.clone());
        Some(Arc::new(
            crate::egress::Checker::new(guard, resolver)
                .with_own_listeners(own)
                .with_credentials(credentials),
        ))
    } else {
        None
    };
    let mut running = Vec::with_capacity(listeners.len());
    for (cfg, b) in listeners.iter().zip(bound) {
        // A listener's id (in conntrack entries) is its position in the registry, whoever
        // registered listeners before: `dataplane::log_revoked` finds its name that way.
        let index = rt.registry.listeners().len();
        let counters = rt.registry.listener(&cfg.name, cfg.kind.as_str());
        let tag = ListenerTag {
            index: u16::try_from(index).unwrap_or(u16::MAX),
            name: Arc::from(cfg.name.as_str()),
            counters: counters.clone(),
        };
        let upstreams = Upstreams::new(cfg.upstreams.clone(), cfg.upstream_cooldown);
        let signal = shutdown.signal();
        let guard = shutdown.guard();
        let (local_addr, task) = match b {
            Bound::Tcp(l) => {
                let local = l.local_addr().unwrap_or(cfg.bind);
                let forward_proxy = || {
                    Arc::new(ForwardProxy {
                        rt: rt.clone(),
                        tag: tag.clone(),
                        cfg: cfg.clone(),
                        header: cfg.proxy_header(),
                        limits: cfg.handshake_limits(),
                        // Built above whenever an egress listener is configured.
                        checker: checker.clone().expect("checker exists for egress kinds"),
                        handshakes: Arc::new(tokio::sync::Semaphore::new(cfg.max_handshakes)),
                        udp_associations: Arc::new(tokio::sync::Semaphore::new(
                            cfg.udp_max_associations,
                        )),
                    })
                };
                let handler = match cfg.kind {
                    ListenerKind::Echo => Handler::Echo { idle: cfg.idle_timeout },
                    ListenerKind::HttpConnect => Handler::HttpConnect(forward_proxy()),
                    ListenerKind::Socks5 => Handler::Socks5(forward_proxy()),
                    ListenerKind::Transparent => Handler::Transparent(forward_proxy()),
                    _ => Handler::Proxy(Arc::new(TcpProxy {
                        rt: rt.clone(),
                        tag,
                        cfg: cfg.clone(),
                        upstreams,
                        header: cfg.proxy_header(),
                    })),
                };
                let max = cfg.max_connections;
                (local, tokio::spawn(listener::serve(l, handler, counters, max, signal, guard)))
            }
            Bound::Udp(s) => {
                let local = s.local_addr().unwrap_or(cfg.bind);
                let header = cfg.proxy_header();
                let proxy =
                    Arc::new(UdpProxy { rt: rt.clone(), tag, cfg: cfg.clone(), upstreams, header });
                (local, tokio::spawn(proxy.serve(Arc::new(s), signal, guard)))
            }
        };
        running.push(RunningListener { name: cfg.name.clone(), kind: cfg.kind, local_addr, task });
    }
    rt.readiness.set_ready();
    Ok(running)
}
