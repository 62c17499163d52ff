//! The accept loop: idle sockets, handshake timeout, connection cap.

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
    let limits = ApiLimits {
        handshake_timeout: Duration::from_millis(200),
        ..ApiLimits::default()
    };
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

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let limits = ApiLimits {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(300),
        ..ApiLimits::default()
    };
    let server = TestServer::start_with(limits, 16).await;
    // Takes the only slot until its handshake times out (measured from before it connects:
    // its slot is taken later, so the bound holds however slowly this task runs).
    let started = Instant::now();
    let _idle = TcpStream::connect(server.addr).await.unwrap();
    let response = server.get("/healthz").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "served before the idle connection gave up its slot"
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_idle_or_handshaking_clients() {
    // Waiting for those clients would take a minute (the grace) or an hour (their timeouts):
    // far beyond a bound that only a hang of a loaded machine reaches.
    let limits = ApiLimits {
        shutdown_grace: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(3600),
        header_read_timeout: Duration::from_secs(3600),
        ..ApiLimits::default()
    };
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
    server.stop().await;
}
