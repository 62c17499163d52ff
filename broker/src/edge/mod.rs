//! The secure MQTT edge (ADR 0001, ADR 0013): our own accept loop in front of rumqttd's router.
//!
//! # Layout
//!
//! - this file: [`EdgeConfig`], [`spawn_edge`] and the accept loop: every socket is admitted
//!   by `crate::admission` (per-address caps, eviction of the oldest pending connection when
//!   full, silent and handshake deadlines, handshake CPU slots; the mechanism the HTTPS
//!   listeners use too), then its TLS handshake runs in its own task;
//! - `tls`: server config with mandatory client certificates from the fleet CA bundle;
//! - `connection`: one connection after TLS: CONNECT, identity, router link, teardown;
//! - `pump`: the validated packet pump of an attached connection, both directions;
//! - `acl`: the topic ACL on typed topics and filters;
//! - `gate`: terminals wait until the embedded controller has subscribed;
//! - `sessions`: one live session per identity, connect rate limits, kicking a session;
//! - `router`: the embedded rumqttd router behind nameable closures.
//!
//! See docs/decisions/0001-mqtt-edge-on-rumqttd-router.md for why the edge is ours.

mod acl;
mod connection;
mod device_pump;
mod devices;
mod downlinks;
mod gate;
mod lag;
mod pump;
mod router;
mod sessions;
mod tls;
mod uplinks;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::pki::{CertFacts, Identity};
use rumqttd::local::{LinkRx, LinkTx};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

pub use connection::ConnectionLimits;
pub use device_pump::UplinkRate;
pub(crate) use router::LinkFailure;
pub use router::RouterSettings;
pub use sessions::ConnectRateLimit;
pub use tls::{TlsSetupError, mtls_server_config};

use crate::admission::{Admission, AdmissionLimits, CpuGated, HandshakeError, Ticket};
use crate::metrics::Metrics;

/// Everything the edge needs, validated by the caller.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Server config that requires client certificates (see [`mtls_server_config`]).
    pub tls: Arc<rustls::ServerConfig>,
    /// Who gets a connection and how long a silent or slow client keeps it; a connection is
    /// pending until its mutual TLS handshake is done.
    pub admission: AdmissionLimits,
    pub limits: ConnectionLimits,
    pub rate_limit: ConnectRateLimit,
    pub router: RouterSettings,
    /// Refuse terminals (CONNACK "server unavailable", they retry) until a controller has
    /// subscribed, at most this long after start. `None` admits them at once. `serve` sets
    /// it so no ONLINE presence is lost in the reconnect storm after a restart.
    pub wait_for_controller: Option<Duration>,
    /// Revoked certificates and retired devices, refused at CONNECT (CONNACK "not
    /// authorized", counted as `revoked` / `decommissioned`). `None`: no revocation check.
    pub revocations: Option<Arc<crate::enrolment::Revocations>>,
}

impl EdgeConfig {
    pub fn new(tls: Arc<rustls::ServerConfig>) -> Self {
        Self {
            tls,
            admission: AdmissionLimits::mqtt(),
            limits: ConnectionLimits::default(),
            rate_limit: ConnectRateLimit::default(),
            router: RouterSettings::default(),
            wait_for_controller: None,
            revocations: None,
        }
    }
}

/// Raised when the edge cannot go on (the router thread died): the process must exit and
/// let its supervisor restart it.
#[derive(Clone, Default, Debug)]
pub struct Fatal {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Fatal {
    pub(crate) fn raise(&self, reason: impl Into<String>) {
        let reason = reason.into();
        error!(%reason, "fatal edge error");
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(reason);
        self.token.cancel();
    }

    /// Resolves with the reason once a fatal error was raised.
    pub async fn wait(&self) -> String {
        self.token.cancelled().await;
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// A running edge.
#[derive(Clone)]
pub struct EdgeHandle {
    local_addr: SocketAddr,
    shared: Arc<connection::Shared>,
    /// What the embedded controller took from its local link (see [`ControllerIntake`]).
    controller_intake: Arc<ControllerIntake>,
}

impl std::fmt::Debug for EdgeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeHandle")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl EdgeHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Resolves when the edge hit a fatal error.
    pub async fn fatal(&self) -> String {
        self.shared.fatal.wait().await
    }

    /// Closes the live session of an identity at once (revocation, decommission); a
    /// terminal's queued downlinks are forgotten with it.
    pub fn kick(&self, identity: &Identity) -> bool {
        let kicked = self.shared.sessions.kick(&identity.client_id());
        if let Some(device) = identity.device() {
            self.shared.devices.forget(device);
        }
        kicked
    }

    /// Terminal sessions the edge holds (connected, or persistent and disconnected).
    pub fn device_sessions(&self) -> usize {
        self.shared.devices.len()
    }

    /// Sessions currently attached.
    pub fn live_sessions(&self) -> usize {
        self.shared.sessions.len()
    }
}

/// Starts the router and the accept loop on `listener` (bound to `local_addr`); runs until
/// `cancel`.
pub fn spawn_edge(
    listener: TcpListener,
    local_addr: SocketAddr,
    config: EdgeConfig,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> EdgeHandle {
    let router = router::RouterHandle::spawn(&config.router);
    let fatal = Fatal::default();
    let devices = Arc::new(devices::DeviceSessions::default());
    let lag = Arc::new(lag::LagGate::new(&config.router, &metrics));
    // Terminals reach the router only through these links (ADR 0013).
    let uplinks = uplinks::Uplinks::spawn(
        &router,
        lag.clone(),
        metrics.clone(),
        fatal.clone(),
        tracker,
        cancel.clone(),
    );
    let downlinks = downlinks::spawn(
        &router,
        devices.clone(),
        metrics.clone(),
        fatal.clone(),
        tracker,
        cancel.clone(),
    );
    let uplinks = match (uplinks, downlinks) {
        (Ok(uplinks), Ok(())) => uplinks,
        (Err(error), _) | (_, Err(error)) => {
            fatal.raise(format!("the edge's router links failed: {error}"));
            uplinks::Uplinks::closed(lag.clone())
        }
    };
    let shared = Arc::new(connection::Shared {
        router,
        sessions: sessions::Sessions::new(config.rate_limit),
        metrics,
        limits: config.limits,
        fatal,
        device_gate: gate::DeviceGate::new(config.wait_for_controller.is_none()),
        revocations: config.revocations.clone(),
        devices,
        uplinks,
    });
    if let Some(deadline) = config.wait_for_controller {
        let shared = shared.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(deadline) => {
                    if !shared.device_gate.is_open() {
                        warn!(?deadline, "no controller subscribed in time; admitting terminals anyway");
                        shared.device_gate.open();
                    }
                }
            }
        });
    }
    tracker.spawn(watch_router(shared.clone(), cancel.clone()));
    tracker.spawn(accept_loop(
        listener,
        config,
        shared.clone(),
        tracker.clone(),
        cancel,
    ));
    info!(%local_addr, "MQTT edge listening (mTLS)");
    EdgeHandle {
        local_addr,
        shared,
        controller_intake: Arc::new(ControllerIntake {
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            lag,
        }),
    }
}

/// The router runs on its own thread; if it dies, every link is dead.
async fn watch_router(shared: Arc<connection::Shared>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                if !shared.router.is_alive() {
                    shared.fatal.raise("router thread is gone");
                    return;
                }
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: EdgeConfig,
    shared: Arc<connection::Shared>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let admission = Admission::new("mqtt", config.admission, shared.metrics.clone());
    let acceptor = TlsAcceptor::from(config.tls.clone());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Refused: the socket is closed here (counted by the admission).
        let ticket = match admission.admit(peer) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                debug!(%peer, reason = refusal.reason(), "connection refused");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let admission = admission.clone();
        let acceptor = acceptor.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            // Two boxed steps: the handshake's state is freed once it is over, and the
            // connection's future is sized by its own states only, so an idle terminal holds
            // no more than its connection needs (docs/benchmarks.md, heap breakdown).
            let established = Box::pin(handshake(
                &shared, &admission, &ticket, tcp, &acceptor, peer, &cancel,
            ))
            .await;
            let Some((stream, identity, cert)) = established else {
                return;
            };
            // Mutually authenticated: no longer pending, never evicted. The ticket holds the
            // connection's slot until it ends.
            if !ticket.establish() {
                return;
            }
            Box::pin(connection::run(
                stream, peer, identity, cert, shared, cancel,
            ))
            .await;
            drop(ticket);
        });
    }
}

/// Uplink messages the embedded controller has taken from its local router link, and their
/// payload bytes, counted as its link task takes them (`crate::bus::local`). The controller-lag
/// gate (`lag.rs`) compares what it took with what the lanes forwarded; the lanes' markers
/// end here too and are not uplinks.
#[derive(Debug)]
pub struct ControllerIntake {
    messages: AtomicU64,
    bytes: AtomicU64,
    lag: Arc<lag::LagGate>,
}

/// What the embedded controller took from its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intake {
    /// An uplink for the consumer.
    Uplink,
    /// A lane's marker for the lag gate: not passed on.
    Marker,
}

impl ControllerIntake {
    /// Counts a publish the controller took from its link.
    pub(crate) fn record(&self, topic: &[u8], payload: &[u8]) -> Intake {
        if self.lag.took(topic, payload) == lag::Took::Marker {
            return Intake::Marker;
        }
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(
            u64::try_from(payload.len()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Intake::Uplink
    }

    /// The controller's uplink subscription is in the router: the lag gate applies.
    pub(crate) fn attached(&self) {
        self.lag.attach();
    }

    /// The controller's link task ended: nothing is refused for its sake any more.
    pub(crate) fn detached(&self) {
        self.lag.detach();
    }

    /// Adds lag nothing will ever take (a drift of the book) to every lane, for tests.
    #[cfg(test)]
    pub(crate) fn drift(&self, bytes: i64) {
        for lane in 0..self.lag.lanes() {
            self.lag.drift(lane, bytes);
        }
    }

    /// Stops or resumes the lanes' markers, for tests (`LagGate::hold_markers`).
    #[cfg(test)]
    pub(crate) fn hold_markers(&self, held: bool) {
        self.lag.hold_markers(held);
    }

    /// The gate's current lag, for tests.
    #[cfg(test)]
    pub(crate) fn lag(&self) -> i64 {
        self.lag.lag()
    }

    /// Uplink messages taken so far.
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// Payload bytes of those messages.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// The embedded controller's attachment to the router (`crate::bus::local`): a local link,
/// no socket, no TLS. The link is used only from one task, which follows the rules of
/// docs/decisions/0001-mqtt-edge-on-rumqttd-router.md (batched sends, `Unschedule` answered
/// with a wake, nothing after a Disconnect).
impl EdgeHandle {
    /// Registers an in-process link (clean session) with the router. Blocks until the router
    /// answers: call it from `spawn_blocking`.
    pub(crate) fn build_local_link(
        &self,
        client_id: &str,
    ) -> Result<(LinkTx, LinkRx), LinkFailure> {
        self.shared
            .router
            .build_link(client_id, true)
            .map(|(tx, rx, _connack)| (tx, rx))
    }

    /// Pushes `packets` into a local link and notifies the router once (as the edge's own
    /// connections do). An error means the router channel is closed.
    pub(crate) fn send_local(
        &self,
        link_tx: &mut LinkTx,
        packets: Vec<rumqttd::protocol::Packet>,
    ) -> Result<(), LinkFailure> {
        pump::send_to_router(&self.shared.router, link_tx, packets)
    }

    /// Raises the edge's fatal error: the process must exit.
    pub(crate) fn raise_fatal(&self, reason: impl Into<String>) {
        self.shared.fatal.raise(reason);
    }

    /// Admits terminals: the embedded controller's uplink subscription is in the router.
    pub(crate) fn open_device_gate(&self) {
        self.shared.device_gate.open();
    }

    /// True once terminals are admitted.
    #[cfg(test)]
    pub(crate) fn admits_devices(&self) -> bool {
        self.shared.device_gate.is_open()
    }

    /// The embedded controller's intake counters.
    pub fn controller_intake(&self) -> Arc<ControllerIntake> {
        Arc::clone(&self.controller_intake)
    }
}

/// The TLS handshake of an admitted socket and the identity its client certificate carries;
/// `None` (counted and logged) when there is no authenticated terminal or controller. The
/// stream is boxed: it moves through several futures, and each would otherwise keep a copy
/// of its size.
async fn handshake(
    shared: &connection::Shared,
    admission: &Admission,
    ticket: &Ticket,
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    peer: SocketAddr,
    cancel: &CancellationToken,
) -> Option<(Box<TlsStream<CpuGated>>, Identity, CertFacts)> {
    shared.metrics.edge_handshakes_in_progress.inc();
    let tls = tokio::select! {
        _ = cancel.cancelled() => Err(HandshakeError::Evicted),
        tls = admission.tls_handshake(ticket, tcp, acceptor) => tls,
    };
    shared.metrics.edge_handshakes_in_progress.dec();
    let stream = match tls {
        Ok(stream) => stream,
        Err(HandshakeError::Tls(error)) => {
            let reason = tls::handshake_failure_reason(&error);
            info!(%peer, reason, %error, "TLS handshake failed");
            shared.metrics.refuse(reason);
            return None;
        }
        Err(HandshakeError::Timeout) => {
            debug!(%peer, "TLS handshake timed out");
            shared.metrics.refuse("handshake_timeout");
            return None;
        }
        // Counted by the admission (silent, evicted) or nothing to count (closed).
        Err(other) => {
            debug!(%peer, reason = %other, "no TLS connection");
            return None;
        }
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first());
    let identity = leaf.map(|cert| {
        Identity::from_cert_der(cert)
            .and_then(|identity| CertFacts::from_der(cert).map(|facts| (identity, facts)))
    });
    let (identity, cert) = match identity {
        Some(Ok(identity)) => identity,
        Some(Err(error)) => {
            warn!(%peer, %error, "client certificate carries no posfleet identity");
            shared.metrics.refuse("no_identity");
            return None;
        }
        None => {
            shared.metrics.refuse("no_client_certificate");
            return None;
        }
    };
    Some((Box::new(stream), identity, cert))
}

#[cfg(test)]
mod adversarial;
#[cfg(test)]
mod lag_tests;
#[cfg(test)]
mod tests;
