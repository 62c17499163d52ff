//! Journal writes around a command and result publishing (see the module docs of
//! [`crate::command`]).

use posfleet_proto::pb;
use prost::Message;
use tracing::{debug, error};

use super::{Executor, MAX_UNSENT};
use crate::state::{self, Changes, JournalEntry, JournalStatus};

impl Executor {
    /// Journals `cmd` as in progress together with `changes`, durably, before it acts.
    /// Returns false (after logging) if that failed: the command must not act.
    pub(super) async fn begin(
        &mut self,
        cmd: &pb::Command,
        bytes: &[u8],
        progress: &pb::CommandResult,
        changes: Changes,
    ) -> bool {
        let entry = JournalEntry {
            status: JournalStatus::InProgress,
            not_after_ms: cmd.not_after_ms,
            command: bytes.to_vec(),
            result: progress.encode_to_vec(),
        };
        let id = cmd.id.clone();
        let written =
            state::blocking(&self.state, move |s| s.apply(changes.journal(&id, entry))).await;
        if let Err(e) = written {
            error!(error = %e, command_id = %cmd.id, "cannot journal the command; not run");
            return false;
        }
        true
    }

    /// Stores the final result with `changes`, durably.
    pub(super) async fn settle(
        &mut self,
        cmd_id: &str,
        not_after_ms: u64,
        r: &pb::CommandResult,
        changes: Changes,
    ) {
        let entry = JournalEntry {
            status: JournalStatus::Final,
            not_after_ms,
            command: Vec::new(),
            result: r.encode_to_vec(),
        };
        let id = cmd_id.to_owned();
        if let Err(e) =
            state::blocking(&self.state, move |s| s.apply(changes.journal(&id, entry))).await
        {
            // The outcome is still reported; a re-delivery may run the command again.
            error!(error = %e, command_id = %cmd_id, "cannot store the command's result");
        }
    }

    /// [`Self::settle`], then publish.
    pub(super) async fn finish(
        &mut self,
        cmd: &pb::Command,
        r: pb::CommandResult,
        changes: Changes,
    ) {
        self.settle(&cmd.id, cmd.not_after_ms, &r, changes).await;
        self.publish_result(r).await;
    }

    /// Publishes a result now, or keeps a final one for the next connect.
    pub(super) async fn publish_result(&mut self, r: pb::CommandResult) {
        let progress = r.status() == pb::CommandStatus::InProgress;
        if !self.mqtt.is_connected() {
            if !progress {
                if self.unsent.len() >= MAX_UNSENT {
                    self.unsent.remove(0);
                }
                self.unsent.push(r);
            }
            return;
        }
        debug!(command_id = %r.command_id, status = ?r.status(), "command result");
        if !crate::agent::publish(&self.mqtt, &self.id, &r).await && !progress {
            self.unsent.push(r);
        }
    }

    pub(super) async fn publish_unsent(&mut self) {
        for r in std::mem::take(&mut self.unsent) {
            self.publish_result(r).await;
        }
    }

    /// Publishes a stored (encoded) result again.
    pub(super) async fn publish_stored(&mut self, encoded: &[u8]) {
        match pb::CommandResult::decode(encoded) {
            Ok(r) => self.publish_result(r).await,
            Err(e) => error!(error = %e, "a stored command result does not decode"),
        }
    }
}
