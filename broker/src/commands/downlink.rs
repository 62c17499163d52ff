//! Where signed commands go: the controller's MQTT session (QoS 1 on `down/cmd`), or a test
//! double.

use posfleet_agent::mqtt::{MqttError, MqttHandle, QoS};
use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};

/// Why a command could not be queued for publishing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownlinkError {
    /// The session's request queue is full (or the session is reconnecting/closing): try
    /// again later.
    #[error("the MQTT request queue is full or closed")]
    Busy,
    /// The command can never be sent (larger than the channel allows).
    #[error("the signed command cannot be encoded: {0}")]
    Unsendable(String),
}

/// Queues one signed command for a device without waiting.
pub trait Downlink: Send + Sync + 'static {
    fn send(&self, device: &DeviceId, signed: &pb::SignedCommand) -> Result<(), DownlinkError>;
}

impl Downlink for MqttHandle {
    fn send(&self, device: &DeviceId, signed: &pb::SignedCommand) -> Result<(), DownlinkError> {
        let payload = encode(signed).map_err(|e| DownlinkError::Unsendable(e.to_string()))?;
        let topic = Topic::for_device(device, Channel::Command);
        // Never waits: the plane's worker must keep taking results; what is not queued now
        // is resent on a later tick.
        self.try_publish(&topic, payload, QoS::AtLeastOnce)
            .map_err(|e| match e {
                MqttError::Payload(e) => DownlinkError::Unsendable(e.to_string()),
                _ => DownlinkError::Busy,
            })
    }
}
