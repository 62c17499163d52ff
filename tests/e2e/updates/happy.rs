//! A terminal updated by a rollout, as an operator does it and sees it; a download cut in the
//! middle resumes where it stopped.

use posfleet_broker::views::{ArtifactList, ArtifactView, CommandState, RolloutList, RolloutView};
use posfleet_tests::{Posctl, Proxy, eventually};

use super::{
    Behaviour, OLD_VERSION, artifact_file, final_command_of, hooks, install_release_key,
    release_broker, reports_version, rollout_final, sign_and_upload, update_agent,
};
use crate::commands::fast_broker;
use crate::support::{WAIT, online};

#[tokio::test]
async fn a_rollout_installs_a_signed_artifact_on_a_terminal() {
    let (broker, key) = release_broker().await;
    let api = broker.api();
    let posctl = Posctl::new(&broker);
    let hooks = hooks(
        &broker.scratch_dir("hooks-upd-1").expect("dir"),
        Behaviour::Fine,
    );
    let agent = update_agent(&broker, "upd-1", &hooks, None, "");
    online(api, "upd-1").await;
    reports_version(api, "upd-1", OLD_VERSION).await;
    // The device bundle carried the controller's release key.
    let bundle_pub = broker
        .scratch_dir("agent-upd-1")
        .expect("dir")
        .join("bundle/release.pub");
    assert_eq!(
        std::fs::read(&bundle_pub).expect("bundle release.pub"),
        std::fs::read(&key.public).expect("release.pub")
    );

    let file = artifact_file(&broker, "app-3.3.0.bin", 64 * 1024);
    let artifact = sign_and_upload(&broker, &key, &file, "3.3.0").await;
    assert_eq!(artifact.version, "3.3.0");
    assert_eq!(artifact.component, "payment_app");
    assert_eq!(artifact.size_bytes, 64 * 1024);
    let listed: ArtifactList = posctl
        .ok(&["-o", "json", "artifact", "list"])
        .await
        .expect("artifact list")
        .json()
        .expect("ArtifactList");
    assert_eq!(listed.items, std::slice::from_ref(&artifact));
    let shown: ArtifactView = posctl
        .ok(&["-o", "json", "artifact", "show", &artifact.id])
        .await
        .expect("artifact show")
        .json()
        .expect("ArtifactView");
    assert_eq!(shown, artifact);

    let created: RolloutView = posctl
        .ok(&[
            "-o",
            "json",
            "rollout",
            "create",
            &artifact.id,
            "--device",
            "upd-1",
            "--waves",
            "100",
            "--wave-timeout",
            "60s",
        ])
        .await
        .expect("rollout create")
        .json()
        .expect("RolloutView");
    assert_eq!(created.members, 1);
    assert_eq!(created.waves.len(), 1);

    // --follow draws bars on stderr until the end, then prints the summary.
    let follow = posctl
        .ok(&[
            "rollout",
            "show",
            &created.id,
            "--follow",
            "--interval",
            "200ms",
            "--timeout",
            "40s",
        ])
        .await
        .expect("rollout show --follow");
    assert!(follow.stdout.contains("completed"), "{follow}");
    assert!(
        follow.stdout.contains(&created.id) || follow.stdout.contains("3.3.0"),
        "{follow}"
    );

    let view: RolloutView = posctl
        .ok(&["-o", "json", "rollout", "show", &created.id])
        .await
        .expect("rollout show")
        .json()
        .expect("RolloutView");
    assert!(
        view.state.is_final() && view.state.name() == "completed",
        "{view:#?}"
    );
    assert_eq!(view.waves[0].counts.succeeded, 1, "{view:#?}");
    let list: RolloutList = posctl
        .ok(&["-o", "json", "rollout", "list"])
        .await
        .expect("rollout list")
        .json()
        .expect("RolloutList");
    assert_eq!(list.rollouts.len(), 1);
    assert_eq!(list.rollouts[0].id, created.id);

    let cmd = final_command_of(api, "upd-1", "software_update").await;
    assert_eq!(cmd.status, CommandState::Succeeded, "{cmd:#?}");
    reports_version(api, "upd-1", "3.3.0").await;
    // The install hook got exactly the signed bytes, once; health was confirmed.
    assert_eq!(
        hooks.installed("upd-1"),
        Some(std::fs::read(&file).expect("file"))
    );
    assert_eq!(
        hooks.lines("install", "upd-1"),
        ["install upd-1 3.3.0 payment_app"]
    );
    assert!(!hooks.lines("health", "upd-1").is_empty());
    assert!(hooks.lines("rollback", "upd-1").is_empty());
    // The downloaded files are gone from the terminal.
    let updates = agent.state_dir().join("updates");
    let left: Vec<_> = std::fs::read_dir(&updates)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_download_cut_in_the_middle_resumes_with_a_range_request() {
    // The device endpoint is reached through a proxy that cuts the transfer once.
    let mut broker = fast_broker().await;
    let key = install_release_key(&mut broker).await;
    let proxy = Proxy::start(broker.device_addr()).await.expect("proxy");
    let url = format!("https://{}", proxy.addr());
    broker
        .restart_with(&["--device-url", &url])
        .await
        .expect("restart with --device-url");
    let api = broker.api();
    let hooks = hooks(
        &broker.scratch_dir("hooks-cut-1").expect("dir"),
        Behaviour::Fine,
    );
    let _agent = update_agent(&broker, "cut-1", &hooks, None, "");
    online(api, "cut-1").await;

    const SIZE: u64 = 16 * 1024 * 1024;
    let file = artifact_file(&broker, "big.bin", SIZE as usize);
    let artifact = sign_and_upload(&broker, &key, &file, "3.4.0").await;
    assert!(
        artifact
            .download_url
            .starts_with(&format!("https://{}/", proxy.addr())),
        "{artifact:?}"
    );
    let served_before = served(api).await;
    proxy.cut_after_down(SIZE / 2);
    let created = super::create_rollout(
        api,
        serde_json::json!({"artifact_id": artifact.id, "target": {"devices": ["cut-1"]},
                           "waves": [100], "wave_timeout_s": 60}),
    )
    .await;
    let view = rollout_final(api, &created.id).await;
    assert_eq!(view.state.name(), "completed", "{view:#?}");
    let cmd = final_command_of(api, "cut-1", "software_update").await;
    assert_eq!(cmd.status, CommandState::Succeeded, "{cmd:#?}");
    reports_version(api, "cut-1", "3.4.0").await;
    assert_eq!(
        hooks.installed("cut-1"),
        Some(std::fs::read(&file).expect("file"))
    );

    // The cut happened (a second connection), and the second one did not start over.
    assert!(proxy.accepted() >= 2, "accepted {}", proxy.accepted());
    let served = eventually(WAIT, || async {
        let s = served(api).await - served_before;
        anyhow::ensure!(s >= SIZE as f64, "served {s}");
        Ok(s)
    })
    .await;
    assert!(
        served < 2.0 * SIZE as f64,
        "served {served} bytes for a {SIZE}-byte artifact: the download started over"
    );
    // Through the proxy: the first half once, then only the rest (plus TLS framing and
    // what was in flight at the cut); starting over would cost at least 1.5x the size.
    let relayed = proxy.down_bytes();
    assert!(
        relayed < SIZE + SIZE / 4,
        "{relayed} bytes relayed for a {SIZE}-byte artifact: the download started over"
    );
}

async fn served(api: &posfleet_tests::Api) -> f64 {
    api.metrics()
        .await
        .expect("metrics")
        .value("posfleet_artifact_bytes_served_total", &[])
}
