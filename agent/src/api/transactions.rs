//! `POST /v1/transactions`: the payment application hands over one transaction.
//!
//! | status | when |
//! | --- | --- |
//! | 201 | stored durably in the outbox (body: `txn_id`, `seq`) |
//! | 200 | the same txn id with identical content was stored before (original `seq`) |
//! | 400 | not JSON, a field is missing or invalid (all listed), or a full card number anywhere |
//! | 409 | the same txn id was stored before with different content |
//! | 413 | body larger than 64 KiB |
//! | 415 | a `Content-Type` other than `application/json` |
//! | 423 | the terminal is locked |
//! | 503 | the outbox is full or cannot write; retry later with the same txn id |

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use serde::Serialize;
use tracing::warn;

use super::ApiState;
use super::error::{response, with_problems};
use crate::outbox::OutboxError;
use crate::transaction::request::from_json;
use crate::transaction::{AcceptError, Refusal};

/// The body of 201 and 200.
#[derive(Debug, Serialize)]
struct AcceptedBody {
    txn_id: String,
    seq: u64,
    /// `stored` (201) or `duplicate` (200).
    result: &'static str,
}

pub(crate) async fn post(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(kind) = headers.get(header::CONTENT_TYPE) {
        let json = kind.to_str().is_ok_and(|k| {
            k.trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
        if !json {
            return response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the transaction as application/json",
            );
        }
    }
    let intake = state.agent.intake();
    let request = match from_json(&body) {
        Ok(request) => request,
        Err(refusal) => {
            if let Refusal::Pan { fields } = &refusal {
                warn!(
                    device_id = %state.agent.device_id(),
                    fields = %fields.join(","),
                    "transaction refused: full card number (PAN) in the request"
                );
            }
            return refused(&refusal);
        }
    };
    match intake.accept(request).await {
        Ok(accepted) => {
            let (status, result) = if accepted.new {
                (StatusCode::CREATED, "stored")
            } else {
                (StatusCode::OK, "duplicate")
            };
            let body = AcceptedBody {
                txn_id: accepted.txn_id,
                seq: accepted.seq,
                result,
            };
            (status, Json(body)).into_response()
        }
        Err(AcceptError::Locked) => response(
            StatusCode::LOCKED,
            "terminal_locked",
            AcceptError::Locked.to_string(),
        ),
        Err(AcceptError::Refused(refusal)) => refused(&refusal),
        Err(conflict @ AcceptError::Conflict { .. }) => response(
            StatusCode::CONFLICT,
            "txn_id_conflict",
            format!("{conflict}; nothing was stored"),
        ),
        Err(AcceptError::Outbox(full @ OutboxError::Full { .. })) => {
            let mut r = response(
                StatusCode::SERVICE_UNAVAILABLE,
                "outbox_full",
                full.to_string(),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("30"));
            r
        }
        Err(AcceptError::Outbox(error)) => {
            warn!(%error, "transaction not stored");
            response(
                StatusCode::SERVICE_UNAVAILABLE,
                "outbox_unavailable",
                format!("the transaction was not stored ({error}); retry with the same txn id"),
            )
        }
    }
}

fn refused(refusal: &Refusal) -> Response {
    let (code, problems) = match refusal {
        Refusal::Malformed { .. } => ("invalid_json", &[][..]),
        Refusal::Pan { .. } => ("card_number_refused", &[][..]),
        Refusal::Invalid { problems } => ("invalid_transaction", problems.as_slice()),
    };
    let pan_problems: Vec<_>;
    let problems = if let Refusal::Pan { fields } = refusal {
        pan_problems = fields
            .iter()
            .map(|f| crate::transaction::FieldProblem::new(f.clone(), "holds a full card number"))
            .collect();
        pan_problems.as_slice()
    } else {
        problems
    };
    with_problems(StatusCode::BAD_REQUEST, code, refusal.to_string(), problems)
}
