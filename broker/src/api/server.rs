//! The API's accept loop: our own, so a slow or idle client can never block anyone else. The
//! device download endpoint (`artifacts::device_router`) runs on the same loop
//! ([`serve_site`]) with mutual TLS: there each connection's client certificate identity is
//! read after the handshake and handed to the handlers as an `Extension<PeerIdentity>`.
//!
//! - A semaphore caps connections (handshaking or established); `accept` waits for a free
//!   slot (mini-redis style), so the kernel backlog absorbs bursts.
//! - Each accepted socket gets its own tracked task: TLS handshake under
//!   `handshake_timeout`, then hyper HTTP/1.1 with a header read timeout.
//! - On cancel: stop accepting, ask every connection to finish its current request (streams
//!   end), wait up to `shutdown_grace`, then drop what is left.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use posfleet_proto::pki::{Identity, parse_pem_certs};
use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::error::ServerTlsError;
use super::{ApiLimits, ApiState, router};
use crate::artifacts::PeerIdentity;

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
    let state = ApiState {
        shutdown: cancel.child_token(),
        ..state
    };
    let site = Site {
        name: "admin API",
        app: router(state),
        limits,
        client_identity: false,
    };
    serve_site(listener, tls, site, cancel).await;
}

/// What one HTTPS listener serves and how.
#[derive(Debug, Clone)]
pub struct Site {
    /// For logs ("admin API", "device endpoint").
    pub name: &'static str,
    pub app: Router,
    /// Connection cap and timeouts.
    pub limits: ApiLimits,
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
        app,
        limits,
        client_identity,
    } = site;
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    // Cancelled after the grace period: connections still open are dropped.
    let hard_stop = CancellationToken::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, site = name, "listening");
    }
    loop {
        let slot = tokio::select! {
            () = cancel.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => break,
            },
        };
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
        let conn = Connection {
            acceptor: acceptor.clone(),
            app: app.clone(),
            limits,
            client_identity,
            cancel: cancel.clone(),
            hard_stop: hard_stop.clone(),
            _slot: slot,
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
    /// See [`Site::client_identity`].
    client_identity: bool,
    /// Graceful stop: finish the current request, then close.
    cancel: CancellationToken,
    /// Abrupt stop after the grace period.
    hard_stop: CancellationToken,
    /// Held for the connection's lifetime; frees a connection slot when dropped.
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        let handshake =
            tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp));
        let tls = tokio::select! {
            () = self.cancel.cancelled() => return,
            result = handshake => match result {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_elapsed) => {
                    debug!("TLS handshake timed out");
                    return;
                }
            },
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
        let conn = http.serve_connection(TokioIo::new(tls), TowerToHyperService::new(app));
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = self.cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    result = conn.as_mut() => result,
                    () = self.hard_stop.cancelled() => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}
