//! Issue 10 item 5 on the open enrolment route and the device endpoint: refused enrolments
//! and renewals are counted and written aggregated (one audit entry per key and window with
//! the count, `crate::audit::Refusals`), so nobody can fill the disk through them; successful
//! enrolments and renewals are still recorded one by one.

use posfleet_proto::DeviceId;
use posfleet_proto::pki::DeviceKeyRequest;
use reqwest::StatusCode;
use serde_json::json;

use super::Fixture;
use crate::audit::{Outcome, refusal_count};
use crate::views::{AuditEntry, AuditPage};

/// The entries of `action` (newest first), read through the API (which writes every pending
/// refusal count first).
async fn audit_entries(f: &Fixture, action: &str) -> Vec<AuditEntry> {
    let r = f
        .admin_get(&format!("/api/v1/audit?action={action}&limit=1000"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let page: AuditPage = r.json().await.unwrap();
    page.entries
        .into_iter()
        .filter(|e| e.action == action)
        .collect()
}

/// The number of refusals an entry stands for: an aggregated entry says "N refusals ...",
/// any other entry is one.
fn stands_for(e: &AuditEntry) -> u64 {
    refusal_count(&e.detail).unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_refused_enrolments_make_a_bounded_number_of_audit_entries() {
    let f = Fixture::start().await;
    let csr = DeviceKeyRequest::generate(&DeviceId::new("probe").unwrap())
        .unwrap()
        .csr_pem;
    const TOTAL: usize = 1000;
    const TASKS: usize = 4;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (client, url, csr) = (f.client.clone(), f.api("/api/v1/enroll"), csr.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..TOTAL / TASKS {
                // Every request names another device and another token: what an attacker
                // controls must not multiply the entries.
                let n = t * TOTAL + i;
                let (token, csr) = match n % 3 {
                    0 => (format!("pfe_{n:012x}_{}", "a".repeat(45)), csr.as_str()),
                    1 => ("not a token".to_owned(), csr.as_str()),
                    _ => (format!("pfe_{n:012x}_{}", "b".repeat(45)), "not a csr"),
                };
                let r = client
                    .post(&url)
                    .json(&json!({"token": token, "device_id": format!("probe-{n}"),
                                  "serial": "SN-1", "csr_pem": csr}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_client_error(), "{}", r.status());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let refused: Vec<AuditEntry> = audit_entries(&f, "device.enroll")
        .await
        .into_iter()
        .filter(|e| e.outcome != Outcome::Success)
        .collect();
    // At most: the failures before the address is rate limited (10, each its own key), then
    // one entry per minute of rate-limited refusals (the run takes a few seconds).
    assert!(
        refused.len() <= 20,
        "{} audit entries for {TOTAL} refused enrolments from one address",
        refused.len()
    );
    let counted: u64 = refused.iter().map(stands_for).sum();
    assert_eq!(
        counted, TOTAL as u64,
        "the audit entries of refused enrolments do not add up: {refused:#?}"
    );
    // A successful enrolment (from another address: this one is rate limited now) is still
    // recorded on its own, at once.
    let token = f.token(json!({"expires_in": "1h"})).await;
    let request = crate::views::EnrollRequest {
        token: token.token,
        device_id: "T-ok".into(),
        serial: "SN-1".into(),
        csr_pem: csr,
    };
    let enrolment = std::sync::Arc::clone(&f.running.enrolment);
    tokio::task::spawn_blocking(move || {
        enrolment.enroll(&request, [127, 0, 0, 2].into(), posfleet_proto::now_ms())
    })
    .await
    .unwrap()
    .unwrap();
    let ok: Vec<AuditEntry> = audit_entries(&f, "device.enroll")
        .await
        .into_iter()
        .filter(|e| e.outcome == Outcome::Success)
        .collect();
    assert_eq!(ok.len(), 1, "{ok:#?}");
    assert_eq!(ok[0].target, "T-ok");
    assert_eq!(refusal_count(&ok[0].detail), None, "{ok:#?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_renewals_make_a_bounded_number_of_audit_entries() {
    let f = Fixture::start().await;
    let (enrolled, key) = f.enrolled("T-1").await;
    let device = f.device_client(&enrolled.certificate_pem, &key);
    const TOTAL: usize = 200;
    for _ in 0..TOTAL {
        let r = device
            .post(f.device_url("/device/v1/renew"))
            .json(&json!({"csr_pem": "not a csr"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
    let renewals = audit_entries(&f, "device.renew").await;
    assert!(
        renewals.len() <= 3,
        "{} audit entries for {TOTAL} refused renewals of one device",
        renewals.len()
    );
    let counted: u64 = renewals.iter().map(stands_for).sum();
    assert_eq!(counted, TOTAL as u64, "{renewals:#?}");
    f.stop().await;
}
