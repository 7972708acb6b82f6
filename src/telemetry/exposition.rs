//! Prometheus text exposition (format 0.0.4) of every metric: the names docs/DESIGN.md lists,
//! plus reload, revalidation, emergency, flow-log and admin counters.
//!
//! Built on each scrape from the atomics and the merged decision histogram; nothing here
//! runs on the data path. Every metric name is defined once, as a constant in [`names`]
//! (dashboards and alerts rely on them: never rename one). What is rendered comes in a
//! [`Scrape`] of plain values, so telemetry needs no control-plane type.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::conntrack::Conntrack;
use crate::policy::PolicySnapshot;
use crate::telemetry::metrics::{ListenerCounters, PacketTotals, Registry};

/// Metric names (families), so code, tests and dashboards refer to one spelling.
pub mod names {
    pub const FLOWS_TOTAL: &str = "flowgate_flows_total";
    pub const BYTES_TOTAL: &str = "flowgate_bytes_total";
    pub const DECISION_SECONDS: &str = "flowgate_policy_decision_seconds";
    pub const CONNTRACK_ENTRIES: &str = "flowgate_conntrack_entries";
    pub const CONNTRACK_CAPACITY: &str = "flowgate_conntrack_capacity";
    pub const CONNTRACK_EVICTIONS: &str = "flowgate_conntrack_evictions_total";
    pub const POLICY_GENERATION: &str = "flowgate_policy_generation";
    pub const RELOADS_TOTAL: &str = "flowgate_policy_reloads_total";
    pub const RELOAD_SECONDS: &str = "flowgate_policy_reload_seconds";
    pub const RELOAD_FAILING: &str = "flowgate_policy_reload_failing";
    pub const REVOKED_TOTAL: &str = "flowgate_flows_revoked_total";
    pub const FLOWLOG_DROPPED: &str = "flowgate_flowlog_dropped_total";
    pub const CONNECTIONS_ACCEPTED: &str = "flowgate_connections_accepted_total";
    pub const CONNECTIONS_ACTIVE: &str = "flowgate_connections_active";
    pub const HANDSHAKE_ERRORS: &str = "flowgate_handshake_errors_total";
    pub const LIMIT_REACHED: &str = "flowgate_limit_reached_total";
    pub const UPSTREAM_FAILURES: &str = "flowgate_upstream_failures_total";
    pub const ACCEPT_ERRORS: &str = "flowgate_accept_errors_total";
    pub const UDP_ASSOCIATIONS_IDLE: &str = "flowgate_udp_associations_idle_closed_total";
    pub const DECISION_SAMPLES_DROPPED: &str = "flowgate_policy_decision_samples_dropped_total";
    pub const CONNTRACK_INSERTED: &str = "flowgate_conntrack_inserted_total";
    pub const CONNTRACK_REFUSED: &str = "flowgate_conntrack_refused_total";
    pub const CONNTRACK_EXPIRED: &str = "flowgate_conntrack_expired_total";
    pub const CONNTRACK_BATCH_FALLBACKS: &str = "flowgate_conntrack_batch_fallbacks_total";
    pub const POLICY_POLICIES: &str = "flowgate_policy_policies";
    pub const POLICY_WORKLOADS: &str = "flowgate_policy_workloads";
    pub const POLICY_NEXT_EXPIRY: &str = "flowgate_policy_next_expiry_timestamp_seconds";
    pub const LAST_RELOAD_SUCCESS: &str = "flowgate_policy_last_reload_success_timestamp_seconds";
    pub const REVALIDATED_TOTAL: &str = "flowgate_flows_revalidated_total";
    pub const EMERGENCY_ENTRIES: &str = "flowgate_emergency_entries";
    pub const EMERGENCY_REQUESTS: &str = "flowgate_emergency_requests_total";
    pub const WATCH_EVENTS: &str = "flowgate_policy_watch_events_total";
    pub const AUDIT_WRITE_ERRORS: &str = "flowgate_audit_write_errors_total";
    pub const FLOWLOG_FOLDED: &str = "flowgate_flowlog_folded_total";
    pub const ADMIN_REQUESTS: &str = "flowgate_admin_requests_total";
    pub const ADMIN_REJECTED: &str = "flowgate_admin_rejected_total";
    pub const ADMIN_FLOWS_TRUNCATED: &str = "flowgate_admin_flows_truncated_total";
    pub const SOURCE_CONNECTED: &str = "flowgate_source_connected";
    pub const SOURCE_REVISION: &str = "flowgate_source_revision";
    pub const SOURCE_ERRORS: &str = "flowgate_source_errors_total";

    // The packet filter (`[packet]`): rendered only when it runs.
    pub const PACKET_PACKETS: &str = "flowgate_packet_packets_total";
    pub const PACKET_BYTES: &str = "flowgate_packet_bytes_total";
    pub const PACKET_DROPPED: &str = "flowgate_packet_dropped_total";
    pub const PACKET_MALFORMED: &str = "flowgate_packet_malformed_total";
    pub const PACKET_REJECTS: &str = "flowgate_packet_rejects_total";
    pub const PACKET_DEVICE_ERRORS: &str = "flowgate_packet_device_errors_total";
}

/// Every family's type and help text, one row each, beside the names (so `render` says
/// only what is sampled). A family rendered without a row here fails the tests.
#[rustfmt::skip]
const FAMILIES: &[(&str, &str, &str)] = &[
    (names::FLOWS_TOTAL, "counter", "New flows decided, by listener and verdict."),
    (names::CONNECTIONS_ACCEPTED, "counter", "Connections accepted."),
    (names::CONNECTIONS_ACTIVE, "gauge", "Connections (or UDP sessions) open now."),
    (names::BYTES_TOTAL, "counter", "Bytes forwarded, by listener and direction."),
    (names::HANDSHAKE_ERRORS, "counter", "Handshakes (PROXY, CONNECT, SOCKS5) refused, by reason."),
    (names::LIMIT_REACHED, "counter", "Times a limit bit: max_connections (accept paused), conntrack full (flow refused), max_handshakes (egress client refused at once), udp_max_associations (SOCKS5 UDP ASSOCIATE refused)."),
    (names::UDP_ASSOCIATIONS_IDLE, "counter", "SOCKS5 UDP associations closed after udp_associate_idle_timeout without a datagram."),
    (names::UPSTREAM_FAILURES, "counter", "Upstream connects that failed."),
    (names::ACCEPT_ERRORS, "counter", "accept() failures (EMFILE/ENFILE pause the listener briefly; it never stops)."),
    (names::DECISION_SECONDS, "summary", "Policy decision time per new flow (hdrhistogram per worker, merged at scrape)."),
    (names::DECISION_SAMPLES_DROPPED, "counter", "Decision-time samples not recorded because every tried recorder slot was busy."),
    (names::CONNTRACK_ENTRIES, "gauge", "Flows tracked now."),
    (names::CONNTRACK_CAPACITY, "gauge", "Most flows tracked at once."),
    (names::CONNTRACK_EVICTIONS, "counter", "Entries evicted to make room for a new flow."),
    (names::CONNTRACK_INSERTED, "counter", "Flows tracked."),
    (names::CONNTRACK_REFUSED, "counter", "New flows refused because the table was full."),
    (names::CONNTRACK_EXPIRED, "counter", "Idle entries expired."),
    (names::CONNTRACK_BATCH_FALLBACKS, "counter", "Batch lookups that pinned each entry because every batch reader slot was taken."),
    (names::POLICY_GENERATION, "gauge", "Policy generation in force."),
    (names::POLICY_POLICIES, "gauge", "Policies in force (not expired)."),
    (names::POLICY_WORKLOADS, "gauge", "Inventory workloads."),
    (names::POLICY_NEXT_EXPIRY, "gauge", "When the next TTL'd policy expires (Unix seconds)."),
    (names::RELOADS_TOTAL, "counter", "Reload attempts by result."),
    (names::RELOAD_SECONDS, "summary", "Reload attempt duration (read, load, compile, swap)."),
    (names::RELOAD_FAILING, "gauge", "1 while the last reload was rejected and the previous generation is serving."),
    (names::LAST_RELOAD_SUCCESS, "gauge", "When a reload last succeeded (Unix seconds)."),
    (names::REVALIDATED_TOTAL, "counter", "Established flows re-checked after a policy change."),
    (names::REVOKED_TOTAL, "counter", "Established flows cut because a new policy generation denies them."),
    (names::EMERGENCY_ENTRIES, "gauge", "Emergency policies and quarantines in force."),
    (names::EMERGENCY_REQUESTS, "counter", "POST /emergency by result."),
    (names::WATCH_EVENTS, "counter", "Debounced source changes seen by the watcher."),
    (names::AUDIT_WRITE_ERRORS, "counter", "Audit events that could not be written."),
    (names::FLOWLOG_DROPPED, "counter", "Flow-log events dropped because the log channel was full."),
    (names::FLOWLOG_FOLDED, "counter", "Flow-log events folded into an earlier identical one."),
    (names::ADMIN_REQUESTS, "counter", "Admin API requests."),
    (names::ADMIN_REJECTED, "counter", "Admin API requests refused, by reason."),
    (names::ADMIN_FLOWS_TRUNCATED, "counter", "/flows answers cut short by admin.flows_limit."),
    (names::SOURCE_CONNECTED, "gauge", "1 while the etcd policy source is reachable (source.kind = etcd only)."),
    (names::SOURCE_REVISION, "gauge", "The etcd revision of the policy in force (source.kind = etcd only)."),
    (names::SOURCE_ERRORS, "counter", "etcd answers refused, by reason (too_large: over source.max_answer_bytes)."),
    (names::PACKET_PACKETS, "counter", "Packets filtered, by front end and verdict."),
    (names::PACKET_BYTES, "counter", "IP bytes filtered, by front end and verdict."),
    (names::PACKET_DROPPED, "counter", "Packets not forwarded, by front end and reason."),
    (names::PACKET_MALFORMED, "counter", "Packets dropped as malformed, by what was wrong with them."),
    (names::PACKET_REJECTS, "counter", "Reject replies (TCP RST, ICMP prohibited) sent, and not sent because of the rate limit."),
    (names::PACKET_DEVICE_ERRORS, "counter", "Device reads, writes and polls that failed (TUN queue, AF_PACKET ring)."),
];

const QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];

struct Out {
    text: String,
}

impl Out {
    /// The `# HELP` and `# TYPE` lines of family `name`, from [`FAMILIES`].
    fn family(&mut self, name: &str) {
        let (kind, help) = family_meta(name);
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"");
                escape(&mut self.text, v);
                self.text.push('"');
            }
            self.text.push('}');
        }
        if value.is_finite() {
            let _ = writeln!(self.text, " {value}");
        } else {
            let _ = writeln!(self.text, " NaN");
        }
    }

    fn single(&mut self, name: &str, value: f64) {
        self.family(name);
        self.sample(name, &[], value);
    }

    /// A summary from a histogram whose values are in `unit` seconds.
    fn summary(&mut self, name: &str, h: &Histogram<u64>, unit: f64, sum: f64) {
        self.family(name);
        for q in QUANTILES {
            let v = if h.is_empty() { f64::NAN } else { h.value_at_quantile(q) as f64 * unit };
            self.sample(name, &[("quantile", &q.to_string())], v);
        }
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], h.len() as f64);
    }
}

/// A family's type and help; `untyped` and an empty help for a name missing from
/// [`FAMILIES`] (a test makes sure none is).
fn family_meta(name: &str) -> (&'static str, &'static str) {
    FAMILIES.iter().find(|(n, _, _)| *n == name).map_or(("untyped", ""), |&(_, k, h)| (k, h))
}

fn escape(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn get(c: &AtomicU64) -> f64 {
    c.load(Ordering::Relaxed) as f64
}

/// What one scrape renders: the metric sources, and the policy state the admin API reads
/// from the control plane.
#[derive(Clone, Copy)]
pub struct Scrape<'a> {
    pub registry: &'a Registry,
    pub conntrack: &'a Conntrack,
    /// The policy in force.
    pub policy: &'a PolicySnapshot,
    /// The earliest expiry of a policy or emergency entry, if any.
    pub next_expiry: Option<SystemTime>,
    /// Emergency policies and quarantines in force.
    pub emergency_entries: usize,
}

/// The whole exposition.
pub fn render(scrape: &Scrape<'_>) -> String {
    let reg = scrape.registry;
    let mut o = Out { text: String::with_capacity(8192) };
    let listeners = reg.listeners();

    type Field = fn(&ListenerCounters) -> &AtomicU64;
    type Values = &'static [(&'static str, Field)];
    /// Families with one sample per listener and label value: the family, its label, and
    /// each value's counter.
    #[rustfmt::skip]
    const LABELLED: [(&str, &str, Values); 4] = [
        (names::FLOWS_TOTAL, "verdict", &[("allow", |l| &l.allowed), ("deny", |l| &l.denied)]),
        (names::BYTES_TOTAL, "direction", &[
            ("to_upstream", |l| &l.bytes_up), ("to_client", |l| &l.bytes_down),
        ]),
        (names::HANDSHAKE_ERRORS, "reason", &[
            ("malformed", |l| &l.handshake_malformed), ("timeout", |l| &l.handshake_timeout),
            ("untrusted_proxy", |l| &l.untrusted_proxy), ("auth_failed", |l| &l.auth_failed),
            ("sni_mismatch", |l| &l.sni_refused),
        ]),
        (names::LIMIT_REACHED, "limit", &[
            ("max_connections", |l| &l.limit_reached), ("conntrack", |l| &l.conntrack_full),
            ("max_handshakes", |l| &l.handshakes_full),
            ("udp_max_associations", |l| &l.udp_associations_full),
        ]),
    ];
    for (family, label, values) in LABELLED {
        o.family(family);
        for l in &listeners {
            for (value, field) in values {
                o.sample(family, &[("listener", &l.name), (label, value)], get(field(l)));
            }
        }
    }
    o.family(names::CONNECTIONS_ACCEPTED);
    for l in &listeners {
        let labels = [("listener", l.name.as_str()), ("kind", l.kind.as_str())];
        o.sample(names::CONNECTIONS_ACCEPTED, &labels, get(&l.accepted));
    }
    o.family(names::CONNECTIONS_ACTIVE);
    for l in &listeners {
        o.sample(names::CONNECTIONS_ACTIVE, &[("listener", &l.name)], get(&l.active));
    }
    o.family(names::UDP_ASSOCIATIONS_IDLE);
    for l in &listeners {
        let c = get(&l.udp_associations_idle);
        o.sample(names::UDP_ASSOCIATIONS_IDLE, &[("listener", &l.name)], c);
    }
    o.family(names::UPSTREAM_FAILURES);
    for l in &listeners {
        o.sample(names::UPSTREAM_FAILURES, &[("listener", &l.name)], get(&l.upstream_failed));
    }
    o.family(names::ACCEPT_ERRORS);
    for l in &listeners {
        o.sample(names::ACCEPT_ERRORS, &[("listener", &l.name)], get(&l.accept_errors));
    }

    let lat = reg.decision.snapshot();
    o.summary(names::DECISION_SECONDS, &lat.histogram, 1e-9, lat.sum.as_secs_f64());
    o.single(names::DECISION_SAMPLES_DROPPED, lat.dropped as f64);

    let ct = scrape.conntrack;
    o.single(names::CONNTRACK_ENTRIES, ct.len() as f64);
    o.single(names::CONNTRACK_CAPACITY, ct.capacity() as f64);
    let stats = ct.stats();
    o.single(names::CONNTRACK_EVICTIONS, get(&stats.evicted));
    o.single(names::CONNTRACK_INSERTED, get(&stats.inserted));
    o.single(names::CONNTRACK_REFUSED, get(&stats.refused));
    o.single(names::CONNTRACK_EXPIRED, get(&stats.expired));
    o.single(names::CONNTRACK_BATCH_FALLBACKS, ct.batch_fallbacks() as f64);

    let snap = scrape.policy;
    o.single(names::POLICY_GENERATION, snap.generation.0 as f64);
    o.single(names::POLICY_POLICIES, snap.compiled.live_policy_count() as f64);
    o.single(names::POLICY_WORKLOADS, snap.compiled.workload_count() as f64);
    if let Some(at) = scrape.next_expiry {
        let secs = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        o.single(names::POLICY_NEXT_EXPIRY, secs);
    }
    let c = &reg.control;
    o.family(names::RELOADS_TOTAL);
    o.sample(names::RELOADS_TOTAL, &[("result", "ok")], get(&c.reloads_ok));
    o.sample(names::RELOADS_TOTAL, &[("result", "unchanged")], get(&c.reloads_unchanged));
    o.sample(names::RELOADS_TOTAL, &[("result", "error")], get(&c.reloads_error));
    {
        let h = c.reload_duration.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sum = c.reload_seconds_sum_us.load(Ordering::Relaxed) as f64 * 1e-6;
        o.summary(names::RELOAD_SECONDS, &h, 1e-6, sum);
    }
    o.single(names::RELOAD_FAILING, get(&c.reload_failing));
    o.single(names::LAST_RELOAD_SUCCESS, get(&c.last_success_unix));
    o.single(names::REVALIDATED_TOTAL, get(&c.revalidated));
    o.single(names::REVOKED_TOTAL, get(&c.revoked));
    o.single(names::EMERGENCY_ENTRIES, scrape.emergency_entries as f64);
    o.family(names::EMERGENCY_REQUESTS);
    o.sample(names::EMERGENCY_REQUESTS, &[("result", "accepted")], get(&c.emergency_accepted));
    o.sample(names::EMERGENCY_REQUESTS, &[("result", "rejected")], get(&c.emergency_rejected));
    o.single(names::WATCH_EVENTS, get(&c.watch_events));
    o.single(names::AUDIT_WRITE_ERRORS, get(&c.audit_write_errors));
    o.single(names::FLOWLOG_DROPPED, get(&reg.flowlog_dropped));
    o.single(names::FLOWLOG_FOLDED, get(&reg.flowlog_folded));
    o.single(names::ADMIN_REQUESTS, get(&c.admin_requests));
    o.family(names::ADMIN_REJECTED);
    o.sample(names::ADMIN_REJECTED, &[("reason", "unauthorized")], get(&c.admin_unauthorized));
    o.sample(names::ADMIN_REJECTED, &[("reason", "bad_request")], get(&c.admin_bad_request));
    o.single(names::ADMIN_FLOWS_TRUNCATED, get(&c.admin_flows_truncated));
    if get(&c.source_remote) > 0.0 {
        o.single(names::SOURCE_CONNECTED, get(&c.source_connected));
        o.single(names::SOURCE_REVISION, get(&c.source_revision));
        o.family(names::SOURCE_ERRORS);
        o.sample(names::SOURCE_ERRORS, &[("reason", "too_large")], get(&c.source_too_large));
    }
    render_packet(&mut o, &reg.packet_totals());
    o.text
}

/// The packet filter's families, when a front end runs (`[packet]`); nothing otherwise.
fn render_packet(o: &mut Out, fronts: &[PacketTotals]) {
    if fronts.is_empty() {
        return;
    }
    type Read = fn(&PacketTotals) -> u64;
    /// The families counted per verdict: the family, then how to read `pass` and `drop`.
    const BY_VERDICT: [(&str, Read, Read); 2] = [
        (names::PACKET_PACKETS, |t| t.passed_packets, |t| t.dropped_packets),
        (names::PACKET_BYTES, |t| t.passed_bytes, |t| t.dropped_bytes),
    ];
    for (family, pass, drop) in BY_VERDICT {
        o.family(family);
        for t in fronts {
            for (verdict, n) in [("pass", pass(t)), ("drop", drop(t))] {
                o.sample(family, &[("frontend", t.frontend), ("verdict", verdict)], n as f64);
            }
        }
    }
    o.family(names::PACKET_DROPPED);
    for t in fronts {
        for (reason, n) in &t.dropped {
            o.sample(
                names::PACKET_DROPPED,
                &[("frontend", t.frontend), ("reason", reason)],
                *n as f64,
            );
        }
    }
    o.family(names::PACKET_MALFORMED);
    let mut malformed: Vec<(&str, u64)> = Vec::new();
    for (reason, n) in fronts.iter().flat_map(|t| t.malformed.iter()) {
        match malformed.iter_mut().find(|(r, _)| r == reason) {
            Some((_, sum)) => *sum += n,
            None => malformed.push((reason, *n)),
        }
    }
    for (reason, n) in malformed {
        o.sample(names::PACKET_MALFORMED, &[("reason", reason)], n as f64);
    }
    o.family(names::PACKET_REJECTS);
    let sent: u64 = fronts.iter().map(|t| t.rejects_sent).sum();
    let limited: u64 = fronts.iter().map(|t| t.rejects_limited).sum();
    o.sample(names::PACKET_REJECTS, &[("result", "sent")], sent as f64);
    o.sample(names::PACKET_REJECTS, &[("result", "limited")], limited as f64);
    o.family(names::PACKET_DEVICE_ERRORS);
    for t in fronts {
        o.sample(names::PACKET_DEVICE_ERRORS, &[("frontend", t.frontend)], t.device_errors as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::SystemTime;

    use super::*;
    use crate::conntrack::ConntrackConfig;
    use crate::policy::{CompileOptions, CompiledPolicy, DefaultAction, Generation, PolicySet};

    /// Every family the exposition has ever had, spelled out: dashboards and alerts use
    /// these names, so renaming one must fail here.
    const KNOWN: [&str; 37] = [
        "flowgate_flows_total",
        "flowgate_accept_errors_total",
        "flowgate_connections_accepted_total",
        "flowgate_connections_active",
        "flowgate_bytes_total",
        "flowgate_handshake_errors_total",
        "flowgate_limit_reached_total",
        "flowgate_upstream_failures_total",
        "flowgate_udp_associations_idle_closed_total",
        "flowgate_policy_decision_seconds",
        "flowgate_policy_decision_samples_dropped_total",
        "flowgate_conntrack_entries",
        "flowgate_conntrack_capacity",
        "flowgate_conntrack_evictions_total",
        "flowgate_conntrack_inserted_total",
        "flowgate_conntrack_refused_total",
        "flowgate_conntrack_expired_total",
        "flowgate_conntrack_batch_fallbacks_total",
        "flowgate_policy_generation",
        "flowgate_policy_policies",
        "flowgate_policy_workloads",
        "flowgate_policy_next_expiry_timestamp_seconds",
        "flowgate_policy_reloads_total",
        "flowgate_policy_reload_seconds",
        "flowgate_policy_reload_failing",
        "flowgate_policy_last_reload_success_timestamp_seconds",
        "flowgate_flows_revalidated_total",
        "flowgate_flows_revoked_total",
        "flowgate_emergency_entries",
        "flowgate_emergency_requests_total",
        "flowgate_policy_watch_events_total",
        "flowgate_audit_write_errors_total",
        "flowgate_flowlog_dropped_total",
        "flowgate_flowlog_folded_total",
        "flowgate_admin_requests_total",
        "flowgate_admin_rejected_total",
        "flowgate_admin_flows_truncated_total",
    ];

    #[test]
    fn every_family_is_rendered_once_under_its_old_name() {
        let registry = Registry::default();
        let listener = registry.listener("demo", "tcp");
        listener.allowed.fetch_add(3, Ordering::Relaxed);
        let conntrack = Conntrack::new(&ConntrackConfig::default());
        let now = SystemTime::now();
        let opts =
            CompileOptions { default: DefaultAction::Deny, unknown: DefaultAction::Deny, now };
        let policy = PolicySnapshot {
            compiled: CompiledPolicy::compile(&PolicySet::default(), &opts).unwrap(),
            generation: Generation(7),
            content_hash: String::new(),
            loaded_at: now,
            source_revision: Default::default(),
        };
        let scrape = || {
            render(&Scrape {
                registry: &registry,
                conntrack: &conntrack,
                policy: &policy,
                next_expiry: Some(now),
                emergency_entries: 2,
            })
        };
        let text = scrape();
        let typed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let unique: BTreeSet<&str> = typed.iter().copied().collect();
        assert_eq!(typed.len(), unique.len(), "a family rendered twice: {typed:?}");
        assert_eq!(unique, KNOWN.into_iter().collect(), "families changed");
        assert!(!text.contains(" untyped\n"), "a family without a FAMILIES row:\n{text}");
        let helpless: Vec<&str> =
            text.lines().filter(|l| l.starts_with("# HELP ") && l.ends_with(' ')).collect();
        assert!(helpless.is_empty(), "families without help: {helpless:?}");
        // The packet families render only with `[packet]` (tested with it in `packet_*`).
        let unrendered: Vec<&str> = FAMILIES
            .iter()
            .map(|(n, _, _)| *n)
            .filter(|n| {
                !KNOWN.contains(n)
                    && !n.starts_with("flowgate_packet_")
                    && !n.starts_with("flowgate_source_")
            })
            .collect();
        assert!(unrendered.is_empty(), "FAMILIES rows never rendered: {unrendered:?}");
        assert!(text.contains("flowgate_flows_total{listener=\"demo\",verdict=\"allow\"} 3\n"));
        assert!(text.contains("flowgate_policy_generation 7\n"));
        assert!(text.contains("flowgate_emergency_entries 2\n"));
        assert!(!text.contains("flowgate_packet_"), "packet families without [packet]");
        // The source families render only with `source.kind = "etcd"`.
        assert!(!text.contains("flowgate_source_"), "source families with the files source");
        registry.control.source_remote.store(1, Ordering::Relaxed);
        registry.control.source_revision.store(42, Ordering::Relaxed);
        let text = scrape();
        assert!(text.contains("flowgate_source_connected 0\n"), "{text}");
        assert!(text.contains("flowgate_source_revision 42\n"), "{text}");
        registry.control.source_too_large.store(3, Ordering::Relaxed);
        let text = scrape();
        assert!(text.contains("flowgate_source_errors_total{reason=\"too_large\"} 3\n"), "{text}");
    }

    #[derive(Debug)]
    struct OnePacketFrontEnd;

    impl crate::telemetry::metrics::PacketSource for OnePacketFrontEnd {
        fn totals(&self) -> PacketTotals {
            PacketTotals {
                frontend: "tun",
                passed_packets: 5,
                passed_bytes: 500,
                dropped_packets: 3,
                dropped_bytes: 120,
                dropped: vec![("policy", 2), ("malformed", 1)],
                malformed: vec![("truncated", 1), ("bad_ihl", 0)],
                rejects_sent: 1,
                rejects_limited: 0,
                device_errors: 4,
            }
        }
    }

    #[test]
    fn packet_families_appear_with_a_packet_front_end() {
        let registry = Registry::default();
        registry.packet_source(std::sync::Arc::new(OnePacketFrontEnd));
        registry.packet_source(std::sync::Arc::new(OnePacketFrontEnd));
        let mut o = Out { text: String::new() };
        render_packet(&mut o, &registry.packet_totals());
        let text = o.text;
        for family in [
            names::PACKET_PACKETS,
            names::PACKET_BYTES,
            names::PACKET_DROPPED,
            names::PACKET_MALFORMED,
            names::PACKET_REJECTS,
            names::PACKET_DEVICE_ERRORS,
        ] {
            assert_eq!(text.matches(&format!("# TYPE {family} counter")).count(), 1, "{text}");
        }
        for line in [
            "flowgate_packet_packets_total{frontend=\"tun\",verdict=\"pass\"} 5\n",
            "flowgate_packet_bytes_total{frontend=\"tun\",verdict=\"drop\"} 120\n",
            "flowgate_packet_dropped_total{frontend=\"tun\",reason=\"policy\"} 2\n",
            // Summed over the front ends.
            "flowgate_packet_malformed_total{reason=\"truncated\"} 2\n",
            "flowgate_packet_malformed_total{reason=\"bad_ihl\"} 0\n",
            "flowgate_packet_rejects_total{result=\"sent\"} 2\n",
            "flowgate_packet_rejects_total{result=\"limited\"} 0\n",
            "flowgate_packet_device_errors_total{frontend=\"tun\"} 4\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
