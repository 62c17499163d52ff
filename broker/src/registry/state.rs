//! The registry's in-memory state and its mutations. Every mutation returns what changed
//! (a registration, a presence transition) so the caller can announce it, and records which
//! devices must be written (`Book`).

use std::collections::{BTreeMap, BTreeSet};

use posfleet_proto::DeviceId;

use super::device::{Device, DeviceRecord, HotState, TelemetrySample};
use super::{REASON_MISSED_HEARTBEATS, RegistryConfig};
use crate::views::{HeartbeatView, Lifecycle, VersionsView};

/// A presence transition to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PresenceChange {
    pub online: bool,
    pub reason: Option<String>,
    /// Controller clock, Unix ms.
    pub at_ms: u64,
}

/// What a mutation changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Change {
    /// The device was not known before this message.
    pub registered: bool,
    pub presence: Option<PresenceChange>,
}

/// An OFFLINE presence stamped (device clock) before the ONLINE presence of the device's
/// current connection: the late last will of a previous connection. It changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StalePresence;

/// What a Presence ONLINE says about the device; empty fields leave the stored value as is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DeviceInfo {
    pub versions: Option<VersionsView>,
    pub model: String,
    pub serial: String,
}

/// Which devices must be written, and counters kept in step with the devices.
#[derive(Debug, Default)]
pub(crate) struct Book {
    /// Devices currently online.
    pub online: usize,
    /// Devices with a significant change not yet committed.
    pub dirty: BTreeSet<DeviceId>,
    /// Devices with only last-seen updates not yet committed.
    pub touched: BTreeSet<DeviceId>,
    /// Count of significant changes so far; `flush` waits until the committed count reaches
    /// the value it saw.
    pub change_seq: u64,
}

impl Book {
    pub(crate) fn significant(&mut self, id: &DeviceId) {
        self.dirty.insert(id.clone());
        self.change_seq += 1;
    }

    fn touch(&mut self, id: &DeviceId) {
        if !self.dirty.contains(id) {
            self.touched.insert(id.clone());
        }
    }
}

/// Every device plus the bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub devices: BTreeMap<DeviceId, Device>,
    pub book: Book,
}

impl State {
    pub(crate) fn presence_online(
        &mut self,
        cfg: &RegistryConfig,
        id: &DeviceId,
        at_ms: u64,
        device_at_ms: u64,
        info: DeviceInfo,
    ) -> Change {
        let (dev, book, registered) = self.entry(id, at_ms);
        let mut changed = false;
        if let Some(versions) = info.versions {
            changed |= replace(&mut dev.record.versions, versions);
        }
        if !info.model.is_empty() {
            changed |= replace(&mut dev.record.model, info.model);
        }
        if !info.serial.is_empty() {
            changed |= replace(&mut dev.record.serial, info.serial);
        }
        // An enrolled terminal becomes active when it first connects.
        if dev.record.lifecycle == Lifecycle::Pending {
            dev.record.lifecycle = Lifecycle::Active;
            changed = true;
        }
        if changed {
            book.significant(id);
        }
        seen(dev, book, id, at_ms);
        dev.hot.online_since_device_ms = device_at_ms;
        // A fresh connection: the liveness clock starts again.
        arm_deadline(dev, cfg, at_ms);
        Change {
            registered,
            presence: set_online(dev, book, id, at_ms),
        }
    }

    pub(crate) fn presence_offline(
        &mut self,
        id: &DeviceId,
        at_ms: u64,
        device_at_ms: u64,
        reason: String,
    ) -> Result<Change, StalePresence> {
        if let Some(dev) = self.devices.get(id) {
            let since = dev.hot.online_since_device_ms;
            if dev.record.online && device_at_ms != 0 && device_at_ms < since {
                return Err(StalePresence);
            }
        }
        // Not `seen`: a last will is the broker speaking for a device that went silent.
        let (dev, book, registered) = self.entry(id, at_ms);
        if registered {
            dev.record.offline_reason = Some(reason);
            return Ok(Change {
                registered,
                presence: None,
            });
        }
        Ok(Change {
            registered,
            presence: set_offline(dev, book, id, at_ms, reason),
        })
    }

    pub(crate) fn heartbeat(
        &mut self,
        cfg: &RegistryConfig,
        id: &DeviceId,
        at_ms: u64,
        heartbeat: HeartbeatView,
        versions: Option<VersionsView>,
    ) -> Change {
        let (dev, book, registered) = self.entry(id, at_ms);
        let mut changed = replace(
            &mut dev.record.heartbeat_interval_s,
            Some(heartbeat.interval_s),
        );
        if let Some(versions) = versions {
            changed |= replace(&mut dev.record.versions, versions);
        }
        if changed {
            book.significant(id);
        }
        seen(dev, book, id, at_ms);
        dev.record.last_heartbeat_ms = Some(at_ms);
        dev.hot.last_heartbeat = Some(heartbeat);
        arm_deadline(dev, cfg, at_ms);
        Change {
            registered,
            presence: set_online(dev, book, id, at_ms),
        }
    }

    pub(crate) fn telemetry(
        &mut self,
        cfg: &RegistryConfig,
        id: &DeviceId,
        at_ms: u64,
        sample: TelemetrySample,
    ) -> Change {
        let (dev, book, registered) = self.entry(id, at_ms);
        seen(dev, book, id, at_ms);
        let ring = &mut dev.hot.telemetry;
        while !ring.is_empty() && ring.len() >= cfg.telemetry_history {
            ring.pop_front();
        }
        if cfg.telemetry_history > 0 {
            ring.push_back(sample);
        }
        if !dev.record.online {
            arm_deadline(dev, cfg, at_ms);
        }
        Change {
            registered,
            presence: set_online(dev, book, id, at_ms),
        }
    }

    pub(crate) fn sweep(&mut self, now_ms: u64) -> Vec<(DeviceId, PresenceChange)> {
        let mut changes = Vec::new();
        for (id, dev) in &mut self.devices {
            let expired = dev.hot.deadline_ms.is_some_and(|d| d <= now_ms);
            if dev.record.online && expired {
                let reason = REASON_MISSED_HEARTBEATS.to_owned();
                if let Some(change) = set_offline(dev, &mut self.book, id, now_ms, reason) {
                    changes.push((id.clone(), change));
                }
            }
        }
        changes
    }

    /// The device (registering it, active and offline, if it is new) and the book.
    fn entry(&mut self, id: &DeviceId, at_ms: u64) -> (&mut Device, &mut Book, bool) {
        use std::collections::btree_map::Entry;
        let book = &mut self.book;
        match self.devices.entry(id.clone()) {
            Entry::Occupied(o) => (o.into_mut(), book, false),
            Entry::Vacant(v) => {
                book.significant(id);
                let dev = v.insert(Device {
                    record: DeviceRecord::new(id.as_str(), at_ms),
                    hot: HotState::default(),
                });
                (dev, book, true)
            }
        }
    }
}

/// Sets `*slot` to `value`, returning whether it changed.
fn replace<T: PartialEq>(slot: &mut T, value: T) -> bool {
    if *slot == value {
        return false;
    }
    *slot = value;
    true
}

fn seen(dev: &mut Device, book: &mut Book, id: &DeviceId, at_ms: u64) {
    dev.record.last_seen_ms = dev.record.last_seen_ms.max(at_ms);
    book.touch(id);
}

fn arm_deadline(dev: &mut Device, cfg: &RegistryConfig, at_ms: u64) {
    let interval_s = dev
        .record
        .heartbeat_interval_s
        .unwrap_or(cfg.default_heartbeat_interval_s);
    let grace_ms = u64::from(interval_s)
        .saturating_mul(u64::from(cfg.missed_heartbeats))
        .saturating_mul(1000);
    dev.hot.deadline_ms = Some(at_ms.saturating_add(grace_ms));
}

fn set_online(
    dev: &mut Device,
    book: &mut Book,
    id: &DeviceId,
    at_ms: u64,
) -> Option<PresenceChange> {
    if dev.record.online {
        return None;
    }
    dev.record.online = true;
    dev.record.offline_reason = None;
    dev.record.presence_changed_ms = at_ms;
    book.online += 1;
    book.significant(id);
    Some(PresenceChange {
        online: true,
        reason: None,
        at_ms,
    })
}

fn set_offline(
    dev: &mut Device,
    book: &mut Book,
    id: &DeviceId,
    at_ms: u64,
    reason: String,
) -> Option<PresenceChange> {
    if !dev.record.online {
        return None;
    }
    dev.record.online = false;
    dev.record.offline_reason = Some(reason.clone());
    dev.record.presence_changed_ms = at_ms;
    dev.hot.deadline_ms = None;
    dev.hot.online_since_device_ms = 0;
    book.online = book.online.saturating_sub(1);
    book.significant(id);
    Some(PresenceChange {
        online: false,
        reason: Some(reason),
        at_ms,
    })
}
