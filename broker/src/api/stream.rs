//! `GET /api/v1/stream[?device=ID]`: the live fleet events as server-sent events.
//!
//! Each event's `event:` field is [`FleetEvent::kind`] and its `data:` the event as JSON.
//! A client that falls behind the bus gets a `lagged` event saying how many it missed and
//! keeps streaming. Keep-alive comments flow every `sse_keep_alive`. The stream ends when the
//! server shuts down.

use std::convert::Infallible;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt, future};
use posfleet_proto::DeviceId;
use serde::Deserialize;
use tracing::warn;

use super::ApiState;
use super::devices::ID_HINT;
use super::error::ApiError;
use crate::views::FleetEvent;

/// Query parameters of the stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamQuery {
    /// Only events about this device (stream control events always pass).
    device: Option<String>,
}

pub(crate) async fn stream(
    State(state): State<ApiState>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::bad_request(e.body_text(), "the only parameter is ?device=<device id>")
    })?;
    let filter = query
        .device
        .map(DeviceId::new)
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string(), ID_HINT))?;
    let events = state
        .events
        .subscribe()
        .into_stream()
        .filter(move |event| {
            let wanted = match (&filter, event.device()) {
                (Some(want), Some(device)) => want.as_str() == device,
                _ => true,
            };
            future::ready(wanted)
        })
        .map(|event| Ok(sse_event(&event)))
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(state.limits.sse_keep_alive)))
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
