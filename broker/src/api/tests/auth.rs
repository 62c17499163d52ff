//! Every route except `/healthz` refuses requests without the admin token.

use axum::http::StatusCode;

use super::super::protected_routes;
use super::{TOKEN, TestServer};
use crate::views::ErrorBody;

/// A concrete path for a route template (with the parameters a GET requires).
fn concrete(template: &str) -> String {
    let path = template.replace("{id}", "T-1").replace("{name}", "north");
    if path.ends_with("/config/diff") {
        format!("{path}?from=0")
    } else {
        path
    }
}

/// Layers for the concrete paths, so that their GET answers 200.
fn seed_config(server: &TestServer) {
    use crate::fleetconfig::Scope;
    for scope in ["group/north", "device/T-1"] {
        server
            .config
            .set(
                &Scope::parse(scope).unwrap(),
                Default::default(),
                &[],
                "test",
                "",
            )
            .unwrap();
    }
}

async fn assert_unauthorized(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
    let challenge = response
        .headers()
        .get("www-authenticate")
        .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"))
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
    let body: ErrorBody = response.json().await.unwrap();
    assert!(body.hint.is_some(), "{what}");
    assert!(!body.error.contains(TOKEN));
}

#[tokio::test]
async fn every_protected_route_refuses_without_the_token() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", 1000);
    let routes = protected_routes();
    assert!(!routes.is_empty());
    let mut refused = 0;
    for (template, _) in routes {
        let url = server.url(&concrete(template));
        let none = server.client.get(&url).send().await.unwrap();
        assert_unauthorized(none, &format!("{template} without a token")).await;
        let wrong = server
            .client
            .get(&url)
            .bearer_auth("0123456789abcdef0123456789abcdeX")
            .send()
            .await
            .unwrap();
        assert_unauthorized(wrong, &format!("{template} with a wrong token")).await;
        let basic = server
            .client
            .get(&url)
            .basic_auth("admin", Some(TOKEN))
            .send()
            .await
            .unwrap();
        assert_unauthorized(basic, &format!("{template} with basic auth")).await;
        let write = server.client.post(&url).send().await.unwrap();
        assert_unauthorized(write, &format!("POST {template} without a token")).await;
        for method in [
            reqwest::Method::PATCH,
            reqwest::Method::PUT,
            reqwest::Method::DELETE,
        ] {
            let write = server
                .client
                .request(method.clone(), &url)
                .json(&serde_json::json!({"set": {"display.brightness": 1}}))
                .send()
                .await
                .unwrap();
            assert_unauthorized(write, &format!("{method} {template} without a token")).await;
        }
        refused += 7;
    }
    // Nothing was changed by the refused writes.
    assert_eq!(server.config.version(), 0);
    // Unknown routes do not reveal whether they exist.
    let unknown = server.client.get(server.url("/nope")).send().await.unwrap();
    assert_unauthorized(unknown, "unknown route").await;
    refused += 1;
    assert_eq!(server.metrics.api_auth_failures_total.get(), refused);
    server.stop().await;
}

#[tokio::test]
async fn the_right_token_is_accepted_and_healthz_needs_none() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", 1000);
    seed_config(&server);
    for (template, _) in protected_routes() {
        if template.ends_with("/stream") {
            continue; // never ends; covered in stream.rs
        }
        let response = server.get(&concrete(template)).await;
        // Past the token check: write-only routes answer 405 to GET, command routes 404
        // for the made-up id; never 401.
        assert!(
            [
                StatusCode::OK,
                StatusCode::METHOD_NOT_ALLOWED,
                StatusCode::NOT_FOUND
            ]
            .contains(&response.status()),
            "{template}: {}",
            response.status()
        );
    }
    let lowercase = server
        .client
        .get(server.url("/api/v1/devices"))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lowercase.status(), StatusCode::OK);
    let health = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status": "ok"}));
    assert_eq!(server.metrics.api_auth_failures_total.get(), 0);
    server.stop().await;
}
