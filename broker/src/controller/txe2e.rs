//! End to end through the real process: `app::start` (edge, controller, stores) and a
//! terminal's own MQTT session with its fleet certificate. A batch goes up on `up/tx`; the
//! acknowledgement comes back on `down/txack` once the batch is durable, and the transaction
//! shows up in the store and on the live stream.

use std::time::Duration;

use posfleet_proto::{Channel, DeviceId, Topic, decode, encode, pb};
use posfleet_runtime::mqtt::{QoS, SessionEvent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::e2e_support::terminal_session;
use crate::app::{SHUTDOWN_GRACE, ServeOptions, start};
use crate::txstore::test_sale;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_its_ack_over_mqtt_after_the_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions::loopback(tmp.path().join("data"));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let running = start(&opts, &tracker, cancel.clone()).await.unwrap();

    let device = DeviceId::new("T-e2e").unwrap();
    let (mqtt, mut inbox) = terminal_session(&opts, &running, &device, &tracker, &cancel);

    let batch = pb::TransactionBatch {
        transactions: vec![test_sale(1, 100), test_sale(2, 250)],
    };
    let up = Topic::for_device(&device, Channel::Transactions);
    let ack = tokio::time::timeout(Duration::from_secs(20), async {
        let mut subscribed = false;
        loop {
            // (Re)send until acknowledged: the controller's subscription may come after ours.
            if subscribed {
                mqtt.publish(&up, encode(&batch).unwrap(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            let wait = tokio::time::timeout(Duration::from_millis(500), inbox.recv());
            match wait.await {
                Ok(Some(SessionEvent::Message { topic, payload }))
                    if topic.channel() == Channel::TransactionAck =>
                {
                    return decode::<pb::TransactionAck>(&payload).unwrap();
                }
                Ok(Some(SessionEvent::Connected { .. })) => subscribed = true,
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => panic!("the terminal's session ended"),
            }
        }
    })
    .await
    .expect("a TransactionAck arrives");
    assert_eq!(ack.durable_through_seq, 2);
    assert!(ack.rejected_seqs.is_empty());
    // Acknowledged means durable: the store says so too.
    assert_eq!(running.transactions.durable_through(&device), 2);
    let summary = running.transactions.summary(&device).unwrap().unwrap();
    assert_eq!(summary.approved_amount_minor["EUR"], 350);
    let text = running.metrics.render();
    assert!(text.contains("posfleet_tx_stored_total 2"), "{text}");

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .expect("everything stops");
}
