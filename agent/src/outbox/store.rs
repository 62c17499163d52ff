//! The crate's one storage module: the sled outbox, used only as `notes/storage.md` says.
//!
//! - sled is pinned to 0.34.7; `snap.*.generating` files are deleted before every open; the
//!   cache capacity is explicit.
//! - Durability: every round of writes is one `apply_batch` on one tree (atomic), then
//!   `flush()` and an fsync of the store's `db` file through a second handle. Nobody is told
//!   "stored" before that.
//! - One writer: only the committer thread holds the [`Writer`]; everyone else reads.
//!
//! # Key layout (one tree, `outbox`)
//!
//! Every key is `[kind][device id][0x00][suffix]` (a device id never holds a NUL), so one
//! store serves one terminal or a whole simulated fleet, and one batch covers every terminal
//! and every kind of record:
//!
//! | kind | suffix | value |
//! | --- | --- | --- |
//! | `e` entry | seq (u64 BE) | [`ENTRY_FORMAT`], accepted-at ms (u64 BE), `Transaction` protobuf |
//! | `d` dead letter | seq (u64 BE) | as an entry |
//! | `i` idempotency | txn id | seq (u64 BE), SHA-256 content digest |
//! | `s` seq → txn id | seq (u64 BE) | txn id (to prune the idempotency index) |
//! | `m` meta | `last_seq` | the last sequence number assigned (u64 BE) |

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use posfleet_proto::{DeviceId, pb};
use prost::Message;
use sled::IVec;

use super::OutboxError;
use crate::transaction::{ContentDigest, ValidTransaction};

const TREE: &str = "outbox";
/// First byte of an entry value: the layout version.
pub(crate) const ENTRY_FORMAT: u8 = 1;
const ENTRY: u8 = b'e';
const DEAD: u8 = b'd';
const IDEM: u8 = b'i';
const SEQ_INDEX: u8 = b's';
const META: u8 = b'm';
const LAST_SEQ: &[u8] = b"last_seq";

fn prefix(kind: u8, device: &DeviceId) -> Vec<u8> {
    let id = device.as_str().as_bytes();
    let mut key = Vec::with_capacity(id.len() + 10 + 64);
    key.push(kind);
    key.extend_from_slice(id);
    key.push(0);
    key
}

fn seq_key(kind: u8, device: &DeviceId, seq: u64) -> Vec<u8> {
    let mut key = prefix(kind, device);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn named_key(kind: u8, device: &DeviceId, name: &[u8]) -> Vec<u8> {
    let mut key = prefix(kind, device);
    key.extend_from_slice(name);
    key
}

fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

fn u64_of(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// A stored transaction, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEntry {
    pub seq: u64,
    /// When the outbox accepted it (agent clock, Unix ms).
    pub accepted_at_ms: u64,
    /// The `Transaction` protobuf (with `seq`), exactly as it goes on the wire.
    pub encoded: IVec,
}

impl StoredEntry {
    fn parse(seq: u64, value: IVec) -> Result<Self, OutboxError> {
        let corrupt = || OutboxError::Corrupt {
            detail: format!("entry {seq} has an unknown layout"),
        };
        if value.first() != Some(&ENTRY_FORMAT) || value.len() < 9 {
            return Err(corrupt());
        }
        let accepted_at_ms = u64_of(&value[1..]).ok_or_else(corrupt)?;
        Ok(Self {
            seq,
            accepted_at_ms,
            encoded: value.subslice(9, value.len() - 9),
        })
    }

    /// Decodes the wire record.
    pub fn transaction(&self) -> Result<pb::Transaction, OutboxError> {
        pb::Transaction::decode(self.encoded.as_ref()).map_err(|e| OutboxError::Corrupt {
            detail: format!("entry {} does not decode: {e}", self.seq),
        })
    }
}

fn entry_value(accepted_at_ms: u64, seq: u64, txn: &ValidTransaction) -> Vec<u8> {
    let mut value = Vec::with_capacity(9 + txn.max_encoded_len());
    value.push(ENTRY_FORMAT);
    value.extend_from_slice(&accepted_at_ms.to_be_bytes());
    txn.encode_sequenced(seq, &mut value);
    value
}

/// What a device's records look like on disk (read once when its handle is made).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeviceSnapshot {
    pub(crate) last_seq: u64,
    pub(crate) depth: u64,
    pub(crate) dead: u64,
}

/// The open store. Reads are safe from any thread; writes only through [`Writer`].
pub(crate) struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// A second handle on the `db` file, fsynced after every flush (notes/storage.md rule 2).
    db_file: File,
    dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates, mode 0700) the store in `dir`. Blocking.
    pub(crate) fn open(dir: &Path, cache_capacity: u64) -> Result<Self, OutboxError> {
        let io = |source| OutboxError::Open {
            path: dir.to_owned(),
            source: Box::new(source),
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        remove_partial_snapshots(dir).map_err(io)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .open()
            .map_err(|e| OutboxError::Open {
                path: dir.to_owned(),
                source: Box::new(e),
            })?;
        let tree = db.open_tree(TREE)?;
        let db_file = File::open(dir.join("db")).map_err(io)?;
        Ok(Self {
            db,
            tree,
            db_file,
            dir: dir.to_owned(),
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counts a device's records. Blocking; O(records of the device).
    pub(crate) fn snapshot(&self, device: &DeviceId) -> Result<DeviceSnapshot, OutboxError> {
        let last_seq = self.snapshot_last_seq(device)?;
        let count = |kind| -> Result<u64, OutboxError> {
            let mut n = 0;
            for item in self.tree.scan_prefix(prefix(kind, device)) {
                item?;
                n += 1;
            }
            Ok(n)
        };
        Ok(DeviceSnapshot {
            last_seq,
            depth: count(ENTRY)?,
            dead: count(DEAD)?,
        })
    }

    /// The first run of consecutive entries with `seq >= from`: at most `max_count` entries
    /// and `max_bytes` of encoded transactions (at least one entry if there is one). Blocking.
    pub(crate) fn read_run(
        &self,
        device: &DeviceId,
        from: u64,
        through: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEntry>, OutboxError> {
        let mut out: Vec<StoredEntry> = Vec::new();
        if from > through {
            return Ok(out);
        }
        let mut bytes = 0;
        let range = seq_key(ENTRY, device, from)..=seq_key(ENTRY, device, through);
        for item in self.tree.range(range) {
            let (key, value) = item?;
            let seq = seq_of(&key).ok_or_else(|| OutboxError::Corrupt {
                detail: "entry key without a sequence number".into(),
            })?;
            if out.last().is_some_and(|last| last.seq + 1 != seq) {
                break;
            }
            let entry = StoredEntry::parse(seq, value)?;
            if !out.is_empty()
                && (out.len() >= max_count || bytes + entry.encoded.len() > max_bytes)
            {
                break;
            }
            bytes += entry.encoded.len();
            out.push(entry);
        }
        Ok(out)
    }

    /// The oldest entry of a device (the next to be acknowledged). Blocking.
    pub(crate) fn first_entry(
        &self,
        device: &DeviceId,
    ) -> Result<Option<StoredEntry>, OutboxError> {
        match self.tree.scan_prefix(prefix(ENTRY, device)).next() {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item?;
                let seq = seq_of(&key).unwrap_or(0);
                Ok(Some(StoredEntry::parse(seq, value)?))
            }
        }
    }

    /// Every entry of a device, in order (tests, reports). Blocking.
    pub(crate) fn entries(&self, device: &DeviceId) -> Result<Vec<StoredEntry>, OutboxError> {
        self.records(ENTRY, device)
    }

    /// Every dead letter of a device, in order. Blocking.
    pub(crate) fn dead_letters(&self, device: &DeviceId) -> Result<Vec<StoredEntry>, OutboxError> {
        self.records(DEAD, device)
    }

    fn records(&self, kind: u8, device: &DeviceId) -> Result<Vec<StoredEntry>, OutboxError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix(kind, device)) {
            let (key, value) = item?;
            let seq = seq_of(&key).ok_or_else(|| OutboxError::Corrupt {
                detail: "record key without a sequence number".into(),
            })?;
            out.push(StoredEntry::parse(seq, value)?);
        }
        Ok(out)
    }

    /// The durability point: flush, then fsync the `db` file.
    fn sync(&self) -> Result<(), OutboxError> {
        self.db.flush()?;
        self.db_file.sync_all().map_err(|source| OutboxError::Sync {
            path: self.dir.join("db"),
            source,
        })
    }
}

fn parse_idem(value: &[u8]) -> Option<(u64, ContentDigest)> {
    let seq = u64_of(value)?;
    let digest: ContentDigest = value.get(8..40)?.try_into().ok()?;
    Some((seq, digest))
}

/// Deletes `snap.*.generating` files (notes/storage.md rule 3): a kill while sled writes a
/// snapshot can leave a truncated one that sled would then refuse to open.
fn remove_partial_snapshots(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing a partial sled snapshot left by a crash");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
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
    store: std::sync::Arc<Store>,
    /// Idempotency records older than this many seqs are pruned.
    idempotency_window: u64,
    /// Last assigned seq per device, loaded on first use.
    last_seq: HashMap<DeviceId, u64>,
}

impl Writer {
    pub(crate) fn new(store: std::sync::Arc<Store>, idempotency_window: u64) -> Self {
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

impl Store {
    fn snapshot_last_seq(&self, device: &DeviceId) -> Result<u64, OutboxError> {
        Ok(self
            .tree
            .get(named_key(META, device, LAST_SEQ))?
            .and_then(|v| u64_of(&v))
            .unwrap_or(0))
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
