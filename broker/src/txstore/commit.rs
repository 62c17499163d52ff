//! The write side: one group commit for many submissions.
//!
//! Everything a commit changes (records, both time indexes, conflicts and the ledgers it
//! writes) goes into one `sled::Batch`, so after a crash either all of it or none of it is
//! there.
//!
//! # Ledger checkpoints
//!
//! A device's ledger is not written by every commit that touches it: writing ~1,000 ledgers
//! per commit was a sixth of a commit's cost with 1,000 terminals sending one transaction at
//! a time (docs/benchmarks.md, "The controller alone"). A commit writes a device's ledger when
//! [`must_write`] says so: the device is new, it had or has a gap, a conflict was recorded,
//! or the stored copy is [`CHECKPOINT_MS`] old or [`CHECKPOINT_RECORDS`] behind. Otherwise the
//! stored copy is left behind, which is only ever the case while the device has no gap and
//! every record it lacks has a higher seq than its `last_seq`, all contiguous. Opening the
//! store replays those records (`mod.rs`, `catch_up`), so the loaded ledger is exactly the
//! one the last durable commit had in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::PoisonError;

use posfleet_proto::DeviceId;

use super::error::TxStoreError;
use super::keys;
use super::ledger::Ledger;
use super::record::{self, encode_value, split_value};
use super::validate::ValidTx;
use super::{TxStore, Unsaved, durable};
use crate::views::TransactionView;

/// A ledger left behind by commits is written once its stored copy is this old (controller
/// clock, from the first commit that left it behind)...
pub(crate) const CHECKPOINT_MS: u64 = 1_000;
/// ...or once it lacks this many records: opening the store replays at most this many
/// records per device.
pub(crate) const CHECKPOINT_RECORDS: u64 = 1_024;

/// One `TransactionBatch` from one device, validated.
#[derive(Debug, Clone)]
pub(crate) struct Submission {
    /// The topic's device: the connection's certificate identity.
    pub device: DeviceId,
    /// Controller clock at receipt, Unix ms.
    pub received_at_ms: u64,
    pub records: Vec<ValidTx>,
}

/// What one commit did for one device: what its acknowledgement says, and what to announce.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DeviceOutcome {
    pub device: DeviceId,
    /// The device's watermark after the commit (durable).
    pub durable_through_seq: u64,
    /// Seqs carried by this commit's submissions that were refused as conflicts (sorted).
    pub rejected_seqs: Vec<u64>,
    /// Records stored by this commit, in arrival order.
    pub stored: Vec<TransactionView>,
    /// Records that were already stored with the same content.
    pub duplicates: u64,
    /// Conflicting records recorded for the first time (seq, txn id).
    pub new_conflicts: Vec<(u64, String)>,
    /// True if the device has records above a missing seq after the commit.
    pub gap: bool,
}

/// What one commit did.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CommitOutcome {
    /// One entry per device that had a submission in the commit, by device id.
    pub devices: Vec<DeviceOutcome>,
}

impl CommitOutcome {
    pub(crate) fn stored(&self) -> usize {
        self.devices.iter().map(|d| d.stored.len()).sum()
    }

    pub(crate) fn duplicates(&self) -> u64 {
        self.devices.iter().map(|d| d.duplicates).sum()
    }

    pub(crate) fn conflicts(&self) -> usize {
        self.devices.iter().map(|d| d.rejected_seqs.len()).sum()
    }
}

/// A device's part of a commit being built.
struct Pending {
    ledger: Ledger,
    outcome: DeviceOutcome,
    /// Latest receive time of its submissions (starts the gap clock).
    at_ms: u64,
    /// True if the ledger changed.
    dirty: bool,
    /// True if it has to be written by this commit whatever [`must_write`] says (new device,
    /// a conflict was recorded).
    force: bool,
    /// The ledger had a gap before this commit.
    gap_before: bool,
    /// This commit writes the ledger.
    written: bool,
}

impl Pending {
    /// Records this commit stored for the device.
    fn stored(&self) -> u64 {
        self.outcome.stored.len() as u64
    }
}

/// Whether a commit that changed a device's ledger writes it (module docs). `unsaved`: how far
/// the stored copy is behind before this commit (`None`: it is current).
fn must_write(p: &Pending, unsaved: Option<&Unsaved>) -> bool {
    if p.force || p.gap_before || p.ledger.has_gap() {
        return true;
    }
    match unsaved {
        None => p.stored() >= CHECKPOINT_RECORDS,
        Some(u) => {
            u.records + p.stored() >= CHECKPOINT_RECORDS
                || p.at_ms.saturating_sub(u.since_ms) >= CHECKPOINT_MS
        }
    }
}

impl TxStore {
    /// Stores `submissions` as one durable group commit (storage rules 2 and 4) and returns,
    /// per device, what its acknowledgement must say. Blocks on disk I/O: the committer runs
    /// it on a blocking thread. Commits are serialised.
    ///
    /// On error nothing is published or acknowledged; whatever was applied before a failed
    /// flush becomes durable (and published) with the next successful commit.
    pub(crate) fn commit(
        &self,
        submissions: Vec<Submission>,
    ) -> Result<CommitOutcome, TxStoreError> {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batch = sled::Batch::default();
        // Records and conflicts added by this commit (not yet in the trees).
        let mut new_records: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut new_conflicts: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
        let mut pending: BTreeMap<DeviceId, Pending> = BTreeMap::new();

        for sub in submissions {
            let device = sub.device;
            let p = pending.entry(device.clone()).or_insert_with(|| {
                let known = writer.ledgers.get(&device);
                let ledger = known.cloned().unwrap_or_default();
                Pending {
                    gap_before: ledger.has_gap(),
                    force: known.is_none(),
                    written: false,
                    ledger,
                    outcome: DeviceOutcome {
                        device: device.clone(),
                        durable_through_seq: 0,
                        rejected_seqs: Vec::new(),
                        stored: Vec::new(),
                        duplicates: 0,
                        new_conflicts: Vec::new(),
                        gap: false,
                    },
                    at_ms: 0,
                    dirty: false,
                }
            });
            p.at_ms = p.at_ms.max(sub.received_at_ms);
            for tx in sub.records {
                let key = keys::record(&device, tx.seq());
                let proto = tx.encode();
                // Nothing above the ledger's last seq is in the tree (`writer.ledgers` is
                // what has been applied): the common case needs no lookup.
                let existing = if tx.seq() > p.ledger.last_seq {
                    None
                } else {
                    self.existing(&new_records, &key)?
                };
                match existing {
                    None => {
                        let value = encode_value(sub.received_at_ms, &proto);
                        let ts = tx.get().timestamp_ms;
                        batch.insert(keys::by_time(ts, &device, tx.seq()), &[][..]);
                        batch.insert(keys::by_device_time(&device, ts, tx.seq()), &[][..]);
                        batch.insert(key.clone(), value);
                        new_records.insert(key, proto);
                        p.ledger.stored(&tx, sub.received_at_ms);
                        p.dirty = true;
                        p.outcome
                            .stored
                            .push(record::view(&device, &tx, sub.received_at_ms));
                    }
                    Some(stored) if stored == proto => p.outcome.duplicates += 1,
                    Some(_) => {
                        p.outcome.rejected_seqs.push(tx.seq());
                        let added = self.add_conflict(
                            &mut batch,
                            &mut new_conflicts,
                            &device,
                            tx.seq(),
                            encode_value(sub.received_at_ms, &proto),
                            proto,
                        )?;
                        if added {
                            p.ledger.conflicts += 1;
                            p.dirty = true;
                            p.force = true;
                            p.outcome
                                .new_conflicts
                                .push((tx.seq(), tx.get().txn_id.clone()));
                        }
                    }
                }
            }
        }

        for (device, p) in &mut pending {
            let mut error = None;
            let before = (p.ledger.durable_through_seq, p.ledger.gap_since_ms);
            p.ledger.settle(p.at_ms, |seq| {
                let key = keys::record(device, seq);
                if new_records.contains_key(&key) {
                    return true;
                }
                match self.tree.contains_key(&key) {
                    Ok(found) => found,
                    Err(e) => {
                        error = Some(e);
                        false
                    }
                }
            });
            if let Some(e) = error {
                return Err(self.read_error(e));
            }
            p.dirty |= before != (p.ledger.durable_through_seq, p.ledger.gap_since_ms);
            if p.dirty && must_write(p, writer.unsaved.get(device)) {
                p.written = true;
                let json = serde_json::to_vec(&p.ledger)
                    .map_err(|e| self.corrupt(&keys::ledger(device), e.to_string()))?;
                batch.insert(keys::ledger(device), json);
            }
        }

        let write = |source| TxStoreError::Write {
            path: self.cfg.dir.clone(),
            source,
        };
        self.tree.apply_batch(batch).map_err(write)?;
        for (device, p) in pending.iter().filter(|(_, p)| p.dirty) {
            writer.ledgers.insert(device.clone(), p.ledger.clone());
            writer.unpublished.insert(device.clone());
            if p.written {
                writer.unsaved.remove(device);
            } else {
                let u = writer.unsaved.entry(device.clone()).or_insert(Unsaved {
                    since_ms: p.at_ms,
                    records: 0,
                });
                u.records += p.stored();
            }
        }
        durable(&self.tree, &self.cfg.dir)?;
        #[cfg(test)]
        if let Some(hook) = &self.cfg.after_sync {
            hook();
        }

        let mut published = self
            .published
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for device in std::mem::take(&mut writer.unpublished) {
            if let Some(ledger) = writer.ledgers.get(&device) {
                published.insert(device, ledger.clone());
            }
        }
        drop(published);

        let devices = pending
            .into_values()
            .map(|p| {
                let mut outcome = p.outcome;
                outcome.durable_through_seq = p.ledger.durable_through_seq;
                outcome.gap = p.ledger.has_gap();
                outcome.rejected_seqs.sort_unstable();
                outcome.rejected_seqs.dedup();
                outcome
            })
            .collect();
        Ok(CommitOutcome { devices })
    }

    /// The stored protobuf of `key` (this commit's or the tree's).
    fn existing(
        &self,
        new_records: &HashMap<Vec<u8>, Vec<u8>>,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, TxStoreError> {
        if let Some(proto) = new_records.get(key) {
            return Ok(Some(proto.clone()));
        }
        let Some(value) = self.tree.get(key).map_err(|e| self.read_error(e))? else {
            return Ok(None);
        };
        let (_, proto) = split_value(&value).map_err(|e| self.corrupt(key, e))?;
        Ok(Some(proto.to_vec()))
    }

    /// Records a conflicting record unless the same one is already recorded. Returns whether
    /// it was new.
    fn add_conflict(
        &self,
        batch: &mut sled::Batch,
        new_conflicts: &mut HashMap<Vec<u8>, Vec<Vec<u8>>>,
        device: &DeviceId,
        seq: u64,
        value: Vec<u8>,
        proto: Vec<u8>,
    ) -> Result<bool, TxStoreError> {
        let prefix = keys::conflict_prefix(device, seq);
        let mut known = 0u32;
        for item in self.tree.scan_prefix(&prefix) {
            let (key, stored) = item.map_err(|e| self.read_error(e))?;
            let (_, stored) = split_value(&stored).map_err(|e| self.corrupt(&key, e))?;
            if stored == proto.as_slice() {
                return Ok(false);
            }
            known += 1;
        }
        let this_commit = new_conflicts.entry(prefix).or_default();
        if this_commit.contains(&proto) {
            return Ok(false);
        }
        let n = known + u32::try_from(this_commit.len()).unwrap_or(u32::MAX);
        this_commit.push(proto);
        batch.insert(keys::conflict(device, seq, n), value);
        Ok(true)
    }
}
