//! The session task: the only owner of the rumqttc event loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use posfleet_proto::{Filter, MAX_PACKET_SIZE, Topic};
use rumqttc::{
    AsyncClient, ConnAck, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions,
    Outgoing, Packet, Publish, QoS, Request, SubAck, Subscribe, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::handle::Shared;
use super::{MqttHandle, SessionConfig, SessionEvent};
use crate::backoff::Retry;

/// Failed attempts in a row after the first that are logged at debug only; every this many
/// a warning is logged again, so a long outage stays visible without flooding the log.
const WARN_EVERY: u32 = 10;

/// The state the session task owns besides the event loop.
pub(super) struct SessionTask {
    shared: Arc<Shared>,
    /// To the consumer; bounded (back-pressure, see the module docs).
    events: mpsc::Sender<SessionEvent>,
    /// Connection state for [`MqttHandle::is_connected`].
    connected: watch::Sender<bool>,
    /// Re-subscribed after every CONNACK without a session.
    subscriptions: Vec<Filter>,
    /// Reconnect delays.
    retry: Retry,
    /// Abrupt stop.
    cancel: CancellationToken,
}

/// Builds the rumqttc client and event loop for a validated `cfg`.
pub(super) fn build(
    cfg: SessionConfig,
    events: mpsc::Sender<SessionEvent>,
    cancel: CancellationToken,
) -> (MqttHandle, EventLoop, SessionTask) {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        cfg.tls.clone(),
    )))
    .set_keep_alive(cfg.keep_alive)
    .set_clean_session(cfg.clean_session)
    .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE)
    .set_inflight(cfg.inflight);
    if let Some((topic, payload)) = cfg.last_will {
        opts.set_last_will(LastWill::new(
            topic.to_string(),
            payload,
            QoS::AtLeastOnce,
            false,
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, cfg.request_capacity);
    let mut network = NetworkOptions::new();
    network.set_connection_timeout(cfg.connect_timeout.as_secs());
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);

    let shared = Arc::new(Shared::new(cfg.client_id));
    let (connected_tx, connected_rx) = watch::channel(false);
    let handle = MqttHandle::new(client, shared.clone(), connected_rx);
    let task = SessionTask {
        shared,
        events,
        connected: connected_tx,
        subscriptions: cfg.subscriptions,
        retry: Retry::new(cfg.backoff),
        cancel,
    };
    (handle, eventloop, task)
}

/// What the loop does after handling one poll result.
enum Next {
    Continue,
    Stop,
}

impl SessionTask {
    pub(super) async fn run(self, eventloop: EventLoop) {
        let span = info_span!("mqtt", client_id = %self.shared.client_id);
        self.run_inner(eventloop).instrument(span).await;
    }

    async fn run_inner(mut self, mut eventloop: EventLoop) {
        loop {
            let connecting = eventloop.network.is_none();
            if connecting && self.shared.closing.is_cancelled() {
                debug!("disconnect requested while not connected");
                break;
            }
            // rumqttc clears `pending` (unacked QoS 1 publishes and requests drained at the
            // last error) when the broker has no session for us: count them before they go.
            let at_risk = if connecting {
                qos_publishes(&eventloop)
            } else {
                0
            };
            let polled = tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                () = self.shared.closing.cancelled(), if connecting => break,
                polled = eventloop.poll() => polled,
            };
            let next = match polled {
                Ok(event) => self.on_event(event, &mut eventloop, at_risk).await,
                Err(error) => self.on_error(&error).await,
            };
            if matches!(next, Next::Stop) {
                break;
            }
        }
        self.set_connected(false);
        self.shared.ended.cancel();
        self.shared.progress.notify_waiters();
        debug!("session ended");
    }

    async fn on_event(&mut self, event: Event, eventloop: &mut EventLoop, at_risk: u64) -> Next {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => self.on_connack(ack, eventloop, at_risk).await,
            Event::Incoming(Packet::Publish(publish)) => self.on_publish(publish).await,
            Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) => {
                self.shared.settle(1);
                Next::Continue
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                self.on_suback(&ack);
                Next::Continue
            }
            Event::Outgoing(Outgoing::Disconnect) => {
                info!("disconnected gracefully");
                Next::Stop
            }
            _ => Next::Continue,
        }
    }

    async fn on_connack(&mut self, ack: ConnAck, eventloop: &mut EventLoop, at_risk: u64) -> Next {
        self.retry.reset();
        let counters = &self.shared.counters;
        counters.connects.fetch_add(1, Ordering::Relaxed);
        counters
            .last_connack_ms
            .store(posfleet_proto::now_ms(), Ordering::Relaxed);
        if !ack.session_present {
            if at_risk > 0 {
                warn!(
                    lost = at_risk,
                    "broker has no session: unacknowledged QoS 1 publishes were discarded"
                );
                self.shared
                    .counters
                    .lost_publishes
                    .fetch_add(at_risk, Ordering::Relaxed);
                self.shared.settle(at_risk);
            }
            if !self.subscriptions.is_empty() {
                let filters = self
                    .subscriptions
                    .iter()
                    .map(|f| SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
                // `pending` is sent before anything in the request queue, and pushing to it
                // cannot block this task (unlike `AsyncClient::subscribe`).
                eventloop
                    .pending
                    .push_front(Request::Subscribe(Subscribe::new_many(filters)));
            }
        }
        info!(session_present = ack.session_present, "connected");
        self.set_connected(true);
        self.emit(SessionEvent::Connected {
            session_present: ack.session_present,
        })
        .await
    }

    async fn on_publish(&mut self, publish: Publish) -> Next {
        match Topic::parse(&publish.topic) {
            Ok(topic) => {
                self.shared
                    .counters
                    .messages
                    .fetch_add(1, Ordering::Relaxed);
                self.emit(SessionEvent::Message {
                    topic,
                    payload: publish.payload,
                })
                .await
            }
            Err(error) => {
                self.shared
                    .counters
                    .invalid_topics
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%error, topic_len = publish.topic.len(), "dropped a publish on a non-posfleet topic");
                Next::Continue
            }
        }
    }

    fn on_suback(&self, ack: &SubAck) {
        let refused = ack
            .return_codes
            .iter()
            .filter(|c| matches!(c, SubscribeReasonCode::Failure))
            .count();
        if refused > 0 {
            let refused = u64::try_from(refused).unwrap_or(u64::MAX);
            self.shared
                .counters
                .refused_subscriptions
                .fetch_add(refused, Ordering::Relaxed);
            warn!(refused, "broker refused subscriptions");
        }
    }

    async fn on_error(&mut self, error: &ConnectionError) -> Next {
        self.shared
            .counters
            .connection_errors
            .fetch_add(1, Ordering::Relaxed);
        let was_connected = *self.connected.borrow();
        let delay = self.retry.next_delay();
        let attempt = self.retry.attempt();
        if was_connected {
            warn!(%error, retry_in = ?delay, "connection lost");
            self.set_connected(false);
            if matches!(
                self.emit(SessionEvent::Disconnected {
                    error: error.to_string(),
                })
                .await,
                Next::Stop
            ) {
                return Next::Stop;
            }
        } else {
            self.shared
                .counters
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            if attempt == 1 || attempt % WARN_EVERY == 0 {
                warn!(%error, attempt, retry_in = ?delay, "connection attempt failed");
            } else {
                debug!(%error, attempt, retry_in = ?delay, "connection attempt failed");
            }
        }
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Next::Stop,
            () = self.shared.closing.cancelled() => Next::Stop,
            () = tokio::time::sleep(delay) => Next::Continue,
        }
    }

    /// Hands an event to the consumer, waiting while its queue is full. Events are dropped
    /// once a graceful disconnect was requested and the queue is full (the consumer is going
    /// away), and when the consumer has dropped its receiver.
    async fn emit(&self, event: SessionEvent) -> Next {
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Next::Stop,
            _ = self.events.send(event) => Next::Continue,
            () = self.shared.closing.cancelled() => Next::Continue,
        }
    }

    fn set_connected(&self, connected: bool) {
        self.connected.send_if_modified(|c| {
            let changed = *c != connected;
            *c = connected;
            changed
        });
    }
}

/// QoS 1/2 publishes waiting in the event loop's `pending` queue.
fn qos_publishes(eventloop: &EventLoop) -> u64 {
    let n = eventloop
        .pending
        .iter()
        .filter(|r| matches!(r, Request::Publish(p) if p.qos != QoS::AtMostOnce))
        .count();
    u64::try_from(n).unwrap_or(u64::MAX)
}
