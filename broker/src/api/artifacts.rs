//! `/api/v1/artifacts` (ADR 0008): upload (`POST`, raw bytes, signature in headers), list,
//! detail, delete. The store and the checks live in `crate::artifacts`.
//!
//! `POST /api/v1/artifacts?version=V[&component=C][&min_version=M]` with headers
//! `x-posfleet-signature` (base64 Ed25519 over `RELEASE_TAG || sha256`), `x-posfleet-key-id`
//! and optionally `x-posfleet-sha256` (hex, from the `.sig` file: refused when the bytes
//! differ). 201 with the [`ArtifactView`] when stored, 200 when the same bytes and metadata
//! were already stored, 409 for the same bytes with other metadata (or a component version
//! that already names other bytes), 413 beyond the size limit, 422 for a bad signature, an
//! untrusted key, a digest mismatch, an empty file or invalid fields, 503 when no release key
//! is installed. Nothing is kept after a refusal.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use super::{ApiError, ApiState};
use crate::artifacts::validate::{
    DEFAULT_COMPONENT, check_component, check_min_version, check_version, parse_id,
};
use crate::artifacts::{
    ArtifactCatalog, ArtifactMeta, Artifacts, DeleteError, InsertError, Inserted, UploadError,
    UploadRequest,
};
use crate::views::{ArtifactDeleted, ArtifactList, ArtifactView, FieldMessage};

/// Header with the base64 release signature.
pub const SIGNATURE_HEADER: &str = "x-posfleet-signature";
/// Header with the release key id.
pub const KEY_ID_HEADER: &str = "x-posfleet-key-id";
/// Header with the SHA-256 (hex) the signer computed.
pub const SHA256_HEADER: &str = "x-posfleet-sha256";

/// Who uploads (there is one admin token).
use super::Actor;

/// Query of an upload.
#[derive(Debug, Deserialize)]
pub(crate) struct UploadQuery {
    version: Option<String>,
    component: Option<String>,
    min_version: Option<String>,
}

fn service(state: &ApiState) -> Result<&Arc<Artifacts>, ApiError> {
    state.artifacts.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server has no artifact store",
            Some("software updates are served by `posfleet-broker serve`"),
        )
    })
}

/// The API view of an artifact.
pub(crate) fn view(artifacts: &Artifacts, meta: ArtifactMeta) -> ArtifactView {
    ArtifactView {
        download_url: artifacts.download_url(&meta.id),
        sha256: meta.id.clone(),
        id: meta.id,
        version: meta.version,
        component: meta.component,
        size_bytes: meta.size_bytes,
        release_signature: BASE64.encode(&meta.release_signature),
        release_key_id: meta.release_key_id,
        min_version: meta.min_version,
        uploaded_at_ms: meta.uploaded_at_ms,
        uploaded_by: meta.uploaded_by,
    }
}

fn not_found(id: &str) -> ApiError {
    // The id is echoed only when it is a well-formed one.
    let shown = if parse_id(id).is_some() {
        id
    } else {
        "(malformed id)"
    };
    ApiError::not_found(
        format!("no artifact {shown}"),
        "artifact ids are the SHA-256 (64 lowercase hex digits); `posctl artifact list` shows them",
    )
}

fn store_failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal("the artifact store", &e.to_string())
}

/// Runs a blocking store call off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("the artifact store", &e.to_string()))
}

/// `GET /api/v1/artifacts`.
pub(crate) async fn list(State(state): State<ApiState>) -> Result<Json<ArtifactList>, ApiError> {
    let artifacts = Arc::clone(service(&state)?);
    let store = Arc::clone(artifacts.store());
    let items = blocking(move || store.list())
        .await?
        .map_err(store_failed)?;
    Ok(Json(ArtifactList {
        items: items.into_iter().map(|m| view(&artifacts, m)).collect(),
    }))
}

/// `GET /api/v1/artifacts/{id}`.
pub(crate) async fn detail(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ArtifactView>, ApiError> {
    let artifacts = Arc::clone(service(&state)?);
    if parse_id(&id).is_none() {
        return Err(not_found(&id));
    }
    let store = Arc::clone(artifacts.store());
    let key = id.clone();
    match blocking(move || store.get(&key))
        .await?
        .map_err(store_failed)?
    {
        Some(meta) => Ok(Json(view(&artifacts, meta))),
        None => Err(not_found(&id)),
    }
}

/// `DELETE /api/v1/artifacts/{id}`.
pub(crate) async fn delete(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ArtifactDeleted>, ApiError> {
    let artifacts = Arc::clone(service(&state)?);
    if parse_id(&id).is_none() {
        return Err(not_found(&id));
    }
    let key = id.clone();
    let service = Arc::clone(&artifacts);
    let result = blocking(move || service.store().delete(&key, service.users())).await?;
    match result {
        Ok(Some(_)) => Ok(Json(ArtifactDeleted { id, deleted: true })),
        Ok(None) => Err(not_found(&id)),
        Err(e @ DeleteError::InUse { .. }) => Err(ApiError::conflict(
            e.to_string(),
            "abort or wait for those rollouts to finish, then delete it",
        )),
        Err(DeleteError::Store(e)) => Err(store_failed(e)),
    }
}

/// `POST /api/v1/artifacts`.
pub(crate) async fn upload(
    State(state): State<ApiState>,
    Actor(author): Actor,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<ArtifactView>), ApiError> {
    let artifacts = Arc::clone(service(&state)?);
    let request = upload_request(query, &headers, author)?;
    match artifacts.upload(request, body).await {
        Ok(Inserted::Created(meta)) => Ok((StatusCode::CREATED, Json(view(&artifacts, meta)))),
        Ok(Inserted::Existing(meta)) => Ok((StatusCode::OK, Json(view(&artifacts, meta)))),
        Err(e) => Err(upload_error(e)),
    }
}

/// Validates the query and headers (every invalid field reported at once) before any byte
/// of the body is read.
fn upload_request(
    query: UploadQuery,
    headers: &HeaderMap,
    author: String,
) -> Result<UploadRequest, ApiError> {
    let mut fields = Vec::new();
    let mut bad = |key: &str, message: String| {
        fields.push(FieldMessage {
            key: key.to_owned(),
            message,
        })
    };
    let version = query.version.unwrap_or_default();
    if let Err(m) = check_version(&version) {
        bad("version", m);
    }
    let component = query
        .component
        .unwrap_or_else(|| DEFAULT_COMPONENT.to_owned());
    if let Err(m) = check_component(&component) {
        bad("component", m);
    }
    if let Some(min) = &query.min_version {
        if let Err(m) = check_min_version(min) {
            bad("min_version", m);
        }
    }
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let signature = match text(SIGNATURE_HEADER).map(|s| BASE64.decode(s)) {
        Some(Ok(sig)) if sig.len() == 64 => sig,
        Some(Ok(_)) => {
            bad(
                SIGNATURE_HEADER,
                "must be a 64-byte Ed25519 signature".into(),
            );
            Vec::new()
        }
        Some(Err(_)) => {
            bad(SIGNATURE_HEADER, "must be base64".into());
            Vec::new()
        }
        None => {
            bad(SIGNATURE_HEADER, "missing".into());
            Vec::new()
        }
    };
    let key_id = match text(KEY_ID_HEADER) {
        Some(k) if !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_hexdigit()) => {
            k.to_owned()
        }
        Some(_) => {
            bad(
                KEY_ID_HEADER,
                "must be a release key id (hex digits)".into(),
            );
            String::new()
        }
        None => {
            bad(KEY_ID_HEADER, "missing".into());
            String::new()
        }
    };
    let expected_sha256 = match text(SHA256_HEADER) {
        None => None,
        Some(s) => match parse_id(&s.to_ascii_lowercase()) {
            Some(sha) => Some(sha),
            None => {
                bad(SHA256_HEADER, "must be 64 hex digits".into());
                None
            }
        },
    };
    if !fields.is_empty() {
        return Err(ApiError::invalid_fields(
            "the upload is not valid; nothing was stored",
            "posctl artifact upload FILE --version V --signature FILE.sig sets everything; \
             versions are 1-64 of [0-9A-Za-z.+-]",
            fields,
        ));
    }
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok(UploadRequest {
        version,
        component,
        min_version: query.min_version,
        key_id,
        signature,
        expected_sha256,
        content_length,
        uploaded_by: author,
    })
}

fn upload_error(e: UploadError) -> ApiError {
    let message = e.to_string();
    match e {
        UploadError::NoReleaseKeys { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            message,
            Some(
                "create a release key offline with `posctl pki release-key --out DIR`, copy \
                 DIR/release.pub to DATA/pki/release.pub on the controller, and restart it",
            ),
        ),
        UploadError::TooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            message,
            Some("raise --max-artifact-bytes on the controller if this artifact is genuine"),
        ),
        UploadError::UnknownKey { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            message,
            Some(
                "sign with a key whose public half is in DATA/pki/release.pub, or add that \
                 public key there and restart the controller",
            ),
        ),
        UploadError::Empty | UploadError::DigestMismatch { .. } | UploadError::BadSignature => {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                message,
                Some("sign the exact file you upload: posctl artifact sign --key release.key FILE"),
            )
        }
        UploadError::BadHeader { .. } | UploadError::Body(_) => {
            ApiError::bad_request(message, "retry the upload with posctl artifact upload")
        }
        UploadError::Idle(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            message,
            Some("check the network between the client and the controller, then retry"),
        ),
        UploadError::Insert(InsertError::Conflict(detail)) => ApiError::conflict(
            detail,
            "nothing was stored; delete the old artifact first or use another version",
        ),
        UploadError::Io { .. } | UploadError::Insert(InsertError::Store(_)) => {
            ApiError::internal("storing the upload", &message)
        }
    }
}
