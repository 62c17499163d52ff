//! Device ids and serials that look like card numbers are refused wherever a new one enters
//! (issue 10 items 7 and 9): enrolment, enrolment-token pins, `POST /api/v1/pki/certificates`,
//! `posctl pki issue-device` (through the API and offline). Each refusal names the field and
//! changes nothing; no card number reaches the registry, the certificate records or the audit
//! log.

use posfleet_proto::DeviceId;
use posfleet_proto::pan::{REVIEW_EXAMPLES, contains_pan};
use posfleet_proto::pki::DeviceKeyRequest;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::Fixture;
use super::issued::{issue_device, posctl};
use crate::views::{AuditPage, ErrorBody, TokenList};

/// Card numbers written as valid device ids: the review's examples that fit the id pattern,
/// and the plain and dashed notations.
fn card_like_ids() -> Vec<&'static str> {
    let mut ids: Vec<&str> = REVIEW_EXAMPLES
        .iter()
        .copied()
        .filter(|e| DeviceId::new(*e).is_ok())
        .collect();
    ids.extend(["4111-1111-1111-1111", "4111111111111111"]);
    assert!(ids.len() >= 5, "{ids:?}");
    ids
}

fn csr(id: &str) -> String {
    DeviceKeyRequest::generate(&DeviceId::new(id).unwrap())
        .unwrap()
        .csr_pem
}

/// Status and error body of a refusal, checked to name `field` and not to echo a card number.
async fn refusal(r: reqwest::Response, field: &str, what: &str) -> StatusCode {
    let status = r.status();
    let text = r.text().await.unwrap();
    let body: ErrorBody =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {status}: {text}: {e}"));
    assert!(
        body.fields.iter().any(|f| f.key == field),
        "{what}: {status}: the refusal does not name {field}: {text}"
    );
    assert!(
        !contains_pan(&text),
        "{what}: the refusal echoes the number"
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_like_device_ids_and_serials_are_refused_where_they_enter() {
    let f = Fixture::start().await;
    let token = f.token(json!({"expires_in": "1h"})).await;
    for id in card_like_ids() {
        // A token pinned to it.
        let r = f
            .admin_post(
                "/api/v1/enrolment-tokens",
                json!({"device_id": id, "expires_in": "1h"}),
            )
            .await;
        let status = refusal(r, "device_id", "token pin").await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "token pinned to a card-like id"
        );
        // Enrolment.
        let r = f.enroll(&token.token, id, "SN-1", &csr(id)).await;
        let status = refusal(r, "device_id", "enrolment").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "enrolling a card-like id");
        // Certificates issued by the API, alone and in a batch.
        let r = f
            .admin_post(
                "/api/v1/pki/certificates",
                json!({"requests": [{"device_id": id, "csr_pem": csr(id)}]}),
            )
            .await;
        let status = refusal(r, "device_id", "issue").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let r = f
            .admin_post(
                "/api/v1/pki/certificates",
                json!({"requests": [{"device_id": "ok-1", "csr_pem": csr("ok-1")},
                                    {"device_id": id, "csr_pem": csr(id)}]}),
            )
            .await;
        let status = refusal(r, "requests[1].device_id", "batch issue").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        // posctl refuses it before asking the controller.
        let out = f._tmp.path().join("bundle-card");
        let err = issue_device(&f, id, &out).await.unwrap_err();
        assert!(err.starts_with("--id:"), "{err}");
        assert!(!contains_pan(&err), "posctl echoes the number: {err}");
        assert!(!out.exists(), "posctl wrote a bundle for a card-like id");
        let err = posctl(&f, &["enroll", "token", "create", "--device", id])
            .await
            .unwrap_err();
        assert!(err.starts_with("--device:"), "{err}");
        assert!(!contains_pan(&err), "posctl echoes the number: {err}");
    }
    // Revoking an unknown card-like id: 404, neither echoed nor audited.
    let r = f
        .admin_post(
            "/api/v1/devices/4111.1111.1111.1111/revoke",
            json!({"reason": "typo"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let text = r.text().await.unwrap();
    assert!(!contains_pan(&text), "{text}");
    for serial in ["4111-1111-1111-1111", "4111.1111.1111.1111"] {
        let r = f
            .admin_post(
                "/api/v1/enrolment-tokens",
                json!({"serial": serial, "expires_in": "1h"}),
            )
            .await;
        let status = refusal(r, "serial", "token pin").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let r = f.enroll(&token.token, "T-s", serial, &csr("T-s")).await;
        let status = refusal(r, "serial", "enrolment").await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "enrolling a card-like serial"
        );
    }

    // Nothing changed: the token is unused and enrols a clean id, it is the only token, and
    // nothing was issued or registered for the refused ids.
    let r = f.enroll(&token.token, "T-ok", "SN-1", &csr("T-ok")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let tokens: TokenList = f
        .admin_get("/api/v1/enrolment-tokens")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tokens.items.len(), 1, "{tokens:?}");
    let devices: Value = f.admin_get("/api/v1/devices").await.json().await.unwrap();
    assert!(!contains_pan(&devices.to_string()), "{devices}");
    let r = f.admin_get("/api/v1/devices/ok-1/certificates").await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "a refused batch issued ok-1"
    );
    // The audit log holds the refusals, without the numbers.
    let page: AuditPage = f
        .admin_get("/api/v1/audit?limit=1000")
        .await
        .json()
        .await
        .unwrap();
    assert!(page.entries.len() > 10);
    for e in &page.entries {
        for text in [&e.actor, &e.target, &e.detail] {
            assert!(!contains_pan(text), "a card number in the audit log: {e:?}");
        }
    }
    f.stop().await;
}

#[test]
fn the_offline_issue_refuses_a_card_like_id() {
    let tmp = tempfile::tempdir().unwrap();
    let data = crate::datadir::DataDir::at(tmp.path().join("data"));
    data.create().unwrap();
    data.pki().init(&[]).unwrap();
    for id in card_like_ids() {
        let err = crate::enrolment::issue_offline(
            tmp.path().join("data").as_path(),
            &DeviceId::new(id).unwrap(),
            &csr(id),
            "test",
            posfleet_proto::now_ms(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("device_id:"), "{text}");
        assert!(!contains_pan(&text), "{text}");
    }
    let (store, _) = crate::enrolment::open(&data.enrolment_dir()).unwrap();
    assert!(
        store.load().unwrap().issued.is_empty(),
        "a certificate was recorded"
    );
}
