//! Operator-entered text (issue 10 item 7): card numbers in any notation, control characters
//! and bidi controls are refused at every request body field that carries text, with an
//! error naming the field, never echoing the value; nothing changes and no card number
//! reaches the audit log.

use axum::http::StatusCode;
use reqwest::Method;
use serde_json::{Value, json};

use super::TestServer;
use crate::views::ErrorBody;

/// Every digit group of the numbers below, to prove nothing is echoed.
const DIGITS: &str = "1111";

/// One refused request: what is sent and the field the error must name.
struct Case {
    method: Method,
    path: &'static str,
    body: Value,
    field: &'static str,
}

fn case(method: Method, path: &'static str, body: Value, field: &'static str) -> Case {
    Case {
        method,
        path,
        body,
        field,
    }
}

fn cases() -> Vec<Case> {
    let dotted = "4111.1111.1111.1111";
    let lettered = "4111a1111b1111c1111";
    let mixed = "4111:1111_1111+1111";
    let rlo = "note \u{202E}1111 etirw";
    vec![
        case(
            Method::PUT,
            "/api/v1/devices/T-1/groups",
            json!({"groups": ["north", dotted]}),
            "groups[1]",
        ),
        case(
            Method::PUT,
            "/api/v1/devices/T-1/labels",
            json!({"labels": {"site": dotted}}),
            "labels.site",
        ),
        case(
            Method::PUT,
            "/api/v1/devices/T-1/labels",
            json!({"labels": {dotted: "x"}}),
            "labels",
        ),
        case(
            Method::POST,
            "/api/v1/commands",
            json!({"kind": "lock", "target": {"devices": ["T-1"]}, "reason": format!("card {dotted}")}),
            "reason",
        ),
        case(
            Method::POST,
            "/api/v1/commands",
            json!({"kind": "unlock", "target": {"devices": ["T-1"]}, "reason": lettered}),
            "reason",
        ),
        case(
            Method::POST,
            "/api/v1/commands",
            json!({"kind": "lock", "target": {"devices": ["T-1"]}, "reason": rlo}),
            "reason",
        ),
        case(
            Method::POST,
            "/api/v1/commands",
            json!({"kind": "reboot", "target": {"group": dotted}}),
            "target.group",
        ),
        case(
            Method::POST,
            "/api/v1/commands",
            json!({"kind": "reboot", "target": {"labels": {"site": dotted}}}),
            "target.labels.site",
        ),
        case(
            Method::PATCH,
            "/api/v1/config/fleet",
            json!({"set": {"custom.ref": dotted}}),
            "custom.ref",
        ),
        case(
            Method::PATCH,
            "/api/v1/config/fleet",
            json!({"set": {"custom.ref": 4_111_111_111_111_111i64}}),
            "custom.ref",
        ),
        case(
            Method::PATCH,
            "/api/v1/config/fleet",
            json!({"set": {"receipt.footer": rlo}}),
            "receipt.footer",
        ),
        case(
            Method::PATCH,
            "/api/v1/config/fleet",
            json!({"set": {"store.name": "Shop"}, "comment": mixed}),
            "comment",
        ),
        case(
            Method::PUT,
            "/api/v1/config/groups/4111.1111.1111.1111",
            json!({"document": {"store.name": "Shop"}}),
            "group",
        ),
        // A layer for a device that is not registered: a new id entering the configuration.
        case(
            Method::PUT,
            "/api/v1/config/devices/4111.1111.1111.1111",
            json!({"document": {"store.name": "Shop"}}),
            "device_id",
        ),
        case(
            Method::PATCH,
            "/api/v1/config/devices/4111-1111-1111-1111",
            json!({"set": {"store.name": "Shop"}}),
            "device_id",
        ),
        case(
            Method::POST,
            "/api/v1/devices/T-1/custody",
            json!({"from": "depot", "to": "alice", "location": "Leeds", "note": rlo}),
            "note",
        ),
        case(
            Method::POST,
            "/api/v1/devices/T-1/custody",
            json!({"from": "depot", "to": "alice", "location": dotted}),
            "location",
        ),
        case(
            Method::POST,
            "/api/v1/devices/T-1/custody",
            json!({"from": "depot\u{2066}", "to": "alice", "location": "Leeds"}),
            "from",
        ),
        case(
            Method::POST,
            "/api/v1/devices/T-1/lost",
            json!({"reason": mixed}),
            "reason",
        ),
        case(
            Method::POST,
            "/api/v1/devices/T-1/found",
            json!({"note": lettered}),
            "note",
        ),
        case(
            Method::POST,
            "/api/v1/users",
            json!({"name": dotted, "role": "viewer"}),
            "name",
        ),
        case(
            Method::POST,
            "/api/v1/tokens",
            json!({"name": dotted, "role": "viewer", "expires_in_s": 3600}),
            "name",
        ),
        case(
            Method::POST,
            "/api/v1/rollouts/r-1/abort",
            json!({"reason": dotted}),
            "reason",
        ),
        case(
            Method::POST,
            "/api/v1/devices/T-1/revoke",
            json!({"reason": dotted}),
            "reason",
        ),
        case(
            Method::POST,
            "/api/v1/devices/T-1/decommission",
            json!({"reason": rlo}),
            "reason",
        ),
        case(
            Method::POST,
            "/api/v1/enrolment-tokens",
            json!({"expires_in": "24h", "group": dotted}),
            "group",
        ),
        case(
            Method::POST,
            "/api/v1/enrolment-tokens",
            json!({"expires_in": "24h", "serial": mixed.replace('+', "-")}),
            "serial",
        ),
        case(
            Method::POST,
            "/api/v1/artifacts?version=4111.1111.1111.1111",
            json!({}),
            "version",
        ),
    ]
}

#[tokio::test]
async fn card_numbers_and_bidi_controls_are_refused_in_every_text_field() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", posfleet_proto::now_ms());
    let mut failures = Vec::new();
    for c in cases() {
        let response = server
            .send(c.method.clone(), c.path, Some(c.body.clone()))
            .await;
        let status = response.status();
        let text = response.text().await.unwrap();
        let named = serde_json::from_str::<ErrorBody>(&text)
            .map(|e| e.fields.iter().any(|f| f.key == c.field))
            .unwrap_or(false);
        let refused = matches!(
            status,
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY
        );
        if !refused || !named || text.contains(DIGITS) {
            failures.push(format!(
                "{} {} ({}): {status} {text}",
                c.method, c.path, c.field
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests were not refused naming the field:\n{}",
        failures.len(),
        cases().len(),
        failures.join("\n")
    );

    // Nothing changed.
    let device: crate::views::DeviceDetail = server
        .get("/api/v1/devices/T-1")
        .await
        .json()
        .await
        .unwrap();
    assert!(device.summary.groups.is_empty(), "{device:?}");
    assert!(device.summary.labels.is_empty(), "{device:?}");
    assert_eq!(device.summary.lifecycle, crate::views::Lifecycle::Active);
    let commands: crate::views::CommandPage =
        server.get("/api/v1/commands").await.json().await.unwrap();
    assert!(commands.items.is_empty(), "{commands:?}");
    let layers: crate::views::ConfigLayerList = server
        .get("/api/v1/config/layers")
        .await
        .json()
        .await
        .unwrap();
    assert!(layers.layers.is_empty(), "{layers:?}");
    let custody: crate::views::CustodyHistory = server
        .get("/api/v1/devices/T-1/custody")
        .await
        .json()
        .await
        .unwrap();
    assert!(custody.entries.is_empty(), "{custody:?}");
    let users = server.get("/api/v1/users").await.text().await.unwrap();
    let tokens = server.get("/api/v1/tokens").await.text().await.unwrap();
    let enrolment = server
        .get("/api/v1/enrolment-tokens")
        .await
        .text()
        .await
        .unwrap();
    for listed in [&users, &tokens, &enrolment] {
        assert!(!listed.contains(DIGITS), "stored: {listed}");
    }

    // The audit log holds the refusals, without a card number or the bidi override.
    for record in server.recorded.records() {
        let text = serde_json::to_string(&record).unwrap();
        assert!(
            !posfleet_proto::pan::contains_pan(&record.target)
                && !posfleet_proto::pan::contains_pan(&record.detail)
                && !text.contains('\u{202E}'),
            "audited: {text}"
        );
    }
    server.stop().await;
}

/// A card number in a path segment (a user name, a group) never reaches the audit log.
#[tokio::test]
async fn card_numbers_in_paths_are_not_audited() {
    let server = TestServer::start().await;
    for (method, path) in [
        (Method::POST, "/api/v1/users/4111.1111.1111.1111/reset"),
        (Method::DELETE, "/api/v1/tokens/4111.1111.1111.1111"),
        (Method::DELETE, "/api/v1/config/groups/4111.1111.1111.1111"),
        (Method::GET, "/api/v1/nothing/4111.1111.1111.1111"),
        (Method::GET, "/api/v1/devices/4111.1111.1111.1111"),
        (Method::POST, "/api/v1/devices/4111.1111.1111.1111/revoke"),
    ] {
        let response = server.send(method, path, None).await;
        assert!(response.status().is_client_error(), "{path}");
        let text = response.text().await.unwrap();
        assert!(!text.contains(DIGITS), "echoed: {text}");
    }
    let records = server.recorded.records();
    assert!(records.len() >= 6, "{records:?}");
    for record in records {
        let text = serde_json::to_string(&record).unwrap();
        assert!(!text.contains(DIGITS), "audited: {text}");
    }
    server.stop().await;
}
