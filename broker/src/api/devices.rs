//! `GET /api/v1/devices` and `GET /api/v1/devices/{id}`.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use posfleet_proto::DeviceId;

use super::ApiState;
use super::error::ApiError;
use crate::views::{DeviceDetail, DeviceList};

/// Hint for a malformed device id.
pub(crate) const ID_HINT: &str =
    "device ids are 1-64 characters: a letter or digit, then letters, digits, '.', '_' or '-'";

/// Every device, sorted by id.
pub(crate) async fn list(State(state): State<ApiState>) -> Json<DeviceList> {
    Json(DeviceList {
        devices: state.registry.list(),
    })
}

/// One device with its last heartbeat and recent telemetry.
pub(crate) async fn detail(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text(), ID_HINT))?;
    let id = DeviceId::new(id).map_err(|e| ApiError::bad_request(e.to_string(), ID_HINT))?;
    state.registry.detail(&id).map(Json).ok_or_else(|| {
        ApiError::not_found(
            format!("no device {id}"),
            "a device appears once it has connected with its fleet certificate; \
             list known devices with GET /api/v1/devices",
        )
    })
}
