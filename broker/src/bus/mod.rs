//! The controller's bus: where it takes device uplinks from and publishes downlinks to.
//!
//! Two implementations behind one small [`Bus`] handle:
//!
//! - [`Bus::Local`] (`local.rs`): the embedded setup. A link to the router of this process's
//!   own edge (`rumqttd::local`), no socket and no TLS; it opens the edge's device gate once
//!   its uplink subscription is in the router and counts what it takes
//!   (`EdgeHandle::controller_intake`).
//! - [`Bus::Broker`]: an MQTT session over mTLS (`posfleet_runtime::mqtt`) to a broker, an
//!   external one (Mosquitto, EMQX, ...) with `serve --external-broker`.
//!
//! Both report the same [`SessionEvent`]s, in order, into one bounded receiver (connected,
//! every uplink as topic and payload, disconnected), and publish on the same terms:
//! [`Bus::try_publish`] never waits (refused with [`BusError::Full`] when the outgoing queue
//! is full), [`Bus::publish`] waits for room, and [`Bus::disconnect`] ends the bus after
//! everything queued before it.

pub mod local;
#[cfg(test)]
pub(crate) mod tests;

use posfleet_proto::{CodecError, Filter, Topic};
use posfleet_runtime::mqtt::{
    MqttError, MqttHandle, QoS, SessionConfig, SessionEvent, spawn_session,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use local::{LOCAL_CONTROLLER_ID, LocalConfig, LocalHandle};

/// How the controller reaches its bus.
#[derive(Debug, Clone)]
pub enum BusConfig {
    /// An MQTT session over mTLS to a broker (subscriptions are set by [`spawn_bus`]).
    Broker(SessionConfig),
    /// A local link to this process's own router.
    Local(LocalConfig),
}

/// A running bus (cloneable).
#[derive(Debug, Clone)]
pub enum Bus {
    Broker(MqttHandle),
    Local(LocalHandle),
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The outgoing queue is full (or the session is reconnecting): try again later.
    #[error("the controller's outgoing queue is full")]
    Full,
    /// The bus has ended or is ending.
    #[error("the controller's bus is closed")]
    Closed,
    /// Larger than the topic's channel allows: can never be sent.
    #[error(transparent)]
    Payload(#[from] CodecError),
}

impl From<MqttError> for BusError {
    fn from(error: MqttError) -> Self {
        match error {
            MqttError::QueueFull => Self::Full,
            MqttError::Payload(e) => Self::Payload(e),
            _ => Self::Closed,
        }
    }
}

/// Starts the bus on `tracker`, subscribed to `filter`. Cancelling `cancel` ends it at once;
/// [`Bus::disconnect`] ends it gracefully. Fails only on an invalid broker session config.
pub fn spawn_bus(
    cfg: BusConfig,
    filter: Filter,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<(Bus, mpsc::Receiver<SessionEvent>), MqttError> {
    match cfg {
        BusConfig::Broker(mut session) => {
            session.subscriptions = vec![filter];
            let (handle, events) = spawn_session(session, tracker, cancel)?;
            Ok((Bus::Broker(handle), events))
        }
        BusConfig::Local(local) => {
            let (handle, events) = local::spawn_local(local, filter, tracker, cancel);
            Ok((Bus::Local(handle), events))
        }
    }
}

impl Bus {
    /// The client id on the bus (`controller:<name>` on a broker, [`LOCAL_CONTROLLER_ID`]
    /// on the local link).
    pub fn client_id(&self) -> &str {
        match self {
            Self::Broker(mqtt) => mqtt.client_id(),
            Self::Local(local) => local.client_id(),
        }
    }

    /// Queues a downlink without waiting; refused with [`BusError::Full`] when the outgoing
    /// queue is full. Delivered to terminals at QoS 1 (the broker session publishes at QoS 1;
    /// the router forwards a local publish at the subscriber's QoS).
    pub fn try_publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), BusError> {
        match self {
            Self::Broker(mqtt) => Ok(mqtt.try_publish(topic, payload, QoS::AtLeastOnce)?),
            Self::Local(local) => local.try_publish(topic, payload),
        }
    }

    /// Queues a downlink, waiting for room in the outgoing queue (cancel-safe).
    pub async fn publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), BusError> {
        match self {
            Self::Broker(mqtt) => Ok(mqtt.publish(topic, payload, QoS::AtLeastOnce).await?),
            Self::Local(local) => local.publish(topic, payload).await,
        }
    }

    /// Ends the bus gracefully after everything queued so far, and waits until it has
    /// ended. New publishes are refused from now on. Bound it with a timeout.
    pub async fn disconnect(&self) {
        match self {
            Self::Broker(mqtt) => mqtt.disconnect().await,
            Self::Local(local) => local.disconnect().await,
        }
    }

    /// True while attached (MQTT: connected; local: subscribed in the router).
    pub fn is_connected(&self) -> bool {
        match self {
            Self::Broker(mqtt) => mqtt.is_connected(),
            Self::Local(local) => local.is_connected(),
        }
    }

    /// True once the bus has ended.
    pub fn is_closed(&self) -> bool {
        match self {
            Self::Broker(mqtt) => mqtt.is_closed(),
            Self::Local(local) => local.is_closed(),
        }
    }
}
