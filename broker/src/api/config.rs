//! Fleet configuration (ADR 0007): layers, history, diff, schema, and a device's effective
//! configuration.
//!
//! A layer has one path per kind, so each segment is validated on its own and no wildcard
//! route is needed:
//!
//! ```text
//! GET                         /api/v1/config/layers                  every layer (summary)
//! GET | PATCH | PUT | DELETE  /api/v1/config/fleet
//! GET | PATCH | PUT | DELETE  /api/v1/config/groups/{name}
//! GET | PATCH | PUT | DELETE  /api/v1/config/devices/{id}
//! GET                         /api/v1/config/history?scope=&limit=&before=
//! GET                         /api/v1/config/diff?scope=&from=&to=
//! GET                         /api/v1/config/schema
//! GET                         /api/v1/devices/{id}/config            effective configuration
//! ```
//!
//! `PATCH {"set": {key: value}, "unset": [key], "comment": "..."}`, `PUT {"document": {...},
//! "comment": "..."}`, `DELETE ?comment=...`; each answers the layer (`deleted: true` after a
//! DELETE). Invalid keys or values are a 422 whose `fields` name each key and what is wrong;
//! nothing is stored then. Changes are durable before the answer. The author is "admin"
//! until operator accounts exist.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use posfleet_proto::DeviceId;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::ApiState;
use super::devices::ID_HINT;
use super::error::ApiError;
use crate::fleetconfig::{
    ConfigError, ConfigStore, DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT, SCOPE_HINT, Scope,
};
use crate::views::{
    ConfigDiffView, ConfigHistoryPage, ConfigLayerList, ConfigLayerView, ConfigSchemaView,
    EffectiveConfigView,
};

/// Largest request body of a layer change; the store's own limit (64 KiB of document) is
/// checked with field messages, this only stops absurd uploads early.
pub(crate) const MAX_BODY_BYTES: usize = 256 * 1024;

/// Who changes configuration through the API until operator accounts exist.
use super::Actor;

const SCHEMA_HINT: &str = "GET /api/v1/config/schema (or `posctl config schema`) lists the keys \
     and their rules; your own keys go under custom.";
const HISTORY_HINT: &str = "parameters: scope=fleet|group/<name>|device/<id>, limit=1..1000, \
     before=<version> (the next_before of the previous page)";
const DIFF_HINT: &str = "parameters: from=<version> (required), to=<version> (default: latest), \
     scope=fleet|group/<name>|device/<id> (default: every layer)";

/// Body of `PATCH`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchBody {
    #[serde(default)]
    set: Map<String, Value>,
    #[serde(default)]
    unset: Vec<String>,
    #[serde(default)]
    comment: String,
}

/// Body of `PUT`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutBody {
    document: Map<String, Value>,
    #[serde(default)]
    comment: String,
}

/// Query of `DELETE`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteParams {
    #[serde(default)]
    comment: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryParams {
    scope: Option<String>,
    limit: Option<String>,
    before: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DiffParams {
    scope: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

pub(crate) async fn list_layers(State(state): State<ApiState>) -> Json<ConfigLayerList> {
    Json(state.config.list())
}

pub(crate) async fn schema() -> Json<ConfigSchemaView> {
    Json(crate::fleetconfig::schema::view())
}

/// The handlers of one layer kind: GET, PATCH, PUT, DELETE.
macro_rules! layer_handlers {
    ($get:ident, $patch:ident, $put:ident, $delete:ident, $scope:expr, $($path:ident)?) => {
        pub(crate) async fn $get(
            State(state): State<ApiState>,
            $($path: Result<Path<String>, PathRejection>,)?
        ) -> Result<Json<ConfigLayerView>, ApiError> {
            let scope = $scope($($path)?)?;
            state.config.get(&scope).map(Json).map_err(store_error)
        }

        pub(crate) async fn $patch(
            State(state): State<ApiState>,
            Actor(author): Actor,
            $($path: Result<Path<String>, PathRejection>,)?
            body: Result<Json<PatchBody>, JsonRejection>,
        ) -> Result<Json<ConfigLayerView>, ApiError> {
            let scope = $scope($($path)?)?;
            new_layer_name(&state, &scope)?;
            let Json(body) = body.map_err(json_error)?;
            blocking(state.config, move |store| {
                store.set(&scope, body.set, &body.unset, &author, &body.comment)
            })
            .await
        }

        pub(crate) async fn $put(
            State(state): State<ApiState>,
            Actor(author): Actor,
            $($path: Result<Path<String>, PathRejection>,)?
            body: Result<Json<PutBody>, JsonRejection>,
        ) -> Result<Json<ConfigLayerView>, ApiError> {
            let scope = $scope($($path)?)?;
            new_layer_name(&state, &scope)?;
            let Json(body) = body.map_err(json_error)?;
            blocking(state.config, move |store| {
                store.replace(&scope, body.document, &author, &body.comment)
            })
            .await
        }

        pub(crate) async fn $delete(
            State(state): State<ApiState>,
            Actor(author): Actor,
            $($path: Result<Path<String>, PathRejection>,)?
            params: Result<Query<DeleteParams>, QueryRejection>,
        ) -> Result<Json<ConfigLayerView>, ApiError> {
            let scope = $scope($($path)?)?;
            let Query(params) = params
                .map_err(|e| ApiError::bad_request(e.body_text(), "parameters: comment=<text>"))?;
            blocking(state.config, move |store| {
                store.delete_layer(&scope, &author, &params.comment)
            })
            .await
        }
    };
}

/// A group layer is created or changed only under a name that is clean text, a device layer
/// only for a registered device or an id that does not look like a card number (a new id
/// entering here; a terminal enrolled before that check keeps its layer). Existing layers can
/// still be read and deleted.
fn new_layer_name(state: &ApiState, scope: &Scope) -> Result<(), ApiError> {
    match scope {
        Scope::Group(name) => super::error::check_text("group", name, SCOPE_HINT),
        Scope::Device(id) if state.registry.lifecycle(id).is_none() => {
            DeviceId::new_for_issue(id.as_str())
                .map(drop)
                .map_err(|e| ApiError::field("device_id", e.to_string(), ID_HINT))
        }
        _ => Ok(()),
    }
}

fn fleet_scope() -> Result<Scope, ApiError> {
    Ok(Scope::Fleet)
}

fn group_scope(name: Result<Path<String>, PathRejection>) -> Result<Scope, ApiError> {
    let Path(name) = name.map_err(|e| ApiError::bad_request(e.body_text(), SCOPE_HINT))?;
    Scope::group(name).map_err(|e| ApiError::bad_request(format!("group: {e}"), SCOPE_HINT))
}

fn device_scope(id: Result<Path<String>, PathRejection>) -> Result<Scope, ApiError> {
    device_id(id).map(Scope::Device)
}

fn device_id(id: Result<Path<String>, PathRejection>) -> Result<DeviceId, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text(), ID_HINT))?;
    DeviceId::new(id).map_err(|e| ApiError::bad_request(e.to_string(), ID_HINT))
}

layer_handlers!(get_fleet, patch_fleet, put_fleet, delete_fleet, fleet_scope,);
layer_handlers!(
    get_group,
    patch_group,
    put_group,
    delete_group,
    group_scope,
    name
);
layer_handlers!(
    get_device,
    patch_device,
    put_device,
    delete_device,
    device_scope,
    id
);

pub(crate) async fn history(
    State(state): State<ApiState>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Json<ConfigHistoryPage>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text(), HISTORY_HINT))?;
    let scope = parse_scope(p.scope.as_deref())?;
    let limit = match p.limit.as_deref() {
        None => DEFAULT_HISTORY_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_HISTORY_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    format!("limit must be 1..={MAX_HISTORY_LIMIT}"),
                    HISTORY_HINT,
                )
            })?,
    };
    let before = parse_version("before", p.before.as_deref(), HISTORY_HINT)?;
    // Reads history entries from sled: off the runtime.
    blocking(state.config, move |store| {
        store.history(scope.as_ref(), limit, before)
    })
    .await
}

pub(crate) async fn diff(
    State(state): State<ApiState>,
    params: Result<Query<DiffParams>, QueryRejection>,
) -> Result<Json<ConfigDiffView>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text(), DIFF_HINT))?;
    let scope = parse_scope(p.scope.as_deref())?;
    let from = parse_version("from", p.from.as_deref(), DIFF_HINT)?
        .ok_or_else(|| ApiError::bad_request("from is required", DIFF_HINT))?;
    let to = parse_version("to", p.to.as_deref(), DIFF_HINT)?;
    blocking(state.config, move |store| {
        let to = to.unwrap_or_else(|| store.version());
        store.diff(scope.as_ref(), from, to)
    })
    .await
}

/// The effective configuration of a device, with its registry groups. Served for any valid
/// id, known to the registry or not: configuration may be prepared before a terminal's first
/// connection.
pub(crate) async fn device_config(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<EffectiveConfigView>, ApiError> {
    let id = device_id(id)?;
    let groups: BTreeSet<String> = state.registry.groups(&id).unwrap_or_default();
    let (effective, sources) = state.config.effective_with_sources(&id, &groups);
    Ok(Json(EffectiveConfigView {
        device: id.to_string(),
        version: effective.version,
        groups: groups.into_iter().collect(),
        document: effective.document,
        sources: sources
            .into_iter()
            .map(|(key, scope)| (key, scope.to_string()))
            .collect(),
    }))
}

fn parse_scope(scope: Option<&str>) -> Result<Option<Scope>, ApiError> {
    scope
        .filter(|s| !s.is_empty())
        .map(Scope::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("scope: {e}"), SCOPE_HINT))
}

fn parse_version(name: &str, value: Option<&str>, hint: &str) -> Result<Option<u64>, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("{name} must be a version number"), hint)
            })
        })
        .transpose()
}

/// Runs a store call that may touch the disk (changes flush and fsync) off the runtime.
async fn blocking<T: Send + 'static>(
    store: Arc<ConfigStore>,
    f: impl FnOnce(&ConfigStore) -> Result<T, ConfigError> + Send + 'static,
) -> Result<Json<T>, ApiError> {
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| internal(&e.to_string()))?
        .map(Json)
        .map_err(store_error)
}

fn json_error(e: JsonRejection) -> ApiError {
    ApiError::new(
        e.status(),
        e.body_text(),
        Some(
            "send JSON: PATCH {\"set\": {\"key\": value}, \"unset\": [\"key\"], \"comment\": \
             \"...\"}, PUT {\"document\": {...}, \"comment\": \"...\"}",
        ),
    )
}

fn store_error(e: ConfigError) -> ApiError {
    match e {
        ConfigError::Invalid(fields) => ApiError::invalid_fields(
            format!(
                "invalid configuration: {} problem(s); nothing was stored",
                fields.len()
            ),
            SCHEMA_HINT,
            fields,
        ),
        ConfigError::NotFound { scope } => ApiError::not_found(
            format!(
                "there is no {} layer",
                posfleet_proto::text::shown(&scope.to_string())
            ),
            "GET /api/v1/config/layers lists the layers; PATCH or PUT creates one",
        ),
        e @ (ConfigError::BadRange(_) | ConfigError::Pruned { .. }) => {
            ApiError::bad_request(e.to_string(), DIFF_HINT)
        }
        other => internal(&other.to_string()),
    }
}

fn internal(detail: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the configuration store failed: {detail}"),
        Some("check the controller's log; retry later"),
    )
}
