//! `POST /device/v1/renew {csr_pem}` and `POST /device/v1/renew/confirm` on the device
//! endpoint (mutual TLS; `api::serve_site` puts the client certificate's identity and DER in
//! the request's extensions). The device id comes from the certificate, never from the body.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use posfleet_proto::pki::{CertFacts, Identity};

use super::{EnrolError, Enrolment};
use crate::api::{PeerAddr, PeerCertificate};
use crate::artifacts::PeerIdentity;
use crate::views::{ErrorBody, RenewConfirmed, RenewRequest};

/// The whole device endpoint (artifact downloads included) refuses a revoked or decommissioned
/// certificate with 403, like the MQTT edge refuses it at CONNECT.
pub fn refuse_revoked(enrolment: Arc<Enrolment>, router: Router) -> Router {
    router.layer(axum::middleware::from_fn_with_state(enrolment, standing))
}

async fn standing(
    State(enrolment): State<Arc<Enrolment>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let found = (
        request.extensions().get::<PeerIdentity>(),
        request.extensions().get::<PeerCertificate>(),
    );
    let (Some(identity), Some(cert)) = found else {
        return error(
            StatusCode::FORBIDDEN,
            "a client certificate is required".into(),
        );
    };
    let facts = match CertFacts::from_der(&cert.0) {
        Ok(facts) => facts,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("client certificate: {e}")),
    };
    match enrolment.revocations().check(&identity.0, &facts) {
        super::Standing::Good => next.run(request).await,
        refused => error(
            StatusCode::FORBIDDEN,
            format!("this certificate is {}", refused.reason()),
        ),
    }
}

/// The renewal routes, to merge into the device endpoint's router.
pub fn renew_router(enrolment: Arc<Enrolment>) -> Router {
    Router::new()
        .route("/device/v1/renew", post(renew))
        .route("/device/v1/renew/confirm", post(confirm))
        .with_state(enrolment)
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message,
            hint: None,
            fields: Vec::new(),
        }),
    )
        .into_response()
}

fn refused(e: EnrolError) -> Response {
    let status = match &e {
        EnrolError::BadRequest(_) | EnrolError::Csr(_) => StatusCode::BAD_REQUEST,
        EnrolError::Refused(_) | EnrolError::Token(_) => StatusCode::FORBIDDEN,
        EnrolError::Conflict(_) => StatusCode::CONFLICT,
        EnrolError::NotFound(_) => StatusCode::NOT_FOUND,
        EnrolError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        EnrolError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        EnrolError::Field { refusal, .. } => match refusal {
            super::Refusal::Invalid => StatusCode::BAD_REQUEST,
            super::Refusal::Token => StatusCode::FORBIDDEN,
            super::Refusal::Taken => StatusCode::CONFLICT,
        },
    };
    error(status, e.to_string())
}

/// The device and its certificate facts, or why not.
fn device(
    identity: &PeerIdentity,
    cert: &PeerCertificate,
) -> Result<(posfleet_proto::DeviceId, CertFacts), (StatusCode, String)> {
    let Identity::Device(id) = &identity.0 else {
        return Err((
            StatusCode::FORBIDDEN,
            "only devices renew their certificate".into(),
        ));
    };
    let facts = CertFacts::from_der(&cert.0)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("client certificate: {e}")))?;
    Ok((id.clone(), facts))
}

async fn renew(
    State(enrolment): State<Arc<Enrolment>>,
    Extension(identity): Extension<PeerIdentity>,
    Extension(cert): Extension<PeerCertificate>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    body: Result<Json<RenewRequest>, JsonRejection>,
) -> Response {
    let (id, facts) = match device(&identity, &cert) {
        Ok(d) => d,
        Err((status, message)) => return error(status, message),
    };
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let now = posfleet_proto::now_ms();
    // CA signing and a durable write: off the runtime.
    let result = tokio::task::spawn_blocking(move || {
        enrolment.renew(&id, &facts, &body.csr_pem, &peer.ip().to_string(), now)
    })
    .await;
    match result {
        Ok(Ok(renewed)) => Json(renewed).into_response(),
        Ok(Err(e)) => refused(e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("renewal task: {e}"),
        ),
    }
}

async fn confirm(
    State(enrolment): State<Arc<Enrolment>>,
    Extension(identity): Extension<PeerIdentity>,
    Extension(cert): Extension<PeerCertificate>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
) -> Response {
    let (id, facts) = match device(&identity, &cert) {
        Ok(d) => d,
        Err((status, message)) => return error(status, message),
    };
    let now = posfleet_proto::now_ms();
    let result = tokio::task::spawn_blocking(move || {
        enrolment.confirm_renewal(&id, &facts, &peer.ip().to_string(), now)
    })
    .await;
    match result {
        Ok(Ok(revoked_serial)) => Json(RenewConfirmed { revoked_serial }).into_response(),
        Ok(Err(e)) => refused(e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("confirmation task: {e}"),
        ),
    }
}
