//! The crate's one storage module: the sled outbox, used only as `docs/storage.md` says.
//!
//! - sled is pinned to 0.34.7; `snap.*.generating` files are deleted before every open; the
//!   cache capacity is explicit.
//! - Durability: every round of writes is one `apply_batch` on one tree (atomic), then
//!   `flush()` and an fsync of the store's `db` file through a second handle. Nobody is told
//!   "stored" before that.
//! - One writer: only the committer thread holds the `Writer` (`writer.rs`); everyone else
//!   reads.
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

use std::fs::File;
use std::path::{Path, PathBuf};

use posfleet_proto::{DeviceId, pb};
use prost::Message;
use sled::IVec;

use super::OutboxError;
use crate::transaction::ContentDigest;

const TREE: &str = "outbox";
/// First byte of an entry value: the layout version.
pub(crate) const ENTRY_FORMAT: u8 = 1;
pub(super) const ENTRY: u8 = b'e';
pub(super) const DEAD: u8 = b'd';
pub(super) const IDEM: u8 = b'i';
pub(super) const SEQ_INDEX: u8 = b's';
pub(super) const META: u8 = b'm';
pub(super) const LAST_SEQ: &[u8] = b"last_seq";

pub(super) fn prefix(kind: u8, device: &DeviceId) -> Vec<u8> {
    let id = device.as_str().as_bytes();
    let mut key = Vec::with_capacity(id.len() + 10 + 64);
    key.push(kind);
    key.extend_from_slice(id);
    key.push(0);
    key
}

pub(super) fn seq_key(kind: u8, device: &DeviceId, seq: u64) -> Vec<u8> {
    let mut key = prefix(kind, device);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub(super) fn named_key(kind: u8, device: &DeviceId, name: &[u8]) -> Vec<u8> {
    let mut key = prefix(kind, device);
    key.extend_from_slice(name);
    key
}

pub(super) fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

pub(super) fn u64_of(value: &[u8]) -> Option<u64> {
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
    pub(super) tree: sled::Tree,
    /// A second handle on the `db` file, fsynced after every flush (docs/storage.md rule 2).
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
        // Private dir, partial snapshots removed, explicit cache, lock retry (storage rules).
        let db = posfleet_runtime::sledstore::open(dir, cache_capacity).map_err(|e| {
            OutboxError::Open {
                path: dir.to_owned(),
                source: Box::new(e),
            }
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
    pub(super) fn sync(&self) -> Result<(), OutboxError> {
        self.db.flush()?;
        self.db_file.sync_all().map_err(|source| OutboxError::Sync {
            path: self.dir.join("db"),
            source,
        })
    }
}

pub(super) fn parse_idem(value: &[u8]) -> Option<(u64, ContentDigest)> {
    let seq = u64_of(value)?;
    let digest: ContentDigest = value.get(8..40)?.try_into().ok()?;
    Some((seq, digest))
}

/// Deletes `snap.*.generating` files (docs/storage.md rule 3): a kill while sled writes a
/// snapshot can leave a truncated one that sled would then refuse to open.
impl Store {
    pub(super) fn snapshot_last_seq(&self, device: &DeviceId) -> Result<u64, OutboxError> {
        Ok(self
            .tree
            .get(named_key(META, device, LAST_SEQ))?
            .and_then(|v| u64_of(&v))
            .unwrap_or(0))
    }
}
