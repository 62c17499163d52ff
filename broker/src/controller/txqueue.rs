//! The bounded hand-off between the ingest loop and the transaction committer.
//!
//! The ingest loop never waits for disk: [`TxQueue::try_submit`] either queues a batch at once
//! or refuses it (the terminal resends it, nothing was acknowledged). The queue is bounded in
//! batches and in bytes; a byte permit travels with each batch until its commit is done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::txstore::Submission;

/// Limits and timings of transaction ingest.
#[derive(Debug, Clone)]
pub struct TxConfig {
    /// Batches waiting for the committer at most.
    pub queue_capacity: usize,
    /// Payload bytes waiting for the committer at most.
    pub max_queued_bytes: usize,
    /// Transactions one group commit takes at most (it drains the queue up to this).
    /// Throughput levels off around 1,000 per commit while latency keeps growing (ADR 0006).
    pub max_commit_records: usize,
    /// Time allowed to queue one commit's acknowledgements on the MQTT session; those not
    /// queued by then are dropped (terminals resend and get a new one).
    pub ack_timeout: Duration,
    /// How long records may wait above a missing seq before a `sequence_gap` alert.
    pub gap_grace: Duration,
    /// How often gaps are checked.
    pub gap_check_interval: Duration,
}

impl Default for TxConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            max_queued_bytes: 64 * 1024 * 1024,
            max_commit_records: 2048,
            ack_timeout: Duration::from_secs(5),
            gap_grace: Duration::from_secs(60),
            gap_check_interval: Duration::from_secs(5),
        }
    }
}

/// One queued batch.
#[derive(Debug)]
pub(crate) struct Job {
    pub sub: Submission,
    /// When ingest queued it (for the receive-to-ack latency).
    pub queued_at: Instant,
    /// Its share of the byte budget, released when the job is dropped (after the commit).
    _bytes: OwnedSemaphorePermit,
}

impl Job {
    /// The submission, and what must stay with the committer until it has acknowledged it.
    pub(crate) fn split(self) -> (Submission, Queued) {
        let queued = Queued {
            device: self.sub.device.clone(),
            at: self.queued_at,
            _bytes: self._bytes,
        };
        (self.sub, queued)
    }
}

/// A batch being committed: who sent it, when it was queued, and its byte permit.
#[derive(Debug)]
pub(crate) struct Queued {
    pub device: posfleet_proto::DeviceId,
    pub at: Instant,
    _bytes: OwnedSemaphorePermit,
}

/// Why a batch was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueError {
    /// The committer is behind (disk slower than ingest).
    Full,
    /// The committer is stopping.
    Closed,
}

/// The ingest side of the queue. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct TxQueue {
    tx: mpsc::Sender<Job>,
    bytes: Arc<Semaphore>,
}

impl TxQueue {
    /// A queue with `cfg`'s limits and its receiving end (for the committer).
    pub(crate) fn new(cfg: &TxConfig) -> (Self, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let bytes = Arc::new(Semaphore::new(cfg.max_queued_bytes.max(1)));
        (Self { tx, bytes }, rx)
    }

    /// Queues `sub` (received as a payload of `size` bytes) without waiting.
    pub(crate) fn try_submit(&self, sub: Submission, size: usize) -> Result<(), QueueError> {
        if self.tx.is_closed() {
            return Err(QueueError::Closed);
        }
        let permits = u32::try_from(size.max(1)).map_err(|_| QueueError::Full)?;
        let bytes = Arc::clone(&self.bytes)
            .try_acquire_many_owned(permits)
            .map_err(|_| QueueError::Full)?;
        let job = Job {
            sub,
            queued_at: Instant::now(),
            _bytes: bytes,
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => QueueError::Full,
            mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
        })
    }

    /// Batches waiting.
    pub(crate) fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}
