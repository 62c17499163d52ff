//! posfleet-proto: the wire contract between terminals and the controller.
//!
//! # Layout
//!
//! - [`pb`]: the protobuf messages (package `posfleet.v1`), generated at build time from
//!   `proto/posfleet/v1/posfleet.proto` by protox + prost (no system `protoc`).
//! - [`topic`]: the typed MQTT topic schema ([`Topic`], [`Filter`], [`Channel`]); the only
//!   place that formats or parses topics.
//! - [`device_id`]: [`DeviceId`], the validated id used at every boundary.
//! - [`codec`]: size-checked encode/decode per channel ([`ChannelMessage`]).
//! - [`pan`]: the PAN guard (13–19 digit Luhn-valid runs, any separators, recognised shapes
//!   taken out), shared by the agent's local API, the controller and the repository's scan.
//! - [`text`]: the one check of text that enters posfleet (control and bidi characters,
//!   card numbers), used by the admin API's handlers, the configuration schema and the agent.
//! - [`secret`]: the one generator of tokens (letters only, never a digit run) and the
//!   regeneration of standard formats (base32, hex keys, PEM) until the guard passes.
//! - [`signing`]: Ed25519 command signatures: the controller's [`signing::CommandKey`], the
//!   agent's [`signing::KeyRing`] and the reasons a command is refused.
//! - [`txrules`]: the field rules and limits a terminal applies to a transaction before it
//!   stores it, shared so that the controller can prove it stores whatever a terminal accepts.
//! - [`version`]: version ordering and the `min_version` check shared by the rollout engine
//!   and the agent.
//! - `pki` (feature `pki`): certificate profiles (device, controller, broker server), the
//!   fleet CA on disk, and reading an [`pki::Identity`] out of a certificate.

#![forbid(unsafe_code)]

pub mod codec;
pub mod device_id;
pub mod pan;
#[cfg(feature = "pki")]
pub mod pki;
pub mod secret;
pub mod signing;
pub mod text;
pub mod topic;
pub mod txrules;
pub mod version;

/// Generated protobuf types of package `posfleet.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/posfleet.v1.rs"));
}

pub use codec::{ChannelMessage, CodecError, decode, encode};
pub use device_id::{DeviceId, DeviceIdError, NewDeviceIdError};
pub use topic::{
    Channel, Direction, Filter, LOG_CHUNK_MAX_DATA, MAX_PACKET_SIZE, Topic, TopicError,
};

/// Milliseconds since the Unix epoch from the system clock (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
