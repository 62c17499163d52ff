//! Enrolment tokens (`POST|GET /api/v1/enrolment-tokens`, `DELETE .../{id}`), the open
//! enrolment route (`POST /api/v1/enroll`, authorised by its one-time token, not by a bearer
//! token), revocation and decommission (`POST /api/v1/devices/{id}/revoke|decommission`) and
//! the CRL (`GET /api/v1/pki/crl`, DER; PEM with `Accept: application/x-pem-file` or
//! `?format=pem`).

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::ApiState;
use super::devices::device_id;
use super::error::{ApiError, check_text};
use super::server::PeerAddr;
use crate::accounts::Principal;
use crate::enrolment::{EnrolError, Enrolment};
use crate::views::{
    EnrollRequest, EnrollResponse, RevocationView, RevokeRequest, TokenCreate, TokenCreated,
    TokenDeleted, TokenList,
};

const TOKEN_HINT: &str = "send {\"expires_in\": \"24h\", \"serial\"?: \"S\", \"group\"?: \"G\"}; \
                          tokens live at most 7 days";
const ENROLL_HINT: &str = "create a new token with `posctl enroll token create` and run \
                           `posfleet-agent enroll` again";
const REVOKE_HINT: &str = "send {\"reason\": \"why\"}";

impl From<EnrolError> for ApiError {
    fn from(e: EnrolError) -> Self {
        let message = e.to_string();
        match e {
            EnrolError::BadRequest(_) | EnrolError::Csr(_) => ApiError::bad_request(
                message,
                "the CSR must be PEM PKCS#10, self-signed, with an ECDSA P-256 or Ed25519 key",
            ),
            EnrolError::Token(_) => {
                ApiError::new(StatusCode::FORBIDDEN, message, Some(ENROLL_HINT))
            }
            EnrolError::Refused(_) => ApiError::new(StatusCode::FORBIDDEN, message, None),
            EnrolError::Conflict(_) => {
                ApiError::conflict(message, "list devices with posctl devices list")
            }
            EnrolError::NotFound(_) => ApiError::not_found(message, "check the id"),
            EnrolError::RateLimited => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                message,
                Some("failed enrolments are limited per address; wait 10 minutes"),
            ),
            EnrolError::Internal { what, detail } => ApiError::internal(what, &detail),
        }
    }
}

fn service(state: &ApiState) -> Result<Arc<Enrolment>, ApiError> {
    state.enrolment.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "enrolment is not available on this server",
            None,
        )
    })
}

fn actor(principal: Option<Extension<Principal>>) -> String {
    principal.map_or_else(|| "unknown".to_owned(), |Extension(p)| p.name)
}

/// Runs a blocking enrolment operation off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EnrolError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("the enrolment task", &e.to_string()))?
        .map_err(ApiError::from)
}

pub(crate) async fn create_token(
    State(state): State<ApiState>,
    principal: Option<Extension<Principal>>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    body: Result<Json<TokenCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let svc = service(&state)?;
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text(), TOKEN_HINT))?;
    for (field, value) in [("serial", &body.serial), ("group", &body.group)] {
        if let Some(value) = value {
            check_text(field, value, TOKEN_HINT)?;
        }
    }
    let actor = actor(principal);
    let now = posfleet_proto::now_ms();
    let created =
        blocking(move || svc.create_token(&body, &actor, &peer.ip().to_string(), now)).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub(crate) async fn list_tokens(
    State(state): State<ApiState>,
) -> Result<Json<TokenList>, ApiError> {
    let svc = service(&state)?;
    Ok(Json(TokenList {
        items: svc.list_tokens(posfleet_proto::now_ms()),
    }))
}

pub(crate) async fn delete_token(
    State(state): State<ApiState>,
    principal: Option<Extension<Principal>>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TokenDeleted>, ApiError> {
    let svc = service(&state)?;
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text(), "use the token id"))?;
    let actor = actor(principal);
    let token_id = id.clone();
    let deleted =
        blocking(move || svc.delete_token(&token_id, &actor, &peer.ip().to_string())).await?;
    Ok(Json(TokenDeleted { id, deleted }))
}

/// The open enrolment route: the one-time token in the body authorises it.
pub(crate) async fn enroll(
    State(state): State<ApiState>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let svc = service(&state)?;
    let Json(body) = body.map_err(|e| {
        ApiError::bad_request(
            e.body_text(),
            "send {\"token\", \"device_id\", \"serial\", \"csr_pem\"}",
        )
    })?;
    let now = posfleet_proto::now_ms();
    let enrolled = blocking(move || svc.enroll(&body, peer.ip(), now)).await?;
    // The registration is durable before the terminal is told it may connect.
    state
        .registry
        .flush()
        .await
        .map_err(|e| ApiError::internal("the registry commit", &e.to_string()))?;
    Ok(Json(enrolled))
}

async fn revoke_or_decommission(
    state: ApiState,
    principal: Option<Extension<Principal>>,
    peer: std::net::SocketAddr,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<RevokeRequest>, JsonRejection>,
    decommission: bool,
) -> Result<Json<RevocationView>, ApiError> {
    let svc = service(&state)?;
    let id = device_id(id)?;
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text(), REVOKE_HINT))?;
    check_text("reason", &body.reason, REVOKE_HINT)?;
    let actor = actor(principal);
    let now = posfleet_proto::now_ms();
    let view = blocking(move || {
        svc.revoke(
            &id,
            &body.reason,
            decommission,
            &actor,
            &peer.ip().to_string(),
            now,
        )
    })
    .await?;
    state
        .registry
        .flush()
        .await
        .map_err(|e| ApiError::internal("the registry commit", &e.to_string()))?;
    Ok(Json(view))
}

pub(crate) async fn revoke(
    State(state): State<ApiState>,
    principal: Option<Extension<Principal>>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<Json<RevocationView>, ApiError> {
    revoke_or_decommission(state, principal, peer, id, body, false).await
}

pub(crate) async fn decommission(
    State(state): State<ApiState>,
    principal: Option<Extension<Principal>>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<Json<RevocationView>, ApiError> {
    revoke_or_decommission(state, principal, peer, id, body, true).await
}

/// `?format=pem|der`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct CrlQuery {
    #[serde(default)]
    format: Option<String>,
}

pub(crate) async fn crl(
    State(state): State<ApiState>,
    Query(query): Query<CrlQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let svc = service(&state)?;
    let der = svc.crl();
    let wants_pem = query.format.as_deref() == Some("pem")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/x-pem-file"));
    if wants_pem {
        let pem = crate::enrolment::crl_pem(&der);
        return Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response());
    }
    Ok((
        [(header::CONTENT_TYPE, "application/pkix-crl")],
        der.as_ref().clone(),
    )
        .into_response())
}
