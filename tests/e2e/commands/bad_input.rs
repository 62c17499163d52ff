//! Refused create requests: a 4xx naming the field, and no command created.

use posfleet_broker::views::{CommandPage, ErrorBody};
use posfleet_tests::{Api, Posctl};
use reqwest::Method;
use serde_json::{Value, json};

use super::fast_broker;
use crate::support::{agent, online};

/// POSTs `body` to `/api/v1/commands`; asserts a 4xx whose field messages name `field`.
async fn refused(api: &Api, body: Value, field: &str) -> ErrorBody {
    let response = api
        .send(Method::POST, "/api/v1/commands", Some(&body))
        .await
        .expect("POST");
    let status = response.status();
    let text = response.text().await.expect("body");
    assert!(status.is_client_error(), "{body}: {status} {text}");
    let error: ErrorBody =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{body}: {e}: {text}"));
    assert!(
        error
            .fields
            .iter()
            .any(|f| f.key == field && !f.message.is_empty()),
        "{body}: expected a message for {field}: {error:?}"
    );
    error
}

#[tokio::test]
async fn commands_api_refuses_bad_requests_and_creates_nothing() {
    let broker = fast_broker().await;
    let api = broker.api();
    let _terminal = agent(&broker, "bad-1");
    online(api, "bad-1").await;
    let target = json!({"devices": ["bad-1"]});

    refused(
        api,
        json!({"kind": "self_destruct", "target": target}),
        "kind",
    )
    .await;
    refused(
        api,
        json!({"kind": "config_push", "target": target}),
        "kind",
    )
    .await;
    refused(api, json!({"target": target}), "kind").await;
    refused(api, json!({"kind": "lock", "target": target}), "reason").await;
    refused(
        api,
        json!({"kind": "lock", "target": target, "reason": "   "}),
        "reason",
    )
    .await;
    let long = "x".repeat(201);
    let e = refused(
        api,
        json!({"kind": "lock", "target": target, "reason": long}),
        "reason",
    )
    .await;
    assert!(e.fields.iter().any(|f| f.message.contains("200")), "{e:?}");
    refused(
        api,
        json!({"kind": "lock", "target": target, "reason": "a\u{7}bell"}),
        "reason",
    )
    .await;
    refused(
        api,
        json!({"kind": "reboot", "target": target, "reason": "why"}),
        "reason",
    )
    .await;
    refused(
        api,
        json!({"kind": "wipe", "target": target, "force": "yes"}),
        "force",
    )
    .await;
    refused(
        api,
        json!({"kind": "reboot", "target": target, "ttl_s": 0}),
        "ttl_s",
    )
    .await;
    refused(
        api,
        json!({"kind": "reboot", "target": target, "colour": "red"}),
        "colour",
    )
    .await;
    refused(api, json!({"kind": "reboot"}), "target").await;
    refused(
        api,
        json!({"kind": "reboot", "target": {"devices": []}}),
        "target.devices",
    )
    .await;
    refused(
        api,
        json!({"kind": "reboot", "target": {"devices": ["bad-1", "../etc"]}}),
        "target.devices[1]",
    )
    .await;
    let e = refused(
        api,
        json!({"kind": "reboot", "target": {"devices": ["bad-1", "nobody"]}}),
        "target.devices[1]",
    )
    .await;
    assert!(
        e.error.contains("nobody") || e.fields[0].message.contains("nobody"),
        "{e:?}"
    );
    refused(
        api,
        json!({"kind": "reboot", "target": {"group": "empty"}}),
        "target",
    )
    .await;
    refused(
        api,
        json!({"kind": "reboot", "target": {"labels": {"site": "moon"}}}),
        "target",
    )
    .await;
    refused(
        api,
        json!({"kind": "reboot", "target": {"group": "a/b"}}),
        "target.group",
    )
    .await;

    // Not JSON at all.
    let response = api
        .send_raw(
            Method::POST,
            "/api/v1/commands",
            "application/json",
            "{not json",
        )
        .await
        .expect("POST");
    assert_eq!(response.status(), reqwest::StatusCode::BAD_REQUEST);

    // posctl says which field is wrong and exits non-zero.
    let posctl = Posctl::new(&broker);
    let out = posctl
        .run(&["lock", "bad-1", "--reason", &"y".repeat(300)])
        .await
        .expect("posctl runs");
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("reason"), "{out}");
    let out = posctl
        .run(&["reboot", "--group", "empty"])
        .await
        .expect("posctl runs");
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("target"), "{out}");

    let page: CommandPage = api
        .get("/api/v1/commands")
        .await
        .expect("list")
        .json()
        .await
        .expect("CommandPage");
    let created: Vec<_> = page
        .items
        .iter()
        .filter(|c| c.body.kind() != "config_push")
        .collect();
    assert!(created.is_empty(), "nothing was created: {created:#?}");
    let d = api.device("bad-1").await.expect("GET").expect("device");
    assert!(d.desired.as_ref().is_none_or(|w| w.lock.is_none()), "{d:?}");
}
