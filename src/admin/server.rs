//! Accept loop, routing and handlers of the admin API (hyper 1, HTTP/1.1).
//!
//! Limits: `admin.max_connections` connections at once (more wait in the accept queue),
//! `admin.header_timeout` to send headers, `admin.max_body` bytes of body, and
//! `admin.flows_limit` entries per `/flows` answer. Accept errors (EMFILE …) pause and
//! retry; the loop never returns.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{AdminState, auth};
use crate::control::audit::format_time;
use crate::control::emergency::{EmergencyError, EmergencyRequest};
use crate::control::{ControlPlane, ReloadResult, Trigger};
use crate::dataplane::ReadyState;
use crate::policy::{PolicySnapshot, simulate};
use crate::telemetry::exposition::{self, Scrape};

type Resp = Response<Full<Bytes>>;

/// Serves the admin API on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, state: AdminState) {
    let state = Arc::new(state);
    let limit = Arc::new(tokio::sync::Semaphore::new(state.control.config().admin.max_connections));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // EMFILE and friends: wait for descriptors to free up, never give up.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let timeout = state.control.config().admin.header_timeout;
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    json_resp(status, &json!({ "error": message.into() }))
}

/// One request. Every path returns a response; nothing here panics on input.
pub async fn handle(state: &AdminState, req: Request<Incoming>) -> Resp {
    let control = &state.control;
    let counters = &control.metrics().control;
    counters.admin_requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    // `DELETE /emergency/<id>` lifts an entry; every other mutating call is a POST.
    let lifting = path.starts_with("/emergency/");
    let mutating = lifting || matches!(path.as_str(), "/reload" | "/emergency");
    if mutating {
        if lifting && method != Method::DELETE {
            return error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes DELETE"));
        }
        if !lifting && method != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes POST"));
        }
        if let Err(refusal) = auth::check(req.headers(), state.token.as_deref()) {
            counters.admin_unauthorized.fetch_add(1, Ordering::Relaxed);
            return unauthorized(refusal, control.config().admin.token_env.as_deref());
        }
    } else if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes GET"));
    }
    let resp = match path.as_str() {
        "/healthz" => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => readyz(state),
        "/metrics" => metrics(control),
        "/policy" => json_resp(StatusCode::OK, &policy(control)),
        "/flows" => flows(control, &query),
        "/explain" => explain(control, &query),
        "/reload" => reload(control).await,
        "/emergency" => emergency(control, req).await,
        p if lifting => lift(control, p.trim_start_matches("/emergency/")).await,
        _ => error(StatusCode::NOT_FOUND, format!("no endpoint {path}")),
    };
    if resp.status() == StatusCode::BAD_REQUEST {
        counters.admin_bad_request.fetch_add(1, Ordering::Relaxed);
    }
    resp
}

/// 401 with the body that says whether any token could help ([`auth::Unauthorized`]).
fn unauthorized(refusal: auth::Refusal, token_env: Option<&str>) -> Resp {
    let body = serde_json::to_value(refusal.body(token_env)).unwrap_or(Value::Null);
    let mut r = json_resp(StatusCode::UNAUTHORIZED, &body);
    r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// `/readyz`: 200 once every listener serves; 503 before, and again once draining (so a
/// balancer stops sending new connections while open ones finish).
fn readyz(state: &AdminState) -> Resp {
    let (status, body) = match state.readiness.state() {
        // Still ready while etcd is away: the policy in force keeps being enforced, and a
        // balancer pulling every replica at once would be the outage; the body says it.
        ReadyState::Ready => match state.control.source_status().filter(|s| !s.connected) {
            Some(s) => {
                let body = format!(
                    "ready\nsource: etcd unreachable since {}; enforcing revision {}: {}\n",
                    s.unreachable_since.as_deref().unwrap_or("?"),
                    s.revision,
                    s.last_error.as_deref().unwrap_or("")
                );
                return respond(StatusCode::OK, "text/plain; charset=utf-8", body);
            }
            None => (StatusCode::OK, "ready\n"),
        },
        ReadyState::Starting => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: listeners not bound yet\n")
        }
        ReadyState::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
    };
    respond(status, "text/plain; charset=utf-8", body)
}

/// `/metrics`: the Prometheus exposition, from the control plane's view of now.
fn metrics(control: &ControlPlane) -> Resp {
    let snapshot = control.policy().load_full();
    let text = exposition::render(&Scrape {
        registry: control.metrics(),
        conntrack: control.conntrack(),
        policy: &snapshot,
        next_expiry: control.next_expiry(),
        emergency_entries: control.emergency_entries().len(),
    });
    respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text)
}

/// `/policy`: what is in force, where it came from, and how the last reloads went.
pub fn policy(control: &ControlPlane) -> Value {
    // The revision from the snapshot shown: it is the one that policy was read at.
    let snap = control.policy().load_full();
    let source = control.source_status_of(&snap);
    let status = control.status();
    let cfg = control.config();
    json!({
        "generation": snap.generation.0,
        "hash": snap.content_hash,
        "loaded_at": format_time(snap.loaded_at),
        "sources": {
            "policies": cfg.policy.dir.display().to_string(),
            "inventory": cfg.policy.inventory.display().to_string(),
        },
        "counts": {
            "policies": snap.compiled.policy_count(),
            "live_policies": snap.compiled.live_policy_count(),
            "workloads": snap.compiled.workload_count(),
        },
        "default": snap.compiled.options().default,
        "unknown": snap.compiled.options().unknown,
        "next_expiry": control.next_expiry().map(format_time),
        "last_reload": status.last,
        "last_error": status.failing,
        "source": source,
        "emergency": control.emergency_entries().iter().map(|e| json!({
            "id": e.id,
            "what": e.describe(),
            "expires_at": format_time(e.expires_at()),
        })).collect::<Vec<_>>(),
    })
}

fn params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn param<'a>(ps: &'a [(String, String)], key: &str) -> Option<&'a str> {
    ps.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/flows?src=IP&dst=IP&workload=ns/name&limit=N`: conntrack entries, newest first is not
/// promised (the table has no order); at most `limit` (≤ `admin.flows_limit`). `listener`
/// is the listener's name, as the flow log writes it (found the way
/// `dataplane::log_revoked` finds it: an entry's listener id is its position in the metrics
/// registry); `null` for an id no listener of this process has.
fn flows(control: &ControlPlane, query: &str) -> Resp {
    let ps = params(query);
    let cap = control.config().admin.flows_limit;
    let limit = match param(&ps, "limit").map(str::parse::<usize>) {
        None => cap,
        Some(Ok(n)) => n.min(cap),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "limit: expected a number"),
    };
    let ip_filter = |key: &str| -> Result<Option<IpAddr>, String> {
        match param(&ps, key) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse::<IpAddr>()
                .map(Some)
                .map_err(|_| format!("{key}: {v:?} is not an IP address")),
        }
    };
    let (src, dst) = match (ip_filter("src"), ip_filter("dst")) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let workload = param(&ps, "workload").filter(|w| !w.is_empty());
    let snap = control.policy().load_full();
    let name_of = |ip: IpAddr| {
        snap.compiled
            .workload_of(ip)
            .and_then(|id| snap.compiled.workload_name(id))
            .map(|n| n.to_string())
    };
    let listeners = control.metrics().listeners();
    let listener_name = |id: u16| listeners.get(usize::from(id)).map(|c| c.name.as_str());
    let ct = control.conntrack();
    let now_ms = ct.now_ms(std::time::Instant::now());
    let mut out = Vec::new();
    let mut matched = 0usize;
    ct.for_each(|e| {
        if src.is_some_and(|ip| e.key().src.ip() != ip)
            || dst.is_some_and(|ip| e.key().dst.ip() != ip)
        {
            return;
        }
        let (sw, dw) = (name_of(e.key().src.ip()), name_of(e.key().dst.ip()));
        if let Some(w) = workload
            && sw.as_deref() != Some(w)
            && dw.as_deref() != Some(w)
        {
            return;
        }
        matched += 1;
        if out.len() >= limit {
            return;
        }
        out.push(json!({
            "proto": e.key().proto.as_str(),
            "src": e.key().src.to_string(),
            "dst": e.key().dst.to_string(),
            "fqdn": e.fqdn(),
            "src_workload": sw,
            "dst_workload": dw,
            "state": e.state().as_str(),
            "generation": e.generation().0,
            "listener": listener_name(e.listener()),
            "age_ms": now_ms.saturating_sub(e.created_ms()),
            "idle_ms": now_ms.saturating_sub(e.last_seen_ms()),
            "bytes_orig": e.bytes_orig().load(Ordering::Relaxed),
            "bytes_reply": e.bytes_reply().load(Ordering::Relaxed),
        }));
    });
    if matched > out.len() {
        control.metrics().control.admin_flows_truncated.fetch_add(1, Ordering::Relaxed);
    }
    json_resp(
        StatusCode::OK,
        &json!({ "total": ct.len(), "matched": matched, "truncated": matched > out.len(), "flows": out }),
    )
}

/// `/explain?from=X&to=Y&port=P[&protocol=TCP][&fqdn=name]`: what `flowgate explain`
/// accepts, read by the same functions ([`simulate`]): `X`/`Y` are IP addresses or
/// `namespace/workload` (its first address); `to` may also be a domain name (queried as
/// `0.0.0.0` with the name, lower-cased and without its trailing dot, as the flow's FQDN);
/// `P` is a number or a named port of the destination workload for the protocol. `fqdn`
/// sets the flow's name for an address destination. The answer is
/// [`CompiledPolicy::explain`](crate::policy::CompiledPolicy::explain) serialised, with the
/// generation that gave it.
fn explain(control: &ControlPlane, query: &str) -> Resp {
    match explain_answer(&control.policy().load_full(), query) {
        Ok(v) => json_resp(StatusCode::OK, &v),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// The `/explain` answer for `query` against `snap`, or the message of the `400` it gets:
/// everything the handler does but reading the policy handle and writing the response
/// (so the fuzz target `admin_explain` runs exactly this).
pub(crate) fn explain_answer(snap: &PolicySnapshot, query: &str) -> Result<Value, String> {
    let ps = params(query);
    let field = |key: &'static str| {
        param(&ps, key).filter(|v| !v.is_empty()).ok_or_else(|| format!("{key}: missing"))
    };
    let from = simulate::parse_endpoint(field("from")?, false).map_err(|e| format!("from: {e}"))?;
    let to = simulate::parse_endpoint(field("to")?, true).map_err(|e| format!("to: {e}"))?;
    let port = simulate::parse_port(field("port")?).map_err(|e| format!("port: {e}"))?;
    let proto = simulate::parse_protocol(param(&ps, "protocol").unwrap_or("TCP"))
        .map_err(|e| format!("protocol: {e}"))?;
    let fqdn = match param(&ps, "fqdn").filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => Some(
            simulate::normalise_domain(f)
                .ok_or_else(|| format!("fqdn: {f:?} is not a domain name"))?,
        ),
    };
    let mut flow =
        simulate::resolve(&snap.compiled, &from, &to, &port, proto).map_err(|e| e.to_string())?;
    if fqdn.is_some() {
        flow.fqdn = fqdn;
    }
    let ex = snap.compiled.explain(&flow.query());
    let mut v = serde_json::to_value(&ex).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("generation".into(), json!(snap.generation.0));
    }
    Ok(v)
}

async fn reload(control: &ControlPlane) -> Resp {
    let report = control.reload(Trigger::Api).await;
    let status = match report.result {
        ReloadResult::Ok | ReloadResult::Unchanged => StatusCode::OK,
        ReloadResult::Error => StatusCode::UNPROCESSABLE_ENTITY,
    };
    json_resp(status, &serde_json::to_value(&report).unwrap_or(Value::Null))
}

async fn emergency(control: &ControlPlane, req: Request<Incoming>) -> Resp {
    let max = control.config().admin.max_body;
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than admin.max_body ({max} bytes) or cut short"),
            );
        }
    };
    let request: EmergencyRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")),
    };
    match control.emergency_everywhere(request).await {
        Ok((entry, report, reach)) => {
            let mut answer = json!({
                "id": entry.id,
                "what": entry.describe(),
                "expires_at": format_time(entry.expires_at()),
                "generation": report.generation,
                "revoked": report.revoked,
                "scope": reach.scope(),
            });
            if let Some(w) = reach.warning() {
                answer["warning"] = json!(w);
            }
            json_resp(StatusCode::CREATED, &answer)
        }
        Err(e @ EmergencyError::UnknownWorkload(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ EmergencyError::Full { .. }) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ EmergencyError::State { .. }) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `DELETE /emergency/<id>`: lifts the entry here and, with the etcd source, on the fleet.
async fn lift(control: &ControlPlane, id: &str) -> Resp {
    match control.lift(id).await {
        Ok((report, reach)) => {
            let mut answer = json!({
                "lifted": id,
                "generation": report.map_or_else(|| control.generation(), |r| r.generation),
                "scope": reach.scope(),
            });
            if let Some(w) = reach.warning() {
                answer["warning"] = json!(w);
            }
            json_resp(StatusCode::OK, &answer)
        }
        Err(e @ EmergencyError::UnknownEntry(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}
