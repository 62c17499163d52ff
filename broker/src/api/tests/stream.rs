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
