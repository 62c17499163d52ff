//! Operators in control: pause, resume and abort through posctl; refused requests.

use std::time::Duration;

use posfleet_broker::views::{CommandState, RolloutList, RolloutState, RolloutView, WaveOutcome};
use posfleet_tests::Posctl;

use super::{
    Behaviour, OLD_VERSION, artifact_file, commands_of, fleet_online, hooks, release_broker,
    reports_version, rollout, rollout_until, sign_and_upload, simulator,
};
use crate::commands::holds_for;
use crate::support::{WAIT, agent, offline, online};

async fn control(posctl: &Posctl, args: &[&str]) -> RolloutView {
    let mut all = vec!["-o", "json", "rollout"];
    all.extend_from_slice(args);
    posctl
        .ok(&all)
        .await
        .expect("posctl rollout")
        .json()
        .expect("RolloutView")
}

#[tokio::test]
async fn pause_holds_the_next_wave_resume_continues_abort_rolls_back() {
    let (broker, key) = release_broker().await;
    let api = broker.api();
    let posctl = Posctl::new(&broker);
    let hooks = hooks(
        &broker.scratch_dir("hooks").expect("dir"),
        Behaviour::SlowInstall(Duration::from_secs(1)),
    );
    let _sim = simulator(&broker, "ctl-", 4, &hooks);
    let ids = fleet_online(api, "ctl-", 4).await;
    let file = artifact_file(&broker, "app.bin", 16 * 1024);
    let artifact = sign_and_upload(&broker, &key, &file, "7.0.0").await;
    let mut args = vec!["create", artifact.id.as_str(), "--waves", "25,50,100"];
    for id in &ids {
        args.extend(["--device", id.as_str()]);
    }
    args.extend(["--wave-timeout", "60s", "--soak", "0s"]);
    let created = control(&posctl, &args).await;
    let id = created.id.as_str();

    // Paused during wave 1: its update goes on, wave 2 does not start.
    let paused = control(&posctl, &["pause", id]).await;
    assert_eq!(
        paused.state,
        RolloutState::Paused { wave: 1 },
        "{paused:#?}"
    );
    rollout_until(api, id, "with wave 1 passed", WAIT, |v| {
        v.waves[0].outcome == Some(WaveOutcome::Passed)
    })
    .await;
    let updates = || async {
        let mut n = 0;
        for d in &ids {
            n += commands_of(api, d, "software_update").await.len();
        }
        n
    };
    holds_for(Duration::from_secs(2), || async {
        let v = rollout(api, id).await?;
        anyhow::ensure!(v.state == RolloutState::Paused { wave: 1 }, "{v:#?}");
        anyhow::ensure!(v.waves[1].started_at_ms.is_none(), "{v:#?}");
        anyhow::ensure!(updates().await == 1, "updates issued while paused");
        Ok(())
    })
    .await;

    // Resume starts wave 2 at once; pausing again holds wave 3.
    let resumed = control(&posctl, &["resume", id]).await;
    assert!(
        !matches!(resumed.state, RolloutState::Paused { .. }),
        "{resumed:#?}"
    );
    let paused = control(&posctl, &["pause", id]).await;
    assert_eq!(
        paused.state,
        RolloutState::Paused { wave: 2 },
        "{paused:#?}"
    );
    rollout_until(api, id, "with wave 2 passed", WAIT, |v| {
        v.waves[1].outcome == Some(WaveOutcome::Passed)
    })
    .await;
    assert_eq!(updates().await, 2);
    let v = rollout(api, id).await.expect("rollout");
    assert!(v.waves[2].started_at_ms.is_none(), "{v:#?}");

    // Abort: the two updated terminals are rolled back, the others never touched.
    let aborted = control(&posctl, &["abort", id, "--reason", "bad receipts"]).await;
    assert!(
        matches!(&aborted.state, RolloutState::Aborted { reason } if reason.contains("bad receipts")),
        "{aborted:#?}"
    );
    let mut rolled_back = 0;
    for d in &ids {
        let updated = !commands_of(api, d, "software_update").await.is_empty();
        if updated {
            let rb = super::final_command_of(api, d, "rollback_update").await;
            assert_eq!(rb.status, CommandState::Succeeded, "{rb:#?}");
            assert_eq!(hooks.lines("rollback", d).len(), 1, "{d}");
            reports_version(api, d, OLD_VERSION).await;
            rolled_back += 1;
        } else {
            assert!(
                commands_of(api, d, "rollback_update").await.is_empty(),
                "{d}"
            );
            assert!(hooks.lines("install", d).is_empty(), "{d}");
        }
    }
    assert_eq!(rolled_back, 2);
    let v = rollout_until(api, id, "with its rollback counted", WAIT, |v| {
        v.rollback
            .as_ref()
            .is_some_and(|rb| rb.counts.succeeded == 2)
    })
    .await;
    assert!(v.waves[2].started_at_ms.is_none(), "{v:#?}");
    // A finished rollout cannot be resumed.
    let out = posctl
        .run(&["rollout", "resume", id])
        .await
        .expect("posctl");
    assert!(!out.status.success(), "{out}");
}

#[tokio::test]
async fn bad_rollout_requests_are_refused_naming_the_field() {
    let (broker, key) = release_broker().await;
    let api = broker.api();
    let posctl = Posctl::new(&broker);
    let mut away = agent(&broker, "away-1");
    online(api, "away-1").await;
    away.terminate().await.expect("stop away-1");
    offline(api, "away-1").await;
    let file = artifact_file(&broker, "app.bin", 4096);
    let artifact = sign_and_upload(&broker, &key, &file, "8.0.0").await;
    let unknown = "ab".repeat(32);

    for (args, field) in [
        (
            vec!["rollout", "create", unknown.as_str(), "--device", "away-1"],
            "artifact_id",
        ),
        (
            vec![
                "rollout",
                "create",
                artifact.id.as_str(),
                "--group",
                "nobody",
            ],
            "target",
        ),
        (
            vec![
                "rollout",
                "create",
                artifact.id.as_str(),
                "--device",
                "ghost-9",
            ],
            "target.devices",
        ),
        (
            vec![
                "rollout",
                "create",
                artifact.id.as_str(),
                "--device",
                "away-1",
                "--waves",
                "50,10",
            ],
            "waves",
        ),
        (
            vec![
                "rollout",
                "create",
                artifact.id.as_str(),
                "--device",
                "away-1",
                "--waves",
                "10,50",
            ],
            "waves",
        ),
        (
            vec![
                "rollout",
                "create",
                artifact.id.as_str(),
                "--device",
                "away-1",
                "--success-threshold",
                "1.5",
            ],
            "success_threshold",
        ),
    ] {
        let out = posctl.run(&args).await.expect("posctl");
        assert!(!out.status.success(), "{out}");
        assert!(out.stderr.contains(field), "want {field} named\n{out}");
    }
    let list: RolloutList = posctl
        .ok(&["-o", "json", "rollout", "list"])
        .await
        .expect("list")
        .json()
        .expect("RolloutList");
    assert!(list.rollouts.is_empty(), "{list:#?}");

    // An artifact an unfinished rollout uses cannot be deleted.
    let running = control(
        &posctl,
        &[
            "create",
            &artifact.id,
            "--device",
            "away-1",
            "--waves",
            "100",
            "--wave-timeout",
            "10m",
        ],
    )
    .await;
    let out = posctl
        .run(&["artifact", "delete", &artifact.id])
        .await
        .expect("posctl");
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr.contains(&running.id),
        "the refusal names the rollout\n{out}"
    );
    posctl
        .ok(&["artifact", "show", &artifact.id])
        .await
        .expect("still there");
    control(&posctl, &["abort", &running.id]).await;
    posctl
        .ok(&["artifact", "delete", &artifact.id])
        .await
        .expect("deletable once the rollout is over");
    let blob = broker.data_dir().join("artifacts/blobs").join(&artifact.id);
    assert!(!blob.exists(), "{}", blob.display());
}
