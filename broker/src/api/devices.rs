//! `GET /api/v1/devices[?group=G&label=k=v]`, `GET /api/v1/devices/{id}`,
//! `GET /api/v1/devices/{id}/desired`, `PUT /api/v1/devices/{id}/groups` and
//! `PUT /api/v1/devices/{id}/labels`.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use posfleet_proto::DeviceId;
use serde_json::Value;

use super::Actor;
use super::ApiState;
use super::error::{ApiError, check_text};
use crate::commands::{Selector, valid_name};
use crate::views::{DesiredView, DeviceDetail, DeviceList, GroupsBody, LabelsBody};

/// Hint for a malformed device id.
pub(crate) const ID_HINT: &str =
    "device ids are 1-64 characters: a letter or digit, then letters, digits, '.', '_' or '-'";
/// Hint for group and label names.
pub(crate) const NAME_HINT: &str = "group names, label keys and label values are 1-64 characters: letters, digits, '.', '_' or '-'";
const LIST_HINT: &str = "parameters: group=<name>, label=<key>=<value> (repeatable; all must \
                         match), all=true (include decommissioned devices)";
/// Most groups or labels on one device.
const MAX_PER_DEVICE: usize = 64;

/// Every device, sorted by id; `group` and `label` filters combine.
pub(crate) async fn list(
    State(state): State<ApiState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<DeviceList>, ApiError> {
    let Query(pairs) = query.map_err(|e| ApiError::bad_request(e.body_text(), LIST_HINT))?;
    let mut selectors = Vec::new();
    let mut labels = BTreeMap::new();
    let mut all = false;
    for (name, value) in pairs {
        match name.as_str() {
            "all" => {
                all = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(ApiError::field("all", "true or false", LIST_HINT)),
                };
            }
            "group" => {
                if !valid_name(&value) {
                    return Err(ApiError::field(
                        "group",
                        "not a valid group name",
                        NAME_HINT,
                    ));
                }
                selectors.push(Selector::Group(value));
            }
            "label" => {
                let (k, v) =
                    parse_label(&value).map_err(|e| ApiError::field("label", e, NAME_HINT))?;
                labels.insert(k, v);
            }
            other => {
                return Err(ApiError::field(other, "unknown parameter", LIST_HINT));
            }
        }
    }
    if !labels.is_empty() {
        selectors.push(Selector::Labels(labels));
    }
    let mut devices = state.registry.list();
    if !all {
        // Retired terminals stay on record but out of the everyday list.
        devices.retain(|d| d.lifecycle != crate::views::Lifecycle::Decommissioned);
    }
    if !selectors.is_empty() {
        let keep: BTreeSet<DeviceId> = state
            .registry
            .matching(|r| selectors.iter().all(|s| s.matches(r)))
            .into_iter()
            .collect();
        devices.retain(|d| keep.iter().any(|k| k.as_str() == d.id));
    }
    Ok(Json(DeviceList { devices }))
}

/// `key=value`, both valid names.
pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    if !valid_name(k) || !valid_name(v) {
        return Err(format!("{s:?}: key and value must be valid names"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// One device with its last heartbeat, recent telemetry, desired and reported state.
pub(crate) async fn detail(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let id = device_id(id)?;
    let mut detail = state.registry.detail(&id).ok_or_else(|| unknown(&id))?;
    detail.desired = Some(state.commands.desired(&id));
    Ok(Json(detail))
}

/// What the controller wants the device to be.
pub(crate) async fn desired(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DesiredView>, ApiError> {
    let id = device_id(id)?;
    if state.registry.groups(&id).is_none() {
        return Err(unknown(&id));
    }
    Ok(Json(state.commands.desired(&id)))
}

/// Replaces the device's groups; durable before the answer. Its device configuration layer
/// records the membership change, so its effective configuration version rises.
pub(crate) async fn set_groups(
    State(state): State<ApiState>,
    Actor(author): Actor,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<GroupsBody>, ApiError> {
    const HINT: &str = "send {\"groups\": [\"name\", ...]}";
    let id = device_id(id)?;
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text(), HINT))?;
    let list = only_member(&body, "groups", "array", HINT)?
        .as_array()
        .ok_or_else(|| ApiError::field("groups", "expected an array", HINT))?;
    at_most(list.len(), "groups", HINT)?;
    let mut groups = BTreeSet::new();
    for (i, g) in list.iter().enumerate() {
        match g.as_str() {
            Some(name) if valid_name(name) => {
                check_text(format!("groups[{i}]"), name, NAME_HINT)?;
                groups.insert(name.to_owned());
            }
            _ => {
                return Err(ApiError::field(
                    format!("groups[{i}]"),
                    "not a valid group name",
                    NAME_HINT,
                ));
            }
        }
    }
    let before = state.registry.groups(&id).ok_or_else(|| unknown(&id))?;
    if !state.registry.set_groups(&id, groups.clone()) {
        return Err(unknown(&id));
    }
    state
        .registry
        .flush()
        .await
        .map_err(|e| ApiError::internal("the registry commit", &e.to_string()))?;
    if before != groups {
        let config = state.commands.config().clone();
        let device = id.clone();
        // The configuration store writes durably: off the runtime.
        tokio::task::spawn_blocking(move || config.touch_membership(&device, &author))
            .await
            .map_err(|e| ApiError::internal("the membership update", &e.to_string()))?
            .map_err(|e| ApiError::internal("the membership update", &e.to_string()))?;
    }
    Ok(Json(GroupsBody { groups }))
}

/// Replaces the device's labels; durable before the answer.
pub(crate) async fn set_labels(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<LabelsBody>, ApiError> {
    const HINT: &str = "send {\"labels\": {\"key\": \"value\", ...}}";
    let id = device_id(id)?;
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text(), HINT))?;
    let map = only_member(&body, "labels", "object", HINT)?
        .as_object()
        .ok_or_else(|| ApiError::field("labels", "expected an object", HINT))?;
    at_most(map.len(), "labels", HINT)?;
    let mut labels = BTreeMap::new();
    for (k, v) in map {
        // The key first: a field name must never carry a card number.
        check_text("labels", k, NAME_HINT)?;
        let field = format!("labels.{k}");
        if !valid_name(k) {
            return Err(ApiError::field(field, "not a valid label key", NAME_HINT));
        }
        match v.as_str() {
            Some(v) if valid_name(v) => {
                check_text(&field, v, NAME_HINT)?;
                labels.insert(k.clone(), v.to_owned());
            }
            _ => return Err(ApiError::field(field, "not a valid label value", NAME_HINT)),
        }
    }
    if !state.registry.set_labels(&id, labels.clone()) {
        return Err(unknown(&id));
    }
    state
        .registry
        .flush()
        .await
        .map_err(|e| ApiError::internal("the registry commit", &e.to_string()))?;
    Ok(Json(LabelsBody { labels }))
}

pub(crate) fn device_id(id: Result<Path<String>, PathRejection>) -> Result<DeviceId, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text(), ID_HINT))?;
    DeviceId::new(id).map_err(|e| ApiError::bad_request(e.to_string(), ID_HINT))
}

pub(crate) fn unknown(id: &DeviceId) -> ApiError {
    ApiError::not_found(
        format!("no device {}", posfleet_proto::text::shown(id.as_str())),
        "a device appears once it has connected with its fleet certificate; \
         list known devices with GET /api/v1/devices",
    )
}

/// The value of `name` in a body that must be an object with only that member.
fn only_member<'a>(
    body: &'a Value,
    name: &str,
    kind: &str,
    hint: &str,
) -> Result<&'a Value, ApiError> {
    body.as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get(name))
        .ok_or_else(|| {
            ApiError::field(
                name,
                format!("expected an object with only a {name} {kind}"),
                hint,
            )
        })
}

/// Refuses more than [`MAX_PER_DEVICE`] entries of `name`.
fn at_most(len: usize, name: &str, hint: &str) -> Result<(), ApiError> {
    if len > MAX_PER_DEVICE {
        return Err(ApiError::field(
            name,
            format!("at most {MAX_PER_DEVICE} {name}"),
            hint,
        ));
    }
    Ok(())
}
