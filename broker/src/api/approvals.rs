//! Two-person approval (`crate::approvals`): `POST /api/v1/commands` answers 202
//! `{"approval": {...}}` for a wipe, or for a lock that takes the requester's locks within the
//! window over the threshold ([`lock_gate`], [`request`]); so does `POST
//! /api/v1/devices/{id}/lost`. `GET /api/v1/approvals`, `GET /api/v1/approvals/{id}`,
//! `POST /api/v1/approvals/{id}/approve` (creates the commands, once) and
//! `POST /api/v1/approvals/{id}/reject`: only by another human account in an MFA-verified
//! session (`Principal::approver`). The audit middleware records each call; the approve note
//! names the commands created.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use posfleet_proto::DeviceId;
use posfleet_proto::text::LIST_SEPARATOR;
use serde_json::Value;

use super::ApiState;
use super::audit::AuditNote;
use super::commands::{create_now, created_note, parse_create};
use super::error::ApiError;
use crate::accounts::{Principal, PrincipalKind};
use crate::approvals::{ApprovalStore, DecideError, LockBudget, LockReservation};
use crate::commands::CreateRequest;
use crate::views::{ApprovalDecided, ApprovalList, ApprovalRequired, ApprovalState, ApprovalView};

const ID_HINT: &str = "approval ids are what POST /api/v1/commands returned in \
     approval.id; list pending ones with GET /api/v1/approvals";

fn store(state: &ApiState) -> Result<Arc<ApprovalStore>, ApiError> {
    state.approvals.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server keeps no approvals, so wipes and large locks cannot be requested",
            Some("start the controller with its data directory, or --two-person-approval off"),
        )
    })
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the approval store failed: {e}"),
        Some("nothing was decided; retry later and check the controller's log"),
    )
}

/// What a lock may do now.
pub(super) enum LockGate {
    /// Issue it; the reservation (if the ledger recorded one) is released if its commands
    /// cannot be created.
    Issue(Option<LockReservation>),
    /// It would take the party over the threshold: ask for approval.
    Approve,
}

/// Records a lock of `devices` terminals by `principal`'s party in the lock ledger, or says
/// that it needs approval (crate::approvals docs).
pub(super) async fn lock_gate(
    state: &ApiState,
    principal: &Principal,
    devices: usize,
) -> Result<LockGate, ApiError> {
    if !state.approval_policy.counts_locks() {
        return Ok(LockGate::Issue(None));
    }
    let store = store(state)?;
    let (party, policy, now) = (
        principal.party().to_owned(),
        state.approval_policy,
        (state.clock)(),
    );
    let budget =
        tokio::task::spawn_blocking(move || store.reserve_locks(&party, devices, now, &policy))
            .await
            .map_err(store_error)?
            .map_err(store_error)?;
    Ok(match budget {
        LockBudget::Reserved(r) => LockGate::Issue(Some(r)),
        LockBudget::Exceeded { .. } => LockGate::Approve,
    })
}

/// Gives back a reservation whose lock was not issued (a failure is logged: the ledger then
/// counts a lock that did not happen, which errs on the side of asking for approval).
pub(super) async fn release(state: &ApiState, reservation: Option<LockReservation>) {
    let (Some(reservation), Some(store)) = (reservation, state.approvals.clone()) else {
        return;
    };
    let released = tokio::task::spawn_blocking(move || store.release(&reservation)).await;
    if !matches!(released, Ok(Ok(()))) {
        tracing::error!("a lock reservation could not be released");
    }
}

/// Stores a pending approval for a validated, resolved command request; 202
/// `{"approval": ...}`.
pub(super) async fn request(
    state: &ApiState,
    principal: &Principal,
    kind: &str,
    body: Value,
    devices: &[DeviceId],
) -> Result<Response, ApiError> {
    let store = store(state)?;
    let now = (state.clock)();
    let ttl_ms = u64::try_from(state.approval_policy.ttl.as_millis()).unwrap_or(u64::MAX);
    let approval = ApprovalView {
        id: posfleet_proto::signing::new_command_id(),
        kind: kind.to_owned(),
        requested_by: principal.name.clone(),
        requested_for: principal.party().to_owned(),
        requested_at_ms: now,
        expires_at_ms: now.saturating_add(ttl_ms),
        state: ApprovalState::Pending,
        devices: devices.iter().map(ToString::to_string).collect(),
        request: body,
        decided_by: None,
        decided_at_ms: None,
        commands: Vec::new(),
    };
    let stored = approval.clone();
    tokio::task::spawn_blocking(move || store.create(&stored))
        .await
        .map_err(store_error)?
        .map_err(store_error)?;
    let note = AuditNote {
        target: Some(approval.devices.join(LIST_SEPARATOR)),
        detail: format!(
            "{kind} of {} terminal(s) needs a second admin: approval {}",
            approval.devices.len(),
            approval.id
        ),
    };
    Ok(note.attach((StatusCode::ACCEPTED, Json(ApprovalRequired { approval })).into_response()))
}

pub(crate) async fn list(State(state): State<ApiState>) -> Result<Json<ApprovalList>, ApiError> {
    let store = store(&state)?;
    let now = (state.clock)();
    let approvals = tokio::task::spawn_blocking(move || store.list(now))
        .await
        .map_err(store_error)?
        .map_err(store_error)?;
    Ok(Json(ApprovalList { approvals }))
}

pub(crate) async fn detail(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ApprovalView>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text(), ID_HINT))?;
    let store = store(&state)?;
    let now = (state.clock)();
    let key = id.clone();
    tokio::task::spawn_blocking(move || store.get(&key, now))
        .await
        .map_err(store_error)?
        .map_err(store_error)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no approval {id}"), ID_HINT))
}

pub(crate) async fn approve(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let approval = decide(&state, &principal, id, ApprovalState::Approved).await?;
    let store = store(&state)?;
    let finish = |commands: Option<Vec<String>>| {
        let store = Arc::clone(&store);
        let id = approval.id.clone();
        async move {
            tokio::task::spawn_blocking(move || store.finish(&id, commands))
                .await
                .map_err(store_error)?
                .map_err(store_error)
        }
    };
    let created = match issue(&state, &principal, &approval).await {
        Ok(created) => created,
        Err(e) => {
            // Nothing was created: back to pending, so it can be approved again.
            finish(None).await?;
            return Err(e);
        }
    };
    let approval = finish(Some(created.iter().map(|c| c.id.clone()).collect())).await?;
    let mut note = created_note(&created);
    note.detail = format!(
        "approved {}'s {} ({}); {}",
        approval.requested_by, approval.kind, approval.id, note.detail
    );
    note.target = Some(approval.id.clone());
    Ok(note.attach(
        Json(ApprovalDecided {
            approval,
            commands: created,
        })
        .into_response(),
    ))
}

pub(crate) async fn reject(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ApprovalDecided>, ApiError> {
    let approval = decide(&state, &principal, id, ApprovalState::Rejected).await?;
    Ok(Json(ApprovalDecided {
        approval,
        commands: Vec::new(),
    }))
}

async fn decide(
    state: &ApiState,
    principal: &Principal,
    id: Result<Path<String>, PathRejection>,
    to: ApprovalState,
) -> Result<ApprovalView, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text(), ID_HINT))?;
    let Some(by) = principal.approver().map(str::to_owned) else {
        let why = match principal.kind {
            PrincipalKind::BootstrapToken => "the bootstrap token cannot approve or reject",
            PrincipalKind::ApiToken => "API tokens cannot approve or reject",
            PrincipalKind::Session => {
                "this session's login did not verify a TOTP code, so it cannot approve or reject"
            }
        };
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            why,
            Some(
                "another admin decides, logged in with their own account and MFA (posctl \
                 login, then posctl approvals approve ID)",
            ),
        ));
    };
    let store = store(state)?;
    let now = (state.clock)();
    let key = id.clone();
    let result = tokio::task::spawn_blocking(move || store.decide(&key, &by, to, now))
        .await
        .map_err(store_error)?;
    result.map_err(|e| match e {
        DecideError::Unknown(_) => ApiError::not_found(e.to_string(), ID_HINT),
        DecideError::OwnRequest => ApiError::new(
            StatusCode::FORBIDDEN,
            e.to_string(),
            Some("another admin (a different account) must decide it"),
        ),
        DecideError::Decided { .. } => {
            ApiError::conflict(e.to_string(), "a decided approval never changes")
        }
        DecideError::Expired(_) => ApiError::conflict(
            e.to_string(),
            "send the command request again to open a new approval",
        ),
        DecideError::Store(e) => store_error(e),
    })
}

/// Creates the approved request's commands for the devices it resolved to when requested (for
/// a lost report: the lock, the lifecycle and the ledger entry).
async fn issue(
    state: &ApiState,
    principal: &Principal,
    approval: &ApprovalView,
) -> Result<Vec<crate::views::CommandView>, ApiError> {
    let author = format!("{} (approved by {})", approval.requested_by, principal.name);
    if approval.kind == "lost" {
        let stored = |what: &str| ApiError::internal("the stored approval", what);
        let reason = approval
            .request
            .get("reason")
            .and_then(Value::as_str)
            .ok_or_else(|| stored("no reason"))?;
        let device = approval
            .devices
            .first()
            .map(DeviceId::new)
            .transpose()
            .map_err(|e| stored(&e.to_string()))?
            .ok_or_else(|| stored("no device"))?;
        let view = super::custody::lost_now(state, &author, &device, reason, None).await?;
        return Ok(view.commands);
    }
    let (action, _, ttl) = parse_create(&approval.request)?;
    let devices = approval
        .devices
        .iter()
        .map(DeviceId::new)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::internal("the stored approval", &e.to_string()))?;
    let req = CreateRequest {
        action,
        devices,
        author,
        ttl,
    };
    create_now(state, req).await
}
