//! `posctl pki release-key` and `posctl artifact sign|upload|list|show|delete` end to end
//! against a real controller (`app::start` on loopback); the uploaded artifact is then
//! downloaded from the device endpoint with a device certificate.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use posfleet_proto::DeviceId;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::super::{Cli, Command, run_artifact, run_pki};
use crate::app::{SHUTDOWN_GRACE, ServeOptions, start};
use crate::datadir::DataDir;
use crate::views::{ArtifactList, ArtifactView};

/// Runs `posctl --data-dir DATA args...` for `pki` and `artifact` commands.
async fn run(data: &str, args: &[&str]) -> (anyhow::Result<ExitCode>, String) {
    let full = ["posctl", "--data-dir", data]
        .into_iter()
        .chain(args.iter().copied());
    let cli = Cli::try_parse_from(full).unwrap();
    let mut out = Vec::new();
    let result = match cli.command {
        Command::Pki(cmd) => {
            run_pki(&cmd, &cli.conn, cli.output, &mut out).map(|()| ExitCode::SUCCESS)
        }
        Command::Artifact(cmd) => run_artifact(&cli.conn, cli.output, cmd, &mut out).await,
        Command::Api(_) => panic!("not a pki or artifact command: {args:?}"),
    };
    (result, String::from_utf8(out).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_key_sign_upload_list_show_download_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions::loopback(tmp.path().join("data"));
    let data = DataDir::at(&opts.data_dir);
    data.create().unwrap();
    data.pki().init(&[]).unwrap();
    let dir = opts.data_dir.display().to_string();

    // The release key is made away from the controller; only release.pub is installed.
    let keys = tmp.path().join("offline");
    let keys_arg = keys.display().to_string();
    let (r, out) = run(&dir, &["pki", "release-key", "--out", &keys_arg]).await;
    r.unwrap();
    assert!(out.contains("release.key"), "{out}");
    std::fs::copy(keys.join("release.pub"), data.pki().release_public_key()).unwrap();

    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let running = start(&opts, &tracker, cancel.clone()).await.unwrap();
    assert!(!running.artifacts.release_keys().is_empty());

    let file = tmp.path().join("app-5.0.0.bin");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let file_arg = file.display().to_string();
    let key_arg = keys.join("release.key").display().to_string();
    let (r, out) = run(&dir, &["artifact", "sign", "--key", &key_arg, &file_arg]).await;
    r.unwrap();
    let id = hex::encode(Sha256::digest(&bytes));
    assert!(out.contains(&id), "{out}");
    let sig: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{file_arg}.sig")).unwrap()).unwrap();
    assert_eq!(sig["sha256"], id);

    let (r, out) = run(
        &dir,
        &[
            "-o",
            "json",
            "artifact",
            "upload",
            &file_arg,
            "--version",
            "5.0.0",
            "--component",
            "firmware",
        ],
    )
    .await;
    r.unwrap();
    let view: ArtifactView = serde_json::from_str(&out).unwrap();
    assert_eq!(view.id, id);
    assert_eq!(view.component, "firmware");
    assert_eq!(
        view.download_url,
        format!(
            "https://127.0.0.1:{}/device/v1/artifacts/{id}",
            running.device_addr.port()
        )
    );
    let (r, out) = run(
        &dir,
        &[
            "artifact",
            "upload",
            &file_arg,
            "--version",
            "5.0.0",
            "--component",
            "firmware",
        ],
    )
    .await;
    r.unwrap();
    assert!(out.starts_with("Already stored"), "{out}");
    let (r, _) = run(
        &dir,
        &["artifact", "upload", &file_arg, "--version", "5.0.1"],
    )
    .await;
    let message = format!("{:#}", r.unwrap_err());
    assert!(
        message.contains("409") && message.contains("5.0.0"),
        "{message}"
    );

    let (r, out) = run(&dir, &["artifact", "list"]).await;
    r.unwrap();
    assert!(out.contains(&id[..16]) && out.contains("firmware"), "{out}");
    let (r, out) = run(&dir, &["-o", "json", "artifact", "list"]).await;
    r.unwrap();
    let list: ArtifactList = serde_json::from_str(&out).unwrap();
    assert_eq!(list.items, vec![view.clone()]);
    let (r, out) = run(&dir, &["artifact", "show", &id]).await;
    r.unwrap();
    assert!(out.contains("version      5.0.0"), "{out}");

    // A terminal downloads it from the device endpoint with its certificate.
    let device = data
        .pki()
        .load_ca()
        .unwrap()
        .issue_device(&DeviceId::new("T-1").unwrap())
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in
        posfleet_proto::pki::parse_pem_certs(&std::fs::read(data.pki().ca_cert()).unwrap()).unwrap()
    {
        roots.add(c).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        posfleet_proto::pki::parse_pem_certs(device.cert_pem.as_bytes()).unwrap(),
        PrivateKeyDer::from_pem_slice(device.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let got = client.get(&view.download_url).send().await.unwrap();
    assert_eq!(got.status(), reqwest::StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap().as_ref(), bytes.as_slice());

    let (r, out) = run(&dir, &["artifact", "delete", &id]).await;
    r.unwrap();
    assert!(out.contains("Deleted"), "{out}");
    let (r, _) = run(&dir, &["artifact", "show", &id]).await;
    assert!(format!("{:#}", r.unwrap_err()).contains("404"));
    assert!(!running.artifacts.store().blob_path(&id).exists());

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .expect("everything stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_release_pub_the_upload_error_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions::loopback(tmp.path().join("data"));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    start(&opts, &tracker, cancel.clone()).await.unwrap();
    let dir = opts.data_dir.display().to_string();
    let keys = tmp.path().join("k");
    let keys_arg = keys.display().to_string();
    run(&dir, &["pki", "release-key", "--out", &keys_arg])
        .await
        .0
        .unwrap();
    let file = tmp.path().join("a.bin");
    std::fs::write(&file, b"bytes").unwrap();
    let file_arg = file.display().to_string();
    let key_arg = keys.join("release.key").display().to_string();
    run(&dir, &["artifact", "sign", "--key", &key_arg, &file_arg])
        .await
        .0
        .unwrap();
    let (r, _) = run(&dir, &["artifact", "upload", &file_arg, "--version", "1"]).await;
    let message = format!("{:#}", r.unwrap_err());
    assert!(message.contains("release.pub"), "{message}");
    assert!(message.contains("posctl pki release-key"), "{message}");
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .expect("everything stops");
}
