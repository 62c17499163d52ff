//! Session tests against the fake broker (mTLS on loopback, port 0).

use std::time::Duration;

use posfleet_proto::{Channel, DeviceId, Filter, Topic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::testing::{FakeBroker, Seen, TestPki};

const WAIT: Duration = Duration::from_secs(10);

fn id() -> DeviceId {
    DeviceId::new("T-0001").unwrap()
}

fn config(pki: &TestPki, broker: &FakeBroker) -> SessionConfig {
    let mut cfg = SessionConfig::new(
        "127.0.0.1",
        broker.addr.port(),
        id().as_str(),
        pki.device_tls(id().as_str()),
    );
    cfg.subscriptions = vec![Filter::device_downlink(&id())];
    cfg.last_will = Some((
        Topic::for_device(&id(), Channel::Presence),
        b"gone".to_vec(),
    ));
    cfg.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
    };
    cfg
}

async fn next_event(events: &mut mpsc::Receiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("timed out waiting for a session event")
        .expect("session ended")
}

fn is_publish(seen: &Seen) -> bool {
    matches!(seen, Seen::Publish { .. })
}

fn hb() -> Topic {
    Topic::for_device(&id(), Channel::Heartbeat)
}

#[tokio::test]
async fn connects_with_will_subscribes_and_publishes() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let (handle, mut events) =
        spawn_session(config(&pki, &broker), &tracker, CancellationToken::new()).unwrap();

    assert_eq!(
        broker.next().await,
        Seen::Connect {
            client_id: "T-0001".into(),
            clean_session: true,
            will: Some((
                "posfleet/v1/d/T-0001/up/presence".into(),
                bytes::Bytes::from_static(b"gone")
            )),
        }
    );
    assert_eq!(
        broker.next().await,
        Seen::Subscribe(vec!["posfleet/v1/d/T-0001/down/+".into()])
    );
    assert_eq!(
        next_event(&mut events).await,
        SessionEvent::Connected {
            session_present: false
        }
    );
    assert!(handle.is_connected());
    let stats = handle.stats();
    assert_eq!((stats.connects, stats.attempts()), (1, 1), "{stats:?}");
    assert!(stats.last_connack_ms > 0, "{stats:?}");

    handle
        .publish(&hb(), b"beat".to_vec(), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        broker.next_matching(is_publish).await,
        Seen::Publish {
            topic: "posfleet/v1/d/T-0001/up/hb".into(),
            payload: bytes::Bytes::from_static(b"beat"),
            qos: QoS::AtLeastOnce,
        }
    );
    handle.flush(WAIT).await.unwrap();

    tokio::time::timeout(WAIT, handle.disconnect())
        .await
        .unwrap();
    assert_eq!(broker.next().await, Seen::Disconnect);
    assert!(handle.is_closed() && !handle.is_connected());
    assert!(matches!(
        handle.publish(&hb(), vec![], QoS::AtLeastOnce).await,
        Err(MqttError::Closed)
    ));
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
}

#[tokio::test]
async fn resubscribes_only_when_the_broker_has_no_session() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let (handle, mut events) =
        spawn_session(config(&pki, &broker), &tracker, CancellationToken::new()).unwrap();
    assert!(matches!(broker.next().await, Seen::Connect { .. }));
    assert!(matches!(broker.next().await, Seen::Subscribe(_)));
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Connected { .. }
    ));

    // Broker restart without sessions: reconnect (after a backoff) and subscribe again.
    broker.kick();
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Disconnected { .. }
    ));
    assert!(matches!(
        broker
            .next_matching(|s| matches!(s, Seen::Connect { .. }))
            .await,
        Seen::Connect { .. }
    ));
    assert!(matches!(broker.next().await, Seen::Subscribe(_)));
    assert_eq!(
        next_event(&mut events).await,
        SessionEvent::Connected {
            session_present: false
        }
    );

    // With the session kept, the subscription is not repeated: the next packet after CONNECT
    // is our publish.
    broker.set_session_present(true);
    broker.kick();
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Disconnected { .. }
    ));
    assert_eq!(
        next_event(&mut events).await,
        SessionEvent::Connected {
            session_present: true
        }
    );
    handle
        .publish(&hb(), b"x".to_vec(), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(
        broker
            .next_matching(|s| matches!(s, Seen::Connect { .. }))
            .await,
        Seen::Connect { .. }
    ));
    assert!(is_publish(&broker.next().await));
    assert_eq!(handle.stats().connects, 3);
    handle.disconnect().await;
}

#[tokio::test]
async fn drops_and_counts_publishes_on_foreign_topics() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let (handle, mut events) =
        spawn_session(config(&pki, &broker), &tracker, CancellationToken::new()).unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Connected { .. }
    ));
    assert!(matches!(broker.next().await, Seen::Connect { .. }));
    assert!(matches!(broker.next().await, Seen::Subscribe(_)));

    broker.push("$SYS/broker/uptime", b"1");
    broker.push("posfleet/v1/d/T-0001/down/cmd", b"signed");
    assert_eq!(
        next_event(&mut events).await,
        SessionEvent::Message {
            topic: Topic::for_device(&id(), Channel::Command),
            payload: bytes::Bytes::from_static(b"signed"),
        }
    );
    let stats = handle.stats();
    assert_eq!((stats.invalid_topics, stats.messages), (1, 1));
    handle.disconnect().await;
}

#[tokio::test]
async fn flush_waits_for_acks_and_settles_publishes_lost_with_the_session() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let (handle, mut events) =
        spawn_session(config(&pki, &broker), &tracker, CancellationToken::new()).unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Connected { .. }
    ));

    broker.set_ack_publishes(false);
    handle
        .publish(&hb(), b"unacked".to_vec(), QoS::AtLeastOnce)
        .await
        .unwrap();
    broker.next_matching(is_publish).await;
    assert!(matches!(
        handle.flush(Duration::from_millis(200)).await,
        Err(MqttError::FlushTimeout { outstanding: 1, .. })
    ));

    // The broker loses its session: rumqttc discards the unacked publish; flush must not hang.
    broker.kick();
    tokio::time::timeout(WAIT, handle.flush(WAIT))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(handle.stats().lost_publishes, 1);
    handle.disconnect().await;
}

#[tokio::test]
async fn graceful_disconnect_sends_queued_publishes_first() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let (handle, mut events) =
        spawn_session(config(&pki, &broker), &tracker, CancellationToken::new()).unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Connected { .. }
    ));
    for i in 0..5u8 {
        handle
            .try_publish(&hb(), vec![i], QoS::AtLeastOnce)
            .unwrap();
    }
    tokio::time::timeout(WAIT, handle.disconnect())
        .await
        .unwrap();
    for i in 0..5u8 {
        match broker
            .next_matching(|s| !matches!(s, Seen::Connect { .. } | Seen::Subscribe(_)))
            .await
        {
            Seen::Publish { payload, .. } => assert_eq!(payload.as_ref(), &[i]),
            other => panic!("expected publish {i}, got {other:?}"),
        }
    }
    assert_eq!(broker.next().await, Seen::Disconnect);
}

#[tokio::test]
async fn cancel_ends_the_session_without_disconnect() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let (handle, mut events) =
        spawn_session(config(&pki, &broker), &tracker, cancel.clone()).unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Connected { .. }
    ));
    cancel.cancel();
    tokio::time::timeout(WAIT, handle.closed()).await.unwrap();
    assert_eq!(
        broker
            .next_matching(|s| matches!(s, Seen::Closed | Seen::Disconnect))
            .await,
        Seen::Closed
    );
    assert!(
        tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn retries_with_backoff_while_refused_and_queue_is_bounded() {
    let pki = TestPki::new();
    let mut broker = FakeBroker::start(&pki).await;
    broker.set_refuse(true);
    let tracker = TaskTracker::new();
    let mut cfg = config(&pki, &broker);
    cfg.request_capacity = 1;
    let (handle, _events) = spawn_session(cfg, &tracker, CancellationToken::new()).unwrap();
    for _ in 0..3 {
        broker
            .next_matching(|s| matches!(s, Seen::Connect { .. }))
            .await;
    }
    let stats = handle.stats();
    assert!(stats.connection_errors >= 2, "{stats:?}");
    // Refused at CONNACK: attempts that failed, none accepted, no connection lost.
    assert_eq!(stats.connects, 0, "{stats:?}");
    assert_eq!(stats.failed_attempts, stats.connection_errors, "{stats:?}");
    assert_eq!(stats.last_connack_ms, 0, "{stats:?}");
    assert!(!handle.is_connected());

    handle
        .try_publish(&hb(), vec![1], QoS::AtLeastOnce)
        .unwrap();
    assert!(matches!(
        handle.try_publish(&hb(), vec![2], QoS::AtLeastOnce),
        Err(MqttError::QueueFull)
    ));
    // Not connected: disconnect ends the session at once.
    tokio::time::timeout(WAIT, handle.disconnect())
        .await
        .unwrap();
    assert!(handle.is_closed());
}

#[tokio::test]
async fn refuses_oversized_payloads_and_bad_settings() {
    let pki = TestPki::new();
    let broker = FakeBroker::start(&pki).await;
    let tracker = TaskTracker::new();
    let (handle, _events) =
        spawn_session(config(&pki, &broker), &tracker, CancellationToken::new()).unwrap();
    let big = vec![0u8; Channel::Heartbeat.max_payload() + 1];
    assert!(matches!(
        handle.try_publish(&hb(), big, QoS::AtLeastOnce),
        Err(MqttError::Payload(_))
    ));
    handle.disconnect().await;

    for broken in [
        |c: &mut SessionConfig| c.incoming_capacity = 0,
        |c: &mut SessionConfig| c.request_capacity = 0,
        |c: &mut SessionConfig| c.inflight = 0,
        |c: &mut SessionConfig| c.keep_alive = Duration::from_millis(500),
        |c: &mut SessionConfig| c.client_id.clear(),
        |c: &mut SessionConfig| {
            c.last_will = Some((
                Topic::for_device(&id(), Channel::Presence),
                vec![0; 64 * 1024],
            ))
        },
    ] {
        let mut cfg = config(&pki, &broker);
        broken(&mut cfg);
        assert!(spawn_session(cfg, &tracker, CancellationToken::new()).is_err());
    }
}
