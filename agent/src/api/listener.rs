//! Binding the local API's sockets and serving them: our own accept loop (as the admin API's),
//! so that a slow or idle client can never block anyone else.
//!
//! - A semaphore caps connections per listener; `accept` waits for a free slot.
//! - Each connection is its own tracked task: hyper HTTP/1.1 with a header read timeout.
//! - On cancel: stop accepting, let open requests finish for the grace period, then drop them.
//!   The socket file is removed when the Unix listener stops.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{ApiError, ApiState, LocalApiSettings, MAX_SOCKET_PATH, router};

/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The bound listeners of the local API, ready to serve.
#[derive(Debug)]
pub struct LocalApi {
    unix: UnixListener,
    socket: PathBuf,
    tcp: Option<TcpListener>,
    settings: LocalApiSettings,
}

impl LocalApi {
    /// Binds the Unix socket (replacing a stale socket file, mode 0660 after bind; the
    /// parent directory is created 0750 if missing) and, if configured, the loopback TCP
    /// address. Must run inside a tokio runtime.
    pub fn bind(settings: &LocalApiSettings) -> Result<Self, ApiError> {
        let path = settings.socket.clone();
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ApiError::SocketPathTooLong {
                path,
                max: MAX_SOCKET_PATH,
            });
        }
        let bind_err = |source| ApiError::BindUnix {
            path: path.clone(),
            source,
        };
        remove_stale_socket(&path)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(parent)
                .map_err(bind_err)?;
        }
        let unix = UnixListener::bind(&path).map_err(bind_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
            .map_err(bind_err)?;
        let tcp = match settings.tcp {
            None => None,
            Some(addr) if !addr.ip().is_loopback() => return Err(ApiError::NotLoopback { addr }),
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        TcpListener::from_std(l)
                    })
                    .map_err(|source| ApiError::BindTcp { addr, source })?;
                Some(listener)
            }
        };
        Ok(Self {
            unix,
            socket: path,
            tcp,
            settings: settings.clone(),
        })
    }

    /// The Unix socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The bound TCP address (with the real port when port 0 was asked for).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves on `tracker` until `cancel` (see the module docs).
    pub fn serve(self, state: ApiState, tracker: &TaskTracker, cancel: CancellationToken) {
        let app = router(state, self.settings.request_timeout);
        info!(socket = %self.socket.display(), tcp = ?self.tcp_addr(), "local API listening");
        let settings = Arc::new(self.settings);
        if let Some(tcp) = self.tcp {
            tracker.spawn(accept_loop(
                Tcp(tcp),
                app.clone(),
                settings.clone(),
                cancel.clone(),
            ));
        }
        let socket = self.socket;
        let unix = accept_loop(Unix(self.unix), app, settings, cancel);
        tracker.spawn(async move {
            unix.await;
            // Nobody serves it any more; a client should fail fast, not hang.
            let _ = std::fs::remove_file(&socket);
        });
    }
}

/// Removes a socket file nobody serves; refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> Result<(), ApiError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket {
            path: path.to_owned(),
        });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ApiError::SocketInUse {
            path: path.to_owned(),
        });
    }
    debug!(path = %path.display(), "removing a stale local API socket");
    std::fs::remove_file(path).map_err(|source| ApiError::BindUnix {
        path: path.to_owned(),
        source,
    })
}

/// A listener of either kind.
trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
    fn name(&self) -> &'static str;
}

struct Unix(UnixListener);
struct Tcp(TcpListener);

impl Accept for Unix {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        self.0.accept().await.map(|(s, _)| s)
    }
    fn name(&self) -> &'static str {
        "unix"
    }
}

impl Accept for Tcp {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = self.0.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
    fn name(&self) -> &'static str {
        "tcp"
    }
}

async fn accept_loop<L: Accept>(
    listener: L,
    app: Router,
    settings: Arc<LocalApiSettings>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let connections = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    loop {
        let slot = tokio::select! {
            () = cancel.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => break,
            },
        };
        let io = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(io) => io,
                Err(error) => {
                    warn!(%error, listener = listener.name(), "local API accept failed");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        let (app, settings, cancel, hard_stop) = (
            app.clone(),
            settings.clone(),
            cancel.clone(),
            hard_stop.clone(),
        );
        connections.spawn(async move {
            let _slot = slot;
            serve_connection(io, app, &settings, cancel, hard_stop).await;
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(settings.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            "local API connections still open after the grace period; dropping them"
        );
        hard_stop.cancel();
        connections.wait().await;
    }
    debug!("local API listener stopped");
}

async fn serve_connection<IO>(
    io: IO,
    app: Router,
    settings: &LocalApiSettings,
    cancel: CancellationToken,
    hard_stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                () = hard_stop.cancelled() => Ok(()),
            }
        }
    };
    if let Err(error) = result {
        debug!(%error, "local API connection ended with an error");
    }
}
