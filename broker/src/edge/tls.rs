//! TLS for the MQTT edge: server certificate, mandatory client certificates verified against
//! every CA of the fleet bundle, and the mapping of handshake failures to refusal reasons.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use posfleet_proto::pki::{PkiError, parse_pem_certs};
use rustls::RootCertStore;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;

/// Why the edge's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: PkiError,
    },
    #[error("{path}: no private key found")]
    NoKey { path: PathBuf },
    #[error("{path} holds no CA certificate")]
    NoCa { path: PathBuf },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// The rustls crypto provider used everywhere in the broker.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server config requiring a client certificate issued by one of the CAs in `ca_file`.
pub fn mtls_server_config(
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    let cas = read_certs(ca_file)?;
    if cas.is_empty() {
        return Err(TlsSetupError::NoCa {
            path: ca_file.to_owned(),
        });
    }
    for ca in cas {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
    let certs = read_certs(cert_file)?;
    let key = read_key(key_file)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    // Terminals reconnect often; resumption saves most of a handshake. Tickets are stateless
    // (sealed under rustls' in-memory, rotating ticket key), so the edge keeps nothing per
    // terminal for them; a session cache held about 2 KiB per terminal (docs/benchmarks.md,
    // heap breakdown). A resumed session still presents the client certificate it was
    // established with, and every connection is checked for the certificate's validity period,
    // revocations and retirements after the handshake (`connection.rs`). Tickets do not outlive
    // the process (the ticket key is in memory), so a new fleet CA, which needs a restart, ends
    // every earlier ticket.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

pub(crate) fn read_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsSetupError> {
    let bytes = std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_pem_certs(&bytes).map_err(|source| TlsSetupError::Pem {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let bytes = std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsSetupError::NoKey {
        path: path.to_owned(),
    })
}

/// Metric reason for a failed handshake.
pub(crate) fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
    let Some(inner) = error.get_ref() else {
        return "tls_io";
    };
    match inner.downcast_ref::<rustls::Error>() {
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::InvalidCertificate(_)) => "bad_client_certificate",
        Some(_) => "tls_protocol",
        None => "tls_io",
    }
}
