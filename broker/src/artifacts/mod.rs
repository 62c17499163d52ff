//! Signed software artifacts (ADR 0008).
//!
//! # Layout
//!
//! - this file: the interfaces the rollout engine uses ([`ArtifactMeta`], [`ArtifactCatalog`],
//!   [`ArtifactUsers`]) and [`Artifacts`], the service that implements the catalog: the store,
//!   the trusted release keys, the limits and the public download URL.
//! - `store.rs`: [`ArtifactStore`], blobs on disk plus metadata in sled (layout there).
//! - `upload.rs`: an upload streamed to a temp file (hashed, capped), verified, stored.
//! - `device.rs`: the terminals' download endpoint (`GET /device/v1/artifacts/{sha256}`,
//!   ranges) on its own mutual-TLS listener.
//! - `validate.rs`: versions, components, ids.
//! - `error.rs`: store, insert, delete and upload errors.
//! - `tests/`: the store, and the device endpoint over real mutual TLS.
//!
//! The admin routes (`/api/v1/artifacts`) are in `api/artifacts.rs`.

mod device;
mod error;
mod store;
#[cfg(test)]
pub(crate) mod tests;
mod upload;

#[cfg(test)]
pub(crate) use tests::files as tests_support_files;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use posfleet_proto::pki::{PkiError, read_public_keys};
use posfleet_proto::signing::KeyRing;

pub use device::{PeerIdentity, device_router, device_tls_config};
pub use error::{ArtifactStoreError, DeleteError, InsertError, UploadError};
pub use store::{ArtifactStore, DEFAULT_CACHE, Inserted};
pub use upload::UploadRequest;

use crate::metrics::Metrics;

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

/// No rollout uses any artifact: the hook until the rollout engine registers its own.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoUsers;

impl ArtifactUsers for NoUsers {
    fn rollouts_using(&self, _id: &str) -> Vec<String> {
        Vec::new()
    }
}

/// Default largest upload (2 GiB).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Default longest pause in an upload's body before it is refused.
pub const DEFAULT_UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of the artifact service.
#[derive(Debug, Clone)]
pub struct ArtifactsConfig {
    /// Uploads beyond this many bytes are refused (413) and nothing is kept.
    pub max_upload_bytes: u64,
    /// An upload whose body pauses this long is refused (a stalled client cannot hold a
    /// temp file and a connection forever).
    pub upload_idle_timeout: Duration,
    /// Public base URL of the device endpoint, e.g. `https://fleet.example:8884`.
    pub device_url: String,
}

impl ArtifactsConfig {
    pub fn new(device_url: String) -> Self {
        Self {
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            upload_idle_timeout: DEFAULT_UPLOAD_IDLE_TIMEOUT,
            device_url,
        }
    }
}

/// The artifact service: store, trusted release keys, limits, public URL. Implements
/// [`ArtifactCatalog`] for the rollout engine.
#[derive(Debug)]
pub struct Artifacts {
    /// Blobs and metadata.
    store: Arc<ArtifactStore>,
    /// Release keys uploads must be signed with (`DATA/pki/release.pub`, read at start);
    /// empty: every upload is refused.
    release_keys: KeyRing,
    /// Where the release keys come from (named in errors).
    release_pub: PathBuf,
    /// Who uses artifacts (the rollout engine); [`NoUsers`] until it registers.
    users: OnceLock<Arc<dyn ArtifactUsers>>,
    config: ArtifactsConfig,
    /// Counts bytes served to terminals.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for dyn ArtifactUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ArtifactUsers")
    }
}

impl Artifacts {
    pub fn new(
        store: Arc<ArtifactStore>,
        release_keys: KeyRing,
        release_pub: PathBuf,
        config: ArtifactsConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            release_keys,
            release_pub,
            users: OnceLock::new(),
            config,
            metrics,
        }
    }

    /// Registers the rollout engine's usage hook (once; later calls are ignored and return
    /// false).
    pub fn set_users(&self, users: Arc<dyn ArtifactUsers>) -> bool {
        self.users.set(users).is_ok()
    }

    pub(crate) fn users(&self) -> &dyn ArtifactUsers {
        match self.users.get() {
            Some(users) => users.as_ref(),
            None => &NoUsers,
        }
    }

    pub fn store(&self) -> &Arc<ArtifactStore> {
        &self.store
    }

    pub fn config(&self) -> &ArtifactsConfig {
        &self.config
    }

    /// The trusted release keys.
    pub fn release_keys(&self) -> &KeyRing {
        &self.release_keys
    }

    /// The file the release keys were read from (`DATA/pki/release.pub`).
    pub fn release_pub(&self) -> &Path {
        &self.release_pub
    }
}

impl ArtifactCatalog for Artifacts {
    fn get(&self, id: &str) -> Option<ArtifactMeta> {
        match self.store.get(id) {
            Ok(meta) => meta,
            Err(e) => {
                tracing::error!(error = %e, id, "artifact store read failed");
                None
            }
        }
    }

    fn download_url(&self, id: &str) -> String {
        format!(
            "{}/device/v1/artifacts/{id}",
            self.config.device_url.trim_end_matches('/')
        )
    }
}

/// The trusted release keys in `path` (`DATA/pki/release.pub`): none when the file does not
/// exist; an error when it exists but holds no valid key (refuse to start rather than refuse
/// every upload silently).
pub fn load_release_keys(path: &Path) -> Result<KeyRing, PkiError> {
    if !path.exists() {
        return Ok(KeyRing::default());
    }
    Ok(KeyRing::new(read_public_keys(path)?))
}
