//! The agent against the fake broker (mTLS on loopback, port 0).

use std::time::Duration;

use posfleet_proto::{decode, pb};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::telemetry::SimulatedSystem;
use posfleet_runtime::testing::{FakeBroker, Seen, TestPki};

pub(super) const WAIT: Duration = Duration::from_secs(10);

pub(super) fn agent(
    pki: &TestPki,
    broker: &FakeBroker,
    heartbeat: Duration,
    telemetry: Duration,
    outbox: &Outbox,
) -> Agent {
    let id = DeviceId::new("T-7").unwrap();
    let mut settings = AgentSettings::new(BrokerUrl {
        host: "127.0.0.1".into(),
        port: broker.addr.port(),
    });
    settings.heartbeat_interval = heartbeat;
    settings.telemetry_interval = telemetry;
    settings.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
    };
    settings.device = DeviceInfo {
        model: "PX-500".into(),
        serial: "S-1".into(),
        firmware_version: "1.0".into(),
        payment_app_version: "2.0".into(),
    };
    Agent::new(
        id.clone(),
        pki.device_tls(id.as_str()),
        settings,
        (
            Box::new(SimulatedSystem::new(1)),
            Box::new(SimulatedSensors::new(1)),
        ),
        outbox.device(&id).unwrap(),
        // Test-only: the state store lives in a directory inside the outbox's temp dir.
        crate::testing::command_setup(&outbox.dir().join("cmdstate"), &id),
    )
}

/// An outbox in a temp dir (kept alive by the returned guard).
pub(super) async fn outbox() -> (tempfile::TempDir, Outbox) {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = crate::outbox::tests::open(tmp.path()).await;
    (tmp, outbox)
}

/// The next publish on `channel` (skipping everything else).
pub(super) async fn next_on(broker: &mut FakeBroker, channel: &str) -> bytes::Bytes {
    let suffix = format!("/{channel}");
    match broker
        .next_matching(|s| matches!(s, Seen::Publish { topic, .. } if topic.ends_with(&suffix)))
        .await
    {
        Seen::Publish { payload, .. } => payload,
        _ => unreachable!(),
    }
}

pub(super) async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn announces_itself_reports_and_says_goodbye() {
    let pki = TestPki::new();
    let (_tmp, outbox) = outbox().await;
    let mut broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let a = agent(
        &pki,
        &broker,
        Duration::from_millis(100),
        Duration::from_millis(150),
        &outbox,
    );
    let handle = a.spawn(&tracker, cancel.clone()).unwrap();
    assert_eq!(handle.device_id().as_str(), "T-7");

    let Seen::Connect {
        client_id, will, ..
    } = broker.next().await
    else {
        panic!("expected CONNECT first");
    };
    assert_eq!(client_id, "T-7");
    let (will_topic, will_payload) = will.unwrap();
    assert_eq!(will_topic, "posfleet/v1/d/T-7/up/presence");
    let will = decode::<pb::Presence>(&will_payload).unwrap();
    assert_eq!(will.state(), pb::PresenceState::Offline);
    assert_eq!(will.reason, REASON_CONNECTION_LOST);
    assert_eq!(
        broker.next().await,
        Seen::Subscribe(vec!["posfleet/v1/d/T-7/down/+".into()])
    );

    let online = decode::<pb::Presence>(&next_on(&mut broker, "presence").await).unwrap();
    assert_eq!(online.state(), pb::PresenceState::Online);
    assert_eq!(
        (online.model.as_str(), online.serial.as_str()),
        ("PX-500", "S-1")
    );
    let versions = online.versions.unwrap();
    assert_eq!(
        (versions.firmware.as_str(), versions.payment_app.as_str()),
        ("1.0", "2.0")
    );
    let state = decode::<pb::ReportedState>(&next_on(&mut broker, "st").await).unwrap();
    assert!(!state.locked);

    let hb1 = decode::<pb::Heartbeat>(&next_on(&mut broker, "hb").await).unwrap();
    let hb2 = decode::<pb::Heartbeat>(&next_on(&mut broker, "hb").await).unwrap();
    assert_eq!((hb1.seq, hb2.seq), (1, 2));
    assert_eq!(hb1.boot_id, hb2.boot_id);
    let tm = decode::<pb::Telemetry>(&next_on(&mut broker, "tm").await).unwrap();
    let sensors = tm.sensors.unwrap();
    assert!(sensors.battery_percent.is_some() && !sensors.tamper);
    assert!(tm.system.unwrap().memory_total_bytes > 0);

    // A downlink message is received and ignored (no command handling yet).
    broker.push("posfleet/v1/d/T-7/down/cmd", b"not yet");
    eventually("the downlink message", || handle.stats().downlink == 1).await;

    cancel.cancel();
    let offline = decode::<pb::Presence>(&next_on(&mut broker, "presence").await).unwrap();
    assert_eq!(offline.state(), pb::PresenceState::Offline);
    assert_eq!(offline.reason, REASON_SHUTDOWN);
    assert_eq!(
        broker
            .next_matching(|s| !matches!(s, Seen::Publish { .. }))
            .await,
        Seen::Disconnect
    );
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
    assert!(!handle.is_connected());
}

#[tokio::test]
async fn announces_again_after_every_reconnect() {
    let pki = TestPki::new();
    let (_tmp, outbox) = outbox().await;
    let mut broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let a = agent(
        &pki,
        &broker,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        &outbox,
    );
    let _handle = a.spawn(&tracker, cancel.clone()).unwrap();
    next_on(&mut broker, "presence").await;
    next_on(&mut broker, "st").await;

    broker.kick();
    broker
        .next_matching(|s| matches!(s, Seen::Connect { .. }))
        .await;
    assert!(matches!(broker.next().await, Seen::Subscribe(_)));
    let online = decode::<pb::Presence>(&next_on(&mut broker, "presence").await).unwrap();
    assert_eq!(online.state(), pb::PresenceState::Online);
    next_on(&mut broker, "st").await;
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
}

#[tokio::test]
async fn counts_telemetry_dropped_while_offline_in_the_next_sample() {
    let pki = TestPki::new();
    let (_tmp, outbox) = outbox().await;
    let mut broker = FakeBroker::start(&pki).await;
    broker.set_refuse(true);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let a = agent(
        &pki,
        &broker,
        Duration::from_secs(3600),
        Duration::from_millis(50),
        &outbox,
    );
    let handle = a.spawn(&tracker, cancel.clone()).unwrap();
    eventually("dropped samples", || handle.stats().telemetry_dropped >= 3).await;
    assert_eq!(handle.stats().telemetry, 0);

    broker.set_refuse(false);
    let tm = decode::<pb::Telemetry>(&next_on(&mut broker, "tm").await).unwrap();
    assert!(tm.dropped_samples >= 3, "dropped {}", tm.dropped_samples);
    let next = decode::<pb::Telemetry>(&next_on(&mut broker, "tm").await).unwrap();
    assert_eq!(next.dropped_samples, 0);

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
}

#[tokio::test]
async fn stops_promptly_when_never_connected() {
    let pki = TestPki::new();
    let (_tmp, outbox) = outbox().await;
    let broker = FakeBroker::start(&pki).await;
    broker.set_refuse(true);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let a = agent(
        &pki,
        &broker,
        Duration::from_millis(50),
        Duration::from_millis(50),
        &outbox,
    );
    let handle = a.spawn(&tracker, cancel.clone()).unwrap();
    eventually("a skipped heartbeat", || {
        handle.stats().heartbeats_skipped >= 1
    })
    .await;
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(2), tracker.wait())
        .await
        .expect("an agent that never connected stops at once");
    assert!(handle.mqtt().is_closed());
}

#[tokio::test]
async fn shutdown_does_not_wait_for_an_ack_on_a_dead_connection() {
    let pki = TestPki::new();
    let (_tmp, outbox) = outbox().await;
    let mut broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut a = agent(
        &pki,
        &broker,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        &outbox,
    );
    a.settings.shutdown_grace = Duration::from_secs(60);
    let _handle = a.spawn(&tracker, cancel.clone()).unwrap();
    next_on(&mut broker, "st").await;

    broker.set_ack_publishes(false);
    cancel.cancel();
    let offline = decode::<pb::Presence>(&next_on(&mut broker, "presence").await).unwrap();
    assert_eq!(offline.reason, REASON_SHUTDOWN);
    // The broker goes away before acknowledging: the agent stops long before its grace.
    broker.kick();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .expect("shutdown must not wait out the grace for a dead connection");
}
