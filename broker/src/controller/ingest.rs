//! Ingest: one uplink message in, registry updated, events published, metrics counted.
//!
//! [`Ingest::handle`] is pure logic over its inputs (topic, payload, receive time): no I/O, no
//! clock, no MQTT, so tests call it directly. A message that fails to decode or validate is
//! counted, logged with the device id (never the payload) and changes nothing.

use std::sync::Arc;
use std::time::Instant;

use posfleet_proto::{Channel, DeviceId, Topic, decode, pb};
use tracing::{debug, info, warn};

use super::convert::{self, Invalid, PresenceUpdate};
use super::error::IngestError;
use super::txqueue::{QueueError, TxQueue};
use crate::commands::CommandInbox;
use crate::events::EventBus;
use crate::metrics::{ChannelLabel, Metrics, ReasonLabel};
use crate::registry::{Change, PresenceChange, Registry};
use crate::txstore::{MAX_BATCH_RECORDS, Submission, ValidTx};
use crate::views::{AlertKind, FleetEvent, ReportedView, Severity};

/// The controller's ingest logic. Cheap to share (`Arc`); `handle` takes `&self`.
#[derive(Debug)]
pub struct Ingest {
    /// Where device state lives.
    registry: Arc<Registry>,
    /// Where presence, heartbeat and telemetry events go for the live stream.
    events: EventBus,
    /// Message, rejection, latency and fleet gauges.
    metrics: Arc<Metrics>,
    /// Where validated transaction batches go (the committer's queue); without it
    /// transactions are counted as unsupported.
    transactions: Option<TxQueue>,
    /// The command plane's queue (results, reported state, presence, log chunks); without
    /// it command results, reported state and log chunks are counted as unsupported.
    commands: Option<CommandInbox>,
}

impl Ingest {
    pub fn new(registry: Arc<Registry>, events: EventBus, metrics: Arc<Metrics>) -> Self {
        let ingest = Self {
            registry,
            events,
            metrics,
            transactions: None,
            commands: None,
        };
        ingest.update_gauges();
        ingest
    }

    /// The same ingest, handing transaction batches to `queue`.
    pub(crate) fn with_transactions(mut self, queue: TxQueue) -> Self {
        self.transactions = Some(queue);
        self
    }

    /// The same ingest, handing command traffic to the command plane.
    pub(crate) fn with_commands(mut self, inbox: CommandInbox) -> Self {
        self.commands = Some(inbox);
        self
    }

    /// Ingests one uplink message received at `received_at_ms` (controller clock).
    ///
    /// Presence, Heartbeat, Telemetry and (with a queue) TransactionBatch are handled; other
    /// channels are counted as `unsupported` and ignored. Errors are already counted and
    /// logged when returned. A transaction batch is only validated and queued here: its
    /// acknowledgement comes from the committer once it is durable.
    pub fn handle(
        &self,
        topic: &Topic,
        payload: &[u8],
        received_at_ms: u64,
    ) -> Result<(), IngestError> {
        let started = Instant::now();
        let device = topic.device();
        let channel = topic.channel();
        let result = match channel {
            Channel::Presence => self.presence(device, payload, received_at_ms),
            Channel::Heartbeat => self.heartbeat(device, payload, received_at_ms),
            Channel::Telemetry => self.telemetry(device, payload, received_at_ms),
            Channel::Transactions if self.transactions.is_some() => {
                self.transactions(device, payload, received_at_ms)
            }
            Channel::CommandResult | Channel::ReportedState | Channel::LogChunk
                if self.commands.is_some() =>
            {
                self.command_traffic(device, channel, payload, received_at_ms)
            }
            _ => Err(IngestError::Unsupported {
                device: device.clone(),
                channel,
            }),
        };
        match &result {
            Ok(()) => {
                self.metrics
                    .ingest_messages_total
                    .get_or_create(&ChannelLabel {
                        channel: channel.name(),
                    })
                    .inc();
                self.metrics
                    .ingest_latency_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                let reason = e.reason();
                self.metrics
                    .ingest_rejected_total
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                if matches!(e, IngestError::Unsupported { .. }) {
                    debug!(device_id = %device, channel = channel.name(), "uplink channel not handled yet");
                } else if matches!(e, IngestError::Overloaded { .. }) {
                    // Flow control, not a fault: counted, and the terminal is told to retry
                    // after a while (a warning per refused batch would flood the log under
                    // exactly the load that causes it).
                    debug!(device_id = %device, channel = channel.name(), "uplink refused: controller behind");
                } else {
                    warn!(
                        device_id = %device,
                        channel = channel.name(),
                        reason,
                        error = %e,
                        "uplink message rejected"
                    );
                }
            }
        }
        self.update_gauges();
        result
    }

    /// Marks offline every online device that missed its heartbeats by `now_ms`, announcing
    /// each transition. Returns how many went offline.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let changes = self.registry.sweep(now_ms);
        for (device, change) in &changes {
            self.announce_presence(device, change);
        }
        if !changes.is_empty() {
            self.update_gauges();
        }
        changes.len()
    }

    fn presence(&self, device: &DeviceId, payload: &[u8], at_ms: u64) -> Result<(), IngestError> {
        let msg = decode::<pb::Presence>(payload).map_err(|source| decode_error(device, source))?;
        let update = convert::presence(msg).map_err(|e| invalid(device, Channel::Presence, e))?;
        let change = match update {
            PresenceUpdate::Online { device_at_ms, info } => {
                let change = self
                    .registry
                    .presence_online(device, at_ms, device_at_ms, info);
                if let Some(inbox) = &self.commands {
                    if inbox.online(device).is_err() {
                        warn!(device_id = %device, "command plane busy: pending commands go out on the next re-send");
                    }
                }
                change
            }
            PresenceUpdate::Offline {
                device_at_ms,
                reason,
            } => match self
                .registry
                .presence_offline(device, at_ms, device_at_ms, reason)
            {
                Ok(change) => change,
                Err(_stale) => {
                    debug!(device_id = %device, "ignored a last will older than the current connection");
                    Change::default()
                }
            },
        };
        self.apply(device, &change);
        Ok(())
    }

    fn heartbeat(&self, device: &DeviceId, payload: &[u8], at_ms: u64) -> Result<(), IngestError> {
        let msg =
            decode::<pb::Heartbeat>(payload).map_err(|source| decode_error(device, source))?;
        let (heartbeat, versions) =
            convert::heartbeat(msg, at_ms).map_err(|e| invalid(device, Channel::Heartbeat, e))?;
        let dead_before = self.registry.dead_letters(device).unwrap_or(0);
        if heartbeat.dead_letters > dead_before {
            self.dead_letters_grew(device, dead_before, heartbeat.dead_letters, at_ms);
        }
        let change = self
            .registry
            .heartbeat(device, at_ms, heartbeat.clone(), versions);
        self.apply(device, &change);
        let reported = ReportedView {
            at_ms,
            source: "heartbeat".to_owned(),
            config_version: heartbeat.config_version,
            locked: heartbeat.locked,
            lock_generation: heartbeat.lock_generation,
            lock_reason: None,
        };
        self.registry.set_reported(device, reported.clone());
        if let Some(inbox) = &self.commands {
            // Reconciliation runs again on the next heartbeat if the plane is busy now.
            let _ = inbox.observed(device, reported, true);
        }
        self.events.publish(FleetEvent::Heartbeat {
            device: device.to_string(),
            heartbeat,
        });
        Ok(())
    }

    fn telemetry(&self, device: &DeviceId, payload: &[u8], at_ms: u64) -> Result<(), IngestError> {
        let msg =
            decode::<pb::Telemetry>(payload).map_err(|source| decode_error(device, source))?;
        let sample =
            convert::telemetry(msg, at_ms).map_err(|e| invalid(device, Channel::Telemetry, e))?;
        let change = self.registry.telemetry(device, at_ms, sample);
        self.apply(device, &change);
        self.events.publish(FleetEvent::Telemetry {
            device: device.to_string(),
            telemetry: sample.view(),
        });
        Ok(())
    }

    /// CommandResult, ReportedState and LogChunk: decoded here, handled by the command plane.
    fn command_traffic(
        &self,
        device: &DeviceId,
        channel: Channel,
        payload: &[u8],
        at_ms: u64,
    ) -> Result<(), IngestError> {
        let Some(inbox) = &self.commands else {
            return Err(IngestError::Unsupported {
                device: device.clone(),
                channel,
            });
        };
        let decode_err = |source| decode_error(device, source);
        let offered = match channel {
            Channel::CommandResult => {
                let result = decode::<pb::CommandResult>(payload).map_err(decode_err)?;
                inbox.result(device, result, at_ms)
            }
            Channel::ReportedState => {
                let st = decode::<pb::ReportedState>(payload).map_err(decode_err)?;
                let reported =
                    convert::reported_state(st, at_ms).map_err(|e| invalid(device, channel, e))?;
                self.registry.set_reported(device, reported.clone());
                inbox.observed(device, reported, false)
            }
            _ => {
                let chunk = decode::<pb::LogChunk>(payload).map_err(decode_err)?;
                inbox.log(device, chunk)
            }
        };
        offered.map_err(|_| IngestError::Overloaded {
            device: device.clone(),
        })
    }

    /// Validates a whole batch and queues it for the committer. One invalid record refuses
    /// the batch (the terminal's outbox cannot pass it: an alert says so).
    fn transactions(
        &self,
        device: &DeviceId,
        payload: &[u8],
        at_ms: u64,
    ) -> Result<(), IngestError> {
        let Some(queue) = &self.transactions else {
            return Err(IngestError::Unsupported {
                device: device.clone(),
                channel: Channel::Transactions,
            });
        };
        let batch = decode::<pb::TransactionBatch>(payload)
            .map_err(|source| decode_error(device, source))?;
        if batch.transactions.len() > MAX_BATCH_RECORDS {
            return Err(self.invalid_batch(
                device,
                at_ms,
                None,
                format!(
                    "{} transactions in one batch; the limit is {MAX_BATCH_RECORDS}",
                    batch.transactions.len()
                ),
            ));
        }
        let records = batch
            .transactions
            .into_iter()
            .map(ValidTx::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.invalid_batch(device, at_ms, Some(e.seq), e.to_string()))?;
        let sub = Submission {
            device: device.clone(),
            received_at_ms: at_ms,
            records,
        };
        let queued = queue.try_submit(sub, payload.len());
        self.metrics
            .tx_queue_depth
            .set(i64::try_from(queue.depth()).unwrap_or(i64::MAX));
        queued.map_err(|e| match e {
            QueueError::Full => IngestError::Overloaded {
                device: device.clone(),
            },
            QueueError::Closed => IngestError::ShuttingDown {
                device: device.clone(),
            },
        })
    }

    /// Alerts that a terminal holds more dead letters than it reported last (or, after a
    /// controller start, than zero: the alert repeats once per start for a terminal that
    /// still holds some).
    fn dead_letters_grew(&self, device: &DeviceId, before: u32, now: u32, at_ms: u64) {
        warn!(device_id = %device, before, now, "terminal holds more dead-lettered transactions");
        self.events.publish(FleetEvent::Alert {
            device: device.to_string(),
            alert: AlertKind::DeadLetters,
            severity: Severity::Warning,
            seq: None,
            message: format!(
                "terminal holds {now} dead-lettered transactions ({} more than it reported \
                 before): refused as conflicts, kept on the terminal",
                now - before
            ),
            at_ms,
        });
    }

    /// Alerts about a refused transaction batch and returns the error.
    fn invalid_batch(
        &self,
        device: &DeviceId,
        at_ms: u64,
        seq: Option<u64>,
        detail: String,
    ) -> IngestError {
        self.events.publish(FleetEvent::Alert {
            device: device.to_string(),
            alert: AlertKind::InvalidTransactions,
            severity: Severity::Critical,
            seq,
            message: format!(
                "transaction batch refused: {detail}; the terminal's outbox cannot move past it"
            ),
            at_ms,
        });
        invalid(device, Channel::Transactions, Invalid(detail))
    }

    /// Logs a registration and announces a presence transition.
    fn apply(&self, device: &DeviceId, change: &Change) {
        if change.registered {
            info!(device_id = %device, "device registered");
        }
        if let Some(presence) = &change.presence {
            self.announce_presence(device, presence);
        }
    }

    fn announce_presence(&self, device: &DeviceId, change: &PresenceChange) {
        info!(
            device_id = %device,
            online = change.online,
            reason = change.reason.as_deref().unwrap_or(""),
            "presence changed"
        );
        self.events.publish(FleetEvent::Presence {
            device: device.to_string(),
            online: change.online,
            reason: change.reason.clone(),
            at_ms: change.at_ms,
        });
    }

    fn update_gauges(&self) {
        let online = i64::try_from(self.registry.online_count()).unwrap_or(i64::MAX);
        let registered = i64::try_from(self.registry.len()).unwrap_or(i64::MAX);
        self.metrics.devices_online.set(online);
        self.metrics.devices_registered.set(registered);
    }
}

fn decode_error(device: &DeviceId, source: posfleet_proto::CodecError) -> IngestError {
    IngestError::Decode {
        device: device.clone(),
        source,
    }
}

fn invalid(device: &DeviceId, channel: Channel, e: Invalid) -> IngestError {
    IngestError::Invalid {
        device: device.clone(),
        channel,
        detail: e.0,
    }
}
