//! posfleet-tests: the harness of the end-to-end suite (`tests/e2e`) and of the benchmark
//! program (`fleet-bench`). Everything here starts the real binaries as separate processes on
//! loopback (port 0) with temporary directories, and looks at them the way a user would:
//! through the admin API, `/metrics`, `posctl`, and MQTT connections.
//!
//! # Layout
//!
//! - [`bins`]: [`Binaries`], where the wrapper binaries `pf-broker`, `pf-agent` and
//!   `pf-posctl` are (from `CARGO_BIN_EXE_*` in tests, next to the running program in the
//!   benchmark).
//! - [`process`]: [`Process`], a spawned child with its output captured to log files, killed on
//!   drop; SIGKILL / SIGTERM with bounded waits.
//! - [`broker`]: [`Broker`], a `pf-broker serve` (or `demo`) process on a temp data dir: waits
//!   for `posctl.json`, exposes the API client and the MQTT address, kill / terminate /
//!   restart on the same data dir and ports.
//! - [`api`]: [`Api`], the HTTPS admin API client (trusts the fleet CA, bearer token).
//! - [`scrape`]: [`Scrape`], a parsed Prometheus text exposition.
//! - [`agent`]: [`Agent`], a `pf-agent run` process with its own device bundle and config.
//! - [`agentmem`]: `fleet-bench agent-memory`, the real agent's resident memory idle, with
//!   transactions queued and after they drained, beside `mosquitto_sub`; [`memmap`] says
//!   where a process's resident memory is (`/proc/PID/smaps` by class, threads by name).
//! - [`posctl`]: [`Posctl`], runs `pf-posctl --data-dir DIR ...` and captures its output.
//! - [`mqtt`]: hand-made MQTT clients for bad-input tests (any certificate, any client id,
//!   raw TLS sockets).
//! - [`eventually`]: [`eventually()`], the timed assertion every wait goes through.
//! - [`bench`]: the `fleet-bench connect` scenario and its report.
//! - [`flood`]: [`flood::Flood`], a thousand idle or slow attacking sockets (one source address
//!   or one each) against a listener, and the HTTPS client of the legitimate requests.
//! - [`floodbench`]: `fleet-bench flood`: latency of a legitimate request (admin API, device
//!   endpoint) or connect (MQTT edge) under a thousand attacking sockets.
//! - [`host`]: the open-files limit, a process's resident memory, the machine's description.
//! - [`loginbench`]: `fleet-bench logins`: login latency per refusal reason, and a login
//!   flood's effect on a real broker (memory, API latency).
//! - [`localapi`]: [`LocalApiClient`], a terminal's local API (HTTP over its Unix socket) as
//!   the payment application uses it.
//! - [`payapp`]: [`PaymentApp`], a payment application submitting to a real terminal's local
//!   API, retrying until answered, recording every answer.
//! - [`proxy`]: [`Proxy`], a loopback TCP relay between terminals and the broker that a test
//!   can sever (reset everything) or stall (relay nothing, close nothing).
//! - [`txledger`]: what terminals accepted vs what the controller stored, and [`reconcile`].
//! - [`panscan`]: the scan of data directories and logs for card numbers.
//! - [`txbench`]: `fleet-bench faults` (exactly-once at fleet scale under repeated faults)
//!   and `fleet-bench ingest` (sustained durable ingest, accept → ack latency).
//! - [`mosquitto`]: [`mosquitto::Mosquitto`], a Mosquitto configured from
//!   `deploy/external-brokers/` with a broker's fleet PKI, for peer comparisons.
//! - [`versusbench`]: `fleet-bench versus`: the same simulated fleet against posfleet and
//!   against Mosquitto (connect time and attempts, RSS and CPU per terminal, heartbeat
//!   ingest and delay, reconnect storm after a SIGKILL), with ratios; over several sizes.
//! - [`txdriver`]: `pf-txdriver`, payment applications for N simulated terminals with a
//!   crash-proof journal, and [`TxDriver`], its process handle.

#![forbid(unsafe_code)]

pub mod agent;
pub mod agentmem;
pub mod api;
pub mod bench;
pub mod bins;
pub mod broker;
pub mod cmdbench;
pub mod eventually;
pub mod flood;
pub mod floodbench;
pub mod host;
pub mod localapi;
pub mod loginbench;
pub mod memmap;
pub mod mosquitto;
pub mod mqtt;
pub mod panscan;
pub mod payapp;
pub mod posctl;
pub mod process;
pub mod proxy;
pub mod rolloutbench;
pub mod scrape;
pub mod txbench;
pub mod txdriver;
pub mod txledger;
pub mod uplinkflood;
pub mod versusbench;

pub use agent::{Agent, AgentOptions};
pub use api::Api;
pub use bins::Binaries;
pub use broker::{Broker, BrokerOptions};
pub use eventually::eventually;
pub use localapi::LocalApiClient;
pub use payapp::PaymentApp;
pub use posctl::{Posctl, PosctlOutput};
pub use process::Process;
pub use proxy::Proxy;
pub use scrape::Scrape;
pub use txdriver::{TxDriver, TxDriverOptions};
pub use txledger::{AcceptedLedger, StoredLedger, reconcile};
