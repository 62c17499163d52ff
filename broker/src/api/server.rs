//! The API's accept loop: our own, so a slow or idle client can never block anyone else. The
//! device download endpoint (`artifacts::device_router`) runs on the same loop
//! ([`serve_site`]) with mutual TLS: there each connection's client certificate identity is
//! read after the handshake and handed to the handlers as an `Extension<PeerIdentity>`.
//!
//! - Every accepted socket is admitted by the listener's `crate::admission::Admission` (the
//!   mechanism the MQTT edge uses too): per-address caps, eviction of the oldest pending
//!   connection when full, the silent and handshake deadlines, handshake CPU slots. A refused
//!   socket is closed at once; `accept` never waits.
//! - Each admitted socket gets its own tracked task: TLS handshake, then hyper HTTP/1.1 with
//!   the header deadline (also the keep-alive idle timeout) and a minimum request body rate
//!   (`body.rs`). The connection is pending (evictable) until its first request's headers
//!   are in.
//! - On cancel: stop accepting, ask every connection to finish its current request (streams
//!   end), wait up to `shutdown_grace`, then drop what is left.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::{TowerToHyperService, TowerToHyperServiceFuture};
use posfleet_proto::pki::{Identity, parse_pem_certs};
use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::body::{BodyRate, MinRateBody};
use super::error::ServerTlsError;
use super::{ApiLimits, ApiState, router};
use crate::admission::{Admission, Establish, Ticket};
use crate::artifacts::PeerIdentity;
use crate::metrics::Metrics;

/// The client's address (every site), for per-source limits and the audit log.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The DER of the client certificate (mutual-TLS sites), for its serial and validity.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<[u8]>);

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A TLS server config for the API: the certificate chain and key from PEM files, no client
/// authentication (the bearer token authenticates), ALPN `http/1.1`, ring provider.
pub fn server_tls_config(
    cert_pem_path: &Path,
    key_pem_path: &Path,
) -> Result<Arc<ServerConfig>, ServerTlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ServerTlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let chain = parse_pem_certs(&read(cert_pem_path)?).map_err(|e| ServerTlsError::Pem {
        path: cert_pem_path.to_owned(),
        detail: e.to_string(),
    })?;
    if chain.is_empty() {
        return Err(ServerTlsError::NoCertificate {
            path: cert_pem_path.to_owned(),
        });
    }
    let key =
        PrivateKeyDer::from_pem_slice(&read(key_pem_path)?).map_err(|e| ServerTlsError::Pem {
            path: key_pem_path.to_owned(),
            detail: e.to_string(),
        })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the admin API on `listener` until `cancel`, then stops gracefully (see the module
/// docs). Returns when every connection has ended.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    state: ApiState,
    cancel: CancellationToken,
) {
    let limits = state.limits;
    let metrics = Arc::clone(&state.metrics);
    let state = ApiState {
        shutdown: cancel.child_token(),
        ..state
    };
    let site = Site {
        name: "admin API",
        label: "api",
        app: router(state),
        limits,
        metrics,
        client_identity: false,
    };
    serve_site(listener, tls, site, cancel).await;
}

/// What one HTTPS listener serves and how.
#[derive(Debug, Clone)]
pub struct Site {
    /// For logs ("admin API", "device endpoint").
    pub name: &'static str,
    /// Metric label of the listener (`api`, `device`).
    pub label: &'static str,
    pub app: Router,
    /// Admission (`limits.admission`), HTTP deadlines, shutdown grace.
    pub limits: ApiLimits,
    /// Where refusals and open connections are counted.
    pub metrics: Arc<Metrics>,
    /// Read the client certificate's [`Identity`] after the handshake and pass it to handlers
    /// as `Extension<PeerIdentity>`; a connection without one is closed. Needs a TLS config
    /// that requires client certificates.
    pub client_identity: bool,
}

/// Serves `site` on `listener` until `cancel`, then stops gracefully (see the module docs).
/// Returns when every connection has ended.
pub async fn serve_site(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    site: Site,
    cancel: CancellationToken,
) {
    let Site {
        name,
        label,
        app,
        limits,
        metrics,
        client_identity,
    } = site;
    let acceptor = TlsAcceptor::from(tls);
    let admission = Admission::new(label, limits.admission, Arc::clone(&metrics));
    let rate = BodyRate {
        min_rate: limits.body_min_rate,
        grace: limits.body_grace,
        metrics,
        site: label,
    };
    let connections = TaskTracker::new();
    // Cancelled after the grace period: connections still open are dropped.
    let hard_stop = CancellationToken::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, site = name, "listening");
    }
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, site = name, "accept failed");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        // Refused: the socket is closed here (counted by the admission).
        let ticket = match admission.admit(peer) {
            Ok(ticket) => ticket,
            Err(refusal) => {
                debug!(%peer, site = name, reason = refusal.reason(), "connection refused");
                continue;
            }
        };
        // Small responses go out at once (no 40 ms Nagle / delayed-ACK stall).
        let _ = tcp.set_nodelay(true);
        let conn = Connection {
            acceptor: acceptor.clone(),
            app: app.clone(),
            limits,
            rate: rate.clone(),
            client_identity,
            cancel: cancel.clone(),
            hard_stop: hard_stop.clone(),
            admission: Arc::clone(&admission),
            ticket,
        };
        connections.spawn(
            conn.run(tcp, peer)
                .instrument(info_span!("https_conn", site = name, %peer)),
        );
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(limits.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            site = name,
            "connections still open after the grace period; dropping them"
        );
        hard_stop.cancel();
        connections.wait().await;
    }
    info!(site = name, "stopped");
}

/// One accepted socket and what it needs.
struct Connection {
    acceptor: TlsAcceptor,
    app: Router,
    limits: ApiLimits,
    rate: BodyRate,
    /// See [`Site::client_identity`].
    client_identity: bool,
    /// Graceful stop: finish the current request, then close.
    cancel: CancellationToken,
    /// Abrupt stop after the grace period.
    hard_stop: CancellationToken,
    admission: Arc<Admission>,
    /// Held for the connection's lifetime; frees its slot when dropped.
    ticket: Ticket,
}

impl Connection {
    async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        let tls = tokio::select! {
            () = self.cancel.cancelled() => return,
            result = self.admission.tls_handshake(&self.ticket, tcp, &self.acceptor) => {
                match result {
                    Ok(tls) => tls,
                    Err(e) => {
                        debug!(error = %e, "no TLS connection");
                        return;
                    }
                }
            }
        };
        // Every request knows its client's address (audit records name it).
        let mut app = self.app.layer(Extension(super::PeerAddr(peer)));
        if self.client_identity {
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| cert.to_vec());
            let identity = leaf.as_deref().map(Identity::from_cert_der);
            match (identity, leaf) {
                (Some(Ok(identity)), Some(leaf)) => {
                    app = app
                        .layer(Extension(PeerIdentity(identity)))
                        .layer(Extension(PeerCertificate(leaf.into())));
                }
                (Some(Err(e)), _) => {
                    debug!(error = %e, "client certificate carries no posfleet identity");
                    return;
                }
                _ => {
                    debug!("no client certificate");
                    return;
                }
            }
        }
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .keep_alive(true);
        let service = Admitted {
            inner: TowerToHyperService::new(app),
            establish: self.ticket.establisher(),
            rate: self.rate.clone(),
        };
        let conn = http.serve_connection(TokioIo::new(tls), service);
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            // Still before its first request, and a newer connection needed the slot.
            () = self.ticket.evicted() => Ok(()),
            () = self.cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    result = conn.as_mut() => result,
                    () = self.hard_stop.cancelled() => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            // Before its first request: a slow or silent client (an idle keep-alive
            // connection closing is routine, not counted).
            if e.is_timeout() && self.ticket.is_pending() {
                self.admission.count("header_timeout");
            }
            debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// The hyper service of one connection: marks the connection established when its first
/// request's headers are in, and holds every request body to the minimum rate.
#[derive(Clone)]
struct Admitted {
    inner: TowerToHyperService<Router>,
    establish: Establish,
    rate: BodyRate,
}

impl hyper::service::Service<Request<Incoming>> for Admitted {
    type Response = <TowerToHyperService<Router> as hyper::service::Service<
        Request<MinRateBody<Incoming>>,
    >>::Response;
    type Error = <TowerToHyperService<Router> as hyper::service::Service<
        Request<MinRateBody<Incoming>>,
    >>::Error;
    type Future = TowerToHyperServiceFuture<Router, Request<MinRateBody<Incoming>>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.establish.establish();
        let rate = self.rate.clone();
        self.inner
            .call(request.map(|body| MinRateBody::new(body, rate)))
    }
}
