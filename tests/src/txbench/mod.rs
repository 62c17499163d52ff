//! The transaction benchmarks of `fleet-bench`:
//!
//! - [`faults`]: `fleet-bench faults`: the e2e fault test at fleet scale: N simulated
//!   terminals (`pf-txdriver`, journaled) through a cuttable proxy, the broker SIGKILLed,
//!   the link severed or stalled, the terminals SIGKILLed, again and again; then accepted vs
//!   stored vs duplicates vs missing.
//! - [`ingest`]: `fleet-bench ingest`: sustained durable ingest: transactions/s accepted by
//!   the terminals, stored by the controller, acknowledged back, and the accept → ack latency.
//! - [`raw`]: `fleet-bench ingest-raw`: the controller alone, driven by N MQTT sessions
//!   publishing pre-encoded batches (no local API, no outbox), with each side's CPU.
//!
//! Both run the real `pf-broker serve` and `pf-txdriver` (the simulator's terminals, whose
//! accept path is the local API's) as separate processes on loopback.

pub mod faults;
pub mod ingest;
pub mod raw;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::bins::Binaries;
use crate::broker::{Broker, BrokerOptions};
use crate::scrape::Scrape;

/// `pf-txdriver` next to the running program (where Cargo builds every binary of the crate).
pub fn driver_beside_current_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running program")?;
    let path = exe.with_file_name("pf-txdriver");
    if !path.is_file() {
        bail!(
            "{} is missing; build it first (cargo build --release -p posfleet-tests --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// A `serve` broker logging at `warn` (logging must not dominate).
/// `extra_args` are appended to `posfleet-broker serve`.
pub(crate) async fn start_broker(
    bins: &Binaries,
    timeout: Duration,
    extra_args: Vec<String>,
) -> anyhow::Result<Broker> {
    Broker::start(
        bins,
        BrokerOptions {
            log_filter: "warn".to_owned(),
            start_timeout: timeout,
            stop_timeout: Duration::from_secs(30),
            extra_args,
            ..BrokerOptions::default()
        },
    )
    .await
}

/// A quantile read from a Prometheus histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromQuantile {
    pub seconds: f64,
    /// It lies above the highest finite bucket; `seconds` is that bucket's bound.
    pub beyond_top: bool,
}

/// The `q` quantile of a Prometheus histogram over what was observed between two scrapes,
/// interpolated linearly within the bucket (`None` if nothing was observed).
pub fn prom_quantile(before: &Scrape, after: &Scrape, name: &str, q: f64) -> Option<PromQuantile> {
    let bucket = format!("{name}_bucket");
    let earlier = before.by_label(&bucket, "le");
    let mut buckets: Vec<(f64, f64)> = after
        .by_label(&bucket, "le")
        .into_iter()
        .filter_map(|(le, count)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, count - earlier.get(&le).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, cumulative) in buckets {
        if cumulative >= rank {
            if bound.is_infinite() {
                return Some(PromQuantile {
                    seconds: lower,
                    beyond_top: true,
                });
            }
            let share = if cumulative > below {
                (rank - below) / (cumulative - below)
            } else {
                0.0
            };
            return Some(PromQuantile {
                seconds: lower + (bound - lower) * share,
                beyond_top: false,
            });
        }
        (lower, below) = (bound, cumulative);
    }
    None
}

/// Mean of a Prometheus histogram between two scrapes (`_sum` / `_count` deltas).
pub fn prom_mean(before: &Scrape, after: &Scrape, name: &str) -> Option<f64> {
    let delta = |suffix: &str| {
        let n = format!("{name}_{suffix}");
        after.value(&n, &[]) - before.value(&n, &[])
    };
    let count = delta("count");
    (count > 0.0).then(|| delta("sum") / count)
}

fn ms(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".to_owned(), |s| format!("{:.1} ms", s * 1e3))
}

/// `12.3 ms`, or `> 4096.0 ms` beyond the histogram's top bucket.
fn quantile_ms(q: Option<PromQuantile>) -> String {
    match q {
        None => "-".to_owned(),
        Some(q) if q.beyond_top => format!("> {:.1} ms", q.seconds * 1e3),
        Some(q) => format!("{:.1} ms", q.seconds * 1e3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_prometheus_histogram_window() {
        let before = Scrape::parse(
            "h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.01\"} 10\nh_bucket{le=\"+Inf\"} 10\nh_sum 0.005\nh_count 10\n",
        );
        let after = Scrape::parse(
            "h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.01\"} 110\nh_bucket{le=\"+Inf\"} 110\nh_sum 0.505\nh_count 110\n",
        );
        let p50 = prom_quantile(&before, &after, "h", 0.5).expect("p50");
        assert!(
            (p50.seconds - 0.0055).abs() < 1e-9 && !p50.beyond_top,
            "{p50:?}"
        );
        let top = prom_quantile(&Scrape::default(), &after, "h", 1.0).expect("max");
        assert!(
            (top.seconds - 0.01).abs() < 1e-12 && !top.beyond_top,
            "{top:?}"
        );
        let open = Scrape::parse("h_bucket{le=\"0.01\"} 1\nh_bucket{le=\"+Inf\"} 2\n");
        let beyond = prom_quantile(&Scrape::default(), &open, "h", 0.99).expect("p99");
        assert!(beyond.beyond_top && beyond.seconds == 0.01, "{beyond:?}");
        assert_eq!(prom_quantile(&after, &after, "h", 0.5), None);
        assert_eq!(prom_mean(&before, &after, "h"), Some(0.005));
    }
}
