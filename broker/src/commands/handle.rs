//! The command plane seen from outside: [`CommandsHandle`] for the admin API (create,
//! cancel, read, desired state) and [`CommandInbox`] for ingest (results, reported state,
//! presence, log chunks: never waits, a full queue refuses).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use posfleet_proto::{DeviceId, pb};
use tokio::sync::{mpsc, oneshot};

use super::plane::Msg;
use super::store::CommandStore;
use crate::fleetconfig::ConfigSource;
use crate::registry::Registry;
use crate::views::{CommandBody, CommandView, DesiredLockView, DesiredView, ReportedView};

/// Longest the API waits for the worker to commit and answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a create request does to each selected device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Lock { reason: String },
    Unlock { reason: String },
    Reboot,
    Wipe { force: bool },
    CollectLogs { since_ms: u64, max_bytes: u32 },
}

/// A validated create request.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub action: Action,
    /// Resolved from the selector; non-empty, known devices.
    pub devices: Vec<DeviceId>,
    pub author: String,
    /// Validity from now.
    pub ttl: Duration,
}

/// A command the caller names itself (the rollout engine): its id is chosen and stored by
/// the caller before it asks, so asking again after a crash never creates a second command.
#[derive(Debug, Clone, PartialEq)]
pub struct IssueCommand {
    /// A fresh id from `posfleet_proto::signing::new_command_id`.
    pub id: String,
    pub device: DeviceId,
    pub body: CommandBody,
}

/// Why commands were not created (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("the command store could not make the commands durable")]
    Store,
    #[error("the command plane is not running or did not answer in time")]
    Unavailable,
}

/// Why a command was not cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("the command is already final")]
    Final,
    #[error("lock and unlock commands cannot be cancelled; change the desired state instead")]
    LockUnlock,
    #[error("the command store could not make the cancellation durable")]
    Store,
    #[error("the command plane is not running or did not answer in time")]
    Unavailable,
}

/// State the worker writes and the API reads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Desired lock state per device (as committed).
    desired: RwLock<HashMap<DeviceId, DesiredLockView>>,
}

impl Shared {
    pub(crate) fn new(desired: Vec<(DeviceId, DesiredLockView)>) -> Self {
        Self {
            desired: RwLock::new(desired.into_iter().collect()),
        }
    }

    pub(crate) fn desired_lock(&self, device: &DeviceId) -> Option<DesiredLockView> {
        self.desired
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            .cloned()
    }

    pub(crate) fn set_desired(&self, changes: BTreeMap<DeviceId, DesiredLockView>) {
        if changes.is_empty() {
            return;
        }
        let mut map = self.desired.write().unwrap_or_else(PoisonError::into_inner);
        map.extend(changes);
    }
}

/// The admin API's handle. Cheap to clone.
#[derive(Clone)]
pub struct CommandsHandle {
    pub(crate) tx: mpsc::Sender<Msg>,
    pub(crate) store: Arc<CommandStore>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: Arc<dyn ConfigSource>,
    pub(crate) registry: Arc<Registry>,
    /// `DATA/logs`.
    pub(crate) logs_dir: PathBuf,
}

impl std::fmt::Debug for CommandsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandsHandle").finish_non_exhaustive()
    }
}

impl CommandsHandle {
    /// Creates the commands durably (and the desired lock changes) and returns them.
    pub async fn create(&self, req: CreateRequest) -> Result<Vec<CommandView>, CreateError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Msg::Create { req, reply }, rx)
            .await
            .ok_or(CreateError::Unavailable)?
    }

    /// Creates the named commands durably (one commit) and returns the ones created. An id
    /// that is live already is skipped, so a repeated request is harmless while the command
    /// lives; callers check the store for ids that may be final already.
    pub async fn issue(
        &self,
        commands: Vec<IssueCommand>,
        author: &str,
        ttl: Duration,
    ) -> Result<Vec<CommandView>, CreateError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Issue {
            commands,
            author: author.to_owned(),
            ttl,
            reply,
        };
        self.ask(msg, rx).await.ok_or(CreateError::Unavailable)?
    }

    /// Cancels a live command durably.
    pub async fn cancel(&self, id: &str) -> Result<CommandView, CancelError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Cancel {
            id: id.to_owned(),
            reply,
        };
        self.ask(msg, rx).await.ok_or(CancelError::Unavailable)?
    }

    /// Cancels every live command of `ids` that may be cancelled (not lock/unlock) in one
    /// durable commit; ids that are final or unknown are skipped. Returns how many were
    /// cancelled.
    pub async fn cancel_many(&self, ids: Vec<String>, why: &str) -> Result<usize, CancelError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::CancelMany {
            ids,
            why: why.to_owned(),
            reply,
        };
        self.ask(msg, rx).await.ok_or(CancelError::Unavailable)?
    }

    async fn ask<T>(&self, msg: Msg, rx: oneshot::Receiver<T>) -> Option<T> {
        tokio::time::timeout(REPLY_TIMEOUT, async {
            self.tx.send(msg).await.ok()?;
            rx.await.ok()
        })
        .await
        .ok()
        .flatten()
    }

    /// The store, for reads.
    pub fn store(&self) -> &Arc<CommandStore> {
        &self.store
    }

    /// What the controller wants `device` to be.
    pub fn desired(&self, device: &DeviceId) -> DesiredView {
        let groups = self.registry.groups(device).unwrap_or_default();
        DesiredView {
            device_id: device.to_string(),
            lock: self.shared.desired_lock(device),
            config_version: self.config.effective(device, &groups).version,
        }
    }

    /// The configuration store (groups changes touch it).
    pub fn config(&self) -> &Arc<dyn ConfigSource> {
        &self.config
    }

    /// `DATA/logs`.
    pub fn logs_dir(&self) -> &std::path::Path {
        &self.logs_dir
    }
}

/// Ingest's side: hands messages to the worker without waiting.
#[derive(Debug, Clone)]
pub(crate) struct CommandInbox {
    pub(crate) tx: mpsc::Sender<Msg>,
}

/// The worker's queue is full (or it stopped); the message was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InboxFull;

impl CommandInbox {
    fn offer(&self, msg: Msg) -> Result<(), InboxFull> {
        self.tx.try_send(msg).map_err(|_| InboxFull)
    }

    pub(crate) fn result(
        &self,
        device: &DeviceId,
        result: pb::CommandResult,
        at_ms: u64,
    ) -> Result<(), InboxFull> {
        self.offer(Msg::Result {
            device: device.clone(),
            result,
            at_ms,
        })
    }

    pub(crate) fn observed(
        &self,
        device: &DeviceId,
        reported: ReportedView,
        heartbeat: bool,
    ) -> Result<(), InboxFull> {
        self.offer(Msg::Observed {
            device: device.clone(),
            reported,
            heartbeat,
        })
    }

    pub(crate) fn online(&self, device: &DeviceId) -> Result<(), InboxFull> {
        self.offer(Msg::Online {
            device: device.clone(),
        })
    }

    pub(crate) fn log(&self, device: &DeviceId, chunk: pb::LogChunk) -> Result<(), InboxFull> {
        self.offer(Msg::Log {
            device: device.clone(),
            chunk,
        })
    }
}
