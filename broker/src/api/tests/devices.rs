//! Device list and detail, error responses, metrics.

use axum::http::StatusCode;

use super::TestServer;
use crate::views::{DeviceDetail, DeviceList, ErrorBody, Lifecycle};

#[tokio::test]
async fn lists_devices_sorted_and_shows_detail_after_ingest() {
    let server = TestServer::start().await;
    let empty: DeviceList = server.get("/api/v1/devices").await.json().await.unwrap();
    assert!(empty.devices.is_empty());

    server.heartbeat("T-2", 2000);
    server.presence("T-1", true, 1000);
    server.presence("T-1", false, 3000);

    let response = server.get("/api/v1/devices").await;
    assert_eq!(response.status(), StatusCode::OK);
    let list: DeviceList = response.json().await.unwrap();
    let ids: Vec<&str> = list.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, vec!["T-1", "T-2"]);
    let t1 = &list.devices[0];
    assert_eq!(t1.lifecycle, Lifecycle::Active);
    assert!(!t1.online);
    assert_eq!(t1.offline_reason.as_deref(), Some("shutdown"));
    assert_eq!(t1.model, "X9");
    assert!(list.devices[1].online);

    let detail: DeviceDetail = server
        .get("/api/v1/devices/T-2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(detail.summary.id, "T-2");
    assert_eq!(detail.summary.last_heartbeat_ms, Some(2000));
    let hb = detail.last_heartbeat.unwrap();
    assert_eq!((hb.seq, hb.interval_s, hb.received_at_ms), (1, 10, 2000));
    assert!(detail.telemetry_history.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn bad_and_unknown_ids_get_json_errors_with_hints() {
    let server = TestServer::start().await;
    for (path, status) in [
        ("/api/v1/devices/-bad", StatusCode::BAD_REQUEST),
        ("/api/v1/devices/a%2Fb", StatusCode::BAD_REQUEST),
        ("/api/v1/devices/a%20b", StatusCode::BAD_REQUEST),
        (
            "/api/v1/devices/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            StatusCode::BAD_REQUEST,
        ),
        ("/api/v1/devices/T-404", StatusCode::NOT_FOUND),
        ("/api/v1/nothing-here", StatusCode::NOT_FOUND),
        ("/api/v1/devices/T-1/extra", StatusCode::NOT_FOUND),
        ("/api/v1/stream?device=no%2Fslash", StatusCode::BAD_REQUEST),
        ("/api/v1/stream?unknown=1", StatusCode::BAD_REQUEST),
    ] {
        let response = server.get(path).await;
        assert_eq!(response.status(), status, "{path}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("application/json"),
            "{path}: {content_type}"
        );
        let body: ErrorBody = response.json().await.unwrap();
        assert!(!body.error.is_empty(), "{path}");
        assert!(body.hint.is_some(), "{path}");
    }
    let post = server
        .client
        .post(server.url("/api/v1/devices"))
        .bearer_auth(super::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: ErrorBody = post.json().await.unwrap();
    assert!(body.hint.is_some());
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_rendered_as_prometheus_text() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", 1000);
    let response = server.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4"
    );
    let text = response.text().await.unwrap();
    assert!(text.contains("posfleet_devices_online 1"), "{text}");
    assert!(text.contains("posfleet_devices_registered 1"), "{text}");
    assert!(
        text.contains("posfleet_ingest_messages_total{channel=\"hb\"} 1"),
        "{text}"
    );
    server.stop().await;
}
