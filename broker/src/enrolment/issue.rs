//! Signing and recording device certificates (issue 10 items 8 and 9).
//!
//! Every certificate the controller's fleet CA signs for a device goes through [`sign`] and is
//! recorded (`c/<serial>`, and the serial in the device's record) in the same durable batch
//! as the rest of the change, before the certificate is returned: enrolment, renewal,
//! `POST /api/v1/pki/certificates` (`posctl pki issue-device`, the simulator, and
//! [`SimulatorIssuer`] in-process) and the offline path (`offline.rs`: `posctl pki
//! issue-device --dir DATA/pki` with the controller stopped).
//! So every bundle can be listed and revoked before its terminal ever connected, and its serial
//! goes on the CRL.
//!
//! Which device ids may receive a certificate:
//! - never a revoked or decommissioned id;
//! - an id pinned to an unused, unexpired enrolment token only through that token;
//! - enrolment only for a free id: nothing recorded, not registered;
//! - the admin route and the offline path may issue again for an active id (a replacement
//!   bundle; both certificates stay valid until revoked).

use std::collections::HashSet;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::{Ca, CertFacts, PkiDir, VerifiedCsr, verify_csr};
use posfleet_proto::text::LIST_SEPARATOR;
use tracing::info;

use super::store::{
    Changes, DevicePki, IssuedCert, Loaded, PkiStatus, RECORD_VERSION, StoredToken,
};
use super::{Book, EnrolError, Enrolment, Refusal, status_name};
use crate::audit::Outcome;
use crate::views::{
    CertificateIssue, CertificateRecordView, DeviceCertificates, IssueKind, IssuedCertificate,
    IssuedCertificates,
};

/// Most certificates one `POST /api/v1/pki/certificates` issues.
pub const MAX_ISSUE_BATCH: usize = 256;

/// A signed certificate and the record of it (not stored yet).
pub(super) struct Signed {
    pub cert_pem: String,
    pub facts: CertFacts,
    pub record: IssuedCert,
}

/// Signs `csr` for `id` under the device profile and makes its record. The only place the
/// controller signs a device certificate.
pub(super) fn sign(
    ca: &Ca,
    id: &DeviceId,
    csr: &VerifiedCsr,
    kind: IssueKind,
    issued_by: &str,
    now_ms: u64,
) -> Result<Signed, EnrolError> {
    let cert_pem = ca
        .sign_device_csr(id, csr)
        .map_err(|e| EnrolError::internal("signing the certificate", e))?;
    let facts = CertFacts::from_pem(&cert_pem)
        .map_err(|e| EnrolError::internal("reading the issued certificate", e))?;
    let record = IssuedCert {
        v: RECORD_VERSION,
        serial: facts.serial.clone(),
        device: id.to_string(),
        not_after: facts.not_after,
        issued_ms: now_ms,
        kind,
        issued_by: issued_by.to_owned(),
        pending_audit: false,
    };
    Ok(Signed {
        cert_pem,
        facts,
        record,
    })
}

fn kind_name(kind: IssueKind) -> &'static str {
    match kind {
        IssueKind::Enrolment => "enrolment",
        IssueKind::Renewal => "renewal",
        IssueKind::Cli => "cli",
        IssueKind::CliOffline => "cli_offline",
        IssueKind::Simulator => "simulator",
    }
}

impl Book {
    pub(super) fn from_loaded(loaded: Loaded) -> Self {
        let mut book = Self {
            crl_number: loaded.crl_number,
            ..Self::default()
        };
        book.apply(Changes {
            tokens: loaded.tokens,
            devices: loaded.devices,
            issued: loaded.issued,
            revoked: loaded.revoked,
            ..Changes::default()
        });
        book
    }

    /// Takes in a change that is durable now.
    pub(super) fn apply(&mut self, changes: Changes) {
        for t in changes.tokens {
            self.tokens.insert(t.id.clone(), t);
        }
        for id in &changes.deleted_tokens {
            self.tokens.remove(id);
        }
        for d in changes.devices {
            self.devices.insert(d.id.clone(), d);
        }
        for c in changes.issued {
            self.issued.insert(c.serial.clone(), c);
        }
        for r in changes.revoked {
            self.revoked.insert(r.serial.clone(), r);
        }
        if let Some(n) = changes.crl_number {
            self.crl_number = n;
        }
    }

    /// The unused, unexpired token pinned to `id`, if any.
    fn pinned_token(&self, id: &str, now_ms: u64) -> Option<&StoredToken> {
        self.tokens.values().find(|t| {
            t.device_id.as_deref() == Some(id) && t.used_ms.is_none() && now_ms < t.expires_ms
        })
    }

    fn reserved(
        &self,
        id: &DeviceId,
        field: &str,
        now_ms: u64,
        except: Option<&str>,
    ) -> Result<(), EnrolError> {
        match self.pinned_token(id.as_str(), now_ms) {
            Some(t) if Some(t.id.as_str()) != except => Err(EnrolError::field(
                Refusal::Taken,
                field,
                format!(
                    "device {id} is reserved for enrolment token {}; enrol it with that \
                     token, or delete the token first",
                    t.id
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses unless `id` is free for an enrolment or a token pin: no certificate recorded,
    /// not `registered`, not reserved by a token other than `except`.
    pub(super) fn check_free(
        &self,
        id: &DeviceId,
        registered: bool,
        except: Option<&str>,
        field: &str,
        now_ms: u64,
    ) -> Result<(), EnrolError> {
        if let Some(d) = self.devices.get(id.as_str()) {
            let message = if d.status == PkiStatus::Active {
                format!(
                    "device {id} already has a certificate ({} issued); choose another device \
                     id, or revoke and decommission the old one first",
                    d.serials.len()
                )
            } else {
                format!(
                    "device {id} is {}; choose another device id",
                    status_name(d.status)
                )
            };
            return Err(EnrolError::field(Refusal::Taken, field, message));
        }
        if registered {
            return Err(EnrolError::field(
                Refusal::Taken,
                field,
                format!(
                    "device {id} already exists; choose another device id (or revoke and \
                     decommission the old one first)"
                ),
            ));
        }
        self.reserved(id, field, now_ms, except)
    }

    /// Refuses a certificate outside enrolment for a revoked, decommissioned or reserved id.
    pub(super) fn check_reissue(
        &self,
        id: &DeviceId,
        field: &str,
        now_ms: u64,
    ) -> Result<(), EnrolError> {
        if let Some(d) = self.devices.get(id.as_str())
            && d.status != PkiStatus::Active
        {
            return Err(EnrolError::field(
                Refusal::Taken,
                field,
                format!(
                    "device {id} is {}: it gets no new certificate; choose another device id",
                    status_name(d.status)
                ),
            ));
        }
        self.reserved(id, field, now_ms, None)
    }

    /// The device's record with `serial` added (a copy, for the next batch).
    fn with_serial(&self, id: &DeviceId, serial: &str) -> DevicePki {
        let mut record = self
            .devices
            .get(id.as_str())
            .cloned()
            .unwrap_or_else(|| DevicePki::new(id.as_str()));
        record.serials.push(serial.to_owned());
        record
    }

    /// Checks, signs and records `requests` (one change for all of them, not yet committed).
    pub(super) fn issue_batch(
        &self,
        ca: &Ca,
        requests: &[(DeviceId, VerifiedCsr)],
        kind: IssueKind,
        issued_by: &str,
        now_ms: u64,
    ) -> Result<(Vec<Signed>, Changes), EnrolError> {
        for (i, (id, _)) in requests.iter().enumerate() {
            let field = item_field(requests.len(), i, "device_id");
            // Also an id issued before: its new certificate would carry the number again.
            super::new_device_id(id.as_str(), &field)?;
            self.check_reissue(id, &field, now_ms)?;
        }
        let mut signed = Vec::with_capacity(requests.len());
        let mut changes = Changes::default();
        for (id, csr) in requests {
            let s = sign(ca, id, csr, kind, issued_by, now_ms)?;
            changes.devices.push(self.with_serial(id, &s.facts.serial));
            changes.issued.push(s.record.clone());
            signed.push(s);
        }
        Ok((signed, changes))
    }
}

/// `device_id` for a single request, `requests[3].device_id` in a batch.
fn item_field(len: usize, i: usize, name: &str) -> String {
    if len == 1 {
        name.to_owned()
    } else {
        format!("requests[{i}].{name}")
    }
}

/// Validates a batch: size, purpose, distinct valid ids, CSRs.
fn parse_batch(
    req: &CertificateIssue,
) -> Result<(IssueKind, Vec<(DeviceId, VerifiedCsr)>), EnrolError> {
    let kind = match req.purpose.as_deref() {
        None | Some("cli") => IssueKind::Cli,
        Some("simulator") => IssueKind::Simulator,
        Some(_) => {
            return Err(EnrolError::field(
                Refusal::Invalid,
                "purpose",
                "use \"cli\" or \"simulator\"",
            ));
        }
    };
    let n = req.requests.len();
    if n == 0 || n > MAX_ISSUE_BATCH {
        return Err(EnrolError::field(
            Refusal::Invalid,
            "requests",
            format!("send 1 to {MAX_ISSUE_BATCH} certificate requests"),
        ));
    }
    let mut seen = HashSet::with_capacity(n);
    let mut parsed = Vec::with_capacity(n);
    for (i, r) in req.requests.iter().enumerate() {
        let id = DeviceId::new(r.device_id.as_str()).map_err(|e| {
            EnrolError::field(
                Refusal::Invalid,
                item_field(n, i, "device_id"),
                e.to_string(),
            )
        })?;
        if !seen.insert(id.clone()) {
            return Err(EnrolError::field(
                Refusal::Invalid,
                item_field(n, i, "device_id"),
                format!("device {id} appears twice in this request"),
            ));
        }
        let csr = verify_csr(&r.csr_pem).map_err(|e| {
            EnrolError::field(Refusal::Invalid, item_field(n, i, "csr_pem"), e.to_string())
        })?;
        parsed.push((id, csr));
    }
    Ok((kind, parsed))
}

/// The public files of a device bundle.
pub(super) struct BundleFiles {
    pub ca_pem: String,
    pub command_pub_pem: String,
    pub release_pub_pem: Option<String>,
}

pub(super) fn bundle_files(pki: &PkiDir, ca: &Ca) -> Result<BundleFiles, EnrolError> {
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(&path).map_err(|e| {
            EnrolError::internal(
                "reading the PKI directory",
                format!("{}: {e}", path.display()),
            )
        })
    };
    let release = pki.release_public_key();
    Ok(BundleFiles {
        ca_pem: ca.cert_pem().to_owned(),
        command_pub_pem: read(pki.command_public_key())?,
        release_pub_pem: if release.exists() {
            Some(read(release)?)
        } else {
            None
        },
    })
}

pub(super) fn answer(signed: Vec<Signed>, files: BundleFiles) -> IssuedCertificates {
    IssuedCertificates {
        items: signed
            .into_iter()
            .map(|s| IssuedCertificate {
                device_id: s.record.device,
                serial: s.facts.serial,
                not_after: s.facts.not_after,
                certificate_pem: s.cert_pem,
            })
            .collect(),
        ca_pem: files.ca_pem,
        command_pub_pem: files.command_pub_pem,
        release_pub_pem: files.release_pub_pem,
    }
}

/// The audit detail of an issue: kind and `ID serial SERIAL` pairs (the first few), joined so
/// that no digits of an id and a serial link into a card-number-like run (`drv-00001=0424…`
/// would, through the `=`).
fn detail(kind: IssueKind, records: &[IssuedCert]) -> String {
    let mut text = format!("kind={} count={}", kind_name(kind), records.len());
    let pairs: Vec<String> = records
        .iter()
        .take(8)
        .map(|r| format!("{} serial {}", r.device, r.serial))
        .collect();
    if !pairs.is_empty() {
        text.push_str(": ");
        text.push_str(&pairs.join(LIST_SEPARATOR));
    }
    if records.len() > 8 {
        text.push_str(" ...");
    }
    text
}

impl Enrolment {
    pub(super) fn bundle_files(&self) -> Result<BundleFiles, EnrolError> {
        bundle_files(&self.pki, &self.ca)
    }

    /// `POST /api/v1/pki/certificates`: certificates for keys generated by the caller, each
    /// recorded durably (one batch) before any is returned.
    pub fn issue(
        &self,
        req: &CertificateIssue,
        actor: &str,
        source: &str,
        now_ms: u64,
    ) -> Result<IssuedCertificates, EnrolError> {
        let (kind, requests) = parse_batch(req)?;
        let mut book = self.lock();
        let (signed, changes) = book.issue_batch(&self.ca, &requests, kind, actor, now_ms)?;
        self.commit(&changes)?;
        let detail = detail(kind, &changes.issued);
        book.apply(changes);
        drop(book);
        let target = match signed.as_slice() {
            [one] => one.record.device.clone(),
            many => format!("{} devices", many.len()),
        };
        info!(count = signed.len(), kind = kind_name(kind), %actor, "device certificates issued");
        self.audit(
            actor,
            source,
            "pki.issue",
            &target,
            Outcome::Success,
            detail,
        )?;
        Ok(answer(signed, self.bundle_files()?))
    }

    /// `GET /api/v1/devices/{id}/certificates`.
    pub fn certificates(&self, id: &DeviceId) -> Result<DeviceCertificates, EnrolError> {
        let book = self.lock();
        let record = book
            .devices
            .get(id.as_str())
            .ok_or_else(|| EnrolError::NotFound(format!("no certificate issued for {id}")))?;
        let mut items = Vec::new();
        let mut unrecorded = Vec::new();
        for serial in &record.serials {
            match book.issued.get(serial) {
                Some(c) => items.push(CertificateRecordView {
                    serial: c.serial.clone(),
                    kind: c.kind,
                    issued_at_ms: c.issued_ms,
                    issued_by: c.issued_by.clone(),
                    not_after: c.not_after,
                    revoked: book.revoked.contains_key(serial),
                }),
                None => unrecorded.push(serial.clone()),
            }
        }
        Ok(DeviceCertificates {
            device_id: id.to_string(),
            status: status_name(record.status).to_owned(),
            items,
            unrecorded_serials: unrecorded,
        })
    }

    /// Writes the audit entries of certificates issued offline while the controller was
    /// stopped, and clears their marks. Called once at start.
    pub fn audit_offline_issues(&self) -> Result<usize, EnrolError> {
        let mut book = self.lock();
        let pending: Vec<IssuedCert> = book
            .issued
            .values()
            .filter(|c| c.pending_audit)
            .cloned()
            .collect();
        for c in &pending {
            self.audit(
                &c.issued_by,
                "local",
                "pki.issue",
                &c.device,
                Outcome::Success,
                format!(
                    "{} (recorded offline at {} ms)",
                    detail(c.kind, std::slice::from_ref(c)),
                    c.issued_ms
                ),
            )?;
        }
        if pending.is_empty() {
            return Ok(0);
        }
        let changes = Changes {
            issued: pending
                .into_iter()
                .map(|c| IssuedCert {
                    pending_audit: false,
                    ..c
                })
                .collect(),
            ..Changes::default()
        };
        self.commit(&changes)?;
        let n = changes.issued.len();
        book.apply(changes);
        Ok(n)
    }
}

/// The in-process issuer of simulated terminals (`posfleet-broker demo`): the enrolment
/// service itself, recording every certificate as `simulator`.
#[derive(Debug, Clone)]
pub struct SimulatorIssuer {
    enrolment: std::sync::Arc<Enrolment>,
    /// Who the records name as the issuer.
    actor: String,
}

impl SimulatorIssuer {
    pub fn new(enrolment: std::sync::Arc<Enrolment>, actor: &str) -> Self {
        Self {
            enrolment,
            actor: actor.to_owned(),
        }
    }
}

impl posfleet_agent::simulate::CertIssuer for SimulatorIssuer {
    fn issue(
        &self,
        requests: Vec<posfleet_agent::simulate::CertRequest>,
    ) -> posfleet_agent::simulate::IssueFuture<'_> {
        use posfleet_agent::simulate::IssueError;
        let (svc, actor) = (self.enrolment.clone(), self.actor.clone());
        let body = CertificateIssue {
            purpose: Some("simulator".into()),
            requests: requests
                .into_iter()
                .map(|r| crate::views::CertificateRequest {
                    device_id: r.device_id,
                    csr_pem: r.csr_pem,
                })
                .collect(),
        };
        Box::pin(async move {
            let now = posfleet_proto::now_ms();
            let issued =
                tokio::task::spawn_blocking(move || svc.issue(&body, &actor, "local", now))
                    .await
                    .map_err(|e| IssueError(e.to_string()))?
                    .map_err(|e| IssueError(e.to_string()))?;
            Ok(issued
                .items
                .into_iter()
                .map(|c| c.certificate_pem)
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(device: &str, serial: &str) -> IssuedCert {
        IssuedCert {
            v: RECORD_VERSION,
            serial: serial.to_owned(),
            device: device.to_owned(),
            not_after: 0,
            issued_ms: 0,
            kind: IssueKind::Simulator,
            issued_by: "demo".to_owned(),
            pending_audit: false,
        }
    }

    /// Ids ending in digits next to serials starting with digits: with `id=serial` the
    /// digits of both linked into one run through the `=` and the audit log held a
    /// card-number-like number now and then (seen in the e2e data-directory scan).
    #[test]
    fn the_audit_detail_never_links_ids_and_serials_into_a_card_number() {
        let mut old_format_flagged = 0;
        for i in 0..2000u64 {
            // Serials are drawn without 13-digit runs; these start with 11 digits.
            let serial = format!("{:011}eb{i:04x}dc0e1d2b3aaf", i * 7919);
            let device = format!("drv-{i:05}");
            if posfleet_proto::pan::contains_pan(&format!("{device}={serial}")) {
                old_format_flagged += 1;
            }
            let records = [record(&device, &serial), record("12345678", &serial)];
            let text = detail(IssueKind::Simulator, &records);
            assert!(!posfleet_proto::pan::contains_pan(&text), "{text}");
        }
        assert!(
            old_format_flagged > 0,
            "the old format never linked: the test proves nothing"
        );
    }
}
