//! Terminal uplinks into rumqttd's router over a fixed set of shared links ("lanes").
//!
//! Each terminal is hashed onto one lane, so its uplinks reach the router in the order it
//! sent them. A lane task batches what connections hand it into its link and notifies the
//! router once per batch. The router acknowledges every QoS 1 publish of a link in order
//! (rumqttd 0.20 `router/routing.rs` queues the PUBACK when it takes the publish), so each
//! lane keeps a FIFO of whom each QoS 1 uplink came from and turns the router's n-th PUBACK
//! into the terminal's PUBACK: a terminal's PUBACK still means "taken by the router".
//!
//! A lane's queue is bounded. A connection waits for room at most [`UPLINK_WAIT`]; if there
//! is still none, the uplink is refused visibly (counted in
//! `posfleet_edge_uplinks_refused_total{reason}`, logged, never acknowledged) and the
//! connection closed, so the terminal sends it again after reconnecting.
//!
//! Before a lane takes an uplink, the controller-lag gate (`lag.rs`) counts it: while the
//! embedded controller is too far behind for the router's log to hold more, the uplink is
//! refused the same way (`controller_behind`). Each lane counts what it pushes into the
//! router and sends the gate's markers (`lag::LaneMarkers`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use posfleet_proto::DeviceId;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::Fatal;
use super::devices::{Answer, DeviceSession};
use super::lag::{LagGate, LaneMarkers, MARKER_EVERY, lane_of, ring_size};
use super::pump::send_to_router;
use super::router::{LinkFailure, RouterHandle};
use crate::metrics::Metrics;

/// Longest a connection waits for room in its lane before the uplink is refused.
pub(crate) const UPLINK_WAIT: Duration = Duration::from_secs(5);
/// Uplinks waiting per lane.
const LANE_QUEUE: usize = 4096;
/// Uplinks moved into the router per notify.
const LANE_BATCH: usize = 512;

/// Where the router's PUBACK of a QoS 1 uplink goes.
pub(crate) struct AckTo {
    pub(crate) session: Arc<DeviceSession>,
    pub(crate) generation: u64,
    pub(crate) pkid: u16,
}

/// One uplink (already checked by the ACL).
pub(crate) struct Uplink {
    pub(crate) publish: Publish,
    /// `Some` for QoS 1.
    pub(crate) ack: Option<AckTo>,
}

/// Why an uplink was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The lane stayed full for [`UPLINK_WAIT`].
    Busy,
    /// The lane task is gone (shutdown or a fatal router error).
    Closed,
    /// The embedded controller is too far behind: the router's log could lose it.
    ControllerBehind,
}

impl Refused {
    /// The `posfleet_edge_uplinks_refused_total` label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refused::Busy => "router_busy",
            Refused::Closed => "edge_stopping",
            Refused::ControllerBehind => "controller_behind",
        }
    }
}

/// The shared uplink links.
#[derive(Clone)]
pub(crate) struct Uplinks {
    lanes: Arc<[mpsc::Sender<Uplink>]>,
    lag: Arc<LagGate>,
}

impl Uplinks {
    /// Builds `count` links (client ids `edge:up:N`; blocks until the router answered) and
    /// starts their lane tasks.
    pub(crate) fn spawn(
        router: &RouterHandle,
        lag: Arc<LagGate>,
        metrics: Arc<Metrics>,
        fatal: Fatal,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, LinkFailure> {
        let count = lag.lanes();
        let mut lanes = Vec::with_capacity(count);
        for n in 0..count {
            let (tx, rx, _connack) =
                super::router::blocking(|| router.build_link(&format!("edge:up:{n}"), true))?;
            let (sender, queue) = mpsc::channel(LANE_QUEUE);
            lanes.push(sender);
            tracker.spawn(
                Lane {
                    router: router.clone(),
                    tx,
                    rx,
                    queue,
                    pending: VecDeque::new(),
                    markers: LaneMarkers::new(n),
                    lag: lag.clone(),
                    metrics: metrics.clone(),
                    fatal: fatal.clone(),
                }
                .run(cancel.clone()),
            );
        }
        Ok(Self {
            lanes: lanes.into(),
            lag,
        })
    }

    /// No lanes: every uplink is refused (the edge failed to start; `Fatal` was raised).
    pub(crate) fn closed(lag: Arc<LagGate>) -> Self {
        let (sender, _) = mpsc::channel(1);
        Self {
            lanes: vec![sender].into(),
            lag,
        }
    }

    fn lane_index(&self, device: &DeviceId) -> usize {
        lane_of(device.as_str(), self.lanes.len())
    }

    #[cfg(test)]
    fn lane(&self, device: &DeviceId) -> &mpsc::Sender<Uplink> {
        &self.lanes[self.lane_index(device)]
    }

    /// Hands an uplink to the device's lane, waiting at most [`UPLINK_WAIT`] for room.
    pub(crate) async fn send(&self, device: &DeviceId, uplink: Uplink) -> Result<(), Refused> {
        let (n, size) = (self.lane_index(device), ring_size(&uplink.publish));
        if !self.lag.admit(n, size) {
            return Err(Refused::ControllerBehind);
        }
        let lane = &self.lanes[n];
        let sent = match lane.try_send(uplink) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Refused::Closed),
            Err(mpsc::error::TrySendError::Full(uplink)) => {
                match tokio::time::timeout(UPLINK_WAIT, lane.send(uplink)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(Refused::Closed),
                    Err(_) => Err(Refused::Busy),
                }
            }
        };
        if sent.is_err() {
            self.lag.cancel(n, size);
        }
        sent
    }

    /// Hands an uplink over only if there is room now (a will).
    pub(crate) fn try_send(&self, device: &DeviceId, uplink: Uplink) -> Result<(), Refused> {
        let (n, size) = (self.lane_index(device), ring_size(&uplink.publish));
        if !self.lag.admit(n, size) {
            return Err(Refused::ControllerBehind);
        }
        self.lanes[n].try_send(uplink).map_err(|e| {
            self.lag.cancel(n, size);
            match e {
                mpsc::error::TrySendError::Full(_) => Refused::Busy,
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            }
        })
    }
}

struct Lane {
    router: RouterHandle,
    tx: LinkTx,
    rx: LinkRx,
    queue: mpsc::Receiver<Uplink>,
    /// Whom the router's next PUBACKs on this link belong to, in order.
    pending: VecDeque<Option<AckTo>>,
    /// What this lane pushed into the router, and its markers for the lag gate.
    markers: LaneMarkers,
    lag: Arc<LagGate>,
    metrics: Arc<Metrics>,
    fatal: Fatal,
}

impl Lane {
    async fn run(mut self, cancel: CancellationToken) {
        let mut batch = Vec::with_capacity(LANE_BATCH);
        let mut tick = tokio::time::interval(MARKER_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                notification = self.rx.next() => {
                    if !self.settle(notification).await {
                        return;
                    }
                }
                // Ready once a second: before the queue, so a busy lane still sends markers.
                _ = tick.tick() => {
                    if let Some(marker) = self.markers.due(&self.lag)
                        && !self.push(vec![Packet::Publish(marker, None)])
                    {
                        return;
                    }
                }
                count = self.queue.recv_many(&mut batch, LANE_BATCH) => {
                    if count == 0 {
                        return;
                    }
                    if !self.forward(&mut batch) {
                        return;
                    }
                }
            }
        }
    }

    /// Moves a batch into the link and notifies the router once.
    fn forward(&mut self, batch: &mut Vec<Uplink>) -> bool {
        let mut packets = Vec::with_capacity(batch.len());
        for uplink in batch.drain(..) {
            if let Some(ack) = uplink.ack {
                self.pending.push_back(Some(ack));
            }
            self.markers.forwarded(ring_size(&uplink.publish));
            packets.push(Packet::Publish(uplink.publish, None));
        }
        self.push(packets)
    }

    /// Pushes packets into the link and notifies the router once.
    fn push(&mut self, packets: Vec<Packet>) -> bool {
        if let Err(error) = send_to_router(&self.router, &mut self.tx, packets) {
            self.fatal
                .raise(format!("router channel closed on an uplink lane: {error}"));
            return false;
        }
        true
    }

    /// Handles what the router sent this link: PUBACKs become the terminals' PUBACKs.
    async fn settle(
        &mut self,
        first: Result<Option<Notification>, rumqttd::local::LinkError>,
    ) -> bool {
        let mut next = Some(first);
        while let Some(notification) = next.take() {
            match notification {
                Ok(Some(Notification::Unschedule)) => {
                    if self.rx.wake().await.is_err() {
                        self.fatal
                            .raise("router channel closed on an uplink lane wake");
                        return false;
                    }
                }
                Ok(Some(Notification::Disconnect(..))) | Err(_) => {
                    self.fatal.raise("the router dropped an uplink lane");
                    return false;
                }
                Ok(Some(other)) => {
                    if let Some(Packet::PubAck(..)) = Option::<Packet>::from(other) {
                        self.acked();
                    }
                }
                Ok(None) => {}
            }
            // What the same router trigger brought, without waiting.
            next = self.rx.next().now_or_never();
        }
        true
    }

    fn acked(&mut self) {
        match self.pending.pop_front() {
            Some(Some(to)) => {
                if !to.session.answer(to.generation, Answer::PubAck(to.pkid)) {
                    // The connection does not read its answers; its reader closes it.
                    self.metrics.acl_refuse("ack_backlog_uplink");
                }
            }
            Some(None) => {}
            None => warn!("the router acknowledged an uplink the edge did not send"),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn heartbeat() -> Uplink {
        Uplink {
            publish: Publish::new("posfleet/v1/d/A-1/up/hb", "x", false),
            ack: None,
        }
    }

    fn gate(lanes: usize, segment_size: usize) -> Arc<LagGate> {
        let settings = super::super::RouterSettings {
            uplink_lanes: lanes,
            controller_segment_size: segment_size,
            controller_segment_count: 2,
            ..Default::default()
        };
        Arc::new(LagGate::new(&settings, &Metrics::new()))
    }

    /// The clock is paused: the wait is the edge's own bound, not the machine's speed.
    #[tokio::test(start_paused = true)]
    async fn a_full_lane_refuses_after_the_wait_and_a_closed_one_at_once() {
        let (sender, mut receiver) = mpsc::channel(1);
        let uplinks = Uplinks {
            lanes: vec![sender].into(),
            lag: gate(1, 1 << 20),
        };
        let id = DeviceId::new("A-1").unwrap();
        let size = ring_size(&heartbeat().publish) as i64;
        assert_eq!(uplinks.send(&id, heartbeat()).await, Ok(()));
        let start = tokio::time::Instant::now();
        assert_eq!(uplinks.send(&id, heartbeat()).await, Err(Refused::Busy));
        assert!(start.elapsed() >= UPLINK_WAIT);
        assert_eq!(uplinks.try_send(&id, heartbeat()), Err(Refused::Busy));
        assert_eq!(
            uplinks.lag.lag(),
            size,
            "refused uplinks are not in the book"
        );
        // Room again: taken.
        assert!(receiver.recv().await.is_some());
        assert_eq!(uplinks.send(&id, heartbeat()).await, Ok(()));
        drop(receiver);
        assert_eq!(uplinks.send(&id, heartbeat()).await, Err(Refused::Closed));
        assert_eq!(uplinks.try_send(&id, heartbeat()), Err(Refused::Closed));
    }

    #[test]
    fn a_terminal_always_uses_the_same_lane() {
        let lanes: Vec<_> = (0..4).map(|_| mpsc::channel::<Uplink>(1).0).collect();
        let uplinks = Uplinks {
            lanes: lanes.into(),
            lag: gate(4, 1 << 20),
        };
        let id = DeviceId::new("T-17").unwrap();
        let first = uplinks.lane(&id).same_channel(uplinks.lane(&id));
        assert!(first);
        // Many terminals spread over every lane.
        let used: std::collections::HashSet<usize> = (0..100)
            .map(|n| {
                let id = DeviceId::new(format!("T-{n}")).unwrap();
                let lane = uplinks.lane(&id);
                (0..4)
                    .position(|i| uplinks.lanes[i].same_channel(lane))
                    .unwrap()
            })
            .collect();
        assert_eq!(used.len(), 4);
    }

    #[tokio::test]
    async fn the_lag_gate_refuses_before_the_lane_and_wills_too() {
        let (sender, mut receiver) = mpsc::channel(16);
        let uplinks = Uplinks {
            lanes: vec![sender].into(),
            lag: gate(1, 1024), // refuses above 512 bytes
        };
        uplinks.lag.attach();
        let id = DeviceId::new("A-1").unwrap();
        let big = || Uplink {
            publish: Publish::new(
                Bytes::from_static(b"posfleet/v1/d/A-1/up/tm"),
                Bytes::from(vec![0u8; 300]),
                false,
            ),
            ack: None,
        };
        assert_eq!(uplinks.send(&id, big()).await, Ok(()));
        assert_eq!(
            uplinks.send(&id, big()).await,
            Err(Refused::ControllerBehind)
        );
        assert_eq!(uplinks.try_send(&id, big()), Err(Refused::ControllerBehind));
        assert!(receiver.recv().await.is_some());
        assert!(
            receiver.try_recv().is_err(),
            "refused uplinks never reach the lane"
        );
        assert_eq!(Refused::ControllerBehind.reason(), "controller_behind");
    }
}
