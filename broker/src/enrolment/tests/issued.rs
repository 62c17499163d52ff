//! Issue 10 item 8: every certificate the fleet CA issues is recorded, so a bundle made with
//! `posctl pki issue-device` can be revoked before the terminal ever connected.

use std::path::{Path, PathBuf};

use clap::Parser as _;
use posfleet_proto::DeviceId;
use posfleet_proto::pki::CertFacts;
use reqwest::StatusCode;
use serde_json::json;

use super::{Fixture, eventually};
use crate::views::RevocationView;

/// Runs `posctl --data-dir DATA --config-dir CFG args...` in-process (on a blocking thread:
/// posctl starts its own runtime) and returns what it printed, or its error.
pub(super) async fn posctl(f: &Fixture, args: &[&str]) -> Result<String, String> {
    let data = f._tmp.path().join("data");
    let config = f._tmp.path().join("posctl-config");
    let mut argv: Vec<String> = vec![
        "posctl".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--config-dir".into(),
        config.display().to_string(),
    ];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    tokio::task::spawn_blocking(move || {
        let cli = crate::posctl::Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let code = crate::posctl::run_to(cli, &mut out).map_err(|e| format!("{e:#}"))?;
        let printed = String::from_utf8_lossy(&out).into_owned();
        if code == std::process::ExitCode::SUCCESS {
            Ok(printed)
        } else {
            Err(printed)
        }
    })
    .await
    .unwrap()
}

/// `posctl pki issue-device --id ID --out DIR` (the server's data dir, no `--dir`).
pub(super) async fn issue_device(f: &Fixture, id: &str, out: &Path) -> Result<String, String> {
    let out = out.to_str().unwrap();
    posctl(f, &["pki", "issue-device", "--id", id, "--out", out]).await
}

/// [`issue_device`] into `bundle-ID`: the bundle's certificate and key.
pub(super) async fn cli_bundle(f: &Fixture, id: &str) -> (PathBuf, String, String) {
    let out = f._tmp.path().join(format!("bundle-{id}"));
    let printed = issue_device(f, id, &out)
        .await
        .unwrap_or_else(|e| panic!("posctl pki issue-device {id}: {e}"));
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    let (cert, key) = (read("device.crt"), read("device.key"));
    (out, cert, key)
}

fn serial_of(cert_pem: &str) -> String {
    CertFacts::from_pem(cert_pem).unwrap().serial
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_issued_bundle_is_revocable_before_first_contact() {
    let f = Fixture::start().await;
    let (dir, cert, key) = cli_bundle(&f, "T-pre").await;
    assert_eq!(mode(&dir.join("device.key")), 0o600);
    let serial = serial_of(&cert);

    // The bundle was stolen before the terminal was ever deployed: revoke it.
    let r = f
        .admin_post(
            "/api/v1/devices/T-pre/revoke",
            json!({"reason": "bundle lost in transit"}),
        )
        .await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "revoking a CLI-issued bundle before first contact: {body}"
    );
    let view: RevocationView = serde_json::from_str(&body).unwrap();
    assert_eq!(view.serials, vec![serial.clone()], "{view:?}");

    // The CRL lists it.
    let crl = f.admin_get("/api/v1/pki/crl").await.bytes().await.unwrap();
    assert!(
        posfleet_proto::pki::crl_serials(&crl, &f.ca_pem)
            .unwrap()
            .contains(&serial)
    );

    // Whoever holds the bundle is refused at CONNECT and never shows up online.
    let before = f.refusal_count("revoked");
    let _events = f.session("T-pre", &cert, &key);
    eventually("the stolen bundle refused at CONNECT", || {
        f.refusal_count("revoked") > before
    })
    .await;
    assert!(
        !f.running
            .registry
            .is_online(&DeviceId::new("T-pre").unwrap())
    );
    f.stop().await;
}

/// The certificate records of `id` (`GET /api/v1/devices/{id}/certificates`).
async fn records(f: &Fixture, id: &str) -> (StatusCode, serde_json::Value) {
    let r = f
        .admin_get(&format!("/api/v1/devices/{id}/certificates"))
        .await;
    (r.status(), r.json().await.unwrap())
}

fn request(id: &str) -> serde_json::Value {
    let csr = posfleet_proto::pki::DeviceKeyRequest::generate(&DeviceId::new(id).unwrap())
        .unwrap()
        .csr_pem;
    json!({"device_id": id, "csr_pem": csr})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_issued_certificate_is_recorded_and_bad_batches_change_nothing() {
    let f = Fixture::start().await;
    // Enrolment and the CLI both leave a record saying how.
    let (enrolled, _) = f.enrolled("T-enr").await;
    let (_, cli_cert, _) = cli_bundle(&f, "T-cli").await;
    let (status, body) = records(&f, "T-enr").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"][0]["kind"], "enrolment", "{body}");
    assert_eq!(
        body["items"][0]["serial"],
        serial_of(&enrolled.certificate_pem)
    );
    let (_, body) = records(&f, "T-cli").await;
    assert_eq!(body["items"][0]["kind"], "cli", "{body}");
    assert_eq!(body["items"][0]["issued_by"], "admin", "{body}");
    assert_eq!(body["items"][0]["serial"], serial_of(&cli_cert), "{body}");
    assert_eq!(body["items"][0]["revoked"], false, "{body}");
    let (status, _) = records(&f, "T-never").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let printed = posctl(&f, &["devices", "certificates", "T-cli"])
        .await
        .unwrap();
    assert!(
        printed.contains(&serial_of(&cli_cert)) && printed.contains("cli"),
        "{printed}"
    );

    // A batch for the simulator: every certificate recorded.
    let r = f
        .admin_post(
            "/api/v1/pki/certificates",
            json!({"purpose": "simulator", "requests": [request("sim-1"), request("sim-2")]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let issued: crate::views::IssuedCertificates = r.json().await.unwrap();
    assert_eq!(issued.items.len(), 2);
    assert!(issued.command_pub_pem.contains("PUBLIC KEY"));
    for item in &issued.items {
        assert_eq!(serial_of(&item.certificate_pem), item.serial);
        let (_, body) = records(&f, &item.device_id).await;
        assert_eq!(body["items"][0]["kind"], "simulator", "{body}");
    }

    // Refused batches name the field and issue nothing at all.
    let revoke = f
        .admin_post("/api/v1/devices/T-cli/revoke", json!({"reason": "test"}))
        .await;
    assert_eq!(revoke.status(), StatusCode::OK);
    let (_, body) = records(&f, "T-cli").await;
    assert_eq!(body["items"][0]["revoked"], true, "{body}");
    for (body, status, field) in [
        (
            json!({"requests": [request("ok-1"), request("ok-1")]}),
            StatusCode::BAD_REQUEST,
            "requests[1].device_id",
        ),
        (
            json!({"requests": [request("ok-1"), {"device_id": "ok-2", "csr_pem": "junk"}]}),
            StatusCode::BAD_REQUEST,
            "requests[1].csr_pem",
        ),
        (
            json!({"requests": [request("ok-1"), request("T-cli")]}),
            StatusCode::CONFLICT,
            "requests[1].device_id",
        ),
        (
            json!({"purpose": "enrolment", "requests": [request("ok-1")]}),
            StatusCode::BAD_REQUEST,
            "purpose",
        ),
        (json!({"requests": []}), StatusCode::BAD_REQUEST, "requests"),
        (
            json!({"requests": [{"device_id": "a/b", "csr_pem": "x"}]}),
            StatusCode::BAD_REQUEST,
            "device_id",
        ),
    ] {
        let r = f.admin_post("/api/v1/pki/certificates", body).await;
        assert_eq!(r.status(), status);
        let err: crate::views::ErrorBody = r.json().await.unwrap();
        assert!(err.fields.iter().any(|x| x.key == field), "{err:?}");
    }
    let (status, _) = records(&f, "ok-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a refused batch issued ok-1");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_issue_is_audited_at_the_next_start_and_revocable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = crate::datadir::DataDir::at(tmp.path().join("data"));
    data.create().unwrap();
    data.pki().init(&[]).unwrap();
    let out = tmp.path().join("bundle-T-off");
    let mut printed = Vec::new();
    crate::posctl::pki::issue_device_offline(
        data.pki().dir(),
        &DeviceId::new("T-off").unwrap(),
        &out,
        false,
        crate::posctl::OutputFormat::Table,
        &mut printed,
    )
    .unwrap();
    let cert = std::fs::read_to_string(out.join("device.crt")).unwrap();
    let key = std::fs::read_to_string(out.join("device.key")).unwrap();

    let f = Fixture::start_in(tmp).await;
    let r = f
        .admin_get("/api/v1/audit?action=pki.issue")
        .await
        .text()
        .await
        .unwrap();
    assert!(r.contains("T-off") && r.contains("posctl (offline)"), "{r}");
    assert!(r.contains(&serial_of(&cert)), "{r}");
    let (_, body) = records(&f, "T-off").await;
    assert_eq!(body["items"][0]["kind"], "cli_offline", "{body}");

    let r = f
        .admin_post("/api/v1/devices/T-off/revoke", json!({"reason": "lost"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let before = f.refusal_count("revoked");
    let _events = f.session("T-off", &cert, &key);
    eventually("the offline bundle refused", || {
        f.refusal_count("revoked") > before
    })
    .await;
    f.stop().await;
}
