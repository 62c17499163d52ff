//! Every route except the open ones refuses requests without a valid token; each route's role
//! is enforced.

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
    for template in routes.iter().map(|r| r.path) {
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
    for template in protected_routes().iter().map(|r| r.path) {
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

#[test]
fn only_health_login_and_enrolment_are_open_and_every_route_declares_a_role() {
    let open: Vec<&str> = super::super::open_routes()
        .iter()
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(open, ["/healthz", "/api/v1/auth/login", "/api/v1/enroll"]);
    let routes = protected_routes();
    let mut seen = std::collections::HashSet::new();
    for r in &routes {
        assert!(seen.insert(r.path), "{} twice", r.path);
        assert!(
            !open.contains(&r.path),
            "{} both open and protected",
            r.path
        );
        // Writing never needs less than reading.
        assert!(r.write >= r.read, "{}", r.path);
        // Only self-service routes are open to restricted sessions, and they need no more
        // than viewer.
        if r.restricted_ok {
            assert!(r.path.starts_with("/api/v1/auth/"), "{}", r.path);
        }
    }
    // The mutating routes a viewer may call are exactly the self-service ones.
    let viewer_writes: Vec<&str> = routes
        .iter()
        .filter(|r| r.write == crate::accounts::Role::Viewer)
        .map(|r| r.path)
        .collect();
    assert_eq!(
        viewer_writes,
        [
            "/api/v1/auth/whoami",
            "/api/v1/auth/logout",
            "/api/v1/auth/password",
            "/api/v1/auth/mfa/enrol",
            "/api/v1/auth/mfa/confirm"
        ]
    );
}

#[tokio::test]
async fn a_viewer_is_refused_every_mutating_route_and_an_operator_every_admin_route() {
    use crate::accounts::Role;
    let server = TestServer::start().await;
    server.heartbeat("T-1", 1000);
    let viewer = super::accounts::session(&server, "vera", Role::Viewer).await;
    let operator = super::accounts::session(&server, "otto", Role::Operator).await;
    let mut denied = 0u64;
    let mut mutating_denied = std::collections::HashSet::new();
    for r in protected_routes() {
        let url = server.url(&concrete(r.path));
        for method in [
            reqwest::Method::POST,
            reqwest::Method::PUT,
            reqwest::Method::PATCH,
            reqwest::Method::DELETE,
        ] {
            for (who, token, role) in [
                ("viewer", &viewer, Role::Viewer),
                ("operator", &operator, Role::Operator),
            ] {
                if role.allows(r.write) {
                    continue;
                }
                let response = server
                    .client
                    .request(method.clone(), &url)
                    .bearer_auth(token)
                    .json(&serde_json::json!({"set": {"display.brightness": 1}}))
                    .send()
                    .await
                    .unwrap();
                // A method the route does not have is 405 for everyone; every method it has
                // is 403 for a role below the route's.
                if response.status() == StatusCode::METHOD_NOT_ALLOWED {
                    continue;
                }
                assert_eq!(
                    response.status(),
                    StatusCode::FORBIDDEN,
                    "{who} {method} {}",
                    r.path
                );
                let body: ErrorBody = response.json().await.unwrap();
                assert!(body.error.contains("role"), "{}", body.error);
                mutating_denied.insert((who, r.path));
                denied += 1;
            }
        }
        // Reads below the route's read role are refused too.
        if !Role::Viewer.allows(r.read) {
            let response = server
                .client
                .get(&url)
                .bearer_auth(&viewer)
                .send()
                .await
                .unwrap();
            if response.status() == StatusCode::METHOD_NOT_ALLOWED {
                continue; // a write-only route
            }
            assert_eq!(
                response.status(),
                StatusCode::FORBIDDEN,
                "viewer GET {}",
                r.path
            );
            denied += 1;
        }
    }
    assert_eq!(server.config.version(), 0, "nothing changed");
    // Every route with a mutating method above viewer refused the viewer.
    let expected_viewer: Vec<&str> = protected_routes()
        .iter()
        .filter(|r| r.write > Role::Viewer)
        .filter(|r| {
            // GET-only routes have no mutating method.
            !matches!(
                r.path,
                "/api/v1/devices"
                    | "/api/v1/devices/{id}"
                    | "/api/v1/devices/{id}/desired"
                    | "/api/v1/commands/{id}"
                    | "/api/v1/commands/{id}/logs"
                    | "/api/v1/devices/{id}/transactions/summary"
                    | "/api/v1/devices/{id}/config"
                    | "/api/v1/transactions"
                    | "/api/v1/config/layers"
                    | "/api/v1/config/history"
                    | "/api/v1/config/diff"
                    | "/api/v1/config/schema"
                    | "/api/v1/rollouts/{id}"
                    | "/api/v1/approvals"
                    | "/api/v1/approvals/{id}"
                    | "/api/v1/audit"
                    | "/api/v1/audit/anchor"
                    | "/api/v1/audit/export"
                    | "/api/v1/pki/crl"
                    | "/api/v1/devices/{id}/certificates"
                    | "/api/v1/stream"
                    | "/metrics"
            )
        })
        .map(|r| r.path)
        .collect();
    for path in &expected_viewer {
        assert!(
            mutating_denied.contains(&("viewer", *path)),
            "viewer not refused on {path}"
        );
    }
    // Refusals are counted and written aggregated (one entry per principal, route and
    // window) when the log is read; the counts add up.
    assert_eq!(server.get("/api/v1/audit").await.status(), StatusCode::OK);
    let records = server.recorded.records();
    let entries: Vec<_> = records
        .iter()
        .filter(|r| r.action == "api.denied" && r.outcome == crate::audit::Outcome::Denied)
        .collect();
    let audited: u64 = entries
        .iter()
        .map(|r| crate::audit::refusal_count(&r.detail).unwrap_or(1))
        .sum();
    assert_eq!(audited, denied);
    // A refusal by role is not a request: no `requested` entry was written for one.
    assert!(
        !records
            .iter()
            .any(|r| r.outcome == crate::audit::Outcome::Requested
            && (r.actor == "vera" || r.actor == "otto")
            // Their own password changes (setting up the sessions) are requests.
            && !r.action.contains("/api/v1/auth/password")),
        "a refused request got a `requested` audit entry: {:?}",
        records
            .iter()
            .filter(|r| r.outcome == crate::audit::Outcome::Requested
                && (r.actor == "vera" || r.actor == "otto"))
            .collect::<Vec<_>>()
    );
    assert!(denied > 40, "{denied}");
    server.stop().await;
}
