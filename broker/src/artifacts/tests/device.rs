//! The device endpoint over real mutual TLS on 127.0.0.1:0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::{Ca, CertifiedKey, PkiDir, parse_pem_certs};
use posfleet_proto::signing::KeyRing;
use reqwest::StatusCode;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::put;
use crate::api::{ApiLimits, Site, serve_site};
use crate::artifacts::{
    ArtifactCatalog, ArtifactStore, Artifacts, ArtifactsConfig, Inserted, device_router,
    device_tls_config,
};
use crate::metrics::Metrics;

struct Endpoint {
    addr: SocketAddr,
    pki: PkiDir,
    artifacts: Arc<Artifacts>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    _tmp: tempfile::TempDir,
}

impl Endpoint {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = PkiDir::at(tmp.path().join("pki"));
        pki.init(&[]).unwrap();
        let store = ArtifactStore::open(&tmp.path().join("artifacts"), 1 << 20).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let artifacts = Arc::new(Artifacts::new(
            Arc::new(store),
            KeyRing::default(),
            pki.release_public_key(),
            ArtifactsConfig::new(format!("https://{addr}")),
            Arc::clone(&metrics),
        ));
        let tls = device_tls_config(&pki.ca_cert(), &pki.server_cert(), &pki.server_key()).unwrap();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut limits = ApiLimits::default();
        limits.admission.handshake_timeout = Duration::from_secs(2);
        let site = Site {
            name: "device endpoint",
            label: "device",
            app: device_router(Arc::clone(&artifacts)),
            limits,
            metrics: Arc::clone(&metrics),
            client_identity: true,
        };
        tracker.spawn(serve_site(listener, tls, site, cancel.clone()));
        Self {
            addr,
            pki,
            artifacts,
            metrics,
            cancel,
            tracker,
            _tmp: tmp,
        }
    }

    /// A client trusting the fleet CA, presenting `cert` (if any).
    fn client(&self, cert: Option<&CertifiedKey>) -> reqwest::Client {
        let mut roots = rustls::RootCertStore::empty();
        for c in parse_pem_certs(&std::fs::read(self.pki.ca_cert()).unwrap()).unwrap() {
            roots.add(c).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let tls = match cert {
            Some(cert) => builder
                .with_client_auth_cert(
                    parse_pem_certs(cert.cert_pem.as_bytes()).unwrap(),
                    PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    fn device_cert(&self) -> CertifiedKey {
        self.pki
            .load_ca()
            .unwrap()
            .issue_device(&DeviceId::new("T-1").unwrap())
            .unwrap()
    }

    /// Stores `bytes` and returns its download URL.
    fn add(&self, bytes: &[u8]) -> String {
        let Inserted::Created(meta) = put(self.artifacts.store(), bytes, "1.0").0.unwrap() else {
            panic!("created expected");
        };
        self.artifacts.download_url(&meta.id)
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .expect("the endpoint stops");
    }
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_device_downloads_whole_and_in_ranges() {
    let endpoint = Endpoint::start().await;
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let url = endpoint.add(&bytes);
    assert!(url.starts_with(&format!("https://{}/device/v1/artifacts/", endpoint.addr)));
    let client = endpoint.client(Some(&endpoint.device_cert()));

    let full = client.get(&url).send().await.unwrap();
    assert_eq!(full.status(), StatusCode::OK);
    assert_eq!(header(&full, "accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(
        header(&full, "content-length"),
        Some(bytes.len().to_string())
    );
    assert_eq!(full.bytes().await.unwrap().as_ref(), bytes.as_slice());

    let tail = client
        .get(&url)
        .header("range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&tail, "content-range"),
        Some(format!("bytes 10-{}/{}", bytes.len() - 1, bytes.len()))
    );
    assert_eq!(tail.bytes().await.unwrap().as_ref(), &bytes[10..]);

    let middle = client
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(middle.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&middle, "content-length").as_deref(), Some("10"));
    assert_eq!(
        header(&middle, "content-range"),
        Some(format!("bytes 10-19/{}", bytes.len()))
    );
    assert_eq!(middle.bytes().await.unwrap().as_ref(), &bytes[10..20]);

    let beyond = client
        .get(&url)
        .header("range", format!("bytes={}-", bytes.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        header(&beyond, "content-range"),
        Some(format!("bytes */{}", bytes.len()))
    );

    let served = (bytes.len() + (bytes.len() - 10) + 10) as u64;
    assert_eq!(endpoint.metrics.artifact_bytes_served_total.get(), served);
    assert!(
        endpoint
            .metrics
            .render()
            .contains(&format!("posfleet_artifact_bytes_served_total {served}"))
    );
    endpoint.stop().await;
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404() {
    let endpoint = Endpoint::start().await;
    let client = endpoint.client(Some(&endpoint.device_cert()));
    for id in [&"ab".repeat(32), "nope", &"AB".repeat(32)] {
        let url = format!("https://{}/device/v1/artifacts/{id}", endpoint.addr);
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{id}");
    }
    let other = format!("https://{}/api/v1/artifacts", endpoint.addr);
    assert_eq!(
        client.get(&other).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    endpoint.stop().await;
}

#[tokio::test]
async fn clients_without_a_fleet_certificate_are_refused_at_the_handshake() {
    let endpoint = Endpoint::start().await;
    let url = endpoint.add(b"secret build");
    // A controller identity is fine too.
    let controller = endpoint
        .pki
        .load_ca()
        .unwrap()
        .issue_controller("ops")
        .unwrap();
    let ok = endpoint.client(Some(&controller)).get(&url).send().await;
    let ok = ok.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.bytes().await.unwrap().as_ref(), b"secret build");

    let none = endpoint.client(None).get(&url).send().await;
    assert!(none.is_err(), "no client certificate: {none:?}");

    let foreign = Ca::generate("another fleet")
        .unwrap()
        .issue_device(&DeviceId::new("T-1").unwrap())
        .unwrap();
    let other_ca = endpoint.client(Some(&foreign)).get(&url).send().await;
    assert!(
        other_ca.is_err(),
        "certificate from another CA: {other_ca:?}"
    );
    assert_eq!(endpoint.metrics.artifact_bytes_served_total.get(), 12);
    endpoint.stop().await;
}
