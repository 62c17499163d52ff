//! What must never be installed: artifacts the controller refuses at upload, and artifacts
//! a terminal refuses after the download (corrupted blob, untrusted key, a server that sends
//! more than announced).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use posfleet_broker::views::{ArtifactList, CommandState};
use posfleet_tests::{Broker, Posctl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    Behaviour, Hooks, OLD_VERSION, artifact_file, final_command_of, hooks, install_release_key,
    is_aborted, reason, release_broker, release_key, reports_version, rollout_final, sign,
    sign_and_upload, update_agent, upload_raw,
};
use crate::commands::fast_broker;
use crate::support::online;

fn blobs_dir(broker: &Broker) -> PathBuf {
    broker.data_dir().join("artifacts").join("blobs")
}

/// Every file under `DATA/artifacts/blobs` (temp files of refused uploads included).
fn blob_files(broker: &Broker) -> Vec<PathBuf> {
    match std::fs::read_dir(blobs_dir(broker)) {
        Ok(dir) => dir.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read blobs dir: {e}"),
    }
}

async fn artifact_count(broker: &Broker) -> usize {
    let list: ArtifactList = Posctl::new(broker)
        .ok(&["-o", "json", "artifact", "list"])
        .await
        .expect("artifact list")
        .json()
        .expect("ArtifactList");
    list.items.len()
}

#[tokio::test]
async fn uploads_with_a_wrong_signature_or_an_unknown_key_are_refused_and_store_nothing() {
    let (broker, key) = release_broker().await;
    let a = artifact_file(&broker, "a.bin", 4096);
    let b = artifact_file(&broker, "b.bin", 4096);
    let sig_a = sign(&broker, &key.key, &a).await;

    // B with A's signature, its digest claimed as B's: the controller checks the signature
    // over what it received.
    let mut forged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sig_a).expect("sig")).expect("sig JSON");
    let b_sig = sign(&broker, &key.key, &b).await;
    let b_sig: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&b_sig).expect("sig")).expect("sig JSON");
    forged["sha256"] = b_sig["sha256"].clone();
    assert_ne!(forged, b_sig);
    let forged_path = broker
        .scratch_dir("artifacts")
        .expect("dir")
        .join("forged.sig");
    std::fs::write(&forged_path, forged.to_string()).expect("write forged sig");
    let out = upload_raw(&broker, &b, &forged_path, "9.9.9").await;
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("signature"), "{out}");

    // B with A's untouched .sig: the digests differ.
    let out = upload_raw(&broker, &b, &sig_a, "9.9.9").await;
    assert!(!out.status.success(), "{out}");

    // Signed by a release key the controller does not trust.
    let other = release_key(&broker, "other-release").await;
    let sig_other = sign(&broker, &other.key, &a).await;
    let out = upload_raw(&broker, &a, &sig_other, "9.9.9").await;
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("does not trust"), "{out}");

    assert_eq!(artifact_count(&broker).await, 0);
    assert_eq!(blob_files(&broker), Vec::<PathBuf>::new());
    // The controller still takes a good one.
    sign_and_upload(&broker, &key, &a, "9.9.9").await;
    assert_eq!(artifact_count(&broker).await, 1);
}

/// Runs a one-terminal rollout of `artifact_id` to `device`; the update command once final.
async fn roll_out_to(broker: &Broker, artifact_id: &str, device: &str) -> super::CommandView {
    let api = broker.api();
    let created = super::create_rollout(
        api,
        serde_json::json!({"artifact_id": artifact_id, "target": {"devices": [device]},
                           "waves": [100], "wave_timeout_s": 60}),
    )
    .await;
    let cmd = final_command_of(api, device, "software_update").await;
    let view = rollout_final(api, &created.id).await;
    if cmd.status == CommandState::Succeeded {
        assert_eq!(view.state.name(), "completed", "{view:#?}");
    } else {
        assert!(is_aborted(&view), "{view:#?}");
    }
    cmd
}

/// Nothing ran on `device` but maybe the rollback hook; its version is unchanged.
async fn nothing_installed(broker: &Broker, hooks: &Hooks, device: &str) {
    assert_eq!(hooks.installed(device), None);
    assert!(hooks.lines("install", device).is_empty());
    reports_version(broker.api(), device, OLD_VERSION).await;
}

#[tokio::test]
async fn a_blob_corrupted_on_the_controller_is_refused_as_tampered() {
    let (broker, key) = release_broker().await;
    let hooks = hooks(&broker.scratch_dir("hooks").expect("dir"), Behaviour::Fine);
    let mut agent = update_agent(&broker, "tamper-1", &hooks, None, "");
    online(broker.api(), "tamper-1").await;
    let file = artifact_file(&broker, "app.bin", 64 * 1024);
    let artifact = sign_and_upload(&broker, &key, &file, "4.0.0").await;
    let blob = blobs_dir(&broker).join(&artifact.id);
    let mut bytes = std::fs::read(&blob).expect("stored blob");
    assert_eq!(bytes, std::fs::read(&file).expect("file"));
    bytes[1000] ^= 0x01;
    std::fs::write(&blob, &bytes).expect("corrupt the blob");

    let cmd = roll_out_to(&broker, &artifact.id, "tamper-1").await;
    assert_eq!(reason(&cmd), "tampered", "{cmd:#?}");
    nothing_installed(&broker, &hooks, "tamper-1").await;
    // The terminal deleted what it downloaded.
    agent.terminate().await.expect("stop agent");
    assert_eq!(
        files_in(&agent.state_dir().join("updates")),
        Vec::<PathBuf>::new()
    );
}

#[tokio::test]
async fn a_terminal_that_does_not_trust_the_release_key_installs_nothing() {
    let (broker, key) = release_broker().await;
    let other = release_key(&broker, "terminal-key").await;
    let hooks = hooks(&broker.scratch_dir("hooks").expect("dir"), Behaviour::Fine);
    let _agent = update_agent(&broker, "distrust-1", &hooks, Some(&other.public), "");
    online(broker.api(), "distrust-1").await;
    let file = artifact_file(&broker, "app.bin", 4096);
    let artifact = sign_and_upload(&broker, &key, &file, "4.1.0").await;
    let cmd = roll_out_to(&broker, &artifact.id, "distrust-1").await;
    assert_eq!(reason(&cmd), "unknown_release_key", "{cmd:#?}");
    nothing_installed(&broker, &hooks, "distrust-1").await;
}

#[tokio::test]
async fn bytes_appended_to_a_stored_blob_never_reach_a_terminal() {
    // The device endpoint serves the size recorded at upload, so the terminal gets exactly
    // the signed bytes (and verifies them) however the file on disk grew.
    let (broker, key) = release_broker().await;
    let hooks = hooks(&broker.scratch_dir("hooks").expect("dir"), Behaviour::Fine);
    let _agent = update_agent(&broker, "grown-1", &hooks, None, "");
    online(broker.api(), "grown-1").await;
    let file = artifact_file(&broker, "app.bin", 64 * 1024);
    let artifact = sign_and_upload(&broker, &key, &file, "4.2.0").await;
    let blob = blobs_dir(&broker).join(&artifact.id);
    let mut grown = std::fs::read(&blob).expect("blob");
    grown.extend_from_slice(b"#!/bin/sh\nexec evil\n");
    std::fs::write(&blob, &grown).expect("append to the blob");

    let cmd = roll_out_to(&broker, &artifact.id, "grown-1").await;
    assert_eq!(cmd.status, CommandState::Succeeded, "{cmd:#?}");
    assert_eq!(
        hooks.installed("grown-1"),
        Some(std::fs::read(&file).expect("file")),
        "the install hook must get exactly the signed bytes"
    );
}

#[tokio::test]
async fn a_server_sending_more_than_announced_fails_the_update_as_too_large() {
    // A rogue download server with the controller's own certificate (a stolen host or a
    // misconfigured mirror) streams the artifact plus more, without a Content-Length.
    let mut broker = fast_broker().await;
    let key = install_release_key(&mut broker).await;
    let file = artifact_file(&broker, "app.bin", 256 * 1024);
    let mut body = std::fs::read(&file).expect("file");
    body.extend(std::iter::repeat_n(0x5a, 512 * 1024));
    let rogue = RogueServer::start(&broker, body).await;
    broker
        .restart_with(&["--device-url", &format!("https://{}", rogue.addr)])
        .await
        .expect("restart with --device-url");
    let hooks = hooks(&broker.scratch_dir("hooks").expect("dir"), Behaviour::Fine);
    let mut agent = update_agent(&broker, "rogue-1", &hooks, None, "");
    online(broker.api(), "rogue-1").await;
    let artifact = sign_and_upload(&broker, &key, &file, "4.3.0").await;
    let cmd = roll_out_to(&broker, &artifact.id, "rogue-1").await;
    assert_eq!(reason(&cmd), "too_large", "{cmd:#?}");
    nothing_installed(&broker, &hooks, "rogue-1").await;
    agent.terminate().await.expect("stop agent");
    assert_eq!(
        files_in(&agent.state_dir().join("updates")),
        Vec::<PathBuf>::new()
    );
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(d) => d.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// An HTTPS server with the broker's server certificate (client certificates from the
/// fleet CA required, like the device endpoint) that answers every request with `body`,
/// 200, no Content-Length, then closes.
struct RogueServer {
    addr: std::net::SocketAddr,
    _stop: DropGuard,
}

impl RogueServer {
    async fn start(broker: &Broker, body: Vec<u8>) -> Self {
        let pki = broker.pki();
        let tls = posfleet_broker::artifacts::device_tls_config(
            &pki.ca_cert(),
            &pki.server_cert(),
            &pki.server_key(),
        )
        .expect("TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let body = Arc::new(body);
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = token.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                };
                let (acceptor, body) = (acceptor.clone(), body.clone());
                tokio::spawn(token.clone().run_until_cancelled_owned(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                                   Connection: close\r\n\r\n";
                    if tls.write_all(answer).await.is_err() {
                        return;
                    }
                    let _ = tls.write_all(&body).await;
                    let _ = tls.shutdown().await;
                }));
            }
        });
        Self {
            addr,
            _stop: stop.drop_guard(),
        }
    }
}
