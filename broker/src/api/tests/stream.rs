//! The live stream over server-sent events.

use std::time::Duration;

use axum::http::StatusCode;

use super::TestServer;
use crate::views::FleetEvent;

/// Reads SSE frames from a streaming response.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event as (event name, data), skipping comments; `None` when the stream ends.
    async fn next(&mut self) -> Option<(String, FleetEvent)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut name = None;
                let mut data = None;
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = Some(v.trim().to_owned());
                    }
                }
                match (name, data) {
                    (Some(name), Some(data)) => {
                        return Some((name, serde_json::from_str(&data).unwrap()));
                    }
                    _ => continue, // a keep-alive comment
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("an SSE frame in time")
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

async fn open(server: &TestServer, query: &str) -> SseReader {
    let response = server.get(&format!("/api/v1/stream{query}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    SseReader::new(response)
}

#[tokio::test]
async fn streams_presence_events_and_honours_the_device_filter() {
    let server = TestServer::start().await;
    // Headers arrive only after the handler subscribed, so nothing below is missed.
    let mut all = open(&server, "").await;
    let mut only_t1 = open(&server, "?device=T-1").await;

    server.presence("T-2", true, 1000);
    server.presence("T-1", true, 2000);

    let (name, event) = all.next().await.unwrap();
    assert_eq!(name, "presence");
    assert_eq!(
        event,
        FleetEvent::Presence {
            device: "T-2".into(),
            online: true,
            reason: None,
            at_ms: 1000
        }
    );
    let (_, event) = all.next().await.unwrap();
    assert_eq!(event.device(), Some("T-1"));

    // T-2's event came first on the bus; the filtered stream must start with T-1's.
    let (name, event) = only_t1.next().await.unwrap();
    assert_eq!(name, "presence");
    assert_eq!(
        event,
        FleetEvent::Presence {
            device: "T-1".into(),
            online: true,
            reason: None,
            at_ms: 2000
        }
    );
    server.heartbeat("T-2", 3000);
    server.heartbeat("T-1", 4000);
    let (name, event) = only_t1.next().await.unwrap();
    assert_eq!(name, "heartbeat");
    assert_eq!(event.device(), Some("T-1"));
    server.stop().await;
}

#[tokio::test]
async fn a_lagging_client_is_told_and_keeps_streaming() {
    let server = TestServer::start_with(Default::default(), 4).await;
    let mut stream = open(&server, "").await;
    // The test runtime is single-threaded: the server cannot drain the bus while this loop
    // publishes, so the subscriber falls 6 events behind a ring of 4.
    for i in 0..10 {
        server.presence(&format!("T-{i}"), true, 1000 + i);
    }
    let (name, event) = stream.next().await.unwrap();
    assert_eq!(name, "lagged");
    assert_eq!(event, FleetEvent::Lagged { missed: 6 });
    for i in 6..10 {
        let (_, event) = stream.next().await.unwrap();
        assert_eq!(event.device(), Some(format!("T-{i}").as_str()));
    }
    server.presence("T-late", true, 5000);
    let (_, event) = stream.next().await.unwrap();
    assert_eq!(event.device(), Some("T-late"));
    server.stop().await;
}

#[tokio::test]
async fn streams_end_when_the_server_stops() {
    let server = TestServer::start().await;
    let mut stream = open(&server, "").await;
    server.presence("T-1", true, 1000);
    assert!(stream.next().await.is_some());
    server.stop().await;
    assert!(stream.next().await.is_none(), "the stream ended cleanly");
}

/// One event of every kind the bus carries (except `lagged`), about device T-1.
fn one_of_each_kind() -> Vec<FleetEvent> {
    let events = serde_json::json!([
        {"type": "presence", "device": "T-1", "online": true, "at_ms": 1},
        {"type": "heartbeat", "device": "T-1", "heartbeat": {
            "seq": 1, "sent_at_ms": 1, "received_at_ms": 1, "interval_s": 10, "uptime_s": 1,
            "outbox_depth": 0, "boot_id": 1}},
        {"type": "telemetry", "device": "T-1", "telemetry": {
            "sent_at_ms": 1, "received_at_ms": 1, "cpu_percent": 1.0, "memory_used_bytes": 1,
            "memory_total_bytes": 2, "disk_used_bytes": 1, "disk_total_bytes": 2,
            "uptime_s": 1, "load_average_1m": 0.1, "network": "wifi", "paper": "ok",
            "card_reader": "ok", "tamper": false, "dropped_samples": 0}},
        {"type": "transaction", "device": "T-1", "transaction": {
            "device": "T-1", "seq": 1, "txn_id": "txn-1", "timestamp_ms": 1,
            "received_at_ms": 1, "amount_minor": 1250, "currency": "EUR", "kind": "sale",
            "status": "approved", "entry_mode": "chip", "masked_card": "411111******1111",
            "merchant_id": "m-1"}},
        {"type": "alert", "device": "T-1", "alert": "sequence_gap", "severity": "warning",
         "seq": 4, "message": "gap", "at_ms": 1},
        {"type": "command", "id": "c-1", "device_id": "T-1", "kind": "lock",
         "status": "queued", "progress_percent": 0},
        {"type": "rollout", "id": "r-1", "state": "running", "message": "wave 1", "at_ms": 1},
    ]);
    serde_json::from_value(events).unwrap()
}

/// The kinds `token`'s stream delivers of [`one_of_each_kind`], in order.
async fn kinds_delivered(server: &TestServer, token: &str) -> Vec<String> {
    let response = server
        .send_as(token, reqwest::Method::GET, "/api/v1/stream", None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = SseReader::new(response);
    for event in one_of_each_kind() {
        server.events.publish(event);
    }
    // Every role may see presences: this one marks the end.
    server.events.publish(FleetEvent::Presence {
        device: "T-end".into(),
        online: true,
        reason: None,
        at_ms: 9,
    });
    let mut kinds = Vec::new();
    loop {
        let (name, event) = stream.next().await.expect("the stream goes on");
        if event.device() == Some("T-end") {
            return kinds;
        }
        kinds.push(name);
    }
}

#[tokio::test]
async fn each_role_receives_only_the_event_kinds_it_may_read() {
    use crate::accounts::Role;
    let server = TestServer::start().await;
    let everything: Vec<&str> = vec![
        "presence",
        "heartbeat",
        "telemetry",
        "transaction",
        "alert",
        "command",
        "rollout",
    ];
    // Viewers get 403 on /api/v1/transactions and the transaction summary: no transaction
    // (card, merchant, amount) and no transaction alert reaches them.
    let viewer = super::accounts::session(&server, "vera", Role::Viewer).await;
    assert_eq!(
        kinds_delivered(&server, &viewer).await,
        ["presence", "heartbeat", "telemetry", "command", "rollout"],
        "viewer"
    );
    let operator = super::accounts::session(&server, "otto", Role::Operator).await;
    assert_eq!(
        kinds_delivered(&server, &operator).await,
        everything,
        "operator"
    );
    let admin = super::accounts::session(&server, "ada", Role::Admin).await;
    assert_eq!(kinds_delivered(&server, &admin).await, everything, "admin");
    server.stop().await;
}

#[tokio::test]
async fn one_principal_cannot_hold_more_than_its_share_of_streams() {
    use crate::accounts::Role;
    let server = TestServer::start().await;
    let cap = crate::api::ApiLimits::default().max_streams_per_principal;
    let viewer = super::accounts::session(&server, "vera", Role::Viewer).await;
    let mut open = Vec::new();
    for _ in 0..cap {
        let response = server
            .send_as(&viewer, reqwest::Method::GET, "/api/v1/stream", None)
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        open.push(response);
    }
    let refused = server
        .send_as(&viewer, reqwest::Method::GET, "/api/v1/stream", None)
        .await;
    assert_eq!(
        refused.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "stream number {} of one viewer",
        cap + 1
    );
    assert!(refused.headers().contains_key("retry-after"));
    // Another principal is not affected.
    let other = super::accounts::session(&server, "otto", Role::Operator).await;
    let response = server
        .send_as(&other, reqwest::Method::GET, "/api/v1/stream", None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    // A stream that ends gives its slot back.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let response = server
            .send_as(&viewer, reqwest::Method::GET, "/api/v1/stream", None)
            .await;
        if response.status() == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot of the closed stream never came back: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// An account cannot multiply its stream share by minting API tokens: the cap counts every
/// stream of the account (its sessions and the tokens it made) together.
#[tokio::test]
async fn tokens_share_their_makers_stream_cap() {
    use crate::accounts::Role;
    use crate::api::CreatedToken;
    let server = TestServer::start().await;
    let cap = crate::api::ApiLimits::default().max_streams_per_principal;
    let operator = super::accounts::session(&server, "otto", Role::Operator).await;
    let mut tokens = Vec::new();
    for i in 0..cap {
        let response = server
            .send_as(
                &operator,
                reqwest::Method::POST,
                "/api/v1/tokens",
                Some(serde_json::json!({"name": format!("t{i}"), "role": "viewer", "expires_in_s": 3600})),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let created: CreatedToken = response.json().await.unwrap();
        tokens.push(created.token);
    }
    let mut open = Vec::new();
    for token in &tokens {
        let response = server
            .send_as(token, reqwest::Method::GET, "/api/v1/stream", None)
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        open.push(response);
    }
    let refused = server
        .send_as(&operator, reqwest::Method::GET, "/api/v1/stream", None)
        .await;
    assert_eq!(
        refused.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "otto opened stream number {} through a session after {cap} through his tokens",
        cap + 1
    );
    server.stop().await;
}
