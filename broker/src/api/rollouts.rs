//! `POST|GET /api/v1/rollouts`, `GET /api/v1/rollouts/{id}` and
//! `POST /api/v1/rollouts/{id}/pause|resume|abort` (ADR 0008, "Rollouts").
//!
//! A refused create changes nothing: every field is checked (all problems reported at once,
//! one message per field), the artifact looked up and the target resolved before the engine
//! is asked.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use posfleet_proto::version::Version;
use serde_json::Value;

use super::Actor;
use super::ApiState;
use super::error::ApiError;
use crate::commands::{MAX_TTL, Selector};
use crate::rollouts::{Control, ControlError, CreateRolloutError, NewRollout, RolloutsHandle};
use crate::views::{FieldMessage, HealthGateView, RolloutList, RolloutView, TargetView};

const CREATE_HINT: &str = "send {\"artifact_id\": \"<sha256 hex>\", \"target\": {\"devices\": \
     [\"T-1\"]} | {\"group\": \"G\"} | {\"labels\": {\"k\": \"v\"}}, \"waves\": [1, 10, 50, 100], \
     \"success_threshold\": 0.95, \"failure_threshold\": 0.05, \"soak_s\": 0, \"wave_timeout_s\": \
     1800, \"confirm_timeout_s\": 300, \"health_gate\": {\"max_approval_drop\": 0.1, \
     \"max_unsent_ratio\": 3.0, \"min_transactions\": 20}} (only artifact_id and target are \
     required)";
const ID_HINT: &str = "rollout ids are what POST /api/v1/rollouts returned; list them with \
     GET /api/v1/rollouts";
/// Waves a rollout may have at most.
const MAX_WAVES: usize = 20;
/// Devices one rollout may target at most.
const MAX_TARGETS: usize = 100_000;
/// Longest soak.
const MAX_SOAK_S: u64 = 7 * 24 * 3600;
/// Longest health confirmation a terminal may be given.
const MAX_CONFIRM_S: u64 = 24 * 3600;
const MAX_REASON_CHARS: usize = 200;

fn engine(state: &ApiState) -> Result<&RolloutsHandle, ApiError> {
    state.rollouts.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "rollouts are not running in this controller",
            Some("check the controller's log"),
        )
    })
}

pub(crate) async fn create(
    State(state): State<ApiState>,
    Actor(author): Actor,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let rollouts = engine(&state)?;
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text(), CREATE_HINT))?;
    let req = parse_create(&state, &body, author)?;
    match rollouts.create(req).await {
        Ok(view) => Ok((StatusCode::CREATED, Json(view))),
        Err(e @ (CreateRolloutError::Store | CreateRolloutError::Unavailable)) => {
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
                Some("nothing was created; retry later and check the controller's log"),
            ))
        }
    }
}

/// Checks every field; all problems are reported together.
fn parse_create(state: &ApiState, body: &Value, author: String) -> Result<NewRollout, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object", CREATE_HINT))?;
    let mut errors: Vec<FieldMessage> = Vec::new();
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "artifact_id"
                | "target"
                | "waves"
                | "success_threshold"
                | "failure_threshold"
                | "soak_s"
                | "wave_timeout_s"
                | "confirm_timeout_s"
                | "health_gate"
        ) {
            add(&mut errors, key, "unknown field".into());
        }
    }
    let artifact = match obj.get("artifact_id").and_then(Value::as_str) {
        None => {
            add(
                &mut errors,
                "artifact_id",
                "required: the artifact's id (its SHA-256, hex)".into(),
            );
            None
        }
        Some(id) => {
            let found = state.catalog.0.get(id);
            match &found {
                None => add(
                    &mut errors,
                    "artifact_id",
                    "no such artifact; upload it first (posctl artifact upload)".into(),
                ),
                // Stored before min_version had to be comparable: every terminal would be
                // skipped, so refuse instead of running a rollout that installs nothing.
                Some(a)
                    if a.min_version
                        .as_deref()
                        .is_some_and(|m| Version::parse(m).is_none()) =>
                {
                    add(
                        &mut errors,
                        "artifact_id",
                        "the artifact's min_version cannot be compared with terminal \
                         versions; upload it again with a numeric min_version (like 9.0.0)"
                            .into(),
                    );
                }
                Some(_) => {}
            }
            found
        }
    };
    let devices = match super::commands::parse_target(obj.get("target")) {
        Err(e) => {
            errors.extend(e.body.fields);
            None
        }
        Ok(selector) => match selector.resolve(&state.registry) {
            Err(unknown) => {
                if let Selector::Devices(ids) = &selector {
                    for u in unknown {
                        let i = ids.iter().position(|d| *d == u).unwrap_or(0);
                        add(
                            &mut errors,
                            &format!("target.devices[{i}]"),
                            format!("no device {}", posfleet_proto::text::shown(u.as_str())),
                        );
                    }
                }
                None
            }
            Ok(devices) if devices.is_empty() => {
                add(
                    &mut errors,
                    "target",
                    "the selector matches no device".into(),
                );
                None
            }
            Ok(devices) if devices.len() > MAX_TARGETS => {
                add(
                    &mut errors,
                    "target",
                    format!("at most {MAX_TARGETS} devices per rollout"),
                );
                None
            }
            Ok(devices) => Some((target_view(&selector), devices)),
        },
    };
    let waves = match obj.get("waves") {
        None => vec![1, 10, 50, 100],
        Some(v) => {
            let parsed: Option<Vec<u32>> = v.as_array().and_then(|a| {
                a.iter()
                    .map(|p| p.as_u64().and_then(|p| u32::try_from(p).ok()))
                    .collect()
            });
            match parsed {
                Some(w)
                    if !w.is_empty()
                        && w.len() <= MAX_WAVES
                        && w.first().is_some_and(|p| *p >= 1)
                        && w.windows(2).all(|p| p[0] < p[1])
                        && w.last() == Some(&100) =>
                {
                    w
                }
                _ => {
                    add(
                        &mut errors,
                        "waves",
                        format!(
                            "must be 1 to {MAX_WAVES} cumulative percentages, strictly \
                             increasing, from at least 1, ending at 100 (e.g. [1, 10, 50, 100])"
                        ),
                    );
                    Vec::new()
                }
            }
        }
    };
    let fraction =
        |errors: &mut Vec<FieldMessage>, key: &str, default: f64, min_exclusive: bool| -> f64 {
            match obj.get(key) {
                None => default,
                Some(v) => match v.as_f64() {
                    Some(x) if (0.0..=1.0).contains(&x) && !(min_exclusive && x == 0.0) => x,
                    _ => {
                        let range = if min_exclusive { "(0, 1]" } else { "[0, 1]" };
                        add(errors, key, format!("must be a number in {range}"));
                        default
                    }
                },
            }
        };
    let success_threshold = fraction(&mut errors, "success_threshold", 0.95, true);
    let failure_threshold = fraction(&mut errors, "failure_threshold", 0.05, false);
    let seconds =
        |errors: &mut Vec<FieldMessage>, key: &str, default: u64, min: u64, max: u64| -> u64 {
            match obj.get(key) {
                None => default,
                Some(v) => match v.as_u64() {
                    Some(s) if (min..=max).contains(&s) => s,
                    _ => {
                        add(errors, key, format!("must be {min}..={max} seconds"));
                        default
                    }
                },
            }
        };
    let soak_s = seconds(&mut errors, "soak_s", 0, 0, MAX_SOAK_S);
    let wave_timeout_s = seconds(&mut errors, "wave_timeout_s", 1800, 1, MAX_TTL.as_secs());
    let confirm_timeout_s = seconds(&mut errors, "confirm_timeout_s", 300, 1, MAX_CONFIRM_S);
    let health_gate = parse_gate(obj.get("health_gate"), &mut errors);
    if !errors.is_empty() {
        let summary = errors
            .iter()
            .map(|f| format!("{}: {}", f.key, f.message))
            .collect::<Vec<_>>()
            .join("; ");
        let mut e = ApiError::bad_request(summary, CREATE_HINT);
        e.body.fields = errors;
        return Err(e);
    }
    let (Some(artifact), Some((target, devices))) = (artifact, devices) else {
        return Err(ApiError::bad_request("invalid rollout", CREATE_HINT));
    };
    Ok(NewRollout {
        artifact,
        target,
        devices,
        waves,
        success_threshold,
        failure_threshold,
        soak: Duration::from_secs(soak_s),
        wave_timeout: Duration::from_secs(wave_timeout_s),
        confirm_timeout_s: u32::try_from(confirm_timeout_s).unwrap_or(300),
        health_gate,
        author,
    })
}

fn add(errors: &mut Vec<FieldMessage>, key: &str, message: String) {
    errors.push(FieldMessage {
        key: key.to_owned(),
        message,
    });
}

fn parse_gate(v: Option<&Value>, errors: &mut Vec<FieldMessage>) -> HealthGateView {
    let mut gate = HealthGateView::default();
    let Some(v) = v else {
        return gate;
    };
    let mut err = |key: &str, message: &str| {
        errors.push(FieldMessage {
            key: format!("health_gate.{key}"),
            message: message.to_owned(),
        });
    };
    let Some(obj) = v.as_object() else {
        errors.push(FieldMessage {
            key: "health_gate".into(),
            message: "must be an object".into(),
        });
        return gate;
    };
    for key in obj.keys().filter(|k| {
        !matches!(
            k.as_str(),
            "max_approval_drop" | "max_unsent_ratio" | "min_transactions"
        )
    }) {
        err(key, "unknown field");
    }
    if let Some(v) = obj.get("max_approval_drop") {
        match v.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => gate.max_approval_drop = x,
            _ => err("max_approval_drop", "must be a number in [0, 1]"),
        }
    }
    if let Some(v) = obj.get("max_unsent_ratio") {
        match v.as_f64() {
            Some(x) if (0.0..=1000.0).contains(&x) => gate.max_unsent_ratio = x,
            _ => err("max_unsent_ratio", "must be a number in [0, 1000]"),
        }
    }
    if let Some(v) = obj.get("min_transactions") {
        match v.as_u64() {
            Some(n) if n <= 1_000_000 => gate.min_transactions = n,
            _ => err("min_transactions", "must be an integer 0..=1000000"),
        }
    }
    gate
}

fn target_view(selector: &Selector) -> TargetView {
    match selector {
        Selector::Devices(ids) => {
            TargetView::Devices(ids.iter().map(ToString::to_string).collect())
        }
        Selector::Group(g) => TargetView::Group(g.clone()),
        Selector::Labels(l) => TargetView::Labels(l.clone()),
    }
}

pub(crate) async fn list(State(state): State<ApiState>) -> Result<Json<RolloutList>, ApiError> {
    Ok(Json(RolloutList {
        rollouts: engine(&state)?.list(),
    }))
}

pub(crate) async fn detail(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let id = rollout_id(id)?;
    engine(&state)?
        .get(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no rollout {id}"), ID_HINT))
}

pub(crate) async fn pause(
    state: State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    control(state, id, Control::Pause, "pause").await
}

pub(crate) async fn resume(
    state: State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    control(state, id, Control::Resume, "resume").await
}

pub(crate) async fn abort(
    state: State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    body: Option<Json<Value>>,
) -> Result<Json<RolloutView>, ApiError> {
    let reason = body
        .as_ref()
        .and_then(|Json(b)| b.get("reason"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .unwrap_or("no reason given")
        .to_owned();
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::field(
            "reason",
            format!("at most {MAX_REASON_CHARS} characters"),
            "send {\"reason\": \"...\"}",
        ));
    }
    super::error::check_text("reason", &reason, "send {\"reason\": \"...\"}")?;
    control(state, id, Control::Abort { reason }, "abort").await
}

async fn control(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    action: Control,
    verb: &str,
) -> Result<Json<RolloutView>, ApiError> {
    let id = rollout_id(id)?;
    match engine(&state)?.control(&id, action).await {
        Ok(view) => Ok(Json(view)),
        Err(ControlError::NotFound) => {
            Err(ApiError::not_found(format!("no rollout {id}"), ID_HINT))
        }
        Err(e @ ControlError::NotApplicable(_)) => Err(ApiError::conflict(
            format!("cannot {verb} rollout {id}: {e}"),
            "pause applies to running or soaking rollouts, resume to paused ones, abort to \
             any unfinished one",
        )),
        Err(e @ (ControlError::Store | ControlError::Unavailable)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
            Some("nothing changed; retry later and check the controller's log"),
        )),
    }
}

fn rollout_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text(), ID_HINT))?;
    Ok(id)
}
