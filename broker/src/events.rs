//! The in-process live event bus: ingest publishes [`FleetEvent`]s, the admin API's
//! `/api/v1/stream` (and anything else that wants to watch the fleet) subscribes.
//!
//! # Layout
//!
//! - [`EventBus`]: a cloneable handle around one bounded `tokio::sync::broadcast` channel.
//!   Publishing never blocks and never fails: with no subscriber the event is dropped, and a
//!   full ring overwrites its oldest event.
//! - [`EventSubscription`]: one subscriber. A subscriber that falls behind the ring is not
//!   disconnected; it receives one [`FleetEvent::Lagged`] saying how many events it missed and
//!   then continues with the oldest event still held.

use tokio::sync::broadcast;

use crate::views::FleetEvent;

/// Events held for slow subscribers when no capacity is configured.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// Cloneable handle to the fleet's live event bus.
#[derive(Clone, Debug)]
pub struct EventBus {
    /// The broadcast ring; its capacity bounds the memory every subscriber can pin.
    tx: broadcast::Sender<FleetEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(DEFAULT_EVENT_CAPACITY)
    }
}

impl EventBus {
    /// A bus holding up to `capacity` events (at least 1) for subscribers that lag.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// Publishes an event to every current subscriber. Never blocks; with no subscriber the
    /// event is simply dropped.
    pub fn publish(&self, event: FleetEvent) {
        // `send` only fails when nobody listens, which is not an error for a live stream.
        let _ = self.tx.send(event);
    }

    /// A new subscriber that sees every event published from now on.
    pub fn subscribe(&self) -> EventSubscription {
        EventSubscription {
            rx: self.tx.subscribe(),
        }
    }

    /// Number of live subscribers (for tests and diagnostics).
    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// One subscriber of the [`EventBus`].
#[derive(Debug)]
pub struct EventSubscription {
    /// This subscriber's cursor into the broadcast ring.
    rx: broadcast::Receiver<FleetEvent>,
}

impl EventSubscription {
    /// The next event, a [`FleetEvent::Lagged`] if this subscriber fell behind, or `None` once
    /// every [`EventBus`] handle is gone.
    pub async fn recv(&mut self) -> Option<FleetEvent> {
        match self.rx.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(FleetEvent::Lagged { missed }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is waiting (tests).
    #[cfg(test)]
    pub(crate) fn try_recv(&mut self) -> Option<FleetEvent> {
        match self.rx.try_recv() {
            Ok(event) => Some(event),
            Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                Some(FleetEvent::Lagged { missed })
            }
            Err(_) => None,
        }
    }

    /// Turns the subscription into a stream of events (ends when the bus is gone).
    pub fn into_stream(self) -> impl futures_util::Stream<Item = FleetEvent> + Send + 'static {
        futures_util::stream::unfold(self, |mut sub| async move {
            let event = sub.recv().await?;
            Some((event, sub))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn presence(device: &str, at_ms: u64) -> FleetEvent {
        FleetEvent::Presence {
            device: device.into(),
            online: true,
            reason: None,
            at_ms,
        }
    }

    #[tokio::test]
    async fn subscribers_receive_events_in_order() {
        let bus = EventBus::new(8);
        let mut a = bus.subscribe();
        let mut b = bus.subscribe();
        bus.publish(presence("T-1", 1));
        bus.publish(presence("T-2", 2));
        for sub in [&mut a, &mut b] {
            assert_eq!(sub.recv().await, Some(presence("T-1", 1)));
            assert_eq!(sub.recv().await, Some(presence("T-2", 2)));
        }
    }

    #[tokio::test]
    async fn publishing_without_subscribers_is_fine() {
        let bus = EventBus::new(2);
        for i in 0..10 {
            bus.publish(presence("T-1", i));
        }
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_what_it_missed_and_continues() {
        let bus = EventBus::new(4);
        let mut sub = bus.subscribe();
        // Publishing never blocks, even with a subscriber that does not read.
        for i in 0..10 {
            bus.publish(presence("T-1", i));
        }
        assert_eq!(sub.recv().await, Some(FleetEvent::Lagged { missed: 6 }));
        for i in 6..10 {
            assert_eq!(sub.recv().await, Some(presence("T-1", i)));
        }
        bus.publish(presence("T-1", 99));
        assert_eq!(sub.recv().await, Some(presence("T-1", 99)));
    }

    #[tokio::test]
    async fn the_stream_ends_when_the_bus_is_gone() {
        let bus = EventBus::new(4);
        let stream = bus.subscribe().into_stream();
        bus.publish(presence("T-1", 1));
        drop(bus);
        let events: Vec<FleetEvent> = stream.collect().await;
        assert_eq!(events, vec![presence("T-1", 1)]);
    }
}
