//! Device enrolment, revocation, decommission, the CRL and certificate renewal (ADR 0011,
//! docs/architecture.md "Identity and trust", issue 6 items 6 and 7).
//!
//! # Layout
//!
//! - this file: [`Enrolment`], the service: its operations block (CA signing, durable store
//!   writes) and hold one lock across each, so the store has one writer (storage rule 4);
//!   the HTTP handlers call them on blocking threads.
//! - `token.rs`: enrolment token text, hashing and lifetimes.
//! - `revocations.rs`: [`Revocations`], the in-memory view the edge checks at every connect.
//! - `store.rs`: the sled store `DATA/enrolment`.
//! - `issue.rs`: signing and recording every device certificate (enrolment, renewal,
//!   `POST /api/v1/pki/certificates`, the offline `posctl pki issue-device --dir`), and which
//!   device ids may receive one (tokens pinned to an id, ids already issued); `offline.rs`: the
//!   same into a stopped controller's data directory.
//! - failed enrolments per source address are counted by `crate::limit`.
//! - `device.rs`: `POST /device/v1/renew[/confirm]` on the device endpoint (mutual TLS).
//!
//! Order of every change: validate, write the store durably, then update the in-memory view
//! and the registry, then answer. A token is marked used in the same durable batch that
//! records the issued serial, before the certificate is returned.

mod device;
mod issue;
mod offline;
mod revocations;
mod store;
mod token;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::{Ca, CertFacts, CsrError, Identity, PkiDir, RevokedSerial, verify_csr};
use posfleet_proto::text::LIST_SEPARATOR;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use device::{refuse_revoked, renew_router};
pub use issue::{MAX_ISSUE_BATCH, SimulatorIssuer};
pub use offline::{OfflineIssue, OfflineIssueError, issue_offline};
pub use revocations::{Revocations, Standing};
pub use store::{EnrolmentStore, EnrolmentStoreError};

use crate::audit::{AuditRecord, AuditSink, NoAudit, Outcome, Refusals};
use crate::edge::EdgeHandle;
use crate::limit::FailureLimit;
use crate::registry::Registry;
use crate::views::{
    EnrollRequest, EnrollResponse, IssueKind, Lifecycle, RenewResponse, RevocationView,
    TokenCreate, TokenCreated, TokenView,
};
use store::{
    Changes, DevicePki, IssuedCert, PendingRenewal, PkiStatus, RECORD_VERSION, RevokedCert,
};

/// sled page cache of the enrolment store (tokens and a record per device).
pub const DEFAULT_CACHE: u64 = 8 * 1024 * 1024;

/// Limits and the URLs terminals are told.
#[derive(Debug, Clone)]
pub struct EnrolmentConfig {
    /// Longest lifetime of an enrolment token.
    pub max_token_lifetime: Duration,
    /// `nextUpdate` of the CRL, from its generation.
    pub crl_next_update: Duration,
    /// Failed enrolments per source address within `failure_window` before it is refused.
    pub max_failures: usize,
    pub failure_window: Duration,
    /// Where enrolled terminals connect (`mqtts://host:port`).
    pub mqtt_url: String,
    /// The device endpoint (`https://host:port`), for downloads and renewal.
    pub device_url: String,
}

impl EnrolmentConfig {
    pub fn new(mqtt_url: String, device_url: String) -> Self {
        Self {
            max_token_lifetime: Duration::from_secs(7 * 24 * 3600),
            crl_next_update: Duration::from_secs(7 * 24 * 3600),
            max_failures: 10,
            failure_window: Duration::from_secs(600),
            mqtt_url,
            device_url,
        }
    }
}

/// Why an enrolment operation was refused. Messages never hold a token, key or certificate.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Csr(#[from] CsrError),
    /// The token is unknown, used, expired or pinned to another serial.
    #[error("{0}")]
    Token(&'static str),
    #[error("{0}")]
    Conflict(String),
    /// A refusal about one field of the request (the API names it in `fields`).
    #[error("{field}: {message}")]
    Field {
        refusal: Refusal,
        field: String,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("too many failed enrolments from this address; wait and retry")]
    RateLimited,
    #[error("{0}")]
    Refused(&'static str),
    #[error("{what} failed: {detail}")]
    Internal { what: &'static str, detail: String },
}

/// The kind of a [`EnrolError::Field`] refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Malformed (400).
    Invalid,
    /// The enrolment token does not allow it (403).
    Token,
    /// The device id is taken: reserved by a token, issued, registered or revoked (409).
    Taken,
}

impl EnrolError {
    fn field(refusal: Refusal, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Field {
            refusal,
            field: field.into(),
            message: message.into(),
        }
    }

    fn internal(what: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Internal {
            what,
            detail: e.to_string(),
        }
    }
}

/// In-memory copy of the store, changed only after a durable write.
#[derive(Debug, Default)]
struct Book {
    tokens: BTreeMap<String, store::StoredToken>,
    devices: HashMap<String, DevicePki>,
    /// Every certificate the fleet CA issued, by serial.
    issued: HashMap<String, IssuedCert>,
    revoked: BTreeMap<String, RevokedCert>,
    crl_number: u64,
    /// The current CRL (DER), regenerated at every change.
    crl: Arc<Vec<u8>>,
}

/// The enrolment service. Share it as `Arc<Enrolment>`.
pub struct Enrolment {
    cfg: EnrolmentConfig,
    store: EnrolmentStore,
    /// Held across each operation, durable write included (one writer).
    book: Mutex<Book>,
    revocations: Arc<Revocations>,
    ca: Ca,
    pki: PkiDir,
    registry: Arc<Registry>,
    /// Closes live sessions on revocation; `None` with an external broker (it uses the CRL).
    edge: Option<EdgeHandle>,
    audit: Arc<dyn AuditSink>,
    /// Where refused enrolments and renewals are counted, for one aggregated audit entry per
    /// key and window (issue 10 item 5); `None`: each is recorded on its own.
    refusals: Option<Arc<Refusals>>,
    failures: FailureLimit<IpAddr>,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment").finish_non_exhaustive()
    }
}

/// Opens the store and builds the revocation view the edge needs before anything else runs.
/// Blocks.
pub fn open(
    dir: &std::path::Path,
) -> Result<(EnrolmentStore, Arc<Revocations>), EnrolmentStoreError> {
    let store = EnrolmentStore::open(dir, DEFAULT_CACHE)?;
    let loaded = store.load()?;
    let revocations = Arc::new(Revocations::default());
    revocations.add_serials(loaded.revoked.iter().map(|r| r.serial.as_str()));
    for d in &loaded.devices {
        match d.status {
            PkiStatus::Active => {}
            PkiStatus::Revoked => revocations.revoke_id(&d.id, ms_to_s(d.revoked_ms)),
            PkiStatus::Decommissioned => revocations.decommission_id(&d.id),
        }
    }
    Ok((store, revocations))
}

impl Enrolment {
    /// The service over an opened store (see [`open`]). Blocks (loads the store, signs the
    /// first CRL).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: EnrolmentConfig,
        store: EnrolmentStore,
        revocations: Arc<Revocations>,
        ca: Ca,
        pki: PkiDir,
        registry: Arc<Registry>,
        edge: Option<EdgeHandle>,
    ) -> Result<Self, EnrolError> {
        let loaded = store
            .load()
            .map_err(|e| EnrolError::internal("loading the enrolment store", e))?;
        let mut book = Book::from_loaded(loaded);
        let failures = FailureLimit::new(cfg.max_failures, cfg.failure_window);
        let this = Self {
            cfg,
            store,
            book: Mutex::new(Book::default()),
            revocations,
            ca,
            pki,
            registry,
            edge,
            audit: Arc::new(NoAudit),
            refusals: None,
            failures,
        };
        book.crl = Arc::new(this.sign_crl(&book)?);
        *this.lock() = book;
        Ok(this)
    }

    /// The same service recording to `audit`, and counting refusals in `refusals` (the API's
    /// counts, whose flusher writes them to the same log: `ApiState::refusals`).
    pub fn with_audit(mut self, audit: Arc<dyn AuditSink>, refusals: Arc<Refusals>) -> Self {
        self.audit = audit;
        self.refusals = Some(refusals);
        self
    }

    /// The revocation view (for the edge and the device endpoint).
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn commit(&self, changes: &Changes) -> Result<(), EnrolError> {
        self.store
            .commit(changes)
            .map_err(|e| EnrolError::internal("the enrolment store commit", e))
    }

    fn audit(
        &self,
        actor: &str,
        source: &str,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: String,
    ) -> Result<(), EnrolError> {
        self.record(AuditRecord {
            actor: actor.to_owned(),
            source: source.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome,
            detail,
        })
    }

    /// Records one entry durably (blocks: the sink fsyncs).
    fn record(&self, record: AuditRecord) -> Result<(), EnrolError> {
        self.audit
            .record(record)
            .map_err(|e| EnrolError::internal("the audit record", e))
    }

    /// Counts a refusal (`record.detail` is its reason) for the aggregated entry of its
    /// window; never waits for the disk (except after the final flush at shutdown, or without
    /// refusal counts).
    fn refused(&self, record: AuditRecord) {
        let record = match &self.refusals {
            Some(refusals) => refusals.note(record),
            None => Some(record),
        };
        if let Some(record) = record
            && let Err(e) = self.audit.record(record)
        {
            warn!(error = %e, "a refusal could not be audited");
        }
    }

    // ---- tokens -------------------------------------------------------------------------

    /// Creates a one-time token; the answer is the only place its secret appears.
    pub fn create_token(
        &self,
        req: &TokenCreate,
        actor: &str,
        source: &str,
        now_ms: u64,
    ) -> Result<TokenCreated, EnrolError> {
        let lifetime = token::lifetime(&req.expires_in, self.cfg.max_token_lifetime)
            .map_err(|e| EnrolError::field(Refusal::Invalid, "expires_in", e))?;
        for (field, value) in [("serial", &req.serial), ("group", &req.group)] {
            if let Some(v) = value {
                check_name(field, v)?;
            }
        }
        let device_id = req
            .device_id
            .as_deref()
            .map(|d| new_device_id(d, "device_id"))
            .transpose()?;
        let secret = token::generate();
        let stored = store::StoredToken {
            v: RECORD_VERSION,
            id: secret.id.clone(),
            sha256: token::digest(&secret.text),
            device_id: device_id.as_ref().map(ToString::to_string),
            serial: req.serial.clone(),
            group: req.group.clone(),
            created_ms: now_ms,
            created_by: actor.to_owned(),
            expires_ms: now_ms.saturating_add(lifetime.as_millis() as u64),
            used_ms: None,
            used_by: None,
        };
        let mut book = self.lock();
        if let Some(id) = &device_id {
            // The id must be free: not reserved by another token, issued or registered.
            let registered = self.registry.lifecycle(id).is_some();
            book.check_free(id, registered, None, "device_id", now_ms)?;
        }
        self.commit(&Changes {
            tokens: vec![stored.clone()],
            ..Changes::default()
        })?;
        book.tokens.insert(stored.id.clone(), stored.clone());
        drop(book);
        self.audit(
            actor,
            source,
            "enrolment.token_create",
            &stored.id,
            Outcome::Success,
            format!(
                "device_id={:?} serial={:?} group={:?}",
                stored.device_id, stored.serial, stored.group
            ),
        )?;
        Ok(TokenCreated {
            id: stored.id,
            token: secret.text,
            device_id: stored.device_id,
            serial: stored.serial,
            group: stored.group,
            expires_at_ms: stored.expires_ms,
        })
    }

    /// Every token, newest first, without secrets.
    pub fn list_tokens(&self, now_ms: u64) -> Vec<TokenView> {
        let book = self.lock();
        let mut items: Vec<TokenView> = book
            .tokens
            .values()
            .map(|t| TokenView {
                id: t.id.clone(),
                device_id: t.device_id.clone(),
                serial: t.serial.clone(),
                group: t.group.clone(),
                created_at_ms: t.created_ms,
                created_by: t.created_by.clone(),
                expires_at_ms: t.expires_ms,
                state: if t.used_ms.is_some() {
                    "used"
                } else if now_ms >= t.expires_ms {
                    "expired"
                } else {
                    "unused"
                }
                .to_owned(),
                used_at_ms: t.used_ms,
                used_by: t.used_by.clone(),
            })
            .collect();
        items.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(a.id.cmp(&b.id)));
        items
    }

    /// Deletes a token (used or not): it can no longer enrol anything.
    pub fn delete_token(&self, id: &str, actor: &str, source: &str) -> Result<bool, EnrolError> {
        let mut book = self.lock();
        if !book.tokens.contains_key(id) {
            return Err(EnrolError::NotFound(format!("no enrolment token {id}")));
        }
        self.commit(&Changes {
            deleted_tokens: vec![id.to_owned()],
            ..Changes::default()
        })?;
        book.tokens.remove(id);
        drop(book);
        self.audit(
            actor,
            source,
            "enrolment.token_delete",
            id,
            Outcome::Success,
            String::new(),
        )?;
        Ok(true)
    }

    // ---- enrolment ----------------------------------------------------------------------

    /// Enrols a terminal: checks the token, the device id and the CSR, issues the certificate,
    /// marks the token used and records the serial (durably), registers the device. The
    /// caller flushes the registry before answering.
    pub fn enroll(
        &self,
        req: &EnrollRequest,
        peer: IpAddr,
        now_ms: u64,
    ) -> Result<EnrollResponse, EnrolError> {
        let source = peer.to_string();
        if !self.failures.admit(&peer) {
            warn!(%peer, "enrolment refused: too many failures from this address");
            // Nothing the client chose goes into the key: one entry per address and window.
            self.refused(AuditRecord {
                actor: "enrolment".into(),
                source,
                action: "device.enroll".into(),
                target: "-".into(),
                outcome: Outcome::Denied,
                detail: "rate limited (too many failed enrolments from this address)".into(),
            });
            return Err(EnrolError::RateLimited);
        }
        let result = self.enroll_inner(req, now_ms);
        let token_id = token::id_of(&req.token).unwrap_or("-");
        let target = shown_id(&req.device_id);
        let record = |outcome, detail| AuditRecord {
            actor: format!("token:{token_id}"),
            source: source.clone(),
            action: "device.enroll".into(),
            target: target.clone(),
            outcome,
            detail,
        };
        let outcome = match &result {
            Ok(_) => Outcome::Success,
            Err(EnrolError::Internal { .. }) => Outcome::Failure,
            Err(_) => Outcome::Denied,
        };
        info!(device = %target, %peer, token = token_id, ?outcome, "enrolment attempt");
        match &result {
            Ok(_) => self.record(record(outcome, String::new()))?,
            Err(e @ EnrolError::Internal { .. }) => self.record(record(outcome, e.to_string()))?,
            Err(e) => {
                self.failures.failed(&peer);
                self.refused(record(outcome, e.to_string()));
            }
        }
        result
    }

    fn enroll_inner(&self, req: &EnrollRequest, now_ms: u64) -> Result<EnrollResponse, EnrolError> {
        let id = new_device_id(&req.device_id, "device_id")?;
        check_name("serial", &req.serial)?;
        let csr = verify_csr(&req.csr_pem)?;
        let mut book = self.lock();
        let token_id =
            token::id_of(&req.token).ok_or(EnrolError::Token("invalid enrolment token"))?;
        let mut stored = book
            .tokens
            .get(token_id)
            .filter(|t| token::matches(&t.sha256, &req.token))
            .cloned()
            .ok_or(EnrolError::Token("invalid enrolment token"))?;
        if stored.used_ms.is_some() {
            return Err(EnrolError::Token("this enrolment token was already used"));
        }
        if now_ms >= stored.expires_ms {
            return Err(EnrolError::Token("this enrolment token has expired"));
        }
        if stored.serial.as_ref().is_some_and(|s| *s != req.serial) {
            return Err(EnrolError::field(
                Refusal::Token,
                "serial",
                "this enrolment token is pinned to another serial number",
            ));
        }
        if stored.device_id.as_ref().is_some_and(|d| d != id.as_str()) {
            return Err(EnrolError::field(
                Refusal::Token,
                "device_id",
                "this enrolment token is pinned to another device id",
            ));
        }
        let registered = self.registry.lifecycle(&id).is_some();
        book.check_free(&id, registered, Some(&stored.id), "device_id", now_ms)?;
        let signed = issue::sign(
            &self.ca,
            &id,
            &csr,
            IssueKind::Enrolment,
            &format!("token:{}", stored.id),
            now_ms,
        )?;
        stored.used_ms = Some(now_ms);
        stored.used_by = Some(id.to_string());
        let mut record = DevicePki::new(id.as_str());
        record.serials.push(signed.facts.serial.clone());
        // Durable before anything is answered: a crash now leaves the token used.
        let changes = Changes {
            tokens: vec![stored.clone()],
            devices: vec![record],
            issued: vec![signed.record],
            ..Changes::default()
        };
        self.commit(&changes)?;
        book.apply(changes);
        let groups: BTreeSet<String> = stored.group.iter().cloned().collect();
        self.registry.enroll(&id, &req.serial, groups, now_ms);
        drop(book);
        let files = self.bundle_files()?;
        Ok(EnrollResponse {
            device_id: id.to_string(),
            certificate_pem: signed.cert_pem,
            ca_pem: files.ca_pem,
            command_pub_pem: files.command_pub_pem,
            release_pub_pem: files.release_pub_pem,
            mqtt_url: self.cfg.mqtt_url.clone(),
            device_url: self.cfg.device_url.clone(),
        })
    }

    // ---- revocation -----------------------------------------------------------------------

    /// Revokes (or, with `decommission`, also retires) device `id`: its certificates go on the
    /// CRL, the edge refuses it from now on and its live session is closed at once.
    pub fn revoke(
        &self,
        id: &DeviceId,
        reason: &str,
        decommission: bool,
        actor: &str,
        source: &str,
        now_ms: u64,
    ) -> Result<RevocationView, EnrolError> {
        let action = if decommission {
            "device.decommission"
        } else {
            "device.revoke"
        };
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > 500 {
            return Err(EnrolError::BadRequest(
                "reason: say why, in 1-500 characters".into(),
            ));
        }
        let mut book = self.lock();
        let known = self.registry.lifecycle(id).is_some()
            || book.devices.contains_key(id.as_str())
            || self.revocations.seen_serial(id.as_str()).is_some();
        if !known {
            drop(book);
            // A path the client typed: a card number in it is never recorded or echoed.
            let shown = posfleet_proto::text::shown(id.as_str());
            self.audit(
                actor,
                source,
                action,
                &shown,
                Outcome::Failure,
                "unknown device".into(),
            )?;
            return Err(EnrolError::NotFound(format!("no device {shown}")));
        }
        let mut record = book
            .devices
            .get(id.as_str())
            .cloned()
            .unwrap_or_else(|| DevicePki::new(id.as_str()));
        if let Some(seen) = self.revocations.seen_serial(id.as_str())
            && !record.serials.contains(&seen)
        {
            record.serials.push(seen);
        }
        let status = if decommission {
            PkiStatus::Decommissioned
        } else {
            PkiStatus::Revoked
        };
        if record.status == PkiStatus::Active || status == PkiStatus::Decommissioned {
            if record.revoked_ms.is_none() {
                record.revoked_ms = Some(now_ms);
            }
            record.status = status;
            record.reason = Some(reason.to_owned());
            record.revoked_by = Some(actor.to_owned());
        }
        record.pending_renewal = None;
        let new_revoked: Vec<RevokedCert> = record
            .serials
            .iter()
            .filter(|s| !book.revoked.contains_key(*s))
            .map(|s| RevokedCert {
                v: RECORD_VERSION,
                serial: s.clone(),
                device: id.to_string(),
                revoked_ms: now_ms,
                superseded: false,
            })
            .collect();
        let crl_number = book.crl_number + 1;
        self.commit(&Changes {
            devices: vec![record.clone()],
            revoked: new_revoked.clone(),
            crl_number: Some(crl_number),
            ..Changes::default()
        })?;
        let revoked_at_ms = record.revoked_ms.unwrap_or(now_ms);
        self.revocations
            .add_serials(record.serials.iter().map(String::as_str));
        match record.status {
            PkiStatus::Decommissioned => self.revocations.decommission_id(id.as_str()),
            _ => self
                .revocations
                .revoke_id(id.as_str(), ms_to_s(Some(revoked_at_ms))),
        }
        for r in new_revoked {
            book.revoked.insert(r.serial.clone(), r);
        }
        book.crl_number = crl_number;
        book.devices.insert(id.to_string(), record.clone());
        match self.sign_crl(&book) {
            Ok(crl) => book.crl = Arc::new(crl),
            Err(e) => warn!(error = %e, "CRL not regenerated; the previous one is served"),
        }
        drop(book);
        let lifecycle = match record.status {
            PkiStatus::Decommissioned => Lifecycle::Decommissioned,
            _ => Lifecycle::Revoked,
        };
        self.registry.set_lifecycle(id, lifecycle);
        // A kicked session leaves no last will: say so in the registry ourselves.
        if self.registry.is_online(id) {
            let _ = self.registry.presence_offline(
                id,
                now_ms,
                0,
                status_name(record.status).to_owned(),
            );
        }
        let session_closed = self
            .edge
            .as_ref()
            .is_some_and(|edge| edge.kick(&Identity::Device(id.clone())));
        info!(device = %id, status = status_name(record.status), session_closed, "device certificates revoked");
        self.audit(
            actor,
            source,
            action,
            id.as_str(),
            Outcome::Success,
            format!(
                "reason={reason:?} serials={}",
                record.serials.join(LIST_SEPARATOR)
            ),
        )?;
        Ok(RevocationView {
            device_id: id.to_string(),
            status: status_name(record.status).to_owned(),
            reason: record.reason.unwrap_or_default(),
            revoked_at_ms,
            serials: record.serials,
            session_closed,
        })
    }

    /// The current CRL, DER.
    pub fn crl(&self) -> Arc<Vec<u8>> {
        self.lock().crl.clone()
    }

    fn sign_crl(&self, book: &Book) -> Result<Vec<u8>, EnrolError> {
        let revoked: Vec<RevokedSerial> = book
            .revoked
            .values()
            .map(|r| RevokedSerial {
                serial: r.serial.clone(),
                revoked_at: ms_to_s(Some(r.revoked_ms)),
                superseded: r.superseded,
            })
            .collect();
        let next = i64::try_from(self.cfg.crl_next_update.as_secs()).unwrap_or(i64::MAX / 2);
        self.ca
            .crl(&revoked, book.crl_number, next)
            .map_err(|e| EnrolError::internal("signing the CRL", e))
    }

    // ---- renewal --------------------------------------------------------------------------

    /// Issues a new certificate for the device presenting `facts`; the old one stays valid
    /// until [`Enrolment::confirm_renewal`] is called with the new one.
    pub fn renew(
        &self,
        id: &DeviceId,
        facts: &CertFacts,
        csr_pem: &str,
        source: &str,
        now_ms: u64,
    ) -> Result<RenewResponse, EnrolError> {
        let result = self.renew_inner(id, facts, csr_pem, now_ms);
        let record = |outcome, detail| AuditRecord {
            actor: format!("device:{id}"),
            source: source.to_owned(),
            action: "device.renew".into(),
            target: id.to_string(),
            outcome,
            detail,
        };
        match &result {
            Ok(r) => self.record(record(
                Outcome::Success,
                format!("old_serial={} new_serial={}", facts.serial, r.serial),
            ))?,
            Err(e @ EnrolError::Internal { .. }) => {
                self.record(record(Outcome::Failure, e.to_string()))?;
            }
            // A device's repeated refusals are counted, not written one by one.
            Err(e) => self.refused(record(Outcome::Denied, e.to_string())),
        }
        result
    }

    fn renew_inner(
        &self,
        id: &DeviceId,
        facts: &CertFacts,
        csr_pem: &str,
        now_ms: u64,
    ) -> Result<RenewResponse, EnrolError> {
        let identity = Identity::Device(id.clone());
        if self.revocations.check(&identity, facts) != Standing::Good {
            return Err(EnrolError::Refused("this certificate is revoked"));
        }
        let csr = verify_csr(csr_pem)?;
        let mut book = self.lock();
        let mut record = book
            .devices
            .get(id.as_str())
            .cloned()
            .unwrap_or_else(|| DevicePki::new(id.as_str()));
        if record.status != PkiStatus::Active {
            return Err(EnrolError::Refused("this device is revoked"));
        }
        if !record.serials.contains(&facts.serial) {
            record.serials.push(facts.serial.clone());
        }
        let signed = issue::sign(
            &self.ca,
            id,
            &csr,
            IssueKind::Renewal,
            &format!("device:{id}"),
            now_ms,
        )?;
        let (cert_pem, new) = (signed.cert_pem, signed.facts);
        record.serials.push(new.serial.clone());
        // A renewal that was never confirmed is abandoned: its certificate is revoked.
        let mut revoked = Vec::new();
        if let Some(previous) = record.pending_renewal.take()
            && previous.new_serial != facts.serial
            && !book.revoked.contains_key(&previous.new_serial)
        {
            revoked.push(RevokedCert {
                v: RECORD_VERSION,
                serial: previous.new_serial,
                device: id.to_string(),
                revoked_ms: now_ms,
                superseded: true,
            });
        }
        record.pending_renewal = Some(PendingRenewal {
            old_serial: facts.serial.clone(),
            new_serial: new.serial.clone(),
            issued_ms: now_ms,
        });
        self.apply_revocations(&mut book, record, revoked, Some(signed.record))?;
        Ok(RenewResponse {
            certificate_pem: cert_pem,
            ca_pem: self.ca.cert_pem().to_owned(),
            serial: new.serial,
            not_after: new.not_after,
        })
    }

    /// Called with the renewed certificate: revokes the certificate it replaced. Returns the
    /// revoked serial.
    pub fn confirm_renewal(
        &self,
        id: &DeviceId,
        facts: &CertFacts,
        source: &str,
        now_ms: u64,
    ) -> Result<String, EnrolError> {
        let identity = Identity::Device(id.clone());
        if self.revocations.check(&identity, facts) != Standing::Good {
            return Err(EnrolError::Refused("this certificate is revoked"));
        }
        let mut book = self.lock();
        let mut record = book
            .devices
            .get(id.as_str())
            .cloned()
            .ok_or_else(|| EnrolError::Conflict("no renewal to confirm".into()))?;
        let pending = match &record.pending_renewal {
            Some(p) if p.new_serial == facts.serial => p.clone(),
            _ => {
                return Err(EnrolError::Conflict(
                    "no renewal to confirm with this certificate; call it with the new one".into(),
                ));
            }
        };
        record.pending_renewal = None;
        let revoked = vec![RevokedCert {
            v: RECORD_VERSION,
            serial: pending.old_serial.clone(),
            device: id.to_string(),
            revoked_ms: now_ms,
            superseded: true,
        }];
        self.apply_revocations(&mut book, record, revoked, None)?;
        drop(book);
        self.audit(
            &format!("device:{id}"),
            source,
            "device.renew_confirm",
            id.as_str(),
            Outcome::Success,
            format!("revoked_serial={}", pending.old_serial),
        )?;
        Ok(pending.old_serial)
    }

    /// Writes a device record, the record of a newly issued certificate and new CRL entries
    /// durably, then updates the views.
    fn apply_revocations(
        &self,
        book: &mut Book,
        record: DevicePki,
        revoked: Vec<RevokedCert>,
        issued: Option<IssuedCert>,
    ) -> Result<(), EnrolError> {
        let crl_number = (!revoked.is_empty()).then_some(book.crl_number + 1);
        self.commit(&Changes {
            devices: vec![record.clone()],
            issued: issued.iter().cloned().collect(),
            revoked: revoked.clone(),
            crl_number,
            ..Changes::default()
        })?;
        self.revocations
            .add_serials(revoked.iter().map(|r| r.serial.as_str()));
        book.devices.insert(record.id.clone(), record);
        if let Some(issued) = issued {
            book.issued.insert(issued.serial.clone(), issued);
        }
        if let Some(n) = crl_number {
            for r in revoked {
                book.revoked.insert(r.serial.clone(), r);
            }
            book.crl_number = n;
            match self.sign_crl(book) {
                Ok(crl) => book.crl = Arc::new(crl),
                Err(e) => warn!(error = %e, "CRL not regenerated; the previous one is served"),
            }
        }
        Ok(())
    }
}

/// A DER CRL as PEM (`X509 CRL`).
pub fn crl_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN X509 CRL-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END X509 CRL-----\n");
    out
}

/// A device id that enters the fleet here for the first time (enrolment, a token pin, a
/// certificate issued through the API or offline): the id pattern and no card number
/// ([`DeviceId::new_for_issue`]). `field` names it in the refusal.
fn new_device_id(raw: &str, field: &str) -> Result<DeviceId, EnrolError> {
    DeviceId::new_for_issue(raw)
        .map_err(|e| EnrolError::field(Refusal::Invalid, field, e.to_string()))
}

/// A serial number or group name from a request: 1-64 letters, digits, '.', '_' or '-', and
/// clean text (no card number: `4111-1111-1111-1111` fits the pattern).
fn check_name(field: &str, value: &str) -> Result<(), EnrolError> {
    if !crate::commands::valid_name(value) {
        return Err(EnrolError::field(
            Refusal::Invalid,
            field,
            "1-64 letters, digits, '.', '_' or '-'",
        ));
    }
    posfleet_proto::text::check_operator_text(value)
        .map_err(|problem| EnrolError::field(Refusal::Invalid, field, problem.to_string()))
}

/// A device id from a request as logs and the audit log may show it: the id (withheld if it
/// looks like a card number), or a placeholder if it is not a device id at all.
fn shown_id(raw: &str) -> String {
    match DeviceId::new(raw) {
        Ok(_) => posfleet_proto::text::shown(raw).into_owned(),
        Err(_) => "(not a device id)".to_owned(),
    }
}

fn status_name(status: PkiStatus) -> &'static str {
    match status {
        PkiStatus::Active => "active",
        PkiStatus::Revoked => "revoked",
        PkiStatus::Decommissioned => "decommissioned",
    }
}

fn ms_to_s(ms: Option<u64>) -> i64 {
    i64::try_from(ms.unwrap_or(0) / 1000).unwrap_or(i64::MAX / 2)
}
