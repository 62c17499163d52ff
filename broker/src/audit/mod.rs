//! The tamper-evident audit log (issue 6, PCI DSS 10). This file fixes the interface every
//! subsystem records through; the hash-chained store, verification, export and retention live
//! beside it.
//!
//! # Layout
//!
//! - `mod.rs`: [`AuditSink`] (what handlers record through), [`AuditRecord`], [`Outcome`],
//!   [`NoAudit`].
//! - `entry.rs`: [`AuditEntry`] and its canonical encoding and SHA-256 chain hash.
//! - `store.rs`: [`AuditLog`]: the sled store (`DATA/audit`), one writer, durable appends,
//!   the anchor file (`DATA/audit.anchor`), `verify`, retention pruning, queries, export pages.
//! - `refusals.rs`: [`Refusals`]: repeated refusals counted in memory and written as one
//!   entry per key and window (the log cannot be used to fill the disk).
//!   the anchor file (`DATA/audit.anchor`), retention pruning, queries, export pages;
//!   `store/verify.rs`: `verify`, alone or against an exported anchor, and anchor export.
//! - `encoding.rs`: hashes and checkpoints base64url in the store (no card-like digit runs).
//! - `keyed.rs`: the audit key (`DATA/audit.key` or `--audit-key`), keyed checkpoints on every
//!   entry, and signed anchors (issue 10 item 11).
//! - `tests.rs`: chain, tamper, truncation, reopen, retention and concurrency tests.

mod encoding;
mod entry;
mod keyed;
mod refusals;
mod store;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use entry::AuditEntry;
pub(crate) use entry::outcome_name as outcome_label;
pub use keyed::{ANCHOR_FORMAT, AnchorError, AuditKey, AuditKeyError};
pub use refusals::{Refusals, refusal_count};
pub use store::{
    AuditConfig, AuditLog, AuditQuery, AuditStoreError, DEFAULT_LIMIT, DEFAULT_RETENTION,
    MAX_LIMIT, paths,
};

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Authorised and about to be carried out, written durably before the action; an entry
    /// with the same action and target follows with how it ended (see `api::audit`).
    Requested,
    Success,
    Failure,
    Denied,
}

/// One thing to record. The store adds the time, the sequence number and the hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Who: an account, token or device name ("admin" for the bootstrap token).
    pub actor: String,
    /// From where: the client's IP address, or "local" for the CLI on the controller host.
    pub source: String,
    /// What, as `area.verb`: `auth.login`, `command.create`, `config.set`, `device.revoke`, ...
    pub action: String,
    /// On what: a device id, command id, user name, configuration scope, ...
    pub target: String,
    pub outcome: Outcome,
    /// A short, secret-free detail (never a password, token, key or card number).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Why a record could not be stored.
#[derive(Debug, thiserror::Error)]
#[error("audit log: {0}")]
pub struct AuditError(pub String);

/// Where records go. `record` returns once the record is durable: an action whose record
/// cannot be stored must not be reported as done (DESIGN §7: nothing acknowledged is lost).
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, record: AuditRecord) -> Result<(), AuditError>;
}

/// Records nothing (tests and tools without an audit log).
#[derive(Debug, Default)]
pub struct NoAudit;

impl AuditSink for NoAudit {
    fn record(&self, _record: AuditRecord) -> Result<(), AuditError> {
        Ok(())
    }
}
