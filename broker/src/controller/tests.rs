//! Ingest and sweeper tests: `Ingest::handle` driven with encoded protobufs and bad bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::sweeper::spawn_sweeper;
use super::*;
use crate::events::{EventBus, EventSubscription};
use crate::metrics::{ChannelLabel, Metrics, ReasonLabel};
use crate::registry::{REASON_MISSED_HEARTBEATS, Registry, RegistryConfig};
use crate::views::{AlertKind, FleetEvent, Severity};

struct Harness {
    _tmp: tempfile::TempDir,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    ingest: Arc<Ingest>,
    sub: EventSubscription,
}

fn harness() -> Harness {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        cache_capacity: 1 << 20,
        ..RegistryConfig::new(tmp.path().join("registry"))
    };
    let registry = Registry::open_at(cfg, 0).unwrap();
    let events = EventBus::new(64);
    let sub = events.subscribe();
    let metrics = Arc::new(Metrics::new());
    let ingest = Arc::new(Ingest::new(
        Arc::clone(&registry),
        events,
        Arc::clone(&metrics),
    ));
    Harness {
        _tmp: tmp,
        registry,
        metrics,
        ingest,
        sub,
    }
}

impl Harness {
    fn events(&mut self) -> Vec<FleetEvent> {
        std::iter::from_fn(|| self.sub.try_recv()).collect()
    }
    fn ingested(&self, channel: Channel) -> u64 {
        let label = ChannelLabel {
            channel: channel.name(),
        };
        self.metrics
            .ingest_messages_total
            .get_or_create(&label)
            .get()
    }
    fn rejected(&self, reason: &'static str) -> u64 {
        let label = ReasonLabel { reason };
        self.metrics
            .ingest_rejected_total
            .get_or_create(&label)
            .get()
    }
    fn gauges(&self) -> (i64, i64) {
        (
            self.metrics.devices_online.get(),
            self.metrics.devices_registered.get(),
        )
    }
}

fn topic(device: &str, channel: Channel) -> Topic {
    Topic::for_device(&DeviceId::new(device).unwrap(), channel)
}

fn online(model: &str) -> Vec<u8> {
    encode(&pb::Presence {
        state: pb::PresenceState::Online as i32,
        at_ms: 100,
        versions: Some(pb::SoftwareVersions {
            agent: "1.2.3".into(),
            firmware: "fw-9".into(),
            payment_app: "pay-4".into(),
        }),
        model: model.into(),
        serial: "SN-1".into(),
        reason: String::new(),
    })
    .unwrap()
}

fn offline(reason: &str, at_ms: u64) -> Vec<u8> {
    encode(&pb::Presence {
        state: pb::PresenceState::Offline as i32,
        at_ms,
        reason: reason.into(),
        ..Default::default()
    })
    .unwrap()
}

fn heartbeat(seq: u64, interval_s: u32) -> Vec<u8> {
    encode(&pb::Heartbeat {
        seq,
        sent_at_ms: 5,
        interval_s,
        uptime_s: 60,
        versions: None,
        outbox_depth: 2,
        boot_id: 42,
        ..Default::default()
    })
    .unwrap()
}

fn telemetry(cpu_percent: f32) -> Vec<u8> {
    encode(&pb::Telemetry {
        sent_at_ms: 7,
        system: Some(pb::SystemMetrics {
            cpu_percent,
            memory_used_bytes: 10,
            memory_total_bytes: 20,
            disk_used_bytes: 30,
            disk_total_bytes: 40,
            uptime_s: 50,
            load_average_1m: 0.25,
        }),
        sensors: Some(pb::Sensors {
            battery_percent: Some(55.0),
            network: pb::NetworkType::Cellular4g as i32,
            paper: pb::PaperState::Low as i32,
            ..Default::default()
        }),
        dropped_samples: 1,
    })
    .unwrap()
}

#[test]
fn presence_online_registers_the_device_and_announces_it() {
    let mut h = harness();
    h.ingest
        .handle(&topic("T-1", Channel::Presence), &online("X9"), 1000)
        .unwrap();
    let list = h.registry.list();
    assert_eq!(list.len(), 1);
    assert!(list[0].online);
    assert_eq!(list[0].model, "X9");
    assert_eq!(list[0].serial, "SN-1");
    assert_eq!(list[0].versions.agent, "1.2.3");
    assert_eq!(list[0].first_seen_ms, 1000);
    assert_eq!(
        h.events(),
        vec![FleetEvent::Presence {
            device: "T-1".into(),
            online: true,
            reason: None,
            at_ms: 1000
        }]
    );
    assert_eq!(h.gauges(), (1, 1));
    assert_eq!(h.ingested(Channel::Presence), 1);
}

#[test]
fn graceful_shutdown_and_last_will_take_devices_offline_with_their_reason() {
    let mut h = harness();
    for device in ["T-1", "T-2"] {
        h.ingest
            .handle(&topic(device, Channel::Presence), &online("X9"), 1000)
            .unwrap();
    }
    h.ingest
        .handle(
            &topic("T-1", Channel::Presence),
            &offline("shutdown", 200),
            2000,
        )
        .unwrap();
    h.ingest
        .handle(
            &topic("T-2", Channel::Presence),
            &offline("connection_lost", 300),
            3000,
        )
        .unwrap();
    let list = h.registry.list();
    assert_eq!(list[0].offline_reason.as_deref(), Some("shutdown"));
    assert_eq!(list[0].presence_changed_ms, 2000);
    assert_eq!(list[1].offline_reason.as_deref(), Some("connection_lost"));
    assert_eq!(h.gauges(), (0, 2));
    let offline_events: Vec<_> = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, FleetEvent::Presence { online: false, .. }))
        .collect();
    assert_eq!(offline_events.len(), 2);
}

#[test]
fn a_heartbeat_registers_an_unknown_device_and_brings_it_online() {
    let mut h = harness();
    h.ingest
        .handle(&topic("T-9", Channel::Heartbeat), &heartbeat(3, 10), 5000)
        .unwrap();
    let detail = h.registry.detail(&DeviceId::new("T-9").unwrap()).unwrap();
    assert!(detail.summary.online);
    assert_eq!(detail.summary.last_heartbeat_ms, Some(5000));
    let hb = detail.last_heartbeat.unwrap();
    assert_eq!((hb.seq, hb.interval_s, hb.outbox_depth), (3, 10, 2));
    assert_eq!(hb.received_at_ms, 5000);
    let kinds: Vec<_> = h.events().iter().map(FleetEvent::kind).collect();
    assert_eq!(kinds, vec!["presence", "heartbeat"]);
    assert_eq!(h.gauges(), (1, 1));
}

#[test]
fn telemetry_is_kept_and_streamed() {
    let mut h = harness();
    h.ingest
        .handle(&topic("T-1", Channel::Telemetry), &telemetry(12.5), 9000)
        .unwrap();
    let detail = h.registry.detail(&DeviceId::new("T-1").unwrap()).unwrap();
    let latest = detail.latest_telemetry.unwrap();
    assert_eq!(latest.cpu_percent, 12.5);
    assert_eq!(latest.network, "cellular_4g");
    assert_eq!(latest.paper, "low");
    assert_eq!(latest.card_reader, "unknown");
    assert_eq!(latest.battery_percent, Some(55.0));
    assert_eq!(latest.received_at_ms, 9000);
    assert_eq!(detail.telemetry_history.len(), 1);
    let events = h.events();
    assert!(matches!(
        events.last(),
        Some(FleetEvent::Telemetry { device, telemetry }) if device == "T-1" && telemetry.sent_at_ms == 7
    ));
    assert_eq!(h.ingested(Channel::Telemetry), 1);
}

#[test]
fn bad_payloads_are_counted_and_change_nothing() {
    let mut h = harness();
    let truncated = [0x12, 0x7f, 0x01];
    let cases: Vec<(Channel, Vec<u8>, &str)> = vec![
        (Channel::Heartbeat, truncated.to_vec(), "malformed"),
        (Channel::Presence, truncated.to_vec(), "malformed"),
        (Channel::Telemetry, vec![0xff; 16], "malformed"),
        (Channel::Heartbeat, vec![0; 2048], "too_large"),
        (Channel::Telemetry, vec![0; 5000], "too_large"),
        (Channel::Heartbeat, heartbeat(1, 0), "invalid"),
        (Channel::Heartbeat, heartbeat(1, 86_400), "invalid"),
        (Channel::Telemetry, telemetry(f32::NAN), "invalid"),
        (Channel::Telemetry, telemetry(250.0), "invalid"),
        (
            Channel::Telemetry,
            encode(&pb::Telemetry::default()).unwrap(),
            "invalid",
        ),
        (Channel::Presence, online("\u{1b}]0;pwned\u{7}"), "invalid"),
        (
            Channel::Presence,
            offline("no spaces allowed", 1),
            "invalid",
        ),
        (
            Channel::Presence,
            encode(&pb::Presence::default()).unwrap(),
            "invalid",
        ),
        (Channel::Transactions, vec![1, 2, 3], "unsupported"),
        (Channel::Event, vec![], "unsupported"),
        (Channel::ReportedState, vec![], "unsupported"),
        (Channel::CommandResult, vec![], "unsupported"),
    ];
    for (channel, payload, reason) in &cases {
        let err = h
            .ingest
            .handle(&topic("T-1", *channel), payload, 1000)
            .unwrap_err();
        assert_eq!(err.reason(), *reason, "{channel:?}: {err}");
        assert_eq!(err.device().as_str(), "T-1");
    }
    for reason in ["malformed", "too_large", "invalid", "unsupported"] {
        let expected = cases.iter().filter(|c| c.2 == reason).count() as u64;
        assert_eq!(h.rejected(reason), expected, "{reason}");
    }
    assert!(
        h.registry.is_empty(),
        "a rejected message registered a device"
    );
    assert!(h.events().is_empty());
    assert_eq!(h.gauges(), (0, 0));
    assert_eq!(h.ingested(Channel::Heartbeat), 0);
}

#[test]
fn a_rejected_message_does_not_touch_a_known_device() {
    let h = harness();
    h.ingest
        .handle(&topic("T-1", Channel::Heartbeat), &heartbeat(1, 10), 1000)
        .unwrap();
    let before = h.registry.detail(&DeviceId::new("T-1").unwrap()).unwrap();
    h.ingest
        .handle(&topic("T-1", Channel::Heartbeat), &heartbeat(2, 0), 2000)
        .unwrap_err();
    h.ingest
        .handle(
            &topic("T-1", Channel::Presence),
            &offline("bad reason!", 3),
            3000,
        )
        .unwrap_err();
    let after = h.registry.detail(&DeviceId::new("T-1").unwrap()).unwrap();
    assert_eq!(before, after);
}

#[test]
fn sweep_takes_silent_devices_offline_and_a_heartbeat_brings_them_back() {
    let mut h = harness();
    h.ingest
        .handle(&topic("T-1", Channel::Heartbeat), &heartbeat(1, 10), 1000)
        .unwrap();
    h.ingest
        .handle(&topic("T-2", Channel::Heartbeat), &heartbeat(1, 60), 1000)
        .unwrap();
    h.events();
    assert_eq!(h.ingest.sweep(30_999), 0);
    assert_eq!(h.ingest.sweep(31_000), 1);
    assert_eq!(
        h.events(),
        vec![FleetEvent::Presence {
            device: "T-1".into(),
            online: false,
            reason: Some(REASON_MISSED_HEARTBEATS.into()),
            at_ms: 31_000
        }]
    );
    assert_eq!(h.gauges(), (1, 2));
    h.ingest
        .handle(&topic("T-1", Channel::Heartbeat), &heartbeat(2, 10), 40_000)
        .unwrap();
    assert_eq!(h.gauges(), (2, 2));
    // T-1 goes silent again (deadline 70 s); T-2 promised 60 s, so it is gone only after
    // 180 s of silence.
    assert_eq!(h.ingest.sweep(180_999), 1);
    assert_eq!(h.gauges(), (1, 2));
    assert_eq!(h.ingest.sweep(181_000), 1);
    assert_eq!(h.gauges(), (0, 2));
}

#[tokio::test]
async fn the_sweeper_task_uses_the_injected_clock() {
    let h = harness();
    h.ingest
        .handle(&topic("T-1", Channel::Heartbeat), &heartbeat(1, 10), 1000)
        .unwrap();
    let now = Arc::new(AtomicU64::new(1000));
    let clock: Clock = {
        let now = Arc::clone(&now);
        Arc::new(move || now.load(Ordering::SeqCst))
    };
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    spawn_sweeper(
        Arc::clone(&h.ingest),
        Duration::from_millis(5),
        clock,
        &tracker,
        cancel.clone(),
    );
    // Deadlines against the injected clock are covered by the sweep test above; here the
    // task must pick up the clock's new reading on its own.
    assert_eq!(h.registry.online_count(), 1);
    now.store(31_000, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), async {
        while h.registry.online_count() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the sweeper marked the device offline");
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

/// A heartbeat of T-1 reporting `dead` dead letters.
fn heartbeat_with_dead_letters(seq: u64, dead: u32) -> Vec<u8> {
    encode(&pb::Heartbeat {
        seq,
        sent_at_ms: 5,
        interval_s: 10,
        dead_letters: dead,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn more_dead_letters_on_a_terminal_raise_an_alert_and_show_on_the_device() {
    let mut h = harness();
    let t1 = topic("T-1", Channel::Heartbeat);
    // 0, then 2 (alert), unchanged and fewer (a wiped terminal: no alert), then 3 (alert).
    for (seq, dead) in [(1, 0), (2, 2), (3, 2), (4, 1), (5, 3)] {
        h.ingest
            .handle(&t1, &heartbeat_with_dead_letters(seq, dead), seq * 1000)
            .unwrap();
    }
    let alerts: Vec<(u64, String)> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            FleetEvent::Alert {
                alert: AlertKind::DeadLetters,
                severity: Severity::Warning,
                device,
                message,
                at_ms,
                ..
            } => {
                assert_eq!(device, "T-1");
                Some((at_ms, message))
            }
            _ => None,
        })
        .collect();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[0].0, 2000);
    assert!(
        alerts[0]
            .1
            .contains("holds 2 dead-lettered transactions (2 more")
    );
    assert_eq!(alerts[1].0, 5000);
    assert!(
        alerts[1]
            .1
            .contains("holds 3 dead-lettered transactions (2 more")
    );
    assert_eq!(
        h.registry.dead_letters(&DeviceId::new("T-1").unwrap()),
        Some(3)
    );
    let detail = h.registry.detail(&DeviceId::new("T-1").unwrap()).unwrap();
    assert_eq!(detail.last_heartbeat.unwrap().dead_letters, 3);
}
