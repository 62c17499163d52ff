//! The agent's state store (ADR 0007): per terminal, the command journal, the lock state, the
//! applied configuration and the time of the last valid contact with the controller.
//!
//! - [`StateStore`]: one sled database (`DATA/state`); a real terminal opens one, the
//!   simulator opens **one** for all its terminals (like the outbox). Opened with the rules of
//!   [`posfleet_runtime::sledstore`].
//! - [`DeviceState`]: one terminal's part of it. Reads and writes block (call them from
//!   `spawn_blocking`). A [`Changes`] is written as one atomic batch; with
//!   [`Changes::durable`] it is flushed and the `db` file fsynced before the call returns
//!   (docs/storage.md rule 2): the journal entry of a command is durable before the command
//!   acts, and its final result before it is published.
//! - [`live`]: [`LiveState`], what the rest of the agent reads (lock for the local API and
//!   the intake, versions for reports), updated by the command executor after each change.
//!
//! # Key layout (one tree, `state`)
//!
//! Every key is `[kind][device id][0x00][suffix]`:
//!
//! | kind | suffix | value |
//! | --- | --- | --- |
//! | `j` journal | command id | [`JournalEntry`] (binary, see `record.rs`) |
//! | `l` lock | (none) | [`LockRecord`] (JSON) |
//! | `c` config | (none) | [`AppliedConfig`] (JSON) |
//! | `t` contact | (none) | last valid contact, Unix ms (u64 BE) |
//! | `v` versions | (none) | [`InstalledVersions`] (JSON) |

pub mod live;
mod record;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use posfleet_proto::DeviceId;

pub use live::{LiveState, TerminalStatus};
pub use record::{
    AppliedConfig, Component, ConfigDocument, InstalledVersions, JournalEntry, JournalStatus,
    LockRecord,
};

const TREE: &str = "state";
const JOURNAL: u8 = b'j';
const LOCK: u8 = b'l';
const CONFIG: u8 = b'c';
const CONTACT: u8 = b't';
const VERSIONS: u8 = b'v';

/// Default sled page cache of a terminal's state store (it holds a few small records).
pub const DEFAULT_STATE_CACHE_CAPACITY: u64 = 256 * 1024;

/// Why the state store failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state store in {}; if it is damaged, move it aside and report it", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("state store error")]
    Store(#[from] sled::Error),
    #[error("cannot make the state store durable")]
    Durable(#[from] posfleet_runtime::sledstore::DurableError),
    #[error("the state store holds a record it cannot read: {detail}")]
    Corrupt { detail: String },
    #[error("a state store task failed: {detail}")]
    Task { detail: String },
}

struct Inner {
    /// Kept so that the database stays open as long as any handle exists.
    _db: sled::Db,
    tree: sled::Tree,
    dir: PathBuf,
    /// Durable writes of all terminals sharing the store share flushes.
    sync: posfleet_runtime::sledstore::SyncGate,
}

/// The open state store. Cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl StateStore {
    /// Opens (creating it 0700 if missing) the store in `dir`. Blocking.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, StateError> {
        let open_error = |source: Box<dyn std::error::Error + Send + Sync>| StateError::Open {
            path: dir.to_owned(),
            source,
        };
        let db = posfleet_runtime::sledstore::open(dir, cache_capacity)
            .map_err(|e| open_error(Box::new(e)))?;
        let tree = db.open_tree(TREE).map_err(|e| open_error(Box::new(e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                _db: db,
                tree,
                dir: dir.to_owned(),
                sync: posfleet_runtime::sledstore::SyncGate::default(),
            }),
        })
    }

    /// Terminal `id`'s part of the store. Cheap; nothing is read yet.
    pub fn device(&self, id: &DeviceId) -> DeviceState {
        DeviceState {
            store: self.clone(),
            id: id.clone(),
        }
    }
}

/// What a terminal's state looks like on disk, read at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub lock: LockRecord,
    pub config: AppliedConfig,
    /// Unix ms of the last valid contact (`None`: never recorded).
    pub last_contact_ms: Option<u64>,
    /// Versions installed by software updates.
    pub installed: InstalledVersions,
    /// Journal entries still in progress (a restart interrupted them), with their ids.
    pub in_progress: Vec<(String, JournalEntry)>,
}

/// One atomic write to a terminal's state.
#[derive(Debug, Default)]
pub struct Changes {
    journal: Vec<(String, Option<JournalEntry>)>,
    lock: Option<LockRecord>,
    config: Option<AppliedConfig>,
    installed: Option<InstalledVersions>,
    contact_ms: Option<u64>,
    /// Remove every record of the terminal except this journal entry (wipe).
    clear_except: Option<String>,
    durable: bool,
}

impl Changes {
    /// Writes that are flushed and fsynced before [`DeviceState::apply`] returns.
    pub fn durable() -> Self {
        Self {
            durable: true,
            ..Self::default()
        }
    }

    /// Writes left to sled's background flush (a lost one is harmless, e.g. a contact time:
    /// an older one only makes the lease stricter).
    pub fn lazy() -> Self {
        Self::default()
    }

    pub fn journal(mut self, command_id: &str, entry: JournalEntry) -> Self {
        self.journal.push((command_id.to_owned(), Some(entry)));
        self
    }

    pub fn forget(mut self, command_id: &str) -> Self {
        self.journal.push((command_id.to_owned(), None));
        self
    }

    pub fn lock(mut self, lock: LockRecord) -> Self {
        self.lock = Some(lock);
        self
    }

    pub fn config(mut self, config: AppliedConfig) -> Self {
        self.config = Some(config);
        self
    }

    pub fn installed(mut self, installed: InstalledVersions) -> Self {
        self.installed = Some(installed);
        self
    }

    pub fn contact(mut self, at_ms: u64) -> Self {
        self.contact_ms = Some(at_ms);
        self
    }

    /// Removes everything of the terminal but journal entry `keep` (written in the same batch
    /// after the removal, like every other change here).
    pub fn clear_except(mut self, keep: &str) -> Self {
        self.clear_except = Some(keep.to_owned());
        self
    }
}

/// One terminal's state. Every method blocks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DeviceState {
    store: StateStore,
    id: DeviceId,
}

impl DeviceState {
    pub fn device_id(&self) -> &DeviceId {
        &self.id
    }

    fn key(&self, kind: u8, suffix: &[u8]) -> Vec<u8> {
        let id = self.id.as_str().as_bytes();
        let mut key = Vec::with_capacity(2 + id.len() + suffix.len());
        key.push(kind);
        key.extend_from_slice(id);
        key.push(0);
        key.extend_from_slice(suffix);
        key
    }

    fn tree(&self) -> &sled::Tree {
        &self.store.inner.tree
    }

    /// Reads the terminal's records. Blocking.
    pub fn load(&self) -> Result<Snapshot, StateError> {
        let tree = self.tree();
        let lock = match tree.get(self.key(LOCK, b""))? {
            Some(v) => LockRecord::decode(&v)?,
            None => LockRecord::default(),
        };
        let config = match tree.get(self.key(CONFIG, b""))? {
            Some(v) => AppliedConfig::decode(&v)?,
            None => AppliedConfig::default(),
        };
        let installed = match tree.get(self.key(VERSIONS, b""))? {
            Some(v) => InstalledVersions::decode(&v)?,
            None => InstalledVersions::default(),
        };
        let last_contact_ms = tree
            .get(self.key(CONTACT, b""))?
            .and_then(|v| v.get(..8).and_then(|b| b.try_into().ok()))
            .map(u64::from_be_bytes);
        let mut in_progress = Vec::new();
        for (id, entry) in self.journal_entries()? {
            if entry.status == JournalStatus::InProgress {
                in_progress.push((id, entry));
            }
        }
        Ok(Snapshot {
            lock,
            config,
            last_contact_ms,
            installed,
            in_progress,
        })
    }

    fn journal_entries(&self) -> Result<Vec<(String, JournalEntry)>, StateError> {
        let prefix = self.key(JOURNAL, b"");
        let mut out = Vec::new();
        for item in self.tree().scan_prefix(&prefix) {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            out.push((id, JournalEntry::decode(&value)?));
        }
        Ok(out)
    }

    /// The journal entry of `command_id`, if any. Blocking.
    pub fn journal_entry(&self, command_id: &str) -> Result<Option<JournalEntry>, StateError> {
        match self.tree().get(self.key(JOURNAL, command_id.as_bytes()))? {
            Some(v) => Ok(Some(JournalEntry::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Number of journal entries (tests, status).
    pub fn journal_len(&self) -> Result<usize, StateError> {
        Ok(self.journal_entries()?.len())
    }

    /// Removes final journal entries whose command expired before `now_ms` (an expired
    /// command is refused by verification anyway). Returns how many. Blocking.
    pub fn prune_journal(&self, now_ms: u64) -> Result<usize, StateError> {
        let mut changes = Changes::lazy();
        let mut n = 0;
        for (id, entry) in self.journal_entries()? {
            if entry.status == JournalStatus::Final && entry.not_after_ms < now_ms {
                changes = changes.forget(&id);
                n += 1;
            }
        }
        if n > 0 {
            self.apply(changes)?;
        }
        Ok(n)
    }

    /// Writes `changes` as one batch (durably if asked). Blocking.
    pub fn apply(&self, changes: Changes) -> Result<(), StateError> {
        let mut batch = sled::Batch::default();
        if let Some(keep) = &changes.clear_except {
            let keep = self.key(JOURNAL, keep.as_bytes());
            for kind in [JOURNAL, LOCK, CONFIG, CONTACT, VERSIONS] {
                for item in self.tree().scan_prefix(self.key(kind, b"")) {
                    let (key, _) = item?;
                    if key.as_ref() != keep.as_slice() {
                        batch.remove(key);
                    }
                }
            }
        }
        for (id, entry) in &changes.journal {
            let key = self.key(JOURNAL, id.as_bytes());
            match entry {
                Some(entry) => batch.insert(key, entry.encode()),
                None => batch.remove(key),
            }
        }
        if let Some(lock) = &changes.lock {
            batch.insert(self.key(LOCK, b""), lock.encode()?);
        }
        if let Some(config) = &changes.config {
            batch.insert(self.key(CONFIG, b""), config.encode()?);
        }
        if let Some(installed) = &changes.installed {
            batch.insert(self.key(VERSIONS, b""), installed.encode()?);
        }
        if let Some(at) = changes.contact_ms {
            batch.insert(self.key(CONTACT, b""), at.to_be_bytes().to_vec());
        }
        self.tree().apply_batch(batch)?;
        if changes.durable {
            let inner = &self.store.inner;
            inner.sync.make_durable(&inner.tree, &inner.dir)?;
        }
        Ok(())
    }
}

/// Runs a blocking state operation on the blocking pool (sled reads can hit the disk, and a
/// durable write fsyncs).
pub async fn blocking<T: Send + 'static>(
    state: &DeviceState,
    op: impl FnOnce(&DeviceState) -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || op(&state))
        .await
        .map_err(|e| StateError::Task {
            detail: e.to_string(),
        })?
}
