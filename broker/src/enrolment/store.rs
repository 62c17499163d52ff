//! The enrolment store: one sled database (`DATA/enrolment`) used as `docs/storage.md`
//! prescribes (through `posfleet_runtime::sledstore`). Every function blocks; the enrolment
//! service calls them on blocking threads, one writer at a time (storage rule 4).
//!
//! ```text
//! t/<token id>     StoredToken (JSON): only the SHA-256 of the secret
//! d/<device id>    DevicePki (JSON): issued serials, revocation, pending renewal
//! c/<serial hex>   IssuedCert (JSON): one certificate the fleet CA issued, and how
//! r/<serial hex>   RevokedCert (JSON): one entry of the CRL
//! crl_number       u64 BE, raised at every CRL change
//! ```

use std::path::{Path, PathBuf};

use posfleet_runtime::sledstore::{self, DurableError, OpenError};
use serde::{Deserialize, Serialize};

use crate::views::IssueKind;

/// Version of the stored record formats.
pub(crate) const RECORD_VERSION: u32 = 1;

/// Why the enrolment store failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolmentStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("enrolment store {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// Another process (the running controller) holds the store.
    #[error("enrolment store {path} is in use by another process (is the controller running?)")]
    Busy { path: PathBuf },
    #[error("enrolment store {path}: record {key:?} is corrupt: {detail}")]
    Corrupt {
        path: PathBuf,
        key: String,
        detail: String,
    },
}

/// An enrolment token as stored: never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredToken {
    pub v: u32,
    pub id: String,
    /// SHA-256 of the whole token text, lowercase hex.
    pub sha256: String,
    /// Only this device id may enrol with it; while it is unused, nothing else takes the id.
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    pub created_ms: u64,
    pub created_by: String,
    pub expires_ms: u64,
    /// Set (durably) when a terminal enrolled with it.
    #[serde(default)]
    pub used_ms: Option<u64>,
    #[serde(default)]
    pub used_by: Option<String>,
}

/// Where a device's certificates stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PkiStatus {
    Active,
    Revoked,
    Decommissioned,
}

/// A renewal whose new certificate has not been confirmed in use yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingRenewal {
    pub old_serial: String,
    pub new_serial: String,
    pub issued_ms: u64,
}

/// A device's certificates as the controller knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DevicePki {
    pub v: u32,
    pub id: String,
    pub status: PkiStatus,
    /// Every serial issued by enrolment or renewal (and every serial seen on a live session at
    /// revocation), oldest first.
    #[serde(default)]
    pub serials: Vec<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub revoked_ms: Option<u64>,
    #[serde(default)]
    pub revoked_by: Option<String>,
    #[serde(default)]
    pub pending_renewal: Option<PendingRenewal>,
}

impl DevicePki {
    pub(crate) fn new(id: &str) -> Self {
        Self {
            v: RECORD_VERSION,
            id: id.to_owned(),
            status: PkiStatus::Active,
            serials: Vec::new(),
            reason: None,
            revoked_ms: None,
            revoked_by: None,
            pending_renewal: None,
        }
    }
}

/// One certificate the fleet CA issued: written in the same durable batch as the device's
/// record, before the certificate leaves the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IssuedCert {
    pub v: u32,
    /// Hex, as on the CRL.
    pub serial: String,
    pub device: String,
    /// Unix seconds.
    pub not_after: i64,
    pub issued_ms: u64,
    pub kind: IssueKind,
    /// Who asked: an account or token, `token:<id>` for an enrolment, `device:<id>` for a
    /// renewal.
    pub issued_by: String,
    /// Issued offline (the controller stopped): the audit entry is written at its next start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending_audit: bool,
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RevokedCert {
    pub v: u32,
    pub serial: String,
    pub device: String,
    pub revoked_ms: u64,
    /// Replaced by a renewal rather than revoked for cause.
    pub superseded: bool,
}

/// One durable write.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub tokens: Vec<StoredToken>,
    pub deleted_tokens: Vec<String>,
    pub devices: Vec<DevicePki>,
    pub issued: Vec<IssuedCert>,
    pub revoked: Vec<RevokedCert>,
    pub crl_number: Option<u64>,
}

/// Everything the store holds, loaded at start.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub tokens: Vec<StoredToken>,
    pub devices: Vec<DevicePki>,
    pub issued: Vec<IssuedCert>,
    pub revoked: Vec<RevokedCert>,
    pub crl_number: u64,
}

/// The open store.
#[derive(Debug)]
pub struct EnrolmentStore {
    dir: PathBuf,
    _db: sled::Db,
    tree: sled::Tree,
}

const CRL_NUMBER_KEY: &[u8] = b"crl_number";

impl EnrolmentStore {
    /// Opens (creating) the store in `dir` with a page cache of `cache_capacity` bytes.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, EnrolmentStoreError> {
        let (db, tree) =
            sledstore::open_tree(dir, cache_capacity, "enrolment").map_err(|e| match e {
                OpenError::Io { path, source } => EnrolmentStoreError::Io { path, source },
                OpenError::Sled {
                    path,
                    source: sled::Error::Io(io),
                } if io.to_string().contains("could not acquire lock") => {
                    EnrolmentStoreError::Busy { path }
                }
                OpenError::Sled { path, source } => EnrolmentStoreError::Sled { path, source },
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            _db: db,
            tree,
        })
    }

    /// Writes `changes` as one batch and makes it durable (apply_batch, flush, fsync).
    pub(crate) fn commit(&self, changes: &Changes) -> Result<(), EnrolmentStoreError> {
        let mut batch = sled::Batch::default();
        for t in &changes.tokens {
            batch.insert(key("t/", &t.id), self.json(&t.id, t)?);
        }
        for id in &changes.deleted_tokens {
            batch.remove(key("t/", id));
        }
        for d in &changes.devices {
            batch.insert(key("d/", &d.id), self.json(&d.id, d)?);
        }
        for c in &changes.issued {
            batch.insert(key("c/", &c.serial), self.json(&c.serial, c)?);
        }
        for r in &changes.revoked {
            batch.insert(key("r/", &r.serial), self.json(&r.serial, r)?);
        }
        if let Some(n) = changes.crl_number {
            batch.insert(CRL_NUMBER_KEY, n.to_be_bytes().to_vec());
        }
        self.tree.apply_batch(batch).map_err(|e| self.sled(e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| match e {
            DurableError::Flush(source) => self.sled(source),
            DurableError::Fsync { path, source } => EnrolmentStoreError::Io { path, source },
        })
    }

    /// Every record.
    pub(crate) fn load(&self) -> Result<Loaded, EnrolmentStoreError> {
        let mut loaded = Loaded {
            tokens: self.scan("t/")?,
            devices: self.scan("d/")?,
            issued: self.scan("c/")?,
            revoked: self.scan("r/")?,
            crl_number: 0,
        };
        if let Some(v) = self.tree.get(CRL_NUMBER_KEY).map_err(|e| self.sled(e))? {
            let bytes = <[u8; 8]>::try_from(v.as_ref())
                .map_err(|_| self.corrupt("crl_number", "not 8 bytes".into()))?;
            loaded.crl_number = u64::from_be_bytes(bytes);
        }
        Ok(loaded)
    }

    /// Serials of the certificates recorded for `device` (tests and tools).
    pub fn issued_serials(&self, device: &str) -> Result<Vec<String>, EnrolmentStoreError> {
        let issued: Vec<IssuedCert> = self.scan("c/")?;
        Ok(issued
            .into_iter()
            .filter(|c| c.device == device)
            .map(|c| c.serial)
            .collect())
    }

    fn scan<T: for<'de> Deserialize<'de>>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, EnrolmentStoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, value) = item.map_err(|e| self.sled(e))?;
            let k = String::from_utf8_lossy(&k).into_owned();
            out.push(serde_json::from_slice(&value).map_err(|e| self.corrupt(&k, e.to_string()))?);
        }
        Ok(out)
    }

    fn json<T: Serialize>(&self, k: &str, value: &T) -> Result<Vec<u8>, EnrolmentStoreError> {
        serde_json::to_vec(value).map_err(|e| self.corrupt(k, e.to_string()))
    }

    fn sled(&self, source: sled::Error) -> EnrolmentStoreError {
        EnrolmentStoreError::Sled {
            path: self.dir.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &str, detail: String) -> EnrolmentStoreError {
        EnrolmentStoreError::Corrupt {
            path: self.dir.clone(),
            key: key.to_owned(),
            detail,
        }
    }
}

fn key(prefix: &str, id: &str) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}
