//! `POST /api/v1/commands` (create, one command per selected device),
//! `GET /api/v1/commands` (filtered, paginated, newest first), `GET /api/v1/commands/{id}`,
//! `POST /api/v1/commands/{id}/cancel` and `GET /api/v1/commands/{id}/logs`.
//!
//! A refused request changes nothing: everything is validated and the target resolved
//! before the command plane is asked, and the plane creates all commands of a request in
//! one durable commit (or none).

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use posfleet_proto::DeviceId;
use posfleet_proto::text::LIST_SEPARATOR;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::ApiState;
use super::approvals::LockGate;
use super::audit::AuditNote;
use super::error::{ApiError, check_text};
use crate::commands::{
    Action, CancelError, CommandQuery, CreateError, CreateRequest, DEFAULT_LIMIT, ListError,
    MAX_LIMIT, MAX_TTL, Selector, log_path, valid_name,
};
use crate::views::{CommandBody, CommandPage, CommandState, CommandView, CommandsCreated};

const CREATE_HINT: &str = "send {\"kind\": \"lock|unlock|reboot|wipe|collect_logs\", \"target\": \
     {\"devices\": [\"T-1\"]} | {\"group\": \"G\"} | {\"labels\": {\"k\": \"v\"}}, \"reason\": \
     \"...\" (lock/unlock), \"force\": bool (wipe), \"since_ms\", \"max_bytes\" (collect_logs), \
     \"ttl_s\"}";
const QUERY_HINT: &str = "parameters: device=<id>, status=queued|delivered|in_progress|succeeded|\
     failed|rejected|expired|cancelled, kind=<kind>, limit=1..1000, cursor=<next_cursor>";
const ID_HINT: &str = "command ids are what POST /api/v1/commands returned; list them with \
     GET /api/v1/commands";
/// Longest lock/unlock reason, in characters.
pub(crate) const MAX_REASON_CHARS: usize = 200;
/// Devices one request may target at most.
const MAX_TARGETS: usize = 50_000;
/// Default and largest log upload.
const DEFAULT_MAX_BYTES: u32 = 1024 * 1024;
const MAX_MAX_BYTES: u32 = 16 * 1024 * 1024;
const KINDS: [&str; 5] = ["lock", "unlock", "reboot", "wipe", "collect_logs"];
/// Kinds only the controller issues (reconciler, rollouts): listed, never created here.
const ISSUED_KINDS: [&str; 3] = ["config_push", "software_update", "rollback_update"];

pub(crate) async fn create(
    State(state): State<ApiState>,
    principal: Option<axum::Extension<crate::accounts::Principal>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text(), CREATE_HINT))?;
    let (action, selector, ttl) = parse_create(&body)?;
    let principal = principal.map_or_else(crate::accounts::Principal::bootstrap_admin, |p| p.0);
    // The route needs operator; a wipe destroys the terminal's keys and data: admin only.
    if matches!(action, Action::Wipe { .. }) && !principal.role.allows(crate::accounts::Role::Admin)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "a wipe needs the admin role; {} has {}",
                principal.name,
                principal.role.name()
            ),
            Some("ask an admin to wipe the terminal"),
        ));
    }
    let devices = resolve(&state, &selector)?;
    let kind = body.get("kind").and_then(Value::as_str).unwrap_or_default();
    if state.approval_policy.always(kind) {
        return super::approvals::request(&state, &principal, kind, body.clone(), &devices).await;
    }
    // Locks add up per party within the window (crate::approvals).
    let mut reservation = None;
    if kind == "lock" {
        match super::approvals::lock_gate(&state, &principal, devices.len()).await? {
            LockGate::Approve => {
                return super::approvals::request(&state, &principal, kind, body.clone(), &devices)
                    .await;
            }
            LockGate::Issue(r) => reservation = r,
        }
    }
    let req = CreateRequest {
        action,
        devices,
        author: principal.name.clone(),
        ttl,
    };
    let commands = match create_now(&state, req).await {
        Ok(commands) => commands,
        Err(e) => {
            super::approvals::release(&state, reservation).await;
            return Err(e);
        }
    };
    let note = created_note(&commands);
    Ok(note.attach((StatusCode::ACCEPTED, Json(CommandsCreated { commands })).into_response()))
}

/// The audit note of created commands: their devices (the first few) and kind.
pub(super) fn created_note(commands: &[CommandView]) -> AuditNote {
    const SHOWN: usize = 20;
    let mut devices: Vec<&str> = commands
        .iter()
        .take(SHOWN)
        .map(|c| c.device_id.as_str())
        .collect();
    let more = commands.len().saturating_sub(SHOWN);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    devices.sort_unstable();
    AuditNote {
        target: Some(format!("{}{more}", devices.join(LIST_SEPARATOR))),
        detail: format!(
            "{} {} command(s): {}",
            commands.len(),
            commands.first().map(|c| c.body.kind()).unwrap_or_default(),
            commands
                .iter()
                .take(SHOWN)
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(LIST_SEPARATOR)
        ),
    }
}

/// The devices a selector names; unknown devices and empty or oversized selections refused.
pub(super) fn resolve(state: &ApiState, selector: &Selector) -> Result<Vec<DeviceId>, ApiError> {
    let devices = selector.resolve(&state.registry).map_err(|unknown| {
        let field = match selector {
            Selector::Devices(ids) => {
                let i = ids.iter().position(|d| *d == unknown[0]).unwrap_or(0);
                format!("target.devices[{i}]")
            }
            _ => "target".to_owned(),
        };
        ApiError::field(
            field,
            format!(
                "no device {}",
                posfleet_proto::text::shown(unknown[0].as_str())
            ),
            super::devices::ID_HINT,
        )
        .with_status(StatusCode::NOT_FOUND)
    })?;
    if devices.is_empty() {
        return Err(ApiError::field(
            "target",
            "the selector matches no device",
            "check the group or labels with GET /api/v1/devices?group=G or ?label=k=v",
        ));
    }
    if devices.len() > MAX_TARGETS {
        return Err(ApiError::field(
            "target",
            format!(
                "{} devices selected; at most {MAX_TARGETS} per request",
                devices.len()
            ),
            "split the request",
        ));
    }
    Ok(devices)
}

/// Asks the command plane to create `req`'s commands (all or none).
pub(super) async fn create_now(
    state: &ApiState,
    req: CreateRequest,
) -> Result<Vec<CommandView>, ApiError> {
    state.commands.create(req).await.map_err(|e| match e {
        CreateError::Store | CreateError::Unavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
            Some("nothing was created; retry later and check the controller's log"),
        ),
    })
}

/// Validates the whole body; the first problem is reported with its field.
pub(super) fn parse_create(body: &Value) -> Result<(Action, Selector, Duration), ApiError> {
    let field = |f: &str, e: String| ApiError::field(f, e, CREATE_HINT);
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object", CREATE_HINT))?;
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "kind" | "target" | "reason" | "force" | "since_ms" | "max_bytes" | "ttl_s"
        ) {
            return Err(field(key, "unknown field".into()));
        }
    }
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| field("kind", format!("required, one of {}", KINDS.join(", "))))?;
    if !KINDS.contains(&kind) {
        let why = if kind == "config_push" {
            "configuration is pushed by the controller when the desired configuration changes; \
             change it with the configuration API"
                .to_owned()
        } else if kind == "software_update" || kind == "rollback_update" {
            "software updates are issued by rollouts (POST /api/v1/rollouts), which also roll \
             them back"
                .to_owned()
        } else {
            format!("unknown kind {kind:?}; one of {}", KINDS.join(", "))
        };
        return Err(field("kind", why));
    }
    let allowed = |name: &str, kinds: &[&str]| -> Result<(), ApiError> {
        if obj.contains_key(name) && !kinds.contains(&kind) {
            return Err(field(name, format!("not a parameter of {kind}")));
        }
        Ok(())
    };
    allowed("reason", &["lock", "unlock"])?;
    allowed("force", &["wipe"])?;
    allowed("since_ms", &["collect_logs"])?;
    allowed("max_bytes", &["collect_logs"])?;
    let action = match kind {
        "lock" | "unlock" => {
            let reason = obj
                .get("reason")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .ok_or_else(|| field("reason", format!("required for {kind}: say why")))?;
            if reason.chars().count() > MAX_REASON_CHARS {
                return Err(field(
                    "reason",
                    format!("longer than {MAX_REASON_CHARS} characters"),
                ));
            }
            check_text("reason", reason, CREATE_HINT)?;
            let reason = reason.to_owned();
            if kind == "lock" {
                Action::Lock { reason }
            } else {
                Action::Unlock { reason }
            }
        }
        "reboot" => Action::Reboot,
        "wipe" => Action::Wipe {
            force: match obj.get("force") {
                None => false,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| field("force", "must be true or false".into()))?,
            },
        },
        _ => Action::CollectLogs {
            since_ms: match obj.get("since_ms") {
                None => 0,
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| field("since_ms", "must be Unix milliseconds".into()))?,
            },
            max_bytes: match obj.get("max_bytes") {
                None => DEFAULT_MAX_BYTES,
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| (1..=MAX_MAX_BYTES).contains(n))
                    .ok_or_else(|| field("max_bytes", format!("must be 1..={MAX_MAX_BYTES}")))?,
            },
        },
    };
    let ttl = match obj.get("ttl_s") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|s| (1..=MAX_TTL.as_secs()).contains(s))
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    field(
                        "ttl_s",
                        format!("must be 1..={} seconds (30 days)", MAX_TTL.as_secs()),
                    )
                })?,
        ),
    };
    let selector = parse_target(obj.get("target"))?;
    Ok((
        action,
        selector,
        ttl.unwrap_or(Duration::from_secs(24 * 3600)),
    ))
}

pub(super) fn parse_target(target: Option<&Value>) -> Result<Selector, ApiError> {
    let field = |f: &str, e: &str| ApiError::field(f, e, CREATE_HINT);
    let obj: &Map<String, Value> = target
        .and_then(Value::as_object)
        .filter(|o| o.len() == 1)
        .ok_or_else(|| {
            field(
                "target",
                "required: an object with exactly one of devices, group or labels",
            )
        })?;
    if let Some(devices) = obj.get("devices") {
        let list = devices
            .as_array()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| field("target.devices", "must be a non-empty array of device ids"))?;
        if list.len() > MAX_TARGETS {
            return Err(field("target.devices", "too many devices in one request"));
        }
        let mut ids = Vec::with_capacity(list.len());
        for (i, d) in list.iter().enumerate() {
            let id = d
                .as_str()
                .and_then(|s| DeviceId::new(s).ok())
                .ok_or_else(|| {
                    ApiError::field(
                        format!("target.devices[{i}]"),
                        "not a device id",
                        super::devices::ID_HINT,
                    )
                })?;
            ids.push(id);
        }
        return Ok(Selector::Devices(ids));
    }
    if let Some(group) = obj.get("group") {
        return match group.as_str() {
            Some(g) if valid_name(g) => {
                check_text("target.group", g, super::devices::NAME_HINT)?;
                Ok(Selector::Group(g.to_owned()))
            }
            _ => Err(ApiError::field(
                "target.group",
                "not a valid group name",
                super::devices::NAME_HINT,
            )),
        };
    }
    if let Some(labels) = obj.get("labels") {
        let map = labels
            .as_object()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| field("target.labels", "must be a non-empty object of key: value"))?;
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in map {
            check_text("target.labels", k, super::devices::NAME_HINT)?;
            match v.as_str() {
                Some(v) if valid_name(k) && valid_name(v) => {
                    check_text(format!("target.labels.{k}"), v, super::devices::NAME_HINT)?;
                    out.insert(k.clone(), v.to_owned());
                }
                _ => {
                    return Err(ApiError::field(
                        format!("target.labels.{k}"),
                        "not a valid label",
                        super::devices::NAME_HINT,
                    ));
                }
            }
        }
        return Ok(Selector::Labels(out));
    }
    Err(field(
        "target",
        "one of devices, group or labels is required",
    ))
}

/// Query parameters of the list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    device: Option<String>,
    status: Option<String>,
    kind: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

pub(crate) async fn list(
    State(state): State<ApiState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<CommandPage>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text(), QUERY_HINT))?;
    let device = p
        .device
        .as_deref()
        .filter(|d| !d.is_empty())
        .map(DeviceId::new)
        .transpose()
        .map_err(|e| ApiError::field("device", e.to_string(), super::devices::ID_HINT))?;
    let status = p
        .status
        .as_deref()
        .map(|s| {
            CommandState::parse(s).ok_or_else(|| {
                ApiError::field("status", format!("unknown status {s:?}"), QUERY_HINT)
            })
        })
        .transpose()?;
    let kind = p
        .kind
        .map(|k| {
            if KINDS.contains(&k.as_str()) || ISSUED_KINDS.contains(&k.as_str()) {
                Ok(k)
            } else {
                Err(ApiError::field(
                    "kind",
                    format!("unknown kind {k:?}"),
                    QUERY_HINT,
                ))
            }
        })
        .transpose()?;
    let limit = match p.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::field("limit", format!("must be 1..={MAX_LIMIT}"), QUERY_HINT)
            })?,
    };
    let query = CommandQuery {
        device,
        status,
        kind,
        limit,
    };
    let cursor = p.cursor.filter(|c| !c.is_empty());
    let store = state.commands.store().clone();
    // A page reads up to thousands of records: off the runtime.
    let page = tokio::task::spawn_blocking(move || store.list(&query, cursor.as_deref()))
        .await
        .map_err(|e| ApiError::internal("the command list", &e.to_string()))?;
    match page {
        Ok(page) => Ok(Json(page)),
        Err(ListError::BadCursor) => Err(ApiError::field(
            "cursor",
            "not a cursor this list issued for these filters",
            "pass next_cursor unchanged with the same filters, or start without a cursor",
        )),
        Err(ListError::Store(e)) => Err(ApiError::internal("the command store", &e.to_string())),
    }
}

pub(crate) async fn detail(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CommandView>, ApiError> {
    let id = command_id(id)?;
    Ok(Json(get(&state, &id).await?))
}

pub(crate) async fn cancel(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CommandView>, ApiError> {
    let id = command_id(id)?;
    let cmd = get(&state, &id).await?;
    let refuse = |e: CancelError| match e {
        CancelError::Final => ApiError::conflict(
            format!("command {id} is already {}", cmd.status.name()),
            "final states never change",
        ),
        CancelError::LockUnlock => ApiError::conflict(
            e.to_string(),
            "POST /api/v1/commands with kind lock or unlock sets a newer desired state",
        ),
        CancelError::Store | CancelError::Unavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
            Some("retry later and check the controller's log"),
        ),
    };
    if cmd.status.is_final() {
        return Err(refuse(CancelError::Final));
    }
    if matches!(
        cmd.body,
        CommandBody::Lock { .. } | CommandBody::Unlock { .. }
    ) {
        return Err(refuse(CancelError::LockUnlock));
    }
    state.commands.cancel(&id).await.map(Json).map_err(refuse)
}

/// The uploaded log bytes of a collect_logs command.
pub(crate) async fn logs(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = command_id(id)?;
    let cmd = get(&state, &id).await?;
    if !matches!(cmd.body, CommandBody::CollectLogs { .. }) {
        return Err(ApiError::conflict(
            format!(
                "command {id} is a {} command, not collect_logs",
                cmd.body.kind()
            ),
            "only collect_logs commands have logs",
        ));
    }
    let nothing = || {
        ApiError::conflict(
            format!(
                "command {id} has no uploaded logs yet ({})",
                cmd.status.name()
            ),
            "wait for the terminal to upload them (watch the command's status)",
        )
    };
    let path = log_path(state.commands.logs_dir(), &id).ok_or_else(nothing)?;
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) if !bytes.is_empty() => bytes,
        Ok(_) => return Err(nothing()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(nothing()),
        Err(e) => return Err(ApiError::internal("reading the log upload", &e.to_string())),
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from(bytes),
    )
        .into_response())
}

fn command_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text(), ID_HINT))?;
    Ok(id)
}

async fn get(state: &ApiState, id: &str) -> Result<CommandView, ApiError> {
    let missing = || ApiError::not_found(format!("no command {id}"), ID_HINT);
    if log_path(state.commands.logs_dir(), id).is_none() {
        return Err(missing());
    }
    let store = state.commands.store().clone();
    let key = id.to_owned();
    tokio::task::spawn_blocking(move || store.get(&key))
        .await
        .map_err(|e| ApiError::internal("the command store", &e.to_string()))?
        .map_err(|e| ApiError::internal("the command store", &e.to_string()))?
        .ok_or_else(missing)
}
