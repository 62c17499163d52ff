//! The running controller: its bus (`crate::bus`: a local link to this process's router in
//! the embedded setup, an mTLS MQTT session to an external broker otherwise), the ingest loop
//! that feeds it to [`Ingest`], the liveness sweeper and the registry committer, all under one
//! cancellation token.
//!
//! Shutdown order matters for durability: when `cancel` fires, the ingest loop stops taking
//! uplinks and tells the transaction committer to finish: it commits what is queued and
//! publishes those acknowledgements while the ingest loop keeps the bus flowing (discarding
//! further uplinks, which terminals resend); then the loop disconnects gracefully, so the last
//! acknowledgements go out before the DISCONNECT. The bus has its own token, cancelled only by
//! the ingest loop at its end. The sweeper stops, and only after both have ended is the
//! registry committer told to stop, so its final commit holds every change they made.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::Filter;
use posfleet_proto::pki::{Identity, PkiDir, PkiError, parse_pem_certs};
use posfleet_runtime::mqtt::{MqttError, SessionConfig, SessionEvent};
use posfleet_runtime::tls::{TlsError, client_config_from_files};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use super::Ingest;
use super::gapwatch::GapWatch;
use super::sweeper::{Clock, spawn_sweeper, system_clock};
use super::txcommit::Committer;
use super::txqueue::{TxConfig, TxQueue};
use crate::bus::{Bus, BusConfig, LocalConfig, spawn_bus};
use crate::commands::{CommandPlane, CommandsHandle, Downlink};
use crate::edge::EdgeHandle;
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::txstore::TxStore;

/// Longest a graceful disconnect from the bus may take at shutdown before the session is cut.
const DISCONNECT_GRACE: Duration = Duration::from_secs(3);
/// Longest the transaction committer may take at shutdown to commit and acknowledge what was
/// queued (a commit takes milliseconds; acks are bounded by `TxConfig::ack_timeout`).
const TX_FINISH_GRACE: Duration = Duration::from_secs(10);

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("controller TLS material: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot read the controller certificate {path}: {source}")]
    ReadCert {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("controller certificate {path}: {source}")]
    Identity {
        path: PathBuf,
        #[source]
        source: PkiError,
    },
    #[error(
        "{path} is a certificate for {identity}, not for a controller; use DATA/pki/controller.crt"
    )]
    NotController { path: PathBuf, identity: Identity },
    #[error("controller MQTT session: {0}")]
    Mqtt(#[from] MqttError),
}

/// How the controller attaches to its bus and ages devices.
#[derive(Clone)]
pub struct ControllerConfig {
    /// Its bus: a local link to the embedded edge's router ([`ControllerConfig::local`]), or
    /// an MQTT session to a broker (host, port, client id `controller:<name>` as the
    /// certificate says, mTLS config, keep-alive, backoff; [`ControllerConfig::from_pki`]).
    /// Either way with the queues between the bus and the ingest loop. `spawn_controller`
    /// sets the subscription.
    pub bus: BusConfig,
    /// How often the liveness sweeper runs.
    pub sweep_interval: Duration,
    /// Wall clock for receive times and the sweeper (tests inject their own).
    pub clock: Clock,
    /// Transaction queue, commit, acknowledgement and gap settings.
    pub tx: TxConfig,
}

impl std::fmt::Debug for ControllerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerConfig")
            .field("bus", &self.bus)
            .field("sweep_interval", &self.sweep_interval)
            .field("tx", &self.tx)
            .finish_non_exhaustive()
    }
}

impl ControllerConfig {
    /// Defaults for the embedded controller: a local link to `edge`'s router, no TLS.
    pub fn local(edge: EdgeHandle) -> Self {
        Self::with_bus(BusConfig::Local(LocalConfig::new(edge)))
    }

    fn with_bus(bus: BusConfig) -> Self {
        Self {
            bus,
            sweep_interval: Duration::from_secs(2),
            clock: system_clock(),
            tx: TxConfig::default(),
        }
    }

    /// Defaults for a controller connecting to the broker at `host:port` as `client_id` with
    /// `tls`.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        client_id: impl Into<String>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        let mut session = SessionConfig::new(host, port, client_id, tls);
        session.incoming_capacity = 1024;
        // Room for one TransactionAck per device of a large group commit.
        session.request_capacity = 1024;
        Self::with_bus(BusConfig::Broker(session))
    }

    /// Broker defaults with the controller certificate of a PKI directory (`controller.crt/.key`,
    /// trusting `ca.crt`); the client id is the certificate's identity (`controller:main`).
    pub fn from_pki(
        host: impl Into<String>,
        port: u16,
        pki: &PkiDir,
    ) -> Result<Self, ControllerError> {
        let cert_path = pki.controller_cert();
        let pem = std::fs::read(&cert_path).map_err(|source| ControllerError::ReadCert {
            path: cert_path.clone(),
            source,
        })?;
        let identity = parse_pem_certs(&pem)
            .and_then(|certs| {
                let leaf = certs.first().ok_or(PkiError::NoCertificate {
                    path: cert_path.clone(),
                })?;
                Identity::from_cert_der(leaf)
            })
            .map_err(|source| ControllerError::Identity {
                path: cert_path.clone(),
                source,
            })?;
        if !matches!(identity, Identity::Controller(_)) {
            return Err(ControllerError::NotController {
                path: cert_path,
                identity,
            });
        }
        let tls = client_config_from_files(&pki.ca_cert(), &cert_path, &pki.controller_key())?;
        Ok(Self::new(host, port, identity.client_id(), tls))
    }
}

/// A running controller.
#[derive(Debug, Clone)]
pub struct Controller {
    /// The controller's bus (publishing downlinks, connection state).
    pub bus: Bus,
    /// The ingest logic the session feeds.
    pub ingest: Arc<Ingest>,
    /// The command plane (for the admin API).
    pub commands: CommandsHandle,
}

/// Starts the controller on `tracker`: the bus subscribed to every device uplink,
/// the ingest loop, the liveness sweeper, the registry committer, the transaction committer
/// (storing into `transactions`, acknowledging through the bus) and the gap watcher.
/// Everything stops when `cancel` is cancelled; wait for `tracker` to see the final commits
/// done.
#[allow(clippy::too_many_arguments)]
pub fn spawn_controller(
    cfg: ControllerConfig,
    registry: Arc<Registry>,
    transactions: Arc<TxStore>,
    commands: CommandPlane,
    events: EventBus,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Controller, ControllerError> {
    // Not a child of `cancel`: the bus carries the committer's final acknowledgements after
    // `cancel`, and the ingest loop ends it.
    let bus_cancel = CancellationToken::new();
    let (bus, inbox) = spawn_bus(cfg.bus, Filter::all_uplinks(), tracker, bus_cancel.clone())?;

    let (queue, queued) = TxQueue::new(&cfg.tx);
    // The plane publishes signed commands on the same bus.
    let downlink: Arc<dyn Downlink> = Arc::new(bus.clone());
    let (commands, command_inbox) = commands.spawn(
        downlink,
        Arc::clone(&registry),
        events.clone(),
        Arc::clone(&metrics),
        Arc::clone(&cfg.clock),
        tracker,
        cancel.child_token(),
    );
    let ingest = Arc::new(
        Ingest::new(Arc::clone(&registry), events.clone(), Arc::clone(&metrics))
            .with_transactions(queue)
            .with_commands(command_inbox),
    );
    // Stopped by the ingest loop once it takes no more uplinks.
    let tx_stop = CancellationToken::new();
    let tx_done = Committer {
        store: Arc::clone(&transactions),
        acks: bus.clone(),
        events: events.clone(),
        metrics: Arc::clone(&metrics),
        cfg: cfg.tx.clone(),
    }
    .spawn(queued, tracker, tx_stop.clone());
    GapWatch::new(transactions, events, Arc::clone(&metrics), cfg.tx.gap_grace).spawn(
        cfg.tx.gap_check_interval,
        Arc::clone(&cfg.clock),
        tracker,
        cancel.clone(),
    );
    // Not a child of `cancel`: it stops after the tasks that mutate the registry.
    let commit_stop = CancellationToken::new();
    registry.spawn_committer(tracker, commit_stop.clone());
    let sweeper = spawn_sweeper(
        Arc::clone(&ingest),
        cfg.sweep_interval,
        Arc::clone(&cfg.clock),
        tracker,
        cancel.clone(),
    );
    let ingest_loop = tracker.spawn(
        ingest_loop(
            Arc::clone(&ingest),
            inbox,
            bus.clone(),
            Arc::clone(&metrics),
            cfg.clock,
            cancel,
            bus_cancel,
            TxFinish {
                stop: tx_stop,
                done: tx_done,
            },
        )
        .instrument(info_span!("controller", client_id = %bus.client_id())),
    );
    tracker.spawn(stop_committer_after(ingest_loop, sweeper, commit_stop));
    Ok(Controller {
        bus,
        ingest,
        commands,
    })
}

/// How the ingest loop ends the transaction committer at shutdown.
#[derive(Debug)]
pub(crate) struct TxFinish {
    /// Tells the committer to commit what is queued and stop.
    pub stop: CancellationToken,
    /// Cancelled by the committer when it has stopped.
    pub done: CancellationToken,
}

/// Feeds every uplink to `ingest` until `cancel`, lets the transaction committer finish,
/// then disconnects gracefully and cancels `bus_cancel` (also if it panics).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn ingest_loop(
    ingest: Arc<Ingest>,
    mut inbox: mpsc::Receiver<SessionEvent>,
    bus: Bus,
    metrics: Arc<Metrics>,
    clock: Clock,
    cancel: CancellationToken,
    bus_cancel: CancellationToken,
    tx: TxFinish,
) {
    let bus_cancel = bus_cancel.drop_guard();
    loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            event = inbox.recv() => event,
        };
        match event {
            Some(SessionEvent::Message { topic, payload }) => {
                // Errors are counted and logged by `handle`.
                let _ = ingest.handle(&topic, &payload, clock());
            }
            Some(SessionEvent::Connected { session_present }) => {
                metrics.controller_connected.set(1);
                info!(session_present, "controller attached to its bus");
            }
            Some(SessionEvent::Disconnected { error }) => {
                metrics.controller_connected.set(0);
                warn!(%error, "controller lost its bus; reconnecting");
            }
            None => {
                warn!("controller bus ended");
                break;
            }
        }
    }
    // The committer publishes its last acknowledgements on the bus, whose task waits while
    // our inbox is full: keep reading (and dropping) uplinks until it is done.
    tx.stop.cancel();
    let keep_reading = async {
        while inbox.recv().await.is_some() {}
        std::future::pending::<()>().await;
    };
    let finished = tokio::time::timeout(TX_FINISH_GRACE, async {
        tokio::select! {
            () = tx.done.cancelled() => {}
            () = keep_reading => {}
        }
    })
    .await;
    if finished.is_err() {
        warn!("the transaction committer did not finish in time; disconnecting anyway");
    }
    // The bus drops events for a consumer that is going away, so this cannot deadlock on a
    // full inbox; the timeout covers a DISCONNECT stuck behind unacknowledged publishes.
    if tokio::time::timeout(DISCONNECT_GRACE, bus.disconnect())
        .await
        .is_err()
    {
        warn!("graceful disconnect from the bus timed out; closing it");
    }
    metrics.controller_connected.set(0);
    drop(bus_cancel);
}

/// Waits for the registry's writers to end, then lets the committer make its final commit.
async fn stop_committer_after(
    ingest_loop: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    commit_stop: CancellationToken,
) {
    for (name, task) in [("ingest loop", ingest_loop), ("sweeper", sweeper)] {
        if let Err(e) = task.await {
            warn!(task = name, error = %e, "controller task failed");
        }
    }
    commit_stop.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryConfig;
    use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};

    /// A loopback port nothing listens on (bound, then released), so connects are refused.
    fn refused_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn pki(dir: &std::path::Path) -> PkiDir {
        let pki = PkiDir::at(dir.join("pki"));
        pki.init(&[]).unwrap();
        pki
    }

    fn registry(dir: &std::path::Path) -> Arc<Registry> {
        let cfg = RegistryConfig {
            cache_capacity: 1 << 20,
            ..RegistryConfig::new(dir.join("registry"))
        };
        Registry::open(cfg).unwrap()
    }

    fn txstore(dir: &std::path::Path) -> Arc<TxStore> {
        TxStore::open(crate::txstore::TxStoreConfig {
            cache_capacity: 1 << 20,
            ..crate::txstore::TxStoreConfig::new(dir.join("transactions"))
        })
        .unwrap()
    }

    fn heartbeat() -> bytes::Bytes {
        let hb = pb::Heartbeat {
            seq: 1,
            interval_s: 10,
            ..Default::default()
        };
        encode(&hb).unwrap().into()
    }

    async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !check() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[test]
    fn config_from_pki_uses_the_controller_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = pki(tmp.path());
        let cfg = ControllerConfig::from_pki("localhost", 8883, &pki).unwrap();
        let BusConfig::Broker(session) = &cfg.bus else {
            panic!("an MQTT session: {cfg:?}");
        };
        assert_eq!(session.client_id, "controller:main");
        // A device certificate in the controller's place is refused with a clear message.
        let ca = pki.load_ca().unwrap();
        let device = ca.issue_device(&DeviceId::new("T-1").unwrap()).unwrap();
        std::fs::write(pki.controller_cert(), device.cert_pem).unwrap();
        let err = ControllerConfig::from_pki("localhost", 8883, &pki).unwrap_err();
        assert!(
            matches!(err, ControllerError::NotController { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_ingest_loop_feeds_uplinks_and_disconnects_on_cancel() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg =
            ControllerConfig::from_pki("127.0.0.1", refused_port(), &pki(tmp.path())).unwrap();
        let registry = registry(tmp.path());
        let ingest = Arc::new(Ingest::new(
            Arc::clone(&registry),
            EventBus::new(8),
            Arc::new(Metrics::new()),
        ));
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let bus_cancel = CancellationToken::new();
        let (bus, _bus_inbox) =
            spawn_bus(cfg.bus, Filter::all_uplinks(), &tracker, bus_cancel.clone()).unwrap();
        let (tx, inbox) = mpsc::channel(4);
        let clock: Clock = Arc::new(|| 5_000);
        let done = CancellationToken::new();
        done.cancel();
        let metrics = Arc::new(Metrics::new());
        tracker.spawn(ingest_loop(
            ingest,
            inbox,
            bus.clone(),
            Arc::clone(&metrics),
            clock,
            cancel.clone(),
            bus_cancel,
            TxFinish {
                stop: CancellationToken::new(),
                done,
            },
        ));
        let device = DeviceId::new("T-7").unwrap();
        tx.send(SessionEvent::Connected {
            session_present: false,
        })
        .await
        .unwrap();
        tx.send(SessionEvent::Message {
            topic: Topic::for_device(&device, Channel::Heartbeat),
            payload: heartbeat(),
        })
        .await
        .unwrap();
        wait_for("the heartbeat to be ingested", || {
            registry.online_count() == 1
        })
        .await;
        assert_eq!(metrics.controller_connected.get(), 1);
        let detail = registry.detail(&device).unwrap();
        assert_eq!(detail.summary.last_seen_ms, 5_000);
        cancel.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .expect("the loop and the bus end after cancel");
        assert!(bus.is_closed());
        assert_eq!(metrics.controller_connected.get(), 0);
    }

    #[tokio::test]
    async fn shutdown_ends_every_task_and_makes_a_final_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg =
            ControllerConfig::from_pki("127.0.0.1", refused_port(), &pki(tmp.path())).unwrap();
        let registry = registry(tmp.path());
        let metrics = Arc::new(Metrics::new());
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let controller = spawn_controller(
            cfg,
            Arc::clone(&registry),
            txstore(tmp.path()),
            crate::commands::tests::plane(tmp.path()),
            EventBus::new(8),
            Arc::clone(&metrics),
            &tracker,
            cancel.clone(),
        )
        .unwrap();
        let device = DeviceId::new("T-8").unwrap();
        controller
            .ingest
            .handle(
                &Topic::for_device(&device, Channel::Heartbeat),
                &heartbeat(),
                1_234,
            )
            .unwrap();
        assert_eq!(metrics.devices_online.get(), 1);
        cancel.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .expect("every controller task ends after cancel");
        drop(controller);
        drop(registry);
        let reopened = self::registry(tmp.path());
        let summary = reopened.detail(&device).unwrap().summary;
        assert_eq!(summary.last_seen_ms, 1_234);
        assert_eq!(summary.last_heartbeat_ms, Some(1_234));
        assert!(!summary.online);
    }
}
