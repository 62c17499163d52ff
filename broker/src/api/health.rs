//! `GET /healthz`: liveness for load balancers and supervisors (no authentication).

use axum::Json;
use serde::Serialize;

/// Body of `/healthz`.
#[derive(Debug, Serialize)]
pub(crate) struct Health {
    status: &'static str,
}

pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}
