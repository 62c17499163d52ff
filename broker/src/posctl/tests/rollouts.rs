//! posctl's rollout subcommands against the real server (`app::start_with_catalog` on
//! loopback, with a catalog that knows one artifact).

use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::DeviceId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{error_text, posctl};
use crate::app::{SHUTDOWN_GRACE, ServeOptions, start_with_catalog};
use crate::registry::DeviceInfo;
use crate::rollouts::tests::{ARTIFACT, FakeCatalog};

async fn run(data: &str, args: &[&str]) -> (anyhow::Result<std::process::ExitCode>, String) {
    let mut full = vec!["--data-dir", data];
    full.extend_from_slice(args);
    posctl(&full, std::future::pending()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_show_pause_resume_abort_and_follow() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions::loopback(tmp.path().join("data"));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let running = start_with_catalog(&opts, Arc::new(FakeCatalog), &tracker, cancel.clone())
        .await
        .unwrap();
    for id in ["T-1", "T-2", "T-3", "T-4"] {
        let id = DeviceId::new(id).unwrap();
        running
            .registry
            .presence_online(&id, 1, 1, DeviceInfo::default());
    }
    let data = opts.data_dir.display().to_string();

    // Refusals say which field is wrong.
    let (r, _) = run(
        &data,
        &["rollout", "create", &"b".repeat(64), "--group", "x"],
    )
    .await;
    let text = error_text(r);
    assert!(
        text.contains("artifact_id") && text.contains("target"),
        "{text}"
    );
    let (r, _) = run(
        &data,
        &[
            "rollout", "create", ARTIFACT, "--device", "T-1", "--waves", "50,10",
        ],
    )
    .await;
    assert!(error_text(r).contains("waves"));

    let (r, out) = run(
        &data,
        &[
            "-o",
            "json",
            "rollout",
            "create",
            ARTIFACT,
            "--device",
            "T-1",
            "--device",
            "T-2",
            "--device",
            "T-3",
            "--device",
            "T-4",
            "--waves",
            "25,100",
            "--success-threshold",
            "0.9",
            "--failure-threshold",
            "0.2",
            "--soak",
            "10m",
            "--wave-timeout",
            "30m",
        ],
    )
    .await;
    r.unwrap();
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["state"], "running");
    assert_eq!(created["soak_s"], 600);
    assert_eq!(created["wave_timeout_s"], 1800);
    assert_eq!(created["success_threshold"], 0.9);
    assert_eq!(created["waves"][0]["members"], 1);

    let (r, out) = run(&data, &["rollout", "list"]).await;
    r.unwrap();
    assert!(
        out.contains(&id) && out.contains("running") && out.contains("1/2"),
        "{out}"
    );
    let (r, out) = run(&data, &["rollout", "show", &id]).await;
    r.unwrap();
    assert!(
        out.contains("running (wave 1/2)") && out.contains("4 terminals"),
        "{out}"
    );
    let (r, out) = run(&data, &["rollout", "pause", &id]).await;
    r.unwrap();
    assert!(out.contains("paused (wave 1/2)"), "{out}");
    let (r, _) = run(&data, &["rollout", "pause", &id]).await;
    assert!(error_text(r).contains("paused"));
    let (r, out) = run(&data, &["rollout", "resume", &id]).await;
    r.unwrap();
    assert!(out.contains("running"), "{out}");

    // `show --follow` ends when the rollout ends (here: an abort while it follows).
    let follow_args = [
        "-o",
        "json",
        "rollout",
        "show",
        &id,
        "--follow",
        "--interval",
        "20ms",
        "--timeout",
        "30s",
    ];
    let follow = run(&data, &follow_args);
    let abort = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        run(&data, &["rollout", "abort", &id, "--reason", "bad canary"]).await
    };
    let ((followed, final_view), (aborted, abort_out)) =
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(follow, abort)
        })
        .await
        .expect("follow ends with the rollout");
    aborted.unwrap();
    assert!(
        abort_out.contains("aborted: aborted by an operator: bad canary"),
        "{abort_out}"
    );
    followed.unwrap();
    let final_view: serde_json::Value = serde_json::from_str(&final_view).unwrap();
    assert_eq!(final_view["state"], "aborted");
    // Table form of a finished rollout prints the summary at once.
    let (r, out) = run(&data, &["rollout", "show", &id, "--follow"]).await;
    r.unwrap();
    assert!(out.contains("aborted") && out.contains("WAVE"), "{out}");
    let (r, _) = run(&data, &["rollout", "resume", &id]).await;
    assert!(error_text(r).contains("aborted"));

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .expect("everything stops");
}
