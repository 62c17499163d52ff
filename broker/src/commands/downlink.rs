//! Where signed commands go: the controller's bus (`down/cmd`, delivered at QoS 1), or a
//! test double.

use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};

use crate::bus::{Bus, BusError};

/// Why a command could not be queued for publishing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownlinkError {
    /// The bus's outgoing queue is full (or the bus is reconnecting/closing): try again
    /// later.
    #[error("the controller's outgoing queue is full or closed")]
    Busy,
    /// The command can never be sent (larger than the channel allows).
    #[error("the signed command cannot be encoded: {0}")]
    Unsendable(String),
}

/// Queues one signed command for a device without waiting.
pub trait Downlink: Send + Sync + 'static {
    fn send(&self, device: &DeviceId, signed: &pb::SignedCommand) -> Result<(), DownlinkError>;
}

impl Downlink for Bus {
    fn send(&self, device: &DeviceId, signed: &pb::SignedCommand) -> Result<(), DownlinkError> {
        let payload = encode(signed).map_err(|e| DownlinkError::Unsendable(e.to_string()))?;
        let topic = Topic::for_device(device, Channel::Command);
        // Never waits: the plane's worker must keep taking results; what is not queued now
        // is resent on a later tick.
        self.try_publish(&topic, payload).map_err(|e| match e {
            BusError::Payload(e) => DownlinkError::Unsendable(e.to_string()),
            BusError::Full | BusError::Closed => DownlinkError::Busy,
        })
    }
}
