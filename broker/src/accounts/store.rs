//! The account store: one sled database (`DATA/accounts`) used as `docs/storage.md`
//! prescribes (through `posfleet_runtime::sledstore`). Every function here blocks; callers on
//! the runtime use `spawn_blocking`. Writes are serialised by [`super::Accounts`] (one writer
//! at a time, storage rule 4), and each is durable (batch, flush, fsync) before it returns.
//!
//! ```text
//! u/<user>            UserRecord (JSON): role, argon2id hashes, lockout, MFA
//! t/<token name>      TokenRecord (JSON): role, creator, expiry, SHA-256 of the token
//! h/<sha256 hex>      token name (index for bearer lookups)
//! m/bootstrap_revoked "1" once `DATA/admin.token` is refused
//! x/<user>\0<source>  SourceLockout (JSON): the account is locked out from that source
//! p/<seq u64 BE>      AuditRecord (JSON): done offline (`posfleet-broker admin ...`), to be
//!                     appended to the audit log at the next start
//! ```

use std::path::{Path, PathBuf};

use posfleet_runtime::sledstore::{self, DurableError, OpenError};
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
    /// Unused since failures are counted in memory per source (`throttle`); kept for the
    /// record format (always 0 in new records).
    pub failed_attempts: u32,
    /// Logins are refused from every source until then (0: not locked): the per-account
    /// backstop of `throttle`.
    pub locked_until_ms: u64,
    pub created_ms: u64,
    pub created_by: String,
    pub last_login_ms: Option<u64>,
    /// Start of the current inactivity period (creation, last login, enable): 8.2.6.
    pub active_since_ms: u64,
    pub totp: Option<TotpState>,
    /// The authenticator was removed offline (`posfleet-broker admin reset-mfa`): logins get a
    /// restricted session until MFA is enrolled again, whatever the role.
    #[serde(default)]
    pub mfa_reenrol: bool,
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

/// A lockout of an account from one source, kept so that a restart does not lift it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceLockout {
    pub v: u32,
    pub until_ms: u64,
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

    /// Records that `user` is locked out from `source` until `until_ms` (replacing an earlier
    /// lockout), and forgets expired lockouts of every account (as of `now_ms`).
    pub fn put_source_lockout(
        &self,
        user: &str,
        source: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<(), AccountStoreError> {
        let mut batch = sled::Batch::default();
        for (k, lockout) in self.source_lockouts_raw()? {
            if lockout.until_ms <= now_ms {
                batch.remove(k);
            }
        }
        let value = serde_json::to_vec(&SourceLockout {
            v: RECORD_VERSION,
            until_ms,
        })
        .map_err(|e| self.corrupt_key(user, e.to_string()))?;
        batch.insert(lockout_key(user, source), value);
        self.commit(batch)
    }

    /// Every stored lockout: (user, source, until).
    pub fn source_lockouts(&self) -> Result<Vec<(String, String, u64)>, AccountStoreError> {
        Ok(self
            .source_lockouts_raw()?
            .into_iter()
            .filter_map(|(k, l)| {
                let rest = k.strip_prefix(b"x/")?;
                let split = rest.iter().position(|b| *b == 0)?;
                let user = String::from_utf8(rest[..split].to_vec()).ok()?;
                let source = String::from_utf8(rest[split + 1..].to_vec()).ok()?;
                Some((user, source, l.until_ms))
            })
            .collect())
    }

    /// Removes every stored lockout of `user` (from sources); returns how many.
    pub fn clear_source_lockouts(&self, user: &str) -> Result<usize, AccountStoreError> {
        let mut prefix = key(b"x/", user);
        prefix.push(0);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.tree.scan_prefix(&prefix) {
            let (k, _) = item.map_err(|e| self.sled(e))?;
            batch.remove(k);
            n += 1;
        }
        if n > 0 {
            self.commit(batch)?;
        }
        Ok(n)
    }

    fn source_lockouts_raw(&self) -> Result<Vec<(Vec<u8>, SourceLockout)>, AccountStoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"x/") {
            let (k, v) = item.map_err(|e| self.sled(e))?;
            let lockout: SourceLockout = serde_json::from_slice(&v)
                .map_err(|e| self.corrupt_key(&String::from_utf8_lossy(&k), e.to_string()))?;
            out.push((k.to_vec(), lockout));
        }
        Ok(out)
    }

    /// Queues `record` (something done offline) for the audit log of the next start.
    pub fn add_pending_audit(
        &self,
        record: &crate::audit::AuditRecord,
    ) -> Result<(), AccountStoreError> {
        let next = match self.tree.scan_prefix(b"p/").next_back() {
            Some(item) => {
                let (k, _) = item.map_err(|e| self.sled(e))?;
                pending_seq(&k).map_or(0, |n| n + 1)
            }
            None => 0,
        };
        let value =
            serde_json::to_vec(record).map_err(|e| self.corrupt_key("p/", e.to_string()))?;
        let mut batch = sled::Batch::default();
        batch.insert(pending_key(next), value);
        self.commit(batch)
    }

    /// The queued audit records, oldest first, with their sequence numbers.
    pub fn pending_audit(
        &self,
    ) -> Result<Vec<(u64, crate::audit::AuditRecord)>, AccountStoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"p/") {
            let (k, v) = item.map_err(|e| self.sled(e))?;
            let Some(seq) = pending_seq(&k) else { continue };
            let record = serde_json::from_slice(&v)
                .map_err(|e| self.corrupt_key(&format!("p/{seq}"), e.to_string()))?;
            out.push((seq, record));
        }
        Ok(out)
    }

    /// Removes the queued audit record `seq` (once it is in the audit log).
    pub fn remove_pending_audit(&self, seq: u64) -> Result<(), AccountStoreError> {
        let mut batch = sled::Batch::default();
        batch.remove(pending_key(seq));
        self.commit(batch)
    }

    fn corrupt_key(&self, k: &str, detail: String) -> AccountStoreError {
        AccountStoreError::Corrupt {
            path: self.dir.clone(),
            key: k.to_owned(),
            detail,
        }
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

fn lockout_key(user: &str, source: &str) -> Vec<u8> {
    let mut k = key(b"x/", user);
    k.push(0);
    k.extend_from_slice(source.as_bytes());
    k
}

fn pending_key(seq: u64) -> Vec<u8> {
    let mut k = b"p/".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn pending_seq(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.strip_prefix(b"p/")?.try_into().ok()?))
}

fn key(prefix: &[u8], name: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}
