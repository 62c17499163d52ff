//! The rollout engine: the one task that changes rollouts (storage rule 4: the store's only
//! committer). Every `tick`, and soon after a command of a rollout changes status, it runs a
//! round: refresh a bounded number of command statuses from the command store, evaluate the
//! payment gate where due, decide (rules.rs), commit what changed durably, and only then
//! issue (or cancel) commands through the command plane and publish the views.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use posfleet_proto::DeviceId;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::gate::{self, GateInput};
use super::model::StoredRollout;
use super::rules::{Live, Member};
use super::store::Changes;
use super::{Control, ControlError, CreateRolloutError, Deps, NewRollout, build_view, new_live};
use crate::commands::IssueCommand;
use crate::metrics::StatusLabel;
use crate::views::{CommandBody, CommandState, CommandView, FleetEvent, RolloutState, RolloutView};

/// Author of the commands rollouts issue.
pub const AUTHOR_ROLLOUT: &str = "rollout";

/// What the engine is told.
pub(crate) enum Msg {
    Create {
        req: Box<NewRollout>,
        reply: oneshot::Sender<Result<RolloutView, CreateRolloutError>>,
    },
    Control {
        id: String,
        action: Control,
        reply: oneshot::Sender<Result<RolloutView, ControlError>>,
    },
}

pub(crate) struct Engine {
    d: Deps,
    /// Rollouts with work left, by id.
    live: BTreeMap<String, Live>,
    /// Command id → (rollout id, member index, is a rollback).
    index: HashMap<String, (String, u32, bool)>,
    /// A command of a rollout changed since the last round.
    woken: bool,
    last_round: Instant,
    /// Blocking store work runs as tracked tasks, so shutdown waits for it.
    tracker: TaskTracker,
}

impl Engine {
    pub(crate) fn new(d: Deps, live: Vec<Live>, tracker: TaskTracker) -> Self {
        let mut e = Self {
            tracker,
            d,
            live: BTreeMap::new(),
            index: HashMap::new(),
            woken: false,
            last_round: Instant::now(),
        };
        for l in live {
            e.insert(l);
        }
        e
    }

    fn insert(&mut self, l: Live) {
        for (i, m) in l.m.iter().enumerate() {
            if let Some(id) = &m.s.update_id {
                self.index
                    .insert(id.clone(), (l.r.id.clone(), i as u32, false));
            }
            if let Some(id) = &m.s.rollback_id {
                self.index
                    .insert(id.clone(), (l.r.id.clone(), i as u32, true));
            }
        }
        self.d.shared.put(build_view(&l.r));
        self.live.insert(l.r.id.clone(), l);
    }

    /// Runs until `cancel`.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        let mut tick = interval(self.d.cfg.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut events = self.d.events.subscribe();
        let debounce = self.d.cfg.tick / 10;
        self.backfill_min_version().await;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.handle(msg).await;
                    self.round().await;
                }
                _ = tick.tick() => self.round().await,
                ev = events.recv() => match ev {
                    Some(FleetEvent::Command { id, status, .. }) => self.on_status(&id, status),
                    Some(_) => {}
                    None => break,
                },
            }
            if self.woken && self.last_round.elapsed() >= debounce {
                self.round().await;
            }
        }
        info!(live = self.live.len(), "rollout engine stopped");
    }

    /// Rollouts stored before the artifact's `min_version` was copied into the record get
    /// it from the catalog, so their later waves skip terminals below it too.
    async fn backfill_min_version(&mut self) {
        let wanted: Vec<(String, String)> = self
            .live
            .values()
            .filter(|l| l.r.artifact.min_version.is_none())
            .map(|l| (l.r.id.clone(), l.r.artifact.id.clone()))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let catalog = self.d.catalog.clone();
        let found = self
            .tracker
            .spawn_blocking(move || {
                wanted
                    .into_iter()
                    .filter_map(|(rollout, artifact)| {
                        Some((rollout, catalog.get(&artifact)?.min_version?))
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        let Ok(found) = found else {
            warn!("cannot read the artifact catalog; min_version not backfilled");
            return;
        };
        for (id, min) in found {
            if let Some(l) = self.live.get_mut(&id) {
                info!(rollout_id = %id, min_version = %min, "rollout record gets the artifact's min_version");
                l.r.artifact.min_version = Some(min);
                l.dirty = true;
            }
        }
    }

    fn on_status(&mut self, id: &str, status: CommandState) {
        let Some((rid, idx, rollback)) = self.index.get(id) else {
            return;
        };
        let now = (self.d.clock)();
        if let Some(m) = self
            .live
            .get_mut(rid)
            .and_then(|l| l.m.get_mut(*idx as usize))
        {
            set_status(m, *rollback, status, now);
            self.woken = true;
        }
    }

    async fn handle(&mut self, msg: Msg) {
        let now = (self.d.clock)();
        match msg {
            Msg::Create { req, reply } => {
                let mut live = new_live(*req, now);
                live.start_wave(0, now, &self.d.registry);
                live.recount();
                let id = live.r.id.clone();
                if let Err(e) = self.commit_one(&mut live).await {
                    error!(error = %e, "cannot store a new rollout");
                    let _ = reply.send(Err(CreateRolloutError::Store));
                    return;
                }
                info!(rollout_id = %id, members = live.r.members, waves = live.r.waves.len(), "rollout created");
                self.announce(&mut live, now);
                let view = build_view(&live.r);
                self.insert(live);
                let _ = reply.send(Ok(view));
            }
            Msg::Control { id, action, reply } => {
                let _ = reply.send(self.control(&id, action, now).await);
            }
        }
    }

    async fn control(
        &mut self,
        id: &str,
        action: Control,
        now: u64,
    ) -> Result<RolloutView, ControlError> {
        let Some(mut live) = self.live.remove(id) else {
            return match self.d.shared.get(id) {
                Some(v) => Err(ControlError::NotApplicable(v.state.name())),
                None => Err(ControlError::NotFound),
            };
        };
        let before = live.r.clone();
        let state = live.r.state.clone();
        let result = match (action, &state) {
            (
                Control::Pause,
                RolloutState::Running { wave } | RolloutState::Soaking { wave, .. },
            ) => {
                live.r.state = RolloutState::Paused { wave: *wave };
                live.notes.push("paused by an operator".into());
                Ok(())
            }
            (Control::Resume, RolloutState::Paused { wave }) => {
                live.r.state = RolloutState::Running { wave: *wave };
                live.notes.push("resumed by an operator".into());
                Ok(())
            }
            (Control::Abort { reason }, s) if !s.is_final() => {
                live.abort(format!("aborted by an operator: {reason}"), now);
                Ok(())
            }
            _ => Err(ControlError::NotApplicable(state.name())),
        };
        if let Err(e) = result {
            self.live.insert(id.to_owned(), live);
            return Err(e);
        }
        live.dirty = true;
        live.recount();
        if let Err(e) = self.commit_one(&mut live).await {
            error!(error = %e, rollout_id = %id, "cannot store a rollout change");
            // Nothing changed: put the previous record back.
            live.r = before;
            live.notes.clear();
            self.live.insert(id.to_owned(), live);
            return Err(ControlError::Store);
        }
        self.announce(&mut live, now);
        for (i, m) in live.m.iter().enumerate() {
            if let Some(rb) = &m.s.rollback_id {
                self.index
                    .insert(rb.clone(), (id.to_owned(), i as u32, true));
            }
        }
        let view = build_view(&live.r);
        self.d.shared.put(view.clone());
        self.live.insert(id.to_owned(), live);
        Ok(view)
    }

    /// One round over every live rollout.
    async fn round(&mut self) {
        self.woken = false;
        self.last_round = Instant::now();
        self.refresh().await;
        let now = (self.d.clock)();
        let interval_ms = ms(self.d.cfg.gate_interval);
        let mut inputs: Vec<(String, GateInput)> = Vec::new();
        for l in self.live.values_mut() {
            l.recount();
            // Mark the threshold before deciding whether a gate is due, so a wave that
            // reaches it this round gets its gate evaluated this round.
            if let Some(i) = l.wave_index() {
                let w = &l.r.waves[i];
                let reached = w.started_at_ms.is_some()
                    && w.eligible() > 0
                    && f64::from(w.counts.succeeded) / f64::from(w.eligible())
                        >= l.r.success_threshold;
                if reached && w.threshold_reached_at_ms.is_none() && w.outcome.is_none() {
                    l.r.waves[i].threshold_reached_at_ms = Some(now);
                    l.dirty = true;
                }
            }
            if l.needs_gate(now, interval_ms) {
                if let Some(input) = l.gate_input() {
                    inputs.push((l.r.id.clone(), input));
                }
            }
        }
        if !inputs.is_empty() {
            let (tx, registry) = (self.d.tx.clone(), self.d.registry.clone());
            let figures = self
                .tracker
                .spawn_blocking(move || {
                    inputs
                        .into_iter()
                        .map(|(id, input)| (id, gate::evaluate(&tx, &registry, &input, now)))
                        .collect::<Vec<_>>()
                })
                .await;
            match figures {
                Ok(figures) => {
                    for (id, f) in figures {
                        if let Some(l) = self.live.get_mut(&id) {
                            if let Some(i) = l.wave_index() {
                                l.r.waves[i].gate = Some(f);
                                l.dirty = true;
                            }
                        }
                    }
                }
                Err(e) => error!(error = %e, "health gate evaluation failed"),
            }
        }
        let mut ended = Vec::new();
        for l in self.live.values_mut() {
            let out = l.decide(now, &self.d.registry);
            ended.extend(out.waves_ended);
            l.recount();
        }
        for o in ended {
            let outcome = match o {
                crate::views::WaveOutcome::Passed => "passed",
                crate::views::WaveOutcome::Failed => "failed",
            };
            self.d
                .metrics
                .rollout_waves_total
                .get_or_create(&StatusLabel { status: outcome })
                .inc();
        }
        if !self.commit_all(now).await {
            // Nothing is issued before it is durable; the next round retries.
            return;
        }
        self.issue(now).await;
        self.publish(now);
        self.d.shared.round_done();
    }

    /// Reads, within the per-round budget, the status of commands not known to be final.
    async fn refresh(&mut self) {
        let budget = self.d.cfg.refresh_per_round;
        let mut wanted: Vec<String> = Vec::new();
        for l in self.live.values_mut() {
            let n = l.m.len();
            if n == 0 {
                continue;
            }
            let issued = |idx: usize| {
                l.r.waves
                    .iter()
                    .any(|w| w.issued && (w.start as usize..w.end as usize).contains(&idx))
            };
            let rb_issued = l.r.rollback.as_ref().is_some_and(|rb| rb.issued);
            let mut scanned = 0;
            while scanned < n && wanted.len() < budget {
                let idx = (l.refresh_cursor + scanned) % n;
                let m = &l.m[idx];
                if issued(idx) && !m.update.is_some_and(CommandState::is_final) {
                    if let Some(id) = &m.s.update_id {
                        wanted.push(id.clone());
                    }
                }
                if rb_issued && !m.rollback.is_some_and(CommandState::is_final) {
                    if let Some(id) = &m.s.rollback_id {
                        wanted.push(id.clone());
                    }
                }
                scanned += 1;
            }
            l.refresh_cursor = (l.refresh_cursor + scanned) % n;
        }
        if wanted.is_empty() {
            return;
        }
        let store = self.d.commands.store().clone();
        let read = self
            .tracker
            .spawn_blocking(move || {
                wanted
                    .into_iter()
                    .filter_map(|id| store.get(&id).ok().flatten())
                    .collect::<Vec<CommandView>>()
            })
            .await;
        let Ok(found) = read else {
            return;
        };
        for cmd in found {
            self.apply_view(&cmd);
        }
    }

    fn apply_view(&mut self, cmd: &CommandView) {
        let Some((rid, idx, rollback)) = self.index.get(&cmd.id) else {
            return;
        };
        if let Some(m) = self
            .live
            .get_mut(rid)
            .and_then(|l| l.m.get_mut(*idx as usize))
        {
            let at = succeeded_at(cmd).unwrap_or(cmd.created_at_ms);
            set_status(m, *rollback, cmd.status, at);
        }
    }

    /// Commits every dirty rollout in one batch. False if it failed.
    async fn commit_all(&mut self, now: u64) -> bool {
        let mut changes = Changes::default();
        for l in self.live.values_mut() {
            collect(l, now, &mut changes);
        }
        if changes.is_empty() {
            return true;
        }
        let store = self.d.store.clone();
        let result = self
            .tracker
            .spawn_blocking(move || store.commit(&changes))
            .await;
        match result {
            Ok(Ok(())) => {
                for l in self.live.values_mut() {
                    l.dirty = false;
                    l.dirty_members.clear();
                }
                for l in self.live.values_mut() {
                    if !l.notes.is_empty() {
                        announce_notes(&self.d.events, l, now);
                    }
                }
                // Rollback ids chosen this round.
                let mut new_index = Vec::new();
                for l in self.live.values() {
                    for (i, m) in l.m.iter().enumerate() {
                        if let Some(rb) = &m.s.rollback_id {
                            if !self.index.contains_key(rb) {
                                new_index.push((rb.clone(), (l.r.id.clone(), i as u32, true)));
                            }
                        }
                        if let Some(up) = &m.s.update_id {
                            if !self.index.contains_key(up) {
                                new_index.push((up.clone(), (l.r.id.clone(), i as u32, false)));
                            }
                        }
                    }
                }
                self.index.extend(new_index);
                true
            }
            Ok(Err(e)) => {
                error!(error = %e, "rollout store commit failed; retried next round");
                false
            }
            Err(e) => {
                error!(error = %e, "rollout store commit task failed");
                false
            }
        }
    }

    async fn commit_one(&self, l: &mut Live) -> Result<(), super::RolloutStoreError> {
        let now = (self.d.clock)();
        let mut changes = Changes::default();
        collect(l, now, &mut changes);
        let store = self.d.store.clone();
        let result = self
            .tracker
            .spawn_blocking(move || store.commit(&changes))
            .await
            .map_err(|e| super::RolloutStoreError::Io {
                path: std::path::PathBuf::from("rollouts"),
                source: std::io::Error::other(e.to_string()),
            })?;
        result?;
        l.dirty = false;
        l.dirty_members.clear();
        Ok(())
    }

    /// Issues what is durable but not yet with the command plane: a started wave's
    /// updates; an abort's cancellations and rollbacks. Ids already in the command store
    /// (a crash after issuing, before recording it) are not issued again.
    async fn issue(&mut self, now: u64) {
        let ids: Vec<String> = self.live.keys().cloned().collect();
        for id in ids {
            let Some(l) = self.live.get(&id) else {
                continue;
            };
            let wave = l.wave_index().filter(|i| {
                let w = &l.r.waves[*i];
                w.started_at_ms.is_some() && !w.issued && w.outcome.is_none()
            });
            let aborted = matches!(l.r.state, RolloutState::Aborted { .. });
            if let (Some(i), false) = (wave, aborted) {
                let url = self.d.catalog.download_url(&l.r.artifact.id);
                let a = &l.r.artifact;
                let w = &l.r.waves[i];
                let cmds: Vec<IssueCommand> = l.m[w.start as usize..w.end as usize]
                    .iter()
                    .filter_map(|m| {
                        Some(IssueCommand {
                            id: m.s.update_id.clone()?,
                            device: DeviceId::new(m.s.device.as_str()).ok()?,
                            body: CommandBody::SoftwareUpdate {
                                artifact_id: a.id.clone(),
                                version: a.version.clone(),
                                url: url.clone(),
                                size_bytes: a.size_bytes,
                                sha256: a.sha256.clone(),
                                release_signature: a.release_signature.clone(),
                                release_key_id: a.release_key_id.clone(),
                                component: a.component.clone(),
                                rollout_id: l.r.id.clone(),
                                confirm_timeout_s: l.r.confirm_timeout_s,
                                min_version: a.min_version.clone(),
                            },
                        })
                    })
                    .collect();
                let ttl = Duration::from_secs(l.r.wave_timeout_s.max(1));
                if self.issue_missing(cmds, ttl).await {
                    if let Some(l) = self.live.get_mut(&id) {
                        l.r.waves[i].issued = true;
                        l.dirty = true;
                    }
                }
                continue;
            }
            let Some(rb) = l.r.rollback.clone() else {
                continue;
            };
            if !rb.cancelled {
                let live_updates: Vec<String> =
                    l.m.iter()
                        .filter(|m| !m.update.is_some_and(CommandState::is_final))
                        .filter_map(|m| m.s.update_id.clone())
                        .collect();
                match self
                    .d
                    .commands
                    .cancel_many(live_updates, "the rollout was aborted")
                    .await
                {
                    Ok(n) => {
                        info!(rollout_id = %id, cancelled = n, "rollout updates cancelled");
                        if let Some(rb) = self.live.get_mut(&id).and_then(|l| l.r.rollback.as_mut())
                        {
                            rb.cancelled = true;
                        }
                        if let Some(l) = self.live.get_mut(&id) {
                            l.dirty = true;
                        }
                    }
                    Err(e) => {
                        warn!(rollout_id = %id, error = %e, "cannot cancel the rollout's updates; retried");
                        continue;
                    }
                }
            }
            let Some(l) = self.live.get(&id) else {
                continue;
            };
            if !rb.issued {
                let component = l.r.artifact.component.clone();
                let cmds: Vec<IssueCommand> =
                    l.m.iter()
                        .filter_map(|m| {
                            Some(IssueCommand {
                                id: m.s.rollback_id.clone()?,
                                device: DeviceId::new(m.s.device.as_str()).ok()?,
                                body: CommandBody::RollbackUpdate {
                                    rollout_id: l.r.id.clone(),
                                    component: component.clone(),
                                    to_version: m.s.prev_version.clone().unwrap_or_default(),
                                },
                            })
                        })
                        .collect();
                let ttl = self.d.cfg.rollback_ttl;
                if self.issue_missing(cmds, ttl).await {
                    if let Some(l) = self.live.get_mut(&id) {
                        if let Some(rb) = l.r.rollback.as_mut() {
                            rb.issued = true;
                        }
                        l.dirty = true;
                        l.recount();
                    }
                }
            }
        }
        let _ = now;
    }

    /// Issues the commands whose ids the command store does not hold yet. True when every
    /// one is with the plane.
    async fn issue_missing(&mut self, cmds: Vec<IssueCommand>, ttl: Duration) -> bool {
        if cmds.is_empty() {
            return true;
        }
        let store = self.d.commands.store().clone();
        let checked = self
            .tracker
            .spawn_blocking(move || {
                let mut missing = Vec::with_capacity(cmds.len());
                for c in cmds {
                    match store.get(&c.id) {
                        Ok(Some(_)) => {}
                        Ok(None) => missing.push(c),
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Ok(missing)
            })
            .await;
        let missing = match checked {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the command store; issuing retried");
                return false;
            }
            Err(e) => {
                warn!(error = %e, "command store read failed; issuing retried");
                return false;
            }
        };
        if missing.is_empty() {
            return true;
        }
        let n = missing.len();
        match self.d.commands.issue(missing, AUTHOR_ROLLOUT, ttl).await {
            Ok(created) => {
                for c in &created {
                    self.apply_view(c);
                }
                info!(commands = n, "rollout commands issued");
                true
            }
            Err(e) => {
                warn!(error = %e, "rollout commands not issued; retried next round");
                false
            }
        }
    }

    fn announce(&self, l: &mut Live, now: u64) {
        announce_notes(&self.d.events, l, now);
    }

    /// Publishes the views, updates the metrics, and lets go of finished rollouts.
    fn publish(&mut self, _now: u64) {
        let mut done = Vec::new();
        for (id, l) in &self.live {
            self.d.shared.put(build_view(&l.r));
            if l.finished() && !l.dirty {
                done.push(id.clone());
            }
        }
        for id in done {
            if let Some(l) = self.live.remove(&id) {
                for m in &l.m {
                    for c in [&m.s.update_id, &m.s.rollback_id].into_iter().flatten() {
                        self.index.remove(c);
                    }
                }
            }
        }
        self.d.shared.update_metrics(&self.d.metrics, &self.live);
    }
}

fn announce_notes(events: &crate::events::EventBus, l: &mut Live, now: u64) {
    for message in l.notes.drain(..) {
        events.publish(FleetEvent::Rollout {
            id: l.r.id.clone(),
            state: l.r.state.name().to_owned(),
            wave: l.r.state.wave(),
            message,
            at_ms: now,
        });
    }
}

/// Adds `l`'s dirty record and members to `changes`.
fn collect(l: &mut Live, now: u64, changes: &mut Changes) {
    if l.dirty || !l.dirty_members.is_empty() {
        l.r.updated_at_ms = now;
        changes.rollouts.push(l.r.clone());
    }
    for idx in &l.dirty_members {
        if let Some(m) = l.m.get(*idx as usize) {
            changes.members.push((l.r.id.clone(), *idx, m.s.clone()));
        }
    }
}

fn set_status(m: &mut Member, rollback: bool, status: CommandState, at: u64) {
    let slot = if rollback {
        &mut m.rollback
    } else {
        &mut m.update
    };
    if slot.is_some_and(|s| s.is_final() || s.rank() > status.rank()) {
        return;
    }
    *slot = Some(status);
    if !rollback && status == CommandState::Succeeded && m.succeeded_at_ms.is_none() {
        m.succeeded_at_ms = Some(at);
    }
}

/// When the command succeeded (its history).
pub(crate) fn succeeded_at(cmd: &CommandView) -> Option<u64> {
    cmd.history
        .iter()
        .find(|h| h.status == CommandState::Succeeded)
        .map(|h| h.at_ms)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Loads a stored rollout's members and their commands' statuses. Blocks.
pub(crate) fn load_live(
    r: StoredRollout,
    store: &super::RolloutStore,
    commands: &crate::commands::CommandStore,
) -> Result<Live, super::RolloutStoreError> {
    let members = store.load_members(&r.id)?;
    let m = members
        .into_iter()
        .map(|s| {
            let read =
                |id: &Option<String>| id.as_deref().and_then(|id| commands.get(id).ok().flatten());
            let up = read(&s.update_id);
            let rb = read(&s.rollback_id);
            Member {
                update: up.as_ref().map(|c| c.status),
                succeeded_at_ms: up.as_ref().and_then(succeeded_at),
                rollback: rb.map(|c| c.status),
                s,
            }
        })
        .collect();
    Ok(Live {
        r,
        m,
        dirty: false,
        dirty_members: Default::default(),
        refresh_cursor: 0,
        notes: Vec::new(),
    })
}
