//! Many packets: floods, bursts, reconnect storms, takeover races and a seeded fuzz loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use posfleet_proto::Channel;
use rand::{Rng, SeedableRng};
use rumqttc::QoS;
use tokio::net::TcpSocket;

use super::raw::{self, Raw};
use super::{Harness, eventually, total_refusals};
use crate::edge::ConnectRateLimit;
use crate::edge::pump::MAX_OWED_ANSWERS;
use crate::edge::tests::{Fixture, WAIT, connack, topic};

/// A PINGREQ flood from a client that reads the answers is served: 20,000 in bursts of 1,000,
/// then one burst of exactly the edge's limit of unanswered requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pingreq_flood_that_reads_the_answers_is_served() {
    let mut h = Harness::start().await;
    let mut raw = Raw::connected(&h.fx, "PING-1").await;
    for burst in [1000; 20].into_iter().chain([MAX_OWED_ANSWERS]) {
        raw.send(&raw::pingreq().repeat(burst)).await.unwrap();
        for _ in 0..burst {
            let frame = raw.next().await.expect("a PINGRESP, not a close");
            assert_eq!(frame.kind(), raw::PINGRESP);
        }
    }
    assert_eq!(total_refusals(h.metrics()), 0);
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_downlink_burst_is_delivered_complete_and_in_order() {
    // 1000 messages at QoS 0 fill the router's 200-notification buffer several times over:
    // each `Unschedule` must be answered by exactly one wake.
    let mut h = Harness::start_with(|c| c.router.segment_size = 4 * 1024 * 1024).await;
    let mut raw = Raw::connected(&h.fx, "BURST-1").await;
    let down = topic("BURST-1", Channel::Command).replace("/cmd", "/+");
    raw.send(&raw::subscribe(1, &[(down.as_bytes(), 0)]))
        .await
        .unwrap();
    raw.expect(raw::SUBACK).await;
    const N: u32 = 1000;
    for i in 0..N {
        h.ctl
            .publish(
                topic("BURST-1", Channel::Command),
                QoS::AtLeastOnce,
                false,
                i.to_be_bytes().to_vec(),
            )
            .await
            .unwrap();
    }
    for i in 0..N {
        let publish = raw.expect(raw::PUBLISH).await;
        assert_eq!(publish.publish().1, i.to_be_bytes());
    }
    raw.expect_open().await;
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

/// Floods `bytes` (`count` copies) from a client that never reads: the answers pile up in the
/// router's RAM (rumqttd queues acks without bound) unless the edge closes the connection.
/// Small socket buffers on both sides make the edge's writes block early.
async fn flood_without_reading(frame: impl Fn(usize) -> Vec<u8>, count: usize, bad: &[&str]) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let fx = Fixture::start_on(socket.listen(64).unwrap(), |c| {
        c.limits.connect_timeout = std::time::Duration::from_secs(120);
        // The per-terminal rate limit would only slow this flood down (it has its own test):
        // this one is about the answers that pile up.
        c.limits.uplink_rate = crate::edge::UplinkRate {
            per_second: 1_000_000,
            burst: 1_000_000,
        };
    });
    let mut h = Harness::on(fx).await;
    let client = TcpSocket::new_v4().unwrap();
    client.set_recv_buffer_size(4096).unwrap();
    let tcp = client.connect(h.fx.edge.local_addr()).await.unwrap();
    let mut raw = Raw::tls_over(&h.fx, "FLOOD-1", tcp).await;
    raw.send(&raw::connect("FLOOD-1", true, 30)).await.unwrap();
    assert_eq!(raw.connack().await, Some((false, 0)));
    let before = h.metrics().acl_refusals("ack_backlog");
    let (mut reader, mut writer) = raw.split();
    let mut chunk = Vec::new();
    for i in 0..count {
        chunk.extend(frame(i));
        if chunk.len() >= 16 * 1024 || i + 1 == count {
            if writer.send(&chunk).await.is_err() {
                break;
            }
            chunk.clear();
        }
    }
    // Only now read: whatever the edge wrote (a reset may discard it), then the close.
    while reader.next().await.is_some() {}
    h.acl_refused("ack_backlog", before).await;
    h.assert_router_alive(bad).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pingreq_flood_that_never_reads_the_answers_is_closed() {
    flood_without_reading(|_| raw::pingreq(), 200_000, &["FLOOD-1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_publish_flood_that_never_reads_the_pubacks_is_closed() {
    let hb = topic("FLOOD-1", Channel::Heartbeat);
    let publish = |i: usize| raw::publish(1, hb.as_bytes(), (i % 65_535) as u16 + 1, b"x");
    // The heartbeats themselves are valid and may reach the controller.
    flood_without_reading(publish, 100_000, &[]).await;
}

/// 200 connects of one identity in a row while another device keeps publishing: the first
/// `max_connects` take over from each other, the rest are refused with CONNACK 3 and counted,
/// and the other device loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reconnects_are_rate_limited_while_another_device_publishes() {
    let mut h = Harness::start().await;
    let limit = ConnectRateLimit::default().max_connects;

    // A second device publishing QoS 1 heartbeats until told to stop.
    let cert = h.fx.device_cert("PUB-1");
    let (publisher, mut pub_loop) = h.fx.client("PUB-1", Some(&cert), None);
    connack(&mut pub_loop).await.unwrap();
    let mut pub_events = super::drive_events(pub_loop);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                publisher
                    .publish(
                        topic("PUB-1", Channel::Heartbeat),
                        QoS::AtLeastOnce,
                        false,
                        sent.to_be_bytes().to_vec(),
                    )
                    .await
                    .unwrap();
                sent += 1;
                // One in flight at a time, paced by its PUBACK.
                loop {
                    match pub_events.recv().await.expect("publisher stays connected") {
                        rumqttc::Packet::PubAck(_) => break,
                        _ => continue,
                    }
                }
            }
            sent
        })
    };

    let before = h.metrics().refusals("rate_limited");
    let mut current: Option<Raw> = None;
    let mut accepted = 0;
    for _ in 0..200 {
        let mut raw = Raw::tls(&h.fx, "STORM-1").await;
        raw.send(&raw::connect("STORM-1", true, 30)).await.unwrap();
        match raw.connack().await {
            Some((false, 0)) => {
                accepted += 1;
                if let Some(mut old) = current.replace(raw) {
                    // Taken over: closed by the edge.
                    old.expect_closed().await;
                }
            }
            Some((false, 3)) => assert_eq!(raw.expect_closed().await, vec![]),
            other => panic!("unexpected CONNACK {other:?}"),
        }
    }
    assert_eq!(accepted, limit, "exactly the rate limit is accepted");
    h.refused("rate_limited", before + (200 - limit as u64) - 1)
        .await;
    let mut last = current.expect("one connection survives");
    last.expect_open().await;

    stop.store(true, Ordering::Relaxed);
    let sent = tokio::time::timeout(WAIT, sender)
        .await
        .expect("publisher finishes")
        .unwrap();
    assert!(sent > 0);
    let mut next = 0u32;
    while next < sent {
        let (t, payload) = tokio::time::timeout(WAIT, h.from_devices.recv())
            .await
            .expect("every acknowledged heartbeat arrives")
            .unwrap();
        assert!(!t.contains("/d/STORM-1/"), "{t}");
        if t == topic("PUB-1", Channel::Heartbeat) {
            assert_eq!(payload, next.to_be_bytes(), "in order, none lost");
            next += 1;
        }
    }
    // Controller, publisher, the surviving storm connection.
    assert_eq!(h.fx.edge.live_sessions(), 3);
    h.assert_router_alive(&["STORM-1"]).await;
    h.stop().await;
}

/// 40 connections of one identity racing each other (no rate limit): exactly one survives,
/// every other one is closed, and the router never sees two links for one client id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_takeovers_leave_exactly_one_session() {
    let mut h = Harness::start_with(|c| {
        c.rate_limit = ConnectRateLimit {
            max_connects: 1000,
            window: std::time::Duration::from_secs(60),
        }
    })
    .await;
    let fx = &h.fx;
    let attempts = (0..40).map(|_| async move {
        let mut raw = Raw::tls(fx, "RACE-1").await;
        raw.send(&raw::connect("RACE-1", true, 30)).await.unwrap();
        let ack = raw.connack().await;
        (raw, ack)
    });
    let results = futures_util::future::join_all(attempts).await;
    let mut survivors = Vec::new();
    for (mut raw, ack) in results {
        match ack {
            // Accepted, then possibly taken over by a later one.
            Some((false, 0)) => {
                raw.send(&raw::pingreq()).await.ok();
                loop {
                    match raw.next().await {
                        Some(f) if f.kind() == raw::PINGRESP => {
                            survivors.push(raw);
                            break;
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
            }
            // Refused (a takeover chain that took too long): CONNACK 3, counted.
            Some((false, 3)) => {}
            None => {}
            other => panic!("unexpected CONNACK {other:?}"),
        }
    }
    // A survivor may still be taken over by a slower racer: keep the last one standing.
    eventually("one RACE-1 session", || h.fx.edge.live_sessions() == 2).await;
    let mut alive = 0;
    for mut raw in survivors {
        if raw.send(&raw::pingreq()).await.is_ok()
            && raw
                .next_within(std::time::Duration::from_secs(2))
                .await
                .is_ok_and(|f| f.is_some())
        {
            alive += 1;
        }
    }
    assert_eq!(alive, 1, "exactly one RACE-1 connection is left");
    h.assert_router_alive(&["RACE-1"]).await;
    h.stop().await;
}

/// Seeded fuzz: valid frames with random mutations, 60 connections. Every connection either
/// stays usable or is closed with exactly one counted refusal (a connection task that panics
/// or closes silently fails this), and the router survives all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_frames_never_hurt_the_router() {
    let mut h = Harness::start().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0001);
    for n in 0..60 {
        let id = format!("FZ-{n}");
        let bytes = loop {
            let candidate = fuzz_frames(&mut rng, &id);
            if framing(&candidate) == Framing::Complete {
                break candidate;
            }
        };
        let before = total_refusals(h.metrics());
        let mut raw = Raw::connected(&h.fx, &id).await;
        let _ = raw.send(&bytes).await;
        let _ = raw.send(&raw::pingreq()).await;
        let mut open = false;
        while let Some(frame) = raw.next().await {
            if frame.kind() == raw::PINGRESP {
                open = true;
                break;
            }
        }
        if open {
            assert_eq!(total_refusals(h.metrics()), before, "{id}: {bytes:02x?}");
        } else {
            eventually(&id, || total_refusals(h.metrics()) > before).await;
            assert_eq!(
                total_refusals(h.metrics()),
                before + 1,
                "{id}: {bytes:02x?}"
            );
        }
    }
    h.assert_router_alive(&[]).await;
    h.stop().await;
}

/// One to four frames, valid for device `id` or not, some with random bytes flipped.
fn fuzz_frames(rng: &mut impl Rng, id: &str) -> Vec<u8> {
    let hb = topic(id, Channel::Heartbeat);
    let down = topic(id, Channel::Command).replace("/cmd", "/+");
    let mut out = Vec::new();
    for _ in 0..rng.random_range(1..=4) {
        let mut frame = match rng.random_range(0..8) {
            0 => raw::publish(rng.random_range(0..=1), hb.as_bytes(), 1, b"payload"),
            1 => raw::subscribe(2, &[(down.as_bytes(), rng.random_range(0..=2))]),
            2 => raw::unsubscribe(3, &[down.as_bytes()]),
            3 => raw::puback(rng.random()),
            4 => raw::pingreq(),
            5 => raw::connect(id, true, 30),
            6 => raw::ack(rng.random_range(0..=15) << 4, rng.random()),
            _ => (0..rng.random_range(2..12)).map(|_| rng.random()).collect(),
        };
        for _ in 0..rng.random_range(0..3) {
            let at = rng.random_range(0..frame.len());
            frame[at] ^= 1 << rng.random_range(0..8);
        }
        out.extend(frame);
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// Every frame complete and none is a DISCONNECT (or the stream stops being parseable).
    Complete,
    /// The edge would wait for more bytes, or would see a DISCONNECT (a graceful close).
    Other,
}

/// How the edge will frame `bytes` (rumqttd's fixed header rules).
fn framing(bytes: &[u8]) -> Framing {
    let mut at = 0;
    while at < bytes.len() {
        let byte1 = bytes[at];
        let (mut len, mut i) = (0usize, 1);
        loop {
            let Some(&b) = bytes.get(at + i) else {
                return Framing::Other;
            };
            len |= usize::from(b & 0x7f) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i > 4 {
                // Malformed remaining length: the edge refuses here.
                return Framing::Complete;
            }
        }
        if byte1 >> 4 == 14 {
            return Framing::Other;
        }
        if len > posfleet_proto::MAX_PACKET_SIZE {
            return Framing::Complete;
        }
        at += i + len;
    }
    if at == bytes.len() {
        Framing::Complete
    } else {
        Framing::Other
    }
}
