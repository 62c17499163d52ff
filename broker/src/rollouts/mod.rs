//! Staged, health-gated software rollouts (ADR 0008, "Rollouts"): an artifact goes to a
//! target in waves (cumulative percentages, members fixed at creation), each wave passes on
//! its success threshold, the payment health gate and a soak time, or fails and aborts the
//! rollout, which rolls back every terminal it reached.
//!
//! # Layout
//!
//! - `mod.rs`: [`RolloutsConfig`], [`Rollouts`] (open the store, spawn the engine),
//!   [`RolloutsHandle`] (API: create, pause, resume, abort, read; [`ArtifactUsers`]),
//!   [`NoArtifacts`] (the catalog until the artifact store is wired in).
//! - `model.rs`: the stored records, the stable shuffle and the wave plan.
//! - `store.rs`: [`RolloutStore`], the sled store `DATA/rollouts`.
//! - `rules.rs`: the decisions of a round, without I/O.
//! - `gate.rs`: the payment health gate (transaction store + registry).
//! - `engine.rs`: the task: rounds, durable commits, issuing through the command plane.
//! - `tests.rs`: the engine with the real command plane, a fake catalog and a controlled
//!   clock; `min_version_tests.rs`: members skipped for the artifact's `min_version`.

mod engine;
mod gate;
#[cfg(test)]
mod min_version_tests;
mod model;
mod rules;
mod store;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use posfleet_proto::DeviceId;
use posfleet_proto::signing::new_command_id;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use engine::AUTHOR_ROLLOUT;
pub use store::{RolloutStore, RolloutStoreError};

use crate::artifacts::{ArtifactCatalog, ArtifactMeta, ArtifactUsers};
use crate::commands::CommandsHandle;
use crate::controller::Clock;
use crate::events::EventBus;
use crate::metrics::{Metrics, StatusLabel};
use crate::registry::Registry;
use crate::txstore::TxStore;
use crate::views::{
    HealthGateView, RollbackView, RolloutState, RolloutView, SkippedCounts, StatusCounts,
    TargetView, WaveView,
};
use model::{RECORD_VERSION, StoredArtifact, StoredMember, StoredRollout, StoredWave};
use rules::{Live, Member};

/// Longest the API waits for the engine to commit and answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Rollouts listed at most (newest first).
pub const MAX_LISTED: usize = 1000;

/// Timing and limits of the engine.
#[derive(Debug, Clone)]
pub struct RolloutsConfig {
    /// How often the engine runs a round without being woken.
    pub tick: Duration,
    /// How often the payment gate of a running wave is evaluated.
    pub gate_interval: Duration,
    /// Command statuses read from the command store per round at most (status events
    /// keep the rest current; this catches what the event stream dropped).
    pub refresh_per_round: usize,
    /// Validity of RollbackUpdate commands.
    pub rollback_ttl: Duration,
    /// Messages waiting for the engine at most.
    pub queue_capacity: usize,
}

impl Default for RolloutsConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            gate_interval: Duration::from_secs(10),
            refresh_per_round: 1000,
            rollback_ttl: Duration::from_secs(24 * 3600),
            queue_capacity: 64,
        }
    }
}

/// A catalog that knows no artifact: rollouts cannot be created until the artifact store
/// is wired in (creation fails with a field error on `artifact_id`).
#[derive(Debug, Default)]
pub struct NoArtifacts;

impl ArtifactCatalog for NoArtifacts {
    fn get(&self, _id: &str) -> Option<ArtifactMeta> {
        None
    }
    fn download_url(&self, id: &str) -> String {
        format!("https://127.0.0.1/device/v1/artifacts/{id}")
    }
}

/// A validated rollout request (the API checks every field and resolves the target).
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub artifact: ArtifactMeta,
    pub target: TargetView,
    /// The resolved target: non-empty, known devices.
    pub devices: Vec<DeviceId>,
    /// Cumulative percentages, strictly increasing, ending at 100.
    pub waves: Vec<u32>,
    pub success_threshold: f64,
    pub failure_threshold: f64,
    pub soak: Duration,
    pub wave_timeout: Duration,
    pub confirm_timeout_s: u32,
    pub health_gate: HealthGateView,
    pub author: String,
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort { reason: String },
}

/// Why a rollout was not created (nothing stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreateRolloutError {
    #[error("the rollout store could not make the rollout durable")]
    Store,
    #[error("the rollout engine is not running or did not answer in time")]
    Unavailable,
}

/// Why pause/resume/abort was refused (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("no such rollout")]
    NotFound,
    #[error("not possible while the rollout is {0}")]
    NotApplicable(&'static str),
    #[error("the rollout store could not make the change durable")]
    Store,
    #[error("the rollout engine is not running or did not answer in time")]
    Unavailable,
}

/// The views the engine publishes and the API reads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    views: RwLock<BTreeMap<String, RolloutView>>,
    /// Rounds the engine finished (what it decided is durable, issued and published), so
    /// a test can wait for the engine to have looked again instead of sleeping.
    rounds: AtomicU64,
}

impl Shared {
    /// Rounds the engine finished so far.
    #[cfg(test)]
    pub(crate) fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Acquire)
    }

    fn round_done(&self) {
        self.rounds.fetch_add(1, Ordering::AcqRel);
    }

    fn put(&self, view: RolloutView) {
        self.views
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(view.id.clone(), view);
    }

    fn get(&self, id: &str) -> Option<RolloutView> {
        self.views
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn list(&self) -> Vec<RolloutView> {
        let mut all: Vec<RolloutView> = self
            .views
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        all.truncate(MAX_LISTED);
        all
    }

    fn update_metrics(&self, metrics: &Metrics, live: &BTreeMap<String, Live>) {
        let mut by_state: BTreeMap<&'static str, i64> =
            ["running", "soaking", "paused", "completed", "aborted"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for v in self
            .views
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            *by_state.entry(v.state.name()).or_default() += 1;
        }
        for (state, n) in by_state {
            metrics
                .rollouts
                .get_or_create(&StatusLabel { status: state })
                .set(n);
        }
        let mut members = StatusCounts::default();
        for l in live.values().filter(|l| !l.r.state.is_final()) {
            for w in &l.r.waves {
                let c = w.counts;
                members.not_started += c.not_started;
                members.skipped += c.skipped;
                members.queued += c.queued;
                members.delivered += c.delivered;
                members.in_progress += c.in_progress;
                members.succeeded += c.succeeded;
                members.failed += c.failed;
                members.rejected += c.rejected;
                members.expired += c.expired;
                members.cancelled += c.cancelled;
            }
        }
        for (status, n) in [
            ("not_started", members.not_started),
            ("skipped", members.skipped),
            ("queued", members.queued),
            ("delivered", members.delivered),
            ("in_progress", members.in_progress),
            ("succeeded", members.succeeded),
            ("failed", members.failed),
            ("rejected", members.rejected),
            ("expired", members.expired),
            ("cancelled", members.cancelled),
        ] {
            metrics
                .rollout_members
                .get_or_create(&StatusLabel { status })
                .set(i64::from(n));
        }
    }
}

/// The API's handle. Cheap to clone.
#[derive(Clone)]
pub struct RolloutsHandle {
    tx: mpsc::Sender<engine::Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RolloutsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutsHandle").finish_non_exhaustive()
    }
}

impl RolloutsHandle {
    /// Creates a rollout durably (its first wave starts right after) and returns it.
    pub async fn create(&self, req: NewRollout) -> Result<RolloutView, CreateRolloutError> {
        let (reply, rx) = oneshot::channel();
        let msg = engine::Msg::Create {
            req: Box::new(req),
            reply,
        };
        ask(&self.tx, msg, rx)
            .await
            .ok_or(CreateRolloutError::Unavailable)?
    }

    /// Pauses, resumes or aborts a rollout durably.
    pub async fn control(&self, id: &str, action: Control) -> Result<RolloutView, ControlError> {
        let (reply, rx) = oneshot::channel();
        let msg = engine::Msg::Control {
            id: id.to_owned(),
            action,
            reply,
        };
        ask(&self.tx, msg, rx)
            .await
            .ok_or(ControlError::Unavailable)?
    }

    /// One rollout.
    pub fn get(&self, id: &str) -> Option<RolloutView> {
        self.shared.get(id)
    }

    /// Rollouts, newest first (at most [`MAX_LISTED`]).
    pub fn list(&self) -> Vec<RolloutView> {
        self.shared.list()
    }
}

impl ArtifactUsers for RolloutsHandle {
    fn rollouts_using(&self, id: &str) -> Vec<String> {
        self.shared
            .views
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|v| v.artifact_id == id && !v.state.is_final())
            .map(|v| v.id.clone())
            .collect()
    }
}

async fn ask<T>(
    tx: &mpsc::Sender<engine::Msg>,
    msg: engine::Msg,
    rx: oneshot::Receiver<T>,
) -> Option<T> {
    tokio::time::timeout(REPLY_TIMEOUT, async {
        tx.send(msg).await.ok()?;
        rx.await.ok()
    })
    .await
    .ok()
    .flatten()
}

/// What the engine needs.
pub(crate) struct Deps {
    pub cfg: RolloutsConfig,
    pub store: Arc<RolloutStore>,
    pub commands: CommandsHandle,
    pub registry: Arc<Registry>,
    pub tx: Arc<TxStore>,
    pub catalog: Arc<dyn ArtifactCatalog>,
    pub events: EventBus,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    pub shared: Arc<Shared>,
}

/// An opened rollout store with every rollout loaded, ready to spawn.
pub struct Rollouts {
    cfg: RolloutsConfig,
    store: Arc<RolloutStore>,
    /// Rollouts with work left (with members and command statuses).
    live: Vec<Live>,
    /// Every rollout's view.
    views: Vec<RolloutView>,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts")
            .field("live", &self.live.len())
            .field("all", &self.views.len())
            .finish_non_exhaustive()
    }
}

impl Rollouts {
    /// Loads every rollout, and the members and command statuses of those with work left.
    /// Blocks (disk reads).
    pub fn load(
        cfg: RolloutsConfig,
        store: Arc<RolloutStore>,
        commands: &crate::commands::CommandStore,
    ) -> Result<Self, RolloutStoreError> {
        let mut live = Vec::new();
        let mut views = Vec::new();
        for r in store.load_rollouts()? {
            views.push(build_view(&r));
            if r.state != RolloutState::Completed {
                let l = engine::load_live(r, &store, commands)?;
                if !l.finished() {
                    live.push(l);
                }
            }
        }
        Ok(Self {
            cfg,
            store,
            live,
            views,
        })
    }

    /// Starts the engine on `tracker`; it stops on `cancel`.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        self,
        commands: CommandsHandle,
        registry: Arc<Registry>,
        tx: Arc<TxStore>,
        catalog: Arc<dyn ArtifactCatalog>,
        events: EventBus,
        metrics: Arc<Metrics>,
        clock: Clock,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> RolloutsHandle {
        let shared = Arc::new(Shared::default());
        for v in self.views {
            shared.put(v);
        }
        let (msg_tx, rx) = mpsc::channel(self.cfg.queue_capacity.max(1));
        let engine = engine::Engine::new(
            Deps {
                cfg: self.cfg,
                store: self.store,
                commands,
                registry,
                tx,
                catalog,
                events,
                metrics,
                clock,
                shared: Arc::clone(&shared),
            },
            self.live,
            tracker.clone(),
        );
        tracker.spawn(engine.run(rx, cancel));
        RolloutsHandle { tx: msg_tx, shared }
    }
}

/// A new rollout: members shuffled and split into waves, nothing started.
fn new_live(req: NewRollout, now: u64) -> Live {
    let id = new_command_id();
    let devices = model::shuffle(&id, req.devices);
    let n = u32::try_from(devices.len()).unwrap_or(u32::MAX);
    let mut start = 0;
    let waves = model::plan_waves(&req.waves, n)
        .into_iter()
        .map(|(percent, end)| {
            let w = StoredWave {
                percent,
                start,
                end,
                started_at_ms: None,
                issued: false,
                threshold_reached_at_ms: None,
                finished_at_ms: None,
                outcome: None,
                reason: None,
                counts: StatusCounts::default(),
                skipped: SkippedCounts::default(),
                gate: None,
            };
            start = end;
            w
        })
        .collect();
    let a = req.artifact;
    let r = StoredRollout {
        v: RECORD_VERSION,
        id,
        artifact: StoredArtifact {
            id: a.id,
            version: a.version,
            component: a.component,
            size_bytes: a.size_bytes,
            sha256: hex::encode(a.sha256),
            release_signature: BASE64.encode(&a.release_signature),
            release_key_id: a.release_key_id,
            min_version: a.min_version,
        },
        target: req.target,
        state: RolloutState::Running { wave: 1 },
        members: n,
        waves,
        success_threshold: req.success_threshold,
        failure_threshold: req.failure_threshold,
        soak_s: req.soak.as_secs(),
        wave_timeout_s: req.wave_timeout.as_secs(),
        confirm_timeout_s: req.confirm_timeout_s,
        health_gate: req.health_gate,
        created_by: req.author,
        created_at_ms: now,
        updated_at_ms: now,
        rollback: None,
    };
    let m: Vec<Member> = devices
        .into_iter()
        .map(|d| Member {
            s: StoredMember {
                device: d.to_string(),
                prev_version: None,
                update_id: None,
                skipped: None,
                rollback_id: None,
            },
            update: None,
            succeeded_at_ms: None,
            rollback: None,
        })
        .collect();
    Live {
        dirty: true,
        dirty_members: (0..n).collect(),
        refresh_cursor: 0,
        notes: vec![format!("created: {n} terminals in {} waves", r.waves.len())],
        r,
        m,
    }
}

/// The API view of a stored rollout.
fn build_view(r: &StoredRollout) -> RolloutView {
    RolloutView {
        id: r.id.clone(),
        artifact_id: r.artifact.id.clone(),
        version: r.artifact.version.clone(),
        component: r.artifact.component.clone(),
        min_version: r.artifact.min_version.clone(),
        target: r.target.clone(),
        state: r.state.clone(),
        members: r.members,
        waves: r
            .waves
            .iter()
            .enumerate()
            .map(|(i, w)| WaveView {
                number: i as u32 + 1,
                percent: w.percent,
                members: w.len(),
                counts: w.counts,
                skipped: w.skipped,
                started_at_ms: w.started_at_ms,
                threshold_reached_at_ms: w.threshold_reached_at_ms,
                finished_at_ms: w.finished_at_ms,
                outcome: w.outcome,
                reason: w.reason.clone(),
                gate: w.gate.clone(),
            })
            .collect(),
        success_threshold: r.success_threshold,
        failure_threshold: r.failure_threshold,
        soak_s: r.soak_s,
        wave_timeout_s: r.wave_timeout_s,
        confirm_timeout_s: r.confirm_timeout_s,
        health_gate: r.health_gate,
        created_by: r.created_by.clone(),
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        rollback: r.rollback.as_ref().map(|rb| RollbackView {
            at_ms: rb.at_ms,
            counts: rb.counts,
        }),
    }
}
