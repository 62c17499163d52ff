//! One device as the registry holds it: the persisted [`DeviceRecord`] plus hot, in-memory
//! state ([`HotState`]: last heartbeat, telemetry ring, liveness deadline), and the
//! conversions to the API's views.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::views::{
    DeviceDetail, DeviceSummary, HeartbeatView, Lifecycle, ReportedView, TelemetryView,
    VersionsView,
};

/// Version of the stored record format; bump on an incompatible change.
pub(crate) const RECORD_VERSION: u32 = 1;

/// What sled holds for a device (JSON, keyed by the device id).
///
/// `last_seen_ms` and `last_heartbeat_ms` change with every message; they are written along
/// with the next significant change, periodically, and at shutdown, but a crash may lose their
/// latest values (never a registration or presence transition that `flush` reported durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeviceRecord {
    /// Record format version ([`RECORD_VERSION`]).
    pub v: u32,
    /// The device id again, so a record can be checked against its key.
    pub id: String,
    pub lifecycle: Lifecycle,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub online: bool,
    #[serde(default)]
    pub offline_reason: Option<String>,
    pub presence_changed_ms: u64,
    #[serde(default)]
    pub last_heartbeat_ms: Option<u64>,
    /// Interval the device last promised, so its liveness deadline is right after a restart.
    #[serde(default)]
    pub heartbeat_interval_s: Option<u32>,
    #[serde(default)]
    pub versions: VersionsView,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub serial: String,
    /// Groups set through the API (configuration layers, command targets).
    #[serde(default)]
    pub groups: BTreeSet<String>,
    /// Labels set through the API (command targets).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl DeviceRecord {
    /// A device seen for the first time at `at_ms`: active, offline until the caller says
    /// otherwise.
    pub(crate) fn new(id: &str, at_ms: u64) -> Self {
        Self {
            v: RECORD_VERSION,
            id: id.to_owned(),
            lifecycle: Lifecycle::Active,
            first_seen_ms: at_ms,
            last_seen_ms: at_ms,
            online: false,
            offline_reason: None,
            presence_changed_ms: at_ms,
            last_heartbeat_ms: None,
            heartbeat_interval_s: None,
            versions: VersionsView::default(),
            model: String::new(),
            serial: String::new(),
            groups: BTreeSet::new(),
            labels: BTreeMap::new(),
        }
    }
}

/// One telemetry sample, stored compactly (enums as static strings, no allocation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TelemetrySample {
    pub sent_at_ms: u64,
    pub received_at_ms: u64,
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub uptime_s: u64,
    pub load_average_1m: f32,
    pub battery_percent: Option<f32>,
    pub charging: Option<bool>,
    pub temperature_c: Option<f32>,
    pub network: &'static str,
    pub signal_dbm: Option<i32>,
    pub paper: &'static str,
    pub card_reader: &'static str,
    pub tamper: bool,
    pub dropped_samples: u32,
}

impl TelemetrySample {
    pub(crate) fn view(&self) -> TelemetryView {
        TelemetryView {
            sent_at_ms: self.sent_at_ms,
            received_at_ms: self.received_at_ms,
            cpu_percent: self.cpu_percent,
            memory_used_bytes: self.memory_used_bytes,
            memory_total_bytes: self.memory_total_bytes,
            disk_used_bytes: self.disk_used_bytes,
            disk_total_bytes: self.disk_total_bytes,
            uptime_s: self.uptime_s,
            load_average_1m: self.load_average_1m,
            battery_percent: self.battery_percent,
            charging: self.charging,
            temperature_c: self.temperature_c,
            network: self.network.to_owned(),
            signal_dbm: self.signal_dbm,
            paper: self.paper.to_owned(),
            card_reader: self.card_reader.to_owned(),
            tamper: self.tamper,
            dropped_samples: self.dropped_samples,
        }
    }
}

/// State kept only in memory (lost on restart by design).
#[derive(Debug, Clone, Default)]
pub(crate) struct HotState {
    pub last_heartbeat: Option<HeartbeatView>,
    /// Recent samples, oldest first, at most the registry's configured history length.
    pub telemetry: VecDeque<TelemetrySample>,
    /// When an online device is declared offline for missed heartbeats (controller clock).
    pub deadline_ms: Option<u64>,
    /// Device clock of the ONLINE presence that made the device online; an OFFLINE presence
    /// stamped earlier is a stale last will from a previous connection.
    pub online_since_device_ms: u64,
    /// What the device last said about its lock and configuration.
    pub reported: Option<ReportedView>,
}

/// A device in the registry.
#[derive(Debug, Clone)]
pub(crate) struct Device {
    pub record: DeviceRecord,
    pub hot: HotState,
}

impl Device {
    pub(crate) fn summary(&self) -> DeviceSummary {
        let r = &self.record;
        DeviceSummary {
            id: r.id.clone(),
            lifecycle: r.lifecycle,
            online: r.online,
            offline_reason: if r.online {
                None
            } else {
                r.offline_reason.clone()
            },
            first_seen_ms: r.first_seen_ms,
            last_seen_ms: r.last_seen_ms,
            presence_changed_ms: r.presence_changed_ms,
            last_heartbeat_ms: r.last_heartbeat_ms,
            versions: r.versions.clone(),
            model: r.model.clone(),
            serial: r.serial.clone(),
            groups: r.groups.clone(),
            labels: r.labels.clone(),
        }
    }

    pub(crate) fn detail(&self) -> DeviceDetail {
        DeviceDetail {
            summary: self.summary(),
            last_heartbeat: self.hot.last_heartbeat.clone(),
            latest_telemetry: self.hot.telemetry.back().map(TelemetrySample::view),
            telemetry_history: self
                .hot
                .telemetry
                .iter()
                .map(TelemetrySample::view)
                .collect(),
            desired: None,
            reported: self.hot.reported.clone(),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::TelemetrySample;

    /// A plausible sample for tests.
    pub(crate) fn sample(sent_at_ms: u64, received_at_ms: u64) -> TelemetrySample {
        TelemetrySample {
            sent_at_ms,
            received_at_ms,
            cpu_percent: 12.5,
            memory_used_bytes: 1 << 20,
            memory_total_bytes: 1 << 30,
            disk_used_bytes: 1 << 24,
            disk_total_bytes: 1 << 32,
            uptime_s: 60,
            load_average_1m: 0.5,
            battery_percent: Some(80.0),
            charging: Some(true),
            temperature_c: None,
            network: "wifi",
            signal_dbm: Some(-60),
            paper: "ok",
            card_reader: "ok",
            tamper: false,
            dropped_samples: 0,
        }
    }
}
