//! The accept loop: idle sockets, handshake timeout, connection cap.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

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
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
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
    // Takes the only slot until its handshake times out.
    let _idle = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
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
    let server = TestServer::start().await;
    let _idle = TcpStream::connect(server.addr).await.unwrap();
    // An established keep-alive connection too.
    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "the listener is closed"
    );
}
