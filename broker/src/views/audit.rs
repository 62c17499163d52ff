//! JSON shapes of `/api/v1/audit`, `/api/v1/approvals` and the custody ledger
//! (`/api/v1/devices/{id}/custody`).

use serde::{Deserialize, Serialize};

pub use crate::audit::AuditEntry;

/// `GET /api/v1/audit`: newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `GET /api/v1/audit/verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerifyView {
    /// True if the chain and the anchor agree everywhere.
    pub ok: bool,
    /// Entries checked and found intact (up to the first bad one).
    pub entries: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// The first entry that was edited, removed, moved or inserted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<u64>,
    /// What is wrong there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Set when the chain was checked against an exported anchor: the anchor's seq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_seq: Option<u64>,
}

/// `GET /api/v1/audit/anchor`: a signed checkpoint of the head of the audit chain, to keep
/// off the controller's host (`posctl audit anchor export`); `POST /api/v1/audit/verify` with
/// it (`posctl audit verify --anchor FILE`) finds a chain rebuilt since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAnchor {
    /// `posfleet-audit-anchor-v1`.
    pub format: String,
    /// The controller installation the audit log belongs to (made with the log).
    pub installation: String,
    /// The newest entry when the anchor was made.
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
    /// Entries from this seq on carry a keyed checkpoint of this key.
    pub keyed_from: u64,
    /// Unix ms.
    pub exported_at_ms: u64,
    /// The audit key's id and public half (SubjectPublicKeyInfo PEM).
    pub key_id: String,
    pub public_key_pem: String,
    /// Ed25519 over all of the above (hex).
    pub signature: String,
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for a second principal.
    Pending,
    /// Approved; `commands` lists what was created.
    Approved,
    Rejected,
    /// Not decided before `expires_at_ms`.
    Expired,
}

impl ApprovalState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }
}

/// A command request that waits for a second principal (`GET /api/v1/approvals`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalView {
    pub id: String,
    /// The command kind (`wipe`, `lock`), or `lost` (a lost report beyond the lock window).
    pub kind: String,
    /// The principal that asked (an account, `token:NAME` or `admin`).
    pub requested_by: String,
    /// Whose request it is: the human account behind `requested_by` (the maker of a token),
    /// or `admin` for the bootstrap token and its tokens. That account cannot decide it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub requested_for: String,
    pub requested_at_ms: u64,
    pub expires_at_ms: u64,
    pub state: ApprovalState,
    /// The terminals the request resolved to when it was made (what is approved).
    pub devices: Vec<String>,
    /// The request body as sent to `POST /api/v1/commands` (for `lost`: to
    /// `POST /api/v1/devices/{id}/lost`).
    pub request: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<u64>,
    /// Ids of the commands created on approval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
}

/// `202` answer of `POST /api/v1/commands` when a second principal must approve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequired {
    pub approval: ApprovalView,
}

/// `GET /api/v1/approvals`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalList {
    pub approvals: Vec<ApprovalView>,
}

/// `POST /api/v1/approvals/{id}/approve`: the approval and the commands it created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalDecided {
    pub approval: ApprovalView,
    #[serde(default)]
    pub commands: Vec<crate::views::CommandView>,
}

/// One entry of a device's custody ledger (`GET /api/v1/devices/{id}/custody`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyEntry {
    pub device_id: String,
    /// 1, 2, 3, ... per device.
    pub seq: u64,
    pub at_ms: u64,
    /// `handover`, `lost` or `found`.
    pub kind: String,
    /// The principal who recorded it.
    pub recorded_by: String,
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub note: String,
    /// The previous entry's signature (zeros for the first).
    pub prev_signature: String,
    /// Hex HMAC-SHA256 by the controller over this entry (see `custody`).
    pub signature: String,
}

/// A device's custody ledger, oldest first, with the signature check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyHistory {
    pub device_id: String,
    /// True if every entry's signature and link verify.
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub entries: Vec<CustodyEntry>,
}

/// `POST /api/v1/devices/{id}/lost` and `/found`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LostFoundView {
    pub device_id: String,
    pub lifecycle: crate::views::Lifecycle,
    /// The lock command issued for a lost device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<crate::views::CommandView>,
    pub custody: CustodyEntry,
}
