//! The fleet simulator: N virtual terminals in one process, each the real [`Agent`] with its
//! own certificate, MQTT session, heartbeats and telemetry ([`SimulatedSystem`] and
//! [`SimulatedSensors`] instead of the host's numbers).
//!
//! Certificates are issued in memory from the fleet CA of a PKI directory (loaded once);
//! the root store and crypto provider are shared by all terminals. Terminals start at
//! [`SimulatorConfig::connect_rate`] per second so a large fleet does not storm the broker;
//! [`run_simulator`] returns as soon as the CA is loaded and the ramp has begun.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::{Ca, CertifiedKey, PkiDir, PkiError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::agent::{Agent, AgentError, AgentHandle, AgentSettings, DeviceInfo};
use crate::config::BrokerUrl;
use crate::telemetry::{SimulatedSensors, SimulatedSystem};
use crate::tls::{self, TlsError};

/// Default device id prefix: ids are `{prefix}{index:05}`.
pub const DEFAULT_ID_PREFIX: &str = "sim-";
/// Default terminals started per second.
pub const DEFAULT_CONNECT_RATE: u32 = 200;
/// Most terminals one simulator runs.
pub const MAX_COUNT: usize = 100_000;

/// What to simulate. Build with [`SimulatorConfig::new`] and adjust.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// Number of terminals.
    pub count: usize,
    /// PKI directory holding the fleet CA (`ca.crt`, `ca.key`).
    pub pki_dir: std::path::PathBuf,
    /// Everything but the device strings is used for every terminal.
    pub agent: AgentSettings,
    /// Device ids are `{id_prefix}{index:05}`, index from 0.
    pub id_prefix: String,
    /// Terminals started per second (at least 1).
    pub connect_rate: u32,
}

impl SimulatorConfig {
    pub fn new(count: usize, pki_dir: impl Into<std::path::PathBuf>, broker: BrokerUrl) -> Self {
        Self {
            count,
            pki_dir: pki_dir.into(),
            agent: AgentSettings::new(broker),
            id_prefix: DEFAULT_ID_PREFIX.to_owned(),
            connect_rate: DEFAULT_CONNECT_RATE,
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
    #[error("cannot load the fleet CA from {}", dir.display())]
    Ca {
        dir: std::path::PathBuf,
        #[source]
        source: PkiError,
    },
    #[error("cannot issue a device certificate")]
    Issue(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// The running simulator.
#[derive(Debug, Clone)]
pub struct SimulatorHandle {
    ids: Arc<[DeviceId]>,
    agents: Arc<Mutex<Vec<AgentHandle>>>,
    ramp_done: CancellationToken,
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
}

/// Shared by every terminal.
struct Fleet {
    ca: Ca,
    roots: Arc<rustls::RootCertStore>,
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
    let ids: Arc<[DeviceId]> = (0..cfg.count)
        .map(|i| cfg.device_id(i))
        .collect::<Result<Vec<_>, _>>()?
        .into();

    // File reads and key parsing: off the runtime.
    let dir = cfg.pki_dir.clone();
    let fleet = tokio::task::spawn_blocking(move || load_fleet(&dir))
        .await
        .map_err(|e| SimError::Config {
            reason: format!("loading the CA panicked: {e}"),
        })??;
    let fleet = Arc::new(fleet);

    let handle = SimulatorHandle {
        ids: ids.clone(),
        agents: Arc::new(Mutex::new(Vec::with_capacity(cfg.count))),
        ramp_done: CancellationToken::new(),
    };
    // Fail early and clearly if the first terminal cannot be built.
    let first = build_agent(&fleet, &cfg, 0, &ids[0], issue(&fleet.ca, &ids[0])?)?;
    handle
        .lock()
        .push(first.spawn(tracker, cancel.child_token())?);
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

fn load_fleet(dir: &std::path::Path) -> Result<Fleet, SimError> {
    let pki = PkiDir::at(dir);
    let ca = pki.load_ca().map_err(|source| SimError::Ca {
        dir: dir.to_owned(),
        source,
    })?;
    let ca_pem = std::fs::read(pki.ca_cert()).map_err(|source| SimError::Ca {
        dir: dir.to_owned(),
        source: PkiError::Io {
            path: pki.ca_cert(),
            source,
        },
    })?;
    let roots = tls::root_store_from_pem(&ca_pem)?;
    Ok(Fleet { ca, roots })
}

fn issue(ca: &Ca, id: &DeviceId) -> Result<CertifiedKey, SimError> {
    Ok(ca.issue_device(id)?)
}

/// Builds terminal `index` with the same agent code as a real terminal.
fn build_agent(
    fleet: &Fleet,
    cfg: &SimulatorConfig,
    index: usize,
    id: &DeviceId,
    issued: CertifiedKey,
) -> Result<Agent, SimError> {
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
        Box::new(SimulatedSystem::new(seed)),
        Box::new(SimulatedSensors::new(seed)),
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
        // Certificates are issued on the blocking pool, a tenth of a second's worth at a time.
        let batch = (self.cfg.connect_rate as usize / 10).max(1);
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

    async fn issue_batch(&self, from: usize, to: usize) -> Result<Vec<CertifiedKey>, SimError> {
        let fleet = self.fleet.clone();
        let ids = self.ids.clone();
        tokio::task::spawn_blocking(move || {
            (from..to)
                .map(|i| issue(&fleet.ca, &ids[i]))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| SimError::Config {
            reason: format!("certificate issuing panicked: {e}"),
        })?
    }

    fn start(&self, index: usize, issued: CertifiedKey) -> Result<(), SimError> {
        let agent = build_agent(&self.fleet, &self.cfg, index, &self.ids[index], issued)?;
        let handle = agent.spawn(&self.tracker, self.cancel.child_token())?;
        self.handle.lock().push(handle);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
