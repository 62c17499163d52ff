//! [`Proxy`]: a TCP relay on loopback between terminals and the broker that a test can cut.
//!
//! Terminals are configured with the proxy's address instead of the broker's (the broker's
//! certificate names `127.0.0.1`, so TLS is unaffected: the proxy only relays bytes). Three
//! states:
//!
//! - **forward**: bytes flow both ways;
//! - **severed** ([`Proxy::sever`]): every open connection is reset (RST on both sides) and
//!   new connections are reset as soon as they are accepted, as when a router reboots;
//! - **stalled** ([`Proxy::stall`]): nothing is relayed any more, but no connection is closed
//!   either, as when a link silently drops every packet: TCP keeps the bytes, the peers only
//!   notice through their keep-alive timeouts. [`Proxy::restore`] resumes relaying on every
//!   surviving connection, so nothing is lost that the peers did not give up on themselves.
//!
//! [`Proxy::cut_after_down`] arms a one-shot cut in the middle of a transfer: once that many
//! more bytes went from the target to the clients, every open connection is reset (as by
//! [`Proxy::sever`]) but new ones are relayed at once, like a link that drops for a moment.
//!
//! Every task is tracked and stops when the proxy is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

/// Relay buffer per direction.
const BUFFER: usize = 16 * 1024;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Forward,
    Severed,
    Stalled,
}

/// Shared between the handle and the tasks.
#[derive(Debug)]
struct State {
    /// Current mode; relays wait on it while stalled.
    mode: watch::Sender<ProxyMode>,
    /// Cancelled (and replaced) by every [`Proxy::sever`]: resets the connections of its era.
    era: std::sync::Mutex<CancellationToken>,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Connections reset by a cut (open ones and refused new ones).
    reset: AtomicU64,
    /// Bytes relayed from the target to the clients so far.
    down_bytes: AtomicU64,
    /// When `down_bytes` reaches this, the open connections are reset once
    /// (`u64::MAX`: disarmed).
    cut_at: AtomicU64,
}

impl State {
    /// Resets every connection of the current era (new ones belong to the next).
    fn cut_open_connections(&self) {
        let old = std::mem::take(&mut *self.era.lock().unwrap_or_else(|e| e.into_inner()));
        old.cancel();
    }

    /// Counts `n` bytes relayed downstream; fires an armed cut.
    fn count_down(&self, n: usize) {
        let total = self.down_bytes.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
        let at = self.cut_at.load(Ordering::Acquire);
        if total >= at
            && self
                .cut_at
                .compare_exchange(at, u64::MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.cut_open_connections();
        }
    }
}

/// A running proxy (stops when dropped).
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    state: Arc<State>,
    /// Everything the proxy spawned.
    tracker: TaskTracker,
    /// Stops every task when the proxy is dropped.
    _stop: DropGuard,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("cannot bind the proxy")?;
        let addr = listener.local_addr().context("proxy address")?;
        let (mode, _) = watch::channel(ProxyMode::Forward);
        let state = Arc::new(State {
            mode,
            era: std::sync::Mutex::new(CancellationToken::new()),
            accepted: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
            cut_at: AtomicU64::new(u64::MAX),
        });
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            listener,
            target,
            state.clone(),
            tracker.clone(),
            stop.clone(),
        ));
        Ok(Self {
            addr,
            target,
            state,
            tracker,
            _stop: stop.drop_guard(),
        })
    }

    /// Where terminals should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mqtts://127.0.0.1:PORT` of the proxy.
    pub fn mqtt_url(&self) -> String {
        format!("mqtts://{}", self.addr)
    }

    /// Where it relays to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn mode(&self) -> ProxyMode {
        *self.state.mode.borrow()
    }

    /// Resets every open connection and every new one until [`Proxy::restore`].
    pub fn sever(&self) {
        self.state.mode.send_replace(ProxyMode::Severed);
        self.state.cut_open_connections();
    }

    /// Resets every open connection once `bytes` more bytes went from the target to the
    /// clients; connections made after that are relayed normally (see the module docs).
    pub fn cut_after_down(&self, bytes: u64) {
        let at = self
            .state
            .down_bytes
            .load(Ordering::Acquire)
            .saturating_add(bytes);
        self.state.cut_at.store(at, Ordering::Release);
    }

    /// Bytes relayed from the target to the clients so far.
    pub fn down_bytes(&self) -> u64 {
        self.state.down_bytes.load(Ordering::Acquire)
    }

    /// Stops relaying without closing anything, until [`Proxy::restore`].
    pub fn stall(&self) {
        self.state.mode.send_replace(ProxyMode::Stalled);
    }

    /// Relays again (stalled connections resume where they stopped).
    pub fn restore(&self) {
        self.state.mode.send_replace(ProxyMode::Forward);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Connections reset by cuts so far.
    pub fn reset(&self) -> u64 {
        self.state.reset.load(Ordering::Relaxed)
    }

    /// Relay tasks still running (accept loop included).
    pub fn tasks(&self) -> usize {
        self.tracker.len()
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    state: Arc<State>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let client = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                // Out of file descriptors or similar: try again shortly.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        state.accepted.fetch_add(1, Ordering::Relaxed);
        let era = state.era.lock().unwrap_or_else(|e| e.into_inner()).clone();
        tracker.spawn(connection(client, target, state.clone(), era, stop.clone()));
    }
}

/// Relays one connection until both sides closed, either side failed, its era is cut, or
/// the proxy stops. Anything but a graceful end resets both sides.
async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    state: Arc<State>,
    era: CancellationToken,
    stop: CancellationToken,
) {
    if *state.mode.borrow() == ProxyMode::Severed || era.is_cancelled() {
        state.reset.fetch_add(1, Ordering::Relaxed);
        reset(&client);
        return;
    }
    let mut server = match TcpStream::connect(target).await {
        Ok(server) => server,
        // The broker is down: the terminal sees its connection reset, as it would see a
        // refused connect without the proxy.
        Err(_) => {
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let cut = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let mut up = std::pin::pin!(relay(client_read, server_write, &state, false));
        let mut down = std::pin::pin!(relay(server_read, client_write, &state, true));
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                () = era.cancelled() => {
                    state.reset.fetch_add(1, Ordering::Relaxed);
                    break true;
                }
                () = stop.cancelled() => break true,
                graceful = &mut up, if !up_done => match graceful {
                    true => up_done = true,
                    false => break true,
                },
                graceful = &mut down, if !down_done => match graceful {
                    true => down_done = true,
                    false => break true,
                },
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if cut {
        reset(&client);
        reset(&server);
    }
}

/// Copies `from` to `to` while the mode allows, and forwards EOF as a FIN. True on that
/// graceful end, false on an error. `down`: target to client (counted).
async fn relay(mut from: ReadHalf<'_>, mut to: WriteHalf<'_>, state: &State, down: bool) -> bool {
    let mut mode = state.mode.subscribe();
    let mut buf = vec![0u8; BUFFER];
    loop {
        if mode.wait_for(|m| *m == ProxyMode::Forward).await.is_err() {
            return false;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return false,
        };
        // A stall that began while this read waited holds the bytes too.
        if mode.wait_for(|m| *m == ProxyMode::Forward).await.is_err() {
            return false;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
        if down {
            state.count_down(n);
        }
    }
    to.shutdown().await.is_ok()
}

/// Makes the coming close of `stream` a RST instead of a FIN.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> (SocketAddr, TaskTracker, DropGuard) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let (t, s) = (tracker.clone(), stop.clone());
        tracker.spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    () = s.cancelled() => return,
                    a = listener.accept() => a.expect("accept"),
                };
                t.spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, tracker, stop.drop_guard())
    }

    async fn roundtrip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut buf = vec![0u8; text.len()];
        stream.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn forwards_severs_stalls_and_restores() {
        let (echo, _tracker, _guard) = echo_server().await;
        let proxy = Proxy::start(echo).await.expect("proxy");
        let mut a = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut a, b"hello").await.expect("echo"), b"hello");

        // Stalled: the bytes wait, and arrive after the restore.
        proxy.stall();
        a.write_all(b"later").await.expect("write");
        let mut buf = [0u8; 5];
        let early = tokio::time::timeout(Duration::from_millis(300), a.read_exact(&mut buf)).await;
        assert!(early.is_err(), "nothing may pass a stalled proxy");
        proxy.restore();
        tokio::time::timeout(Duration::from_secs(5), a.read_exact(&mut buf))
            .await
            .expect("resumed")
            .expect("read");
        assert_eq!(&buf, b"later");

        // Severed: the open connection is reset, new ones too, until restored.
        proxy.sever();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), a.read(&mut byte))
            .await
            .expect("the cut is noticed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let mut b = TcpStream::connect(proxy.addr()).await.expect("connect");
        let refused = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut b, b"x"))
            .await
            .expect("answered");
        assert!(refused.is_err(), "a severed proxy resets new connections");
        proxy.restore();
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut c, b"again").await.expect("echo"), b"again");
        assert!(proxy.reset() >= 2, "{}", proxy.reset());
    }

    #[tokio::test]
    async fn cuts_once_in_the_middle_of_a_transfer() {
        let (echo, _tracker, _guard) = echo_server().await;
        let proxy = Proxy::start(echo).await.expect("proxy");
        let mut a = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut a, b"warm").await.expect("echo"), b"warm");
        proxy.cut_after_down(1000);
        // Far more than the limit: the connection is reset before all of it came back.
        let sent = vec![7u8; 1 << 20];
        let (mut r, mut w) = a.split();
        let write = async {
            let _ = w.write_all(&sent).await;
        };
        let read = async {
            let mut got = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        };
        let ((), got) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
                .await
                .expect("the cut ends the transfer");
        assert!(got < sent.len(), "{got} bytes came back");
        assert!(proxy.down_bytes() >= 1004, "{}", proxy.down_bytes());
        // One-shot: the next connection is relayed.
        let mut b = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut b, b"again").await.expect("echo"), b"again");
    }
}
