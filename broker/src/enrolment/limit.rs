//! Failed enrolments per source address: beyond `max` within `window`, an address is refused
//! until its oldest failure ages out. The table is bounded: when full, idle entries go first.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Addresses tracked before idle ones are purged.
const TABLE_LIMIT: usize = 10_000;

#[derive(Debug)]
pub(super) struct FailureLimit {
    max: usize,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl FailureLimit {
    pub(super) fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// May `peer` try (again)?
    pub(super) fn admit(&self, peer: IpAddr) -> bool {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(times) = map.get_mut(&peer) else {
            return true;
        };
        while times.front().is_some_and(|t| now - *t >= self.window) {
            times.pop_front();
        }
        times.len() < self.max
    }

    pub(super) fn failed(&self, peer: IpAddr) {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= TABLE_LIMIT && !map.contains_key(&peer) {
            let window = self.window;
            map.retain(|_, t| t.back().is_some_and(|last| now - *last < window));
            if map.len() >= TABLE_LIMIT {
                // Everyone is failing at once: forget the table rather than grow it.
                map.clear();
            }
        }
        let times = map.entry(peer).or_default();
        times.push_back(now);
        while times.len() > self.max {
            times.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_max_failures() {
        let limit = FailureLimit::new(2, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(limit.admit(a));
        limit.failed(a);
        assert!(limit.admit(a));
        limit.failed(a);
        assert!(!limit.admit(a));
        assert!(limit.admit(b));
    }
}
