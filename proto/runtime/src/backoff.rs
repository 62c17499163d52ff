//! Reconnect delays: exponential backoff with full jitter.
//!
//! After `n` consecutive failures the next delay is drawn uniformly from
//! `[0, min(max, initial * 2^n)]` ("full jitter"). Spreading the delays over the whole window
//! is what keeps a fleet of terminals from reconnecting in lock-step after a controller
//! restart. The attempt counter resets after a successful CONNACK.

use std::time::Duration;

use rand::Rng;

/// Reconnect backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Upper bound of the first delay window.
    pub initial: Duration,
    /// The window never grows beyond this.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// Upper bound of the delay window after `attempt` consecutive failures (0-based):
    /// `min(max, initial * 2^attempt)`, without overflowing.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// A random delay in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

/// The attempt counter for one connection: call [`Retry::next_delay`] after each failure and
/// [`Retry::reset`] after each success.
#[derive(Debug, Clone)]
pub struct Retry {
    backoff: Backoff,
    attempt: u32,
}

impl Retry {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            attempt: 0,
        }
    }

    /// Consecutive failures so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt; counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.backoff.delay(self.attempt, &mut rand::rng());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(500));
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(5), Duration::from_secs(16));
        assert_eq!(b.ceiling(6), Duration::from_secs(30));
        assert_eq!(b.ceiling(40), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn delays_stay_within_the_window_and_spread_out() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..64 {
            let ceiling = b.ceiling(attempt);
            let delays: Vec<Duration> = (0..200).map(|_| b.delay(attempt, &mut rng)).collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            // Full jitter: both halves of the window are used.
            assert!(delays.iter().any(|d| *d < ceiling / 2), "attempt {attempt}");
            assert!(delays.iter().any(|d| *d > ceiling / 2), "attempt {attempt}");
        }
    }

    #[test]
    fn huge_parameters_do_not_overflow() {
        let b = Backoff {
            initial: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(b.ceiling(3), Duration::MAX);
        let _ = b.delay(3, &mut StdRng::seed_from_u64(1));
        let zero = Backoff {
            initial: Duration::ZERO,
            max: Duration::from_secs(1),
        };
        assert_eq!(
            zero.delay(10, &mut StdRng::seed_from_u64(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn retry_counts_and_resets() {
        let mut r = Retry::new(Backoff::default());
        for _ in 0..3 {
            assert!(r.next_delay() <= Duration::from_secs(30));
        }
        assert_eq!(r.attempt(), 3);
        r.reset();
        assert_eq!(r.attempt(), 0);
        assert!(r.next_delay() <= Duration::from_millis(500));
    }
}
