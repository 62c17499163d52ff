//! [`PaymentApp`]: a payment application on a real terminal, submitting generated
//! transactions to the agent's local API and recording what it was told.
//!
//! It behaves as ADR 0005 asks of one: a transaction without an answer (agent down, connection
//! broken, 408, 503) is retried with the same txn id and the same content until the terminal
//! answers 201 or 200, so that every transaction ends up either accepted, with its seq known,
//! or definitively refused. Now and then it submits a transaction twice on purpose; the repeat
//! must be answered 200 with the same seq.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_agent::simulate::transactions::TxnGenerator;
use posfleet_proto::now_ms;
use tokio_util::sync::CancellationToken;

use crate::localapi::{Answer, LocalApiClient};
use crate::txledger::AcceptedLedger;

/// Pause between a failed attempt and the retry.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What one payment application saw.
#[derive(Debug, Clone, Default)]
pub struct PaymentAppStats {
    /// 201 answers.
    pub created: u64,
    /// 200 answers (deliberate repeats, and retries of a transaction stored before its answer
    /// was lost).
    pub repeats: u64,
    /// Attempts without an answer (the agent was down or the connection broke).
    pub no_answer: u64,
    /// 408/503 answers (retried).
    pub retry_later: u64,
    /// Any other answer: unexpected for generated transactions.
    pub unexpected: Vec<Answer>,
}

/// A payment application of one terminal.
#[derive(Debug)]
pub struct PaymentApp {
    device: String,
    api: LocalApiClient,
    generator: TxnGenerator,
    /// Shared by every application of a test: the ground truth.
    ledger: Arc<Mutex<AcceptedLedger>>,
    /// Pause between two transactions.
    pace: Duration,
    /// Every `repeat_every`-th transaction is submitted twice (0: never).
    repeat_every: u64,
    stats: PaymentAppStats,
}

impl PaymentApp {
    pub fn new(
        device: &str,
        api: LocalApiClient,
        index: usize,
        ledger: Arc<Mutex<AcceptedLedger>>,
    ) -> Self {
        Self {
            device: device.to_owned(),
            api,
            generator: TxnGenerator::new(index, rand::random()),
            ledger,
            pace: Duration::from_millis(25),
            repeat_every: 20,
            stats: PaymentAppStats::default(),
        }
    }

    /// Submits transactions until `stop`; the one in progress is always finished (answered).
    pub async fn run(mut self, stop: CancellationToken) -> PaymentAppStats {
        let mut n = 0u64;
        while !stop.is_cancelled() {
            n += 1;
            let txn = self.generator.next_transaction(now_ms());
            let body = match serde_json::to_value(&txn) {
                Ok(body) => body,
                Err(error) => panic!("a generated transaction does not encode: {error}"),
            };
            let seq = self.submit(&txn.txn_id, &body).await;
            if let Some(seq) = seq {
                if self.repeat_every > 0 && n % self.repeat_every == 0 {
                    let again = self.submit(&txn.txn_id, &body).await;
                    if again != Some(seq) {
                        self.stats.unexpected.push(Answer {
                            status: 0,
                            body: serde_json::json!({
                                "repeat_of": txn.txn_id, "seq": seq, "repeat_seq": again
                            }),
                        });
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(self.pace) => {}
            }
        }
        self.stats
    }

    /// Submits until a definitive answer; the seq of a 201/200.
    async fn submit(&mut self, txn_id: &str, body: &serde_json::Value) -> Option<u64> {
        loop {
            match self.api.post_transaction(body).await {
                Ok(answer) if matches!(answer.status, 200 | 201) => {
                    let Some(seq) = answer.seq() else {
                        self.stats.unexpected.push(answer);
                        return None;
                    };
                    if answer.status == 201 {
                        self.stats.created += 1;
                    } else {
                        self.stats.repeats += 1;
                    }
                    self.ledger
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&self.device, txn_id, seq);
                    return Some(seq);
                }
                Ok(answer) if matches!(answer.status, 408 | 503) => self.stats.retry_later += 1,
                Ok(answer) => {
                    self.stats.unexpected.push(answer);
                    return None;
                }
                Err(_) => self.stats.no_answer += 1,
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}
