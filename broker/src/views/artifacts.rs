//! JSON shapes of `/api/v1/artifacts` (ADR 0008).

use serde::{Deserialize, Serialize};

/// One stored artifact: `GET /api/v1/artifacts/{id}`, rows of the list, and what
/// `POST /api/v1/artifacts` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactView {
    /// The SHA-256 of the bytes, lowercase hex.
    pub id: String,
    pub version: String,
    /// `payment_app`, `firmware` or `agent`.
    pub component: String,
    pub size_bytes: u64,
    /// Same as `id`; named for scripts that check downloads.
    pub sha256: String,
    /// Ed25519 over `RELEASE_TAG || sha256`, base64.
    pub release_signature: String,
    pub release_key_id: String,
    /// Terminals below this version of the component must not take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    pub uploaded_at_ms: u64,
    pub uploaded_by: String,
    /// Where terminals download it (the device endpoint, mutual TLS).
    pub download_url: String,
}

/// `GET /api/v1/artifacts`: every artifact, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactList {
    pub items: Vec<ArtifactView>,
}

/// `DELETE /api/v1/artifacts/{id}`: what was removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactDeleted {
    pub id: String,
    pub deleted: bool,
}
