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
}
