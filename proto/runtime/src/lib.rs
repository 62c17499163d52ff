//! posfleet-runtime: what the terminal agent and the controller both run, so that neither
//! depends on the other (ADR 0015).
//!
//! # Layout
//!
//! - [`mqtt`]: the one MQTT client session of the project (agent and controller): a task that
//!   owns the rumqttc event loop, reconnects with [`backoff`], re-subscribes, and a cloneable
//!   [`MqttHandle`].
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`tls`]: rustls client configs (ring provider) and the device id from a certificate.
//! - [`sledstore`]: the sled rules of docs/storage.md (open, durability, [`sledstore::SyncGate`]),
//!   used by the agent's state store and outbox and by every store of the controller.
//! - [`value`]: parsers for text values of config files and command lines ([`value::BrokerUrl`],
//!   [`value::parse_duration`]).
//! - [`report`]: [`report::error_report`], an error and its causes on one line.
//! - `testing` (unit tests, and the `testing` feature): an in-memory fleet PKI and a fake MQTT
//!   broker over mTLS on loopback, used by the session tests here and the agent's tests.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod mqtt;
pub mod report;
pub mod sledstore;
pub mod tls;
pub mod value;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use mqtt::{MqttError, MqttHandle, SessionConfig, SessionEvent, spawn_session};
