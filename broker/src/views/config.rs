//! JSON shapes of `/api/v1/config/...` and `/api/v1/devices/{id}/config` (fleet configuration).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One row of `GET /api/v1/config/layers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigLayerSummary {
    /// `fleet`, `group/<name>` or `device/<id>`.
    pub scope: String,
    /// Version of the layer's last change.
    pub version: u64,
    /// Number of keys in the layer.
    pub keys: usize,
    /// Time of the last change, Unix ms (controller clock).
    pub changed_at_ms: u64,
    /// Who made the last change.
    pub author: String,
}

/// `GET /api/v1/config/layers`: every existing layer (deleted ones are not listed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigLayerList {
    /// The fleet-wide version counter: the version of the latest change of any layer.
    pub version: u64,
    pub layers: Vec<ConfigLayerSummary>,
}

/// One layer: `GET`, `PATCH`, `PUT` and `DELETE` of `/api/v1/config/{fleet,groups/..,devices/..}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigLayerView {
    pub scope: String,
    /// Version of the layer's last change (0: the fleet layer was never set).
    pub version: u64,
    /// Flat object of dotted keys to scalars.
    pub document: Map<String, Value>,
    /// Who made the last change (empty if never changed).
    pub author: String,
    /// Time of the last change, Unix ms (0 if never changed).
    pub changed_at_ms: u64,
    /// True in the answer to `DELETE`: the layer is gone, `version` is its deletion.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// One key's change: `old` and `new` are `null` when the key was absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigKeyChange {
    pub key: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// What kind of change a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigChangeKind {
    /// Keys set and/or removed (`PATCH`).
    Set,
    /// The whole document replaced (`PUT`).
    Replace,
    /// The layer deleted (a tombstone: its version still counts for effective versions).
    Delete,
    /// The device's group membership changed; the document did not.
    Membership,
}

/// One committed change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigHistoryEntry {
    pub version: u64,
    pub scope: String,
    pub kind: ConfigChangeKind,
    pub author: String,
    /// Unix ms (controller clock).
    pub at_ms: u64,
    #[serde(default)]
    pub comment: String,
    /// Key-level changes, sorted by key.
    pub diff: Vec<ConfigKeyChange>,
}

/// `GET /api/v1/config/history`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigHistoryPage {
    pub entries: Vec<ConfigHistoryEntry>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
}

/// One key's change between two versions, with the layer it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigScopedChange {
    pub scope: String,
    pub key: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// `GET /api/v1/config/diff`: how layers differ between version `from` and version `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigDiffView {
    pub from: u64,
    pub to: u64,
    /// The layer asked for; absent: every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Keys whose value at `to` differs from their value at `from`, by scope then key.
    pub changes: Vec<ConfigScopedChange>,
}

/// `GET /api/v1/devices/{id}/config`: the effective configuration of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EffectiveConfigView {
    pub device: String,
    /// The highest version among the layers that apply (0: none ever set).
    pub version: u64,
    /// The groups used (the registry's groups of the device), in precedence order.
    pub groups: Vec<String>,
    pub document: Map<String, Value>,
    /// For each key, the scope of the layer its value comes from.
    pub sources: BTreeMap<String, String>,
}

/// One built-in key of `GET /api/v1/config/schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigKeyView {
    pub key: String,
    /// `integer`, `boolean` or `string`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The range or pattern, in words.
    pub rule: String,
    pub description: String,
}

/// `GET /api/v1/config/schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigSchemaView {
    pub keys: Vec<ConfigKeyView>,
    /// Keys under this prefix take any scalar.
    pub custom_prefix: String,
    pub max_custom_string_chars: usize,
    pub max_key_len: usize,
    pub max_keys: usize,
    pub max_document_bytes: usize,
}
