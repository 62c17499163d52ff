//! The fleet simulator: N virtual terminals in one process, each the real [`Agent`] with its
//! own certificate, MQTT session, heartbeats, telemetry ([`SimulatedSystem`] and
//! [`SimulatedSensors`] instead of the host's numbers) and transactions.
//!
//! Every terminal generates its key here; its certificate comes from
//! [`SimulatorConfig::issuer`] (the controller, which records each one, so a simulated terminal
//! can be revoked like a real one; see `issuer.rs`), a batch at a time as the ramp goes. The
//! simulator reads only the public files of a PKI directory (`ca.crt`, `command.pub`,
//! `release.pub`), never the CA's key. The root store and crypto provider are shared by all
//! terminals. Terminals start at
//! [`SimulatorConfig::connect_rate`] per second so a large fleet does not storm the broker;
//! [`run_simulator`] returns as soon as the first terminal is built and the ramp has begun.
//!
//! Transactions: every terminal's till ([`transactions::TxnGenerator`]) produces
//! [`SimulatorConfig::tx_rate_per_minute`] transactions per minute on average (Poisson
//! arrivals) and hands each to the terminal's [`TransactionIntake::accept`], the same call
//! the local API's `POST /v1/transactions` makes. About 1% are sent twice, as a payment
//! application retrying after a lost answer would. All terminals share **one** outbox store
//! in [`SimulatorConfig::data_dir`] (one sled `Db`, keys prefixed by device id), so one
//! group commit covers many terminals. [`SimulatorHandle::transaction_stats`] counts, per
//! terminal, what was accepted, and [`SimulatorHandle::accepted_records`] lists every
//! `(device, seq, txn_id)` when [`SimulatorConfig::record_accepted`] is set: what the fault
//! tests compare with what the controller stored.
//!
//! Commands: every terminal runs the same [command executor](crate::command) as a real one,
//! trusting the PKI directory's `command.pub`, with [`SimulatorConfig::hooks`] and
//! [`SimulatorConfig::max_offline`]. All terminals share **one** state store
//! (`DATA/state`); a terminal's applied configuration file is `DATA/config/<id>/config.json`. A
//! wiped terminal stops and stays disconnected (its identity lived in memory only).
//!
//! Software updates: the same executor; downloads present the terminal's in-memory
//! certificate, go to the shared `DATA/updates` (file names start with the device id), and
//! are verified with the PKI directory's `release.pub` when it exists (without it every update
//! is refused). The install, rollback and health hooks are those of [`SimulatorConfig::hooks`].
//!
//! Connections: [`SimulatorHandle::connections`] counts connected terminals, connection
//! attempts and CONNACK times over the fleet; `simulate --report-every` prints it as one
//! machine-readable line per period ([`FleetConnections::to_line`]) for benchmarks.

mod issuer;
mod report;
mod till;
pub mod transactions;

pub use issuer::{
    ApiIssuer, CertIssuer, CertRequest, IssueError, IssueFuture, MAX_ISSUE_BATCH, key_requests,
};
pub use report::{FleetConnections, REPORT_PREFIX, ReportLineError};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::{CertifiedKey, PkiDir, PkiError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::agent::{Agent, AgentError, AgentHandle, AgentSettings, DeviceInfo};
use crate::command::{
    CommandSettings, CommandSetup, DEFAULT_MAX_OFFLINE, HookSettings, TerminalFiles,
};
use crate::outbox::{DeviceOutbox, Outbox, OutboxError, OutboxSettings};
use crate::state::{StateError, StateStore};
use crate::telemetry::{SimulatedSensors, SimulatedSystem};
use posfleet_runtime::tls::{self, TlsError};
use posfleet_runtime::value::BrokerUrl;
use till::start_till;

/// The release public key(s) in a PKI directory, trusted for software updates when present.
pub const RELEASE_PUB: &str = "release.pub";
/// Default device id prefix: ids are `{prefix}{index:05}`.
pub const DEFAULT_ID_PREFIX: &str = "sim-";
/// Default terminals started per second.
pub const DEFAULT_CONNECT_RATE: u32 = 200;
/// Most terminals one simulator runs.
pub const MAX_COUNT: usize = 100_000;
/// Default transactions per terminal per minute.
pub const DEFAULT_TX_RATE_PER_MINUTE: f64 = 4.0;
/// Default sled cache of the simulator's shared outbox.
pub const DEFAULT_SIM_CACHE_CAPACITY: u64 = 64 * 1024 * 1024;
/// Default sled cache of the simulator's shared state store.
pub const DEFAULT_SIM_STATE_CACHE_CAPACITY: u64 = 8 * 1024 * 1024;
/// Most transactions per terminal per minute (one terminal accepts one at a time).
pub const MAX_TX_RATE_PER_MINUTE: f64 = 60_000.0;

/// What to simulate. Build with [`SimulatorConfig::new`] and adjust.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// Number of terminals.
    pub count: usize,
    /// PKI directory with the fleet CA certificate and the command key (`ca.crt`,
    /// `command.pub`, optionally `release.pub`); the CA's key is not needed.
    pub pki_dir: std::path::PathBuf,
    /// Issues (and records) the terminals' certificates.
    pub issuer: Arc<dyn CertIssuer>,
    /// Everything but the device strings is used for every terminal.
    pub agent: AgentSettings,
    /// Device ids are `{id_prefix}{index:05}`, index from 0.
    pub id_prefix: String,
    /// Terminals started per second (at least 1).
    pub connect_rate: u32,
    /// The shared outbox store of all terminals (`DIR/outbox`).
    pub data_dir: std::path::PathBuf,
    /// Transactions per terminal per minute, on average (0: none).
    pub tx_rate_per_minute: f64,
    /// The shared outbox's settings (its cache is larger than a terminal's by default).
    pub outbox: OutboxSettings,
    /// Keep every accepted `(device, seq, txn_id)` in memory for
    /// [`SimulatorHandle::accepted_records`] (fault tests; ~100 bytes per transaction).
    pub record_accepted: bool,
    /// Hooks every terminal runs for its commands (none by default).
    pub hooks: HookSettings,
    /// Offline lease of every terminal (`None`: disabled).
    pub max_offline: Option<Duration>,
}

impl SimulatorConfig {
    /// Defaults: ids `sim-NNNNN`, 200 terminals started per second, 4 transactions per
    /// terminal per minute, outbox in `simulator-data/` beside the PKI directory.
    pub fn new(
        count: usize,
        pki_dir: impl Into<std::path::PathBuf>,
        broker: BrokerUrl,
        issuer: Arc<dyn CertIssuer>,
    ) -> Self {
        let pki_dir = pki_dir.into();
        let data_dir = pki_dir.with_file_name("simulator-data");
        Self {
            count,
            pki_dir,
            issuer,
            agent: AgentSettings::new(broker),
            id_prefix: DEFAULT_ID_PREFIX.to_owned(),
            connect_rate: DEFAULT_CONNECT_RATE,
            data_dir,
            tx_rate_per_minute: DEFAULT_TX_RATE_PER_MINUTE,
            outbox: OutboxSettings {
                cache_capacity: DEFAULT_SIM_CACHE_CAPACITY,
                ..OutboxSettings::default()
            },
            record_accepted: false,
            hooks: HookSettings::default(),
            max_offline: Some(DEFAULT_MAX_OFFLINE),
        }
    }

    /// The device id of terminal `index`.
    pub fn device_id(&self, index: usize) -> Result<DeviceId, SimError> {
        DeviceId::new(format!("{}{index:05}", self.id_prefix)).map_err(|e| SimError::Config {
            reason: format!(
                "id prefix {:?} makes invalid device ids: {e}",
                self.id_prefix
            ),
        })
    }
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid simulator settings: {reason}")]
    Config { reason: String },
    #[error("cannot read the fleet CA certificate in {}", dir.display())]
    Ca {
        dir: std::path::PathBuf,
        #[source]
        source: PkiError,
    },
    #[error("cannot generate a device key")]
    Issue(#[from] PkiError),
    #[error("the controller did not issue the terminals' certificates: {0}")]
    Issuer(#[from] IssueError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot open the simulator's outbox")]
    Outbox(#[from] OutboxError),
    #[error("cannot read the command key of {}; create it with `posctl pki init` (or start the controller once)", dir.display())]
    CommandKey {
        dir: std::path::PathBuf,
        #[source]
        source: PkiError,
    },
    #[error("cannot open the simulator's state store")]
    State(#[from] StateError),
    #[error("cannot read the release key file {}; fix or remove it (without it updates are refused)", path.display())]
    ReleaseKey {
        path: std::path::PathBuf,
        #[source]
        source: PkiError,
    },
}

/// Transaction counters of one simulated terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalTxStats {
    pub device_id: DeviceId,
    /// Transactions the outbox stored (201 in the local API's terms).
    pub accepted: u64,
    /// Deliberate repeats answered as duplicates (200).
    pub duplicates: u64,
    /// Transactions not accepted (refused, outbox full or failed).
    pub refused: u64,
    /// The highest seq an accept returned (0: none).
    pub max_seq: u64,
}

/// One accepted transaction ([`SimulatorConfig::record_accepted`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRecord {
    pub device_id: DeviceId,
    pub seq: u64,
    pub txn_id: String,
}

/// One terminal's counters, updated by its transaction task.
#[derive(Debug, Default)]
struct TxCounters {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
    max_seq: AtomicU64,
}

/// The running simulator.
#[derive(Debug, Clone)]
pub struct SimulatorHandle {
    ids: Arc<[DeviceId]>,
    agents: Arc<Mutex<Vec<AgentHandle>>>,
    ramp_done: CancellationToken,
    /// The one outbox store of every terminal.
    outbox: Outbox,
    /// Per terminal, in index order.
    counters: Arc<[TxCounters]>,
    /// Every accept, when recording.
    records: Option<Arc<Mutex<Vec<AcceptedRecord>>>>,
}

impl SimulatorHandle {
    /// Every terminal's device id, in index order (including those not started yet).
    pub fn device_ids(&self) -> &[DeviceId] {
        &self.ids
    }

    /// The terminals started so far.
    pub fn agents(&self) -> Vec<AgentHandle> {
        self.lock().clone()
    }

    /// How many terminals have been started.
    pub fn started(&self) -> usize {
        self.lock().len()
    }

    /// How many terminals are connected right now.
    pub fn connected(&self) -> usize {
        self.lock().iter().filter(|a| a.is_connected()).count()
    }

    /// Waits until every terminal has been started (or the ramp was cancelled or failed).
    pub async fn ramp_finished(&self) {
        self.ramp_done.cancelled().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AgentHandle>> {
        // A poisoned list is still a valid list of handles.
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The outbox store shared by every terminal (close it after the terminals stopped).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Per-terminal transaction counters, in index order (all terminals, started or not).
    pub fn transaction_stats(&self) -> Vec<TerminalTxStats> {
        let get = |a: &AtomicU64| a.load(Ordering::Acquire);
        self.ids
            .iter()
            .zip(self.counters.iter())
            .map(|(id, c)| TerminalTxStats {
                device_id: id.clone(),
                accepted: get(&c.accepted),
                duplicates: get(&c.duplicates),
                refused: get(&c.refused),
                max_seq: get(&c.max_seq),
            })
            .collect()
    }

    /// Transactions accepted by all terminals.
    pub fn accepted_total(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.accepted.load(Ordering::Acquire))
            .sum()
    }

    /// Every accepted `(device, seq, txn_id)` in accept order, if
    /// [`SimulatorConfig::record_accepted`] was set (otherwise empty).
    pub fn accepted_records(&self) -> Vec<AcceptedRecord> {
        self.records.as_ref().map_or_else(Vec::new, |r| {
            r.lock().unwrap_or_else(|e| e.into_inner()).clone()
        })
    }
}

/// Shared by every terminal.
struct Fleet {
    roots: Arc<rustls::RootCertStore>,
    outbox: Outbox,
    state: StateStore,
    commands: Arc<CommandSettings>,
    /// Where the terminals' config files go (`DATA/config`).
    config_dir: std::path::PathBuf,
    /// The download directory of every terminal (`DATA/updates`, files named per terminal).
    updates_dir: std::path::PathBuf,
}

impl Fleet {
    /// A terminal's outbox and command setup (blocking to make), with its certificate.
    fn terminal(&self, id: &DeviceId, cert: CertifiedKey) -> Result<Issued, SimError> {
        let files = TerminalFiles {
            // One directory per terminal, like a real terminal's own disk: renames in one
            // shared directory would serialise on its lock.
            config: self.config_dir.join(id.as_str()).join("config.json"),
            identity: Vec::new(),
            updates_dir: self.updates_dir.clone(),
            update_prefix: format!("{id}-"),
            api_socket: None,
        };
        Ok(Issued {
            cert,
            outbox: self.outbox.device(id)?,
            commands: CommandSetup::load(self.commands.clone(), self.state.device(id), files)?,
        })
    }
}

/// What a terminal is built from.
struct Issued {
    cert: CertifiedKey,
    outbox: DeviceOutbox,
    commands: CommandSetup,
}

/// Starts the simulator: loads the CA, checks the settings by issuing the first certificate,
/// then ramps the terminals up on `tracker`. Everything stops when `cancel` is cancelled
/// (each terminal says goodbye with an OFFLINE presence).
pub async fn run_simulator(
    cfg: SimulatorConfig,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<SimulatorHandle, SimError> {
    if cfg.count == 0 || cfg.count > MAX_COUNT {
        return Err(SimError::Config {
            reason: format!("count must be between 1 and {MAX_COUNT}"),
        });
    }
    if cfg.connect_rate == 0 {
        return Err(SimError::Config {
            reason: "connect rate must be at least 1 per second".into(),
        });
    }
    if !(0.0..=MAX_TX_RATE_PER_MINUTE).contains(&cfg.tx_rate_per_minute) {
        return Err(SimError::Config {
            reason: format!("tx rate must be between 0 and {MAX_TX_RATE_PER_MINUTE} per minute"),
        });
    }
    let ids: Arc<[DeviceId]> = (0..cfg.count)
        .map(|i| cfg.device_id(i))
        .collect::<Result<Vec<_>, _>>()?
        .into();

    // File reads and opening the stores: off the runtime.
    let (dir, data_dir, outbox) = (cfg.pki_dir.clone(), cfg.data_dir.clone(), cfg.outbox);
    let (hooks, max_offline) = (cfg.hooks.clone(), cfg.max_offline);
    let fleet = tokio::task::spawn_blocking(move || {
        load_fleet(&dir, &data_dir, outbox, (hooks, max_offline))
    })
    .await
    .map_err(|e| SimError::Config {
        reason: format!("loading the PKI directory panicked: {e}"),
    })??;
    let fleet = Arc::new(fleet);

    let handle = SimulatorHandle {
        ids: ids.clone(),
        agents: Arc::new(Mutex::new(Vec::with_capacity(cfg.count))),
        ramp_done: CancellationToken::new(),
        outbox: fleet.outbox.clone(),
        counters: (0..cfg.count).map(|_| TxCounters::default()).collect(),
        records: cfg
            .record_accepted
            .then(|| Arc::new(Mutex::new(Vec::new()))),
    };
    // Fail early and clearly if the first terminal cannot be built.
    let issued = issue_batch(&fleet, cfg.issuer.as_ref(), &ids[..1])
        .await?
        .pop()
        .ok_or_else(|| SimError::Config {
            reason: "no certificate for the first terminal".into(),
        })?;
    let first = build_agent(&fleet, &cfg, 0, &ids[0], issued)?;
    let first = first.spawn(tracker, cancel.child_token())?;
    start_till(&cfg, &handle, 0, &first, tracker, &cancel);
    handle.lock().push(first);
    info!(count = cfg.count, rate = cfg.connect_rate, broker = %cfg.agent.broker, "simulator starting");

    let ramp = Ramp {
        cfg,
        ids,
        fleet,
        handle: handle.clone(),
        tracker: tracker.clone(),
        cancel,
    };
    tracker.spawn(ramp.run());
    Ok(handle)
}

fn load_fleet(
    dir: &std::path::Path,
    data_dir: &std::path::Path,
    settings: OutboxSettings,
    (hooks, max_offline): (HookSettings, Option<Duration>),
) -> Result<Fleet, SimError> {
    let pki = PkiDir::at(dir);
    let ca_pem = std::fs::read(pki.ca_cert()).map_err(|source| SimError::Ca {
        dir: dir.to_owned(),
        source: PkiError::Io {
            path: pki.ca_cert(),
            source,
        },
    })?;
    let roots = tls::root_store_from_pem(&ca_pem)?;
    let keys = pki
        .load_command_public_keys()
        .map_err(|source| SimError::CommandKey {
            dir: dir.to_owned(),
            source,
        })?;
    let outbox = Outbox::open(&data_dir.join("outbox"), settings)?;
    let state = StateStore::open(&data_dir.join("state"), DEFAULT_SIM_STATE_CACHE_CAPACITY)?;
    let mut commands = CommandSettings::new(posfleet_proto::signing::KeyRing::new(keys));
    commands.hooks = hooks;
    commands.max_offline = max_offline;
    // Release keys, when the PKI directory has them (`posctl pki release-key --out DIR`).
    let release_pub = dir.join(RELEASE_PUB);
    if release_pub.exists() {
        let keys = posfleet_proto::pki::read_public_keys(&release_pub).map_err(|source| {
            SimError::ReleaseKey {
                path: release_pub.clone(),
                source,
            }
        })?;
        commands.updates.release_keys = posfleet_proto::signing::KeyRing::new(keys);
    }
    Ok(Fleet {
        roots,
        outbox,
        state,
        commands: Arc::new(commands),
        config_dir: data_dir.join("config"),
        updates_dir: data_dir.join("updates"),
    })
}

/// Keys, certificates (from `issuer`), outbox handles and command setups for `ids`.
async fn issue_batch(
    fleet: &Arc<Fleet>,
    issuer: &dyn CertIssuer,
    ids: &[DeviceId],
) -> Result<Vec<Issued>, SimError> {
    let panicked = |e: tokio::task::JoinError| SimError::Config {
        reason: format!("certificate issuing panicked: {e}"),
    };
    let owned = ids.to_vec();
    let (keys, requests) = tokio::task::spawn_blocking(move || issuer::key_requests(&owned))
        .await
        .map_err(panicked)??;
    let certs = issuer.issue(requests).await?;
    if certs.len() != ids.len() {
        return Err(IssueError("the issuer answered with too few certificates".into()).into());
    }
    let (fleet, ids) = (Arc::clone(fleet), ids.to_vec());
    tokio::task::spawn_blocking(move || {
        ids.iter()
            .zip(keys.into_iter().zip(certs))
            .map(|(id, (key_pem, cert_pem))| fleet.terminal(id, CertifiedKey { cert_pem, key_pem }))
            .collect::<Result<Vec<_>, SimError>>()
    })
    .await
    .map_err(panicked)?
}

/// Builds terminal `index` with the same agent code as a real terminal.
fn build_agent(
    fleet: &Fleet,
    cfg: &SimulatorConfig,
    index: usize,
    id: &DeviceId,
    terminal: Issued,
) -> Result<Agent, SimError> {
    let Issued {
        cert: issued,
        outbox,
        commands,
    } = terminal;
    let tls = tls::client_config_with_roots(
        fleet.roots.clone(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )?;
    // The certificate must prove the id we think it does (the edge checks the same).
    let proven = tls::device_id_from_cert_pem(issued.cert_pem.as_bytes())?;
    if &proven != id {
        return Err(SimError::Config {
            reason: format!("certificate for {id} proves {proven}"),
        });
    }
    let mut settings = cfg.agent.clone();
    settings.device = simulated_device(index);
    let seed = index as u64;
    Ok(Agent::new(
        proven,
        tls,
        settings,
        (
            Box::new(SimulatedSystem::new(seed)),
            Box::new(SimulatedSensors::new(seed)),
        ),
        outbox,
        commands,
    ))
}

/// A plausible mix of models and versions, so fleet views and rollouts have something to show.
fn simulated_device(index: usize) -> DeviceInfo {
    const MODELS: [&str; 3] = ["PX-500", "PX-700", "M-30"];
    const FIRMWARE: [&str; 4] = ["1.4.2", "1.4.2", "1.4.2", "1.3.9"];
    DeviceInfo {
        model: MODELS[index % MODELS.len()].to_owned(),
        serial: format!("SIM{index:07}"),
        firmware_version: FIRMWARE[index % FIRMWARE.len()].to_owned(),
        payment_app_version: "3.2.0".to_owned(),
    }
}

/// Starts terminals 1.. at the configured rate.
struct Ramp {
    cfg: SimulatorConfig,
    ids: Arc<[DeviceId]>,
    fleet: Arc<Fleet>,
    handle: SimulatorHandle,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Ramp {
    async fn run(self) {
        let _done = self.handle.ramp_done.clone().drop_guard();
        let start = Instant::now();
        let period = Duration::from_secs(1) / self.cfg.connect_rate;
        // Certificates are issued a tenth of a second's worth at a time (keys on the blocking
        // pool, certificates by the issuer, one request per batch).
        let batch = (self.cfg.connect_rate as usize / 10).clamp(1, MAX_ISSUE_BATCH);
        let mut index = 1;
        while index < self.cfg.count {
            let end = (index + batch).min(self.cfg.count);
            let issued = match self.issue_batch(index, end).await {
                Ok(issued) => issued,
                Err(error) => {
                    warn!(
                        error = &error as &dyn std::error::Error,
                        index, "simulator stopped starting terminals"
                    );
                    return;
                }
            };
            for (offset, issued) in issued.into_iter().enumerate() {
                let i = index + offset;
                let due = start + period * u32::try_from(i).unwrap_or(u32::MAX);
                tokio::select! {
                    () = self.cancel.cancelled() => return,
                    () = tokio::time::sleep_until(due) => {}
                }
                if let Err(error) = self.start(i, issued) {
                    warn!(
                        error = &error as &dyn std::error::Error,
                        index = i,
                        "simulator stopped starting terminals"
                    );
                    return;
                }
            }
            index = end;
        }
        info!(
            count = self.cfg.count,
            took = ?start.elapsed(),
            "simulator: all terminals started"
        );
    }

    /// Certificates, outbox handles and command setups for terminals `from..to`.
    async fn issue_batch(&self, from: usize, to: usize) -> Result<Vec<Issued>, SimError> {
        issue_batch(&self.fleet, self.cfg.issuer.as_ref(), &self.ids[from..to]).await
    }

    fn start(&self, index: usize, issued: Issued) -> Result<(), SimError> {
        let agent = build_agent(&self.fleet, &self.cfg, index, &self.ids[index], issued)?;
        let handle = agent.spawn(&self.tracker, self.cancel.child_token())?;
        start_till(
            &self.cfg,
            &self.handle,
            index,
            &handle,
            &self.tracker,
            &self.cancel,
        );
        self.handle.lock().push(handle);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
