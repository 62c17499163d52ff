//! Admission: caps, eviction, counters (the table, no sockets), then the deadlines and the
//! handshake CPU gate against a real TLS listener on 127.0.0.1:0.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::pki::PkiDir;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;

/// Bound on waits that only a hang reaches.
const HANG: Duration = Duration::from_secs(20);

fn limits(max: usize, per_address: usize, pending: usize) -> AdmissionLimits {
    AdmissionLimits {
        max_connections: max,
        max_per_address: per_address,
        max_pending_per_address: pending,
        ..AdmissionLimits::api()
    }
}

fn peer(last: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 40000))
}

#[test]
fn one_address_never_takes_every_slot() {
    let metrics = Arc::new(Metrics::new());
    let admission = Admission::new("api", limits(5, 3, 2), Arc::clone(&metrics));
    let a1 = admission.admit(peer(2)).unwrap();
    let a2 = admission.admit(peer(2)).unwrap();
    assert_eq!(
        admission.admit(peer(2)).unwrap_err(),
        Refusal::PendingPerAddress
    );
    a1.establish();
    let _a3 = admission.admit(peer(2)).unwrap();
    // Established connections still count against the address.
    assert_eq!(admission.admit(peer(2)).unwrap_err(), Refusal::PerAddress);
    // Others find room.
    let _b = admission.admit(peer(3)).unwrap();
    assert_eq!(metrics.admission_refusals("api", "pending_per_address"), 1);
    assert_eq!(metrics.admission_refusals("api", "per_address"), 1);
    // A dropped ticket gives its slot back.
    drop(a1);
    assert_eq!(admission.address_counts(peer(2).ip()), (2, 2));
    assert!(a2.establish());
    let _a4 = admission.admit(peer(2)).unwrap();
    assert_eq!(admission.address_counts(peer(2).ip()), (3, 2));
}

#[tokio::test]
async fn a_full_listener_evicts_its_oldest_pending_connection() {
    let metrics = Arc::new(Metrics::new());
    let admission = Admission::new("mqtt", limits(3, 2, 2), Arc::clone(&metrics));
    let established = admission.admit(peer(2)).unwrap();
    assert!(established.establish());
    let oldest = admission.admit(peer(3)).unwrap();
    let newer = admission.admit(peer(4)).unwrap();
    // Full: the newcomer takes the oldest pending connection's slot.
    let newcomer = admission.admit(peer(5)).unwrap();
    tokio::time::timeout(HANG, oldest.evicted())
        .await
        .expect("the oldest pending connection is evicted");
    assert!(
        !oldest.establish(),
        "an evicted connection cannot establish"
    );
    assert_eq!(metrics.admission_refusals("mqtt", "evicted"), 1);
    // Its ticket was released at eviction: dropping it changes nothing.
    drop(oldest);
    assert_eq!(admission.address_counts(peer(3).ip()), (0, 0));
    assert_eq!(admission.address_counts(peer(4).ip()), (1, 1));
    // Nothing pending any more: a newcomer is refused.
    assert!(newer.establish() && newcomer.establish());
    assert_eq!(admission.admit(peer(6)).unwrap_err(), Refusal::Full);
    assert_eq!(metrics.admission_refusals("mqtt", "full"), 1);
    let text = metrics.render();
    assert!(
        text.contains(r#"posfleet_admission_connections{site="mqtt",state="established"} 3"#),
        "{text}"
    );
}

#[test]
fn ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
    let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
    let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(AddressKey::of(a.into()), AddressKey::of(b.into()));
    assert_ne!(AddressKey::of(a.into()), AddressKey::of(c.into()));
    let mapped: Ipv6Addr = "::ffff:127.0.0.2".parse().unwrap();
    assert_eq!(
        AddressKey::of(mapped.into()),
        AddressKey::of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
    );
}

#[test]
fn limits_without_headroom_are_refused_naming_the_field() {
    for good in [
        AdmissionLimits::api(),
        AdmissionLimits::device(),
        AdmissionLimits::mqtt(),
    ] {
        good.check().unwrap();
    }
    let bad = limits(10, 10, 5).check().unwrap_err();
    assert!(bad.contains("max_per_address"), "{bad}");
    let bad = limits(10, 5, 6).check().unwrap_err();
    assert!(bad.contains("max_pending_per_address"), "{bad}");
    let bad = limits(0, 0, 0).check().unwrap_err();
    assert!(bad.contains("max_connections"), "{bad}");
}

/// A TLS listener whose every connection goes through `tls_handshake`; an established one
/// gets `ok` and is held until the client closes it.
struct Listener {
    addr: SocketAddr,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    client: Arc<rustls::ClientConfig>,
    _tmp: tempfile::TempDir,
}

impl Listener {
    async fn start(limits: AdmissionLimits) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = PkiDir::at(tmp.path().join("pki"));
        pki.init(&[]).unwrap();
        let server = crate::api::server_tls_config(&pki.server_cert(), &pki.server_key()).unwrap();
        let ca = std::fs::read(pki.ca_cert()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in posfleet_proto::pki::parse_pem_certs(&ca).unwrap() {
            roots.add(cert).unwrap();
        }
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let metrics = Arc::new(Metrics::new());
        let admission = Admission::new("api", limits, Arc::clone(&metrics));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server);
        let serving = Arc::clone(&admission);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    return;
                };
                let Ok(ticket) = serving.admit(peer) else {
                    continue;
                };
                let (admission, acceptor) = (Arc::clone(&serving), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = admission.tls_handshake(&ticket, tcp, &acceptor).await else {
                        return;
                    };
                    assert!(!tls.get_ref().0.holds_slot());
                    ticket.establish();
                    let _ = tls.write_all(b"ok").await;
                    let mut buf = [0u8; 16];
                    while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        Self {
            addr,
            admission,
            metrics,
            client: Arc::new(client),
            _tmp: tmp,
        }
    }

    /// A full TLS connection that reads the server's `ok`.
    async fn legit(&self) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = TlsConnector::from(Arc::clone(&self.client))
            .connect(name, tcp)
            .await
            .expect("handshake");
        let mut ok = [0u8; 2];
        tls.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"ok");
    }

    /// The ClientHello a real client sends first.
    fn client_hello(&self) -> Vec<u8> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::clone(&self.client), name).unwrap();
        let mut hello = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut hello).unwrap();
        }
        hello
    }
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(HANG, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not within {HANG:?}: {what}"));
}

/// Reads until the server closes `tcp`.
async fn closed(tcp: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(HANG, async {
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
    .expect("the server closes the socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_wait_for_the_client_hold_no_cpu_slot() {
    // One slot, and handshakes that would outlive the test if they kept it.
    let listener = Listener::start(AdmissionLimits {
        handshake_cpu_slots: 1,
        silent_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(60),
        ..AdmissionLimits::api()
    })
    .await;
    let hello = listener.client_hello();
    // Silent, trickling and stalled-after-ClientHello sockets.
    let silent = TcpStream::connect(listener.addr).await.unwrap();
    let mut trickle = TcpStream::connect(listener.addr).await.unwrap();
    trickle.write_all(&hello[..3]).await.unwrap();
    let mut stalled = TcpStream::connect(listener.addr).await.unwrap();
    stalled.write_all(&hello).await.unwrap();
    // The server answered the stalled one's ClientHello: its handshake now waits for the
    // client's second flight.
    let mut flight = [0u8; 1];
    tokio::time::timeout(HANG, stalled.read_exact(&mut flight))
        .await
        .expect("the server flight")
        .unwrap();
    // The one slot is free: a real client completes its handshake meanwhile.
    tokio::time::timeout(HANG, listener.legit())
        .await
        .expect("a handshake completes while three others wait for their clients");
    until("three pending connections", || {
        listener.admission.address_counts(listener.addr.ip()).1 == 3
    })
    .await;
    drop((silent, trickle, stalled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_sockets_are_closed_at_their_deadlines_and_counted() {
    let listener = Listener::start(AdmissionLimits {
        silent_timeout: Duration::from_millis(200),
        handshake_timeout: Duration::from_millis(600),
        ..AdmissionLimits::api()
    })
    .await;
    let mut silent = TcpStream::connect(listener.addr).await.unwrap();
    closed(&mut silent).await;
    until("the silent socket counted", || {
        listener.metrics.admission_refusals("api", "silent") == 1
    })
    .await;
    let hello = listener.client_hello();
    let mut slow = TcpStream::connect(listener.addr).await.unwrap();
    slow.write_all(&hello[..3]).await.unwrap();
    closed(&mut slow).await;
    until("the slow handshake counted", || {
        listener
            .metrics
            .admission_refusals("api", "handshake_timeout")
            == 1
    })
    .await;
    until("both slots back", || {
        listener.admission.address_counts(listener.addr.ip()) == (0, 0)
    })
    .await;
    listener.legit().await;
}

#[test]
fn the_flags_default_to_the_documented_limits_and_refuse_limits_without_headroom() {
    use clap::Parser;
    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        admission: AdmissionArgs,
    }
    let defaults = Flags::try_parse_from(["serve"])
        .unwrap()
        .admission
        .options();
    assert_eq!(defaults, AdmissionOptions::default());
    defaults.check().unwrap();
    let flags = Flags::try_parse_from([
        "serve",
        "--api-max-connections",
        "10",
        "--api-max-per-address",
        "10",
        "--silent-timeout",
        "2s",
    ])
    .unwrap()
    .admission
    .options();
    assert_eq!(flags.api.silent_timeout, Duration::from_secs(2));
    assert_eq!(flags.mqtt.silent_timeout, Duration::from_secs(2));
    let error = flags.check().unwrap_err();
    assert!(
        error.contains("api") && error.contains("max_per_address"),
        "{error}"
    );
}
