//! The body of `posfleet-agent run`: one terminal from its config file, until `shutdown`
//! resolves, a wipe, or the MQTT session ends.
//!
//! The outbox and state stores stay open for the whole run. The agent itself (session,
//! executor, sender, local API, [renewal](crate::renew)) runs in a loop: when the renewal
//! task installs a new certificate, everything of the agent stops gracefully (OFFLINE
//! presence, disconnect) and starts again from the files, so the new session presents the
//! new certificate; the renewal task of the new round confirms it to the controller.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::agent::{Agent, open_outbox, open_state};
use crate::api::{ApiState, LocalApi};
use crate::config::Config;
use crate::renew::{self, RenewSettings};

/// Exit status after a wipe: the terminal has no identity left, a supervisor must not
/// restart the agent (the systemd unit says `RestartPreventExitStatus=3`).
pub const EXIT_WIPED: u8 = 3;
/// Time the tasks get to stop after SIGTERM/SIGINT (and before a restart with a renewed
/// certificate).
pub const GRACE: Duration = Duration::from_secs(5);

/// How one round of the agent ended.
enum Round {
    /// Exit with this result.
    Exit(anyhow::Result<ExitCode>),
    /// A renewed certificate is installed: start again with it.
    Renewed,
}

/// Runs the terminal configured in `path` until `shutdown` resolves (SIGTERM/SIGINT in the
/// binary; a token in tests), a wipe, or an unexpected end of the MQTT session.
pub async fn run_terminal(
    path: &Path,
    shutdown: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let renewal = RenewSettings::from_config(&config);
    if renewal.is_none() {
        warn!("tls.device_url is not set: automatic certificate renewal is off");
    }
    // Opening the stores blocks: off the runtime.
    let cfg = config.clone();
    let (outbox, state) =
        tokio::task::spawn_blocking(move || anyhow::Ok((open_outbox(&cfg)?, open_state(&cfg)?)))
            .await
            .context("opening the stores panicked")?
            .with_context(|| format!("cannot start the agent configured in {}", path.display()))?;
    tokio::pin!(shutdown);
    let outcome = loop {
        // Finish an interrupted certificate swap before the identity is read; reading the
        // certificate files and the stores blocks.
        let cfg = config.clone();
        let (files, state, outbox_ref) = (
            renewal.as_ref().map(|r| r.files.clone()),
            state.clone(),
            outbox.clone(),
        );
        let started = tokio::task::spawn_blocking(move || {
            if let Some(files) = files {
                files
                    .recover()
                    .context("cannot finish the interrupted certificate renewal")?;
            }
            anyhow::Ok(Agent::from_config(&cfg, &outbox_ref, &state)?)
        })
        .await
        .context("starting the agent panicked")?
        .with_context(|| format!("cannot start the agent configured in {}", path.display()));
        let agent = match started {
            Ok(a) => a,
            Err(e) => break Err(e),
        };
        info!(device_id = %agent.device_id(), broker = %config.broker, "posfleet-agent starting");
        match run_round(agent, &config, renewal.as_ref(), &mut shutdown).await {
            Round::Exit(outcome) => break outcome,
            Round::Renewed => info!("restarting the agent with the renewed certificate"),
        }
    };
    // Everything accepted is already durable; this only finishes queued removals.
    outbox.close().await;
    outcome
}

async fn run_round(
    agent: Agent,
    config: &Config,
    renewal: Option<&RenewSettings>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = anyhow::Result<()>>>,
) -> Round {
    let api = match LocalApi::bind(&config.local_api).context("cannot start the local API") {
        Ok(api) => api,
        Err(e) => return Round::Exit(Err(e)),
    };
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let handle = match agent.spawn(&tracker, cancel.child_token()) {
        Ok(h) => h,
        Err(e) => {
            stop(cancel, tracker).await;
            return Round::Exit(Err(e.into()));
        }
    };
    api.serve(
        ApiState::new(handle.clone()),
        &tracker,
        cancel.child_token(),
    );
    let renewed = CancellationToken::new();
    if let Some(settings) = renewal {
        tracker.spawn(renew::run(
            settings.clone(),
            handle.mqtt().clone(),
            renewed.clone(),
            cancel.child_token(),
        ));
    }
    let round = tokio::select! {
        signal = shutdown.as_mut() => Round::Exit(signal.map(|()| ExitCode::SUCCESS)),
        () = handle.wiped() => {
            warn!("the terminal was wiped by command; the agent exits and must be re-enrolled");
            Round::Exit(Ok(ExitCode::from(EXIT_WIPED)))
        }
        () = renewed.cancelled() => Round::Renewed,
        () = handle.mqtt().closed() => Round::Exit(if handle.is_wiped() {
            Ok(ExitCode::from(EXIT_WIPED))
        } else {
            Err(anyhow::anyhow!(
                "the MQTT session ended unexpectedly; exiting so the supervisor restarts the agent"
            ))
        }),
    };
    let drained = stop(cancel, tracker).await;
    match round {
        // Never run two agents of one terminal at once: the supervisor restarts us instead.
        Round::Renewed if !drained => Round::Exit(Err(anyhow::anyhow!(
            "the agent did not stop in time to restart with the renewed certificate; exiting so the supervisor restarts it"
        ))),
        other => other,
    }
}

/// Cancels everything and waits up to [`GRACE`] for the tasks to finish; whether they did.
pub async fn stop(cancel: CancellationToken, tracker: TaskTracker) -> bool {
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(GRACE, tracker.wait()).await.is_err() {
        warn!(
            grace = ?GRACE,
            remaining = tracker.len(),
            "tasks did not stop within the grace period"
        );
        false
    } else {
        info!("stopped");
        true
    }
}
