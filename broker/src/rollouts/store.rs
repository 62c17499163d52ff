//! The rollout store: one sled database (`DATA/rollouts`) used as `docs/storage.md`
//! prescribes (through `posfleet_runtime::sledstore`). Every function blocks; the engine (the
//! single committer, storage rule 4) calls them on blocking threads.
//!
//! ```text
//! r/<rollout id>                   StoredRollout (JSON)
//! m/<rollout id>/<index u32 BE>    StoredMember (JSON)
//! ```

use std::path::{Path, PathBuf};

use posfleet_runtime::sledstore::{self, DurableError, OpenError};

use super::model::{RECORD_VERSION, StoredMember, StoredRollout};

/// Why the rollout store failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the rollout store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("rollout store {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("rollout store {path}: record {key:?} is corrupt: {detail}")]
    Corrupt {
        path: PathBuf,
        key: String,
        detail: String,
    },
}

/// One durable write.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub rollouts: Vec<StoredRollout>,
    /// (rollout id, member index, member).
    pub members: Vec<(String, u32, StoredMember)>,
}

impl Changes {
    pub(crate) fn is_empty(&self) -> bool {
        self.rollouts.is_empty() && self.members.is_empty()
    }
}

/// The open store.
#[derive(Debug)]
pub struct RolloutStore {
    dir: PathBuf,
    _db: sled::Db,
    tree: sled::Tree,
}

impl RolloutStore {
    /// Opens (creating) the store in `dir` with a page cache of `cache_capacity` bytes.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, RolloutStoreError> {
        let (db, tree) =
            sledstore::open_tree(dir, cache_capacity, "rollouts").map_err(|e| match e {
                OpenError::Io { path, source } => RolloutStoreError::Io { path, source },
                OpenError::Sled { path, source } => RolloutStoreError::Open { path, source },
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            _db: db,
            tree,
        })
    }

    /// Writes `changes` as one batch and makes it durable (apply_batch, flush, fsync).
    pub(crate) fn commit(&self, changes: &Changes) -> Result<(), RolloutStoreError> {
        let mut batch = sled::Batch::default();
        for r in &changes.rollouts {
            let value = serde_json::to_vec(r).map_err(|e| self.corrupt(&r.id, e.to_string()))?;
            batch.insert(rollout_key(&r.id), value);
        }
        for (id, index, m) in &changes.members {
            let value = serde_json::to_vec(m).map_err(|e| self.corrupt(id, e.to_string()))?;
            batch.insert(member_key(id, *index), value);
        }
        self.tree.apply_batch(batch).map_err(|e| self.sled(e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| match e {
            DurableError::Flush(source) => self.sled(source),
            DurableError::Fsync { path, source } => RolloutStoreError::Io { path, source },
        })
    }

    /// Every rollout.
    pub(crate) fn load_rollouts(&self) -> Result<Vec<StoredRollout>, RolloutStoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"r/") {
            let (key, value) = item.map_err(|e| self.sled(e))?;
            let key = String::from_utf8_lossy(&key).into_owned();
            let r: StoredRollout =
                serde_json::from_slice(&value).map_err(|e| self.corrupt(&key, e.to_string()))?;
            if r.v != RECORD_VERSION {
                return Err(self.corrupt(&key, format!("record version {} is unknown", r.v)));
            }
            out.push(r);
        }
        Ok(out)
    }

    /// The members of rollout `id`, in order.
    pub(crate) fn load_members(&self, id: &str) -> Result<Vec<StoredMember>, RolloutStoreError> {
        let mut prefix = b"m/".to_vec();
        prefix.extend_from_slice(id.as_bytes());
        prefix.push(b'/');
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (key, value) = item.map_err(|e| self.sled(e))?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let index = key
                .get(prefix.len()..)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| self.corrupt(&name, "bad member key".into()))?;
            if usize::try_from(index).ok() != Some(out.len()) {
                return Err(self.corrupt(&name, format!("member {index} out of order")));
            }
            let m: StoredMember =
                serde_json::from_slice(&value).map_err(|e| self.corrupt(&name, e.to_string()))?;
            out.push(m);
        }
        Ok(out)
    }

    fn sled(&self, source: sled::Error) -> RolloutStoreError {
        RolloutStoreError::Sled {
            path: self.dir.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &str, detail: String) -> RolloutStoreError {
        RolloutStoreError::Corrupt {
            path: self.dir.clone(),
            key: key.to_owned(),
            detail,
        }
    }
}

fn rollout_key(id: &str) -> Vec<u8> {
    let mut k = b"r/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn member_key(id: &str, index: u32) -> Vec<u8> {
    let mut k = b"m/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k.push(b'/');
    k.extend_from_slice(&index.to_be_bytes());
    k
}
