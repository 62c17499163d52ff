//! [`Ledger`]: the per-device summary kept in memory and under the `l` keys, so a summary or
//! an acknowledgement never needs a scan. The stored copy is written in the same batch as the
//! records it counts, or left a little behind and caught up at open (`commit.rs`, "Ledger
//! checkpoints").

use std::collections::BTreeMap;

use posfleet_proto::pb;
use serde::{Deserialize, Serialize};

use super::validate::ValidTx;

/// Version of the JSON layout.
pub(crate) const LEDGER_VERSION: u32 = 1;

/// What is stored for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ledger {
    /// Layout version ([`LEDGER_VERSION`]).
    pub v: u32,
    /// Records stored.
    pub count: u64,
    /// Sum of approved amounts by currency (saturating; 10^12 per record keeps it far away).
    pub approved_amount_minor: BTreeMap<String, i64>,
    /// Highest seq stored (0: none).
    pub last_seq: u64,
    /// Every seq 1..=durable_through_seq is stored: the acknowledgement's value.
    pub durable_through_seq: u64,
    /// Set (controller clock) when records first waited above a missing seq; cleared when
    /// the gap is filled. The gap watcher alerts when it is older than the grace period.
    pub gap_since_ms: Option<u64>,
    /// Conflicting records kept in the `conflicts` tree.
    pub conflicts: u64,
    /// First and last time a record was stored (controller clock).
    pub first_received_ms: Option<u64>,
    pub last_received_ms: Option<u64>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            v: LEDGER_VERSION,
            count: 0,
            approved_amount_minor: BTreeMap::new(),
            last_seq: 0,
            durable_through_seq: 0,
            gap_since_ms: None,
            conflicts: 0,
            first_received_ms: None,
            last_received_ms: None,
        }
    }
}

impl Ledger {
    /// Counts a newly stored record (the watermark is advanced separately, see
    /// [`Ledger::settle`]).
    pub(crate) fn stored(&mut self, tx: &ValidTx, received_at_ms: u64) {
        let t = tx.get();
        self.count += 1;
        self.last_seq = self.last_seq.max(t.seq);
        if t.status == pb::TransactionStatus::Approved as i32 {
            let sum = self
                .approved_amount_minor
                .entry(t.currency.clone())
                .or_insert(0);
            *sum = sum.saturating_add(t.amount_minor);
        }
        // min and max: replaying records in seq order at open (`catch_up`) gives the same
        // ledger as storing them in arrival order did.
        self.first_received_ms = Some(
            self.first_received_ms
                .map_or(received_at_ms, |t| t.min(received_at_ms)),
        );
        self.last_received_ms = Some(
            self.last_received_ms
                .map_or(received_at_ms, |t| t.max(received_at_ms)),
        );
    }

    /// Advances the watermark over every following seq `stored` says is present, then
    /// starts or clears the gap clock.
    pub(crate) fn settle(&mut self, at_ms: u64, mut stored: impl FnMut(u64) -> bool) {
        while self.durable_through_seq < self.last_seq && stored(self.durable_through_seq + 1) {
            self.durable_through_seq += 1;
        }
        if self.has_gap() {
            self.gap_since_ms.get_or_insert(at_ms);
        } else {
            self.gap_since_ms = None;
        }
    }

    /// True if records are stored above a missing seq.
    pub(crate) fn has_gap(&self) -> bool {
        self.last_seq > self.durable_through_seq
    }
}
