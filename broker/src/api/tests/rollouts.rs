//! Rollouts through the API: creation (every field checked, nothing stored when refused),
//! list, detail, pause/resume/abort (409 when not applicable), and the command kinds that
//! only rollouts issue.

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::TestServer;
use crate::rollouts::tests::{ARTIFACT, LEGACY_ARTIFACT};
use crate::views::{CommandPage, ErrorBody, RolloutList, RolloutState, RolloutView};

impl TestServer {
    async fn rollouts(&self) -> Vec<RolloutView> {
        let list: RolloutList = self.get("/api/v1/rollouts").await.json().await.unwrap();
        list.rollouts
    }

    async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    /// Posts `body`, expects a 400 naming exactly `fields`, and checks nothing was stored.
    async fn refused_rollout(&self, body: Value, fields: &[&str]) {
        let before = self.rollouts().await.len();
        let response = self.post_json("/api/v1/rollouts", body.clone()).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: ErrorBody = response.json().await.unwrap();
        let keys: Vec<&str> = error.fields.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, fields, "{body}: {error:?}");
        assert!(error.hint.is_some());
        assert_eq!(self.rollouts().await.len(), before, "{body} stored nothing");
    }
}

fn now() -> u64 {
    posfleet_proto::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rollouts_are_refused_with_field_messages_and_nothing_is_stored() {
    let server = TestServer::start().await;
    for d in ["T-1", "T-2"] {
        server.heartbeat(d, now());
    }
    let good = || json!({"artifact_id": ARTIFACT, "target": {"devices": ["T-1", "T-2"]}});
    let with = |key: &str, value: Value| {
        let mut b = good();
        b[key] = value;
        b
    };
    server
        .refused_rollout(with("artifact_id", json!("b".repeat(64))), &["artifact_id"])
        .await;
    // Its min_version cannot be compared with any terminal's version.
    server
        .refused_rollout(
            with("artifact_id", json!(LEGACY_ARTIFACT)),
            &["artifact_id"],
        )
        .await;
    server
        .refused_rollout(json!({"target": {"devices": ["T-1"]}}), &["artifact_id"])
        .await;
    server
        .refused_rollout(with("target", json!({"devices": []})), &["target.devices"])
        .await;
    server
        .refused_rollout(with("target", json!({"group": "nobody"})), &["target"])
        .await;
    server
        .refused_rollout(
            with("target", json!({"devices": ["T-1", "T-9"]})),
            &["target.devices[1]"],
        )
        .await;
    for waves in [
        json!([10, 50]),
        json!([50, 10, 100]),
        json!([10, 10, 100]),
        json!([0, 100]),
        json!([]),
        json!("1,100"),
    ] {
        server
            .refused_rollout(with("waves", waves), &["waves"])
            .await;
    }
    for t in [json!(1.5), json!(-0.1), json!("high")] {
        server
            .refused_rollout(with("failure_threshold", t.clone()), &["failure_threshold"])
            .await;
        server
            .refused_rollout(with("success_threshold", t), &["success_threshold"])
            .await;
    }
    server
        .refused_rollout(with("success_threshold", json!(0)), &["success_threshold"])
        .await;
    server
        .refused_rollout(with("wave_timeout_s", json!(0)), &["wave_timeout_s"])
        .await;
    server
        .refused_rollout(
            with(
                "health_gate",
                json!({"max_approval_drop": 2, "color": "red"}),
            ),
            &["health_gate.color", "health_gate.max_approval_drop"],
        )
        .await;
    // Every problem at once.
    server
        .refused_rollout(
            json!({"artifact_id": "nope", "target": {"group": "nobody"}, "waves": [5],
                   "failure_threshold": 3, "extra": true}),
            &[
                "extra",
                "artifact_id",
                "target",
                "waves",
                "failure_threshold",
            ],
        )
        .await;
    // Software updates cannot be created as plain commands.
    let response = server
        .post_json(
            "/api/v1/commands",
            json!({"kind": "software_update", "target": {"devices": ["T-1"]}}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error: ErrorBody = response.json().await.unwrap();
    assert_eq!(error.fields[0].key, "kind");
    assert!(error.fields[0].message.contains("rollouts"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_are_created_listed_shown_paused_resumed_and_aborted() {
    let server = TestServer::start().await;
    for d in ["T-1", "T-2", "T-3"] {
        server.heartbeat(d, now());
    }
    let response = server
        .post_json(
            "/api/v1/rollouts",
            json!({"artifact_id": ARTIFACT, "target": {"devices": ["T-1", "T-2", "T-3"]},
                   "waves": [30, 100], "soak_s": 60,
                   "health_gate": {"min_transactions": 5}}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: RolloutView = response.json().await.unwrap();
    assert_eq!(created.state, RolloutState::Running { wave: 1 });
    assert_eq!(created.members, 3);
    assert_eq!(
        created.waves.iter().map(|w| w.members).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(created.health_gate.min_transactions, 5);
    assert_eq!(created.health_gate.max_unsent_ratio, 3.0);
    assert_eq!(
        (created.success_threshold, created.failure_threshold),
        (0.95, 0.05)
    );
    let id = created.id.clone();

    let shown: Value = server
        .get(&format!("/api/v1/rollouts/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["state"], "running");
    assert_eq!(shown["wave"], 1);
    assert_eq!(shown["waves"][1]["counts"]["not_started"], 2);
    assert_eq!(server.rollouts().await.len(), 1);
    // The canary's update is a command like any other (issued right after the rollout is
    // durable).
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let page: CommandPage = server
                .get("/api/v1/commands?kind=software_update")
                .await
                .json()
                .await
                .unwrap();
            if page.items.len() == 1 {
                break;
            }
            assert!(page.items.is_empty(), "one update for the one canary");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the canary's update is issued");

    let post = |verb: &'static str| {
        let path = format!("/api/v1/rollouts/{id}/{verb}");
        let server = &server;
        async move {
            server
                .post_json(&path, json!({"reason": "bad canary"}))
                .await
        }
    };
    assert_eq!(post("resume").await.status(), StatusCode::CONFLICT);
    let paused: RolloutView = post("pause").await.json().await.unwrap();
    assert_eq!(paused.state, RolloutState::Paused { wave: 1 });
    assert_eq!(post("pause").await.status(), StatusCode::CONFLICT);
    assert_eq!(post("resume").await.status(), StatusCode::OK);
    let aborted: RolloutView = post("abort").await.json().await.unwrap();
    assert!(
        matches!(&aborted.state, RolloutState::Aborted { reason } if reason.contains("bad canary"))
    );
    let conflict = post("abort").await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    let error: ErrorBody = conflict.json().await.unwrap();
    assert!(error.error.contains("aborted"), "{error:?}");
    assert_eq!(
        server
            .post_json("/api/v1/rollouts/nope/pause", json!({}))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server.get("/api/v1/rollouts/nope").await.status(),
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}
