//! TLS client configuration for MQTT over mTLS, and the device id a certificate proves.
//!
//! Always rustls with the ring provider, passed explicitly (no process-global default), TLS 1.2
//! and 1.3 with rustls' safe defaults. Every CA in the bundle is trusted (a bundle holds two
//! during a CA rotation).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::{Identity, PkiError, parse_pem_certs};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::warn;

/// Why a TLS configuration or identity could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: &'static str },
    #[error("{what}: malformed PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("private key: no PEM private key found (expected PKCS#8, SEC1 or PKCS#1)")]
    NoKey,
    #[error("CA bundle: certificate {index} is not a usable trust anchor: {reason}")]
    BadCa { index: usize, reason: String },
    #[error("client certificate and key were refused")]
    Rustls(#[from] rustls::Error),
    #[error("certificate does not carry a posfleet device identity")]
    Identity(#[from] PkiError),
    #[error("certificate belongs to {0}, not to a device; use a device certificate")]
    NotDevice(Identity),
}

/// The crypto provider of every TLS client in this crate.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the CA bundle, client certificate (chain) and key files and builds a client config.
pub fn client_config_from_files(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    let ca_pem = read("CA bundle", ca)?;
    let cert_pem = read("client certificate", cert)?;
    warn_if_key_is_exposed(key);
    let key_pem = read("private key", key)?;
    client_config_from_pem(&ca_pem, &cert_pem, &key_pem)
}

/// Loads a device's TLS material from files: the client config and the device id its
/// certificate proves (which must be a device certificate).
pub fn load_device_identity(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(DeviceId, Arc<ClientConfig>), TlsError> {
    let ca_pem = read("CA bundle", ca)?;
    let cert_pem = read("client certificate", cert)?;
    warn_if_key_is_exposed(key);
    let key_pem = read("private key", key)?;
    let id = device_id_from_cert_pem(&cert_pem)?;
    Ok((id, client_config_from_pem(&ca_pem, &cert_pem, &key_pem)?))
}

/// Builds a client config that trusts every CA in `ca_pem` and presents `cert_pem` (leaf
/// first, optionally followed by intermediates) with `key_pem`.
pub fn client_config_from_pem(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with_roots(root_store_from_pem(ca_pem)?, cert_pem, key_pem)
}

/// A root store of every CA in `ca_pem`; build it once and share it (the simulator does).
pub fn root_store_from_pem(ca_pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let certs = certs("CA bundle", ca_pem)?;
    let mut roots = RootCertStore::empty();
    for (index, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// Builds a client config over an already parsed root store.
pub fn client_config_with_roots(
    roots: Arc<RootCertStore>,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ClientConfig>, TlsError> {
    let chain = certs("client certificate", cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey,
        other => TlsError::Pem {
            what: "private key",
            reason: other.to_string(),
        },
    })?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// The device id proved by the first certificate in `cert_pem`. Fails clearly if it is a
/// controller certificate or carries no posfleet identity. Does not verify the chain.
pub fn device_id_from_cert_pem(cert_pem: &[u8]) -> Result<DeviceId, TlsError> {
    let chain = certs("device certificate", cert_pem)?;
    let leaf = chain.first().ok_or(TlsError::NoCertificate {
        what: "device certificate",
    })?;
    match Identity::from_cert_der(leaf)? {
        Identity::Device(id) => Ok(id),
        other => Err(TlsError::NotDevice(other)),
    }
}

fn certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = parse_pem_certs(pem).map_err(|e| TlsError::Pem {
        what,
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// A private key readable by group or others is a finding, not a reason to stop the terminal.
fn warn_if_key_is_exposed(key: &Path) {
    if let Ok(meta) = std::fs::metadata(key) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(path = %key.display(), mode = format_args!("{mode:o}"), "private key file is readable by group or others; chmod 600 it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use posfleet_proto::pki::Ca;

    fn device(id: &str) -> (Ca, posfleet_proto::pki::CertifiedKey) {
        let ca = Ca::generate("test CA").unwrap();
        let issued = ca.issue_device(&DeviceId::new(id).unwrap()).unwrap();
        (ca, issued)
    }

    #[test]
    fn device_id_comes_from_the_certificate() {
        let (_, issued) = device("T-0042");
        let id = device_id_from_cert_pem(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(id.as_str(), "T-0042");
    }

    #[test]
    fn controller_certificate_is_not_a_device() {
        let ca = Ca::generate("test CA").unwrap();
        let ctl = ca.issue_controller("main").unwrap();
        let err = device_id_from_cert_pem(ctl.cert_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, TlsError::NotDevice(_)), "{err}");
        assert!(err.to_string().contains("not to a device"), "{err}");
        // The CA certificate itself carries no client identity either.
        assert!(matches!(
            device_id_from_cert_pem(ca.cert_pem().as_bytes()),
            Err(TlsError::Identity(_))
        ));
        assert!(matches!(
            device_id_from_cert_pem(b"not pem"),
            Err(TlsError::NoCertificate { .. })
        ));
    }

    #[test]
    fn builds_a_client_config_trusting_every_ca_in_the_bundle() {
        let (ca, issued) = device("T-1");
        let other = Ca::generate("next CA").unwrap();
        let bundle = format!("{}{}", ca.cert_pem(), other.cert_pem());
        let roots = root_store_from_pem(bundle.as_bytes()).unwrap();
        assert_eq!(roots.len(), 2);
        client_config_from_pem(
            bundle.as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .unwrap();
    }

    #[test]
    fn reports_missing_and_mismatched_material() {
        let (ca, issued) = device("T-1");
        let (_, stranger) = device("T-2");
        let ca_pem = ca.cert_pem().as_bytes();
        assert!(matches!(
            client_config_from_pem(b"", issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()),
            Err(TlsError::NoCertificate { what: "CA bundle" })
        ));
        assert!(matches!(
            client_config_from_pem(ca_pem, issued.cert_pem.as_bytes(), b""),
            Err(TlsError::NoKey)
        ));
        assert!(matches!(
            client_config_from_pem(
                ca_pem,
                issued.cert_pem.as_bytes(),
                stranger.key_pem.as_bytes()
            ),
            Err(TlsError::Rustls(_))
        ));
    }

    #[test]
    fn reads_files_and_names_the_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = client_config_from_files(
            &dir.path().join("ca.crt"),
            &dir.path().join("device.crt"),
            &dir.path().join("device.key"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
    }
}
