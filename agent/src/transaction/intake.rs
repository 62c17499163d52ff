//! [`TransactionIntake::accept`]: the one path by which a transaction enters a terminal,
//! shared by the local API (`POST /v1/transactions`) and the simulator.
//!
//! Order: lock state, validation (field rules and PAN guard), durable outbox. Nothing is
//! stored unless every check passed; "accepted" means durably in the outbox.

use super::{Refusal, TransactionRequest};
use crate::outbox::{AcceptOutcome, DeviceOutbox, OutboxError};
use crate::state::LiveState;

/// A transaction the outbox holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub txn_id: String,
    /// Its per-terminal sequence number.
    pub seq: u64,
    /// False for a repeat of an already accepted transaction (same id, same content).
    pub new: bool,
}

/// Why a transaction was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("the terminal is locked; transactions are refused until it is unlocked")]
    Locked,
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("txn id {txn_id} was already accepted (seq {seq}) with different content")]
    Conflict { txn_id: String, seq: u64 },
    #[error("the transaction was not stored: {0}")]
    Outbox(#[from] OutboxError),
}

/// Everything the accept path needs for one terminal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TransactionIntake {
    outbox: DeviceOutbox,
    /// The terminal's lock (set by the command executor).
    live: LiveState,
}

impl TransactionIntake {
    pub fn new(outbox: DeviceOutbox, live: LiveState) -> Self {
        Self { outbox, live }
    }

    pub fn outbox(&self) -> &DeviceOutbox {
        &self.outbox
    }

    /// The terminal's lock and configuration.
    pub fn live(&self) -> &LiveState {
        &self.live
    }

    /// Checks and durably stores one transaction (see the module docs).
    pub async fn accept(&self, request: TransactionRequest) -> Result<Accepted, AcceptError> {
        if self.live.is_locked() {
            return Err(AcceptError::Locked);
        }
        let valid = request.validate().inspect_err(|refusal| {
            if let Refusal::Pan { fields } = refusal {
                // Field names only, never the value.
                tracing::warn!(
                    device_id = %self.outbox.device_id(),
                    fields = %fields.join(","),
                    "transaction refused: full card number (PAN) in a field"
                );
            }
        })?;
        let txn_id = valid.txn_id().to_owned();
        match self.outbox.accept(valid).await? {
            AcceptOutcome::Stored { seq } => Ok(Accepted {
                txn_id,
                seq,
                new: true,
            }),
            AcceptOutcome::Repeat { seq } => Ok(Accepted {
                txn_id,
                seq,
                new: false,
            }),
            AcceptOutcome::Conflict { seq } => Err(AcceptError::Conflict { txn_id, seq }),
        }
    }
}
