//! Terminals that are offline, a link that breaks, a controller that crashes: desired state
//! and pending commands still arrive, exactly once, with no operator action.

use std::time::Duration;

use posfleet_broker::views::{CommandBody, CommandState};
use posfleet_tests::{Posctl, Proxy, eventually};
use serde_json::json;

use super::{
    created_one, expect_final, fast_broker, holds_for, hooks_table, local_config, local_status,
    marker_lines, post_sale, start_agent, status_until, write_hook,
};
use crate::support::{WAIT, offline, online};

#[tokio::test]
async fn commands_reach_a_terminal_that_was_offline_when_it_returns() {
    let broker = fast_broker().await;
    let api = broker.api();
    let mut agent = start_agent(&broker, "away-1", &broker.mqtt_url(), "");
    online(api, "away-1").await;
    agent.terminate().await.expect("SIGTERM agent");
    offline(api, "away-1").await;

    let posctl = Posctl::new(&broker);
    let out = posctl
        .ok(&["lock", "away-1", "--reason", "left behind", "-o", "json"])
        .await
        .expect("posctl lock");
    let lock = created_one(&out);
    posctl
        .ok(&["config", "set", "--fleet", "store.name=Fleet default"])
        .await
        .expect("config set fleet");
    let layer = api
        .config_set("devices/away-1", json!({"receipt.footer": "Thank you"}))
        .await
        .expect("config set device");
    let desired = eventually(WAIT, || async {
        let d = api
            .device("away-1")
            .await?
            .and_then(|d| d.desired)
            .ok_or_else(|| anyhow::anyhow!("no desired state"))?;
        anyhow::ensure!(d.config_version >= layer.version, "{d:?}");
        Ok(d)
    })
    .await;
    assert!(
        desired.lock.as_ref().is_some_and(|l| l.locked),
        "{desired:?}"
    );
    // Nothing can be delivered yet.
    let queued = api.command(&lock.id).await.expect("command");
    assert_eq!(queued.status, CommandState::Queued, "{queued:?}");

    agent.restart().expect("restart");
    let local = agent.local_api();
    let status = status_until(&local, "locked with the desired configuration", |s| {
        s["locked"] == json!(true) && s["config_version"] == json!(desired.config_version)
    })
    .await;
    assert_eq!(status["lock_reason"], json!("left behind"), "{status}");
    let config = local_config(&local).await.expect("GET /v1/config");
    assert_eq!(config["version"], json!(desired.config_version), "{config}");
    assert_eq!(
        config["document"],
        json!({"store.name": "Fleet default", "receipt.footer": "Thank you"}),
        "{config}"
    );
    expect_final(api, &lock.id, CommandState::Succeeded).await;
    assert_eq!(post_sale(&local, "while-locked").await.status, 423);
    // The controller sees it converged.
    eventually(WAIT, || async {
        let d = api.device("away-1").await?.expect("device");
        let r = d
            .reported
            .ok_or_else(|| anyhow::anyhow!("nothing reported"))?;
        anyhow::ensure!(
            r.locked && r.config_version == desired.config_version,
            "{r:?}"
        );
        Ok(())
    })
    .await;
    // Only the pushes the controller needed: the latest one succeeded, none failed.
    let page: posfleet_broker::views::CommandPage = api
        .get("/api/v1/commands?device=away-1&kind=config_push")
        .await
        .expect("list")
        .json()
        .await
        .expect("CommandPage");
    assert!(
        page.items.iter().any(|c| c.status == CommandState::Succeeded
            && matches!(c.body, CommandBody::ConfigPush { version, .. } if version == desired.config_version)),
        "{page:#?}"
    );
    assert!(
        page.items
            .iter()
            .all(|c| matches!(c.status, CommandState::Succeeded | CommandState::Cancelled)),
        "{page:#?}"
    );
}

#[tokio::test]
async fn commands_offline_lease_locks_a_cut_off_terminal_until_contact_returns() {
    let broker = fast_broker().await;
    let api = broker.api();
    let proxy = Proxy::start(broker.mqtt_addr()).await.expect("proxy");
    let lock_marks = broker.scratch_dir("lease-hooks").expect("dir");
    let marker = lock_marks.join("locks");
    let hook = write_hook(
        &lock_marks,
        "lock",
        &format!("echo \"$POSFLEET_LOCK_REASON\" >> '{}'", marker.display()),
    );
    let extra = format!(
        "max_offline = \"3s\"\n{}",
        hooks_table(&[("lock", hook.as_path())])
    );
    let agent = start_agent(&broker, "lease-1", &proxy.mqtt_url(), &extra);
    online(api, "lease-1").await;
    let local = agent.local_api();

    // Leases (every second) keep it unlocked well past max_offline.
    holds_for(Duration::from_secs(4), async || {
        let s = local_status(&local).await?;
        anyhow::ensure!(s["locked"] == json!(false), "locked while connected: {s}");
        Ok(())
    })
    .await;

    proxy.sever();
    let status = status_until(&local, "self-locked", |s| s["locked"] == json!(true)).await;
    assert_eq!(status["lock_reason"], json!("offline_lease"), "{status}");
    assert_eq!(status["lock_generation"], json!(0), "{status}");
    let refused = post_sale(&local, "cut-off").await;
    assert_eq!(refused.status, 423, "{refused:?}");
    // The hook runs after the lock is enforced (agent/src/command/lock.rs), and no command
    // result tells when it is done: wait for its line (it failed once under load when read
    // right after the status showed the lock).
    eventually(WAIT, || async {
        anyhow::ensure!(
            !marker_lines(&marker).is_empty(),
            "the lock hook has not run yet"
        );
        Ok(())
    })
    .await;
    assert_eq!(
        marker_lines(&marker),
        ["offline_lease"],
        "the lock hook ran once"
    );

    proxy.restore();
    let status = status_until(&local, "unlocked", |s| s["locked"] == json!(false)).await;
    assert_eq!(status["lock_reason"], json!(""), "{status}");
    assert_eq!(post_sale(&local, "back").await.status, 201);
    let d = api.device("lease-1").await.expect("GET").expect("device");
    assert!(
        d.desired.as_ref().is_none_or(|w| w.lock.is_none()),
        "nobody asked for a lock: {d:?}"
    );
    eventually(WAIT, || async {
        let d = api.device("lease-1").await?.expect("device");
        anyhow::ensure!(d.reported.as_ref().is_some_and(|r| !r.locked), "{d:?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn commands_pending_across_a_controller_crash_are_delivered_once() {
    let mut broker = fast_broker().await;
    let hooks = broker.scratch_dir("crash-hooks").expect("dir");
    let reboots = hooks.join("reboots");
    let hook = write_hook(
        &hooks,
        "reboot",
        &format!("echo rebooted >> '{}'", reboots.display()),
    );
    let extra = hooks_table(&[("reboot", hook.as_path())]);
    let mut agent = start_agent(&broker, "crash-1", &broker.mqtt_url(), &extra);
    online(broker.api(), "crash-1").await;
    agent.terminate().await.expect("SIGTERM agent");
    offline(broker.api(), "crash-1").await;

    let posctl = Posctl::new(&broker);
    let lock = created_one(
        &posctl
            .ok(&["lock", "crash-1", "--reason", "pending", "-o", "json"])
            .await
            .expect("lock"),
    );
    let reboot = created_one(
        &posctl
            .ok(&["reboot", "crash-1", "-o", "json"])
            .await
            .expect("reboot"),
    );

    // Accepted (202) means durable: a crash right after loses nothing.
    broker.kill9().await.expect("kill -9 broker");
    broker.restart().await.expect("restart broker");
    let api = broker.api().clone();
    for id in [&lock.id, &reboot.id] {
        let cmd = api.command(id).await.expect("command after restart");
        assert_eq!(cmd.status, CommandState::Queued, "{cmd:?}");
    }

    agent.restart().expect("restart agent");
    expect_final(&api, &lock.id, CommandState::Succeeded).await;
    expect_final(&api, &reboot.id, CommandState::Succeeded).await;
    status_until(&agent.local_api(), "locked", |s| s["locked"] == json!(true)).await;
    assert_eq!(marker_lines(&reboots), ["rebooted"]);
    // Re-sends and leases go on; the reboot never runs again.
    holds_for(Duration::from_secs(2), async || {
        let lines = marker_lines(&reboots);
        anyhow::ensure!(lines.len() == 1, "reboot hook ran {} times", lines.len());
        Ok(())
    })
    .await;
}
