//! Transaction delivery end to end on the agent side (ADR 0005) against the fake broker:
//! batches in seq order, acks that remove, bad acks that change nothing, resends after a
//! timeout, after a network cut and after a restart between accept and publish.

use std::time::Duration;

use posfleet_proto::{decode, encode, pb};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tests::{WAIT, agent, eventually, next_on};
use crate::outbox::{Outbox, OutboxSettings};
use crate::transaction::fixtures::sale;
use posfleet_runtime::testing::{FakeBroker, TestPki};

const ACK_TOPIC: &str = "posfleet/v1/d/T-7/down/txack";
const HOUR: Duration = Duration::from_secs(3600);

async fn open(dir: &std::path::Path, resend_timeout: Duration) -> Outbox {
    let dir = dir.to_owned();
    let settings = OutboxSettings {
        resend_timeout,
        ..OutboxSettings::default()
    };
    tokio::task::spawn_blocking(move || Outbox::open(&dir, settings))
        .await
        .unwrap()
        .unwrap()
}

/// The next published batch.
async fn next_batch(broker: &mut FakeBroker) -> Vec<pb::Transaction> {
    decode::<pb::TransactionBatch>(&next_on(broker, "tx").await)
        .unwrap()
        .transactions
}

/// Batches until `count` transactions were seen; returns their (seq, txn id).
async fn collect(broker: &mut FakeBroker, count: usize) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        for t in next_batch(broker).await {
            seen.push((t.seq, t.txn_id));
        }
    }
    seen
}

fn ack(through: u64, rejected: Vec<u64>) -> Vec<u8> {
    encode(&pb::TransactionAck {
        durable_through_seq: through,
        rejected_seqs: rejected,
        ..Default::default()
    })
    .unwrap()
}

fn ids(prefix: &str, n: u64) -> Vec<(u64, String)> {
    (1..=n).map(|i| (i, format!("{prefix}{i}"))).collect()
}

struct Running {
    handle: super::AgentHandle,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Running {
    fn start(pki: &TestPki, broker: &FakeBroker, outbox: &Outbox) -> Self {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let handle = agent(pki, broker, HOUR, HOUR, outbox)
            .spawn(&tracker, cancel.clone())
            .unwrap();
        Self {
            handle,
            tracker,
            cancel,
        }
    }

    async fn accept(&self, prefix: &str, n: u64) {
        for i in 1..=n {
            let accepted = self
                .handle
                .intake()
                .accept(sale(&format!("{prefix}{i}"), 100))
                .await
                .unwrap();
            assert!(accepted.new);
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn sends_batches_in_order_and_acks_empty_the_outbox() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), HOUR).await;
    let a = Running::start(&pki, &broker, &outbox);
    a.accept("s", 5).await;
    assert_eq!(collect(&mut broker, 5).await, ids("s", 5));
    assert_eq!(a.handle.outbox().depth(), 5);

    broker.push(ACK_TOPIC, &ack(3, vec![]));
    eventually("ack through 3", || a.handle.outbox().depth() == 2).await;
    broker.push(ACK_TOPIC, &ack(5, vec![]));
    eventually("ack through 5", || a.handle.outbox().depth() == 0).await;
    let status = a.handle.outbox().status().await;
    assert!(status.last_ack_at_ms.is_some() && status.oldest_unsent_age_ms.is_none());
    assert_eq!(a.handle.ack_stats().accepted, 2);
    a.stop().await;
}

#[tokio::test]
async fn bogus_duplicated_and_out_of_order_acks_never_remove_unsent_entries() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), HOUR).await;
    let a = Running::start(&pki, &broker, &outbox);
    a.accept("b", 3).await;
    assert_eq!(collect(&mut broker, 3).await, ids("b", 3));

    broker.push(ACK_TOPIC, &ack(100, vec![]));
    broker.push(ACK_TOPIC, b"\xff\xff\xff not protobuf");
    broker.push(ACK_TOPIC, &ack(1, vec![7]));
    eventually("three bad acks", || {
        let s = a.handle.ack_stats();
        s.bogus == 2 && s.malformed == 1
    })
    .await;
    assert_eq!(a.handle.outbox().depth(), 3, "nothing removed");

    // A conflict moves its entry to the dead letters; later, older and repeated acks
    // change nothing.
    broker.push(ACK_TOPIC, &ack(2, vec![2]));
    eventually("ack through 2", || a.handle.outbox().depth() == 1).await;
    broker.push(ACK_TOPIC, &ack(1, vec![]));
    broker.push(ACK_TOPIC, &ack(2, vec![2]));
    eventually("two more acks", || a.handle.ack_stats().accepted == 3).await;
    let entries = a.handle.outbox().entries().await.unwrap();
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    let dead = a.handle.outbox().dead_letters().await.unwrap();
    assert_eq!(dead[0].transaction().unwrap().txn_id, "b2");
    assert_eq!(a.handle.outbox().status().await.dead_letters, 1);

    // New transactions keep their order after it.
    a.accept("c", 2).await;
    let next: Vec<u64> = collect(&mut broker, 2)
        .await
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(next, [4, 5]);
    a.stop().await;
}

#[tokio::test]
async fn resends_from_the_lowest_unacked_seq_after_the_timeout() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), Duration::from_millis(300)).await;
    let a = Running::start(&pki, &broker, &outbox);
    a.accept("r", 4).await;
    assert_eq!(collect(&mut broker, 4).await, ids("r", 4));
    // No ack: everything comes again, in order.
    assert_eq!(collect(&mut broker, 4).await, ids("r", 4));
    // A partial ack: the resend starts after it.
    broker.push(ACK_TOPIC, &ack(2, vec![]));
    eventually("ack through 2", || a.handle.outbox().depth() == 2).await;
    let again = loop {
        let batch = collect(&mut broker, 1).await;
        if batch[0].0 != 1 {
            break batch;
        }
    };
    assert_eq!(again[0].0, 3);
    a.stop().await;
}

/// An ack that reports a gap above `through`.
fn gap_ack(through: u64) -> Vec<u8> {
    encode(&pb::TransactionAck {
        durable_through_seq: through,
        gap: true,
        ..Default::default()
    })
    .unwrap()
}

/// The first seq of every batch published until one carries `seq`.
async fn batch_starts_until(broker: &mut FakeBroker, seq: u64) -> Vec<u64> {
    let mut starts = Vec::new();
    loop {
        let batch = next_batch(broker).await;
        starts.push(batch[0].seq);
        if batch.iter().any(|t| t.seq == seq) {
            return starts;
        }
    }
}

#[tokio::test]
async fn a_reported_gap_resends_at_once_and_only_once_per_watermark() {
    // The resend timeout is an hour: only the gap report can cause a resend here.
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), HOUR).await;
    let a = Running::start(&pki, &broker, &outbox);
    a.accept("g", 3).await;
    assert_eq!(collect(&mut broker, 3).await, ids("g", 3));
    // The controller stored a later batch but not the one with seq 1.
    broker.push(ACK_TOPIC, &gap_ack(0));
    assert_eq!(
        collect(&mut broker, 3).await,
        ids("g", 3),
        "resent from seq 1"
    );
    // Acks of batches sent before that resend report the same gap: no second resend.
    broker.push(ACK_TOPIC, &gap_ack(0));
    eventually("second gap ack taken in", || {
        a.handle.ack_stats().accepted == 2
    })
    .await;
    a.accept("h", 1).await;
    assert_eq!(batch_starts_until(&mut broker, 4).await, [4]);
    // A gap above a new watermark is a new loss: resent from there.
    broker.push(ACK_TOPIC, &gap_ack(1));
    eventually("ack through 1", || a.handle.outbox().depth() == 3).await;
    let resent: Vec<u64> = collect(&mut broker, 3)
        .await
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(resent, [2, 3, 4]);
    a.stop().await;
}

#[tokio::test]
async fn a_retry_after_holds_new_batches_then_resends_everything_unacked() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), HOUR).await;
    let a = Running::start(&pki, &broker, &outbox);
    a.accept("w", 2).await;
    assert_eq!(collect(&mut broker, 2).await, ids("w", 2));
    // The controller refused a batch: hold on for ~1 s, then send again.
    let notice = encode(&pb::TransactionAck {
        retry_after_ms: 1000,
        ..Default::default()
    })
    .unwrap();
    broker.push(ACK_TOPIC, &notice);
    eventually("retry-after taken in", || {
        a.handle.ack_stats().accepted == 1
    })
    .await;
    a.accept("x", 1).await;
    // Seq 3 does not go out on its own during the hold: the first batch after it starts
    // again from the lowest unacknowledged seq (were the accept slower than the hold, seq 3
    // would follow in a batch of its own, after that one).
    let starts = batch_starts_until(&mut broker, 3).await;
    assert_eq!(starts[0], 1, "batches started at {starts:?}");
    assert_eq!(
        a.handle.outbox().depth(),
        3,
        "a retry-after acknowledges nothing"
    );
    broker.push(ACK_TOPIC, &ack(3, vec![]));
    eventually("all acknowledged", || a.handle.outbox().depth() == 0).await;
    a.stop().await;
}

#[tokio::test]
async fn a_network_cut_resends_everything_unacked_in_order() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), HOUR).await;
    let a = Running::start(&pki, &broker, &outbox);
    a.accept("n", 3).await;
    assert_eq!(collect(&mut broker, 3).await, ids("n", 3));

    // The network goes down; the terminal keeps accepting.
    broker.set_refuse(true);
    broker.kick();
    eventually("disconnected", || !a.handle.is_connected()).await;
    for i in 4..=6 {
        a.handle
            .intake()
            .accept(sale(&format!("n{i}"), 100))
            .await
            .unwrap();
    }
    broker.set_refuse(false);
    // After the reconnect: 1..=6 from the lowest unacked seq, in order, no gap.
    let resent = collect(&mut broker, 6).await;
    assert_eq!(resent, ids("n", 6));
    broker.push(ACK_TOPIC, &ack(6, vec![]));
    eventually("all acknowledged", || a.handle.outbox().depth() == 0).await;
    a.stop().await;
}

#[tokio::test]
async fn entries_accepted_but_never_published_are_sent_after_a_restart() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    broker.set_refuse(true);
    let tmp = tempfile::tempdir().unwrap();
    {
        let outbox = open(tmp.path(), HOUR).await;
        let a = Running::start(&pki, &broker, &outbox);
        a.accept("k", 3).await;
        // Stopped abruptly before anything could be published: the store is all that is
        // left (the kill -9 harness checks the store itself survives SIGKILL).
        a.cancel.cancel();
        a.tracker.close();
        tokio::time::timeout(WAIT, a.tracker.wait()).await.unwrap();
        drop(a);
        outbox.close().await;
    }
    broker.set_refuse(false);
    let outbox = open(tmp.path(), HOUR).await;
    let a = Running::start(&pki, &broker, &outbox);
    assert_eq!(collect(&mut broker, 3).await, ids("k", 3));
    // The sequence goes on where it was.
    a.accept("m", 1).await;
    assert_eq!(collect(&mut broker, 1).await, [(4, "m1".to_owned())]);
    a.stop().await;
}

#[tokio::test]
async fn heartbeats_report_the_outbox_depth_and_dead_letters() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tmp = tempfile::tempdir().unwrap();
    let outbox = open(tmp.path(), HOUR).await;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let handle = agent(&pki, &broker, Duration::from_millis(100), HOUR, &outbox)
        .spawn(&tracker, cancel.clone())
        .unwrap();
    for i in 0..2 {
        handle
            .intake()
            .accept(sale(&format!("h{i}"), 1))
            .await
            .unwrap();
    }
    let sent: Vec<u64> = collect(&mut broker, 2)
        .await
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(sent, [1, 2]);
    loop {
        let hb = decode::<pb::Heartbeat>(&next_on(&mut broker, "hb").await).unwrap();
        if hb.outbox_depth == 2 {
            assert_eq!(hb.dead_letters, 0);
            break;
        }
    }
    // The controller stores seq 1 and refuses seq 2 as a conflict: the heartbeat reports an
    // empty outbox and one dead letter.
    broker.push(ACK_TOPIC, &ack(2, vec![2]));
    loop {
        let hb = decode::<pb::Heartbeat>(&next_on(&mut broker, "hb").await).unwrap();
        if hb.dead_letters == 1 {
            assert_eq!(hb.outbox_depth, 0);
            break;
        }
    }
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
}

/// The first transaction of a terminal whose outbox was empty at start is sent even when it is
/// committed while the sender is still reading the outbox. The interleaving is forced: one
/// blocking thread, so a marker task queued after the sender's read runs once the read is
/// done; meanwhile the runtime's only thread is held, so the sender cannot resume before the
/// transaction is committed (from another thread).
#[test]
fn a_transaction_committed_while_the_sender_starts_is_sent() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .unwrap();
    runtime.block_on(async {
        let pki = TestPki::new();
        let mut broker = FakeBroker::start(&pki).await;
        let tmp = tempfile::tempdir().unwrap();
        let outbox = open(tmp.path(), HOUR).await;
        let a = Running::start(&pki, &broker, &outbox);
        // Every agent task runs up to its first wait: the sender has queued its outbox read.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let (done, read_finished) = std::sync::mpsc::channel();
        drop(tokio::task::spawn_blocking(move || done.send(()).unwrap()));
        read_finished.recv_timeout(WAIT).unwrap();
        let intake = a.handle.intake().clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(intake.accept(sale("race-1", 100)))
                .unwrap()
        })
        .join()
        .unwrap();
        let sent = tokio::time::timeout(WAIT, collect(&mut broker, 1)).await;
        assert_eq!(sent.expect("seq 1 is published"), ids("race-", 1));
        a.stop().await;
    });
}
