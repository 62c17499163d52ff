//! `/api/v1/artifacts` over real TLS: uploads and every refusal (nothing left behind), list,
//! detail, delete.

use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use posfleet_proto::signing::CommandKey;
use sha2::{Digest, Sha256};

use super::{ApiLimits, ArtifactSetup, TOKEN, TestServer};
use crate::api::{KEY_ID_HEADER, SHA256_HEADER, SIGNATURE_HEADER};
use crate::views::{ArtifactDeleted, ArtifactList, ArtifactView, ErrorBody};

/// What an upload sends besides the bytes.
struct Upload<'a> {
    query: &'a str,
    key: &'a CommandKey,
    /// The digest the signature and the sha header are made for (default: of the bytes).
    signed_sha: Option<[u8; 32]>,
}

impl<'a> Upload<'a> {
    fn new(key: &'a CommandKey, query: &'a str) -> Self {
        Self {
            query,
            key,
            signed_sha: None,
        }
    }
}

async fn upload(server: &TestServer, bytes: &[u8], u: Upload<'_>) -> reqwest::Response {
    let sha: [u8; 32] = u.signed_sha.unwrap_or_else(|| Sha256::digest(bytes).into());
    server
        .client
        .post(server.url(&format!("/api/v1/artifacts?{}", u.query)))
        .bearer_auth(TOKEN)
        .header(SIGNATURE_HEADER, BASE64.encode(u.key.sign_release(&sha)))
        .header(KEY_ID_HEADER, u.key.key_id())
        .header(SHA256_HEADER, hex::encode(sha))
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap()
}

/// Files in the blobs directory (complete artifacts and temp files).
fn blobs(server: &TestServer) -> Vec<String> {
    crate::artifacts::tests_support_files(server.artifacts.store().blobs_dir())
}

async fn refused(response: reqwest::Response, status: StatusCode, what: &str) -> ErrorBody {
    assert_eq!(response.status(), status, "{what}");
    let body: ErrorBody = response.json().await.unwrap();
    assert!(body.hint.is_some(), "{what}: {body:?}");
    body
}

#[tokio::test]
async fn a_signed_upload_is_stored_listed_shown_and_deleted() {
    let server = TestServer::start().await;
    let key = server.release_key.clone();
    let bytes = b"payment app 4.2.0".repeat(1000);
    let q = "version=4.2.0&min_version=4.0.0";
    let response = upload(&server, &bytes, Upload::new(&key, q)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let view: ArtifactView = response.json().await.unwrap();
    let id = hex::encode(Sha256::digest(&bytes));
    assert_eq!(view.id, id);
    assert_eq!(view.sha256, id);
    assert_eq!(view.version, "4.2.0");
    assert_eq!(view.component, "payment_app");
    assert_eq!(view.min_version.as_deref(), Some("4.0.0"));
    assert_eq!(view.size_bytes, bytes.len() as u64);
    assert_eq!(view.release_key_id, key.key_id());
    assert_eq!(view.uploaded_by, "admin");
    assert_eq!(
        view.download_url,
        format!("https://dl.example:8884/device/v1/artifacts/{id}")
    );
    assert_eq!(blobs(&server), vec![id.clone()]);

    // The same bytes and version again: 200 with the stored record.
    let again = upload(&server, &bytes, Upload::new(&key, q)).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<ArtifactView>().await.unwrap(), view);
    // The same bytes as another version: 409.
    let other = upload(&server, &bytes, Upload::new(&key, "version=4.3.0")).await;
    let body = refused(other, StatusCode::CONFLICT, "other version").await;
    assert!(body.error.contains("4.2.0"), "{body:?}");
    assert_eq!(blobs(&server), vec![id.clone()]);

    let list: ArtifactList = server.get("/api/v1/artifacts").await.json().await.unwrap();
    assert_eq!(list.items, vec![view.clone()]);
    let shown: ArtifactView = server
        .get(&format!("/api/v1/artifacts/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown, view);

    let deleted = server
        .send(
            reqwest::Method::DELETE,
            &format!("/api/v1/artifacts/{id}"),
            None,
        )
        .await;
    assert_eq!(deleted.status(), StatusCode::OK);
    let deleted: ArtifactDeleted = deleted.json().await.unwrap();
    assert!(deleted.deleted);
    assert!(blobs(&server).is_empty());
    let gone = server.get(&format!("/api/v1/artifacts/{id}")).await;
    refused(gone, StatusCode::NOT_FOUND, "deleted").await;
    let malformed = server.get("/api/v1/artifacts/..%2F..%2Fetc").await;
    refused(malformed, StatusCode::NOT_FOUND, "malformed id").await;
    server.stop().await;
}

#[tokio::test]
async fn delete_is_refused_while_a_rollout_uses_the_artifact() {
    struct Busy;
    impl crate::artifacts::ArtifactUsers for Busy {
        fn rollouts_using(&self, _id: &str) -> Vec<String> {
            vec!["rollout-7".into()]
        }
    }
    let server = TestServer::start().await;
    let key = server.release_key.clone();
    let response = upload(
        &server,
        b"fw",
        Upload::new(&key, "version=1&component=firmware"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let id = response.json::<ArtifactView>().await.unwrap().id;
    assert!(server.artifacts.set_users(std::sync::Arc::new(Busy)));
    let response = server
        .send(
            reqwest::Method::DELETE,
            &format!("/api/v1/artifacts/{id}"),
            None,
        )
        .await;
    let body = refused(response, StatusCode::CONFLICT, "in use").await;
    assert!(body.error.contains("rollout-7"), "{body:?}");
    assert_eq!(blobs(&server), vec![id]);
    server.stop().await;
}

#[tokio::test]
async fn tampered_bytes_and_foreign_keys_are_refused_and_leave_nothing() {
    let server = TestServer::start().await;
    let key = server.release_key.clone();
    let bytes = b"the real build".to_vec();
    let real_sha: [u8; 32] = Sha256::digest(&bytes).into();
    let tampered = b"the evil build".to_vec();

    // Bytes changed after signing: the sha header (from the .sig) no longer matches.
    let response = upload(
        &server,
        &tampered,
        Upload {
            signed_sha: Some(real_sha),
            ..Upload::new(&key, "version=1.0")
        },
    )
    .await;
    let body = refused(response, StatusCode::UNPROCESSABLE_ENTITY, "sha mismatch").await;
    assert!(body.error.contains("SHA-256"), "{body:?}");

    // No sha header, and a signature over other bytes.
    let response = server
        .client
        .post(server.url("/api/v1/artifacts?version=1.0"))
        .bearer_auth(TOKEN)
        .header(SIGNATURE_HEADER, BASE64.encode(key.sign_release(&real_sha)))
        .header(KEY_ID_HEADER, key.key_id())
        .body(tampered.clone())
        .send()
        .await
        .unwrap();
    let body = refused(response, StatusCode::UNPROCESSABLE_ENTITY, "bad signature").await;
    assert!(body.error.contains("signature"), "{body:?}");

    // Signed by a key the controller does not trust.
    let stranger = CommandKey::generate();
    let response = upload(&server, &bytes, Upload::new(&stranger, "version=1.0")).await;
    let body = refused(response, StatusCode::UNPROCESSABLE_ENTITY, "unknown key").await;
    assert!(body.error.contains(stranger.key_id()), "{body:?}");

    // Empty file.
    let response = upload(&server, b"", Upload::new(&key, "version=1.0")).await;
    refused(response, StatusCode::UNPROCESSABLE_ENTITY, "empty").await;

    assert!(blobs(&server).is_empty(), "{:?}", blobs(&server));
    let list: ArtifactList = server.get("/api/v1/artifacts").await.json().await.unwrap();
    assert!(list.items.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn bad_fields_are_all_reported_before_any_byte_is_stored() {
    let server = TestServer::start().await;
    let key = server.release_key.clone();
    let response = upload(
        &server,
        b"x",
        Upload::new(&key, "version=1%2F2&component=kernel&min_version="),
    )
    .await;
    let body = refused(response, StatusCode::UNPROCESSABLE_ENTITY, "bad fields").await;
    let keys: Vec<&str> = body.fields.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(keys, ["version", "component", "min_version"], "{body:?}");
    // A min_version that cannot be ordered against terminal versions is refused too.
    let response = upload(
        &server,
        b"x",
        Upload::new(&key, "version=2&min_version=fw-9"),
    )
    .await;
    let body = refused(response, StatusCode::UNPROCESSABLE_ENTITY, "min_version").await;
    let keys: Vec<&str> = body.fields.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(keys, ["min_version"], "{body:?}");
    let response = upload(&server, b"x", Upload::new(&key, "component=agent")).await;
    let body = refused(response, StatusCode::UNPROCESSABLE_ENTITY, "no version").await;
    assert_eq!(body.fields[0].key, "version");

    let response = server
        .client
        .post(server.url("/api/v1/artifacts?version=1"))
        .bearer_auth(TOKEN)
        .header(SIGNATURE_HEADER, "not base64!")
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    let body = refused(response, StatusCode::UNPROCESSABLE_ENTITY, "headers").await;
    let keys: Vec<&str> = body.fields.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(keys, [SIGNATURE_HEADER, KEY_ID_HEADER], "{body:?}");
    assert!(blobs(&server).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn without_release_pub_every_upload_is_refused_naming_the_file() {
    let server = TestServer::start_full(
        ApiLimits::default(),
        64,
        ArtifactSetup {
            trust_release_key: false,
            ..ArtifactSetup::default()
        },
    )
    .await;
    let key = server.release_key.clone();
    let response = upload(&server, b"app", Upload::new(&key, "version=1")).await;
    let body = refused(response, StatusCode::SERVICE_UNAVAILABLE, "no keys").await;
    assert!(body.error.contains("release.pub"), "{body:?}");
    assert!(blobs(&server).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_upload_is_413_and_leaves_no_file() {
    let server = TestServer::start_full(
        ApiLimits::default(),
        64,
        ArtifactSetup {
            max_upload_bytes: 64 * 1024,
            ..ArtifactSetup::default()
        },
    )
    .await;
    let key = server.release_key.clone();
    let big = vec![9u8; 64 * 1024 + 1];
    // With Content-Length: refused before reading.
    let response = upload(&server, &big, Upload::new(&key, "version=1")).await;
    refused(response, StatusCode::PAYLOAD_TOO_LARGE, "content-length").await;
    // Chunked, without a length: refused while streaming, temp file removed.
    let sha: [u8; 32] = Sha256::digest(&big).into();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(8 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = server
        .client
        .post(server.url("/api/v1/artifacts?version=1"))
        .bearer_auth(TOKEN)
        .header(SIGNATURE_HEADER, BASE64.encode(key.sign_release(&sha)))
        .header(KEY_ID_HEADER, key.key_id())
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    refused(response, StatusCode::PAYLOAD_TOO_LARGE, "streamed").await;
    assert!(blobs(&server).is_empty(), "{:?}", blobs(&server));
    // Exactly at the limit is fine.
    let response = upload(&server, &big[1..], Upload::new(&key, "version=1")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    server.stop().await;
}
