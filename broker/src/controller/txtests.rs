//! Transaction ingest tests: `Ingest::handle` with encoded batches (and malformed bytes), the
//! committer with a recording ack sink, the order of fsync and acknowledgement, shutdown,
//! and the gap watcher.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::gapwatch::GapWatch;
use super::txcommit::{AckSink, Committer, acks_for};
use super::txqueue::{TxConfig, TxQueue};
use super::{Ingest, IngestError};
use crate::events::{EventBus, EventSubscription};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryConfig};
use crate::txstore::{DeviceOutcome, TxStore, TxStoreConfig, test_sale};
use crate::views::{AlertKind, FleetEvent};

/// Records acknowledgements, and appends "ack" to a shared log. With a gate, every publish
/// first waits for a permit of it (a slow path to the router).
#[derive(Clone, Default)]
struct Recorder {
    acks: Arc<Mutex<Vec<(String, pb::TransactionAck)>>>,
    log: Arc<Mutex<Vec<&'static str>>>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl AckSink for Recorder {
    async fn publish_ack(&self, device: &DeviceId, ack: &pb::TransactionAck) -> Result<(), String> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.map_err(|e| e.to_string())?.forget();
        }
        self.log.lock().unwrap().push("ack");
        self.acks
            .lock()
            .unwrap()
            .push((device.to_string(), ack.clone()));
        Ok(())
    }
}

impl Recorder {
    fn acks(&self) -> Vec<(String, pb::TransactionAck)> {
        self.acks.lock().unwrap().clone()
    }
}

struct Harness {
    ingest: Ingest,
    store: Arc<TxStore>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    events: EventSubscription,
    stop: CancellationToken,
    done: CancellationToken,
    tracker: TaskTracker,
    _tmp: tempfile::TempDir,
}

fn store_at(dir: &std::path::Path, hook: Option<crate::txstore::SyncHook>) -> Arc<TxStore> {
    TxStore::open(TxStoreConfig {
        cache_capacity: 1 << 20,
        after_sync: hook,
        ..TxStoreConfig::new(dir.join("transactions"))
    })
    .unwrap()
}

impl Harness {
    fn start(cfg: TxConfig, hook: Option<crate::txstore::SyncHook>, log: Recorder) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let registry = Registry::open(RegistryConfig {
            cache_capacity: 1 << 20,
            ..RegistryConfig::new(tmp.path().join("registry"))
        })
        .unwrap();
        let store = store_at(tmp.path(), hook);
        let events = EventBus::new(256);
        let subscription = events.subscribe();
        let metrics = Arc::new(Metrics::new());
        let (queue, rx) = TxQueue::new(&cfg);
        let ingest =
            Ingest::new(registry, events.clone(), Arc::clone(&metrics)).with_transactions(queue);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let done = Committer {
            store: Arc::clone(&store),
            acks: log.clone(),
            events,
            metrics: Arc::clone(&metrics),
            cfg,
        }
        .spawn(rx, &tracker, stop.clone());
        Self {
            ingest,
            store,
            recorder: log,
            metrics,
            events: subscription,
            stop,
            done,
            tracker,
            _tmp: tmp,
        }
    }

    fn send(&self, device: &str, txs: Vec<pb::Transaction>) -> Result<(), IngestError> {
        let payload = encode(&pb::TransactionBatch { transactions: txs }).unwrap();
        self.send_raw(device, &payload)
    }

    fn send_raw(&self, device: &str, payload: &[u8]) -> Result<(), IngestError> {
        let topic = Topic::for_device(&DeviceId::new(device).unwrap(), Channel::Transactions);
        self.ingest.handle(&topic, payload, 5_000)
    }

    async fn wait_acks(&self, n: usize) -> Vec<(String, pb::TransactionAck)> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let acks = self.recorder.acks();
                if acks.len() >= n {
                    return acks;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} acks: {:?}", self.recorder.acks()))
    }

    async fn stop(self) -> (Arc<TxStore>, Recorder) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.done.cancelled())
            .await
            .expect("the committer stops");
        self.tracker.close();
        self.tracker.wait().await;
        (self.store, self.recorder)
    }

    fn drain_events(&mut self) -> Vec<FleetEvent> {
        std::iter::from_fn(|| self.events.try_recv()).collect()
    }
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn ack(dts: u64, rejected: &[u64]) -> pb::TransactionAck {
    pb::TransactionAck {
        durable_through_seq: dts,
        rejected_seqs: rejected.to_vec(),
        ..pb::TransactionAck::default()
    }
}

/// An acknowledgement that also says the device has records above a missing seq.
fn gap_ack(dts: u64, rejected: &[u64]) -> pb::TransactionAck {
    pb::TransactionAck {
        gap: true,
        ..ack(dts, rejected)
    }
}

#[tokio::test]
async fn out_of_order_and_duplicated_batches_are_stored_once_and_acked_cumulatively() {
    let h = Harness::start(TxConfig::default(), None, Recorder::default());
    h.send("T-1", vec![test_sale(3, 300), test_sale(4, 400)])
        .unwrap();
    // Seqs 1 and 2 are missing below what was stored: the ack says so.
    assert_eq!(h.wait_acks(1).await[0], ("T-1".into(), gap_ack(0, &[])));
    h.send("T-1", vec![test_sale(1, 100), test_sale(2, 200)])
        .unwrap();
    assert_eq!(h.wait_acks(2).await[1], ("T-1".into(), ack(4, &[])));
    // The terminal missed the ack and resends: answered again, stored once.
    h.send("T-1", vec![test_sale(1, 100), test_sale(2, 200)])
        .unwrap();
    assert_eq!(h.wait_acks(3).await[2], ("T-1".into(), ack(4, &[])));
    let summary = h.store.summary(&id("T-1")).unwrap().unwrap();
    assert_eq!((summary.count, summary.durable_through_seq), (4, 4));
    assert_eq!(summary.approved_amount_minor["EUR"], 1000);
    assert_eq!(h.metrics.tx_stored_total.get(), 4);
    assert_eq!(h.metrics.tx_duplicates_total.get(), 2);
    assert_eq!(h.metrics.tx_acks_total.get(), 3);
    h.stop().await;
}

#[tokio::test]
async fn the_device_is_the_topics_whatever_the_records_say() {
    let h = Harness::start(TxConfig::default(), None, Recorder::default());
    // A record cannot name a device (there is no such field); text that looks like one
    // stays text, and the batch is stored under the topic's device only.
    let mut forged = test_sale(1, 100);
    forged.merchant_id = "T-2".into();
    forged.store_id = "posfleet/v1/d/T-2/up/tx".into();
    h.send("T-1", vec![forged]).unwrap();
    let acks = h.wait_acks(1).await;
    assert_eq!(acks, vec![("T-1".into(), ack(1, &[]))]);
    assert!(h.store.summary(&id("T-2")).unwrap().is_none());
    let stored = h.store.summary(&id("T-1")).unwrap().unwrap();
    assert_eq!(stored.count, 1);
    // Unknown fields (say, a "device" field of a future or forged schema) are dropped.
    let mut bytes = encode(&pb::TransactionBatch {
        transactions: vec![test_sale(2, 200)],
    })
    .unwrap();
    // Append field 99 (string "T-2") inside the transaction: re-encode by hand.
    let mut tx = test_sale(2, 200).encode_to_vec();
    tx.extend_from_slice(&[0x9a, 0x06, 3, b'T', b'-', b'2']);
    bytes.clear();
    bytes.push(0x0a);
    prost::encoding::encode_varint(tx.len() as u64, &mut bytes);
    bytes.extend_from_slice(&tx);
    h.send_raw("T-1", &bytes).unwrap();
    assert_eq!(h.wait_acks(2).await[1], ("T-1".into(), ack(2, &[])));
    // The resend of the clean encoding is a duplicate: the unknown field was not stored.
    h.send("T-1", vec![test_sale(2, 200)]).unwrap();
    assert_eq!(h.wait_acks(3).await[2], ("T-1".into(), ack(2, &[])));
    assert_eq!(h.metrics.tx_duplicates_total.get(), 1);
    h.stop().await;
}

#[tokio::test]
async fn a_conflict_is_refused_reported_in_the_ack_and_alerted() {
    let mut h = Harness::start(TxConfig::default(), None, Recorder::default());
    h.send("T-1", vec![test_sale(1, 100), test_sale(2, 200)])
        .unwrap();
    h.wait_acks(1).await;
    let mut other = test_sale(2, 999);
    other.txn_id = "txn-other".into();
    h.send("T-1", vec![test_sale(1, 100), other, test_sale(3, 300)])
        .unwrap();
    assert_eq!(h.wait_acks(2).await[1], ("T-1".into(), ack(3, &[2])));
    let summary = h.store.summary(&id("T-1")).unwrap().unwrap();
    assert_eq!(summary.conflicts, 1);
    assert_eq!(summary.recent_conflicts[0].txn_id, "txn-other");
    assert_eq!(summary.approved_amount_minor["EUR"], 600);
    assert_eq!(h.metrics.tx_conflicts_total.get(), 1);
    let alerts: Vec<_> = h
        .drain_events()
        .into_iter()
        .filter_map(|e| match e {
            FleetEvent::Alert { alert, seq, .. } => Some((alert, seq)),
            _ => None,
        })
        .collect();
    assert_eq!(alerts, vec![(AlertKind::TransactionConflict, Some(2))]);
    h.stop().await;
}

#[tokio::test]
async fn bad_batches_change_nothing_and_are_counted() {
    let mut h = Harness::start(TxConfig::default(), None, Recorder::default());
    let malformed = h.send_raw("T-1", &[0x0a, 0x7f, 0x01]).unwrap_err();
    assert_eq!(malformed.reason(), "malformed");
    let oversized = vec![0u8; Channel::Transactions.max_payload() + 1];
    assert_eq!(
        h.send_raw("T-1", &oversized).unwrap_err().reason(),
        "too_large"
    );
    // One invalid record refuses the whole batch (and says which seq).
    let mut bad = test_sale(2, 200);
    bad.currency = "euro".into();
    let invalid = h.send("T-1", vec![test_sale(1, 100), bad]).unwrap_err();
    assert_eq!(invalid.reason(), "invalid");
    assert!(invalid.to_string().contains("seq 2"), "{invalid}");
    let mut pan = test_sale(1, 100);
    pan.masked_card = "4111111111111111".into();
    let refused = h.send("T-1", vec![pan]).unwrap_err();
    assert!(
        !refused.to_string().contains("4111111111111111"),
        "{refused}"
    );
    assert!(h.send("T-1", vec![test_sale(0, 1)]).is_err());
    // Nothing reached the store; the good batch after them does.
    h.send("T-1", vec![test_sale(1, 100)]).unwrap();
    assert_eq!(h.wait_acks(1).await, vec![("T-1".into(), ack(1, &[]))]);
    let alerts = h
        .drain_events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                FleetEvent::Alert {
                    alert: AlertKind::InvalidTransactions,
                    ..
                }
            )
        })
        .count();
    assert_eq!(alerts, 3);
    let text = h.metrics.render();
    assert!(
        text.contains("posfleet_ingest_rejected_total{reason=\"invalid\"} 3"),
        "{text}"
    );
    h.stop().await;
}

#[tokio::test]
async fn no_ack_is_published_before_the_fsync_returned() {
    // The hook runs on the committer's blocking thread right after the fsync: hold it there
    // until the test says so.
    let recorder = Recorder::default();
    let log = Arc::clone(&recorder.log);
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let entered_tx = Mutex::new(entered_tx);
    let hook: crate::txstore::SyncHook = Arc::new(move || {
        log.lock().unwrap().push("fsync");
        let _ = entered_tx.lock().unwrap().send(());
        let _ = release_rx.lock().unwrap().recv();
    });
    let h = Harness::start(TxConfig::default(), Some(hook), recorder);
    h.send("T-1", vec![test_sale(1, 100)]).unwrap();
    tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
        .await
        .unwrap();
    // The commit is past its fsync but has not returned: nothing may be acknowledged yet,
    // however long we wait.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(h.recorder.acks().is_empty());
    assert_eq!(h.store.durable_through(&id("T-1")), 0, "not published yet");
    release_tx.send(()).unwrap();
    h.wait_acks(1).await;
    h.send("T-1", vec![test_sale(2, 100)]).unwrap();
    release_tx.send(()).unwrap();
    h.wait_acks(2).await;
    assert_eq!(
        *h.recorder.log.lock().unwrap(),
        vec!["fsync", "ack", "fsync", "ack"]
    );
    h.stop().await;
}

/// The committer hands a durable commit to the acknowledger and goes on with the next one:
/// acknowledgements that are slow to publish do not hold the store back, and they still
/// leave in commit order.
#[tokio::test]
async fn the_next_commit_does_not_wait_for_the_previous_acknowledgements() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let recorder = Recorder {
        gate: Some(Arc::clone(&gate)),
        ..Recorder::default()
    };
    let fsyncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&fsyncs);
    let hook: crate::txstore::SyncHook = Arc::new(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    // Longer than the waits below: a publish held at the gate does not time out meanwhile.
    let cfg = TxConfig {
        ack_timeout: Duration::from_secs(60),
        ..TxConfig::default()
    };
    let h = Harness::start(cfg, Some(hook), recorder);
    let fsynced = |n: usize| {
        let fsyncs = Arc::clone(&fsyncs);
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                while fsyncs.load(std::sync::atomic::Ordering::SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("commit {n} was not made durable while an ack was held"));
        }
    };
    h.send("T-1", vec![test_sale(1, 100)]).unwrap();
    fsynced(1).await;
    h.send("T-2", vec![test_sale(1, 100)]).unwrap();
    h.send("T-1", vec![test_sale(2, 100)]).unwrap();
    fsynced(2).await;
    assert!(h.recorder.acks().is_empty(), "every ack is still held");
    gate.add_permits(3);
    let acks = h.wait_acks(2).await;
    assert_eq!(acks[0], ("T-1".to_owned(), ack(1, &[])));
    let last_t1 = h
        .wait_acks(3)
        .await
        .into_iter()
        .filter(|(device, _)| device == "T-1")
        .map(|(_, a)| a.durable_through_seq)
        .collect::<Vec<_>>();
    assert_eq!(last_t1, vec![1, 2], "a device's acks leave in commit order");
    gate.add_permits(16);
    h.stop().await;
}

/// A sync hook that holds each commit after its fsync until the returned sender releases it
/// (or `at_most` passes).
fn held_commits(at_most: Duration) -> (crate::txstore::SyncHook, std::sync::mpsc::Sender<()>) {
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let hook: crate::txstore::SyncHook = Arc::new(move || {
        let _ = release_rx.lock().unwrap().recv_timeout(at_most);
    });
    (hook, release_tx)
}

#[tokio::test]
async fn stopping_commits_and_acknowledges_what_was_queued_then_refuses() {
    // A held commit lets batches pile up in the queue; stopping must still commit and ack
    // all of them.
    let (hook, release_tx) = held_commits(Duration::from_secs(5));
    let h = Harness::start(TxConfig::default(), Some(hook), Recorder::default());
    for seq in 1..=5 {
        h.send("T-1", vec![test_sale(seq, 100)]).unwrap();
    }
    h.stop.cancel();
    for _ in 0..5 {
        let _ = release_tx.send(());
    }
    let acks = h.wait_acks(1).await;
    tokio::time::timeout(Duration::from_secs(10), h.done.cancelled())
        .await
        .unwrap();
    let acks_after = h.recorder.acks();
    assert!(acks.len() <= acks_after.len());
    assert_eq!(acks_after.last().unwrap().1, ack(5, &[]));
    let refused = h.send("T-1", vec![test_sale(6, 100)]).unwrap_err();
    assert_eq!(refused.reason(), "shutting_down");
    let (store, _) = h.stop().await;
    assert_eq!(store.durable_through(&id("T-1")), 5);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_instead_of_waiting() {
    let cfg = TxConfig {
        max_queued_records: 1,
        ..TxConfig::default()
    };
    let (queue, _rx) = TxQueue::new(&cfg);
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::open(RegistryConfig {
        cache_capacity: 1 << 20,
        ..RegistryConfig::new(tmp.path().join("registry"))
    })
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let ingest =
        Ingest::new(registry, EventBus::new(8), Arc::clone(&metrics)).with_transactions(queue);
    let payload = encode(&pb::TransactionBatch {
        transactions: vec![test_sale(1, 1)],
    })
    .unwrap();
    let topic = Topic::for_device(&id("T-1"), Channel::Transactions);
    ingest.handle(&topic, &payload, 1).unwrap();
    let err = ingest.handle(&topic, &payload, 1).unwrap_err();
    assert_eq!(err.reason(), "overloaded");
}

/// A submission of one transaction with `seq` from `device`.
fn one(device: &str, seq: u64) -> crate::txstore::Submission {
    crate::txstore::Submission {
        device: id(device),
        received_at_ms: 1,
        records: vec![crate::txstore::ValidTx::try_from(test_sale(seq, 1)).unwrap()],
    }
}

#[tokio::test]
async fn a_thousand_terminals_with_four_small_batches_in_flight_are_all_queued() {
    // The queue is a budget of transactions and bytes: 4,000 one-transaction batches (a
    // thousand terminals, each with the agent's four batches in flight) fit, where a bound of
    // 1,024 batches refused three quarters of them and left every refused terminal with a gap.
    let (queue, _rx) = TxQueue::new(&TxConfig::default());
    let mut refused = 0;
    for terminal in 0..1000 {
        for seq in 1..=4 {
            if queue
                .try_submit(one(&format!("T-{terminal}"), seq), 300)
                .is_err()
            {
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 0, "batches refused below the budget");
    assert_eq!(queue.depth(), 4000);
}

#[tokio::test]
async fn the_budget_is_counted_in_transactions_and_in_bytes() {
    let cfg = TxConfig {
        max_queued_records: 10,
        max_queued_bytes: 1000,
        ..TxConfig::default()
    };
    let (queue, _rx) = TxQueue::new(&cfg);
    let many = crate::txstore::Submission {
        records: (1..=9)
            .map(|s| crate::txstore::ValidTx::try_from(test_sale(s, 1)).unwrap())
            .collect(),
        ..one("T-1", 1)
    };
    queue.try_submit(many, 100).unwrap();
    queue.try_submit(one("T-2", 1), 100).unwrap();
    // Ten transactions queued: the eleventh is refused although bytes remain.
    assert!(queue.try_submit(one("T-3", 1), 100).is_err());
    let (queue, _rx) = TxQueue::new(&cfg);
    queue.try_submit(one("T-1", 1), 900).unwrap();
    // 900 of 1,000 bytes queued: a 101-byte batch is refused although transactions remain.
    assert!(queue.try_submit(one("T-2", 1), 101).is_err());
    queue.try_submit(one("T-3", 1), 100).unwrap();
    // A batch larger than the whole budget is taken once the queue is empty, not never.
    let (queue, _rx) = TxQueue::new(&cfg);
    queue.try_submit(one("T-1", 1), 5000).unwrap();
}

#[tokio::test]
async fn a_refused_terminal_is_told_to_retry_after_a_while_once_per_period() {
    // Commits are held after their fsync until the test releases them, so what was queued
    // keeps its budget (the bound only matters if the test fails before releasing).
    let (hook, release_tx) = held_commits(Duration::from_secs(120));
    let cfg = TxConfig {
        max_queued_records: 2,
        retry_after: Duration::from_secs(600),
        ..TxConfig::default()
    };
    let h = Harness::start(cfg, Some(hook), Recorder::default());
    h.send("T-1", vec![test_sale(1, 100)]).unwrap();
    h.send("T-1", vec![test_sale(2, 100)]).unwrap();
    // The budget is spent: T-1's next two batches and T-2's are refused.
    for seq in [3, 4] {
        let refused = h.send("T-1", vec![test_sale(seq, 100)]).unwrap_err();
        assert_eq!(refused.reason(), "overloaded");
    }
    let refused = h.send("T-2", vec![test_sale(1, 100)]).unwrap_err();
    assert_eq!(refused.reason(), "overloaded");
    // One notice per refused terminal (in refusal order, so T-1's second refusal was handled
    // before T-2's notice went out), acknowledging nothing.
    let notice = pb::TransactionAck {
        retry_after_ms: 600_000,
        ..ack(0, &[])
    };
    let acks = h.wait_acks(2).await;
    assert_eq!(
        acks,
        vec![("T-1".into(), notice.clone()), ("T-2".into(), notice)]
    );
    assert_eq!(h.metrics.tx_retry_after_total.get(), 2);
    // The queued batches are committed and acknowledged as usual once the disk catches up.
    for _ in 0..4 {
        let _ = release_tx.send(());
    }
    let acks = h.wait_acks(3).await;
    assert_eq!(acks.last().unwrap().0, "T-1");
    let (store, recorder) = h.stop().await;
    assert_eq!(store.durable_through(&id("T-1")), 2);
    assert_eq!(recorder.acks().last().unwrap().1, ack(2, &[]));
}

#[tokio::test]
async fn gaps_raise_an_alert_after_the_grace_period_and_when_they_close() {
    let h = Harness::start(TxConfig::default(), None, Recorder::default());
    h.send("T-1", vec![test_sale(1, 1), test_sale(3, 3)])
        .unwrap();
    h.wait_acks(1).await;
    let mut watch = GapWatch::new(
        Arc::clone(&h.store),
        EventBus::new(8),
        Arc::clone(&h.metrics),
        Duration::from_secs(60),
    );
    // The batch was received at 5_000 ms (controller clock).
    assert!(watch.check(5_000 + 59_999).is_empty());
    let events = watch.check(5_000 + 60_000);
    assert!(
        matches!(
            events.as_slice(),
            [FleetEvent::Alert {
                alert: AlertKind::SequenceGap,
                seq: Some(2),
                ..
            }]
        ),
        "{events:?}"
    );
    assert_eq!(h.metrics.tx_devices_with_gaps.get(), 1);
    assert!(watch.check(5_000 + 120_000).is_empty(), "alerted once");
    let summary = h.store.summary(&id("T-1")).unwrap().unwrap();
    assert_eq!(summary.gaps.len(), 1);
    h.send("T-1", vec![test_sale(2, 2)]).unwrap();
    assert_eq!(h.wait_acks(2).await[1].1, ack(3, &[]));
    let events = watch.check(200_000);
    assert!(
        matches!(
            events.as_slice(),
            [FleetEvent::Alert {
                alert: AlertKind::SequenceGapClosed,
                ..
            }]
        ),
        "{events:?}"
    );
    let summary = h.store.summary(&id("T-1")).unwrap().unwrap();
    assert!(summary.gaps.is_empty() && summary.gap_since_ms.is_none());
    assert_eq!(h.metrics.tx_devices_with_gaps.get(), 0);
    h.stop().await;
}

#[test]
fn very_many_rejections_are_split_without_overclaiming() {
    let rejected: Vec<u64> = (1..=10_000).map(|i| i * 2).collect();
    let outcome = DeviceOutcome {
        device: id("T-1"),
        durable_through_seq: 30_000,
        rejected_seqs: rejected.clone(),
        stored: Vec::new(),
        duplicates: 0,
        new_conflicts: Vec::new(),
        gap: false,
    };
    let acks = acks_for(&outcome);
    assert_eq!(acks.len(), 3);
    let mut seen = Vec::new();
    for a in &acks {
        // Every rejection at or below an ack's watermark is in it or an earlier one.
        seen.extend_from_slice(&a.rejected_seqs);
        assert!(
            rejected
                .iter()
                .filter(|r| **r <= a.durable_through_seq)
                .all(|r| seen.contains(r))
        );
        assert!(encode(a).is_ok());
    }
    assert_eq!(seen, rejected);
    assert_eq!(acks.last().unwrap().durable_through_seq, 30_000);
    assert!(acks.iter().all(|a| !a.gap && a.retry_after_ms == 0));
    // With a gap above the watermark, only the ack that claims the watermark says so: below
    // it nothing is missing.
    let gapped = acks_for(&DeviceOutcome {
        gap: true,
        ..outcome
    });
    let flags: Vec<bool> = gapped.iter().map(|a| a.gap).collect();
    assert_eq!(flags, vec![false, false, true]);
}
