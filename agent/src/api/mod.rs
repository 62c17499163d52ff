//! The local API for the payment application on the terminal: HTTP/1.1 over a Unix socket
//! (mode 0660) and, optionally, loopback TCP.
//!
//! # Layout
//!
//! - `mod.rs`: [`LocalApiSettings`], [`ApiState`], [`router`] (body limit, request timeout).
//! - `listener.rs`: [`LocalApi::bind`] (stale socket removal, permissions, loopback-only TCP)
//!   and the accept loops (connection cap, header read timeout, graceful stop).
//! - `transactions.rs`: `POST /v1/transactions`.
//! - `status.rs`: `GET /v1/status` (connection, lock, config version, outbox).
//! - `config.rs`: `GET /v1/config` (the applied configuration).
//! - `error.rs`: JSON error bodies and [`ApiError`] (bind failures).
//!
//! Access control is the socket's: owner `posfleet`, group `posfleet`, mode 0660; the
//! payment application's user is a member of the group. The TCP listener, when configured,
//! accepts loopback addresses only.

mod config;
mod error;
mod listener;
mod status;
#[cfg(test)]
mod tests;
mod transactions;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use http::StatusCode;

pub use error::ApiError;
pub use listener::LocalApi;

use crate::agent::AgentHandle;

/// File name of the default socket, in the agent's data directory.
pub const DEFAULT_SOCKET_NAME: &str = "api.sock";
/// Largest request body; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest socket path the kernel accepts (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How the local API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalApiSettings {
    /// The Unix socket path; a stale socket file there is replaced at start.
    pub socket: PathBuf,
    /// Also listen on this loopback TCP address (port 0 picks one).
    pub tcp: Option<SocketAddr>,
    /// Time allowed for one request, body included; then 408.
    pub request_timeout: Duration,
    /// Time allowed for a client to send a request's headers.
    pub header_read_timeout: Duration,
    /// Open connections at most (per listener); `accept` waits beyond it.
    pub max_connections: usize,
    /// At shutdown, how long open requests may take to finish.
    pub shutdown_grace: Duration,
}

impl LocalApiSettings {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            tcp: None,
            request_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 32,
            shutdown_grace: Duration::from_secs(3),
        }
    }
}

/// What the handlers need: the terminal's agent (intake, outbox, connection, lock).
#[derive(Debug, Clone)]
pub struct ApiState {
    pub(crate) agent: AgentHandle,
}

impl ApiState {
    pub fn new(agent: AgentHandle) -> Self {
        Self { agent }
    }
}

/// The routes, with the body limit and the request timeout.
pub fn router(state: ApiState, request_timeout: Duration) -> Router {
    Router::new()
        .route("/v1/transactions", post(transactions::post))
        .route("/v1/status", get(status::get))
        .route("/v1/config", get(config::get))
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            request_timeout,
            timeout,
        ))
}

/// Answers 408 when a request (reading its body included) takes longer than allowed. A
/// transaction whose commit was already queued is still stored; the payment application's
/// retry with the same txn id then gets 200.
async fn timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error::response(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request took too long; retry with the same txn id",
        ),
    }
}
