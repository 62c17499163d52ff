//! Bad input gets refused, is counted in `/metrics`, changes nothing, and does not disturb a
//! well-behaved terminal (docs/architecture.md "Shutdown and failure").
//!
//! The cases share one broker and one well-behaved agent and run concurrently (each watches
//! its own refusal counter); every case is reported, not just the first failure. Idle and
//! slow sockets are `admission.rs`'s.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use posfleet_proto::pki::{Ca, CertifiedKey};
use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};
use posfleet_tests::eventually::try_eventually;
use posfleet_tests::mqtt::{MqttClient, tls_config, tls_connect, wait_closed};
use posfleet_tests::{Agent, Api, Broker};
use rumqttc::{LastWill, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::support::{WAIT, agent, broker, heartbeat_seq, online};

const REFUSALS: &str = "posfleet_edge_refusals_total";
const ACL_REFUSALS: &str = "posfleet_edge_acl_refusals_total";
const INGEST_REJECTED: &str = "posfleet_ingest_rejected_total";

/// The well-behaved terminal that runs through every case.
const GOOD: &str = "pos-good";

/// A broker with one well-behaved agent online.
struct Fixture {
    broker: Broker,
    _good: Agent,
    /// The fleet CA certificate, which clients trust for the server.
    ca_pem: Vec<u8>,
    /// When the good terminal last changed presence (must never change again).
    good_presence_changed_ms: u64,
}

impl Fixture {
    async fn start() -> Self {
        let broker = broker().await;
        let good = agent(&broker, GOOD);
        let detail = online(broker.api(), GOOD).await;
        let pki = broker.pki();
        let ca_pem = std::fs::read(pki.ca_cert()).expect("ca.crt");
        Self {
            broker,
            _good: good,
            ca_pem,
            good_presence_changed_ms: detail.summary.presence_changed_ms,
        }
    }

    fn api(&self) -> &Api {
        self.broker.api()
    }

    fn addr(&self) -> SocketAddr {
        self.broker.mqtt_addr()
    }

    /// A valid device certificate from the fleet CA, issued (and recorded) by the broker.
    fn identity(&self, id: &str) -> anyhow::Result<CertifiedKey> {
        DeviceId::new(id)?;
        let dir = self.broker.scratch_dir(&format!("identity-{id}"))?;
        let bundle = self.broker.issue_bundle(id, &dir)?;
        Ok(CertifiedKey {
            cert_pem: std::fs::read_to_string(bundle.cert)?,
            key_pem: std::fs::read_to_string(bundle.key)?,
        })
    }

    /// A client TLS config trusting the fleet CA, presenting `identity`.
    fn tls(&self, identity: Option<&CertifiedKey>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        tls_config(&self.ca_pem, identity)
    }

    /// A connected MQTT client with a valid certificate for `id`.
    async fn rogue(&self, id: &str) -> anyhow::Result<MqttClient> {
        let identity = self.identity(id)?;
        MqttClient::connect(self.addr(), id, self.tls(Some(&identity))?)
            .await?
            .accepted()
            .with_context(|| format!("{id} with a valid certificate"))
    }

    async fn metric(&self, name: &str, reason: &str) -> anyhow::Result<f64> {
        Ok(self
            .api()
            .metrics()
            .await?
            .value(name, &[("reason", reason)]))
    }

    /// Waits until `name{reason}` has grown by `delta` from `before`.
    async fn counted(
        &self,
        name: &str,
        reason: &str,
        before: f64,
        delta: f64,
    ) -> anyhow::Result<()> {
        try_eventually(WAIT, || async {
            let now = self.metric(name, reason).await?;
            ensure!(
                now >= before + delta,
                "{name}{{reason={reason:?}}} = {now}, expected {before} + {delta}"
            );
            Ok(())
        })
        .await
    }

    /// The bad client left no trace: the API has never heard of `id`.
    async fn unknown(&self, id: &str) -> anyhow::Result<()> {
        let device = self.api().device(id).await?;
        ensure!(device.is_none(), "{id} was ingested: {device:?}");
        Ok(())
    }

    /// The good terminal never went offline and its heartbeats still arrive after `seq`.
    async fn good_is_undisturbed(&self, seq: u64) -> anyhow::Result<()> {
        try_eventually(WAIT, || async {
            let device = self
                .api()
                .device(GOOD)
                .await?
                .ok_or_else(|| anyhow!("{GOOD} disappeared"))?;
            ensure!(device.summary.online, "{GOOD} went offline: {device:?}");
            ensure!(
                device.summary.presence_changed_ms == self.good_presence_changed_ms,
                "{GOOD} changed presence (was it kicked?): {device:?}"
            );
            let now = device.last_heartbeat.as_ref().map_or(0, |hb| hb.seq);
            ensure!(now > seq, "{GOOD} heartbeat seq {now}, waiting for > {seq}");
            Ok(())
        })
        .await
    }

    async fn good_seq(&self) -> u64 {
        heartbeat_seq(self.api(), GOOD).await
    }
}

fn topic(id: &str, channel: Channel) -> anyhow::Result<String> {
    Ok(Topic::for_device(&DeviceId::new(id)?, channel).to_string())
}

/// Not a protobuf message: a length-delimited field claiming 127 bytes where 1 follows.
const MALFORMED: [u8; 3] = [0x12, 0x7f, 0x01];

type Case<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_are_refused_counted_and_change_nothing() {
    let fx = Fixture::start().await;
    let cases: Vec<(&str, Case<'_>)> = vec![
        ("certificate from another CA", Box::pin(foreign_ca(&fx))),
        (
            "no client certificate",
            Box::pin(no_client_certificate(&fx)),
        ),
        (
            "client id differs from the certificate",
            Box::pin(client_id_mismatch(&fx)),
        ),
        (
            "publish to another device's topic",
            Box::pin(publish_as_another_device(&fx)),
        ),
        (
            "last will on another device's topic",
            Box::pin(will_as_another_device(&fx)),
        ),
        (
            "subscribe to #, $SYS/# and another downlink",
            Box::pin(subscribe_too_wide(&fx)),
        ),
        (
            "malformed protobuf on a valid topic",
            Box::pin(malformed_protobuf(&fx)),
        ),
        ("oversized payload and packet", Box::pin(oversized(&fx))),
        (
            "card numbers with dots or letters in a transaction",
            Box::pin(separated_card_numbers(&fx)),
        ),
        (
            "CONNECT never arrives",
            Box::pin(connect_never_arrives(&fx)),
        ),
        (
            "first packet is not CONNECT",
            Box::pin(first_packet_not_connect(&fx)),
        ),
        (
            "malformed MQTT packet",
            Box::pin(malformed_mqtt_packet(&fx)),
        ),
    ];
    let results = futures_util::future::join_all(
        cases
            .into_iter()
            .map(|(name, case)| async move { (name, case.await) }),
    )
    .await;
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(name, result)| {
            result
                .as_ref()
                .err()
                .map(|error| format!("- {name}: {error:#}"))
        })
        .collect();
    let scrape = fx.api().metrics().await.expect("metrics");
    assert!(
        failures.is_empty(),
        "{} of {} bad-input cases failed:\n{}\nmetrics:\n{scrape}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );
    // Through all of it, the good terminal stayed connected and reporting.
    let seq = fx.good_seq().await;
    fx.good_is_undisturbed(seq).await.expect("good terminal");
    let list = fx.api().devices().await.expect("devices");
    let ids: Vec<&str> = list.devices.iter().map(|d| d.id.as_str()).collect();
    // Only the good terminal and the one rogue that sent a valid message exist.
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&GOOD) && ids.contains(&"rogue-pb"), "{ids:?}");
}

async fn foreign_ca(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let before = fx.metric(REFUSALS, "bad_client_certificate").await?;
    let other = Ca::generate("some other CA")?;
    let forged = other.issue_device(&DeviceId::new("rogue-ca")?)?;
    let why = MqttClient::connect(fx.addr(), "rogue-ca", fx.tls(Some(&forged))?)
        .await?
        .refused()?;
    fx.counted(REFUSALS, "bad_client_certificate", before, 1.0)
        .await
        .with_context(|| format!("client saw: {why}"))?;
    fx.unknown("rogue-ca").await?;
    fx.good_is_undisturbed(seq).await
}

async fn no_client_certificate(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let before = fx.metric(REFUSALS, "no_client_certificate").await?;
    let why = MqttClient::connect(fx.addr(), "rogue-anon", fx.tls(None)?)
        .await?
        .refused()?;
    fx.counted(REFUSALS, "no_client_certificate", before, 1.0)
        .await
        .with_context(|| format!("client saw: {why}"))?;
    fx.unknown("rogue-anon").await?;
    fx.good_is_undisturbed(seq).await
}

async fn client_id_mismatch(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let before = fx.metric(REFUSALS, "client_id_mismatch").await?;
    // A valid certificate for one device, claiming to be the good terminal.
    let identity = fx.identity("rogue-cid")?;
    let why = MqttClient::connect(fx.addr(), GOOD, fx.tls(Some(&identity))?)
        .await?
        .refused()?;
    ensure!(
        why.contains("BadClientId"),
        "expected CONNACK BadClientId, got {why}"
    );
    fx.counted(REFUSALS, "client_id_mismatch", before, 1.0)
        .await?;
    fx.unknown("rogue-cid").await?;
    // The good terminal's session was not taken over.
    fx.good_is_undisturbed(seq).await
}

async fn publish_as_another_device(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let before = fx.metric(ACL_REFUSALS, "publish_not_allowed").await?;
    let mut rogue = fx.rogue("rogue-pub").await?;
    let forged = pb::Heartbeat {
        seq: 9_999_999,
        interval_s: 1,
        sent_at_ms: posfleet_proto::now_ms(),
        ..Default::default()
    };
    let refused = rogue
        .publish(&topic(GOOD, Channel::Heartbeat)?, encode(&forged)?)
        .await;
    ensure!(
        refused.is_err(),
        "the edge acknowledged a publish to {GOOD}'s topic"
    );
    fx.counted(ACL_REFUSALS, "publish_not_allowed", before, 1.0)
        .await?;
    fx.unknown("rogue-pub").await?;
    fx.good_is_undisturbed(seq).await?;
    let now = fx.good_seq().await;
    ensure!(
        now < 9_999_999,
        "the forged heartbeat was ingested (seq {now})"
    );
    Ok(())
}

async fn will_as_another_device(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let before = fx.metric(REFUSALS, "will_not_allowed").await?;
    // A will that would announce the good terminal offline when this client disconnects.
    let forged = pb::Presence {
        state: pb::PresenceState::Offline.into(),
        reason: "connection_lost".into(),
        ..Default::default()
    };
    let will = LastWill::new(
        topic(GOOD, Channel::Presence)?,
        encode(&forged)?,
        QoS::AtLeastOnce,
        false,
    );
    let identity = fx.identity("rogue-will")?;
    let why = MqttClient::connect_with_will(
        fx.addr(),
        "rogue-will",
        fx.tls(Some(&identity))?,
        Some(will),
    )
    .await?
    .refused()?;
    fx.counted(REFUSALS, "will_not_allowed", before, 1.0)
        .await
        .with_context(|| format!("client saw: {why}"))?;
    fx.unknown("rogue-will").await?;
    fx.good_is_undisturbed(seq).await
}

async fn subscribe_too_wide(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let bad_filter = fx.metric(ACL_REFUSALS, "bad_filter").await?;
    let not_allowed = fx.metric(ACL_REFUSALS, "subscribe_not_allowed").await?;
    let other_downlink = format!("posfleet/v1/d/{GOOD}/down/+");
    for (n, filter) in ["#", "$SYS/#", other_downlink.as_str()]
        .into_iter()
        .enumerate()
    {
        let mut rogue = fx.rogue(&format!("rogue-sub{n}")).await?;
        let result = rogue.subscribe(filter).await;
        ensure!(result.is_err(), "the edge granted SUBSCRIBE {filter}");
        fx.unknown(&format!("rogue-sub{n}")).await?;
    }
    fx.counted(ACL_REFUSALS, "bad_filter", bad_filter, 2.0)
        .await?;
    fx.counted(ACL_REFUSALS, "subscribe_not_allowed", not_allowed, 1.0)
        .await?;
    fx.good_is_undisturbed(seq).await
}

async fn malformed_protobuf(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let id = "rogue-pb";
    let mut rogue = fx.rogue(id).await?;
    // One valid sample first, so there is telemetry that must stay unchanged.
    let sample = pb::Telemetry {
        sent_at_ms: posfleet_proto::now_ms(),
        system: Some(pb::SystemMetrics {
            cpu_percent: 12.5,
            memory_used_bytes: 1 << 20,
            memory_total_bytes: 1 << 30,
            ..Default::default()
        }),
        ..Default::default()
    };
    rogue
        .publish(&topic(id, Channel::Telemetry)?, encode(&sample)?)
        .await?;
    let known = try_eventually(WAIT, || async {
        let device = fx.api().device(id).await?;
        match device.as_ref().and_then(|d| d.latest_telemetry.clone()) {
            Some(tm) => Ok(tm),
            None => anyhow::bail!("valid telemetry of {id} not ingested yet: {device:?}"),
        }
    })
    .await?;
    ensure!(known.cpu_percent == 12.5, "{known:?}");

    let before = fx.metric(INGEST_REJECTED, "malformed").await?;
    // The edge forwards these (it does not parse payloads); the controller must reject them.
    rogue
        .publish(&topic(id, Channel::Telemetry)?, MALFORMED.to_vec())
        .await?;
    rogue
        .publish(&topic(id, Channel::Heartbeat)?, MALFORMED.to_vec())
        .await?;
    fx.counted(INGEST_REJECTED, "malformed", before, 2.0)
        .await?;
    let device = fx
        .api()
        .device(id)
        .await?
        .ok_or_else(|| anyhow!("{id} vanished"))?;
    ensure!(
        device.latest_telemetry.as_ref() == Some(&known) && device.telemetry_history.len() == 1,
        "telemetry changed by a malformed payload: {device:?}"
    );
    ensure!(
        device.last_heartbeat.is_none(),
        "a malformed heartbeat was ingested: {device:?}"
    );
    rogue.disconnect().await?;
    fx.good_is_undisturbed(seq).await
}

/// Issue 10 item 7: a terminal (an old agent, or a rogue one) that sends a card number in a
/// notation the guard used to miss is refused whole by ingest (counted `invalid`); nothing
/// is stored and the device is not registered by it.
async fn separated_card_numbers(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let id = "rogue-pan";
    let mut rogue = fx.rogue(id).await?;
    let before = fx.metric(INGEST_REJECTED, "invalid").await?;
    let notations = ["4111.1111.1111.1111", "4111a1111b1111c1111"];
    for (i, txn_id) in notations.iter().enumerate() {
        let batch = pb::TransactionBatch {
            transactions: vec![pb::Transaction {
                seq: i as u64 + 1,
                txn_id: (*txn_id).to_owned(),
                timestamp_ms: posfleet_proto::now_ms(),
                amount_minor: 100,
                currency: "EUR".into(),
                kind: pb::TransactionKind::Sale as i32,
                status: pb::TransactionStatus::Approved as i32,
                masked_card: "411111******1111".into(),
                merchant_id: "MER-1".into(),
                ..Default::default()
            }],
        };
        rogue
            .publish(&topic(id, Channel::Transactions)?, encode(&batch)?)
            .await?;
    }
    fx.counted(INGEST_REJECTED, "invalid", before, notations.len() as f64)
        .await?;
    fx.unknown(id).await?;
    let stored = fx
        .api()
        .get(&format!("/api/v1/transactions?device={id}"))
        .await?
        .text()
        .await?;
    ensure!(!stored.contains("1111"), "stored: {stored}");
    rogue.disconnect().await?;
    fx.good_is_undisturbed(seq).await
}

async fn oversized(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let payload = fx.metric(ACL_REFUSALS, "oversized_payload").await?;
    let packet = fx.metric(ACL_REFUSALS, "oversized_packet").await?;
    let too_large = fx.metric(INGEST_REJECTED, "too_large").await?;

    // Bigger than the telemetry channel allows, but a legal MQTT packet.
    let mut rogue = fx.rogue("rogue-big").await?;
    let body = vec![0u8; Channel::Telemetry.max_payload() + 1];
    let result = rogue
        .publish(&topic("rogue-big", Channel::Telemetry)?, body)
        .await;
    ensure!(
        result.is_err(),
        "the edge acknowledged an oversized telemetry payload"
    );
    fx.counted(ACL_REFUSALS, "oversized_payload", payload, 1.0)
        .await?;

    // Bigger than any posfleet packet.
    let mut rogue = fx.rogue("rogue-huge").await?;
    let body = vec![0u8; posfleet_proto::MAX_PACKET_SIZE + 1];
    let result = rogue
        .publish(&topic("rogue-huge", Channel::Transactions)?, body)
        .await;
    ensure!(result.is_err(), "the edge acknowledged an oversized packet");
    fx.counted(ACL_REFUSALS, "oversized_packet", packet, 1.0)
        .await?;

    fx.unknown("rogue-big").await?;
    fx.unknown("rogue-huge").await?;
    let now = fx.metric(INGEST_REJECTED, "too_large").await?;
    ensure!(
        now == too_large,
        "an oversized payload reached the controller"
    );
    fx.good_is_undisturbed(seq).await
}

async fn connect_never_arrives(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let before = fx.metric(REFUSALS, "connect_timeout").await?;
    let identity = fx.identity("rogue-silent")?;
    let mut stream = tls_connect(fx.addr(), fx.tls(Some(&identity))?).await?;
    // The edge gives a client 10 s after the handshake to send CONNECT.
    let started = Instant::now();
    wait_closed(&mut stream, Duration::from_secs(20)).await?;
    let waited = started.elapsed();
    fx.counted(REFUSALS, "connect_timeout", before, 1.0)
        .await
        .with_context(|| format!("closed after {waited:?}"))?;
    fx.unknown("rogue-silent").await?;
    fx.good_is_undisturbed(seq).await
}

async fn first_packet_not_connect(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let before = fx.metric(REFUSALS, "not_connect").await?;
    let identity = fx.identity("rogue-ping")?;
    let mut stream = tls_connect(fx.addr(), fx.tls(Some(&identity))?).await?;
    stream.write_all(&[0xC0, 0x00]).await?; // PINGREQ
    stream.flush().await?;
    wait_closed(&mut stream, WAIT).await?;
    fx.counted(REFUSALS, "not_connect", before, 1.0).await?;
    fx.unknown("rogue-ping").await?;
    fx.good_is_undisturbed(seq).await
}

async fn malformed_mqtt_packet(fx: &Fixture) -> anyhow::Result<()> {
    let seq = fx.good_seq().await;
    let before = fx.metric(ACL_REFUSALS, "malformed_packet").await?;
    let id = "rogue-raw";
    let identity = fx.identity(id)?;
    let mut stream = tls_connect(fx.addr(), fx.tls(Some(&identity))?).await?;
    stream.write_all(&connect_packet(id)).await?;
    stream.flush().await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut connack))
        .await
        .map_err(|_| anyhow!("no CONNACK"))??;
    ensure!(connack == [0x20, 0x02, 0x00, 0x00], "CONNACK {connack:?}");
    // Packet type 0 is reserved: no valid MQTT packet starts with it.
    stream.write_all(&[0x00, 0x00]).await?;
    stream.flush().await?;
    wait_closed(&mut stream, WAIT).await?;
    fx.counted(ACL_REFUSALS, "malformed_packet", before, 1.0)
        .await?;
    fx.unknown(id).await?;
    fx.good_is_undisturbed(seq).await
}

/// An MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s) for `client_id`, encoded by hand.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C];
    body.extend_from_slice(&u16::try_from(id.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(id);
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap_or(0)];
    packet.extend(body);
    packet
}
