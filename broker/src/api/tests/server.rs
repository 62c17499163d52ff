//! The accept loop: idle sockets, handshake timeout, admission caps and eviction, header and
//! body deadlines.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::super::ApiLimits;
use super::TestServer;

#[tokio::test]
async fn a_client_that_never_says_hello_does_not_block_others() {
    let server = TestServer::start().await;
    let _idle = TcpStream::connect(server.addr).await.unwrap();
    let _idle2 = TcpStream::connect(server.addr).await.unwrap();
    let response = server.get("/api/v1/devices").await;
    assert_eq!(response.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn an_idle_handshake_is_dropped_after_the_timeout() {
    let mut limits = ApiLimits::default();
    limits.admission.handshake_timeout = Duration::from_millis(200);
    let server = TestServer::start_with(limits, 16).await;
    // Taken before the connection exists, so the server's timer starts later (a lower bound
    // that holds however slowly this task runs).
    let started = Instant::now();
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the server closes the idle socket");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    server.stop().await;
}

/// A TCP connection from `source` (another loopback address than the test client's).
async fn connect_from(source: [u8; 4], server: &TestServer) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    socket.connect(server.addr).await.unwrap()
}

/// Reads a raw socket until the server closes it (bounded).
async fn tcp_closed(tcp: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(20), async {
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
    .expect("the server closes the socket");
}

#[tokio::test]
async fn a_full_server_gives_the_oldest_pending_slot_to_a_new_client() {
    // Two slots, one per address; idle sockets would hold theirs for a minute.
    let mut limits = ApiLimits::default();
    limits.admission.max_connections = 2;
    limits.admission.max_per_address = 1;
    limits.admission.max_pending_per_address = 1;
    limits.admission.silent_timeout = Duration::from_secs(60);
    limits.admission.handshake_timeout = Duration::from_secs(60);
    let server = TestServer::start_with(limits, 16).await;
    let mut oldest = connect_from([127, 0, 0, 2], &server).await;
    let _newer = connect_from([127, 0, 0, 3], &server).await;
    let response = server.get("/healthz").await;
    assert_eq!(response.status(), StatusCode::OK);
    tcp_closed(&mut oldest).await;
    assert_eq!(server.metrics.admission_refusals("api", "evicted"), 1);
    server.stop().await;
}

#[tokio::test]
async fn one_address_beyond_its_pending_cap_is_refused_and_others_are_served() {
    let mut limits = ApiLimits::default();
    limits.admission.max_pending_per_address = 2;
    limits.admission.silent_timeout = Duration::from_secs(60);
    let server = TestServer::start_with(limits, 16).await;
    let _a = connect_from([127, 0, 0, 2], &server).await;
    let _b = connect_from([127, 0, 0, 2], &server).await;
    let mut refused = connect_from([127, 0, 0, 2], &server).await;
    tcp_closed(&mut refused).await;
    assert_eq!(
        server
            .metrics
            .admission_refusals("api", "pending_per_address"),
        1
    );
    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_idle_or_handshaking_clients() {
    // Waiting for those clients would take a minute (the grace) or an hour (their timeouts):
    // far beyond a bound that only a hang of a loaded machine reaches.
    let mut limits = ApiLimits {
        shutdown_grace: Duration::from_secs(60),
        header_read_timeout: Duration::from_secs(3600),
        ..ApiLimits::default()
    };
    limits.admission.silent_timeout = Duration::from_secs(3600);
    limits.admission.handshake_timeout = Duration::from_secs(3600);
    let server = TestServer::start_with(limits, 64).await;
    let _idle = TcpStream::connect(server.addr).await.unwrap();
    // An established keep-alive connection too.
    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "the listener is closed"
    );
}

/// A raw TLS connection to the server.
async fn tls_connect(server: &TestServer) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    TlsConnector::from(server.tls.clone())
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads until the server closes the connection; returns what was read.
async fn read_to_close(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .expect("the server closes the connection in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn silent_and_idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    let limits = ApiLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ApiLimits::default()
    };
    let server = TestServer::start_with(limits, 16).await;
    // Handshakes, then never sends a request (timed from before the connection exists).
    let started = Instant::now();
    let mut silent = tls_connect(&server).await;
    read_to_close(&mut silent).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    // One request, then idles on the kept-alive connection.
    let mut idle = tls_connect(&server).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let seen = read_to_close(&mut idle).await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    // The stop waits for both connection tasks: then the silent one is counted, the idle
    // keep-alive one (it had a request) is not.
    server.stop().await;
    assert_eq!(
        server.metrics.admission_refusals("api", "header_timeout"),
        1
    );
}

#[tokio::test]
async fn a_trickled_body_is_cut_off_at_the_minimum_rate() {
    let limits = ApiLimits {
        body_min_rate: 1024,
        body_grace: Duration::from_millis(300),
        ..ApiLimits::default()
    };
    let server = TestServer::start_with(limits, 16).await;
    let mut slow = tls_connect(&server).await;
    slow.write_all(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"user\":",
    )
    .await
    .unwrap();
    // One byte now and then: far below 1 KiB/s. The server answers (or not) and closes.
    let trickle = async {
        loop {
            if slow.write_all(b"a").await.is_err() || slow.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), trickle)
        .await
        .expect("the server closes the connection of a trickled body");
    assert_eq!(server.metrics.admission_refusals("api", "slow_body"), 1);
    server.stop().await;
}
