//! Repeated refusals, aggregated (issue 10, item 5): a refused login, a request without a
//! valid token or one refused by role is *counted* here, in memory, per (action, actor,
//! target, source, outcome, reason), and written to the audit log as one entry per key and
//! window with the count ("N refusals between FIRST and LAST (Unix ms): REASON"). Whoever
//! hammers the API can therefore add at most one entry per key and window to the log, and the
//! number of keys pending at once is bounded ([`MAX_KEYS`]; beyond it refusals are counted
//! under one overflow key per action and outcome), so the log cannot be used to fill the disk.
//!
//! Counting never touches the disk, so a refusal's answer does not wait for an fsync (the
//! login refusals must all cost the same: `accounts::login`). The flusher task writes the
//! entries whose window has ended; reading the audit log flushes everything first, and so
//! does the shutdown (nothing pending is lost when the controller stops; a crash loses at most
//! one window of counts).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

use super::entry::outcome_name;
use super::{AuditError, AuditRecord, AuditSink, Outcome};
use crate::controller::Clock;

/// Default window: one entry per key and minute at most.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Keys counted at once at most (then the overflow key of the action).
pub const MAX_KEYS: usize = 1024;
/// How often the flusher looks for windows that ended.
const FLUSH_TICK: Duration = Duration::from_secs(5);
/// Actor, target and source of the overflow key.
const ANY: &str = "*";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    action: String,
    actor: String,
    target: String,
    source: String,
    outcome: &'static str,
    reason: String,
}

#[derive(Debug, Clone, Copy)]
struct Count {
    outcome: Outcome,
    first_ms: u64,
    last_ms: u64,
    n: u64,
}

/// The counts (module docs).
pub struct Refusals {
    sink: Arc<dyn AuditSink>,
    clock: Clock,
    window_ms: u64,
    pending: Mutex<Pending>,
    /// One flush at a time, so entries of one key keep their order.
    flushing: Mutex<()>,
}

#[derive(Default)]
struct Pending {
    counts: HashMap<Key, Count>,
    /// Set by the final flush at shutdown: later refusals are recorded one by one.
    closed: bool,
}

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusals")
            .field("window_ms", &self.window_ms)
            .finish_non_exhaustive()
    }
}

impl Refusals {
    pub fn new(sink: Arc<dyn AuditSink>, clock: Clock) -> Self {
        Self::with_window(sink, clock, DEFAULT_WINDOW)
    }

    pub fn with_window(sink: Arc<dyn AuditSink>, clock: Clock, window: Duration) -> Self {
        Self {
            sink,
            clock,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            pending: Mutex::new(Pending::default()),
            flushing: Mutex::new(()),
        }
    }

    /// Counts one refusal (`record.detail` is its reason). Never blocks on the disk; after the
    /// final flush it hands the record back, to be recorded on its own.
    pub fn note(&self, record: AuditRecord) -> Option<AuditRecord> {
        let now = (self.clock)();
        let mut pending = self.lock();
        if pending.closed {
            return Some(record);
        }
        let mut key = Key {
            action: record.action,
            actor: record.actor,
            target: record.target,
            source: record.source,
            outcome: outcome_name(record.outcome),
            reason: record.detail,
        };
        if pending.counts.len() >= MAX_KEYS && !pending.counts.contains_key(&key) {
            key = Key {
                actor: ANY.into(),
                target: ANY.into(),
                source: ANY.into(),
                reason: "other refusals (too many distinct names and sources to list)".into(),
                ..key
            };
        }
        let count = pending.counts.entry(key).or_insert(Count {
            outcome: record.outcome,
            first_ms: now,
            last_ms: now,
            n: 0,
        });
        count.n += 1;
        count.last_ms = now;
        None
    }

    /// Writes the counts whose window has ended (every count with `everything`), one entry
    /// each. A count that cannot be written is kept for the next flush. Blocks (fsyncs).
    pub fn flush(&self, everything: bool) -> Result<usize, AuditError> {
        let _one = self.flushing.lock().unwrap_or_else(PoisonError::into_inner);
        let now = (self.clock)();
        let due: Vec<(Key, Count)> = {
            let mut pending = self.lock();
            let keys: Vec<Key> = pending
                .counts
                .iter()
                .filter(|(_, c)| everything || now.saturating_sub(c.first_ms) >= self.window_ms)
                .map(|(k, _)| k.clone())
                .collect();
            let mut due: Vec<(Key, Count)> = keys
                .into_iter()
                .filter_map(|k| pending.counts.remove(&k).map(|c| (k, c)))
                .collect();
            due.sort_by_key(|(_, c)| c.first_ms);
            due
        };
        let mut written = 0;
        let mut failed = None;
        for (key, count) in due {
            if failed.is_some() {
                self.put_back(key, count);
                continue;
            }
            let record = AuditRecord {
                actor: key.actor.clone(),
                source: key.source.clone(),
                action: key.action.clone(),
                target: key.target.clone(),
                outcome: count.outcome,
                detail: format!(
                    "{} refusal{} between {} and {} (Unix ms): {}",
                    count.n,
                    if count.n == 1 { "" } else { "s" },
                    count.first_ms,
                    count.last_ms,
                    key.reason
                ),
            };
            match self.sink.record(record) {
                Ok(()) => written += 1,
                Err(e) => {
                    self.put_back(key, count);
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }

    /// Flushes everything and records later refusals one by one (shutdown).
    pub fn close(&self) -> Result<usize, AuditError> {
        let written = self.flush(true)?;
        self.lock().closed = true;
        // Anything counted between the flush and the close.
        Ok(written + self.flush(true)?)
    }

    /// Counts pending (tests).
    #[cfg(test)]
    pub fn pending(&self) -> u64 {
        self.lock().counts.values().map(|c| c.n).sum()
    }

    /// Runs the flusher on `tracker` until `cancel`, then flushes everything.
    pub fn spawn_flusher(self: Arc<Self>, tracker: &TaskTracker, cancel: CancellationToken) {
        tracker.spawn(async move {
            let mut every = tokio::time::interval(FLUSH_TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = every.tick() => {}
                }
                let this = Arc::clone(&self);
                // Appends fsync: off the runtime.
                match tokio::task::spawn_blocking(move || this.flush(false)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        error!(error = %e, "aggregated refusals could not be audited yet")
                    }
                    Err(e) => error!(error = %e, "the refusal flusher failed"),
                }
            }
            let this = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || this.close()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => error!(error = %e, "pending refusal counts lost at shutdown"),
                Err(e) => error!(error = %e, "the final refusal flush failed"),
            }
        });
    }

    fn put_back(&self, key: Key, count: Count) {
        let mut pending = self.lock();
        let entry = pending.counts.entry(key).or_insert(Count { n: 0, ..count });
        entry.n += count.n;
        entry.first_ms = entry.first_ms.min(count.first_ms);
        entry.last_ms = entry.last_ms.max(count.last_ms);
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The number of refusals an entry of this module stands for (`None` for other entries).
pub fn refusal_count(detail: &str) -> Option<u64> {
    let (n, rest) = detail.split_once(' ')?;
    rest.starts_with("refusal")
        .then(|| n.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[derive(Default)]
    struct Memory(Mutex<Vec<AuditRecord>>);

    impl AuditSink for Memory {
        fn record(&self, record: AuditRecord) -> Result<(), AuditError> {
            self.0.lock().unwrap().push(record);
            Ok(())
        }
    }

    fn refusal(actor: &str, source: &str) -> AuditRecord {
        AuditRecord {
            actor: actor.into(),
            source: source.into(),
            action: "auth.login".into(),
            target: actor.into(),
            outcome: Outcome::Failure,
            detail: "wrong password".into(),
        }
    }

    #[test]
    fn one_entry_per_key_and_window_with_the_count_and_bounded_keys() {
        let sink = Arc::new(Memory::default());
        let now = Arc::new(AtomicU64::new(1_000));
        let clock: Clock = {
            let now = Arc::clone(&now);
            Arc::new(move || now.load(Ordering::SeqCst))
        };
        let r = Refusals::new(sink.clone(), clock);
        for i in 0..1000 {
            assert!(r.note(refusal(["a", "b"][i % 2], "10.0.0.1")).is_none());
        }
        assert_eq!(r.flush(false).unwrap(), 0, "the window has not ended");
        now.fetch_add(60_000, Ordering::SeqCst);
        assert_eq!(r.flush(false).unwrap(), 2);
        let written = sink.0.lock().unwrap().clone();
        let counts: Vec<u64> = written
            .iter()
            .map(|e| refusal_count(&e.detail).unwrap())
            .collect();
        assert_eq!(counts, [500, 500]);
        assert!(
            written[0].detail.ends_with(": wrong password"),
            "{}",
            written[0].detail
        );
        // Many distinct keys: bounded, and every refusal still counted.
        for i in 0..(MAX_KEYS + 500) {
            r.note(refusal(&format!("n{i}"), "10.0.0.2"));
        }
        assert_eq!(r.pending(), (MAX_KEYS + 500) as u64);
        let before = sink.0.lock().unwrap().len();
        assert_eq!(r.close().unwrap(), MAX_KEYS + 1);
        let all = sink.0.lock().unwrap().clone();
        let total: u64 = all[before..]
            .iter()
            .map(|e| refusal_count(&e.detail).unwrap())
            .sum();
        assert_eq!(total, (MAX_KEYS + 500) as u64);
        assert!(
            r.note(refusal("late", "x")).is_some(),
            "closed: recorded alone"
        );
        assert_eq!(
            refusal_count("1 refusal between 1 and 1 (Unix ms): x"),
            Some(1)
        );
        assert_eq!(refusal_count("status 401"), None);
    }
}
