//! The simulator against the fake broker, with a PKI directory in a temp dir.

use std::collections::BTreeSet;
use std::time::Duration;

use posfleet_proto::pki::PkiDir;
use posfleet_proto::{decode, pb};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::testing::{FakeBroker, Seen, TestPki};

const WAIT: Duration = Duration::from_secs(20);

fn config(dir: &std::path::Path, port: u16, count: usize) -> SimulatorConfig {
    let mut cfg = SimulatorConfig::new(
        count,
        dir,
        BrokerUrl {
            host: "127.0.0.1".into(),
            port,
        },
    );
    cfg.connect_rate = 1000;
    cfg.agent.heartbeat_interval = Duration::from_millis(200);
    cfg
}

#[tokio::test]
async fn runs_every_terminal_with_its_own_identity_and_says_goodbye() {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let ca = PkiDir::at(&pki_dir).init(&[]).unwrap();
    let mut broker = FakeBroker::start(&TestPki::with_ca(ca)).await;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();

    let sim = run_simulator(
        config(&pki_dir, broker.addr.port(), 5),
        &tracker,
        cancel.clone(),
    )
    .await
    .unwrap();
    let ids: Vec<&str> = sim.device_ids().iter().map(DeviceId::as_str).collect();
    assert_eq!(
        ids,
        [
            "sim-00000",
            "sim-00001",
            "sim-00002",
            "sim-00003",
            "sim-00004"
        ]
    );

    let mut connected = BTreeSet::new();
    let mut heartbeats = BTreeSet::new();
    while connected.len() < 5 || heartbeats.len() < 5 {
        match broker.next().await {
            Seen::Connect { client_id, .. } => {
                connected.insert(client_id);
            }
            Seen::Publish { topic, payload, .. } if topic.ends_with("/up/hb") => {
                let hb = decode::<pb::Heartbeat>(&payload).unwrap();
                assert_eq!(hb.seq, 1, "each terminal counts its own heartbeats");
                heartbeats.insert(topic);
            }
            _ => {}
        }
    }
    assert_eq!(connected.iter().collect::<Vec<_>>(), ids);
    tokio::time::timeout(WAIT, sim.ramp_finished())
        .await
        .unwrap();
    assert_eq!(sim.started(), 5);

    cancel.cancel();
    let mut goodbyes = 0;
    while goodbyes < 5 {
        if broker.next().await == Seen::Disconnect {
            goodbyes += 1;
        }
    }
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
    assert_eq!(sim.connected(), 0);
}

#[tokio::test]
async fn refuses_bad_settings_before_starting_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let missing = tmp.path().join("no-pki");

    let err = run_simulator(config(&missing, 8883, 0), &tracker, cancel.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, SimError::Config { .. }), "{err}");

    let mut bad_prefix = config(&missing, 8883, 1);
    bad_prefix.id_prefix = "a/b".into();
    let err = run_simulator(bad_prefix, &tracker, cancel.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("prefix"), "{err}");

    let err = run_simulator(config(&missing, 8883, 1), &tracker, cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, SimError::Ca { .. }), "{err}");
    assert!(err.to_string().contains("no-pki"), "{err}");
    assert!(tracker.is_empty());
}
