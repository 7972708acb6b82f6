//! A small etcd v3 client over etcd's JSON gateway (`/v3/...` on the client port).
//!
//! Why not the `etcd-client` crate: it generates its gRPC code at build time and needs
//! `protoc` installed, and the README's first command (`cargo run --release -- run`) must
//! build on a fresh machine with nothing installed by hand. The gateway speaks the same
//! API as JSON over HTTP/1.1 (keys and values base64, 64-bit integers as strings), which
//! hyper (already a dependency) talks directly; the few calls flowgate needs are below.
//!
//! Each unary call opens one connection to an endpoint, starting with the one that last
//! answered, and fails over to the next on a connect error or timeout (an etcd member that
//! is down or partitioned); an answer that is an error from etcd is returned as is. A watch
//! is one long-lived response streamed as JSON lines ([`Watch`]).
//!
//! Not supported: TLS (endpoints are `http://` only). With `username` set, the client
//! authenticates once (`/v3/auth/authenticate`) and sends the token in the `Authorization`
//! header; an expired token is renewed on the next call that is refused.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use thiserror::Error;

/// The least time a transaction is given per endpoint.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// The least time a range read with values is given per endpoint.
const RANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// The largest answer (or watch message) buffered unless told otherwise (the config
/// layer's default, so `[source] max_answer_bytes` and the client agree).
pub use crate::config::DEFAULT_MAX_ANSWER;

/// Why an etcd call failed.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// No endpoint answered (each was tried once).
    #[error("etcd unreachable at {endpoints}: {last}")]
    Unreachable { endpoints: String, last: String },
    /// etcd answered with an error.
    #[error("etcd at {endpoint}: {message}")]
    Server { endpoint: String, message: String },
    /// The answer was not what the API describes.
    #[error("etcd at {endpoint}: unexpected answer: {message}")]
    Decode { endpoint: String, message: String },
    /// A watch asked for a revision that was compacted away: list again.
    #[error("etcd: revision compacted (oldest kept: {compact_revision})")]
    Compacted { compact_revision: i64 },
    /// An answer or watch message larger than the client buffers (every member would
    /// send the same one: not retried elsewhere).
    #[error(
        "etcd at {endpoint}: answer larger than {limit} bytes (source.max_answer_bytes); \
         raise it or keep fewer/smaller objects under the prefix"
    )]
    TooLarge { endpoint: String, limit: usize },
    /// An endpoint that is not `http://host:port` or `host:port`.
    #[error("etcd endpoint {0:?}: expected http://host:port (TLS is not supported)")]
    BadEndpoint(String),
}

/// One key as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A range read: the keys and the store revision it was read at.
#[derive(Clone, Debug)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    pub revision: i64,
}

/// One operation of a transaction.
#[derive(Clone, Debug)]
pub enum TxnOp {
    Put { key: String, value: Vec<u8>, lease: i64 },
    Delete { key: String },
}

/// A transaction's guard.
#[derive(Clone, Debug)]
pub enum Compare {
    /// Every key in `[key, range_end)` was last modified before `revision` (keys created
    /// or changed since make the guard fail).
    ModifiedBefore { key: String, range_end: String, revision: i64 },
    /// `key` was last modified at `revision` (0: the key does not exist).
    ModRevision { key: String, revision: i64 },
}

/// A change seen by a watch.
#[derive(Clone, Debug)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, revision: i64 },
}

/// etcd's answer to a status request.
#[derive(Clone, Debug)]
pub struct Status {
    pub endpoint: String,
    pub version: String,
    pub leader: u64,
    pub member: u64,
    pub revision: i64,
}

/// Where etcd is and how to talk to it.
#[derive(Debug)]
pub struct EtcdClient {
    endpoints: Vec<String>,
    timeout: Duration,
    /// The endpoint that answered last: tried first.
    preferred: AtomicUsize,
    credentials: Option<(String, String)>,
    token: Mutex<Option<String>>,
    /// The largest answer buffered ([`EtcdError::TooLarge`] beyond).
    max_answer: usize,
}

/// The end of the range of keys starting with `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xff {
            bytes.push(last + 1);
            return String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    "\0".into()
}

fn b64(s: impl AsRef<[u8]>) -> String {
    B64.encode(s)
}

/// A 64-bit integer as the gateway writes it: a string, or a number, or absent (zero).
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().or_else(|| n.as_u64().map(|u| u as i64)).unwrap_or(0),
        _ => 0,
    }
}

#[derive(Deserialize)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    mod_revision: Value,
    #[serde(default)]
    lease: Value,
}

impl RawKv {
    fn decode(self, endpoint: &str) -> Result<KeyValue, EtcdError> {
        let bad = |m: String| EtcdError::Decode { endpoint: endpoint.to_owned(), message: m };
        let key = B64.decode(&self.key).map_err(|e| bad(format!("key: {e}")))?;
        let value = B64.decode(&self.value).map_err(|e| bad(format!("value: {e}")))?;
        Ok(KeyValue {
            key: String::from_utf8_lossy(&key).into_owned(),
            value,
            mod_revision: int(&self.mod_revision),
            lease: int(&self.lease),
        })
    }
}

impl EtcdClient {
    /// A client for `endpoints` (`http://host:port` or `host:port`), each call bounded by
    /// `timeout` per endpoint.
    ///
    /// # Errors
    /// [`EtcdError::BadEndpoint`] for an endpoint that is not plain HTTP.
    pub fn new(
        endpoints: &[String],
        timeout: Duration,
        credentials: Option<(String, String)>,
    ) -> Result<EtcdClient, EtcdError> {
        let mut parsed = Vec::new();
        for e in endpoints {
            let hostport = e.strip_prefix("http://").unwrap_or(e).trim_end_matches('/');
            if hostport.is_empty() || hostport.contains("://") || hostport.contains('/') {
                return Err(EtcdError::BadEndpoint(e.clone()));
            }
            parsed.push(hostport.to_owned());
        }
        if parsed.is_empty() {
            return Err(EtcdError::BadEndpoint(String::new()));
        }
        Ok(EtcdClient {
            endpoints: parsed,
            timeout,
            preferred: AtomicUsize::new(0),
            credentials,
            token: Mutex::new(None),
            max_answer: DEFAULT_MAX_ANSWER,
        })
    }

    /// The same client buffering answers (and watch messages) of at most `bytes`.
    pub fn with_max_answer(mut self, bytes: usize) -> EtcdClient {
        self.max_answer = bytes.max(1);
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoints in the order to try them: the last one that answered first.
    fn order(&self) -> impl Iterator<Item = (usize, &String)> {
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        (0..n).map(move |i| {
            let idx = (first + i) % n;
            (idx, &self.endpoints[idx])
        })
    }

    async fn connect(
        &self,
        endpoint: &str,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
        let stream = tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(endpoint))
            .await
            .map_err(|_| format!("{endpoint}: connect timed out"))?
            .map_err(|e| format!("{endpoint}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{endpoint}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(&self, endpoint: &str, path: &str, body: &Value) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, endpoint)
            .header(CONTENT_TYPE, "application/json");
        if let Some(t) = self.token.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            b = b.header(AUTHORIZATION, t.as_str());
        }
        // The builder fails only on invalid header values; the token is etcd's own ASCII.
        b.body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
    }

    /// One unary call, with failover across the endpoints.
    async fn call(&self, path: &str, body: Value) -> Result<(String, Value), EtcdError> {
        self.call_within(path, body, self.timeout).await
    }

    /// [`EtcdClient::call`] with its own limit per endpoint (connecting is still bounded by
    /// the client's timeout): a large transaction takes etcd longer than a read.
    async fn call_within(
        &self,
        path: &str,
        body: Value,
        timeout: Duration,
    ) -> Result<(String, Value), EtcdError> {
        if self.credentials.is_some()
            && self.token.lock().unwrap_or_else(|e| e.into_inner()).is_none()
        {
            self.authenticate().await?;
        }
        match self.call_once(path, &body, timeout).await {
            Err(EtcdError::Server { message, .. })
                if self.credentials.is_some() && message.contains("token") =>
            {
                self.authenticate().await?;
                self.call_once(path, &body, timeout).await
            }
            other => other,
        }
    }

    async fn call_once(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<(String, Value), EtcdError> {
        let mut last = String::from("no endpoint tried");
        for (idx, endpoint) in self.order() {
            let attempt = async {
                let mut sender = self.connect(endpoint).await?;
                let resp = sender
                    .send_request(self.request(endpoint, path, body))
                    .await
                    .map_err(|e| format!("{endpoint}: {e}"))?;
                let status = resp.status();
                let bytes = match Limited::new(resp.into_body(), self.max_answer).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) if e.is::<LengthLimitError>() => return Ok(None),
                    Err(e) => return Err(format!("{endpoint}: {e}")),
                };
                Ok::<_, String>(Some((status, bytes)))
            };
            let (status, bytes) = match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(Some(r))) => r,
                Ok(Ok(None)) => {
                    return Err(EtcdError::TooLarge {
                        endpoint: endpoint.clone(),
                        limit: self.max_answer,
                    });
                }
                Ok(Err(e)) => {
                    last = e;
                    continue;
                }
                Err(_) => {
                    last = format!("{endpoint}: no answer within {timeout:?}");
                    continue;
                }
            };
            let value: Value = serde_json::from_slice(&bytes).map_err(|e| EtcdError::Decode {
                endpoint: endpoint.clone(),
                message: format!("{e} (HTTP {status})"),
            })?;
            if !status.is_success() || value.get("error").is_some() {
                let message = value
                    .get("message")
                    .or_else(|| value.get("error"))
                    .map(|m| m.as_str().map(str::to_owned).unwrap_or_else(|| m.to_string()))
                    .unwrap_or_else(|| format!("HTTP {status}"));
                // A member without a leader cannot serve: another may.
                if message.contains("no leader") || message.contains("leader changed") {
                    last = format!("{endpoint}: {message}");
                    continue;
                }
                return Err(EtcdError::Server { endpoint: endpoint.clone(), message });
            }
            self.preferred.store(idx, Ordering::Relaxed);
            return Ok((endpoint.clone(), value));
        }
        Err(EtcdError::Unreachable { endpoints: self.endpoints.join(","), last })
    }

    async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some((user, password)) = self.credentials.clone() else { return Ok(()) };
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let (endpoint, v) = self
            .call_once(
                "/v3/auth/authenticate",
                &json!({"name": user, "password": password}),
                self.timeout,
            )
            .await?;
        let token = v.get("token").and_then(Value::as_str).ok_or_else(|| EtcdError::Decode {
            endpoint,
            message: "authenticate: no token".into(),
        })?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.to_owned());
        Ok(())
    }

    /// Every key in `[key, range_end)` (`range_end` empty: `key` alone), with values unless
    /// `keys_only`.
    ///
    /// # Errors
    /// [`EtcdError`] when no endpoint answers or etcd refuses.
    pub async fn range(
        &self,
        key: &str,
        range_end: &str,
        keys_only: bool,
    ) -> Result<RangeResult, EtcdError> {
        let mut body = json!({"key": b64(key), "keys_only": keys_only});
        if !range_end.is_empty() {
            body["range_end"] = json!(b64(range_end));
        }
        // Values of a 10,000-object prefix are megabytes: more time than a small read.
        let limit = if keys_only { self.timeout } else { self.timeout.max(RANGE_TIMEOUT) };
        let (endpoint, v) = self.call_within("/v3/kv/range", body, limit).await?;
        let revision = int(&v["header"]["revision"]);
        let raw: Vec<RawKv> =
            serde_json::from_value(v.get("kvs").cloned().unwrap_or(json!([]))).map_err(|e| {
                EtcdError::Decode { endpoint: endpoint.clone(), message: e.to_string() }
            })?;
        let kvs = raw.into_iter().map(|k| k.decode(&endpoint)).collect::<Result<_, _>>()?;
        Ok(RangeResult { kvs, revision })
    }

    /// All of `ops` in one transaction if every guard holds. Returns whether it was applied
    /// and the store revision after it.
    ///
    /// # Errors
    /// [`EtcdError`] when no endpoint answers or etcd refuses.
    pub async fn txn(&self, guards: &[Compare], ops: &[TxnOp]) -> Result<(bool, i64), EtcdError> {
        let compare: Vec<Value> = guards
            .iter()
            .map(|g| match g {
                Compare::ModifiedBefore { key, range_end, revision } => json!({
                    "target": "MOD", "result": "LESS", "key": b64(key),
                    "range_end": b64(range_end), "mod_revision": revision.to_string(),
                }),
                Compare::ModRevision { key, revision } => json!({
                    "target": "MOD", "result": "EQUAL", "key": b64(key),
                    "mod_revision": revision.to_string(),
                }),
            })
            .collect();
        let success: Vec<Value> = ops
            .iter()
            .map(|op| match op {
                TxnOp::Put { key, value, lease } => {
                    let mut put = json!({"key": b64(key), "value": b64(value)});
                    if *lease != 0 {
                        put["lease"] = json!(lease.to_string());
                    }
                    json!({ "request_put": put })
                }
                TxnOp::Delete { key } => json!({"request_delete_range": {"key": b64(key)}}),
            })
            .collect();
        // A push of 10,000 objects is tens of megabytes for etcd to apply: give it time. A
        // transaction retried on another endpoint after a timeout cannot apply twice when it
        // is guarded (a push is), it fails its guard instead.
        let body = json!({"compare": compare, "success": success, "failure": []});
        let (_, v) = self.call_within("/v3/kv/txn", body, TXN_TIMEOUT.max(self.timeout)).await?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        Ok((succeeded, int(&v["header"]["revision"])))
    }

    /// Puts one key (bound to `lease` unless 0); returns the new revision.
    ///
    /// # Errors
    /// As [`EtcdClient::txn`].
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut body = json!({"key": b64(key), "value": b64(value)});
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        let (_, v) = self.call("/v3/kv/put", body).await?;
        Ok(int(&v["header"]["revision"]))
    }

    /// Grants a lease of `ttl`; returns its id.
    ///
    /// # Errors
    /// As [`EtcdClient::txn`].
    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let (endpoint, v) =
            self.call("/v3/lease/grant", json!({"TTL": ttl.as_secs().max(1).to_string()})).await?;
        match int(&v["ID"]) {
            0 => Err(EtcdError::Decode { endpoint, message: "lease grant: no ID".into() }),
            id => Ok(id),
        }
    }

    /// Renews `lease` once; returns the TTL left (0: the lease is gone).
    ///
    /// # Errors
    /// As [`EtcdClient::txn`].
    pub async fn lease_keepalive(&self, lease: i64) -> Result<i64, EtcdError> {
        let (_, v) = self.call("/v3/lease/keepalive", json!({"ID": lease.to_string()})).await?;
        Ok(int(&v["result"]["TTL"]))
    }

    /// Compacts the history up to `revision` (tests and maintenance).
    ///
    /// # Errors
    /// As [`EtcdClient::txn`].
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        self.call("/v3/kv/compaction", json!({"revision": revision.to_string(), "physical": true}))
            .await
            .map(|_| ())
    }

    /// The status of each endpoint that answers (the others are left out).
    pub async fn status(&self) -> Vec<Status> {
        let mut out = Vec::new();
        for endpoint in &self.endpoints {
            let one = EtcdClient {
                endpoints: vec![endpoint.clone()],
                timeout: self.timeout,
                preferred: AtomicUsize::new(0),
                credentials: self.credentials.clone(),
                token: Mutex::new(self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()),
                max_answer: self.max_answer,
            };
            if let Ok((_, v)) = one.call("/v3/maintenance/status", json!({})).await {
                out.push(Status {
                    endpoint: endpoint.clone(),
                    version: v["version"].as_str().unwrap_or_default().to_owned(),
                    leader: int(&v["leader"]) as u64,
                    member: int(&v["header"]["member_id"]) as u64,
                    revision: int(&v["header"]["revision"]),
                });
            }
        }
        out
    }

    /// Watches `[key, range_end)` from `start_revision` on (inclusive), on the first
    /// endpoint that accepts.
    ///
    /// # Errors
    /// [`EtcdError::Unreachable`] when no endpoint accepts the watch.
    pub async fn watch(
        &self,
        key: &str,
        range_end: &str,
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        if self.credentials.is_some()
            && self.token.lock().unwrap_or_else(|e| e.into_inner()).is_none()
        {
            self.authenticate().await?;
        }
        let body = json!({"create_request": {
            "key": b64(key), "range_end": b64(range_end),
            "start_revision": start_revision.to_string(),
        }});
        let mut last = String::from("no endpoint tried");
        for (idx, endpoint) in self.order() {
            let attempt = async {
                let mut sender = self.connect(endpoint).await?;
                let resp = sender
                    .send_request(self.request(endpoint, "/v3/watch", &body))
                    .await
                    .map_err(|e| format!("{endpoint}: {e}"))?;
                if !resp.status().is_success() {
                    return Err(format!("{endpoint}: watch refused: HTTP {}", resp.status()));
                }
                Ok(resp.into_body())
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(body)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(Watch {
                        endpoint: endpoint.clone(),
                        body,
                        buf: Vec::new(),
                        scanned: 0,
                        max: self.max_answer,
                        created: false,
                    });
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("{endpoint}: no answer within {:?}", self.timeout),
            }
        }
        Err(EtcdError::Unreachable { endpoints: self.endpoints.join(","), last })
    }
}

/// A watch in progress: the streamed response, read one JSON line at a time.
#[derive(Debug)]
pub struct Watch {
    endpoint: String,
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline (each byte is searched once).
    scanned: usize,
    /// The longest message buffered ([`EtcdError::TooLarge`] beyond).
    max: usize,
    created: bool,
}

/// One batch of events from a watch, all of one or more whole revisions.
#[derive(Debug, Default)]
pub struct WatchBatch {
    pub events: Vec<Event>,
    /// The store revision the batch was sent at.
    pub revision: i64,
}

impl Watch {
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The next batch of events (empty for a progress notification or the creation
    /// answer).
    ///
    /// # Errors
    /// [`EtcdError::Compacted`] when the start revision is gone; [`EtcdError::Unreachable`]
    /// when the stream ends or breaks; [`EtcdError::Server`] when etcd cancels the watch.
    pub async fn next(&mut self) -> Result<WatchBatch, EtcdError> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let pos = self.scanned + pos;
                self.scanned = 0;
                if pos > self.max {
                    return Err(self.too_large());
                }
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return self.decode(&line);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max {
                return Err(self.too_large());
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    return Err(EtcdError::Unreachable {
                        endpoints: self.endpoint.clone(),
                        last: format!("watch broken: {e}"),
                    });
                }
                None => {
                    // The gateway may end the stream without a newline after the last object.
                    if !self.buf.iter().all(u8::is_ascii_whitespace) {
                        let line = std::mem::take(&mut self.buf);
                        return self.decode(&line);
                    }
                    return Err(EtcdError::Unreachable {
                        endpoints: self.endpoint.clone(),
                        last: "watch stream ended".into(),
                    });
                }
            }
        }
    }

    /// Whether a batch is already buffered (so a caller can gather it before acting).
    pub fn has_buffered(&self) -> bool {
        self.buf[self.scanned..].contains(&b'\n')
    }

    fn too_large(&mut self) -> EtcdError {
        // The stream cannot be resynchronised mid-message: the caller watches anew.
        self.buf = Vec::new();
        self.scanned = 0;
        EtcdError::TooLarge { endpoint: self.endpoint.clone(), limit: self.max }
    }

    fn decode(&mut self, line: &[u8]) -> Result<WatchBatch, EtcdError> {
        let endpoint = self.endpoint.clone();
        let v: Value = serde_json::from_slice(line).map_err(|e| EtcdError::Decode {
            endpoint: endpoint.clone(),
            message: e.to_string(),
        })?;
        if let Some(err) = v.get("error") {
            let message = err["message"].as_str().unwrap_or("watch error").to_owned();
            return Err(EtcdError::Server { endpoint, message });
        }
        let r = &v["result"];
        let compact = int(&r["compact_revision"]);
        if compact > 0 {
            return Err(EtcdError::Compacted { compact_revision: compact });
        }
        if r["canceled"].as_bool().unwrap_or(false) {
            let reason = r["cancel_reason"].as_str().unwrap_or("canceled").to_owned();
            if reason.contains("compacted") {
                return Err(EtcdError::Compacted { compact_revision: 0 });
            }
            return Err(EtcdError::Server { endpoint, message: reason });
        }
        if r["created"].as_bool().unwrap_or(false) {
            self.created = true;
        }
        let mut batch = WatchBatch { events: Vec::new(), revision: int(&r["header"]["revision"]) };
        for ev in r["events"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let raw: RawKv = serde_json::from_value(ev["kv"].clone()).map_err(|e| {
                EtcdError::Decode { endpoint: endpoint.clone(), message: e.to_string() }
            })?;
            let kv = raw.decode(&endpoint)?;
            batch.events.push(match ev["type"].as_str() {
                Some("DELETE") => Event::Delete { key: kv.key, revision: kv.mod_revision },
                _ => Event::Put(kv),
            });
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/flowgate/"), "/flowgate0");
        assert_eq!(prefix_end("a"), "b");
    }

    #[test]
    fn integers_come_as_strings_or_numbers() {
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&json!(7)), 7);
        assert_eq!(int(&Value::Null), 0);
    }

    #[test]
    fn endpoints_must_be_plain_http() {
        let t = Duration::from_secs(1);
        assert!(EtcdClient::new(&["https://x:1".into()], t, None).is_err());
        assert!(EtcdClient::new(&[], t, None).is_err());
        let c = EtcdClient::new(&["http://127.0.0.1:2379".into(), "h:1".into()], t, None);
        assert_eq!(
            c.map(|c| c.endpoints().to_vec()).ok(),
            Some(vec!["127.0.0.1:2379".to_owned(), "h:1".to_owned()])
        );
    }
}
