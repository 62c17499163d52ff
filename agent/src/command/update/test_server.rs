//! A small artifact server for the update tests: HTTPS on 127.0.0.1:0 that requires a client
//! certificate from the test fleet CA, serves one file with `Range: bytes=N-` support, and
//! can misbehave: cut the body after N bytes (once), send more bytes than the file has
//! (close-delimited, no Content-Length), or flip a byte.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use posfleet_runtime::testing::TestPki;

/// How the server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    None,
    /// The first response announces the whole length but stops after this many body bytes.
    CutOnceAfter(u64),
    /// Sends the file and this many bytes more, delimited by closing the connection.
    Oversize(u64),
    /// Flips one byte in the middle.
    Tamper,
}

/// One request the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    /// The `N` of `Range: bytes=N-`.
    pub(crate) range_from: Option<u64>,
}

pub(crate) struct ArtifactServer {
    pub(crate) addr: SocketAddr,
    pub(crate) requests: Arc<Mutex<Vec<Seen>>>,
    /// Body bytes written, over all responses.
    pub(crate) body_bytes: Arc<AtomicU64>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

struct Shared {
    data: Vec<u8>,
    fault: Mutex<Fault>,
    requests: Arc<Mutex<Vec<Seen>>>,
    body_bytes: Arc<AtomicU64>,
}

impl ArtifactServer {
    pub(crate) async fn start(pki: &TestPki, data: Vec<u8>, fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(pki.server_config());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let body_bytes = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            data,
            fault: Mutex::new(fault),
            requests: requests.clone(),
            body_bytes: body_bytes.clone(),
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (c, t) = (cancel.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = c.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let (acceptor, shared) = (acceptor.clone(), shared.clone());
                t.spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls, &shared).await;
                    }
                });
            }
        });
        Self {
            addr,
            requests,
            body_bytes,
            cancel,
            tracker,
        }
    }

    pub(crate) fn url(&self, sha_hex: &str) -> String {
        format!(
            "https://127.0.0.1:{}/device/v1/artifacts/{sha_hex}",
            self.addr.port()
        )
    }

    pub(crate) fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }

    pub(crate) async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.tracker.wait()).await;
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    shared: &Shared,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).to_lowercase();
    let range_from = text
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .and_then(|r| r.trim().trim_end_matches('-').parse::<u64>().ok());
    shared.requests.lock().unwrap().push(Seen { range_from });
    let fault = {
        let mut f = shared.fault.lock().unwrap();
        let now = *f;
        if matches!(now, Fault::CutOnceAfter(_)) {
            *f = Fault::None;
        }
        now
    };
    let mut data = shared.data.clone();
    match fault {
        Fault::Tamper => {
            let mid = data.len() / 2;
            data[mid] ^= 0x01;
        }
        Fault::Oversize(extra) => data.extend(std::iter::repeat_n(0x55, extra as usize)),
        _ => {}
    }
    let len = data.len() as u64;
    let from = range_from.unwrap_or(0);
    let header = if from >= len && range_from.is_some() {
        format!(
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    } else if matches!(fault, Fault::Oversize(_)) {
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_owned()
    } else if range_from.is_some() {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
            len - 1,
            len - from
        )
    } else {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n"
        )
    };
    if io.write_all(header.as_bytes()).await.is_err() {
        return;
    }
    if from >= len {
        let _ = io.shutdown().await;
        return;
    }
    let mut body = &data[from as usize..];
    if let Fault::CutOnceAfter(n) = fault {
        body = &body[..(n as usize).min(body.len())];
    }
    for piece in body.chunks(8 * 1024) {
        if io.write_all(piece).await.is_err() {
            return;
        }
        shared
            .body_bytes
            .fetch_add(piece.len() as u64, Ordering::Relaxed);
    }
    let _ = io.flush().await;
    if matches!(fault, Fault::CutOnceAfter(_)) {
        // An abrupt end: no close_notify, fewer bytes than announced.
        return;
    }
    let _ = io.shutdown().await;
}
