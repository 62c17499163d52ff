//! The project's one MQTT client session, used by the agent and by the controller (with an
//! external broker; the embedded controller uses a local router link).
//!
//! [`spawn_session`] starts one task that owns the rumqttc [`EventLoop`](rumqttc::EventLoop)
//! and polls it continuously. Everyone else talks to the session through a cloneable
//! [`MqttHandle`] (publish, flush, disconnect, connection state) and reads what arrives from
//! the bounded [`SessionEvent`] receiver.
//!
//! What the session task does, so callers need not:
//!
//! - **mTLS** with the caller's [`rustls::ClientConfig`]; the broker certificate is checked
//!   against [`SessionConfig::host`].
//! - **Reconnects** with jittered exponential [`Backoff`] (full jitter) after every
//!   connection error; the attempt counter resets after a successful CONNACK.
//! - **Re-subscribes** [`SessionConfig::subscriptions`] (QoS 1) whenever CONNACK says
//!   `session_present = false` (always the case with a clean session, and after a broker
//!   restart). The SUBSCRIBE goes out before any queued publish.
//! - **Typed topics only**: publishes take a [`Topic`]; incoming publishes whose topic is
//!   not a posfleet topic are dropped with a warning and counted in
//!   [`SessionStats::invalid_topics`].
//! - **Size limits**: packets are limited to [`MAX_PACKET_SIZE`](posfleet_proto::MAX_PACKET_SIZE)
//!   both ways, and a payload larger than its channel allows is refused before it is queued
//!   (an oversized packet would otherwise kill the connection).
//!
//! # Back-pressure
//!
//! - Outgoing: the request queue holds [`SessionConfig::request_capacity`] requests.
//!   [`MqttHandle::publish`] waits for room; [`MqttHandle::try_publish`] fails with
//!   [`MqttError::QueueFull`] instead (for data that may be dropped, like telemetry).
//!   Requests queued while disconnected go out after the next connect.
//! - Incoming: the event channel holds [`SessionConfig::incoming_capacity`] events. When it is
//!   full the session task waits for the consumer and stops polling meanwhile (no reads, no
//!   pings). So **the task that consumes events must never wait on `publish`**: if the request
//!   queue were full at the same time, neither side could make progress. Consume events in
//!   their own task, or use `try_publish` there.
//!
//! # Delivery
//!
//! QoS 1 publishes that are unacknowledged when the broker reports `session_present = false`
//! are lost (rumqttc drops them). MQTT QoS is an optimisation; anything that must arrive needs
//! an application-level acknowledgement. [`MqttHandle::flush`] waits until every QoS 1 publish
//! queued so far has been acknowledged or is known to be lost.
//!
//! # Shutdown
//!
//! - Graceful: [`MqttHandle::disconnect`] queues an MQTT DISCONNECT behind every request
//!   already queued; the task ends after writing it (or at once if it is not connected).
//!   Bound it with a timeout: a DISCONNECT queued behind a full in-flight window waits for acks.
//! - Abrupt: cancelling the token passed to [`spawn_session`] ends the task at once; the
//!   broker then publishes the last will.

mod handle;
mod session;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use posfleet_proto::{CodecError, Filter, Topic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use handle::{MqttHandle, SessionStats};
pub use rumqttc::QoS;

use crate::backoff::Backoff;

/// Everything a session needs. Build it with [`SessionConfig::new`] and adjust the fields.
#[derive(Clone)]
pub struct SessionConfig {
    /// Broker host name or IP address. The broker's certificate must be valid for it.
    pub host: String,
    /// Broker TCP port (8883 for MQTT over TLS).
    pub port: u16,
    /// MQTT client id. The posfleet edge requires it to equal the certificate's identity
    /// (`Identity::client_id`).
    pub client_id: String,
    /// TLS client configuration: the trusted CAs and the client certificate (see [`crate::tls`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// MQTT keep-alive; zero or at least one second, at most 65535 s.
    pub keep_alive: Duration,
    /// Ask the broker to discard session state at connect (and at disconnect).
    pub clean_session: bool,
    /// Last will: published by the broker (QoS 1, not retained) if the connection ends without
    /// a DISCONNECT.
    pub last_will: Option<(Topic, Vec<u8>)>,
    /// Filters subscribed (QoS 1) after every CONNACK with `session_present = false`.
    pub subscriptions: Vec<Filter>,
    /// Delays between reconnect attempts.
    pub backoff: Backoff,
    /// Time allowed for TCP connect, TLS handshake and CONNACK together (whole seconds, >= 1).
    pub connect_timeout: Duration,
    /// QoS 1 publishes in flight (sent, not yet acknowledged) at most.
    pub inflight: u16,
    /// Requests (publishes, disconnect) queued towards the event loop at most.
    pub request_capacity: usize,
    /// Events queued towards the consumer at most; when full, the session waits.
    pub incoming_capacity: usize,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("keep_alive", &self.keep_alive)
            .field("clean_session", &self.clean_session)
            .field("last_will", &self.last_will.as_ref().map(|(t, _)| t))
            .field("subscriptions", &self.subscriptions)
            .field("backoff", &self.backoff)
            .field("connect_timeout", &self.connect_timeout)
            .field("inflight", &self.inflight)
            .field("request_capacity", &self.request_capacity)
            .field("incoming_capacity", &self.incoming_capacity)
            .finish_non_exhaustive()
    }
}

impl SessionConfig {
    /// A clean session with defaults: keep-alive 30 s, default backoff, connect timeout 10 s,
    /// 32 in flight, 64 queued requests, 64 queued events, no will, no subscriptions.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        client_id: impl Into<String>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            client_id: client_id.into(),
            tls,
            keep_alive: Duration::from_secs(30),
            clean_session: true,
            last_will: None,
            subscriptions: Vec::new(),
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            inflight: 32,
            request_capacity: 64,
            incoming_capacity: 64,
        }
    }

    /// Checks everything rumqttc would otherwise panic on or silently misuse.
    fn validate(&self) -> Result<(), MqttError> {
        let invalid = |field: &'static str, reason: &str| {
            Err(MqttError::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.host.is_empty() {
            return invalid("host", "must not be empty");
        }
        if self.client_id.is_empty() {
            return invalid("client_id", "must not be empty");
        }
        if !self.keep_alive.is_zero()
            && (self.keep_alive < Duration::from_secs(1)
                || self.keep_alive > Duration::from_secs(u64::from(u16::MAX)))
        {
            return invalid("keep_alive", "must be 0 or between 1 s and 65535 s");
        }
        if self.connect_timeout < Duration::from_secs(1) {
            return invalid("connect_timeout", "must be at least 1 s");
        }
        if self.inflight == 0 {
            return invalid("inflight", "must be at least 1");
        }
        if self.request_capacity == 0 {
            return invalid("request_capacity", "must be at least 1");
        }
        if self.incoming_capacity == 0 {
            return invalid("incoming_capacity", "must be at least 1");
        }
        if let Some((topic, payload)) = &self.last_will {
            posfleet_proto::codec::check_size(topic.channel(), payload.len())?;
        }
        Ok(())
    }
}

/// What the session reports to its consumer, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A CONNACK was accepted. With `session_present = false` the subscriptions have been
    /// re-queued, and earlier unacknowledged QoS 1 publishes are lost.
    Connected { session_present: bool },
    /// A publish on a posfleet topic arrived (already acknowledged to the broker).
    Message { topic: Topic, payload: Bytes },
    /// An established connection ended; the session reconnects after a backoff. Failed
    /// connection attempts are logged and counted, not reported here.
    Disconnected { error: String },
}

/// Why a session could not start or a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("invalid MQTT session setting {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("the MQTT request queue is full; try again later or drop the message")]
    QueueFull,
    #[error("the MQTT session has ended")]
    Closed,
    #[error(transparent)]
    Payload(#[from] CodecError),
    #[error("{outstanding} QoS 1 publish(es) still unacknowledged after {waited:?}")]
    FlushTimeout { outstanding: u64, waited: Duration },
}

/// Starts the session task on `tracker`. It connects at once and runs until
/// [`MqttHandle::disconnect`] completes or `cancel` is cancelled.
///
/// Fails only on an invalid configuration.
pub fn spawn_session(
    cfg: SessionConfig,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<(MqttHandle, mpsc::Receiver<SessionEvent>), MqttError> {
    cfg.validate()?;
    let (events_tx, events_rx) = mpsc::channel(cfg.incoming_capacity);
    let (handle, eventloop, task) = session::build(cfg, events_tx, cancel);
    tracker.spawn(task.run(eventloop));
    Ok((handle, events_rx))
}
