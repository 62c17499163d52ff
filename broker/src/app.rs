//! `serve` and `demo`: everything the controller process runs, under one shutdown tree.
//!
//! Startup order: data dir and PKI (created on first start), admin token, trusted release
//! keys, every listener bound (so a port clash fails before anything runs), the edge with its
//! router, the registry, the transaction store, the configuration store and the artifact
//! store, the enrolment service, the controller (attached to the edge's router through a local
//! link, or an mTLS MQTT client of an external broker), the admin API, the
//! device download endpoint, and finally `posctl.json` so `posctl --data-dir DIR` finds the
//! running server.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::pki::PkiError;
use posfleet_runtime::value::BrokerUrl;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::accounts::{AccountStoreError, Accounts};
use crate::admission::AdmissionOptions;
use crate::api::{self, ApiState, ServerTlsError, Site};
use crate::approvals::{ApprovalPolicy, ApprovalStore, ApprovalStoreError};
use crate::artifacts::ArtifactCatalog;
use crate::artifacts::{
    ArtifactStore, ArtifactStoreError, Artifacts, ArtifactsConfig, device_router,
    device_tls_config, load_release_keys,
};
use crate::audit::{AuditConfig, AuditLog, AuditStoreError};
use crate::commands::{
    CommandPlane, CommandStore, CommandStoreError, CommandsConfig, CommandsHandle,
};
use crate::controller::{ControllerConfig, ControllerError, spawn_controller};
use crate::custody::{CustodyError, CustodyLedger};
use crate::datadir::{ClientFile, DataDir, DataDirError};
use crate::edge::{EdgeConfig, EdgeHandle, TlsSetupError, mtls_server_config, spawn_edge};
use crate::enrolment::{
    EnrolError, Enrolment, EnrolmentConfig, EnrolmentStoreError, refuse_revoked, renew_router,
};
use crate::events::EventBus;
use crate::fleetconfig::ConfigSource;
use crate::fleetconfig::{ConfigError, ConfigStore, ConfigStoreConfig};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryConfig, RegistryError};
use crate::rollouts::{RolloutStore, RolloutStoreError, Rollouts, RolloutsConfig, RolloutsHandle};
use crate::txstore::{TxStore, TxStoreConfig, TxStoreError};

/// Default MQTT listen address of `serve` and `demo`.
pub const DEFAULT_MQTT_LISTEN: &str = "0.0.0.0:8883";
/// Default admin API listen address of `serve` and `demo`.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8443";
/// Default listen address of the device download endpoint (ADR 0008).
pub const DEFAULT_DEVICE_LISTEN: &str = "0.0.0.0:8884";
/// Longest the embedded edge keeps terminals waiting for the controller's subscription.
const CONTROLLER_WAIT: Duration = Duration::from_secs(30);
/// Capacity of the live event bus.
const EVENT_BUS_CAPACITY: usize = 4096;

/// What `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub mqtt_listen: SocketAddr,
    pub api_listen: SocketAddr,
    /// Extra host names / IPs for the broker certificate when a new PKI is created.
    pub hosts: Vec<String>,
    /// Use this MQTT broker (Mosquitto, EMQX, ...) instead of the embedded edge; the
    /// controller connects to it with `DATA/pki/controller.crt`, trusting `DATA/pki/ca.crt`.
    pub external_broker: Option<BrokerUrl>,
    /// A heartbeating terminal gets a new lease when its last one is older than this.
    pub lease_interval: Duration,
    /// Commands not final yet are published again this often.
    pub command_resend_interval: Duration,
    /// The transaction queue's budget in transactions (`TxConfig::max_queued_records`).
    pub tx_queue_records: usize,
    /// The wait a refused terminal is asked for (`TxConfig::retry_after`).
    pub tx_retry_after: Duration,
    /// Where terminals download artifacts (HTTPS, client certificate required).
    pub device_listen: SocketAddr,
    /// Public base URL of the device endpoint that terminals are told; default
    /// `https://<first host, else 127.0.0.1>:<bound port>`.
    pub device_url: Option<String>,
    /// Largest artifact upload accepted.
    pub max_artifact_bytes: u64,
    /// Audit entries older than this are pruned (PCI DSS 10.5.1: at least 12 months).
    pub audit_retention: Duration,
    /// The audit key (`None`: `DATA/audit.key`), created at the first start.
    pub audit_key: Option<PathBuf>,
    /// Which command requests need a second admin (two-person approval).
    pub approvals: ApprovalPolicy,
    /// Connection admission of every listener (docs/decisions/0012-connection-admission.md).
    pub admission: AdmissionOptions,
}

#[cfg(test)]
impl ServeOptions {
    /// Loopback listeners on port 0, embedded edge: what tests start.
    pub(crate) fn loopback(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            mqtt_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            api_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            hosts: vec![],
            external_broker: None,
            lease_interval: Duration::from_secs(300),
            command_resend_interval: Duration::from_secs(30),
            tx_queue_records: crate::controller::TxConfig::default().max_queued_records,
            tx_retry_after: crate::controller::TxConfig::default().retry_after,
            device_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            device_url: None,
            max_artifact_bytes: crate::artifacts::DEFAULT_MAX_UPLOAD_BYTES,
            audit_retention: crate::audit::DEFAULT_RETENTION,
            audit_key: None,
            approvals: ApprovalPolicy::default(),
            admission: AdmissionOptions::default(),
        }
    }
}

/// Why the controller process could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("cannot create the development PKI: {0}")]
    Pki(#[from] PkiError),
    #[error("cannot listen on {addr} for {what}: {source}; choose another address with {flag}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        flag: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("MQTT edge TLS: {0}")]
    EdgeTls(#[from] TlsSetupError),
    #[error("admin API TLS: {0}")]
    ApiTls(#[from] ServerTlsError),
    #[error("device registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("transaction store: {0}")]
    Transactions(#[from] TxStoreError),
    #[error("configuration store: {0}")]
    Config(#[from] ConfigError),
    #[error("command store: {0}")]
    Commands(#[from] CommandStoreError),
    #[error("artifact store: {0}")]
    Artifacts(#[from] ArtifactStoreError),
    #[error(
        "trusted release keys: {0}; fix or remove the file (without it every artifact upload \
         is refused)"
    )]
    ReleaseKeys(PkiError),
    #[error("device endpoint TLS: {0}")]
    DeviceTls(TlsSetupError),
    #[error("--device-url {url:?}: {detail}")]
    DeviceUrl { url: String, detail: &'static str },
    #[error("audit log: {0}")]
    Audit(#[from] AuditStoreError),
    #[error("custody ledger: {0}")]
    Custody(#[from] CustodyError),
    #[error("approval store: {0}")]
    Approvals(#[from] ApprovalStoreError),
    #[error("account store: {0}")]
    Accounts(#[from] AccountStoreError),
    #[error("cannot record the offline account changes in the audit log: {0}")]
    PendingAudit(String),
    #[error("enrolment store: {0}")]
    EnrolmentStore(#[from] EnrolmentStoreError),
    #[error("enrolment: {0}")]
    Enrolment(#[from] EnrolError),
    #[error("rollout store: {0}")]
    Rollouts(#[from] RolloutStoreError),
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error("connection admission: {0}")]
    Admission(String),
    #[error("startup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A started controller process.
#[derive(Debug, Clone)]
pub struct Running {
    /// Where terminals connect: the embedded edge or the external broker (which the
    /// controller connects to as well).
    pub broker: BrokerUrl,
    pub api_addr: SocketAddr,
    /// Where the device download endpoint listens (the bound address).
    pub device_addr: SocketAddr,
    /// Signed software artifacts; the rollout engine uses it as `Arc<dyn ArtifactCatalog>`
    /// and registers its `ArtifactUsers` with `set_users`.
    pub artifacts: Arc<Artifacts>,
    /// What was written to `posctl.json`.
    pub client: ClientFile,
    /// The embedded edge; `None` with an external broker.
    pub edge: Option<EdgeHandle>,
    pub registry: Arc<Registry>,
    pub transactions: Arc<TxStore>,
    /// Fleet configuration; the command dispatcher gets it as `Arc<dyn ConfigSource>`.
    pub config: Arc<ConfigStore>,
    /// The command plane.
    pub commands: CommandsHandle,
    /// The rollout engine.
    pub rollouts: RolloutsHandle,
    /// Enrolment, revocation, CRL and renewal.
    pub enrolment: Arc<Enrolment>,
    pub metrics: Arc<Metrics>,
    /// Operator accounts, sessions and API tokens.
    pub accounts: Arc<Accounts>,
    /// True if this start created the PKI.
    pub pki_created: bool,
    /// True if this start created the admin token.
    pub token_created: bool,
}

/// Starts every subsystem on `tracker`; they stop when `cancel` is cancelled.
pub async fn start(
    opts: &ServeOptions,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Running, AppError> {
    start_inner(opts, None, tracker, cancel).await
}

/// [`start`] with another artifact catalog for rollouts than the artifact store (tests).
pub async fn start_with_catalog(
    opts: &ServeOptions,
    catalog: Arc<dyn ArtifactCatalog>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Running, AppError> {
    start_inner(opts, Some(catalog), tracker, cancel).await
}

async fn start_inner(
    opts: &ServeOptions,
    catalog: Option<Arc<dyn ArtifactCatalog>>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Running, AppError> {
    opts.admission.check().map_err(AppError::Admission)?;
    let data = DataDir::at(&opts.data_dir);
    let (pki_created, token, token_created) = {
        let data = data.clone();
        let hosts = opts.hosts.clone();
        // File system work and key generation: off the runtime.
        tokio::task::spawn_blocking(move || -> Result<_, AppError> {
            data.create()?;
            let pki = data.pki();
            let created = if pki.exists() {
                false
            } else {
                pki.init(&hosts)?;
                true
            };
            let (token, token_created) = data.ensure_admin_token()?;
            Ok((created, token, token_created))
        })
        .await??
    };
    let release_pub = data.pki().release_public_key();
    let release_keys = {
        let path = release_pub.clone();
        tokio::task::spawn_blocking(move || load_release_keys(&path))
            .await?
            .map_err(AppError::ReleaseKeys)?
    };
    if let Some(url) = &opts.device_url {
        check_device_url(url)?;
    }
    let pki = data.pki();
    if pki_created {
        info!(dir = %pki.dir().display(), "created a development PKI (fleet CA, broker and controller certificates)");
    }

    let mqtt = match &opts.external_broker {
        Some(_) => None,
        None => Some(bind(opts.mqtt_listen, "MQTT", "--mqtt-listen").await?),
    };
    let (api_listener, api_addr) = bind(opts.api_listen, "the admin API", "--api-listen").await?;
    let (device_listener, device_addr) = bind(
        opts.device_listen,
        "the device download endpoint",
        "--device-listen",
    )
    .await?;
    let device_tls = device_tls_config(&pki.ca_cert(), &pki.server_cert(), &pki.server_key())
        .map_err(AppError::DeviceTls)?;

    let (enrol_store, revocations) = {
        let dir = data.enrolment_dir();
        tokio::task::spawn_blocking(move || crate::enrolment::open(&dir)).await??
    };

    let metrics = Arc::new(Metrics::new());
    let (broker, edge) = match (mqtt, &opts.external_broker) {
        (Some((listener, addr)), _) => {
            let tls = mtls_server_config(&pki.ca_cert(), &pki.server_cert(), &pki.server_key())?;
            let mut config = EdgeConfig::new(tls);
            config.admission = opts.admission.mqtt;
            config.wait_for_controller = Some(CONTROLLER_WAIT);
            config.revocations = Some(revocations.clone());
            let edge = spawn_edge(
                listener,
                addr,
                config,
                metrics.clone(),
                tracker,
                cancel.child_token(),
            );
            let local = loopback_for(addr);
            let broker = BrokerUrl {
                host: local.ip().to_string(),
                port: local.port(),
            };
            (broker, Some(edge))
        }
        (None, Some(external)) => (external.clone(), None),
        (None, None) => unreachable!("a listener is bound whenever there is no external broker"),
    };

    let registry_cfg = RegistryConfig::new(data.registry_dir());
    let registry = tokio::task::spawn_blocking(move || Registry::open(registry_cfg)).await??;
    let tx_cfg = TxStoreConfig::new(data.transactions_dir());
    let transactions = tokio::task::spawn_blocking(move || TxStore::open(tx_cfg)).await??;
    let config_cfg = ConfigStoreConfig::new(data.config_dir());
    let config =
        Arc::new(tokio::task::spawn_blocking(move || ConfigStore::open(config_cfg)).await??);
    let artifacts = {
        let dir = data.artifacts_dir();
        let store = tokio::task::spawn_blocking(move || ArtifactStore::open(&dir, ARTIFACTS_CACHE))
            .await??;
        let device_url = opts
            .device_url
            .clone()
            .unwrap_or_else(|| default_device_url(&opts.hosts, device_addr.port()));
        let mut config = ArtifactsConfig::new(device_url);
        config.max_upload_bytes = opts.max_artifact_bytes;
        Arc::new(Artifacts::new(
            Arc::new(store),
            release_keys,
            release_pub,
            config,
            metrics.clone(),
        ))
    };
    if artifacts.release_keys().is_empty() {
        info!(path = %artifacts.release_pub().display(), "no trusted release key installed; artifact uploads are refused until it exists");
    }
    let events = EventBus::new(EVENT_BUS_CAPACITY);
    let plane = {
        let mut cfg = CommandsConfig::new(data.logs_dir());
        cfg.lease_interval = opts.lease_interval;
        cfg.resend_interval = opts.command_resend_interval;
        let dir = data.commands_dir();
        let pki = pki.clone();
        let config: Arc<dyn ConfigSource> = config.clone();
        // Key file and store open: off the runtime.
        tokio::task::spawn_blocking(move || -> Result<_, AppError> {
            let key = Arc::new(pki.ensure_command_key()?);
            let store = Arc::new(CommandStore::open(&dir, COMMANDS_CACHE)?);
            Ok(CommandPlane::load(cfg, store, key, config)?)
        })
        .await??
    };

    // The embedded controller attaches to its own router through a local link (no socket, no
    // TLS); with an external broker it is an mTLS MQTT client with DATA/pki/controller.crt.
    let mut controller_cfg = match &edge {
        Some(edge) => ControllerConfig::local(edge.clone()),
        None => ControllerConfig::from_pki(broker.host.clone(), broker.port, &pki)?,
    };
    controller_cfg.tx.max_queued_records = opts.tx_queue_records;
    controller_cfg.tx.retry_after = opts.tx_retry_after;
    let controller = spawn_controller(
        controller_cfg,
        registry.clone(),
        transactions.clone(),
        plane,
        events.clone(),
        metrics.clone(),
        tracker,
        cancel.child_token(),
    )?;

    let catalog: Arc<dyn ArtifactCatalog> = match catalog {
        Some(catalog) => catalog,
        None => artifacts.clone(),
    };
    let rollouts = {
        let dir = data.rollouts_dir();
        let commands = controller.commands.store().clone();
        // Store open and load (members, command statuses): off the runtime.
        tokio::task::spawn_blocking(move || -> Result<_, AppError> {
            let store = Arc::new(RolloutStore::open(&dir, ROLLOUTS_CACHE)?);
            Ok(Rollouts::load(RolloutsConfig::default(), store, &commands)?)
        })
        .await??
    };
    let rollouts = rollouts.spawn(
        controller.commands.clone(),
        registry.clone(),
        transactions.clone(),
        catalog.clone(),
        events.clone(),
        metrics.clone(),
        crate::controller::system_clock(),
        tracker,
        cancel.child_token(),
    );
    // Deleting an artifact an unfinished rollout uses is refused.
    artifacts.set_users(Arc::new(rollouts.clone()));

    let audit = {
        let mut cfg = AuditConfig::new(data.audit_dir(), data.audit_anchor());
        cfg.retention = opts.audit_retention;
        if let Some(key) = &opts.audit_key {
            cfg.key = key.clone();
        }
        // Store open and anchor check (may append and fsync): off the runtime.
        Arc::new(
            tokio::task::spawn_blocking(move || {
                AuditLog::open(cfg, crate::controller::system_clock())
            })
            .await??,
        )
    };
    let accounts = {
        let dir = data.accounts_dir();
        let token = token.clone();
        // Store open: off the runtime.
        Arc::new(
            tokio::task::spawn_blocking(move || {
                Accounts::open(
                    &dir,
                    crate::accounts::DEFAULT_CACHE,
                    token,
                    crate::controller::system_clock(),
                )
            })
            .await??,
        )
    };
    {
        // What `posfleet-broker admin ...` did while the controller was stopped.
        let (accounts, audit) = (Arc::clone(&accounts), Arc::clone(&audit));
        let appended = tokio::task::spawn_blocking(move || {
            accounts.drain_pending_audit(|record| audit.append(record).map(|_| ()))
        })
        .await?
        .map_err(AppError::PendingAudit)?;
        if appended > 0 {
            info!(
                appended,
                "offline account changes recorded in the audit log"
            );
        }
    }
    spawn_audit_retention(Arc::clone(&audit), tracker, cancel.child_token());
    let approvals = {
        let dir = data.approvals_dir();
        Arc::new(
            tokio::task::spawn_blocking(move || ApprovalStore::open(&dir, APPROVALS_CACHE))
                .await??,
        )
    };

    let custody = {
        let (dir, key) = (data.custody_dir(), data.custody_key());
        Arc::new(
            tokio::task::spawn_blocking(move || CustodyLedger::open(&dir, &key, APPROVALS_CACHE))
                .await??,
        )
    };

    let state = ApiState::new(
        registry.clone(),
        transactions.clone(),
        config.clone(),
        controller.commands.clone(),
        events,
        metrics.clone(),
        token,
    )
    .with_artifacts(artifacts.clone())
    .with_rollouts(rollouts.clone(), catalog)
    .with_audit_log(audit.clone())
    .with_approvals(approvals, opts.approvals)
    .with_custody(custody)
    .with_accounts(accounts.clone())
    .with_limits(opts.admission.http_limits(opts.admission.api));

    let enrolment = {
        let mqtt_url = match (&opts.external_broker, opts.hosts.first()) {
            (Some(external), _) => external.to_string(),
            (None, Some(host)) => BrokerUrl {
                host: host.clone(),
                port: broker.port,
            }
            .to_string(),
            (None, None) => broker.to_string(),
        };
        let cfg = EnrolmentConfig::new(mqtt_url, artifacts.config().device_url.clone());
        let (pki, registry, edge) = (pki.clone(), registry.clone(), edge.clone());
        let sink: Arc<dyn crate::audit::AuditSink> = audit.clone();
        // One set of refusal counts for the API and enrolment: the audit routes write them
        // all before reading, the flusher spawned below writes them when their window ends.
        let refusals = state.refusals();
        // CA key read and the first CRL signed: off the runtime.
        tokio::task::spawn_blocking(move || -> Result<_, AppError> {
            let ca = pki.load_ca()?;
            let enrolment = Enrolment::new(cfg, enrol_store, revocations, ca, pki, registry, edge)?
                .with_audit(sink, refusals);
            // Certificates `posctl pki issue-device --dir` issued while we were stopped.
            let audited = enrolment.audit_offline_issues()?;
            if audited > 0 {
                info!(
                    audited,
                    "certificates issued offline recorded in the audit log"
                );
            }
            Ok(Arc::new(enrolment))
        })
        .await??
    };

    let api_tls = api::server_tls_config(&pki.server_cert(), &pki.server_key())?;
    let state = state.with_enrolment(enrolment.clone());
    state
        .refusals()
        .spawn_flusher(tracker, cancel.child_token());
    tracker.spawn(api::serve(
        api_listener,
        api_tls,
        state,
        cancel.child_token(),
    ));
    let device_site = Site {
        name: "device endpoint",
        label: "device",
        app: refuse_revoked(
            enrolment.clone(),
            device_router(artifacts.clone()).merge(renew_router(enrolment.clone())),
        ),
        limits: opts.admission.http_limits(opts.admission.device),
        metrics: metrics.clone(),
        client_identity: true,
    };
    tracker.spawn(api::serve_site(
        device_listener,
        device_tls,
        device_site,
        cancel.child_token(),
    ));

    let api_url = format!("https://{}", loopback_for(api_addr));
    let mqtt_url = broker.to_string();
    let client = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || {
            data.write_client_file(&api_url, Some(&mqtt_url), Some(device_addr))
        })
        .await??
    };
    info!(mqtt = %broker, external = edge.is_none(), api = %client.api_url, device_url = %artifacts.config().device_url, "posfleet broker running");
    Ok(Running {
        broker,
        api_addr,
        device_addr,
        artifacts,
        client,
        edge,
        registry,
        transactions,
        config,
        commands: controller.commands,
        rollouts,
        enrolment,
        metrics,
        accounts,
        pki_created,
        token_created,
    })
}

/// How often entries past the audit retention are pruned.
const AUDIT_PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// sled page cache of the approval store (a few small records).
const APPROVALS_CACHE: u64 = 1 << 20;

/// Prunes the audit log at start and every [`AUDIT_PRUNE_INTERVAL`] until `cancel`.
fn spawn_audit_retention(audit: Arc<AuditLog>, tracker: &TaskTracker, cancel: CancellationToken) {
    tracker.spawn(async move {
        let mut every = tokio::time::interval(AUDIT_PRUNE_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            let log = Arc::clone(&audit);
            // Deletes and fsyncs: off the runtime.
            let pruned =
                tokio::task::spawn_blocking(move || log.prune(posfleet_proto::now_ms())).await;
            match pruned {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "audit retention pruning failed"),
                Err(e) => tracing::error!(error = %e, "audit retention task failed"),
            }
        }
    });
}

/// Binds a listener and reads back the address it got (port 0 becomes a real port).
async fn bind(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<(TcpListener, SocketAddr), AppError> {
    let error = |source| AppError::Bind {
        what,
        addr,
        flag,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let local = listener.local_addr().map_err(error)?;
    Ok((listener, local))
}

/// The address a local client uses to reach a listener: the wildcard becomes loopback (the
/// development server certificate names 127.0.0.1 and ::1).
pub fn loopback_for(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// sled page cache of the command store.
const COMMANDS_CACHE: u64 = 32 * 1024 * 1024;
/// sled page cache of the artifact store (a few records).
const ARTIFACTS_CACHE: u64 = crate::artifacts::DEFAULT_CACHE;

/// `https://<first --host, else 127.0.0.1>:<port>` (IPv6 literals in brackets).
fn default_device_url(hosts: &[String], port: u16) -> String {
    let host = hosts.first().map(String::as_str).unwrap_or("127.0.0.1");
    if host.parse::<Ipv6Addr>().is_ok() {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// A `--device-url` must be an absolute https URL without query or fragment.
fn check_device_url(url: &str) -> Result<(), AppError> {
    let error = |detail| AppError::DeviceUrl {
        url: url.to_owned(),
        detail,
    };
    let parsed = reqwest::Url::parse(url).map_err(|_| error("not a URL"))?;
    if parsed.scheme() != "https" {
        return Err(error("must start with https:// (terminals use mutual TLS)"));
    }
    if parsed.host().is_none() {
        return Err(error("needs a host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(error("must not have a query or fragment"));
    }
    Ok(())
}
/// sled page cache of the rollout store.
const ROLLOUTS_CACHE: u64 = 16 * 1024 * 1024;

/// Grace period for tasks to stop after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:8883".parse().unwrap();
        assert_eq!(loopback_for(any).to_string(), "127.0.0.1:8883");
        let any6: SocketAddr = "[::]:1".parse().unwrap();
        assert_eq!(loopback_for(any6).to_string(), "[::1]:1");
        let fixed: SocketAddr = "10.1.2.3:5".parse().unwrap();
        assert_eq!(loopback_for(fixed), fixed);
    }

    #[test]
    fn device_url_defaults_to_the_first_host_and_is_checked() {
        assert_eq!(default_device_url(&[], 8884), "https://127.0.0.1:8884");
        assert_eq!(
            default_device_url(&["fleet.example".into(), "x".into()], 1),
            "https://fleet.example:1"
        );
        assert_eq!(default_device_url(&["::1".into()], 2), "https://[::1]:2");
        check_device_url("https://fleet.example:8884/base").unwrap();
        for bad in ["http://x:1", "fleet.example", "https://x/?a=1"] {
            assert!(check_device_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_start_creates_pki_token_and_client_file_then_reuses_them() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = ServeOptions::loopback(tmp.path().join("data"));
        for first in [true, false] {
            let tracker = TaskTracker::new();
            let cancel = CancellationToken::new();
            let running = start(&opts, &tracker, cancel.clone()).await.unwrap();
            assert_eq!(running.pki_created, first);
            assert_eq!(running.token_created, first);
            let client = DataDir::at(&opts.data_dir).read_client_file().unwrap();
            assert_eq!(client, running.client);
            assert!(
                client
                    .api_url
                    .ends_with(&running.api_addr.port().to_string())
            );
            cancel.cancel();
            tracker.close();
            tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
                .await
                .expect("everything stops");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn controller_runs_against_an_external_broker() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::at(tmp.path().join("data"));
        data.create().unwrap();
        data.pki().init(&[]).unwrap();
        let pki = data.pki();

        // Stand-in for Mosquitto/EMQX: a bare edge on its own, with no controller attached.
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let external = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let external_addr = external.local_addr().unwrap();
        let tls =
            mtls_server_config(&pki.ca_cert(), &pki.server_cert(), &pki.server_key()).unwrap();
        spawn_edge(
            external,
            external_addr,
            EdgeConfig::new(tls),
            Arc::new(Metrics::new()),
            &tracker,
            cancel.child_token(),
        );
        let broker = BrokerUrl {
            host: "127.0.0.1".into(),
            port: external_addr.port(),
        };
        let opts = ServeOptions {
            external_broker: Some(broker.clone()),
            ..ServeOptions::loopback(data.root().to_owned())
        };
        let running = start(&opts, &tracker, cancel.child_token()).await.unwrap();
        assert!(running.edge.is_none());
        assert_eq!(running.broker, broker);
        assert_eq!(
            running.client.mqtt_url.as_deref(),
            Some(broker.to_string().as_str())
        );

        let issuer = crate::enrolment::SimulatorIssuer::new(running.enrolment.clone(), "test");
        let mut sim = posfleet_agent::SimulatorConfig::new(1, pki.dir(), broker, Arc::new(issuer));
        // If the terminal's ONLINE presence beats the controller's subscription, its next
        // heartbeat registers it: keep that short.
        sim.agent.heartbeat_interval = Duration::from_secs(1);
        posfleet_agent::run_simulator(sim, &tracker, cancel.child_token())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !running.registry.list().iter().any(|d| d.online) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the simulated terminal shows up through the external broker");
        cancel.cancel();
        tracker.close();
        tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .expect("everything stops");
    }
}
