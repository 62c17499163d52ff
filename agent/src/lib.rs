//! posfleet-agent: the terminal agent and the fleet simulator. The MQTT session, TLS configs,
//! the sled rules, backoff and the value parsers it shares with the controller are
//! `posfleet_runtime` (ADR 0015).
//!
//! # Layout
//!
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
//! - `testing` (unit tests only): command setups for the agent tests; the fleet PKI and the fake
//!   MQTT broker they connect to are `posfleet_runtime::testing`.

#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod cli;
pub mod command;
pub mod config;
pub mod enroll;
pub mod outbox;
pub mod renew;
pub mod simulate;
pub mod state;
pub mod telemetry;
pub mod terminal;
pub mod transaction;

#[cfg(test)]
mod testing;

pub use agent::{Agent, AgentHandle, AgentSettings, DeviceInfo};
pub use command::{CommandSettings, CommandSetup, HookSettings, TerminalFiles};
pub use config::Config;
pub use outbox::{DeviceOutbox, Outbox, OutboxSettings};
pub use simulate::{
    AcceptedRecord, SimError, SimulatorConfig, SimulatorHandle, TerminalTxStats, run_simulator,
};
pub use state::{LiveState, StateStore, TerminalStatus};
pub use transaction::{TransactionIntake, TransactionRequest};
