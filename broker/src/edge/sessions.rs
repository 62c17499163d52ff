//! Live sessions by client id: one connection per identity, connect rate limits, and the
//! handle that lets the edge close a session from outside (takeover, revocation, shutdown).
//!
//! The edge resolves a takeover itself (the old connection is told to end and detaches from
//! the router before the new one attaches), so the router never sees two links with the same
//! client id. That avoids the router's own takeover path, which reuses connection ids under
//! the old link's feet (docs/rumqtt.md). A per-client-id lock, held from claim until
//! the connection detached, makes that hold even when a takeover gives up waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

/// Held by the one connection of a client id that may be attached to the router.
type AttachLock = tokio::sync::Mutex<()>;

/// Connect rate limit per client id.
#[derive(Debug, Clone, Copy)]
pub struct ConnectRateLimit {
    /// At most `max_connects` accepted connects...
    pub max_connects: usize,
    /// ...within this sliding window.
    pub window: Duration,
}

impl Default for ConnectRateLimit {
    fn default() -> Self {
        Self {
            max_connects: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// A claimed session slot; dropping it without `release` still frees the slot.
#[derive(Debug)]
pub(crate) struct SessionSlot {
    pub(crate) client_id: String,
    pub(crate) generation: u64,
    /// Cancelled when the session must end (takeover, revocation).
    pub(crate) cancel: CancellationToken,
    /// The client id's attach lock, released once the connection detached from the router
    /// (or when the slot is dropped).
    attached: Option<OwnedMutexGuard<()>>,
}

impl SessionSlot {
    /// Lets a waiting successor attach: this connection is gone from the router.
    pub(crate) fn detached(&mut self) {
        self.attached = None;
    }
}

struct Entry {
    generation: u64,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    live: HashMap<String, Entry>,
    /// Attach lock per client id, alive while a connection holds or waits for it.
    locks: HashMap<String, Weak<AttachLock>>,
    connects: HashMap<String, VecDeque<Instant>>,
    next_generation: u64,
}

/// Registry of live sessions.
pub(crate) struct Sessions {
    state: Mutex<State>,
    limit: ConnectRateLimit,
    /// Longest wait for a previous session of the same identity to detach.
    takeover_timeout: Duration,
}

/// Why a session slot could not be claimed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ClaimError {
    RateLimited,
    TakeoverTimeout,
}

/// Entries of the rate-limit table before idle ones are purged.
const RATE_TABLE_PURGE_AT: usize = 50_000;

impl Sessions {
    pub(crate) fn new(limit: ConnectRateLimit) -> Self {
        Self {
            state: Mutex::new(State::default()),
            limit,
            takeover_timeout: Duration::from_secs(5),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims the slot of `client_id`: applies the connect rate limit, ends a live session
    /// of the same id and waits until no connection of that id is attached to the router.
    pub(crate) async fn claim(&self, client_id: &str) -> Result<SessionSlot, ClaimError> {
        let now = Instant::now();
        let (generation, cancel, lock, previous) = {
            let mut state = self.lock();
            if !self.admit(&mut state, client_id, now) {
                return Err(ClaimError::RateLimited);
            }
            state.next_generation += 1;
            let generation = state.next_generation;
            let cancel = CancellationToken::new();
            let previous = state.live.insert(
                client_id.to_owned(),
                Entry {
                    generation,
                    cancel: cancel.clone(),
                },
            );
            if state.locks.len() >= RATE_TABLE_PURGE_AT {
                state.locks.retain(|_, lock| lock.strong_count() > 0);
            }
            let lock = match state.locks.get(client_id).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(AttachLock::new(()));
                    state
                        .locks
                        .insert(client_id.to_owned(), Arc::downgrade(&lock));
                    lock
                }
            };
            (generation, cancel, lock, previous)
        };
        if let Some(previous) = previous {
            previous.cancel.cancel();
        }
        let slot = SessionSlot {
            client_id: client_id.to_owned(),
            generation,
            cancel,
            attached: None,
        };
        match tokio::time::timeout(self.takeover_timeout, lock.lock_owned()).await {
            Ok(guard) => Ok(SessionSlot {
                attached: Some(guard),
                ..slot
            }),
            Err(_) => {
                // Whoever holds the lock keeps it: a later claim still waits for it.
                self.release(&slot);
                Err(ClaimError::TakeoverTimeout)
            }
        }
    }

    /// Sliding-window rate limit per client id.
    fn admit(&self, state: &mut State, client_id: &str, now: Instant) -> bool {
        if state.connects.len() >= RATE_TABLE_PURGE_AT {
            let window = self.limit.window;
            state
                .connects
                .retain(|_, times| times.back().is_some_and(|t| now - *t < window));
        }
        let times = state.connects.entry(client_id.to_owned()).or_default();
        while times.front().is_some_and(|t| now - *t >= self.limit.window) {
            times.pop_front();
        }
        if times.len() >= self.limit.max_connects {
            return false;
        }
        times.push_back(now);
        true
    }

    /// Frees the slot if it is still the current one for its client id.
    pub(crate) fn release(&self, slot: &SessionSlot) {
        let mut state = self.lock();
        if state
            .live
            .get(&slot.client_id)
            .is_some_and(|e| e.generation == slot.generation)
        {
            state.live.remove(&slot.client_id);
        }
        if state
            .locks
            .get(&slot.client_id)
            .is_some_and(|lock| lock.strong_count() == 0)
        {
            state.locks.remove(&slot.client_id);
        }
    }

    /// Ends the live session of `client_id`, if any (revocation, admin action).
    pub(crate) fn kick(&self, client_id: &str) -> bool {
        let state = self.lock();
        match state.live.get(client_id) {
            Some(entry) => {
                entry.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Number of live sessions.
    pub(crate) fn len(&self) -> usize {
        self.lock().live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rate_limit_applies_per_client_id() {
        let sessions = Sessions::new(ConnectRateLimit {
            max_connects: 2,
            window: Duration::from_secs(60),
        });
        for _ in 0..2 {
            let slot = sessions.claim("a").await.unwrap();
            sessions.release(&slot);
        }
        assert_eq!(
            sessions.claim("a").await.unwrap_err(),
            ClaimError::RateLimited
        );
        assert!(sessions.claim("b").await.is_ok());
    }

    #[tokio::test]
    async fn takeover_ends_the_previous_session_first() {
        let sessions = std::sync::Arc::new(Sessions::new(ConnectRateLimit::default()));
        let mut first = sessions.claim("dev").await.unwrap();
        let cancel = first.cancel.clone();
        let waiter = {
            let sessions = sessions.clone();
            tokio::spawn(async move { sessions.claim("dev").await.map(|s| s.generation) })
        };
        tokio::time::timeout(Duration::from_secs(5), cancel.cancelled())
            .await
            .expect("previous session told to end");
        assert!(!waiter.is_finished());
        first.detached();
        sessions.release(&first);
        let generation = waiter.await.unwrap().unwrap();
        assert!(generation > first.generation);
        assert_eq!(sessions.len(), 1);
    }

    #[tokio::test]
    async fn stale_release_keeps_the_successor() {
        let sessions = Sessions::new(ConnectRateLimit::default());
        let mut first = sessions.claim("dev").await.unwrap();
        first.detached();
        let second = sessions.claim("dev").await.unwrap();
        let stale = SessionSlot {
            client_id: "dev".into(),
            generation: 1,
            cancel: CancellationToken::new(),
            attached: None,
        };
        sessions.release(&stale);
        assert_eq!(sessions.len(), 1);
        sessions.release(&second);
        assert_eq!(sessions.len(), 0);
        assert!(sessions.kick("nobody").eq(&false));
    }

    /// A claim that gives up waiting (takeover timeout) must not let anyone else attach while
    /// the connection it was waiting for is still attached: the router would then see two
    /// links for one client id and run its own takeover (docs/rumqtt.md).
    #[tokio::test(start_paused = true)]
    async fn a_takeover_that_gives_up_lets_nobody_in_early() {
        let mut sessions = Sessions::new(ConnectRateLimit::default());
        sessions.takeover_timeout = Duration::from_secs(1);
        let sessions = std::sync::Arc::new(sessions);
        let claim = |sessions: &std::sync::Arc<Sessions>| {
            let sessions = sessions.clone();
            tokio::spawn(async move { sessions.claim("dev").await.map(|s| s.generation) })
        };
        // A is attached and does not detach in time.
        let mut a = sessions.claim("dev").await.unwrap();

        // B waits for A; C arrives while B waits. B gives up: C must not attach.
        let b = claim(&sessions);
        tokio::task::yield_now().await;
        let c = claim(&sessions);
        assert_eq!(b.await.unwrap(), Err(ClaimError::TakeoverTimeout));
        let c = c.await.unwrap();
        assert!(c.is_err(), "attached while A still is: {c:?}");

        // D arrives after everyone gave up: it must still wait for A.
        let d = claim(&sessions);
        tokio::task::yield_now().await;
        assert!(!d.is_finished());
        a.detached();
        sessions.release(&a);
        assert!(d.await.unwrap().is_ok(), "attaches once A detached");
    }
}
