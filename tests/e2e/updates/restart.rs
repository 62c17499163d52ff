//! The controller crashes in the middle of a rollout: after the restart the rollout goes on
//! from where it was, and no terminal gets (or installs) its update twice.

use std::time::Duration;

use posfleet_broker::views::{CommandState, RolloutState};

use super::{
    Behaviour, artifact_file, commands_of, create_rollout, fleet_online, hooks, release_broker,
    reports_version, rollout_final, rollout_until, sign_and_upload, simulator,
};

#[tokio::test]
async fn a_rollout_resumes_after_the_controller_is_killed_during_wave_2() {
    let (mut broker, key) = release_broker().await;
    let hooks = hooks(
        &broker.scratch_dir("hooks").expect("dir"),
        Behaviour::SlowInstall(Duration::from_millis(1500)),
    );
    let _sim = simulator(&broker, "crash-", 10, &hooks);
    let ids = fleet_online(broker.api(), "crash-", 10).await;
    let file = artifact_file(&broker, "app.bin", 16 * 1024);
    let artifact = sign_and_upload(&broker, &key, &file, "6.0.0").await;
    let created = create_rollout(
        broker.api(),
        serde_json::json!({"artifact_id": artifact.id, "target": {"devices": ids},
                           "waves": [10, 50, 100], "wave_timeout_s": 60}),
    )
    .await;
    let sizes: Vec<u32> = created.waves.iter().map(|w| w.members).collect();
    assert_eq!(sizes, [1, 4, 5], "{created:#?}");

    // Wave 2 started (its installs take 1.5 s): crash.
    let during = rollout_until(
        broker.api(),
        &created.id,
        "in wave 2",
        Duration::from_secs(30),
        |v| matches!(v.state, RolloutState::Running { wave: 2 }) && v.waves[1].counts.succeeded < 4,
    )
    .await;
    broker.kill9().await.expect("kill -9 the broker");
    broker.restart().await.expect("restart the broker");
    let api = broker.api();
    let view = rollout_final(api, &created.id).await;
    assert_eq!(
        view.state,
        RolloutState::Completed,
        "{view:#?}\nbefore the crash: {during:#?}"
    );
    for w in &view.waves {
        assert_eq!(w.counts.succeeded, w.members, "{view:#?}");
    }
    for id in &ids {
        let cmds = commands_of(api, id, "software_update").await;
        assert_eq!(cmds.len(), 1, "{id}: {cmds:#?}");
        assert_eq!(cmds[0].status, CommandState::Succeeded, "{id}: {cmds:#?}");
        assert_eq!(
            hooks.lines("install", id).len(),
            1,
            "{id} installed more than once"
        );
        reports_version(api, id, "6.0.0").await;
    }
}
