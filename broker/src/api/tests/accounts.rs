//! Operator accounts through the real HTTPS API: login and the PCI DSS rules (with the
//! server's injected clock), MFA, roles, API tokens and the bootstrap token.

use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use reqwest::Method;
use serde_json::{Value, json};

use super::{TOKEN, TestServer};
use crate::accounts::{Role, policy, totp};
use crate::api::{CreatedToken, EnrolResponse, InitialPassword, LoginResponse};
use crate::views::ErrorBody;

pub(super) const GOOD: &str = "correct horse 1";
/// The one answer to every refused login.
pub(super) const REFUSED: &str = "invalid user name, password or TOTP code";

impl TestServer {
    /// `method path` with `token` and an optional JSON body.
    pub(super) async fn send_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap()
    }

    pub(super) async fn login(
        &self,
        user: &str,
        password: &str,
        totp: Option<&str>,
    ) -> reqwest::Response {
        let mut body = json!({"user": user, "password": password});
        if let Some(code) = totp {
            body["totp"] = code.into();
        }
        self.client
            .post(self.url("/api/v1/auth/login"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub(super) fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    pub(super) fn clock(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// Creates `name` (through the API, with the bootstrap token) and returns its initial password.
pub(super) async fn create(server: &TestServer, name: &str, role: Role) -> String {
    let response = server
        .send(
            Method::POST,
            "/api/v1/users",
            Some(json!({"name": name, "role": role})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: InitialPassword = response.json().await.unwrap();
    assert!(created.must_change_password);
    created.initial_password
}

pub(super) async fn ok_login(
    server: &TestServer,
    user: &str,
    password: &str,
    totp: Option<&str>,
) -> LoginResponse {
    let response = server.login(user, password, totp).await;
    assert_eq!(response.status(), StatusCode::OK, "login {user}");
    response.json().await.unwrap()
}

pub(super) async fn change_password(
    server: &TestServer,
    token: &str,
    old: &str,
    new: &str,
) -> reqwest::Response {
    server
        .send_as(
            token,
            Method::POST,
            "/api/v1/auth/password",
            Some(json!({"old": old, "new": new})),
        )
        .await
}

/// Enrols MFA for the session's account; returns the secret.
pub(super) async fn enrol(server: &TestServer, token: &str) -> Vec<u8> {
    let response = server
        .send_as(token, Method::POST, "/api/v1/auth/mfa/enrol", None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let enrolment: EnrolResponse = response.json().await.unwrap();
    assert!(
        enrolment
            .otpauth_url
            .starts_with("otpauth://totp/posfleet:")
    );
    let secret = totp::base32_decode(&enrolment.secret).unwrap();
    let code = totp::code_text(&secret, server.clock()).unwrap();
    let response = server
        .send_as(
            token,
            Method::POST,
            "/api/v1/auth/mfa/confirm",
            Some(json!({"code": code})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    server.advance(totp::STEP_MS);
    secret
}

/// A full session of a new account `name` with password [`GOOD`] (admins with MFA).
pub(super) async fn session(server: &TestServer, name: &str, role: Role) -> String {
    session_and_secret(server, name, role).await.0
}

/// [`session`], and the TOTP secret of an admin (empty for other roles).
pub(super) async fn session_and_secret(
    server: &TestServer,
    name: &str,
    role: Role,
) -> (String, Vec<u8>) {
    let initial = create(server, name, role).await;
    let first = ok_login(server, name, &initial, None).await;
    assert_eq!(
        change_password(server, &first.token, &initial, GOOD)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    let second = ok_login(server, name, GOOD, None).await;
    if role != Role::Admin {
        assert!(!second.must_change_password && !second.mfa_enrolment_required);
        return (second.token, Vec::new());
    }
    let secret = enrol(server, &second.token).await;
    let code = totp::code_text(&secret, server.clock()).unwrap();
    let token = ok_login(server, name, GOOD, Some(&code)).await.token;
    (token, secret)
}

async fn error(response: reqwest::Response, status: StatusCode) -> ErrorBody {
    assert_eq!(response.status(), status);
    response.json().await.unwrap()
}

#[tokio::test]
async fn first_login_only_allows_a_password_change_with_the_pci_rules() {
    let server = TestServer::start().await;
    let initial = create(&server, "alice", Role::Operator).await;
    let first = ok_login(&server, "alice", &initial, None).await;
    assert!(first.must_change_password);
    assert_eq!(first.expires_idle_s, 15 * 60);
    // Restricted: nothing but the self-service routes.
    let body = error(
        server
            .send_as(&first.token, Method::GET, "/api/v1/devices", None)
            .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(body.error.contains("password"), "{}", body.error);
    let whoami: Value = server
        .send_as(&first.token, Method::GET, "/api/v1/auth/whoami", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(whoami["restricted"], true);
    // Weak: length, no digit, no letter; reused: the initial password.
    for weak in [
        "short1",
        "no digits at all",
        "1234567890123",
        initial.as_str(),
    ] {
        let body = error(
            change_password(&server, &first.token, &initial, weak).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert!(!body.error.contains(weak), "the password is not echoed");
    }
    // A wrong current password is refused.
    error(
        change_password(&server, &first.token, "wrong password 9", GOOD).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(
        change_password(&server, &first.token, &initial, GOOD)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    // The change ended the session.
    assert_eq!(
        server
            .send_as(&first.token, Method::GET, "/api/v1/auth/whoami", None)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let full = ok_login(&server, "alice", GOOD, None).await;
    assert!(!full.must_change_password);
    let devices = server
        .send_as(&full.token, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(devices.status(), StatusCode::OK);
    let actions: Vec<String> = server
        .recorded
        .records()
        .iter()
        .map(|r| r.action.clone())
        .collect();
    assert!(actions.contains(&"user.create".to_owned()));
    assert!(actions.contains(&"auth.password_change".to_owned()));
    assert!(actions.iter().filter(|a| *a == "auth.login").count() >= 2);
    server.stop().await;
}

#[tokio::test]
async fn wrong_passwords_lock_the_account_and_sessions_end_when_idle() {
    let server = TestServer::start().await;
    session(&server, "bob", Role::Viewer).await;
    for _ in 0..policy::MAX_FAILED_ATTEMPTS {
        let body = error(
            server.login("bob", "wrong password 1", None).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        assert_eq!(body.error, REFUSED);
    }
    // Locked (from this address): the right password is refused, with the same answer.
    let body = error(
        server.login("bob", GOOD, None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(body.error, REFUSED);
    // The refusals are counted and written aggregated when the log is read.
    assert_eq!(
        server.get("/api/v1/audit?action=auth").await.status(),
        StatusCode::OK
    );
    let records = server.recorded.records();
    assert!(
        records
            .iter()
            .any(|r| r.action == "auth.lockout" && r.target == "bob")
    );
    let failures: u64 = records
        .iter()
        .filter(|r| r.action == "auth.login" && r.outcome == crate::audit::Outcome::Failure)
        .map(|r| crate::audit::refusal_count(&r.detail).unwrap_or(1))
        .sum();
    assert_eq!(failures, 11);
    // No secret in any audit record.
    assert!(records.iter().all(|r| !format!("{r:?}").contains(GOOD)));
    server.advance(policy::LOCKOUT_MS);
    let login = ok_login(&server, "bob", GOOD, None).await;
    // Idle timeout.
    server.advance(policy::SESSION_IDLE_MS - 1000);
    let ok = server
        .send_as(&login.token, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
    server.advance(policy::SESSION_IDLE_MS);
    let expired = server
        .send_as(&login.token, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    // Logout.
    let login = ok_login(&server, "bob", GOOD, None).await;
    let out = server
        .send_as(&login.token, Method::POST, "/api/v1/auth/logout", None)
        .await;
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    let after = server
        .send_as(&login.token, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test]
async fn admins_need_mfa_and_codes_cannot_be_missing_wrong_or_replayed() {
    let server = TestServer::start().await;
    let initial = create(&server, "ada", Role::Admin).await;
    let first = ok_login(&server, "ada", &initial, None).await;
    assert!(first.must_change_password && first.mfa_enrolment_required);
    change_password(&server, &first.token, &initial, GOOD).await;
    let second = ok_login(&server, "ada", GOOD, None).await;
    assert!(second.mfa_enrolment_required && !second.must_change_password);
    // Without MFA an admin has no admin powers.
    let users = server
        .send_as(&second.token, Method::GET, "/api/v1/users", None)
        .await;
    assert_eq!(users.status(), StatusCode::FORBIDDEN);
    let secret = enrol(&server, &second.token).await;
    // A missing code is refused like anything else (it does not say the password was right).
    let missing = error(
        server.login("ada", GOOD, None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(missing.error, REFUSED);
    assert!(missing.fields.is_empty());
    let code = totp::code_text(&secret, server.clock()).unwrap();
    let wrong = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    let body = error(
        server.login("ada", GOOD, Some(&wrong)).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(!body.error.contains(&wrong));
    let full = ok_login(&server, "ada", GOOD, Some(&code)).await;
    assert!(!full.mfa_enrolment_required);
    error(
        server.login("ada", GOOD, Some(&code)).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let users = server
        .send_as(&full.token, Method::GET, "/api/v1/users", None)
        .await;
    assert_eq!(users.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn roles_cannot_be_escalated() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", 1000);
    let operator = session(&server, "otto", Role::Operator).await;
    let viewer = session(&server, "vera", Role::Viewer).await;
    for (token, method, path, body) in [
        (
            &operator,
            Method::POST,
            "/api/v1/users",
            json!({"name": "evil", "role": "admin"}),
        ),
        (
            &operator,
            Method::POST,
            "/api/v1/users/vera/reset",
            json!({}),
        ),
        (
            &operator,
            Method::POST,
            "/api/v1/commands",
            json!({"kind": "wipe", "target": {"devices": ["T-1"]}}),
        ),
        (
            &operator,
            Method::POST,
            "/api/v1/tokens",
            json!({"name": "up", "role": "admin", "expires_in_s": 60}),
        ),
        (
            &viewer,
            Method::POST,
            "/api/v1/commands",
            json!({"kind": "reboot", "target": {"devices": ["T-1"]}}),
        ),
        (
            &viewer,
            Method::POST,
            "/api/v1/tokens",
            json!({"name": "v", "role": "viewer", "expires_in_s": 60}),
        ),
    ] {
        let response = server
            .send_as(token, method.clone(), path, Some(body))
            .await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{method} {path}");
    }
    // What the operator may do, it can.
    let reboot = server
        .send_as(
            &operator,
            Method::POST,
            "/api/v1/commands",
            Some(json!({"kind": "reboot", "target": {"devices": ["T-1"]}})),
        )
        .await;
    assert_eq!(reboot.status(), StatusCode::ACCEPTED);
    let body: Value = reboot.json().await.unwrap();
    assert_eq!(
        body["commands"][0]["author"], "otto",
        "the author is the principal"
    );
    server.stop().await;
}

#[tokio::test]
async fn api_tokens_expire_are_revoked_and_cannot_be_forged() {
    let server = TestServer::start().await;
    let operator = session(&server, "otto", Role::Operator).await;
    let response = server
        .send_as(
            &operator,
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "ci", "role": "viewer", "expires_in_s": 3600})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: CreatedToken = response.json().await.unwrap();
    assert!(created.token.starts_with("pft_"));
    let ok = server
        .send_as(&created.token, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
    // A viewer token cannot write.
    let write = server
        .send_as(
            &created.token,
            Method::PUT,
            "/api/v1/devices/T-1/groups",
            Some(json!({"groups": []})),
        )
        .await;
    assert_eq!(write.status(), StatusCode::FORBIDDEN);
    let list: Value = server
        .send_as(&operator, Method::GET, "/api/v1/tokens", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["tokens"][0]["name"], "ci");
    assert!(!list.to_string().contains(&created.token));
    let forged = format!("pft_{}", "ab".repeat(32));
    let refused = server
        .send_as(&forged, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    // Expiry (the operator's session is refreshed first so that it stays alive).
    server.advance(3_600_000);
    let expired = server
        .send_as(&created.token, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    // Revocation.
    let operator = ok_login(&server, "otto", GOOD, None).await.token;
    let second: CreatedToken = server
        .send_as(
            &operator,
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "ci2", "role": "operator", "expires_in_s": 3600})),
        )
        .await
        .json()
        .await
        .unwrap();
    let revoke = server
        .send_as(&operator, Method::DELETE, "/api/v1/tokens/ci2", None)
        .await;
    assert_eq!(revoke.status(), StatusCode::NO_CONTENT);
    let revoked = server
        .send_as(&second.token, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test]
async fn the_bootstrap_token_is_refused_once_revoked() {
    let server = TestServer::start().await;
    // No admin with MFA yet: refused, the bootstrap token keeps working.
    let early = server
        .send(Method::DELETE, "/api/v1/tokens/bootstrap", None)
        .await;
    assert_eq!(early.status(), StatusCode::FORBIDDEN);
    let admin = session(&server, "ada", Role::Admin).await;
    let revoke = server
        .send_as(&admin, Method::DELETE, "/api/v1/tokens/bootstrap", None)
        .await;
    assert_eq!(revoke.status(), StatusCode::NO_CONTENT);
    let refused = server.get("/api/v1/devices").await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(server.accounts.bootstrap_revoked());
    let still = server
        .send_as(&admin, Method::GET, "/api/v1/users", None)
        .await;
    assert_eq!(still.status(), StatusCode::OK);
    let _ = TOKEN;
    server.stop().await;
}

#[tokio::test]
async fn malformed_login_bodies_do_not_echo_secrets() {
    let server = TestServer::start().await;
    let response = server
        .client
        .post(server.url("/api/v1/auth/login"))
        .header("content-type", "application/json")
        .body(r#"{"user": "x", "password": 123456789123}"#)
        .send()
        .await
        .unwrap();
    let body = error(response, StatusCode::BAD_REQUEST).await;
    assert!(!body.error.contains("123456789123"), "{}", body.error);
    let unknown = error(
        server.login("nobody", GOOD, None).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(unknown.error, REFUSED);
    server.stop().await;
}
