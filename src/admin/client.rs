//! A minimal admin-API client (one request per connection), for `flowgate status`,
//! `flowgate reload` and `flowgate quarantine`, and for tests.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use thiserror::Error;

pub use super::auth::Unauthorized;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to the admin API at {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("admin API at {addr}: {message}")]
    Http { addr: SocketAddr, message: String },
    #[error("admin API at {addr}: no answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// An answer: status code and body text.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// What a 401 says: whether the gateway has a token at all, and the variable it reads
    /// it from. `None` for any other status, or a 401 without that body (not a flowgate
    /// admin API, or an older one).
    pub fn unauthorized(&self) -> Option<Unauthorized> {
        if self.status != 401 {
            return None;
        }
        serde_json::from_str(&self.body).ok()
    }
}

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct AdminClient {
    pub addr: SocketAddr,
    pub token: Option<String>,
    pub timeout: Duration,
}

impl AdminClient {
    pub fn new(addr: SocketAddr, token: Option<String>) -> AdminClient {
        AdminClient { addr, token, timeout: Duration::from_secs(30) }
    }

    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, json: Option<String>) -> Result<Answer, ClientError> {
        self.request(Method::POST, path, json).await
    }

    /// One request; the body, if any, is sent as JSON.
    ///
    /// # Errors
    /// [`ClientError`] when the server cannot be reached or the exchange fails.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        json: Option<String>,
    ) -> Result<Answer, ClientError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, json)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout { addr: self.addr, timeout: self.timeout }),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        json: Option<String>,
    ) -> Result<Answer, ClientError> {
        let addr = self.addr;
        let http = |e: hyper::Error| ClientError::Http { addr, message: e.to_string() };
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
        let driver = tokio::spawn(conn);
        let mut builder =
            Request::builder().method(method).uri(path).header(HOST, addr.to_string());
        if let Some(t) = &self.token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        if json.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let req = builder
            .body(Full::new(Bytes::from(json.unwrap_or_default())))
            .map_err(|e| ClientError::Http { addr, message: e.to_string() })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        driver.abort();
        Ok(Answer { status, body: String::from_utf8_lossy(&body).into_owned() })
    }
}
