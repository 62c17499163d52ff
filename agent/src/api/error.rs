//! JSON error bodies of the local API, and why it could not start.

use std::path::PathBuf;

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Serialize;

use crate::transaction::FieldProblem;

/// The body of every error response.
#[derive(Debug, Serialize)]
pub(crate) struct ErrorBody<'a> {
    /// Machine-readable: `invalid_json`, `card_number_refused`, `invalid_transaction`,
    /// `txn_id_conflict`, `terminal_locked`, `outbox_full`, `outbox_unavailable`, `timeout`,
    /// `unsupported_media_type`.
    pub(crate) error: &'a str,
    /// For people: what happened and what to do. Never holds card data.
    pub(crate) message: String,
    /// Field-level problems, when there are any.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub(crate) problems: &'a [FieldProblem],
}

pub(crate) fn response(status: StatusCode, error: &str, message: impl Into<String>) -> Response {
    with_problems(status, error, message, &[])
}

pub(crate) fn with_problems(
    status: StatusCode,
    error: &str,
    message: impl Into<String>,
    problems: &[FieldProblem],
) -> Response {
    let body = ErrorBody {
        error,
        message: message.into(),
        problems,
    };
    (status, Json(body)).into_response()
}

/// Why the local API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the local API socket path {} is longer than {max} bytes", path.display())]
    SocketPathTooLong { path: PathBuf, max: usize },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("another process is serving the local API on {}; stop it first", path.display())]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on {}", path.display())]
    BindUnix {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the local API TCP address {addr} is not a loopback address")]
    NotLoopback { addr: std::net::SocketAddr },
    #[error("cannot listen on {addr}")]
    BindTcp {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}
