//! The local link against a real router: bursts past the router's 200-message batch, the
//! intake counter, the device gate, downlinks at the subscriber's QoS and a graceful detach.
//! [`BareEdge`] and [`TestLink`] are shared with the controller's tests.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use posfleet_proto::pki::PkiDir;
use posfleet_proto::{Channel, DeviceId, Filter, Topic};
use posfleet_runtime::mqtt::{MqttHandle, SessionConfig, SessionEvent, spawn_session};
use posfleet_runtime::tls::client_config_from_pem;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter as RouterFilter, Packet, Publish, QoS,
    RetainForwardRule, Subscribe,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::edge::{EdgeConfig, EdgeHandle, mtls_server_config, spawn_edge};
use crate::metrics::Metrics;

pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// An edge with no controller of its own, and its PKI.
pub(crate) struct BareEdge {
    _dir: tempfile::TempDir,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) pki: PkiDir,
    pub(crate) edge: EdgeHandle,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tracker: TaskTracker,
    pub(crate) cancel: CancellationToken,
}

impl BareEdge {
    pub(crate) async fn start(tweak: impl FnOnce(&mut EdgeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::at(dir.path().join("pki"));
        pki.init(&[]).unwrap();
        let tls =
            mtls_server_config(&pki.ca_cert(), &pki.server_cert(), &pki.server_key()).unwrap();
        let mut config = EdgeConfig::new(tls);
        config.router.max_connections = 64;
        config.router.controller_segment_size = 1024 * 1024;
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let edge = spawn_edge(
            listener,
            addr,
            config,
            Arc::clone(&metrics),
            &tracker,
            cancel.clone(),
        );
        Self {
            dir: dir.path().to_owned(),
            _dir: dir,
            pki,
            edge,
            metrics,
            tracker,
            cancel,
        }
    }

    /// A terminal's own mTLS session, subscribed to its downlink.
    pub(crate) fn terminal(&self, device: &DeviceId) -> (MqttHandle, mpsc::Receiver<SessionEvent>) {
        let (ca, cert, key) = self.device_pem(device);
        let tls = client_config_from_pem(&ca, cert.as_bytes(), key.as_bytes()).unwrap();
        let port = self.edge.local_addr().port();
        let mut session = SessionConfig::new("127.0.0.1", port, device.as_str(), tls);
        session.subscriptions = vec![Filter::device_downlink(device)];
        spawn_session(session, &self.tracker, self.cancel.child_token()).unwrap()
    }

    /// The fleet CA, and a new certificate and key for `device`.
    pub(crate) fn device_pem(&self, device: &DeviceId) -> (Vec<u8>, String, String) {
        let issued = self.pki.load_ca().unwrap().issue_device(device).unwrap();
        let ca = std::fs::read(self.pki.ca_cert()).unwrap();
        (ca, issued.cert_pem, issued.key_pem)
    }

    pub(crate) async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .expect("the edge stops");
    }
}

/// A raw link to the edge's router, standing in for another router client in tests.
pub(crate) struct TestLink {
    edge: EdgeHandle,
    tx: LinkTx,
    rx: LinkRx,
}

impl TestLink {
    pub(crate) async fn attach(edge: &EdgeHandle, client_id: &str) -> Self {
        let (e, id) = (edge.clone(), client_id.to_owned());
        let (tx, rx) = tokio::task::spawn_blocking(move || e.build_local_link(&id))
            .await
            .unwrap()
            .unwrap();
        Self {
            edge: edge.clone(),
            tx,
            rx,
        }
    }

    /// Subscribes (QoS 0) and waits for the SUBACK.
    pub(crate) async fn subscribe(&mut self, filter: &Filter) {
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![RouterFilter {
                path: filter.to_string(),
                qos: QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::Never,
            }],
        };
        self.send(vec![Packet::Subscribe(subscribe, None)]);
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(Notification::DeviceAck(ack)) = self.rx.next().await.unwrap() {
                    let ack = Option::<Packet>::from(Notification::DeviceAck(ack));
                    if matches!(ack, Some(Packet::SubAck(..))) {
                        return;
                    }
                }
            }
        })
        .await
        .expect("SUBACK");
    }

    /// Publishes `payloads` on `topic` (QoS 0), in one batch.
    pub(crate) fn publish(&mut self, topic: &Topic, payloads: impl IntoIterator<Item = Bytes>) {
        let topic = Bytes::from(topic.to_string());
        let packets = payloads
            .into_iter()
            .map(|payload| Packet::Publish(Publish::new(topic.clone(), payload, false), None))
            .collect();
        self.send(packets);
    }

    /// The next message forwarded to this link (answering `Unschedule` with a wake).
    pub(crate) async fn next_message(&mut self) -> (String, Bytes) {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.rx.next().await.unwrap() {
                    Some(Notification::Forward(forward)) => {
                        let topic = String::from_utf8(forward.publish.topic.to_vec()).unwrap();
                        return (topic, forward.publish.payload);
                    }
                    Some(Notification::Unschedule) => self.rx.wake().await.unwrap(),
                    _ => {}
                }
            }
        })
        .await
        .expect("a forwarded message")
    }

    fn send(&mut self, packets: Vec<Packet>) {
        self.edge.send_local(&mut self.tx, packets).unwrap();
    }

    /// Ends the link in-band.
    pub(crate) fn detach(mut self) {
        let disconnect = Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        };
        self.send(vec![Packet::Disconnect(disconnect, None)]);
    }
}

/// Starts a local bus on `edge` subscribed to every uplink and waits until it is attached.
async fn local_bus(
    edge: &BareEdge,
    incoming_capacity: usize,
) -> (Bus, mpsc::Receiver<SessionEvent>, CancellationToken) {
    attach_local(edge.edge.clone(), incoming_capacity, &edge.tracker).await
}

/// An embedded controller's local bus on `edge`, subscribed to every uplink, with
/// `incoming_capacity` events in its channel; returns once it is attached (also used by
/// `edge::lag_tests`).
pub(crate) async fn attach_local(
    edge: crate::edge::EdgeHandle,
    incoming_capacity: usize,
    tracker: &TaskTracker,
) -> (Bus, mpsc::Receiver<SessionEvent>, CancellationToken) {
    let cancel = CancellationToken::new();
    let mut cfg = LocalConfig::new(edge);
    cfg.incoming_capacity = incoming_capacity;
    let (bus, mut events) = spawn_bus(
        BusConfig::Local(cfg),
        Filter::all_uplinks(),
        tracker,
        cancel.clone(),
    )
    .unwrap();
    let first = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
    assert_eq!(
        first,
        Some(SessionEvent::Connected {
            session_present: false
        })
    );
    assert!(bus.is_connected());
    (bus, events, cancel)
}

fn device(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_gate_opens_once_the_local_subscription_is_in_the_router() {
    let edge = BareEdge::start(|config| {
        config.wait_for_controller = Some(Duration::from_secs(3600));
    })
    .await;
    assert!(
        !edge.edge.admits_devices(),
        "closed until the controller subscribed"
    );
    let (bus, _events, _cancel) = local_bus(&edge, 8).await;
    assert!(edge.edge.admits_devices(), "open after the SUBACK");
    assert_eq!(bus.client_id(), LOCAL_CONTROLLER_ID);
    // No connection was made to the edge for it.
    assert_eq!(edge.edge.live_sessions(), 0);
    assert_eq!(edge.metrics.edge_connects_total.get(), 0);
    bus.disconnect().await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_routers_batch_arrives_complete_in_order_and_is_counted() {
    let edge = BareEdge::start(|_| {}).await;
    // A small consumer queue: the link task holds back while the consumer is behind.
    let (bus, mut events, _cancel) = local_bus(&edge, 8).await;
    let intake = edge.edge.controller_intake();
    assert_eq!((intake.messages(), intake.bytes()), (0, 0));

    const BURST: usize = 1_000; // five times the router's 200 per pass
    let mut terminal = TestLink::attach(&edge.edge, "T-burst").await;
    let topic = Topic::for_device(&device("T-burst"), Channel::Telemetry);
    let payloads: Vec<Bytes> = (0..BURST)
        .map(|i| Bytes::from(format!("m{i:04}")))
        .collect();
    let total_bytes: usize = payloads.iter().map(Bytes::len).sum();
    for chunk in payloads.chunks(100) {
        terminal.publish(&topic, chunk.iter().cloned());
    }
    for (i, expected) in payloads.iter().enumerate() {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap_or_else(|_| panic!("stalled after {i} of {BURST} messages"));
        assert_eq!(
            event,
            Some(SessionEvent::Message {
                topic: topic.clone(),
                payload: expected.clone(),
            })
        );
    }
    assert_eq!(intake.messages(), u64::try_from(BURST).unwrap());
    assert_eq!(intake.bytes(), u64::try_from(total_bytes).unwrap());
    terminal.detach();
    bus.disconnect().await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_downlinks_go_out_before_the_detach_and_later_ones_are_refused() {
    let edge = BareEdge::start(|_| {}).await;
    let (bus, _events, _cancel) = local_bus(&edge, 8).await;
    let terminal_id = device("T-down");
    let mut terminal = TestLink::attach(&edge.edge, terminal_id.as_str()).await;
    terminal
        .subscribe(&Filter::device_downlink(&terminal_id))
        .await;

    const DOWNLINKS: usize = 300;
    let topic = Topic::for_device(&terminal_id, Channel::Command);
    for i in 0..DOWNLINKS {
        bus.try_publish(&topic, format!("c{i:03}").into_bytes())
            .unwrap();
    }
    tokio::time::timeout(WAIT, bus.disconnect())
        .await
        .expect("detached");
    assert!(bus.is_closed());
    assert!(!bus.is_connected());
    assert!(matches!(
        bus.try_publish(&topic, b"late".to_vec()),
        Err(BusError::Closed)
    ));
    for i in 0..DOWNLINKS {
        let (got_topic, payload) = terminal.next_message().await;
        assert_eq!(got_topic, topic.to_string());
        assert_eq!(payload, Bytes::from(format!("c{i:03}")));
    }
    terminal.detach();
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_receives_local_downlinks_at_qos_1() {
    let edge = BareEdge::start(|_| {}).await;
    let (bus, _events, _cancel) = local_bus(&edge, 8).await;
    let terminal_id = device("T-qos");
    let (ca, cert, key) = edge.device_pem(&terminal_id);
    let tls = client_config_from_pem(&ca, cert.as_bytes(), key.as_bytes()).unwrap();
    let mut options = rumqttc::MqttOptions::new(
        terminal_id.as_str(),
        "127.0.0.1",
        edge.edge.local_addr().port(),
    );
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 8);
    client
        .subscribe(
            Filter::device_downlink(&terminal_id).to_string(),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let topic = Topic::for_device(&terminal_id, Channel::Command);
    let publish = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await.unwrap() {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    bus.try_publish(&topic, b"signed".to_vec()).unwrap();
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish)) => return publish,
                _ => {}
            }
        }
    })
    .await
    .expect("the downlink arrives");
    assert_eq!(publish.topic, topic.to_string());
    assert_eq!(publish.qos, rumqttc::QoS::AtLeastOnce);
    assert_eq!(&publish.payload[..], b"signed");
    // The terminal is the edge's only connection.
    assert_eq!(edge.edge.live_sessions(), 1);
    client.disconnect().await.unwrap();
    bus.disconnect().await;
    edge.stop().await;
}
