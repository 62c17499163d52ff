//! The registry's sled store, used exactly as `notes/storage.md` prescribes: delete
//! `snap.*.generating` before opening, explicit `cache_capacity`, and a commit is
//! `apply_batch` + `flush` + fsync of the `db` file. Every call here blocks; callers run it on
//! a blocking thread (or at startup, before serving).

use std::fs;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::device::{DeviceRecord, RECORD_VERSION};
use super::error::RegistryError;

/// Name of the sled tree holding one record per device.
const DEVICES_TREE: &str = "devices";

/// An open registry store.
#[derive(Debug)]
pub(crate) struct Store {
    /// Directory of the sled database (its `db` file is fsynced on every commit).
    dir: PathBuf,
    /// Kept open so the tree stays valid; sled's background threads belong to it.
    _db: sled::Db,
    /// Device records keyed by device id.
    devices: sled::Tree,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` with a page cache of `cache_capacity`
    /// bytes.
    pub(crate) fn open(dir: &Path, cache_capacity: u64) -> Result<Self, RegistryError> {
        create_private_dir(dir)?;
        remove_partial_snapshots(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .open()
            .map_err(|source| RegistryError::Open {
                path: dir.to_owned(),
                source,
            })?;
        let devices = db
            .open_tree(DEVICES_TREE)
            .map_err(|source| RegistryError::Open {
                path: dir.to_owned(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            _db: db,
            devices,
        })
    }

    /// Every stored device record, in key (device id) order.
    pub(crate) fn load(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        let mut records = Vec::new();
        for item in self.devices.iter() {
            let (key, value) = item.map_err(|source| RegistryError::Open {
                path: self.dir.clone(),
                source,
            })?;
            let key = String::from_utf8_lossy(&key).into_owned();
            let corrupt = |detail: String| RegistryError::CorruptRecord {
                path: self.dir.clone(),
                key: key.clone(),
                detail,
            };
            let record: DeviceRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt(e.to_string()))?;
            if record.v != RECORD_VERSION {
                return Err(corrupt(format!(
                    "record version {} is not supported (expected {RECORD_VERSION})",
                    record.v
                )));
            }
            if record.id != key {
                return Err(corrupt(format!(
                    "record names device {:?}, not its key",
                    record.id
                )));
            }
            records.push(record);
        }
        Ok(records)
    }

    /// Writes `records` as one batch and makes it durable (apply_batch, flush, fsync `db`).
    pub(crate) fn commit(&self, records: &[DeviceRecord]) -> Result<(), RegistryError> {
        let mut batch = sled::Batch::default();
        for record in records {
            let value = serde_json::to_vec(record).map_err(|source| RegistryError::Encode {
                device: record.id.clone(),
                source,
            })?;
            batch.insert(record.id.as_bytes(), value);
        }
        let write = |source| RegistryError::Write {
            path: self.dir.clone(),
            source,
        };
        self.devices.apply_batch(batch).map_err(write)?;
        self.devices.flush().map_err(write)?;
        // sled's flush uses sync_file_range, which survives a process kill but not a power
        // cut; fsync the db file through a second handle (notes/storage.md rule 2).
        let db_file = self.dir.join("db");
        fs::File::open(&db_file)
            .and_then(|f| f.sync_all())
            .map_err(|source| RegistryError::Io {
                path: db_file,
                source,
            })
    }
}

fn create_private_dir(dir: &Path) -> Result<(), RegistryError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| RegistryError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Deletes `snap.*.generating` files: a kill while sled writes a snapshot can leave a
/// truncated one that sled would take as the newest and refuse to open
/// (notes/storage.md rule 3).
fn remove_partial_snapshots(dir: &Path) -> Result<(), RegistryError> {
    let io = |source| RegistryError::Io {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let partial = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating"));
        if partial {
            warn!(path = %path.display(), "removing a partial sled snapshot left by a crash");
            fs::remove_file(&path).map_err(|source| RegistryError::Io {
                path: path.clone(),
                source,
            })?;
            info!(path = %path.display(), "partial snapshot removed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_partial_snapshots_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("registry");
        {
            let store = Store::open(&dir, 1 << 20).unwrap();
            let mut a = DeviceRecord::new("T-1", 10);
            a.model = "X9".into();
            store.commit(&[a, DeviceRecord::new("T-2", 11)]).unwrap();
        }
        // What a kill during snapshot generation leaves behind.
        let partial = dir.join("snap.00000000000000A0.generating");
        fs::write(&partial, b"truncated").unwrap();
        let store = Store::open(&dir, 1 << 20).unwrap();
        assert!(!partial.exists());
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0].id, "T-1");
        assert_eq!(loaded[0].model, "X9");
        assert_eq!(loaded[1].first_seen_ms, 11);
    }

    #[test]
    fn a_record_under_the_wrong_key_is_reported_not_loaded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        let record = DeviceRecord::new("T-1", 1);
        store
            .devices
            .insert(b"T-2", serde_json::to_vec(&record).unwrap())
            .unwrap();
        store.devices.insert(b"T-3", b"{not json".to_vec()).unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, RegistryError::CorruptRecord { .. }), "{err}");
    }
}
