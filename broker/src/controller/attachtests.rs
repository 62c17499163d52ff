//! The controller on either of its buses (a local router link, or an MQTT session to a
//! broker): shutdown still delivers the transaction committer's final acknowledgements.
//! (A batch is held in its commit when the stop comes; the ack must still reach the
//! terminal. Before the bus got its own token, the MQTT session ended with the stop and the
//! ack was lost.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::{Channel, DeviceId, Topic, decode, encode, pb};
use posfleet_runtime::mqtt::{QoS, SessionEvent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ControllerConfig, spawn_controller};
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryConfig};
use crate::txstore::{SyncHook, TxStore, TxStoreConfig, test_sale};

use crate::bus::tests::{BareEdge, WAIT};

/// A commit held after its fsync until released; `entered` fires when one is held.
fn held_commits() -> (
    SyncHook,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let entered_tx = Mutex::new(entered_tx);
    let release_rx = Mutex::new(release_rx);
    let hook: SyncHook = Arc::new(move || {
        let _ = entered_tx.lock().unwrap().send(());
        let _ = release_rx.lock().unwrap().recv_timeout(WAIT);
    });
    (hook, entered_rx, release_tx)
}

/// A terminal's batch is being committed when the controller is told to stop: the
/// acknowledgement still reaches the terminal, and then every controller task ends.
async fn final_acks_reach_the_terminal(config: impl FnOnce(&BareEdge) -> ControllerConfig) {
    let edge = BareEdge::start(|_| {}).await;
    let registry = Registry::open(RegistryConfig {
        cache_capacity: 1 << 20,
        ..RegistryConfig::new(edge.dir.join("registry"))
    })
    .unwrap();
    let (hook, entered, release) = held_commits();
    let transactions = TxStore::open(TxStoreConfig {
        cache_capacity: 1 << 20,
        after_sync: Some(hook),
        ..TxStoreConfig::new(edge.dir.join("transactions"))
    })
    .unwrap();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let controller = spawn_controller(
        config(&edge),
        registry,
        transactions,
        crate::commands::tests::plane(&edge.dir),
        EventBus::new(64),
        Arc::new(Metrics::new()),
        &tracker,
        cancel.clone(),
    )
    .unwrap();

    let device = DeviceId::new("T-final").unwrap();
    let (mqtt, mut inbox) = edge.terminal(&device);
    let up = Topic::for_device(&device, Channel::Transactions);
    let batch = encode(&pb::TransactionBatch {
        transactions: vec![test_sale(1, 100)],
    })
    .unwrap();
    // (Re)send until a commit holds it: the controller's subscription may come after ours.
    let mut entered = Some(entered);
    let mut connected = false;
    tokio::time::timeout(WAIT, async {
        loop {
            if connected {
                mqtt.publish(&up, batch.clone(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            let held = entered.take().unwrap();
            let (held, got) = tokio::task::spawn_blocking(move || {
                let got = held.recv_timeout(Duration::from_millis(300)).is_ok();
                (held, got)
            })
            .await
            .unwrap();
            entered = Some(held);
            if got {
                return;
            }
            while let Ok(event) = inbox.try_recv() {
                connected |= matches!(event, SessionEvent::Connected { .. });
            }
        }
    })
    .await
    .expect("the batch reaches the committer");

    // Stop the controller while the commit is held, then let the commit finish.
    cancel.cancel();
    for _ in 0..8 {
        let _ = release.send(());
    }
    let ack = tokio::time::timeout(WAIT, async {
        loop {
            match inbox.recv().await {
                Some(SessionEvent::Message { topic, payload })
                    if topic.channel() == Channel::TransactionAck =>
                {
                    return decode::<pb::TransactionAck>(&payload).unwrap();
                }
                Some(_) => {}
                None => panic!("the terminal's session ended"),
            }
        }
    })
    .await
    .expect("the final acknowledgement reaches the terminal after the stop");
    assert_eq!(ack.durable_through_seq, 1);
    let over_local_link = matches!(controller.bus, crate::bus::Bus::Local(_));
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait())
        .await
        .expect("every controller task ends");
    assert!(controller.bus.is_closed());
    // Over the local link, the terminal is the only connection the edge ever had.
    let connects = edge.metrics.edge_connects_total.get();
    assert_eq!(connects, if over_local_link { 1 } else { 2 });
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_acks_go_out_at_shutdown_over_the_local_link() {
    final_acks_reach_the_terminal(|edge| ControllerConfig::local(edge.edge.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_acks_go_out_at_shutdown_over_an_external_broker() {
    final_acks_reach_the_terminal(|edge| {
        let port = edge.edge.local_addr().port();
        ControllerConfig::from_pki("127.0.0.1", port, &edge.pki).unwrap()
    })
    .await;
}
