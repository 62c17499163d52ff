//! `posctl pki issue-device --dir DATA/pki` with the controller stopped (issue 10 item 8):
//! the same checks, signing and record as `POST /api/v1/pki/certificates`
//! ([`Book::issue_batch`](super::Book)), written into `DATA/enrolment` directly.

use std::path::Path;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::verify_csr;
use tracing::warn;

use super::issue::{answer, bundle_files};
use super::store::{EnrolmentStore, EnrolmentStoreError};
use super::{Book, DEFAULT_CACHE, EnrolError, Refusal};
use crate::views::{IssueKind, IssuedCertificates};

/// What [`issue_offline`] issued.
#[derive(Debug, Clone)]
pub struct OfflineIssue {
    pub certificate: IssuedCertificates,
}

/// Why [`issue_offline`] could not issue.
#[derive(Debug, thiserror::Error)]
pub enum OfflineIssueError {
    /// The controller holds the enrolment store: issue through its API instead.
    #[error("the controller is running on {data}")]
    Running { data: std::path::PathBuf },
    #[error(transparent)]
    Store(EnrolmentStoreError),
    #[error("cannot load the fleet CA: {0}")]
    Ca(posfleet_proto::pki::PkiError),
    #[error(transparent)]
    Refused(#[from] EnrolError),
}

/// `posctl pki issue-device --dir DATA/pki` with the controller stopped: the same checks,
/// signing and record as the API, written into `DATA/enrolment` directly. The record is
/// marked for the audit log, which the controller writes at its next start. Blocks.
pub fn issue_offline(
    data_root: &Path,
    id: &DeviceId,
    csr_pem: &str,
    actor: &str,
    now_ms: u64,
) -> Result<OfflineIssue, OfflineIssueError> {
    let data = crate::datadir::DataDir::at(data_root);
    let pki = data.pki();
    let ca = pki.load_ca().map_err(OfflineIssueError::Ca)?;
    let csr = verify_csr(csr_pem)
        .map_err(|e| EnrolError::field(Refusal::Invalid, "csr_pem", e.to_string()))?;
    let store =
        EnrolmentStore::open(&data.enrolment_dir(), DEFAULT_CACHE).map_err(|e| match e {
            EnrolmentStoreError::Busy { .. } => OfflineIssueError::Running {
                data: data_root.to_owned(),
            },
            other => OfflineIssueError::Store(other),
        })?;
    let book = Book::from_loaded(store.load().map_err(OfflineIssueError::Store)?);
    let (signed, mut changes) = book.issue_batch(
        &ca,
        &[(id.clone(), csr)],
        IssueKind::CliOffline,
        actor,
        now_ms,
    )?;
    for c in &mut changes.issued {
        c.pending_audit = true;
    }
    store.commit(&changes).map_err(OfflineIssueError::Store)?;
    warn!(device = %id, "device certificate issued offline; the controller audits it at its next start");
    Ok(OfflineIssue {
        certificate: answer(signed, bundle_files(&pki, &ca)?),
    })
}
