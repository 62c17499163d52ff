//! posfleet-agent: the terminal agent, the project's shared MQTT session, and the fleet
//! simulator.
//!
//! # Layout
//!
//! - [`mqtt`]: the one MQTT client session of the project (agent and controller): a task that
//!   owns the rumqttc event loop, reconnects with [`backoff`], re-subscribes, and a cloneable
//!   [`MqttHandle`].
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`tls`]: rustls client configs (ring provider) and the device id from a certificate.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod mqtt;
pub mod tls;

#[cfg(test)]
mod testing;

pub use mqtt::{MqttError, MqttHandle, SessionConfig, SessionEvent, spawn_session};
