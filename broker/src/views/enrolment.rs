//! JSON shapes of enrolment (`/api/v1/enrolment-tokens`, `/api/v1/enroll`), revocation and
//! decommission (`/api/v1/devices/{id}/revoke|decommission`), renewal
//! (`/device/v1/renew[/confirm]` on the device endpoint) and the record of issued certificates
//! (`POST /api/v1/pki/certificates`, `GET /api/v1/devices/{id}/certificates`).

use serde::{Deserialize, Serialize};

/// `POST /api/v1/enrolment-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    /// Only this device id may enrol with the token, and no other token or certificate may
    /// take the id while the token is unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Only a terminal with this serial number may use the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The enrolled device joins this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// e.g. "24h"; at most 7 days.
    pub expires_in: String,
}

/// What `POST /api/v1/enrolment-tokens` answers: the only time the token is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub id: String,
    /// The one-time secret; the controller keeps only its SHA-256.
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub expires_at_ms: u64,
}

/// One token without its secret (`GET /api/v1/enrolment-tokens`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: u64,
    /// `unused`, `used` or `expired`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
}

/// `GET /api/v1/enrolment-tokens`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    pub items: Vec<TokenView>,
}

/// `DELETE /api/v1/enrolment-tokens/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDeleted {
    pub id: String,
    pub deleted: bool,
}

/// `POST /api/v1/enroll` (no bearer token: the enrolment token authorises it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    pub device_id: String,
    pub serial: String,
    /// PKCS#10, PEM; ECDSA P-256 or Ed25519.
    pub csr_pem: String,
}

/// What a terminal receives when it enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device_id: String,
    pub certificate_pem: String,
    /// The fleet CA bundle: trust anchor for the broker and the device endpoint.
    pub ca_pem: String,
    /// Command-verification key(s) to pin.
    pub command_pub_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_pub_pem: Option<String>,
    /// e.g. `mqtts://broker.example:8883`.
    pub mqtt_url: String,
    /// The device endpoint (downloads, renewal), e.g. `https://broker.example:8884`.
    pub device_url: String,
}

/// `POST /api/v1/devices/{id}/revoke` and `.../decommission`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub reason: String,
}

/// The outcome of a revocation or decommission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationView {
    pub device_id: String,
    /// `revoked` or `decommissioned`.
    pub status: String,
    pub reason: String,
    pub revoked_at_ms: u64,
    /// Certificate serials (hex) now on the CRL.
    pub serials: Vec<String>,
    /// A live MQTT session was closed.
    pub session_closed: bool,
}

/// `POST /device/v1/renew`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// The renewed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewResponse {
    pub certificate_pem: String,
    pub ca_pem: String,
    /// Serial of the new certificate (hex).
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// `POST /device/v1/renew/confirm` (called with the new certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewConfirmed {
    /// Serial of the old certificate, now revoked (superseded).
    pub revoked_serial: String,
}

/// How a certificate came to be issued by the fleet CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// `POST /api/v1/enroll` with a one-time token.
    Enrolment,
    /// `POST /device/v1/renew` with the device's current certificate.
    Renewal,
    /// `POST /api/v1/pki/certificates` (`posctl pki issue-device`).
    Cli,
    /// `posctl pki issue-device --dir DATA/pki` while the controller was stopped.
    CliOffline,
    /// The fleet simulator (`posfleet-agent simulate`, `posfleet-broker demo`).
    Simulator,
}

/// One certificate to issue: the device id and the CSR of a key generated by the requester.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    pub device_id: String,
    /// PKCS#10, PEM; ECDSA P-256 or Ed25519.
    pub csr_pem: String,
}

/// `POST /api/v1/pki/certificates` (admin): certificates for keys generated elsewhere, each
/// recorded (and revocable) before it is returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateIssue {
    /// `cli` (default) or `simulator`: how the records name the issue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// 1 to 256 requests, for distinct device ids.
    pub requests: Vec<CertificateRequest>,
}

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    pub device_id: String,
    /// Hex, as on the CRL.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    pub certificate_pem: String,
}

/// What `POST /api/v1/pki/certificates` answers: everything a device bundle needs but the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificates {
    pub items: Vec<IssuedCertificate>,
    /// The fleet CA bundle.
    pub ca_pem: String,
    /// Command-verification key(s) to pin.
    pub command_pub_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_pub_pem: Option<String>,
}

/// One recorded certificate of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecordView {
    pub serial: String,
    pub kind: IssueKind,
    pub issued_at_ms: u64,
    /// The account or token that asked (`token:<id>` for an enrolment, `device:<id>` for a
    /// renewal).
    pub issued_by: String,
    /// Unix seconds.
    pub not_after: i64,
    /// On the CRL.
    pub revoked: bool,
}

/// `GET /api/v1/devices/{id}/certificates` (admin): every certificate issued for the device,
/// oldest first, and where its certificates stand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCertificates {
    pub device_id: String,
    /// `active`, `revoked` or `decommissioned`.
    pub status: String,
    pub items: Vec<CertificateRecordView>,
    /// Serials the device was seen with or revoked under that the controller has no issue
    /// record of (certificates issued before records were kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unrecorded_serials: Vec<String>,
}
