//! Lock and unlock through posctl; groups and labels as targets; progress on the stream.

use std::collections::BTreeSet;

use posfleet_broker::views::{
    CommandBody, CommandPage, CommandState, CommandView, CommandsCreated, DeviceDetail, FleetEvent,
};
use posfleet_tests::{Posctl, eventually};
use serde_json::json;

use super::{
    created_one, expect_final, fast_broker, local_status, post_sale, start_agent, status_until,
};
use crate::support::{WAIT, online};

/// Waits until the device detail shows `locked` both desired (at `generation`) and reported.
async fn desired_and_reported(
    api: &posfleet_tests::Api,
    id: &str,
    locked: bool,
    generation: u64,
) -> DeviceDetail {
    eventually(WAIT, || async {
        let d = api
            .device(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{id} unknown"))?;
        let want = d.desired.as_ref().and_then(|w| w.lock.as_ref());
        let rep = d.reported.as_ref();
        anyhow::ensure!(
            want.is_some_and(|w| w.locked == locked && w.generation == generation)
                && rep.is_some_and(|r| r.locked == locked && r.lock_generation == generation),
            "desired {:?} / reported {:?}, want locked={locked} generation={generation}",
            d.desired,
            d.reported
        );
        Ok(d)
    })
    .await
}

#[tokio::test]
async fn commands_lock_and_unlock_a_terminal_through_posctl() {
    let broker = fast_broker().await;
    let api = broker.api();
    let agent = start_agent(&broker, "lk-1", &broker.mqtt_url(), "");
    online(api, "lk-1").await;
    let local = agent.local_api();
    assert_eq!(post_sale(&local, "before-lock").await.status, 201);
    let posctl = Posctl::new(&broker);

    let out = posctl
        .ok(&[
            "lock",
            "lk-1",
            "--reason",
            "stolen from store 12",
            "-o",
            "json",
        ])
        .await
        .expect("posctl lock");
    let lock = created_one(&out);
    assert_eq!(lock.device_id, "lk-1");
    assert_eq!(
        lock.body,
        CommandBody::Lock {
            reason: "stolen from store 12".into(),
            generation: 1
        }
    );
    let done = expect_final(api, &lock.id, CommandState::Succeeded).await;
    let statuses: Vec<CommandState> = done.history.iter().map(|h| h.status).collect();
    assert_eq!(statuses.first(), Some(&CommandState::Queued), "{done:?}");
    assert!(statuses.is_sorted_by_key(|s| s.rank()), "{done:?}");

    let status = local_status(&local).await.expect("status");
    assert_eq!(status["locked"], json!(true), "{status}");
    assert_eq!(
        status["lock_reason"],
        json!("stolen from store 12"),
        "{status}"
    );
    assert_eq!(status["lock_generation"], json!(1), "{status}");
    let refused = post_sale(&local, "while-locked").await;
    assert_eq!(refused.status, 423, "{refused:?}");
    assert_eq!(refused.error(), Some("terminal_locked"), "{refused:?}");

    let detail = desired_and_reported(api, "lk-1", true, 1).await;
    let desired = detail.desired.and_then(|d| d.lock).expect("desired lock");
    assert_eq!(desired.reason, "stolen from store 12");
    let out = posctl
        .ok(&["devices", "show", "lk-1"])
        .await
        .expect("posctl devices show");
    assert!(
        out.stdout
            .contains("  desired      locked (generation 1, by admin"),
        "{out}"
    );
    assert!(
        out.stdout
            .contains("  reported     locked (generation 1): stolen from store 12"),
        "{out}"
    );

    // The operator's views of the command.
    let out = posctl
        .ok(&["commands", "list", "--device", "lk-1"])
        .await
        .expect("commands list");
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains(&lock.id))
        .unwrap_or_else(|| panic!("no row for {}\n{out}", lock.id));
    assert!(row.contains("lock") && row.contains("succeeded"), "{out}");
    let out = posctl
        .ok(&["commands", "list", "--device", "lk-1", "-o", "json"])
        .await
        .expect("commands list json");
    let page: CommandPage = out.json().expect("CommandPage");
    assert!(
        page.items
            .iter()
            .any(|c| c.id == lock.id && c.status == CommandState::Succeeded),
        "{out}"
    );
    let out = posctl
        .ok(&["commands", "show", &lock.id])
        .await
        .expect("commands show");
    assert!(out.stdout.contains(&lock.id), "{out}");
    assert!(out.stdout.contains("succeeded"), "{out}");
    assert!(out.stdout.contains("stolen from store 12"), "{out}");
    let out = posctl
        .ok(&["commands", "show", &lock.id, "-o", "json"])
        .await
        .expect("commands show json");
    let shown: CommandView = out.json().expect("CommandView");
    assert_eq!(shown.id, lock.id);
    assert_eq!(shown.status, CommandState::Succeeded);
    // A lock cannot be cancelled (change the desired state instead), even when final.
    let out = posctl
        .run(&["commands", "cancel", &lock.id])
        .await
        .expect("posctl runs");
    assert!(!out.status.success(), "{out}");

    let out = posctl
        .ok(&["unlock", "lk-1", "--reason", "found again", "-o", "json"])
        .await
        .expect("posctl unlock");
    let unlock = created_one(&out);
    assert!(
        matches!(unlock.body, CommandBody::Unlock { generation: 2, .. }),
        "{unlock:?}"
    );
    expect_final(api, &unlock.id, CommandState::Succeeded).await;
    let status = status_until(&local, "unlocked", |s| s["locked"] == json!(false)).await;
    assert_eq!(status["lock_generation"], json!(2), "{status}");
    assert_eq!(status["lock_reason"], json!(""), "{status}");
    assert_eq!(post_sale(&local, "after-unlock").await.status, 201);
    desired_and_reported(api, "lk-1", false, 2).await;
}

#[tokio::test]
async fn commands_target_groups_and_labels() {
    let broker = fast_broker().await;
    let api = broker.api();
    let ids = ["grp-1", "grp-2", "grp-3"];
    let agents: Vec<_> = ids
        .iter()
        .map(|id| start_agent(&broker, id, &broker.mqtt_url(), ""))
        .collect();
    for id in ids {
        online(api, id).await;
    }
    let posctl = Posctl::new(&broker);
    for id in ["grp-1", "grp-2"] {
        let out = posctl
            .ok(&["devices", "set-groups", id, "north", "pilot"])
            .await
            .expect("set-groups");
        assert!(out.stdout.contains("north"), "{out}");
    }
    posctl
        .ok(&["devices", "set-groups", "grp-3", "south"])
        .await
        .expect("set-groups");
    posctl
        .ok(&[
            "devices",
            "set-labels",
            "grp-3",
            "site=harbour",
            "tier=gold",
        ])
        .await
        .expect("set-labels");

    let out = posctl
        .ok(&[
            "lock", "--group", "north", "--reason", "audit", "-o", "json",
        ])
        .await
        .expect("lock --group");
    let created: CommandsCreated = out.json().expect("CommandsCreated");
    let targets: BTreeSet<&str> = created
        .commands
        .iter()
        .map(|c| c.device_id.as_str())
        .collect();
    assert_eq!(targets, BTreeSet::from(["grp-1", "grp-2"]), "{out}");
    for cmd in &created.commands {
        expect_final(api, &cmd.id, CommandState::Succeeded).await;
    }
    for (agent, locked) in agents.iter().zip([true, true, false]) {
        let status = local_status(&agent.local_api()).await.expect("status");
        assert_eq!(status["locked"], json!(locked), "{}: {status}", agent.id());
    }

    // Labels: all must match; `model` also matches the reported model.
    let out = posctl
        .ok(&[
            "lock",
            "--label",
            "site=harbour",
            "--label",
            "tier=gold",
            "--reason",
            "harbour audit",
            "-o",
            "json",
        ])
        .await
        .expect("lock --label");
    let only = created_one(&out);
    assert_eq!(only.device_id, "grp-3");
    expect_final(api, &only.id, CommandState::Succeeded).await;
    let out = posctl
        .run(&["lock", "--label", "site=nowhere", "--reason", "x"])
        .await
        .expect("posctl runs");
    assert!(!out.status.success(), "a selector matching nothing: {out}");

    let out = posctl
        .ok(&[
            "unlock",
            "--label",
            "model=PX-500",
            "--reason",
            "done",
            "-o",
            "json",
        ])
        .await
        .expect("unlock --label model");
    let created: CommandsCreated = out.json().expect("CommandsCreated");
    assert_eq!(created.commands.len(), 3, "{out}");
    for cmd in &created.commands {
        expect_final(api, &cmd.id, CommandState::Succeeded).await;
    }
    for agent in &agents {
        status_until(&agent.local_api(), "unlocked", |s| {
            s["locked"] == json!(false)
        })
        .await;
    }
}

#[tokio::test]
async fn commands_progress_appears_on_the_live_stream() {
    let broker = fast_broker().await;
    let api = broker.api();
    let _agent = start_agent(&broker, "st-1", &broker.mqtt_url(), "");
    online(api, "st-1").await;
    let mut stream = api.stream(Some("st-1")).await.expect("stream");
    let created = api
        .create_commands(&json!({
            "kind": "lock", "target": {"devices": ["st-1"]}, "reason": "stream test"
        }))
        .await
        .expect("create");
    let id = created[0].id.clone();

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match stream.next(left).await {
            Ok(FleetEvent::Command {
                id: got,
                device_id,
                kind,
                status,
                ..
            }) if got == id => {
                assert_eq!((device_id.as_str(), kind.as_str()), ("st-1", "lock"));
                seen.push(status);
                if status.is_final() {
                    break;
                }
            }
            Ok(_) => {}
            Err(error) => panic!("command events so far {seen:?}: {error:#}"),
        }
    }
    assert_eq!(seen.first(), Some(&CommandState::Queued), "{seen:?}");
    assert_eq!(seen.last(), Some(&CommandState::Succeeded), "{seen:?}");
    assert!(seen.is_sorted_by_key(|s| s.rank()), "{seen:?}");
}
