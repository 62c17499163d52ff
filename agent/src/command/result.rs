//! `CommandResult` builders: one place that decides what each outcome looks like.

use std::collections::HashMap;

use posfleet_proto::now_ms;
use posfleet_proto::pb::{CommandResult, CommandStatus};
use posfleet_proto::signing::RejectReason;

fn result(id: &str, status: CommandStatus, message: impl Into<String>) -> CommandResult {
    CommandResult {
        command_id: id.to_owned(),
        status: status.into(),
        at_ms: now_ms(),
        progress_percent: 0,
        message: message.into(),
        details: HashMap::new(),
    }
}

/// REJECTED with `details.reason` = the reason's code.
pub(crate) fn rejected(
    id: &str,
    reason: RejectReason,
    message: impl Into<String>,
) -> CommandResult {
    let mut r = result(id, CommandStatus::Rejected, message);
    r.details.insert("reason".into(), reason.code().into());
    r
}

pub(crate) fn in_progress(id: &str, message: impl Into<String>) -> CommandResult {
    result(id, CommandStatus::InProgress, message)
}

pub(crate) fn succeeded(id: &str, message: impl Into<String>) -> CommandResult {
    let mut r = result(id, CommandStatus::Succeeded, message);
    r.progress_percent = 100;
    r
}

pub(crate) fn failed(id: &str, message: impl Into<String>) -> CommandResult {
    result(id, CommandStatus::Failed, message)
}

/// Adds a detail.
pub(crate) fn with(mut r: CommandResult, key: &str, value: impl ToString) -> CommandResult {
    r.details.insert(key.to_owned(), value.to_string());
    r
}

/// For people: what a verification failure means.
pub(crate) fn describe(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::Malformed => "the command could not be read (malformed bytes or id)",
        RejectReason::UnknownKey => "signed by a key this terminal does not trust",
        RejectReason::BadSignature => "the signature does not verify",
        RejectReason::WrongDevice => "addressed to another terminal",
        RejectReason::Expired => "the command expired before it arrived",
        RejectReason::NotYetValid => "issued in the future (check the clocks)",
        RejectReason::UnknownKind => "a kind of command this agent does not know",
        RejectReason::Replayed => "already executed",
        RejectReason::Stale => "superseded by a newer state",
        RejectReason::Refused => "refused by the terminal",
    }
}
