//! Reboot, through the `reboot` hook (e.g. `systemctl reboot`).
//!
//! Journal (durable) and an `IN_PROGRESS` result first; without a hook the result is `FAILED`.
//! A hook that exits 0 while this process keeps running (a simulated or container reboot, or
//! a reboot that is still on its way) gives `SUCCEEDED`; a restart while the entry is in
//! progress settles it as `SUCCEEDED` too (the restart is the reboot, see `recovery.rs`).

use posfleet_proto::pb;

use super::{Executor, hooks, result};
use crate::state::Changes;

impl Executor {
    pub(super) async fn reboot(&mut self, cmd: &pb::Command, bytes: &[u8]) {
        let Some(hook) = self.settings.hooks.reboot.clone() else {
            let r = result::failed(&cmd.id, "no reboot hook configured");
            self.finish(cmd, r, Changes::durable()).await;
            return;
        };
        let progress = result::in_progress(&cmd.id, "rebooting");
        if !self.begin(cmd, bytes, &progress, Changes::durable()).await {
            return;
        }
        self.publish_result(progress).await;
        let run = hooks::run(&hook, &self.hook_env(), self.settings.hooks.timeout, 0).await;
        let r = if run.succeeded() {
            result::succeeded(&cmd.id, "the reboot hook finished")
        } else {
            result::with(
                result::failed(&cmd.id, format!("the reboot hook {}", run.describe())),
                "hook_exit",
                run.exit_detail(),
            )
        };
        self.finish(cmd, r, Changes::durable()).await;
    }
}
