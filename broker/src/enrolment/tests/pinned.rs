//! Issue 10 item 9: enrolment tokens pinned to a device id; an id pinned to one token, or with
//! a certificate already issued, cannot be taken by another enrolment.

use posfleet_proto::DeviceId;
use posfleet_proto::pki::DeviceKeyRequest;
use reqwest::StatusCode;
use serde_json::json;

use super::Fixture;
use super::issued::{cli_bundle, issue_device};
use crate::views::ErrorBody;

fn csr(id: &str) -> String {
    DeviceKeyRequest::generate(&DeviceId::new(id).unwrap())
        .unwrap()
        .csr_pem
}

/// The status and error body of a refused request.
async fn refused(r: reqwest::Response) -> (StatusCode, ErrorBody) {
    let status = r.status();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {text}: {e}"));
    (status, body)
}

fn names_field(body: &ErrorBody, field: &str) -> bool {
    body.fields.iter().any(|f| f.key == field)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_pinned_to_a_device_id_reserves_it() {
    let f = Fixture::start().await;
    let r = f
        .admin_post(
            "/api/v1/enrolment-tokens",
            json!({"device_id": "T-A", "group": "north", "expires_in": "1h"}),
        )
        .await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a token pinned to a device id: {text}"
    );
    let pinned: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(pinned["device_id"], "T-A", "{text}");
    let pinned_token = pinned["token"].as_str().unwrap().to_owned();

    // A second token for the same id: 409 naming device_id.
    let r = f
        .admin_post(
            "/api/v1/enrolment-tokens",
            json!({"device_id": "T-A", "expires_in": "1h"}),
        )
        .await;
    let (status, body) = refused(r).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body:?}");
    assert!(names_field(&body, "device_id"), "{body:?}");
    // An invalid id: 400 naming device_id, nothing created.
    let r = f
        .admin_post(
            "/api/v1/enrolment-tokens",
            json!({"device_id": "a/b", "expires_in": "1h"}),
        )
        .await;
    let (status, body) = refused(r).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
    assert!(names_field(&body, "device_id"), "{body:?}");

    // Another (unpinned) token cannot take the pinned id: 409 naming device_id, and that
    // token stays usable for another id.
    let other = f.token(json!({"expires_in": "1h"})).await;
    let r = f.enroll(&other.token, "T-A", "SN-1", &csr("T-A")).await;
    let (status, body) = refused(r).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body:?}");
    assert!(names_field(&body, "device_id"), "{body:?}");
    assert!(body.error.contains("T-A"), "{body:?}");

    // The pinned token cannot enrol another id (403 naming device_id) ...
    let r = f.enroll(&pinned_token, "T-B", "SN-1", &csr("T-B")).await;
    let (status, body) = refused(r).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body:?}");
    assert!(names_field(&body, "device_id"), "{body:?}");
    // ... nor can the CLI issue a certificate for the reserved id.
    let out = f._tmp.path().join("bundle-reserved");
    let err = issue_device(&f, "T-A", &out).await.unwrap_err();
    assert!(err.contains("device_id") && err.contains("T-A"), "{err}");
    assert!(!out.join("device.key").exists());

    // The pinned token enrols its id, with its group; the other token still works elsewhere.
    let r = f.enroll(&pinned_token, "T-A", "SN-1", &csr("T-A")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let detail = f
        .running
        .registry
        .detail(&DeviceId::new("T-A").unwrap())
        .unwrap();
    assert!(detail.summary.groups.contains("north"));
    let r = f.enroll(&other.token, "T-C", "SN-3", &csr("T-C")).await;
    assert_eq!(r.status(), StatusCode::OK);

    // The list shows the pin.
    let list = f
        .admin_get("/api/v1/enrolment-tokens")
        .await
        .text()
        .await
        .unwrap();
    assert!(list.contains("\"device_id\":\"T-A\""), "{list}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_with_an_issued_certificate_cannot_be_enrolled() {
    let f = Fixture::start().await;
    let (_, _cert, _key) = cli_bundle(&f, "T-cli").await;

    // An unpinned token cannot take it ...
    let token = f.token(json!({"expires_in": "1h"})).await;
    let r = f.enroll(&token.token, "T-cli", "SN-1", &csr("T-cli")).await;
    let (status, body) = refused(r).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "enrolling an id with a CLI-issued certificate: {body:?}"
    );
    assert!(names_field(&body, "device_id"), "{body:?}");
    // ... and no token can be pinned to it.
    let r = f
        .admin_post(
            "/api/v1/enrolment-tokens",
            json!({"device_id": "T-cli", "expires_in": "1h"}),
        )
        .await;
    let (status, body) = refused(r).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body:?}");
    assert!(names_field(&body, "device_id"), "{body:?}");
    // The token was not used up by the refusal.
    let r = f.enroll(&token.token, "T-new", "SN-1", &csr("T-new")).await;
    assert_eq!(r.status(), StatusCode::OK);
    f.stop().await;
}
