//! Login throttling (issue 10, items 4 and 5; ADR 0009 has the design and its PCI DSS 8.3.4
//! reading). Every counter is kept per client *source*: an IPv4 address, or the /64 of an IPv6
//! address (one host usually holds a whole /64).
//!
//! - **Admission** ([`LoginThrottle::admit`], before any hashing): a source with
//!   [`SOURCE_MAX_FAILURES`] failed logins within [`SOURCE_WINDOW`] (across all names) is
//!   refused (429) until its oldest failure ages out; beyond [`LOGIN_QUEUE`] logins waiting
//!   for the hasher in all, or [`MAX_IN_FLIGHT_PER_SOURCE`] from one source, a login is
//!   refused (503). Both carry a Retry-After. An admitted login holds a [`Ticket`].
//! - **Lockout** per (name, source): [`MAX_FAILED_ATTEMPTS`] failures lock the name out *from
//!   that source* for [`LOCKOUT_MS`]; other sources are not affected. Names are counted
//!   whether or not the account exists (no difference to observe).
//! - **Backstop** per account: [`ACCOUNT_MAX_FAILURES`] failures from any sources within
//!   [`LOCKOUT_MS`] lock the account everywhere for [`LOCKOUT_MS`] (a distributed guesser,
//!   which needs at least 10 sources for it).
//!
//! Failure counts are in memory (bounded tables, `crate::limit`); the lockouts themselves are
//! made durable by the account service and restored at start.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::hasher;
use super::policy::{LOCKOUT_MS, MAX_FAILED_ATTEMPTS};
use crate::controller::Clock;
use crate::limit::FailureLimit;

/// Failed logins from one source (any names) within [`SOURCE_WINDOW`] before it is refused.
pub const SOURCE_MAX_FAILURES: usize = 30;
/// The window of [`SOURCE_MAX_FAILURES`].
pub const SOURCE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Failures of one account from any sources within [`LOCKOUT_MS`] that lock it everywhere.
pub const ACCOUNT_MAX_FAILURES: usize = 100;
/// Logins admitted beyond the ones hashing ([`hasher::SLOTS`]).
pub const LOGIN_QUEUE: usize = 16;
/// Logins of one source admitted at once at most.
pub const MAX_IN_FLIGHT_PER_SOURCE: usize = 4;
/// Retry-After of a refusal for lack of room.
const BUSY_RETRY_S: u64 = 1;
/// (name, source) pairs and sources tracked before the oldest are evicted.
const TABLE_CAPACITY: usize = 20_000;
/// Accounts tracked by the backstop (only existing accounts are).
const ACCOUNT_CAPACITY: usize = 4_096;

/// Where a login comes from, as throttled: IPv4 (also IPv4-mapped IPv6) as is, IPv6 by /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Self(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => write!(f, "{ip}"),
            IpAddr::V6(ip) => write!(f, "{ip}/64"),
        }
    }
}

impl std::str::FromStr for Source {
    type Err = std::net::AddrParseError;

    /// Parses what `Display` wrote.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ip = s.strip_suffix("/64").unwrap_or(s).parse::<IpAddr>()?;
        Ok(Self::of(ip))
    }
}

/// Why a login was not admitted (nothing about any account: only the source and the load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many failures from this source: 429.
    Throttled { retry_after_s: u64 },
    /// No room to hash now: 503.
    Busy { retry_after_s: u64 },
}

/// An admitted login: a place in the bounded queue and in its source's share of it.
#[derive(Debug)]
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
    source: Source,
    in_flight: Arc<Mutex<HashMap<Source, usize>>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

/// What a failed login locked (if anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewLockout {
    /// The name, from this source, until the given time (ms).
    Source(u64),
    /// The account, from everywhere, until the given time (ms).
    Account(u64),
}

/// The counters (module docs).
pub struct LoginThrottle {
    sources: FailureLimit<Source>,
    pairs: FailureLimit<(String, Source)>,
    accounts: FailureLimit<String>,
    queue: Arc<Semaphore>,
    in_flight: Arc<Mutex<HashMap<Source, usize>>>,
    clock: Clock,
}

impl std::fmt::Debug for LoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginThrottle").finish_non_exhaustive()
    }
}

impl LoginThrottle {
    pub fn new(clock: Clock) -> Self {
        let lockout = Duration::from_millis(LOCKOUT_MS);
        Self {
            sources: FailureLimit::with_clock(SOURCE_MAX_FAILURES, SOURCE_WINDOW, clock.clone())
                .with_capacity(TABLE_CAPACITY),
            pairs: FailureLimit::with_clock(MAX_FAILED_ATTEMPTS as usize, lockout, clock.clone())
                .with_lockout(lockout)
                .with_capacity(TABLE_CAPACITY),
            accounts: FailureLimit::with_clock(ACCOUNT_MAX_FAILURES, lockout, clock.clone())
                .with_lockout(lockout)
                .with_capacity(ACCOUNT_CAPACITY),
            queue: Arc::new(Semaphore::new(hasher::SLOTS + LOGIN_QUEUE)),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            clock,
        }
    }

    /// Admits a login from `ip` (module docs), before any hashing.
    pub fn admit(&self, ip: IpAddr) -> Result<Ticket, Refused> {
        let source = Source::of(ip);
        if let Some(ms) = self.sources.refused_for(&source) {
            return Err(Refused::Throttled {
                retry_after_s: ms.div_ceil(1000).max(1),
            });
        }
        let busy = Refused::Busy {
            retry_after_s: BUSY_RETRY_S,
        };
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map
            .get(&source)
            .is_some_and(|n| *n >= MAX_IN_FLIGHT_PER_SOURCE)
        {
            return Err(busy);
        }
        let permit = Arc::clone(&self.queue)
            .try_acquire_owned()
            .map_err(|_| busy)?;
        *map.entry(source).or_insert(0) += 1;
        Ok(Ticket {
            _permit: permit,
            source,
            in_flight: Arc::clone(&self.in_flight),
        })
    }

    /// True if `name` may not log in from `source` now (either lockout).
    pub fn locked(&self, name: &str, source: Source) -> bool {
        !self.pairs.admit(&(name.to_owned(), source)) || !self.accounts.admit(&name.to_owned())
    }

    /// Counts a failed login of `name` from `source` (`existing`: the account exists, so the
    /// backstop counts it too); returns a lockout it caused.
    pub fn failed(&self, name: &str, source: Source, existing: bool) -> Option<NewLockout> {
        self.sources.failed(&source);
        let now = (self.clock)();
        let until = now.saturating_add(LOCKOUT_MS);
        let pair = self.pairs.failed(&(name.to_owned(), source));
        let account = existing && self.accounts.failed(&name.to_owned());
        if account {
            Some(NewLockout::Account(until))
        } else if pair {
            Some(NewLockout::Source(until))
        } else {
            None
        }
    }

    /// Counts a failure against the account only (a wrong current password in a session).
    pub fn failed_account(&self, name: &str) -> Option<NewLockout> {
        let until = (self.clock)().saturating_add(LOCKOUT_MS);
        self.accounts
            .failed(&name.to_owned())
            .then_some(NewLockout::Account(until))
    }

    /// A successful login: the name's failures from that source are forgotten (8.3.4 counts
    /// consecutive failures). The source's own count stays.
    pub fn succeeded(&self, name: &str, source: Source) {
        self.pairs.forget(|(n, s)| n == name && *s == source);
    }

    /// Lifts every lockout and count of `name` (an admin's reset, enable or unlock).
    pub fn unlock(&self, name: &str) {
        self.pairs.forget(|(n, _)| n == name);
        self.accounts.forget(|n| n == name);
    }

    /// Restores a lockout of `name` from `source` until `until_ms` (from the store, at start).
    pub fn restore(&self, name: &str, source: Source, until_ms: u64) {
        self.pairs.lock_until((name.to_owned(), source), until_ms);
    }

    /// The sources `name` is locked out from now, with the end of each lockout.
    pub fn locked_sources(&self, name: &str) -> Vec<(Source, u64)> {
        self.pairs
            .lockouts()
            .into_iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, s), until)| (s, until))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn throttle() -> (Arc<AtomicU64>, LoginThrottle) {
        let now = Arc::new(AtomicU64::new(1_000_000));
        let c = Arc::clone(&now);
        (
            now,
            LoginThrottle::new(Arc::new(move || c.load(Ordering::SeqCst))),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_group_ipv6_by_prefix() {
        assert_eq!(
            Source::of(ip("2001:db8::1")),
            Source::of(ip("2001:db8::ffff:2"))
        );
        assert_ne!(Source::of(ip("2001:db8::1")), Source::of(ip("2001:db9::1")));
        assert_eq!(
            Source::of(ip("::ffff:10.0.0.1")),
            Source::of(ip("10.0.0.1"))
        );
        for s in ["10.0.0.1", "2001:db8::/64"] {
            let parsed: Source = s.parse().unwrap();
            assert_eq!(parsed.to_string(), s);
        }
    }

    #[test]
    fn lockouts_are_per_source_and_the_backstop_needs_many_sources() {
        let (now, t) = throttle();
        let a = Source::of(ip("10.0.0.1"));
        for i in 1..=MAX_FAILED_ATTEMPTS {
            let locked = t.failed("bob", a, true);
            assert_eq!(locked.is_some(), i == MAX_FAILED_ATTEMPTS, "failure {i}");
        }
        assert!(t.locked("bob", a));
        assert!(!t.locked("bob", Source::of(ip("10.0.0.2"))));
        assert!(!t.locked("alice", a));
        // Ten sources of ten failures each lock the account everywhere.
        for s in 2..=10 {
            let src = Source::of(ip(&format!("10.0.0.{s}")));
            for _ in 0..MAX_FAILED_ATTEMPTS {
                t.failed("bob", src, true);
            }
        }
        assert!(t.locked("bob", Source::of(ip("10.9.9.9"))));
        now.fetch_add(LOCKOUT_MS, Ordering::SeqCst);
        assert!(!t.locked("bob", a));
        assert!(!t.locked("bob", Source::of(ip("10.9.9.9"))));
    }

    #[test]
    fn a_source_failing_too_often_is_throttled_and_queues_are_bounded() {
        let (now, t) = throttle();
        let a = ip("10.0.0.1");
        for i in 0..SOURCE_MAX_FAILURES {
            assert!(t.admit(a).is_ok(), "attempt {i}");
            t.failed(&format!("user{i}"), Source::of(a), false);
        }
        let Err(Refused::Throttled { retry_after_s }) = t.admit(a) else {
            panic!("not throttled");
        };
        assert!(retry_after_s >= 1 && retry_after_s <= SOURCE_WINDOW.as_secs());
        assert!(t.admit(ip("10.0.0.2")).is_ok(), "other sources are not");
        now.fetch_add(
            u64::try_from(SOURCE_WINDOW.as_millis()).unwrap(),
            Ordering::SeqCst,
        );
        assert!(t.admit(a).is_ok(), "the window moved on");

        // One source holds at most its share of the queue; the queue is bounded.
        let mut tickets: Vec<Ticket> = (0..MAX_IN_FLIGHT_PER_SOURCE)
            .map(|_| t.admit(ip("10.1.0.1")).unwrap())
            .collect();
        assert!(matches!(t.admit(ip("10.1.0.1")), Err(Refused::Busy { .. })));
        let mut n = 2;
        while let Ok(ticket) = t.admit(ip(&format!("10.1.0.{n}"))) {
            tickets.push(ticket);
            n += 1;
        }
        assert_eq!(tickets.len(), hasher::SLOTS + LOGIN_QUEUE);
        tickets.pop();
        assert!(
            t.admit(ip("10.2.0.1")).is_ok(),
            "a finished login frees its place"
        );
    }
}
