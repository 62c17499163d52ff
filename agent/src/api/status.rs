//! `GET /v1/status`: what the payment application may want to show or check.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::ApiState;
use crate::outbox::OutboxStatus;

/// The status body.
#[derive(Debug, Serialize)]
pub(crate) struct StatusBody {
    device_id: String,
    /// Whether the MQTT connection to the controller is up.
    connected: bool,
    /// A locked terminal refuses transactions (423).
    locked: bool,
    /// The applied configuration version (0 until config pushes exist).
    config_version: u64,
    outbox: OutboxStatus,
}

pub(crate) async fn get(State(state): State<ApiState>) -> Json<StatusBody> {
    let agent = &state.agent;
    Json(StatusBody {
        device_id: agent.device_id().to_string(),
        connected: agent.is_connected(),
        locked: agent.intake().lock_state().is_locked(),
        config_version: 0,
        outbox: agent.outbox().status().await,
    })
}
