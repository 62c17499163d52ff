//! Two-person approval (issue 6, item 4): a wipe, or a lock of more than a configured number
//! of terminals, is stored here as a pending approval instead of being issued. Another
//! principal (a different name) approves it, and only then are the commands created; or
//! rejects it. Pending approvals expire.
//!
//! The store is one sled database (`DATA/approvals`, through `posfleet_agent::sledstore`):
//! `a/<id>` → [`ApprovalView`] (JSON). One writer: every state change holds `lock` from the
//! read to the fsync, so two approvals of the same request cannot both pass. Every function
//! here blocks.
//!
//! Expiry is evaluated when read or decided (no sweeper): a pending approval past
//! `expires_at_ms` is shown as `expired` and cannot be decided.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use posfleet_agent::sledstore::{self, OpenError};

use crate::views::{ApprovalState, ApprovalView};

/// Default lifetime of a pending approval.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(3600);
/// Default: a lock of more than this many terminals at once needs a second admin.
pub const DEFAULT_LOCK_THRESHOLD: usize = 10;
/// Approvals one list returns at most (newest first).
const MAX_LIST: usize = 1000;

/// When a second principal must approve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalPolicy {
    /// `false`: nothing needs approval (`--two-person-approval off`, single-admin test
    /// setups).
    pub enabled: bool,
    /// A lock of more than this many terminals needs approval (a wipe always does).
    pub lock_threshold: usize,
    /// How long a pending approval may wait.
    pub ttl: Duration,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            lock_threshold: DEFAULT_LOCK_THRESHOLD,
            ttl: DEFAULT_APPROVAL_TTL,
        }
    }
}

impl ApprovalPolicy {
    /// Nothing needs approval.
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// True if a command of `kind` for `devices` terminals needs a second principal.
    pub fn requires(&self, kind: &str, devices: usize) -> bool {
        self.enabled && (kind == "wipe" || (kind == "lock" && devices > self.lock_threshold))
    }
}

/// Why the approval store failed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("approval store {path}: {detail}")]
    Store { path: PathBuf, detail: String },
}

/// Why an approval could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("no approval {0}")]
    Unknown(String),
    #[error("the requester cannot approve or reject their own request")]
    OwnRequest,
    #[error("approval {id} is already {state}")]
    Decided { id: String, state: &'static str },
    #[error("approval {0} expired")]
    Expired(String),
    #[error(transparent)]
    Store(#[from] ApprovalStoreError),
}

/// The open store.
#[derive(Debug)]
pub struct ApprovalStore {
    dir: PathBuf,
    _db: sled::Db,
    tree: sled::Tree,
    /// The single writer.
    lock: Mutex<()>,
}

impl ApprovalStore {
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, ApprovalStoreError> {
        let (db, tree) =
            sledstore::open_tree(dir, cache_capacity, "approvals").map_err(|e| match e {
                OpenError::Io { path, source } => ApprovalStoreError::Io { path, source },
                OpenError::Sled { path, source } => ApprovalStoreError::Store {
                    path,
                    detail: source.to_string(),
                },
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            _db: db,
            tree,
            lock: Mutex::new(()),
        })
    }

    /// Stores a new pending approval durably.
    pub fn create(&self, approval: &ApprovalView) -> Result<(), ApprovalStoreError> {
        let _w = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.put(approval)
    }

    /// The approval `id` as of `now_ms` (a pending one past its expiry reads as expired).
    pub fn get(&self, id: &str, now_ms: u64) -> Result<Option<ApprovalView>, ApprovalStoreError> {
        Ok(self.read(id)?.map(|a| a.seen_at(now_ms)))
    }

    /// Every approval, newest first (at most 1000), as of `now_ms`.
    pub fn list(&self, now_ms: u64) -> Result<Vec<ApprovalView>, ApprovalStoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"a/") {
            let (_, value) = item.map_err(|e| self.err(e))?;
            let a: ApprovalView = serde_json::from_slice(&value).map_err(|e| self.err(e))?;
            out.push(a.seen_at(now_ms));
        }
        out.sort_by_key(|a| std::cmp::Reverse(a.requested_at_ms));
        out.truncate(MAX_LIST);
        Ok(out)
    }

    /// Moves a pending approval to `to` (approved or rejected) by `by`, durably, and returns
    /// it. Exactly one concurrent caller can succeed.
    pub fn decide(
        &self,
        id: &str,
        by: &str,
        to: ApprovalState,
        now_ms: u64,
    ) -> Result<ApprovalView, DecideError> {
        let _w = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let a = self
            .read(id)?
            .ok_or_else(|| DecideError::Unknown(id.to_owned()))?
            .seen_at(now_ms);
        match a.state {
            ApprovalState::Pending => {}
            ApprovalState::Expired => return Err(DecideError::Expired(id.to_owned())),
            other => {
                return Err(DecideError::Decided {
                    id: id.to_owned(),
                    state: other.name(),
                });
            }
        }
        if a.requested_by == by {
            return Err(DecideError::OwnRequest);
        }
        let mut a = a;
        a.state = to;
        a.decided_by = Some(by.to_owned());
        a.decided_at_ms = Some(now_ms);
        self.put(&a)?;
        Ok(a)
    }

    /// Records the commands an approved request created (or, with `None`, returns a request
    /// whose commands could not be created to pending so it can be approved again).
    pub fn finish(
        &self,
        id: &str,
        commands: Option<Vec<String>>,
    ) -> Result<ApprovalView, ApprovalStoreError> {
        let _w = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut a = self.read(id)?.ok_or_else(|| ApprovalStoreError::Store {
            path: self.dir.clone(),
            detail: format!("approval {id} vanished"),
        })?;
        match commands {
            Some(ids) => a.commands = ids,
            None => {
                a.state = ApprovalState::Pending;
                a.decided_by = None;
                a.decided_at_ms = None;
            }
        }
        self.put(&a)?;
        Ok(a)
    }

    fn read(&self, id: &str) -> Result<Option<ApprovalView>, ApprovalStoreError> {
        match self.tree.get(key(id)).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| self.err(e)),
        }
    }

    fn put(&self, a: &ApprovalView) -> Result<(), ApprovalStoreError> {
        let value = serde_json::to_vec(a).map_err(|e| self.err(e))?;
        self.tree
            .insert(key(&a.id), value)
            .map_err(|e| self.err(e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| self.err(e))
    }

    fn err(&self, e: impl std::fmt::Display) -> ApprovalStoreError {
        ApprovalStoreError::Store {
            path: self.dir.clone(),
            detail: e.to_string(),
        }
    }
}

fn key(id: &str) -> Vec<u8> {
    let mut k = b"a/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

impl ApprovalView {
    /// This approval as seen at `now_ms`.
    fn seen_at(mut self, now_ms: u64) -> Self {
        if self.state == ApprovalState::Pending && now_ms >= self.expires_at_ms {
            self.state = ApprovalState::Expired;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval(id: &str, by: &str) -> ApprovalView {
        ApprovalView {
            id: id.into(),
            kind: "wipe".into(),
            requested_by: by.into(),
            requested_at_ms: 1_000,
            expires_at_ms: 2_000,
            state: ApprovalState::Pending,
            devices: vec!["T-1".into()],
            request: serde_json::json!({"kind": "wipe"}),
            decided_by: None,
            decided_at_ms: None,
            commands: vec![],
        }
    }

    #[test]
    fn policy_needs_approval_for_wipes_and_large_locks() {
        let p = ApprovalPolicy::default();
        assert!(p.requires("wipe", 1));
        assert!(!p.requires("lock", 10));
        assert!(p.requires("lock", 11));
        assert!(!p.requires("unlock", 100));
        assert!(!ApprovalPolicy::off().requires("wipe", 1));
    }

    #[test]
    fn decisions_are_single_and_never_by_the_requester() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ApprovalStore::open(&tmp.path().join("a"), 1 << 20).unwrap();
        store.create(&approval("x", "alice")).unwrap();
        assert!(matches!(
            store.decide("x", "alice", ApprovalState::Approved, 1_500),
            Err(DecideError::OwnRequest)
        ));
        let a = store
            .decide("x", "bob", ApprovalState::Approved, 1_500)
            .unwrap();
        assert_eq!(a.decided_by.as_deref(), Some("bob"));
        assert!(matches!(
            store.decide("x", "carol", ApprovalState::Approved, 1_500),
            Err(DecideError::Decided { .. })
        ));
        store.create(&approval("y", "alice")).unwrap();
        assert!(matches!(
            store.decide("y", "bob", ApprovalState::Approved, 2_000),
            Err(DecideError::Expired(_))
        ));
        assert_eq!(
            store.get("y", 2_000).unwrap().unwrap().state,
            ApprovalState::Expired
        );
        assert!(matches!(
            store.decide("z", "bob", ApprovalState::Approved, 0),
            Err(DecideError::Unknown(_))
        ));
    }
}
