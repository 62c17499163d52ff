//! How the embedded controller is attached to its own process's router, end to end through
//! `app::start`: no TLS connection to its own edge, while a terminal's uplinks are ingested
//! and downlinks reach it.

use std::time::Duration;

use posfleet_proto::{Channel, DeviceId, Topic, decode, encode, pb};
use posfleet_runtime::mqtt::{QoS, SessionEvent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::e2e_support::terminal_session;
use crate::app::{SHUTDOWN_GRACE, ServeOptions, start};
use crate::txstore::test_sale;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_controller_holds_no_connection_to_its_own_edge() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions::loopback(tmp.path().join("data"));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let running = start(&opts, &tracker, cancel.clone()).await.unwrap();
    let edge = running.edge.clone().expect("embedded edge");

    let device = DeviceId::new("T-local").unwrap();
    let (mqtt, mut inbox) = terminal_session(&opts, &running, &device, &tracker, &cancel);
    let hb = pb::Heartbeat {
        seq: 1,
        interval_s: 30,
        ..Default::default()
    };
    let batch = pb::TransactionBatch {
        transactions: vec![test_sale(1, 100)],
    };
    // Uplinks in, a downlink (the TransactionAck) out.
    let ack = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match inbox.recv().await {
                Some(SessionEvent::Connected { .. }) => {
                    let up = |channel| Topic::for_device(&device, channel);
                    mqtt.publish(
                        &up(Channel::Heartbeat),
                        encode(&hb).unwrap(),
                        QoS::AtLeastOnce,
                    )
                    .await
                    .unwrap();
                    mqtt.publish(
                        &up(Channel::Transactions),
                        encode(&batch).unwrap(),
                        QoS::AtLeastOnce,
                    )
                    .await
                    .unwrap();
                }
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
    .expect("the terminal is acknowledged");
    assert_eq!(ack.durable_through_seq, 1);
    assert!(running.registry.detail(&device).unwrap().summary.online);

    // The terminal is the only connection the edge ever accepted.
    assert_eq!(edge.live_sessions(), 1, "live sessions on the edge");
    assert_eq!(
        running.metrics.edge_connects_total.get(),
        1,
        "connections the edge accepted"
    );
    assert_eq!(running.metrics.edge_connections.get(), 1);

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .expect("everything stops");
}
