//! `posctl enroll token create|list|revoke` and `posctl devices revoke|decommission` against
//! a real controller (`app::start` on loopback).

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{error_text, posctl};
use crate::app::{SHUTDOWN_GRACE, ServeOptions, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_revocation_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions::loopback(tmp.path().join("data"));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let running = start(&opts, &tracker, cancel.clone()).await.unwrap();
    let dir = opts.data_dir.display().to_string();
    let run = |args: Vec<&'static str>| {
        let dir = dir.clone();
        async move {
            let mut full = vec!["--data-dir", dir.as_str()];
            full.extend(args);
            posctl(&full, std::future::pending()).await
        }
    };

    let (r, out) = run(vec![
        "--output",
        "json",
        "enroll",
        "token",
        "create",
        "--serial",
        "SN-1",
        "--expires",
        "2h",
    ])
    .await;
    r.unwrap();
    let created: crate::views::TokenCreated = serde_json::from_str(&out).unwrap();
    assert!(created.token.starts_with("pfe_"));

    let (r, out) = run(vec!["enroll", "token", "list"]).await;
    r.unwrap();
    assert!(out.contains(&created.id) && out.contains("unused"));
    assert!(!out.contains(&created.token));

    let (r, _) = run(vec!["enroll", "token", "create", "--expires", "30d"]).await;
    assert!(error_text(r).contains("7 days"));

    // Revoke a device the controller knows.
    let id = posfleet_proto::DeviceId::new("T-7").unwrap();
    let now = posfleet_proto::now_ms();
    running
        .registry
        .presence_online(&id, now, now, crate::registry::DeviceInfo::default());
    let (r, out) = run(vec!["devices", "revoke", "T-7", "--reason", "lost"]).await;
    r.unwrap();
    assert!(out.contains("T-7 revoked"), "{out}");
    let (r, out) = run(vec![
        "devices",
        "decommission",
        "T-7",
        "--reason",
        "retired",
    ])
    .await;
    r.unwrap();
    assert!(out.contains("decommissioned"), "{out}");
    let (r, _) = run(vec!["devices", "revoke", "nobody", "--reason", "x"]).await;
    assert!(error_text(r).contains("no device"));

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .expect("everything stops");
}
