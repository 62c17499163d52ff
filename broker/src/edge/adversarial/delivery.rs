//! The edge's own delivery to terminals (ADR 0013), through real sockets: redelivery across a
//! takeover, a revocation in the middle of a delivery, a terminal that never reads, and the
//! per-terminal uplink rate limit.

use posfleet_proto::Channel;
use posfleet_proto::DeviceId;
use posfleet_proto::pki::Identity;
use rumqttc::QoS;
use tokio::net::TcpSocket;

use super::raw::{self, Raw};
use super::{Harness, eventually};
use crate::edge::UplinkRate;
use crate::edge::devices::{MAX_INFLIGHT, MAX_QUEUED};
use crate::edge::tests::{Fixture, WAIT, topic};
use crate::metrics::ReasonLabel;

fn dropped(h: &Harness, reason: &'static str) -> u64 {
    h.metrics()
        .edge_downlinks_dropped_total
        .get_or_create(&ReasonLabel { reason })
        .get()
}

/// A persistent session subscribed to its commands at QoS 1.
async fn subscribed(h: &Harness, id: &str, clean: bool) -> Raw {
    let mut raw = Raw::tls(&h.fx, id).await;
    raw.send(&raw::connect(id, clean, 30)).await.unwrap();
    assert!(raw.connack().await.is_some_and(|(_, code)| code == 0));
    let down = topic(id, Channel::Command).replace("/cmd", "/+");
    raw.send(&raw::subscribe(1, &[(down.as_bytes(), 1)]))
        .await
        .unwrap();
    raw.expect(raw::SUBACK).await;
    raw
}

async fn command(h: &Harness, id: &str, payload: Vec<u8>) {
    h.ctl
        .publish(
            topic(id, Channel::Command),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
}

/// A second connection of the same terminal takes over while downlinks are in flight on the
/// first: the first is closed, the new one gets them again, in order, with DUP set and the
/// same packet ids, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_during_a_delivery_gets_the_unacknowledged_downlinks() {
    let mut h = Harness::start().await;
    let mut first = subscribed(&h, "TK-1", false).await;
    for i in 0..5u8 {
        command(&h, "TK-1", vec![i]).await;
    }
    let mut ids = Vec::new();
    for i in 0..5u8 {
        let publish = first.expect(raw::PUBLISH).await;
        assert_eq!(publish.publish().1, vec![i]);
        assert_eq!(publish.byte1 & 0x08, 0, "first delivery is not a duplicate");
        ids.push(publish.pkid());
    }
    // Acknowledge only the first; four stay in flight.
    first.send(&raw::puback(ids[0])).await.unwrap();

    let mut second = Raw::tls(&h.fx, "TK-1").await;
    second.send(&raw::connect("TK-1", false, 30)).await.unwrap();
    assert_eq!(second.connack().await, Some((true, 0)), "session present");
    first.expect_closed().await;
    for i in 1..5u8 {
        let publish = second.expect(raw::PUBLISH).await;
        assert_eq!(publish.publish().1, vec![i], "resent in order");
        assert_eq!(publish.byte1 & 0x08, 0x08, "resent with DUP");
        assert_eq!(
            publish.pkid(),
            ids[usize::from(i)],
            "with the same packet id"
        );
        second.send(&raw::puback(publish.pkid())).await.unwrap();
    }
    command(&h, "TK-1", vec![9]).await;
    let publish = second.expect(raw::PUBLISH).await;
    assert_eq!(publish.publish().1, vec![9]);
    second.send(&raw::puback(publish.pkid())).await.unwrap();
    second.expect_open().await;
    assert_eq!(h.metrics().acl_refusals("unexpected_puback"), 0);
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

/// A revocation kick in the middle of a delivery closes the connection and forgets what was
/// in flight and queued: a later session of that id (a re-enrolled terminal) starts empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_during_a_delivery_forgets_the_session_and_its_queue() {
    let mut h = Harness::start().await;
    let mut raw = subscribed(&h, "RV-1", false).await;
    for i in 0..(MAX_INFLIGHT as u32 + 10) {
        command(&h, "RV-1", i.to_be_bytes().to_vec()).await;
    }
    // The window is written; more wait in the queue.
    for _ in 0..MAX_INFLIGHT {
        raw.expect(raw::PUBLISH).await;
    }
    let identity = Identity::Device(DeviceId::new("RV-1").unwrap());
    assert!(h.fx.edge.kick(&identity), "a live session was kicked");
    raw.expect_closed().await;
    eventually("RV-1 detached", || h.fx.edge.live_sessions() == 1).await;
    assert_eq!(h.fx.edge.device_sessions(), 0, "the session is forgotten");

    let mut again = Raw::tls(&h.fx, "RV-1").await;
    again.send(&raw::connect("RV-1", false, 30)).await.unwrap();
    assert_eq!(
        again.connack().await,
        Some((false, 0)),
        "no session present"
    );
    again.expect_open().await;
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

/// A terminal that subscribes and then never reads its socket (nor acknowledges): the edge
/// writes its in-flight window, queues up to its bound and drops (and counts) the oldest
/// queued beyond it, so the broker's memory for it stays bounded however much is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_that_never_reads_stays_bounded() {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let fx = Fixture::start_on(socket.listen(64).unwrap(), |_| {});
    let mut h = Harness::on(fx).await;
    let raw = subscribed(&h, "NR-1", false).await;
    let before = dropped(&h, "queue_full");
    let sent = MAX_QUEUED + MAX_INFLIGHT + 500;
    for i in 0..sent {
        command(&h, "NR-1", (i as u32).to_be_bytes().to_vec()).await;
    }
    eventually("every downlink reached the edge", || {
        h.metrics().edge_downlinks_total.get() >= sent as u64
    })
    .await;
    // Held: the window (written, never acknowledged) plus the queue; the rest is dropped.
    // How many the writer took before the queue filled decides where in this range it ends.
    let least = (sent - MAX_QUEUED - MAX_INFLIGHT) as u64;
    let most = (sent - MAX_QUEUED) as u64;
    let now = dropped(&h, "queue_full") - before;
    assert!(
        (least..=most).contains(&now),
        "{now} dropped, expected {least}..={most}"
    );
    drop(raw);
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

/// One terminal publishing as fast as it can is paced by its uplink rate limit (counted), and
/// another terminal's heartbeats reach the controller while the flood is still going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_terminal_is_rate_limited_and_others_get_through() {
    let rate = UplinkRate {
        per_second: 20,
        burst: 10,
    };
    let mut h = Harness::start_with(|c| c.limits.uplink_rate = rate).await;
    const FLOOD: usize = 2_000;
    let mut flood = Raw::connected(&h.fx, "FL-1").await;
    let hb = topic("FL-1", Channel::Heartbeat);
    let frames: Vec<u8> = (0..FLOOD)
        .flat_map(|i| raw::publish(0, hb.as_bytes(), 0, &(i as u32).to_be_bytes()))
        .collect();
    let flooder = tokio::spawn(async move {
        // Blocks once the edge stops reading; ends when the test drops the connection.
        let _ = flood.send(&frames).await;
        flood
    });
    eventually("the flood is throttled", || {
        h.metrics().edge_uplinks_throttled_total.get() > 0
    })
    .await;

    let mut other = Raw::connected(&h.fx, "OT-1").await;
    let other_hb = topic("OT-1", Channel::Heartbeat);
    let mut flood_seen = 0usize;
    for i in 0..5u16 {
        other
            .send(&raw::publish(1, other_hb.as_bytes(), i + 1, b"other"))
            .await
            .unwrap();
        assert_eq!(other.expect(raw::PUBACK).await.pkid(), i + 1);
        loop {
            let (t, _) = tokio::time::timeout(WAIT, h.from_devices.recv())
                .await
                .expect("uplinks reach the controller")
                .expect("controller connected");
            if t == other_hb {
                break;
            }
            flood_seen += 1;
        }
    }
    // At 20 per second the flood needs about 100 s; the other terminal did not wait for it.
    assert!(
        flood_seen < FLOOD,
        "the other terminal's heartbeats came only after the whole flood"
    );
    flooder.abort();
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

/// Held for the rate-limit test's bound: the flood cannot finish within the test's waits.
const _: () = assert!(2_000 / 20 > 3 * WAIT.as_secs() as usize);
