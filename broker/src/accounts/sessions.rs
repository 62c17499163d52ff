//! Login sessions, held in memory by the SHA-256 of their token (the token itself is only
//! ever with the client). A restart of the controller ends every session (ADR 0009). Bounded:
//! at most [`MAX_SESSIONS`] in all and [`MAX_SESSIONS_PER_USER`] per account; the least
//! recently used one makes room.

use std::collections::HashMap;

use super::Role;
use super::policy::{SESSION_IDLE_MS, SESSION_MAX_MS};

/// Sessions held at most.
pub const MAX_SESSIONS: usize = 4096;
/// Sessions one account holds at most.
pub const MAX_SESSIONS_PER_USER: usize = 8;

/// One login session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    pub role: Role,
    pub created_ms: u64,
    pub last_seen_ms: u64,
    /// May only change its password, enrol MFA and log out (first login, reset, expiry,
    /// admin without MFA).
    pub restricted: bool,
    /// The login verified a TOTP code.
    pub mfa: bool,
}

impl Session {
    fn expired(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_seen_ms) >= SESSION_IDLE_MS
            || now_ms.saturating_sub(self.created_ms) >= SESSION_MAX_MS
    }
}

/// Every live session.
#[derive(Debug, Default)]
pub struct Sessions {
    by_digest: HashMap<[u8; 32], Session>,
}

impl Sessions {
    /// Adds a session, making room if needed.
    pub fn insert(&mut self, digest: [u8; 32], session: Session, now_ms: u64) {
        self.by_digest.retain(|_, s| !s.expired(now_ms));
        let user = session.user.clone();
        while self.by_digest.values().filter(|s| s.user == user).count() >= MAX_SESSIONS_PER_USER {
            self.evict_oldest(|s| s.user == user);
        }
        while self.by_digest.len() >= MAX_SESSIONS {
            self.evict_oldest(|_| true);
        }
        self.by_digest.insert(digest, session);
    }

    /// The session of `digest` if it is still valid, marking it used now; an expired one is
    /// removed.
    pub fn touch(&mut self, digest: &[u8; 32], now_ms: u64) -> Option<Session> {
        let session = self.by_digest.get_mut(digest)?;
        if session.expired(now_ms) {
            self.by_digest.remove(digest);
            return None;
        }
        session.last_seen_ms = now_ms;
        Some(session.clone())
    }

    pub fn remove(&mut self, digest: &[u8; 32]) -> Option<Session> {
        self.by_digest.remove(digest)
    }

    /// Ends every session of `user`; returns how many.
    pub fn end_user(&mut self, user: &str) -> usize {
        let before = self.by_digest.len();
        self.by_digest.retain(|_, s| s.user != user);
        before - self.by_digest.len()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    fn evict_oldest(&mut self, matches: impl Fn(&Session) -> bool) {
        let oldest = self
            .by_digest
            .iter()
            .filter(|(_, s)| matches(s))
            .min_by_key(|(_, s)| s.last_seen_ms)
            .map(|(d, _)| *d);
        if let Some(digest) = oldest {
            self.by_digest.remove(&digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, at: u64) -> Session {
        Session {
            user: user.into(),
            role: Role::Viewer,
            created_ms: at,
            last_seen_ms: at,
            restricted: false,
            mfa: false,
        }
    }

    #[test]
    fn idle_and_absolute_timeouts() {
        let mut s = Sessions::default();
        s.insert([1; 32], session("a", 0), 0);
        // Activity keeps it alive...
        let mut now = 0;
        while now + SESSION_IDLE_MS - 1 < SESSION_MAX_MS {
            now += SESSION_IDLE_MS - 1;
            assert!(s.touch(&[1; 32], now).is_some(), "at {now}");
        }
        // ...but not past the absolute limit.
        assert!(s.touch(&[1; 32], SESSION_MAX_MS).is_none());
        assert_eq!(s.len(), 0);
        s.insert([2; 32], session("a", 0), 0);
        assert!(s.touch(&[2; 32], SESSION_IDLE_MS - 1).is_some());
        assert!(s.touch(&[2; 32], 2 * SESSION_IDLE_MS - 1).is_none());
    }

    #[test]
    fn bounded_per_user() {
        let mut s = Sessions::default();
        for i in 0..(MAX_SESSIONS_PER_USER as u8 + 2) {
            s.insert([i; 32], session("a", u64::from(i)), u64::from(i));
        }
        assert_eq!(s.len(), MAX_SESSIONS_PER_USER);
        assert!(s.touch(&[0; 32], 20).is_none(), "the oldest made room");
        s.insert([99; 32], session("b", 20), 20);
        assert_eq!(s.end_user("a"), MAX_SESSIONS_PER_USER);
        assert_eq!(s.len(), 1);
    }
}
