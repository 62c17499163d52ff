//! Two-person approval with real principals (issue 10, item 1): an approval counts only from a
//! different human account in an MFA-verified session; API tokens (which act for the account
//! that made them) and the bootstrap token never approve; locks by one account add up within
//! the rolling window, `lost` reports included.

use axum::http::StatusCode;
use reqwest::Method;
use serde_json::{Value, json};

use super::accounts::{GOOD, create, ok_login, session, session_and_secret};
use super::{AuditSetup, TestServer};
use crate::accounts::{Role, totp};
use crate::api::{ApiLimits, CreatedToken};
use crate::approvals::ApprovalPolicy;
use crate::views::{ApprovalDecided, ApprovalRequired, ApprovalState, CommandPage};

/// Default policy: wipes always, locks beyond 10 terminals per account and hour.
async fn server() -> TestServer {
    let server = TestServer::start_audited(
        ApiLimits::default(),
        64,
        super::ArtifactSetup::default(),
        AuditSetup {
            sink: None,
            approvals: ApprovalPolicy::default(),
        },
    )
    .await;
    let now = server.clock();
    for i in 1..=13 {
        server.heartbeat(&format!("T-{i}"), now);
    }
    server
}

/// An admin API token made by the holder of `session`.
async fn token(server: &TestServer, session: &str, name: &str) -> String {
    let response = server
        .send_as(
            session,
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": name, "role": "admin", "expires_in_s": 86_400})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED, "token {name}");
    response.json::<CreatedToken>().await.unwrap().token
}

/// A wipe of T-1 requested with `token`: the pending approval's id.
async fn request_wipe(server: &TestServer, token: &str) -> String {
    let response = server
        .send_as(
            token,
            Method::POST,
            "/api/v1/commands",
            Some(json!({"kind": "wipe", "target": {"devices": ["T-1"]}})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let ApprovalRequired { approval } = response.json().await.unwrap();
    assert_eq!(approval.state, ApprovalState::Pending);
    approval.id
}

async fn approve(server: &TestServer, token: &str, id: &str) -> reqwest::Response {
    server
        .send_as(
            token,
            Method::POST,
            &format!("/api/v1/approvals/{id}/approve"),
            None,
        )
        .await
}

async fn wipes(server: &TestServer) -> usize {
    let page: CommandPage = server
        .get("/api/v1/commands?kind=wipe&limit=1000")
        .await
        .json()
        .await
        .unwrap();
    page.items.len()
}

#[tokio::test]
async fn only_another_human_account_in_an_mfa_session_approves() {
    let server = server().await;
    let (ada, ada_secret) = session_and_secret(&server, "ada", Role::Admin).await;
    let bob = session(&server, "bob", Role::Admin).await;
    let ada_token = token(&server, &ada, "ada-ci").await;
    // A token made with the bootstrap token acts for no human account.
    let boot_token = {
        let response = server
            .send(
                Method::POST,
                "/api/v1/tokens",
                Some(json!({"name": "auto", "role": "admin", "expires_in_s": 86_400})),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json::<CreatedToken>().await.unwrap().token
    };
    // An admin account without MFA: its session is restricted (and not MFA-verified).
    let carl = {
        let initial = create(&server, "carl", Role::Admin).await;
        let first = ok_login(&server, "carl", &initial, None).await;
        super::accounts::change_password(&server, &first.token, &initial, GOOD).await;
        ok_login(&server, "carl", GOOD, None).await.token
    };
    // A second session of ada's (the next TOTP step).
    server.advance(totp::STEP_MS);
    let code = totp::code_text(&ada_secret, server.clock()).unwrap();
    let ada_again = ok_login(&server, "ada", GOOD, Some(&code)).await.token;

    // ada asks with her session.
    let id = request_wipe(&server, &ada).await;
    for (who, token) in [
        ("ada's own API token", ada_token.as_str()),
        ("the bootstrap token", super::TOKEN),
        ("a token made with the bootstrap token", boot_token.as_str()),
        ("ada's second session", ada_again.as_str()),
        ("an admin session without MFA", carl.as_str()),
    ] {
        let response = approve(&server, token, &id).await;
        assert_eq!(
            response.status(),
            StatusCode::FORBIDDEN,
            "{who} approved ada's wipe"
        );
        assert_eq!(wipes(&server).await, 0, "{who}: a wipe was issued");
    }
    let response = approve(&server, &bob, &id).await;
    assert_eq!(response.status(), StatusCode::OK, "another MFA admin");
    let decided: ApprovalDecided = response.json().await.unwrap();
    assert_eq!(decided.approval.decided_by.as_deref(), Some("bob"));
    assert_eq!(wipes(&server).await, 1);

    // A request made with ada's token is ada's: her session cannot approve it either.
    let id = request_wipe(&server, &ada_token).await;
    for (who, token) in [
        ("ada's session", ada.as_str()),
        ("ada's own API token", ada_token.as_str()),
    ] {
        let response = approve(&server, token, &id).await;
        assert_eq!(
            response.status(),
            StatusCode::FORBIDDEN,
            "{who} approved a wipe asked with ada's token"
        );
    }
    assert_eq!(wipes(&server).await, 1);
    assert_eq!(approve(&server, &bob, &id).await.status(), StatusCode::OK);

    // The bootstrap token asks: neither it nor its tokens approve; a human admin does.
    let id = request_wipe(&server, super::TOKEN).await;
    for (who, token) in [
        ("the bootstrap token", super::TOKEN),
        ("a token made with the bootstrap token", boot_token.as_str()),
    ] {
        let response = approve(&server, token, &id).await;
        assert_eq!(
            response.status(),
            StatusCode::FORBIDDEN,
            "{who} approved the bootstrap token's wipe"
        );
    }
    let reject = server
        .send_as(
            &ada_token,
            Method::POST,
            &format!("/api/v1/approvals/{id}/reject"),
            None,
        )
        .await;
    assert_eq!(
        reject.status(),
        StatusCode::FORBIDDEN,
        "tokens do not decide"
    );
    assert_eq!(approve(&server, &ada, &id).await.status(), StatusCode::OK);
    assert_eq!(wipes(&server).await, 3);
    server.stop().await;
}

fn lock(devices: &[&str]) -> Value {
    json!({"kind": "lock", "target": {"devices": devices}, "reason": "audit"})
}

/// POSTs a lock; true if it was issued, false if it waits for approval.
async fn issued(server: &TestServer, token: &str, devices: &[&str]) -> bool {
    let response = server
        .send_as(token, Method::POST, "/api/v1/commands", Some(lock(devices)))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED, "lock {devices:?}");
    let body: Value = response.json().await.unwrap();
    match (body.get("commands"), body.get("approval")) {
        (Some(_), None) => true,
        (None, Some(_)) => false,
        _ => panic!("neither commands nor an approval: {body}"),
    }
}

/// POSTs a lost report; true if the terminal was locked at once.
async fn lost_issued(server: &TestServer, token: &str, device: &str) -> bool {
    let response = server
        .send_as(
            token,
            Method::POST,
            &format!("/api/v1/devices/{device}/lost"),
            Some(json!({"reason": "stolen"})),
        )
        .await;
    match response.status() {
        StatusCode::OK => true,
        StatusCode::ACCEPTED => {
            let ApprovalRequired { approval } = response.json().await.unwrap();
            assert_eq!(approval.kind, "lost");
            assert_eq!(approval.devices, [device]);
            false
        }
        other => panic!("lost {device}: {other}"),
    }
}

#[tokio::test]
async fn locks_by_one_account_add_up_within_the_window_and_lost_counts() {
    let server = server().await;
    let (ada, secret) = session_and_secret(&server, "ada", Role::Admin).await;
    let bob = session(&server, "bob", Role::Admin).await;
    // Ten single-terminal locks: at the threshold, each issued at once.
    for i in 1..=10 {
        let device = format!("T-{i}");
        assert!(
            issued(&server, &ada, &[&device]).await,
            "lock {i} of 10 needed approval"
        );
    }
    // The eleventh terminal within the hour needs a second admin, and so does a lost report.
    assert!(
        !issued(&server, &ada, &["T-11"]).await,
        "the 11th terminal locked by one account within the hour was issued without approval"
    );
    assert!(
        !lost_issued(&server, &ada, "T-12").await,
        "a lost report beyond the threshold locked the terminal without approval"
    );
    // Another account has its own budget.
    assert!(issued(&server, &bob, &["T-11"]).await);
    // An hour after the first locks, the window has moved on (ada's idle session has
    // ended: she logs in again).
    server.advance(3_600_001);
    let code = totp::code_text(&secret, server.clock()).unwrap();
    let ada = ok_login(&server, "ada", GOOD, Some(&code)).await.token;
    assert!(
        issued(&server, &ada, &["T-13"]).await,
        "the window did not expire"
    );
    server.stop().await;
}

#[tokio::test]
async fn lost_reports_and_token_locks_count_for_the_account() {
    let server = server().await;
    let (ada, _) = session_and_secret(&server, "ada", Role::Admin).await;
    let bob = session(&server, "bob", Role::Admin).await;
    let ada_token = token(&server, &ada, "ada-ci").await;
    // Nine lost reports and one token lock: ten terminals, all issued.
    for i in 1..=9 {
        assert!(
            lost_issued(&server, &ada, &format!("T-{i}")).await,
            "lost report {i} needed approval"
        );
    }
    assert!(issued(&server, &ada_token, &["T-10"]).await);
    // The next one, by session or token, waits for a second admin.
    assert!(
        !issued(&server, &ada_token, &["T-11"]).await,
        "ada's token locked an 11th terminal without approval"
    );
    assert!(
        !issued(&server, &ada, &["T-11"]).await,
        "ada locked an 11th terminal without approval"
    );
    // Approved by bob, a lost report does what it says.
    let response = server
        .send_as(
            &ada,
            Method::POST,
            "/api/v1/devices/T-12/lost",
            Some(json!({"reason": "stolen"})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let ApprovalRequired { approval } = response.json().await.unwrap();
    let response = approve(&server, &bob, &approval.id).await;
    assert_eq!(response.status(), StatusCode::OK);
    let decided: ApprovalDecided = response.json().await.unwrap();
    assert_eq!(decided.commands.len(), 1);
    let detail: crate::views::DeviceDetail = server
        .get("/api/v1/devices/T-12")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(detail.summary.lifecycle, crate::views::Lifecycle::Lost);
    assert!(detail.desired.unwrap().lock.unwrap().locked);
    // The bootstrap token has its own budget (and its tokens share it).
    let many: Vec<String> = (1..=10).map(|i| format!("T-{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let response = server
        .send(Method::POST, "/api/v1/commands", Some(lock(&many)))
        .await;
    let body: Value = response.json().await.unwrap();
    assert!(body.get("commands").is_some(), "{body}");
    let response = server
        .send(Method::POST, "/api/v1/commands", Some(lock(&["T-13"])))
        .await;
    let body: Value = response.json().await.unwrap();
    assert!(
        body.get("approval").is_some(),
        "the bootstrap token locked an 11th terminal without approval: {body}"
    );
    server.stop().await;
}
