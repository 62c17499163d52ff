//! The sled side of the store (`DATA/config`), used as `docs/storage.md` prescribes through
//! `posfleet_runtime::sledstore`. One tree, three key spaces, so that a change (layer record,
//! history entry, index entry, pruned entries) is one atomic `Batch`:
//!
//! ```text
//! l/<scope>                 → LayerRecord (JSON)   current state of a layer (or its tombstone)
//! h/<version u64 BE>        → HistoryRecord (JSON) one per version, contiguous
//! s/<scope>\0<version BE>   → (empty)              index of a scope's history
//! ```
//!
//! Every function here blocks on disk I/O.

use std::path::{Path, PathBuf};

use posfleet_runtime::sledstore::{self, DurableError, OpenError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ConfigError;
use crate::views::ConfigHistoryEntry;

/// Format version of the records.
const RECORD_VERSION: u32 = 1;
const TREE: &str = "config";
const LAYER: &[u8] = b"l/";
const HISTORY: &[u8] = b"h/";
const INDEX: &[u8] = b"s/";

/// A layer as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LayerRecord {
    pub v: u32,
    pub scope: String,
    pub version: u64,
    pub document: Map<String, Value>,
    pub author: String,
    pub changed_at_ms: u64,
    /// A tombstone: the layer does not exist, but its version still counts.
    pub deleted: bool,
}

impl LayerRecord {
    pub(crate) fn new(
        scope: String,
        version: u64,
        document: Map<String, Value>,
        author: String,
        changed_at_ms: u64,
        deleted: bool,
    ) -> Self {
        Self {
            v: RECORD_VERSION,
            scope,
            version,
            document,
            author,
            changed_at_ms,
            deleted,
        }
    }
}

/// A history entry as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct HistoryRecord {
    pub v: u32,
    #[serde(flatten)]
    pub entry: ConfigHistoryEntry,
}

pub(crate) fn layer_key(scope: &str) -> Vec<u8> {
    [LAYER, scope.as_bytes()].concat()
}

pub(crate) fn history_key(version: u64) -> Vec<u8> {
    [HISTORY, &version.to_be_bytes()[..]].concat()
}

pub(crate) fn index_prefix(scope: &str) -> Vec<u8> {
    [INDEX, scope.as_bytes(), b"\0"].concat()
}

pub(crate) fn index_key(scope: &str, version: u64) -> Vec<u8> {
    [index_prefix(scope).as_slice(), &version.to_be_bytes()[..]].concat()
}

/// What a store holds at open.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub layers: Vec<LayerRecord>,
    /// Oldest and newest retained history versions (`None`: no history).
    pub history: Option<(u64, u64)>,
}

/// One change, ready to be written.
#[derive(Debug)]
pub(crate) struct Write {
    pub layer: LayerRecord,
    pub entry: ConfigHistoryEntry,
    /// History entries to drop (version, scope) to stay within the retention limit.
    pub prune: Vec<(u64, String)>,
}

/// The open sled store.
#[derive(Debug)]
pub(crate) struct Disk {
    /// Directory of the database (its `db` file is fsynced on every commit).
    dir: PathBuf,
    /// Kept open so the tree stays valid; sled's background threads belong to it.
    _db: sled::Db,
    tree: sled::Tree,
}

impl Disk {
    pub(crate) fn open(dir: &Path, cache_capacity: u64) -> Result<Self, ConfigError> {
        let (db, tree) = sledstore::open_tree(dir, cache_capacity, TREE).map_err(|e| match e {
            OpenError::Io { path, source } => ConfigError::Io { path, source },
            OpenError::Sled { path, source } => ConfigError::Open { path, source },
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            _db: db,
            tree,
        })
    }

    fn sled(&self, source: sled::Error) -> ConfigError {
        ConfigError::Sled {
            path: self.dir.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &[u8], detail: impl Into<String>) -> ConfigError {
        ConfigError::Corrupt {
            path: self.dir.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            detail: detail.into(),
        }
    }

    /// Every layer record and the retained history range.
    pub(crate) fn load(&self) -> Result<Loaded, ConfigError> {
        let mut loaded = Loaded::default();
        for item in self.tree.scan_prefix(LAYER) {
            let (key, value) = item.map_err(|e| self.sled(e))?;
            let record: LayerRecord =
                serde_json::from_slice(&value).map_err(|e| self.corrupt(&key, e.to_string()))?;
            if record.v != RECORD_VERSION {
                return Err(self.corrupt(&key, format!("record version {}", record.v)));
            }
            if key[LAYER.len()..] != *record.scope.as_bytes() {
                return Err(self.corrupt(&key, "the record names another scope"));
            }
            loaded.layers.push(record);
        }
        let first = self.tree.scan_prefix(HISTORY).next();
        let last = self.tree.scan_prefix(HISTORY).next_back();
        if let (Some(first), Some(last)) = (first, last) {
            let (first, _) = first.map_err(|e| self.sled(e))?;
            let (last, _) = last.map_err(|e| self.sled(e))?;
            loaded.history = Some((self.version_of(&first)?, self.version_of(&last)?));
        }
        Ok(loaded)
    }

    fn version_of(&self, key: &[u8]) -> Result<u64, ConfigError> {
        let bytes: [u8; 8] = key
            .get(key.len().saturating_sub(8)..)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| self.corrupt(key, "short key"))?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// The scope of a stored history entry (for pruning its index entry).
    pub(crate) fn entry(&self, version: u64) -> Result<Option<ConfigHistoryEntry>, ConfigError> {
        let key = history_key(version);
        match self.tree.get(&key).map_err(|e| self.sled(e))? {
            None => Ok(None),
            Some(value) => self.decode_entry(&key, &value).map(Some),
        }
    }

    fn decode_entry(&self, key: &[u8], value: &[u8]) -> Result<ConfigHistoryEntry, ConfigError> {
        let record: HistoryRecord =
            serde_json::from_slice(value).map_err(|e| self.corrupt(key, e.to_string()))?;
        if record.v != RECORD_VERSION {
            return Err(self.corrupt(key, format!("record version {}", record.v)));
        }
        Ok(record.entry)
    }

    /// History entries with versions in `range`, newest first, optionally of one scope only,
    /// at most `limit` of them.
    pub(crate) fn entries_desc(
        &self,
        scope: Option<&str>,
        range: std::ops::RangeInclusive<u64>,
        limit: usize,
    ) -> Result<Vec<ConfigHistoryEntry>, ConfigError> {
        let (start, end) = (*range.start(), *range.end());
        let mut out = Vec::new();
        if start > end {
            return Ok(out);
        }
        match scope {
            Some(scope) => {
                let iter = self
                    .tree
                    .range(index_key(scope, start)..=index_key(scope, end))
                    .rev();
                for item in iter.take(limit) {
                    let (key, _) = item.map_err(|e| self.sled(e))?;
                    let version = self.version_of(&key)?;
                    let entry = self
                        .entry(version)?
                        .ok_or_else(|| self.corrupt(&key, "index entry without history"))?;
                    out.push(entry);
                }
            }
            None => {
                let iter = self.tree.range(history_key(start)..=history_key(end)).rev();
                for item in iter.take(limit) {
                    let (key, value) = item.map_err(|e| self.sled(e))?;
                    out.push(self.decode_entry(&key, &value)?);
                }
            }
        }
        Ok(out)
    }

    /// Writes one change as one batch and makes it durable (storage rules 2 and 4: the
    /// caller serialises commits). `Ok(Err(..))`: applied but not durable.
    pub(crate) fn commit(&self, write: &Write) -> Result<Result<(), String>, ConfigError> {
        let mut batch = sled::Batch::default();
        let scope = &write.layer.scope;
        batch.insert(layer_key(scope), serde_json::to_vec(&write.layer)?);
        let record = HistoryRecord {
            v: RECORD_VERSION,
            entry: write.entry.clone(),
        };
        batch.insert(
            history_key(write.entry.version),
            serde_json::to_vec(&record)?,
        );
        batch.insert(index_key(scope, write.entry.version), Vec::new());
        for (version, scope) in &write.prune {
            batch.remove(history_key(*version));
            batch.remove(index_key(scope, *version));
        }
        self.tree.apply_batch(batch).map_err(|e| self.sled(e))?;
        Ok(
            sledstore::make_durable(&self.tree, &self.dir).map_err(|e| match e {
                DurableError::Flush(source) => source.to_string(),
                DurableError::Fsync { path, source } => format!("{}: {source}", path.display()),
            }),
        )
    }
}
