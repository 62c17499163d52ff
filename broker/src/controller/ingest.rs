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
use crate::events::EventBus;
use crate::metrics::{ChannelLabel, Metrics, ReasonLabel};
use crate::registry::{Change, PresenceChange, Registry};
use crate::views::FleetEvent;

/// The controller's ingest logic. Cheap to share (`Arc`); `handle` takes `&self`.
#[derive(Debug)]
pub struct Ingest {
    /// Where device state lives.
    registry: Arc<Registry>,
    /// Where presence, heartbeat and telemetry events go for the live stream.
    events: EventBus,
    /// Message, rejection, latency and fleet gauges.
    metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(registry: Arc<Registry>, events: EventBus, metrics: Arc<Metrics>) -> Self {
        let ingest = Self {
            registry,
            events,
            metrics,
        };
        ingest.update_gauges();
        ingest
    }

    /// Ingests one uplink message received at `received_at_ms` (controller clock).
    ///
    /// Presence, Heartbeat and Telemetry are handled; other channels are counted as
    /// `unsupported` and ignored. Errors are already counted and logged when returned.
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
                self.registry
                    .presence_online(device, at_ms, device_at_ms, info)
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
        let change = self
            .registry
            .heartbeat(device, at_ms, heartbeat.clone(), versions);
        self.apply(device, &change);
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
