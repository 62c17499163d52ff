//! Configuration layers, history, diff, schema and effective configuration over HTTPS.

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{TOKEN, TestServer};
use crate::views::{
    ConfigChangeKind, ConfigDiffView, ConfigHistoryPage, ConfigLayerList, ConfigLayerView,
    ConfigSchemaView, EffectiveConfigView, ErrorBody,
};

impl TestServer {
    async fn patch(&self, path: &str, body: Value) -> reqwest::Response {
        self.send(reqwest::Method::PATCH, path, Some(body)).await
    }
}

async fn layer(response: reqwest::Response) -> ConfigLayerView {
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn error(response: reqwest::Response, status: StatusCode) -> ErrorBody {
    assert_eq!(response.status(), status);
    let body: ErrorBody = response.json().await.unwrap();
    assert!(body.hint.is_some(), "{body:?}");
    body
}

#[tokio::test]
async fn layers_are_set_read_listed_and_merged_for_a_device() {
    let server = TestServer::start().await;
    let fleet = layer(server.get("/api/v1/config/fleet").await).await;
    assert_eq!((fleet.version, fleet.document.len()), (0, 0));

    let fleet = layer(
        server
            .patch(
                "/api/v1/config/fleet",
                json!({"set": {"payment.currency": "EUR", "display.brightness": 50}, "comment": "defaults"}),
            )
            .await,
    )
    .await;
    assert_eq!(fleet.version, 1);
    assert_eq!(fleet.author, "admin");
    let north = layer(
        server
            .patch(
                "/api/v1/config/groups/north",
                json!({"set": {"display.brightness": 60}}),
            )
            .await,
    )
    .await;
    assert_eq!((north.scope.as_str(), north.version), ("group/north", 2));
    layer(
        server
            .patch(
                "/api/v1/config/groups/south",
                json!({"set": {"display.brightness": 70, "store.name": "S"}}),
            )
            .await,
    )
    .await;
    let device = layer(
        server
            .patch(
                "/api/v1/config/devices/G-1",
                json!({"set": {"store.name": "mine"}}),
            )
            .await,
    )
    .await;
    assert_eq!(device.version, 4);

    let got = layer(server.get("/api/v1/config/groups/north").await).await;
    assert_eq!(got, north);
    let list: ConfigLayerList = server
        .get("/api/v1/config/layers")
        .await
        .json()
        .await
        .unwrap();
    let scopes: Vec<&str> = list.layers.iter().map(|l| l.scope.as_str()).collect();
    assert_eq!(
        scopes,
        ["fleet", "group/north", "group/south", "device/G-1"]
    );
    assert_eq!(list.version, 4);

    // G-1 is in north and south: south wins over north, the device wins.
    server.presence("G-1", true, 1);
    let id = posfleet_proto::DeviceId::new("G-1").unwrap();
    let groups = ["north", "south"].into_iter().map(str::to_owned).collect();
    assert!(server.registry.set_groups(&id, groups));
    let eff: EffectiveConfigView = server
        .get("/api/v1/devices/G-1/config")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(eff.groups, ["north", "south"]);
    assert_eq!(eff.version, 4);
    assert_eq!(eff.document["display.brightness"], json!(70));
    assert_eq!(eff.document["store.name"], json!("mine"));
    assert_eq!(eff.sources["display.brightness"], "group/south");
    assert_eq!(eff.sources["payment.currency"], "fleet");
    assert_eq!(eff.sources["store.name"], "device/G-1");
    // A device in no group, not even known to the registry, gets the fleet layer.
    let other: EffectiveConfigView = server
        .get("/api/v1/devices/T-9/config")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!((other.version, other.document.len()), (1, 2));
    server.stop().await;
}

#[tokio::test]
async fn invalid_values_get_field_messages_and_store_nothing() {
    let server = TestServer::start().await;
    layer(
        server
            .patch(
                "/api/v1/config/fleet",
                json!({"set": {"display.brightness": 5}}),
            )
            .await,
    )
    .await;
    let response = server
        .patch(
            "/api/v1/config/fleet",
            json!({"set": {
                "display.brightness": "bright",
                "payment.currency": "eur",
                "payment.max_amount_minor": 1.5,
                "nope": 1,
                "custom.ok": "fine"
            }}),
        )
        .await;
    let body = error(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    let keys: Vec<&str> = body.fields.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "display.brightness",
            "nope",
            "payment.currency",
            "payment.max_amount_minor"
        ]
    );
    assert!(
        body.fields[0]
            .message
            .contains("expected an integer, got a string")
    );
    assert!(!body.fields.iter().any(|f| f.message.contains("bright")));
    // Wrong shapes: unset not an array, an unknown body field, set not an object.
    for bad in [
        json!({"unset": "display.brightness"}),
        json!({"set": {}, "extra": 1}),
        json!({"set": 5}),
    ] {
        // axum's Json answers 422 for well-formed JSON of the wrong shape.
        let response = server.patch("/api/v1/config/fleet", bad).await;
        error(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let nested = server
        .patch(
            "/api/v1/config/fleet",
            json!({"set": {"custom.x": {"a": 1}}}),
        )
        .await;
    let body = error(nested, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body.fields[0].key, "custom.x");
    let not_json = server
        .client
        .patch(server.url("/api/v1/config/fleet"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    error(not_json, StatusCode::BAD_REQUEST).await;

    let fleet = layer(server.get("/api/v1/config/fleet").await).await;
    assert_eq!(fleet.version, 1);
    assert_eq!(
        fleet.document,
        serde_json::from_value::<serde_json::Map<String, Value>>(json!({"display.brightness": 5}))
            .unwrap()
    );
    assert_eq!(server.config.version(), 1);
    server.stop().await;
}

#[tokio::test]
async fn bad_scopes_unknown_layers_and_oversize_documents() {
    let server = TestServer::start().await;
    let long = "g".repeat(65);
    for path in [
        "/api/v1/config/groups/a%20b".to_owned(),
        "/api/v1/config/groups/a%2Fb".to_owned(),
        format!("/api/v1/config/groups/{long}"),
        "/api/v1/config/devices/-x".to_owned(),
        "/api/v1/devices/-x/config".to_owned(),
        "/api/v1/config/history?scope=groups/x".to_owned(),
        "/api/v1/config/history?limit=0".to_owned(),
        "/api/v1/config/history?before=x".to_owned(),
        "/api/v1/config/history?what=1".to_owned(),
        "/api/v1/config/diff".to_owned(),
        "/api/v1/config/diff?from=2&to=1".to_owned(),
        "/api/v1/config/diff?from=0&to=99".to_owned(),
        "/api/v1/config/diff?from=0&scope=fleet/x".to_owned(),
    ] {
        error(server.get(&path).await, StatusCode::BAD_REQUEST).await;
    }
    error(
        server.get("/api/v1/config/groups/none").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    error(
        server.get("/api/v1/config/devices/T-1").await,
        StatusCode::NOT_FOUND,
    )
    .await;
    error(
        server
            .send(reqwest::Method::DELETE, "/api/v1/config/groups/none", None)
            .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    error(
        server
            .send(
                reqwest::Method::POST,
                "/api/v1/config/fleet",
                Some(json!({})),
            )
            .await,
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .await;

    let mut document = serde_json::Map::new();
    for i in 0..201 {
        document.insert(format!("custom.k{i}"), json!(i));
    }
    let body = error(
        server
            .send(
                reqwest::Method::PUT,
                "/api/v1/config/fleet",
                Some(json!({"document": document})),
            )
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(body.fields[0].key, "(document)");
    let huge = "x".repeat(300 * 1024);
    let response = server
        .patch("/api/v1/config/fleet", json!({"set": {"custom.x": huge}}))
        .await;
    error(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(server.config.version(), 0);
    server.stop().await;
}

#[tokio::test]
async fn replace_delete_history_diff_and_schema() {
    let server = TestServer::start().await;
    let path = "/api/v1/config/groups/north";
    layer(
        server
            .patch(
                path,
                json!({"set": {"display.brightness": 1, "store.name": "a"}}),
            )
            .await,
    )
    .await;
    let replaced = layer(
        server
            .send(
                reqwest::Method::PUT,
                path,
                Some(json!({"document": {"display.brightness": 2}, "comment": "replace"})),
            )
            .await,
    )
    .await;
    assert_eq!(replaced.version, 2);
    assert_eq!(replaced.document.len(), 1);
    let deleted = layer(
        server
            .send(
                reqwest::Method::DELETE,
                &format!("{path}?comment=gone"),
                None,
            )
            .await,
    )
    .await;
    assert!(deleted.deleted);
    assert_eq!(deleted.version, 3);
    error(server.get(path).await, StatusCode::NOT_FOUND).await;

    let page: ConfigHistoryPage = server
        .get("/api/v1/config/history?scope=group/north&limit=2")
        .await
        .json()
        .await
        .unwrap();
    let kinds: Vec<ConfigChangeKind> = page.entries.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [ConfigChangeKind::Delete, ConfigChangeKind::Replace]);
    assert_eq!(page.entries[0].comment, "gone");
    assert_eq!(page.next_before, Some(2));
    let older: ConfigHistoryPage = server
        .get("/api/v1/config/history?scope=group/north&before=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(older.entries.len(), 1);
    assert_eq!(older.entries[0].diff.len(), 2);
    assert_eq!(older.next_before, None);

    let diff: ConfigDiffView = server
        .get("/api/v1/config/diff?scope=group/north&from=1&to=2")
        .await
        .json()
        .await
        .unwrap();
    let keys: Vec<(&str, Option<&Value>, Option<&Value>)> = diff
        .changes
        .iter()
        .map(|c| (c.key.as_str(), c.old.as_ref(), c.new.as_ref()))
        .collect();
    assert_eq!(
        keys,
        [
            ("display.brightness", Some(&json!(1)), Some(&json!(2))),
            ("store.name", Some(&json!("a")), None)
        ]
    );
    let to_now: ConfigDiffView = server
        .get("/api/v1/config/diff?from=0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(to_now.to, 3);
    assert!(
        to_now.changes.is_empty(),
        "created and deleted: nothing differs"
    );

    let schema: ConfigSchemaView = server
        .get("/api/v1/config/schema")
        .await
        .json()
        .await
        .unwrap();
    assert!(schema.keys.iter().any(|k| k.key == "payment.currency"));
    assert_eq!(schema.custom_prefix, "custom.");
    assert_eq!(schema.max_document_bytes, 64 * 1024);
    server.stop().await;
}
