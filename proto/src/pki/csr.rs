//! Enrolment and renewal: the terminal's certificate signing request, the controller's signing
//! of it under the device profile, certificate facts (serial, validity) and the fleet CRL.
//!
//! The CSR proves possession of the key (its self-signature) and carries the public key; the
//! controller takes nothing else from it. Subject, SANs and extensions of the certificate come
//! from the device profile with the device id the controller validated, so a CSR cannot ask for
//! another identity, a CA bit or a server certificate.

use rcgen::{
    CertificateRevocationListParams, CertificateSigningRequestParams, KeyIdMethod, KeyPair,
    PKCS_ECDSA_P256_SHA256, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Ca, PkiError};
use crate::DeviceId;

/// Largest CSR PEM accepted (a P-256 or Ed25519 CSR is well under 1 KiB).
pub const MAX_CSR_PEM_BYTES: usize = 8 * 1024;

/// Why a CSR was refused. Messages name the problem, never key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is larger than {MAX_CSR_PEM_BYTES} bytes")]
    TooLarge,
    #[error("the CSR is not a PEM certificate request")]
    NotPem,
    #[error("the CSR's signature does not verify")]
    BadSignature,
    #[error("the CSR's key type is not allowed: use ECDSA P-256 or Ed25519")]
    KeyType,
    #[error("the CSR is not usable: {0}")]
    Unusable(String),
}

/// A key pair generated on the terminal and the CSR that carries its public key.
pub struct DeviceKeyRequest {
    pub csr_pem: String,
    /// Secret: write it only with [`super::write_secret_file`]; never log or send it.
    pub key_pem: String,
}

impl std::fmt::Debug for DeviceKeyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeyRequest")
            .field("csr_pem", &self.csr_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl DeviceKeyRequest {
    /// Generates an ECDSA P-256 key and a CSR for device `id` (the subject is informative;
    /// the controller applies its own profile), drawn again until neither PEM looks like a
    /// card number (`crate::secret`).
    pub fn generate(id: &DeviceId) -> Result<Self, PkiError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, id.as_str());
        crate::secret::try_until_clean(
            || {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                let csr = params.serialize_request(&key)?;
                Ok::<_, PkiError>(Self {
                    csr_pem: csr.pem()?,
                    key_pem: key.serialize_pem(),
                })
            },
            |request| vec![request.csr_pem.clone(), request.key_pem.clone()],
        )
    }
}

/// A CSR that passed [`verify_csr`], ready for [`Ca::sign_device_csr`].
pub type VerifiedCsr = CertificateSigningRequestParams;

/// Checks a CSR: size, PEM, self-signature, key type (ECDSA P-256 or Ed25519).
pub fn verify_csr(csr_pem: &str) -> Result<VerifiedCsr, CsrError> {
    if csr_pem.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::TooLarge);
    }
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    let (_, parsed) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|_| CsrError::Unusable("not a PKCS#10 request".into()))?;
    let spki = &parsed.certification_request_info.subject_pki.algorithm;
    let allowed = if spki.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        spki.parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256)
    } else {
        spki.algorithm == OID_SIG_ED25519
    };
    if !allowed {
        return Err(CsrError::KeyType);
    }
    parsed
        .verify_signature()
        .map_err(|_| CsrError::BadSignature)?;
    CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
        rcgen::Error::UnsupportedSignatureAlgorithm => CsrError::KeyType,
        other => CsrError::Unusable(other.to_string()),
    })
}

/// What the edge and the enrolment service need from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The serial number, lowercase hex of its DER bytes.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl CertFacts {
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        Ok(Self {
            serial: hex::encode(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Facts of the first certificate of a PEM text.
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        let first = super::parse_pem_certs(pem.as_bytes())?
            .into_iter()
            .next()
            .ok_or(PkiError::NoIdentity("no certificate in PEM"))?;
        Self::from_der(&first)
    }
}

/// One entry of the CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Lowercase hex, as in [`CertFacts::serial`].
    pub serial: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// True when the certificate was replaced by a renewal (reason `superseded`).
    pub superseded: bool,
}

impl Ca {
    /// Signs a checked CSR (see [`verify_csr`]) as a device certificate for `id`: the subject,
    /// the URI SAN, the key usages and the validity come from the device profile; only the
    /// public key comes from the CSR.
    pub fn sign_device_csr(
        &self,
        id: &DeviceId,
        csr: &CertificateSigningRequestParams,
    ) -> Result<String, PkiError> {
        let request = CertificateSigningRequestParams {
            params: super::profile::device_params(id)?,
            public_key: csr.public_key.clone(),
        };
        // The signature is randomised: signed again until the PEM does not look like a card
        // number (`crate::secret`).
        crate::secret::try_until_clean(
            || Ok::<_, PkiError>(request.signed_by(self.issuer())?.pem()),
            |pem| vec![pem.clone()],
        )
    }

    /// A CRL of `revoked`, signed by the CA, valid from now for `next_update_s` seconds. DER.
    pub fn crl(
        &self,
        revoked: &[RevokedSerial],
        crl_number: u64,
        next_update_s: i64,
    ) -> Result<Vec<u8>, PkiError> {
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for r in revoked {
            let serial = hex::decode(&r.serial)
                .map_err(|_| PkiError::Parse(format!("serial {:?} is not hex", r.serial)))?;
            let at = OffsetDateTime::from_unix_timestamp(r.revoked_at)
                .map_err(|e| PkiError::Parse(e.to_string()))?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: at,
                reason_code: Some(if r.superseded {
                    RevocationReason::Superseded
                } else {
                    RevocationReason::CessationOfOperation
                }),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::seconds(next_update_s.max(1)),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(self.issuer())?.der().to_vec())
    }
}

/// The serials (hex) listed by a DER CRL, after checking that the first CA of `ca_pem` signed
/// it (for tests, posctl and operators checking what external brokers receive).
pub fn crl_serials(der: &[u8], ca_pem: &str) -> Result<Vec<String>, PkiError> {
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let ca_der = super::parse_pem_certs(ca_pem.as_bytes())?
        .into_iter()
        .next()
        .ok_or(PkiError::NoIdentity("no CA certificate in PEM"))?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| PkiError::Parse(e.to_string()))?;
    crl.verify_signature(ca.public_key())
        .map_err(|_| PkiError::Parse("the CRL is not signed by the fleet CA".into()))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Identity;

    fn der(pem: &str) -> Vec<u8> {
        crate::pki::parse_pem_certs(pem.as_bytes()).unwrap()[0].to_vec()
    }

    #[test]
    fn a_csr_becomes_a_device_certificate_of_the_profile() {
        let ca = Ca::generate("test").unwrap();
        let id = DeviceId::new("T-1").unwrap();
        let request = DeviceKeyRequest::generate(&DeviceId::new("other").unwrap()).unwrap();
        assert!(!format!("{request:?}").contains("PRIVATE"));
        let csr = verify_csr(&request.csr_pem).unwrap();
        let cert = ca.sign_device_csr(&id, &csr).unwrap();
        // The id is the controller's, not the CSR's subject.
        assert_eq!(
            Identity::from_cert_der(&der(&cert)).unwrap(),
            Identity::Device(id)
        );
        // The certificate holds the terminal's key.
        let key = KeyPair::from_pem(&request.key_pem).unwrap();
        let cert_der = der(&cert);
        let (_, parsed) = X509Certificate::from_der(&cert_der).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let facts = CertFacts::from_pem(&cert).unwrap();
        assert_eq!(facts.serial.len(), 32);
        assert!(facts.not_after > facts.not_before);
    }

    #[test]
    fn bad_csrs_are_refused() {
        let id = DeviceId::new("T-1").unwrap();
        let good = DeviceKeyRequest::generate(&id).unwrap().csr_pem;
        // Flip a byte inside the signature (the end of the DER).
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(good.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
            .unwrap();
        let mut tampered = der.clone();
        let last = tampered.len() - 3;
        tampered[last] ^= 0x01;
        let tampered_pem = pem_of(&tampered);
        assert_eq!(
            verify_csr(&tampered_pem).unwrap_err(),
            CsrError::BadSignature
        );
        assert_eq!(verify_csr("hello").unwrap_err(), CsrError::NotPem);
        assert_eq!(
            verify_csr(&"x".repeat(MAX_CSR_PEM_BYTES + 1)).unwrap_err(),
            CsrError::TooLarge
        );
        // P-384 is not a profile key type.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let p384 = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        assert_eq!(verify_csr(&p384).unwrap_err(), CsrError::KeyType);
        // Ed25519 is.
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        verify_csr(&ed).unwrap();
    }

    fn pem_of(der: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE REQUEST-----\n");
        out
    }

    #[test]
    fn the_crl_lists_revoked_serials_and_is_signed_by_the_ca() {
        let ca = Ca::generate("test").unwrap();
        let cert = ca.issue_device(&DeviceId::new("T-2").unwrap()).unwrap();
        let facts = CertFacts::from_pem(&cert.cert_pem).unwrap();
        let crl = ca
            .crl(
                &[RevokedSerial {
                    serial: facts.serial.clone(),
                    revoked_at: 1_700_000_000,
                    superseded: false,
                }],
                7,
                7 * 86_400,
            )
            .unwrap();
        let (_, parsed) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&crl).unwrap();
        let serials: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        assert_eq!(serials, vec![facts.serial]);
        let ca_der = der(ca.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        parsed
            .verify_signature(ca_cert.public_key())
            .expect("signed by the fleet CA");
        assert!(parsed.next_update().is_some());
    }
}
