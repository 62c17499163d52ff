//! The custody ledger (`crate::custody`): `POST|GET /api/v1/devices/{id}/custody`, and lost
//! and found reports: `POST /api/v1/devices/{id}/lost {"reason"}` locks the terminal
//! (desired lock through the command plane), puts it in lifecycle `lost` and writes a ledger
//! entry (or, beyond the requester's lock window, answers 202 with an approval that does so
//! when another admin approves it: `api::approvals`); `POST /api/v1/devices/{id}/found {"note"?}` returns it to `active` (it stays locked
//! until someone unlocks it). The audit middleware records each call.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use posfleet_proto::DeviceId;
use serde_json::Value;

use super::ApiState;
use super::approvals::{self, LockGate, lock_gate};
use super::audit::AuditNote;
use super::commands::{MAX_REASON_CHARS, create_now};
use super::devices::{device_id, unknown};
use super::error::ApiError;
use crate::accounts::Principal;
use crate::approvals::LockReservation;
use crate::commands::{Action, CreateRequest};
use crate::custody::{CustodyLedger, NewEntry};
use crate::views::{CustodyEntry, CustodyHistory, Lifecycle, LostFoundView};

const RECORD_HINT: &str = "send {\"from\": \"...\", \"to\": \"...\", \"location\": \"...\", \
     \"note\": \"...\" (optional)}; each 1-100 characters (note up to 500)";
const LOST_HINT: &str = "send {\"reason\": \"...\"} (1-200 characters)";
const FOUND_HINT: &str = "send {} or {\"note\": \"...\"}";
/// How long the lock of a lost terminal stays valid for delivery.
const LOST_LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

fn ledger(state: &ApiState) -> Result<Arc<CustodyLedger>, ApiError> {
    state.custody.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server keeps no custody ledger",
            Some("the custody routes need the controller's data directory"),
        )
    })
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the custody ledger failed: {e}"),
        Some("retry later and check the controller's log"),
    )
}

/// A text field: trimmed, `1..=max` characters (or empty if optional), no control characters.
fn text(
    obj: &serde_json::Map<String, Value>,
    name: &str,
    max: usize,
    required: bool,
    hint: &str,
) -> Result<String, ApiError> {
    let value = match obj.get(name) {
        None if !required => return Ok(String::new()),
        None => return Err(ApiError::field(name, "required", hint)),
        Some(v) => v
            .as_str()
            .ok_or_else(|| ApiError::field(name, "must be a string", hint))?
            .trim(),
    };
    if required && value.is_empty() {
        return Err(ApiError::field(name, "must not be empty", hint));
    }
    if value.chars().count() > max {
        return Err(ApiError::field(
            name,
            format!("longer than {max} characters"),
            hint,
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::field(name, "contains control characters", hint));
    }
    Ok(value.to_owned())
}

fn object<'a>(
    body: &'a Result<Json<Value>, JsonRejection>,
    allowed: &[&str],
    hint: &str,
) -> Result<&'a serde_json::Map<String, Value>, ApiError> {
    let Json(body) = body
        .as_ref()
        .map_err(|e| ApiError::bad_request(e.body_text(), hint))?;
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object", hint))?;
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::field(k.as_str(), "unknown field", hint));
    }
    Ok(obj)
}

async fn write(
    state: &ApiState,
    ledger: Arc<CustodyLedger>,
    device: &DeviceId,
    new: NewEntry,
) -> Result<CustodyEntry, ApiError> {
    let now = (state.clock)();
    let device = device.clone();
    // Signs and fsyncs: off the runtime.
    tokio::task::spawn_blocking(move || ledger.record(&device, now, new))
        .await
        .map_err(store_error)?
        .map_err(store_error)
}

pub(crate) async fn record(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = device_id(id)?;
    let obj = object(&body, &["from", "to", "location", "note"], RECORD_HINT)?;
    let new = NewEntry {
        kind: "handover",
        recorded_by: principal.name.clone(),
        from: text(obj, "from", 100, true, RECORD_HINT)?,
        to: text(obj, "to", 100, true, RECORD_HINT)?,
        location: text(obj, "location", 100, true, RECORD_HINT)?,
        note: text(obj, "note", 500, false, RECORD_HINT)?,
    };
    if state.registry.groups(&id).is_none() {
        return Err(unknown(&id));
    }
    let ledger = ledger(&state)?;
    let entry = write(&state, ledger, &id, new).await?;
    let note = AuditNote {
        target: None,
        detail: format!(
            "custody {}: {} -> {} at {}",
            entry.seq, entry.from, entry.to, entry.location
        ),
    };
    Ok(note.attach((StatusCode::CREATED, Json(entry)).into_response()))
}

pub(crate) async fn history(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CustodyHistory>, ApiError> {
    let id = device_id(id)?;
    if state.registry.groups(&id).is_none() {
        return Err(unknown(&id));
    }
    let ledger = ledger(&state)?;
    let history = tokio::task::spawn_blocking(move || ledger.history(&id))
        .await
        .map_err(store_error)?
        .map_err(store_error)?;
    Ok(Json(history))
}

pub(crate) async fn lost(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = device_id(id)?;
    let obj = object(&body, &["reason"], LOST_HINT)?;
    let reason = text(obj, "reason", MAX_REASON_CHARS, true, LOST_HINT)?;
    if state.registry.groups(&id).is_none() {
        return Err(unknown(&id));
    }
    ledger(&state)?;
    // A lost report locks: it counts in the requester's lock window like any lock.
    let reservation = match lock_gate(&state, &principal, 1).await? {
        LockGate::Approve => {
            let body = serde_json::json!({ "reason": reason });
            return approvals::request(&state, &principal, "lost", body, &[id]).await;
        }
        LockGate::Issue(r) => r,
    };
    let view = lost_now(&state, &principal.name, &id, &reason, reservation).await?;
    let note = AuditNote {
        target: None,
        detail: format!(
            "lifecycle lost, lock command {}: {reason}",
            view.commands.first().map(|c| c.id.as_str()).unwrap_or("-")
        ),
    };
    Ok(note.attach(Json(view).into_response()))
}

/// Carries out a lost report by `author`: the lock first (if it cannot be made durable,
/// nothing else changes and `reservation` is given back), then lifecycle `lost` and the ledger
/// entry.
pub(super) async fn lost_now(
    state: &ApiState,
    author: &str,
    id: &DeviceId,
    reason: &str,
    reservation: Option<LockReservation>,
) -> Result<LostFoundView, ApiError> {
    let ledger = ledger(state)?;
    let commands = match create_now(
        state,
        CreateRequest {
            action: Action::Lock {
                reason: format!("reported lost: {reason}"),
            },
            devices: vec![id.clone()],
            author: author.to_owned(),
            ttl: LOST_LOCK_TTL,
        },
    )
    .await
    {
        Ok(commands) => commands,
        Err(e) => {
            approvals::release(state, reservation).await;
            return Err(e);
        }
    };
    let custody = set_lifecycle(
        state,
        ledger,
        id,
        Lifecycle::Lost,
        NewEntry {
            kind: "lost",
            recorded_by: author.to_owned(),
            from: String::new(),
            to: String::new(),
            location: String::new(),
            note: reason.to_owned(),
        },
    )
    .await?;
    Ok(LostFoundView {
        device_id: id.to_string(),
        lifecycle: Lifecycle::Lost,
        commands,
        custody,
    })
}

pub(crate) async fn found(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<LostFoundView>, ApiError> {
    let id = device_id(id)?;
    let obj = object(&body, &["note"], FOUND_HINT)?;
    let note = text(obj, "note", 500, false, FOUND_HINT)?;
    let Some(detail) = state.registry.detail(&id) else {
        return Err(unknown(&id));
    };
    if detail.summary.lifecycle != Lifecycle::Lost {
        return Err(ApiError::conflict(
            format!("device {id} is not lost"),
            "only a device reported lost can be found",
        ));
    }
    let ledger = ledger(&state)?;
    let custody = set_lifecycle(
        &state,
        ledger,
        &id,
        Lifecycle::Active,
        NewEntry {
            kind: "found",
            recorded_by: principal.name.clone(),
            from: String::new(),
            to: String::new(),
            location: String::new(),
            note,
        },
    )
    .await?;
    Ok(Json(LostFoundView {
        device_id: id.to_string(),
        lifecycle: Lifecycle::Active,
        commands: Vec::new(),
        custody,
    }))
}

/// Sets the lifecycle durably, then writes the ledger entry.
async fn set_lifecycle(
    state: &ApiState,
    ledger: Arc<CustodyLedger>,
    id: &DeviceId,
    lifecycle: Lifecycle,
    entry: NewEntry,
) -> Result<CustodyEntry, ApiError> {
    if !state.registry.set_lifecycle(id, lifecycle) {
        return Err(unknown(id));
    }
    state
        .registry
        .flush()
        .await
        .map_err(|e| ApiError::internal("the registry commit", &e.to_string()))?;
    write(state, ledger, id, entry).await
}
