//! The command store: one sled database (`DATA/commands`) used exactly as `docs/storage.md`
//! prescribes (through `posfleet_runtime::sledstore`). Every function here blocks; the command
//! plane's worker (the single committer, storage rule 4) calls `commit` on a blocking thread,
//! and the API reads on blocking threads.
//!
//! One tree, prefixed keys, so a commit of records, indexes and desired state is one atomic
//! `Batch`:
//!
//! ```text
//! c/<id>                                  StoredCommand (JSON)
//! t/<u64::MAX - created_at_ms><id>        ()      newest first over the whole fleet
//! d/<device>\0<u64::MAX - created><id>    ()      newest first per device
//! l/<id>                                  ()      not final yet (loaded at start)
//! s/<device>                              StoredDesired (JSON): desired lock state
//! ```

use std::path::{Path, PathBuf};

use posfleet_proto::DeviceId;
use posfleet_runtime::sledstore::{self, DurableError, OpenError};

use super::record::{RECORD_VERSION, StoredCommand, StoredDesired};
use crate::views::{CommandPage, CommandState, CommandView, DesiredLockView};

/// Default rows per page, and the most a request may ask for.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
/// Index entries one list request examines at most (filters may skip many); beyond it the
/// page ends early with a cursor.
const MAX_SCAN: usize = 20_000;

/// Why the command store failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the command store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("command store {path}: write failed: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("command store {path}: record {key:?} is corrupt: {detail}")]
    Corrupt {
        path: PathBuf,
        key: String,
        detail: String,
    },
}

/// One write: records (new or changed) and desired lock states, committed atomically.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// Records and whether each is new (new ones get their index entries).
    pub commands: Vec<(CommandView, bool)>,
    pub desired: Vec<(DeviceId, DesiredLockView)>,
}

/// Filters of a list request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandQuery {
    pub device: Option<DeviceId>,
    pub status: Option<CommandState>,
    pub kind: Option<String>,
    pub limit: usize,
}

/// The open store.
#[derive(Debug)]
pub struct CommandStore {
    dir: PathBuf,
    _db: sled::Db,
    tree: sled::Tree,
}

impl CommandStore {
    /// Opens (creating) the store in `dir` with a page cache of `cache_capacity` bytes.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, CommandStoreError> {
        let (db, tree) =
            sledstore::open_tree(dir, cache_capacity, "commands").map_err(|e| match e {
                OpenError::Io { path, source } => CommandStoreError::Io { path, source },
                OpenError::Sled { path, source } => CommandStoreError::Open { path, source },
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            _db: db,
            tree,
        })
    }

    /// Writes `changes` as one batch and makes it durable (apply_batch, flush, fsync).
    pub(crate) fn commit(&self, changes: &Changes) -> Result<(), CommandStoreError> {
        let mut batch = sled::Batch::default();
        for (cmd, new) in &changes.commands {
            let value = serde_json::to_vec(&StoredCommand {
                v: RECORD_VERSION,
                command: cmd.clone(),
            })
            .map_err(|e| self.corrupt(&cmd.id, e.to_string()))?;
            batch.insert(key(b"c/", cmd.id.as_bytes()), value);
            if *new {
                let rev = (u64::MAX - cmd.created_at_ms).to_be_bytes();
                let mut t = b"t/".to_vec();
                t.extend_from_slice(&rev);
                t.extend_from_slice(cmd.id.as_bytes());
                batch.insert(t, &[] as &[u8]);
                let mut d = device_prefix(&cmd.device_id);
                d.extend_from_slice(&rev);
                d.extend_from_slice(cmd.id.as_bytes());
                batch.insert(d, &[] as &[u8]);
            }
            if cmd.status.is_final() {
                batch.remove(key(b"l/", cmd.id.as_bytes()));
            } else {
                batch.insert(key(b"l/", cmd.id.as_bytes()), &[] as &[u8]);
            }
        }
        for (device, lock) in &changes.desired {
            let value = serde_json::to_vec(&StoredDesired {
                v: RECORD_VERSION,
                lock: lock.clone(),
            })
            .map_err(|e| self.corrupt(device.as_str(), e.to_string()))?;
            batch.insert(key(b"s/", device.as_str().as_bytes()), value);
        }
        let write = |source| CommandStoreError::Write {
            path: self.dir.clone(),
            source,
        };
        self.tree.apply_batch(batch).map_err(write)?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| match e {
            DurableError::Flush(source) => write(source),
            DurableError::Fsync { path, source } => CommandStoreError::Io { path, source },
        })
    }

    /// Every command that is not final yet.
    pub(crate) fn load_live(&self) -> Result<Vec<CommandView>, CommandStoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"l/") {
            let (k, _) = item.map_err(|e| self.read_error(e))?;
            let id = String::from_utf8_lossy(&k[2..]).into_owned();
            match self.get(&id)? {
                Some(cmd) if !cmd.status.is_final() => out.push(cmd),
                Some(_) => {}
                None => return Err(self.corrupt(&id, "live entry without a record".into())),
            }
        }
        Ok(out)
    }

    /// Every desired lock state.
    pub(crate) fn load_desired(
        &self,
    ) -> Result<Vec<(DeviceId, DesiredLockView)>, CommandStoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"s/") {
            let (k, v) = item.map_err(|e| self.read_error(e))?;
            let name = String::from_utf8_lossy(&k[2..]).into_owned();
            let device =
                DeviceId::new(name.as_str()).map_err(|e| self.corrupt(&name, e.to_string()))?;
            let stored: StoredDesired =
                serde_json::from_slice(&v).map_err(|e| self.corrupt(&name, e.to_string()))?;
            out.push((device, stored.lock));
        }
        Ok(out)
    }

    /// One command.
    pub fn get(&self, id: &str) -> Result<Option<CommandView>, CommandStoreError> {
        let Some(v) = self
            .tree
            .get(key(b"c/", id.as_bytes()))
            .map_err(|e| self.read_error(e))?
        else {
            return Ok(None);
        };
        let stored: StoredCommand =
            serde_json::from_slice(&v).map_err(|e| self.corrupt(id, e.to_string()))?;
        if stored.v != RECORD_VERSION || stored.command.id != id {
            return Err(self.corrupt(id, "wrong version or id".into()));
        }
        Ok(Some(stored.command))
    }

    /// One page, newest first. `cursor` is the `next_cursor` of the previous page.
    pub fn list(&self, q: &CommandQuery, cursor: Option<&str>) -> Result<CommandPage, ListError> {
        let prefix = match &q.device {
            Some(d) => device_prefix(d.as_str()),
            None => b"t/".to_vec(),
        };
        let start = match cursor {
            Some(c) => {
                let after = hex::decode(c).map_err(|_| ListError::BadCursor)?;
                if !after.starts_with(&prefix) {
                    return Err(ListError::BadCursor);
                }
                let mut next = after;
                next.push(0);
                next
            }
            None => prefix.clone(),
        };
        let limit = q.limit.clamp(1, MAX_LIMIT);
        let mut items = Vec::new();
        let mut last_key = None;
        let mut more = false;
        for (scanned, item) in self.tree.range(start..).enumerate() {
            let (k, _) = item.map_err(|e| ListError::Store(self.read_error(e)))?;
            if !k.starts_with(&prefix) {
                break;
            }
            if items.len() >= limit || scanned >= MAX_SCAN {
                more = true;
                break;
            }
            last_key = Some(k.to_vec());
            // The id follows the 8-byte reversed time.
            let id = String::from_utf8_lossy(&k[prefix.len() + 8..]).into_owned();
            let Some(cmd) = self.get(&id).map_err(ListError::Store)? else {
                continue;
            };
            if q.status.is_some_and(|s| s != cmd.status)
                || q.kind.as_deref().is_some_and(|k| k != cmd.body.kind())
            {
                continue;
            }
            items.push(cmd);
        }
        Ok(CommandPage {
            items,
            next_cursor: if more {
                last_key.map(hex::encode)
            } else {
                None
            },
        })
    }

    fn read_error(&self, source: sled::Error) -> CommandStoreError {
        CommandStoreError::Open {
            path: self.dir.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &str, detail: String) -> CommandStoreError {
        CommandStoreError::Corrupt {
            path: self.dir.clone(),
            key: key.to_owned(),
            detail,
        }
    }
}

/// Why a list request failed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("the cursor is not one this list issued for these filters")]
    BadCursor,
    #[error(transparent)]
    Store(#[from] CommandStoreError),
}

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(rest);
    k
}

fn device_prefix(device: &str) -> Vec<u8> {
    let mut k = b"d/".to_vec();
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k
}

#[cfg(test)]
mod tests {
    use super::super::record::{new_command, transition};
    use super::*;
    use crate::views::CommandBody;

    fn open(dir: &Path) -> CommandStore {
        CommandStore::open(dir, 1 << 20).unwrap()
    }

    fn reboot(id: &str, device: &str, at: u64) -> CommandView {
        new_command(
            id.into(),
            device,
            CommandBody::Reboot {},
            "admin",
            at,
            at + 1000,
        )
    }

    #[test]
    fn records_desired_state_and_live_set_survive_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("commands");
        {
            let store = open(&dir);
            let mut done = reboot("c2", "T-1", 2);
            store
                .commit(&Changes {
                    commands: vec![(reboot("c1", "T-1", 1), true), (done.clone(), true)],
                    desired: vec![(
                        DeviceId::new("T-1").unwrap(),
                        DesiredLockView {
                            locked: true,
                            reason: "stolen".into(),
                            generation: 4,
                            author: "admin".into(),
                            changed_at_ms: 9,
                        },
                    )],
                })
                .unwrap();
            transition(&mut done, CommandState::Succeeded, 3).unwrap();
            store
                .commit(&Changes {
                    commands: vec![(done, false)],
                    desired: vec![],
                })
                .unwrap();
        }
        std::fs::write(dir.join("snap.0000000000000001.generating"), b"x").unwrap();
        let store = open(&dir);
        let live = store.load_live().unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, "c1");
        assert_eq!(
            store.get("c2").unwrap().unwrap().status,
            CommandState::Succeeded
        );
        let desired = store.load_desired().unwrap();
        assert_eq!(desired[0].1.generation, 4);
        assert!(store.get("nope").unwrap().is_none());
    }

    #[test]
    fn pages_are_newest_first_filtered_and_continue_with_the_cursor() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let mut changes = Changes::default();
        for i in 0..25u64 {
            let device = if i % 2 == 0 { "T-even" } else { "T-odd" };
            let mut c = reboot(&format!("c{i:02}"), device, 100 + i);
            if i % 5 == 0 {
                transition(&mut c, CommandState::Cancelled, 200).unwrap();
            }
            changes.commands.push((c, true));
        }
        store.commit(&changes).unwrap();
        let mut q = CommandQuery {
            limit: 10,
            ..Default::default()
        };
        let mut seen = Vec::new();
        let mut cursor = None;
        for _ in 0..10 {
            let page = store.list(&q, cursor.as_deref()).unwrap();
            seen.extend(page.items.into_iter().map(|c| c.id));
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        let expected: Vec<String> = (0..25).rev().map(|i| format!("c{i:02}")).collect();
        assert_eq!(seen, expected);

        q.device = Some(DeviceId::new("T-odd").unwrap());
        q.status = Some(CommandState::Cancelled);
        q.limit = 100;
        let page = store.list(&q, None).unwrap();
        let ids: Vec<_> = page.items.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["c15", "c05"]);
        assert!(page.next_cursor.is_none());
        // A cursor of another filter (or made up) is refused.
        let all = store
            .list(
                &CommandQuery {
                    limit: 1,
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        let other = all.next_cursor.unwrap();
        assert!(matches!(
            store.list(&q, Some(&other)),
            Err(ListError::BadCursor)
        ));
        assert!(matches!(
            store.list(&q, Some("zz")),
            Err(ListError::BadCursor)
        ));
    }
}
