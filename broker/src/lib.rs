//! posfleet-broker: the controller process and the admin CLI.
//!
//! # Layout
//!
//! - [`admission`]: connection admission shared by every listener (per-address caps,
//!   eviction of pending connections, silent and handshake deadlines, handshake CPU slots).
//! - [`app`]: `serve` and `demo`: data dir, PKI bootstrap, and every subsystem started under
//!   one shutdown tree.
//! - [`cli`]: the `posfleet-broker` command line (thin `main` calls [`cli::main`]).
//! - [`edge`]: our mTLS MQTT accept loop, identity from certificates, ACL, attached to
//!   rumqttd's router through its local link API.
//! - [`bus`]: the controller's bus: a local link to the embedded router (no TLS), or an mTLS
//!   MQTT session to an external broker.
//! - [`controller`]: the controller's ingest (presence, heartbeat, telemetry, transactions).
//! - [`registry`]: the sled store of devices (sled rules: `posfleet_runtime::sledstore`).
//! - [`txstore`]: the sled store of transactions (exactly once by (device, seq), group commit).
//! - [`api`]: the HTTPS admin API (axum + rustls): devices, live stream, health, metrics.
//! - [`commands`]: the signed command plane (store, dispatch, results, reconciliation,
//!   lease, log uploads).
//! - [`accounts`]: operator accounts, roles and who is asking ([`accounts::Principal`]).
//! - [`audit`]: the tamper-evident audit log.
//! - [`approvals`]: two-person approval of wipes and large locks.
//! - [`custody`]: the custody ledger (device issue register), signed and chained per device.
//! - [`enrolment`]: enrolment tokens, CSR enrolment, revocation/decommission, the CRL and
//!   certificate renewal.
//! - [`artifacts`]: signed software artifacts and the device download endpoint (ADR 0008).
//! - [`rollouts`]: staged, health-gated software rollouts (waves, payment gate, rollback).
//! - [`fleetconfig`]: layered, versioned configuration (fleet → group → device).
//! - [`events`]: the in-process live event bus feeding the stream.
//! - `limit`: failures per key in a sliding window (enrolment and login throttling).
//! - [`metrics`]: Prometheus metrics shared by every subsystem.
//! - [`datadir`]: the data directory layout shared by `serve` and `posctl`.
//! - [`views`]: the JSON contract of the admin API.
//! - [`posctl`]: the admin CLI's library side.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod admission;
pub mod api;
pub mod app;
pub mod approvals;
pub mod artifacts;
pub mod audit;
pub mod bus;
pub mod cli;
pub mod commands;
pub mod controller;
pub mod custody;
pub mod datadir;
pub mod edge;
pub mod enrolment;
pub mod events;
pub mod fleetconfig;
pub(crate) mod limit;
pub mod metrics;
pub mod posctl;
pub mod registry;
pub mod rollouts;
pub mod txstore;

/// The broker process's memory allocator (jemalloc), installed by its binaries with
/// `#[global_allocator]`. Measured against glibc's malloc and mimalloc with 10,000 terminals:
/// after a reconnect storm glibc kept 29.0 KiB per idle connection where jemalloc kept 24.2,
/// because jemalloc returns the pages a storm's concurrent handshakes left behind
/// (docs/benchmarks.md, "Memory per idle terminal").
pub use tikv_jemallocator::Jemalloc as Allocator;
pub mod views;

/// The unit tests run on the broker's allocator too, so the store's ignored benchmarks
/// (`txstore/tests/bench.rs`) measure what the broker would.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: Allocator = Allocator;
