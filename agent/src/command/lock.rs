//! Lock and Unlock (the generation rule), the Lease, and the offline self-lock.
//!
//! - A Lock/Unlock applies only if its generation is higher than the applied one, else it is
//!   `stale`: a re-sent or reordered command cannot undo a newer decision. The same
//!   generation in the same state (a lease already carried the decision) `succeeded`, with
//!   nothing to do, as an equal configuration version does. The new lock is
//!   journaled with the command in one durable batch, then enforced (the intake refuses
//!   transactions with 423 from then on), then the optional `lock`/`unlock` hook runs with
//!   `POSFLEET_LOCK_REASON` and `POSFLEET_LOCK_GENERATION`. A failing hook does not undo the
//!   lock (the agent enforces it either way); the result says so in `details.hook_exit`.
//! - A Lease renews the contact time (done for every verified command). `locked = false`
//!   ends an offline self-lock; `locked = true` with a newer generation (or the same one over
//!   a self-lock) takes the lock over with the lease's reason and generation.
//! - Self-lock: an unlocked terminal whose last contact is older than the effective
//!   `max_offline` locks itself with reason `offline_lease`, generation unchanged.

use posfleet_proto::pb;
use posfleet_proto::signing::RejectReason;
use tracing::{info, warn};

use super::{Executor, REASON_OFFLINE_LEASE, hooks, result};
use crate::state::{self, Changes, LockRecord};

impl Executor {
    pub(super) async fn lock_command(
        &mut self,
        cmd: &pb::Command,
        bytes: &[u8],
        locked: bool,
        reason: &str,
        generation: u64,
        recovering: bool,
    ) {
        let applied = self.lock.generation;
        // After a restart the interrupted command's lock is already persisted (it was written
        // with the journal entry): applying it again is the idempotent re-run.
        let rerun = recovering && generation == applied;
        if generation == applied && !rerun && self.already_applied(locked) {
            let what = if locked { "locked" } else { "unlocked" };
            let r = result::with(
                result::succeeded(
                    &cmd.id,
                    format!("terminal already {what} at generation {generation}"),
                ),
                "generation",
                generation,
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        if generation <= applied && !rerun {
            let r = result::rejected(
                &cmd.id,
                RejectReason::Stale,
                format!(
                    "lock generation {generation} is not newer than the applied generation {applied}"
                ),
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        let record = LockRecord {
            locked,
            reason: if locked {
                non_empty(reason, "locked")
            } else {
                String::new()
            },
            generation,
            by_lease: false,
        };
        let progress = result::in_progress(&cmd.id, "applying");
        if !self
            .begin(
                cmd,
                bytes,
                &progress,
                Changes::durable().lock(record.clone()),
            )
            .await
        {
            return;
        }
        info!(locked, generation, "lock state applied");
        self.set_lock(record);
        let what = if locked { "locked" } else { "unlocked" };
        let mut r = result::with(
            result::succeeded(&cmd.id, format!("terminal {what}")),
            "generation",
            generation,
        );
        if let Some(run) = self.run_lock_hook(locked, reason).await {
            if !run.succeeded() {
                r.message = format!("terminal {what}; the {what} hook {}", run.describe());
                r = result::with(r, "hook_exit", run.exit_detail());
            }
        }
        self.finish(cmd, r, Changes::durable()).await;
    }

    /// True if the applied lock is the decision of its generation in state `locked`, taken
    /// over from a lease (which carries the desired lock and may arrive before the command
    /// of the same generation, e.g. when a terminal that was offline reconnects). Every
    /// lock/unlock request raises the generation, so generation and state identify it; the
    /// command then succeeded without acting again. An offline self-lock keeps the generation
    /// of the previous decision but is not that decision.
    fn already_applied(&self, locked: bool) -> bool {
        self.lock.locked == locked && !self.lock.by_lease && self.lock.generation > 0
    }

    /// Runs the `lock` or `unlock` hook, if configured.
    async fn run_lock_hook(&self, locked: bool, reason: &str) -> Option<hooks::HookRun> {
        let hooks = &self.settings.hooks;
        let path = if locked { &hooks.lock } else { &hooks.unlock };
        let path = path.as_ref()?;
        let mut env = self.hook_env();
        env.push(("POSFLEET_LOCK_REASON", reason.to_owned()));
        env.push(("POSFLEET_LOCK_GENERATION", self.lock.generation.to_string()));
        let run = hooks::run(path, &env, hooks.timeout, 0).await;
        if !run.succeeded() {
            warn!(hook = %path.display(), outcome = %run.describe(), "lock hook failed");
        }
        Some(run)
    }

    /// Applies a verified lease (the contact time is already renewed).
    pub(super) async fn lease(&mut self, lease: &pb::Lease) {
        let current = &self.lock;
        let next = if current.by_lease && !lease.locked {
            Some(LockRecord {
                locked: false,
                reason: String::new(),
                generation: current.generation,
                by_lease: false,
            })
        } else if lease.locked
            && (lease.lock_generation > current.generation
                || (current.by_lease && lease.lock_generation == current.generation))
        {
            Some(LockRecord {
                locked: true,
                reason: non_empty(&lease.lock_reason, "locked"),
                generation: lease.lock_generation,
                by_lease: false,
            })
        } else {
            None
        };
        if let Some(next) = next {
            info!(
                locked = next.locked,
                generation = next.generation,
                "lock state changed by the controller's lease"
            );
            self.change_lock(next).await;
        }
    }

    /// The offline lease expired: lock until the controller is heard from again.
    pub(super) async fn lease_expired(&mut self) {
        if self.lock.locked {
            return;
        }
        warn!(
            last_contact_ms = self.last_contact_ms,
            "no word from the controller within max_offline; the terminal locks itself"
        );
        let record = LockRecord {
            locked: true,
            reason: REASON_OFFLINE_LEASE.to_owned(),
            generation: self.lock.generation,
            by_lease: true,
        };
        self.change_lock(record).await;
    }

    /// Persists a lock change that no command result reports, applies it, runs the hook.
    async fn change_lock(&mut self, record: LockRecord) {
        let rec = record.clone();
        if let Err(e) =
            state::blocking(&self.state, move |s| s.apply(Changes::durable().lock(rec))).await
        {
            warn!(error = %e, "cannot persist the lock state; applied in memory only");
        }
        let (locked, reason) = (record.locked, record.reason.clone());
        self.set_lock(record);
        self.run_lock_hook(locked, &reason).await;
    }
}

/// Longest lock reason kept (it travels in every ReportedState).
const MAX_REASON_CHARS: usize = 256;

/// `text` (at most [`MAX_REASON_CHARS`] characters, no control characters), or `default`
/// if it is empty.
fn non_empty(text: &str, default: &str) -> String {
    let text: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON_CHARS)
        .collect();
    if text.is_empty() {
        default.to_owned()
    } else {
        text
    }
}
