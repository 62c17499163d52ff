//! The rules of a rollout, without I/O: counting a wave's commands, when the gate must be
//! evaluated, and the decision of a round (start the next wave, soak, pass, abort, roll
//! back). The engine feeds in command statuses and gate figures and persists what changes.

use std::collections::BTreeSet;

use posfleet_proto::DeviceId;
use posfleet_proto::signing::new_command_id;
use posfleet_proto::version::check_min_version;
use tracing::info;

use super::gate::GateInput;
use super::model::{StoredMember, StoredRollback, StoredRollout};
use crate::registry::Registry;
use crate::views::{
    CommandState, RolloutState, SkippedCounts, StatusCounts, VersionsView, WaveOutcome,
};

/// One terminal of a live rollout: what is stored plus what its commands say now.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub s: StoredMember,
    pub update: Option<CommandState>,
    /// Controller clock when its update succeeded.
    pub succeeded_at_ms: Option<u64>,
    pub rollback: Option<CommandState>,
}

/// A rollout the engine is driving.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub r: StoredRollout,
    pub m: Vec<Member>,
    /// The record needs writing.
    pub dirty: bool,
    /// Members that need writing.
    pub dirty_members: BTreeSet<u32>,
    /// Where the next bounded status refresh continues.
    pub refresh_cursor: usize,
    /// Messages for the live stream from this round.
    pub notes: Vec<String>,
}

/// What a round changed that the engine must act on.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Waves that ended, with how.
    pub waves_ended: Vec<WaveOutcome>,
}

fn ms(s: u64) -> u64 {
    s.saturating_mul(1000)
}

/// The counts of `members`' update commands (`started`: whether the wave started).
pub(crate) fn count(members: &[Member], started: bool) -> StatusCounts {
    let mut c = StatusCounts::default();
    for m in members {
        if !started {
            c.not_started += 1;
            continue;
        }
        if m.s.skipped.is_some() {
            c.skipped += 1;
            continue;
        }
        add(&mut c, m.update);
    }
    c
}

/// `members` skipped at wave start, by reason.
pub(crate) fn count_skipped(members: &[Member]) -> SkippedCounts {
    let mut c = SkippedCounts::default();
    for reason in members.iter().filter_map(|m| m.s.skipped.as_deref()) {
        c.add(reason);
    }
    c
}

/// Adds one command status to `c` (`None`: not known yet, counted as queued).
pub(crate) fn add(c: &mut StatusCounts, status: Option<CommandState>) {
    match status.unwrap_or(CommandState::Queued) {
        CommandState::Queued => c.queued += 1,
        CommandState::Delivered => c.delivered += 1,
        CommandState::InProgress => c.in_progress += 1,
        CommandState::Succeeded => c.succeeded += 1,
        CommandState::Failed => c.failed += 1,
        CommandState::Rejected => c.rejected += 1,
        CommandState::Expired => c.expired += 1,
        CommandState::Cancelled => c.cancelled += 1,
    }
}

impl Live {
    /// The current wave's index (0-based), for unfinished rollouts.
    pub(crate) fn wave_index(&self) -> Option<usize> {
        self.r
            .state
            .wave()
            .and_then(|w| usize::try_from(w).ok())
            .and_then(|w| w.checked_sub(1))
            .filter(|w| *w < self.r.waves.len())
    }

    fn members(&self, wave: usize) -> &[Member] {
        let w = &self.r.waves[wave];
        let (a, b) = (w.start as usize, w.end as usize);
        self.m.get(a..b).unwrap_or(&[])
    }

    /// Recounts every wave (and the rollback); marks the record dirty if a count moved.
    pub(crate) fn recount(&mut self) {
        for i in 0..self.r.waves.len() {
            let started = self.r.waves[i].started_at_ms.is_some();
            let c = count(self.members(i), started);
            let skipped = count_skipped(self.members(i));
            let w = &mut self.r.waves[i];
            if w.counts != c || w.skipped != skipped {
                w.counts = c;
                w.skipped = skipped;
                self.dirty = true;
            }
        }
        if let Some(rb) = &self.r.rollback {
            let mut c = StatusCounts::default();
            for m in self.m.iter().filter(|m| m.s.rollback_id.is_some()) {
                add(&mut c, if rb.issued { m.rollback } else { None });
            }
            if let Some(rb) = self.r.rollback.as_mut().filter(|rb| rb.counts != c) {
                rb.counts = c;
                self.dirty = true;
            }
        }
    }

    /// True if the gate should be evaluated now.
    pub(crate) fn needs_gate(&self, now: u64, interval_ms: u64) -> bool {
        let Some(i) = self.wave_index() else {
            return false;
        };
        let w = &self.r.waves[i];
        if !w.issued || w.outcome.is_some() || w.counts.succeeded == 0 {
            return false;
        }
        let last = w.gate.as_ref().map(|g| g.at_ms);
        let until = w
            .threshold_reached_at_ms
            .map(|t| t.saturating_add(ms(self.r.soak_s)));
        match last {
            None => true,
            Some(last) => {
                now.saturating_sub(last) >= interval_ms
                    || until.is_some_and(|u| now >= u && last < u)
            }
        }
    }

    /// What the gate compares for the current wave.
    pub(crate) fn gate_input(&self) -> Option<GateInput> {
        let i = self.wave_index()?;
        let updated = self
            .members(i)
            .iter()
            .filter(|m| m.update == Some(CommandState::Succeeded))
            .filter_map(|m| {
                let d = DeviceId::new(m.s.device.as_str()).ok()?;
                Some((d, m.succeeded_at_ms.unwrap_or(0)))
            })
            .collect();
        let not_updated_now = self
            .members(i)
            .iter()
            .filter(|m| matches!(m.update, None | Some(CommandState::Queued)));
        let later = self.m.get(self.r.waves[i].end as usize..).unwrap_or(&[]);
        let others = later
            .iter()
            .chain(not_updated_now)
            .filter_map(|m| DeviceId::new(m.s.device.as_str()).ok())
            .take(super::gate::MAX_DEVICES)
            .collect();
        Some(GateInput {
            updated,
            others,
            limits: self.r.health_gate,
        })
    }

    /// One round of decisions at `now`. `registry` gives the versions recorded at a wave
    /// start.
    pub(crate) fn decide(&mut self, now: u64, registry: &Registry) -> Outcome {
        let mut out = Outcome::default();
        let Some(i) = self.wave_index() else {
            return out;
        };
        let paused = matches!(self.r.state, RolloutState::Paused { .. });
        let number = i as u32 + 1;
        if self.r.waves[i].started_at_ms.is_none() {
            if !paused {
                self.start_wave(i, now, registry);
            }
            return out;
        }
        if self.r.waves[i].outcome == Some(WaveOutcome::Passed) {
            if !paused {
                self.advance(i, now, registry);
            }
            return out;
        }
        let w = &self.r.waves[i];
        // The thresholds count the members that got an update; a wave whose members were
        // all skipped (min_version) installed nothing and has nothing to judge.
        let members = w.eligible();
        if members == 0 {
            let w = &mut self.r.waves[i];
            w.outcome = Some(WaveOutcome::Passed);
            w.finished_at_ms = Some(now);
            self.dirty = true;
            self.notes.push(format!(
                "wave {number} passed: none of its {} terminals could take the update \
                 (min_version)",
                w.len()
            ));
            out.waves_ended.push(WaveOutcome::Passed);
            if !paused {
                self.advance(i, now, registry);
            }
            return out;
        }
        let c = w.counts;
        let started = w.started_at_ms.unwrap_or(now);
        let timed_out = now >= started.saturating_add(ms(self.r.wave_timeout_s));
        let pending = members.saturating_sub(c.finished());
        let failed = c.unsuccessful() + if timed_out { pending } else { 0 };
        if f64::from(failed) / f64::from(members) > self.r.failure_threshold {
            let why = format!(
                "wave {number}: {failed} of {members} terminals failed{} (more than {:.0}%)",
                if timed_out && pending > 0 {
                    " or did not finish before the wave timeout"
                } else {
                    ""
                },
                self.r.failure_threshold * 100.0
            );
            self.abort(why, now);
            out.waves_ended.push(WaveOutcome::Failed);
            return out;
        }
        if let Some(why) = w.gate.as_ref().and_then(|g| g.tripped.clone()) {
            self.abort(format!("wave {number}: payment health gate: {why}"), now);
            out.waves_ended.push(WaveOutcome::Failed);
            return out;
        }
        let reached = f64::from(c.succeeded) / f64::from(members) >= self.r.success_threshold;
        if reached {
            let soak = ms(self.r.soak_s);
            let w = &mut self.r.waves[i];
            let at = *w.threshold_reached_at_ms.get_or_insert(now);
            let until = at.saturating_add(soak);
            if w.threshold_reached_at_ms == Some(now) {
                self.dirty = true;
            }
            let gate_fresh = w.gate.as_ref().is_some_and(|g| g.at_ms >= until);
            if now >= until && gate_fresh {
                w.outcome = Some(WaveOutcome::Passed);
                w.finished_at_ms = Some(now);
                self.dirty = true;
                self.notes.push(format!(
                    "wave {number} passed: {} of {members} succeeded",
                    c.succeeded
                ));
                out.waves_ended.push(WaveOutcome::Passed);
                if !paused {
                    self.advance(i, now, registry);
                }
            } else if !paused {
                let soaking = RolloutState::Soaking {
                    wave: number,
                    until_ms: until,
                };
                if self.r.state != soaking {
                    self.r.state = soaking;
                    self.dirty = true;
                }
            }
        } else if timed_out {
            let why = format!(
                "wave {number} timed out: {} of {members} succeeded, below the success \
                 threshold of {:.0}%",
                c.succeeded,
                self.r.success_threshold * 100.0
            );
            self.abort(why, now);
            out.waves_ended.push(WaveOutcome::Failed);
        }
        out
    }

    /// The wave `i` passed: start the next one or complete.
    fn advance(&mut self, i: usize, now: u64, registry: &Registry) {
        if i + 1 >= self.r.waves.len() {
            self.r.state = RolloutState::Completed;
            self.dirty = true;
            self.notes.push("completed".to_owned());
        } else {
            self.start_wave(i + 1, now, registry);
        }
    }

    /// Records the start of wave `i`: each member's current version of the component and
    /// either the id its SoftwareUpdate will have or, when the artifact has a `min_version`
    /// that version does not meet (or nothing comparable was reported), why it is skipped.
    /// The engine issues the commands once this is durable.
    pub(crate) fn start_wave(&mut self, i: usize, now: u64, registry: &Registry) {
        let component = self.r.artifact.component.clone();
        let min_version = self.r.artifact.min_version.clone();
        let (a, b) = (self.r.waves[i].start, self.r.waves[i].end);
        for idx in a..b {
            let Some(m) = self.m.get_mut(idx as usize) else {
                continue;
            };
            if m.s.update_id.is_some() || m.s.skipped.is_some() {
                continue;
            }
            let reported = DeviceId::new(m.s.device.as_str())
                .ok()
                .and_then(|d| registry.versions(&d))
                .map(|v| component_version(&v, &component));
            let refused = min_version
                .as_deref()
                .and_then(|min| check_min_version(reported.as_deref().unwrap_or(""), min).reason());
            if let Some(reason) = refused {
                info!(
                    rollout_id = %self.r.id, device_id = %m.s.device, reason,
                    reported = reported.as_deref().unwrap_or(""),
                    min_version = min_version.as_deref().unwrap_or(""),
                    "rollout member skipped: its version does not meet the artifact's min_version"
                );
                m.s.skipped = Some(reason.to_owned());
            } else {
                m.s.update_id = Some(new_command_id());
            }
            m.s.prev_version = reported;
            self.dirty_members.insert(idx);
        }
        let skipped = count_skipped(self.m.get(a as usize..b as usize).unwrap_or(&[]));
        let w = &mut self.r.waves[i];
        w.started_at_ms = Some(now);
        w.issued = false;
        self.r.state = RolloutState::Running { wave: i as u32 + 1 };
        self.dirty = true;
        let mut note = format!(
            "wave {} started: {} terminal{}",
            i + 1,
            b - a,
            if b - a == 1 { "" } else { "s" }
        );
        if skipped.total() > 0 {
            note.push_str(&format!(
                ", {} skipped (min_version {}: {} below, {} unknown, {} unparseable)",
                skipped.total(),
                min_version.as_deref().unwrap_or(""),
                skipped.below_min_version,
                skipped.version_unknown,
                skipped.version_unparseable
            ));
        }
        self.notes.push(note);
    }

    /// Aborts: no later wave starts; every member whose update succeeded or may still run
    /// gets a RollbackUpdate id (issued by the engine once durable).
    pub(crate) fn abort(&mut self, reason: String, now: u64) {
        if let Some(i) = self.wave_index() {
            let w = &mut self.r.waves[i];
            if w.started_at_ms.is_some() && w.outcome.is_none() {
                w.outcome = Some(WaveOutcome::Failed);
                w.finished_at_ms = Some(now);
                w.reason = Some(reason.clone());
            }
        }
        for (idx, m) in self.m.iter_mut().enumerate() {
            let needs = m.s.update_id.is_some()
                && !matches!(
                    m.update,
                    Some(
                        CommandState::Failed
                            | CommandState::Rejected
                            | CommandState::Expired
                            | CommandState::Cancelled
                    )
                );
            if needs && m.s.rollback_id.is_none() {
                m.s.rollback_id = Some(new_command_id());
                self.dirty_members.insert(idx as u32);
            }
        }
        self.r.rollback = Some(StoredRollback {
            at_ms: now,
            cancelled: false,
            issued: false,
            counts: StatusCounts::default(),
        });
        self.notes.push(format!("aborted: {reason}"));
        self.r.state = RolloutState::Aborted { reason };
        self.dirty = true;
    }

    /// True once the engine has nothing left to do for this rollout.
    pub(crate) fn finished(&self) -> bool {
        match &self.r.state {
            RolloutState::Completed => true,
            RolloutState::Aborted { .. } => self.r.rollback.as_ref().is_none_or(|rb| {
                rb.issued
                    && self
                        .m
                        .iter()
                        .filter(|m| m.s.rollback_id.is_some())
                        .all(|m| m.rollback.is_some_and(CommandState::is_final))
            }),
            _ => false,
        }
    }
}

/// The version of `component` in `v`.
pub(crate) fn component_version(v: &VersionsView, component: &str) -> String {
    match component {
        "firmware" => v.firmware.clone(),
        "agent" => v.agent.clone(),
        _ => v.payment_app.clone(),
    }
}
