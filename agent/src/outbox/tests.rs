//! The outbox through its public handle: durability, idempotency, acks, dead letters, reopen.

use posfleet_proto::{DeviceId, decode, pb};

use super::*;
use crate::transaction::fixtures::valid;

pub(crate) fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

pub(crate) async fn open(dir: &std::path::Path) -> Outbox {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || Outbox::open(&dir, OutboxSettings::default()))
        .await
        .unwrap()
        .unwrap()
}

async fn seqs(outbox: &DeviceOutbox) -> Vec<u64> {
    outbox
        .entries()
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

#[tokio::test]
async fn accepts_with_gapless_seqs_and_answers_repeats_and_conflicts() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path()).await;
    let t = outbox.device(&dev("T-1")).unwrap();
    assert_eq!(
        t.accept(valid("a", 100)).await.unwrap(),
        AcceptOutcome::Stored { seq: 1 }
    );
    assert_eq!(
        t.accept(valid("b", 200)).await.unwrap(),
        AcceptOutcome::Stored { seq: 2 }
    );
    assert_eq!(
        t.accept(valid("a", 100)).await.unwrap(),
        AcceptOutcome::Repeat { seq: 1 }
    );
    assert_eq!(
        t.accept(valid("a", 101)).await.unwrap(),
        AcceptOutcome::Conflict { seq: 1 }
    );
    assert_eq!(
        t.accept(valid("c", 300)).await.unwrap(),
        AcceptOutcome::Stored { seq: 3 }
    );
    assert_eq!((t.depth(), t.last_seq()), (3, 3));
    let entries = t.entries().await.unwrap();
    let first = entries[0].transaction().unwrap();
    assert_eq!(
        (first.seq, first.txn_id.as_str(), first.amount_minor),
        (1, "a", 100)
    );

    // Terminals of one store are independent.
    let other = outbox.device(&dev("T-2")).unwrap();
    assert_eq!(
        other.accept(valid("a", 999)).await.unwrap(),
        AcceptOutcome::Stored { seq: 1 }
    );
    assert_eq!(t.depth(), 3);
}

#[tokio::test]
async fn survives_reopen_and_continues_the_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let outbox = open(tmp.path()).await;
        let t = outbox.device(&dev("T-1")).unwrap();
        for i in 0..5 {
            t.accept(valid(&format!("x{i}"), i)).await.unwrap();
        }
        t.ack(2, vec![]).await.unwrap();
        outbox.close().await;
    }
    let outbox = open(tmp.path()).await;
    let t = outbox.device(&dev("T-1")).unwrap();
    assert_eq!(t.last_seq(), 5);
    assert_eq!(seqs(&t).await, [3, 4, 5]);
    assert_eq!(t.depth(), 3);
    assert_eq!(
        t.accept(valid("x0", 0)).await.unwrap(),
        AcceptOutcome::Repeat { seq: 1 }
    );
    assert_eq!(
        t.accept(valid("y", 1)).await.unwrap(),
        AcceptOutcome::Stored { seq: 6 }
    );
}

#[tokio::test]
async fn acks_remove_covered_entries_and_dead_letter_rejections() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path()).await;
    let t = outbox.device(&dev("T-1")).unwrap();
    for i in 0..6 {
        t.accept(valid(&format!("x{i}"), i)).await.unwrap();
    }
    let out = t.ack(3, vec![2]).await.unwrap();
    assert_eq!(
        (out.removed, out.dead_lettered, out.late_rejections),
        (2, 1, 0)
    );
    assert_eq!(seqs(&t).await, [4, 5, 6]);
    let dead = t.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].transaction().unwrap().txn_id, "x1");

    // Duplicated and out-of-order acks change nothing; a late rejection is only counted.
    assert_eq!(t.ack(3, vec![]).await.unwrap(), AckOutcome::default());
    assert_eq!(t.ack(1, vec![1]).await.unwrap().late_rejections, 1);
    // A rejection above the ack point leaves the outbox at once.
    let out = t.ack(3, vec![5]).await.unwrap();
    assert_eq!(out.dead_lettered, 1);
    assert_eq!(seqs(&t).await, [4, 6]);
    let status = t.status().await;
    assert_eq!(
        (status.depth, status.dead_letters, status.last_seq),
        (2, 2, 6)
    );
    assert!(status.oldest_unsent_age_ms.is_some());

    // The dead-letter count survives a reopen.
    drop(t);
    outbox.close().await;
    drop(outbox);
    let outbox = open(tmp.path()).await;
    let t = outbox.device(&dev("T-1")).unwrap();
    assert_eq!(t.status().await.dead_letters, 2);
}

#[tokio::test]
async fn reads_runs_of_consecutive_entries_within_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path()).await;
    let t = outbox.device(&dev("T-1")).unwrap();
    for i in 0..10 {
        t.accept(valid(&format!("x{i}"), i)).await.unwrap();
    }
    t.ack(0, vec![4]).await.unwrap();
    let run = |from, through, n, bytes| {
        let t = t.clone();
        async move {
            t.read_run(from, through, n, bytes)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        run(1, 10, 100, 1 << 20).await,
        [1, 2, 3],
        "stops at the gap"
    );
    assert_eq!(run(4, 10, 3, 1 << 20).await, [5, 6, 7]);
    assert_eq!(run(9, 20, 100, 1 << 20).await, [9, 10]);
    assert_eq!(
        run(5, 6, 100, 1 << 20).await,
        [5, 6],
        "never beyond `through`"
    );
    assert_eq!(run(5, 10, 100, 1).await, [5], "always at least one");
    assert!(run(11, 20, 100, 1 << 20).await.is_empty());
}

#[tokio::test]
async fn concurrent_accepts_share_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..8 {
        let t = outbox.device(&dev(&format!("T-{d}"))).unwrap();
        tasks.spawn(async move {
            for i in 0..50 {
                let out = t.accept(valid(&format!("x{i}"), i)).await.unwrap();
                assert!(matches!(out, AcceptOutcome::Stored { .. }));
            }
            t
        });
    }
    while let Some(t) = tasks.join_next().await {
        let t = t.unwrap();
        assert_eq!(seqs(&t).await, (1..=50).collect::<Vec<_>>());
    }
    let (rounds, writes) = outbox.commit_stats();
    assert_eq!(writes, 400);
    assert!(
        rounds < writes,
        "group commit: {rounds} rounds for {writes} writes"
    );
}

#[tokio::test]
async fn refuses_when_full_and_after_close() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = OutboxSettings {
        max_pending: 2,
        ..OutboxSettings::default()
    };
    let dir = tmp.path().to_owned();
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(&dir, settings))
        .await
        .unwrap()
        .unwrap();
    let t = outbox.device(&dev("T-1")).unwrap();
    t.accept(valid("a", 1)).await.unwrap();
    t.accept(valid("b", 1)).await.unwrap();
    assert!(matches!(
        t.accept(valid("c", 1)).await,
        Err(OutboxError::Full { depth: 2 })
    ));
    t.ack(1, vec![]).await.unwrap();
    t.accept(valid("c", 1)).await.unwrap();
    t.ack(3, vec![]).await.unwrap();
    outbox.close().await;
    assert!(matches!(
        t.accept(valid("d", 1)).await,
        Err(OutboxError::Closed)
    ));
}

#[tokio::test]
async fn removes_partial_snapshots_before_opening() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let outbox = open(tmp.path()).await;
        let t = outbox.device(&dev("T-1")).unwrap();
        t.accept(valid("a", 1)).await.unwrap();
        outbox.close().await;
    }
    let partial = tmp.path().join("snap.00000000000ABCDE.generating");
    std::fs::write(&partial, b"truncated").unwrap();
    let outbox = open(tmp.path()).await;
    assert!(!partial.exists());
    assert_eq!(outbox.device(&dev("T-1")).unwrap().last_seq(), 1);
}

#[test]
fn batch_payload_is_a_transaction_batch() {
    use prost::Message;
    let txns: Vec<pb::Transaction> = (1..=3)
        .map(|s| valid(&format!("x{s}"), 5).sequenced(s))
        .collect();
    let encoded: Vec<Vec<u8>> = txns.iter().map(Message::encode_to_vec).collect();
    let payload = sender::batch_payload(encoded.iter().map(Vec::as_slice));
    let batch = decode::<pb::TransactionBatch>(&payload).unwrap();
    assert_eq!(batch.transactions, txns);
    assert_eq!(
        payload,
        pb::TransactionBatch { transactions: txns }.encode_to_vec()
    );
}

#[test]
fn the_inbox_merges_gap_reports_and_caps_retry_after() {
    use prost::Message;
    let inbox = AckInbox::default();
    let id = dev("T-1");
    inbox.sent_through(10);
    let offer = |ack: pb::TransactionAck| inbox.offer(&id, &ack.encode_to_vec());
    let gap = |through| pb::TransactionAck {
        durable_through_seq: through,
        gap: true,
        ..Default::default()
    };
    assert_eq!(offer(gap(2)), AckVerdict::Accepted);
    assert_eq!(offer(gap(1)), AckVerdict::Accepted);
    assert_eq!(
        offer(pb::TransactionAck {
            retry_after_ms: u32::MAX,
            ..Default::default()
        }),
        AckVerdict::Accepted
    );
    assert_eq!(
        offer(pb::TransactionAck {
            retry_after_ms: 500,
            ..Default::default()
        }),
        AckVerdict::Accepted
    );
    assert_eq!(
        inbox.take(),
        Some(AckNews {
            through: 2,
            rejected: vec![],
            gap_above: Some(2),
            retry_after: Some(MAX_RETRY_AFTER),
        }),
        "the highest gap, the longest wait, capped"
    );
    assert_eq!(inbox.take(), None);
    // A gap report or a retry-after over seqs never sent is bogus like any other ack.
    assert_eq!(offer(gap(11)), AckVerdict::Bogus);
    assert_eq!(inbox.take(), None);
}

#[test]
fn the_inbox_ignores_malformed_and_bogus_acks() {
    use prost::Message;
    let inbox = AckInbox::default();
    let id = dev("T-1");
    let ack = |through: u64, rejected: Vec<u64>| {
        pb::TransactionAck {
            durable_through_seq: through,
            rejected_seqs: rejected,
            ..Default::default()
        }
        .encode_to_vec()
    };
    assert_eq!(inbox.offer(&id, &[0xff, 0xff]), AckVerdict::Malformed);
    assert_eq!(
        inbox.offer(&id, &ack(1, vec![])),
        AckVerdict::Bogus,
        "nothing sent yet"
    );
    inbox.sent_through(10);
    assert_eq!(inbox.offer(&id, &ack(11, vec![])), AckVerdict::Bogus);
    assert_eq!(inbox.offer(&id, &ack(5, vec![11])), AckVerdict::Bogus);
    assert_eq!(inbox.offer(&id, &ack(5, vec![0])), AckVerdict::Bogus);
    assert_eq!(inbox.take(), None);
    assert_eq!(inbox.offer(&id, &ack(7, vec![3])), AckVerdict::Accepted);
    assert_eq!(inbox.offer(&id, &ack(4, vec![9])), AckVerdict::Accepted);
    assert_eq!(
        inbox.take(),
        Some(AckNews {
            through: 7,
            rejected: vec![3, 9],
            ..AckNews::default()
        }),
        "merged: highest point, all rejections"
    );
    assert_eq!(inbox.take(), None);
    assert_eq!(
        inbox.stats(),
        AckStats {
            accepted: 2,
            malformed: 1,
            bogus: 4
        }
    );
}

/// Accept throughput with group commit: `POSFLEET_BENCH_TERMINALS` terminals (default 1000)
/// sharing one store, each accepting one transaction at a time for
/// `POSFLEET_BENCH_SECONDS` (default 5). Run with
/// `cargo test --release -p posfleet-agent bench_accept_rate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_accept_rate() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let terminals = env("POSFLEET_BENCH_TERMINALS", 1000);
    let seconds = env("POSFLEET_BENCH_SECONDS", 5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let settings = OutboxSettings {
        cache_capacity: 64 << 20,
        ..OutboxSettings::default()
    };
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(&dir, settings))
        .await
        .unwrap()
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let start = std::time::Instant::now();
    for t in 0..terminals {
        let device = outbox.device(&dev(&format!("sim-{t:05}"))).unwrap();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            let mut worst = std::time::Duration::ZERO;
            while !stop.is_cancelled() {
                let begun = std::time::Instant::now();
                device
                    .accept(valid(&format!("b{t}x{n}"), 100))
                    .await
                    .unwrap();
                worst = worst.max(begun.elapsed());
                n += 1;
            }
            (n, worst)
        });
    }
    tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
    stop.cancel();
    let (mut total, mut worst) = (0, std::time::Duration::ZERO);
    while let Some(r) = tasks.join_next().await {
        let (n, w) = r.unwrap();
        total += n;
        worst = worst.max(w);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (rounds, writes) = outbox.commit_stats();
    println!(
        "{terminals} terminals: {total} accepts in {elapsed:.1} s = {:.0}/s; {rounds} commits \
         ({:.0} writes per fsync); slowest accept {worst:?}",
        total as f64 / elapsed,
        writes as f64 / rounds.max(1) as f64
    );
}

#[tokio::test]
async fn purge_removes_a_terminals_records_and_the_sequence_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path()).await;
    let a = outbox.device(&DeviceId::new("a").unwrap()).unwrap();
    let b = outbox.device(&DeviceId::new("b").unwrap()).unwrap();
    for i in 0..3 {
        a.accept(valid(&format!("a-{i}"), 100)).await.unwrap();
    }
    b.accept(valid("b-0", 100)).await.unwrap();
    a.ack(1, vec![2]).await.unwrap();
    assert_eq!((a.depth(), a.dead_letters().await.unwrap().len()), (1, 1));

    assert_eq!(a.purge().await.unwrap(), 2);
    assert_eq!(a.depth(), 0);
    assert!(a.entries().await.unwrap().is_empty());
    assert!(a.dead_letters().await.unwrap().is_empty());
    assert_eq!(a.status().await.dead_letters, 0);
    assert_eq!(b.depth(), 1, "another terminal keeps its records");
    // The idempotency index went too; the sequence continues (no seq is ever reused).
    assert_eq!(
        a.accept(valid("a-0", 100)).await.unwrap(),
        AcceptOutcome::Stored { seq: 4 }
    );
    outbox.close().await;
    drop((a, b, outbox));
    let outbox = open(tmp.path()).await;
    let a = outbox.device(&DeviceId::new("a").unwrap()).unwrap();
    assert_eq!(a.depth(), 1, "the purge is durable");
    outbox.close().await;
}
