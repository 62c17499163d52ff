//! The transaction committer (storage rule 4): the one task that writes the transaction
//! store. It drains everything queued (up to `max_commit_records`) into one group commit on a
//! blocking thread, and only after the commit returned (flush + fsync done) hands it to the
//! acknowledger, which publishes one `TransactionAck` per device in it, then announces what
//! was stored. The two run side by side: publishing a commit's ~1,000 acknowledgements took a
//! quarter of the committer's time when it did it between commits (docs/benchmarks.md, "The
//! controller alone"). Commits reach the acknowledger in order through a FIFO of
//! [`ACK_PIPELINE`], so a device's acknowledgements still leave in commit order.
//!
//! At stop it closes the queue, commits and acknowledges what was already queued, then ends;
//! nothing is ever acknowledged that the store did not make durable first.
//!
//! Back-pressure (docs/decisions/0014-transaction-back-pressure.md): an acknowledgement says
//! when the device's store has a gap (`gap`: a batch before this one never arrived, resend at
//! once), and a terminal whose batch the full queue refused gets an acknowledgement that
//! acknowledges nothing and asks it to wait (`retry_after_ms`), at most one per terminal per
//! retry period ([`notify_refused`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::txqueue::{Job, Queued, TxConfig, TxReceiver};
use crate::bus::Bus;
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::txstore::{CommitOutcome, DeviceOutcome, TxStore};
use crate::views::{AlertKind, FleetEvent, Severity};

/// Most rejected seqs in one acknowledgement (10 bytes each at worst: far below the
/// channel's 64 KiB).
const MAX_REJECTED_PER_ACK: usize = 4096;

/// Commits made durable but not yet acknowledged, at most (then the committer waits).
const ACK_PIPELINE: usize = 2;

/// A durable commit on its way to the acknowledger, with its queue entries (their byte
/// budget is released once the acknowledgements are out).
type Committed = (CommitOutcome, Vec<Queued>);

/// Where acknowledgements go: the controller's bus, or a test double.
pub(crate) trait AckSink: Clone + Send + Sync + 'static {
    /// Queues `ack` for `device` (QoS 1).
    fn publish_ack(
        &self,
        device: &DeviceId,
        ack: &pb::TransactionAck,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

impl AckSink for Bus {
    async fn publish_ack(&self, device: &DeviceId, ack: &pb::TransactionAck) -> Result<(), String> {
        let payload = encode(ack).map_err(|e| e.to_string())?;
        self.publish(&Topic::for_device(device, Channel::TransactionAck), payload)
            .await
            .map_err(|e| e.to_string())
    }
}

/// What the committer needs.
pub(crate) struct Committer<A> {
    pub store: Arc<TxStore>,
    pub acks: A,
    pub events: EventBus,
    pub metrics: Arc<Metrics>,
    pub cfg: TxConfig,
}

impl<A: AckSink> Committer<A> {
    /// Starts the committer on `tracker`. Cancelling `stop` makes it close the queue, commit
    /// and acknowledge what is queued, and end; the returned token is cancelled then.
    pub(crate) fn spawn(
        self,
        rx: TxReceiver,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> CancellationToken {
        let done = CancellationToken::new();
        let finished = done.clone();
        let blocking = tracker.clone();
        let this = Arc::new(self);
        let (committed_tx, committed_rx) = mpsc::channel::<Committed>(ACK_PIPELINE);
        let acknowledger = tracker.spawn(Arc::clone(&this).acknowledge_all(committed_rx));
        tracker.spawn(notify_refused(
            this.acks.clone(),
            rx.refused,
            this.cfg.retry_after,
            this.cfg.ack_timeout,
            Arc::clone(&this.metrics),
            stop.clone(),
        ));
        tracker.spawn(async move {
            this.run(rx.jobs, &blocking, &committed_tx, stop).await;
            // Every commit is in the FIFO: the acknowledger ends once it has sent them all.
            drop(committed_tx);
            if let Err(e) = acknowledger.await {
                error!(error = %e, "transaction acknowledger failed");
            }
            finished.cancel();
        });
        done
    }

    /// Acknowledges and announces every durable commit, in order, until the committer ends.
    async fn acknowledge_all(self: Arc<Self>, mut committed: mpsc::Receiver<Committed>) {
        while let Some((outcome, waiting)) = committed.recv().await {
            self.acknowledge(&outcome, &waiting).await;
            drop(waiting);
            self.announce(outcome);
        }
    }

    async fn run(
        &self,
        mut rx: mpsc::Receiver<Job>,
        tracker: &TaskTracker,
        committed: &mpsc::Sender<Committed>,
        stop: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                biased;
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                () = stop.cancelled() => break,
            };
            let jobs = self.drain(first, &mut rx);
            self.commit(jobs, tracker, committed).await;
        }
        // Refuse new batches, then finish what was already queued.
        rx.close();
        let mut finished = 0;
        while let Some(first) = rx.recv().await {
            let jobs = self.drain(first, &mut rx);
            finished += jobs.len();
            self.commit(jobs, tracker, committed).await;
        }
        info!(finished, "transaction committer stopped");
    }

    /// `first` plus whatever else is queued, up to `max_commit_records` transactions.
    fn drain(&self, first: Job, rx: &mut mpsc::Receiver<Job>) -> Vec<Job> {
        let mut records = first.sub.records.len();
        let mut jobs = vec![first];
        while records < self.cfg.max_commit_records {
            match rx.try_recv() {
                Ok(job) => {
                    records += job.sub.records.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        self.metrics
            .tx_queue_depth
            .set(i64::try_from(rx.len()).unwrap_or(i64::MAX));
        jobs
    }

    /// Commits `jobs` and, once durable, hands them to the acknowledger.
    async fn commit(
        &self,
        jobs: Vec<Job>,
        tracker: &TaskTracker,
        committed: &mpsc::Sender<Committed>,
    ) {
        let records: usize = jobs.iter().map(|j| j.sub.records.len()).sum();
        let batches = jobs.len();
        // The submissions move to the blocking thread; what stays (device, queue time, byte
        // permit) is released after the acknowledgements.
        let (subs, waiting): (Vec<_>, Vec<_>) = jobs.into_iter().map(Job::split).unzip();
        let store = Arc::clone(&self.store);
        let started = Instant::now();
        // sled's flush and the fsync block for milliseconds: off the runtime.
        let result = tracker.spawn_blocking(move || store.commit(subs)).await;
        let elapsed = started.elapsed();
        #[allow(clippy::cast_precision_loss)] // a histogram sample
        self.metrics.tx_commit_batch_size.observe(records as f64);
        self.metrics
            .tx_commit_seconds
            .observe(elapsed.as_secs_f64());
        let outcome = match result {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                self.metrics.tx_commit_failures_total.inc();
                error!(error = %e, batches, records, "transaction commit failed; nothing acknowledged, terminals will resend");
                return;
            }
            Err(e) => {
                self.metrics.tx_commit_failures_total.inc();
                error!(error = %e, "transaction commit task failed; nothing acknowledged");
                return;
            }
        };
        debug!(
            batches,
            records,
            stored = outcome.stored(),
            ms = elapsed.as_millis(),
            "transactions committed"
        );
        self.count(&outcome);
        if committed.send((outcome, waiting)).await.is_err() {
            error!(
                batches,
                records,
                "transaction acknowledger gone: durable commit not acknowledged; terminals will resend"
            );
        }
    }

    fn count(&self, outcome: &CommitOutcome) {
        self.metrics
            .tx_stored_total
            .inc_by(u64::try_from(outcome.stored()).unwrap_or(u64::MAX));
        self.metrics
            .tx_duplicates_total
            .inc_by(outcome.duplicates());
        self.metrics
            .tx_conflicts_total
            .inc_by(u64::try_from(outcome.conflicts()).unwrap_or(u64::MAX));
    }

    /// One acknowledgement per device (more if it rejects very many seqs), all queued within
    /// `ack_timeout`. Failures are counted and logged once per commit.
    async fn acknowledge(&self, outcome: &CommitOutcome, waiting: &[Queued]) {
        let deadline = tokio::time::Instant::now() + self.cfg.ack_timeout;
        let mut failed = 0usize;
        let mut last_error = String::new();
        for device in &outcome.devices {
            let mut sent = true;
            for ack in acks_for(device) {
                let publish = self.acks.publish_ack(&device.device, &ack);
                let result = match tokio::time::timeout_at(deadline, publish).await {
                    Ok(result) => result,
                    Err(_) => Err("timed out".to_owned()),
                };
                match result {
                    Ok(()) => {
                        self.metrics.tx_acks_total.inc();
                    }
                    Err(e) => {
                        sent = false;
                        failed += 1;
                        last_error = e;
                        self.metrics.tx_ack_failures_total.inc();
                    }
                }
            }
            if sent {
                for queued in waiting.iter().filter(|q| q.device == device.device) {
                    self.metrics
                        .tx_ack_latency_seconds
                        .observe(queued.at.elapsed().as_secs_f64());
                }
            }
        }
        if failed > 0 {
            warn!(
                failed,
                devices = outcome.devices.len(),
                error = %last_error,
                "transaction acks not sent; those terminals will resend and be acknowledged then"
            );
        }
    }

    /// Live events: every stored transaction (without line items) and every new conflict.
    fn announce(&self, outcome: CommitOutcome) {
        let now = posfleet_proto::now_ms();
        for device in outcome.devices {
            for (seq, txn_id) in &device.new_conflicts {
                warn!(device_id = %device.device, seq, "conflicting transaction refused: another record holds this seq");
                self.events.publish(FleetEvent::Alert {
                    device: device.device.to_string(),
                    alert: AlertKind::TransactionConflict,
                    severity: Severity::Critical,
                    seq: Some(*seq),
                    message: format!(
                        "terminal sent transaction {txn_id} as seq {seq}, which already holds \
                         another transaction; it was kept as a conflict, not stored"
                    ),
                    at_ms: now,
                });
            }
            for mut transaction in device.stored {
                transaction.items.clear();
                self.events.publish(FleetEvent::Transaction {
                    device: device.device.to_string(),
                    transaction: Box::new(transaction),
                });
            }
        }
    }
}

/// The acknowledgements for one device's part of a commit. Usually one; with more than
/// [`MAX_REJECTED_PER_ACK`] rejected seqs, several, each claiming no more than it lists
/// rejections for (ADR 0005: the terminal drops everything up to `durable_through_seq`
/// except the rejected seqs, so an ack must list every rejection at or below its watermark).
///
/// `gap` is set on the one that claims the device's watermark when the device has records
/// above a missing seq: the terminal then sends again from `durable_through_seq + 1` without
/// waiting.
pub(crate) fn acks_for(device: &DeviceOutcome) -> Vec<pb::TransactionAck> {
    let dts = device.durable_through_seq;
    let chunks: Vec<&[u64]> = device.rejected_seqs.chunks(MAX_REJECTED_PER_ACK).collect();
    if chunks.len() <= 1 {
        return vec![pb::TransactionAck {
            durable_through_seq: dts,
            rejected_seqs: device.rejected_seqs.clone(),
            gap: device.gap,
            retry_after_ms: 0,
        }];
    }
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let limit = chunks
                .get(i + 1)
                .and_then(|next| next.first())
                .map_or(dts, |first| dts.min(first - 1));
            pb::TransactionAck {
                durable_through_seq: limit,
                rejected_seqs: chunk.to_vec(),
                // Below the watermark nothing is missing: only the last ack may say gap.
                gap: device.gap && limit == dts,
                retry_after_ms: 0,
            }
        })
        .collect()
}

/// The acknowledgement that asks a refused terminal to wait `retry_after` and acknowledges
/// nothing.
pub(crate) fn retry_after_ack(retry_after: Duration) -> pb::TransactionAck {
    pb::TransactionAck {
        durable_through_seq: 0,
        rejected_seqs: Vec::new(),
        gap: false,
        retry_after_ms: u32::try_from(retry_after.as_millis())
            .unwrap_or(u32::MAX)
            .max(1),
    }
}

/// Tells each terminal whose batch the full queue refused to wait `retry_after`, at most once
/// per terminal per `retry_after` (a terminal with 4 batches in flight is refused up to 4
/// times in a row). Ends at `stop` or when the queue is gone.
async fn notify_refused<A: AckSink>(
    acks: A,
    mut refused: mpsc::Receiver<DeviceId>,
    retry_after: Duration,
    ack_timeout: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let ack = retry_after_ack(retry_after);
    // Terminals told within the last `retry_after`; pruned every `retry_after`, so it holds
    // at most the terminals refused within two periods.
    let mut told: HashMap<DeviceId, Instant> = HashMap::new();
    let mut pruned = Instant::now();
    loop {
        let device = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            device = refused.recv() => match device {
                Some(device) => device,
                None => return,
            },
        };
        let now = Instant::now();
        if now.duration_since(pruned) >= retry_after {
            told.retain(|_, at| now.duration_since(*at) < retry_after);
            pruned = now;
        }
        if told
            .get(&device)
            .is_some_and(|at| now.duration_since(*at) < retry_after)
        {
            continue;
        }
        told.insert(device.clone(), now);
        let publish = acks.publish_ack(&device, &ack);
        match tokio::time::timeout(ack_timeout, publish).await {
            Ok(Ok(())) => {
                metrics.tx_retry_after_total.inc();
            }
            Ok(Err(error)) => {
                metrics.tx_ack_failures_total.inc();
                debug!(device_id = %device, %error, "retry-after notice not sent");
            }
            Err(_) => {
                metrics.tx_ack_failures_total.inc();
                debug!(device_id = %device, "retry-after notice not sent in time");
            }
        }
    }
}
