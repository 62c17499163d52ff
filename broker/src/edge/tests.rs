//! Edge tests over real mTLS on loopback with rumqttc clients.

use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::pki::{CertifiedKey, PkiDir, parse_pem_certs};
use posfleet_proto::{Channel, DeviceId, Topic};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;

pub(super) const WAIT: Duration = Duration::from_secs(10);

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) pki: PkiDir,
    pub(super) edge: EdgeHandle,
    pub(super) metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Fixture {
    pub(super) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(super) async fn start_with(tweak: impl FnOnce(&mut EdgeConfig)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, tweak)
    }

    /// Starts the edge on a listener the test prepared (socket options).
    pub(super) fn start_on(listener: TcpListener, tweak: impl FnOnce(&mut EdgeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::at(dir.path().join("pki"));
        pki.init(&[]).unwrap();
        let tls =
            mtls_server_config(&pki.ca_cert(), &pki.server_cert(), &pki.server_key()).unwrap();
        let mut config = EdgeConfig::new(tls);
        config.router.controller_segment_size = 1024 * 1024;
        config.router.max_connections = 256;
        tweak(&mut config);
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let edge = spawn_edge(
            listener,
            addr,
            config,
            metrics.clone(),
            &tracker,
            cancel.clone(),
        );
        Self {
            _dir: dir,
            pki,
            edge,
            metrics,
            cancel,
            tracker,
        }
    }

    pub(super) fn device_cert(&self, id: &str) -> CertifiedKey {
        let ca = self.pki.load_ca().unwrap();
        ca.issue_device(&DeviceId::new(id).unwrap()).unwrap()
    }

    pub(super) fn controller_cert(&self) -> CertifiedKey {
        CertifiedKey {
            cert_pem: std::fs::read_to_string(self.pki.controller_cert()).unwrap(),
            key_pem: std::fs::read_to_string(self.pki.controller_key()).unwrap(),
        }
    }

    pub(super) fn client(
        &self,
        client_id: &str,
        cert: Option<&CertifiedKey>,
        will: Option<LastWill>,
    ) -> (AsyncClient, EventLoop) {
        let ca = std::fs::read(self.pki.ca_cert()).unwrap();
        client(self.edge.local_addr().port(), &ca, client_id, cert, will)
    }

    /// A TLS connector presenting `cert`, trusting the fleet CA (for raw MQTT sessions).
    pub(super) fn tls_connector(&self, cert: &CertifiedKey) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(self.pki.ca_cert()).unwrap();
        for c in parse_pem_certs(&ca).unwrap() {
            roots.add(c).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                parse_pem_certs(cert.cert_pem.as_bytes()).unwrap(),
                PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    pub(super) async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .expect("edge stops in bounded time");
    }
}

pub(super) fn client(
    port: u16,
    ca_pem: &[u8],
    client_id: &str,
    cert: Option<&CertifiedKey>,
    will: Option<LastWill>,
) -> (AsyncClient, EventLoop) {
    let mut roots = rustls::RootCertStore::empty();
    for ca in parse_pem_certs(ca_pem).unwrap() {
        roots.add(ca).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some(cert) => builder
            .with_client_auth_cert(
                parse_pem_certs(cert.cert_pem.as_bytes()).unwrap(),
                PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )));
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(
        posfleet_proto::MAX_PACKET_SIZE,
        posfleet_proto::MAX_PACKET_SIZE,
    );
    if let Some(will) = will {
        options.set_last_will(will);
    }
    AsyncClient::new(options, 64)
}

pub(super) fn topic(id: &str, channel: Channel) -> String {
    Topic::for_device(&DeviceId::new(id).unwrap(), channel).to_string()
}

/// Polls until the connection is accepted (Ok) or fails (Err with the error text).
pub(super) async fn connack(eventloop: &mut EventLoop) -> Result<(), String> {
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return if ack.code == ConnectReturnCode::Success {
                        Ok(())
                    } else {
                        Err(format!("{:?}", ack.code))
                    };
                }
                Ok(_) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
    })
    .await
    .expect("connect finishes in bounded time")
}

/// Polls until the connection breaks; returns the error text.
pub(super) async fn closed(eventloop: &mut EventLoop) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Err(error) = eventloop.poll().await {
                return error.to_string();
            }
        }
    })
    .await
    .expect("connection closes in bounded time")
}

/// Polls until SUBACK.
pub(super) async fn suback(eventloop: &mut EventLoop) {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("poll") {
                return;
            }
        }
    })
    .await
    .expect("suback in bounded time");
}

/// A controller subscribed to every uplink, with its event loop driven in a task; received
/// publishes come out of the returned channel.
pub(super) async fn controller(
    fx: &Fixture,
) -> (AsyncClient, tokio::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    let (client, mut eventloop) = fx.client("controller:main", Some(&fx.controller_cert()), None);
    connack(&mut eventloop).await.unwrap();
    client
        .subscribe(
            posfleet_proto::Filter::all_uplinks().to_string(),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    suback(&mut eventloop).await;
    (client, drive(eventloop))
}

/// Drives an event loop in a task; received publishes come out of the channel.
pub(super) fn drive(mut eventloop: EventLoop) -> tokio::sync::mpsc::Receiver<(String, Vec<u8>)> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic, p.payload.to_vec())).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    rx
}

pub(super) async fn expect_nothing_from(
    rx: &mut tokio::sync::mpsc::Receiver<(String, Vec<u8>)>,
    device: &str,
) {
    // A marker published after the forbidden attempt proves ordering without sleeping.
    while let Ok(Some((topic, _))) =
        tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
    {
        assert!(
            !topic.contains(&format!("/d/{device}/")),
            "unexpected {topic}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_uplink_reaches_controller_and_downlink_reaches_device() {
    let fx = Fixture::start().await;
    let (ctl, mut from_devices) = controller(&fx).await;

    let cert = fx.device_cert("T-1");
    let (dev, mut dev_loop) = fx.client("T-1", Some(&cert), None);
    connack(&mut dev_loop).await.unwrap();
    dev.subscribe(
        topic("T-1", Channel::Command).replace("/cmd", "/+"),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    suback(&mut dev_loop).await;
    let mut to_device = drive(dev_loop);
    dev.publish(
        topic("T-1", Channel::Heartbeat),
        QoS::AtLeastOnce,
        false,
        b"hb".to_vec(),
    )
    .await
    .unwrap();
    let (t, payload) = tokio::time::timeout(WAIT, from_devices.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t, topic("T-1", Channel::Heartbeat));
    assert_eq!(payload, b"hb");

    // 150 QoS 1 downlinks exercise the in-flight window and the PUBACK order check.
    for i in 0..150u32 {
        ctl.publish(
            topic("T-1", Channel::Command),
            QoS::AtLeastOnce,
            false,
            i.to_be_bytes().to_vec(),
        )
        .await
        .unwrap();
    }
    for i in 0..150u32 {
        let (t, payload) = tokio::time::timeout(WAIT, to_device.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t, topic("T-1", Channel::Command));
        assert_eq!(payload, i.to_be_bytes());
    }
    assert_eq!(fx.metrics.acl_refusals("unexpected_puback"), 0);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_another_devices_topic_closes_the_connection() {
    let fx = Fixture::start().await;
    let (_ctl, mut from_devices) = controller(&fx).await;
    let cert = fx.device_cert("T-1");
    let (dev, mut dev_loop) = fx.client("T-1", Some(&cert), None);
    connack(&mut dev_loop).await.unwrap();
    dev.publish(
        topic("T-2", Channel::Heartbeat),
        QoS::AtLeastOnce,
        false,
        b"forged".to_vec(),
    )
    .await
    .unwrap();
    closed(&mut dev_loop).await;
    assert_eq!(fx.metrics.acl_refusals("publish_not_allowed"), 1);
    expect_nothing_from(&mut from_devices, "T-2").await;

    // Publishing a downlink (controller-only) topic is refused as well.
    let (dev, mut dev_loop) = fx.client("T-1", Some(&cert), None);
    connack(&mut dev_loop).await.unwrap();
    dev.publish(
        topic("T-1", Channel::Command),
        QoS::AtMostOnce,
        false,
        b"x".to_vec(),
    )
    .await
    .unwrap();
    closed(&mut dev_loop).await;
    assert_eq!(fx.metrics.acl_refusals("publish_not_allowed"), 2);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_subscriptions_close_the_connection() {
    let fx = Fixture::start().await;
    let cert = fx.device_cert("T-1");
    for (filter, reason) in [
        ("#", "bad_filter"),
        ("$SYS/#", "bad_filter"),
        ("posfleet/v1/d/T-2/down/+", "subscribe_not_allowed"),
        ("posfleet/v1/d/+/up/+", "subscribe_not_allowed"),
    ] {
        let before = fx.metrics.acl_refusals(reason);
        let (dev, mut dev_loop) = fx.client("T-1", Some(&cert), None);
        connack(&mut dev_loop).await.unwrap();
        dev.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        closed(&mut dev_loop).await;
        assert_eq!(fx.metrics.acl_refusals(reason), before + 1, "{filter}");
    }
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_must_match_the_certificate() {
    let fx = Fixture::start().await;
    let cert = fx.device_cert("T-1");
    let (_dev, mut dev_loop) = fx.client("T-2", Some(&cert), None);
    let error = connack(&mut dev_loop).await.unwrap_err();
    assert!(error.contains("BadClientId"), "{error}");
    assert_eq!(fx.metrics.refusals("client_id_mismatch"), 1);

    // An empty client id is replaced by the certificate's identity.
    let (_dev, mut dev_loop) = fx.client("", Some(&cert), None);
    connack(&mut dev_loop).await.unwrap();
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_or_none_are_refused() {
    let fx = Fixture::start().await;
    let other = tempfile::tempdir().unwrap();
    let other_pki = PkiDir::at(other.path());
    let other_ca = other_pki.init(&[]).unwrap();
    let foreign = other_ca
        .issue_device(&DeviceId::new("T-1").unwrap())
        .unwrap();
    let (_dev, mut dev_loop) = fx.client("T-1", Some(&foreign), None);
    assert!(connack(&mut dev_loop).await.is_err());
    let (_dev, mut dev_loop) = fx.client("T-1", None, None);
    assert!(connack(&mut dev_loop).await.is_err());
    // The server records both (the refusal is counted once the handshake fails on its side).
    tokio::time::timeout(WAIT, async {
        while fx.metrics.refusals("bad_client_certificate") < 1
            || fx.metrics.refusals("no_client_certificate") < 1
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("refusals counted");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_a_device_vanishes_but_not_on_disconnect() {
    let fx = Fixture::start().await;
    let (_ctl, mut from_devices) = controller(&fx).await;
    let cert = fx.device_cert("T-1");
    let presence = topic("T-1", Channel::Presence);
    let will = LastWill::new(&presence, b"gone".to_vec(), QoS::AtLeastOnce, false);

    // Graceful DISCONNECT: no will.
    let (dev, mut dev_loop) = fx.client("T-1", Some(&cert), Some(will.clone()));
    connack(&mut dev_loop).await.unwrap();
    dev.publish(
        topic("T-1", Channel::Heartbeat),
        QoS::AtLeastOnce,
        false,
        b"1".to_vec(),
    )
    .await
    .unwrap();
    dev.disconnect().await.unwrap();
    closed(&mut dev_loop).await;
    let (t, _) = tokio::time::timeout(WAIT, from_devices.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t, topic("T-1", Channel::Heartbeat));

    // Vanishing (event loop dropped, socket closed without DISCONNECT): the will arrives.
    let (_dev, mut dev_loop) = fx.client("T-1", Some(&cert), Some(will));
    connack(&mut dev_loop).await.unwrap();
    drop(dev_loop);
    let (t, payload) = tokio::time::timeout(WAIT, from_devices.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (t.as_str(), payload.as_slice()),
        (presence.as_str(), b"gone".as_slice())
    );
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_on_a_forbidden_topic_is_refused_at_connect() {
    let fx = Fixture::start().await;
    let cert = fx.device_cert("T-1");
    let will = LastWill::new(
        topic("T-2", Channel::Presence),
        b"x".to_vec(),
        QoS::AtLeastOnce,
        false,
    );
    let (_dev, mut dev_loop) = fx.client("T-1", Some(&cert), Some(will));
    assert!(connack(&mut dev_loop).await.is_err());
    assert_eq!(fx.metrics.refusals("will_not_allowed"), 1);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_block_a_real_terminal() {
    let fx = Fixture::start().await;
    let addr = fx.edge.local_addr();
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let cert = fx.device_cert("T-1");
    let (_dev, mut dev_loop) = fx.client("T-1", Some(&cert), None);
    let started = std::time::Instant::now();
    connack(&mut dev_loop).await.unwrap();
    let took = started.elapsed();
    // Correctness, not speed: it must not wait for the idle handshakes to time out (10 s).
    assert!(took < Duration::from_secs(5), "connect took {took:?}");
    drop(idle);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_never_arrives_times_out() {
    let fx = Fixture::start_with(|c| c.limits.connect_timeout = Duration::from_millis(300)).await;
    // A TLS session that never sends CONNECT.
    let connector = fx.tls_connector(&fx.device_cert("T-1"));
    let tcp = TcpStream::connect(fx.edge.local_addr()).await.unwrap();
    let mut tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut tls, &mut buf))
        .await
        .expect("server closes the idle session");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert_eq!(fx.metrics.refusals("connect_timeout"), 1);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_closes_the_connection_and_is_not_routed() {
    let fx = Fixture::start().await;
    let (_ctl, mut from_devices) = controller(&fx).await;
    let cert = fx.device_cert("T-1");
    let (dev, mut dev_loop) = fx.client("T-1", Some(&cert), None);
    connack(&mut dev_loop).await.unwrap();
    let big = vec![0u8; Channel::Heartbeat.max_payload() + 1];
    dev.publish(
        topic("T-1", Channel::Heartbeat),
        QoS::AtLeastOnce,
        false,
        big,
    )
    .await
    .unwrap();
    closed(&mut dev_loop).await;
    assert_eq!(fx.metrics.acl_refusals("oversized_payload"), 1);
    expect_nothing_from(&mut from_devices, "T-1").await;
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_the_same_device_takes_over() {
    let fx = Fixture::start().await;
    let (_ctl, mut from_devices) = controller(&fx).await;
    let cert = fx.device_cert("T-1");
    let (_old, mut old_loop) = fx.client("T-1", Some(&cert), None);
    connack(&mut old_loop).await.unwrap();
    let (new, mut new_loop) = fx.client("T-1", Some(&cert), None);
    connack(&mut new_loop).await.unwrap();
    closed(&mut old_loop).await;
    new.publish(
        topic("T-1", Channel::Heartbeat),
        QoS::AtLeastOnce,
        false,
        b"new".to_vec(),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(async move {
        loop {
            if new_loop.poll().await.is_err() {
                return;
            }
        }
    });
    let (_, payload) = tokio::time::timeout(WAIT, from_devices.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(payload, b"new");
    assert_eq!(fx.edge.live_sessions(), 2);
    driver.abort();
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_wait_until_the_controller_has_subscribed() {
    let fx = Fixture::start_with(|c| c.wait_for_controller = Some(Duration::from_secs(60))).await;
    let cert = fx.device_cert("T-1");
    let (_dev, mut dev_loop) = fx.client("T-1", Some(&cert), None);
    let refused = connack(&mut dev_loop).await.unwrap_err();
    assert!(refused.contains("ServiceUnavailable"), "{refused}");
    assert_eq!(fx.metrics.refusals("controller_not_ready"), 1);
    // Waiting does not use up the terminal's connect budget.
    assert_eq!(fx.metrics.refusals("rate_limited"), 0);

    let (_ctl, mut from_devices) = controller(&fx).await;
    let (dev, mut dev_loop) = fx.client("T-1", Some(&cert), None);
    connack(&mut dev_loop).await.unwrap();
    let _to_device = drive(dev_loop);
    dev.publish(
        topic("T-1", Channel::Presence),
        QoS::AtLeastOnce,
        false,
        b"online".to_vec(),
    )
    .await
    .unwrap();
    let (t, _) = tokio::time::timeout(WAIT, from_devices.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t, topic("T-1", Channel::Presence));
    fx.stop().await;
}
