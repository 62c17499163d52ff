//! The controller side of the signed command plane (ADR 0007): command records and their
//! lifecycle, desired lock state, dispatch (signed, QoS 1, re-sent), results, log uploads,
//! reconciliation against what terminals report, and the offline lease.
//!
//! # Layout
//!
//! - `mod.rs`: [`CommandsConfig`], [`CommandPlane`] (open the store, spawn the worker).
//! - `record.rs`: the stored record and the lifecycle rules (transitions, results).
//! - `store.rs`: [`CommandStore`], the sled store `DATA/commands` (records, indexes, desired
//!   lock state; pages newest first).
//! - `plane.rs`: the worker: the store's single committer; ingest and API messages,
//!   dispatch, re-sends, expiry, reconciliation, leases, log chunks.
//! - `handle.rs`: [`CommandsHandle`] (API) and the ingest inbox.
//! - `downlink.rs`: [`Downlink`], where signed commands go (the MQTT session).
//! - `selector.rs`: [`Selector`]: devices, a group or labels.
//! - `logs.rs`: `DATA/logs/<command id>` files.
//! - `tests.rs`: the worker with a recording downlink and a fake configuration store.

mod downlink;
mod handle;
mod logs;
mod plane;
mod record;
mod selector;
mod store;
#[cfg(test)]
pub(crate) mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::signing::CommandKey;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use downlink::{Downlink, DownlinkError};
pub(crate) use handle::CommandInbox;
pub use handle::{Action, CancelError, CommandsHandle, CreateError, CreateRequest, IssueCommand};
pub(crate) use logs::path as log_path;
pub use record::TransitionError;
pub use selector::{Selector, valid_name};
pub use store::{
    CommandQuery, CommandStore, CommandStoreError, DEFAULT_LIMIT, ListError, MAX_LIMIT,
};

use crate::controller::Clock;
use crate::events::EventBus;
use crate::fleetconfig::ConfigSource;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::views::{CommandView, DesiredLockView};
use posfleet_proto::DeviceId;

/// Author of the commands the controller issues by itself.
pub const AUTHOR_RECONCILER: &str = "reconciler";
/// Author of API requests until accounts exist.
pub const AUTHOR_ADMIN: &str = "admin";
/// Longest validity an API request may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Timing and limits of the command plane.
#[derive(Debug, Clone)]
pub struct CommandsConfig {
    /// A command not final yet is published again after this long (while the device is
    /// online).
    pub resend_interval: Duration,
    /// A heartbeat gets a new lease when the last one is older than this.
    pub lease_interval: Duration,
    /// Validity of a lease.
    pub lease_validity: Duration,
    /// Validity of commands when the request names none (and of reconciler commands).
    pub default_ttl: Duration,
    /// How often the worker expires and re-sends.
    pub tick: Duration,
    /// Commands re-sent per tick at most (the rest on later ticks), so the MQTT request
    /// queue stays free for transaction acknowledgements.
    pub max_sends_per_tick: usize,
    /// Messages waiting for the worker at most; ingest refuses beyond it.
    pub queue_capacity: usize,
    /// `DATA/logs`.
    pub logs_dir: PathBuf,
}

impl CommandsConfig {
    /// The defaults of ADR 0007, with uploads in `logs_dir`.
    pub fn new(logs_dir: impl Into<PathBuf>) -> Self {
        Self {
            resend_interval: Duration::from_secs(30),
            lease_interval: Duration::from_secs(300),
            lease_validity: Duration::from_secs(600),
            default_ttl: Duration::from_secs(24 * 3600),
            tick: Duration::from_millis(500),
            max_sends_per_tick: 500,
            queue_capacity: 4096,
            logs_dir: logs_dir.into(),
        }
    }
}

/// An opened command plane, ready to be spawned by the controller (which has the MQTT
/// session it publishes on).
pub struct CommandPlane {
    pub cfg: CommandsConfig,
    pub store: Arc<CommandStore>,
    pub key: Arc<CommandKey>,
    pub config: Arc<dyn ConfigSource>,
    live: Vec<CommandView>,
    desired: Vec<(DeviceId, DesiredLockView)>,
}

impl std::fmt::Debug for CommandPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandPlane")
            .field("cfg", &self.cfg)
            .field("live", &self.live.len())
            .finish_non_exhaustive()
    }
}

impl CommandPlane {
    /// Loads the commands not final yet and the desired lock states. Blocks (disk reads).
    pub fn load(
        cfg: CommandsConfig,
        store: Arc<CommandStore>,
        key: Arc<CommandKey>,
        config: Arc<dyn ConfigSource>,
    ) -> Result<Self, CommandStoreError> {
        let live = store.load_live()?;
        let desired = store.load_desired()?;
        Ok(Self {
            cfg,
            store,
            key,
            config,
            live,
            desired,
        })
    }

    /// Starts the worker on `tracker`; it stops (after a final commit) on `cancel`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn spawn(
        self,
        downlink: Arc<dyn Downlink>,
        registry: Arc<Registry>,
        events: EventBus,
        metrics: Arc<Metrics>,
        clock: Clock,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> (CommandsHandle, CommandInbox) {
        let (tx, rx) = mpsc::channel(self.cfg.queue_capacity.max(1));
        let shared = Arc::new(handle::Shared::new(self.desired));
        let handle = CommandsHandle {
            tx: tx.clone(),
            store: Arc::clone(&self.store),
            shared: Arc::clone(&shared),
            config: Arc::clone(&self.config),
            registry: Arc::clone(&registry),
            logs_dir: self.cfg.logs_dir.clone(),
        };
        let worker = plane::Plane::new(
            plane::Deps {
                cfg: self.cfg,
                store: self.store,
                shared,
                key: self.key,
                downlink,
                registry,
                config: self.config,
                events,
                metrics,
                clock,
            },
            self.live,
        );
        tracker.spawn(worker.run(rx, tracker.clone(), cancel));
        (handle, CommandInbox { tx })
    }
}
