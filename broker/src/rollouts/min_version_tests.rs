//! An artifact's `min_version` in the engine (issue 10 item 13): members whose reported
//! version of the component does not meet it are skipped at wave start, counted by reason,
//! never sent the update, and left out of the wave's thresholds.

use posfleet_proto::{DeviceId, pb};

use super::tests::{Harness, state_is};
use crate::registry::DeviceInfo;
use crate::views::{CommandBody, SkippedCounts, VersionsView, WaveOutcome};

/// `device` reports `payment_app` (`None`: no versions at all).
fn reports(h: &Harness, device: &str, payment_app: Option<&str>) {
    let info = DeviceInfo {
        versions: payment_app.map(|v| VersionsView {
            agent: "a1".into(),
            firmware: "f1".into(),
            payment_app: v.into(),
        }),
        ..DeviceInfo::default()
    };
    h.registry
        .presence_online(&DeviceId::new(device).unwrap(), 1, 1, info);
}

fn ids(names: &[&str]) -> Vec<DeviceId> {
    names.iter().map(|n| DeviceId::new(*n).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_that_do_not_meet_min_version_are_skipped_counted_and_never_updated() {
    let mut h = Harness::start(0).await;
    reports(&h, "T-old", Some("3.3.0"));
    reports(&h, "T-new", Some("9.1.0"));
    reports(&h, "T-unknown", None);
    reports(&h, "T-odd", Some("pay-4"));
    let r = h
        .create(0, |req| {
            req.artifact.min_version = Some("9.0.0".into());
            req.devices = ids(&["T-old", "T-new", "T-unknown", "T-odd"]);
            req.waves = vec![100];
            req.success_threshold = 1.0;
        })
        .await;
    // A wave's updates are issued in one batch: once one exists, every one does.
    h.until("the wave's update", |h| !h.updates().is_empty())
        .await;
    let updates = h.updates();
    let devices: Vec<&str> = updates.iter().map(|c| c.device_id.as_str()).collect();
    assert_eq!(devices, ["T-new"], "only the terminal at or above 9.0.0");
    let CommandBody::SoftwareUpdate { min_version, .. } = &updates[0].body else {
        panic!("not an update: {:?}", updates[0]);
    };
    assert_eq!(
        min_version.as_deref(),
        Some("9.0.0"),
        "the terminal checks it too"
    );

    // Counted by reason from the wave's start on.
    let skipped = SkippedCounts {
        below_min_version: 1,
        version_unknown: 1,
        version_unparseable: 1,
    };
    assert_eq!(r.min_version.as_deref(), Some("9.0.0"));
    assert_eq!(r.waves[0].skipped, skipped, "{r:#?}");
    assert_eq!(r.waves[0].counts.skipped, 3);
    assert_eq!(r.waves[0].counts.total(), 4);

    // The thresholds count the one member that got the update: its success completes it.
    h.answer_all(pb::CommandStatus::Succeeded);
    state_is(&h, &r.id, "completed").await;
    let v = h.view(&r.id);
    assert_eq!(v.waves[0].outcome, Some(WaveOutcome::Passed));
    assert_eq!(
        (v.waves[0].counts.succeeded, v.waves[0].counts.skipped),
        (1, 3)
    );
    assert_eq!(v.waves[0].skipped, skipped);
    assert_eq!(h.updates().len(), 1);
    assert!(h.rollbacks().is_empty());

    // Durable: a restarted engine shows the same.
    h.stop_engine().await;
    let stored = h.stored(&r.id);
    assert_eq!(stored.artifact.min_version.as_deref(), Some("9.0.0"));
    h.start_engine();
    assert_eq!(h.view(&r.id).waves[0].skipped, skipped);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_whose_members_are_all_skipped_pass_without_commands() {
    let h = Harness::start(0).await;
    for d in ["T-a", "T-b", "T-c"] {
        reports(&h, d, Some("3.3.0"));
    }
    let r = h
        .create(0, |req| {
            req.artifact.min_version = Some("9.0.0".into());
            req.devices = ids(&["T-a", "T-b", "T-c"]);
            req.waves = vec![1, 50, 100];
        })
        .await;
    state_is(&h, &r.id, "completed").await;
    let v = h.view(&r.id);
    assert!(
        v.waves
            .iter()
            .all(|w| w.outcome == Some(WaveOutcome::Passed)),
        "{v:#?}"
    );
    let below: u32 = v.waves.iter().map(|w| w.skipped.below_min_version).sum();
    assert_eq!(below, 3, "{v:#?}");
    assert!(h.updates().is_empty(), "{:#?}", h.updates());

    // Without a min_version nothing is skipped, not even a terminal that reported nothing.
    reports(&h, "T-silent", None);
    let r2 = h
        .create(0, |req| {
            req.devices = ids(&["T-silent"]);
            req.waves = vec![100];
        })
        .await;
    assert_eq!(r2.waves[0].counts.skipped, 0);
    h.until("the update", |h| h.updates().len() == 1).await;
    assert_eq!(h.updates()[0].device_id, "T-silent");
    h.stop().await;
}
