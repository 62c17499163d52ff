//! The agent runtime: one terminal's MQTT session, presence, heartbeats and telemetry.
//!
//! [`Agent::spawn`] starts four tracked tasks:
//!
//! - the [MQTT session](posfleet_runtime::mqtt) (subscribed to the device's downlink filter, with the
//!   last will `Presence{OFFLINE, "connection_lost"}`);
//! - an event consumer: it wakes the runtime, the outbox sender and the command executor on
//!   every connect, hands `txack` messages to the sender's [`AckInbox`] and `cmd` messages
//!   to the [command executor](crate::command) through a bounded queue (full: dropped and
//!   counted; the controller re-sends). It never waits on a publish, the sender or the
//!   executor, so the session can always deliver events (see the session's back-pressure
//!   rules);
//! - the [command executor](crate::command): verifies, journals and runs commands, applies
//!   leases, and locks the terminal when the offline lease expires;
//! - the [outbox sender](crate::outbox): publishes the terminal's transactions in batches
//!   and applies the controller's acks;
//! - the runtime: after every connect it publishes `Presence{ONLINE}` and a
//!   `ReportedState` (and another `ReportedState` whenever the lock or configuration
//!   changes); every heartbeat interval a `Heartbeat` (skipped while disconnected);
//!   every telemetry interval a `Telemetry`, with `try_publish`: a sample that cannot be
//!   queued, or is due while disconnected, is dropped and counted in the next sample's
//!   `dropped_samples`. On cancellation it publishes `Presence{OFFLINE, "shutdown"}`, waits
//!   up to [`AgentSettings::shutdown_grace`] for the broker's ack, then disconnects.
//!
//! All publishes are QoS 1. The device id always comes from the client certificate.

mod report;
mod run;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use posfleet_proto::signing::KeyRing;
use posfleet_proto::{Channel, DeviceId, Filter, Topic, encode, now_ms};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use report::{AGENT_VERSION, REASON_CONNECTION_LOST, REASON_SHUTDOWN};
pub(crate) use run::publish;

use crate::command::{
    self, CommandSettings, CommandSetup, Executor, ExecutorParts, TerminalFiles, UpdateSettings,
};
use crate::config::{Config, SensorSource};
use crate::outbox::{AckInbox, AckStats, DeviceOutbox, Outbox, OutboxError, Sender};
use crate::state::{DEFAULT_STATE_CACHE_CAPACITY, LiveState, StateError, StateStore};
use crate::telemetry::{NoSensors, OsSystem, SensorProvider, SimulatedSensors, SystemProvider};
use crate::transaction::TransactionIntake;
use posfleet_runtime::backoff::Backoff;
use posfleet_runtime::mqtt::{self, MqttError, MqttHandle, SessionConfig};
use posfleet_runtime::tls::{self, TlsError};
use posfleet_runtime::value::BrokerUrl;

/// What the terminal says about itself (from the config file, or made up by the simulator).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Hardware model, reported in Presence and ReportedState (fleet views group by it).
    pub model: String,
    /// Manufacturer serial number: what is printed on the terminal, for custody and support.
    pub serial: String,
    /// Terminal firmware version (SoftwareVersions.firmware); rollouts target it.
    pub firmware_version: String,
    /// Payment application version (SoftwareVersions.payment_app).
    pub payment_app_version: String,
}

/// How the agent runs, apart from its identity and telemetry providers.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The MQTT broker; its certificate must be valid for the host.
    pub broker: BrokerUrl,
    /// MQTT keep-alive: how fast the broker notices a dead terminal (and fires the will).
    pub keep_alive: Duration,
    /// Time allowed for TCP connect + TLS handshake + CONNACK.
    pub connect_timeout: Duration,
    /// Reconnect delays (full jitter keeps a fleet from reconnecting in lock-step).
    pub backoff: Backoff,
    /// Heartbeat period; the controller marks the terminal offline after 3 missed.
    pub heartbeat_interval: Duration,
    /// Telemetry period.
    pub telemetry_interval: Duration,
    /// What the terminal reports about itself.
    pub device: DeviceInfo,
    /// Time allowed at shutdown for the OFFLINE presence to be acknowledged.
    pub shutdown_grace: Duration,
}

impl AgentSettings {
    /// Settings with the documented defaults for everything but the broker.
    pub fn new(broker: BrokerUrl) -> Self {
        Self {
            broker,
            keep_alive: crate::config::DEFAULT_KEEP_ALIVE,
            connect_timeout: crate::config::DEFAULT_CONNECT_TIMEOUT,
            backoff: Backoff::default(),
            heartbeat_interval: crate::config::DEFAULT_HEARTBEAT_INTERVAL,
            telemetry_interval: crate::config::DEFAULT_TELEMETRY_INTERVAL,
            device: DeviceInfo::default(),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// Why an agent could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot create the data directory {}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the MQTT session")]
    Session(#[from] MqttError),
    #[error("cannot encode the last will")]
    Encode(#[from] posfleet_proto::CodecError),
    #[error("cannot open the transaction outbox")]
    Outbox(#[from] OutboxError),
    #[error("cannot open the agent's state store")]
    State(#[from] StateError),
    #[error(
        "cannot read the trusted command key file {}; commands.trusted_keys must name the controller's command.pub (from the device bundle)",
        path.display()
    )]
    TrustedKeys {
        path: PathBuf,
        #[source]
        source: posfleet_proto::pki::PkiError,
    },
    #[error(
        "no trusted command key configured (commands.trusted_keys); the agent refuses to start without one"
    )]
    NoTrustedKeys,
    #[error(
        "cannot read the trusted release key file {}; updates.trusted_release_keys must name the release.pub of the fleet's release key",
        path.display()
    )]
    ReleaseKeys {
        path: PathBuf,
        #[source]
        source: posfleet_proto::pki::PkiError,
    },
}

/// One terminal, ready to run.
pub struct Agent {
    /// Proven by the certificate in `tls`; also the MQTT client id and topic device.
    id: DeviceId,
    /// Trusted CAs and the device certificate.
    tls: Arc<rustls::ClientConfig>,
    settings: AgentSettings,
    /// Source of telemetry system metrics.
    system: Box<dyn SystemProvider>,
    /// Source of telemetry sensor readings.
    sensors: Box<dyn SensorProvider>,
    /// This terminal's part of the transaction outbox.
    outbox: DeviceOutbox,
    /// Lock and configuration as the rest of the agent sees them (the intake refuses
    /// transactions while locked).
    live: LiveState,
    /// Keys, hooks, state and files of the command executor.
    commands: CommandSetup,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent for an identity held in memory (the simulator's way). `tls` must present the
    /// certificate of `id`; `outbox` and `commands` must be those of `id`. A lease that
    /// expired while the agent was down locks the terminal right here.
    pub fn new(
        id: DeviceId,
        tls: Arc<rustls::ClientConfig>,
        settings: AgentSettings,
        (system, sensors): (Box<dyn SystemProvider>, Box<dyn SensorProvider>),
        outbox: DeviceOutbox,
        commands: CommandSetup,
    ) -> Self {
        let mut status = commands.initial_status(now_ms());
        status.versions = commands
            .snapshot
            .installed
            .over(report::configured_versions(&settings.device));
        let live = LiveState::new(status);
        Self {
            id,
            tls,
            settings,
            system,
            sensors,
            outbox,
            live,
            commands,
        }
    }

    /// The agent of a real terminal: identity from the certificate files, OS metrics, the
    /// configured sensor provider, its part of `outbox` and `state` (see [`open_outbox`],
    /// [`open_state`]), the trusted command keys of the config. Blocking (it reads files and
    /// the stores).
    pub fn from_config(
        cfg: &Config,
        outbox: &Outbox,
        state: &StateStore,
    ) -> Result<Self, AgentError> {
        let keys = load_trusted_keys(&cfg.commands.trusted_keys)?;
        let release_keys = load_release_keys(&cfg.updates.trusted_release_keys)?;
        let (id, tls) = tls::load_device_identity(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
        let outbox = outbox.device(&id)?;
        let mut updates = UpdateSettings {
            release_keys,
            confirm_timeout: cfg.updates.confirm_timeout,
            retry_attempts: cfg.updates.retry_attempts,
            ..UpdateSettings::default()
        };
        updates.retry_backoff.max = cfg.updates.max_retry_delay;
        let command_settings = CommandSettings {
            keys,
            hooks: cfg.hooks.clone(),
            max_offline: cfg.commands.max_offline,
            updates,
        };
        let files = TerminalFiles {
            config: cfg.data_dir.join("config.json"),
            identity: vec![cfg.tls.key.clone(), cfg.tls.cert.clone()],
            updates_dir: cfg.updates.download_dir.clone(),
            update_prefix: String::new(),
            api_socket: Some(cfg.local_api.socket.clone()),
        };
        let commands = CommandSetup::load(Arc::new(command_settings), state.device(&id), files)?;
        let sensors: Box<dyn SensorProvider> = match cfg.sensors {
            SensorSource::Simulated => Box::new(SimulatedSensors::new(seed_of(&id))),
            SensorSource::None => Box::new(NoSensors),
        };
        let settings = AgentSettings {
            broker: cfg.broker.clone(),
            keep_alive: cfg.keep_alive,
            connect_timeout: cfg.connect_timeout,
            backoff: cfg.backoff,
            heartbeat_interval: cfg.heartbeat_interval,
            telemetry_interval: cfg.telemetry_interval,
            device: cfg.device.clone(),
            shutdown_grace: Duration::from_secs(2),
        };
        let system = Box::new(OsSystem::new(cfg.data_dir.clone()));
        Ok(Self::new(
            id,
            tls,
            settings,
            (system, sensors),
            outbox,
            commands,
        ))
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.id
    }

    /// Starts the agent's tasks on `tracker`; they run until `cancel` is cancelled (or a wipe
    /// stops the agent), then shut down gracefully (see the module docs) within about
    /// `shutdown_grace` plus one second.
    pub fn spawn(
        self,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<AgentHandle, AgentError> {
        // The agent's own token: a wipe cancels it.
        let cancel = cancel.child_token();
        let wiped = CancellationToken::new();
        let heartbeat_interval_s =
            u32::try_from(self.settings.heartbeat_interval.as_secs()).unwrap_or(u32::MAX);
        let reporter = report::Reporter::new(self.settings.device.clone(), heartbeat_interval_s);

        let mut session = SessionConfig::new(
            self.settings.broker.host.clone(),
            self.settings.broker.port,
            self.id.as_str(),
            self.tls.clone(),
        );
        session.keep_alive = self.settings.keep_alive;
        session.connect_timeout = self.settings.connect_timeout;
        session.backoff = self.settings.backoff;
        session.subscriptions = vec![Filter::device_downlink(&self.id)];
        session.last_will = Some((
            Topic::for_device(&self.id, Channel::Presence),
            encode(&reporter.last_will(&self.live.get()))?,
        ));
        // The session outlives `cancel` on purpose: the runtime still publishes the OFFLINE
        // presence and disconnects after it. The runtime cancels this token when it ends
        // (also if it panics), which stops the session abruptly if the graceful way failed.
        let session_cancel = CancellationToken::new();
        let (mqtt, events) = mqtt::spawn_session(session, tracker, session_cancel.clone())?;

        let stats = Arc::new(AgentStats::default());
        let inbox = Arc::new(AckInbox::default());
        let (online_tx, online_rx) = tokio::sync::watch::channel(0u64);
        let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(command::QUEUE_CAPACITY);
        tracker.spawn(run::consume_events(
            self.id.clone(),
            events,
            online_tx,
            stats.clone(),
            (inbox.clone(), commands_tx),
        ));
        let executor = Executor::new(
            self.commands,
            ExecutorParts {
                id: self.id.clone(),
                live: self.live.clone(),
                mqtt: mqtt.clone(),
                outbox: self.outbox.clone(),
                stats: stats.clone(),
                stop: cancel.clone(),
                wiped: wiped.clone(),
                tls: self.tls.clone(),
                tracker: tracker.clone(),
            },
        );
        tracker.spawn(executor.run(commands_rx, online_rx.clone(), cancel.clone()));
        let sender = Sender::new(
            self.outbox.clone(),
            mqtt.clone(),
            inbox.clone(),
            *self.outbox.settings(),
            online_rx.clone(),
        );
        tracker.spawn(sender.run(cancel.clone()));
        let intake = TransactionIntake::new(self.outbox, self.live);
        let runtime = run::Runtime::new(
            self.id.clone(),
            self.settings,
            reporter,
            mqtt.clone(),
            (self.system, self.sensors),
            stats.clone(),
            intake.clone(),
        );
        tracker.spawn(runtime.run(online_rx, cancel, session_cancel));
        Ok(AgentHandle {
            id: self.id,
            mqtt,
            stats,
            intake,
            inbox,
            wiped,
        })
    }
}

/// Counters of one agent (monotonic).
#[derive(Debug, Default)]
pub(crate) struct AgentStats {
    /// See [`AgentStatsSnapshot`] for each counter's meaning.
    heartbeats: AtomicU64,
    heartbeats_skipped: AtomicU64,
    telemetry: AtomicU64,
    telemetry_dropped: AtomicU64,
    downlink: AtomicU64,
    pub(crate) commands: AtomicU64,
    pub(crate) commands_rejected: AtomicU64,
    pub(crate) commands_malformed: AtomicU64,
    pub(crate) commands_dropped: AtomicU64,
}

/// A snapshot of an agent's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStatsSnapshot {
    /// Heartbeats queued for sending.
    pub heartbeats: u64,
    /// Heartbeats not sent (disconnected, or the queue stayed full).
    pub heartbeats_skipped: u64,
    /// Telemetry samples queued for sending.
    pub telemetry: u64,
    /// Telemetry samples dropped (disconnected or queue full).
    pub telemetry_dropped: u64,
    /// Downlink messages received.
    pub downlink: u64,
    /// Verified commands executed (not counting leases and replays).
    pub commands: u64,
    /// Commands refused by verification (signature, key, device, validity, kind).
    pub commands_rejected: u64,
    /// Command payloads that were not a `SignedCommand` at all.
    pub commands_malformed: u64,
    /// Command payloads dropped because the executor's queue was full.
    pub commands_dropped: u64,
}

/// A running agent.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    id: DeviceId,
    /// The agent's session, for connection state and session counters.
    mqtt: MqttHandle,
    /// Shared with the agent's tasks, which update it.
    stats: Arc<AgentStats>,
    /// The accept path for transactions (local API, simulator), with the outbox and lock.
    intake: TransactionIntake,
    /// Acks received, for their counters.
    inbox: Arc<AckInbox>,
    /// Cancelled once a wipe has finished (the agent stops).
    wiped: CancellationToken,
}

impl AgentHandle {
    pub fn device_id(&self) -> &DeviceId {
        &self.id
    }

    /// The agent's MQTT session (connection state, session counters).
    pub fn mqtt(&self) -> &MqttHandle {
        &self.mqtt
    }

    pub fn is_connected(&self) -> bool {
        self.mqtt.is_connected()
    }

    /// The accept path for this terminal's transactions.
    pub fn intake(&self) -> &TransactionIntake {
        &self.intake
    }

    /// This terminal's outbox.
    pub fn outbox(&self) -> &DeviceOutbox {
        self.intake.outbox()
    }

    /// The terminal's lock and configuration.
    pub fn live(&self) -> &LiveState {
        self.intake.live()
    }

    /// Waits until a wipe has finished (the agent then stops; a real agent exits).
    pub async fn wiped(&self) {
        self.wiped.cancelled().await;
    }

    pub fn is_wiped(&self) -> bool {
        self.wiped.is_cancelled()
    }

    /// Counters of the transaction acks received.
    pub fn ack_stats(&self) -> AckStats {
        self.inbox.stats()
    }

    pub fn stats(&self) -> AgentStatsSnapshot {
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AgentStatsSnapshot {
            heartbeats: get(&s.heartbeats),
            heartbeats_skipped: get(&s.heartbeats_skipped),
            telemetry: get(&s.telemetry),
            telemetry_dropped: get(&s.telemetry_dropped),
            downlink: get(&s.downlink),
            commands: get(&s.commands),
            commands_rejected: get(&s.commands_rejected),
            commands_malformed: get(&s.commands_malformed),
            commands_dropped: get(&s.commands_dropped),
        }
    }
}

/// A seed for per-device simulated values, stable for a given build.
pub(crate) fn seed_of(id: &DeviceId) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Opens the outbox of a real terminal in `DATA_DIR/outbox` (creating the data directory,
/// 0700, if it is missing). Blocking.
pub fn open_outbox(cfg: &Config) -> Result<Outbox, AgentError> {
    create_data_dir(&cfg.data_dir)?;
    Ok(Outbox::open(&cfg.data_dir.join("outbox"), cfg.outbox)?)
}

/// Opens the state store of a real terminal in `DATA_DIR/state`. Blocking.
pub fn open_state(cfg: &Config) -> Result<StateStore, AgentError> {
    create_data_dir(&cfg.data_dir)?;
    Ok(StateStore::open(
        &cfg.data_dir.join("state"),
        DEFAULT_STATE_CACHE_CAPACITY,
    )?)
}

/// Every key in the trusted key files (a file may hold several). Blocking.
pub fn load_trusted_keys(paths: &[PathBuf]) -> Result<KeyRing, AgentError> {
    let mut keys = Vec::new();
    for path in paths {
        let read = posfleet_proto::pki::read_public_keys(path).map_err(|source| {
            AgentError::TrustedKeys {
                path: path.clone(),
                source,
            }
        })?;
        keys.extend(read);
    }
    if keys.is_empty() {
        return Err(AgentError::NoTrustedKeys);
    }
    Ok(KeyRing::new(keys))
}

/// Every key in the trusted release key files (none configured: an empty ring, and every
/// software update is refused). Blocking.
pub fn load_release_keys(paths: &[PathBuf]) -> Result<KeyRing, AgentError> {
    let mut keys = Vec::new();
    for path in paths {
        let read = posfleet_proto::pki::read_public_keys(path).map_err(|source| {
            AgentError::ReleaseKeys {
                path: path.clone(),
                source,
            }
        })?;
        keys.extend(read);
    }
    Ok(KeyRing::new(keys))
}

fn create_data_dir(path: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| AgentError::DataDir {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod delivery_tests;
#[cfg(test)]
mod tests;
