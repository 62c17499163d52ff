//! Timed assertions: how the suite waits for anything (never a bare sleep).
//!
//! ```no_run
//! # async fn demo(api: &posfleet_tests::Api) {
//! use std::time::Duration;
//! let device = posfleet_tests::eventually(Duration::from_secs(10), || async {
//!     let device = api.device("T-1").await?;
//!     anyhow::ensure!(device.as_ref().is_some_and(|d| d.summary.online), "not online: {device:?}");
//!     Ok(device)
//! })
//! .await;
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use tokio::time::Instant;

/// Pause between two checks.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Runs `check` until it returns `Ok`, every [`POLL_INTERVAL`], for at most `timeout`; returns
/// the value. Each `Err` is the state observed so far ("not online yet: ..."); if time runs out
/// the test fails with the last one. A single check is cut off at the deadline too.
pub async fn eventually<T, F, Fut>(timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    match try_eventually(timeout, check).await {
        Ok(value) => value,
        Err(error) => panic!("{error:#}"),
    }
}

/// [`eventually`] that returns the failure instead of panicking (for the benchmark).
pub async fn try_eventually<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    let deadline = started + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error,
            Err(_) => anyhow!("the check itself was still running at the deadline"),
        };
        if Instant::now() + POLL_INTERVAL >= deadline {
            return Err(last.context(format!(
                "condition not met within {timeout:?} ({attempts} checks); last observed state"
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn returns_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let value = eventually(Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            anyhow::ensure!(n >= 3, "only {n} calls");
            Ok(n)
        })
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn fails_with_the_last_observed_state() {
        let error = try_eventually(Duration::from_secs(1), || async {
            Err::<(), _>(anyhow!("still offline"))
        })
        .await
        .unwrap_err();
        let text = format!("{error:#}");
        assert!(text.contains("not met within 1s"), "{text}");
        assert!(text.contains("still offline"), "{text}");
    }
}
