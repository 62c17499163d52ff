//! The embedded controller's bus: a link to this process's own rumqttd router
//! (`rumqttd::local`), with no socket and no TLS.
//!
//! One task owns both halves of the link, so nothing is ever sent or woken after its own
//! Disconnect or after the router dropped the link (a wake for a removed link kills the
//! router thread, docs/decisions/0001-mqtt-edge-on-rumqttd-router.md). The task:
//!
//! - builds the link (`spawn_blocking`: `LinkBuilder::build` blocks) and subscribes to the
//!   controller's uplink filter, exactly `posfleet/v1/d/+/up/+` so the router's larger log for
//!   that filter (`RouterSettings::controller_segment_*`) applies; at the SUBACK it opens the
//!   edge's device gate and reports `Connected`;
//! - hands every uplink to the consumer in order through a bounded channel, counting it in
//!   `EdgeHandle::controller_intake` (the uplink lanes' markers for the edge's lag gate end
//!   there and are not passed on). While that channel is full it stops reading the link;
//!   the uplinks wait in the filter's log, as they would for a slow MQTT client, and the
//!   edge refuses new terminal uplinks before that log could drop unread ones
//!   (docs/decisions/0013-edge-delivers-to-terminals.md, "Controller lag");
//! - answers `Unschedule` with a wake (without it, delivery stalls at 200 messages);
//! - pushes queued downlinks into the router in batches with one notify each
//!   (`EdgeHandle::send_local`, blocking only under `block_in_place` when the router is
//!   congested), even while the consumer is slow, so the consumer may publish with
//!   [`LocalHandle::publish`] without deadlocking.
//!
//! # QoS 0 on the link, both ways
//!
//! The subscription is QoS 0: the router forwards up to 200 messages per pass and then asks
//! for a wake, with no acknowledgement to send back in order (at QoS 1 the router stops at
//! 100 in flight and disconnects a link whose PUBACKs come out of order). QoS 1 would add
//! only redelivery across a reconnect of a persistent session, and this link ends only with
//! the process. Either QoS would lose unread uplinks when the ring wraps; the lag gate keeps
//! the ring from wrapping over them.
//!
//! Downlinks are published at QoS 0 too (`Publish::new`: a local link has no packet ids);
//! the router forwards every message at the QoS of the subscriber's filter, so terminals
//! still receive them at QoS 1.
//!
//! A closed router channel or a link the router ended is fatal (`EdgeHandle::raise_fatal`):
//! the process exits and its supervisor restarts it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::FutureExt;
use posfleet_proto::codec::check_size;
use posfleet_proto::{Filter, Topic};
use posfleet_runtime::mqtt::SessionEvent;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter as RouterFilter, Packet, Publish, QoS,
    RetainForwardRule, Subscribe,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::BusError;
use crate::edge::{ControllerIntake, EdgeHandle, Intake};

/// The embedded controller's router client id. No edge connection can present it: device
/// ids have no `:`, and controller certificates give `controller:<name>`. So no terminal or
/// mTLS controller can take the link over.
pub const LOCAL_CONTROLLER_ID: &str = "local:controller";

/// Downlinks pushed into the router per notify.
const SEND_BATCH: usize = 256;
/// Notifications taken from the link per turn of the task.
const TAKE_BATCH: usize = 256;

/// The local link's settings.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The edge whose router the link attaches to.
    pub edge: EdgeHandle,
    /// Router client id ([`LOCAL_CONTROLLER_ID`]).
    pub client_id: String,
    /// Downlinks queued towards the router at most; `try_publish` is refused beyond.
    pub request_capacity: usize,
    /// Events queued towards the consumer at most; while full, the link is not read.
    pub incoming_capacity: usize,
}

impl LocalConfig {
    /// Defaults: [`LOCAL_CONTROLLER_ID`], 1024 queued downlinks (one TransactionAck per
    /// device of a large group commit), 1024 queued events.
    pub fn new(edge: EdgeHandle) -> Self {
        Self {
            edge,
            client_id: LOCAL_CONTROLLER_ID.to_owned(),
            request_capacity: 1024,
            incoming_capacity: 1024,
        }
    }
}

enum Request {
    Publish(Publish),
    Disconnect,
}

/// What the handles and the task share.
struct State {
    client_id: String,
    /// Cancelled by `disconnect`: publishes are refused from then on.
    closing: CancellationToken,
    /// Cancelled when the task has ended.
    ended: CancellationToken,
    /// True from the SUBACK until the task ends.
    subscribed: AtomicBool,
}

/// Cloneable handle to the local link.
#[derive(Clone)]
pub struct LocalHandle {
    requests: mpsc::Sender<Request>,
    state: Arc<State>,
}

impl std::fmt::Debug for LocalHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHandle")
            .field("client_id", &self.state.client_id)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl LocalHandle {
    pub fn client_id(&self) -> &str {
        &self.state.client_id
    }

    fn admit(&self, topic: &Topic, payload: Vec<u8>) -> Result<Request, BusError> {
        check_size(topic.channel(), payload.len())?;
        if self.state.closing.is_cancelled() || self.state.ended.is_cancelled() {
            return Err(BusError::Closed);
        }
        let topic = Bytes::from(topic.to_string());
        Ok(Request::Publish(Publish::new(topic, payload.into(), false)))
    }

    /// Queues a downlink without waiting: [`BusError::Full`] when the queue is full.
    pub fn try_publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), BusError> {
        let request = self.admit(topic, payload)?;
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BusError::Full,
            mpsc::error::TrySendError::Closed(_) => BusError::Closed,
        })
    }

    /// Queues a downlink, waiting for room (cancel-safe: nothing is queued if dropped).
    pub async fn publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), BusError> {
        let request = self.admit(topic, payload)?;
        self.requests
            .send(request)
            .await
            .map_err(|_| BusError::Closed)
    }

    /// Detaches from the router after every downlink queued so far, and waits until the
    /// task has ended. Idempotent.
    pub async fn disconnect(&self) {
        self.state.closing.cancel();
        if !self.state.ended.is_cancelled() {
            // Fails only when the task has already ended.
            let _ = self.requests.send(Request::Disconnect).await;
        }
        self.state.ended.cancelled().await;
    }

    /// True while the uplink subscription is in the router.
    pub fn is_connected(&self) -> bool {
        self.state.subscribed.load(Ordering::Acquire)
    }

    /// True once the link task has ended.
    pub fn is_closed(&self) -> bool {
        self.state.ended.is_cancelled()
    }
}

/// Starts the link task on `tracker`, subscribed to `filter`. Cancelling `cancel` detaches
/// at once (queued downlinks are dropped).
pub(super) fn spawn_local(
    cfg: LocalConfig,
    filter: Filter,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> (LocalHandle, mpsc::Receiver<SessionEvent>) {
    let (requests_tx, requests) = mpsc::channel(cfg.request_capacity.max(1));
    let (events, events_rx) = mpsc::channel(cfg.incoming_capacity.max(1));
    let state = Arc::new(State {
        client_id: cfg.client_id,
        closing: CancellationToken::new(),
        ended: CancellationToken::new(),
        subscribed: AtomicBool::new(false),
    });
    let task = Task {
        intake: cfg.edge.controller_intake(),
        edge: cfg.edge,
        filter,
        requests,
        events,
        held: None,
        state: Arc::clone(&state),
        cancel,
    };
    tracker.spawn(task.run());
    (
        LocalHandle {
            requests: requests_tx,
            state,
        },
        events_rx,
    )
}

/// What woke the pump.
enum Turn {
    Cancelled,
    Request(Option<Request>),
    /// What the link gave; `Err` when the router dropped it (`LinkError` is ~800 bytes).
    Link(Result<Option<Notification>, ()>),
}

/// How the pump ended.
enum End {
    /// Detach now (a DISCONNECT through the link).
    Detach,
    /// Nothing more may be sent: the DISCONNECT is out, or the link or router is gone.
    Done,
}

struct Task {
    edge: EdgeHandle,
    intake: Arc<ControllerIntake>,
    filter: Filter,
    requests: mpsc::Receiver<Request>,
    events: mpsc::Sender<SessionEvent>,
    /// An event taken from the link that the full consumer channel has no room for yet.
    held: Option<SessionEvent>,
    state: Arc<State>,
    cancel: CancellationToken,
}

impl Task {
    async fn run(mut self) {
        if let Some((mut link_tx, mut link_rx)) = self.attach().await {
            if let End::Detach = self.pump(&mut link_tx, &mut link_rx).await {
                let disconnect = Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                };
                self.send(&mut link_tx, vec![Packet::Disconnect(disconnect, None)]);
            }
            info!(client_id = %self.state.client_id, "controller detached from the router");
        }
        self.state.subscribed.store(false, Ordering::Release);
        self.intake.detached();
        self.state.ended.cancel();
    }

    async fn attach(&self) -> Option<(LinkTx, LinkRx)> {
        let edge = self.edge.clone();
        let client_id = self.state.client_id.clone();
        let built = tokio::task::spawn_blocking(move || edge.build_local_link(&client_id)).await;
        match built {
            Ok(Ok(link)) => Some(link),
            Ok(Err(error)) => {
                self.edge.raise_fatal(format!(
                    "the controller cannot attach to the router: {error}"
                ));
                None
            }
            Err(error) => {
                self.edge
                    .raise_fatal(format!("the controller's router link task failed: {error}"));
                None
            }
        }
    }

    /// Moves uplinks to the consumer and downlinks to the router until the end.
    async fn pump(&mut self, link_tx: &mut LinkTx, link_rx: &mut LinkRx) -> End {
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![RouterFilter {
                path: self.filter.to_string(),
                qos: QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::Never,
            }],
        };
        if !self.send(link_tx, vec![Packet::Subscribe(subscribe, None)]) {
            return End::Done;
        }
        loop {
            // Unbiased: neither a flood of uplinks nor of downlinks starves the other way.
            let turn = tokio::select! {
                () = self.cancel.cancelled() => Turn::Cancelled,
                request = self.requests.recv() => Turn::Request(request),
                permit = self.events.reserve(), if self.held.is_some() => {
                    // An error means the consumer is gone: what it would get is dropped.
                    if let (Ok(permit), Some(event)) = (permit, self.held.take()) {
                        permit.send(event);
                    }
                    continue;
                }
                next = link_rx.next(), if self.held.is_none() => Turn::Link(next.map_err(drop)),
            };
            let end = match turn {
                Turn::Cancelled => Some(End::Detach),
                // Every handle is gone: nobody can publish or read any more.
                Turn::Request(None) => Some(End::Detach),
                Turn::Request(Some(first)) => self.forward(first, link_tx),
                Turn::Link(next) => self.take(next, link_rx).await,
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Pushes `first` and whatever else is queued (up to [`SEND_BATCH`]) into the router.
    fn forward(&mut self, first: Request, link_tx: &mut LinkTx) -> Option<End> {
        let mut packets = Vec::new();
        let mut next = Some(first);
        let mut disconnect = false;
        while let Some(request) = next.take() {
            match request {
                Request::Publish(publish) => packets.push(Packet::Publish(publish, None)),
                Request::Disconnect => {
                    packets.push(Packet::Disconnect(
                        Disconnect {
                            reason_code: DisconnectReasonCode::NormalDisconnection,
                        },
                        None,
                    ));
                    disconnect = true;
                    break;
                }
            }
            if packets.len() < SEND_BATCH {
                next = self.requests.try_recv().ok();
            }
        }
        if !self.send(link_tx, packets) || disconnect {
            return Some(End::Done);
        }
        None
    }

    /// Handles `first` and whatever else the link holds (up to [`TAKE_BATCH`]) while the
    /// consumer has room.
    async fn take(
        &mut self,
        first: Result<Option<Notification>, ()>,
        link_rx: &mut LinkRx,
    ) -> Option<End> {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(result) = next.take() {
            match result {
                Ok(Some(notification)) => {
                    if let Some(end) = self.on_notification(notification, link_rx).await {
                        return Some(end);
                    }
                }
                Ok(None) => {}
                Err(_) => return Some(self.lost("the router dropped the controller's link")),
            }
            taken += 1;
            if self.held.is_none() && taken < TAKE_BATCH {
                next = link_rx
                    .next()
                    .now_or_never()
                    .map(|result| result.map_err(drop));
            }
        }
        None
    }

    async fn on_notification(
        &mut self,
        notification: Notification,
        link_rx: &mut LinkRx,
    ) -> Option<End> {
        match notification {
            Notification::Forward(forward) => {
                let publish = forward.publish;
                if self.intake.record(&publish.topic, &publish.payload) == Intake::Marker {
                    return None;
                }
                let topic = std::str::from_utf8(&publish.topic)
                    .ok()
                    .and_then(|topic| Topic::parse(topic).ok());
                match topic {
                    Some(topic) => self.deliver(SessionEvent::Message {
                        topic,
                        payload: publish.payload,
                    }),
                    None => warn!(
                        topic_len = publish.topic.len(),
                        "dropped an uplink on a non-posfleet topic"
                    ),
                }
            }
            Notification::DeviceAck(ack) => {
                let suback = matches!(
                    Option::<Packet>::from(Notification::DeviceAck(ack)),
                    Some(Packet::SubAck(..))
                );
                if suback && !self.state.subscribed.swap(true, Ordering::AcqRel) {
                    info!(client_id = %self.state.client_id, filter = %self.filter, "controller subscribed through its local router link");
                    self.intake.attached();
                    self.edge.open_device_gate();
                    self.deliver(SessionEvent::Connected {
                        session_present: false,
                    });
                }
            }
            // Everything before it has been taken: ask for the next batch.
            Notification::Unschedule => return self.wake(link_rx).await,
            Notification::Disconnect(..) => {
                return Some(self.lost("the router ended the controller's link"));
            }
            _ => {}
        }
        None
    }

    async fn wake(&self, link_rx: &LinkRx) -> Option<End> {
        if link_rx.wake().await.is_err() {
            self.edge
                .raise_fatal("router channel closed on the controller's wake");
            return Some(End::Done);
        }
        None
    }

    /// Passes an event on, or holds it until the consumer has room.
    fn deliver(&mut self, event: SessionEvent) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => self.held = Some(event),
            // The consumer is gone.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// The link is gone while the process runs: the controller can no longer see uplinks.
    fn lost(&mut self, reason: &str) -> End {
        self.state.subscribed.store(false, Ordering::Release);
        let _ = self.events.try_send(SessionEvent::Disconnected {
            error: reason.to_owned(),
        });
        self.edge.raise_fatal(reason);
        End::Done
    }

    /// Pushes `packets` into the router; false (after raising fatal) if its channel closed.
    fn send(&self, link_tx: &mut LinkTx, packets: Vec<Packet>) -> bool {
        match self.edge.send_local(link_tx, packets) {
            Ok(()) => true,
            Err(error) => {
                self.edge.raise_fatal(format!(
                    "router channel closed under the controller: {error}"
                ));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use posfleet_proto::pki::identity::CONTROLLER_CN_PREFIX;
    use posfleet_proto::{Channel, DeviceId};

    #[test]
    fn no_edge_identity_can_present_the_local_client_id() {
        assert!(DeviceId::new(LOCAL_CONTROLLER_ID).is_err());
        assert!(!LOCAL_CONTROLLER_ID.starts_with(CONTROLLER_CN_PREFIX));
    }

    /// A handle whose queue nobody drains.
    fn handle(capacity: usize) -> (LocalHandle, mpsc::Receiver<Request>) {
        let (requests, rx) = mpsc::channel(capacity);
        let state = Arc::new(State {
            client_id: LOCAL_CONTROLLER_ID.to_owned(),
            closing: CancellationToken::new(),
            ended: CancellationToken::new(),
            subscribed: AtomicBool::new(false),
        });
        (LocalHandle { requests, state }, rx)
    }

    #[test]
    fn try_publish_never_waits_and_names_why_it_refuses() {
        let (local, _queue) = handle(2);
        let topic = Topic::for_device(&DeviceId::new("T-1").unwrap(), Channel::Command);
        local.try_publish(&topic, vec![1]).unwrap();
        local.try_publish(&topic, vec![2]).unwrap();
        assert!(matches!(
            local.try_publish(&topic, vec![3]),
            Err(BusError::Full)
        ));
        let too_large = vec![0; Channel::Command.max_payload() + 1];
        assert!(matches!(
            local.try_publish(&topic, too_large),
            Err(BusError::Payload(_))
        ));
        local.state.closing.cancel();
        assert!(matches!(
            local.try_publish(&topic, vec![4]),
            Err(BusError::Closed)
        ));
    }
}
