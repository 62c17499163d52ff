//! `pf-txdriver`: the payment applications of N simulated terminals.
//!
//! The terminals are the simulator's ([`posfleet_agent::simulate`]: the real agent code, one
//! MQTT session each, one shared outbox store); the simulator's own tills are off. Instead one
//! task per terminal submits generated transactions ([`TxnGenerator`], Poisson arrivals) to
//! the terminal's [`TransactionIntake::accept`], the call `POST /v1/transactions` makes, and
//! keeps what it was told:
//!
//! - with `--journal`, a crash-proof record of every submission and answer, and in-doubt
//!   submissions resubmitted after a restart ([`journal`]): the ground truth of the fault
//!   test and of `fleet-bench faults`;
//! - per terminal, when each seq was accepted; a poller sees when the terminal's outbox has
//!   removed it on the controller's acknowledgement ([`DriverStatus::ack_latency`]);
//! - a status file (JSON, replaced atomically every 200 ms): counters, outbox depth,
//!   latency histograms ([`DriverStatus`]).
//!
//! About 1% of transactions are submitted twice; the repeat must be answered with the same seq.
//! SIGUSR1 stops generating (each task finishes its current submission); SIGTERM stops
//! everything gracefully.
//!
//! [`TxnGenerator`]: posfleet_agent::simulate::transactions::TxnGenerator
//! [`TransactionIntake::accept`]: posfleet_agent::TransactionIntake::accept

mod handle;
pub mod histogram;
pub mod journal;
mod run;

use serde::{Deserialize, Serialize};

pub use handle::{TxDriver, TxDriverOptions};
pub use histogram::Histogram;
pub use journal::{Journal, JournalReplay};
pub use run::{DriverConfig, run_driver};

/// The driver's status file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverStatus {
    /// The driver process that wrote it.
    pub pid: u32,
    /// When it was written (Unix ms).
    pub written_at_ms: u64,
    pub terminals: u64,
    /// Terminals started so far, and connected now.
    pub started: u64,
    pub connected: u64,
    /// Whether new transactions are still generated (false after SIGUSR1).
    pub generating: bool,
    /// Payment-application tasks still running (in-doubt resubmissions included).
    pub tills_running: u64,
    /// New transactions generated.
    pub offered: u64,
    /// Answered 201 (stored under a new seq), in-doubt resubmissions included.
    pub accepted_new: u64,
    /// Answered 200 (a repeat), in-doubt resubmissions included.
    pub repeats: u64,
    /// Deliberate repeats answered with a seq other than the original's (must stay 0).
    pub repeat_mismatches: u64,
    /// In-doubt requests of an earlier driver resubmitted: answered 200 (had been stored) or
    /// 201 (had not).
    pub resolved_stored: u64,
    pub resolved_new: u64,
    /// In-doubt requests from the journal not yet resubmitted or answered.
    pub unresolved: u64,
    /// Definitive refusals (invalid, locked, conflict): must stay 0 for generated load.
    pub refused: u64,
    /// Outbox errors (full, closed, failed) that made a submission wait and retry.
    pub outbox_retries: u64,
    /// Journal writes that failed (the ground truth is then incomplete: must stay 0).
    pub journal_errors: u64,
    /// Transactions in the terminals' outboxes not yet acknowledged.
    pub pending: u64,
    /// Transactions accepted by this process whose acknowledgement has been seen.
    pub acked: u64,
    /// Call → answer of `accept` (what `POST /v1/transactions` costs: validation, durable
    /// outbox write), microseconds.
    pub accept_latency: Histogram,
    /// Answer (201) → the entry left the outbox on the controller's acknowledgement.
    pub ack_latency: Histogram,
    /// The shared outbox's group commits: rounds and writes (accepts and ack removals).
    pub commit_rounds: u64,
    pub commit_writes: u64,
    /// Acks received by all terminals: valid, malformed, bogus.
    pub acks_valid: u64,
    pub acks_malformed: u64,
    pub acks_bogus: u64,
}

impl DriverStatus {
    /// Nothing more to do: no generation, no task running, nothing in doubt or pending.
    pub fn drained(&self) -> bool {
        !self.generating && self.tills_running == 0 && self.unresolved == 0 && self.pending == 0
    }
}
