//! Commands, desired state, groups and labels through the API; every refused request
//! changes nothing.

use axum::http::StatusCode;
use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};
use serde_json::{Value, json};

use super::TestServer;
use crate::views::{
    CommandPage, CommandsCreated, DesiredView, DeviceDetail, DeviceList, ErrorBody,
};

impl TestServer {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> reqwest::Response {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn count(&self) -> usize {
        let page: CommandPage = self
            .get("/api/v1/commands?limit=1000")
            .await
            .json()
            .await
            .unwrap();
        page.items.len()
    }

    async fn refused(&self, body: Value, status: StatusCode, field: &str) {
        let before = self.count().await;
        let response = self.post("/api/v1/commands", body.clone()).await;
        assert_eq!(response.status(), status, "{body}");
        let error: ErrorBody = response.json().await.unwrap();
        assert_eq!(
            error.fields.first().map(|f| f.key.as_str()),
            Some(field),
            "{body}: {error:?}"
        );
        assert!(error.hint.is_some());
        assert_eq!(self.count().await, before, "{body} changed nothing");
    }
}

fn now() -> u64 {
    posfleet_proto::now_ms()
}

#[tokio::test]
async fn commands_are_created_listed_shown_and_cancelled() {
    let server = TestServer::start().await;
    for d in ["T-1", "T-2", "T-3"] {
        server.heartbeat(d, now());
    }
    let response = server
        .post(
            "/api/v1/commands",
            json!({"kind": "lock", "target": {"devices": ["T-1"]}, "reason": "stolen", "ttl_s": 600}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let created: CommandsCreated = response.json().await.unwrap();
    assert_eq!(created.commands.len(), 1);
    let lock = &created.commands[0];
    assert_eq!(lock.body.kind(), "lock");
    assert!(lock.not_after_ms <= now() + 600_000);
    let desired: DesiredView = server
        .get("/api/v1/devices/T-1/desired")
        .await
        .json()
        .await
        .unwrap();
    let want = desired.lock.unwrap();
    assert!(want.locked);
    assert_eq!((want.generation, want.reason.as_str()), (1, "stolen"));
    let detail: DeviceDetail = server
        .get("/api/v1/devices/T-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(detail.desired.unwrap().lock.unwrap().generation, 1);
    assert!(detail.reported.is_some());

    let response = server
        .post(
            "/api/v1/commands",
            json!({"kind": "reboot", "target": {"devices": ["T-1", "T-2", "T-3"]}}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let reboots: CommandsCreated = response.json().await.unwrap();
    assert_eq!(reboots.commands.len(), 3);

    // Pages of two, then the rest.
    let first: CommandPage = server
        .get("/api/v1/commands?limit=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    let cursor = first.next_cursor.unwrap();
    let rest: CommandPage = server
        .get(&format!("/api/v1/commands?limit=2&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 2);
    assert!(rest.next_cursor.is_none());
    let t1: CommandPage = server
        .get("/api/v1/commands?device=T-1&kind=reboot")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(t1.items.len(), 1);
    let bad = server.get("/api/v1/commands?status=sleeping").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    let id = &reboots.commands[0].id;
    let shown: Value = server
        .get(&format!("/api/v1/commands/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "queued");
    let cancel = server
        .post(&format!("/api/v1/commands/{id}/cancel"), json!({}))
        .await;
    assert_eq!(cancel.status(), StatusCode::OK);
    let shown: Value = server
        .get(&format!("/api/v1/commands/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "cancelled");
    // Cancelling a final command, or a lock, is a conflict that changes nothing.
    let again = server
        .post(&format!("/api/v1/commands/{id}/cancel"), json!({}))
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let lock_cancel = server
        .post(&format!("/api/v1/commands/{}/cancel", lock.id), json!({}))
        .await;
    assert_eq!(lock_cancel.status(), StatusCode::CONFLICT);
    let shown: Value = server
        .get(&format!("/api/v1/commands/{}", lock.id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "queued");
    assert_eq!(
        server.get("/api/v1/commands/nope").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server.get("/api/v1/commands/..%2Fx").await.status(),
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_a_field_error_and_change_nothing() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", now());
    let dev = json!({"devices": ["T-1"]});
    let long = "x".repeat(201);
    for (body, status, field) in [
        (
            json!({"kind": "dance", "target": dev}),
            StatusCode::BAD_REQUEST,
            "kind",
        ),
        (
            json!({"kind": "config_push", "target": dev}),
            StatusCode::BAD_REQUEST,
            "kind",
        ),
        (json!({"target": dev}), StatusCode::BAD_REQUEST, "kind"),
        (
            json!({"kind": "lock", "target": dev}),
            StatusCode::BAD_REQUEST,
            "reason",
        ),
        (
            json!({"kind": "lock", "target": dev, "reason": "  "}),
            StatusCode::BAD_REQUEST,
            "reason",
        ),
        (
            json!({"kind": "lock", "target": dev, "reason": long}),
            StatusCode::BAD_REQUEST,
            "reason",
        ),
        (
            json!({"kind": "reboot", "target": dev, "reason": "r"}),
            StatusCode::BAD_REQUEST,
            "reason",
        ),
        (
            json!({"kind": "reboot", "target": dev, "colour": 1}),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            json!({"kind": "wipe", "target": dev, "force": "yes"}),
            StatusCode::BAD_REQUEST,
            "force",
        ),
        (
            json!({"kind": "collect_logs", "target": dev, "max_bytes": 0}),
            StatusCode::BAD_REQUEST,
            "max_bytes",
        ),
        (
            json!({"kind": "reboot", "target": dev, "ttl_s": 31 * 86400}),
            StatusCode::BAD_REQUEST,
            "ttl_s",
        ),
        (json!({"kind": "reboot"}), StatusCode::BAD_REQUEST, "target"),
        (
            json!({"kind": "reboot", "target": {"group": "a b"}}),
            StatusCode::BAD_REQUEST,
            "target.group",
        ),
        (
            json!({"kind": "reboot", "target": {"group": "g", "labels": {"a": "b"}}}),
            StatusCode::BAD_REQUEST,
            "target",
        ),
        (
            json!({"kind": "reboot", "target": {"devices": []}}),
            StatusCode::BAD_REQUEST,
            "target.devices",
        ),
        (
            json!({"kind": "reboot", "target": {"devices": ["T-1", "a/b"]}}),
            StatusCode::BAD_REQUEST,
            "target.devices[1]",
        ),
        (
            json!({"kind": "reboot", "target": {"devices": ["T-1", "T-9"]}}),
            StatusCode::NOT_FOUND,
            "target.devices[1]",
        ),
        (
            json!({"kind": "reboot", "target": {"group": "nobody"}}),
            StatusCode::BAD_REQUEST,
            "target",
        ),
        (
            json!({"kind": "reboot", "target": {"labels": {"site": "mars"}}}),
            StatusCode::BAD_REQUEST,
            "target",
        ),
    ] {
        server.refused(body, status, field).await;
    }
    // No desired state appeared either.
    let desired: DesiredView = server
        .get("/api/v1/devices/T-1/desired")
        .await
        .json()
        .await
        .unwrap();
    assert!(desired.lock.is_none());
    assert_eq!(
        server.get("/api/v1/devices/T-9/desired").await.status(),
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test]
async fn groups_and_labels_are_set_durably_validated_and_select_devices() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", now());
    server.heartbeat("T-2", now());
    let r = server
        .put(
            "/api/v1/devices/T-1/groups",
            json!({"groups": ["pilot", "north"]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = server
        .put(
            "/api/v1/devices/T-1/labels",
            json!({"labels": {"site": "s1", "tier": "a"}}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // Durable: written to the registry's store before the answer.
    assert_eq!(server.registry.commit_pending(false).unwrap(), 0);
    for (path, body, field) in [
        (
            "/api/v1/devices/T-1/groups",
            json!({"groups": ["ok", "not ok"]}),
            "groups[1]",
        ),
        (
            "/api/v1/devices/T-1/groups",
            json!({"groups": "pilot"}),
            "groups",
        ),
        (
            "/api/v1/devices/T-1/labels",
            json!({"labels": {"k": "v/w"}}),
            "labels.k",
        ),
        (
            "/api/v1/devices/T-1/labels",
            json!({"labels": {"": "v"}}),
            "labels.",
        ),
    ] {
        let r = server.put(path, body).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let e: ErrorBody = r.json().await.unwrap();
        assert_eq!(e.fields.first().map(|f| f.key.as_str()), Some(field));
    }
    let unknown = server
        .put("/api/v1/devices/T-9/groups", json!({"groups": []}))
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let detail: DeviceDetail = server
        .get("/api/v1/devices/T-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(detail.summary.groups.len(), 2);
    assert_eq!(detail.summary.labels["site"], "s1");
    let ids = |list: DeviceList| list.devices.into_iter().map(|d| d.id).collect::<Vec<_>>();
    let pilot: DeviceList = server
        .get("/api/v1/devices?group=pilot")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids(pilot), ["T-1"]);
    let labelled: DeviceList = server
        .get("/api/v1/devices?label=site=s1&label=tier=a")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids(labelled), ["T-1"]);
    let none: DeviceList = server
        .get("/api/v1/devices?label=site=s2")
        .await
        .json()
        .await
        .unwrap();
    assert!(none.devices.is_empty());
    assert_eq!(
        server.get("/api/v1/devices?label=site").await.status(),
        StatusCode::BAD_REQUEST
    );
    // Targets by group and by labels.
    let by_group = server
        .post(
            "/api/v1/commands",
            json!({"kind": "reboot", "target": {"group": "pilot"}}),
        )
        .await;
    assert_eq!(by_group.status(), StatusCode::ACCEPTED);
    let by_model = server
        .post(
            "/api/v1/commands",
            json!({"kind": "reboot", "target": {"labels": {"site": "s1"}}}),
        )
        .await;
    let created: CommandsCreated = by_model.json().await.unwrap();
    assert_eq!(created.commands[0].device_id, "T-1");
    server.stop().await;
}

#[tokio::test]
async fn log_uploads_are_served_once_there_are_some() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", now());
    let created: CommandsCreated = server
        .post(
            "/api/v1/commands",
            json!({"kind": "collect_logs", "target": {"devices": ["T-1"]}, "max_bytes": 100}),
        )
        .await
        .json()
        .await
        .unwrap();
    let reboot: CommandsCreated = server
        .post(
            "/api/v1/commands",
            json!({"kind": "reboot", "target": {"devices": ["T-1"]}}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = &created.commands[0].id;
    assert_eq!(
        server.get("/api/v1/commands/feed/logs").await.status(),
        StatusCode::NOT_FOUND
    );
    let not_logs = server
        .get(&format!("/api/v1/commands/{}/logs", reboot.commands[0].id))
        .await;
    assert_eq!(not_logs.status(), StatusCode::CONFLICT);
    let empty = server.get(&format!("/api/v1/commands/{id}/logs")).await;
    assert_eq!(empty.status(), StatusCode::CONFLICT);
    let chunk = pb::LogChunk {
        command_id: id.clone(),
        offset: 0,
        data: b"line 1\n".to_vec(),
        last: true,
        total_bytes: 7,
    };
    let topic = Topic::for_device(&DeviceId::new("T-1").unwrap(), Channel::LogChunk);
    server
        .ingest
        .handle(&topic, &encode(&chunk).unwrap(), now())
        .unwrap();
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let r = server.get(&format!("/api/v1/commands/{id}/logs")).await;
            if r.status() == StatusCode::OK {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the upload is served");
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"line 1\n");
    server.stop().await;
}
