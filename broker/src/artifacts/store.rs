//! The artifact store: blobs on disk plus their metadata in sled, used as `docs/storage.md`
//! prescribes (through `posfleet_runtime::sledstore`). Every function here blocks; callers run
//! them on blocking threads. Writes are rare (uploads, deletions) and serialised by one lock,
//! which is this store's single committer (storage rule 4).
//!
//! ```text
//! DATA/artifacts/meta/                    sled: metadata (below)
//! DATA/artifacts/blobs/<sha256 hex>       the bytes (0600), complete and verified
//! DATA/artifacts/blobs/.upload-<hex>.tmp  an upload in progress (0600); swept at open
//!
//! a/<id>                      StoredArtifact (JSON)
//! v/<component>\0<version>    id (a component version names exactly one artifact)
//! ```
//!
//! Order of writes, so a crash at any point leaves nothing acknowledged missing and nothing
//! half-visible: an upload fsyncs its temp file, renames it to its final name, fsyncs the
//! directory, then commits the metadata (durable) and only then answers. A deletion commits
//! the removal of the metadata first, then unlinks the blob. A blob without metadata (a crash
//! between the two steps) is removed at the next open.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use posfleet_runtime::sledstore::{self, DurableError, OpenError};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::error::{ArtifactStoreError, DeleteError, InsertError};
use super::validate::parse_id;
use super::{ArtifactMeta, ArtifactUsers};

/// Version of the stored record format.
const RECORD_VERSION: u32 = 1;
/// Prefix of temp files of uploads in progress.
const TEMP_PREFIX: &str = ".upload-";
/// sled page cache of the artifact store (a few records).
pub const DEFAULT_CACHE: u64 = 4 * 1024 * 1024;

/// What a metadata record holds on disk.
#[derive(Debug, Serialize, Deserialize)]
struct StoredArtifact {
    v: u32,
    id: String,
    version: String,
    component: String,
    size_bytes: u64,
    /// base64.
    release_signature: String,
    release_key_id: String,
    #[serde(default)]
    min_version: Option<String>,
    uploaded_at_ms: u64,
    uploaded_by: String,
}

/// The outcome of [`ArtifactStore::insert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Stored now.
    Created(ArtifactMeta),
    /// The same bytes with the same metadata were already stored; nothing changed.
    Existing(ArtifactMeta),
}

/// The open store.
#[derive(Debug)]
pub struct ArtifactStore {
    /// `DATA/artifacts/meta`: the sled directory.
    meta_dir: PathBuf,
    /// `DATA/artifacts/blobs`: artifact bytes and temp files of uploads.
    blobs_dir: PathBuf,
    _db: sled::Db,
    tree: sled::Tree,
    /// Held by every write (insert, delete): one committer, and no interleaving of the
    /// existence checks with the writes that depend on them.
    write: Mutex<()>,
}

impl ArtifactStore {
    /// Opens (creating) the store under `root` (`DATA/artifacts`), removes leftovers of
    /// interrupted uploads and blobs without metadata, and warns about records whose blob is
    /// missing.
    pub fn open(root: &Path, cache_capacity: u64) -> Result<Self, ArtifactStoreError> {
        let meta_dir = root.join("meta");
        let blobs_dir = root.join("blobs");
        for dir in [root, blobs_dir.as_path()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| ArtifactStoreError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        let (db, tree) =
            sledstore::open_tree(&meta_dir, cache_capacity, "artifacts").map_err(|e| match e {
                OpenError::Io { path, source } => ArtifactStoreError::Io { path, source },
                OpenError::Sled { path, source } => ArtifactStoreError::Open { path, source },
            })?;
        let store = Self {
            meta_dir,
            blobs_dir,
            _db: db,
            tree,
            write: Mutex::new(()),
        };
        store.recover()?;
        Ok(store)
    }

    /// Where the blobs and upload temp files live.
    pub fn blobs_dir(&self) -> &Path {
        &self.blobs_dir
    }

    /// The blob of artifact `id` (which must be a valid id).
    pub fn blob_path(&self, id: &str) -> PathBuf {
        self.blobs_dir.join(id)
    }

    /// A fresh temp file name for an upload, in the blobs directory (so the final rename
    /// stays on one file system).
    pub fn temp_path(&self) -> PathBuf {
        let nonce = hex::encode(rand::random::<[u8; 8]>());
        self.blobs_dir.join(format!("{TEMP_PREFIX}{nonce}.tmp"))
    }

    /// One artifact.
    pub fn get(&self, id: &str) -> Result<Option<ArtifactMeta>, ArtifactStoreError> {
        let key = record_key(id);
        let Some(value) = self.tree.get(&key).map_err(|e| self.read_error(e))? else {
            return Ok(None);
        };
        self.decode(id, &value).map(Some)
    }

    /// Every artifact, newest first.
    pub fn list(&self) -> Result<Vec<ArtifactMeta>, ArtifactStoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"a/") {
            let (k, v) = item.map_err(|e| self.read_error(e))?;
            let id = String::from_utf8_lossy(&k[2..]).into_owned();
            out.push(self.decode(&id, &v)?);
        }
        out.sort_by(|a, b| {
            b.uploaded_at_ms
                .cmp(&a.uploaded_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// Adds an artifact whose verified bytes are in `temp` (synced): renames it into place,
    /// syncs the directory, commits the metadata durably. If the same bytes are stored with
    /// the same version, component and minimum version, nothing changes ([`Inserted::Existing`]);
    /// other metadata for the same bytes, or other bytes for the same component version, are
    /// a conflict. `temp` is left for the caller to remove unless the artifact was created.
    pub fn insert(&self, temp: &Path, meta: ArtifactMeta) -> Result<Inserted, InsertError> {
        let _write = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = self.get(&meta.id)? {
            if existing.version == meta.version
                && existing.component == meta.component
                && existing.min_version == meta.min_version
            {
                return Ok(Inserted::Existing(existing));
            }
            return Err(InsertError::Conflict(format!(
                "these bytes are already stored as {} {} (artifact {}{}); the same file cannot \
                 be another version",
                existing.component,
                existing.version,
                existing.id,
                existing
                    .min_version
                    .as_deref()
                    .map(|m| format!(", min_version {m}"))
                    .unwrap_or_default(),
            )));
        }
        let version_key = version_key(&meta.component, &meta.version);
        if let Some(other) = self
            .tree
            .get(&version_key)
            .map_err(|e| self.read_error(e))?
        {
            return Err(InsertError::Conflict(format!(
                "{} {} is already artifact {} (other bytes); give this build another version",
                meta.component,
                meta.version,
                String::from_utf8_lossy(&other)
            )));
        }
        let blob = self.blob_path(&meta.id);
        fs::rename(temp, &blob).map_err(|source| ArtifactStoreError::Io {
            path: blob.clone(),
            source,
        })?;
        let committed = self.sync_dir().and_then(|()| {
            let mut batch = sled::Batch::default();
            batch.insert(record_key(&meta.id), self.encode(&meta)?);
            batch.insert(version_key, meta.id.as_bytes());
            self.commit(batch)
        });
        if let Err(e) = committed {
            // Not acknowledged: take the blob away again (best effort; open sweeps orphans).
            let _ = fs::remove_file(&blob);
            return Err(e.into());
        }
        info!(id = %meta.id, version = %meta.version, component = %meta.component, size = meta.size_bytes, "artifact stored");
        Ok(Inserted::Created(meta))
    }

    /// Deletes artifact `id` (metadata durably first, then the blob) unless an unfinished
    /// rollout uses it. `Ok(None)`: no such artifact.
    pub fn delete(
        &self,
        id: &str,
        users: &dyn ArtifactUsers,
    ) -> Result<Option<ArtifactMeta>, DeleteError> {
        let _write = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(meta) = self.get(id)? else {
            return Ok(None);
        };
        let rollouts = users.rollouts_using(id);
        if !rollouts.is_empty() {
            return Err(DeleteError::InUse {
                id: id.to_owned(),
                rollouts,
            });
        }
        let mut batch = sled::Batch::default();
        batch.remove(record_key(id));
        batch.remove(version_key(&meta.component, &meta.version));
        self.commit(batch)?;
        let blob = self.blob_path(id);
        match fs::remove_file(&blob) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ArtifactStoreError::Io { path: blob, source }.into()),
        }
        self.sync_dir()?;
        info!(id, "artifact deleted");
        Ok(Some(meta))
    }

    /// Removes temp files and blobs without metadata; warns about metadata without a blob.
    fn recover(&self) -> Result<(), ArtifactStoreError> {
        let entries = fs::read_dir(&self.blobs_dir).map_err(|source| self.io(source))?;
        let mut removed = 0usize;
        for entry in entries {
            let entry = entry.map_err(|source| self.io(source))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let orphan = if name.starts_with(TEMP_PREFIX) {
                true
            } else if parse_id(&name).is_some() {
                self.get(&name)?.is_none()
            } else {
                warn!(file = %entry.path().display(), "unexpected file in the artifact blobs directory; left alone");
                false
            };
            if orphan {
                fs::remove_file(entry.path()).map_err(|source| ArtifactStoreError::Io {
                    path: entry.path(),
                    source,
                })?;
                removed += 1;
            }
        }
        if removed > 0 {
            info!(
                removed,
                "removed interrupted uploads and blobs without metadata"
            );
            self.sync_dir()?;
        }
        for meta in self.list()? {
            let blob = self.blob_path(&meta.id);
            match fs::metadata(&blob) {
                Ok(m) if m.len() == meta.size_bytes => {}
                Ok(m) => {
                    error!(id = %meta.id, expected = meta.size_bytes, found = m.len(), "artifact blob has the wrong size; downloads will fail verification — delete and upload it again")
                }
                Err(_) => {
                    error!(id = %meta.id, path = %blob.display(), "artifact blob is missing; downloads answer 404 — delete and upload it again")
                }
            }
        }
        Ok(())
    }

    fn commit(&self, batch: sled::Batch) -> Result<(), ArtifactStoreError> {
        let write = |source| ArtifactStoreError::Write {
            path: self.meta_dir.clone(),
            source,
        };
        self.tree.apply_batch(batch).map_err(write)?;
        sledstore::make_durable(&self.tree, &self.meta_dir).map_err(|e| match e {
            DurableError::Flush(source) => write(source),
            DurableError::Fsync { path, source } => ArtifactStoreError::Io { path, source },
        })
    }

    /// fsync of the blobs directory: makes renames and unlinks in it durable.
    fn sync_dir(&self) -> Result<(), ArtifactStoreError> {
        fs::File::open(&self.blobs_dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| self.io(source))
    }

    fn encode(&self, meta: &ArtifactMeta) -> Result<Vec<u8>, ArtifactStoreError> {
        serde_json::to_vec(&StoredArtifact {
            v: RECORD_VERSION,
            id: meta.id.clone(),
            version: meta.version.clone(),
            component: meta.component.clone(),
            size_bytes: meta.size_bytes,
            release_signature: BASE64.encode(&meta.release_signature),
            release_key_id: meta.release_key_id.clone(),
            min_version: meta.min_version.clone(),
            uploaded_at_ms: meta.uploaded_at_ms,
            uploaded_by: meta.uploaded_by.clone(),
        })
        .map_err(|e| self.corrupt(&meta.id, e.to_string()))
    }

    fn decode(&self, id: &str, value: &[u8]) -> Result<ArtifactMeta, ArtifactStoreError> {
        let stored: StoredArtifact =
            serde_json::from_slice(value).map_err(|e| self.corrupt(id, e.to_string()))?;
        if stored.v != RECORD_VERSION || stored.id != id {
            return Err(self.corrupt(id, "wrong record version or id".into()));
        }
        let sha256 = parse_id(&stored.id).ok_or_else(|| self.corrupt(id, "bad id".into()))?;
        let release_signature = BASE64
            .decode(&stored.release_signature)
            .map_err(|e| self.corrupt(id, e.to_string()))?;
        Ok(ArtifactMeta {
            id: stored.id,
            version: stored.version,
            component: stored.component,
            size_bytes: stored.size_bytes,
            sha256,
            release_signature,
            release_key_id: stored.release_key_id,
            min_version: stored.min_version,
            uploaded_at_ms: stored.uploaded_at_ms,
            uploaded_by: stored.uploaded_by,
        })
    }

    fn io(&self, source: std::io::Error) -> ArtifactStoreError {
        ArtifactStoreError::Io {
            path: self.blobs_dir.clone(),
            source,
        }
    }

    fn read_error(&self, source: sled::Error) -> ArtifactStoreError {
        ArtifactStoreError::Read {
            path: self.meta_dir.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &str, detail: String) -> ArtifactStoreError {
        ArtifactStoreError::Corrupt {
            path: self.meta_dir.clone(),
            key: key.to_owned(),
            detail,
        }
    }
}

/// Creates a temp file for an upload: new, 0600.
pub(crate) fn create_temp(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn record_key(id: &str) -> Vec<u8> {
    let mut k = b"a/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn version_key(component: &str, version: &str) -> Vec<u8> {
    let mut k = b"v/".to_vec();
    k.extend_from_slice(component.as_bytes());
    k.push(0);
    k.extend_from_slice(version.as_bytes());
    k
}
