//! Errors of the controller: why an uplink message was not ingested.

use posfleet_proto::{Channel, CodecError, DeviceId};

/// Why an uplink message changed nothing. Every variant is counted in
/// `ingest_rejected_total{reason}` under [`IngestError::reason`].
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("device {device}: {channel:?} messages are not handled by the controller yet")]
    Unsupported { device: DeviceId, channel: Channel },
    #[error("device {device}: {source}")]
    Decode {
        device: DeviceId,
        #[source]
        source: CodecError,
    },
    #[error("device {device}: invalid {channel:?} message: {detail}")]
    Invalid {
        device: DeviceId,
        channel: Channel,
        detail: String,
    },
    #[error(
        "device {device}: message refused, the controller is behind (transaction committer or \
         command plane); the terminal resends it"
    )]
    Overloaded { device: DeviceId },
    #[error("device {device}: transaction batch refused, the controller is stopping")]
    ShuttingDown { device: DeviceId },
}

impl IngestError {
    /// The `reason` label of `ingest_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::Unsupported { .. } => "unsupported",
            IngestError::Decode {
                source: CodecError::TooLarge { .. },
                ..
            } => "too_large",
            IngestError::Decode {
                source: CodecError::Malformed { .. },
                ..
            } => "malformed",
            IngestError::Invalid { .. } => "invalid",
            IngestError::Overloaded { .. } => "overloaded",
            IngestError::ShuttingDown { .. } => "shutting_down",
        }
    }

    /// The device that sent the message.
    pub fn device(&self) -> &DeviceId {
        match self {
            IngestError::Unsupported { device, .. }
            | IngestError::Decode { device, .. }
            | IngestError::Invalid { device, .. }
            | IngestError::Overloaded { device }
            | IngestError::ShuttingDown { device } => device,
        }
    }
}
