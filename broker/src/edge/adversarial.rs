//! Adversarial edge tests: raw MQTT frames over real mTLS that rumqttc would never send.
//!
//! Every case checks what a user would see: the bad connection is refused or closed in
//! bounded time, the refusal is counted in [`Metrics`], nothing from the bad input reaches a
//! controller subscribed to every uplink, and the router is still alive afterwards
//! ([`Harness::assert_router_alive`]: a well-behaved device connects, publishes QoS 1 and
//! receives a QoS 1 downlink, and [`EdgeHandle::fatal`] has not fired).
//!
//! - `raw`: the raw client and frame builders;
//! - `connect_phase`: everything up to and including CONNECT;
//! - `packets`: single bad packets on an accepted connection;
//! - `delivery`: the edge's own delivery to terminals (takeover and revocation during a
//!   delivery, a terminal that never reads, the uplink rate limit);
//! - `flows`: acks, floods, reconnect storms, takeover races and a seeded fuzz loop.

mod connect_phase;
mod delivery;
mod flows;
mod packets;
mod raw;

use std::time::{Duration, Instant};

use futures_util::FutureExt;
use posfleet_proto::Channel;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::mpsc::Receiver;

use super::tests::{Fixture, WAIT, connack, controller, suback, topic};
use super::{EdgeConfig, EdgeHandle};
use crate::metrics::Metrics;

/// A running edge with a controller subscribed to `posfleet/v1/d/+/up/+`.
pub(super) struct Harness {
    pub(super) fx: Fixture,
    pub(super) ctl: AsyncClient,
    pub(super) from_devices: Receiver<(String, Vec<u8>)>,
    probes: u32,
}

impl Harness {
    /// Default limits, except a CONNECT timeout far beyond [`WAIT`]: a close observed within
    /// `WAIT` is then the edge's decision, not the timeout.
    pub(super) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(super) async fn start_with(tweak: impl FnOnce(&mut EdgeConfig)) -> Self {
        let fx = Fixture::start_with(|c| {
            c.limits.connect_timeout = Duration::from_secs(120);
            tweak(c);
        })
        .await;
        Self::on(fx).await
    }

    pub(super) async fn on(fx: Fixture) -> Self {
        let (ctl, from_devices) = controller(&fx).await;
        Self {
            fx,
            ctl,
            from_devices,
            probes: 0,
        }
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.fx.metrics
    }

    /// Waits until the refusal counter `reason` went from `before` to exactly `before + 1`.
    pub(super) async fn refused(&self, reason: &'static str, before: u64) {
        eventually(reason, || self.metrics().refusals(reason) > before).await;
        assert_eq!(self.metrics().refusals(reason), before + 1, "{reason}");
    }

    /// Same for the ACL/validation refusal counter.
    pub(super) async fn acl_refused(&self, reason: &'static str, before: u64) {
        eventually(reason, || self.metrics().acl_refusals(reason) > before).await;
        assert_eq!(self.metrics().acl_refusals(reason), before + 1, "{reason}");
    }

    /// The proof that the router survived: the edge raised no fatal error, a fresh
    /// well-behaved device connects, publishes QoS 1 (acknowledged, and received by the
    /// controller) and receives a QoS 1 downlink. Every uplink the controller got before that
    /// probe is checked: none may come from a device in `bad`.
    pub(super) async fn assert_router_alive(&mut self, bad: &[&str]) {
        let edge: &EdgeHandle = &self.fx.edge;
        assert!(
            edge.fatal().now_or_never().is_none(),
            "the edge raised a fatal error"
        );
        assert!(edge.shared.router.is_alive(), "the router thread is gone");

        self.probes += 1;
        let id = format!("OK-{}", self.probes);
        let cert = self.fx.device_cert(&id);
        let (dev, mut dev_loop) = self.fx.client(&id, Some(&cert), None);
        connack(&mut dev_loop)
            .await
            .expect("a well-behaved device can connect");
        dev.subscribe(
            topic(&id, Channel::Command).replace("/cmd", "/+"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
        suback(&mut dev_loop).await;
        let mut events = drive_events(dev_loop);

        let marker = format!("alive-{id}").into_bytes();
        dev.publish(
            topic(&id, Channel::Heartbeat),
            QoS::AtLeastOnce,
            false,
            marker.clone(),
        )
        .await
        .unwrap();
        let hb = topic(&id, Channel::Heartbeat);
        loop {
            let (t, payload) = tokio::time::timeout(WAIT, self.from_devices.recv())
                .await
                .expect("the probe's uplink reaches the controller")
                .expect("controller still connected");
            for device in bad {
                assert!(
                    !t.contains(&format!("/d/{device}/")),
                    "bad input reached the controller: {t} {payload:?}"
                );
            }
            if t == hb && payload == marker {
                break;
            }
        }
        self.ctl
            .publish(
                topic(&id, Channel::Command),
                QoS::AtLeastOnce,
                false,
                marker.clone(),
            )
            .await
            .unwrap();
        let (mut puback, mut downlink) = (false, false);
        while !(puback && downlink) {
            match tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("probe receives its PUBACK and downlink in bounded time")
                .expect("probe still connected")
            {
                Packet::PubAck(_) => puback = true,
                Packet::Publish(p) => {
                    assert_eq!(p.topic, topic(&id, Channel::Command));
                    assert_eq!(p.qos, QoS::AtLeastOnce);
                    assert_eq!(p.payload.as_ref(), marker.as_slice());
                    downlink = true;
                }
                _ => {}
            }
        }
        dev.disconnect().await.unwrap();
        assert!(
            edge.fatal().now_or_never().is_none(),
            "the edge raised a fatal error"
        );
    }

    pub(super) async fn stop(self) {
        self.fx.stop().await;
    }
}

/// Drives a rumqttc event loop; incoming packets come out of the channel.
pub(super) fn drive_events(mut eventloop: rumqttc::EventLoop) -> Receiver<Packet> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(packet) = event {
                if tx.send(packet).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Polls `cond` until it holds; panics after [`WAIT`].
pub(super) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sum of every `posfleet_edge_{acl_,}refusals_total` series in the exposition.
pub(super) fn total_refusals(metrics: &Metrics) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("posfleet_edge_refusals_total{")
                || l.starts_with("posfleet_edge_acl_refusals_total{")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
