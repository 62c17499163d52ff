//! The registry's single committer (storage rule 4) and [`Registry::flush`].
//!
//! Mutations only mark devices dirty or touched; the committer task takes them as one batch,
//! commits it durably on a blocking thread and then publishes the committed change count on a
//! watch channel that `flush` waits on. Nobody else writes to the store.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};

use posfleet_proto::DeviceId;
use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info};

use super::{Registry, RegistryError};

/// Whether a committer task runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum CommitterState {
    #[default]
    NotStarted,
    Running,
    Stopped,
}

/// What has been made durable so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct Durability {
    /// Every significant change up to this count is durable.
    pub committed_seq: u64,
    /// Commits that failed so far (a waiter fails if one fails while it waits).
    pub failures: u64,
    /// The latest commit failure.
    pub last_error: Option<String>,
    pub committer: CommitterState,
}

impl Registry {
    /// Waits until every significant change made before the call (registrations, presence
    /// transitions, version changes) is durable on disk. Needs the committer task.
    pub async fn flush(&self) -> Result<(), RegistryError> {
        let target = self.read().book.change_seq;
        let mut rx = self.durability.subscribe();
        let failures_before = rx.borrow().failures;
        self.wake.notify_one();
        loop {
            {
                let d = rx.borrow_and_update();
                if d.committed_seq >= target {
                    return Ok(());
                }
                if d.failures > failures_before {
                    return Err(RegistryError::CommitFailed {
                        message: d.last_error.clone().unwrap_or_default(),
                    });
                }
                if d.committer != CommitterState::Running {
                    return Err(RegistryError::NoCommitter);
                }
            }
            // The sender lives in `self`, so this only fails if the registry is being dropped.
            if rx.changed().await.is_err() {
                return Err(RegistryError::NoCommitter);
            }
        }
    }

    /// Starts the committer. It commits significant changes every `flush_interval` (at once
    /// for a registration or a `flush`), touched records every `touch_interval`, and
    /// everything once more when `stop` is cancelled. Cancel `stop` only after the tasks that
    /// mutate the registry have ended, so their last changes are in the final commit.
    pub fn spawn_committer(self: &Arc<Self>, tracker: &TaskTracker, stop: CancellationToken) {
        self.durability
            .send_modify(|d| d.committer = CommitterState::Running);
        let registry = Arc::clone(self);
        let blocking = tracker.clone();
        tracker.spawn(async move {
            let mut flush_tick = interval(registry.cfg.flush_interval);
            flush_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut touch_tick = interval(registry.cfg.touch_interval);
            touch_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            // Both intervals fire at once on their first tick; start counting from now.
            flush_tick.tick().await;
            touch_tick.tick().await;
            loop {
                let include_touched = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    _ = touch_tick.tick() => true,
                    () = registry.wake.notified() => false,
                    _ = flush_tick.tick() => false,
                };
                // Failures are logged inside and retried on the next tick.
                let _ = registry.commit_blocking(&blocking, include_touched).await;
            }
            match registry.commit_blocking(&blocking, true).await {
                Ok(_) => info!("registry committed at shutdown"),
                Err(e) => error!(error = %e, "final registry commit failed"),
            }
            registry
                .durability
                .send_modify(|d| d.committer = CommitterState::Stopped);
        });
    }

    /// Runs [`Registry::commit_pending`] on a tracked blocking thread (sled's flush and the
    /// fsync block for milliseconds).
    async fn commit_blocking(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        include_touched: bool,
    ) -> Result<usize, RegistryError> {
        let registry = Arc::clone(self);
        let result = tracker
            .spawn_blocking(move || registry.commit_pending(include_touched))
            .await
            .map_err(|e| RegistryError::Join(e.to_string()))
            .and_then(|r| r);
        match &result {
            Ok(0) => {}
            Ok(records) => debug!(records, include_touched, "registry committed"),
            Err(e) => error!(
                error = %e,
                dir = %self.cfg.dir.display(),
                "registry commit failed; retrying on the next interval"
            ),
        }
        result
    }

    /// Commits every dirty record (and touched ones if asked) as one durable batch. Blocks.
    /// Only the committer (and tests) call it; `commit_lock` keeps it single.
    pub(crate) fn commit_pending(&self, include_touched: bool) -> Result<usize, RegistryError> {
        let _single = self
            .commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (ids, records, seq) = {
            let mut st = self.write();
            let mut ids: BTreeSet<DeviceId> = std::mem::take(&mut st.book.dirty);
            if include_touched {
                ids.append(&mut st.book.touched);
            } else {
                for id in &ids {
                    st.book.touched.remove(id);
                }
            }
            let records: Vec<_> = ids
                .iter()
                .filter_map(|id| st.devices.get(id).map(|d| d.record.clone()))
                .collect();
            (ids, records, st.book.change_seq)
        };
        let result = if records.is_empty() {
            Ok(())
        } else {
            self.store.commit(&records)
        };
        match result {
            Ok(()) => {
                self.durability
                    .send_modify(|d| d.committed_seq = d.committed_seq.max(seq));
                Ok(records.len())
            }
            Err(e) => {
                self.write().book.dirty.extend(ids);
                let message = e.to_string();
                self.durability.send_modify(|d| {
                    d.failures += 1;
                    d.last_error = Some(message);
                });
                Err(e)
            }
        }
    }
}
