//! Live sessions by client id: one connection per identity, connect rate limits, and the
//! handle that lets the edge close a session from outside (takeover, revocation, shutdown).
//!
//! The edge resolves a takeover itself (the old connection is told to end and detaches from
//! the router before the new one attaches), so the router never sees two links with the same
//! client id. That avoids the router's own takeover path, which reuses connection ids under
//! the old link's feet (notes/rumqttd-router.md).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

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
    /// Completed when the connection has detached from the router.
    detached: Option<oneshot::Sender<()>>,
}

impl SessionSlot {
    /// Tells a waiting successor that this connection is gone from the router.
    pub(crate) fn detached(&mut self) {
        if let Some(tx) = self.detached.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.detached();
    }
}

struct Entry {
    generation: u64,
    cancel: CancellationToken,
    /// Resolves when the current holder has detached; taken by the successor.
    detached: Option<oneshot::Receiver<()>>,
}

#[derive(Default)]
struct State {
    live: HashMap<String, Entry>,
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
    /// of the same id and waits until it has detached from the router.
    pub(crate) async fn claim(&self, client_id: &str) -> Result<SessionSlot, ClaimError> {
        let now = Instant::now();
        let (slot, previous) = {
            let mut state = self.lock();
            if !self.admit(&mut state, client_id, now) {
                return Err(ClaimError::RateLimited);
            }
            state.next_generation += 1;
            let generation = state.next_generation;
            let cancel = CancellationToken::new();
            let (tx, rx) = oneshot::channel();
            let previous = state.live.insert(
                client_id.to_owned(),
                Entry {
                    generation,
                    cancel: cancel.clone(),
                    detached: Some(rx),
                },
            );
            let slot = SessionSlot {
                client_id: client_id.to_owned(),
                generation,
                cancel,
                detached: Some(tx),
            };
            (slot, previous)
        };
        if let Some(mut previous) = previous {
            previous.cancel.cancel();
            if let Some(rx) = previous.detached.take() {
                // Err means the previous holder dropped its slot: detached as well.
                if tokio::time::timeout(self.takeover_timeout, rx)
                    .await
                    .is_err()
                {
                    self.release(&slot);
                    return Err(ClaimError::TakeoverTimeout);
                }
            }
        }
        Ok(slot)
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
            detached: None,
        };
        sessions.release(&stale);
        assert_eq!(sessions.len(), 1);
        sessions.release(&second);
        assert_eq!(sessions.len(), 0);
        assert!(sessions.kick("nobody").eq(&false));
    }
}
