//! The controller's transaction store (ADR 0005, ADR 0006): every transaction a terminal sends
//! stored exactly once, keyed by (device, seq), in its own sled database (`DATA/transactions`).
//! This module is the only code that touches its trees.
//!
//! # Layout
//!
//! - `mod.rs`: [`TxStore`] (open, load the ledgers, the read side) and [`TxStoreConfig`].
//! - `commit.rs`: the write side: [`TxStore::commit`] turns submissions into one sled batch
//!   (records, time indexes, conflicts, ledgers), makes it durable, and reports per device
//!   what an acknowledgement must say. Only the controller's committer task calls it.
//! - `query.rs`: `list` (filters, time range, bounded scans, cursors), `summary`, `gaps`.
//! - `cursor.rs`: opaque HMAC-bound page cursors.
//! - `ledger.rs`: the per-device summary kept in the same batch as the records.
//! - `validate.rs`: [`ValidTx`], the limits a transaction must meet.
//! - `record.rs`: the stored value and the API view of a record.
//! - `keys.rs`: the key layout of every tree.
//! - `error.rs`: [`TxStoreError`], [`QueryError`].
//! - `tests/`: model-based property test, crash (kill -9) test, query tests, throughput.
//!
//! # Durability and visibility
//!
//! A commit is `apply_batch` + `flush` + fsync of `db` (docs/storage.md); its outcome, and
//! the ledgers that summaries and acknowledgements read, are published only after that. List
//! queries read the trees directly and may show a record a moment before its commit is
//! durable.

mod commit;
mod cursor;
mod error;
mod keys;
mod ledger;
mod query;
mod record;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use posfleet_proto::DeviceId;

pub(crate) use commit::{CommitOutcome, DeviceOutcome, Submission};
pub use error::{QueryError, TxStoreError};
pub(crate) use query::{DEFAULT_LIMIT, MAX_LIMIT, Order, Outcomes, TxQuery};
pub(crate) use record::parse_status;
#[cfg(test)]
pub(crate) use tests::submission as test_submission;
pub(crate) use validate::ValidTx;
#[cfg(test)]
pub(crate) use validate::tests::sale as test_sale;
pub use validate::{
    MAX_AMOUNT_MINOR, MAX_BATCH_RECORDS, MAX_CARD_FIELD_LEN, MAX_ITEMS, MAX_TEXT_LEN,
    MAX_TIMESTAMP_MS, MAX_TXN_ID_LEN,
};

use cursor::CursorKey;
use ledger::Ledger;
use posfleet_runtime::sledstore::{self, DurableError, OpenError};
use record::StoredTx;

/// Name of the one sled tree (see `keys.rs` for its namespaces).
const TREE: &str = "transactions";
/// `meta` name of the cursor HMAC secret.
const CURSOR_SECRET: &str = "cursor_secret";

/// A hook the tests run right after a commit's fsync returned.
#[cfg(test)]
pub(crate) type SyncHook = Arc<dyn Fn() + Send + Sync>;

/// Where and how the store keeps its data.
#[derive(Clone)]
pub struct TxStoreConfig {
    /// Directory of the sled database (`DATA/transactions`).
    pub dir: PathBuf,
    /// sled page cache in bytes; sled's default (1 GiB) is far too large (storage rule 5).
    pub cache_capacity: u64,
    /// Called after every successful fsync, before anything is published (tests prove the
    /// order of fsync and acknowledgement with it).
    #[cfg(test)]
    pub(crate) after_sync: Option<SyncHook>,
}

impl std::fmt::Debug for TxStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxStoreConfig")
            .field("dir", &self.dir)
            .field("cache_capacity", &self.cache_capacity)
            .finish_non_exhaustive()
    }
}

impl TxStoreConfig {
    /// Defaults (128 MiB page cache), storing in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cache_capacity: 128 * 1024 * 1024,
            #[cfg(test)]
            after_sync: None,
        }
    }
}

/// The committer's state: what has been applied to the trees.
#[derive(Debug, Default)]
struct Writer {
    /// Ledgers as applied (durable, or applied before a failed flush).
    ledgers: BTreeMap<DeviceId, Ledger>,
    /// Devices whose applied ledger is not published yet (a flush failed after applying).
    unpublished: BTreeSet<DeviceId>,
    /// Devices whose stored ledger is behind the applied one (`commit.rs`, "Ledger
    /// checkpoints").
    unsaved: BTreeMap<DeviceId, Unsaved>,
}

/// How far a device's stored ledger is behind.
#[derive(Debug, Clone, Copy)]
struct Unsaved {
    /// Receive time of the first commit that left it behind.
    since_ms: u64,
    /// Records stored since it was written.
    records: u64,
}

/// The transaction store. Share it as `Arc<TxStore>`; reads take `&self` and never wait for
/// a commit's disk I/O.
pub struct TxStore {
    /// Configuration (directory, cache, test hook).
    cfg: TxStoreConfig,
    /// Kept open so the trees stay valid; sled's background threads belong to it.
    _db: sled::Db,
    /// Records, indexes, conflicts, ledgers and meta, by key namespace (`keys.rs`).
    tree: sled::Tree,
    /// Signs page cursors.
    cursor_key: CursorKey,
    /// Ledgers as of the last durable commit: what summaries and the gap watcher read.
    published: RwLock<BTreeMap<DeviceId, Ledger>>,
    /// The single writer's state; holding it serialises commits (storage rule 4).
    writer: Mutex<Writer>,
}

impl std::fmt::Debug for TxStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxStore")
            .field("dir", &self.cfg.dir)
            .finish_non_exhaustive()
    }
}

impl TxStore {
    /// Opens (creating if needed) the store and loads every device's ledger. Blocks on disk
    /// I/O: call it at startup or from a blocking thread.
    pub fn open(cfg: TxStoreConfig) -> Result<Arc<Self>, TxStoreError> {
        let dir = cfg.dir.clone();
        let (db, tree) =
            sledstore::open_tree(&dir, cfg.cache_capacity, TREE).map_err(|e| match e {
                OpenError::Io { path, source } => TxStoreError::Io { path, source },
                OpenError::Sled { path, source } => TxStoreError::Open { path, source },
            })?;
        let cursor_key = CursorKey::new(&cursor_secret(&tree, &dir)?);
        let ledgers = load_ledgers(&tree, &dir)?;
        Ok(Arc::new(Self {
            published: RwLock::new(ledgers.clone()),
            writer: Mutex::new(Writer {
                ledgers,
                unpublished: BTreeSet::new(),
                unsaved: BTreeMap::new(),
            }),
            _db: db,
            tree,
            cursor_key,
            cfg,
        }))
    }

    /// Where the store lives.
    pub fn dir(&self) -> &std::path::Path {
        &self.cfg.dir
    }

    /// Number of devices that have stored at least one record.
    pub fn device_count(&self) -> usize {
        self.read().len()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<DeviceId, Ledger>> {
        // Poisoning only means a panic elsewhere; the map itself is always whole.
        self.published
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read_error(&self, source: sled::Error) -> TxStoreError {
        TxStoreError::Read {
            path: self.cfg.dir.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &[u8], detail: impl Into<String>) -> TxStoreError {
        TxStoreError::Corrupt {
            path: self.cfg.dir.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            detail: detail.into(),
        }
    }
}

/// The cursor secret, created (and made durable) on first open.
fn cursor_secret(tree: &sled::Tree, dir: &std::path::Path) -> Result<Vec<u8>, TxStoreError> {
    let read = |source| TxStoreError::Read {
        path: dir.to_owned(),
        source,
    };
    let key = keys::meta(CURSOR_SECRET);
    if let Some(secret) = tree.get(&key).map_err(read)? {
        return Ok(secret.to_vec());
    }
    let secret: [u8; 32] = rand::random();
    tree.insert(key, &secret[..])
        .map_err(|source| TxStoreError::Write {
            path: dir.to_owned(),
            source,
        })?;
    durable(tree, dir)?;
    Ok(secret.to_vec())
}

fn load_ledgers(
    tree: &sled::Tree,
    dir: &std::path::Path,
) -> Result<BTreeMap<DeviceId, Ledger>, TxStoreError> {
    let mut ledgers = BTreeMap::new();
    for item in tree.scan_prefix([keys::LEDGER]) {
        let (key, value) = item.map_err(|source| TxStoreError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let corrupt = |detail: String| TxStoreError::Corrupt {
            path: dir.to_owned(),
            key: String::from_utf8_lossy(&key).into_owned(),
            detail,
        };
        let id = keys::parse_ledger(&key).ok_or_else(|| corrupt("not a device id".into()))?;
        let ledger: Ledger = serde_json::from_slice(&value).map_err(|e| corrupt(e.to_string()))?;
        if ledger.v != ledger::LEDGER_VERSION {
            return Err(corrupt(format!(
                "ledger version {} is not supported",
                ledger.v
            )));
        }
        ledgers.insert(id, ledger);
    }
    for (device, ledger) in &mut ledgers {
        catch_up(tree, dir, device, ledger)?;
    }
    Ok(ledgers)
}

/// Brings a stored ledger up to date with the device's records above its `last_seq`: those a
/// commit stored without writing the ledger (`commit.rs`, "Ledger checkpoints"). Their
/// receive times are in the records, so the result is the ledger that commit had in memory.
fn catch_up(
    tree: &sled::Tree,
    dir: &std::path::Path,
    device: &DeviceId,
    ledger: &mut Ledger,
) -> Result<(), TxStoreError> {
    let read = |source| TxStoreError::Read {
        path: dir.to_owned(),
        source,
    };
    let corrupt = |key: &[u8], detail: String| TxStoreError::Corrupt {
        path: dir.to_owned(),
        key: String::from_utf8_lossy(key).into_owned(),
        detail,
    };
    let prefix = keys::device_prefix(keys::RECORD, device);
    let Some(start) = ledger.last_seq.checked_add(1) else {
        return Ok(());
    };
    let end = keys::prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
    let mut latest = None;
    for item in tree.range::<Vec<u8>, _>((Bound::Included(keys::record(device, start)), end)) {
        let (key, value) = item.map_err(read)?;
        let stored = StoredTx::decode(&value).map_err(|e| corrupt(&key, e))?;
        if keys::record_seq(&key, prefix.len()) != Some(stored.tx.seq()) {
            return Err(corrupt(&key, "record key and seq disagree".into()));
        }
        ledger.stored(&stored.tx, stored.received_at_ms);
        latest = latest.max(Some(stored.received_at_ms));
    }
    if let Some(at_ms) = latest {
        let mut error = None;
        ledger.settle(at_ms, |seq| {
            tree.contains_key(keys::record(device, seq))
                .unwrap_or_else(|e| {
                    error = Some(e);
                    false
                })
        });
        if let Some(e) = error {
            return Err(read(e));
        }
    }
    Ok(())
}

/// `sledstore::make_durable` with this module's errors.
fn durable(tree: &sled::Tree, dir: &std::path::Path) -> Result<(), TxStoreError> {
    sledstore::make_durable(tree, dir).map_err(|e| match e {
        DurableError::Flush(source) => TxStoreError::Write {
            path: dir.to_owned(),
            source,
        },
        DurableError::Fsync { path, source } => TxStoreError::Io { path, source },
    })
}
