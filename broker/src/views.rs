//! JSON shapes of the admin API, shared by the server (`api`) and the client (`posctl`).
//!
//! These are the public contract of `/api/v1`: add optional fields freely; renaming or
//! removing one breaks every script that uses `posctl --output json` or the API.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

mod artifacts;
mod audit;
mod config;
mod enrolment;
pub use artifacts::*;
pub use audit::*;
pub use enrolment::*;
mod rollout;
pub use config::*;
pub use rollout::*;

/// Lifecycle of a device in the registry (docs/architecture.md "Controller").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Pending,
    Active,
    Locked,
    Decommissioned,
    Lost,
    /// Its certificate(s) are revoked; refused at connect. The record stays visible.
    Revoked,
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
    /// Groups the device belongs to (set through the API; configuration layers and
    /// command targets).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub groups: BTreeSet<String>,
    /// Labels (key → value) set through the API; command targets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
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
    /// Configuration version the terminal runs (0: none applied).
    #[serde(default)]
    pub config_version: u64,
    /// Whether the terminal refuses transactions.
    #[serde(default)]
    pub locked: bool,
    /// Generation of the last Lock/Unlock applied (0: none).
    #[serde(default)]
    pub lock_generation: u64,
    /// Transactions refused as conflicts that the terminal keeps as dead letters.
    #[serde(default)]
    pub dead_letters: u32,
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
    /// What the controller wants the device to be (lock, configuration version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<DesiredView>,
    /// What the device last said it is (heartbeat or ReportedState), since the controller
    /// started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<ReportedView>,
}

/// `GET /api/v1/devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceSummary>,
}

/// One stored transaction: `GET /api/v1/transactions` rows and (without line items) the live
/// stream's `transaction` events. Card data is only what terminals may send: BIN + last four
/// (`masked_card`) or a token; never a full PAN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionView {
    /// The terminal that sent it (its certificate identity, never a field of the record).
    pub device: String,
    /// Per-device sequence number assigned by the terminal (1, 2, 3, ...).
    pub seq: u64,
    /// The payment application's transaction id.
    pub txn_id: String,
    /// When the transaction happened, Unix ms (terminal clock). `from`/`to` filter on it.
    pub timestamp_ms: u64,
    /// When the controller received it, Unix ms (controller clock).
    pub received_at_ms: u64,
    /// Amount in minor units of `currency` (cents for EUR).
    pub amount_minor: i64,
    /// ISO 4217 code, e.g. "EUR".
    pub currency: String,
    /// "sale", "refund", "void", "preauth" or "capture".
    pub kind: String,
    /// "approved", "declined" or "error".
    pub status: String,
    /// "chip", "contactless", "swipe", "manual", "wallet" or "unspecified".
    pub entry_mode: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub masked_card: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub card_token: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub card_brand: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub auth_code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub response_code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub merchant_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub store_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operator_id: String,
    /// Line items (left out of live stream events).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<LineItemView>,
}

/// One line item of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItemView {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_minor: i64,
}

/// `GET /api/v1/transactions`: one page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionPage {
    pub transactions: Vec<TransactionView>,
    /// Pass as `cursor=` (with the same filters) for the next page; absent on the last page.
    /// A page may hold fewer than `limit` rows (even none) and still have a next cursor: each
    /// request scans a bounded number of records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// An inclusive range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

/// A record refused because another one already holds its (device, seq).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictView {
    pub seq: u64,
    /// The refused record's transaction id.
    pub txn_id: String,
    /// When the controller received the refused record, Unix ms.
    pub received_at_ms: u64,
}

/// `GET /api/v1/devices/{id}/transactions/summary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionSummary {
    pub device: String,
    /// Transactions stored.
    pub count: u64,
    /// Sum of `amount_minor` of approved transactions (every kind), by currency.
    #[serde(default)]
    pub approved_amount_minor: std::collections::BTreeMap<String, i64>,
    /// Highest sequence number stored (0: none).
    pub last_seq: u64,
    /// Every seq 1..=durable_through_seq is durably stored (what acknowledgements carry).
    pub durable_through_seq: u64,
    /// Missing sequence numbers between `durable_through_seq` and `last_seq`, lowest first.
    #[serde(default)]
    pub gaps: Vec<SeqRange>,
    /// True if `gaps` was cut short (very many records above a gap).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gaps_truncated: bool,
    /// Since when (Unix ms, controller clock) records have waited above a missing seq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap_since_ms: Option<u64>,
    /// Conflicting records refused so far (a different record for a stored (device, seq)).
    pub conflicts: u64,
    /// The most recent conflicts (bounded), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_conflicts: Vec<ConflictView>,
    /// First and last time a transaction was stored, Unix ms (controller clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_received_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_received_ms: Option<u64>,
}

/// What an alert on the live stream is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A terminal sent a different record for a (device, seq) already stored.
    TransactionConflict,
    /// Records have waited above a missing seq for longer than the grace period.
    SequenceGap,
    /// A gap reported earlier has been filled.
    SequenceGapClosed,
    /// A terminal's transaction batch was refused as invalid (its outbox cannot progress).
    InvalidTransactions,
    /// A terminal reports more dead letters (transactions refused as conflicts, kept on the
    /// terminal) than in its previous heartbeat.
    DeadLetters,
    /// A kind this version does not know (sent by a newer controller).
    #[serde(other)]
    Other,
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
    #[serde(other)]
    Other,
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
    /// A transaction was stored durably (and acknowledged to the terminal).
    Transaction {
        device: String,
        /// Boxed: by far the largest variant (the JSON is the same).
        transaction: Box<TransactionView>,
    },
    /// Something needs an operator's attention.
    Alert {
        device: String,
        alert: AlertKind,
        severity: Severity,
        /// The sequence number concerned (conflicting seq, first missing seq).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// What happened, for people.
        message: String,
        at_ms: u64,
    },
    /// A command changed status (or reported progress).
    Command {
        id: String,
        device_id: String,
        kind: String,
        status: CommandState,
        progress_percent: u32,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
    },
    /// A rollout changed state or a wave ended.
    Rollout {
        id: String,
        /// `running`, `soaking`, `paused`, `completed` or `aborted`.
        state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wave: Option<u32>,
        /// What happened, for people.
        message: String,
        at_ms: u64,
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
            | FleetEvent::Telemetry { device, .. }
            | FleetEvent::Transaction { device, .. }
            | FleetEvent::Alert { device, .. }
            | FleetEvent::Command {
                device_id: device, ..
            } => Some(device),
            FleetEvent::Rollout { .. } | FleetEvent::Lagged { .. } => None,
        }
    }

    /// The SSE event name (same as the JSON `type` tag).
    pub fn kind(&self) -> &'static str {
        match self {
            FleetEvent::Presence { .. } => "presence",
            FleetEvent::Heartbeat { .. } => "heartbeat",
            FleetEvent::Telemetry { .. } => "telemetry",
            FleetEvent::Transaction { .. } => "transaction",
            FleetEvent::Alert { .. } => "alert",
            FleetEvent::Command { .. } => "command",
            FleetEvent::Rollout { .. } => "rollout",
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
    /// One message per invalid field (`kind`, `target.devices[2]`, a configuration key, ...),
    /// when the error is about fields of the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldMessage>,
}

/// What is wrong with one field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldMessage {
    /// The field: a request field (`reason`, `target.devices[2]`), a configuration key, or
    /// `(document)` for a whole configuration layer.
    pub key: String,
    /// What is wrong with it (never the value itself).
    pub message: String,
}

/// Status of a command (ADR 0007): `queued` → `delivered` → `in_progress` → one final status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Persisted, not yet acknowledged by the terminal.
    Queued,
    /// The terminal's first result arrived.
    Delivered,
    InProgress,
    Succeeded,
    Failed,
    /// The terminal refused it (`rejection_reason` says why).
    Rejected,
    /// Its validity ended before a final result.
    Expired,
    /// Cancelled through the API, or superseded by a newer configuration push.
    Cancelled,
}

impl CommandState {
    pub const ALL: [CommandState; 8] = [
        CommandState::Queued,
        CommandState::Delivered,
        CommandState::InProgress,
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::Rejected,
        CommandState::Expired,
        CommandState::Cancelled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Delivered => "delivered",
            CommandState::InProgress => "in_progress",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Rejected => "rejected",
            CommandState::Expired => "expired",
            CommandState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }

    /// True for the states that never change again.
    pub fn is_final(self) -> bool {
        self.rank() == 3
    }

    /// Order of the lifecycle: a transition never goes to a lower rank.
    pub fn rank(self) -> u8 {
        match self {
            CommandState::Queued => 0,
            CommandState::Delivered => 1,
            CommandState::InProgress => 2,
            _ => 3,
        }
    }
}

/// What a command does, with its parameters. JSON: `"kind": "lock", "parameters": {...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "parameters", rename_all = "snake_case")]
pub enum CommandBody {
    Lock {
        reason: String,
        generation: u64,
    },
    Unlock {
        reason: String,
        generation: u64,
    },
    ConfigPush {
        version: u64,
        /// The effective configuration (flat object of dotted keys).
        document: serde_json::Map<String, serde_json::Value>,
    },
    Reboot {},
    Wipe {
        force: bool,
    },
    CollectLogs {
        since_ms: u64,
        max_bytes: u32,
    },
    /// Install an artifact (issued by a rollout, never directly through the API).
    SoftwareUpdate {
        artifact_id: String,
        version: String,
        /// Where the terminal downloads it (the device endpoint).
        url: String,
        size_bytes: u64,
        /// SHA-256 of the artifact, lowercase hex.
        sha256: String,
        /// Release signature, base64.
        release_signature: String,
        release_key_id: String,
        /// `payment_app`, `firmware` or `agent`.
        component: String,
        rollout_id: String,
        confirm_timeout_s: u32,
        /// The artifact's `min_version`: the terminal refuses the update (`rejected`,
        /// `below_min_version`) unless its version of `component` is at least this.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_version: Option<String>,
    },
    /// Undo the last update of `component` (issued when a rollout is aborted).
    RollbackUpdate {
        rollout_id: String,
        component: String,
        /// The version the terminal reported before the rollout.
        to_version: String,
    },
}

impl CommandBody {
    /// The `kind` name.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandBody::Lock { .. } => "lock",
            CommandBody::Unlock { .. } => "unlock",
            CommandBody::ConfigPush { .. } => "config_push",
            CommandBody::Reboot {} => "reboot",
            CommandBody::Wipe { .. } => "wipe",
            CommandBody::CollectLogs { .. } => "collect_logs",
            CommandBody::SoftwareUpdate { .. } => "software_update",
            CommandBody::RollbackUpdate { .. } => "rollback_update",
        }
    }
}

/// One status change of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    pub status: CommandState,
    /// Controller clock, Unix ms.
    pub at_ms: u64,
}

/// One command: `GET /api/v1/commands/{id}`, rows of the list, and what `POST` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandView {
    /// Globally unique (32 hex digits); the terminal never runs an id twice.
    pub id: String,
    pub device_id: String,
    #[serde(flatten)]
    pub body: CommandBody,
    pub status: CommandState,
    /// Who asked for it ("admin", or "reconciler" for commands the controller issued itself).
    pub author: String,
    pub created_at_ms: u64,
    /// After this the command is `expired` (and terminals refuse it).
    pub not_after_ms: u64,
    /// Every status it went through, oldest first.
    pub history: Vec<StatusChange>,
    /// How often it was published to the terminal.
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent_at_ms: Option<u64>,
    /// 0-100 while in progress (as the terminal reports it).
    pub progress_percent: u32,
    /// The terminal's (or the controller's) last word about it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Machine-readable outcome data from the terminal.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
    /// For `rejected`: the terminal's reason code (`stale`, `expired`, `bad_signature`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection_reason: Option<String>,
    /// For `collect_logs`: bytes uploaded so far, and whether the upload is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logs_complete: bool,
}

/// `POST /api/v1/commands`: the commands created, one per targeted device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandsCreated {
    pub commands: Vec<CommandView>,
}

/// `GET /api/v1/commands`: one page, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandPage {
    pub items: Vec<CommandView>,
    /// Pass as `cursor=` (with the same filters) for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The lock state the controller wants a device in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredLockView {
    pub locked: bool,
    pub reason: String,
    /// Raised by every lock/unlock request; the terminal applies only newer generations.
    pub generation: u64,
    pub author: String,
    pub changed_at_ms: u64,
}

/// `GET /api/v1/devices/{id}/desired`, and the `desired` section of the device detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredView {
    pub device_id: String,
    /// Absent until the device was first locked or unlocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<DesiredLockView>,
    /// The device's effective configuration version (0: none).
    pub config_version: u64,
}

/// What a device last reported about its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedView {
    /// Controller clock, Unix ms.
    pub at_ms: u64,
    /// "heartbeat" or "state" (a ReportedState message).
    pub source: String,
    pub config_version: u64,
    pub locked: bool,
    pub lock_generation: u64,
    /// Only ReportedState carries it ("offline_lease" for a self-lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_reason: Option<String>,
}

/// `PUT /api/v1/devices/{id}/groups` body and answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupsBody {
    pub groups: BTreeSet<String>,
}

/// `PUT /api/v1/devices/{id}/labels` body and answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelsBody {
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_views_round_trip_with_kind_and_parameters() {
        let view = CommandView {
            id: "c1".into(),
            device_id: "T-1".into(),
            body: CommandBody::Lock {
                reason: "stolen".into(),
                generation: 3,
            },
            status: CommandState::InProgress,
            author: "admin".into(),
            created_at_ms: 1,
            not_after_ms: 2,
            history: vec![StatusChange {
                status: CommandState::Queued,
                at_ms: 1,
            }],
            attempts: 1,
            last_sent_at_ms: Some(1),
            progress_percent: 50,
            message: String::new(),
            details: BTreeMap::new(),
            rejection_reason: None,
            log_bytes: None,
            logs_complete: false,
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["kind"], "lock");
        assert_eq!(json["parameters"]["generation"], 3);
        assert_eq!(json["status"], "in_progress");
        assert_eq!(serde_json::from_value::<CommandView>(json).unwrap(), view);
        let reboot = CommandView {
            body: CommandBody::Reboot {},
            ..view
        };
        let json = serde_json::to_value(&reboot).unwrap();
        assert_eq!(json["kind"], "reboot");
        assert_eq!(serde_json::from_value::<CommandView>(json).unwrap(), reboot);
    }

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

    #[test]
    fn alerts_round_trip_and_unknown_kinds_are_tolerated() {
        let ev = FleetEvent::Alert {
            device: "T-1".into(),
            alert: AlertKind::SequenceGap,
            severity: Severity::Warning,
            seq: Some(4),
            message: "gap".into(),
            at_ms: 9,
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "alert");
        assert_eq!(json["alert"], "sequence_gap");
        assert_eq!(serde_json::from_value::<FleetEvent>(json).unwrap(), ev);
        let newer = serde_json::json!({
            "type": "alert", "device": "T-1", "alert": "tamper_storm",
            "severity": "apocalyptic", "message": "m", "at_ms": 1
        });
        let FleetEvent::Alert {
            alert, severity, ..
        } = serde_json::from_value(newer).unwrap()
        else {
            panic!("not an alert");
        };
        assert_eq!((alert, severity), (AlertKind::Other, Severity::Other));
    }
}
