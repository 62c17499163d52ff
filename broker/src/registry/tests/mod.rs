//! Registry tests: the durability contract and reopen; `model.rs` holds the model-based
//! property test.

mod model;

use std::path::Path;
use std::time::Duration;

use posfleet_proto::DeviceId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::test_support::sample;
use super::*;
use crate::views::{HeartbeatView, Lifecycle, ReportedView, VersionsView};

pub(super) const HISTORY: usize = 3;
pub(super) const DEFAULT_INTERVAL_S: u32 = 20;

pub(super) fn config(dir: &Path) -> RegistryConfig {
    RegistryConfig {
        telemetry_history: HISTORY,
        default_heartbeat_interval_s: DEFAULT_INTERVAL_S,
        cache_capacity: 1 << 20,
        ..RegistryConfig::new(dir)
    }
}

pub(super) fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

pub(super) fn heartbeat(seq: u64, interval_s: u32, received_at_ms: u64) -> HeartbeatView {
    HeartbeatView {
        seq,
        sent_at_ms: received_at_ms,
        received_at_ms,
        interval_s,
        uptime_s: seq * u64::from(interval_s),
        outbox_depth: 0,
        boot_id: 7,
        config_version: 0,
        locked: false,
        lock_generation: 0,
        dead_letters: 0,
    }
}

pub(super) fn versions(agent: &str) -> VersionsView {
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

/// Found by the e2e lock test (1 of 10 loaded runs): a heartbeat after the terminal's
/// ReportedState erased the lock reason `posctl devices show` prints.
#[test]
fn a_heartbeat_keeps_the_reason_of_the_lock_it_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::open_at(config(tmp.path()), 0).unwrap();
    reg.presence_online(&id("T-1"), 1000, 1, DeviceInfo::default());
    let report = |source: &str, locked: bool, generation: u64, reason: Option<&str>| ReportedView {
        at_ms: 2000,
        source: source.to_owned(),
        config_version: 0,
        locked,
        lock_generation: generation,
        lock_reason: reason.map(str::to_owned),
    };
    let reason = |reg: &Registry| {
        reg.detail(&id("T-1"))
            .and_then(|d| d.reported)
            .and_then(|r| r.lock_reason)
    };
    reg.set_reported(&id("T-1"), report("state", true, 1, Some("stolen")));
    reg.set_reported(&id("T-1"), report("heartbeat", true, 1, None));
    assert_eq!(reason(&reg).as_deref(), Some("stolen"));
    // Another lock (or an unlock) does not inherit it.
    reg.set_reported(&id("T-1"), report("heartbeat", true, 2, None));
    assert_eq!(reason(&reg), None);
    reg.set_reported(&id("T-1"), report("state", false, 2, Some("stolen")));
    reg.set_reported(&id("T-1"), report("heartbeat", true, 2, None));
    assert_eq!(reason(&reg), None);
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
