//! Two-person approval (issue 6, item 4; issue 10, item 1): a wipe, or a lock that takes the
//! requesting party's locks within the rolling window over the threshold, is stored here as a
//! pending approval instead of being issued. A *different human account*, in a session whose
//! login verified a TOTP code, approves it, and only then are the commands created; or rejects
//! it. Pending approvals expire.
//!
//! Whose request it is (the *party*) is the account behind the principal: a session's
//! account, the account that made an API token, or `admin` for the bootstrap token and the
//! tokens made with it (`Principal::party`). Locks (including `lost` reports) issued without
//! approval are recorded per party in the lock ledger; locks created by an approval are not
//! (a second admin has seen them).
//!
//! The store is one sled database (`DATA/approvals`, through `posfleet_runtime::sledstore`):
//!
//! ```text
//! a/<id>                                  ApprovalView (JSON)
//! l/<party>\0<at_ms u64 BE><random u64>   terminals locked (u64 BE) without approval
//! ```
//!
//! One writer: every state change holds `lock` from the read to the fsync, so two approvals of
//! the same request cannot both pass, and two locks of one party cannot both slip under the
//! threshold. Every function here blocks.
//!
//! Expiry is evaluated when read or decided (no sweeper): a pending approval past
//! `expires_at_ms` is shown as `expired` and cannot be decided.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use posfleet_runtime::sledstore::{self, OpenError};

use crate::views::{ApprovalState, ApprovalView};

/// Default lifetime of a pending approval.
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(3600);
/// Default: locking more than this many terminals within the window needs a second admin.
pub const DEFAULT_LOCK_THRESHOLD: usize = 10;
/// Default rolling window in which one party's locks add up.
pub const DEFAULT_LOCK_WINDOW: Duration = Duration::from_secs(3600);
/// Approvals one list returns at most (newest first).
const MAX_LIST: usize = 1000;

/// When a second principal must approve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalPolicy {
    /// `false`: nothing needs approval (`--two-person-approval off`, single-admin test
    /// setups).
    pub enabled: bool,
    /// Locks of more than this many terminals by one party within `lock_window` need
    /// approval (a wipe always does).
    pub lock_threshold: usize,
    /// The rolling window in which one party's locks add up.
    pub lock_window: Duration,
    /// How long a pending approval may wait.
    pub ttl: Duration,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            lock_threshold: DEFAULT_LOCK_THRESHOLD,
            lock_window: DEFAULT_LOCK_WINDOW,
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

    /// True if a command of `kind` always needs a second admin (a wipe).
    pub fn always(&self, kind: &str) -> bool {
        self.enabled && kind == "wipe"
    }

    /// True if locks count against the party's window (the lock ledger is consulted).
    pub fn counts_locks(&self) -> bool {
        self.enabled
    }

    fn window_ms(&self) -> u64 {
        u64::try_from(self.lock_window.as_millis()).unwrap_or(u64::MAX)
    }
}

/// The answer of [`ApprovalStore::reserve_locks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockBudget {
    /// Recorded: issue the lock; if its commands cannot be created, [`ApprovalStore::release`]
    /// the reservation.
    Reserved(LockReservation),
    /// The party's locks within the window (`used` terminals) plus this one exceed the
    /// threshold: it needs approval.
    Exceeded { used: u64 },
}

/// A lock recorded in the ledger (its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockReservation(Vec<u8>);

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
    #[error("the requester's account cannot approve or reject its own request")]
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

    /// Moves a pending approval to `to` (approved or rejected) by the human account `by`,
    /// durably, and returns it. Refused if `by` is the requesting party. Exactly one
    /// concurrent caller can succeed.
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
        if a.party() == by {
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

    /// Records a lock of `devices` terminals by `party` at `now_ms` if the party's locks within
    /// the policy's window stay at or under the threshold; else says how many it used.
    /// Entries older than the window are removed in the same write.
    pub fn reserve_locks(
        &self,
        party: &str,
        devices: usize,
        now_ms: u64,
        policy: &ApprovalPolicy,
    ) -> Result<LockBudget, ApprovalStoreError> {
        let _w = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let window = policy.window_ms();
        let mut prefix = b"l/".to_vec();
        prefix.extend_from_slice(party.as_bytes());
        prefix.push(0);
        let mut batch = sled::Batch::default();
        let mut expired = 0usize;
        let mut used = 0u64;
        for item in self.tree.scan_prefix(&prefix) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let at = k
                .get(prefix.len()..prefix.len() + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            if now_ms.saturating_sub(at) >= window {
                batch.remove(k);
                expired += 1;
                continue;
            }
            used += v.as_ref().try_into().map_or(0, u64::from_be_bytes);
        }
        let devices = devices as u64;
        if used + devices > policy.lock_threshold as u64 {
            if expired > 0 {
                self.tree.apply_batch(batch).map_err(|e| self.err(e))?;
            }
            return Ok(LockBudget::Exceeded { used });
        }
        let mut key = prefix;
        key.extend_from_slice(&now_ms.to_be_bytes());
        key.extend_from_slice(&rand::random::<u64>().to_be_bytes());
        batch.insert(key.clone(), devices.to_be_bytes().to_vec());
        self.tree.apply_batch(batch).map_err(|e| self.err(e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| self.err(e))?;
        Ok(LockBudget::Reserved(LockReservation(key)))
    }

    /// Removes a reservation whose commands could not be created.
    pub fn release(&self, reservation: &LockReservation) -> Result<(), ApprovalStoreError> {
        let _w = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.tree.remove(&reservation.0).map_err(|e| self.err(e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| self.err(e))
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
    /// Whose request it is: the recorded party, or (records from before parties were
    /// recorded) the requesting principal's name.
    fn party(&self) -> &str {
        if self.requested_for.is_empty() {
            &self.requested_by
        } else {
            &self.requested_for
        }
    }

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
            requested_for: by.into(),
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
    fn policy_needs_approval_for_wipes() {
        let p = ApprovalPolicy::default();
        assert!(p.always("wipe"));
        assert!(!p.always("lock"));
        assert!(!ApprovalPolicy::off().always("wipe"));
        assert!(!ApprovalPolicy::off().counts_locks());
    }

    #[test]
    fn locks_add_up_per_party_within_the_window() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a");
        let p = ApprovalPolicy::default();
        let hour = 3_600_000;
        {
            let store = ApprovalStore::open(&dir, 1 << 20).unwrap();
            for i in 0..10 {
                let r = store.reserve_locks("ada", 1, 1_000 + i, &p).unwrap();
                assert!(matches!(r, LockBudget::Reserved(_)), "lock {i}");
            }
            assert_eq!(
                store.reserve_locks("ada", 1, 2_000, &p).unwrap(),
                LockBudget::Exceeded { used: 10 }
            );
            assert!(matches!(
                store.reserve_locks("bob", 10, 2_000, &p).unwrap(),
                LockBudget::Reserved(_)
            ));
            assert_eq!(
                store.reserve_locks("bob", 1, 2_000, &p).unwrap(),
                LockBudget::Exceeded { used: 10 }
            );
        }
        // Durable: a restart does not reset the window.
        let store = ApprovalStore::open(&dir, 1 << 20).unwrap();
        assert_eq!(
            store.reserve_locks("ada", 1, 1_000 + hour - 1, &p).unwrap(),
            LockBudget::Exceeded { used: 10 }
        );
        // The first lock (at 1000) ages out at 1000 + window.
        let LockBudget::Reserved(r) = store.reserve_locks("ada", 1, 1_000 + hour, &p).unwrap()
        else {
            panic!("the window did not move on");
        };
        // A released reservation does not count.
        store.release(&r).unwrap();
        assert!(matches!(
            store.reserve_locks("ada", 1, 1_000 + hour, &p).unwrap(),
            LockBudget::Reserved(_)
        ));
        // One request larger than the threshold needs approval on its own.
        assert!(matches!(
            store.reserve_locks("carl", 11, 0, &p).unwrap(),
            LockBudget::Exceeded { used: 0 }
        ));
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
