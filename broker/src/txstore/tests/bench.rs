//! Commit throughput at several group sizes (ignored; run with
//! `cargo test -p posfleet-broker --release --lib txstore::tests::bench -- --ignored --nocapture`).

use std::time::{Duration, Instant};

use super::{open, submission};

#[test]
#[ignore = "benchmark"]
fn commit_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut next = 1u64;
    for (group, commits) in [
        (1usize, 300usize),
        (10, 300),
        (100, 100),
        (1000, 30),
        (8192, 6),
    ] {
        let mut latencies = Vec::with_capacity(commits);
        let started = Instant::now();
        for _ in 0..commits {
            // One group commit of `group` transactions, spread over 50 devices like a fleet.
            let mut subs = Vec::new();
            for d in 0..group.min(50) {
                let n = group / group.min(50) + usize::from(d < group % group.min(50));
                let txs = (0..n)
                    .map(|i| crate::txstore::test_sale(next + i as u64, 1250))
                    .collect();
                subs.push(submission(&format!("B-{d}"), 1, txs));
            }
            next += group as u64;
            let t = Instant::now();
            store.commit(subs).unwrap();
            latencies.push(t.elapsed());
        }
        let total = started.elapsed();
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
        let rate = (group * commits) as f64 / total.as_secs_f64();
        println!(
            "group {group:>5}: {rate:>9.0} tx/s, commit p50 {:>8.2?} p99 {:>8.2?} mean {:>8.2?}",
            pct(0.5),
            pct(0.99),
            total / u32::try_from(commits).unwrap_or(1)
        );
        assert!(total > Duration::ZERO);
    }
}
