//! `GET /api/v1/transactions` (filtered, paginated list) and
//! `GET /api/v1/devices/{id}/transactions/summary`.
//!
//! Times (`from`, `to`) are Unix milliseconds or RFC 3339 (`2024-02-29T13:05:09Z`,
//! `...+01:00`); the range is `from <= timestamp_ms < to` on the terminal's transaction time.
//! Pages are newest first unless `order=asc`. The cursor is opaque and bound to the filters it
//! was issued for: an altered cursor, or one reused with other filters, is a 400.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use posfleet_proto::DeviceId;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ApiState;
use super::devices::ID_HINT;
use super::error::ApiError;
use crate::txstore::{DEFAULT_LIMIT, MAX_LIMIT, Order, QueryError, TxQuery, parse_status};
use crate::views::{TransactionPage, TransactionSummary};

const QUERY_HINT: &str = "parameters: device=<id>, from=<time>, to=<time> (Unix ms or RFC 3339, \
     from inclusive, to exclusive), status=approved|declined|error, limit=1..1000, \
     order=desc|asc, cursor=<next_cursor of the previous page>";

/// Query parameters of the list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    device: Option<String>,
    from: Option<String>,
    to: Option<String>,
    status: Option<String>,
    limit: Option<String>,
    order: Option<String>,
    cursor: Option<String>,
}

pub(crate) async fn list(
    State(state): State<ApiState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<TransactionPage>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text(), QUERY_HINT))?;
    let query = parse(&params)?;
    let cursor = params.cursor.filter(|c| !c.is_empty());
    let store = state.transactions.clone();
    // A page scans up to thousands of index entries: off the runtime.
    let page = tokio::task::spawn_blocking(move || store.list(&query, cursor.as_deref()))
        .await
        .map_err(|e| internal(&e.to_string()))?;
    match page {
        Ok(page) => Ok(Json(page)),
        Err(QueryError::BadCursor(why)) => Err(ApiError::bad_request(
            format!("invalid cursor: {why}"),
            "pass the next_cursor of the previous page unchanged, with the same device, from, \
             to, status and order; or start again without a cursor",
        )),
        Err(QueryError::Store(e)) => Err(internal(&e.to_string())),
    }
}

/// The summary of one device's transactions.
pub(crate) async fn summary(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TransactionSummary>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request(e.body_text(), ID_HINT))?;
    let id = DeviceId::new(id).map_err(|e| ApiError::bad_request(e.to_string(), ID_HINT))?;
    let store = state.transactions.clone();
    let device = id.clone();
    // Lists gaps and conflicts with bounded scans: off the runtime.
    let summary = tokio::task::spawn_blocking(move || store.summary(&device))
        .await
        .map_err(|e| internal(&e.to_string()))?
        .map_err(|e| internal(&e.to_string()))?;
    match summary {
        Some(summary) => Ok(Json(summary)),
        None if state.registry.detail(&id).is_some() => Ok(Json(empty_summary(&id))),
        None => Err(ApiError::not_found(
            format!("no device {}", posfleet_proto::text::shown(id.as_str())),
            "a device appears once it has connected with its fleet certificate; \
             list known devices with GET /api/v1/devices",
        )),
    }
}

fn empty_summary(id: &DeviceId) -> TransactionSummary {
    TransactionSummary {
        device: id.to_string(),
        count: 0,
        approved_amount_minor: std::collections::BTreeMap::new(),
        last_seq: 0,
        durable_through_seq: 0,
        gaps: Vec::new(),
        gaps_truncated: false,
        gap_since_ms: None,
        conflicts: 0,
        recent_conflicts: Vec::new(),
        first_received_ms: None,
        last_received_ms: None,
    }
}

fn parse(p: &ListParams) -> Result<TxQuery, ApiError> {
    let bad = |e: String| ApiError::bad_request(e, QUERY_HINT);
    let device = p
        .device
        .as_deref()
        .filter(|d| !d.is_empty())
        .map(DeviceId::new)
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("device: {e}"), ID_HINT))?;
    let from_ms = p
        .from
        .as_deref()
        .map(|t| parse_time("from", t))
        .transpose()
        .map_err(bad)?;
    let to_ms =
        p.to.as_deref()
            .map(|t| parse_time("to", t))
            .transpose()
            .map_err(bad)?;
    if let (Some(from), Some(to)) = (from_ms, to_ms) {
        if from >= to {
            return Err(bad(format!("from ({from}) must be before to ({to})")));
        }
    }
    let status = p
        .status
        .as_deref()
        .map(|s| parse_status(s).ok_or_else(|| format!("unknown status {s:?}")))
        .transpose()
        .map_err(bad)?;
    let limit = match p.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| bad(format!("limit must be 1..={MAX_LIMIT}")))?,
    };
    let order = match p.order.as_deref() {
        None | Some("desc") => Order::Desc,
        Some("asc") => Order::Asc,
        Some(other) => return Err(bad(format!("unknown order {other:?}"))),
    };
    Ok(TxQuery {
        device,
        from_ms,
        to_ms,
        status,
        limit,
        order,
    })
}

/// Unix milliseconds, or an RFC 3339 date-time (a `+` offset that arrived as a space, from an
/// unencoded query string, is repaired).
pub(crate) fn parse_time(name: &str, value: &str) -> Result<u64, String> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value
            .parse()
            .map_err(|_| format!("{name}: {value} is too large"));
    }
    let repaired = value.replace(' ', "+");
    let at = OffsetDateTime::parse(&repaired, &Rfc3339).map_err(|e| {
        format!("{name}: {value:?} is neither Unix milliseconds nor an RFC 3339 time ({e})")
    })?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{name}: {value} is before 1970"))
}

fn internal(detail: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the transaction store failed: {detail}"),
        Some("check the controller's log; retry later"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_unix_ms_or_rfc3339() {
        assert_eq!(parse_time("from", "1709211909000"), Ok(1_709_211_909_000));
        assert_eq!(
            parse_time("from", "2024-02-29T13:05:09Z"),
            Ok(1_709_211_909_000)
        );
        assert_eq!(
            parse_time("from", "2024-02-29T14:05:09.5+01:00"),
            Ok(1_709_211_909_500)
        );
        assert_eq!(
            parse_time("from", "2024-02-29T14:05:09 01:00"),
            Ok(1_709_211_909_000)
        );
        assert!(parse_time("from", "yesterday").is_err());
        assert!(parse_time("from", "1969-12-31T23:59:59Z").is_err());
        assert!(parse_time("from", "99999999999999999999999").is_err());
    }
}
