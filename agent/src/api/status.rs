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
    /// Why (`offline_lease`, `wiped`, or the operator's reason); empty when unlocked.
    lock_reason: String,
    /// Generation of the last lock/unlock applied (0: none).
    lock_generation: u64,
    /// The applied configuration version (0: none yet).
    config_version: u64,
    outbox: OutboxStatus,
}

pub(crate) async fn get(State(state): State<ApiState>) -> Json<StatusBody> {
    let agent = &state.agent;
    let live = agent.live().get();
    Json(StatusBody {
        device_id: agent.device_id().to_string(),
        connected: agent.is_connected(),
        locked: live.locked,
        lock_reason: live.lock_reason,
        lock_generation: live.lock_generation,
        config_version: live.config_version,
        outbox: agent.outbox().status().await,
    })
}
