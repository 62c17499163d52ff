//! The terminal's local API as the payment application uses it: HTTP/1.1 over the agent's
//! Unix socket (`POST /v1/transactions`, `GET /v1/status`).
//!
//! One connection per request (`Connection: close`): the agent is killed and restarted under
//! the tests' feet, and a request must then fail fast rather than reuse a dead connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;

/// Bound on one request (connect, send, whole response). The agent answers 408 after its
/// own request timeout (10 s by default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A client of one terminal's local API.
#[derive(Debug, Clone)]
pub struct LocalApiClient {
    /// The agent's `[local_api] socket`.
    socket: PathBuf,
}

/// A response: status code and JSON body (`Value::Null` if the body is not JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// `seq` of a 201/200 body.
    pub fn seq(&self) -> Option<u64> {
        self.body.get("seq").and_then(Value::as_u64)
    }

    /// `error` of an error body (`card_number_refused`, `txn_id_conflict`, ...).
    pub fn error(&self) -> Option<&str> {
        self.body.get("error").and_then(Value::as_str)
    }
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentStatus {
    pub device_id: String,
    pub connected: bool,
    pub locked: bool,
    pub config_version: u64,
    pub outbox: OutboxStatusView,
}

/// The `outbox` part of `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OutboxStatusView {
    /// Transactions not yet acknowledged by the controller.
    pub depth: u64,
    /// The last sequence number assigned.
    pub last_seq: u64,
    pub oldest_unsent_age_ms: Option<u64>,
    pub last_ack_at_ms: Option<u64>,
    pub dead_letters: u64,
    pub failed: bool,
}

impl LocalApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `POST /v1/transactions` with a JSON body. `Err` means no answer at all (the agent is
    /// down, or the connection broke): the payment application must retry the same body.
    pub async fn post_transaction(&self, body: &Value) -> anyhow::Result<Answer> {
        let bytes = serde_json::to_vec(body).context("encoding the transaction")?;
        self.request(
            http::Method::POST,
            "/v1/transactions",
            Some("application/json"),
            Bytes::from(bytes),
        )
        .await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> anyhow::Result<AgentStatus> {
        let answer = self
            .request(http::Method::GET, "/v1/status", None, Bytes::new())
            .await?;
        anyhow::ensure!(answer.status == 200, "GET /v1/status: {answer:?}");
        serde_json::from_value(answer.body.clone())
            .with_context(|| format!("GET /v1/status: unexpected body {}", answer.body))
    }

    /// Any request; the answer whatever its status.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.exchange(method, path, content_type, body),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "{path}: no answer within {REQUEST_TIMEOUT:?} on {}",
                self.socket.display()
            )
        })?
    }

    async fn exchange(
        &self,
        method: http::Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("cannot connect to {}", self.socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake on the local API socket")?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .header(http::header::CONNECTION, "close");
        if let Some(kind) = content_type {
            request = request.header(http::header::CONTENT_TYPE, kind);
        }
        let request = request
            .body(Full::new(body))
            .context("building the request")?;
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .context("sending the request")?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .context("reading the response body")?
                .to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            anyhow::Ok(Answer { status, body })
        };
        let mut exchange = std::pin::pin!(exchange);
        let mut conn = std::pin::pin!(conn);
        // The connection future drives the socket; the exchange reads what it delivered.
        tokio::select! {
            biased;
            answer = &mut exchange => return answer,
            done = &mut conn => done.context("local API connection failed")?,
        }
        // The connection ended cleanly: the response (if any) is already buffered.
        exchange.await
    }
}
