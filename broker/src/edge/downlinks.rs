//! Every terminal downlink leaves rumqttd's router through one subscription of the edge.
//!
//! The edge holds one link (client id `edge:down`) subscribed to `posfleet/v1/d/+/down/+` at
//! QoS 0, so the router's cost per terminal is nothing: no filter, no link, no waiters. Each
//! publish it forwards is handed to the terminal's session in `devices.rs`, which applies the
//! terminal's own subscription, QoS and in-flight window. The filter's log has its own size
//! (`RouterSettings::downlink_segment_*`): this link lags the router only by what one task
//! takes to move publishes into per-device queues.

use std::sync::Arc;

use futures_util::FutureExt;
use posfleet_proto::{Filter, Topic};
use rumqttd::Notification;
use rumqttd::local::LinkRx;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::Fatal;
use super::devices::{Delivery, DeviceSessions, Downlink};
use super::router::{LinkFailure, RouterHandle};
use crate::metrics::Metrics;

/// Client id of the edge's downlink link (a device id cannot contain `:`).
const CLIENT_ID: &str = "edge:down";

/// Builds the downlink link, subscribes it and starts its task. Blocks until the
/// subscription is in the router (its SUBACK came back).
pub(crate) fn spawn(
    router: &RouterHandle,
    devices: Arc<DeviceSessions>,
    metrics: Arc<Metrics>,
    fatal: Fatal,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<(), LinkFailure> {
    let (tx, mut rx) = super::router::blocking(|| {
        let (mut tx, mut rx, _connack) = router.build_link(CLIENT_ID, true)?;
        tx.subscribe(Filter::all_downlinks().to_string())
            .map_err(LinkFailure::from)?;
        // The SUBACK: from here on every downlink published reaches this link.
        loop {
            match rx.recv() {
                Ok(Some(Notification::DeviceAck(_))) => break,
                Ok(_) => {}
                Err(error) => return Err(LinkFailure::from(error)),
            }
        }
        Ok::<_, LinkFailure>((tx, rx))
    })?;
    tracker.spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => {}
            () = dispatch(&mut rx, &devices, &metrics, &fatal) => {}
        }
        // Kept as long as the link is read (a dropped sender is not a disconnect anyway).
        drop(tx);
    });
    Ok(())
}

async fn dispatch(rx: &mut LinkRx, devices: &DeviceSessions, metrics: &Metrics, fatal: &Fatal) {
    loop {
        let mut next = Some(rx.next().await);
        while let Some(notification) = next.take() {
            match notification {
                Ok(Some(Notification::Forward(forward))) => {
                    deliver(
                        devices,
                        metrics,
                        forward.publish.topic,
                        forward.publish.payload,
                    );
                }
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() {
                        fatal.raise("router channel closed on the downlink link's wake");
                        return;
                    }
                }
                Ok(Some(Notification::Disconnect(..))) | Err(_) => {
                    fatal.raise("the router dropped the edge's downlink link");
                    return;
                }
                Ok(_) => {}
            }
            next = rx.next().now_or_never();
        }
    }
}

/// Hands one downlink to its terminal's session.
fn deliver(
    devices: &DeviceSessions,
    metrics: &Metrics,
    topic: bytes::Bytes,
    payload: bytes::Bytes,
) {
    let parsed = std::str::from_utf8(&topic)
        .ok()
        .and_then(|t| Topic::parse(t).ok());
    let Some(parsed) = parsed else {
        // The edge's ACL lets only posfleet downlink topics in.
        warn!(topic = %String::from_utf8_lossy(&topic), "downlink on a topic that is not a posfleet topic; dropped");
        metrics.downlink_dropped("bad_topic");
        return;
    };
    let downlink = Downlink {
        channel: parsed.channel(),
        topic,
        payload,
    };
    match devices.deliver(parsed.device(), downlink) {
        Delivery::Queued => {
            metrics.edge_downlinks_total.inc();
        }
        Delivery::QueuedDroppedOldest => {
            metrics.edge_downlinks_total.inc();
            warn!(device = %parsed.device(), "downlink queue full; the oldest queued downlink was dropped");
            metrics.downlink_dropped("queue_full");
        }
        Delivery::NoSubscriber => {
            debug!(device = %parsed.device(), "downlink for a terminal without a subscription");
            metrics.downlink_dropped("no_subscriber");
        }
    }
}
