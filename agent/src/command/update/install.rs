//! Waiting until the terminal is idle and inside its maintenance window, the install hook,
//! the health confirmation and the rollback hook (ADR 0008 "Install on the terminal").
//!
//! Hook environments (besides `POSFLEET_DEVICE_ID`):
//!
//! - `install`: `POSFLEET_ARTIFACT` (the verified file), `POSFLEET_VERSION` (the new version),
//!   `POSFLEET_COMPONENT`, `POSFLEET_ROLLOUT_ID`.
//! - `health`: `POSFLEET_VERSION` (the new version), `POSFLEET_COMPONENT`.
//! - `rollback` after a failed install or confirmation: `POSFLEET_VERSION` (the version to go
//!   back to: what the terminal reported before), `POSFLEET_FAILED_VERSION`,
//!   `POSFLEET_COMPONENT`, `POSFLEET_ROLLOUT_ID`.

use std::path::Path;
use std::time::Duration;

use posfleet_proto::now_ms;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::window::{WINDOW_KEY, Window, local_minute, utc_offset};
use super::{Outcome, Phase, UpdateJob, duration_ms, failed};
use crate::command::{hooks, result};

/// Time allowed for the local API to answer a health probe.
const API_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl UpdateJob {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("POSFLEET_DEVICE_ID", self.device_id.to_string()),
            (
                "POSFLEET_COMPONENT",
                self.update.component.name().to_owned(),
            ),
            ("POSFLEET_ROLLOUT_ID", self.update.rollout_id.clone()),
        ]
    }

    /// Waits (reporting `waiting` once) until no transaction is in the outbox or being
    /// accepted and the terminal is inside its maintenance window, if it has one. Bounded
    /// by the command's validity.
    pub(super) async fn wait_until_idle(&self) -> Result<(), Outcome> {
        self.enter(Phase::Waiting, None).await?;
        loop {
            if self.may_install().await {
                return Ok(());
            }
            if now_ms() > self.cmd.not_after_ms {
                return Err(failed(
                    "expired",
                    "the terminal was not idle inside its maintenance window before the command expired",
                ));
            }
            tokio::select! {
                () = tokio::time::sleep(self.settings.updates.idle_check_every) => {}
                () = self.interrupted() => return Err(self.interruption()),
            }
        }
    }

    async fn may_install(&self) -> bool {
        if !self.outbox.is_idle() {
            return false;
        }
        let config = self.live.get().config;
        let Some(text) = config.get(WINDOW_KEY).and_then(|v| v.as_str()) else {
            return true;
        };
        let Some(window) = Window::parse(text) else {
            warn!(window = %text, "maintenance.window is not HH:MM-HH:MM; ignored");
            return true;
        };
        let now_s = i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX);
        let path = self.settings.updates.localtime.clone();
        // Reads the time zone file: blocking.
        let offset = tokio::task::spawn_blocking(move || utc_offset(&path, now_s))
            .await
            .unwrap_or(0);
        window.contains(local_minute(now_s, offset))
    }

    /// Runs the install hook (`installing` carries a confirmation deadline that covers the
    /// hook's run: a restart during it resumes confirming), then confirms.
    pub(super) async fn install(&self) -> Result<(), Outcome> {
        let hooks = &self.settings.hooks;
        let Some(hook) = hooks.install.clone() else {
            return Err(failed("no_install_hook", "no install hook configured"));
        };
        let confirm = duration_ms(self.update.confirm_timeout);
        let through_hook = now_ms()
            .saturating_add(duration_ms(hooks.timeout))
            .saturating_add(confirm);
        self.enter(Phase::Installing, Some(through_hook)).await?;
        let mut env = self.env();
        env.push((
            "POSFLEET_ARTIFACT",
            self.artifact_path().display().to_string(),
        ));
        env.push(("POSFLEET_VERSION", self.update.version.clone()));
        // Not interrupted when the agent stops: a half-run installer is worse than a late
        // shutdown (the hook's own timeout bounds it).
        let run = hooks::run(&hook, &env, hooks.timeout, 0).await;
        if !run.succeeded() {
            let rollback = self.rollback_hook().await;
            return Err(Outcome::Failed {
                reason: "install_failed",
                message: format!("the install hook {}", run.describe()),
                details: vec![
                    ("hook_exit", run.exit_detail()),
                    ("rollback_exit", rollback),
                ],
            });
        }
        info!(version = %self.update.version, "install hook finished; confirming health");
        let deadline = now_ms().saturating_add(confirm);
        self.enter(Phase::Confirming, Some(deadline)).await?;
        self.confirm(deadline).await
    }

    /// Checks health until it holds or `deadline_ms` passes (then rolls back).
    pub(super) async fn confirm(&self, deadline_ms: u64) -> Result<(), Outcome> {
        loop {
            let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
            if left.is_zero() {
                break;
            }
            if self.healthy(left).await {
                return Ok(());
            }
            let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
            tokio::select! {
                () = tokio::time::sleep(self.settings.updates.health_check_every.min(left)) => {}
                () = self.stop.cancelled() => return Err(Outcome::Stopped),
            }
        }
        let rollback = self.rollback_hook().await;
        Err(Outcome::Failed {
            reason: "health_timeout",
            message: format!(
                "health was not confirmed within {:?} of the install",
                self.update.confirm_timeout
            ),
            details: vec![("rollback_exit", rollback)],
        })
    }

    /// Connected to the broker, the local API answering (when the terminal has one) and the
    /// health hook (when configured) exiting 0 within `left`.
    async fn healthy(&self, left: Duration) -> bool {
        if !self.mqtt.is_connected() {
            debug!("health: not connected to the broker");
            return false;
        }
        if let Some(socket) = &self.files.api_socket
            && !api_answers(socket).await
        {
            debug!("health: the local API does not answer");
            return false;
        }
        let Some(hook) = &self.settings.hooks.health else {
            return true;
        };
        let mut env = self.env();
        env.push(("POSFLEET_VERSION", self.update.version.clone()));
        let run = hooks::run(hook, &env, self.settings.hooks.timeout.min(left), 0).await;
        if !run.succeeded() {
            debug!(exit = %run.exit_detail(), "health: the health hook did not succeed");
        }
        run.succeeded()
    }

    /// Runs the rollback hook; returns its exit detail (`none` without a hook).
    async fn rollback_hook(&self) -> String {
        let Some(hook) = self.settings.hooks.rollback.clone() else {
            warn!("no rollback hook configured; nothing undone");
            return "none".into();
        };
        let previous = self
            .update
            .component
            .of(&self.live.get().versions)
            .to_owned();
        let mut env = self.env();
        env.push(("POSFLEET_VERSION", previous));
        env.push(("POSFLEET_FAILED_VERSION", self.update.version.clone()));
        let run = hooks::run(&hook, &env, self.settings.hooks.timeout, 0).await;
        if !run.succeeded() {
            warn!(exit = %run.exit_detail(), "the rollback hook failed");
        }
        run.exit_detail()
    }

    /// Health confirmed: the new version and the result in one durable write.
    pub(super) async fn succeed(&self) {
        let mut installed = self
            .installed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        *installed.slot(self.update.component) = Some(self.update.version.clone());
        let r = result::with(
            result::succeeded(&self.cmd.id, format!("{} is running", self.update.version)),
            "version",
            &self.update.version,
        );
        info!(version = %self.update.version, component = self.update.component.name(), "software update confirmed");
        self.end(r, Some(installed)).await;
    }
}

/// Whether the local API answers `GET /v1/status` with 200 on its Unix socket.
async fn api_answers(socket: &Path) -> bool {
    let probe = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream
            .write_all(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        std::io::Result::Ok(head)
    };
    matches!(
        tokio::time::timeout(API_PROBE_TIMEOUT, probe).await,
        Ok(Ok(head)) if &head[9..12] == b"200"
    )
}
