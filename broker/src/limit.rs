//! Failures per key (a client address, an account and an address, ...) within a sliding window,
//! shared by enrolment and logins. Beyond `max` failures within `window` a key is refused: until
//! its oldest failure ages out, or, with a lockout, for the lockout period after the failure
//! that reached `max`. The table is bounded: when it is full, expired entries go first, then
//! the unlocked entry whose last failure is oldest (so flooding the table with new keys cannot
//! clear a lockout until every entry is locked, and even then the one ending soonest goes).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::controller::Clock;

/// Keys tracked by default before entries are evicted.
pub(crate) const DEFAULT_CAPACITY: usize = 10_000;

/// One key's recent failures.
#[derive(Debug, Default)]
struct Entry {
    /// Times (ms of the limiter's clock) of the failures within the window, oldest first; at
    /// most `max`.
    failures: VecDeque<u64>,
    /// Refused until then (0: not locked out).
    locked_until: u64,
}

impl Entry {
    fn last(&self) -> u64 {
        self.failures
            .back()
            .copied()
            .unwrap_or(0)
            .max(self.locked_until)
    }
}

/// The failure table.
pub(crate) struct FailureLimit<K> {
    max: usize,
    window_ms: u64,
    /// `Some`: reaching `max` locks the key for this long (and forgets its failures).
    lockout_ms: Option<u64>,
    capacity: usize,
    clock: Clock,
    table: Mutex<HashMap<K, Entry>>,
}

impl<K> std::fmt::Debug for FailureLimit<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureLimit")
            .field("max", &self.max)
            .field("window_ms", &self.window_ms)
            .field("lockout_ms", &self.lockout_ms)
            .finish_non_exhaustive()
    }
}

impl FailureLimit<IpAddr> {
    /// Failures per address with a monotonic clock and no lockout (enrolment).
    pub(crate) fn new(max: usize, window: Duration) -> Self {
        let start = Instant::now();
        let clock: Clock = std::sync::Arc::new(move || {
            u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
        });
        Self::with_clock(max, window, clock)
    }
}

impl<K: Hash + Eq + Clone> FailureLimit<K> {
    /// `max` failures within `window` (by `clock`, ms) refuse a key.
    pub(crate) fn with_clock(max: usize, window: Duration, clock: Clock) -> Self {
        Self {
            max: max.max(1),
            window_ms: millis(window),
            lockout_ms: None,
            capacity: DEFAULT_CAPACITY,
            clock,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The same limiter, locking a key out for `lockout` once it reaches `max`.
    pub(crate) fn with_lockout(mut self, lockout: Duration) -> Self {
        self.lockout_ms = Some(millis(lockout));
        self
    }

    /// The same limiter tracking at most `capacity` keys.
    pub(crate) fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// May `key` try (again)?
    pub(crate) fn admit(&self, key: &K) -> bool {
        self.refused_for(key).is_none()
    }

    /// `None` if `key` may try now, else how long (ms) until it may.
    pub(crate) fn refused_for(&self, key: &K) -> Option<u64> {
        let now = (self.clock)();
        let mut table = self.lock();
        let entry = table.get_mut(key)?;
        if entry.locked_until > now {
            return Some(entry.locked_until - now);
        }
        self.age(entry, now);
        if self.lockout_ms.is_none() && entry.failures.len() >= self.max {
            let oldest = entry.failures.front().copied().unwrap_or(now);
            return Some((oldest + self.window_ms).saturating_sub(now).max(1));
        }
        None
    }

    /// Counts a failure of `key`; true if it locked the key out (with a lockout only).
    pub(crate) fn failed(&self, key: &K) -> bool {
        let now = (self.clock)();
        let mut table = self.lock();
        if table.len() >= self.capacity && !table.contains_key(key) {
            self.make_room(&mut table, now);
        }
        let entry = table.entry(key.clone()).or_default();
        if entry.locked_until > now {
            return false;
        }
        self.age(entry, now);
        entry.failures.push_back(now);
        if entry.failures.len() >= self.max
            && let Some(lockout) = self.lockout_ms
        {
            entry.failures.clear();
            entry.locked_until = now.saturating_add(lockout);
            return true;
        }
        while entry.failures.len() > self.max {
            entry.failures.pop_front();
        }
        false
    }

    /// Locks `key` out until `until_ms` (by this limiter's clock), e.g. restored at start.
    pub(crate) fn lock_until(&self, key: K, until_ms: u64) {
        let now = (self.clock)();
        let mut table = self.lock();
        if table.len() >= self.capacity && !table.contains_key(&key) {
            self.make_room(&mut table, now);
        }
        let entry = table.entry(key).or_default();
        entry.failures.clear();
        entry.locked_until = entry.locked_until.max(until_ms);
    }

    /// Forgets every key `matches` selects (an unlock); returns how many.
    pub(crate) fn forget(&self, matches: impl Fn(&K) -> bool) -> usize {
        let mut table = self.lock();
        let before = table.len();
        table.retain(|k, _| !matches(k));
        before - table.len()
    }

    /// The keys locked out now, with the end of each lockout.
    pub(crate) fn lockouts(&self) -> Vec<(K, u64)> {
        let now = (self.clock)();
        self.lock()
            .iter()
            .filter(|(_, e)| e.locked_until > now)
            .map(|(k, e)| (k.clone(), e.locked_until))
            .collect()
    }

    fn age(&self, entry: &mut Entry, now: u64) {
        while entry
            .failures
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= self.window_ms)
        {
            entry.failures.pop_front();
        }
    }

    /// Module docs: expired entries first, then the unlocked entry idle longest, then the
    /// lockout ending soonest.
    fn make_room(&self, table: &mut HashMap<K, Entry>, now: u64) {
        let window = self.window_ms;
        table.retain(|_, e| {
            e.locked_until > now
                || e.failures
                    .back()
                    .is_some_and(|t| now.saturating_sub(*t) < window)
        });
        if table.len() < self.capacity {
            return;
        }
        let victim = table
            .iter()
            .filter(|(_, e)| e.locked_until <= now)
            .min_by_key(|(_, e)| e.last())
            .or_else(|| table.iter().min_by_key(|(_, e)| e.locked_until))
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            table.remove(&k);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn clock() -> (Arc<AtomicU64>, Clock) {
        let now = Arc::new(AtomicU64::new(1_000));
        let c = Arc::clone(&now);
        (now, Arc::new(move || c.load(Ordering::SeqCst)))
    }

    #[test]
    fn an_address_is_refused_after_max_failures() {
        let limit = FailureLimit::new(2, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(limit.admit(&a));
        limit.failed(&a);
        assert!(limit.admit(&a));
        limit.failed(&a);
        assert!(!limit.admit(&a));
        assert!(limit.admit(&b));
    }

    #[test]
    fn without_a_lockout_the_oldest_failure_ages_out() {
        let (now, clock) = clock();
        let limit = FailureLimit::with_clock(2, Duration::from_secs(10), clock);
        limit.failed(&"k");
        now.fetch_add(5_000, Ordering::SeqCst);
        limit.failed(&"k");
        assert_eq!(limit.refused_for(&"k"), Some(5_000));
        now.fetch_add(5_000, Ordering::SeqCst);
        assert!(limit.admit(&"k"));
    }

    #[test]
    fn a_lockout_lasts_its_period_and_can_be_forgotten() {
        let (now, clock) = clock();
        let limit = FailureLimit::with_clock(3, Duration::from_secs(60), clock)
            .with_lockout(Duration::from_secs(1800));
        assert!(!limit.failed(&"k"));
        assert!(!limit.failed(&"k"));
        assert!(limit.failed(&"k"), "the third failure locks");
        assert!(
            !limit.failed(&"k"),
            "failures while locked do not extend it"
        );
        now.fetch_add(1_799_999, Ordering::SeqCst);
        assert_eq!(limit.refused_for(&"k"), Some(1));
        assert_eq!(limit.lockouts().len(), 1);
        now.fetch_add(1, Ordering::SeqCst);
        assert!(limit.admit(&"k"));
        limit.lock_until("j", 5_000_000);
        assert!(!limit.admit(&"j"));
        assert_eq!(limit.forget(|k| *k == "j"), 1);
        assert!(limit.admit(&"j"));
    }

    #[test]
    fn a_full_table_keeps_its_lockouts() {
        let (_, clock) = clock();
        let limit = FailureLimit::with_clock(2, Duration::from_secs(60), clock)
            .with_lockout(Duration::from_secs(60))
            .with_capacity(4);
        limit.failed(&0);
        limit.failed(&0);
        assert!(!limit.admit(&0));
        for k in 1..100 {
            limit.failed(&k);
        }
        assert!(!limit.admit(&0), "flooding the table cleared a lockout");
    }
}
