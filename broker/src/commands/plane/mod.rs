//! The command plane's worker: the one task that changes commands and desired lock state
//! (storage rule 4: it is the store's only committer). It takes messages from ingest and the
//! API through one bounded queue, ticks for expiry and re-sends, and wakes on configuration
//! changes. Each round applies everything it took to its in-memory state, commits the
//! changed records and new commands as one durable batch, and only then answers the API,
//! announces new commands and publishes them. Desired state (reconciliation, configuration
//! pushes, leases) is in `reconcile.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::signing::{CommandKey, new_command_id};
use posfleet_proto::{DeviceId, pb};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::downlink::{Downlink, DownlinkError};
use super::handle::{Action, CancelError, CreateError, CreateRequest, IssueCommand, Shared};
use super::logs;
use super::record::{apply_result, new_command, to_wire, transition};
use super::store::{Changes, CommandStore};
use super::{AUTHOR_RECONCILER, CommandsConfig};
use crate::controller::Clock;
use crate::events::EventBus;
use crate::fleetconfig::ConfigSource;
use crate::metrics::{Metrics, ReasonLabel, StatusLabel};
use crate::registry::Registry;
use crate::views::{
    CommandBody, CommandState, CommandView, DesiredLockView, FleetEvent, ReportedView,
};

/// Messages taken per round before committing.
const MAX_ROUND: usize = 512;

mod reconcile;

#[cfg(test)]
pub(super) use reconcile::push_backoff;
use reconcile::{PushFailure, lock_body};

/// What the worker is told.
#[derive(Debug)]
pub(crate) enum Msg {
    /// A CommandResult from `device`.
    Result {
        device: DeviceId,
        result: pb::CommandResult,
        at_ms: u64,
    },
    /// A heartbeat (`heartbeat = true`) or ReportedState from `device`.
    Observed {
        device: DeviceId,
        reported: ReportedView,
        heartbeat: bool,
    },
    /// A Presence ONLINE of `device`.
    Online { device: DeviceId },
    /// A LogChunk from `device`.
    Log {
        device: DeviceId,
        chunk: pb::LogChunk,
    },
    /// API: create commands.
    Create {
        req: CreateRequest,
        reply: oneshot::Sender<Result<Vec<CommandView>, CreateError>>,
    },
    /// Rollouts: create commands with the given ids.
    Issue {
        commands: Vec<IssueCommand>,
        author: String,
        ttl: Duration,
        reply: oneshot::Sender<Result<Vec<CommandView>, CreateError>>,
    },
    /// Rollouts: cancel these commands (those still live).
    CancelMany {
        ids: Vec<String>,
        why: String,
        reply: oneshot::Sender<Result<usize, CancelError>>,
    },
    /// API: cancel a command.
    Cancel {
        id: String,
        reply: oneshot::Sender<Result<CommandView, CancelError>>,
    },
}

/// What the worker needs besides its queue.
pub(crate) struct Deps {
    pub cfg: CommandsConfig,
    pub store: Arc<CommandStore>,
    pub shared: Arc<Shared>,
    pub key: Arc<CommandKey>,
    pub downlink: Arc<dyn Downlink>,
    pub registry: Arc<Registry>,
    pub config: Arc<dyn ConfigSource>,
    pub events: EventBus,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
}

/// A create waiting for its commit.
struct PendingReply {
    reply: oneshot::Sender<Result<Vec<CommandView>, CreateError>>,
    commands: Vec<CommandView>,
}

pub(crate) struct Plane {
    d: Deps,
    /// Commands not final yet, by id.
    live: HashMap<String, CommandView>,
    /// Live command ids per device.
    by_device: HashMap<DeviceId, BTreeSet<String>>,
    /// (not_after_ms, id) of live commands, for expiry.
    expiry: BTreeSet<(u64, String)>,
    /// What each device last reported (since this start).
    reported: HashMap<DeviceId, ReportedView>,
    /// When each device last got a lease.
    last_lease: HashMap<DeviceId, u64>,
    /// The effective configuration version last seen per device.
    effective: HashMap<DeviceId, u64>,
    /// The last configuration version each device failed to apply (since this start;
    /// removed when a push succeeds).
    push_failures: HashMap<DeviceId, PushFailure>,
    /// Changed records to write in this round.
    dirty: BTreeMap<String, CommandView>,
    /// New commands (not durable yet) per device, and the desired lock changes with them.
    pending: HashMap<DeviceId, Vec<CommandView>>,
    pending_desired: BTreeMap<DeviceId, DesiredLockView>,
    replies: Vec<PendingReply>,
    cancels: Vec<(
        oneshot::Sender<Result<CommandView, CancelError>>,
        CommandView,
    )>,
    /// Bulk cancellations waiting for the commit, with how many they cancelled.
    bulk_cancels: Vec<(oneshot::Sender<Result<usize, CancelError>>, usize)>,
}

impl Plane {
    pub(crate) fn new(d: Deps, live: Vec<CommandView>) -> Self {
        let mut plane = Self {
            d,
            live: HashMap::new(),
            by_device: HashMap::new(),
            expiry: BTreeSet::new(),
            reported: HashMap::new(),
            last_lease: HashMap::new(),
            effective: HashMap::new(),
            push_failures: HashMap::new(),
            dirty: BTreeMap::new(),
            pending: HashMap::new(),
            pending_desired: BTreeMap::new(),
            replies: Vec::new(),
            cancels: Vec::new(),
            bulk_cancels: Vec::new(),
        };
        for cmd in live {
            plane.insert_live(cmd);
        }
        plane
    }

    /// Runs until `cancel`, then commits what is left.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) {
        let mut changes = Some(self.d.config.changes());
        let mut tick = interval(self.d.cfg.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.prime_effective();
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.handle(msg, &tracker).await;
                    for _ in 0..MAX_ROUND {
                        match rx.try_recv() {
                            Ok(msg) => self.handle(msg, &tracker).await,
                            Err(_) => break,
                        }
                    }
                }
                changed = wait_changed(&mut changes) => {
                    if changed {
                        self.config_changed();
                    } else {
                        warn!("the configuration store stopped announcing changes");
                        changes = None;
                    }
                }
                _ = tick.tick() => self.tick(),
            }
            self.commit(&tracker).await;
        }
        rx.close();
        self.commit(&tracker).await;
        info!(live = self.live.len(), "command plane stopped");
    }

    async fn handle(&mut self, msg: Msg, tracker: &TaskTracker) {
        let now = (self.d.clock)();
        match msg {
            Msg::Result {
                device,
                result,
                at_ms,
            } => self.on_result(&device, &result, at_ms),
            Msg::Observed {
                device,
                reported,
                heartbeat,
            } => {
                self.reported.insert(device.clone(), reported);
                self.reconcile(&device, now);
                let due = self
                    .last_lease
                    .get(&device)
                    .is_none_or(|t| now.saturating_sub(*t) >= ms(self.d.cfg.lease_interval));
                if heartbeat && due {
                    self.lease(&device, now);
                }
            }
            Msg::Online { device } => {
                self.lease(&device, now);
                let ids: Vec<String> = self
                    .by_device
                    .get(&device)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                for id in ids {
                    if self.send(&id, now) == Err(DownlinkError::Busy) {
                        break;
                    }
                }
                self.reconcile(&device, now);
            }
            Msg::Log { device, chunk } => self.on_log(&device, chunk, tracker).await,
            Msg::Create { req, reply } => self.on_create(req, reply, now),
            Msg::Issue {
                commands,
                author,
                ttl,
                reply,
            } => self.on_issue(commands, &author, ttl, reply, now),
            Msg::Cancel { id, reply } => self.on_cancel(&id, reply, now),
            Msg::CancelMany { ids, why, reply } => {
                let mut n = 0;
                for id in ids {
                    let Some(cmd) = self.live.get_mut(&id) else {
                        continue;
                    };
                    if matches!(
                        cmd.body,
                        CommandBody::Lock { .. } | CommandBody::Unlock { .. }
                    ) || transition(cmd, CommandState::Cancelled, now).is_err()
                    {
                        continue;
                    }
                    cmd.message.clone_from(&why);
                    let cmd = cmd.clone();
                    self.count_status(CommandState::Cancelled);
                    self.changed(cmd);
                    n += 1;
                }
                self.bulk_cancels.push((reply, n));
            }
        }
    }

    fn on_result(&mut self, device: &DeviceId, result: &pb::CommandResult, at_ms: u64) {
        let Some(cmd) = self.live.get_mut(&result.command_id) else {
            return self.drop_result(device, "unknown_or_final");
        };
        if cmd.device_id != device.as_str() {
            return self.drop_result(device, "wrong_device");
        }
        let before = cmd.status;
        match apply_result(cmd, result, at_ms) {
            Err(e) => self.drop_result(device, e.reason()),
            Ok(false) => {}
            Ok(true) => {
                let cmd = cmd.clone();
                if cmd.status != before {
                    self.count_status(cmd.status);
                    self.note_push_outcome(device, &cmd);
                }
                self.changed(cmd);
            }
        }
    }

    fn drop_result(&self, device: &DeviceId, reason: &'static str) {
        debug!(device_id = %device, reason, "command result dropped");
        self.d
            .metrics
            .command_results_dropped_total
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    async fn on_log(&mut self, device: &DeviceId, chunk: pb::LogChunk, tracker: &TaskTracker) {
        let refuse = |reason: &'static str| {
            warn!(device_id = %device, reason, "log chunk refused");
            self.d
                .metrics
                .command_log_chunks_refused_total
                .get_or_create(&ReasonLabel { reason })
                .inc();
        };
        let Some(cmd) = self.live.get(&chunk.command_id) else {
            return refuse("unknown_or_final");
        };
        if cmd.device_id != device.as_str() {
            return refuse("wrong_device");
        }
        let CommandBody::CollectLogs { max_bytes, .. } = cmd.body else {
            return refuse("not_logs");
        };
        let end = chunk.offset.saturating_add(chunk.data.len() as u64);
        if end > u64::from(max_bytes) || chunk.total_bytes > u64::from(max_bytes) {
            return refuse("too_large");
        }
        if chunk.offset != cmd.log_bytes.unwrap_or(0) || cmd.logs_complete {
            return refuse("out_of_order");
        }
        let Some(file) = logs::path(&self.d.cfg.logs_dir, &cmd.id) else {
            return refuse("bad_id");
        };
        let (offset, last) = (chunk.offset, chunk.last);
        let written = tracker
            .spawn_blocking(move || logs::write_chunk(&file, offset, &chunk.data, last))
            .await;
        match written {
            Ok(Ok(len)) => {
                if let Some(cmd) = self.live.get_mut(&chunk.command_id) {
                    cmd.log_bytes = Some(len);
                    cmd.logs_complete = last;
                    let cmd = cmd.clone();
                    self.dirty.insert(cmd.id.clone(), cmd);
                }
            }
            Ok(Err(e)) => {
                error!(error = %e, command_id = %chunk.command_id, "cannot write a log chunk");
                refuse("io");
            }
            Err(e) => {
                error!(error = %e, "log chunk writer failed");
                refuse("io");
            }
        }
    }

    fn on_create(
        &mut self,
        req: CreateRequest,
        reply: oneshot::Sender<Result<Vec<CommandView>, CreateError>>,
        now: u64,
    ) {
        let not_after = now.saturating_add(ms(req.ttl));
        let mut commands = Vec::with_capacity(req.devices.len());
        for device in &req.devices {
            let body = match &req.action {
                Action::Lock { reason } | Action::Unlock { reason } => {
                    let locked = matches!(req.action, Action::Lock { .. });
                    let generation = self.generation(device) + 1;
                    self.pending_desired.insert(
                        device.clone(),
                        DesiredLockView {
                            locked,
                            reason: reason.clone(),
                            generation,
                            author: req.author.clone(),
                            changed_at_ms: now,
                        },
                    );
                    lock_body(locked, reason.clone(), generation)
                }
                Action::Reboot => CommandBody::Reboot {},
                Action::Wipe { force } => CommandBody::Wipe { force: *force },
                Action::CollectLogs {
                    since_ms,
                    max_bytes,
                } => CommandBody::CollectLogs {
                    since_ms: *since_ms,
                    max_bytes: *max_bytes,
                },
            };
            let cmd = new_command(
                new_command_id(),
                device.as_str(),
                body,
                &req.author,
                now,
                not_after,
            );
            self.pending
                .entry(device.clone())
                .or_default()
                .push(cmd.clone());
            commands.push(cmd);
        }
        self.replies.push(PendingReply { reply, commands });
    }

    fn on_issue(
        &mut self,
        requested: Vec<IssueCommand>,
        author: &str,
        ttl: Duration,
        reply: oneshot::Sender<Result<Vec<CommandView>, CreateError>>,
        now: u64,
    ) {
        let not_after = now.saturating_add(ms(ttl));
        let mut commands = Vec::with_capacity(requested.len());
        for c in requested {
            let pending = self
                .pending
                .get(&c.device)
                .is_some_and(|p| p.iter().any(|p| p.id == c.id));
            if self.live.contains_key(&c.id) || pending {
                continue;
            }
            let cmd = new_command(c.id, c.device.as_str(), c.body, author, now, not_after);
            self.pending.entry(c.device).or_default().push(cmd.clone());
            commands.push(cmd);
        }
        self.replies.push(PendingReply { reply, commands });
    }

    fn on_cancel(
        &mut self,
        id: &str,
        reply: oneshot::Sender<Result<CommandView, CancelError>>,
        now: u64,
    ) {
        let Some(cmd) = self.live.get_mut(id) else {
            let _ = reply.send(Err(CancelError::Final));
            return;
        };
        if matches!(
            cmd.body,
            CommandBody::Lock { .. } | CommandBody::Unlock { .. }
        ) {
            let _ = reply.send(Err(CancelError::LockUnlock));
            return;
        }
        if transition(cmd, CommandState::Cancelled, now).is_err() {
            let _ = reply.send(Err(CancelError::Final));
            return;
        }
        cmd.message = "cancelled by an operator".to_owned();
        let cmd = cmd.clone();
        self.count_status(CommandState::Cancelled);
        self.changed(cmd.clone());
        self.cancels.push((reply, cmd));
    }

    /// A new command by the reconciler (committed, then sent, at the end of the round).
    fn issue(&mut self, device: &DeviceId, body: CommandBody, now: u64) -> String {
        let not_after = now.saturating_add(ms(self.d.cfg.default_ttl));
        let cmd = new_command(
            new_command_id(),
            device.as_str(),
            body,
            AUTHOR_RECONCILER,
            now,
            not_after,
        );
        info!(device_id = %device, command_id = %cmd.id, kind = cmd.body.kind(), "reconciler issued a command");
        let id = cmd.id.clone();
        self.pending.entry(device.clone()).or_default().push(cmd);
        id
    }

    /// Expires what is past its validity and re-sends, within the per-tick budget, what
    /// online devices have not acknowledged for `resend_interval`.
    fn tick(&mut self) {
        let now = (self.d.clock)();
        while let Some((not_after, id)) = self.expiry.first().cloned() {
            if not_after >= now {
                break;
            }
            self.expiry.pop_first();
            if let Some(cmd) = self.live.get_mut(&id) {
                if transition(cmd, CommandState::Expired, now).is_ok() {
                    cmd.message = "not completed before its validity ended".to_owned();
                    let cmd = cmd.clone();
                    self.count_status(CommandState::Expired);
                    self.changed(cmd);
                }
            }
        }
        let resend = ms(self.d.cfg.resend_interval);
        let due: Vec<String> = self
            .live
            .values()
            .filter(|c| {
                c.last_sent_at_ms
                    .is_none_or(|t| now.saturating_sub(t) >= resend)
            })
            .filter(|c| {
                DeviceId::new(c.device_id.as_str()).is_ok_and(|d| self.d.registry.is_online(&d))
            })
            .take(self.d.cfg.max_sends_per_tick)
            .map(|c| c.id.clone())
            .collect();
        for id in due {
            if self.send(&id, now) == Err(DownlinkError::Busy) {
                break;
            }
        }
        self.d
            .metrics
            .commands_live
            .set(i64::try_from(self.live.len()).unwrap_or(i64::MAX));
    }

    /// Signs and queues a live command. A command that can never be sent fails.
    fn send(&mut self, id: &str, now: u64) -> Result<(), DownlinkError> {
        let Some(cmd) = self.live.get_mut(id) else {
            return Ok(());
        };
        let Ok(device) = DeviceId::new(cmd.device_id.as_str()) else {
            return Ok(());
        };
        let signed = self.d.key.sign(&to_wire(cmd));
        match self.d.downlink.send(&device, &signed) {
            Ok(()) => {
                cmd.attempts = cmd.attempts.saturating_add(1);
                cmd.last_sent_at_ms = Some(now);
                let cmd = cmd.clone();
                self.d.metrics.commands_sent_total.inc();
                self.dirty.insert(cmd.id.clone(), cmd);
                Ok(())
            }
            Err(DownlinkError::Busy) => Err(DownlinkError::Busy),
            Err(DownlinkError::Unsendable(why)) => {
                warn!(command_id = %id, error = %why, "command cannot be sent; failing it");
                if transition(cmd, CommandState::Failed, now).is_ok() {
                    cmd.message = format!("cannot be sent: {why}");
                    let cmd = cmd.clone();
                    self.count_status(CommandState::Failed);
                    self.changed(cmd);
                }
                Err(DownlinkError::Unsendable(why))
            }
        }
    }

    /// Records a changed command: written this round, announced, out of the live set once
    /// final.
    fn changed(&mut self, cmd: CommandView) {
        self.announce(&cmd);
        if cmd.status.is_final() {
            self.remove_live(&cmd.id);
        } else if let Some(live) = self.live.get_mut(&cmd.id) {
            *live = cmd.clone();
        }
        self.dirty.insert(cmd.id.clone(), cmd);
    }

    fn announce(&self, cmd: &CommandView) {
        self.d.events.publish(FleetEvent::Command {
            id: cmd.id.clone(),
            device_id: cmd.device_id.clone(),
            kind: cmd.body.kind().to_owned(),
            status: cmd.status,
            progress_percent: cmd.progress_percent,
            message: cmd.message.clone(),
        });
    }

    fn count_status(&self, status: CommandState) {
        self.d
            .metrics
            .commands_status_total
            .get_or_create(&StatusLabel {
                status: status.name(),
            })
            .inc();
    }

    fn insert_live(&mut self, cmd: CommandView) {
        if let Ok(device) = DeviceId::new(cmd.device_id.as_str()) {
            self.by_device
                .entry(device)
                .or_default()
                .insert(cmd.id.clone());
        }
        self.expiry.insert((cmd.not_after_ms, cmd.id.clone()));
        self.live.insert(cmd.id.clone(), cmd);
    }

    fn remove_live(&mut self, id: &str) {
        if let Some(cmd) = self.live.remove(id) {
            self.expiry.remove(&(cmd.not_after_ms, cmd.id.clone()));
            if let Ok(device) = DeviceId::new(cmd.device_id.as_str()) {
                if let Some(ids) = self.by_device.get_mut(&device) {
                    ids.remove(id);
                    if ids.is_empty() {
                        self.by_device.remove(&device);
                    }
                }
            }
        }
    }

    /// Commits this round's changes durably, then answers, announces and sends.
    async fn commit(&mut self, tracker: &TaskTracker) {
        if self.dirty.is_empty() && self.pending.is_empty() && self.pending_desired.is_empty() {
            self.answer_cancels(true);
            return;
        }
        let pending: Vec<CommandView> = std::mem::take(&mut self.pending)
            .into_values()
            .flatten()
            .collect();
        let desired = std::mem::take(&mut self.pending_desired);
        let changes = Changes {
            commands: self
                .dirty
                .values()
                .map(|c| (c.clone(), false))
                .chain(pending.iter().map(|c| (c.clone(), true)))
                .collect(),
            desired: desired
                .iter()
                .map(|(d, l)| (d.clone(), l.clone()))
                .collect(),
        };
        let store = Arc::clone(&self.d.store);
        // flush + fsync block for milliseconds: on a tracked blocking thread.
        let result = tracker.spawn_blocking(move || store.commit(&changes)).await;
        let ok = match result {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                error!(error = %e, "command store commit failed; changes are retried, new commands refused");
                false
            }
            Err(e) => {
                error!(error = %e, "command store commit task failed");
                false
            }
        };
        self.answer_cancels(ok);
        if !ok {
            for r in self.replies.drain(..) {
                let _ = r.reply.send(Err(CreateError::Store));
            }
            return;
        }
        self.dirty.clear();
        self.d.shared.set_desired(desired);
        let now = (self.d.clock)();
        for cmd in pending {
            self.count_status(CommandState::Queued);
            self.announce(&cmd);
            let id = cmd.id.clone();
            let device = DeviceId::new(cmd.device_id.as_str()).ok();
            self.insert_live(cmd);
            if device.is_some_and(|d| self.d.registry.is_online(&d)) {
                // Busy: the next tick re-sends it (it has never been sent).
                let _ = self.send(&id, now);
            }
        }
        for r in self.replies.drain(..) {
            let _ = r.reply.send(Ok(r.commands));
        }
        // The sends above changed attempts/last_sent: written next round.
    }

    fn answer_cancels(&mut self, ok: bool) {
        for (reply, cmd) in self.cancels.drain(..) {
            let _ = reply.send(if ok { Ok(cmd) } else { Err(CancelError::Store) });
        }
        for (reply, n) in self.bulk_cancels.drain(..) {
            let _ = reply.send(if ok { Ok(n) } else { Err(CancelError::Store) });
        }
    }
}

/// Waits for the next configuration change; `false` once the store is gone (then never
/// resolves again, as `changes` is set to `None`).
async fn wait_changed(changes: &mut Option<watch::Receiver<u64>>) -> bool {
    match changes {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
