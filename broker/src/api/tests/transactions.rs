//! `GET /api/v1/transactions` (pagination, filters, cursors) and the per-device summary.

use axum::http::StatusCode;
use posfleet_proto::pb;

use super::TestServer;
use crate::txstore::{test_sale, test_submission};
use crate::views::{ErrorBody, TransactionPage, TransactionSummary};

/// Stores seqs 1..=n for `device`, one second apart from `t0`; every third is declined.
fn store(server: &TestServer, device: &str, n: u64, t0: u64) {
    let txs = (1..=n)
        .map(|seq| {
            let mut t = test_sale(seq, i64::try_from(seq).unwrap() * 100);
            t.timestamp_ms = t0 + seq * 1000;
            if seq % 3 == 0 {
                t.status = pb::TransactionStatus::Declined as i32;
            }
            t
        })
        .collect();
    server
        .transactions
        .commit(vec![test_submission(device, 9_000, txs)])
        .unwrap();
}

async fn page(server: &TestServer, query: &str) -> TransactionPage {
    let response = server.get(&format!("/api/v1/transactions{query}")).await;
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    response.json().await.unwrap()
}

async fn bad_request(server: &TestServer, query: &str) -> ErrorBody {
    let response = server.get(&format!("/api/v1/transactions{query}")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    let body: ErrorBody = response.json().await.unwrap();
    assert!(body.hint.is_some(), "{query}");
    body
}

const T0: u64 = 1_709_211_900_000; // 2024-02-29T13:05:00Z

#[tokio::test]
async fn pages_follow_cursors_newest_first_or_oldest_first() {
    let server = TestServer::start().await;
    store(&server, "T-1", 7, T0);
    store(&server, "T-2", 3, T0 + 500);
    // Newest first across devices, three per page.
    let mut seen = Vec::new();
    let mut query = "?limit=3".to_owned();
    loop {
        let p = page(&server, &query).await;
        assert!(p.transactions.len() <= 3);
        seen.extend(
            p.transactions
                .iter()
                .map(|t| (t.timestamp_ms, t.device.clone(), t.seq)),
        );
        match p.next_cursor {
            Some(c) => query = format!("?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 10);
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted);
    // One device, oldest first, with line-item-free rows that carry only masked card data.
    let p = page(&server, "?device=T-2&order=asc").await;
    let seqs: Vec<u64> = p.transactions.iter().map(|t| t.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(p.transactions[0].masked_card, "411111******1111");
    assert!(p.next_cursor.is_none());
    server.stop().await;
}

#[tokio::test]
async fn filters_combine_and_times_accept_unix_ms_and_rfc3339() {
    let server = TestServer::start().await;
    store(&server, "T-1", 9, T0);
    store(&server, "T-2", 9, T0);
    let declined = page(&server, "?device=T-1&status=declined&order=asc").await;
    let seqs: Vec<u64> = declined.transactions.iter().map(|t| t.seq).collect();
    assert_eq!(seqs, vec![3, 6, 9]);
    assert!(declined.transactions.iter().all(|t| t.status == "declined"));
    // [T0+2s, T0+5s): seqs 2, 3, 4, in both time notations (and an unencoded '+').
    let from_ms = T0 + 2000;
    let to_ms = T0 + 5000;
    for query in [
        format!("?device=T-1&order=asc&from={from_ms}&to={to_ms}"),
        "?device=T-1&order=asc&from=2024-02-29T13:05:02Z&to=2024-02-29T13:05:05Z".to_owned(),
        "?device=T-1&order=asc&from=2024-02-29T14:05:02%2B01:00&to=2024-02-29T14:05:05+01:00"
            .to_owned(),
    ] {
        let p = page(&server, &query).await;
        let seqs: Vec<u64> = p.transactions.iter().map(|t| t.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4], "{query}");
    }
    let all_devices = page(
        &server,
        &format!("?from={from_ms}&to={to_ms}&status=approved"),
    )
    .await;
    assert_eq!(all_devices.transactions.len(), 4); // seqs 2 and 4 of both devices
    server.stop().await;
}

#[tokio::test]
async fn altered_or_foreign_cursors_and_bad_parameters_are_400() {
    let server = TestServer::start().await;
    store(&server, "T-1", 5, T0);
    let first = page(&server, "?device=T-1&limit=2").await;
    let cursor = first.next_cursor.unwrap();
    // The cursor works with its own filters (a different limit is fine).
    let second = page(&server, &format!("?device=T-1&limit=3&cursor={cursor}")).await;
    assert_eq!(second.transactions.len(), 3);
    // Altered in any character, truncated, or with other filters: refused.
    let mut altered = cursor.clone().into_bytes();
    let i = altered.len() / 2;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    for query in [
        format!("?device=T-1&cursor={altered}"),
        format!("?device=T-1&cursor={}", &cursor[..cursor.len() - 2]),
        format!("?device=T-2&cursor={cursor}"),
        format!("?cursor={cursor}"),
        format!("?device=T-1&order=asc&cursor={cursor}"),
        "?device=T-1&cursor=not*base64".to_owned(),
    ] {
        let body = bad_request(&server, &query).await;
        assert!(body.error.contains("cursor"), "{query}: {}", body.error);
    }
    for query in [
        "?limit=0",
        "?limit=1001",
        "?limit=ten",
        "?status=pending",
        "?order=sideways",
        "?from=yesterday",
        "?from=2000&to=1000",
        "?device=a%2Fb",
        "?unknown=1",
    ] {
        bad_request(&server, query).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn the_summary_shows_amounts_watermark_gaps_and_conflicts() {
    let server = TestServer::start().await;
    let mut txs: Vec<pb::Transaction> = [1, 2, 3, 5, 6, 9]
        .into_iter()
        .map(|seq| test_sale(seq, 100))
        .collect();
    txs[1].currency = "USD".into();
    txs[2].status = pb::TransactionStatus::Declined as i32;
    server
        .transactions
        .commit(vec![test_submission("T-1", 7_000, txs)])
        .unwrap();
    let mut conflicting = test_sale(2, 555);
    conflicting.txn_id = "txn-dupe".into();
    server
        .transactions
        .commit(vec![test_submission("T-1", 8_000, vec![conflicting])])
        .unwrap();
    let response = server.get("/api/v1/devices/T-1/transactions/summary").await;
    assert_eq!(response.status(), StatusCode::OK);
    let s: TransactionSummary = response.json().await.unwrap();
    assert_eq!((s.count, s.last_seq, s.durable_through_seq), (6, 9, 3));
    assert_eq!(s.approved_amount_minor["EUR"], 400);
    assert_eq!(s.approved_amount_minor["USD"], 100);
    let gaps: Vec<(u64, u64)> = s.gaps.iter().map(|g| (g.first, g.last)).collect();
    assert_eq!(gaps, vec![(4, 4), (7, 8)]);
    assert_eq!(s.gap_since_ms, Some(7_000));
    assert_eq!(s.conflicts, 1);
    assert_eq!(s.recent_conflicts[0].seq, 2);
    assert_eq!(s.recent_conflicts[0].txn_id, "txn-dupe");

    // A registered device without transactions has an empty summary; an unknown one is 404.
    server.heartbeat("T-5", 1000);
    let s: TransactionSummary = server
        .get("/api/v1/devices/T-5/transactions/summary")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!((s.count, s.durable_through_seq), (0, 0));
    let missing = server
        .get("/api/v1/devices/T-404/transactions/summary")
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let bad = server.get("/api/v1/devices/-x/transactions/summary").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    server.stop().await;
}
