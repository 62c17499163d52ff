//! `tx list` / `tx summary` against the canned server.

use super::*;
use crate::views::{ConflictView, SeqRange, TransactionPage, TransactionSummary, TransactionView};

pub(crate) fn canned_tx(device: &str, seq: u64) -> TransactionView {
    TransactionView {
        device: device.into(),
        seq,
        txn_id: format!("txn-{seq}"),
        timestamp_ms: NOW - 60_000 + seq,
        received_at_ms: NOW,
        amount_minor: 1250,
        currency: "EUR".into(),
        kind: "sale".into(),
        status: "approved".into(),
        entry_mode: "chip".into(),
        masked_card: "411111******1111".into(),
        card_token: String::new(),
        card_brand: "VISA".into(),
        auth_code: "A1".into(),
        response_code: "00".into(),
        merchant_id: String::new(),
        store_id: String::new(),
        operator_id: String::new(),
        items: Vec::new(),
    }
}

pub(super) fn canned_summary() -> TransactionSummary {
    TransactionSummary {
        device: "T-1".into(),
        count: 41,
        approved_amount_minor: [("EUR".to_owned(), 51_250), ("USD".to_owned(), 99)].into(),
        last_seq: 44,
        durable_through_seq: 40,
        gaps: vec![SeqRange {
            first: 41,
            last: 42,
        }],
        gaps_truncated: false,
        gap_since_ms: Some(NOW - 120_000),
        conflicts: 1,
        recent_conflicts: vec![ConflictView {
            seq: 7,
            txn_id: "txn-x".into(),
            received_at_ms: NOW - 5_000,
        }],
        first_received_ms: Some(NOW - 86_400_000),
        last_received_ms: Some(NOW - 4_000),
    }
}

/// First page (with a cursor) unless `cursor=next`; echoes the filters it got in `txn_id`s.
pub(super) async fn list(
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = unauthorized(&headers) {
        return refused;
    }
    if query.get("cursor").map(String::as_str) == Some("bogus") {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid cursor: it was altered or belongs to other filters",
            Some("pass the next_cursor of the previous page unchanged"),
        );
    }
    let mut filters: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    filters.sort();
    let mut first = canned_tx("T-1", 2);
    first.txn_id = filters.join("&");
    let page = if query.get("cursor").map(String::as_str) == Some("next") {
        TransactionPage {
            transactions: vec![canned_tx("T-1", 1)],
            next_cursor: None,
        }
    } else {
        TransactionPage {
            transactions: vec![first],
            next_cursor: Some("next".into()),
        }
    };
    axum::Json(page).into_response()
}

pub(super) async fn summary(headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Some(refused) = unauthorized(&headers) {
        return refused;
    }
    if id == "T-1" {
        axum::Json(canned_summary()).into_response()
    } else {
        error_response(StatusCode::NOT_FOUND, &format!("no device {id}"), None)
    }
}

#[tokio::test]
async fn tx_list_passes_the_filters_and_prints_a_table_with_the_next_cursor() {
    let fx = Fixture::start().await;
    let (result, out) = fx
        .posctl(&[
            "tx",
            "list",
            "--device",
            "T-1",
            "--from",
            "2024-02-29T13:00:00Z",
            "--status",
            "approved",
            "--asc",
        ])
        .await;
    assert!(result.is_ok(), "{result:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("TIME (UTC)"), "{out}");
    assert!(lines[1].contains("T-1"), "{out}");
    assert!(lines[1].contains("12.50 EUR"), "{out}");
    assert!(lines[1].contains("411111******1111"), "{out}");
    assert!(out.contains("1 transaction\n"), "{out}");
    assert!(
        out.ends_with("more: repeat the command with --cursor next\n"),
        "{out}"
    );

    let (result, out) = fx.posctl(&["tx", "list", "--cursor", "next"]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(!out.contains("more:"), "{out}");

    // The canned server echoes the query it got in the first row's txn_id.
    let (result, out) = fx
        .posctl(&[
            "-o",
            "json",
            "tx",
            "list",
            "--device",
            "T-1",
            "--to",
            "1709211909000",
        ])
        .await;
    assert!(result.is_ok(), "{result:?}");
    let page: TransactionPage = serde_json::from_str(&out).unwrap();
    assert_eq!(
        page.transactions[0].txn_id,
        "device=T-1&limit=50&to=1709211909000"
    );
}

#[tokio::test]
async fn tx_list_json_is_the_api_json() {
    let fx = Fixture::start().await;
    let (result, out) = fx
        .posctl(&["-o", "json", "tx", "list", "--cursor", "next"])
        .await;
    assert!(result.is_ok(), "{result:?}");
    let page: TransactionPage = serde_json::from_str(&out).unwrap();
    assert_eq!(page.transactions, vec![canned_tx("T-1", 1)]);
    assert!(page.next_cursor.is_none());
}

#[tokio::test]
async fn a_refused_cursor_shows_the_servers_hint() {
    let fx = Fixture::start().await;
    let (result, _) = fx.posctl(&["tx", "list", "--cursor", "bogus"]).await;
    let message = error_text(result);
    assert!(message.contains("400 Bad Request"), "{message}");
    assert!(
        message.contains("next_cursor of the previous page"),
        "{message}"
    );
}

#[tokio::test]
async fn tx_summary_renders_gaps_and_conflicts_and_json() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["tx", "summary", "T-1"]).await;
    assert!(result.is_ok(), "{result:?}");
    for expected in [
        "Transactions of T-1\n",
        "  stored        41\n",
        "  approved      512.50 EUR, 0.99 USD\n",
        "  durable thru  40\n",
        "  gaps          41-42 (missing since ",
        "  conflicts     1\n",
        "seq 7: refused txn txn-x",
        "!!! conflicting records were refused",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
    let (result, out) = fx
        .posctl(&["tx", "summary", "T-1", "--output", "json"])
        .await;
    assert!(result.is_ok(), "{result:?}");
    let summary: TransactionSummary = serde_json::from_str(&out).unwrap();
    assert_eq!(summary, canned_summary());
    let (result, _) = fx.posctl(&["tx", "summary", "T-404"]).await;
    assert_eq!(
        error_text(result),
        "no device T-404; `posctl devices list` shows known devices"
    );
}

#[test]
fn tx_arguments_are_checked_by_the_parser() {
    for args in [
        &["posctl", "tx", "list", "--status", "pending"][..],
        &["posctl", "tx", "list", "--limit", "0"],
        &["posctl", "tx", "list", "--limit", "1001"],
        &["posctl", "tx", "summary", "a/b"],
    ] {
        let err = Cli::try_parse_from(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{args:?}");
    }
}
