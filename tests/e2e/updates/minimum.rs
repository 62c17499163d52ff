//! An artifact's `min_version` (issue 10 item 13): a terminal whose payment application is
//! below it is skipped at wave start, counted in the wave view and shown by `posctl rollout
//! show`, and gets nothing; a terminal at the minimum gets the update (carrying the minimum,
//! which its agent checks too) and installs it.

use posfleet_broker::views::{ArtifactView, CommandBody, CommandState, RolloutState};
use posfleet_tests::Posctl;
use serde_json::json;

use super::{
    Behaviour, OLD_VERSION, artifact_file, commands_of, create_rollout, hooks, release_broker,
    reports_version, rollout_final, sign, sign_and_upload, update_agent, upload_with,
};
use crate::support::online;

#[tokio::test]
async fn terminals_below_the_min_version_are_skipped_and_the_others_updated() {
    let (broker, key) = release_broker().await;
    let api = broker.api();
    let hooks = hooks(
        &broker.scratch_dir("hooks-min").expect("dir"),
        Behaviour::Fine,
    );
    let _old = update_agent(&broker, "min-old", &hooks, None, "");
    let _ok = update_agent(&broker, "min-ok", &hooks, None, "");
    for id in ["min-old", "min-ok"] {
        online(api, id).await;
        reports_version(api, id, OLD_VERSION).await;
    }

    // min-ok moves to 3.3.0 first (no minimum).
    let first = artifact_file(&broker, "app-3.3.0.bin", 4096);
    let first = sign_and_upload(&broker, &key, &first, "3.3.0").await;
    let r = create_rollout(
        api,
        json!({"artifact_id": first.id, "target": {"devices": ["min-ok"]}, "waves": [100],
               "wave_timeout_s": 60}),
    )
    .await;
    assert_eq!(
        rollout_final(api, &r.id).await.state,
        RolloutState::Completed
    );
    reports_version(api, "min-ok", "3.3.0").await;

    // 4.0.0 needs at least 3.3.0; a minimum nobody can compare is refused, naming the field.
    let file = artifact_file(&broker, "app-4.0.0.bin", 4096);
    let sig = sign(&broker, &key.key, &file).await;
    let refused = upload_with(&broker, &file, &sig, "4.0.0", &["--min-version", "fw-9"]).await;
    assert!(refused.success().is_err(), "{refused}");
    assert!(refused.stderr.contains("min_version"), "{refused}");
    let out = upload_with(&broker, &file, &sig, "4.0.0", &["--min-version", "3.3.0"]).await;
    out.success().expect("upload accepted");
    let artifact: ArtifactView = out.json().expect("ArtifactView JSON");
    assert_eq!(artifact.min_version.as_deref(), Some("3.3.0"));

    let created = create_rollout(
        api,
        json!({"artifact_id": artifact.id, "target": {"devices": ["min-old", "min-ok"]},
               "waves": [100], "wave_timeout_s": 60}),
    )
    .await;
    assert_eq!(created.min_version.as_deref(), Some("3.3.0"));
    let view = rollout_final(api, &created.id).await;
    assert_eq!(view.state, RolloutState::Completed, "{view:#?}");
    let wave = &view.waves[0];
    assert_eq!(
        (wave.counts.succeeded, wave.counts.skipped),
        (1, 1),
        "{view:#?}"
    );
    assert_eq!(wave.skipped.below_min_version, 1, "{view:#?}");

    // The terminal below the minimum got nothing and runs what it ran.
    assert!(
        commands_of(api, "min-old", "software_update")
            .await
            .is_empty()
    );
    assert!(hooks.lines("install", "min-old").is_empty());
    assert!(hooks.installed("min-old").is_none());
    reports_version(api, "min-old", OLD_VERSION).await;
    // The other one got the minimum with the update and installed it.
    let updates = commands_of(api, "min-ok", "software_update").await;
    let update = updates
        .iter()
        .find(|c| matches!(&c.body, CommandBody::SoftwareUpdate { version, .. } if version == "4.0.0"))
        .unwrap_or_else(|| panic!("no 4.0.0 update for min-ok: {updates:#?}"));
    assert_eq!(update.status, CommandState::Succeeded, "{update:#?}");
    assert!(
        matches!(&update.body, CommandBody::SoftwareUpdate { min_version: Some(m), .. } if m == "3.3.0"),
        "{update:#?}"
    );
    reports_version(api, "min-ok", "4.0.0").await;
    assert_eq!(
        hooks.installed("min-ok"),
        Some(std::fs::read(&file).expect("file"))
    );

    // What an operator sees.
    let shown = Posctl::new(&broker)
        .ok(&["rollout", "show", &created.id])
        .await
        .expect("rollout show");
    assert!(
        shown.stdout.contains("min_version 3.3.0")
            && shown.stdout.contains("SKIPPED")
            && shown.stdout.contains("1 below_min_version"),
        "{shown}"
    );
}
