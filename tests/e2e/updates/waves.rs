//! Waves that fail: a canary whose install hook fails, a terminal that never confirms its
//! health, a member that is offline for the whole wave.

use std::time::Duration;

use posfleet_broker::views::{CommandState, RolloutView, WaveOutcome};
use posfleet_tests::Posctl;

use super::{
    Behaviour, OLD_VERSION, artifact_file, commands_of, create_rollout, final_command_of,
    fleet_online, hooks, is_aborted, reason, release_broker, reports_version, rollout_final,
    sign_and_upload, simulator, update_agent,
};
use crate::commands::holds_for;
use crate::support::{offline, online};

#[tokio::test]
async fn a_failing_canary_aborts_the_rollout_before_any_later_wave() {
    let (broker, key) = release_broker().await;
    let api = broker.api();
    let hooks = hooks(
        &broker.scratch_dir("hooks").expect("dir"),
        Behaviour::InstallFails,
    );
    let _sim = simulator(&broker, "canary-", 20, &hooks);
    let ids = fleet_online(api, "canary-", 20).await;
    let file = artifact_file(&broker, "app.bin", 16 * 1024);
    let artifact = sign_and_upload(&broker, &key, &file, "5.0.0").await;
    let mut args = vec!["-o", "json", "rollout", "create", artifact.id.as_str()];
    for id in &ids {
        args.extend(["--device", id.as_str()]);
    }
    args.extend(["--waves", "1,10,50,100", "--wave-timeout", "60s"]);
    let created: RolloutView = Posctl::new(&broker)
        .ok(&args)
        .await
        .expect("rollout create")
        .json()
        .expect("RolloutView");
    assert_eq!(created.members, 20, "{created:#?}");
    let sizes: Vec<u32> = created.waves.iter().map(|w| w.members).collect();
    assert_eq!(sizes[0], 1, "the canary is one terminal: {created:#?}");
    assert_eq!(sizes.iter().sum::<u32>(), 20, "{created:#?}");

    let view = rollout_final(api, &created.id).await;
    assert!(is_aborted(&view), "{view:#?}");
    assert_eq!(
        view.waves[0].outcome,
        Some(WaveOutcome::Failed),
        "{view:#?}"
    );
    assert_eq!(view.waves[0].counts.failed, 1, "{view:#?}");
    for w in &view.waves[1..] {
        assert!(
            w.started_at_ms.is_none() && w.outcome.is_none(),
            "{view:#?}"
        );
        assert_eq!(w.counts.not_started, w.members, "{view:#?}");
    }

    // Exactly one terminal got an update: the canary; it ran its rollback hook.
    let mut canaries = Vec::new();
    for id in &ids {
        let cmds = commands_of(api, id, "software_update").await;
        if !cmds.is_empty() {
            canaries.push((id.clone(), cmds));
        }
    }
    assert_eq!(canaries.len(), 1, "{canaries:#?}");
    let (canary, cmds) = &canaries[0];
    assert_eq!(cmds.len(), 1, "{cmds:#?}");
    let cmd = final_command_of(api, canary, "software_update").await;
    assert_eq!(reason(&cmd), "install_failed", "{cmd:#?}");
    assert_eq!(hooks.lines("install", canary).len(), 1);
    assert_eq!(
        hooks.lines("rollback", canary),
        [format!("rollback {canary} {OLD_VERSION} 5.0.0")]
    );
    reports_version(api, canary, OLD_VERSION).await;
    // And nothing reaches the others later.
    holds_for(Duration::from_secs(2), || async {
        for id in &ids {
            if id != canary {
                let n = commands_of(api, id, "software_update").await.len();
                anyhow::ensure!(n == 0, "{id} got {n} update commands");
                anyhow::ensure!(hooks.lines("install", id).is_empty(), "{id} installed");
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_terminal_that_never_confirms_its_health_rolls_back() {
    let (broker, key) = release_broker().await;
    let api = broker.api();
    let hooks = hooks(
        &broker.scratch_dir("hooks").expect("dir"),
        Behaviour::Unhealthy,
    );
    let _agent = update_agent(&broker, "sick-1", &hooks, None, "");
    online(api, "sick-1").await;
    let file = artifact_file(&broker, "app.bin", 8 * 1024);
    let artifact = sign_and_upload(&broker, &key, &file, "5.1.0").await;
    let created = create_rollout(
        api,
        serde_json::json!({"artifact_id": artifact.id, "target": {"devices": ["sick-1"]},
                           "waves": [100], "wave_timeout_s": 60, "confirm_timeout_s": 3}),
    )
    .await;
    assert_eq!(created.confirm_timeout_s, 3);
    let cmd = final_command_of(api, "sick-1", "software_update").await;
    assert_eq!(reason(&cmd), "health_timeout", "{cmd:#?}");
    let view = rollout_final(api, &created.id).await;
    assert!(is_aborted(&view), "{view:#?}");
    assert_eq!(hooks.lines("install", "sick-1").len(), 1);
    assert!(
        !hooks.lines("health", "sick-1").is_empty(),
        "health was checked"
    );
    assert_eq!(
        hooks.lines("rollback", "sick-1"),
        ["rollback sick-1 3.2.0 5.1.0"]
    );
    reports_version(api, "sick-1", OLD_VERSION).await;
}

#[tokio::test]
async fn an_offline_member_fails_its_wave_at_the_wave_timeout() {
    let (broker, key) = release_broker().await;
    let api = broker.api();
    let hooks = hooks(&broker.scratch_dir("hooks").expect("dir"), Behaviour::Fine);
    let _on = update_agent(&broker, "on-1", &hooks, None, "");
    let mut off = update_agent(&broker, "off-1", &hooks, None, "");
    online(api, "on-1").await;
    online(api, "off-1").await;
    off.terminate().await.expect("stop off-1");
    offline(api, "off-1").await;

    let file = artifact_file(&broker, "app.bin", 8 * 1024);
    let artifact = sign_and_upload(&broker, &key, &file, "5.2.0").await;
    let created = create_rollout(
        api,
        serde_json::json!({"artifact_id": artifact.id,
                           "target": {"devices": ["on-1", "off-1"]}, "waves": [100],
                           "wave_timeout_s": 4, "failure_threshold": 0.4}),
    )
    .await;
    // on-1 succeeds at once; the wave only fails when off-1's time is up.
    let cmd = final_command_of(api, "on-1", "software_update").await;
    assert_eq!(cmd.status, CommandState::Succeeded, "{cmd:#?}");
    let view = rollout_final(api, &created.id).await;
    assert!(is_aborted(&view), "{view:#?}");
    let w = &view.waves[0];
    assert_eq!(w.outcome, Some(WaveOutcome::Failed), "{view:#?}");
    assert_eq!(w.counts.succeeded, 1, "{view:#?}");
    // Its command expired with the wave (command validity = wave timeout), or it was still
    // pending at the timeout: either way it counts as failed.
    assert_eq!(w.counts.unsuccessful() + w.counts.queued, 1, "{view:#?}");
    assert!(
        w.reason.as_deref().is_some_and(|r| r.contains("1 of 2")),
        "{view:#?}"
    );
    let took = w.finished_at_ms.unwrap_or(0) - w.started_at_ms.unwrap_or(0);
    assert!(
        took >= 4000,
        "the wave failed after {took} ms, before its timeout"
    );
    // The abort rolls on-1 back; off-1's update never ran.
    let rb = final_command_of(api, "on-1", "rollback_update").await;
    assert_eq!(rb.status, CommandState::Succeeded, "{rb:#?}");
    assert_eq!(hooks.lines("rollback", "on-1").len(), 1);
    reports_version(api, "on-1", OLD_VERSION).await;
    assert!(hooks.lines("install", "off-1").is_empty());
    let update = commands_of(api, "off-1", "software_update").await;
    assert_eq!(update.len(), 1, "{update:#?}");
    assert!(
        !matches!(update[0].status, CommandState::Succeeded),
        "{update:#?}"
    );
}
