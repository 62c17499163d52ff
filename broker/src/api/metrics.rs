//! `GET /metrics`: the Prometheus exposition of every metric of the process.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::ApiState;

/// Content type of the Prometheus text format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

pub(crate) async fn render(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.render(),
    )
}
