//! Login refusals (issue 10, item 5): one answer for every refusal, lockout per client address
//! (one address cannot lock an account for others), per-address throttling across accounts,
//! a missing TOTP code counting as a failure, and refusals aggregated in the audit log.

use std::net::IpAddr;
use std::time::Duration;

use axum::http::StatusCode;
use reqwest::Method;
use serde_json::json;

use super::TestServer;
use super::accounts::{GOOD, enrol, ok_login, session};
use crate::accounts::{Role, policy, totp};
use crate::views::AuditPage;

/// A client of `server` whose connections come from `ip` (any 127.x.y.z).
fn client_from(server: &TestServer, ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls((*server.tls).clone())
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn login_from(
    server: &TestServer,
    client: &reqwest::Client,
    user: &str,
    password: &str,
    totp: Option<&str>,
) -> reqwest::Response {
    let mut body = json!({"user": user, "password": password});
    if let Some(code) = totp {
        body["totp"] = code.into();
    }
    client
        .post(server.url("/api/v1/auth/login"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Status, `WWW-Authenticate` and body bytes of a response.
async fn answer(response: reqwest::Response) -> (StatusCode, String, Vec<u8>) {
    let status = response.status();
    let auth = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, auth, response.bytes().await.unwrap().to_vec())
}

/// An operator with MFA, password [`GOOD`]; returns the TOTP secret.
async fn operator_with_mfa(server: &TestServer, name: &str) -> Vec<u8> {
    let token = session(server, name, Role::Operator).await;
    let secret = enrol(server, &token).await;
    // Logged in once with a code: MFA is on.
    let code = totp::code_text(&secret, server.clock()).unwrap();
    ok_login(server, name, GOOD, Some(&code)).await;
    server.advance(totp::STEP_MS);
    secret
}

#[tokio::test]
async fn every_login_refusal_gets_the_same_answer() {
    let server = TestServer::start().await;
    let secret = operator_with_mfa(&server, "uma").await;
    session(&server, "dis", Role::Viewer).await;
    let disable = server
        .send(Method::POST, "/api/v1/users/dis/disable", None)
        .await;
    assert_eq!(disable.status(), StatusCode::NO_CONTENT);
    session(&server, "lok", Role::Viewer).await;
    let client = client_from(&server, "127.0.0.1");
    for _ in 0..policy::MAX_FAILED_ATTEMPTS {
        login_from(&server, &client, "lok", "wrong password 1", None).await;
    }
    let code = totp::code_text(&secret, server.clock()).unwrap();
    let wrong_code = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);

    let unknown = answer(login_from(&server, &client, "nobody", GOOD, None).await).await;
    assert_eq!(unknown.0, StatusCode::UNAUTHORIZED);
    for (path, response) in [
        (
            "a wrong password",
            login_from(&server, &client, "uma", "wrong password 1", Some(&code)).await,
        ),
        (
            "a locked account (right password)",
            login_from(&server, &client, "lok", GOOD, None).await,
        ),
        (
            "a disabled account (right password)",
            login_from(&server, &client, "dis", GOOD, None).await,
        ),
        (
            "a missing TOTP code (right password)",
            login_from(&server, &client, "uma", GOOD, None).await,
        ),
        (
            "a wrong TOTP code (right password)",
            login_from(&server, &client, "uma", GOOD, Some(&wrong_code)).await,
        ),
    ] {
        let got = answer(response).await;
        assert_eq!(
            got,
            unknown,
            "{path} answered differently from an unknown user: {} {:?} vs {} {:?}",
            got.0,
            String::from_utf8_lossy(&got.2),
            unknown.0,
            String::from_utf8_lossy(&unknown.2)
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn one_address_cannot_lock_an_account_for_others() {
    let server = TestServer::start().await;
    session(&server, "bob", Role::Viewer).await;
    let attacker = client_from(&server, "127.0.0.2");
    let colleague = client_from(&server, "127.0.0.3");
    for _ in 0..policy::MAX_FAILED_ATTEMPTS {
        let r = login_from(&server, &attacker, "bob", "wrong password 1", None).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    // Locked from there: even the right password.
    let r = login_from(&server, &attacker, "bob", GOOD, None).await;
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "the attacking address is not locked out"
    );
    // Not from another address.
    let r = login_from(&server, &colleague, "bob", GOOD, None).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "10 failures from one address locked bob out everywhere"
    );
    // For 30 minutes.
    server.advance(policy::LOCKOUT_MS - 1000);
    let r = login_from(&server, &attacker, "bob", GOOD, None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    server.advance(1000);
    let r = login_from(&server, &attacker, "bob", GOOD, None).await;
    assert_eq!(r.status(), StatusCode::OK, "the lockout did not end");
    server.stop().await;
}

#[tokio::test]
async fn an_address_guessing_across_accounts_is_throttled() {
    let server = TestServer::start().await;
    session(&server, "bob", Role::Viewer).await;
    let sprayer = client_from(&server, "127.0.0.4");
    let mut throttled = None;
    for i in 0..100 {
        let r = login_from(&server, &sprayer, &format!("user{i}"), GOOD, None).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            throttled = Some((i, r));
            break;
        }
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let (after, response) =
        throttled.expect("100 failed logins from one address were never throttled");
    assert!(after <= 30, "throttled only after {after} failures");
    let retry: u64 = response
        .headers()
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    // The throttled address cannot log in even with the right password; others can.
    let r = login_from(&server, &sprayer, "bob", GOOD, None).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = login_from(
        &server,
        &client_from(&server, "127.0.0.5"),
        "bob",
        GOOD,
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn a_missing_totp_code_counts_as_a_failure() {
    let server = TestServer::start().await;
    let secret = operator_with_mfa(&server, "uma").await;
    let client = client_from(&server, "127.0.0.6");
    for _ in 0..policy::MAX_FAILED_ATTEMPTS {
        let r = login_from(&server, &client, "uma", GOOD, None).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let code = totp::code_text(&secret, server.clock()).unwrap();
    let r = login_from(&server, &client, "uma", GOOD, Some(&code)).await;
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "10 logins without a TOTP code did not lock the account from that address"
    );
    server.stop().await;
}

/// The number of refusals an audit entry stands for: aggregated entries say
/// "N refusals ..." in their detail, any other entry is one.
fn refusals(detail: &str) -> u64 {
    crate::audit::refusal_count(detail).unwrap_or(1)
}

#[tokio::test]
async fn a_thousand_refused_logins_make_a_bounded_number_of_audit_entries() {
    let server = TestServer::start().await;
    session(&server, "bob", Role::Viewer).await;
    const TOTAL: usize = 1000;
    const ADDRESSES: usize = 4;
    let mut tasks = Vec::new();
    for a in 0..ADDRESSES {
        let client = client_from(&server, &format!("127.0.1.{}", a + 1));
        let url = server.url("/api/v1/auth/login");
        tasks.push(tokio::spawn(async move {
            let mut refused = 0;
            for i in 0..TOTAL / ADDRESSES {
                let user = ["bob", "ghost-a", "ghost-b"][i % 3];
                let r = client
                    .post(&url)
                    .json(&json!({"user": user, "password": "wrong password 1"}))
                    .send()
                    .await
                    .unwrap();
                assert!(
                    r.status().is_client_error() || r.status() == StatusCode::SERVICE_UNAVAILABLE,
                    "{}",
                    r.status()
                );
                refused += 1;
            }
            refused
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await.unwrap();
    }
    assert_eq!(refused, TOTAL);
    // Reading the log shows every pending count.
    let page: AuditPage = server
        .get("/api/v1/audit?action=auth&limit=1000")
        .await
        .json()
        .await
        .unwrap();
    let logins: Vec<_> = page
        .entries
        .iter()
        .filter(|e| e.action == "auth.login" && e.outcome != crate::audit::Outcome::Success)
        .collect();
    // Per address at most: bob's wrong password, bob locked, each ghost unknown and
    // locked, the address throttled.
    assert!(
        logins.len() <= ADDRESSES * 6,
        "{} audit entries for {TOTAL} refused logins",
        logins.len()
    );
    let counted: u64 = logins.iter().map(|e| refusals(&e.detail)).sum();
    assert_eq!(
        counted, TOTAL as u64,
        "the audit entries of refused logins do not add up: {logins:#?}"
    );
    server.stop().await;
}
