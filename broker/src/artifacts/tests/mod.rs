//! Tests of the artifact store and of the device endpoint.
//!
//! - `store.rs`: durability across reopen, idempotent re-upload, conflicts, deletion (and its
//!   refusal while a rollout uses the artifact), recovery sweeps.
//! - `device.rs`: downloads over real mutual TLS: full, ranges, 416, 404, and clients without
//!   a certificate or with one from another CA refused at the handshake.

mod device;
mod store;

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{ArtifactMeta, ArtifactStore, Inserted};

/// Metadata for `bytes` (the signature is not checked by the store).
pub(crate) fn meta_for(bytes: &[u8], version: &str) -> ArtifactMeta {
    let sha256: [u8; 32] = Sha256::digest(bytes).into();
    ArtifactMeta {
        id: hex::encode(sha256),
        version: version.into(),
        component: "payment_app".into(),
        size_bytes: bytes.len() as u64,
        sha256,
        release_signature: vec![7; 64],
        release_key_id: "00112233aabbccdd".into(),
        min_version: None,
        uploaded_at_ms: 1_000,
        uploaded_by: "admin".into(),
    }
}

/// Puts `bytes` into a temp file of `store` and inserts it; returns the result and the temp
/// path (gone when created).
pub(crate) fn put(
    store: &ArtifactStore,
    bytes: &[u8],
    version: &str,
) -> (Result<Inserted, super::InsertError>, std::path::PathBuf) {
    let temp = store.temp_path();
    std::fs::write(&temp, bytes).unwrap();
    (store.insert(&temp, meta_for(bytes, version)), temp)
}

/// Names of the files in `dir`.
pub(crate) fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
