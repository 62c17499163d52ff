//! The controller: ingests device uplinks from its bus (`crate::bus`: a local link to the
//! embedded edge's router, or an mTLS MQTT session to an external broker) into the registry
//! and the live event bus.
//!
//! # Layout
//!
//! - `ingest.rs`: [`Ingest`], the pure ingest logic (`handle(topic, payload, received_at)`)
//!   for Presence, Heartbeat, Telemetry and TransactionBatch (validated and queued), and
//!   CommandResult, ReportedState and LogChunk (handed to the command plane, `crate::commands`).
//! - `convert.rs`: validating conversions from wire messages to registry values.
//! - `txqueue.rs`: the bounded, never-waiting hand-off of validated transaction batches from
//!   ingest to the committer, and [`TxConfig`].
//! - `txcommit.rs`: the transaction committer: group commit, then one `TransactionAck` per
//!   device (only after the fsync), then live events.
//! - `gapwatch.rs`: alerts for sequence gaps older than the grace period, and their closing.
//! - `sweeper.rs`: the liveness sweeper (offline after missed heartbeats), injectable clock.
//! - `service.rs`: [`spawn_controller`]: the bus (subscribed to `posfleet/v1/d/+/up/+`), the
//!   ingest loop, the sweeper, the registry committer, the transaction committer and the gap
//!   watcher, with [`ControllerConfig`] ([`ControllerConfig::local`] for the embedded edge,
//!   [`ControllerConfig::from_pki`] for a broker).
//! - `error.rs`: [`IngestError`].
//! - `cmde2e.rs`: a signed command end to end through `app::start` and a terminal session.
//! - `attache2e.rs`: through `app::start`, the controller holds no connection to its own edge.
//! - `attachtests.rs`: on either bus, shutdown still delivers the committer's final acks.
//! - `tests.rs`: ingest and sweeper tests driven with encoded protobufs and malformed bytes.

#[cfg(test)]
mod attache2e;
#[cfg(test)]
mod attachtests;
#[cfg(test)]
mod cmde2e;
mod convert;
#[cfg(test)]
mod e2e_support;
mod error;
mod gapwatch;
mod ingest;
mod service;
mod sweeper;
#[cfg(test)]
mod tests;
mod txcommit;
#[cfg(test)]
mod txe2e;
mod txqueue;
#[cfg(test)]
mod txtests;

pub use convert::{MAX_HEARTBEAT_INTERVAL_S, MIN_HEARTBEAT_INTERVAL_S};
pub use error::IngestError;
pub use ingest::Ingest;
pub use service::{Controller, ControllerConfig, ControllerError, spawn_controller};
pub use sweeper::{Clock, system_clock};
pub use txqueue::{DEFAULT_MAX_QUEUED_RECORDS, TxConfig};
