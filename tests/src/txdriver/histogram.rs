//! [`Histogram`]: latencies in microseconds with about 1.6% relative precision, small enough
//! to write into the driver's status file several times a second and to subtract (the
//! benchmark's window is the difference of two snapshots).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Values below this are their own bucket.
const LINEAR: u64 = 128;
/// Sub-buckets per power of two above [`LINEAR`].
const SUB_BITS: u32 = 6;

/// A log-linear histogram of microsecond values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Sparse", into = "Sparse")]
pub struct Histogram {
    /// Bucket index → count (only non-empty buckets).
    buckets: BTreeMap<u32, u64>,
    count: u64,
}

/// The serialized form: `[[bucket, count], ...]`.
#[derive(Serialize, Deserialize)]
struct Sparse(Vec<(u32, u64)>);

impl From<Sparse> for Histogram {
    fn from(sparse: Sparse) -> Self {
        let buckets: BTreeMap<u32, u64> = sparse.0.into_iter().filter(|(_, c)| *c > 0).collect();
        let count = buckets.values().sum();
        Self { buckets, count }
    }
}

impl From<Histogram> for Sparse {
    fn from(h: Histogram) -> Self {
        Sparse(h.buckets.into_iter().collect())
    }
}

impl Histogram {
    pub fn record(&mut self, value: Duration) {
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        *self.buckets.entry(index(micros)).or_insert(0) += 1;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0..=1): the middle of the bucket holding it. `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (&bucket, &count) in &self.buckets {
            seen += count;
            if seen >= rank {
                return Some(Duration::from_micros(midpoint(bucket)));
            }
        }
        self.max()
    }

    /// The middle of the highest non-empty bucket.
    pub fn max(&self) -> Option<Duration> {
        self.buckets
            .keys()
            .next_back()
            .map(|&b| Duration::from_micros(midpoint(b)))
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (&bucket, &count) in &other.buckets {
            *self.buckets.entry(bucket).or_insert(0) += count;
        }
        self.count += other.count;
    }

    /// What was recorded since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets: BTreeMap<u32, u64> = self
            .buckets
            .iter()
            .map(|(&b, &c)| {
                (
                    b,
                    c.saturating_sub(earlier.buckets.get(&b).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, c)| *c > 0)
            .collect();
        let count = buckets.values().sum();
        Histogram { buckets, count }
    }

    /// `p50 X ms, p99 Y ms, max Z ms (N samples)`.
    pub fn summary(&self) -> String {
        let ms = |d: Option<Duration>| {
            d.map_or_else(
                || "-".to_owned(),
                |d| format!("{:.1} ms", d.as_secs_f64() * 1e3),
            )
        };
        format!(
            "p50 {}, p99 {}, max {} ({} samples)",
            ms(self.quantile(0.5)),
            ms(self.quantile(0.99)),
            ms(self.max()),
            self.count
        )
    }
}

/// The bucket of a value.
fn index(v: u64) -> u32 {
    if v < LINEAR {
        return v as u32;
    }
    let exponent = 63 - v.leading_zeros(); // >= 7
    let sub = (v >> (exponent - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as u32 + (exponent - 7) * (1 << SUB_BITS) + sub as u32
}

/// Lowest value of a bucket.
fn lower(bucket: u32) -> u64 {
    if u64::from(bucket) < LINEAR {
        return u64::from(bucket);
    }
    let i = bucket - LINEAR as u32;
    let exponent = i / (1 << SUB_BITS) + 7;
    let sub = u64::from(i % (1 << SUB_BITS));
    ((1 << SUB_BITS) + sub) << (exponent - SUB_BITS)
}

fn midpoint(bucket: u32) -> u64 {
    let low = lower(bucket);
    let high = lower(bucket + 1);
    low + (high - low) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_precise() {
        let mut previous = 0;
        for bucket in 1..2000 {
            let low = lower(bucket);
            assert!(low > previous, "bucket {bucket}");
            assert_eq!(index(low), bucket, "bucket {bucket} starts at {low}");
            assert_eq!(index(low - 1), bucket - 1);
            let width = lower(bucket + 1) - low;
            if u64::from(bucket) >= LINEAR {
                assert!(width as f64 / low as f64 <= 1.0 / 63.0, "bucket {bucket}");
            }
            previous = low;
        }
    }

    #[test]
    fn quantiles_windows_and_serde() {
        let mut h = Histogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).expect("p50").as_secs_f64() * 1e3;
        let p99 = h.quantile(0.99).expect("p99").as_secs_f64() * 1e3;
        assert!((49.0..=51.0).contains(&p50), "{p50}");
        assert!((98.0..=100.5).contains(&p99), "{p99}");
        let earlier = h.clone();
        h.record(Duration::from_secs(3));
        let window = h.since(&earlier);
        assert_eq!(window.count(), 1);
        assert!(window.quantile(0.5).expect("one").as_secs_f64() > 2.9);
        let json = serde_json::to_string(&h).expect("json");
        let back: Histogram = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, h);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
