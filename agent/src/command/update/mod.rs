//! SoftwareUpdate, agent side (ADR 0008 "Delivery" and "Install on the terminal").
//!
//! # Layout
//!
//! - `mod.rs`: [`UpdateSettings`], the phases, the checks a `SoftwareUpdate` must pass before
//!   anything starts ([`ValidUpdate`]), and the job: one task per update, with the journal
//!   entry as its record.
//! - `download.rs`: HTTPS with the terminal's client certificate, `Range` resume, bounded
//!   retries, the free-space and size limits; then the verification (size, SHA-256, release
//!   signature).
//! - `install.rs`: waiting until idle and inside the maintenance window, the install hook,
//!   the health confirmation, the rollback hook, the final result.
//! - `window.rs`: `maintenance.window` (`HH:MM-HH:MM`, terminal local time) and the local
//!   UTC offset from `/etc/localtime`.
//!
//! # How an update runs
//!
//! The executor checks the command (release keys configured, fields valid, no other update
//! active, the version the terminal reports for the component at least the artifact's
//! `min_version`, an install hook configured), then spawns the job and goes back to its queue, so
//! locks, configuration pushes and leases are never stuck behind a download or a wait. The job
//! persists each phase in the command's journal entry (`details.phase` of the stored
//! IN_PROGRESS result, durable) before it starts the phase, and reports it:
//! `downloading` (with `progress_percent`) → `verifying` → `waiting` → `installing` →
//! `confirming`. A restart resumes from the journal: before `installing` it starts over at the
//! download (the partial file is kept, so that costs only the missing bytes); in `installing`
//! or `confirming` it goes on confirming until the stored deadline (the install hook may
//! restart the agent or the terminal before it returns). The final result and the new version
//! are written in one durable batch, then published through the executor (which keeps it for
//! the next connect when offline).

mod download;
mod install;
#[cfg(test)]
pub(crate) mod test_server;
#[cfg(test)]
mod tests;
pub(crate) mod window;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::pb::{self, command::Body};
use posfleet_proto::signing::{KeyRing, RejectReason};
use posfleet_proto::version::{MinVersionCheck, Version, check_min_version};
use posfleet_proto::{DeviceId, now_ms};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::{CommandSettings, Executor, TerminalFiles, result};
use crate::outbox::DeviceOutbox;
use crate::state::{
    self, Changes, Component, DeviceState, InstalledVersions, JournalEntry, JournalStatus,
    LiveState,
};
use posfleet_runtime::backoff::Backoff;
use posfleet_runtime::mqtt::MqttHandle;

/// Default `[updates] confirm_timeout` (used when the command says 0).
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `[updates] retry_attempts`.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 8;
/// Default `[updates] max_retry_delay`.
pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// How often the idle/maintenance-window condition is checked while waiting.
pub const DEFAULT_IDLE_CHECK_EVERY: Duration = Duration::from_secs(10);
/// How often health is checked while confirming.
pub const DEFAULT_HEALTH_CHECK_EVERY: Duration = Duration::from_secs(2);
/// Longest version string accepted (it travels in every report).
const MAX_VERSION_LEN: usize = crate::config::MAX_DEVICE_TEXT;
/// Progress events waiting for the executor; more are dropped (the next one says more).
pub(super) const EVENT_QUEUE: usize = 8;

/// Software-update settings shared by every terminal of a process (`[updates]`).
#[derive(Debug, Clone)]
pub struct UpdateSettings {
    /// Release keys artifacts must be signed with; empty: every update is refused.
    pub release_keys: KeyRing,
    /// Health must be confirmed within this long after the install hook, when the command
    /// says 0.
    pub confirm_timeout: Duration,
    /// Consecutive failed download attempts (no byte gained) before the update fails.
    pub retry_attempts: u32,
    /// Delays between download attempts (full jitter; `max` is `max_retry_delay`).
    pub retry_backoff: Backoff,
    /// Time allowed to connect, and between two reads of the body.
    pub io_timeout: Duration,
    /// How often the idle/window condition is checked while waiting.
    pub idle_check_every: Duration,
    /// How often health is checked while confirming.
    pub health_check_every: Duration,
    /// The terminal's time zone file (TZif), for the maintenance window.
    pub localtime: PathBuf,
}

impl Default for UpdateSettings {
    fn default() -> Self {
        Self {
            release_keys: KeyRing::default(),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            retry_attempts: DEFAULT_RETRY_ATTEMPTS,
            retry_backoff: Backoff {
                initial: Duration::from_secs(1),
                max: DEFAULT_MAX_RETRY_DELAY,
            },
            io_timeout: Duration::from_secs(60),
            idle_check_every: DEFAULT_IDLE_CHECK_EVERY,
            health_check_every: DEFAULT_HEALTH_CHECK_EVERY,
            localtime: PathBuf::from("/etc/localtime"),
        }
    }
}

/// The phases of an update, in order; each is persisted before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Phase {
    Downloading = 1,
    Verifying = 2,
    Waiting = 3,
    Installing = 4,
    Confirming = 5,
}

/// Value of the shared phase cell once a RollbackUpdate cancelled the update.
const CANCELLED: u8 = 0xff;

impl Phase {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::Downloading => "downloading",
            Phase::Verifying => "verifying",
            Phase::Waiting => "waiting",
            Phase::Installing => "installing",
            Phase::Confirming => "confirming",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [
            Phase::Downloading,
            Phase::Verifying,
            Phase::Waiting,
            Phase::Installing,
            Phase::Confirming,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

/// A SoftwareUpdate whose fields passed the checks.
#[derive(Debug, Clone)]
pub(crate) struct ValidUpdate {
    pub(crate) sha256: [u8; 32],
    /// `sha256` in lowercase hex (also the artifact id).
    pub(crate) sha256_hex: String,
    pub(crate) version: String,
    pub(crate) url: reqwest::Url,
    pub(crate) size: u64,
    pub(crate) signature: Vec<u8>,
    pub(crate) key_id: String,
    pub(crate) component: Component,
    pub(crate) rollout_id: String,
    /// From the command, or the setting when it says 0.
    pub(crate) confirm_timeout: Duration,
    /// The artifact's minimum version of `component` (`None`: any); comparable.
    pub(crate) min_version: Option<String>,
}

/// A version string as reports carry it: 1-64 characters, no control characters.
pub(crate) fn valid_version(v: &str) -> bool {
    !v.is_empty() && v.chars().count() <= MAX_VERSION_LEN && !v.chars().any(char::is_control)
}

impl ValidUpdate {
    /// Checks the fields; the error says which one is wrong.
    pub(crate) fn parse(u: &pb::SoftwareUpdate, settings: &UpdateSettings) -> Result<Self, String> {
        let sha256: [u8; 32] = u
            .sha256
            .as_slice()
            .try_into()
            .map_err(|_| "sha256 must be 32 bytes".to_owned())?;
        let sha256_hex = hex_lower(&sha256);
        if !u.artifact_id.is_empty() && u.artifact_id != sha256_hex {
            return Err("artifact_id is not the artifact's SHA-256".into());
        }
        if !valid_version(&u.version) {
            return Err("version must be 1-64 printable characters".into());
        }
        let url = reqwest::Url::parse(&u.url).map_err(|e| format!("url: {e}"))?;
        if url.scheme() != "https" {
            return Err("url must be https".into());
        }
        if u.size_bytes == 0 {
            return Err("size_bytes must not be 0".into());
        }
        let component = Component::parse(&u.component)
            .ok_or_else(|| "component must be payment_app, firmware or agent".to_owned())?;
        if u.rollout_id.len() > 128 || u.rollout_id.chars().any(char::is_control) {
            return Err("rollout_id is too long or holds control characters".into());
        }
        let confirm_timeout = match u.confirm_timeout_s {
            0 => settings.confirm_timeout,
            s => Duration::from_secs(u64::from(s)),
        };
        let min_version = match u.min_version.as_str() {
            "" => None,
            m if Version::parse(m).is_some() => Some(m.to_owned()),
            _ => {
                return Err(
                    "min_version must be dot-separated numbers (like 9.0.0), optionally \
                     with -pre-release and +build"
                        .into(),
                );
            }
        };
        Ok(Self {
            sha256,
            sha256_hex,
            version: u.version.clone(),
            url,
            size: u.size_bytes,
            signature: u.release_signature.clone(),
            key_id: u.release_key_id.clone(),
            component,
            rollout_id: u.rollout_id.clone(),
            confirm_timeout,
            min_version,
        })
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What an update job tells its executor.
#[derive(Debug)]
pub(super) enum UpdateEvent {
    /// An IN_PROGRESS result to publish (dropped when the queue is full).
    Progress(pb::CommandResult),
    /// The final result, already stored durably; the job is over.
    Finished(pb::CommandResult),
}

/// The update a terminal is running (at most one).
#[derive(Debug)]
pub(super) struct ActiveUpdate {
    pub(super) command_id: String,
    /// The job's phase (`Phase as u8`), or [`CANCELLED`].
    phase: Arc<AtomicU8>,
    /// Wakes the job when the phase cell was set to [`CANCELLED`].
    cancel: CancellationToken,
}

impl ActiveUpdate {
    /// Cancels the update if it has not started installing. Returns whether it did.
    pub(super) fn cancel_before_install(&self) -> bool {
        let cancelled = self
            .phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p < Phase::Installing as u8).then_some(CANCELLED)
            })
            .is_ok();
        if cancelled {
            self.cancel.cancel();
        }
        cancelled
    }
}

/// Everything a job works with (clones of the executor's handles).
pub(super) struct UpdateJob {
    pub(super) device_id: DeviceId,
    pub(super) cmd: pb::Command,
    /// The verified command bytes, kept in the journal entry until the job ends.
    pub(super) bytes: Vec<u8>,
    pub(super) update: ValidUpdate,
    pub(super) settings: Arc<CommandSettings>,
    pub(super) state: DeviceState,
    pub(super) live: LiveState,
    pub(super) mqtt: MqttHandle,
    pub(super) outbox: DeviceOutbox,
    pub(super) files: TerminalFiles,
    /// The terminal's TLS identity (downloads present its certificate).
    pub(super) tls: Arc<rustls::ClientConfig>,
    /// Shared with the executor, which writes it for RollbackUpdate (never while a job
    /// installs or confirms).
    pub(super) installed: Arc<Mutex<InstalledVersions>>,
    pub(super) events: mpsc::Sender<UpdateEvent>,
    phase: Arc<AtomicU8>,
    /// Set by a RollbackUpdate before the install started.
    cancelled: CancellationToken,
    /// The agent stops: leave the journal as it is (the next start resumes).
    stop: CancellationToken,
}

/// Why a job ended without success (or stopped).
#[derive(Debug)]
pub(super) enum Outcome {
    /// The agent is stopping; the journal entry stays in progress.
    Stopped,
    /// FAILED with `details.reason`.
    Failed {
        reason: &'static str,
        message: String,
        details: Vec<(&'static str, String)>,
    },
}

pub(super) fn failed(reason: &'static str, message: impl Into<String>) -> Outcome {
    Outcome::Failed {
        reason,
        message: message.into(),
        details: Vec::new(),
    }
}

impl UpdateJob {
    /// The artifact while it downloads (per terminal: `<prefix><sha256>.part`).
    pub(super) fn part_path(&self) -> PathBuf {
        self.files.updates_dir.join(format!(
            "{}{}.part",
            self.files.update_prefix, self.update.sha256_hex
        ))
    }

    /// The verified artifact the install hook gets.
    pub(super) fn artifact_path(&self) -> PathBuf {
        self.files.updates_dir.join(format!(
            "{}{}.artifact",
            self.files.update_prefix, self.update.sha256_hex
        ))
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.phase.load(Ordering::Acquire) == CANCELLED
    }

    /// Resolves when a RollbackUpdate cancelled the job or the agent stops.
    pub(super) async fn interrupted(&self) {
        tokio::select! {
            () = self.cancelled.cancelled() => {}
            () = self.stop.cancelled() => {}
        }
    }

    /// What an interruption means: cancelled (FAILED) or stopping (resume later).
    pub(super) fn interruption(&self) -> Outcome {
        if self.is_cancelled() {
            failed("cancelled", "cancelled by a RollbackUpdate")
        } else {
            Outcome::Stopped
        }
    }

    /// Persists `phase` (durably) and reports it. For `installing`/`confirming`,
    /// `deadline_ms` is the confirmation deadline a restart resumes with. Moving to
    /// `installing` fails (cancelled) if a RollbackUpdate came first.
    pub(super) async fn enter(
        &self,
        phase: Phase,
        deadline_ms: Option<u64>,
    ) -> Result<(), Outcome> {
        // One cell decides between this job and a RollbackUpdate that cancels it: once it
        // says CANCELLED the job never moves on (and the executor never cancels a job that
        // is installing).
        let claimed = self
            .phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p != CANCELLED).then_some(phase as u8)
            })
            .is_ok();
        if !claimed {
            return Err(self.interruption());
        }
        let mut r = self.progress_result(phase, 0);
        if let Some(at) = deadline_ms {
            r = result::with(r, "confirm_deadline_ms", at);
        }
        let entry = JournalEntry {
            status: JournalStatus::InProgress,
            not_after_ms: self.cmd.not_after_ms,
            command: self.bytes.clone(),
            result: r.encode_to_vec(),
        };
        let id = self.cmd.id.clone();
        state::blocking(&self.state, move |s| {
            s.apply(Changes::durable().journal(&id, entry))
        })
        .await
        .map_err(|e| {
            failed(
                "state_store",
                format!("cannot journal the update phase: {e}"),
            )
        })?;
        info!(command_id = %self.cmd.id, phase = phase.name(), "software update phase");
        self.report(r);
        Ok(())
    }

    pub(super) fn progress_result(&self, phase: Phase, percent: u32) -> pb::CommandResult {
        let mut r = result::in_progress(&self.cmd.id, phase.name());
        r.progress_percent = percent.min(100);
        let r = result::with(r, "phase", phase.name());
        result::with(r, "version", &self.update.version)
    }

    /// Queues a progress report (dropped if the executor is behind).
    pub(super) fn report(&self, r: pb::CommandResult) {
        let _ = self.events.try_send(UpdateEvent::Progress(r));
    }

    /// The whole job from `start` (see the module docs).
    async fn run(self, start: Phase, deadline_ms: Option<u64>) {
        let outcome = match start {
            Phase::Installing | Phase::Confirming => {
                let deadline = deadline_ms.unwrap_or_else(|| {
                    now_ms().saturating_add(duration_ms(self.update.confirm_timeout))
                });
                match self.enter(Phase::Confirming, Some(deadline)).await {
                    Ok(()) => self.confirm(deadline).await,
                    Err(e) => Err(e),
                }
            }
            _ => self.download_to_install().await,
        };
        match outcome {
            Ok(()) => self.succeed().await,
            Err(Outcome::Stopped) => {
                info!(command_id = %self.cmd.id, "agent stopping; the update resumes at the next start");
            }
            Err(Outcome::Failed {
                reason,
                message,
                details,
            }) => {
                warn!(command_id = %self.cmd.id, reason, %message, "software update failed");
                let mut r = result::with(result::failed(&self.cmd.id, message), "reason", reason);
                for (k, v) in details {
                    r = result::with(r, k, v);
                }
                self.end(r, None).await;
            }
        }
    }

    async fn download_to_install(&self) -> Result<(), Outcome> {
        self.enter(Phase::Downloading, None).await?;
        self.download().await?;
        self.enter(Phase::Verifying, None).await?;
        self.verify().await?;
        self.wait_until_idle().await?;
        self.install().await
    }

    /// Stores the final result (with `installed`, in one durable batch), removes the
    /// artifact, and hands the result to the executor.
    pub(super) async fn end(&self, r: pb::CommandResult, installed: Option<InstalledVersions>) {
        let entry = JournalEntry {
            status: JournalStatus::Final,
            not_after_ms: self.cmd.not_after_ms,
            command: Vec::new(),
            result: r.encode_to_vec(),
        };
        let id = self.cmd.id.clone();
        let mut changes = Changes::durable().journal(&id, entry);
        if let Some(installed) = &installed {
            changes = changes.installed(installed.clone());
        }
        let new = installed;
        match state::blocking(&self.state, move |s| s.apply(changes)).await {
            Ok(()) => {
                if let Some(installed) = new {
                    let component = self.update.component;
                    let version = self.update.version.clone();
                    *self.installed.lock().unwrap_or_else(|e| e.into_inner()) = installed;
                    // Heartbeats, presence and a ReportedState (sent on the change) say it.
                    self.live
                        .update(|s| component.set(&mut s.versions, &version));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, command_id = %self.cmd.id, "cannot store the update's result");
            }
        }
        for path in [self.part_path(), self.artifact_path()] {
            let _ = tokio::fs::remove_file(path).await;
        }
        let _ = self.events.send(UpdateEvent::Finished(r)).await;
    }
}

pub(super) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Executor {
    /// A verified, journal-new SoftwareUpdate: the checks, then the job.
    pub(super) async fn software_update(
        &mut self,
        cmd: &pb::Command,
        bytes: &[u8],
        u: &pb::SoftwareUpdate,
    ) {
        let refuse = |message: String| result::rejected(&cmd.id, RejectReason::Refused, message);
        let updates = &self.settings.updates;
        let checked = if updates.release_keys.is_empty() {
            Err(refuse("no trusted release key configured".into()))
        } else if self.update.is_some() {
            Err(refuse("another update is in progress".into()))
        } else {
            ValidUpdate::parse(u, updates).map_err(|e| refuse(format!("invalid update: {e}")))
        };
        let update = match checked.and_then(|update| self.meets_min_version(cmd, update)) {
            Ok(update) => update,
            Err(r) => {
                warn!(command_id = %cmd.id, message = %r.message, "software update refused");
                self.finish(cmd, r, Changes::durable()).await;
                return;
            }
        };
        if self.settings.hooks.install.is_none() {
            let r = result::with(
                result::failed(&cmd.id, "no install hook configured"),
                "reason",
                "no_install_hook",
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        self.spawn_update(cmd, bytes, update, Phase::Downloading, None);
    }

    /// Refuses (REJECTED, `details.reason` = `below_min_version`, `version_unknown` or
    /// `version_unparseable`) an update whose `min_version` the version this terminal reports
    /// for the component does not meet; nothing is downloaded then. Checked when the command
    /// arrives, not again when a restart resumes it.
    fn meets_min_version(
        &self,
        cmd: &pb::Command,
        update: ValidUpdate,
    ) -> Result<ValidUpdate, pb::CommandResult> {
        let Some(min) = update.min_version.as_deref() else {
            return Ok(update);
        };
        let component = update.component.name();
        let installed = update.component.of(&self.live.get().versions).to_owned();
        let check = check_min_version(&installed, min);
        let Some(reason) = check.reason() else {
            return Ok(update);
        };
        let message = match check {
            MinVersionCheck::Unknown => format!(
                "this terminal reports no {component} version; the update needs at least {min}"
            ),
            MinVersionCheck::Unparseable => format!(
                "this terminal's {component} version {installed:?} cannot be compared with the \
                 update's min_version {min}"
            ),
            _ => format!(
                "this terminal runs {component} {installed}, below the update's min_version {min}"
            ),
        };
        let r = result::rejected(&cmd.id, RejectReason::Refused, message);
        let r = result::with(r, "reason", reason);
        let r = result::with(r, "installed_version", installed);
        Err(result::with(r, "min_version", min))
    }

    /// Resumes an update a restart interrupted, from the phase its journal entry holds.
    pub(super) async fn resume_update(&mut self, cmd: &pb::Command, entry: &JournalEntry) {
        let Some(Body::SoftwareUpdate(u)) = &cmd.body else {
            return;
        };
        let stored = pb::CommandResult::decode(entry.result.as_slice()).unwrap_or_default();
        let phase = stored
            .details
            .get("phase")
            .and_then(|p| Phase::parse(p))
            .unwrap_or(Phase::Downloading);
        let deadline = stored
            .details
            .get("confirm_deadline_ms")
            .and_then(|d| d.parse::<u64>().ok());
        match ValidUpdate::parse(u, &self.settings.updates) {
            Ok(update) => {
                info!(command_id = %cmd.id, phase = phase.name(), "resuming a software update");
                self.spawn_update(cmd, &entry.command, update, phase, deadline);
            }
            Err(e) => {
                let r = result::with(
                    result::failed(
                        &cmd.id,
                        format!("the interrupted update cannot resume: {e}"),
                    ),
                    "reason",
                    "interrupted",
                );
                self.finish(cmd, r, Changes::durable()).await;
            }
        }
    }

    fn spawn_update(
        &mut self,
        cmd: &pb::Command,
        bytes: &[u8],
        update: ValidUpdate,
        start: Phase,
        deadline_ms: Option<u64>,
    ) {
        let phase = Arc::new(AtomicU8::new(start as u8));
        let cancelled = CancellationToken::new();
        let job = UpdateJob {
            device_id: self.id.clone(),
            cmd: cmd.clone(),
            bytes: bytes.to_vec(),
            update,
            settings: self.settings.clone(),
            state: self.state.clone(),
            live: self.live.clone(),
            mqtt: self.mqtt.clone(),
            outbox: self.outbox.clone(),
            files: self.files.clone(),
            tls: self.tls.clone(),
            installed: self.installed.clone(),
            events: self.update_tx.clone(),
            phase: phase.clone(),
            cancelled: cancelled.clone(),
            stop: self.stop.child_token(),
        };
        self.update = Some(ActiveUpdate {
            command_id: cmd.id.clone(),
            phase,
            cancel: cancelled,
        });
        let span = info_span!("update", device_id = %self.id, command_id = %cmd.id);
        self.tracker
            .spawn(job.run(start, deadline_ms).instrument(span));
    }

    /// An event of the running update job.
    pub(super) async fn update_event(&mut self, event: UpdateEvent) {
        match event {
            UpdateEvent::Progress(r) => self.publish_result(r).await,
            UpdateEvent::Finished(r) => {
                if self
                    .update
                    .as_ref()
                    .is_some_and(|u| u.command_id == r.command_id)
                {
                    self.update = None;
                }
                self.publish_result(r).await;
            }
        }
    }
}
