//! The liveness sweeper: every `interval`, devices that missed their heartbeats go offline
//! (reason `missed_heartbeats`). The clock is injected so tests control time.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::Ingest;

/// A wall clock in Unix milliseconds (`posfleet_proto::now_ms` in production).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(posfleet_proto::now_ms)
}

/// Runs [`Ingest::sweep`] every `every` until `cancel`.
pub(crate) fn spawn_sweeper(
    ingest: Arc<Ingest>,
    every: Duration,
    clock: Clock,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    spawn_every(every, tracker, cancel, move || {
        let swept = ingest.sweep(clock());
        if swept > 0 {
            debug!(swept, "devices marked offline for missed heartbeats");
        }
    })
}

/// Runs `work` every `every` (late ticks delayed, never bunched) until `cancel`: the one
/// periodic loop of the controller (liveness sweep, sequence-gap watch).
pub(crate) fn spawn_every(
    every: Duration,
    tracker: &TaskTracker,
    cancel: CancellationToken,
    mut work: impl FnMut() + Send + 'static,
) -> JoinHandle<()> {
    tracker.spawn(async move {
        let mut tick = interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => work(),
            }
        }
    })
}
