//! An upload: the request body streamed to a temp file (0600) in the blobs directory, hashed
//! on the way and capped; then synced, checked against the expected digest and the trusted
//! release keys, and handed to the store. The temp file is removed on every refusal, and also
//! when the client goes away mid-upload (the handler future is dropped).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use futures_util::StreamExt as _;
use posfleet_proto::signing::ReleaseError;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;
use tracing::debug;

use super::error::UploadError;
use super::store::{Inserted, create_temp};
use super::{ArtifactMeta, Artifacts};

/// Everything an upload names besides its bytes (already validated by the API handler).
#[derive(Debug, Clone)]
pub struct UploadRequest {
    pub version: String,
    pub component: String,
    pub min_version: Option<String>,
    /// The release key that signed it.
    pub key_id: String,
    /// Ed25519 signature over `RELEASE_TAG || sha256`.
    pub signature: Vec<u8>,
    /// The digest the signer computed (from the `.sig` file), if the client sent it.
    pub expected_sha256: Option<[u8; 32]>,
    /// `Content-Length`, if the client sent one (refused early when over the limit).
    pub content_length: Option<u64>,
    /// Who uploads ("admin").
    pub uploaded_by: String,
}

/// Removes its file when dropped, unless disarmed.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            // One unlink; also runs when the client disconnects and the handler is dropped,
            // where nothing async can run any more.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Artifacts {
    /// Checks, stores and returns the artifact in `body` (see the module docs).
    pub async fn upload(
        self: &Arc<Self>,
        req: UploadRequest,
        body: Body,
    ) -> Result<Inserted, UploadError> {
        if self.release_keys.is_empty() {
            return Err(UploadError::NoReleaseKeys {
                path: self.release_pub.clone(),
            });
        }
        if !self
            .release_keys
            .keys()
            .iter()
            .any(|k| k.key_id() == req.key_id)
        {
            return Err(UploadError::UnknownKey { key_id: req.key_id });
        }
        let limit = self.config.max_upload_bytes;
        if req.content_length.is_some_and(|n| n > limit) {
            return Err(UploadError::TooLarge { limit });
        }

        let path = self.store.temp_path();
        let io = |source| UploadError::Io {
            path: path.clone(),
            source,
        };
        let file = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || create_temp(&path))
                .await
                .map_err(|e| io(std::io::Error::other(e)))?
                .map_err(io)?
        };
        let guard = TempFile {
            path: path.clone(),
            armed: true,
        };
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut stream = body.into_data_stream();
        loop {
            let next = tokio::time::timeout(self.config.upload_idle_timeout, stream.next())
                .await
                .map_err(|_| UploadError::Idle(self.config.upload_idle_timeout))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| UploadError::Body(e.to_string()))?;
            size = size.saturating_add(chunk.len() as u64);
            if size > limit {
                return Err(UploadError::TooLarge { limit });
            }
            // Hashing a body chunk (tens of KiB) takes microseconds: fine on the runtime.
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        if size == 0 {
            return Err(UploadError::Empty);
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        drop(file);

        let sha256: [u8; 32] = hasher.finalize().into();
        if let Some(expected) = req.expected_sha256.filter(|e| *e != sha256) {
            return Err(UploadError::DigestMismatch {
                expected: hex::encode(expected),
                actual: hex::encode(sha256),
            });
        }
        self.release_keys
            .verify_release(&req.key_id, &sha256, &req.signature)
            .map_err(|e| match e {
                ReleaseError::UnknownKey => UploadError::UnknownKey {
                    key_id: req.key_id.clone(),
                },
                ReleaseError::BadSignature => UploadError::BadSignature,
            })?;

        let meta = ArtifactMeta {
            id: hex::encode(sha256),
            version: req.version,
            component: req.component,
            size_bytes: size,
            sha256,
            release_signature: req.signature,
            release_key_id: req.key_id,
            min_version: req.min_version,
            uploaded_at_ms: now_ms(),
            uploaded_by: req.uploaded_by,
        };
        debug!(id = %meta.id, size, "upload verified");
        let store = Arc::clone(&self.store);
        // Rename, directory fsync and sled commit: blocking.
        let (inserted, guard) = tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            let inserted = store.insert(&guard.path, meta);
            if matches!(inserted, Ok(Inserted::Created(_))) {
                guard.armed = false;
            }
            (inserted, guard)
        })
        .await
        .map_err(|e| io(std::io::Error::other(e)))?;
        drop(guard);
        Ok(inserted?)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
