//! `watch` against the canned server.

use super::*;

#[tokio::test]
async fn watch_renders_one_line_per_event_and_stops_after_count() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["watch", "--count", "2"]).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        out,
        "13:05:09  T-1           presence   online\n\
         13:05:09  T-2           heartbeat  seq 9  uptime 42s  outbox 0\n"
    );
}

#[tokio::test]
async fn watch_json_prints_json_lines_for_one_device() {
    let fx = Fixture::start().await;
    let (result, out) = fx
        .posctl(&[
            "--output", "json", "watch", "--device", "T-1", "--count", "2",
        ])
        .await;
    assert!(result.is_ok(), "{result:?}");
    let events: Vec<FleetEvent> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let expected: Vec<FleetEvent> = canned_events()
        .into_iter()
        .filter(|e| e.device() == Some("T-1"))
        .collect();
    assert_eq!(events, expected);
}

#[tokio::test]
async fn watch_reports_a_closed_stream_as_an_error() {
    let fx = Fixture::start().await;
    let (result, out) = fx.posctl(&["watch"]).await;
    let message = error_text(result);
    assert!(
        message.contains("the server closed the stream") && message.contains("after 3 events"),
        "{message}"
    );
    assert_eq!(out.lines().count(), 3, "{out}");
}

#[tokio::test]
async fn watch_stops_cleanly_when_asked() {
    let fx = Fixture::start().await;
    let data_dir = fx.data_dir.display().to_string();
    let opened = fx.shared.stream_opened.clone();
    let (result, out) = posctl(
        &["--data-dir", &data_dir, "watch", "--device", "T-idle"],
        async move { opened.notified().await },
    )
    .await;
    assert!(
        matches!(result, Ok(code) if code == ExitCode::SUCCESS),
        "{result:?}"
    );
    assert_eq!(out, "");
}

#[tokio::test]
async fn watch_timeout_ends_quietly_or_fails_when_events_were_expected() {
    let fx = Fixture::start().await;
    let (result, _) = fx
        .posctl(&["watch", "--device", "T-idle", "--timeout", "200ms"])
        .await;
    assert!(result.is_ok(), "{result:?}");
    let (result, _) = fx
        .posctl(&[
            "watch",
            "--device",
            "T-idle",
            "--count",
            "1",
            "--timeout",
            "200ms",
        ])
        .await;
    let message = error_text(result);
    assert!(
        message.starts_with("only 0 of 1 events arrived within 0.2s"),
        "{message}"
    );
}

#[tokio::test]
async fn watch_without_a_token_is_refused_before_streaming() {
    let fx = Fixture::start().await;
    let wrong = fx.data_dir.join("wrong.token");
    std::fs::write(&wrong, "nope\n").unwrap();
    let wrong = wrong.display().to_string();
    let (result, _) = fx.posctl(&["--token-file", &wrong, "watch"]).await;
    assert!(error_text(result).contains("401 Unauthorized"));
}

#[tokio::test]
async fn watch_timeout_covers_a_server_that_never_answers() {
    let fx = Fixture::start().await;
    let (result, _) = fx
        .posctl(&[
            "watch",
            "--device",
            "T-hang",
            "--count",
            "1",
            "--timeout",
            "200ms",
        ])
        .await;
    let message = error_text(result);
    assert!(
        message.starts_with("only 0 of 1 events arrived"),
        "{message}"
    );
}
