//! The controller-lag gate (`lag.rs`) through real mTLS terminals, the uplink lanes, the
//! router and the embedded controller's local link, with a controller log of two 1 KiB
//! segments (rumqttd's smallest) so a stalled controller overruns it quickly.

use std::collections::{HashMap, HashSet};

use posfleet_proto::Channel;
use posfleet_runtime::mqtt::SessionEvent;
use rumqttc::{Event, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tests::{Fixture, WAIT, closed, connack, topic};
use super::*;
use crate::bus::Bus;

/// rumqttd refuses segments below 1 KiB.
const SEGMENT: usize = 1024;

fn small_ring(config: &mut EdgeConfig) {
    config.router.controller_segment_size = SEGMENT;
    config.router.controller_segment_count = 2;
    // The tests reconnect a terminal after each refusal, as its agent would.
    config.rate_limit.max_connects = 10_000;
}

/// The embedded controller on `fx`'s router, attached; its consumer reads nothing until the
/// test reads `events` (one event fits in the channel, one more is held by the link task).
async fn embedded_controller(
    fx: &Fixture,
    tracker: &TaskTracker,
) -> (Bus, mpsc::Receiver<SessionEvent>, CancellationToken) {
    crate::bus::tests::attach_local(fx.edge.clone(), 1, tracker).await
}

/// What one terminal connection got through.
struct Published {
    /// Payloads the edge PUBACKed.
    acked: Vec<Vec<u8>>,
    /// The edge closed the connection before every uplink was acknowledged.
    closed: bool,
}

/// One connection of terminal `id` publishing `payloads` at QoS 1 (telemetry) as fast as
/// rumqttc sends them, until every one is acknowledged or the connection breaks.
async fn publish_all(fx: &Fixture, id: &str, payloads: Vec<Vec<u8>>) -> Published {
    let cert = fx.device_cert(id);
    let (client, mut eventloop) = fx.client(id, Some(&cert), None);
    if let Err(error) = connack(&mut eventloop).await {
        return Published {
            acked: Vec::new(),
            closed: !error.is_empty(),
        };
    }
    let count = payloads.len();
    let tm = topic(id, Channel::Telemetry);
    let feeder = tokio::spawn({
        let payloads = payloads.clone();
        async move {
            for payload in payloads {
                if client
                    .publish(tm.as_str(), QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    // rumqttc reuses packet ids once acknowledged: the latest send of each id is the one.
    let (mut sent, mut in_flight) = (0usize, HashMap::new());
    let mut acked = Vec::new();
    let closed = tokio::time::timeout(WAIT, async {
        while acked.len() < count {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    in_flight.insert(pkid, sent);
                    sent += 1;
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let n = in_flight.remove(&ack.pkid).expect("a PUBACK for a sent id");
                    acked.push(payloads[n].clone());
                }
                Ok(_) => {}
                Err(_) => return true,
            }
        }
        false
    })
    .await
    .expect("every uplink is acknowledged or the connection closed");
    feeder.abort();
    Published { acked, closed }
}

/// Starts reading the controller's events again; uplink payloads come out of the channel.
fn resume(mut events: mpsc::Receiver<SessionEvent>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16 * 1024);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let SessionEvent::Message { payload, .. } = event
                && tx.send(payload.to_vec()).await.is_err()
            {
                return;
            }
        }
    });
    rx
}

/// Publishes `last` from terminal `id` until the edge acknowledges it (each refusal closes the
/// connection; the next attempt is a new connection, as a terminal's reconnect would be).
async fn publish_acknowledged(fx: &Fixture, id: &str, last: &[u8]) {
    tokio::time::timeout(WAIT, async {
        loop {
            let published = publish_all(fx, id, vec![last.to_vec()]).await;
            if published.acked.len() == 1 {
                return;
            }
            // A terminal's back-off (not a bound on anything).
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the edge takes an uplink again once the controller reads");
}

/// Reads the controller's uplinks until `last`; returns every payload before it.
async fn received_until(seen: &mut mpsc::Receiver<Vec<u8>>, last: &[u8]) -> HashSet<Vec<u8>> {
    let mut got = HashSet::new();
    loop {
        let payload = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("the last uplink reaches the controller")
            .expect("controller running");
        if payload == last {
            return got;
        }
        got.insert(payload);
    }
}

fn payloads(id: &str, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| format!("{id}:{i:04}:{}", "x".repeat(40)).into_bytes())
        .collect()
}

/// Regression (issue 11, item 6): the router PUBACKs an uplink when it is in its in-memory
/// log; a controller that stops reading used to lose the oldest of them silently when the
/// log wrapped. Now the edge refuses uplinks beyond the gate's margin (counted, the
/// connection closed, never acknowledged), and every acknowledged one reaches the controller
/// once it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_controller_loses_no_acknowledged_uplink() {
    let fx = Fixture::start_with(small_ring).await;
    let tracker = TaskTracker::new();
    let (bus, events, _cancel) = embedded_controller(&fx, &tracker).await;

    const COUNT: usize = 600; // ~45 KiB through a 2 KiB log
    let published = publish_all(&fx, "LAG-1", payloads("LAG-1", COUNT)).await;
    let acked = published.acked.len();

    // The controller reads again; a last uplink of the same terminal (same lane, so after
    // every earlier one) marks the end of what it can receive.
    let mut seen = resume(events);
    publish_acknowledged(&fx, "LAG-1", b"last").await;
    let got = received_until(&mut seen, b"last").await;
    let lost: Vec<_> = published
        .acked
        .iter()
        .filter(|p| !got.contains(*p))
        .map(|p| String::from_utf8_lossy(&p[..11]).into_owned())
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {acked} PUBACKed uplinks never reached the controller (first: {:?})",
        lost.len(),
        lost.first()
    );
    assert!(
        published.closed && acked < COUNT,
        "the edge refused nothing ({acked} of {COUNT} acknowledged)"
    );
    assert!(fx.metrics.uplinks_refused("controller_behind") > 0);
    // Caught up: the gate's book is empty again (the lanes' markers taken too).
    eventually("the lag is back to 0", || {
        fx.edge.controller_intake().lag() == 0 && fx.metrics.edge_controller_lag_bytes.get() == 0
    })
    .await;
    bus.disconnect().await;
    fx.stop().await;
}

/// While the gate is shut, a malformed or oversized uplink is still refused by the ACL (its
/// own reason, connection closed), before the gate counts anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_refuses_first_while_the_gate_is_shut() {
    let fx = Fixture::start_with(small_ring).await;
    let tracker = TaskTracker::new();
    let (bus, events, _cancel) = embedded_controller(&fx, &tracker).await;
    let published = publish_all(&fx, "LAG-2", payloads("LAG-2", 600)).await;
    assert!(published.closed, "the gate shut");
    let behind = fx.metrics.uplinks_refused("controller_behind");

    let cert = fx.device_cert("LAG-3");
    let (client, mut eventloop) = fx.client("LAG-3", Some(&cert), None);
    connack(&mut eventloop).await.unwrap();
    let too_large = vec![0u8; Channel::Heartbeat.max_payload() + 1];
    client
        .publish(
            topic("LAG-3", Channel::Heartbeat),
            QoS::AtLeastOnce,
            false,
            too_large,
        )
        .await
        .unwrap();
    closed(&mut eventloop).await;
    assert_eq!(fx.metrics.acl_refusals("oversized_payload"), 1);

    let (client, mut eventloop) = fx.client("LAG-3", Some(&cert), None);
    connack(&mut eventloop).await.unwrap();
    client
        .publish(
            topic("LAG-2", Channel::Heartbeat),
            QoS::AtLeastOnce,
            false,
            b"x".to_vec(),
        )
        .await
        .unwrap();
    closed(&mut eventloop).await;
    assert_eq!(fx.metrics.acl_refusals("publish_not_allowed"), 1);

    assert_eq!(fx.metrics.uplinks_refused("controller_behind"), behind);
    drop(events);
    bus.disconnect().await;
    fx.stop().await;
}

/// The resync rule: a book that drifted (here: every lane believes more is unread than the
/// router holds, as when the router lost uplinks anyway) shuts the gate only until the
/// controller takes the lanes' next markers; it does not stay shut while the controller
/// reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_book_is_resynced_and_the_gate_reopens() {
    let fx = Fixture::start_with(small_ring).await;
    let tracker = TaskTracker::new();
    let (bus, events, _cancel) = embedded_controller(&fx, &tracker).await;
    let mut seen = resume(events);
    let intake = fx.edge.controller_intake();
    // The next marker taken would undo the drift: none is sent until the refusal is seen,
    // and none is still on its way when the drift is made (a marker in flight is lag).
    intake.hold_markers(true);
    eventually("no marker is in flight", || intake.lag() == 0).await;
    intake.drift(4 * SEGMENT as i64);

    let refused = publish_all(&fx, "LAG-4", vec![b"refused".to_vec()]).await;
    assert!(refused.acked.is_empty() && refused.closed);
    assert_eq!(fx.metrics.uplinks_refused("controller_behind"), 1);
    intake.hold_markers(false);

    publish_acknowledged(&fx, "LAG-4", b"taken").await;
    received_until(&mut seen, b"taken").await;
    eventually("the book is balanced again", || {
        intake.lag() == 0 && fx.metrics.edge_controller_lag_bytes.get() == 0
    })
    .await;
    bus.disconnect().await;
    fx.stop().await;
}

/// Polls `cond` until it holds; panics after [`WAIT`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}
