//! JSON shapes of the admin API, shared by the server (`api`) and the client (`posctl`).
//!
//! These are the public contract of `/api/v1`: add optional fields freely; renaming or
//! removing one breaks every script that uses `posctl --output json` or the API.

use serde::{Deserialize, Serialize};

/// Lifecycle of a device in the registry (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Pending,
    Active,
    Locked,
    Decommissioned,
    Lost,
}

/// Software versions a device reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionsView {
    pub agent: String,
    pub firmware: String,
    pub payment_app: String,
}

/// One row of `GET /api/v1/devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSummary {
    pub id: String,
    pub lifecycle: Lifecycle,
    pub online: bool,
    /// Why the device went offline ("shutdown", "connection_lost", "missed_heartbeats").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_reason: Option<String>,
    /// When the device was first seen (registered), Unix ms.
    pub first_seen_ms: u64,
    /// Last message of any kind from the device, Unix ms (controller clock).
    pub last_seen_ms: u64,
    /// Last presence change, Unix ms (controller clock).
    pub presence_changed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_ms: Option<u64>,
    #[serde(default)]
    pub versions: VersionsView,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub serial: String,
}

/// The last heartbeat of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatView {
    pub seq: u64,
    /// Device clock, Unix ms.
    pub sent_at_ms: u64,
    /// Controller clock, Unix ms.
    pub received_at_ms: u64,
    pub interval_s: u32,
    pub uptime_s: u64,
    pub outbox_depth: u32,
    pub boot_id: u64,
}

/// One telemetry sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryView {
    /// Device clock, Unix ms.
    pub sent_at_ms: u64,
    /// Controller clock, Unix ms.
    pub received_at_ms: u64,
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub uptime_s: u64,
    pub load_average_1m: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_percent: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charging: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f32>,
    /// "ethernet", "wifi", "cellular_3g", "cellular_4g", "cellular_5g" or "unknown".
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_dbm: Option<i32>,
    /// "ok", "low", "out", "no_printer" or "unknown".
    pub paper: String,
    /// "ok", "degraded", "fault" or "unknown".
    pub card_reader: String,
    pub tamper: bool,
    pub dropped_samples: u32,
}

/// `GET /api/v1/devices/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub summary: DeviceSummary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<HeartbeatView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_telemetry: Option<TelemetryView>,
    /// Recent samples, oldest first (bounded per device).
    #[serde(default)]
    pub telemetry_history: Vec<TelemetryView>,
}

/// `GET /api/v1/devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceSummary>,
}

/// One event of the live stream (`GET /api/v1/stream`): the SSE `event:` field is the
/// `type` tag, the `data:` field is this value as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FleetEvent {
    Presence {
        device: String,
        online: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        at_ms: u64,
    },
    Heartbeat {
        device: String,
        heartbeat: HeartbeatView,
    },
    Telemetry {
        device: String,
        telemetry: TelemetryView,
    },
    /// The subscriber fell behind and `missed` events were skipped.
    Lagged { missed: u64 },
}

impl FleetEvent {
    /// The device the event is about (`None` for stream control events).
    pub fn device(&self) -> Option<&str> {
        match self {
            FleetEvent::Presence { device, .. }
            | FleetEvent::Heartbeat { device, .. }
            | FleetEvent::Telemetry { device, .. } => Some(device),
            FleetEvent::Lagged { .. } => None,
        }
    }

    /// The SSE event name (same as the JSON `type` tag).
    pub fn kind(&self) -> &'static str {
        match self {
            FleetEvent::Presence { .. } => "presence",
            FleetEvent::Heartbeat { .. } => "heartbeat",
            FleetEvent::Telemetry { .. } => "telemetry",
            FleetEvent::Lagged { .. } => "lagged",
        }
    }
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// What to do next, when there is something to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_tag_matches_kind() {
        let ev = FleetEvent::Presence {
            device: "T-1".into(),
            online: true,
            reason: None,
            at_ms: 5,
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], ev.kind());
        assert_eq!(ev.device(), Some("T-1"));
        let back: FleetEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, ev);
    }
}
