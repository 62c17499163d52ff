//! [`MqttHandle`]: the cloneable side of a session that everyone but the event-loop task uses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use posfleet_proto::Topic;
use posfleet_proto::codec::check_size;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::MqttError;

/// State shared between the handles and the session task.
pub(super) struct Shared {
    /// The MQTT client id, for logs and callers.
    pub(super) client_id: String,
    /// QoS 1/2 publishes queued by handles that are neither acknowledged nor known to be lost.
    /// [`MqttHandle::flush`] waits for it to reach zero.
    pub(super) outstanding: AtomicU64,
    /// Woken whenever `outstanding` decreases.
    pub(super) progress: Notify,
    /// Cancelled by [`MqttHandle::disconnect`]: the session ends after the DISCONNECT is written,
    /// or at once while it is not connected.
    pub(super) closing: CancellationToken,
    /// Cancelled when the session task has ended.
    pub(super) ended: CancellationToken,
    pub(super) counters: Counters,
}

impl Shared {
    pub(super) fn new(client_id: String) -> Self {
        Self {
            client_id,
            outstanding: AtomicU64::new(0),
            progress: Notify::new(),
            closing: CancellationToken::new(),
            ended: CancellationToken::new(),
            counters: Counters::default(),
        }
    }

    /// Records that `n` outstanding publishes were acknowledged or lost.
    pub(super) fn settle(&self, n: u64) {
        if n == 0 {
            return;
        }
        let _ = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
        self.progress.notify_waiters();
    }
}

/// Monotonic counters of one session.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) connects: AtomicU64,
    pub(super) connection_errors: AtomicU64,
    pub(super) failed_attempts: AtomicU64,
    pub(super) last_connack_ms: AtomicU64,
    pub(super) messages: AtomicU64,
    pub(super) invalid_topics: AtomicU64,
    pub(super) refused_subscriptions: AtomicU64,
    pub(super) lost_publishes: AtomicU64,
}

/// A snapshot of a session's counters (all monotonic since the session started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Successful CONNACKs.
    pub connects: u64,
    /// Failed connection attempts plus lost connections.
    pub connection_errors: u64,
    /// Connection attempts that ended without an accepted CONNACK (TCP, TLS, refusal,
    /// timeout); `connects + failed_attempts` is every attempt made.
    pub failed_attempts: u64,
    /// Wall-clock time of the last accepted CONNACK, ms since the Unix epoch (0: never).
    pub last_connack_ms: u64,
    /// Incoming publishes handed to the consumer.
    pub messages: u64,
    /// Incoming publishes dropped because their topic is not a posfleet topic.
    pub invalid_topics: u64,
    /// Subscription filters the broker refused in a SUBACK.
    pub refused_subscriptions: u64,
    /// Unacknowledged QoS 1 publishes discarded because the broker had no session for us.
    pub lost_publishes: u64,
}

impl SessionStats {
    /// Connection attempts made so far: accepted ones plus failed ones.
    pub fn attempts(&self) -> u64 {
        self.connects.saturating_add(self.failed_attempts)
    }
}

/// Cloneable handle to a running session (see the [module docs](super)).
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    shared: Arc<Shared>,
    connected: watch::Receiver<bool>,
}

impl std::fmt::Debug for MqttHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttHandle")
            .field("client_id", &self.shared.client_id)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// Undoes the `outstanding` increment of a publish that never reached the queue (error, or the
/// caller dropped the future while it waited for room).
struct Pending<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.settle(1);
        }
    }
}

impl MqttHandle {
    pub(super) fn new(
        client: AsyncClient,
        shared: Arc<Shared>,
        connected: watch::Receiver<bool>,
    ) -> Self {
        Self {
            client,
            shared,
            connected,
        }
    }

    /// The MQTT client id of this session.
    pub fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    /// Queues a publish (not retained), waiting for room in the request queue.
    ///
    /// Returns once the request is queued, not when it is sent or acknowledged (see
    /// [`MqttHandle::flush`]). Fails with [`MqttError::Payload`] if `payload` is larger than
    /// `topic`'s channel allows, and with [`MqttError::Closed`] once the session is ending.
    /// Cancel-safe: dropping the future before it completes queues nothing.
    pub async fn publish(
        &self,
        topic: &Topic,
        payload: Vec<u8>,
        qos: QoS,
    ) -> Result<(), MqttError> {
        let guard = self.admit(topic, &payload, qos)?;
        let result = self
            .client
            .publish(topic.to_string(), qos, false, payload)
            .await;
        self.finish(guard, result.is_ok())
    }

    /// Queues a publish without waiting: fails with [`MqttError::QueueFull`] when the request
    /// queue is full. For data that may be dropped under pressure.
    pub fn try_publish(&self, topic: &Topic, payload: Vec<u8>, qos: QoS) -> Result<(), MqttError> {
        let guard = self.admit(topic, &payload, qos)?;
        let result = self
            .client
            .try_publish(topic.to_string(), qos, false, payload);
        if result.is_err() && !self.shared.ended.is_cancelled() {
            drop(guard);
            return Err(MqttError::QueueFull);
        }
        self.finish(guard, result.is_ok())
    }

    fn admit(&self, topic: &Topic, payload: &[u8], qos: QoS) -> Result<Pending<'_>, MqttError> {
        check_size(topic.channel(), payload.len())?;
        if self.shared.closing.is_cancelled() || self.shared.ended.is_cancelled() {
            return Err(MqttError::Closed);
        }
        let armed = qos != QoS::AtMostOnce;
        if armed {
            self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
        }
        Ok(Pending {
            shared: &self.shared,
            armed,
        })
    }

    fn finish(&self, mut guard: Pending<'_>, queued: bool) -> Result<(), MqttError> {
        if queued {
            guard.armed = false;
            Ok(())
        } else {
            Err(MqttError::Closed)
        }
    }

    /// Waits until every QoS 1 publish queued so far (by any clone of this handle) has been
    /// acknowledged by the broker or is known to be lost, for at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), MqttError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outstanding = self.shared.outstanding.load(Ordering::Acquire);
            if outstanding == 0 {
                return Ok(());
            }
            if self.shared.ended.is_cancelled() {
                return Err(MqttError::Closed);
            }
            tokio::select! {
                () = &mut notified => {}
                () = self.shared.ended.cancelled() => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(MqttError::FlushTimeout { outstanding, waited: timeout });
                }
            }
        }
    }

    /// Ends the session gracefully: queues an MQTT DISCONNECT behind every request already
    /// queued and waits until the session task has ended. While not connected the session ends
    /// at once. New publishes are refused from now on. Idempotent.
    ///
    /// Bound it with a timeout and cancel the session's token if it expires: a DISCONNECT
    /// queued behind a full in-flight window waits for the broker's acks.
    pub async fn disconnect(&self) {
        self.shared.closing.cancel();
        if !self.shared.ended.is_cancelled() {
            // Fails only when the session task is already gone, which is the goal anyway.
            let _ = self.client.disconnect().await;
        }
        self.shared.ended.cancelled().await;
    }

    /// True while a connection is established (between CONNACK and the connection's end).
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// A receiver of the connection state, to wait for changes.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Waits until the session task has ended (after [`MqttHandle::disconnect`] or
    /// cancellation).
    pub async fn closed(&self) {
        self.shared.ended.cancelled().await;
    }

    /// True once the session task has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.ended.is_cancelled()
    }

    /// The session's counters.
    pub fn stats(&self) -> SessionStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SessionStats {
            connects: get(&c.connects),
            connection_errors: get(&c.connection_errors),
            failed_attempts: get(&c.failed_attempts),
            last_connack_ms: get(&c.last_connack_ms),
            messages: get(&c.messages),
            invalid_topics: get(&c.invalid_topics),
            refused_subscriptions: get(&c.refused_subscriptions),
            lost_publishes: get(&c.lost_publishes),
        }
    }
}
