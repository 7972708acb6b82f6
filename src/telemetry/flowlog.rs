//! The flow log: `deny`, `would-deny`, `revoked`, `malformed` and (sampled, off by
//! default) `allow` events as JSON lines, to a file or stdout.
//!
//! The data path never writes: it builds an [`Event`] (plain values and `Arc` clones, no
//! allocation) and hands it to [`FlowLog::emit`], a `try_send` into a bounded channel. A
//! full channel drops the event and counts it (`Registry::flowlog_dropped`); traffic never
//! waits for the log. A background thread owns the output: it folds identical events that
//! arrive within the dedupe window into one line with a `count`, resolves workload and
//! policy ids to names through the policy snapshot the event was decided with, and writes.
//!
//! "Identical" means every field but the timestamp and the client's source port: a client
//! hammering a denied service with new connections is one line per window, not thousands.
//! The line carries the first event's timestamp and source address.
//!
//! Schema (docs/DESIGN.md §5.1): `ts` (RFC 3339, ms, UTC), `event`, `listener`, `proto`, `src`,
//! `dst` (ip:port), `fqdn`, `src_workload`, `dst_workload` (`ns/name` or null),
//! `direction`, `reason`, `policy`, `generation`, `count`.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::flow::{Direction, FlowKey, Proto};
use crate::policy::{Decision, PolicyId, PolicySnapshot, Verdict, WorkloadId};
use crate::telemetry::metrics::Registry;

pub use crate::config::FlowLogConfig;

/// The kind of event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Allow,
    Deny,
    /// An audit-mode policy would have denied this (allowed) flow.
    WouldDeny,
    /// An established flow cut because a new policy generation denies it.
    Revoked,
    /// A connection (or datagram) refused before any flow could be named: its handshake
    /// (PROXY header, CONNECT head, SOCKS5 message) was broken or came from an
    /// untrusted peer. The reason is a [`Malformed`] label.
    Malformed,
}

impl EventKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Allow => "allow",
            EventKind::Deny => "deny",
            EventKind::WouldDeny => "would-deny",
            EventKind::Revoked => "revoked",
            EventKind::Malformed => "malformed",
        }
    }
}

/// Why a handshake was refused as malformed: the closed set of `reason`s a `malformed`
/// event carries (docs/DESIGN.md §5.1). Timeouts and clients that close mid-handshake are
/// counted, not logged: a port scanner or a health check is not an attack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// A PROXY header that does not parse (or no header where one is required).
    ProxyHeader,
    /// A PROXY header from a peer outside `trusted_proxies`.
    ProxyUntrusted,
    /// A valid PROXY header for the other transport (DGRAM on TCP, STREAM on UDP).
    ProxyTransport,
    /// An HTTP proxy request head that does not parse.
    HttpHead,
    /// An HTTP request head over `max_header_bytes` / `max_request_line`.
    HttpTooLarge,
    /// More header fields than `max_headers`.
    HttpTooManyHeaders,
    /// An absolute-form request whose `Host` names another host.
    HttpHostMismatch,
    /// A destination that cannot be a host name or address.
    BadName,
    /// A SOCKS5 greeting, authentication or request message that does not parse.
    Socks5Message,
    /// A SOCKS5 greeting offering no method the listener accepts.
    Socks5NoMethod,
    /// A SOCKS5 command the listener does not carry (BIND; UDP ASSOCIATE where
    /// `udp_associate = false`).
    Socks5Command,
    /// A SOCKS5 address type other than IPv4, IPv6 and domain name.
    Socks5AddrType,
    /// A SOCKS5 CONNECT to port 0.
    Socks5PortZero,
}

impl Malformed {
    /// The flow log's `reason` for this refusal.
    pub const fn as_str(self) -> &'static str {
        match self {
            Malformed::ProxyHeader => "proxy-header",
            Malformed::ProxyUntrusted => "proxy-untrusted",
            Malformed::ProxyTransport => "proxy-transport",
            Malformed::HttpHead => "http-malformed",
            Malformed::HttpTooLarge => "http-too-large",
            Malformed::HttpTooManyHeaders => "http-too-many-headers",
            Malformed::HttpHostMismatch => "http-host-mismatch",
            Malformed::BadName => "bad-name",
            Malformed::Socks5Message => "socks5-malformed",
            Malformed::Socks5NoMethod => "socks5-no-method",
            Malformed::Socks5Command => "socks5-command",
            Malformed::Socks5AddrType => "socks5-address-type",
            Malformed::Socks5PortZero => "socks5-port-zero",
        }
    }

    /// Every label, in declaration order (for docs and tests).
    pub const ALL: [Malformed; 13] = [
        Malformed::ProxyHeader,
        Malformed::ProxyUntrusted,
        Malformed::ProxyTransport,
        Malformed::HttpHead,
        Malformed::HttpTooLarge,
        Malformed::HttpTooManyHeaders,
        Malformed::HttpHostMismatch,
        Malformed::BadName,
        Malformed::Socks5Message,
        Malformed::Socks5NoMethod,
        Malformed::Socks5Command,
        Malformed::Socks5AddrType,
        Malformed::Socks5PortZero,
    ];
}

/// One event as the data path builds it: no strings are formatted here, ids are resolved
/// to names by the writer through `snapshot` (the generation that decided).
#[derive(Clone, Debug)]
pub struct Event {
    pub ts: SystemTime,
    pub kind: EventKind,
    /// The listener's name (an `Arc` clone, not a copy).
    pub listener: Arc<str>,
    pub proto: Proto,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The destination's name where the dataplane knew it.
    pub fqdn: Option<Arc<str>>,
    pub src_workload: Option<WorkloadId>,
    pub dst_workload: Option<WorkloadId>,
    /// The side that refused (`None` for allow or when neither side is a workload).
    pub direction: Option<Direction>,
    /// Why: a policy cause (`not-admitted`, `admin-deny`, …) or a data-path reason
    /// (`conntrack-full`).
    pub reason: &'static str,
    /// The deciding policy (or the isolating one).
    pub policy: Option<PolicyId>,
    /// The policy generation that decided; also resolves the ids above.
    pub snapshot: Arc<PolicySnapshot>,
}

/// Why a flow was refused, for a `deny` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// A policy decision that denies the flow: its cause, side, policy and workloads.
    Policy(Decision),
    /// Refused by the data path, before policy (SSRF guard, a bad or unresolved name,
    /// flowgate's own listener) or after it (conntrack full): `reason`, and the workloads
    /// known at the time. No side and no policy.
    DataPath {
        reason: &'static str,
        src_workload: Option<WorkloadId>,
        dst_workload: Option<WorkloadId>,
    },
}

impl Denied {
    /// The flow log's `reason`: the policy's cause, or the data path's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Policy(d) => match d.verdict {
                Verdict::Deny(r) => r.cause.as_str(),
                Verdict::Allow => "policy",
            },
            Denied::DataPath { reason, .. } => reason,
        }
    }
}

/// Which flow an event is about, as every kind names it: the listener's name (an `Arc`
/// clone), the flow, the name it was asked for and the snapshot that decided (which also
/// resolves the event's ids to names).
#[derive(Clone, Debug)]
pub struct Flow<'a> {
    pub listener: Arc<str>,
    pub key: &'a FlowKey,
    pub fqdn: Option<Arc<str>>,
    pub snapshot: Arc<PolicySnapshot>,
}

/// One constructor per kind: what each kind carries is decided here, once, and every
/// caller on the data path and in the control plane builds its events through them.
/// None allocates.
impl Event {
    /// `deny`: a new flow refused (see [`Denied`]).
    pub fn deny(flow: Flow<'_>, why: Denied) -> Event {
        let reason = why.reason();
        match why {
            Denied::Policy(d) => {
                Event { reason, ..Event::decided(EventKind::Deny, flow, Some(&d)) }
            }
            Denied::DataPath { src_workload, dst_workload, .. } => Event {
                reason,
                src_workload,
                dst_workload,
                ..Event::decided(EventKind::Deny, flow, None)
            },
        }
    }

    /// `would-deny`: an allowed flow that an audit-mode policy (`decision.would_deny`)
    /// would have refused.
    pub fn would_deny(flow: Flow<'_>, decision: &Decision) -> Event {
        let e = Event::decided(EventKind::WouldDeny, flow, Some(decision));
        Event { reason: "audit", policy: decision.would_deny, ..e }
    }

    /// `allow`: an admitted flow (sampled, `allow_sample`).
    pub fn allow(flow: Flow<'_>, decision: &Decision) -> Event {
        Event { reason: "allowed", ..Event::decided(EventKind::Allow, flow, Some(decision)) }
    }

    /// `malformed`: a handshake refused before any flow was named. `flow.key`'s `src` is
    /// the peer that sent it (the PROXY header's client once a trusted header named one),
    /// its `dst` the listener's address; the source workload is the one at that address.
    /// No name, destination workload, side or policy.
    pub fn malformed(flow: Flow<'_>, why: Malformed) -> Event {
        let src_workload = flow.snapshot.compiled.workload_of(flow.key.src.ip());
        Event {
            reason: why.as_str(),
            src_workload,
            ..Event::decided(EventKind::Malformed, flow, None)
        }
    }

    /// `revoked`: an established flow cut because `decision` (of the new generation,
    /// the flow's snapshot) denies it: its cause and side, or `revoked` when it names
    /// none.
    pub fn revoked(flow: Flow<'_>, decision: &Decision) -> Event {
        let reason = match decision.verdict {
            Verdict::Deny(r) => r.cause.as_str(),
            Verdict::Allow => "revoked",
        };
        Event { reason, ..Event::decided(EventKind::Revoked, flow, Some(decision)) }
    }

    /// The parts every kind has, with `decision`'s workloads, policy and (for a denial)
    /// side when there is one; the constructors set the reason and what differs.
    fn decided(kind: EventKind, flow: Flow<'_>, decision: Option<&Decision>) -> Event {
        let direction = match decision.map(|d| d.verdict) {
            Some(Verdict::Deny(r)) => r.direction,
            _ => None,
        };
        Event {
            ts: SystemTime::now(),
            kind,
            listener: flow.listener,
            proto: flow.key.proto,
            src: flow.key.src,
            dst: flow.key.dst,
            fqdn: flow.fqdn,
            src_workload: decision.and_then(|d| d.src_workload),
            dst_workload: decision.and_then(|d| d.dst_workload),
            direction,
            reason: "",
            policy: decision.and_then(|d| d.policy),
            snapshot: flow.snapshot,
        }
    }
}

/// The handle the data path logs through. Cheap to clone; `emit` never blocks.
#[derive(Clone, Debug)]
pub struct FlowLog {
    tx: Option<SyncSender<Event>>,
    registry: Arc<Registry>,
    allow_sample: u64,
    allow_seen: Arc<AtomicU64>,
}

impl FlowLog {
    /// A flow log that discards everything (for tests and tools that have none).
    pub fn disabled(registry: Arc<Registry>) -> FlowLog {
        FlowLog { tx: None, registry, allow_sample: 0, allow_seen: Arc::default() }
    }

    /// Opens the output and starts the writer thread.
    ///
    /// # Errors
    /// The output file cannot be opened for appending.
    pub fn start(
        cfg: &FlowLogConfig,
        registry: Arc<Registry>,
    ) -> io::Result<(FlowLog, FlowLogWriter)> {
        let out: Box<dyn Write + Send> = if cfg.output == "-" {
            Box::new(io::stdout())
        } else {
            let path = PathBuf::from(&cfg.output);
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
        };
        let (tx, rx) = mpsc::sync_channel(cfg.channel_capacity.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rx,
            out: BufWriter::with_capacity(64 * 1024, out),
            window: cfg.dedupe_window,
            max_pending: cfg.dedupe_max.max(1),
            pending: HashMap::new(),
            registry: registry.clone(),
            stop: stop.clone(),
        };
        let thread =
            std::thread::Builder::new().name("flowlog".into()).spawn(move || writer.run())?;
        let log = FlowLog {
            tx: Some(tx),
            registry,
            allow_sample: cfg.allow_sample,
            allow_seen: Arc::default(),
        };
        Ok((log, FlowLogWriter { stop, thread: Some(thread) }))
    }

    /// Queues an event for the writer. Never blocks: a full channel drops the event and
    /// counts it.
    #[inline]
    pub fn emit(&self, event: Event) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.registry.flowlog_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether this allowed flow is one of the sampled ones (`allow_sample`: 1 in N).
    #[inline]
    pub fn sample_allow(&self) -> bool {
        self.tx.is_some()
            && self.allow_sample != 0
            && self.allow_seen.fetch_add(1, Ordering::Relaxed).is_multiple_of(self.allow_sample)
    }
}

/// Owns the writer thread; [`FlowLogWriter::finish`] flushes everything and stops it.
#[derive(Debug)]
pub struct FlowLogWriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FlowLogWriter {
    /// Writes every queued and folded event, then stops the thread. Events emitted after
    /// this are dropped (and counted).
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FlowLogWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// What makes two events "identical" for folding: everything but the time and the
/// client's source port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FoldKey {
    kind: EventKind,
    listener: Arc<str>,
    proto: Proto,
    src_ip: IpAddr,
    dst: SocketAddr,
    fqdn: Option<Arc<str>>,
    src_workload: Option<WorkloadId>,
    dst_workload: Option<WorkloadId>,
    direction: Option<Direction>,
    reason: &'static str,
    policy: Option<PolicyId>,
    generation: u64,
}

struct Pending {
    first: Event,
    count: u64,
    since: Instant,
}

struct Writer {
    rx: Receiver<Event>,
    out: BufWriter<Box<dyn Write + Send>>,
    window: Duration,
    max_pending: usize,
    pending: HashMap<FoldKey, Pending>,
    registry: Arc<Registry>,
    stop: Arc<AtomicBool>,
}

/// How often the writer looks at the clock for windows that closed and for `stop`.
const TICK: Duration = Duration::from_millis(50);

impl Writer {
    fn run(mut self) {
        loop {
            match self.rx.recv_timeout(TICK) {
                Ok(ev) => {
                    self.take(ev);
                    // Drain what is already queued before touching the clock again.
                    while let Ok(ev) = self.rx.try_recv() {
                        self.take(ev);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.flush_due(Instant::now(), false);
            if self.stop.load(Ordering::Acquire) {
                while let Ok(ev) = self.rx.try_recv() {
                    self.take(ev);
                }
                break;
            }
        }
        self.flush_due(Instant::now(), true);
    }

    fn take(&mut self, ev: Event) {
        if self.window.is_zero() {
            self.write(&ev, 1);
            return;
        }
        let key = FoldKey {
            kind: ev.kind,
            listener: ev.listener.clone(),
            proto: ev.proto,
            src_ip: ev.src.ip(),
            dst: ev.dst,
            fqdn: ev.fqdn.clone(),
            src_workload: ev.src_workload,
            dst_workload: ev.dst_workload,
            direction: ev.direction,
            reason: ev.reason,
            policy: ev.policy,
            generation: ev.snapshot.generation.0,
        };
        let full = self.pending.len() >= self.max_pending;
        match self.pending.entry(key) {
            MapEntry::Occupied(mut o) => {
                o.get_mut().count += 1;
                self.registry.flowlog_folded.fetch_add(1, Ordering::Relaxed);
            }
            MapEntry::Vacant(_) if full => self.write(&ev, 1),
            MapEntry::Vacant(v) => {
                v.insert(Pending { first: ev, count: 1, since: Instant::now() });
            }
        }
    }

    /// Writes the folded events whose window has closed (all of them when `all`).
    fn flush_due(&mut self, now: Instant, all: bool) {
        if !self.pending.is_empty() {
            let window = self.window;
            let due: Vec<FoldKey> = self
                .pending
                .iter()
                .filter(|(_, p)| all || now.saturating_duration_since(p.since) >= window)
                .map(|(k, _)| k.clone())
                .collect();
            let mut batch: Vec<Pending> =
                due.iter().filter_map(|k| self.pending.remove(k)).collect();
            batch.sort_by_key(|p| p.first.ts);
            for p in &batch {
                self.write(&p.first, p.count);
            }
        }
        let _ = self.out.flush();
    }

    /// Writes one line whole or not at all: it is rendered first, then handed to the
    /// buffer in one `write_all`, which takes all of it or (the buffer full and the disk
    /// refusing the flush: ENOSPC, EIO) none of it. A line refused is lost: its `count`
    /// events are counted as dropped, so a full disk shows in `flowlog_dropped` instead of
    /// vanishing, and no half line is left in the buffer to glue onto the next one when
    /// the disk has room again (lines already buffered are written then).
    fn write(&mut self, ev: &Event, count: u64) {
        let mut buf = Vec::with_capacity(320);
        let ok = serde_json::to_writer(&mut buf, &render(ev, count)).is_ok() && {
            buf.push(b'\n');
            self.out.write_all(&buf).is_ok()
        };
        if !ok {
            self.registry.flowlog_dropped.fetch_add(count, Ordering::Relaxed);
        }
    }
}

/// One line of the flow log, exactly the docs/DESIGN.md fields in order.
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    pub ts: String,
    pub event: &'static str,
    pub listener: &'a str,
    pub proto: &'static str,
    pub src: String,
    pub dst: String,
    pub fqdn: Option<&'a str>,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub direction: Option<&'static str>,
    pub reason: &'static str,
    pub policy: Option<&'a str>,
    pub generation: u64,
    pub count: u64,
}

/// Resolves an event into its line (the writer's job; public for the admin API and tests).
pub fn render(ev: &Event, count: u64) -> Line<'_> {
    let compiled = &ev.snapshot.compiled;
    let name =
        |w: Option<WorkloadId>| w.and_then(|id| compiled.workload_name(id)).map(|n| n.to_string());
    Line {
        ts: DateTime::<Utc>::from(ev.ts).to_rfc3339_opts(SecondsFormat::Millis, true),
        event: ev.kind.as_str(),
        listener: &ev.listener,
        proto: proto_name(ev.proto),
        src: ev.src.to_string(),
        dst: ev.dst.to_string(),
        fqdn: ev.fqdn.as_deref(),
        src_workload: name(ev.src_workload),
        dst_workload: name(ev.dst_workload),
        direction: ev.direction.map(Direction::as_str),
        reason: ev.reason,
        policy: ev.policy.and_then(|p| compiled.policy_name(p)),
        generation: ev.snapshot.generation.0,
        count,
    }
}

/// Protocol names in the flow log are lower case (`tcp`, `udp`), like the listener kinds.
const fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Sctp => "sctp",
        Proto::Icmp => "icmp",
        Proto::Icmpv6 => "icmpv6",
        Proto::Unknown(_) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::policy::{CompileOptions, CompiledPolicy, DefaultAction, Generation, PolicySet};

    fn snapshot() -> Arc<PolicySnapshot> {
        let opts = CompileOptions {
            default: DefaultAction::Deny,
            unknown: DefaultAction::Deny,
            now: SystemTime::now(),
        };
        let compiled = CompiledPolicy::compile(&PolicySet::default(), &opts).unwrap();
        Arc::new(PolicySnapshot {
            compiled,
            generation: Generation(7),
            content_hash: String::new(),
            loaded_at: SystemTime::now(),
            source_revision: Default::default(),
        })
    }

    fn event(src: &str, snap: &Arc<PolicySnapshot>) -> Event {
        Event {
            ts: SystemTime::now(),
            kind: EventKind::Deny,
            listener: Arc::from("l"),
            proto: Proto::Udp,
            src: src.parse::<SocketAddr>().unwrap(),
            dst: "198.18.0.1:53".parse().unwrap(),
            fqdn: Some(Arc::from("dns.example")),
            src_workload: None,
            dst_workload: None,
            direction: None,
            reason: "unknown-endpoints",
            policy: None,
            snapshot: snap.clone(),
        }
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `cfg` writing to `log` in a fresh temporary directory; the directory lives as long
    /// as the returned guard.
    fn to_temp_file(cfg: FlowLogConfig) -> (tempfile::TempDir, std::path::PathBuf, FlowLogConfig) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let cfg = FlowLogConfig { output: path.to_string_lossy().into_owned(), ..cfg };
        (dir, path, cfg)
    }

    #[test]
    fn identical_events_fold_and_others_stay_apart() {
        let (_dir, path, cfg) = to_temp_file(FlowLogConfig {
            dedupe_window: Duration::from_secs(60),
            ..FlowLogConfig::default()
        });
        let reg = Arc::new(Registry::default());
        let (log, writer) = FlowLog::start(&cfg, reg.clone()).unwrap();
        let snap = snapshot();
        for port in 1000..1010 {
            log.emit(event(&format!("198.18.0.9:{port}"), &snap)); // ports differ: folded
        }
        log.emit(event("198.18.0.10:1000", &snap)); // another client: its own line
        writer.finish(); // flushes pending folds
        let got = lines(&path);
        assert_eq!(got.len(), 2, "{got:?}");
        let first = got.iter().find(|l| l["src"] == "198.18.0.9:1000").unwrap();
        assert_eq!(first["count"], 10);
        assert_eq!(first["generation"], 7);
        assert_eq!(first["fqdn"], "dns.example");
        assert_eq!(first["proto"], "udp");
        assert_eq!(reg.flowlog_folded.load(Ordering::Relaxed), 9);
        assert_eq!(reg.flowlog_dropped.load(Ordering::Relaxed), 0);
    }

    /// `malformed` events fold like denials: one line per peer address, reason and
    /// listener within the window, with the count.
    #[test]
    fn malformed_events_fold_per_peer_and_reason() {
        let (_dir, path, cfg) = to_temp_file(FlowLogConfig {
            dedupe_window: Duration::from_secs(60),
            ..FlowLogConfig::default()
        });
        let (log, writer) = FlowLog::start(&cfg, Arc::new(Registry::default())).unwrap();
        let snap = snapshot();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let emit = |src: &str, why: Malformed| {
            let key = FlowKey::new(Proto::Tcp, src.parse().unwrap(), local);
            let flow = Flow {
                listener: Arc::from("connect"),
                key: &key,
                fqdn: None,
                snapshot: snap.clone(),
            };
            log.emit(Event::malformed(flow, why));
        };
        for port in 1000..1005 {
            emit(&format!("198.18.0.9:{port}"), Malformed::HttpHead);
        }
        emit("198.18.0.9:2000", Malformed::HttpTooLarge);
        emit("198.18.0.10:1000", Malformed::HttpHead);
        writer.finish();
        let got = lines(&path);
        assert_eq!(got.len(), 3, "{got:?}");
        let first = got.iter().find(|l| l["src"] == "198.18.0.9:1000").unwrap();
        assert_eq!(first["event"], "malformed");
        assert_eq!(first["reason"], "http-malformed");
        assert_eq!(first["dst"], "127.0.0.1:8080");
        assert_eq!(first["listener"], "connect");
        assert_eq!(first["count"], 5);
        assert!(got.iter().any(|l| l["reason"] == "http-too-large" && l["count"] == 1));
    }

    #[test]
    fn malformed_reasons_are_distinct_short_labels() {
        let labels: std::collections::HashSet<_> =
            Malformed::ALL.iter().map(|m| m.as_str()).collect();
        assert_eq!(labels.len(), Malformed::ALL.len());
        assert!(labels.iter().all(|l| l.len() <= 24 && !l.contains(' ')));
    }

    #[test]
    fn a_full_channel_drops_and_counts_never_blocks() {
        let (_dir, path, cfg) = to_temp_file(FlowLogConfig {
            channel_capacity: 4,
            dedupe_window: Duration::ZERO,
            ..FlowLogConfig::default()
        });
        let reg = Arc::new(Registry::default());
        let (log, writer) = FlowLog::start(&cfg, reg.clone()).unwrap();
        let snap = snapshot();
        // Far more than the writer can take between two of its wake-ups.
        let t0 = Instant::now();
        for i in 0..20_000u32 {
            log.emit(event(&format!("198.18.{}.{}:1", i / 250, i % 250), &snap));
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "emit must not wait for the writer");
        writer.finish();
        let written = lines(&path).len() as u64;
        let dropped = reg.flowlog_dropped.load(Ordering::Relaxed);
        assert!(dropped > 0, "a 4-slot channel overflowed");
        assert_eq!(written + dropped, 20_000, "every event is written or counted");
    }

    #[test]
    fn allow_sampling_is_one_in_n_and_off_by_default() {
        let reg = Arc::new(Registry::default());
        let (_dir, _, mut cfg) = to_temp_file(FlowLogConfig::default());
        let (off, w) = FlowLog::start(&cfg, reg.clone()).unwrap();
        assert!((0..100).all(|_| !off.sample_allow()));
        w.finish();
        cfg.allow_sample = 10;
        let (on, w) = FlowLog::start(&cfg, reg).unwrap();
        assert_eq!((0..100).filter(|_| on.sample_allow()).count(), 10);
        w.finish();
    }
}
