//! The account store: one sled database (`DATA/accounts`) used as `notes/storage.md`
//! prescribes (through `posfleet_agent::sledstore`). Every function here blocks; callers on
//! the runtime use `spawn_blocking`. Writes are serialised by [`super::Accounts`] (one writer
//! at a time, storage rule 4), and each is durable (batch, flush, fsync) before it returns.
//!
//! ```text
//! u/<user>            UserRecord (JSON): role, argon2id hashes, lockout, MFA
//! t/<token name>      TokenRecord (JSON): role, creator, expiry, SHA-256 of the token
//! h/<sha256 hex>      token name (index for bearer lookups)
//! m/bootstrap_revoked "1" once `DATA/admin.token` is refused
//! ```

use std::path::{Path, PathBuf};

use posfleet_agent::sledstore::{self, DurableError, OpenError};
use serde::{Deserialize, Serialize};

use super::Role;

/// Version of the stored records.
const RECORD_VERSION: u32 = 1;
const BOOTSTRAP_REVOKED: &[u8] = b"m/bootstrap_revoked";

/// Why the account store failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the account store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("account store {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("account store {path}: record {key:?} is corrupt: {detail}")]
    Corrupt {
        path: PathBuf,
        key: String,
        detail: String,
    },
}

/// An enrolled (or enrolling) TOTP authenticator.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotpState {
    /// The shared secret (hex). Needed to compute codes, so stored as is; the store
    /// directory is 0700.
    pub secret_hex: String,
    /// False until the user proved the authenticator works with a code.
    pub confirmed: bool,
    /// The last time step whose code was accepted; that step and older ones are refused
    /// (replay).
    pub last_step: u64,
}

/// An operator account.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub v: u32,
    pub name: String,
    pub role: Role,
    /// argon2id PHC string of the current password.
    pub password_hash: String,
    /// Hashes of earlier passwords, newest first (8.3.7; with the current one, the last 4).
    pub history: Vec<String>,
    pub password_changed_ms: u64,
    /// The next login may only change the password (first login, admin reset, expiry).
    pub must_change: bool,
    pub enabled: bool,
    /// Why the account is disabled ("admin", "inactive"), empty when enabled.
    #[serde(default)]
    pub disabled_reason: String,
    /// Failed login attempts since the last success or lockout (8.3.4).
    pub failed_attempts: u32,
    /// Logins are refused until then (0: not locked).
    pub locked_until_ms: u64,
    pub created_ms: u64,
    pub created_by: String,
    pub last_login_ms: Option<u64>,
    /// Start of the current inactivity period (creation, last login, enable): 8.2.6.
    pub active_since_ms: u64,
    pub totp: Option<TotpState>,
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl UserRecord {
    /// True once an authenticator is confirmed.
    pub fn mfa_enabled(&self) -> bool {
        self.totp.as_ref().is_some_and(|t| t.confirmed)
    }
}

/// An API token for automation (the token itself is never stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub v: u32,
    pub name: String,
    pub role: Role,
    /// The principal that created it; a token stops working when that account is disabled
    /// or deleted.
    pub created_by: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// SHA-256 of the token, hex.
    pub digest_hex: String,
}

/// The open store.
#[derive(Debug)]
pub struct AccountStore {
    dir: PathBuf,
    _db: sled::Db,
    tree: sled::Tree,
}

impl AccountStore {
    /// Opens (creating) the store in `dir` with a page cache of `cache_capacity` bytes.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, AccountStoreError> {
        let (db, tree) =
            sledstore::open_tree(dir, cache_capacity, "accounts").map_err(|e| match e {
                OpenError::Io { path, source } => AccountStoreError::Io { path, source },
                OpenError::Sled { path, source } => AccountStoreError::Open { path, source },
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            _db: db,
            tree,
        })
    }

    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, AccountStoreError> {
        self.read(&key(b"u/", name))
    }

    /// Every account, by name.
    pub fn users(&self) -> Result<Vec<UserRecord>, AccountStoreError> {
        self.scan(b"u/")
    }

    pub fn put_user(&self, user: &UserRecord) -> Result<(), AccountStoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(key(b"u/", &user.name), self.encode(&user.name, user)?);
        self.commit(batch)
    }

    /// Removes an account and every token it created.
    pub fn delete_user(&self, name: &str) -> Result<(), AccountStoreError> {
        let mut batch = sled::Batch::default();
        batch.remove(key(b"u/", name));
        for token in self.tokens()? {
            if token.created_by == name {
                batch.remove(key(b"t/", &token.name));
                batch.remove(key(b"h/", &token.digest_hex));
            }
        }
        self.commit(batch)
    }

    pub fn token(&self, name: &str) -> Result<Option<TokenRecord>, AccountStoreError> {
        self.read(&key(b"t/", name))
    }

    /// The token whose SHA-256 is `digest`.
    pub fn token_by_digest(
        &self,
        digest: &[u8; 32],
    ) -> Result<Option<TokenRecord>, AccountStoreError> {
        let digest_hex = hex::encode(digest);
        let Some(name) = self
            .tree
            .get(key(b"h/", &digest_hex))
            .map_err(|e| self.sled(e))?
        else {
            return Ok(None);
        };
        let name = String::from_utf8_lossy(&name).into_owned();
        Ok(self.token(&name)?.filter(|t| t.digest_hex == digest_hex))
    }

    /// Every token, by name.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, AccountStoreError> {
        self.scan(b"t/")
    }

    pub fn put_token(&self, token: &TokenRecord) -> Result<(), AccountStoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(key(b"t/", &token.name), self.encode(&token.name, token)?);
        batch.insert(key(b"h/", &token.digest_hex), token.name.as_bytes());
        self.commit(batch)
    }

    pub fn delete_token(&self, token: &TokenRecord) -> Result<(), AccountStoreError> {
        let mut batch = sled::Batch::default();
        batch.remove(key(b"t/", &token.name));
        batch.remove(key(b"h/", &token.digest_hex));
        self.commit(batch)
    }

    pub fn bootstrap_revoked(&self) -> Result<bool, AccountStoreError> {
        Ok(self
            .tree
            .get(BOOTSTRAP_REVOKED)
            .map_err(|e| self.sled(e))?
            .is_some())
    }

    pub fn revoke_bootstrap(&self) -> Result<(), AccountStoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(BOOTSTRAP_REVOKED, b"1".as_slice());
        self.commit(batch)
    }

    fn commit(&self, batch: sled::Batch) -> Result<(), AccountStoreError> {
        self.tree.apply_batch(batch).map_err(|e| self.sled(e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| match e {
            DurableError::Flush(source) => self.sled(source),
            DurableError::Fsync { path, source } => AccountStoreError::Io { path, source },
        })
    }

    fn read<T: Versioned>(&self, k: &[u8]) -> Result<Option<T>, AccountStoreError> {
        let Some(value) = self.tree.get(k).map_err(|e| self.sled(e))? else {
            return Ok(None);
        };
        self.decode(k, &value).map(Some)
    }

    fn scan<T: Versioned>(&self, prefix: &[u8]) -> Result<Vec<T>, AccountStoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item.map_err(|e| self.sled(e))?;
            out.push(self.decode(&k, &v)?);
        }
        Ok(out)
    }

    fn decode<T: Versioned>(&self, k: &[u8], value: &[u8]) -> Result<T, AccountStoreError> {
        let corrupt = |detail: String| AccountStoreError::Corrupt {
            path: self.dir.clone(),
            key: String::from_utf8_lossy(k).into_owned(),
            detail,
        };
        // serde_json's message names a position, never the record's content.
        let record: T = serde_json::from_slice(value).map_err(|e| corrupt(e.to_string()))?;
        if record.version() != RECORD_VERSION {
            return Err(corrupt(format!("unknown version {}", record.version())));
        }
        Ok(record)
    }

    fn encode<T: Serialize>(&self, name: &str, record: &T) -> Result<Vec<u8>, AccountStoreError> {
        serde_json::to_vec(record).map_err(|e| AccountStoreError::Corrupt {
            path: self.dir.clone(),
            key: name.to_owned(),
            detail: e.to_string(),
        })
    }

    fn sled(&self, source: sled::Error) -> AccountStoreError {
        AccountStoreError::Sled {
            path: self.dir.clone(),
            source,
        }
    }
}

/// Records that carry a format version.
trait Versioned: serde::de::DeserializeOwned {
    fn version(&self) -> u32;
}

impl Versioned for UserRecord {
    fn version(&self) -> u32 {
        self.v
    }
}

impl Versioned for TokenRecord {
    fn version(&self) -> u32 {
        self.v
    }
}

/// The version new records are written with.
pub(crate) fn record_version() -> u32 {
    RECORD_VERSION
}

fn key(prefix: &[u8], name: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}
