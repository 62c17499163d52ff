//! The agent runtime: one terminal's MQTT session, presence, heartbeats and telemetry.
//!
//! [`Agent::spawn`] starts four tracked tasks:
//!
//! - the [MQTT session](crate::mqtt) (subscribed to the device's downlink filter, with the
//!   last will `Presence{OFFLINE, "connection_lost"}`);
//! - an event consumer: it wakes the runtime and the outbox sender on every connect, hands
//!   `txack` messages to the sender's [`AckInbox`] and logs other downlink messages
//!   (commands are not implemented yet; they are ignored at debug level). It never waits on
//!   a publish or on the sender, so the session can always deliver events (see the
//!   session's back-pressure rules);
//! - the [outbox sender](crate::outbox): publishes the terminal's transactions in batches
//!   and applies the controller's acks;
//! - the runtime: after every connect it publishes `Presence{ONLINE}` and a
//!   `ReportedState`; every heartbeat interval a `Heartbeat` (skipped while disconnected);
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

use posfleet_proto::{Channel, DeviceId, Filter, Topic, encode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use report::{AGENT_VERSION, REASON_CONNECTION_LOST, REASON_SHUTDOWN};

use crate::backoff::Backoff;
use crate::config::{BrokerUrl, Config, SensorSource};
use crate::mqtt::{self, MqttError, MqttHandle, SessionConfig};
use crate::outbox::{AckInbox, AckStats, DeviceOutbox, Outbox, OutboxError, Sender};
use crate::telemetry::{NoSensors, OsSystem, SensorProvider, SimulatedSensors, SystemProvider};
use crate::tls::{self, TlsError};
use crate::transaction::{LockState, TransactionIntake};

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
    /// Whether the terminal refuses transactions.
    lock: LockState,
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
    /// certificate of `id`; `outbox` must be the outbox of `id`.
    pub fn new(
        id: DeviceId,
        tls: Arc<rustls::ClientConfig>,
        settings: AgentSettings,
        system: Box<dyn SystemProvider>,
        sensors: Box<dyn SensorProvider>,
        outbox: DeviceOutbox,
    ) -> Self {
        Self {
            id,
            tls,
            settings,
            system,
            sensors,
            outbox,
            lock: LockState::default(),
        }
    }

    /// The agent of a real terminal: identity from the certificate files, OS metrics, the
    /// configured sensor provider, its part of `outbox` (see [`open_outbox`]). Blocking (it
    /// reads files and counts the outbox).
    pub fn from_config(cfg: &Config, outbox: &Outbox) -> Result<Self, AgentError> {
        let (id, tls) = tls::load_device_identity(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
        let outbox = outbox.device(&id)?;
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
        Ok(Self::new(id, tls, settings, system, sensors, outbox))
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.id
    }

    /// Starts the agent's tasks on `tracker`; they run until `cancel` is cancelled, then shut
    /// down gracefully (see the module docs) within about `shutdown_grace` plus one second.
    pub fn spawn(
        self,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<AgentHandle, AgentError> {
        let heartbeat_interval_s =
            u32::try_from(self.settings.heartbeat_interval.as_secs()).unwrap_or(u32::MAX);
        let reporter = report::Reporter::new(self.settings.device.clone(), heartbeat_interval_s);

        let mut session = SessionConfig::new(
            self.settings.broker.host.clone(),
            self.settings.broker.port,
            self.id.as_str(),
            self.tls,
        );
        session.keep_alive = self.settings.keep_alive;
        session.connect_timeout = self.settings.connect_timeout;
        session.backoff = self.settings.backoff;
        session.subscriptions = vec![Filter::device_downlink(&self.id)];
        session.last_will = Some((
            Topic::for_device(&self.id, Channel::Presence),
            encode(&reporter.last_will())?,
        ));
        // The session outlives `cancel` on purpose: the runtime still publishes the OFFLINE
        // presence and disconnects after it. The runtime cancels this token when it ends
        // (also if it panics), which stops the session abruptly if the graceful way failed.
        let session_cancel = CancellationToken::new();
        let (mqtt, events) = mqtt::spawn_session(session, tracker, session_cancel.clone())?;

        let stats = Arc::new(AgentStats::default());
        let inbox = Arc::new(AckInbox::default());
        let (online_tx, online_rx) = tokio::sync::watch::channel(0u64);
        tracker.spawn(run::consume_events(
            self.id.clone(),
            events,
            online_tx,
            stats.clone(),
            inbox.clone(),
        ));
        let sender = Sender::new(
            self.outbox.clone(),
            mqtt.clone(),
            inbox.clone(),
            *self.outbox.settings(),
            online_rx.clone(),
        );
        tracker.spawn(sender.run(cancel.clone()));
        let intake = TransactionIntake::new(self.outbox, self.lock);
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
    /// Downlink messages received (and, for now, ignored).
    pub downlink: u64,
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
