//! posctl's command-plane subcommands against the real server (`app::start` on loopback).

use std::process::ExitCode;

use posfleet_proto::DeviceId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{error_text, posctl};
use crate::app::{SHUTDOWN_GRACE, ServeOptions, start};
use crate::registry::DeviceInfo;

async fn run(data: &str, args: &[&str]) -> (anyhow::Result<std::process::ExitCode>, String) {
    let mut full = vec!["--data-dir", data];
    full.extend_from_slice(args);
    posctl(&full, std::future::pending()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_reboot_list_show_cancel_groups_labels_and_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions::loopback(tmp.path().join("data"));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let running = start(&opts, &tracker, cancel.clone()).await.unwrap();
    for id in ["T-1", "T-2"] {
        let id = DeviceId::new(id).unwrap();
        running
            .registry
            .presence_online(&id, 1, 1, DeviceInfo::default());
    }
    let data = opts.data_dir.display().to_string();

    let (r, out) = run(&data, &["devices", "set-groups", "T-1", "pilot", "north"]).await;
    r.unwrap();
    assert!(out.contains("T-1: groups north, pilot"), "{out}");
    let (r, out) = run(&data, &["devices", "set-labels", "T-2", "site=s1"]).await;
    r.unwrap();
    assert!(out.contains("site=s1"), "{out}");

    let (r, out) = run(&data, &["lock", "--group", "pilot", "--reason", "stolen"]).await;
    r.unwrap();
    assert!(
        out.contains("T-1") && out.contains("lock") && out.contains("1 command queued"),
        "{out}"
    );
    let (r, out) = run(&data, &["-o", "json", "reboot", "--label", "site=s1"]).await;
    r.unwrap();
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let reboot_id = created["commands"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["commands"][0]["device_id"], "T-2");

    let (r, out) = run(&data, &["commands", "list", "--device", "T-2"]).await;
    r.unwrap();
    assert!(out.contains(&reboot_id) && !out.contains("lock"), "{out}");
    let (r, out) = run(&data, &["commands", "show", &reboot_id]).await;
    r.unwrap();
    assert!(out.contains("status       queued"), "{out}");
    let (r, out) = run(&data, &["commands", "cancel", &reboot_id]).await;
    r.unwrap();
    assert!(out.contains("cancelled"), "{out}");
    let (r, _) = run(&data, &["commands", "cancel", &reboot_id]).await;
    assert!(error_text(r).contains("already cancelled"));

    // Refused requests say why.
    let (r, _) = run(&data, &["lock", "T-9", "--reason", "x"]).await;
    assert!(error_text(r).contains("T-9"));
    let (r, _) = run(&data, &["reboot", "--group", "nobody"]).await;
    assert!(error_text(r).contains("matches no device"));

    let (r, out) = run(
        &data,
        &[
            "-o",
            "json",
            "logs",
            "collect",
            "T-1",
            "--max-bytes",
            "1000",
        ],
    )
    .await;
    r.unwrap();
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let logs_id = created["commands"][0]["id"].as_str().unwrap().to_owned();
    let (r, _) = run(&data, &["logs", "get", &logs_id]).await;
    assert!(error_text(r).contains("no uploaded logs yet"));
    // Two-person approval is on by default: the wipe waits for a second admin, and the one
    // bootstrap admin never approves (its own request or any other).
    let (r, out) = run(&data, &["wipe", "T-2", "--force"]).await;
    r.unwrap();
    assert!(out.contains("needs a second admin"), "{out}");
    let (r, out) = run(&data, &["-o", "json", "approvals", "list"]).await;
    r.unwrap();
    let list: crate::views::ApprovalList = serde_json::from_str(&out).unwrap();
    let (r, _) = run(&data, &["approvals", "approve", &list.approvals[0].id]).await;
    assert!(error_text(r).contains("the bootstrap token cannot approve"));

    // Everything above is on the audit chain, and the CLI reads it back.
    let (r, out) = run(&data, &["audit", "verify"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS, "{out}");
    assert!(out.contains("intact"), "{out}");
    let (r, out) = run(&data, &["audit", "list", "--action", "approval.approve"]).await;
    r.unwrap();
    assert!(out.contains("denied"), "{out}");
    let export = tmp.path().join("audit.jsonl");
    let (r, _) = run(
        &data,
        &["audit", "export", "--out", export.to_str().unwrap()],
    )
    .await;
    r.unwrap();
    let lines = std::fs::read_to_string(&export).unwrap();
    assert!(lines.lines().count() > 10);

    // Custody and lost/found.
    let (r, _) = run(
        &data,
        &[
            "custody",
            "record",
            "T-1",
            "--from",
            "depot",
            "--to",
            "alice",
            "--location",
            "Leeds",
        ],
    )
    .await;
    r.unwrap();
    let (r, _) = run(&data, &["devices", "lost", "T-1", "--reason", "stolen"]).await;
    r.unwrap();
    let (r, out) = run(&data, &["custody", "history", "T-1"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    assert!(out.contains("alice") && out.contains("lost"), "{out}");

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .expect("everything stops");
}
