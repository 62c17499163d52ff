//! The durable transaction outbox (ADR 0005).
//!
//! - [`Outbox`]: one sled store (`store.rs` opens and reads it, `writer.rs` writes it; with
//!   [`crate::state`] one of the crate's two storage modules) and its committer thread (`committer.rs`). A real terminal opens one in its data directory; the
//!   simulator opens **one** for all its terminals.
//! - [`DeviceOutbox`]: one terminal's part of it. [`DeviceOutbox::accept`] assigns the next
//!   gapless sequence number and returns only after the record is durable (group commit: one
//!   flush + fsync for everything queued meanwhile); a known txn id answers with its original
//!   seq ([`AcceptOutcome::Repeat`]) or as a [`AcceptOutcome::Conflict`].
//! - `sender.rs`: the per-terminal task that publishes batches and applies the controller's
//!   acks ([`AckInbox`]). Entries leave the outbox only when an ack covers them; refused ones
//!   move to the dead letters.

mod committer;
mod sender;
mod store;
mod writer;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::{DeviceId, now_ms};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

pub(crate) use sender::Sender;
pub use sender::{AckInbox, AckNews, AckStats, AckVerdict, MAX_RETRY_AFTER};
pub use store::StoredEntry;
pub use writer::AckOutcome;

use crate::transaction::ValidTransaction;
use committer::{CommitStats, Request};
use store::Store;
use writer::{Op, Outcome, Writer};

/// Defaults of [`OutboxSettings`].
pub const DEFAULT_BATCH_MAX_TRANSACTIONS: usize = 500;
pub const DEFAULT_LINGER: Duration = Duration::from_millis(20);
pub const DEFAULT_RESEND_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;
pub const DEFAULT_CACHE_CAPACITY: u64 = 1024 * 1024;
pub const DEFAULT_MAX_PENDING: u64 = 100_000;
pub const DEFAULT_IDEMPOTENCY_WINDOW: u64 = 20_000;
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;

/// How the outbox stores and sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxSettings {
    /// Most transactions per batch (also bounded by the 256 KiB payload limit).
    pub batch_max_transactions: usize,
    /// How long a partial batch waits for more transactions.
    pub linger: Duration,
    /// Without ack progress for this long, unacknowledged entries are sent again.
    pub resend_timeout: Duration,
    /// Batches published and not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// sled page cache, bytes (small on a terminal, larger for the simulator).
    pub cache_capacity: u64,
    /// Per terminal: entries waiting for an ack, at most; beyond, new transactions are
    /// refused (the payment application is told, nothing is dropped).
    pub max_pending: u64,
    /// Per terminal: how many of the latest txn ids the idempotency index remembers.
    pub idempotency_window: u64,
    /// Requests waiting for the committer, at most (writers wait beyond it).
    pub queue_capacity: usize,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            batch_max_transactions: DEFAULT_BATCH_MAX_TRANSACTIONS,
            linger: DEFAULT_LINGER,
            resend_timeout: DEFAULT_RESEND_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            max_pending: DEFAULT_MAX_PENDING,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
        }
    }
}

/// Why the outbox could not do something.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot open the outbox store in {}; if it is damaged, move it aside and report it", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("outbox store error")]
    Store(#[from] sled::Error),
    #[error("cannot fsync {}", path.display())]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the outbox store holds a record it cannot read: {detail}")]
    Corrupt { detail: String },
    #[error("the outbox failed to write and refuses transactions until the agent restarts")]
    Failed,
    #[error("the outbox is closed")]
    Closed,
    #[error(
        "the outbox holds {depth} unacknowledged transactions, its limit; try again once the controller has acknowledged some"
    )]
    Full { depth: u64 },
}

/// The result of [`DeviceOutbox::accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptOutcome {
    /// Durably stored under a new seq.
    Stored { seq: u64 },
    /// The same txn id with identical content was stored before under `seq`.
    Repeat { seq: u64 },
    /// The same txn id with different content was stored before under `seq`; nothing stored.
    Conflict { seq: u64 },
}

/// What `GET /v1/status` shows about a terminal's outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStatus {
    /// Transactions not yet acknowledged by the controller.
    pub depth: u64,
    /// The last sequence number assigned (0: none yet).
    pub last_seq: u64,
    /// Age of the oldest transaction not yet acknowledged (unsent, or sent without an ack).
    pub oldest_unsent_age_ms: Option<u64>,
    /// When the last valid ack arrived (Unix ms; since the agent started).
    pub last_ack_at_ms: Option<u64>,
    /// Transactions the controller refused (conflicts), kept on the terminal.
    pub dead_letters: u64,
    /// The store failed to write; transactions are refused until the agent restarts.
    pub failed: bool,
}

/// Per-terminal state shared by its handles, its sender and the committer.
#[derive(Debug)]
pub(crate) struct DeviceShared {
    id: DeviceId,
    /// The highest durable seq; senders never send beyond it.
    committed: watch::Sender<u64>,
    depth: AtomicU64,
    /// Accepts between their call and their answer (a software update waits for 0, with
    /// `depth` 0: the payment application is idle).
    in_flight: AtomicU64,
    dead: AtomicU64,
    /// Unix ms of the last valid ack (0: none).
    last_ack_ms: AtomicU64,
}

impl DeviceShared {
    /// Called by the committer after a durable commit.
    fn apply(&self, outcome: Outcome) {
        match outcome {
            Outcome::Stored { seq } => {
                self.depth.fetch_add(1, Ordering::AcqRel);
                self.committed.send_if_modified(|c| {
                    let newer = seq > *c;
                    *c = (*c).max(seq);
                    newer
                });
            }
            Outcome::Acked(a) => {
                let gone = a.removed + a.dead_lettered;
                let _ = self
                    .depth
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                        Some(d.saturating_sub(gone))
                    });
                self.dead.fetch_add(a.dead_lettered, Ordering::AcqRel);
            }
            Outcome::Purged { .. } => {
                self.depth.store(0, Ordering::Release);
                self.dead.store(0, Ordering::Release);
            }
            Outcome::Repeat { .. } | Outcome::Conflict { .. } => {}
        }
    }
}

struct Inner {
    store: Arc<Store>,
    settings: OutboxSettings,
    queue: mpsc::Sender<Request>,
    devices: Mutex<HashMap<DeviceId, Arc<DeviceShared>>>,
    failed: Arc<AtomicBool>,
    stats: Arc<CommitStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The outbox store and its committer. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.inner.store.dir())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens the store in `dir` (created 0700 if missing) and starts the committer thread.
    /// Blocking: call it from `spawn_blocking` in async code.
    pub fn open(dir: &Path, settings: OutboxSettings) -> Result<Self, OutboxError> {
        let store = Arc::new(Store::open(dir, settings.cache_capacity)?);
        let (queue, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let failed = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CommitStats::default());
        let writer = Writer::new(store.clone(), settings.idempotency_window);
        let (f, s) = (failed.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("outbox-committer".into())
            .spawn(move || committer::run(writer, rx, f, s))
            .map_err(|source| OutboxError::Open {
                path: dir.to_owned(),
                source: Box::new(source),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                settings,
                queue,
                devices: Mutex::new(HashMap::new()),
                failed,
                stats,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    pub fn settings(&self) -> &OutboxSettings {
        &self.inner.settings
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        self.inner.store.dir()
    }

    /// The part of the outbox of terminal `id` (the same shared state for every call with
    /// the same id). Blocking on first use of an id: it counts the terminal's records.
    pub fn device(&self, id: &DeviceId) -> Result<DeviceOutbox, OutboxError> {
        let mut devices = self.inner.devices.lock().unwrap_or_else(|e| e.into_inner());
        let shared = match devices.get(id) {
            Some(shared) => shared.clone(),
            None => {
                let snap = self.inner.store.snapshot(id)?;
                let (committed, _) = watch::channel(snap.last_seq);
                let shared = Arc::new(DeviceShared {
                    id: id.clone(),
                    committed,
                    depth: AtomicU64::new(snap.depth),
                    in_flight: AtomicU64::new(0),
                    dead: AtomicU64::new(snap.dead),
                    last_ack_ms: AtomicU64::new(0),
                });
                devices.insert(id.clone(), shared.clone());
                shared
            }
        };
        Ok(DeviceOutbox {
            inner: self.inner.clone(),
            shared,
        })
    }

    /// Commit rounds and writes so far (rounds < writes shows group commit at work).
    pub fn commit_stats(&self) -> (u64, u64) {
        (
            self.inner.stats.rounds.load(Ordering::Relaxed),
            self.inner.stats.writes.load(Ordering::Relaxed),
        )
    }

    /// Commits what is queued, stops the committer and waits for it. Later writes fail with
    /// [`OutboxError::Closed`]. The store itself closes when the last handle is dropped.
    pub async fn close(&self) {
        let _ = self.inner.queue.send(Request::Stop).await;
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(thread) = thread {
            // Joining blocks until the last round's fsync is done.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Counts one accept in flight for as long as it lives (also when the caller's future is
/// dropped mid-way).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One terminal's outbox. Cheap to clone.
#[derive(Clone)]
pub struct DeviceOutbox {
    inner: Arc<Inner>,
    shared: Arc<DeviceShared>,
}

impl std::fmt::Debug for DeviceOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceOutbox")
            .field("device", &self.shared.id)
            .field("depth", &self.depth())
            .finish_non_exhaustive()
    }
}

impl DeviceOutbox {
    pub fn device_id(&self) -> &DeviceId {
        &self.shared.id
    }

    /// The settings of the outbox this terminal's part belongs to.
    pub fn settings(&self) -> &OutboxSettings {
        &self.inner.settings
    }

    /// Stores `txn` under the next seq and returns once it is durable, or tells which seq
    /// already holds its txn id. Cancel-safe in the sense that matters: once queued, the
    /// write happens whether or not the caller still waits.
    pub async fn accept(&self, txn: ValidTransaction) -> Result<AcceptOutcome, OutboxError> {
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(OutboxError::Failed);
        }
        let depth = self.depth();
        if depth >= self.inner.settings.max_pending {
            return Err(OutboxError::Full { depth });
        }
        let op = Op::Accept {
            device: self.shared.id.clone(),
            txn: Box::new(txn),
            accepted_at_ms: now_ms(),
        };
        let _in_flight = InFlight::enter(&self.shared.in_flight);
        match self.write(op).await? {
            Outcome::Stored { seq } => Ok(AcceptOutcome::Stored { seq }),
            Outcome::Repeat { seq } => Ok(AcceptOutcome::Repeat { seq }),
            Outcome::Conflict { seq } => Ok(AcceptOutcome::Conflict { seq }),
            Outcome::Acked(_) | Outcome::Purged { .. } => Err(OutboxError::Corrupt {
                detail: "the committer answered an accept with another outcome".into(),
            }),
        }
    }

    /// Removes entries `<= through` and dead-letters `rejected` ones (checked by the caller
    /// against what was sent).
    pub(crate) async fn ack(
        &self,
        through: u64,
        rejected: Vec<u64>,
    ) -> Result<AckOutcome, OutboxError> {
        let op = Op::Ack {
            device: self.shared.id.clone(),
            through,
            rejected,
        };
        match self.write(op).await? {
            Outcome::Acked(outcome) => Ok(outcome),
            _ => Err(OutboxError::Corrupt {
                detail: "the committer answered an ack with an accept".into(),
            }),
        }
    }

    /// Removes every transaction and dead letter of this terminal, durably (a wipe). Returns
    /// how many records went. The sequence continues where it was.
    pub async fn purge(&self) -> Result<u64, OutboxError> {
        let op = Op::Purge {
            device: self.shared.id.clone(),
        };
        match self.write(op).await? {
            Outcome::Purged { entries, dead } => Ok(entries + dead),
            _ => Err(OutboxError::Corrupt {
                detail: "the committer answered a purge with another outcome".into(),
            }),
        }
    }

    async fn write(&self, op: Op) -> Result<Outcome, OutboxError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(Request::Write {
                op,
                device: self.shared.clone(),
                reply,
            })
            .await
            .map_err(|_| OutboxError::Closed)?;
        answer.await.map_err(|_| OutboxError::Closed)?
    }

    /// Records that a valid ack arrived now.
    pub(crate) fn note_ack(&self) {
        self.shared.last_ack_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// The first run of consecutive entries from `from` to `through` (see `Store::read_run`).
    pub(crate) async fn read_run(
        &self,
        from: u64,
        through: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEntry>, OutboxError> {
        self.blocking(move |store, id| store.read_run(id, from, through, max_count, max_bytes))
            .await
    }

    /// The seq of the oldest entry, if any.
    pub(crate) async fn first_pending(&self) -> Result<Option<u64>, OutboxError> {
        Ok(self
            .blocking(|store, id| store.first_entry(id))
            .await?
            .map(|e| e.seq))
    }

    /// Every entry waiting for an ack, in seq order.
    pub async fn entries(&self) -> Result<Vec<StoredEntry>, OutboxError> {
        self.blocking(|store, id| store.entries(id)).await
    }

    /// Every dead letter, in seq order.
    pub async fn dead_letters(&self) -> Result<Vec<StoredEntry>, OutboxError> {
        self.blocking(|store, id| store.dead_letters(id)).await
    }

    /// Runs a store read on the blocking pool (a cache miss reads the disk).
    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store, &DeviceId) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let store = self.inner.store.clone();
        let id = self.shared.id.clone();
        tokio::task::spawn_blocking(move || read(&store, &id))
            .await
            .map_err(|e| OutboxError::Corrupt {
                detail: format!("outbox read panicked: {e}"),
            })?
    }

    /// True while no transaction waits for an ack and none is being accepted: what a
    /// software update waits for before it installs.
    pub fn is_idle(&self) -> bool {
        self.shared.in_flight.load(Ordering::Acquire) == 0 && self.depth() == 0
    }

    /// Transactions kept as dead letters (refused by the controller as conflicts).
    pub fn dead_letter_count(&self) -> u64 {
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Entries waiting for an ack.
    pub fn depth(&self) -> u64 {
        self.shared.depth.load(Ordering::Acquire)
    }

    /// The last durable seq.
    pub fn last_seq(&self) -> u64 {
        *self.shared.committed.borrow()
    }

    /// A receiver of the last durable seq.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    pub async fn status(&self) -> OutboxStatus {
        let oldest = match self.blocking(|store, id| store.first_entry(id)).await {
            Ok(first) => first.map(|e| now_ms().saturating_sub(e.accepted_at_ms)),
            Err(error) => {
                warn!(%error, "cannot read the oldest outbox entry");
                None
            }
        };
        let last_ack = self.shared.last_ack_ms.load(Ordering::Relaxed);
        OutboxStatus {
            depth: self.depth(),
            last_seq: self.last_seq(),
            oldest_unsent_age_ms: oldest,
            last_ack_at_ms: (last_ack > 0).then_some(last_ack),
            dead_letters: self.dead_letter_count(),
            failed: self.inner.failed.load(Ordering::Acquire),
        }
    }
}
