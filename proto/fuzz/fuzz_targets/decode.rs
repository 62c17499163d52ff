//! `posfleet_proto::decode::<M>()` for every wire message; the first input byte picks `M`
//! (uplink: Heartbeat, Telemetry, TransactionBatch, Event, CommandResult, ReportedState,
//! Presence; downlink: SignedCommand, TransactionAck), the rest is the MQTT payload.
//!
//! Invariants:
//! - the size check runs before parsing: `TooLarge` exactly when the payload exceeds the
//!   channel's limit, with the right channel, size and limit; `Malformed` names the channel;
//! - a decoded message re-encodes (`encoded_len` bytes) and decodes again to an equal message:
//!   `PartialEq` for the messages without floats; for Telemetry (NaN != NaN) the re-encodings
//!   are compared byte for byte instead. (Not bytes for the others: `map<>` fields are
//!   `HashMap`s, so Event and CommandResult encode their maps in a random order.);
//! - `encode` of a decoded message gives that re-encoding, or `TooLarge` only when it really
//!   is over the limit;
//! - a SignedCommand's `command` bytes (what the agent decodes after checking the signature)
//!   obey the same round trip as a `pb::Command`.
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use posfleet_proto::{ChannelMessage, CodecError, decode, encode, pb};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    match selector % 9 {
        0 => drop(check::<pb::Heartbeat>(payload, true)),
        1 => drop(check::<pb::Telemetry>(payload, false)),
        2 => drop(check::<pb::TransactionBatch>(payload, true)),
        3 => drop(check::<pb::Event>(payload, true)),
        4 => drop(check::<pb::CommandResult>(payload, true)),
        5 => drop(check::<pb::ReportedState>(payload, true)),
        6 => drop(check::<pb::Presence>(payload, true)),
        7 => {
            if let Some(signed) = check::<pb::SignedCommand>(payload, true)
                && let Ok(command) = pb::Command::decode(signed.command.as_slice())
            {
                round_trip(&command, true);
            }
        }
        _ => drop(check::<pb::TransactionAck>(payload, true)),
    }
});

/// Decodes `payload` as `M` through the codec and checks the invariants above.
fn check<M: ChannelMessage + Debug + PartialEq>(payload: &[u8], comparable: bool) -> Option<M> {
    let channel = M::CHANNEL;
    let limit = channel.max_payload();
    match decode::<M>(payload) {
        Err(CodecError::TooLarge {
            channel: c,
            size,
            limit: l,
        }) => {
            assert!(
                payload.len() > limit,
                "TooLarge for {} bytes",
                payload.len()
            );
            assert_eq!((c, size, l), (channel, payload.len(), limit));
            None
        }
        Err(CodecError::Malformed { channel: c, .. }) => {
            assert!(payload.len() <= limit, "parsed a payload over the limit");
            assert_eq!(c, channel);
            None
        }
        Ok(msg) => {
            assert!(payload.len() <= limit, "accepted a payload over the limit");
            let canonical = round_trip(&msg, comparable);
            match encode(&msg) {
                Ok(bytes) => {
                    assert!(bytes.len() <= limit);
                    assert_eq!(bytes.len(), canonical.len());
                    if comparable {
                        assert_eq!(M::decode(bytes.as_slice()).as_ref(), Ok(&msg));
                    } else {
                        assert_eq!(bytes, canonical);
                    }
                }
                Err(CodecError::TooLarge { size, .. }) => {
                    assert!(canonical.len() > limit);
                    assert_eq!(size, canonical.len());
                }
                Err(e) => panic!("encode of a decoded {channel:?} failed: {e}"),
            }
            Some(msg)
        }
    }
}

/// Re-encodes `msg` and decodes it again; returns the re-encoding.
fn round_trip<M: Message + Default + Debug + PartialEq>(msg: &M, comparable: bool) -> Vec<u8> {
    let canonical = msg.encode_to_vec();
    assert_eq!(canonical.len(), msg.encoded_len());
    let again = M::decode(canonical.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again.encoded_len(), canonical.len());
    if comparable {
        assert_eq!(&again, msg);
    } else {
        assert_eq!(
            again.encode_to_vec(),
            canonical,
            "re-encoding is not stable"
        );
    }
    canonical
}
