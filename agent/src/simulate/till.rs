//! One simulated terminal's payment application: Poisson arrivals of generated
//! transactions into the terminal's [`TransactionIntake::accept`] (the local API's call).

use std::sync::atomic::Ordering;
use std::time::Duration;

use posfleet_proto::now_ms;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::transactions::TxnGenerator;
use super::{AcceptedRecord, SimulatorConfig, SimulatorHandle};
use crate::agent::AgentHandle;
use crate::outbox::OutboxError;
use crate::transaction::{AcceptError, TransactionIntake, TransactionRequest};

/// Share of transactions the simulated payment application sends twice.
const REPEAT_PROBABILITY: f64 = 0.01;

/// Starts terminal `index`'s till, if transactions are enabled.
pub(super) fn start_till(
    cfg: &SimulatorConfig,
    sim: &SimulatorHandle,
    index: usize,
    agent: &AgentHandle,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    if cfg.tx_rate_per_minute <= 0.0 {
        return;
    }
    let till = Till {
        intake: agent.intake().clone(),
        generator: TxnGenerator::new(index, rand::random()),
        mean_interval: Duration::from_secs_f64(60.0 / cfg.tx_rate_per_minute),
        sim: sim.clone(),
        index,
    };
    tracker.spawn(till.run(cancel.child_token()));
}

/// One terminal's simulated payment application.
struct Till {
    intake: TransactionIntake,
    generator: TxnGenerator,
    mean_interval: Duration,
    sim: SimulatorHandle,
    index: usize,
}

impl Till {
    async fn run(mut self, cancel: CancellationToken) {
        // Random phase, then Poisson arrivals on an absolute schedule (a slow accept does
        // not lower the rate, but a schedule more than a second behind is reset).
        let mut due = Instant::now() + self.gap();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(due) => {}
            }
            let txn = self.generator.next_transaction(now_ms());
            let repeat = rand::random_bool(REPEAT_PROBABILITY).then(|| txn.clone());
            self.submit(txn).await;
            if let Some(again) = repeat {
                self.submit(again).await;
            }
            due += self.gap();
            let now = Instant::now();
            if now > due + Duration::from_secs(1) {
                due = now;
            }
        }
    }

    /// An exponentially distributed gap with the configured mean.
    fn gap(&self) -> Duration {
        let u: f64 = rand::random_range(f64::EPSILON..1.0);
        self.mean_interval
            .mul_f64(-u.ln())
            .min(self.mean_interval * 20)
    }

    async fn submit(&self, txn: TransactionRequest) {
        let counters = &self.sim.counters[self.index];
        match self.intake.accept(txn).await {
            Ok(accepted) if accepted.new => {
                counters.max_seq.fetch_max(accepted.seq, Ordering::AcqRel);
                if let Some(records) = &self.sim.records {
                    records
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(AcceptedRecord {
                            device_id: self.intake.outbox().device_id().clone(),
                            seq: accepted.seq,
                            txn_id: accepted.txn_id,
                        });
                }
                // Counted last: a reader who sees the count also sees the record.
                counters.accepted.fetch_add(1, Ordering::AcqRel);
            }
            Ok(_) => {
                counters.duplicates.fetch_add(1, Ordering::AcqRel);
            }
            Err(error) => {
                counters.refused.fetch_add(1, Ordering::AcqRel);
                if !matches!(error, AcceptError::Outbox(OutboxError::Closed)) {
                    warn!(device_id = %self.intake.outbox().device_id(), %error, "simulated transaction not accepted");
                }
            }
        }
    }
}
