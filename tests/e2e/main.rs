//! posfleet end-to-end suite: the real `posfleet-broker`, `posfleet-agent` and `posctl` (as
//! this crate's `pf-*` wrapper binaries) as separate processes on loopback, temp dirs, port 0.
//! Every test asserts what an operator would see: the admin API, `/metrics`, `posctl` output,
//! and how a (mis)behaving MQTT client is treated.
//!
//! # Layout
//!
//! - `support`: the binaries, broker/agent start-up shorthands, and the timed waits shared by
//!   the tests (device online/offline, heartbeats advancing, metric deltas).
//! - `fleet`: terminals come online with heartbeats and telemetry; API, `posctl devices
//!   list/show` and `posctl watch`; API authentication.
//! - `lifecycle`: a SIGKILLed terminal goes offline (`connection_lost`), a SIGTERMed one says
//!   goodbye (`shutdown`), a restarted one comes back; the broker survives SIGTERM and SIGKILL
//!   with its registry, and terminals reconnect by themselves.
//! - `simulate`: `demo` mode and the `simulate` fleet (the benchmark's load generator).
//! - `transactions`: what a terminal's local API accepted is stored exactly once through
//!   kill -9 of controller, agents and simulated terminals, network cuts and stalls; repeats,
//!   conflicts, the status endpoint; no card number in any data directory or log.
//! - `commands`: the signed command plane: lock/unlock, configuration pushes, wipe, reboot,
//!   logs, groups and labels, offline convergence, the offline lease, forged and replayed
//!   commands, crashes of either side with commands pending, refused API requests.
//! - `updates`: signed software updates and staged rollouts: release keys, artifact upload
//!   and refusals, downloads that resume, terminals that refuse tampered or untrusted
//!   artifacts, failing canaries, health timeouts, offline members, a controller crash in the
//!   middle of a rollout, pause/resume/abort.
//! - `pki`: certificates issued with `posctl pki issue-device` (through the API, or offline
//!   while the controller is stopped) are recorded and revocable before first contact;
//!   enrolment tokens pinned to a device id.
//! - `bad_input`: every kind of bad client is refused, counted in `/metrics`, changes nothing,
//!   and does not disturb a well-behaved terminal.
//! - `admission`: a thousand idle or slow clients (one address, or one each) do not keep a
//!   legitimate client out of the admin API, the device endpoint or the MQTT edge.

mod accounts;
mod admission;
mod bad_input;
mod commands;
mod fleet;
mod lifecycle;
mod pki;
mod simulate;
mod support;
mod transactions;
mod updates;
