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
//! - [`config`]: the agent's TOML config, parsed in two stages (all problems at once).
//! - [`agent`]: the runtime of one terminal ([`Agent`]): presence, heartbeats, telemetry,
//!   the outbox sender, the command executor, graceful shutdown.
//! - [`command`]: the signed command plane (ADR 0007): verification, the journal, lock,
//!   config, wipe, reboot, logs, the offline lease, terminal hooks.
//! - [`state`]: the sled state store (`DATA/state`: journal, lock, applied config, last
//!   contact) and [`state::LiveState`], the lock and config the rest of the agent reads.
//! - [`transaction`]: transactions as the payment application submits them: parsing of
//!   untrusted JSON, field rules, the PAN guard, and [`TransactionIntake::accept`], the one
//!   accept path (local API and simulator).
//! - [`sledstore`]: the sled rules of docs/storage.md (open, durability), shared with the
//!   controller's stores.
//! - [`outbox`]: the durable sled outbox (one of the crate's two storage modules), its group-commit
//!   thread, and the per-terminal sender of transaction batches and acks (ADR 0005).
//! - [`api`]: the local HTTP API over a Unix socket (and loopback TCP) for the payment
//!   application.
//! - [`telemetry`]: system metric and sensor providers (real and simulated).
//! - [`simulate`]: N virtual terminals in one process running the same [`Agent`] code, with
//!   synthetic transactions and one shared outbox store.
//! - [`renew`]: automatic renewal of the terminal's certificate (new key and CSR, the device
//!   endpoint's renew/confirm calls, resumable file swap).
//! - [`terminal`]: the body of `run`: one terminal, restarted in-process after a renewal.
//! - [`cli`]: the `posfleet-agent` command line (`run`, `simulate`); `main.rs` only calls
//!   [`cli::main`].
//! - `testing` (unit tests only): an in-memory fleet PKI and a fake MQTT broker over mTLS on
//!   loopback, used by the session, agent and simulator tests.

#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod backoff;
pub mod cli;
pub mod command;
pub mod config;
pub mod enroll;
pub mod mqtt;
pub mod outbox;
pub mod renew;
pub mod simulate;
pub mod sledstore;
pub mod state;
pub mod telemetry;
pub mod terminal;
pub mod tls;
pub mod transaction;

#[cfg(test)]
mod testing;

pub use agent::{Agent, AgentHandle, AgentSettings, DeviceInfo};
pub use command::{CommandSettings, CommandSetup, HookSettings, TerminalFiles};
pub use config::Config;
pub use mqtt::{MqttError, MqttHandle, SessionConfig, SessionEvent, spawn_session};
pub use outbox::{DeviceOutbox, Outbox, OutboxSettings};
pub use simulate::{
    AcceptedRecord, SimError, SimulatorConfig, SimulatorHandle, TerminalTxStats, run_simulator,
};
pub use state::{LiveState, StateStore, TerminalStatus};
pub use transaction::{TransactionIntake, TransactionRequest};
