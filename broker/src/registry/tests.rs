//! Registry tests: the durability contract, reopen, and a model-based property test that
//! compares the registry with a plain `BTreeMap` model under random operation sequences.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::DeviceId;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::test_support::sample;
use super::*;
use crate::views::{DeviceSummary, HeartbeatView, Lifecycle, VersionsView};

const HISTORY: usize = 3;
const DEFAULT_INTERVAL_S: u32 = 20;

fn config(dir: &Path) -> RegistryConfig {
    RegistryConfig {
        telemetry_history: HISTORY,
        default_heartbeat_interval_s: DEFAULT_INTERVAL_S,
        cache_capacity: 1 << 20,
        ..RegistryConfig::new(dir)
    }
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn heartbeat(seq: u64, interval_s: u32, received_at_ms: u64) -> HeartbeatView {
    HeartbeatView {
        seq,
        sent_at_ms: received_at_ms,
        received_at_ms,
        interval_s,
        uptime_s: seq * u64::from(interval_s),
        outbox_depth: 0,
        boot_id: 7,
    }
}

fn versions(agent: &str) -> VersionsView {
    VersionsView {
        agent: agent.into(),
        firmware: "fw1".into(),
        payment_app: "pay1".into(),
    }
}

#[test]
fn a_new_device_registers_active_and_online_on_heartbeat() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open_at(config(tmp.path()), 0).unwrap();
    let change = reg.heartbeat(
        &id("T-1"),
        1000,
        heartbeat(1, 10, 1000),
        Some(versions("1.0")),
    );
    assert!(change.registered);
    assert_eq!(
        change.presence,
        Some(PresenceChange {
            online: true,
            reason: None,
            at_ms: 1000
        })
    );
    let list = reg.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].lifecycle, Lifecycle::Active);
    assert!(list[0].online);
    assert_eq!(list[0].versions.agent, "1.0");
    assert_eq!(reg.online_count(), 1);
    // A second heartbeat changes no presence.
    let again = reg.heartbeat(&id("T-1"), 2000, heartbeat(2, 10, 2000), None);
    assert_eq!(again, Change::default());
}

#[test]
fn sweep_marks_devices_offline_after_three_missed_intervals() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open_at(config(tmp.path()), 0).unwrap();
    reg.heartbeat(&id("T-1"), 1000, heartbeat(1, 10, 1000), None);
    assert!(reg.sweep(30_999).is_empty());
    let swept = reg.sweep(31_000);
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].1.reason.as_deref(), Some(REASON_MISSED_HEARTBEATS));
    assert_eq!(reg.online_count(), 0);
    assert!(reg.sweep(100_000).is_empty());
    // Telemetry from the offline device brings it back.
    let change = reg.telemetry(&id("T-1"), 40_000, sample(1, 40_000));
    assert!(change.presence.is_some_and(|p| p.online));
}

#[test]
fn a_late_last_will_from_an_earlier_connection_is_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open_at(config(tmp.path()), 0).unwrap();
    reg.presence_online(&id("T-1"), 1000, 500, DeviceInfo::default());
    let stale = reg.presence_offline(&id("T-1"), 1100, 400, "connection_lost".into());
    assert_eq!(stale, Err(StalePresence));
    assert_eq!(reg.online_count(), 1);
    let change = reg
        .presence_offline(&id("T-1"), 1200, 600, "shutdown".into())
        .unwrap();
    assert_eq!(change.presence.unwrap().reason.as_deref(), Some("shutdown"));
}

#[test]
fn telemetry_history_is_bounded_oldest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open_at(config(tmp.path()), 0).unwrap();
    for i in 0..10 {
        reg.telemetry(&id("T-1"), 1000 + i, sample(i, 1000 + i));
    }
    let detail = reg.detail(&id("T-1")).unwrap();
    let sent: Vec<u64> = detail
        .telemetry_history
        .iter()
        .map(|t| t.sent_at_ms)
        .collect();
    assert_eq!(sent, vec![7, 8, 9]);
    assert_eq!(detail.latest_telemetry.unwrap().sent_at_ms, 9);
}

#[test]
fn reopen_after_a_crash_keeps_committed_changes_and_starts_offline() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let reg = Registry::open_at(config(tmp.path()), 0).unwrap();
        let info = DeviceInfo {
            versions: Some(versions("2.0")),
            model: "X9".into(),
            serial: "S-1".into(),
        };
        reg.presence_online(&id("T-1"), 1000, 1, info);
        reg.presence_online(&id("T-2"), 1000, 1, DeviceInfo::default());
        reg.presence_offline(&id("T-2"), 1500, 2, "shutdown".into())
            .unwrap();
        // Only significant changes are committed; then a "crash" (no final commit).
        reg.commit_pending(false).unwrap();
        reg.heartbeat(&id("T-1"), 9000, heartbeat(1, 10, 9000), None);
    }
    let reg = Registry::open_at(config(tmp.path()), 50_000).unwrap();
    let list = reg.list();
    assert_eq!(list.len(), 2);
    assert_eq!(reg.online_count(), 0);
    let t1 = &list[0];
    assert_eq!((t1.id.as_str(), t1.online), ("T-1", false));
    assert_eq!(
        t1.offline_reason.as_deref(),
        Some(REASON_CONTROLLER_RESTART)
    );
    assert_eq!(t1.presence_changed_ms, 50_000);
    assert_eq!(
        (
            t1.model.as_str(),
            t1.serial.as_str(),
            t1.versions.agent.as_str()
        ),
        ("X9", "S-1", "2.0")
    );
    // The heartbeat after the last commit was never made durable.
    assert_eq!(t1.last_heartbeat_ms, None);
    let t2 = &list[1];
    assert_eq!(t2.offline_reason.as_deref(), Some("shutdown"));
    assert_eq!(t2.presence_changed_ms, 1500);
    assert!(reg.detail(&id("T-1")).unwrap().telemetry_history.is_empty());
}

#[tokio::test]
async fn flush_waits_for_the_committer_and_registration_is_committed_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        // Long intervals: only the wake-up for a registration can commit in time.
        flush_interval: Duration::from_secs(3600),
        touch_interval: Duration::from_secs(3600),
        ..config(tmp.path())
    };
    let reg = Registry::open_at(cfg.clone(), 0).unwrap();
    // Nothing changed yet: nothing to wait for.
    reg.flush().await.unwrap();
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    reg.spawn_committer(&tracker, stop.clone());
    reg.presence_online(&id("T-1"), 1000, 1, DeviceInfo::default());
    // The registration woke the committer; wait for it without calling flush.
    let mut rx = reg.durability.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|d| d.committed_seq >= 2),
    )
    .await
    .expect("registration committed promptly")
    .unwrap();
    reg.presence_offline(&id("T-1"), 2000, 2, "shutdown".into())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), reg.flush())
        .await
        .unwrap()
        .unwrap();
    reg.telemetry(&id("T-1"), 3000, sample(1, 3000));
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    reg.presence_online(&id("T-2"), 4000, 1, DeviceInfo::default());
    assert!(matches!(reg.flush().await, Err(RegistryError::NoCommitter)));
    drop(rx);
    drop(reg);
    let reg = Registry::open_at(cfg, 10_000).unwrap();
    let list = reg.list();
    // T-2 registered after the committer stopped, so it was never written; the final commit
    // at shutdown wrote T-1's last-seen time from its telemetry.
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].last_seen_ms, 3000);
    assert_eq!(
        list[0].offline_reason.as_deref(),
        Some(REASON_CONTROLLER_RESTART)
    );
}

/// One step of the model test; device ids are indexes into `DEVICES`.
#[derive(Debug, Clone)]
enum Op {
    Online {
        dev: usize,
        dt: u64,
        device_at: u64,
        model: Option<u8>,
    },
    Offline {
        dev: usize,
        dt: u64,
        device_at: u64,
        graceful: bool,
    },
    Heartbeat {
        dev: usize,
        dt: u64,
        interval_s: u32,
        agent: Option<u8>,
    },
    Telemetry {
        dev: usize,
        dt: u64,
    },
    Sweep {
        dt: u64,
    },
    Commit {
        include_touched: bool,
    },
    Restart {
        dt: u64,
    },
}

const DEVICES: [&str; 4] = ["A-1", "B-2", "c.3", "d_4"];

fn op() -> impl Strategy<Value = Op> {
    let dev = 0..DEVICES.len();
    let dt = 0u64..40_000;
    prop_oneof![
        (
            dev.clone(),
            dt.clone(),
            0u64..100,
            proptest::option::of(0u8..3)
        )
            .prop_map(|(dev, dt, device_at, model)| Op::Online {
                dev,
                dt,
                device_at,
                model
            }),
        (dev.clone(), dt.clone(), 0u64..100, any::<bool>()).prop_map(
            |(dev, dt, device_at, graceful)| Op::Offline {
                dev,
                dt,
                device_at,
                graceful
            }
        ),
        (
            dev.clone(),
            dt.clone(),
            1u32..30,
            proptest::option::of(0u8..3)
        )
            .prop_map(|(dev, dt, interval_s, agent)| Op::Heartbeat {
                dev,
                dt,
                interval_s,
                agent
            }),
        (dev, dt.clone()).prop_map(|(dev, dt)| Op::Telemetry { dev, dt }),
        dt.clone().prop_map(|dt| Op::Sweep { dt }),
        any::<bool>().prop_map(|include_touched| Op::Commit { include_touched }),
        dt.prop_map(|dt| Op::Restart { dt }),
    ]
}

/// The model: what an admin should see, written as plainly as possible.
#[derive(Debug, Clone, Default)]
struct ModelDevice {
    summary: Option<DeviceSummary>,
    interval_s: Option<u32>,
    deadline: Option<u64>,
    online_since_device: u64,
    last_hb_seq: Option<u64>,
    telemetry: VecDeque<u64>,
}

#[derive(Debug, Default)]
struct Model {
    devices: BTreeMap<String, ModelDevice>,
}

impl Model {
    fn get(&mut self, name: &str, now: u64) -> &mut ModelDevice {
        let d = self.devices.entry(name.to_owned()).or_default();
        d.summary.get_or_insert_with(|| DeviceSummary {
            id: name.to_owned(),
            lifecycle: Lifecycle::Active,
            online: false,
            offline_reason: None,
            first_seen_ms: now,
            last_seen_ms: now,
            presence_changed_ms: now,
            last_heartbeat_ms: None,
            versions: VersionsView::default(),
            model: String::new(),
            serial: String::new(),
        });
        d
    }
}

impl ModelDevice {
    fn s(&mut self) -> &mut DeviceSummary {
        self.summary.as_mut().unwrap()
    }
    fn arm(&mut self, now: u64) {
        let interval = u64::from(self.interval_s.unwrap_or(DEFAULT_INTERVAL_S));
        self.deadline = Some(now + 3 * interval * 1000);
    }
    fn online(&mut self, now: u64) {
        if !self.s().online {
            let s = self.s();
            s.online = true;
            s.offline_reason = None;
            s.presence_changed_ms = now;
        }
    }
    fn offline(&mut self, now: u64, reason: &str) {
        if self.s().online {
            let s = self.s();
            s.online = false;
            s.offline_reason = Some(reason.to_owned());
            s.presence_changed_ms = now;
            self.deadline = None;
            self.online_since_device = 0;
        }
    }
}

fn apply(reg: &Registry, model: &mut Model, now: u64, op: &Op) {
    match *op {
        Op::Online {
            dev,
            device_at,
            model: m,
            ..
        } => {
            let info = DeviceInfo {
                versions: None,
                model: m.map(|m| format!("M{m}")).unwrap_or_default(),
                serial: String::new(),
            };
            reg.presence_online(&id(DEVICES[dev]), now, device_at, info.clone());
            let d = model.get(DEVICES[dev], now);
            if !info.model.is_empty() {
                d.s().model = info.model;
            }
            d.s().last_seen_ms = now;
            d.online_since_device = device_at;
            d.arm(now);
            d.online(now);
        }
        Op::Offline {
            dev,
            device_at,
            graceful,
            ..
        } => {
            let reason = if graceful {
                "shutdown"
            } else {
                "connection_lost"
            };
            let known = model.devices.contains_key(DEVICES[dev]);
            let result = reg.presence_offline(&id(DEVICES[dev]), now, device_at, reason.into());
            let d = model.get(DEVICES[dev], now);
            let stale = d.s().online && device_at != 0 && device_at < d.online_since_device;
            assert_eq!(result.is_err(), stale);
            if !known {
                d.s().offline_reason = Some(reason.to_owned());
            } else if !stale {
                d.offline(now, reason);
            }
        }
        Op::Heartbeat {
            dev,
            interval_s,
            agent,
            ..
        } => {
            let seq = now;
            let v = agent.map(|a| versions(&format!("{a}.0")));
            reg.heartbeat(
                &id(DEVICES[dev]),
                now,
                heartbeat(seq, interval_s, now),
                v.clone(),
            );
            let d = model.get(DEVICES[dev], now);
            if let Some(v) = v {
                d.s().versions = v;
            }
            d.interval_s = Some(interval_s);
            d.s().last_seen_ms = now;
            d.s().last_heartbeat_ms = Some(now);
            d.last_hb_seq = Some(seq);
            d.arm(now);
            d.online(now);
        }
        Op::Telemetry { dev, .. } => {
            reg.telemetry(&id(DEVICES[dev]), now, sample(now, now));
            let d = model.get(DEVICES[dev], now);
            d.s().last_seen_ms = now;
            d.telemetry.push_back(now);
            if d.telemetry.len() > HISTORY {
                d.telemetry.pop_front();
            }
            if !d.s().online {
                d.arm(now);
            }
            d.online(now);
        }
        Op::Sweep { .. } => {
            let swept = reg.sweep(now);
            let mut expected = Vec::new();
            for (name, d) in &mut model.devices {
                if d.s().online && d.deadline.is_some_and(|t| t <= now) {
                    d.offline(now, REASON_MISSED_HEARTBEATS);
                    expected.push(name.clone());
                }
            }
            let got: Vec<String> = swept.iter().map(|(i, _)| i.to_string()).collect();
            assert_eq!(got, expected);
        }
        Op::Commit { include_touched } => {
            reg.commit_pending(include_touched).unwrap();
        }
        Op::Restart { .. } => unreachable!("handled by the caller"),
    }
}

fn check(reg: &Registry, model: &Model) {
    let expected: Vec<DeviceSummary> = model
        .devices
        .values()
        .filter_map(|d| d.summary.clone())
        .collect();
    assert_eq!(reg.list(), expected);
    assert_eq!(reg.len(), expected.len());
    assert_eq!(
        reg.online_count(),
        expected.iter().filter(|s| s.online).count()
    );
    for (name, d) in &model.devices {
        let detail = reg.detail(&id(name)).unwrap();
        assert_eq!(detail.last_heartbeat.map(|h| h.seq), d.last_hb_seq);
        let history: Vec<u64> = detail
            .telemetry_history
            .iter()
            .map(|t| t.sent_at_ms)
            .collect();
        assert_eq!(history, Vec::from(d.telemetry.clone()));
    }
}

fn dt(op: &Op) -> u64 {
    match *op {
        Op::Online { dt, .. }
        | Op::Offline { dt, .. }
        | Op::Heartbeat { dt, .. }
        | Op::Telemetry { dt, .. }
        | Op::Sweep { dt }
        | Op::Restart { dt } => dt,
        Op::Commit { .. } => 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn registry_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let tmp = tempfile::tempdir().unwrap();
        let mut now = 1_000u64;
        let mut reg: Arc<Registry> = Registry::open_at(config(tmp.path()), now).unwrap();
        let mut model = Model::default();
        for op in &ops {
            now += dt(op);
            if let Op::Restart { .. } = op {
                // A graceful restart: the committer's final commit, then open again.
                reg.commit_pending(true).unwrap();
                drop(reg);
                reg = Registry::open_at(config(tmp.path()), now).unwrap();
                for d in model.devices.values_mut() {
                    if d.s().online {
                        d.offline(now, REASON_CONTROLLER_RESTART);
                    }
                    d.deadline = None;
                    d.online_since_device = 0;
                    d.last_hb_seq = None;
                    d.telemetry.clear();
                }
            } else {
                apply(&reg, &mut model, now, op);
            }
            check(&reg, &model);
        }
    }
}
