//! The only writer of the outbox store: commit rounds (one atomic batch, then one flush +
//! fsync) of accepts and acks, with sequence assignment and the idempotency index.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use posfleet_proto::DeviceId;
use sled::IVec;

use super::OutboxError;
use super::store::{
    DEAD, ENTRY, ENTRY_FORMAT, IDEM, LAST_SEQ, META, SEQ_INDEX, Store, named_key, parse_idem,
    prefix, seq_key, seq_of,
};
use crate::transaction::ValidTransaction;

fn entry_value(accepted_at_ms: u64, seq: u64, txn: &ValidTransaction) -> Vec<u8> {
    let mut value = Vec::with_capacity(9 + txn.max_encoded_len());
    value.push(ENTRY_FORMAT);
    value.extend_from_slice(&accepted_at_ms.to_be_bytes());
    txn.encode_sequenced(seq, &mut value);
    value
}

/// One write of a commit round.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// Store a transaction under the device's next seq, unless its txn id is known.
    Accept {
        device: DeviceId,
        txn: Box<ValidTransaction>,
        accepted_at_ms: u64,
    },
    /// Remove entries `<= through`; move `rejected` ones to the dead letters instead.
    Ack {
        device: DeviceId,
        through: u64,
        rejected: Vec<u64>,
    },
    /// Remove every entry, dead letter and idempotency record of the device (a wipe). The
    /// last assigned seq stays, so the sequence never restarts under the same device id.
    Purge { device: DeviceId },
}

/// What one [`Op`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Stored under a new seq.
    Stored {
        seq: u64,
    },
    /// The same txn id with the same content was stored before, under `seq`.
    Repeat {
        seq: u64,
    },
    /// The same txn id with different content was stored before, under `seq`.
    Conflict {
        seq: u64,
    },
    Acked(AckOutcome),
    /// Entries and dead letters removed by a purge.
    Purged {
        entries: u64,
        dead: u64,
    },
}

/// What an acknowledgement changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Entries removed from the outbox (stored by the controller).
    pub removed: u64,
    /// Entries moved to the dead letters (refused by the controller as conflicts).
    pub dead_lettered: u64,
    /// Rejected seqs that were no longer in the outbox (already acknowledged).
    pub late_rejections: u64,
}

/// The only writer of a [`Store`] (held by the committer thread).
pub(crate) struct Writer {
    store: Arc<Store>,
    /// Idempotency records older than this many seqs are pruned.
    idempotency_window: u64,
    /// Last assigned seq per device, loaded on first use.
    last_seq: HashMap<DeviceId, u64>,
}

impl Writer {
    pub(crate) fn new(store: Arc<Store>, idempotency_window: u64) -> Self {
        Self {
            store,
            idempotency_window: idempotency_window.max(1),
            last_seq: HashMap::new(),
        }
    }

    /// Applies `ops` as one atomic batch and makes it durable (if it stored anything), then
    /// returns one outcome per op. On an error nothing may be assumed about the round: the
    /// caller must stop using this writer.
    pub(crate) fn commit(&mut self, ops: &[Op]) -> Result<Vec<Outcome>, OutboxError> {
        let store = self.store.clone();
        let mut round = Round::new(&store.tree);
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut stored_any = false;
        for op in ops {
            let outcome = match op {
                Op::Accept {
                    device,
                    txn,
                    accepted_at_ms,
                } => {
                    let outcome = self.accept(&mut round, device, txn, *accepted_at_ms)?;
                    stored_any |= matches!(outcome, Outcome::Stored { .. });
                    outcome
                }
                Op::Ack {
                    device,
                    through,
                    rejected,
                } => Outcome::Acked(ack(&mut round, device, *through, rejected)?),
                Op::Purge { device } => {
                    // A wipe must not come back after a crash: make it durable.
                    stored_any = true;
                    purge(&mut round, device)?
                }
            };
            outcomes.push(outcome);
        }
        let touched: Vec<(DeviceId, u64)> = round
            .touched
            .iter()
            .filter_map(|d| self.last_seq.get(d).map(|s| (d.clone(), *s)))
            .collect();
        for (device, last) in touched {
            round.insert(
                named_key(META, &device, LAST_SEQ),
                last.to_be_bytes().to_vec(),
            );
        }
        store.tree.apply_batch(round.batch)?;
        // Removals alone need no fsync: if they are lost, the entries are sent again and the
        // controller answers with an ack again.
        if stored_any {
            store.sync()?;
        }
        Ok(outcomes)
    }

    fn accept(
        &mut self,
        round: &mut Round<'_>,
        device: &DeviceId,
        txn: &ValidTransaction,
        accepted_at_ms: u64,
    ) -> Result<Outcome, OutboxError> {
        let idem_key = named_key(IDEM, device, txn.txn_id().as_bytes());
        if let Some(known) = round.get(&idem_key)? {
            let (seq, digest) = parse_idem(&known).ok_or_else(|| OutboxError::Corrupt {
                detail: "idempotency record has an unknown layout".into(),
            })?;
            return Ok(if &digest == txn.digest() {
                Outcome::Repeat { seq }
            } else {
                Outcome::Conflict { seq }
            });
        }
        let last = match self.last_seq.get(device) {
            Some(last) => *last,
            None => self.store.snapshot_last_seq(device)?,
        };
        let seq = last + 1;
        self.last_seq.insert(device.clone(), seq);
        round.touched.insert(device.clone());
        round.insert(
            seq_key(ENTRY, device, seq),
            entry_value(accepted_at_ms, seq, txn),
        );
        let mut idem = Vec::with_capacity(40);
        idem.extend_from_slice(&seq.to_be_bytes());
        idem.extend_from_slice(txn.digest());
        round.insert(idem_key, idem);
        round.insert(
            seq_key(SEQ_INDEX, device, seq),
            txn.txn_id().as_bytes().to_vec(),
        );
        if seq > self.idempotency_window {
            let old = seq - self.idempotency_window;
            let index_key = seq_key(SEQ_INDEX, device, old);
            if let Some(old_id) = round.get(&index_key)? {
                round.remove(named_key(IDEM, device, &old_id));
                round.remove(index_key);
            }
        }
        Ok(Outcome::Stored { seq })
    }
}

fn ack(
    round: &mut Round<'_>,
    device: &DeviceId,
    through: u64,
    rejected: &[u64],
) -> Result<AckOutcome, OutboxError> {
    let rejected: HashSet<u64> = rejected.iter().copied().collect();
    let mut outcome = AckOutcome::default();
    let mut found = HashSet::new();
    let range = seq_key(ENTRY, device, 0)..=seq_key(ENTRY, device, through);
    let mut covered: Vec<(u64, IVec)> = Vec::new();
    for item in round.tree.range(range) {
        let (key, value) = item?;
        if let Some(seq) = seq_of(&key) {
            covered.push((seq, value));
        }
    }
    // Rejected seqs above `through` leave the outbox too: the controller holds a conflicting
    // record for them, so sending them again can never store them.
    for &seq in rejected.iter().filter(|s| **s > through) {
        if let Some(value) = round.tree.get(seq_key(ENTRY, device, seq))? {
            covered.push((seq, value));
        }
    }
    // Entries written earlier in this same round (not in the tree yet).
    let entry_prefix = prefix(ENTRY, device);
    for (key, value) in &round.overlay {
        if let (Some(value), true) = (value, key.starts_with(&entry_prefix)) {
            if let Some(seq) = seq_of(key).filter(|s| *s <= through || rejected.contains(s)) {
                covered.push((seq, value.clone()));
            }
        }
    }
    covered.sort_by_key(|(seq, _)| *seq);
    covered.dedup_by_key(|(seq, _)| *seq);
    for (seq, value) in covered {
        let key = seq_key(ENTRY, device, seq);
        if round.removed(&key) {
            continue;
        }
        if rejected.contains(&seq) {
            found.insert(seq);
            round.insert(seq_key(DEAD, device, seq), value);
            outcome.dead_lettered += 1;
        } else {
            outcome.removed += 1;
        }
        round.remove(key);
    }
    outcome.late_rejections = u64::try_from(rejected.len() - found.len()).unwrap_or(u64::MAX);
    Ok(outcome)
}

fn purge(round: &mut Round<'_>, device: &DeviceId) -> Result<Outcome, OutboxError> {
    let (mut entries, mut dead) = (0, 0);
    for kind in [ENTRY, DEAD, IDEM, SEQ_INDEX] {
        let kind_prefix = prefix(kind, device);
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for item in round.tree.scan_prefix(&kind_prefix) {
            keys.push(item?.0.to_vec());
        }
        // Records written earlier in this same round (not in the tree yet).
        keys.extend(
            round
                .overlay
                .iter()
                .filter(|(k, v)| v.is_some() && k.starts_with(&kind_prefix))
                .map(|(k, _)| k.clone()),
        );
        keys.sort();
        keys.dedup();
        for key in keys {
            if round.removed(&key) {
                continue;
            }
            match kind {
                ENTRY => entries += 1,
                DEAD => dead += 1,
                _ => {}
            }
            round.remove(key);
        }
    }
    Ok(Outcome::Purged { entries, dead })
}

/// One commit round: a sled batch plus an overlay of its writes, so that later ops of the
/// round read what earlier ops wrote.
struct Round<'a> {
    tree: &'a sled::Tree,
    batch: sled::Batch,
    overlay: HashMap<Vec<u8>, Option<IVec>>,
    touched: HashSet<DeviceId>,
}

impl<'a> Round<'a> {
    fn new(tree: &'a sled::Tree) -> Self {
        Self {
            tree,
            batch: sled::Batch::default(),
            overlay: HashMap::new(),
            touched: HashSet::new(),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<IVec>, OutboxError> {
        match self.overlay.get(key) {
            Some(value) => Ok(value.clone()),
            None => Ok(self.tree.get(key)?),
        }
    }

    fn removed(&self, key: &[u8]) -> bool {
        matches!(self.overlay.get(key), Some(None))
    }

    fn insert(&mut self, key: Vec<u8>, value: impl Into<IVec>) {
        // An IVec clone shares the bytes.
        let value = value.into();
        self.batch.insert(key.clone(), value.clone());
        self.overlay.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.batch.remove(key.clone());
        self.overlay.insert(key, None);
    }
}
