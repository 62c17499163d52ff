//! Single bad packets on an accepted connection.

use posfleet_proto::Channel;
use rumqttc::QoS;

use super::raw::{self, Raw};
use super::{Harness, eventually};
use crate::edge::tests::topic;

/// Connects `id`, sends `bytes`, expects the connection closed and `reason` counted once.
async fn violation(h: &Harness, id: &str, bytes: &[u8], reason: &'static str) -> Vec<raw::Frame> {
    let before = h.metrics().acl_refusals(reason);
    let mut raw = Raw::connected(&h.fx, id).await;
    let _ = raw.send(bytes).await;
    let frames = raw.expect_closed().await;
    h.acl_refused(reason, before).await;
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_and_qos2_acks_out_of_nowhere_close_the_connection() {
    let mut h = Harness::start().await;
    let hb = topic("BAD-1", Channel::Heartbeat);
    let frames = violation(
        &h,
        "BAD-1",
        &raw::publish(2, hb.as_bytes(), 7, b"qos2"),
        "qos2_not_supported",
    )
    .await;
    assert_eq!(frames, vec![], "no PUBREC");
    for (i, byte1) in [0x50u8, 0x62, 0x70].into_iter().enumerate() {
        let id = format!("BAD-{}", i + 2);
        violation(&h, &id, &raw::ack(byte1, 1), "qos2_not_supported").await;
    }
    h.assert_router_alive(&["BAD-1", "BAD-2", "BAD-3", "BAD-4"])
        .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsolicited_puback_closes_the_connection() {
    let mut h = Harness::start().await;
    violation(&h, "BAD-1", &raw::puback(1), "unexpected_puback").await;
    h.assert_router_alive(&["BAD-1"]).await;
    h.stop().await;
}

/// Subscribes `raw` (device `id`) to its downlinks at QoS 1 and has the controller send
/// `n` commands; returns their packet ids in arrival order.
async fn qos1_downlinks(h: &Harness, raw: &mut Raw, id: &str, n: usize) -> Vec<u16> {
    let down = topic(id, Channel::Command).replace("/cmd", "/+");
    raw.send(&raw::subscribe(1, &[(down.as_bytes(), 1)]))
        .await
        .unwrap();
    let suback = raw.expect(raw::SUBACK).await;
    assert_eq!(suback.body, vec![0, 1, 1], "granted QoS 1");
    for i in 0..n {
        h.ctl
            .publish(
                topic(id, Channel::Command),
                QoS::AtLeastOnce,
                false,
                vec![i as u8],
            )
            .await
            .unwrap();
    }
    let mut pkids = Vec::new();
    for i in 0..n {
        let publish = raw.expect(raw::PUBLISH).await;
        assert_eq!(publish.byte1 & 0b0110, 0b0010, "QoS 1");
        assert_eq!(publish.publish().1, vec![i as u8]);
        pkids.push(publish.pkid());
    }
    pkids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_duplicate_pubacks_close_the_connection() {
    let mut h = Harness::start().await;
    // In order: fine, and the connection keeps working.
    let mut raw = Raw::connected(&h.fx, "GOOD-1").await;
    for pkid in qos1_downlinks(&h, &mut raw, "GOOD-1", 3).await {
        raw.send(&raw::puback(pkid)).await.unwrap();
    }
    raw.expect_open().await;

    // Out of order: the second before the first.
    let before = h.metrics().acl_refusals("unexpected_puback");
    let mut raw = Raw::connected(&h.fx, "BAD-1").await;
    let pkids = qos1_downlinks(&h, &mut raw, "BAD-1", 3).await;
    raw.send(&raw::puback(pkids[1])).await.unwrap();
    raw.expect_closed().await;
    h.acl_refused("unexpected_puback", before).await;

    // The first acked twice.
    let before = h.metrics().acl_refusals("unexpected_puback");
    let mut raw = Raw::connected(&h.fx, "BAD-2").await;
    let pkids = qos1_downlinks(&h, &mut raw, "BAD-2", 2).await;
    let mut acks = raw::puback(pkids[0]);
    acks.extend(raw::puback(pkids[0]));
    raw.send(&acks).await.unwrap();
    raw.expect_closed().await;
    h.acl_refused("unexpected_puback", before).await;

    // One ack too many after all were acked.
    let before = h.metrics().acl_refusals("unexpected_puback");
    let mut raw = Raw::connected(&h.fx, "BAD-3").await;
    let pkids = qos1_downlinks(&h, &mut raw, "BAD-3", 2).await;
    let mut acks = Vec::new();
    for pkid in &pkids {
        acks.extend(raw::puback(*pkid));
    }
    acks.extend(raw::puback(pkids[1].wrapping_add(1)));
    raw.send(&acks).await.unwrap();
    raw.expect_closed().await;
    h.acl_refused("unexpected_puback", before).await;

    h.assert_router_alive(&["BAD-1", "BAD-2", "BAD-3"]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_closes_the_connection() {
    let mut h = Harness::start().await;
    violation(
        &h,
        "BAD-1",
        &raw::connect("BAD-1", true, 30),
        "second_connect",
    )
    .await;
    h.assert_router_alive(&["BAD-1"]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_with_bad_topics_are_refused_and_not_routed() {
    let mut h = Harness::start().await;
    let cases: [(&str, &[u8]); 4] = [
        ("BAD-1", b"posfleet/v1/d/BAD-1/up/\xff\xfe"),
        ("BAD-2", b"\xc3\x28"),
        ("BAD-3", b"posfleet/v1/d/+/up/hb"),
        ("BAD-4", b"posfleet/v1/d/BAD-4/up/hb/"),
    ];
    for (id, t) in cases {
        violation(&h, id, &raw::publish(1, t, 1, b"x"), "bad_topic").await;
    }
    // QoS 0 as well, and an empty topic.
    violation(&h, "BAD-5", &raw::publish(0, b"", 0, b"x"), "bad_topic").await;
    h.assert_router_alive(&["BAD-1", "BAD-2", "BAD-3", "BAD-4", "BAD-5"])
        .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_that_do_not_parse_are_refused() {
    let mut h = Harness::start().await;
    let hb = topic("BAD-1", Channel::Heartbeat);
    // QoS 3.
    violation(
        &h,
        "BAD-1",
        &raw::publish(3, hb.as_bytes(), 1, b"x"),
        "malformed_packet",
    )
    .await;
    // QoS 1 with packet id 0.
    let hb2 = topic("BAD-2", Channel::Heartbeat);
    violation(
        &h,
        "BAD-2",
        &raw::publish(1, hb2.as_bytes(), 0, b"x"),
        "malformed_packet",
    )
    .await;
    // Topic length beyond the packet.
    let mut cut = raw::publish(0, hb.as_bytes(), 0, b"");
    cut[3] = 0xff;
    violation(&h, "BAD-3", &cut, "malformed_packet").await;
    h.assert_router_alive(&["BAD-1", "BAD-2", "BAD-3"]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_and_malformed_subscriptions_are_refused() {
    let mut h = Harness::start().await;
    let own = topic("BAD-1", Channel::Command).replace("/cmd", "/+");
    let share = format!("$share/g/{own}");
    let cases: [(&str, Vec<u8>, &'static str); 8] = [
        (
            "BAD-1",
            raw::subscribe(1, &[(share.as_bytes(), 1)]),
            "bad_filter",
        ),
        ("BAD-2", raw::subscribe(1, &[(b"$SYS/#", 0)]), "bad_filter"),
        ("BAD-3", raw::subscribe(1, &[(b"#", 0)]), "bad_filter"),
        (
            "BAD-4",
            raw::subscribe(1, &[(own.as_bytes(), 3)]),
            "malformed_packet",
        ),
        ("BAD-5", raw::subscribe(1, &[]), "malformed_packet"),
        (
            "BAD-6",
            raw::subscribe(1, &[(b"posfleet/\xff", 0)]),
            "malformed_packet",
        ),
        // One allowed filter does not make a forbidden one acceptable.
        (
            "BAD-7",
            raw::subscribe(1, &[(own.as_bytes(), 1), (b"posfleet/v1/d/+/up/+", 1)]),
            "subscribe_not_allowed",
        ),
        ("BAD-8", raw::subscribe(1, &[(b"", 1)]), "bad_filter"),
    ];
    for (id, packet, reason) in cases {
        let frames = violation(&h, id, &packet, reason).await;
        assert_eq!(frames, vec![], "{id}: no SUBACK");
    }
    h.assert_router_alive(&[
        "BAD-1", "BAD-2", "BAD-3", "BAD-4", "BAD-5", "BAD-6", "BAD-7", "BAD-8",
    ])
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_subscription_is_granted_qos1() {
    let mut h = Harness::start().await;
    let mut raw = Raw::connected(&h.fx, "Q-1").await;
    let down = topic("Q-1", Channel::Command).replace("/cmd", "/+");
    raw.send(&raw::subscribe(9, &[(down.as_bytes(), 2)]))
        .await
        .unwrap();
    assert_eq!(raw.expect(raw::SUBACK).await.body, vec![0, 9, 1]);
    h.ctl
        .publish(
            topic("Q-1", Channel::Command),
            QoS::AtLeastOnce,
            false,
            b"c".to_vec(),
        )
        .await
        .unwrap();
    let publish = raw.expect(raw::PUBLISH).await;
    assert_eq!(publish.byte1 & 0b0110, 0b0010, "delivered at QoS 1");
    raw.send(&raw::puback(publish.pkid())).await.unwrap();
    raw.expect_open().await;
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_remaining_lengths_after_connect_close_at_once() {
    let mut h = Harness::start().await;
    // Five length bytes.
    violation(
        &h,
        "BAD-1",
        &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        "malformed_packet",
    )
    .await;
    // 100 MB announced and nothing follows: refused on the header alone.
    violation(
        &h,
        "BAD-2",
        &[0x30, 0x80, 0x80, 0x80, 0x32],
        "oversized_packet",
    )
    .await;
    // Just over the edge's packet limit.
    let mut header = vec![0x30];
    header.extend(raw::remaining_length(posfleet_proto::MAX_PACKET_SIZE + 1));
    violation(&h, "BAD-3", &header, "oversized_packet").await;
    h.assert_router_alive(&["BAD-1", "BAD-2", "BAD-3"]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_and_server_only_packets_are_refused() {
    let mut h = Harness::start().await;
    let cases: [(&str, Vec<u8>, &'static str); 7] = [
        ("BAD-1", vec![0x00, 0x00], "malformed_packet"),
        ("BAD-2", vec![0xF0, 0x00], "malformed_packet"),
        (
            "BAD-3",
            vec![0x20, 0x02, 0x00, 0x00],
            "server_packet_from_client",
        ),
        (
            "BAD-4",
            vec![0x90, 0x03, 0x00, 0x01, 0x00],
            "server_packet_from_client",
        ),
        (
            "BAD-5",
            vec![0xB0, 0x02, 0x00, 0x01],
            "server_packet_from_client",
        ),
        ("BAD-6", vec![0xD0, 0x00], "server_packet_from_client"),
        // DISCONNECT with a body is MQTT 5 only.
        ("BAD-7", vec![0xE0, 0x01, 0x00], "malformed_packet"),
    ];
    for (id, packet, reason) in cases {
        violation(&h, id, &packet, reason).await;
    }
    h.assert_router_alive(&[
        "BAD-1", "BAD-2", "BAD-3", "BAD-4", "BAD-5", "BAD-6", "BAD-7",
    ])
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_after_disconnect_is_dropped_and_no_will_is_published() {
    let mut h = Harness::start().await;
    let presence = topic("D-1", Channel::Presence);
    let mut raw = Raw::tls(&h.fx, "D-1").await;
    let will = raw::Will {
        topic: presence.as_bytes(),
        payload: b"gone",
        qos: 1,
        retain: false,
    };
    raw.send(&raw::connect_raw("MQTT", 4, true, 30, "D-1", Some(will)))
        .await
        .unwrap();
    assert_eq!(raw.connack().await, Some((false, 0)));
    let mut bytes = raw::disconnect();
    bytes.extend(raw::publish(
        1,
        topic("D-1", Channel::Heartbeat).as_bytes(),
        1,
        b"late",
    ));
    bytes.extend(raw::publish(2, b"\xff", 1, b"garbage"));
    raw.send(&bytes).await.unwrap();
    let frames = raw.expect_closed().await;
    assert_eq!(frames, vec![], "no PUBACK for what followed DISCONNECT");
    let _ = raw.send(&raw::pingreq()).await;
    assert_eq!(
        super::total_refusals(h.metrics()),
        0,
        "a DISCONNECT is not a refusal"
    );
    h.assert_router_alive(&["D-1"]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_a_subscription_is_answered() {
    let mut h = Harness::start().await;
    let mut raw = Raw::connected(&h.fx, "U-1").await;
    let own = topic("U-1", Channel::Command).replace("/cmd", "/+");
    raw.send(&raw::subscribe(4, &[(own.as_bytes(), 1)]))
        .await
        .unwrap();
    raw.expect(raw::SUBACK).await;
    raw.send(&raw::unsubscribe(5, &[own.as_bytes()]))
        .await
        .unwrap();
    assert_eq!(raw.expect(raw::UNSUBACK).await.pkid(), 5);
    raw.expect_open().await;
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unsubscribe_gets_exactly_one_unsuback() {
    let mut h = Harness::start().await;
    let mut raw = Raw::connected(&h.fx, "U-2").await;
    let all = topic("U-2", Channel::Command).replace("/cmd", "/+");
    let cmd = topic("U-2", Channel::Command);
    let txack = topic("U-2", Channel::TransactionAck);
    // Never subscribed, not even a posfleet filter: MQTT-3.10.4-5 still wants an UNSUBACK.
    raw.send(&raw::unsubscribe(5, &[all.as_bytes()]))
        .await
        .unwrap();
    raw.send(&raw::unsubscribe(6, &[b"$SYS/#"])).await.unwrap();
    // Three filters removed at once: one UNSUBACK, not three. A PINGREQ in between and
    // after proves the order and that nothing else was sent.
    raw.send(&raw::subscribe(
        7,
        &[
            (all.as_bytes(), 1),
            (cmd.as_bytes(), 1),
            (txack.as_bytes(), 0),
        ],
    ))
    .await
    .unwrap();
    let mut bytes = raw::pingreq();
    bytes.extend(raw::unsubscribe(
        8,
        &[all.as_bytes(), cmd.as_bytes(), txack.as_bytes()],
    ));
    bytes.extend(raw::pingreq());
    raw.send(&bytes).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..6 {
        let frame = raw.next().await.expect("answers, not a close");
        seen.push((frame.kind(), frame.body.get(..2).map(|b| b.to_vec())));
    }
    let pkid = |p: u16| Some(p.to_be_bytes().to_vec());
    assert_eq!(
        seen,
        vec![
            (raw::UNSUBACK, pkid(5)),
            (raw::UNSUBACK, pkid(6)),
            (raw::SUBACK, pkid(7)),
            (raw::PINGRESP, None),
            (raw::UNSUBACK, pkid(8)),
            (raw::PINGRESP, None),
        ]
    );
    raw.expect_open().await;
    // An UNSUBSCRIBE without filters violates MQTT-3.10.3-2.
    let before = h.metrics().acl_refusals("malformed_packet");
    raw.send(&raw::unsubscribe(9, &[])).await.unwrap();
    assert_eq!(raw.expect_closed().await, vec![]);
    h.acl_refused("malformed_packet", before).await;
    h.assert_router_alive(&["U-2"]).await;
    h.stop().await;
}

/// QoS 1 downlinks left unacknowledged survive a reconnect of a persistent session: they are
/// sent again (with the new connection's packet ids), and acking those keeps the session
/// healthy; acking the old ids would be refused like any other unexpected PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_downlinks_are_resent_to_a_resumed_session() {
    let mut h = Harness::start().await;
    let down = topic("R-1", Channel::Command).replace("/cmd", "/+");
    let mut raw = Raw::tls(&h.fx, "R-1").await;
    raw.send(&raw::connect("R-1", false, 30)).await.unwrap();
    assert_eq!(raw.connack().await, Some((false, 0)));
    raw.send(&raw::subscribe(1, &[(down.as_bytes(), 1)]))
        .await
        .unwrap();
    raw.expect(raw::SUBACK).await;
    for i in 0..3u8 {
        h.ctl
            .publish(
                topic("R-1", Channel::Command),
                QoS::AtLeastOnce,
                false,
                vec![i],
            )
            .await
            .unwrap();
    }
    let first = raw.expect(raw::PUBLISH).await;
    raw.send(&raw::puback(first.pkid())).await.unwrap();
    for i in 1..3u8 {
        assert_eq!(raw.expect(raw::PUBLISH).await.publish().1, vec![i]);
    }
    // Vanishes with two downlinks unacknowledged.
    drop(raw);
    eventually("R-1 detached", || h.fx.edge.live_sessions() == 1).await;

    let mut raw = Raw::tls(&h.fx, "R-1").await;
    raw.send(&raw::connect("R-1", false, 30)).await.unwrap();
    assert_eq!(raw.connack().await, Some((true, 0)), "session present");
    for i in 1..3u8 {
        let publish = raw.expect(raw::PUBLISH).await;
        assert_eq!(publish.publish().1, vec![i], "resent in order");
        raw.send(&raw::puback(publish.pkid())).await.unwrap();
    }
    h.ctl
        .publish(
            topic("R-1", Channel::Command),
            QoS::AtLeastOnce,
            false,
            vec![3],
        )
        .await
        .unwrap();
    let publish = raw.expect(raw::PUBLISH).await;
    assert_eq!(publish.publish().1, vec![3]);
    raw.send(&raw::puback(publish.pkid())).await.unwrap();
    raw.expect_open().await;
    assert_eq!(h.metrics().acl_refusals("unexpected_puback"), 0);
    h.assert_router_alive(&[]).await;
    h.stop().await;
}
