//! RollbackUpdate (ADR 0008): undo the last update of a component with the `rollback` hook,
//! e.g. when a rollout is aborted.
//!
//! Nothing to do (SUCCEEDED) if the component already reports `to_version`. An update of the
//! terminal that has not started installing is cancelled first (it fails with reason
//! `cancelled`); one that is installing or confirming makes the rollback REJECTED (`refused`):
//! it ends on its own and rolls back itself if it cannot confirm. Otherwise: journal, the hook
//! (`POSFLEET_COMPONENT`, `POSFLEET_VERSION` = `to_version`, `POSFLEET_ROLLOUT_ID`), and on
//! success the component's version = `to_version`, stored durably with the result.

use posfleet_proto::pb;
use posfleet_proto::signing::RejectReason;
use tracing::info;

use super::update::valid_version;
use super::{Executor, hooks, result};
use crate::state::{Changes, Component};

impl Executor {
    pub(super) async fn rollback_update(
        &mut self,
        cmd: &pb::Command,
        bytes: &[u8],
        rb: &pb::RollbackUpdate,
    ) {
        let component = match Component::parse(&rb.component) {
            Some(c) if valid_version(&rb.to_version) => c,
            _ => {
                let r = result::rejected(
                    &cmd.id,
                    RejectReason::Refused,
                    "invalid rollback: component must be payment_app, firmware or agent and to_version 1-64 printable characters",
                );
                self.finish(cmd, r, Changes::durable()).await;
                return;
            }
        };
        if let Some(active) = &self.update {
            if active.cancel_before_install() {
                info!(command_id = %cmd.id, update = %active.command_id, "rollback cancels the update in progress");
            } else {
                let r = result::rejected(
                    &cmd.id,
                    RejectReason::Refused,
                    "an update is being installed; it rolls back by itself if it cannot confirm",
                );
                self.finish(cmd, r, Changes::durable()).await;
                return;
            }
        }
        let current = component.of(&self.live.get().versions).to_owned();
        if current == rb.to_version {
            let r = result::with(
                result::succeeded(&cmd.id, format!("already at {current}; nothing to do")),
                "version",
                &current,
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        let Some(hook) = self.settings.hooks.rollback.clone() else {
            let r = result::with(
                result::failed(&cmd.id, "no rollback hook configured"),
                "reason",
                "no_rollback_hook",
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        };
        let progress = result::in_progress(&cmd.id, "rolling back");
        if !self.begin(cmd, bytes, &progress, Changes::durable()).await {
            return;
        }
        self.publish_result(progress).await;
        let mut env = self.hook_env();
        env.push(("POSFLEET_COMPONENT", component.name().to_owned()));
        env.push(("POSFLEET_VERSION", rb.to_version.clone()));
        env.push(("POSFLEET_ROLLOUT_ID", rb.rollout_id.clone()));
        let run = hooks::run(&hook, &env, self.settings.hooks.timeout, 0).await;
        if !run.succeeded() {
            let r = result::with(
                result::with(
                    result::failed(&cmd.id, format!("the rollback hook {}", run.describe())),
                    "reason",
                    "rollback_failed",
                ),
                "hook_exit",
                run.exit_detail(),
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        let mut installed = self
            .installed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        *installed.slot(component) = Some(rb.to_version.clone());
        let r = result::with(
            result::succeeded(&cmd.id, format!("rolled back to {}", rb.to_version)),
            "version",
            &rb.to_version,
        );
        self.settle(
            &cmd.id,
            cmd.not_after_ms,
            &r,
            Changes::durable().installed(installed.clone()),
        )
        .await;
        *self.installed.lock().unwrap_or_else(|e| e.into_inner()) = installed;
        let version = rb.to_version.clone();
        self.live
            .update(|s| component.set(&mut s.versions, &version));
        self.publish_result(r).await;
    }
}
