//! Connection floods: N attacking sockets against one listener (the MQTT edge, the admin API or
//! the device endpoint), all from one source address or each from its own 127.x.y.z, each
//! doing one of the slow-client attacks of issue 10 and reconnecting (after a pause) whenever
//! the server closes it, so that the pressure lasts as long as the flood runs.
//!
//! Used by the admission tests (`tests/e2e/admission.rs`) and by `fleet-bench flood`.
//! Loopback only: every source address is in 127.0.0.0/8.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What each attacking socket does once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// TCP connect, then nothing at all.
    Idle,
    /// A TLS ClientHello, one byte per trickle interval (a handshake that never ends).
    TrickleHello,
    /// A whole ClientHello at once, then silence: the server has done its part of the
    /// handshake (key exchange, signature) and waits for the client's second flight.
    StallAfterHello,
    /// A complete TLS handshake, then request headers one byte per trickle interval, never
    /// finished.
    TrickleHeaders,
    /// A complete TLS handshake and the complete headers of a request announcing a large
    /// body, then the body one byte per trickle interval.
    TrickleBody,
}

impl Attack {
    pub const ALL: [Attack; 5] = [
        Attack::Idle,
        Attack::TrickleHello,
        Attack::StallAfterHello,
        Attack::TrickleHeaders,
        Attack::TrickleBody,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::Idle => "idle TCP",
            Attack::TrickleHello => "trickled ClientHello",
            Attack::StallAfterHello => "stalled after ClientHello",
            Attack::TrickleHeaders => "trickled headers",
            Attack::TrickleBody => "trickled body",
        }
    }

    /// True for the attacks that speak HTTP after the handshake.
    pub fn is_http(self) -> bool {
        matches!(self, Attack::TrickleHeaders | Attack::TrickleBody)
    }
}

/// Where the attacking sockets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sources {
    /// Every socket from this address.
    One(Ipv4Addr),
    /// Socket i from its own address 127.100.x.y, the (`first` + i)-th of that range
    /// (distinct for up to 62,500 sockets; floods that run together use disjoint ranges).
    Many { first: usize },
}

impl Sources {
    /// The source address of socket `i`.
    pub fn address(self, i: usize) -> Ipv4Addr {
        match self {
            Sources::One(ip) => ip,
            Sources::Many { first } => {
                let i = (first + i) % 62_500;
                Ipv4Addr::new(127, 100, (i / 250) as u8, (i % 250 + 1) as u8)
            }
        }
    }

    pub fn describe(self) -> String {
        match self {
            Sources::One(ip) => format!("one address ({ip})"),
            Sources::Many { .. } => "one address each (127.100.x.y)".to_owned(),
        }
    }
}

/// One flood.
#[derive(Debug, Clone)]
pub struct FloodOptions {
    pub target: SocketAddr,
    pub sockets: usize,
    pub sources: Sources,
    pub attack: Attack,
    /// Client TLS config of the handshaking attacks (with a device certificate when the
    /// listener requires one).
    pub tls: Arc<rustls::ClientConfig>,
    /// Request line of the HTTP attacks, e.g. `POST /api/v1/auth/login`.
    pub request: String,
    /// Pause between two trickled bytes.
    pub trickle: Duration,
    /// Pause before a socket the server closed connects again.
    pub reconnect_pause: Duration,
}

impl FloodOptions {
    pub fn new(
        target: SocketAddr,
        sockets: usize,
        sources: Sources,
        attack: Attack,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            target,
            sockets,
            sources,
            attack,
            tls,
            request: "POST /api/v1/auth/login".to_owned(),
            trickle: Duration::from_secs(1),
            reconnect_pause: Duration::from_secs(1),
        }
    }
}

/// What the attacking sockets have achieved so far.
#[derive(Debug, Default)]
pub struct FloodStats {
    /// TCP connections established (the first and every reconnect).
    pub connected: AtomicU64,
    /// Sockets that are open right now and have reached their attack (connected; first
    /// byte sent; handshake done, first header or body byte sent).
    pub holding: AtomicUsize,
    /// Sockets the server closed (or refused) so far.
    pub closed_by_server: AtomicU64,
    /// Connection attempts that failed locally (e.g. out of file descriptors).
    pub connect_errors: AtomicU64,
}

/// A running flood; stopped (every socket closed) by [`Flood::stop`] or on drop.
#[derive(Debug)]
pub struct Flood {
    cancel: CancellationToken,
    tracker: TaskTracker,
    stats: Arc<FloodStats>,
    sockets: usize,
}

impl Flood {
    /// Starts every attacking socket (each in its own task) and returns at once.
    pub fn start(opts: FloodOptions) -> anyhow::Result<Self> {
        let hello = Arc::new(client_hello(&opts.tls, opts.target.ip())?);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let stats = Arc::new(FloodStats::default());
        let opts = Arc::new(opts);
        for i in 0..opts.sockets {
            let source = opts.sources.address(i);
            tracker.spawn(attacker(
                Arc::clone(&opts),
                source,
                Arc::clone(&hello),
                Arc::clone(&stats),
                cancel.clone(),
            ));
        }
        tracker.close();
        Ok(Self {
            cancel,
            tracker,
            stats,
            sockets: opts.sockets,
        })
    }

    pub fn stats(&self) -> &FloodStats {
        &self.stats
    }

    /// Sockets holding their attack right now.
    pub fn holding(&self) -> usize {
        self.stats.holding.load(Ordering::SeqCst)
    }

    /// TCP connections established so far.
    pub fn connected(&self) -> u64 {
        self.stats.connected.load(Ordering::SeqCst)
    }

    /// Sockets the server closed so far.
    pub fn closed_by_server(&self) -> u64 {
        self.stats.closed_by_server.load(Ordering::SeqCst)
    }

    /// `Ok` once `holding` sockets hold their attack; the error says how far the flood got.
    pub fn in_place(&self, holding: usize) -> anyhow::Result<()> {
        let now = self.holding();
        anyhow::ensure!(
            now >= holding,
            "flood: {now} of {} sockets holding (waiting for {holding}), {} connections so far, {} closed by the server, {} local connect errors",
            self.sockets,
            self.connected(),
            self.closed_by_server(),
            self.stats.connect_errors.load(Ordering::SeqCst)
        );
        Ok(())
    }

    /// [`Flood::in_place`], and every socket has connected at least once.
    pub fn fully_in_place(&self, holding: usize) -> anyhow::Result<()> {
        self.in_place(holding)?;
        anyhow::ensure!(
            self.connected() >= self.sockets as u64,
            "flood: {} of {} sockets connected so far",
            self.connected(),
            self.sockets
        );
        Ok(())
    }

    /// Closes every attacking socket and waits (bounded) for their tasks.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await;
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The ClientHello a rustls client sends first to `ip`.
fn client_hello(tls: &Arc<rustls::ClientConfig>, ip: IpAddr) -> anyhow::Result<Vec<u8>> {
    let mut conn = rustls::ClientConnection::new(Arc::clone(tls), ServerName::from(ip))
        .context("a TLS client for the ClientHello")?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).context("the ClientHello")?;
    }
    Ok(hello)
}

/// Counts a socket as holding while alive.
struct Holding(Arc<FloodStats>);

impl Holding {
    fn new(stats: &Arc<FloodStats>) -> Self {
        stats.holding.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(stats))
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.holding.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One attacking socket: attack, and when the server closes it, pause and attack again.
async fn attacker(
    opts: Arc<FloodOptions>,
    source: Ipv4Addr,
    hello: Arc<Vec<u8>>,
    stats: Arc<FloodStats>,
    cancel: CancellationToken,
) {
    loop {
        let attack = tokio::select! {
            () = cancel.cancelled() => return,
            result = attack_once(&opts, source, &hello, &stats) => result,
        };
        match attack {
            Ok(()) => {
                stats.closed_by_server.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => {
                stats.connect_errors.fetch_add(1, Ordering::SeqCst);
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(opts.reconnect_pause) => {}
        }
    }
}

/// Connects and runs the attack until the server closes the socket (`Ok`); `Err` if the
/// socket could not be connected at all.
async fn attack_once(
    opts: &FloodOptions,
    source: Ipv4Addr,
    hello: &[u8],
    stats: &Arc<FloodStats>,
) -> anyhow::Result<()> {
    let socket = TcpSocket::new_v4().context("socket")?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .with_context(|| format!("bind {source}"))?;
    let mut tcp = socket.connect(opts.target).await.context("connect")?;
    stats.connected.fetch_add(1, Ordering::SeqCst);
    match opts.attack {
        Attack::Idle => {
            let _holding = Holding::new(stats);
            until_closed(&mut tcp).await;
        }
        Attack::TrickleHello => {
            let (mut reader, mut writer) = tcp.into_split();
            let mut holding = None;
            let trickle = async {
                for byte in hello {
                    if writer.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    holding.get_or_insert_with(|| Holding::new(stats));
                    tokio::time::sleep(opts.trickle).await;
                }
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = trickle => {}
                () = until_closed(&mut reader) => {}
            }
        }
        Attack::StallAfterHello => {
            if tcp.write_all(hello).await.is_ok() {
                let _holding = Holding::new(stats);
                until_closed(&mut tcp).await;
            }
        }
        Attack::TrickleHeaders | Attack::TrickleBody => {
            let name = ServerName::from(opts.target.ip());
            let Ok(tls) = TlsConnector::from(Arc::clone(&opts.tls))
                .connect(name, tcp)
                .await
            else {
                return Ok(());
            };
            let (head, byte) = if opts.attack == Attack::TrickleHeaders {
                let head = format!("{} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", opts.request);
                (head, b'a')
            } else {
                let head = format!(
                    "{} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                     Content-Length: 1000000\r\n\r\n{{\"user\":\"",
                    opts.request
                );
                (head, b'a')
            };
            let (mut reader, mut writer) = tokio::io::split(tls);
            let mut holding = None;
            let trickle = async {
                if writer.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    if writer.write_all(&[byte]).await.is_err() || writer.flush().await.is_err() {
                        return;
                    }
                    holding.get_or_insert_with(|| Holding::new(stats));
                    tokio::time::sleep(opts.trickle).await;
                }
            };
            tokio::select! {
                () = trickle => {}
                () = until_closed(&mut reader) => {}
            }
        }
    }
    Ok(())
}

/// Reads (and discards) until the peer closes the connection or it fails.
async fn until_closed<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A TCP connection to `target` from `source` (a legitimate client from a chosen address).
pub async fn connect_from(source: Ipv4Addr, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket
        .connect(target)
        .await
        .map_err(|e| anyhow!("connect {source} -> {target}: {e}"))
}

/// An HTTPS client for the legitimate requests under a flood: trusts `ca_pem`, presents
/// `identity` if given (the device endpoint), opens a new connection for every request (so
/// each one goes through admission and a handshake), each request bounded by `timeout`.
pub fn https_client(
    ca_pem: &[u8],
    identity: Option<&posfleet_proto::pki::CertifiedKey>,
    timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    let mut tls = (*crate::mqtt::tls_config(ca_pem, identity)?).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("cannot build the HTTP client")
}
