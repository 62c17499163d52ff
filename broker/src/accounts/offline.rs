//! What `posfleet-broker admin create|unlock|reset-mfa` do on a stopped controller's data
//! directory (the account store is locked while the server runs), and the audit entries they
//! leave: each is queued in the account store and appended to the audit log at the next start
//! ([`Accounts::drain_pending_audit`]), so nothing done offline escapes the log.

use super::error::AccountError;
use super::service::Accounts;
use crate::audit::{AuditRecord, Outcome};

/// The actor of offline changes.
pub const OFFLINE_ACTOR: &str = "posfleet-broker admin";

impl Accounts {
    /// Queues an audit record of an offline change to `target`.
    pub fn record_offline(
        &self,
        action: &str,
        target: &str,
        detail: String,
    ) -> Result<(), AccountError> {
        self.store.add_pending_audit(&AuditRecord {
            actor: OFFLINE_ACTOR.to_owned(),
            source: "local".to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: Outcome::Success,
            detail,
        })?;
        Ok(())
    }

    /// Lifts every lockout of `name`: from all sources and the account-wide one (and restarts
    /// its inactivity period, as an admin's enable does). Audited at the next start.
    pub fn unlock_offline(&self, name: &str) -> Result<(), AccountError> {
        let now = self.now();
        let (sources, account) = {
            let _write = self.write_lock();
            let mut user = self
                .store
                .user(name)?
                .ok_or_else(|| AccountError::UnknownUser(super::printable(name)))?;
            let account = user.locked_until_ms > now;
            user.locked_until_ms = 0;
            user.failed_attempts = 0;
            user.active_since_ms = now;
            self.store.put_user(&user)?;
            (self.store.clear_source_lockouts(name)?, account)
        };
        self.throttle.unlock(name);
        self.record_offline(
            "user.unlock",
            name,
            format!(
                "lockouts lifted: {sources} source(s){}",
                if account {
                    " and the account-wide one"
                } else {
                    ""
                }
            ),
        )
    }

    /// Removes `name`'s authenticator and requires a new enrolment at the next login (the
    /// password stays; the session is restricted to the MFA enrolment until it is done).
    /// Audited at the next start.
    pub fn reset_mfa_offline(&self, name: &str) -> Result<(), AccountError> {
        {
            let _write = self.write_lock();
            let mut user = self
                .store
                .user(name)?
                .ok_or_else(|| AccountError::UnknownUser(super::printable(name)))?;
            user.totp = None;
            user.mfa_reenrol = true;
            self.store.put_user(&user)?;
        }
        self.end_sessions(name);
        self.record_offline(
            "user.reset_mfa",
            name,
            "authenticator removed; MFA enrolment required at the next login".into(),
        )
    }

    /// Appends every queued offline record with `append`, oldest first, removing each once
    /// appended (a crash in between appends it again at the next start: never lost). Returns
    /// how many were appended.
    pub fn drain_pending_audit<E: std::fmt::Display>(
        &self,
        mut append: impl FnMut(AuditRecord) -> Result<(), E>,
    ) -> Result<usize, String> {
        let pending = self.store.pending_audit().map_err(|e| e.to_string())?;
        let n = pending.len();
        for (seq, record) in pending {
            append(record).map_err(|e| e.to_string())?;
            self.store
                .remove_pending_audit(seq)
                .map_err(|e| e.to_string())?;
        }
        Ok(n)
    }
}
