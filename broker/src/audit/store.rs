//! The audit store: one sled database (`DATA/audit`) used as `docs/storage.md` prescribes,
//! plus the anchor file (`DATA/audit.anchor`, 0600) and the audit key (`DATA/audit.key` or
//! `--audit-key`, 0600; see `keyed.rs`). Every function here blocks.
//!
//! ```text
//! e<seq u64 BE>   AuditEntry (JSON), with its keyed checkpoint (`mac`); hashes and
//!                 checkpoints base64url here (`encoding.rs`), hex in the API
//! b               Base (JSON): the last pruned entry (seq 0, zero hash before any pruning)
//! m               Meta (JSON): installation id, audit key id, first keyed seq
//! ```
//!
//! `verify.rs` walks the chain (`verify`, and against an exported anchor) and signs anchors.
//!
//! One writer: `append` and `prune` hold the writer lock from reading the chain head to the
//! fsync of the anchor, so entries form one chain whatever the number of callers (storage
//! rule 4 with a lock instead of a committer task: audit writes are rare and each must be
//! durable before its caller proceeds, so there is nothing to group).
//!
//! The anchor (latest seq and hash) is rewritten after every append. A chain that was cut at
//! its end is still a valid chain; the anchor is what shows that entries are missing. At open,
//! an anchor that does not match the store (missing, ahead of it, or naming another hash) is
//! logged and recorded as an `audit.anchor_mismatch` entry, so the evidence stays in the chain
//! even after the anchor moves on. An anchor one step behind the store is the crash window
//! between the sled commit and the anchor write, and is simply brought forward.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use posfleet_runtime::sledstore::{self, OpenError};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::encoding::{decode_entry, encode_entry, stored_hash, to_store};
use super::entry::{AuditEntry, Hash, ZERO_HASH};
use super::keyed::{AuditKey, AuditKeyError, MacDomain, Meta, new_installation};
use super::{AuditError, AuditRecord, AuditSink, Outcome};
use crate::controller::Clock;
use crate::views::AuditPage;

mod verify;

/// Default retention: 12 months (PCI DSS v4.0.1 10.5.1).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default and largest page of `query`.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
/// Entries one query examines at most (filters may skip many); beyond it the page ends early
/// with a cursor.
const MAX_SCAN: usize = 50_000;
/// Entries one prune batch removes at most.
const PRUNE_BATCH: usize = 10_000;
const BASE_KEY: &[u8] = b"b";
const META_KEY: &[u8] = b"m";
const ENTRY_PREFIX: u8 = b'e';
/// The action of the entry recorded when the anchor does not match the store at open.
const ANCHOR_MISMATCH: &str = "audit.anchor_mismatch";
/// The action of the entry recorded when the audit key is not the one that keyed the log.
const KEY_CHANGED: &str = "audit.key_changed";
/// The action of the entry recorded when the log's metadata is gone although its entries are
/// keyed (removed to make the log look older than keyed checkpoints): evidence, like an anchor
/// mismatch.
const META_MISSING: &str = "audit.meta_missing";

/// Why the audit store failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the audit store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("audit store {path}: {what} failed: {detail}")]
    Write {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("audit store {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(transparent)]
    Key(#[from] AuditKeyError),
}

/// Where and how the audit log is kept.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The sled directory (`DATA/audit`).
    pub dir: PathBuf,
    /// The anchor file (`DATA/audit.anchor`).
    pub anchor: PathBuf,
    /// The audit key (created at the first open): `audit.key` beside the anchor unless set,
    /// e.g. to keep it off the data directory's disk.
    pub key: PathBuf,
    /// sled page cache in bytes (storage rule 5).
    pub cache_capacity: u64,
    /// Entries older than this are pruned.
    pub retention: Duration,
}

impl AuditConfig {
    pub fn new(dir: PathBuf, anchor: PathBuf) -> Self {
        Self {
            dir,
            key: anchor.with_file_name("audit.key"),
            anchor,
            cache_capacity: 8 << 20,
            retention: DEFAULT_RETENTION,
        }
    }
}

/// The latest entry written: seq and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Anchor {
    seq: u64,
    hash: Hash,
}

/// The anchor file: the head, with its keyed checkpoint (absent in files written before
/// keyed checkpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AnchorFile {
    seq: u64,
    #[serde(with = "stored_hash")]
    hash: Hash,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

impl AnchorFile {
    fn anchor(&self) -> Anchor {
        Anchor {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

/// The last pruned entry; the chain continues from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Base {
    seq: u64,
    #[serde(with = "stored_hash")]
    hash: Hash,
    /// Keyed checkpoint (absent before any pruning of keyed entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

/// The head of the chain, owned by the single writer.
#[derive(Debug)]
struct Head {
    /// Seq and hash of the newest entry (or the base when there is none).
    last: Anchor,
    /// `at_ms` of the newest entry, so time never runs backwards along the chain.
    last_at_ms: u64,
}

/// Filters of a query (all optional, combined).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Exact actor.
    pub actor: Option<String>,
    /// Exact action, or an area (`command` matches `command.create`, `command.cancel`, ...).
    pub action: Option<String>,
    /// Exact target.
    pub target: Option<String>,
    /// `at_ms >= from`.
    pub from_ms: Option<u64>,
    /// `at_ms < to`.
    pub to_ms: Option<u64>,
    pub limit: usize,
}

impl AuditQuery {
    fn matches(&self, e: &AuditEntry) -> bool {
        self.actor.as_ref().is_none_or(|a| *a == e.actor)
            && self.target.as_ref().is_none_or(|t| *t == e.target)
            && self.action.as_ref().is_none_or(|a| {
                *a == e.action
                    || e.action
                        .strip_prefix(a.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            && self.from_ms.is_none_or(|f| e.at_ms >= f)
            && self.to_ms.is_none_or(|t| e.at_ms < t)
    }
}

/// The open audit log.
pub struct AuditLog {
    dir: PathBuf,
    anchor_path: PathBuf,
    key: AuditKey,
    /// Set at open (installation, key id, first keyed seq).
    meta: Meta,
    retention: Duration,
    clock: Clock,
    _db: sled::Db,
    tree: sled::Tree,
    head: Mutex<Head>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (creating) the log, loads (creating) the audit key and checks the anchor (module
    /// docs).
    pub fn open(cfg: AuditConfig, clock: Clock) -> Result<Self, AuditStoreError> {
        let (key, created) = AuditKey::load_or_create(&cfg.key)?;
        if created {
            info!(path = %cfg.key.display(), key_id = key.key_id(), "created the audit key; keep a copy offline, and export anchors with `posctl audit anchor export`");
        }
        let (db, tree) =
            sledstore::open_tree(&cfg.dir, cfg.cache_capacity, "audit").map_err(|e| match e {
                OpenError::Io { path, source } => AuditStoreError::Io { path, source },
                OpenError::Sled { path, source } => AuditStoreError::Open { path, source },
            })?;
        let mut log = Self {
            dir: cfg.dir,
            anchor_path: cfg.anchor,
            key,
            meta: Meta {
                installation: String::new(),
                key_id: String::new(),
                keyed_from: 1,
                mac: String::new(),
            },
            retention: cfg.retention,
            clock,
            _db: db,
            tree,
            head: Mutex::new(Head {
                last: Anchor {
                    seq: 0,
                    hash: ZERO_HASH,
                },
                last_at_ms: 0,
            }),
        };
        let head = log.load_head()?;
        let next = head.last.seq + 1;
        log.head = Mutex::new(head);
        let key_changed = log.load_meta(next)?;
        log.check_anchor_at_open()?;
        if let Some((action, detail)) = key_changed {
            let mut head = log.lock();
            log.append_locked(
                &mut head,
                AuditRecord {
                    actor: "controller".into(),
                    source: "local".into(),
                    action: action.into(),
                    target: "audit".into(),
                    outcome: Outcome::Failure,
                    detail,
                },
            )?;
        }
        Ok(log)
    }

    /// The audit key's id (safe to print).
    pub fn key_id(&self) -> &str {
        self.key.key_id()
    }

    /// Loads the metadata, or makes it: at the first open with an audit key, entries from
    /// `next` on are keyed. A key other than the one that keyed the log (lost, or replaced)
    /// keys entries from `next` on. Returns the action and detail of an entry to record: the
    /// key changed, or the metadata is gone although the entries are keyed.
    fn load_meta(&mut self, next: u64) -> Result<Option<(&'static str, String)>, AuditStoreError> {
        let stored: Option<Meta> = self
            .tree
            .get(META_KEY)
            .map_err(|e| self.write_err("read", e))?
            .map(|v| serde_json::from_slice(&v))
            .transpose()
            .map_err(|e| self.corrupt(format!("the metadata record is unreadable: {e}")))?;
        let (installation, changed) = match stored {
            Some(m) if m.key_id == self.key.key_id() => {
                self.meta = m;
                return Ok(None);
            }
            Some(m) => {
                error!(
                    old = %m.key_id,
                    new = self.key.key_id(),
                    "the audit key is not the one that keyed this audit log; entries from now on are keyed with the new one"
                );
                let detail = format!(
                    "the audit key changed from {} to {}; entries before {next} carry                      checkpoints of the old key; anchors exported before no longer apply",
                    m.key_id,
                    self.key.key_id()
                );
                (m.installation, Some((KEY_CHANGED, detail)))
            }
            None => {
                let newest = self.get(next - 1)?;
                let evidence = newest.filter(|e| !e.mac.is_empty()).map(|e| {
                    error!(seq = e.seq, "the audit log's metadata is missing but its entries are keyed; recording it");
                    (
                        META_MISSING,
                        format!(
                            "the audit log's metadata was missing although entry {} carries a \
                             keyed checkpoint: removed to hide a rebuilt chain? Verify against \
                             an exported anchor",
                            e.seq
                        ),
                    )
                });
                (new_installation(), evidence)
            }
        };
        let mut meta = Meta {
            installation,
            key_id: self.key.key_id().to_owned(),
            keyed_from: next,
            mac: String::new(),
        };
        meta.mac = to_store(&self.key.meta_mac(&meta));
        let value = serde_json::to_vec(&meta).map_err(|e| self.write_err("encode", e))?;
        self.tree
            .insert(META_KEY, value)
            .map_err(|e| self.write_err("insert", e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| self.write_err("fsync", e))?;
        self.meta = meta;
        Ok(changed)
    }

    /// How long entries are kept.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Appends `record` to the chain; returns once it (and the anchor) is durable.
    pub fn append(&self, record: AuditRecord) -> Result<AuditEntry, AuditStoreError> {
        let mut head = self.lock();
        self.append_locked(&mut head, record)
    }

    fn append_locked(
        &self,
        head: &mut Head,
        record: AuditRecord,
    ) -> Result<AuditEntry, AuditStoreError> {
        let seq = head.last.seq + 1;
        let at_ms = (self.clock)().max(head.last_at_ms);
        let mut entry = AuditEntry::new(seq, at_ms, record, &head.last.hash);
        let own = entry
            .own()
            .ok_or_else(|| self.corrupt(format!("entry {seq} has a malformed hash")))?;
        entry.mac = self
            .key
            .mac(MacDomain::Entry, &self.meta.installation, seq, &own);
        let value = encode_entry(&entry).map_err(|e| self.write_err("encode", e))?;
        self.tree
            .insert(entry_key(seq), value)
            .map_err(|e| self.write_err("insert", e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| self.write_err("fsync", e))?;
        let anchor = Anchor { seq, hash: own };
        head.last = anchor;
        head.last_at_ms = at_ms;
        self.write_anchor(&anchor)?;
        Ok(entry)
    }

    /// Removes entries older than the retention period (relative to `now_ms`), keeping the
    /// last removed entry's seq and hash as the new base so the chain still verifies. Returns
    /// how many were removed. The newest entry is never removed, so the anchor keeps a
    /// reference.
    pub fn prune(&self, now_ms: u64) -> Result<usize, AuditStoreError> {
        let retention_ms = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(retention_ms);
        let mut head = self.lock();
        let mut removed = 0;
        loop {
            let mut batch = sled::Batch::default();
            let mut new_base = None;
            let mut n = 0;
            for item in self.tree.scan_prefix([ENTRY_PREFIX]) {
                let (key, value) = item.map_err(|e| self.write_err("read", e))?;
                let entry: AuditEntry = decode_entry(&value)
                    .map_err(|e| self.corrupt(format!("entry {key:?} is unreadable: {e}")))?;
                if entry.at_ms >= cutoff || entry.seq >= head.last.seq || n >= PRUNE_BATCH {
                    break;
                }
                let hash = entry
                    .own()
                    .ok_or_else(|| self.corrupt(format!("entry {} has no hash", entry.seq)))?;
                batch.remove(key);
                new_base = Some(Base {
                    seq: entry.seq,
                    hash,
                    mac: Some(to_store(&self.key.mac(
                        MacDomain::Base,
                        &self.meta.installation,
                        entry.seq,
                        &hash,
                    ))),
                });
                n += 1;
            }
            let Some(base) = new_base else { break };
            let value = serde_json::to_vec(&base).map_err(|e| self.write_err("encode", e))?;
            batch.insert(BASE_KEY, value);
            self.tree
                .apply_batch(batch)
                .map_err(|e| self.write_err("prune", e))?;
            sledstore::make_durable(&self.tree, &self.dir)
                .map_err(|e| self.write_err("fsync", e))?;
            removed += n;
            if n < PRUNE_BATCH {
                break;
            }
        }
        if removed > 0 {
            info!(removed, "audit entries past retention pruned");
            self.append_locked(
                &mut head,
                AuditRecord {
                    actor: "controller".into(),
                    source: "local".into(),
                    action: "audit.prune".into(),
                    target: "audit".into(),
                    outcome: Outcome::Success,
                    detail: format!("removed {removed} entries older than {cutoff} ms"),
                },
            )?;
        }
        Ok(removed)
    }

    /// A page of entries matching `q`, newest first, starting below `before_seq`.
    pub fn query(
        &self,
        q: &AuditQuery,
        before_seq: Option<u64>,
    ) -> Result<AuditPage, AuditStoreError> {
        let end = entry_key(before_seq.unwrap_or(u64::MAX));
        let mut entries = Vec::new();
        let mut scanned = 0;
        let mut next_cursor = None;
        for item in self.tree.range(entry_key(0)..end).rev() {
            let (key, value) = item.map_err(|e| self.write_err("read", e))?;
            let Some(seq) = seq_of(&key) else { continue };
            if entries.len() >= q.limit || scanned >= MAX_SCAN {
                next_cursor = Some((seq + 1).to_string());
                break;
            }
            scanned += 1;
            let entry: AuditEntry = decode_entry(&value)
                .map_err(|e| self.corrupt(format!("entry {seq} is unreadable: {e}")))?;
            if q.matches(&entry) {
                entries.push(entry);
            }
        }
        Ok(AuditPage {
            entries,
            next_cursor,
        })
    }

    /// Up to `limit` entries after `after_seq`, oldest first (export).
    pub fn after(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>, AuditStoreError> {
        let mut out = Vec::new();
        let start = entry_key(after_seq.saturating_add(1));
        for item in self.tree.range(start..).take(limit) {
            let (key, value) = item.map_err(|e| self.write_err("read", e))?;
            if seq_of(&key).is_none() {
                break;
            }
            let entry: AuditEntry = decode_entry(&value)
                .map_err(|e| self.corrupt(format!("entry {key:?} is unreadable: {e}")))?;
            out.push(entry);
        }
        Ok(out)
    }

    /// The entry `seq`, if stored.
    pub fn get(&self, seq: u64) -> Result<Option<AuditEntry>, AuditStoreError> {
        let Some(value) = self
            .tree
            .get(entry_key(seq))
            .map_err(|e| self.write_err("read", e))?
        else {
            return Ok(None);
        };
        decode_entry(&value)
            .map(Some)
            .map_err(|e| self.corrupt(format!("entry {seq} is unreadable: {e}")))
    }

    /// The raw tree, for tests that tamper with it.
    #[cfg(test)]
    pub(crate) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn lock(&self) -> MutexGuard<'_, Head> {
        self.head.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn base(&self) -> Result<Base, AuditStoreError> {
        match self
            .tree
            .get(BASE_KEY)
            .map_err(|e| self.write_err("read", e))?
        {
            None => Ok(Base {
                seq: 0,
                hash: ZERO_HASH,
                mac: None,
            }),
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| self.corrupt(format!("the base record is unreadable: {e}"))),
        }
    }

    /// The head from the newest stored entry (or the base).
    fn load_head(&self) -> Result<Head, AuditStoreError> {
        let base = self.base()?;
        let last = self
            .tree
            .scan_prefix([ENTRY_PREFIX])
            .next_back()
            .transpose()
            .map_err(|e| self.write_err("read", e))?;
        match last {
            None => Ok(Head {
                last: Anchor {
                    seq: base.seq,
                    hash: base.hash,
                },
                last_at_ms: 0,
            }),
            Some((key, value)) => {
                let entry: AuditEntry = decode_entry(&value).map_err(|e| {
                    self.corrupt(format!("the newest entry {key:?} is unreadable: {e}"))
                })?;
                let hash = entry.own().ok_or_else(|| {
                    self.corrupt(format!("the newest entry {} has no hash", entry.seq))
                })?;
                Ok(Head {
                    last: Anchor {
                        seq: entry.seq,
                        hash,
                    },
                    last_at_ms: entry.at_ms,
                })
            }
        }
    }

    /// Module docs: a stale-by-one anchor is brought forward; any other mismatch is logged and
    /// recorded in the chain.
    fn check_anchor_at_open(&self) -> Result<(), AuditStoreError> {
        let mut head = self.lock();
        let base = self.base()?;
        let last = head.last;
        let anchor = self.read_anchor()?.map(|a| a.anchor());
        if anchor == Some(last) || (anchor.is_none() && last.seq == 0) {
            return Ok(());
        }
        if let Some(a) = anchor
            && a.seq + 1 == last.seq
            && self.get(a.seq)?.and_then(|e| e.own()) == Some(a.hash)
        {
            info!(
                seq = last.seq,
                "audit anchor brought forward after an interrupted append"
            );
            return self.write_anchor(&last);
        }
        let reason = match self.compare_anchor(&base, &last)? {
            Err((_, reason)) => reason,
            Ok(()) => "the anchor does not match the newest entry".to_owned(),
        };
        error!(%reason, "audit log: the anchor does not match the store; recording it");
        warn!("run `posctl audit verify` and compare with an exported copy of the audit log");
        self.append_locked(
            &mut head,
            AuditRecord {
                actor: "controller".into(),
                source: "local".into(),
                action: ANCHOR_MISMATCH.into(),
                target: "audit".into(),
                outcome: Outcome::Failure,
                detail: reason,
            },
        )?;
        Ok(())
    }

    fn read_anchor(&self) -> Result<Option<AnchorFile>, AuditStoreError> {
        match std::fs::read(&self.anchor_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                self.corrupt(format!(
                    "the anchor {} is unreadable: {e}",
                    self.anchor_path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AuditStoreError::Io {
                path: self.anchor_path.clone(),
                source,
            }),
        }
    }

    /// Writes the anchor with its keyed checkpoint atomically (0600, fsync, rename, fsync of
    /// the directory).
    fn write_anchor(&self, anchor: &Anchor) -> Result<(), AuditStoreError> {
        let file = AnchorFile {
            seq: anchor.seq,
            hash: anchor.hash,
            mac: Some(to_store(&self.key.mac(
                MacDomain::Head,
                &self.meta.installation,
                anchor.seq,
                &anchor.hash,
            ))),
        };
        let json = serde_json::to_string(&file).map_err(|e| self.write_err("encode", e))?;
        posfleet_proto::pki::write_secret_file(&self.anchor_path, &json)
            .map_err(|e| self.write_err("anchor write", e))?;
        if let Some(parent) = self.anchor_path.parent() {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|source| AuditStoreError::Io {
                    path: parent.to_owned(),
                    source,
                })?;
        }
        Ok(())
    }

    fn write_err(&self, what: &'static str, e: impl std::fmt::Display) -> AuditStoreError {
        AuditStoreError::Write {
            path: self.dir.clone(),
            what,
            detail: e.to_string(),
        }
    }

    fn corrupt(&self, detail: String) -> AuditStoreError {
        AuditStoreError::Corrupt {
            path: self.dir.clone(),
            detail,
        }
    }
}

impl AuditSink for AuditLog {
    fn record(&self, record: AuditRecord) -> Result<(), AuditError> {
        self.append(record).map(|_| ()).map_err(|e| {
            error!(error = %e, "audit record could not be stored");
            AuditError(e.to_string())
        })
    }
}

fn entry_key(seq: u64) -> [u8; 9] {
    let mut key = [0; 9];
    key[0] = ENTRY_PREFIX;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn seq_of(key: &[u8]) -> Option<u64> {
    match key {
        [ENTRY_PREFIX, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// `DATA/audit` and `DATA/audit.anchor` of a data directory root.
pub fn paths(root: &Path) -> (PathBuf, PathBuf) {
    (root.join("audit"), root.join("audit.anchor"))
}
