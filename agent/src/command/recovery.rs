//! Settling journal entries a restart interrupted (ADR 0007): lock, unlock, config and wipe
//! run again (they are idempotent; a wipe that started is finished, forced); a reboot in
//! progress succeeded (the restart is the reboot); collecting logs failed ("interrupted by
//! restart"). A software update resumes from the phase its entry holds (see [`super::update`]);
//! a RollbackUpdate runs again (its hook restores a version: idempotent). Results go out at the
//! next connect.

use posfleet_proto::pb::{self, command::Body};
use prost::Message;
use tracing::{info, warn};

use super::{Executor, result};
use crate::state::Changes;

impl Executor {
    pub(super) async fn recover(&mut self) {
        for (id, entry) in std::mem::take(&mut self.interrupted) {
            let cmd = match pb::Command::decode(entry.command.as_slice()) {
                Ok(cmd) if cmd.id == id => cmd,
                _ => {
                    warn!(command_id = %id, "an interrupted command cannot be read back; reported as failed");
                    let r = result::failed(&id, "interrupted by restart");
                    self.settle(&id, entry.not_after_ms, &r, Changes::durable())
                        .await;
                    self.publish_result(r).await;
                    continue;
                }
            };
            info!(command_id = %id, kind = super::kind_name(&cmd), "settling a command interrupted by a restart");
            match &cmd.body {
                Some(
                    Body::Lock(_)
                    | Body::Unlock(_)
                    | Body::ConfigPush(_)
                    | Body::Wipe(_)
                    | Body::RollbackUpdate(_),
                ) => {
                    self.execute(&cmd, &entry.command, true).await;
                }
                Some(Body::SoftwareUpdate(_)) => self.resume_update(&cmd, &entry).await,
                Some(Body::Reboot(_)) => {
                    let r = result::succeeded(&id, "the terminal restarted");
                    self.finish(&cmd, r, Changes::durable()).await;
                }
                _ => {
                    let r = result::failed(&id, "interrupted by restart");
                    self.finish(&cmd, r, Changes::durable()).await;
                }
            }
            if self.wiped.is_cancelled() {
                return;
            }
        }
    }
}
