//! One command's record and its lifecycle rules (ADR 0007): transitions only go forward
//! (`queued` → `delivered` → `in_progress` → one final status), final states never change.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use posfleet_proto::pb;
use serde::{Deserialize, Serialize};

use crate::views::{CommandBody, CommandState, CommandView, DesiredLockView, StatusChange};

/// Version of the stored record format; bump on an incompatible change.
pub(crate) const RECORD_VERSION: u32 = 1;

/// Longest text kept from a terminal's result message, in bytes.
const MAX_MESSAGE_LEN: usize = 512;
/// Most result details kept, and the longest key and value.
const MAX_DETAILS: usize = 32;
const MAX_DETAIL_LEN: usize = 256;

/// What sled holds per command (JSON, keyed by id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredCommand {
    /// [`RECORD_VERSION`].
    pub v: u32,
    pub command: CommandView,
}

/// What sled holds per device with a desired lock state (JSON, keyed by device id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredDesired {
    pub v: u32,
    pub lock: DesiredLockView,
}

/// A refused transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the command is already {0}; final states never change")]
    Final(&'static str),
    #[error("{to} cannot follow {from}")]
    Backwards {
        from: &'static str,
        to: &'static str,
    },
}

/// A new command record in `queued`.
pub(crate) fn new_command(
    id: String,
    device_id: &str,
    body: CommandBody,
    author: &str,
    now_ms: u64,
    not_after_ms: u64,
) -> CommandView {
    let log_bytes = matches!(body, CommandBody::CollectLogs { .. }).then_some(0);
    CommandView {
        id,
        device_id: device_id.to_owned(),
        body,
        status: CommandState::Queued,
        author: author.to_owned(),
        created_at_ms: now_ms,
        not_after_ms,
        history: vec![StatusChange {
            status: CommandState::Queued,
            at_ms: now_ms,
        }],
        attempts: 0,
        last_sent_at_ms: None,
        progress_percent: 0,
        message: String::new(),
        details: BTreeMap::new(),
        rejection_reason: None,
        log_bytes,
        logs_complete: false,
    }
}

/// Moves `cmd` to `to` at `at_ms`. Returns whether anything changed: the same non-final
/// status again is a no-op (a progress update for `in_progress`).
pub(crate) fn transition(
    cmd: &mut CommandView,
    to: CommandState,
    at_ms: u64,
) -> Result<bool, TransitionError> {
    let from = cmd.status;
    if from.is_final() {
        return Err(TransitionError::Final(from.name()));
    }
    if to == from {
        return Ok(false);
    }
    if to.rank() < from.rank() {
        return Err(TransitionError::Backwards {
            from: from.name(),
            to: to.name(),
        });
    }
    cmd.status = to;
    cmd.history.push(StatusChange { status: to, at_ms });
    if to == CommandState::Succeeded {
        cmd.progress_percent = 100;
    }
    Ok(true)
}

/// Applies a terminal's result (already checked to come from the command's device).
/// Returns whether the record changed.
pub(crate) fn apply_result(
    cmd: &mut CommandView,
    result: &pb::CommandResult,
    at_ms: u64,
) -> Result<bool, ResultError> {
    let to = match pb::CommandStatus::try_from(result.status) {
        Ok(pb::CommandStatus::Delivered) => CommandState::Delivered,
        Ok(pb::CommandStatus::InProgress) => CommandState::InProgress,
        Ok(pb::CommandStatus::Succeeded) => CommandState::Succeeded,
        Ok(pb::CommandStatus::Failed) => CommandState::Failed,
        Ok(pb::CommandStatus::Rejected) => CommandState::Rejected,
        Ok(pb::CommandStatus::Expired) => CommandState::Expired,
        Ok(pb::CommandStatus::Unspecified) | Err(_) => return Err(ResultError::BadStatus),
    };
    // The first result of a terminal means it was delivered, whatever it says.
    let mut changed = false;
    if cmd.status == CommandState::Queued && to.rank() > 1 {
        changed |= transition(cmd, CommandState::Delivered, at_ms)?;
    }
    changed |= transition(cmd, to, at_ms)?;
    let progress = result.progress_percent.min(100);
    if to == CommandState::InProgress && progress > cmd.progress_percent {
        cmd.progress_percent = progress;
        changed = true;
    }
    if !result.message.is_empty() {
        cmd.message = clean(&result.message, MAX_MESSAGE_LEN);
        changed = true;
    }
    for (k, v) in result.details.iter().take(MAX_DETAILS) {
        cmd.details
            .insert(clean(k, MAX_DETAIL_LEN), clean(v, MAX_DETAIL_LEN));
        changed = true;
    }
    if to == CommandState::Rejected {
        cmd.rejection_reason = Some(
            result
                .details
                .get("reason")
                .map(|r| clean(r, 64))
                .unwrap_or_else(|| "unspecified".to_owned()),
        );
    }
    Ok(changed)
}

/// Why a result was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ResultError {
    #[error("result status is not a known command status")]
    BadStatus,
    #[error(transparent)]
    Transition(#[from] TransitionError),
}

impl ResultError {
    /// The metric label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            ResultError::BadStatus => "bad_status",
            ResultError::Transition(TransitionError::Final(_)) => "final",
            ResultError::Transition(TransitionError::Backwards { .. }) => "backwards",
        }
    }
}

/// Text from a terminal, bounded and free of control characters (it reaches admins'
/// terminals through posctl).
fn clean(s: &str, max: usize) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// The wire command for a record.
pub(crate) fn to_wire(cmd: &CommandView) -> pb::Command {
    use pb::command::Body;
    let body = match &cmd.body {
        CommandBody::Lock { reason, generation } => Body::Lock(pb::Lock {
            reason: reason.clone(),
            generation: *generation,
        }),
        CommandBody::Unlock { reason, generation } => Body::Unlock(pb::Unlock {
            reason: reason.clone(),
            generation: *generation,
        }),
        CommandBody::ConfigPush { version, document } => Body::ConfigPush(pb::ConfigPush {
            version: *version,
            document_json: serde_json::Value::Object(document.clone()).to_string(),
        }),
        CommandBody::Reboot {} => Body::Reboot(pb::Reboot {}),
        CommandBody::Wipe { force } => Body::Wipe(pb::Wipe { force: *force }),
        CommandBody::CollectLogs {
            since_ms,
            max_bytes,
        } => Body::CollectLogs(pb::CollectLogs {
            since_ms: *since_ms,
            max_bytes: *max_bytes,
        }),
        CommandBody::SoftwareUpdate {
            artifact_id,
            version,
            url,
            size_bytes,
            sha256,
            release_signature,
            release_key_id,
            component,
            rollout_id,
            confirm_timeout_s,
            min_version,
        } => Body::SoftwareUpdate(pb::SoftwareUpdate {
            artifact_id: artifact_id.clone(),
            version: version.clone(),
            url: url.clone(),
            size_bytes: *size_bytes,
            // Both are written by the rollout engine from the catalog and are valid; a
            // damaged record sends empty bytes, which the terminal refuses (`tampered`).
            sha256: hex::decode(sha256).unwrap_or_default(),
            release_signature: BASE64
                .decode(release_signature.as_bytes())
                .unwrap_or_default(),
            release_key_id: release_key_id.clone(),
            component: component.clone(),
            rollout_id: rollout_id.clone(),
            confirm_timeout_s: *confirm_timeout_s,
            min_version: min_version.clone().unwrap_or_default(),
        }),
        CommandBody::RollbackUpdate {
            rollout_id,
            component,
            to_version,
        } => Body::RollbackUpdate(pb::RollbackUpdate {
            rollout_id: rollout_id.clone(),
            component: component.clone(),
            to_version: to_version.clone(),
        }),
    };
    pb::Command {
        id: cmd.id.clone(),
        target_device: cmd.device_id.clone(),
        issued_at_ms: cmd.created_at_ms,
        not_after_ms: cmd.not_after_ms,
        body: Some(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reboot() -> CommandView {
        new_command("c1".into(), "T-1", CommandBody::Reboot {}, "admin", 10, 100)
    }

    fn result(status: pb::CommandStatus, progress: u32) -> pb::CommandResult {
        pb::CommandResult {
            command_id: "c1".into(),
            status: status as i32,
            at_ms: 0,
            progress_percent: progress,
            message: String::new(),
            details: Default::default(),
        }
    }

    #[test]
    fn the_lifecycle_only_moves_forward_and_final_states_stick() {
        let mut c = reboot();
        assert_eq!(transition(&mut c, CommandState::Delivered, 11), Ok(true));
        assert_eq!(transition(&mut c, CommandState::Delivered, 12), Ok(false));
        assert_eq!(transition(&mut c, CommandState::InProgress, 13), Ok(true));
        assert!(matches!(
            transition(&mut c, CommandState::Queued, 14),
            Err(TransitionError::Backwards { .. })
        ));
        assert!(matches!(
            transition(&mut c, CommandState::Delivered, 14),
            Err(TransitionError::Backwards { .. })
        ));
        assert_eq!(transition(&mut c, CommandState::Failed, 15), Ok(true));
        for to in CommandState::ALL {
            assert_eq!(
                transition(&mut c, to, 16),
                Err(TransitionError::Final("failed"))
            );
        }
        let statuses: Vec<_> = c.history.iter().map(|h| h.status).collect();
        assert_eq!(
            statuses,
            [
                CommandState::Queued,
                CommandState::Delivered,
                CommandState::InProgress,
                CommandState::Failed
            ]
        );
    }

    #[test]
    fn results_imply_delivery_record_progress_and_rejection_reasons() {
        let mut c = reboot();
        apply_result(&mut c, &result(pb::CommandStatus::InProgress, 40), 11).unwrap();
        assert_eq!(c.status, CommandState::InProgress);
        assert_eq!(c.history.len(), 3);
        assert_eq!(c.progress_percent, 40);
        // Progress never goes back; a repeated in_progress only updates it.
        apply_result(&mut c, &result(pb::CommandStatus::InProgress, 20), 12).unwrap();
        assert_eq!(c.progress_percent, 40);
        let mut rejected = result(pb::CommandStatus::Rejected, 0);
        rejected.details.insert("reason".into(), "stale".into());
        rejected.message = "generation\u{1b}[31m 2 <= 3".into();
        apply_result(&mut c, &rejected, 13).unwrap();
        assert_eq!(c.status, CommandState::Rejected);
        assert_eq!(c.rejection_reason.as_deref(), Some("stale"));
        assert!(!c.message.contains('\u{1b}'));
        let again = apply_result(&mut c, &result(pb::CommandStatus::Succeeded, 0), 14);
        assert_eq!(again.unwrap_err().reason(), "final");
        assert_eq!(
            apply_result(&mut reboot(), &result(pb::CommandStatus::Unspecified, 0), 1),
            Err(ResultError::BadStatus)
        );
    }
}
