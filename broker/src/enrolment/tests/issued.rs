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

/// `posctl pki issue-device --id ID --out DIR` (the server's data dir, no `--dir`): the bundle's
/// certificate and key.
pub(super) async fn cli_bundle(f: &Fixture, id: &str) -> (PathBuf, String, String) {
    let out = f._tmp.path().join(format!("bundle-{id}"));
    let printed = posctl(
        f,
        &[
            "pki",
            "issue-device",
            "--id",
            id,
            "--out",
            out.to_str().unwrap(),
        ],
    )
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
    let crl = f
        .client
        .get(f.api("/api/v1/pki/crl"))
        .bearer_auth(&f.admin_token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
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
