//! Signed software artifacts (ADR 0008): the store, the upload path and the device download
//! endpoint live beside this file. This file fixes the interfaces the rollout engine uses.

/// What the controller knows about a stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactMeta {
    /// The SHA-256 of the bytes, lowercase hex (also the id).
    pub id: String,
    pub version: String,
    /// `payment_app`, `firmware` or `agent`.
    pub component: String,
    pub size_bytes: u64,
    pub sha256: [u8; 32],
    /// Ed25519 over `RELEASE_TAG || sha256` by release key `release_key_id`.
    pub release_signature: Vec<u8>,
    pub release_key_id: String,
    /// Terminals below this version of the component must not take it (`None`: any).
    pub min_version: Option<String>,
    pub uploaded_at_ms: u64,
    pub uploaded_by: String,
}

/// What the rollout engine needs from the artifact store.
pub trait ArtifactCatalog: Send + Sync + 'static {
    /// The artifact with this id, if stored.
    fn get(&self, id: &str) -> Option<ArtifactMeta>;

    /// The URL terminals download it from (the device endpoint).
    fn download_url(&self, id: &str) -> String;
}

/// What the artifact store needs from the rollout engine: deleting an artifact that an
/// unfinished rollout uses is refused.
pub trait ArtifactUsers: Send + Sync + 'static {
    /// Ids of unfinished rollouts that use artifact `id`.
    fn rollouts_using(&self, id: &str) -> Vec<String>;
}
