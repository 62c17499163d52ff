//! `GET /api/v1/stream[?device=ID]`: the live fleet events as server-sent events.
//!
//! Each event's `event:` field is [`FleetEvent::kind`] and its `data:` the event as JSON.
//! A client that falls behind the bus gets a `lagged` event saying how many it missed and
//! keeps streaming. Keep-alive comments flow every `sse_keep_alive`. The stream ends when the
//! server shuts down.
//!
//! - Roles: an event kind is delivered only to principals whose role may read the GET route
//!   that serves the same data ([`KIND_ROUTES`]); the roles themselves come from the route
//!   table (`super::protected_routes`), so the stream can never show more than the routes.
//! - One account holds at most `max_streams_per_principal` streams at once, counting its
//!   sessions and the API tokens it made together (`Principal::party`); beyond, 429
//!   with `Retry-After` (counted as `streams_per_principal` in
//!   `posfleet_admission_refusals_total{site="api"}`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, future};
use posfleet_proto::DeviceId;
use serde::Deserialize;
use tracing::warn;

use super::ApiState;
use super::devices::ID_HINT;
use super::error::ApiError;
use crate::accounts::{Principal, Role};
use crate::views::FleetEvent;

/// The GET route whose data each event kind carries. A principal receives an event of a kind
/// only if its role may read that route; `lagged` (stream control) always passes, and a kind
/// missing here reaches admins only.
pub(crate) const KIND_ROUTES: [(&str, &str); 7] = [
    ("presence", "/api/v1/devices/{id}"),
    ("heartbeat", "/api/v1/devices/{id}"),
    ("telemetry", "/api/v1/devices/{id}"),
    ("transaction", "/api/v1/transactions"),
    // Sequence gaps, conflicts and refused batches: the device's transaction summary.
    ("alert", "/api/v1/devices/{id}/transactions/summary"),
    ("command", "/api/v1/commands/{id}"),
    ("rollout", "/api/v1/rollouts/{id}"),
];

/// Seconds a client refused for too many streams is asked to wait.
const STREAMS_RETRY_AFTER_S: &str = "5";

/// The least role that may receive each event kind, read from the route table once.
fn kind_roles() -> &'static HashMap<&'static str, Role> {
    static ROLES: OnceLock<HashMap<&'static str, Role>> = OnceLock::new();
    ROLES.get_or_init(|| {
        let routes = super::protected_routes();
        KIND_ROUTES
            .iter()
            .filter_map(|(kind, path)| {
                let route = routes.iter().find(|r| r.path == *path)?;
                Some((*kind, route.read))
            })
            .collect()
    })
}

/// True if `role` may receive events of `kind`.
pub(crate) fn may_receive(role: Role, kind: &str) -> bool {
    if kind == "lagged" {
        return true;
    }
    let needed = kind_roles().get(kind).copied().unwrap_or(Role::Admin);
    role.allows(needed)
}

/// Live streams open per principal.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamSlots(Arc<Mutex<HashMap<String, usize>>>);

/// One open stream; gives its slot back when the stream is dropped.
#[derive(Debug)]
struct StreamSlot {
    slots: StreamSlots,
    principal: String,
}

impl StreamSlots {
    /// A slot for `principal`, unless it holds `max` already.
    fn take(&self, principal: &str, max: usize) -> Option<StreamSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(principal.to_owned()).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(StreamSlot {
            slots: self.clone(),
            principal: principal.to_owned(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.principal) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.principal);
            }
        }
    }
}

/// Query parameters of the stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamQuery {
    /// Only events about this device (stream control events always pass).
    device: Option<String>,
}

pub(crate) async fn stream(
    State(state): State<ApiState>,
    principal: Option<Extension<Principal>>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Response {
    let Some(Extension(principal)) = principal else {
        return ApiError::unauthorized().into_response();
    };
    let Query(query) = match query {
        Ok(query) => query,
        Err(e) => {
            return ApiError::bad_request(
                e.body_text(),
                "the only parameter is ?device=<device id>",
            )
            .into_response();
        }
    };
    let filter = match query.device.map(DeviceId::new).transpose() {
        Ok(filter) => filter,
        Err(e) => return ApiError::bad_request(e.to_string(), ID_HINT).into_response(),
    };
    let max = state.limits.max_streams_per_principal;
    // Counted per answerable account, so that minting tokens does not multiply the share.
    let Some(slot) = state.streams.take(principal.party(), max) else {
        state
            .metrics
            .admission_refuse("api", "streams_per_principal");
        let refusal = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} holds {max} live streams already (its sessions and tokens together)",
                principal.party()
            ),
            Some("close a stream (posctl watch) and retry"),
        );
        return ([(header::RETRY_AFTER, STREAMS_RETRY_AFTER_S)], refusal).into_response();
    };
    let role = principal.role;
    let events = state
        .events
        .subscribe()
        .into_stream()
        .filter(move |event| {
            let device_wanted = match (&filter, event.device()) {
                (Some(want), Some(device)) => want.as_str() == device,
                _ => true,
            };
            future::ready(device_wanted && may_receive(role, event.kind()))
        })
        .map(move |event| {
            // The slot lives as long as the stream.
            let _slot = &slot;
            Ok::<_, Infallible>(sse_event(&event))
        })
        .take_until(state.shutdown.clone().cancelled_owned());
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.limits.sse_keep_alive))
        .into_response()
}

fn sse_event(event: &FleetEvent) -> Event {
    match Event::default().event(event.kind()).json_data(event) {
        Ok(sse) => sse,
        Err(e) => {
            // Ingest validates every number, so this is a bug, not bad input.
            warn!(error = %e, kind = event.kind(), "cannot encode a fleet event; skipped");
            Event::default().comment("an event could not be encoded and was skipped")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_kind_names_a_route_of_the_table() {
        let routes = crate::api::protected_routes();
        for (kind, path) in KIND_ROUTES {
            let route = routes.iter().find(|r| r.path == path);
            assert!(route.is_some(), "{kind}: no route {path} in the table");
            assert!(kind_roles().contains_key(kind), "{kind}");
        }
    }

    #[test]
    fn roles_follow_the_route_table() {
        assert!(may_receive(Role::Viewer, "presence"));
        assert!(!may_receive(Role::Viewer, "transaction"));
        assert!(may_receive(Role::Operator, "transaction"));
        assert!(may_receive(Role::Viewer, "lagged"));
        // Unknown kinds fail closed.
        assert!(!may_receive(Role::Operator, "something_new"));
        assert!(may_receive(Role::Admin, "something_new"));
    }
}
