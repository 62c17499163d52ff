//! `GET /v1/config`: the configuration the terminal has applied (version 0 and `{}` before
//! the first push).

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::ApiState;
use crate::state::ConfigDocument;

/// The config body.
#[derive(Debug, Serialize)]
pub(crate) struct ConfigBody {
    version: u64,
    document: ConfigDocument,
}

pub(crate) async fn get(State(state): State<ApiState>) -> Json<ConfigBody> {
    let status = state.agent.live().get();
    Json(ConfigBody {
        version: status.config_version,
        document: (*status.config).clone(),
    })
}
