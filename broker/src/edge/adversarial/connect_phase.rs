//! Everything before and at CONNECT: garbage, bad framing, bad versions, bad wills.

use std::time::Duration;

use posfleet_proto::Channel;

use super::Harness;
use super::raw::{self, Raw, Will};
use crate::edge::tests::{WAIT, connack, topic};

/// Sends `bytes` as the first thing after the TLS handshake; expects a close without CONNACK
/// and the refusal `reason` counted.
async fn refused_silently(h: &Harness, id: &str, bytes: &[u8], reason: &'static str) {
    let before = h.metrics().refusals(reason);
    let mut raw = Raw::tls(&h.fx, id).await;
    let _ = raw.send(bytes).await;
    assert_eq!(raw.expect_closed().await, vec![], "{reason}: no CONNACK");
    h.refused(reason, before).await;
}

/// Sends a CONNECT; expects CONNACK `code` then a close, and `reason` counted.
async fn refused_with(h: &Harness, id: &str, connect: &[u8], code: u8, reason: &'static str) {
    let before = h.metrics().refusals(reason);
    let mut raw = Raw::tls(&h.fx, id).await;
    raw.send(connect).await.unwrap();
    assert_eq!(raw.connack().await, Some((false, code)), "{reason}");
    assert_eq!(raw.expect_closed().await, vec![], "{reason}: closed");
    h.refused(reason, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_connect_is_refused() {
    let mut h = Harness::start().await;
    // Reserved packet type 0.
    refused_silently(&h, "BAD-1", &[0x00, 0x00], "malformed_connect").await;
    // An HTTP request: 'G' reads as a PUBACK whose remaining length ('E' = 69) is not 2.
    let http = format!(
        "GET / HTTP/1.1\r\nHost: edge\r\nUser-Agent: {}\r\n\r\n",
        "x".repeat(40)
    );
    refused_silently(&h, "BAD-2", http.as_bytes(), "malformed_connect").await;
    // A valid packet, but not a CONNECT.
    refused_silently(&h, "BAD-3", &raw::pingreq(), "not_connect").await;
    // A PUBLISH before CONNECT must not be routed.
    let forged = raw::publish(1, topic("BAD-4", Channel::Heartbeat).as_bytes(), 1, b"x");
    refused_silently(&h, "BAD-4", &forged, "not_connect").await;
    h.assert_router_alive(&["BAD-1", "BAD-2", "BAD-3", "BAD-4"])
        .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_remaining_lengths_before_connect_are_refused_at_once() {
    let mut h = Harness::start().await;
    // Five length bytes, the first four with the continuation bit.
    refused_silently(
        &h,
        "BAD-1",
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
        "malformed_connect",
    )
    .await;
    // 100 MB announced, nothing follows: refused on the header, without waiting for the body
    // (the harness's CONNECT timeout is far longer than the bounded wait).
    refused_silently(
        &h,
        "BAD-2",
        &[0x10, 0x80, 0x80, 0x80, 0x32],
        "malformed_connect",
    )
    .await;
    h.assert_router_alive(&["BAD-1", "BAD-2"]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_protocol_versions_are_refused() {
    let mut h = Harness::start().await;
    // MQTT 5 (level 5): MQTT-3.1.2-2 requires CONNACK 0x01 (unacceptable protocol level).
    let v5 = raw::connect_raw("MQTT", 5, true, 30, "BAD-1", None);
    refused_with(&h, "BAD-1", &v5, 1, "unsupported_protocol_level").await;
    // Level 3 under the 3.1.1 name is refused the same way.
    let v3 = raw::connect_raw("MQTT", 3, true, 30, "BAD-2", None);
    refused_with(&h, "BAD-2", &v3, 1, "unsupported_protocol_level").await;
    // MQTT 3.1 ("MQIsdp"): a wrong protocol name may be closed without CONNACK.
    let v31 = raw::connect_raw("MQIsdp", 3, true, 30, "BAD-3", None);
    refused_silently(&h, "BAD-3", &v31, "malformed_connect").await;
    h.assert_router_alive(&["BAD-1", "BAD-2", "BAD-3"]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_sent_one_byte_at_a_time_is_accepted() {
    let mut h = Harness::start().await;
    let mut raw = Raw::tls(&h.fx, "SLOW-1").await;
    for byte in raw::connect("SLOW-1", true, 30) {
        raw.send(&[byte]).await.unwrap();
    }
    assert_eq!(raw.connack().await, Some((false, 0)));
    raw.expect_open().await;
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted_and_bounded_by_the_idle_limit() {
    let mut h = Harness::start_with(|c| c.limits.max_idle = Duration::from_millis(500)).await;
    let presence = topic("IDLE-1", Channel::Presence);
    let will = Will {
        topic: presence.as_bytes(),
        payload: b"gone",
        qos: 1,
        retain: false,
    };
    let mut raw = Raw::tls(&h.fx, "IDLE-1").await;
    raw.send(&raw::connect_raw("MQTT", 4, true, 0, "IDLE-1", Some(will)))
        .await
        .unwrap();
    assert_eq!(
        raw.connack().await,
        Some((false, 0)),
        "keep-alive 0 accepted"
    );
    raw.expect_open().await;
    // Silent from now on: the idle limit closes it, and a lost connection publishes its will.
    assert_eq!(raw.expect_closed().await, vec![]);
    let (t, payload) = tokio::time::timeout(WAIT, h.from_devices.recv())
        .await
        .expect("will published in bounded time")
        .unwrap();
    assert_eq!(
        (t.as_str(), payload.as_slice()),
        (presence.as_str(), &b"gone"[..])
    );
    h.assert_router_alive(&["IDLE-1"]).await;
    h.stop().await;
}

fn will(topic: &[u8], qos: u8) -> Option<Will<'_>> {
    Some(Will {
        topic,
        payload: b"gone",
        qos,
        retain: false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_wills_are_refused_at_connect() {
    let mut h = Harness::start().await;
    let own = topic("BAD-1", Channel::Presence);
    let own = own.as_bytes();
    let other = topic("OTHER", Channel::Presence);
    let downlink = topic("BAD-1", Channel::Command);
    // QoS 2 on an allowed topic.
    let c = raw::connect_raw("MQTT", 4, true, 30, "BAD-1", will(own, 2));
    refused_with(&h, "BAD-1", &c, 5, "will_qos2").await;
    // Another device's topic, a downlink topic, `$SYS`, a non-UTF-8 topic.
    let bad: [&[u8]; 4] = [
        other.as_bytes(),
        downlink.as_bytes(),
        b"$SYS/broker/x",
        b"posfleet/v1/d/BAD-1/up/\xff",
    ];
    for (i, t) in bad.into_iter().enumerate() {
        let id = format!("BAD-W{i}");
        let c = raw::connect_raw("MQTT", 4, true, 30, &id, will(t, 1));
        refused_with(&h, &id, &c, 5, "will_not_allowed").await;
    }
    // QoS 3 does not even parse.
    let c = raw::connect_raw("MQTT", 4, true, 30, "BAD-2", will(own, 3));
    refused_silently(&h, "BAD-2", &c, "malformed_connect").await;
    // A will on an allowed topic with the retain flag is accepted.
    let mut ok = Raw::tls(&h.fx, "BAD-1").await;
    let mut retained = will(own, 1);
    if let Some(w) = retained.as_mut() {
        w.retain = true;
    }
    let c = raw::connect_raw("MQTT", 4, true, 30, "BAD-1", retained);
    ok.send(&c).await.unwrap();
    assert_eq!(ok.connack().await, Some((false, 0)));
    ok.send(&raw::disconnect()).await.unwrap();
    assert_eq!(ok.expect_closed().await, vec![]);
    h.assert_router_alive(&["BAD-1", "BAD-2", "OTHER", "BAD-W0", "BAD-W1", "BAD-W2"])
        .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_other_than_the_certificates_are_refused() {
    let mut h = Harness::start().await;
    for i in 0..4 {
        let own = format!("BAD-{i}");
        let presented = match i {
            0 => "OTHER".to_owned(),
            1 => "controller:main".to_owned(),
            2 => format!("{own}/x"),
            _ => own.to_lowercase(),
        };
        let c = raw::connect(&presented, true, 30);
        refused_with(&h, &own, &c, 2, "client_id_mismatch").await;
    }
    h.assert_router_alive(&["BAD-0", "BAD-1", "BAD-2", "BAD-3"])
        .await;
    h.stop().await;
}

/// MQTT-3.1.3-8 wants a zero-length client id with clean_session=0 refused. The edge takes the
/// client id from the certificate instead, so the persistent session is well defined: it is
/// the identity's, and is resumed on the next connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_client_id_with_a_persistent_session_is_the_identitys_session() {
    let mut h = Harness::start().await;
    let mut raw = Raw::tls(&h.fx, "P-1").await;
    raw.send(&raw::connect("", false, 30)).await.unwrap();
    assert_eq!(raw.connack().await, Some((false, 0)));
    let down = topic("P-1", Channel::Command).replace("/cmd", "/+");
    raw.send(&raw::subscribe(1, &[(down.as_bytes(), 1)]))
        .await
        .unwrap();
    raw.expect(raw::SUBACK).await;
    raw.send(&raw::disconnect()).await.unwrap();
    assert_eq!(raw.expect_closed().await, vec![]);
    // Queued while offline, delivered after the reconnect.
    h.ctl
        .publish(
            topic("P-1", Channel::Command),
            rumqttc::QoS::AtLeastOnce,
            false,
            b"queued".to_vec(),
        )
        .await
        .unwrap();
    let mut raw = Raw::tls(&h.fx, "P-1").await;
    raw.send(&raw::connect("", false, 30)).await.unwrap();
    assert_eq!(raw.connack().await, Some((true, 0)), "session present");
    let publish = raw.expect(raw::PUBLISH).await;
    assert_eq!(
        publish.publish(),
        (topic("P-1", Channel::Command), b"queued".to_vec())
    );
    raw.send(&raw::puback(publish.pkid())).await.unwrap();
    raw.expect_open().await;
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_mqtt_on_the_tls_port_is_refused() {
    let mut h = Harness::start().await;
    let before = super::total_refusals(h.metrics());
    let mut tcp = tokio::net::TcpStream::connect(h.fx.edge.local_addr())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &raw::connect("BAD-1", true, 30))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut buf),
    )
    .await
    .expect("closed in bounded time");
    assert!(
        read.is_err() || !buf.starts_with(&[0x20]),
        "no CONNACK over plaintext"
    );
    super::eventually("refusal counted", || {
        super::total_refusals(h.metrics()) > before
    })
    .await;
    assert_eq!(h.metrics().refusals("tls_protocol"), 1);
    h.assert_router_alive(&["BAD-1"]).await;
    h.stop().await;
}

/// The router refuses a link silently when it has no free slot; the edge must answer CONNACK
/// 3 itself, count it, and keep serving. Only non-terminal identities take router slots:
/// terminals are served by the edge (ADR 0013) and still connect when the router is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_router_is_answered_with_server_unavailable() {
    // The edge's own links (one downlink link, the uplink lanes) and the harness controller.
    let own = 1 + crate::edge::RouterSettings::default().uplink_lanes;
    let mut h = Harness::start_with(|c| c.router.max_connections = own + 1).await;
    let before = h.metrics().refusals("router_refused");
    let second =
        h.fx.pki
            .load_ca()
            .unwrap()
            .issue_controller("second")
            .unwrap();
    let (_ctl2, mut ctl2_loop) = h.fx.client("controller:second", Some(&second), None);
    let refused = connack(&mut ctl2_loop).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("ServiceUnavailable")),
        "a second controller finds no router slot: {refused:?}"
    );
    h.refused("router_refused", before).await;
    // Terminals take no router slot: they connect, publish and receive as usual.
    let _a = Raw::connected(&h.fx, "A-1").await;
    let _b = Raw::connected(&h.fx, "B-1").await;
    h.assert_router_alive(&[]).await;
    h.stop().await;
}
