//! The sender of one terminal: outbox entries to the controller as `TransactionBatch`es, and
//! the controller's `TransactionAck`s back into the outbox (ADR 0005).
//!
//! - Batches are runs of consecutive seqs, at most [`OutboxSettings::batch_max_transactions`]
//!   entries and the channel's payload limit, published (QoS 1) when full or after
//!   [`OutboxSettings::linger`]. Only entries the outbox has made durable are ever sent.
//! - At most [`OutboxSettings::max_in_flight`] batches wait for their ack. Without progress
//!   for [`OutboxSettings::resend_timeout`] (each wait drawn from ±25% of it, so terminals
//!   refused by the same burst do not resend together), and after every reconnect, sending
//!   starts again from the lowest unacknowledged seq.
//! - Back-pressure (docs/decisions/0014-transaction-back-pressure.md): an ack that says `gap`
//!   (a batch sent before an acknowledged one never reached the store) starts sending again
//!   from the lowest unacknowledged seq at once, once per watermark; an ack with
//!   `retry_after_ms` (the controller's queue refused a batch) holds every batch for that long
//!   (drawn from 50–150% of it, capped at [`MAX_RETRY_AFTER`]), then sending starts again
//!   from the lowest unacknowledged seq.
//! - Acks arrive through the [`AckInbox`], which the agent's event consumer fills without
//!   ever waiting (see the MQTT session's back-pressure rules). The inbox checks each ack
//!   against what was sent: a malformed ack, or one that covers or rejects a seq that was
//!   never sent, is logged, counted and ignored, so it can never remove an unsent entry.
//!   Acks are cumulative: a late, duplicated or out-of-order ack changes nothing.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use posfleet_proto::{Channel, DeviceId, Topic, decode, pb};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::{DeviceOutbox, OutboxSettings};
use posfleet_runtime::mqtt::{MqttError, MqttHandle, QoS};

/// Longest wait for room in the MQTT request queue for one batch.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of framing per transaction inside a batch, at most (tag + length varint).
const FRAMING: usize = 6;
/// Pause after a failed outbox read or publish before trying again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Longest hold a controller's retry-after can impose (a larger value is capped, not
/// refused: the controller is trusted, but a terminal must not stop sending for hours).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// What the inbox made of one incoming ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckVerdict {
    Accepted,
    /// Not a `TransactionAck`.
    Malformed,
    /// Covers or rejects a seq that was never sent.
    Bogus,
}

/// Counters of the acks one terminal received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckStats {
    pub accepted: u64,
    pub malformed: u64,
    pub bogus: u64,
}

/// Acks waiting for the sender, merged (they are cumulative).
#[derive(Debug, Default)]
pub struct AckInbox {
    state: Mutex<InboxState>,
    /// Wakes the sender.
    notify: Notify,
    accepted: AtomicU64,
    malformed: AtomicU64,
    bogus: AtomicU64,
}

#[derive(Debug, Default)]
struct InboxState {
    /// The highest seq handed to MQTT in this process: nothing above it may be acknowledged.
    highest_sent: u64,
    /// The highest valid `durable_through_seq` not yet taken by the sender (0: none).
    through: u64,
    /// Valid rejected seqs not yet taken by the sender.
    rejected: BTreeSet<u64>,
    /// The highest watermark an ack reported a gap above, not yet taken.
    gap_above: Option<u64>,
    /// The longest retry-after asked for and not yet taken (capped).
    retry_after: Option<Duration>,
}

/// What the acks that arrived since the sender last looked say, merged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckNews {
    /// The highest `durable_through_seq` (0: none).
    pub through: u64,
    /// Every rejected seq, sorted.
    pub rejected: Vec<u64>,
    /// The highest watermark above which an ack reported a gap.
    pub gap_above: Option<u64>,
    /// The longest retry-after asked for, capped at [`MAX_RETRY_AFTER`].
    pub retry_after: Option<Duration>,
}

impl AckInbox {
    /// Decodes, checks and merges one ack payload. Never waits.
    pub fn offer(&self, device: &DeviceId, payload: &[u8]) -> AckVerdict {
        let ack = match decode::<pb::TransactionAck>(payload) {
            Ok(ack) => ack,
            Err(error) => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                warn!(device_id = %device, %error, "malformed transaction ack ignored");
                return AckVerdict::Malformed;
            }
        };
        let mut state = self.lock();
        let beyond = ack.durable_through_seq > state.highest_sent
            || ack
                .rejected_seqs
                .iter()
                .any(|s| *s == 0 || *s > state.highest_sent);
        if beyond {
            let highest_sent = state.highest_sent;
            drop(state);
            self.bogus.fetch_add(1, Ordering::Relaxed);
            warn!(
                device_id = %device,
                durable_through_seq = ack.durable_through_seq,
                rejected = ack.rejected_seqs.len(),
                highest_sent,
                "transaction ack covers seqs that were never sent; ignored"
            );
            return AckVerdict::Bogus;
        }
        state.through = state.through.max(ack.durable_through_seq);
        state.rejected.extend(ack.rejected_seqs);
        if ack.gap {
            state.gap_above = state.gap_above.max(Some(ack.durable_through_seq));
        }
        if ack.retry_after_ms > 0 {
            let wait = Duration::from_millis(u64::from(ack.retry_after_ms)).min(MAX_RETRY_AFTER);
            state.retry_after = state.retry_after.max(Some(wait));
        }
        drop(state);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
        AckVerdict::Accepted
    }

    pub fn stats(&self) -> AckStats {
        AckStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            bogus: self.bogus.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn sent_through(&self, seq: u64) {
        let mut state = self.lock();
        state.highest_sent = state.highest_sent.max(seq);
    }

    pub(crate) fn take(&self) -> Option<AckNews> {
        let mut state = self.lock();
        let news = AckNews {
            through: std::mem::take(&mut state.through),
            rejected: std::mem::take(&mut state.rejected).into_iter().collect(),
            gap_above: state.gap_above.take(),
            retry_after: state.retry_after.take(),
        };
        (news != AckNews::default()).then_some(news)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        // The state stays consistent at every statement; a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The per-terminal sender task.
pub(crate) struct Sender {
    outbox: DeviceOutbox,
    mqtt: MqttHandle,
    inbox: std::sync::Arc<AckInbox>,
    settings: OutboxSettings,
    /// Connection generation: bumped at every connect.
    online: watch::Receiver<u64>,
    /// Highest durable seq.
    committed: watch::Receiver<u64>,
    topic: Topic,
    /// Every seq up to here has left the outbox (acknowledged).
    acked: u64,
    /// The next seq to publish.
    next: u64,
    /// Last seq of each published, unacknowledged batch, oldest first.
    in_flight: VecDeque<u64>,
    /// When to start again from `acked + 1` if no ack makes progress.
    resend_at: Option<Instant>,
    /// When a partial batch is due.
    linger_until: Option<Instant>,
    /// The controller asked for a pause: nothing is published before this, then sending
    /// starts again from `acked + 1`.
    hold_until: Option<Instant>,
    /// The watermark of the last rewind for a reported gap (one rewind per watermark: acks
    /// of batches sent before that rewind report the same gap again).
    gap_rewound: Option<u64>,
}

impl Sender {
    pub(crate) fn new(
        outbox: DeviceOutbox,
        mqtt: MqttHandle,
        inbox: std::sync::Arc<AckInbox>,
        settings: OutboxSettings,
        online: watch::Receiver<u64>,
    ) -> Self {
        let committed = outbox.committed();
        let topic = Topic::for_device(outbox.device_id(), Channel::Transactions);
        Self {
            outbox,
            mqtt,
            inbox,
            settings,
            online,
            committed,
            topic,
            acked: 0,
            next: 1,
            in_flight: VecDeque::new(),
            resend_at: None,
            linger_until: None,
            hold_until: None,
            gap_rewound: None,
        }
    }

    pub(crate) async fn run(self, cancel: CancellationToken) {
        let span = info_span!("outbox_sender", device_id = %self.outbox.device_id());
        self.run_inner(cancel).instrument(span).await;
    }

    async fn run_inner(mut self, cancel: CancellationToken) {
        // The committed seq is read *before* the outbox: were it read after finding the outbox
        // empty, a transaction committed in between would count as acknowledged and never be
        // sent (and, the controller never getting that seq, no later one would be acked).
        let committed = *self.committed.borrow();
        match self.outbox.first_pending().await {
            Ok(Some(first)) => self.acked = first - 1,
            Ok(None) => self.acked = committed,
            Err(error) => warn!(%error, "cannot read the outbox; sending from seq 1"),
        }
        self.next = self.acked + 1;
        loop {
            if let Some(news) = self.inbox.take() {
                self.apply_news(news).await;
            }
            let now = Instant::now();
            if self.hold_until.is_some_and(|at| now >= at) {
                debug!(from = self.acked + 1, "retry-after over; sending again");
                self.hold_until = None;
                self.rewind();
            }
            if self.resend_at.is_some_and(|at| now >= at) {
                debug!(from = self.acked + 1, "no ack in time; sending again");
                self.rewind();
            }
            let committed = *self.committed.borrow();
            let can_send = self.hold_until.is_none()
                && self.mqtt.is_connected()
                && self.in_flight.len() < self.settings.max_in_flight
                && self.next <= committed;
            if can_send {
                let available = committed - self.next + 1;
                let full = available >= self.settings.batch_max_transactions as u64;
                let deadline = *self.linger_until.get_or_insert(now + self.settings.linger);
                if full || now >= deadline {
                    self.linger_until = None;
                    match self.send_batch(committed, &cancel).await {
                        Ok(()) => continue,
                        Err(Stop) => break,
                    }
                }
            }
            let linger = self.linger_until.filter(|_| can_send);
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                changed = self.online.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    // A new connection: whatever was in flight may be lost.
                    self.rewind();
                }
                () = self.inbox.notify.notified() => {}
                changed = self.committed.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = sleep_until_opt(linger) => {}
                () = sleep_until_opt(self.resend_at) => {}
                () = sleep_until_opt(self.hold_until) => {}
            }
        }
        debug!("outbox sender stopped");
    }

    /// Start again from the lowest unacknowledged seq.
    fn rewind(&mut self) {
        self.next = self.acked + 1;
        self.in_flight.clear();
        self.resend_at = None;
        self.linger_until = None;
    }

    /// Applies what the acks said: progress and rejections, then a gap or a retry-after.
    async fn apply_news(&mut self, news: AckNews) {
        self.apply_ack(news.through, news.rejected).await;
        if let Some(wait) = news.retry_after {
            // Nothing goes out until the hold ends; then everything unacknowledged goes again.
            debug!(
                ?wait,
                "the controller is behind; holding transaction batches"
            );
            self.hold_until = Some(Instant::now() + jittered(wait, 0.5, 1.5));
            self.resend_at = None;
        }
        // A gap right above what is acknowledged: the batch carrying `acked + 1` is lost.
        // A gap report below `acked` is stale (closed since).
        if let Some(above) = news.gap_above {
            if above == self.acked && self.gap_rewound != Some(above) && self.hold_until.is_none() {
                debug!(
                    from = self.acked + 1,
                    "the controller reports a gap; sending again"
                );
                self.gap_rewound = Some(above);
                self.rewind();
            }
        }
    }

    async fn apply_ack(&mut self, through: u64, rejected: Vec<u64>) {
        self.outbox.note_ack();
        if through > self.acked || !rejected.is_empty() {
            match self.outbox.ack(through.max(self.acked), rejected).await {
                Ok(outcome) => {
                    if outcome.dead_lettered > 0 {
                        warn!(
                            count = outcome.dead_lettered,
                            "the controller refused transactions as conflicts; kept as dead letters"
                        );
                    }
                    if outcome.late_rejections > 0 {
                        warn!(
                            count = outcome.late_rejections,
                            "the controller refused transactions that had already been acknowledged"
                        );
                    }
                }
                Err(error) => warn!(%error, "cannot remove acknowledged transactions"),
            }
        }
        if through > self.acked {
            self.acked = through;
            while self.in_flight.front().is_some_and(|last| *last <= through) {
                self.in_flight.pop_front();
            }
            self.next = self.next.max(through + 1);
            self.resend_at = (!self.in_flight.is_empty()).then(|| self.resend_deadline());
        }
    }

    /// When to resend if no ack makes progress: the resend timeout, ±25%.
    fn resend_deadline(&self) -> Instant {
        Instant::now() + jittered(self.settings.resend_timeout, 0.75, 1.25)
    }

    async fn send_batch(&mut self, committed: u64, cancel: &CancellationToken) -> Result<(), Stop> {
        let max = self.settings.batch_max_transactions.max(1);
        let max_bytes = Channel::Transactions.max_payload() - FRAMING * max;
        let entries = match self
            .outbox
            .read_run(self.next, committed, max, max_bytes)
            .await
        {
            Ok(entries) => entries,
            Err(error) => {
                warn!(%error, "cannot read the outbox");
                tokio::select! {
                    () = cancel.cancelled() => return Err(Stop),
                    () = tokio::time::sleep(ERROR_PAUSE) => return Ok(()),
                }
            }
        };
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            // Everything up to `committed` left the outbox already.
            self.next = committed + 1;
            return Ok(());
        };
        let (first, last) = (first.seq, last.seq);
        let payload = batch_payload(entries.iter().map(|e| e.encoded.as_ref()));
        self.inbox.sent_through(last);
        let publish = self.mqtt.publish(&self.topic, payload, QoS::AtLeastOnce);
        let queued = tokio::select! {
            () = cancel.cancelled() => return Err(Stop),
            queued = tokio::time::timeout(PUBLISH_TIMEOUT, publish) => queued,
        };
        match queued {
            Ok(Ok(())) => {
                debug!(first, last, "transaction batch published");
                self.next = last + 1;
                self.in_flight.push_back(last);
                if self.resend_at.is_none() {
                    self.resend_at = Some(self.resend_deadline());
                }
                Ok(())
            }
            Ok(Err(MqttError::Closed)) => Err(Stop),
            Ok(Err(error)) => {
                warn!(%error, first, last, "transaction batch not published");
                tokio::select! {
                    () = cancel.cancelled() => Err(Stop),
                    () = tokio::time::sleep(ERROR_PAUSE) => Ok(()),
                }
            }
            Err(_) => {
                debug!(
                    first,
                    last, "MQTT request queue full; batch not published yet"
                );
                Ok(())
            }
        }
    }
}

/// The sender should end (cancelled or the session is gone).
struct Stop;

/// `base` scaled by a factor drawn uniformly from `[low, high]`.
fn jittered(base: Duration, low: f64, high: f64) -> Duration {
    use rand::Rng;
    base.mul_f64(rand::rng().random_range(low..=high))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A `TransactionBatch` payload from encoded `Transaction`s: each one as field 1
/// (length-delimited), which is exactly what encoding the batch message would produce.
pub(crate) fn batch_payload<'a>(encoded: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for txn in encoded {
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(txn.len() as u64, &mut out);
        out.extend_from_slice(txn);
    }
    out
}
