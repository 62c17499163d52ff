//! The registry's sled store, used exactly as `docs/storage.md` prescribes: delete
//! `snap.*.generating` before opening, explicit `cache_capacity`, and a commit is
//! `apply_batch` + `flush` + fsync of the `db` file. Every call here blocks; callers run it on
//! a blocking thread (or at startup, before serving).

use std::path::{Path, PathBuf};

use super::device::{DeviceRecord, RECORD_VERSION};
use super::error::RegistryError;
use posfleet_runtime::sledstore::{self, DurableError, OpenError};

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
        let (db, devices) =
            sledstore::open_tree(dir, cache_capacity, DEVICES_TREE).map_err(|e| match e {
                OpenError::Io { path, source } => RegistryError::Io { path, source },
                OpenError::Sled { path, source } => RegistryError::Open { path, source },
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
        sledstore::make_durable(&self.devices, &self.dir).map_err(|e| match e {
            DurableError::Flush(source) => write(source),
            DurableError::Fsync { path, source } => RegistryError::Io { path, source },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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
