//! Commit throughput at several group sizes (ignored; run with
//! `cargo test -p posfleet-broker --release --lib txstore::tests::bench -- --ignored --nocapture`).

use std::time::{Duration, Instant};

use super::{open, submission};
use crate::txstore::{TxStore, TxStoreConfig};

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
    }
}

/// Commits shaped like `fleet-bench ingest-raw --terminals 1000 --batch 1` at its ceiling:
/// 1,000 devices, 1,600 transactions per commit (one or two per device, each device's seqs
/// contiguous), three rounds of 60 commits on a growing store. Run with the command above
/// and `fleet_commit_throughput`. The test binary runs on glibc's allocator, the broker on
/// jemalloc: compare runs of this benchmark with each other, not with the broker.
#[test]
#[ignore = "benchmark"]
fn fleet_commit_throughput() {
    const DEVICES: usize = 1000;
    const PER_COMMIT: usize = 1600;
    const COMMITS: u32 = 60;
    let tmp = tempfile::tempdir().unwrap();
    let store = TxStore::open(TxStoreConfig::new(tmp.path())).unwrap();
    let mut next_seq = vec![1u64; DEVICES];
    let mut turn = 0usize;
    let start_ms = 1_790_000_000_000u64;
    for round in 0..3 {
        let mut in_commit = Duration::ZERO;
        for _ in 0..COMMITS {
            let mut subs = Vec::with_capacity(PER_COMMIT);
            for _ in 0..PER_COMMIT {
                let d = turn % DEVICES;
                turn += 1;
                let mut tx = crate::txstore::test_sale(next_seq[d], 1250);
                // 16,000 transactions a second, as the clocks see it.
                let at_ms = start_ms + (turn as u64) / 16;
                tx.timestamp_ms = at_ms;
                next_seq[d] += 1;
                subs.push(submission(&format!("RAW-{d:05}"), at_ms, vec![tx]));
            }
            let t = Instant::now();
            store.commit(subs).unwrap();
            in_commit += t.elapsed();
        }
        println!(
            "round {round}: {:>7.0} tx/s inside commit, mean commit {:.1?}",
            f64::from(COMMITS) * PER_COMMIT as f64 / in_commit.as_secs_f64(),
            in_commit / COMMITS
        );
    }
}
