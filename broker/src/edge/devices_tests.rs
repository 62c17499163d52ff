//! The edge's terminal sessions without sockets: subscriptions, the in-flight window,
//! redelivery, generations and the bounds.

use bytes::Bytes;
use posfleet_proto::{Channel, DeviceId, Topic};

use super::*;

fn device(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn command(device: &DeviceId, n: usize) -> Downlink {
    Downlink {
        topic: Bytes::from(Topic::for_device(device, Channel::Command).to_string()),
        payload: Bytes::from(format!("command {n}")),
        channel: Channel::Command,
    }
}

fn payloads(out: &Outgoing) -> Vec<String> {
    out.publishes
        .iter()
        .map(|(_, _, _, d)| String::from_utf8(d.payload.to_vec()).unwrap())
        .collect()
}

/// A terminal connected with generation `generation`, subscribed to every downlink at QoS 1.
fn subscribed(
    sessions: &DeviceSessions,
    id: &DeviceId,
    generation: u64,
    clean: bool,
) -> Arc<DeviceSession> {
    let (session, _) = sessions.attach(id, generation, clean);
    assert!(session.subscribe(generation, 1, &[(None, 1)]));
    let out = session.take(generation);
    assert_eq!(out.answers, vec![Answer::SubAck(1, vec![1])]);
    session
}

#[test]
fn downlinks_reach_only_a_subscribed_terminal() {
    let sessions = DeviceSessions::default();
    let a = device("A-1");
    let b = device("B-1");
    assert_eq!(sessions.deliver(&a, command(&a, 0)), Delivery::NoSubscriber);
    let (session, present) = sessions.attach(&a, 1, true);
    assert!(!present);
    // Connected but not subscribed: nothing to deliver to.
    assert_eq!(sessions.deliver(&a, command(&a, 0)), Delivery::NoSubscriber);
    assert!(session.subscribe(1, 7, &[(Some(Channel::Command), 1)]));
    assert_eq!(sessions.deliver(&a, command(&a, 1)), Delivery::Queued);
    assert_eq!(sessions.deliver(&b, command(&b, 1)), Delivery::NoSubscriber);
    let out = session.take(1);
    assert_eq!(out.answers, vec![Answer::SubAck(7, vec![1])]);
    assert_eq!(payloads(&out), vec!["command 1"]);
    // Another downlink channel was not subscribed.
    let txack = Downlink {
        channel: Channel::TransactionAck,
        ..command(&a, 2)
    };
    assert_eq!(sessions.deliver(&a, txack), Delivery::NoSubscriber);
}

#[test]
fn at_most_the_window_is_in_flight_and_pubacks_must_come_in_order() {
    let sessions = DeviceSessions::default();
    let a = device("A-1");
    let session = subscribed(&sessions, &a, 1, true);
    for n in 0..MAX_INFLIGHT + 3 {
        assert_eq!(sessions.deliver(&a, command(&a, n)), Delivery::Queued);
    }
    let out = session.take(1);
    assert_eq!(out.publishes.len(), MAX_INFLIGHT);
    assert!(session.take(1).is_empty(), "the window is full");
    let ids: Vec<u16> = out.publishes.iter().map(|p| p.0).collect();
    // Out of order: refused, nothing settled.
    assert_eq!(session.puback(1, ids[1]), Err(PubAckError::Unexpected));
    assert_eq!(session.puback(1, 999), Err(PubAckError::Unexpected));
    assert_eq!(session.puback(1, ids[0]), Ok(()));
    let more = session.take(1);
    assert_eq!(payloads(&more), vec![format!("command {MAX_INFLIGHT}")]);
    assert!(more.publishes.iter().all(|p| p.1 && !p.2));
}

#[test]
fn a_persistent_session_redelivers_what_was_in_flight_with_the_same_ids() {
    let sessions = DeviceSessions::default();
    let a = device("A-1");
    let session = subscribed(&sessions, &a, 1, false);
    for n in 0..3 {
        sessions.deliver(&a, command(&a, n));
    }
    let first = session.take(1);
    assert_eq!(session.puback(1, first.publishes[0].0), Ok(()));
    sessions.detach(&a, 1);
    // Queued while away.
    assert_eq!(sessions.deliver(&a, command(&a, 3)), Delivery::Queued);
    let (again, present) = sessions.attach(&a, 2, false);
    assert!(present);
    let out = again.take(2);
    assert_eq!(payloads(&out), vec!["command 1", "command 2", "command 3"]);
    let redelivered: Vec<(u16, bool)> = out.publishes.iter().map(|p| (p.0, p.2)).collect();
    assert_eq!(
        redelivered[..2],
        [(first.publishes[1].0, true), (first.publishes[2].0, true)]
    );
    assert!(!redelivered[2].1, "a new downlink is not a duplicate");
    // The old connection's PUBACK no longer settles anything of the new one.
    assert_eq!(session.puback(1, first.publishes[1].0), Ok(()));
    assert!(again.take(2).is_empty());
    assert_eq!(again.puback(2, first.publishes[1].0), Ok(()));
}

#[test]
fn a_clean_session_starts_empty_and_ends_with_its_connection() {
    let sessions = DeviceSessions::default();
    let a = device("A-1");
    let _ = subscribed(&sessions, &a, 1, false);
    sessions.deliver(&a, command(&a, 0));
    sessions.detach(&a, 1);
    let (session, present) = sessions.attach(&a, 2, true);
    assert!(!present, "a clean session never reports a previous session");
    assert!(session.take(2).is_empty());
    assert_eq!(sessions.deliver(&a, command(&a, 1)), Delivery::NoSubscriber);
    sessions.detach(&a, 2);
    assert_eq!(sessions.len(), 0);
}

#[test]
fn answers_owed_to_a_replaced_connection_never_reach_its_successor() {
    let sessions = DeviceSessions::default();
    let a = device("A-1");
    let session = subscribed(&sessions, &a, 1, false);
    // The successor attaches before the old connection's PUBACK comes back from the router.
    let (again, _) = sessions.attach(&a, 2, false);
    assert!(session.answer(1, Answer::PubAck(5)));
    assert!(again.take(2).answers.is_empty());
    // A late detach of the old generation leaves the new connection attached.
    sessions.detach(&a, 1);
    assert!(again.answer(2, Answer::PingResp));
    assert_eq!(again.take(2).answers, vec![Answer::PingResp]);
}

#[test]
fn a_terminal_that_never_reads_stays_bounded() {
    let sessions = DeviceSessions::default();
    let a = device("A-1");
    let session = subscribed(&sessions, &a, 1, false);
    for _ in 0..MAX_OWED_ANSWERS {
        assert!(session.answer(1, Answer::PingResp));
    }
    assert!(!session.answer(1, Answer::PingResp), "one answer too many");
    assert_eq!(session.owed(), MAX_OWED_ANSWERS);
    let mut dropped = 0;
    for n in 0..MAX_QUEUED * 3 {
        if sessions.deliver(&a, command(&a, n)) == Delivery::QueuedDroppedOldest {
            dropped += 1;
        }
    }
    assert_eq!(dropped, MAX_QUEUED * 2);
    let out = session.take(1);
    // The newest are kept.
    assert_eq!(
        payloads(&out).first().map(String::as_str),
        Some(format!("command {}", MAX_QUEUED * 2).as_str())
    );
    // Bytes too: one large downlink after another.
    sessions.detach(&a, 1);
    let (big, _) = sessions.attach(&a, 2, false);
    big.take(2);
    let large = Bytes::from(vec![b'x'; 200 * 1024]);
    for _ in 0..MAX_INFLIGHT + 5 {
        let downlink = Downlink {
            payload: large.clone(),
            ..command(&a, 0)
        };
        sessions.deliver(&a, downlink);
    }
    let state = big.lock();
    assert!(state.queued_bytes <= MAX_QUEUED_BYTES);
    assert_eq!(
        state.queued_bytes,
        state.queue.iter().map(|d| d.payload.len()).sum::<usize>()
    );
}

#[test]
fn forget_drops_a_session_and_its_queue() {
    let sessions = DeviceSessions::default();
    let a = device("A-1");
    let _ = subscribed(&sessions, &a, 1, false);
    sessions.detach(&a, 1);
    sessions.deliver(&a, command(&a, 0));
    sessions.forget(&a);
    assert_eq!(sessions.len(), 0);
    let (_, present) = sessions.attach(&a, 2, false);
    assert!(!present);
}

#[test]
fn unsubscribed_downlinks_still_queued_are_not_written() {
    let sessions = DeviceSessions::default();
    let a = device("A-1");
    let session = subscribed(&sessions, &a, 1, true);
    sessions.deliver(&a, command(&a, 0));
    assert!(session.unsubscribe(1, 9, &[None]));
    let out = session.take(1);
    assert_eq!(out.answers, vec![Answer::UnsubAck(9)]);
    assert!(out.publishes.is_empty());
}

#[test]
fn qos0_subscriptions_get_qos0_downlinks() {
    let sessions = DeviceSessions::default();
    let a = device("A-1");
    let (session, _) = sessions.attach(&a, 1, true);
    assert!(session.subscribe(1, 1, &[(Some(Channel::Command), 0)]));
    sessions.deliver(&a, command(&a, 0));
    let out = session.take(1);
    assert_eq!(out.publishes.len(), 1);
    assert_eq!((out.publishes[0].0, out.publishes[0].1), (0, false));
    // Nothing in flight: nothing to acknowledge.
    assert_eq!(session.puback(1, 1), Err(PubAckError::Unexpected));
}

#[test]
fn encoded_packets_parse_back() {
    let a = device("A-1");
    let mut out = BytesMut::new();
    assert!(encode_publish(
        &mut out,
        0x1234,
        true,
        true,
        &command(&a, 1)
    ));
    encode_answer(&mut out, &Answer::PubAck(3));
    encode_answer(&mut out, &Answer::SubAck(4, vec![1, 0, 0x80]));
    encode_answer(&mut out, &Answer::UnsubAck(5));
    encode_answer(&mut out, &Answer::PingResp);
    let mut packets = Vec::new();
    while !out.is_empty() {
        packets.push(rumqttc::Packet::read(&mut out, 1 << 20).unwrap());
    }
    match &packets[0] {
        rumqttc::Packet::Publish(p) => {
            assert_eq!(
                (p.pkid, p.dup, p.qos),
                (0x1234, true, rumqttc::QoS::AtLeastOnce)
            );
            assert_eq!(&p.payload[..], b"command 1");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(packets[1], rumqttc::Packet::PubAck(ref a) if a.pkid == 3));
    assert!(
        matches!(packets[2], rumqttc::Packet::SubAck(ref s) if s.pkid == 4 && s.return_codes.len() == 3)
    );
    assert!(matches!(packets[3], rumqttc::Packet::UnsubAck(ref u) if u.pkid == 5));
    assert!(matches!(packets[4], rumqttc::Packet::PingResp));
}
