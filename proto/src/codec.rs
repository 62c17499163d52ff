//! Encoding and decoding payloads with the per-channel size limits.
//!
//! Each wire message knows its channel ([`ChannelMessage`]), so code that publishes a
//! `Heartbeat` cannot put it on the wrong topic or skip the size check.

use prost::Message;

use crate::pb;
use crate::topic::Channel;

/// A protobuf message that travels on exactly one channel.
pub trait ChannelMessage: Message + Default {
    const CHANNEL: Channel;
}

macro_rules! channel_messages {
    ($($ty:ident => $channel:ident),* $(,)?) => {
        $(impl ChannelMessage for pb::$ty {
            const CHANNEL: Channel = Channel::$channel;
        })*
    };
}

channel_messages! {
    Heartbeat => Heartbeat,
    Telemetry => Telemetry,
    TransactionBatch => Transactions,
    Event => Event,
    CommandResult => CommandResult,
    ReportedState => ReportedState,
    Presence => Presence,
    LogChunk => LogChunk,
    SignedCommand => Command,
    TransactionAck => TransactionAck,
}

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("payload of {size} bytes exceeds the {limit}-byte limit of channel {channel:?}")]
    TooLarge {
        channel: Channel,
        size: usize,
        limit: usize,
    },
    #[error("malformed {channel:?} payload: {source}")]
    Malformed {
        channel: Channel,
        #[source]
        source: prost::DecodeError,
    },
}

/// Encodes `msg`, refusing a result larger than its channel allows.
pub fn encode<M: ChannelMessage>(msg: &M) -> Result<Vec<u8>, CodecError> {
    let size = msg.encoded_len();
    check_size(M::CHANNEL, size)?;
    Ok(msg.encode_to_vec())
}

/// Decodes a payload received on `M`'s channel, size-checked before parsing.
pub fn decode<M: ChannelMessage>(payload: &[u8]) -> Result<M, CodecError> {
    check_size(M::CHANNEL, payload.len())?;
    M::decode(payload).map_err(|source| CodecError::Malformed {
        channel: M::CHANNEL,
        source,
    })
}

/// Checks a payload size against a channel's limit.
pub fn check_size(channel: Channel, size: usize) -> Result<(), CodecError> {
    let limit = channel.max_payload();
    if size > limit {
        return Err(CodecError::TooLarge {
            channel,
            size,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heartbeat_round_trips() {
        let hb = pb::Heartbeat {
            seq: 7,
            interval_s: 10,
            uptime_s: 99,
            ..Default::default()
        };
        let bytes = encode(&hb).unwrap();
        assert_eq!(decode::<pb::Heartbeat>(&bytes).unwrap(), hb);
    }

    #[test]
    fn oversized_payloads_are_refused_both_ways() {
        let ev = pb::Event {
            message: "x".repeat(Channel::Event.max_payload()),
            ..Default::default()
        };
        assert!(matches!(encode(&ev), Err(CodecError::TooLarge { .. })));
        let junk = vec![0u8; Channel::Heartbeat.max_payload() + 1];
        assert!(matches!(
            decode::<pb::Heartbeat>(&junk),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn malformed_payload_is_an_error() {
        // A length-delimited field (tag 2, wire type 2) claiming more bytes than follow.
        let bad = [0x12, 0x7f, 0x01];
        assert!(matches!(
            decode::<pb::Telemetry>(&bad),
            Err(CodecError::Malformed { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode::<pb::Telemetry>(&bytes);
            let _ = decode::<pb::Presence>(&bytes);
            let _ = decode::<pb::TransactionBatch>(&bytes);
        }
    }
}
