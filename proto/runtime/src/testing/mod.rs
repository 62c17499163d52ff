//! Test support for the crates that use the MQTT session: an in-memory fleet PKI and a
//! scriptable fake MQTT broker over mTLS on loopback (port 0). Compiled for this crate's unit
//! tests and, with the `testing` feature, for the agent's.

// Test support, compiled outside `cfg(test)` for the agent's tests: a panic is how it reports.
#![allow(clippy::unwrap_used, clippy::new_without_default)]

mod fake_broker;

use std::sync::Arc;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::{Ca, CertifiedKey};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

pub use fake_broker::{FakeBroker, Seen};

use crate::tls;

/// A fleet CA and a broker server certificate for 127.0.0.1, generated in memory.
pub struct TestPki {
    pub ca: Ca,
    server: CertifiedKey,
}

impl TestPki {
    pub fn new() -> Self {
        Self::with_ca(Ca::generate("test fleet CA").unwrap())
    }

    /// Uses an existing CA (e.g. the one `PkiDir::init` wrote).
    pub fn with_ca(ca: Ca) -> Self {
        let server = ca
            .issue_server(&["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        Self { ca, server }
    }

    /// A client config for a freshly issued device certificate.
    pub fn device_tls(&self, id: &str) -> Arc<rustls::ClientConfig> {
        let issued = self.ca.issue_device(&DeviceId::new(id).unwrap()).unwrap();
        tls::client_config_from_pem(
            self.ca.cert_pem().as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .unwrap()
    }

    /// A server config that requires a client certificate from the fleet CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let provider = tls::provider();
        let roots = tls::root_store_from_pem(self.ca.cert_pem().as_bytes()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .unwrap();
        let chain = posfleet_proto::pki::parse_pem_certs(self.server.cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.server.key_pem.as_bytes()).unwrap();
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }
}
