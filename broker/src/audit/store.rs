//! The audit store: one sled database (`DATA/audit`) used as `notes/storage.md` prescribes,
//! plus the anchor file (`DATA/audit.anchor`, 0600). Every function here blocks.
//!
//! ```text
//! e<seq u64 BE>   AuditEntry (JSON)
//! b               Base (JSON): the last pruned entry (seq 0, zero hash before any pruning)
//! ```
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

use posfleet_agent::sledstore::{self, OpenError};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::entry::{AuditEntry, Hash, ZERO_HASH, parse_hash};
use super::{AuditError, AuditRecord, AuditSink, Outcome};
use crate::controller::Clock;
use crate::views::{AuditPage, AuditVerifyView};

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
const ENTRY_PREFIX: u8 = b'e';
/// The action of the entry recorded when the anchor does not match the store at open.
const ANCHOR_MISMATCH: &str = "audit.anchor_mismatch";

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
}

/// Where and how the audit log is kept.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The sled directory (`DATA/audit`).
    pub dir: PathBuf,
    /// The anchor file (`DATA/audit.anchor`).
    pub anchor: PathBuf,
    /// sled page cache in bytes (storage rule 5).
    pub cache_capacity: u64,
    /// Entries older than this are pruned.
    pub retention: Duration,
}

impl AuditConfig {
    pub fn new(dir: PathBuf, anchor: PathBuf) -> Self {
        Self {
            dir,
            anchor,
            cache_capacity: 8 << 20,
            retention: DEFAULT_RETENTION,
        }
    }
}

/// The latest entry written: seq and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Anchor {
    seq: u64,
    #[serde(with = "hex_hash")]
    hash: Hash,
}

/// The last pruned entry; the chain continues from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Base {
    seq: u64,
    #[serde(with = "hex_hash")]
    hash: Hash,
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
    /// Opens (creating) the log and checks the anchor (module docs).
    pub fn open(cfg: AuditConfig, clock: Clock) -> Result<Self, AuditStoreError> {
        let (db, tree) =
            sledstore::open_tree(&cfg.dir, cfg.cache_capacity, "audit").map_err(|e| match e {
                OpenError::Io { path, source } => AuditStoreError::Io { path, source },
                OpenError::Sled { path, source } => AuditStoreError::Open { path, source },
            })?;
        let mut log = Self {
            dir: cfg.dir,
            anchor_path: cfg.anchor,
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
        log.head = Mutex::new(head);
        log.check_anchor_at_open()?;
        Ok(log)
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
        let entry = AuditEntry::new(seq, at_ms, record, &head.last.hash);
        let value = serde_json::to_vec(&entry).map_err(|e| self.write_err("encode", e))?;
        self.tree
            .insert(entry_key(seq), value)
            .map_err(|e| self.write_err("insert", e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| self.write_err("fsync", e))?;
        let hash = entry
            .own()
            .ok_or_else(|| self.corrupt(format!("entry {seq} has a malformed hash")))?;
        let anchor = Anchor { seq, hash };
        head.last = anchor;
        head.last_at_ms = at_ms;
        self.write_anchor(&anchor)?;
        Ok(entry)
    }

    /// Walks the chain from the base and compares its end with the anchor.
    pub fn verify(&self) -> Result<AuditVerifyView, AuditStoreError> {
        // Hold the writer lock so the chain and the anchor are read as one state.
        let _head = self.lock();
        let base = self.base()?;
        let mut report = AuditVerifyView {
            ok: true,
            entries: 0,
            first_seq: None,
            last_seq: None,
            first_bad_seq: None,
            reason: None,
        };
        let bad = |report: &mut AuditVerifyView, seq: u64, reason: String| {
            report.ok = false;
            report.first_bad_seq = Some(seq);
            report.reason = Some(reason);
        };
        let mut expected = base.seq + 1;
        let mut prev = base.hash;
        // The first anchor mismatch found at an open: the anchor has moved on since, so the
        // entry is the only evidence left that entries were cut off or the anchor replaced.
        let mut mismatch: Option<(u64, String)> = None;
        for item in self.tree.scan_prefix([ENTRY_PREFIX]) {
            let (key, value) = item.map_err(|e| self.write_err("read", e))?;
            let Some(seq) = seq_of(&key) else {
                bad(&mut report, expected, format!("unexpected key {key:?}"));
                return Ok(report);
            };
            if seq != expected {
                let why = if seq > expected {
                    format!("entry {expected} is missing (the next stored entry is {seq})")
                } else {
                    format!("entry {seq} is stored before the base")
                };
                bad(&mut report, expected.min(seq), why);
                return Ok(report);
            }
            let entry: AuditEntry = match serde_json::from_slice(&value) {
                Ok(e) => e,
                Err(e) => {
                    bad(&mut report, seq, format!("entry {seq} is unreadable: {e}"));
                    return Ok(report);
                }
            };
            if entry.seq != seq {
                bad(
                    &mut report,
                    seq,
                    format!(
                        "the entry stored as {seq} says it is {} (moved or reordered)",
                        entry.seq
                    ),
                );
                return Ok(report);
            }
            if entry.prev() != Some(prev) {
                bad(
                    &mut report,
                    seq,
                    format!("entry {seq}'s prev_hash is not the hash of the entry before it"),
                );
                return Ok(report);
            }
            let Some(own) = entry.own().filter(|h| *h == entry.compute_hash(&prev)) else {
                bad(
                    &mut report,
                    seq,
                    format!("entry {seq} does not match its hash (edited)"),
                );
                return Ok(report);
            };
            if entry.action == ANCHOR_MISMATCH && mismatch.is_none() {
                mismatch = Some((seq, entry.detail.clone()));
            }
            report.entries += 1;
            report.first_seq.get_or_insert(seq);
            report.last_seq = Some(seq);
            prev = own;
            expected += 1;
        }
        let last = Anchor {
            seq: expected - 1,
            hash: prev,
        };
        if let Err((seq, reason)) = self.compare_anchor(&base, &last)? {
            bad(&mut report, seq, reason);
        } else if let Some((seq, detail)) = mismatch {
            bad(
                &mut report,
                seq,
                format!(
                    "entry {seq} records that the anchor did not match the log at start-up \
                     ({detail}); compare with an exported copy"
                ),
            );
        }
        Ok(report)
    }

    /// Compares the anchor file with the end of the chain `last` (`Err((seq, reason))` on a
    /// mismatch; `Ok(Ok(()))` when they agree).
    #[allow(clippy::type_complexity)]
    fn compare_anchor(
        &self,
        base: &Base,
        last: &Anchor,
    ) -> Result<Result<(), (u64, String)>, AuditStoreError> {
        let Some(anchor) = self.read_anchor()? else {
            if last.seq == 0 {
                return Ok(Ok(()));
            }
            return Ok(Err((
                last.seq,
                format!("the anchor file {} is missing", self.anchor_path.display()),
            )));
        };
        if anchor.seq > last.seq {
            return Ok(Err((
                last.seq + 1,
                format!(
                    "the anchor names entry {} but the log ends at {} (entries removed from the end)",
                    anchor.seq, last.seq
                ),
            )));
        }
        let stored = if anchor.seq == last.seq {
            Some(last.hash)
        } else if anchor.seq == base.seq {
            Some(base.hash)
        } else {
            self.get(anchor.seq)?.and_then(|e| e.own())
        };
        if stored != Some(anchor.hash) {
            return Ok(Err((
                anchor.seq,
                format!(
                    "entry {} does not have the hash the anchor recorded",
                    anchor.seq
                ),
            )));
        }
        // Open brings a stale-by-one anchor (interrupted append) forward, and `verify` holds
        // the writer lock, so here the anchor must name the very last entry.
        if anchor.seq < last.seq {
            return Ok(Err((
                anchor.seq + 1,
                format!(
                    "the anchor names entry {} but the log continues to {}",
                    anchor.seq, last.seq
                ),
            )));
        }
        Ok(Ok(()))
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
                let entry: AuditEntry = serde_json::from_slice(&value)
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
            let entry: AuditEntry = serde_json::from_slice(&value)
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
            let entry: AuditEntry = serde_json::from_slice(&value)
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
        serde_json::from_slice(&value)
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
                let entry: AuditEntry = serde_json::from_slice(&value).map_err(|e| {
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
        let anchor = self.read_anchor()?;
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

    fn read_anchor(&self) -> Result<Option<Anchor>, AuditStoreError> {
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

    /// Writes the anchor atomically (0600, fsync, rename, fsync of the directory).
    fn write_anchor(&self, anchor: &Anchor) -> Result<(), AuditStoreError> {
        let json = serde_json::to_string(anchor).map_err(|e| self.write_err("encode", e))?;
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

/// A hash as 64 hex digits in JSON.
mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{Hash, parse_hash};

    pub(super) fn serialize<S: Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let s = String::deserialize(d)?;
        parse_hash(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// `DATA/audit` and `DATA/audit.anchor` of a data directory root.
pub fn paths(root: &Path) -> (PathBuf, PathBuf) {
    (root.join("audit"), root.join("audit.anchor"))
}
