//! The agent's two tasks besides the MQTT session: the event consumer and the runtime loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use posfleet_proto::{Channel, ChannelMessage, DeviceId, Topic, encode, pb};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::report::{self, OutboxCounts, Reporter};
use super::{AgentSettings, AgentStats};
use crate::outbox::AckInbox;
use crate::state::TerminalStatus;
use crate::telemetry::{SensorProvider, SystemProvider};
use crate::transaction::TransactionIntake;
use posfleet_runtime::mqtt::{MqttError, MqttHandle, QoS, SessionEvent};

/// Longest wait for room in the request queue for a heartbeat or presence; after it the
/// message is skipped (the loop must keep its rhythm and notice cancellation).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time for the DISCONNECT after the shutdown grace.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads session events; never publishes and never waits on anyone (see the session's
/// back-pressure rules): acks go to the sender's inbox, which merges them; commands to the
/// executor's bounded queue (dropped and counted when it is full).
pub(super) async fn consume_events(
    id: DeviceId,
    mut events: mpsc::Receiver<SessionEvent>,
    online: watch::Sender<u64>,
    stats: Arc<AgentStats>,
    (inbox, commands): (Arc<AckInbox>, mpsc::Sender<Bytes>),
) {
    let span = info_span!("agent_events", device_id = %id);
    async move {
        while let Some(event) = events.recv().await {
            match event {
                SessionEvent::Connected { .. } => online.send_modify(|generation| *generation += 1),
                SessionEvent::Message { topic, payload } => {
                    stats.downlink.fetch_add(1, Ordering::Relaxed);
                    if topic.device() != &id {
                        warn!(
                            channel = topic.channel().name(),
                            "downlink message for another device ignored"
                        );
                    } else if topic.channel() == Channel::TransactionAck {
                        inbox.offer(&id, &payload);
                    } else if topic.channel() == Channel::Command {
                        match commands.try_send(payload) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                stats.commands_dropped.fetch_add(1, Ordering::Relaxed);
                                warn!("command queue full; command dropped (the controller sends it again)");
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                debug!("command executor stopped; command ignored");
                            }
                        }
                    } else {
                        debug!(
                            channel = topic.channel().name(),
                            len = payload.len(),
                            "downlink message on a channel the agent does not read; ignored"
                        );
                    }
                }
                // The session logs it; the runtime notices through `is_connected`.
                SessionEvent::Disconnected { .. } => {}
            }
        }
    }
    .instrument(span)
    .await;
}

/// The runtime loop of one agent.
pub(super) struct Runtime {
    id: DeviceId,
    settings: AgentSettings,
    /// Builds Presence, ReportedState and Heartbeat messages.
    reporter: Reporter,
    mqtt: MqttHandle,
    /// `None` only while it is out on the blocking pool (or after it panicked there).
    system: Option<Box<dyn SystemProvider>>,
    sensors: Box<dyn SensorProvider>,
    stats: Arc<AgentStats>,
    /// Outbox depth for heartbeats; lock state for the reported state.
    intake: TransactionIntake,
    /// Sequence number of the next heartbeat (starts at 1).
    next_seq: u64,
    /// Telemetry samples dropped since the last one queued.
    dropped: u32,
}

impl Runtime {
    pub(super) fn new(
        id: DeviceId,
        settings: AgentSettings,
        reporter: Reporter,
        mqtt: MqttHandle,
        (system, sensors): (Box<dyn SystemProvider>, Box<dyn SensorProvider>),
        stats: Arc<AgentStats>,
        intake: TransactionIntake,
    ) -> Self {
        Self {
            id,
            settings,
            reporter,
            mqtt,
            system: Some(system),
            sensors,
            stats,
            intake,
            next_seq: 1,
            dropped: 0,
        }
    }

    fn topic(&self, channel: Channel) -> Topic {
        Topic::for_device(&self.id, channel)
    }

    pub(super) async fn run(
        self,
        online: watch::Receiver<u64>,
        cancel: CancellationToken,
        session_cancel: CancellationToken,
    ) {
        let span = info_span!("agent", device_id = %self.id);
        // Ends the session however this task ends (including a panic).
        let _session = session_cancel.drop_guard();
        self.run_inner(online, cancel).instrument(span).await;
    }

    async fn run_inner(mut self, mut online: watch::Receiver<u64>, cancel: CancellationToken) {
        let mut status = self.intake.live().subscribe();
        status.mark_unchanged();
        info!(
            boot_id = %report::boot_id_text(self.reporter.boot_id()),
            broker = %self.settings.broker,
            "agent starting"
        );
        // The first heartbeat and sample are due one period after start, by when the first
        // connection is normally up (a sample due before it would count as dropped).
        let start = Instant::now();
        let mut heartbeat = tokio::time::interval_at(
            start + self.settings.heartbeat_interval,
            self.settings.heartbeat_interval,
        );
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut telemetry = tokio::time::interval_at(
            start + self.settings.telemetry_interval,
            self.settings.telemetry_interval,
        );
        telemetry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                changed = online.changed() => {
                    if changed.is_err() {
                        warn!("MQTT session ended unexpectedly");
                        break;
                    }
                    self.announce().await;
                }
                changed = status.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = status.borrow_and_update().clone();
                    self.report_state(&current).await;
                }
                _ = heartbeat.tick() => self.heartbeat().await,
                _ = telemetry.tick() => self.telemetry().await,
            }
        }
        self.shutdown().await;
    }

    /// After each connect: who and what we are.
    async fn announce(&mut self) {
        let status = self.intake.live().get();
        let online = self.reporter.online(&status);
        let state = self.reporter.reported_state(&status);
        if publish(&self.mqtt, &self.id, &online).await
            && publish(&self.mqtt, &self.id, &state).await
        {
            debug!("presence and state published");
        }
    }

    /// After a change of the lock or configuration.
    async fn report_state(&mut self, status: &TerminalStatus) {
        if !self.mqtt.is_connected() {
            // Sent at the next connect anyway.
            return;
        }
        let state = self.reporter.reported_state(status);
        if publish(&self.mqtt, &self.id, &state).await {
            debug!(
                locked = status.locked,
                config_version = status.config_version,
                "state published"
            );
        }
    }

    async fn heartbeat(&mut self) {
        if !self.mqtt.is_connected() {
            self.stats
                .heartbeats_skipped
                .fetch_add(1, Ordering::Relaxed);
            debug!("heartbeat skipped: not connected");
            return;
        }
        let outbox = self.intake.outbox();
        let counts = OutboxCounts::new(outbox.depth(), outbox.dead_letter_count());
        let hb = self
            .reporter
            .heartbeat(self.next_seq, counts, &self.intake.live().get());
        if publish(&self.mqtt, &self.id, &hb).await {
            self.next_seq += 1;
            self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats
                .heartbeats_skipped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn telemetry(&mut self) {
        if !self.mqtt.is_connected() {
            self.drop_sample("not connected");
            return;
        }
        let system = self.sample_system().await;
        let sensors = self.sensors.sample();
        let sample = report::telemetry(system, sensors, self.dropped);
        let queued = encode(&sample)
            .map_err(MqttError::from)
            .and_then(|payload| {
                self.mqtt
                    .try_publish(&self.topic(Channel::Telemetry), payload, QoS::AtLeastOnce)
            });
        match queued {
            Ok(()) => {
                self.dropped = 0;
                self.stats.telemetry.fetch_add(1, Ordering::Relaxed);
            }
            Err(MqttError::QueueFull) => self.drop_sample("request queue full"),
            Err(error) => {
                warn!(%error, "telemetry not sent");
                self.drop_sample("error");
            }
        }
    }

    fn drop_sample(&mut self, reason: &'static str) {
        self.dropped = self.dropped.saturating_add(1);
        self.stats.telemetry_dropped.fetch_add(1, Ordering::Relaxed);
        debug!(reason, dropped = self.dropped, "telemetry sample dropped");
    }

    /// Samples the system provider, on the blocking pool if it reads the OS.
    async fn sample_system(&mut self) -> pb::SystemMetrics {
        let Some(mut provider) = self.system.take() else {
            return pb::SystemMetrics::default();
        };
        if !provider.blocking() {
            let metrics = provider.sample();
            self.system = Some(provider);
            return metrics;
        }
        match tokio::task::spawn_blocking(move || {
            let metrics = provider.sample();
            (provider, metrics)
        })
        .await
        {
            Ok((provider, metrics)) => {
                self.system = Some(provider);
                metrics
            }
            Err(error) => {
                // The provider panicked; report without system metrics from now on.
                warn!(%error, "system metrics provider failed; system metrics disabled");
                pb::SystemMetrics::default()
            }
        }
    }

    /// OFFLINE presence, a bounded wait for its ack, then DISCONNECT.
    async fn shutdown(mut self) {
        let deadline = Instant::now() + self.settings.shutdown_grace;
        if self.mqtt.is_connected() {
            match self.say_goodbye(deadline).await {
                Goodbye::Acknowledged => debug!("OFFLINE presence acknowledged"),
                Goodbye::ConnectionLost => {
                    info!("connection lost during shutdown; the broker publishes the last will");
                }
                other => warn!(outcome = ?other, "OFFLINE presence not confirmed"),
            }
        } else {
            debug!("not connected at shutdown: no OFFLINE presence");
        }
        let graceful =
            tokio::time::timeout_at(deadline + DISCONNECT_TIMEOUT, self.mqtt.disconnect())
                .await
                .is_ok();
        info!(graceful, "agent stopped");
    }

    /// Publishes the OFFLINE presence and waits until `deadline` for the broker's ack, but
    /// not for a connection that is gone (the broker then publishes the last will instead).
    /// (`&mut self` only so that the future is `Send`: the providers are not `Sync`.)
    async fn say_goodbye(&mut self, deadline: Instant) -> Goodbye {
        let Ok(payload) = encode(&self.reporter.shutdown(&self.intake.live().get())) else {
            return Goodbye::NotQueued;
        };
        let topic = self.topic(Channel::Presence);
        let queued = tokio::time::timeout_at(
            deadline,
            self.mqtt.publish(&topic, payload, QoS::AtLeastOnce),
        )
        .await;
        if !matches!(queued, Ok(Ok(()))) {
            return Goodbye::NotQueued;
        }
        let mut connected = self.mqtt.connected();
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            flushed = self.mqtt.flush(remaining) => match flushed {
                Ok(()) => Goodbye::Acknowledged,
                Err(_) => Goodbye::Unacknowledged,
            },
            _ = connected.wait_for(|c| !*c) => Goodbye::ConnectionLost,
        }
    }
}

/// How the OFFLINE presence at shutdown went.
#[derive(Debug)]
enum Goodbye {
    Acknowledged,
    /// No room in the request queue before the deadline (or the session ended).
    NotQueued,
    /// Queued, but the broker did not acknowledge it before the deadline.
    Unacknowledged,
    ConnectionLost,
}

/// Encodes `msg` and queues it on its channel, waiting at most [`PUBLISH_TIMEOUT`] for room.
/// Returns whether it was queued; failures are logged.
pub(crate) async fn publish<M: ChannelMessage>(mqtt: &MqttHandle, id: &DeviceId, msg: &M) -> bool {
    let channel = M::CHANNEL;
    let payload = match encode(msg) {
        Ok(p) => p,
        Err(error) => {
            warn!(%error, channel = channel.name(), "message not encodable");
            return false;
        }
    };
    let topic = Topic::for_device(id, channel);
    match tokio::time::timeout(
        PUBLISH_TIMEOUT,
        mqtt.publish(&topic, payload, QoS::AtLeastOnce),
    )
    .await
    {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            warn!(%error, channel = channel.name(), "publish failed");
            false
        }
        Err(_) => {
            warn!(
                channel = channel.name(),
                "publish not queued in time: request queue full"
            );
            false
        }
    }
}
