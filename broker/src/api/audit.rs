//! The audit trail of the API: the middleware that records every change and every command
//! ([`record`]), and the audit routes: `GET /api/v1/audit` (filtered, paginated, newest
//! first), `GET /api/v1/audit/verify`, `POST /api/v1/audit/verify` (against an exported
//! anchor in the body), `GET /api/v1/audit/anchor` (a signed anchor of the head, to keep
//! elsewhere) and `GET /api/v1/audit/export` (JSON lines).
//!
//! # What is recorded, and when
//!
//! Every request that may change something (any method but GET/HEAD) and every read of the
//! audit log itself (PCI DSS 10.2.1.3) gets two entries with the same action and target:
//!
//! 1. `outcome: requested`, written durably **before** the handler runs. If it cannot be
//!    stored the handler never runs and the client gets 503 ("nothing was done").
//! 2. the outcome (`success` for 2xx, `denied` for 401/403, `failure` otherwise, with the
//!    status and, where the handler adds one, a detail), written after the handler. If that
//!    entry cannot be stored the action has still happened; the response is kept and the
//!    failure is logged, and the `requested` entry remains as the record of the attempt.
//!
//! The middleware runs inside the role check (`auth::authorize`): a request refused by role
//! or without a valid token gets no `requested` entry; such refusals are counted and written
//! aggregated, one entry per key and window ([`Refusals`]), like refused logins.
//!
//! The actor is the request's [`Principal`] name, the source the client's IP address. The
//! action comes from [`action_for`]; a route missing there is still recorded (as
//! `api.<method> <route>`), so no mutating route can escape the log. Handlers add what only
//! they know (the devices a selector resolved to, an approval id) as an [`AuditNote`] in the
//! response's extensions.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tracing::error;

use super::ApiState;
use super::error::ApiError;
use crate::accounts::Principal;
use crate::audit::{
    AuditLog, AuditQuery, AuditRecord, AuditSink, DEFAULT_LIMIT, MAX_LIMIT, Outcome, Refusals,
};
use crate::views::{AuditAnchor, AuditPage, AuditVerifyView};

/// Longest detail a handler note may add, in characters.
const MAX_DETAIL_CHARS: usize = 500;
/// Entries per page of the export stream.
const EXPORT_PAGE: usize = 500;
const QUERY_HINT: &str = "parameters: actor=<name>, action=<area.verb or area>, target=<id>, \
     from=<Unix ms or RFC 3339>, to=<...>, limit=1..1000, cursor=<next_cursor>";

/// Where the API records (a trait object without `Debug`), and the counts of repeated
/// refusals written to the same place (`crate::audit::Refusals`).
#[derive(Clone)]
pub(crate) struct Audit {
    pub(crate) sink: Arc<dyn AuditSink>,
    pub(crate) refusals: Arc<Refusals>,
}

impl Audit {
    pub(crate) fn new(sink: Arc<dyn AuditSink>, clock: crate::controller::Clock) -> Self {
        Self {
            refusals: Arc::new(Refusals::new(Arc::clone(&sink), clock)),
            sink,
        }
    }
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Audit")
    }
}

/// What a handler adds to its entry: a target more precise than the path's, and a detail.
/// Never a secret.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditNote {
    pub target: Option<String>,
    pub detail: String,
}

impl AuditNote {
    /// The note as a response extension on `response`.
    pub(crate) fn attach(self, mut response: Response) -> Response {
        response.extensions_mut().insert(self);
        response
    }
}

/// Who asked and from where, for handlers that record entries of their own.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub actor: String,
    pub source: String,
}

impl Caller {
    fn of(request: &Request) -> Self {
        Self {
            actor: request
                .extensions()
                .get::<Principal>()
                .map_or_else(|| "unauthenticated".to_owned(), |p| p.name.clone()),
            source: super::auth::source(request.extensions().get::<super::PeerAddr>()),
        }
    }
}

impl ApiState {
    /// Records one entry durably (on a blocking thread: the sink fsyncs). An error is the
    /// 503 the client should get.
    pub(crate) async fn audit(&self, record: AuditRecord) -> Result<(), ApiError> {
        let sink = Arc::clone(&self.audit.sink);
        let action = record.action.clone();
        let stored = tokio::task::spawn_blocking(move || sink.record(record))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        stored.map_err(|e| {
            error!(error = %e, %action, "audit entry could not be stored");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the audit log could not record {action}; nothing was done"),
                Some("the controller refuses changes it cannot audit; check its log and disk"),
            )
        })
    }
}

impl ApiState {
    /// Counts a refusal (`record.detail` is the reason) for the aggregated audit entry of its
    /// window; never waits for the disk (except after the final flush at shutdown).
    pub(crate) async fn refused(&self, record: AuditRecord) {
        if let Some(record) = self.audit.refusals.note(record) {
            let _ = self.audit(record).await;
        }
    }

    /// The refusal counts, for the flusher task (`Refusals::spawn_flusher`).
    pub fn refusals(&self) -> Arc<Refusals> {
        Arc::clone(&self.audit.refusals)
    }

    /// Writes every pending refusal count, so that a read of the log shows them.
    async fn flush_refusals(&self) -> Result<(), ApiError> {
        let refusals = self.refusals();
        tokio::task::spawn_blocking(move || refusals.flush(true))
            .await
            .map_err(store_error)?
            .map_err(store_error)?;
        Ok(())
    }
}

/// Middleware (module docs): records the request before and its outcome after the handler.
pub(crate) async fn record(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let method = request.method().clone();
    let audited =
        !matches!(method, Method::GET | Method::HEAD) || route.starts_with("/api/v1/audit");
    if !audited {
        return next.run(request).await;
    }
    let caller = Caller::of(&request);
    let action = action_for(&method, &route);
    let target = target_for(&route, request.uri().path());
    let entry = |outcome, target: String, detail: String| AuditRecord {
        actor: caller.actor.clone(),
        source: caller.source.clone(),
        action: action.clone(),
        target,
        outcome,
        detail,
    };
    if let Err(e) = state
        .audit(entry(Outcome::Requested, target.clone(), String::new()))
        .await
    {
        return e.into_response();
    }
    let response = next.run(request).await;
    let status = response.status();
    let outcome = if status.is_success() {
        Outcome::Success
    } else if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        Outcome::Denied
    } else {
        Outcome::Failure
    };
    let note = response
        .extensions()
        .get::<AuditNote>()
        .cloned()
        .unwrap_or_default();
    let mut detail = format!("status {}", status.as_u16());
    if !note.detail.is_empty() {
        detail.push_str("; ");
        detail.extend(note.detail.chars().take(MAX_DETAIL_CHARS));
    }
    let target = note.target.unwrap_or(target);
    // The action has happened: a failure here is logged (by `audit`) and the response kept.
    let _ = state.audit(entry(outcome, target, detail)).await;
    response
}

/// The audit action of a route (`area.verb`), or `api.<method> <route>` for a route without
/// a name yet.
pub(crate) fn action_for(method: &Method, route: &str) -> String {
    let named = match (method.as_str(), route) {
        ("POST", "/api/v1/commands") => "command.create",
        ("POST", "/api/v1/commands/{id}/cancel") => "command.cancel",
        ("PUT", "/api/v1/devices/{id}/groups") => "device.set_groups",
        ("PUT", "/api/v1/devices/{id}/labels") => "device.set_labels",
        ("POST", "/api/v1/devices/{id}/custody") => "custody.record",
        ("POST", "/api/v1/devices/{id}/lost") => "device.lost",
        ("POST", "/api/v1/devices/{id}/found") => "device.found",
        (
            "PATCH",
            "/api/v1/config/fleet" | "/api/v1/config/groups/{name}" | "/api/v1/config/devices/{id}",
        ) => "config.set",
        (
            "PUT",
            "/api/v1/config/fleet" | "/api/v1/config/groups/{name}" | "/api/v1/config/devices/{id}",
        ) => "config.replace",
        (
            "DELETE",
            "/api/v1/config/fleet" | "/api/v1/config/groups/{name}" | "/api/v1/config/devices/{id}",
        ) => "config.delete",
        ("POST", "/api/v1/artifacts") => "artifact.upload",
        ("DELETE", "/api/v1/artifacts/{id}") => "artifact.delete",
        ("POST", "/api/v1/rollouts") => "rollout.create",
        ("POST", "/api/v1/rollouts/{id}/pause") => "rollout.pause",
        ("POST", "/api/v1/rollouts/{id}/resume") => "rollout.resume",
        ("POST", "/api/v1/rollouts/{id}/abort") => "rollout.abort",
        ("POST", "/api/v1/approvals/{id}/approve") => "approval.approve",
        ("POST", "/api/v1/approvals/{id}/reject") => "approval.reject",
        ("POST", "/api/v1/pki/certificates") => "pki.issue",
        ("GET", "/api/v1/audit") => "audit.list",
        ("GET" | "POST", "/api/v1/audit/verify") => "audit.verify",
        ("GET", "/api/v1/audit/anchor") => "audit.anchor_export",
        ("GET", "/api/v1/audit/export") => "audit.export",
        _ => return format!("api.{} {route}", method.as_str().to_ascii_lowercase()),
    };
    named.to_owned()
}

/// The target named by the path: the value of its `{id}`/`{name}` segment (configuration
/// scopes as `fleet`, `group:NAME`, `device:ID`), withheld if it holds a card number; `-` for
/// a collection.
pub(crate) fn target_for(route: &str, path: &str) -> String {
    // A path segment is what the client typed: a card number in it is never recorded.
    let value = route
        .split('/')
        .zip(path.split('/'))
        .find(|(r, _)| r.starts_with('{'))
        .map(|(_, p)| posfleet_proto::text::shown(p).into_owned());
    if route == "/api/v1/config/fleet" {
        return "fleet".to_owned();
    }
    match (value, route) {
        (Some(v), r) if r.starts_with("/api/v1/config/groups/") => format!("group:{v}"),
        (Some(v), r) if r.starts_with("/api/v1/config/devices/") => format!("device:{v}"),
        (Some(v), _) => v,
        (None, _) => "-".to_owned(),
    }
}

/// Query parameters of the list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    actor: Option<String>,
    action: Option<String>,
    target: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn log(state: &ApiState) -> Result<Arc<AuditLog>, ApiError> {
    state.audit_log.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server keeps no audit log",
            Some("the audit routes need the controller's data directory"),
        )
    })
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal("the audit store", &e.to_string())
}

pub(crate) async fn list(
    State(state): State<ApiState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text(), QUERY_HINT))?;
    let time = |name: &str, v: Option<String>| {
        v.filter(|s| !s.is_empty())
            .map(|s| super::parse_time(name, &s))
            .transpose()
            .map_err(|e| ApiError::field(name, e, QUERY_HINT))
    };
    let limit = match p.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::field("limit", format!("must be 1..={MAX_LIMIT}"), QUERY_HINT)
            })?,
    };
    let cursor = p
        .cursor
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<u64>())
        .transpose()
        .map_err(|_| ApiError::field("cursor", "not a cursor this list issued", QUERY_HINT))?;
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let query = AuditQuery {
        actor: nonempty(p.actor),
        action: nonempty(p.action),
        target: nonempty(p.target),
        from_ms: time("from", p.from)?,
        to_ms: time("to", p.to)?,
        limit,
    };
    let log = log(&state)?;
    state.flush_refusals().await?;
    // Reads up to thousands of entries: off the runtime.
    let page = tokio::task::spawn_blocking(move || log.query(&query, cursor))
        .await
        .map_err(store_error)?
        .map_err(store_error)?;
    Ok(Json(page))
}

pub(crate) async fn verify(
    State(state): State<ApiState>,
) -> Result<Json<AuditVerifyView>, ApiError> {
    let log = log(&state)?;
    state.flush_refusals().await?;
    // Walks the whole chain: off the runtime.
    let report = tokio::task::spawn_blocking(move || log.verify())
        .await
        .map_err(store_error)?
        .map_err(store_error)?;
    Ok(Json(report))
}

/// Largest anchor accepted by `POST /api/v1/audit/verify`.
pub(crate) const ANCHOR_BODY_LIMIT: usize = 16 * 1024;
const ANCHOR_HINT: &str = "send the anchor exported with `posctl audit anchor export` (GET \
                           /api/v1/audit/anchor) unchanged";

/// `POST /api/v1/audit/verify`: the chain against an exported anchor. A refused anchor (its
/// signature, installation or key) is a 400 naming the field; a chain that departs from it is
/// a report with `ok: false`.
pub(crate) async fn verify_anchored(
    State(state): State<ApiState>,
    body: Result<Json<AuditAnchor>, JsonRejection>,
) -> Result<Json<AuditVerifyView>, ApiError> {
    let log = log(&state)?;
    let Json(anchor) = body.map_err(|e| ApiError::bad_request(e.body_text(), ANCHOR_HINT))?;
    let checked = tokio::task::spawn_blocking(move || log.verify_anchored(&anchor))
        .await
        .map_err(store_error)?
        .map_err(store_error)?;
    match checked {
        Ok(report) => Ok(Json(report)),
        Err(e) => Err(ApiError::field(
            format!("anchor.{}", e.field),
            e.message,
            ANCHOR_HINT,
        )),
    }
}

/// `GET /api/v1/audit/anchor`: a signed anchor of the newest entry.
pub(crate) async fn anchor(State(state): State<ApiState>) -> Result<Json<AuditAnchor>, ApiError> {
    let log = log(&state)?;
    let now = posfleet_proto::now_ms();
    let anchor = tokio::task::spawn_blocking(move || log.export_anchor(now))
        .await
        .map_err(store_error)?;
    Ok(Json(anchor))
}

/// Every entry, oldest first, one JSON object per line, streamed page by page.
pub(crate) async fn export(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let log = log(&state)?;
    state.flush_refusals().await?;
    let pages = futures_util::stream::unfold(Some(0u64), move |after| {
        let log = Arc::clone(&log);
        async move {
            let after = after?;
            let page = tokio::task::spawn_blocking(move || log.after(after, EXPORT_PAGE))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r.map_err(|e| std::io::Error::other(e.to_string())));
            match page {
                Ok(entries) if entries.is_empty() => None,
                Ok(entries) => {
                    let next = entries.last().map(|e| e.seq);
                    let mut bytes = Vec::new();
                    for e in &entries {
                        if let Ok(line) = serde_json::to_vec(e) {
                            bytes.extend_from_slice(&line);
                            bytes.push(b'\n');
                        }
                    }
                    let next = if entries.len() < EXPORT_PAGE {
                        None
                    } else {
                        next
                    };
                    Some((Ok::<_, std::io::Error>(bytes), next))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(pages),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_come_from_the_path() {
        assert_eq!(
            target_for(
                "/api/v1/commands/{id}/cancel",
                "/api/v1/commands/c-1/cancel"
            ),
            "c-1"
        );
        assert_eq!(target_for("/api/v1/commands", "/api/v1/commands"), "-");
        assert_eq!(
            target_for("/api/v1/config/fleet", "/api/v1/config/fleet"),
            "fleet"
        );
        assert_eq!(
            target_for("/api/v1/config/groups/{name}", "/api/v1/config/groups/n"),
            "group:n"
        );
        assert_eq!(
            target_for("/api/v1/config/devices/{id}", "/api/v1/config/devices/T"),
            "device:T"
        );
    }

    #[test]
    fn unnamed_routes_still_get_an_action() {
        assert_eq!(
            action_for(&Method::POST, "/api/v1/commands"),
            "command.create"
        );
        assert_eq!(
            action_for(&Method::POST, "/api/v1/new/{id}"),
            "api.post /api/v1/new/{id}"
        );
    }
}
