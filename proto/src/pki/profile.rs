//! Certificate profiles (docs/architecture.md "Identity and trust", ADR 0002), issued by the fleet CA with rcgen.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use super::PkiError;
use super::identity::{
    CONTROLLER_CN_PREFIX, CONTROLLER_OU, DEVICE_OU, DEVICE_URI_PREFIX, valid_controller_name,
};
use crate::DeviceId;

/// Organisation written into every certificate's subject.
const ORGANISATION: &str = "posfleet";
/// Certificates are valid from a little before issue, to tolerate clock skew on terminals.
const BACKDATE: Duration = Duration::hours(1);
/// [`BACKDATE`] in seconds: a certificate issued at `t` has `not_before = t - BACKDATE_SECONDS`
/// (the edge uses it to tell certificates issued before a revocation).
pub const BACKDATE_SECONDS: i64 = BACKDATE.whole_seconds();
const CA_VALIDITY: Duration = Duration::days(3650);
const SERVER_VALIDITY: Duration = Duration::days(825);
/// Client certificates (device, controller); renewal happens well before expiry.
pub const CLIENT_VALIDITY: Duration = Duration::days(365);

/// A certificate with its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    /// Secret: write it only with [`super::write_secret_file`]; never log it.
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The fleet CA: signs every certificate of the fleet.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a new self-signed fleet CA (drawn again until neither PEM looks like a card
    /// number: `crate::secret`).
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        crate::secret::try_until_clean(
            || Self::generate_once(common_name),
            |ca| vec![ca.cert_pem.clone(), ca.key_pem.clone()],
        )
    }

    fn generate_once(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = base_params(common_name, "ca", CA_VALIDITY)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key. `cert_pem` may be a bundle (during a CA
    /// rotation): the first certificate is the one that signs, and must match `key_pem`.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let first = super::parse_pem_certs(cert_pem.as_bytes())?
            .into_iter()
            .next()
            .ok_or(PkiError::NoIdentity("no CA certificate in PEM"))?;
        let issuer = Issuer::from_ca_cert_der(&first, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate(s) as loaded; this is what clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Secret: write it only with [`super::write_secret_file`]; never log it.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A device certificate: CN = id, OU = device, URI SAN `urn:posfleet:device:<id>`,
    /// extended key usage client auth. The key is generated here; enrolment (where the terminal
    /// keeps its key) signs a CSR instead. Nothing records the certificate: the controller
    /// issues through its enrolment service (which records every certificate); this is for
    /// tests and fixtures that never reach a controller's data.
    pub fn issue_device(&self, id: &DeviceId) -> Result<CertifiedKey, PkiError> {
        self.issue(device_params(id)?)
    }

    /// The signing half of the CA, for CSRs and CRLs (`csr.rs`).
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// A controller certificate: CN = `controller:<name>`, OU = controller, client auth.
    pub fn issue_controller(&self, name: &str) -> Result<CertifiedKey, PkiError> {
        if !valid_controller_name(name) {
            return Err(PkiError::ControllerName(name.to_owned()));
        }
        let mut params = base_params(
            &format!("{CONTROLLER_CN_PREFIX}{name}"),
            CONTROLLER_OU,
            CLIENT_VALIDITY,
        )?;
        client_profile(&mut params);
        self.issue(params)
    }

    /// The broker's server certificate, for the given host names and IP addresses.
    pub fn issue_server(&self, hosts: &[String]) -> Result<CertifiedKey, PkiError> {
        let mut params = CertificateParams::new(hosts.to_vec())?;
        let base = base_params("posfleet broker", "server", SERVER_VALIDITY)?;
        params.distinguished_name = base.distinguished_name;
        params.not_before = base.not_before;
        params.not_after = base.not_after;
        params.serial_number = base.serial_number;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A new key and certificate, drawn again until neither PEM looks like a card number.
    fn issue(&self, params: CertificateParams) -> Result<CertifiedKey, PkiError> {
        crate::secret::try_until_clean(
            || {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                let cert = params.signed_by(&key, &self.issuer)?;
                Ok::<_, PkiError>(CertifiedKey {
                    cert_pem: cert.pem(),
                    key_pem: key.serialize_pem(),
                })
            },
            |issued| vec![issued.cert_pem.clone(), issued.key_pem.clone()],
        )
    }
}

/// The device profile for `id`, with a fresh serial and validity from now.
pub(crate) fn device_params(id: &DeviceId) -> Result<CertificateParams, PkiError> {
    let mut params = base_params(id.as_str(), DEVICE_OU, CLIENT_VALIDITY)?;
    params.subject_alt_names = vec![SanType::URI(format!("{DEVICE_URI_PREFIX}{id}").try_into()?)];
    client_profile(&mut params);
    Ok(params)
}

fn client_profile(params: &mut CertificateParams) {
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
}

fn base_params(cn: &str, ou: &str, validity: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANISATION);
    dn.push(DnType::OrganizationalUnitName, ou);
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params.serial_number = Some(SerialNumber::from_slice(&serial()));
    Ok(params)
}

/// A random certificate serial: positive and non-zero (RFC 5280 §4.1.2.2), and, written in hex
/// as everywhere serials are shown and stored (records, store keys, CRL views, logs), without
/// a run of 13 or more decimal digits, which card-data scanners would report as a card number
/// (about 1 in 500 random serials has one), and ending in a letter: serials stored next to each
/// other (a store's keys, one length byte apart) can then never join into such a run either,
/// since a run crossing into the next serial starts after a letter. Others are drawn again.
fn serial() -> Vec<u8> {
    loop {
        let mut serial: [u8; 16] = rand::random();
        serial[0] = (serial[0] & 0x7f) | 0x01;
        let text = hex::encode(serial);
        if crate::pan::longest_digit_run(&text) < crate::pan::MIN_PAN_DIGITS
            && text.ends_with(|c: char| c.is_ascii_alphabetic())
        {
            return serial.to_vec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Identity;
    use super::*;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn device_certificate_carries_its_identity() {
        let ca = Ca::generate("test fleet CA").unwrap();
        let id = DeviceId::new("T-0001").unwrap();
        let bundle = ca.issue_device(&id).unwrap();
        assert_eq!(
            Identity::from_cert_der(&der(&bundle.cert_pem)).unwrap(),
            Identity::Device(id)
        );
    }

    #[test]
    fn controller_certificate_carries_its_identity() {
        let ca = Ca::generate("test fleet CA").unwrap();
        let bundle = ca.issue_controller("main").unwrap();
        let identity = Identity::from_cert_der(&der(&bundle.cert_pem)).unwrap();
        assert_eq!(identity, Identity::Controller("main".into()));
        assert_eq!(identity.client_id(), "controller:main");
        assert!(ca.issue_controller("a/b").is_err());
    }

    #[test]
    fn server_and_ca_certificates_are_not_client_identities() {
        let ca = Ca::generate("test fleet CA").unwrap();
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        assert!(Identity::from_cert_der(&der(&server.cert_pem)).is_err());
        assert!(Identity::from_cert_der(&der(ca.cert_pem())).is_err());
        assert!(Identity::from_cert_der(b"not a certificate").is_err());
    }

    #[test]
    fn serials_never_hold_a_card_like_digit_run() {
        for _ in 0..20_000 {
            let hex_text = hex::encode(serial());
            assert!(crate::pan::longest_digit_run(&hex_text) < crate::pan::MIN_PAN_DIGITS);
            assert!(!crate::pan::contains_pan(&hex_text), "{hex_text}");
        }
    }

    /// Found by the end-to-end data-directory scan: the enrolment store keys certificates by
    /// serial, and its on-disk nodes keep neighbouring keys one length byte apart (a space for
    /// 32-character keys), so the digits ending one serial joined those starting the next.
    #[test]
    fn neighbouring_serials_never_join_into_a_card_like_run() {
        let mut previous = hex::encode(serial());
        for _ in 0..20_000 {
            let next = hex::encode(serial());
            // One byte apart at least (a store's framing); plain concatenation is not a case:
            // letters join digit groups in the card-number guard, so no hex text is safe there.
            for separator in [" ", "\u{1}", "-", ":"] {
                let joined = format!("{previous}{separator}{next}");
                assert!(!crate::pan::contains_pan(&joined), "{joined}");
            }
            previous = next;
        }
    }

    #[test]
    fn ca_reloads_from_pem_and_keeps_issuing() {
        let ca = Ca::generate("test fleet CA").unwrap();
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let id = DeviceId::new("dev-2").unwrap();
        let bundle = again.issue_device(&id).unwrap();
        assert_eq!(
            Identity::from_cert_der(&der(&bundle.cert_pem)).unwrap(),
            Identity::Device(id)
        );
        assert!(!format!("{bundle:?}").contains("PRIVATE KEY"));
    }
}
