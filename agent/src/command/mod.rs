//! The signed command plane, agent side (ADR 0007).
//!
//! # Layout
//!
//! - `mod.rs`: [`CommandSettings`] (trusted keys, hooks, offline lease), [`CommandSetup`]
//!   (one terminal's state and files), the executor task: verification, the journal
//!   (replays), dispatch, result publishing.
//! - [`hooks`]: running terminal hooks (no shell, bounded output, killed at the timeout).
//! - `lock.rs`: Lock/Unlock (generation rule), the Lease and the offline self-lock.
//! - `config_push.rs`: ConfigPush (document rules, version rule, atomic file, apply hook,
//!   rollback).
//! - `wipe.rs`, `reboot.rs`, `logs.rs`: the one-shot commands.
//! - [`update`]: SoftwareUpdate (download, verify, wait, install, confirm), run as its own
//!   task so that other commands never wait behind it; `rollback.rs`: RollbackUpdate.
//! - `journal.rs`: journal writes around a command (in progress before it acts, final before
//!   its result goes out) and result publishing (kept for the next connect when offline).
//! - `recovery.rs`: settling journal entries a restart interrupted.
//! - `result.rs`: `CommandResult` builders.
//!
//! # How a command runs
//!
//! The agent's event consumer hands every `down/cmd` payload to this task through a bounded
//! queue (it never waits: a full queue drops the payload, counted; the controller re-sends).
//! The task decodes a `SignedCommand` (size-checked) and verifies it with
//! [`KeyRing::verify`]; a rejection is published as `REJECTED` with `details.reason`. A
//! verified command counts as contact with the controller (offline lease). A `Lease` is then
//! applied and gets no result. Any other command is looked up in the journal: a known id gets
//! its stored result again and never runs twice. Otherwise its journal entry is written and
//! made durable **before** it acts, its final result is written and made durable before it is
//! published. Commands of one terminal run one at a time, except a software update, whose long
//! phases run in their own task (at most one per terminal; see [`update`]).

pub mod hooks;

mod config_push;
mod journal;
mod lock;
mod logs;
mod reboot;
mod recovery;
mod result;
mod rollback;
pub mod update;
mod wipe;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use posfleet_proto::pb::{self, command::Body};
use posfleet_proto::signing::KeyRing;
use posfleet_proto::{DeviceId, decode, now_ms};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use hooks::{DEFAULT_HOOK_TIMEOUT, HookSettings};
pub use update::UpdateSettings;

use crate::agent::AgentStats;
use crate::outbox::DeviceOutbox;
use crate::state::{
    self, AppliedConfig, Changes, DeviceState, InstalledVersions, JournalEntry, LiveState,
    LockRecord, Snapshot, StateError, TerminalStatus,
};
use posfleet_runtime::mqtt::MqttHandle;

/// Default `[commands] max_offline`.
pub const DEFAULT_MAX_OFFLINE: Duration = Duration::from_secs(72 * 3600);
/// Command payloads waiting for the executor, per terminal.
pub const QUEUE_CAPACITY: usize = 16;
/// Config key that overrides `max_offline`, in seconds (0 disables the lease).
pub const MAX_OFFLINE_KEY: &str = "agent.max_offline_s";
/// Lock reason of the offline self-lock.
pub const REASON_OFFLINE_LEASE: &str = "offline_lease";
/// Lock reason after a wipe.
pub const REASON_WIPED: &str = "wiped";
/// Final results kept for the next connect, at most (the controller re-sends anyway).
const MAX_UNSENT: usize = 64;
/// How often expired journal entries are pruned (also at every start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Command settings shared by every terminal of a process.
#[derive(Debug, Clone)]
pub struct CommandSettings {
    /// The controller keys commands must be signed with.
    pub keys: KeyRing,
    pub hooks: HookSettings,
    /// Lock the terminal when no verified command or lease arrived for this long (`None`:
    /// never). The applied configuration's `agent.max_offline_s` overrides it.
    pub max_offline: Option<Duration>,
    /// Software updates: release keys, timeouts, retries.
    pub updates: UpdateSettings,
}

impl CommandSettings {
    pub fn new(keys: KeyRing) -> Self {
        Self {
            keys,
            hooks: HookSettings::default(),
            max_offline: Some(DEFAULT_MAX_OFFLINE),
            updates: UpdateSettings::default(),
        }
    }
}

/// Files of one terminal that commands touch.
#[derive(Debug, Clone)]
pub struct TerminalFiles {
    /// The applied configuration (`DATA/config.json` on a real terminal).
    pub config: PathBuf,
    /// Deleted by a wipe, in order (device key, then certificate); empty for a simulated
    /// terminal, whose identity lives in memory.
    pub identity: Vec<PathBuf>,
    /// Where update artifacts are downloaded (`DATA/updates`; shared by simulated terminals).
    pub updates_dir: PathBuf,
    /// Put before an artifact's file name (empty on a real terminal; `<id>-` for simulated
    /// terminals sharing one directory).
    pub update_prefix: String,
    /// The local API's socket, probed for health after an update (`None`: no local API, as
    /// for a simulated terminal).
    pub api_socket: Option<PathBuf>,
}

/// Everything one terminal needs to execute commands.
#[derive(Debug, Clone)]
pub struct CommandSetup {
    pub settings: Arc<CommandSettings>,
    pub state: DeviceState,
    /// The terminal's state as it was at start.
    pub snapshot: Snapshot,
    pub files: TerminalFiles,
}

impl CommandSetup {
    /// Reads the terminal's state. Blocking.
    pub fn load(
        settings: Arc<CommandSettings>,
        state: DeviceState,
        files: TerminalFiles,
    ) -> Result<Self, StateError> {
        let snapshot = state.load()?;
        Ok(Self {
            settings,
            state,
            snapshot,
            files,
        })
    }

    /// The status the terminal starts with (before the executor runs: a lease that expired
    /// while the agent was down locks it before the local API serves anything).
    pub(crate) fn initial_status(&self, now_ms: u64) -> TerminalStatus {
        let mut status = status_of(&self.snapshot.lock, &self.snapshot.config);
        let max_offline = max_offline(&self.settings, &self.snapshot.config);
        let contact = self.snapshot.last_contact_ms.unwrap_or(now_ms);
        if !status.locked && lease_expired(contact, max_offline, now_ms) {
            status.locked = true;
            status.lock_reason = REASON_OFFLINE_LEASE.to_owned();
        }
        status
    }
}

fn status_of(lock: &LockRecord, config: &AppliedConfig) -> TerminalStatus {
    TerminalStatus {
        locked: lock.locked,
        lock_reason: lock.reason.clone(),
        lock_generation: lock.generation,
        config_version: config.version,
        config: Arc::new(config.document.clone()),
        versions: pb::SoftwareVersions::default(),
    }
}

/// The effective lease: the config key if the applied document has it, else the setting.
fn max_offline(settings: &CommandSettings, config: &AppliedConfig) -> Option<Duration> {
    match config
        .document
        .get(MAX_OFFLINE_KEY)
        .and_then(|v| v.as_u64())
    {
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(s)),
        None => settings.max_offline,
    }
}

fn lease_expired(last_contact_ms: u64, max_offline: Option<Duration>, now_ms: u64) -> bool {
    max_offline.is_some_and(|max| {
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        now_ms.saturating_sub(last_contact_ms) > max_ms
    })
}

/// The executor of one terminal (see the module docs).
pub(crate) struct Executor {
    id: DeviceId,
    settings: Arc<CommandSettings>,
    state: DeviceState,
    files: TerminalFiles,
    live: LiveState,
    mqtt: MqttHandle,
    /// For a wipe: its depth and purge.
    outbox: DeviceOutbox,
    stats: Arc<AgentStats>,
    /// The persisted lock (the live status follows it).
    lock: LockRecord,
    /// The persisted applied configuration.
    config: AppliedConfig,
    /// Unix ms of the last valid contact (persisted lazily).
    last_contact_ms: u64,
    /// Journal entries a restart interrupted, settled at start.
    interrupted: Vec<(String, JournalEntry)>,
    /// Final results not published yet (disconnected); sent at the next connect.
    unsent: Vec<pb::CommandResult>,
    /// The agent's own token: a wipe stops the agent through it.
    stop: CancellationToken,
    /// Cancelled when a wipe has finished.
    wiped: CancellationToken,
    /// When the journal was last pruned.
    pruned_at: tokio::time::Instant,
    /// The terminal's TLS identity (update downloads present its certificate).
    tls: Arc<rustls::ClientConfig>,
    /// Tracks the update job.
    tracker: TaskTracker,
    /// The running software update, if any.
    update: Option<update::ActiveUpdate>,
    /// Events of the update job (its results go out through [`Self::publish_result`]).
    update_tx: mpsc::Sender<update::UpdateEvent>,
    update_rx: mpsc::Receiver<update::UpdateEvent>,
    /// Versions installed by updates (persisted); written by the update job when it
    /// succeeds and by RollbackUpdate, never both at once.
    installed: Arc<Mutex<InstalledVersions>>,
}

/// The handles the executor works with.
pub(crate) struct ExecutorParts {
    pub(crate) id: DeviceId,
    pub(crate) live: LiveState,
    pub(crate) mqtt: MqttHandle,
    pub(crate) outbox: DeviceOutbox,
    pub(crate) stats: Arc<AgentStats>,
    pub(crate) stop: CancellationToken,
    pub(crate) wiped: CancellationToken,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) tracker: TaskTracker,
}

impl Executor {
    pub(crate) fn new(setup: CommandSetup, parts: ExecutorParts) -> Self {
        let now = now_ms();
        let snapshot = setup.snapshot;
        let (update_tx, update_rx) = mpsc::channel(update::EVENT_QUEUE);
        Self {
            id: parts.id,
            settings: setup.settings,
            state: setup.state,
            files: setup.files,
            live: parts.live,
            mqtt: parts.mqtt,
            outbox: parts.outbox,
            stats: parts.stats,
            lock: snapshot.lock,
            config: snapshot.config,
            // Never contacted: the lease starts with the first start.
            last_contact_ms: snapshot.last_contact_ms.unwrap_or(now),
            interrupted: snapshot.in_progress,
            unsent: Vec::new(),
            stop: parts.stop,
            wiped: parts.wiped,
            pruned_at: tokio::time::Instant::now(),
            tls: parts.tls,
            tracker: parts.tracker,
            update: None,
            update_tx,
            update_rx,
            installed: Arc::new(Mutex::new(snapshot.installed)),
        }
    }

    pub(crate) async fn run(
        self,
        commands: mpsc::Receiver<Bytes>,
        online: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) {
        let span = info_span!("commands", device_id = %self.id);
        self.run_inner(commands, online, cancel)
            .instrument(span)
            .await;
    }

    async fn run_inner(
        mut self,
        mut commands: mpsc::Receiver<Bytes>,
        mut online: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) {
        self.start().await;
        loop {
            if self.wiped.is_cancelled() {
                break;
            }
            let lease_due = self.lease_deadline();
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                changed = online.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.publish_unsent().await;
                }
                payload = commands.recv() => match payload {
                    Some(payload) => self.handle(&payload).await,
                    None => break,
                },
                Some(event) = self.update_rx.recv() => self.update_event(event).await,
                () = sleep_until_opt(lease_due) => self.lease_expired().await,
            }
        }
        debug!("command executor stopped");
    }

    /// At start: persist a first contact time, finish a wipe a crash interrupted, prune
    /// the journal, settle interrupted commands, apply an expired lease.
    async fn start(&mut self) {
        if self.lock.reason == REASON_WIPED && self.interrupted.is_empty() {
            warn!("this terminal was wiped; removing what is left of its identity and stopping");
            self.finish_wipe().await;
            return;
        }
        let now = now_ms();
        let contact = self.last_contact_ms;
        let pruned = state::blocking(&self.state, move |s| {
            // Lazy: losing it only restarts the lease clock at the next start (and a fleet of
            // simulated terminals starting at once must not fsync once each).
            s.apply(Changes::lazy().contact(contact))?;
            s.prune_journal(now)
        })
        .await;
        match pruned {
            Ok(n) if n > 0 => debug!(pruned = n, "expired journal entries removed"),
            Ok(_) => {}
            Err(e) => error!(error = %e, "cannot write the state store"),
        }
        self.recover().await;
        if self
            .lease_deadline()
            .is_some_and(|at| at <= tokio::time::Instant::now())
        {
            self.lease_expired().await;
        }
    }

    /// Handles one `down/cmd` payload.
    async fn handle(&mut self, payload: &[u8]) {
        let signed = match decode::<pb::SignedCommand>(payload) {
            Ok(signed) => signed,
            Err(error) => {
                self.stats
                    .commands_malformed
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%error, len = payload.len(), "malformed command payload ignored");
                return;
            }
        };
        let now = now_ms();
        let command = match self.settings.keys.verify(&signed, &self.id, now) {
            Ok(command) => command,
            Err(rejection) => {
                self.stats.commands_rejected.fetch_add(1, Ordering::Relaxed);
                let id = rejection.command_id.unwrap_or_default();
                warn!(command_id = %id, reason = rejection.reason.code(), "command refused");
                let r = result::rejected(&id, rejection.reason, result::describe(rejection.reason));
                self.publish_result(r).await;
                return;
            }
        };
        self.renew_contact(now).await;
        if let Some(Body::Lease(lease)) = &command.body {
            debug!(command_id = %command.id, "lease received");
            self.lease(lease).await;
            return;
        }
        let id = command.id.clone();
        let known = state::blocking(&self.state, move |s| s.journal_entry(&id)).await;
        match known {
            Ok(Some(entry)) => {
                info!(command_id = %command.id, "command already executed; its result is sent again");
                self.publish_stored(&entry.result).await;
            }
            Ok(None) => {
                self.prune_now_and_then(now).await;
                self.stats.commands.fetch_add(1, Ordering::Relaxed);
                info!(command_id = %command.id, kind = kind_name(&command), "command accepted");
                self.execute(&command, &signed.command, false).await;
            }
            Err(e) => {
                // Without the journal a command could run twice: do not run it (the
                // controller re-sends it).
                error!(error = %e, command_id = %command.id, "cannot read the command journal");
            }
        }
    }

    /// Removes expired journal entries, at most every [`PRUNE_EVERY`] (the journal stays
    /// bounded by command validity without scanning it for every command).
    async fn prune_now_and_then(&mut self, now: u64) {
        if self.pruned_at.elapsed() < PRUNE_EVERY {
            return;
        }
        self.pruned_at = tokio::time::Instant::now();
        match state::blocking(&self.state, move |s| s.prune_journal(now)).await {
            Ok(n) if n > 0 => debug!(pruned = n, "expired journal entries removed"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot prune the command journal"),
        }
    }

    /// Runs a verified, journal-new command (or re-runs an interrupted one).
    async fn execute(&mut self, cmd: &pb::Command, bytes: &[u8], recovering: bool) {
        match &cmd.body {
            Some(Body::Lock(l)) => {
                self.lock_command(cmd, bytes, true, &l.reason, l.generation, recovering)
                    .await;
            }
            Some(Body::Unlock(u)) => {
                self.lock_command(cmd, bytes, false, &u.reason, u.generation, recovering)
                    .await;
            }
            Some(Body::ConfigPush(push)) => self.config_push(cmd, bytes, push).await,
            Some(Body::Wipe(w)) => self.wipe(cmd, bytes, w.force || recovering).await,
            Some(Body::Reboot(_)) => self.reboot(cmd, bytes).await,
            Some(Body::CollectLogs(c)) => self.collect_logs(cmd, bytes, c).await,
            Some(Body::SoftwareUpdate(u)) => self.software_update(cmd, bytes, u).await,
            Some(Body::RollbackUpdate(rb)) => self.rollback_update(cmd, bytes, rb).await,
            // Verification refuses a missing body; a lease never reaches here.
            Some(Body::Lease(_)) | None => {}
        }
    }

    /// Records a valid contact now (lazily persisted: losing it only makes the lease
    /// stricter).
    async fn renew_contact(&mut self, now: u64) {
        self.last_contact_ms = now;
        if let Err(e) =
            state::blocking(&self.state, move |s| s.apply(Changes::lazy().contact(now))).await
        {
            warn!(error = %e, "cannot record the contact time");
        }
    }

    /// Sets the lock (already persisted) in memory and in the live status.
    fn set_lock(&mut self, lock: LockRecord) {
        self.live.update(|s| {
            s.locked = lock.locked;
            s.lock_reason = lock.reason.clone();
            s.lock_generation = lock.generation;
        });
        self.lock = lock;
    }

    fn set_config(&mut self, config: AppliedConfig) {
        self.live.update(|s| {
            s.config_version = config.version;
            s.config = Arc::new(config.document.clone());
        });
        self.config = config;
    }

    /// Common environment of every hook.
    fn hook_env(&self) -> Vec<(&'static str, String)> {
        vec![("POSFLEET_DEVICE_ID", self.id.to_string())]
    }

    /// When the offline lease expires, if it can (unlocked, lease enabled).
    fn lease_deadline(&self) -> Option<tokio::time::Instant> {
        if self.lock.locked {
            return None;
        }
        let max = max_offline(&self.settings, &self.config)?;
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        let due_ms = self.last_contact_ms.saturating_add(max_ms);
        let left = Duration::from_millis(due_ms.saturating_sub(now_ms()));
        Some(tokio::time::Instant::now() + left)
    }
}

fn kind_name(cmd: &pb::Command) -> &'static str {
    match &cmd.body {
        Some(Body::ConfigPush(_)) => "config_push",
        Some(Body::Lock(_)) => "lock",
        Some(Body::Unlock(_)) => "unlock",
        Some(Body::Wipe(_)) => "wipe",
        Some(Body::Reboot(_)) => "reboot",
        Some(Body::CollectLogs(_)) => "collect_logs",
        Some(Body::SoftwareUpdate(_)) => "software_update",
        Some(Body::RollbackUpdate(_)) => "rollback_update",
        Some(Body::Lease(_)) => "lease",
        None => "unknown",
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
