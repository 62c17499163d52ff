//! Wipe: removes the terminal's configuration, transactions, state and identity, then stops
//! the agent (ADR 0007, DESIGN §4).
//!
//! Refused (`REJECTED`, reason `refused`) while the outbox holds transactions the controller
//! has not acknowledged, unless `force`. Otherwise, in order: journal (durable) → optional
//! `wipe` hook → the config file, the terminal's outbox records and its state (all but the
//! wipe's journal entry) go → locked with reason `wiped` → the final result is published and
//! the broker's ack awaited (bounded) → the device key and certificate files are deleted →
//! the agent stops (a real agent exits; a simulated terminal stays disconnected). New
//! transactions are refused from the moment the wipe starts, so none can slip in between the
//! outbox check and the purge. A restart in the middle re-runs the wipe (forced: the decision
//! was made); a restart after its result finishes the identity removal.

use std::time::Duration;

use posfleet_proto::pb;
use posfleet_proto::signing::RejectReason;
use tracing::{info, warn};

use super::config_push::remove_file_durably;
use super::{Executor, REASON_WIPED, hooks, result};
use crate::state::{Changes, LockRecord};

/// How long the final result may take to be acknowledged before the identity goes.
const ACK_WAIT: Duration = Duration::from_secs(5);

impl Executor {
    pub(super) async fn wipe(&mut self, cmd: &pb::Command, bytes: &[u8], force: bool) {
        // Refuse transactions first (the intake checks the live lock).
        let before = self.lock.clone();
        self.live.update(|s| {
            s.locked = true;
            s.lock_reason = REASON_WIPED.to_owned();
        });
        let depth = self.outbox.depth();
        if depth > 0 && !force {
            self.set_lock(before);
            let r = result::rejected(
                &cmd.id,
                RejectReason::Refused,
                format!(
                    "{depth} transaction(s) have not been delivered to the controller yet; \
                     wipe once they are, or force the wipe to lose them"
                ),
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        let progress = result::in_progress(&cmd.id, "wiping");
        if !self.begin(cmd, bytes, &progress, Changes::durable()).await {
            self.set_lock(before);
            return;
        }
        warn!(force, unsent = depth, "wiping the terminal");
        self.publish_result(progress).await;

        let mut r = result::succeeded(&cmd.id, "terminal wiped; the agent stops");
        if let Some(hook) = self.settings.hooks.wipe.clone() {
            let run = hooks::run(&hook, &self.hook_env(), self.settings.hooks.timeout, 0).await;
            if !run.succeeded() {
                warn!(outcome = %run.describe(), "wipe hook failed; the agent's own data is wiped anyway");
                r = result::with(
                    result::failed(
                        &cmd.id,
                        format!(
                            "the wipe hook {}; the agent's own data was wiped and it stops",
                            run.describe()
                        ),
                    ),
                    "hook_exit",
                    run.exit_detail(),
                );
            }
        }
        if let Err(e) = run_blocking_remove(self.files.config.clone()).await {
            warn!(error = %e, "cannot remove the configuration file");
        }
        match self.outbox.purge().await {
            Ok(removed) => info!(removed, "outbox records removed"),
            Err(e) => warn!(error = %e, "cannot remove the outbox records"),
        }
        let wiped = LockRecord {
            locked: true,
            reason: REASON_WIPED.to_owned(),
            generation: before.generation,
            by_lease: false,
        };
        let changes = Changes::durable().clear_except(&cmd.id).lock(wiped.clone());
        self.settle(&cmd.id, cmd.not_after_ms, &r, changes).await;
        self.set_lock(wiped);
        self.set_config(Default::default());
        self.publish_result(r).await;
        // A wipe re-run at start may not be connected yet: give the result a chance to go
        // out before the identity does (the controller otherwise sees the command expire).
        let mut connected = self.mqtt.connected();
        let _ = tokio::time::timeout(ACK_WAIT, connected.wait_for(|c| *c)).await;
        self.publish_unsent().await;
        if self.mqtt.is_connected() && self.mqtt.flush(ACK_WAIT).await.is_err() {
            warn!("the wipe's result was not acknowledged in time");
        }
        self.finish_wipe().await;
    }

    /// Deletes the identity files and stops the agent.
    pub(super) async fn finish_wipe(&mut self) {
        for path in self.files.identity.clone() {
            if let Err(e) = run_blocking_remove(path.clone()).await {
                warn!(error = %e, path = %path.display(), "cannot delete an identity file");
            }
        }
        info!("terminal wiped; stopping");
        self.wiped.cancel();
        self.stop.cancel();
    }
}

async fn run_blocking_remove(path: std::path::PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || remove_file_durably(&path))
        .await
        .map_err(std::io::Error::other)?
}
