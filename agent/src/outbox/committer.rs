//! The committer: the one thread that writes the store (docs/storage.md rule 4).
//!
//! Requests arrive on a bounded queue. The thread takes everything queued (up to
//! [`MAX_ROUND`] requests) as one round, writes it as one batch, makes it durable with one
//! flush + fsync, and only then answers every request of the round. While it syncs, new
//! requests queue up and form the next round: that is the group commit that lets many
//! concurrent accepts (one terminal's or a whole simulated fleet's) share one fsync.
//!
//! A dedicated thread rather than the blocking pool: it blocks on fsync all the time, for the
//! whole life of the process.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use super::writer::{Op, Outcome, Writer};
use super::{DeviceShared, OutboxError};

/// Most requests in one round.
pub(crate) const MAX_ROUND: usize = 4096;

/// One queued request.
pub(crate) enum Request {
    Write {
        op: Op,
        /// The device's shared counters, updated after the commit.
        device: Arc<DeviceShared>,
        reply: oneshot::Sender<Result<Outcome, OutboxError>>,
    },
    /// Finish what is queued before it, then end the thread.
    Stop,
}

/// Counters of the committer (whole store).
#[derive(Debug, Default)]
pub(crate) struct CommitStats {
    pub(crate) rounds: std::sync::atomic::AtomicU64,
    pub(crate) writes: std::sync::atomic::AtomicU64,
}

/// Runs the committer until [`Request::Stop`] or until every sender is gone.
pub(crate) fn run(
    mut writer: Writer,
    mut queue: mpsc::Receiver<Request>,
    failed: Arc<std::sync::atomic::AtomicBool>,
    stats: Arc<CommitStats>,
) {
    let mut ops: Vec<Op> = Vec::with_capacity(MAX_ROUND);
    let mut waiting = Vec::with_capacity(MAX_ROUND);
    let mut stop = false;
    while !stop {
        let Some(first) = queue.blocking_recv() else {
            break;
        };
        ops.clear();
        waiting.clear();
        for request in std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok())) {
            match request {
                Request::Write { op, device, reply } => {
                    ops.push(op);
                    waiting.push((device, reply));
                }
                Request::Stop => {
                    stop = true;
                    break;
                }
            }
            if ops.len() >= MAX_ROUND {
                break;
            }
        }
        if ops.is_empty() {
            continue;
        }
        if failed.load(Ordering::Acquire) {
            for (_, reply) in waiting.drain(..) {
                let _ = reply.send(Err(OutboxError::Failed));
            }
            continue;
        }
        match writer.commit(&ops) {
            Ok(outcomes) => {
                stats.rounds.fetch_add(1, Ordering::Relaxed);
                stats.writes.fetch_add(ops.len() as u64, Ordering::Relaxed);
                for ((device, reply), outcome) in waiting.drain(..).zip(outcomes) {
                    device.apply(outcome);
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                // After a failed round nothing is known about what reached the disk: stop
                // accepting (the answer is "not stored", and the payment app retries with
                // the same txn id after a restart, which the idempotency index resolves).
                error!(error = %e, requests = ops.len(), "outbox commit failed; the outbox refuses transactions until the agent restarts");
                failed.store(true, Ordering::Release);
                for (_, reply) in waiting.drain(..) {
                    let _ = reply.send(Err(OutboxError::Failed));
                }
            }
        }
    }
    debug!("outbox committer stopped");
}
