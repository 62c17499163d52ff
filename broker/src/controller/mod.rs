//! The controller: an ordinary MQTT client of the edge (or an external broker) that ingests
//! device uplinks into the registry and the live event bus.
//!
//! # Layout
//!
//! - `ingest.rs`: [`Ingest`], the pure ingest logic (`handle(topic, payload, received_at)`)
//!   for Presence, Heartbeat and Telemetry; other channels are counted as unsupported.
//! - `convert.rs`: validating conversions from wire messages to registry values.
//! - `sweeper.rs`: the liveness sweeper (offline after missed heartbeats), injectable clock.
//! - `service.rs`: [`spawn_controller`]: the MQTT session (`posfleet_agent::mqtt`, client id
//!   `controller:<name>`, subscribed to `posfleet/v1/d/+/up/+`), the ingest loop, the sweeper
//!   and the registry committer, with [`ControllerConfig`].
//! - `error.rs`: [`IngestError`].
//! - `tests.rs`: ingest and sweeper tests driven with encoded protobufs and malformed bytes.

mod convert;
mod error;
mod ingest;
mod service;
mod sweeper;
#[cfg(test)]
mod tests;

pub use convert::{MAX_HEARTBEAT_INTERVAL_S, MIN_HEARTBEAT_INTERVAL_S};
pub use error::IngestError;
pub use ingest::Ingest;
pub use service::{Controller, ControllerConfig, ControllerError, spawn_controller};
pub use sweeper::{Clock, system_clock};
