//! The bounded hand-off between the ingest loop and the transaction committer
//! (docs/decisions/0014-transaction-back-pressure.md).
//!
//! The ingest loop never waits for disk: [`TxQueue::try_submit`] either queues a batch at once
//! or refuses it. The queue is bounded by a budget of transactions and of payload bytes, not by
//! a count of batches, so a thousand terminals each with a few small batches in flight never
//! find it full; a record and a byte permit travel with each batch until its commit is done. A
//! refused batch's terminal is named on a second bounded channel, so that it can be told to
//! retry after a while ([`TxReceiver::refused`]) instead of waiting for its resend timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use posfleet_proto::DeviceId;

use crate::txstore::Submission;

/// Default of [`TxConfig::max_queued_records`]: 32 full commits, ~3 s of work at 20,000
/// transactions/s.
pub const DEFAULT_MAX_QUEUED_RECORDS: u32 = 32 * 2048;

/// Limits and timings of transaction ingest.
#[derive(Debug, Clone)]
pub struct TxConfig {
    /// Transactions waiting for the committer at most (the queue's budget; a batch counts
    /// at least 1).
    pub max_queued_records: usize,
    /// Payload bytes waiting for the committer at most.
    pub max_queued_bytes: usize,
    /// How long a terminal whose batch was refused is asked to wait before it sends again
    /// (`TransactionAck.retry_after_ms`; the terminal adds jitter).
    pub retry_after: Duration,
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
            max_queued_records: DEFAULT_MAX_QUEUED_RECORDS as usize,
            max_queued_bytes: 64 * 1024 * 1024,
            retry_after: Duration::from_secs(1),
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
    /// Its share of the budget, released when the job is dropped (after the commit).
    _budget: Budget,
}

/// A batch's share of the queue's record and byte budgets.
#[derive(Debug)]
struct Budget {
    _records: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

impl Job {
    /// The submission, and what must stay with the committer until it has acknowledged it.
    pub(crate) fn split(self) -> (Submission, Queued) {
        let queued = Queued {
            device: self.sub.device.clone(),
            at: self.queued_at,
            _budget: self._budget,
        };
        (self.sub, queued)
    }
}

/// A batch being committed: who sent it, when it was queued, and its budget.
#[derive(Debug)]
pub(crate) struct Queued {
    pub device: DeviceId,
    pub at: Instant,
    _budget: Budget,
}

/// Why a batch was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueError {
    /// The committer is behind (disk slower than ingest): the budget is spent.
    Full,
    /// The committer is stopping.
    Closed,
}

/// Refused terminals waiting for their retry-after notice at most; beyond, a terminal is
/// not told and recovers by its own resend timeout.
const REFUSED_CAPACITY: usize = 4096;

/// The ingest side of the queue. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct TxQueue {
    /// Bounded by `max_queued_records`: every job holds at least one record permit.
    tx: mpsc::Sender<Job>,
    records: Arc<Semaphore>,
    max_records: usize,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    refused: mpsc::Sender<DeviceId>,
}

/// The committer's side of the queue: the batches, and the terminals whose batch was refused.
#[derive(Debug)]
pub(crate) struct TxReceiver {
    pub jobs: mpsc::Receiver<Job>,
    pub refused: mpsc::Receiver<DeviceId>,
}

impl TxQueue {
    /// A queue with `cfg`'s limits and its receiving end (for the committer).
    pub(crate) fn new(cfg: &TxConfig) -> (Self, TxReceiver) {
        // A semaphore's permits are u32-sized in practice (`try_acquire_many_owned`).
        let limit = Semaphore::MAX_PERMITS.min(u32::MAX as usize);
        let max_records = cfg.max_queued_records.clamp(1, limit);
        let max_bytes = cfg.max_queued_bytes.clamp(1, limit);
        let (tx, jobs) = mpsc::channel(max_records);
        let (refused_tx, refused) = mpsc::channel(REFUSED_CAPACITY);
        let queue = Self {
            tx,
            records: Arc::new(Semaphore::new(max_records)),
            max_records,
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
            refused: refused_tx,
        };
        (queue, TxReceiver { jobs, refused })
    }

    /// Queues `sub` (received as a payload of `size` bytes) without waiting. When the budget
    /// is spent, the terminal is also named for a retry-after notice (dropped if that channel
    /// is full: the terminal's resend timeout covers it).
    pub(crate) fn try_submit(&self, sub: Submission, size: usize) -> Result<(), QueueError> {
        if self.tx.is_closed() {
            return Err(QueueError::Closed);
        }
        let device = sub.device.clone();
        self.queue(sub, size).inspect_err(|e| {
            if *e == QueueError::Full {
                let _ = self.refused.try_send(device);
            }
        })
    }

    /// A batch takes one permit per transaction and per byte (at least one, at most the
    /// whole budget: a batch larger than the budget waits for an empty queue, not for ever).
    fn queue(&self, sub: Submission, size: usize) -> Result<(), QueueError> {
        let take = |budget: &Arc<Semaphore>, max: usize, n: usize| {
            let n = u32::try_from(n.clamp(1, max)).map_err(|_| QueueError::Full)?;
            Arc::clone(budget)
                .try_acquire_many_owned(n)
                .map_err(|_| QueueError::Full)
        };
        let records = take(&self.records, self.max_records, sub.records.len())?;
        let bytes = take(&self.bytes, self.max_bytes, size)?;
        let job = Job {
            sub,
            queued_at: Instant::now(),
            _budget: Budget {
                _records: records,
                _bytes: bytes,
            },
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
