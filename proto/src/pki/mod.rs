//! Fleet PKI: certificate profiles, the CA on disk, and identities read from certificates.
//!
//! # Layout
//!
//! - [`profile`]: [`Ca`] issues the three certificate profiles of ADR 0002 (device,
//!   controller, broker server), ECDSA P-256 via rcgen.
//! - [`identity`]: [`Identity`], the role and name a certificate proves; the edge, the
//!   controller and the agent all read identities through it.
//! - [`csr`]: enrolment and renewal: the terminal's CSR, its signing under the device
//!   profile, certificate facts (serial, validity) and the fleet CRL.
//! - [`store`]: [`PkiDir`], the on-disk layout of a PKI directory, key files written 0600.

pub mod csr;
pub mod identity;
pub mod profile;
pub mod store;

pub use csr::{
    CertFacts, CsrError, DeviceKeyRequest, RevokedSerial, VerifiedCsr, crl_serials, verify_csr,
};
pub use identity::Identity;
pub use profile::{BACKDATE_SECONDS, Ca, CertifiedKey};
pub use store::{
    DeviceBundle, PkiDir, parse_pem_certs, read_public_keys, write_public_file, write_secret_file,
};

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("certificate does not carry a posfleet identity: {0}")]
    NoIdentity(&'static str),
    #[error("invalid device id in certificate: {0}")]
    DeviceId(#[from] crate::DeviceIdError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: std::path::PathBuf },
    #[error(
        "{path} already holds a fleet CA; refusing to overwrite it (remove the directory to start over)"
    )]
    AlreadyInitialised { path: std::path::PathBuf },
    #[error("invalid controller name {0:?}: use letters, digits, '.', '_' or '-'")]
    ControllerName(String),
    #[error(transparent)]
    Unclean(#[from] crate::secret::Unclean),
}
