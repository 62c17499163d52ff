//! One-shot commands: wipe (refused while transactions are undelivered, then forced), reboot
//! and log collection through hooks.

use posfleet_broker::views::CommandState;
use posfleet_tests::{Posctl, Proxy, eventually};
use serde_json::json;

use super::{
    created_one, expect_final, fast_broker, hooks_table, local_status, marker_lines, post_sale,
    start_agent, status_until, write_hook,
};
use crate::support::{WAIT, online};

#[tokio::test]
async fn commands_wipe_is_refused_with_undelivered_transactions_and_forced() {
    let broker = fast_broker().await;
    let api = broker.api();
    let proxy = Proxy::start(broker.mqtt_addr()).await.expect("proxy");
    // A long linger keeps a transaction in the outbox for 5 s after (re)connecting, so the
    // wipe reaches the terminal while it is certainly undelivered.
    let extra = "\n[outbox]\nlinger = \"5s\"\n";
    let mut agent = start_agent(&broker, "wipe-1", &proxy.mqtt_url(), extra);
    online(api, "wipe-1").await;
    let local = agent.local_api();

    proxy.sever();
    status_until(&local, "disconnected", |s| s["connected"] == json!(false)).await;
    assert_eq!(post_sale(&local, "unsent-1").await.status, 201);
    let posctl = Posctl::new(&broker);
    let wipe = created_one(
        &posctl
            .ok(&["wipe", "wipe-1", "-o", "json"])
            .await
            .expect("posctl wipe"),
    );
    proxy.restore();
    let refused = expect_final(api, &wipe.id, CommandState::Rejected).await;
    assert_eq!(
        refused.rejection_reason.as_deref(),
        Some("refused"),
        "{refused:?}"
    );
    assert!(refused.message.contains("transaction"), "{refused:?}");
    let status = local_status(&local).await.expect("status");
    assert_eq!(
        status["locked"],
        json!(false),
        "a refused wipe changes nothing: {status}"
    );
    assert_eq!(status["outbox"]["depth"], json!(1), "{status}");
    let key = agent.bundle_dir().join("device.key");
    assert!(key.exists(), "the key is still there");
    // The outbox drains by itself; the terminal keeps working.
    status_until(&local, "drained", |s| s["outbox"]["depth"] == json!(0)).await;

    let out = posctl
        .ok(&["wipe", "wipe-1", "--force", "-o", "json"])
        .await
        .expect("posctl wipe --force");
    let forced = created_one(&out);
    let process_exit = agent
        .wait_exit(WAIT)
        .await
        .expect("the agent exits by itself");
    assert_eq!(
        process_exit.code(),
        Some(3),
        "a wiped agent exits 3: {process_exit}"
    );
    let done = expect_final(api, &forced.id, CommandState::Succeeded).await;
    assert!(done.message.contains("wiped"), "{done:?}");
    assert!(!key.exists(), "the device key is deleted");
    assert!(
        !agent.state_dir().join("config.json").exists(),
        "no configuration left"
    );
}

#[tokio::test]
async fn commands_reboot_and_collect_logs_through_hooks() {
    let broker = fast_broker().await;
    let api = broker.api();
    let hooks = broker.scratch_dir("oneshot-hooks").expect("dir");
    let reboots = hooks.join("reboots");
    let reboot = write_hook(
        &hooks,
        "reboot",
        &format!("echo \"$POSFLEET_DEVICE_ID\" >> '{}'", reboots.display()),
    );
    let logs = write_hook(
        &hooks,
        "collect-logs",
        "printf 'boot ok\\nprinter: paper low\\nmax=%s\\n' \"$POSFLEET_LOGS_MAX_BYTES\"",
    );
    let extra = hooks_table(&[
        ("reboot", reboot.as_path()),
        ("collect_logs", logs.as_path()),
    ]);
    let _agent = start_agent(&broker, "one-1", &broker.mqtt_url(), &extra);
    online(api, "one-1").await;
    let posctl = Posctl::new(&broker);

    let reboot_cmd = created_one(
        &posctl
            .ok(&["reboot", "one-1", "-o", "json"])
            .await
            .expect("posctl reboot"),
    );
    expect_final(api, &reboot_cmd.id, CommandState::Succeeded).await;
    assert_eq!(marker_lines(&reboots), ["one-1"]);

    let cmd = created_one(
        &posctl
            .ok(&[
                "logs",
                "collect",
                "one-1",
                "--max-bytes",
                "4096",
                "-o",
                "json",
            ])
            .await
            .expect("posctl logs collect"),
    );
    let done = expect_final(api, &cmd.id, CommandState::Succeeded).await;
    let expected = "boot ok\nprinter: paper low\nmax=4096\n";
    assert_eq!(
        done.details.get("bytes"),
        Some(&expected.len().to_string()),
        "{done:?}"
    );
    let out = eventually(WAIT, || async {
        let cmd = api.command(&done.id).await?;
        anyhow::ensure!(cmd.logs_complete, "upload not complete: {cmd:?}");
        posctl.ok(&["logs", "get", &done.id]).await
    })
    .await;
    assert_eq!(out.stdout, expected, "{out}");
    let file = broker
        .scratch_dir("downloads")
        .expect("dir")
        .join("one-1.log");
    let path = file.display().to_string();
    posctl
        .ok(&["logs", "get", &done.id, "--out", &path])
        .await
        .expect("logs get --out");
    assert_eq!(std::fs::read_to_string(&file).expect("file"), expected);
    // A command that has no logs: a clear refusal.
    let out = posctl
        .run(&["logs", "get", &reboot_cmd.id])
        .await
        .expect("posctl runs");
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("collect_logs"), "{out}");
}
