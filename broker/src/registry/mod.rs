//! The device registry: every device the controller knows, its presence and recent activity.
//! This is the only module that touches sled (`docs/storage.md`).
//!
//! # Layout
//!
//! - `mod.rs`: [`Registry`] (in-memory state behind one lock, the mutations ingest calls, the
//!   reads the API calls) and [`RegistryConfig`].
//! - `state.rs`: the mutations on the in-memory state and the bookkeeping of what must be
//!   written (dirty and touched devices).
//! - `device.rs`: one device: the persisted `DeviceRecord`, the hot in-memory state (last
//!   heartbeat, bounded telemetry ring, liveness deadline) and the API views.
//! - `store.rs`: the sled store (open with the crash rules, load, durable batch commit).
//! - `committer.rs`: the single committer task and [`Registry::flush`].
//! - `error.rs`: [`RegistryError`].
//!
//! # Durability
//!
//! Registrations, presence transitions and version/model/serial changes are *significant*:
//! they are committed by the committer task within `flush_interval` (a registration wakes it
//! at once). `last_seen_ms`/`last_heartbeat_ms` updates only *touch* a record: it is written
//! every `touch_interval`, with any significant change, and at shutdown. Last heartbeat and
//! telemetry history live only in memory. After a restart every device is offline (reason
//! `controller_restart`) until it speaks again.

mod committer;
mod device;
mod error;
mod state;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use posfleet_proto::DeviceId;
use tokio::sync::{Notify, watch};

pub use error::RegistryError;

#[cfg(test)]
pub(crate) use device::test_support;
pub(crate) use device::{DeviceRecord, TelemetrySample};
pub(crate) use state::{Change, DeviceInfo, PresenceChange, StalePresence};

use crate::views::{
    DeviceDetail, DeviceSummary, HeartbeatView, Lifecycle, ReportedView, VersionsView,
};
use committer::Durability;
use device::{Device, HotState};
use state::State;
use store::Store;

/// Telemetry samples kept per device unless configured otherwise.
pub const DEFAULT_TELEMETRY_HISTORY: usize = 120;

/// Offline reason of devices that were online when the controller stopped.
pub const REASON_CONTROLLER_RESTART: &str = "controller_restart";

/// Offline reason set by the liveness sweep.
pub const REASON_MISSED_HEARTBEATS: &str = "missed_heartbeats";

/// How the registry stores and ages devices.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Directory of the sled store (`DATA/registry`).
    pub dir: PathBuf,
    /// sled page cache in bytes; sled's default (1 GiB) is far too large (storage rule 5).
    pub cache_capacity: u64,
    /// Telemetry samples kept in memory per device; the oldest is dropped first.
    pub telemetry_history: usize,
    /// Longest a significant change waits before it is committed.
    pub flush_interval: Duration,
    /// How often records that only saw `last_seen`/`last_heartbeat` updates are written.
    pub touch_interval: Duration,
    /// Heartbeat intervals without a heartbeat after which an online device is offline.
    pub missed_heartbeats: u32,
    /// Interval assumed for an online device that has never promised one in a heartbeat.
    pub default_heartbeat_interval_s: u32,
}

impl RegistryConfig {
    /// The defaults, storing in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cache_capacity: 64 * 1024 * 1024,
            telemetry_history: DEFAULT_TELEMETRY_HISTORY,
            flush_interval: Duration::from_secs(1),
            touch_interval: Duration::from_secs(60),
            missed_heartbeats: 3,
            default_heartbeat_interval_s: 60,
        }
    }
}

/// The fleet's device registry. Share it as `Arc<Registry>`; every method takes `&self`.
pub struct Registry {
    /// Limits and intervals.
    cfg: RegistryConfig,
    /// The sled store; only the committer writes to it.
    store: Store,
    /// All devices and the bookkeeping of unwritten changes. Held only briefly, never across
    /// an await or a disk write.
    state: RwLock<State>,
    /// What has been committed, for [`Registry::flush`] waiters.
    durability: watch::Sender<Durability>,
    /// Wakes the committer early (registrations, `flush`).
    wake: Notify,
    /// Serialises commits, so even a misuse cannot run two at once (storage rule 4).
    commit_lock: Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.cfg.dir)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Opens the store and loads every device (all offline). Blocks on disk I/O: call it at
    /// startup or from a blocking thread.
    pub fn open(cfg: RegistryConfig) -> Result<Arc<Self>, RegistryError> {
        Self::open_at(cfg, posfleet_proto::now_ms())
    }

    /// [`Registry::open`] with an explicit clock reading (tests).
    pub(crate) fn open_at(cfg: RegistryConfig, now_ms: u64) -> Result<Arc<Self>, RegistryError> {
        let store = Store::open(&cfg.dir, cfg.cache_capacity)?;
        let mut state = State::default();
        for mut record in store.load()? {
            let id =
                DeviceId::new(record.id.as_str()).map_err(|e| RegistryError::CorruptRecord {
                    path: cfg.dir.clone(),
                    key: record.id.clone(),
                    detail: e.to_string(),
                })?;
            if record.online {
                // It was online when the controller stopped; nobody knows what it did since.
                record.online = false;
                record.offline_reason = Some(REASON_CONTROLLER_RESTART.to_owned());
                record.presence_changed_ms = now_ms;
                state.book.significant(&id);
            }
            let device = Device {
                record,
                hot: HotState::default(),
            };
            state.devices.insert(id, device);
        }
        Ok(Arc::new(Self {
            store,
            state: RwLock::new(state),
            durability: watch::Sender::new(Durability::default()),
            wake: Notify::new(),
            commit_lock: Mutex::new(()),
            cfg,
        }))
    }

    /// Number of registered devices.
    pub fn len(&self) -> usize {
        self.read().devices.len()
    }

    /// True if no device is registered.
    pub fn is_empty(&self) -> bool {
        self.read().devices.is_empty()
    }

    /// Number of devices currently online.
    pub fn online_count(&self) -> usize {
        self.read().book.online
    }

    /// Summaries of every device, sorted by id.
    pub fn list(&self) -> Vec<DeviceSummary> {
        self.read().devices.values().map(Device::summary).collect()
    }

    /// Everything known about one device.
    pub fn detail(&self, id: &DeviceId) -> Option<DeviceDetail> {
        self.read().devices.get(id).map(Device::detail)
    }

    /// A Presence ONLINE message: the device connected.
    pub(crate) fn presence_online(
        &self,
        id: &DeviceId,
        at_ms: u64,
        device_at_ms: u64,
        info: DeviceInfo,
    ) -> Change {
        let change = self
            .write()
            .presence_online(&self.cfg, id, at_ms, device_at_ms, info);
        self.wake_if_registered(&change);
        change
    }

    /// A Presence OFFLINE message (graceful goodbye or last will).
    pub(crate) fn presence_offline(
        &self,
        id: &DeviceId,
        at_ms: u64,
        device_at_ms: u64,
        reason: String,
    ) -> Result<Change, StalePresence> {
        let change = self
            .write()
            .presence_offline(id, at_ms, device_at_ms, reason)?;
        self.wake_if_registered(&change);
        Ok(change)
    }

    /// A heartbeat; brings the device online and renews its liveness deadline.
    pub(crate) fn heartbeat(
        &self,
        id: &DeviceId,
        at_ms: u64,
        heartbeat: HeartbeatView,
        versions: Option<VersionsView>,
    ) -> Change {
        let change = self
            .write()
            .heartbeat(&self.cfg, id, at_ms, heartbeat, versions);
        self.wake_if_registered(&change);
        change
    }

    /// A telemetry sample; brings an offline device online.
    pub(crate) fn telemetry(&self, id: &DeviceId, at_ms: u64, sample: TelemetrySample) -> Change {
        let change = self.write().telemetry(&self.cfg, id, at_ms, sample);
        self.wake_if_registered(&change);
        change
    }

    /// Marks offline every online device whose liveness deadline is at or before `now_ms`.
    pub(crate) fn sweep(&self, now_ms: u64) -> Vec<(DeviceId, PresenceChange)> {
        self.write().sweep(now_ms)
    }

    /// Replaces a device's groups. Returns `false` for an unknown device. A significant
    /// change: `flush` makes it durable.
    pub(crate) fn set_groups(&self, id: &DeviceId, groups: BTreeSet<String>) -> bool {
        let mut st = self.write();
        let State { devices, book } = &mut *st;
        let Some(dev) = devices.get_mut(id) else {
            return false;
        };
        if dev.record.groups != groups {
            dev.record.groups = groups;
            book.significant(id);
        }
        true
    }

    /// Sets a device's lifecycle state (lost, found → active). Returns `false` for an
    /// unknown device; like [`Registry::set_groups`], `flush` makes it durable.
    pub(crate) fn set_lifecycle(&self, id: &DeviceId, lifecycle: crate::views::Lifecycle) -> bool {
        let mut st = self.write();
        let State { devices, book } = &mut *st;
        let Some(dev) = devices.get_mut(id) else {
            return false;
        };
        if dev.record.lifecycle != lifecycle {
            dev.record.lifecycle = lifecycle;
            book.significant(id);
        }
        true
    }

    /// Replaces a device's labels; like [`Registry::set_groups`].
    pub(crate) fn set_labels(&self, id: &DeviceId, labels: BTreeMap<String, String>) -> bool {
        let mut st = self.write();
        let State { devices, book } = &mut *st;
        let Some(dev) = devices.get_mut(id) else {
            return false;
        };
        if dev.record.labels != labels {
            dev.record.labels = labels;
            book.significant(id);
        }
        true
    }

    /// Registers an enrolled device (lifecycle `pending` until it connects) with its serial
    /// number and groups. Returns `false` if the id is already known. A significant change:
    /// `flush` makes it durable.
    pub(crate) fn enroll(
        &self,
        id: &DeviceId,
        serial: &str,
        groups: BTreeSet<String>,
        at_ms: u64,
    ) -> bool {
        let mut st = self.write();
        let State { devices, book } = &mut *st;
        if devices.contains_key(id) {
            return false;
        }
        let mut record = DeviceRecord::new(id.as_str(), at_ms);
        record.lifecycle = Lifecycle::Pending;
        record.serial = serial.to_owned();
        record.groups = groups;
        devices.insert(
            id.clone(),
            Device {
                record,
                hot: HotState::default(),
            },
        );
        book.significant(id);
        drop(st);
        self.wake.notify_one();
        true
    }

    /// The device's lifecycle (`None` for an unknown device).
    pub(crate) fn lifecycle(&self, id: &DeviceId) -> Option<Lifecycle> {
        self.read().devices.get(id).map(|d| d.record.lifecycle)
    }

    /// Remembers what a device reported about its lock and configuration (memory only).
    /// Records what the device reported. A heartbeat carries no lock reason: when it reports
    /// the same lock (state and generation) as before, the reason the terminal gave for it in
    /// its last ReportedState is kept.
    pub(crate) fn set_reported(&self, id: &DeviceId, mut reported: ReportedView) {
        if let Some(dev) = self.write().devices.get_mut(id) {
            if reported.lock_reason.is_none()
                && let Some(previous) = &dev.hot.reported
                && previous.locked == reported.locked
                && previous.lock_generation == reported.lock_generation
            {
                reported.lock_reason.clone_from(&previous.lock_reason);
            }
            dev.hot.reported = Some(reported);
        }
    }

    /// True if the device is known and online.
    pub fn is_online(&self, id: &DeviceId) -> bool {
        self.read().devices.get(id).is_some_and(|d| d.record.online)
    }

    /// The device's groups (`None` for an unknown device).
    pub(crate) fn groups(&self, id: &DeviceId) -> Option<BTreeSet<String>> {
        self.read().devices.get(id).map(|d| d.record.groups.clone())
    }

    /// The software versions the device last reported (`None` for an unknown device).
    pub(crate) fn versions(&self, id: &DeviceId) -> Option<VersionsView> {
        self.read()
            .devices
            .get(id)
            .map(|d| d.record.versions.clone())
    }

    /// The outbox depth of the device's last heartbeat since this start (`None`: unknown
    /// device or no heartbeat yet).
    pub(crate) fn outbox_depth(&self, id: &DeviceId) -> Option<u32> {
        self.last_heartbeat(id, |h| h.outbox_depth)
    }

    /// The dead letters of the device's last heartbeat since this start (`None`: unknown
    /// device or no heartbeat yet).
    pub(crate) fn dead_letters(&self, id: &DeviceId) -> Option<u32> {
        self.last_heartbeat(id, |h| h.dead_letters)
    }

    fn last_heartbeat<T>(&self, id: &DeviceId, field: impl Fn(&HeartbeatView) -> T) -> Option<T> {
        self.read()
            .devices
            .get(id)
            .and_then(|d| d.hot.last_heartbeat.as_ref())
            .map(field)
    }

    /// Every device with its groups.
    pub(crate) fn membership(&self) -> Vec<(DeviceId, BTreeSet<String>)> {
        self.read()
            .devices
            .iter()
            .map(|(id, d)| (id.clone(), d.record.groups.clone()))
            .collect()
    }

    /// The ids of the devices whose record matches `pred`, sorted.
    pub(crate) fn matching(&self, pred: impl Fn(&DeviceRecord) -> bool) -> Vec<DeviceId> {
        self.read()
            .devices
            .iter()
            .filter(|(_, d)| pred(&d.record))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A new device is committed at once rather than on the next interval.
    fn wake_if_registered(&self, change: &Change) {
        if change.registered {
            self.wake.notify_one();
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied mutation that matters
        // more than stopping the fleet's state altogether, so poisoning is ignored.
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}
