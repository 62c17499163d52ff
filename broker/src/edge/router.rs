//! The embedded rumqttd router and the only code that talks to its channel directly.
//!
//! rumqttd's `Router::spawn` returns a sender whose element type (`Event`) is private, so the
//! sender cannot be named in a struct field. It is captured in closures instead (workaround 1
//! in docs/rumqtt.md), and the rest of the edge only sees [`RouterHandle`].

use std::collections::HashMap;
use std::sync::Arc;

use posfleet_proto::Filter;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig, SegmentConfig};

/// Sizing of the router's in-memory logs and links.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// Router connection slots (edge connection cap plus headroom).
    pub max_connections: usize,
    /// Notifications buffered per link before the router pauses it.
    pub max_outgoing_packet_count: u64,
    /// Segment size and count of every filter's log (device downlinks).
    pub segment_size: usize,
    pub segment_count: usize,
    /// Segment size and count of the controller's uplink filter log. PUBACK means "in router
    /// RAM": the edge refuses terminal uplinks (`controller_behind`) once the embedded
    /// controller lags by half of the `(count − 1) × size` bytes this ring always holds
    /// (`lag.rs`); at least 2 segments, each at least 1 KiB (rumqttd panics below).
    pub controller_segment_size: usize,
    pub controller_segment_count: usize,
    /// Segment size and count of the edge's downlink filter log (every terminal's downlinks
    /// pass through it on their way to the edge's per-terminal queues).
    pub downlink_segment_size: usize,
    pub downlink_segment_count: usize,
    /// Shared links terminal uplinks reach the router through.
    pub uplink_lanes: usize,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            // Terminals take no router link (the edge serves them itself): controllers,
            // other MQTT consumers and the edge's own links.
            max_connections: 1_024,
            max_outgoing_packet_count: 200,
            segment_size: 512 * 1024,
            segment_count: 2,
            // A ring is never emptied by reading: it fills to its size with messages already
            // delivered and stays full, a fixed cost of ~1.7× its size in heap (each entry
            // holds a Publish and its own topic and payload allocations). 4 × 4 MiB keeps
            // the lag gate's margin at 6 MiB, about 40 s of a 10,000-terminal fleet's
            // steady uplinks (docs/benchmarks.md, "Memory per idle terminal").
            controller_segment_size: 4 * 1024 * 1024,
            controller_segment_count: 4,
            downlink_segment_size: 4 * 1024 * 1024,
            downlink_segment_count: 4,
            uplink_lanes: 4,
        }
    }
}

type BuildFn =
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), LinkFailure> + Send + Sync;
/// A failed router link operation (rumqttd's `LinkError` is ~800 bytes; this keeps the text).
#[derive(Debug, thiserror::Error)]
#[error("router link: {0}")]
pub(crate) struct LinkFailure(String);

impl From<LinkError> for LinkFailure {
    fn from(error: LinkError) -> Self {
        Self(error.to_string())
    }
}

type QueueLenFn = dyn Fn() -> usize + Send + Sync;
type AliveFn = dyn Fn() -> bool + Send + Sync;

/// Handle on the router thread.
#[derive(Clone)]
pub(crate) struct RouterHandle {
    /// Registers a link (blocking: run it in `spawn_blocking`).
    build: Arc<BuildFn>,
    /// Events waiting in the router's bounded(1000) channel.
    queue_len: Arc<QueueLenFn>,
    /// False once the router thread has gone (its receiver dropped).
    alive: Arc<AliveFn>,
}

impl std::fmt::Debug for RouterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterHandle").finish_non_exhaustive()
    }
}

/// Runs a call that blocks on the router thread: under `block_in_place` on a multi-thread
/// runtime, directly otherwise (the router is its own thread, so it always answers).
pub(crate) fn blocking<T>(call: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(call)
    } else {
        call()
    }
}

/// Above this many queued router events, a link send may block: do it off the runtime.
const ROUTER_QUEUE_SAFE: usize = 800;

impl RouterHandle {
    /// Starts the router thread.
    pub(crate) fn spawn(settings: &RouterSettings) -> Self {
        let controller_filter = Filter::all_uplinks().to_string();
        let mut custom = HashMap::new();
        custom.insert(
            controller_filter,
            SegmentConfig {
                max_segment_size: settings.controller_segment_size,
                max_segment_count: settings.controller_segment_count,
            },
        );
        custom.insert(
            Filter::all_downlinks().to_string(),
            SegmentConfig {
                max_segment_size: settings.downlink_segment_size,
                max_segment_count: settings.downlink_segment_count,
            },
        );
        let config = RouterConfig {
            max_connections: settings.max_connections,
            max_outgoing_packet_count: settings.max_outgoing_packet_count,
            max_segment_size: settings.segment_size,
            max_segment_count: settings.segment_count,
            custom_segment: Some(custom),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let tx = Router::new(0, config).spawn();
        let build_tx = tx.clone();
        let len_tx = tx.clone();
        Self {
            build: Arc::new(move |client_id: &str, clean: bool| {
                LinkBuilder::new(client_id, build_tx.clone())
                    .clean_session(clean)
                    .build()
                    .map_err(LinkFailure::from)
            }),
            queue_len: Arc::new(move || len_tx.len()),
            alive: Arc::new(move || !tx.is_disconnected()),
        }
    }

    /// Registers a link with the router. Blocks until the router answers; call it from
    /// `spawn_blocking`. A refusal (no free slot, invalid client id) is an error.
    pub(crate) fn build_link(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), LinkFailure> {
        (self.build)(client_id, clean_session)
    }

    pub(crate) fn is_alive(&self) -> bool {
        (self.alive)()
    }

    /// True when a blocking send into the router channel could actually block.
    pub(crate) fn congested(&self) -> bool {
        (self.queue_len)() >= ROUTER_QUEUE_SAFE
    }
}
