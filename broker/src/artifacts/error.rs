//! Errors of the artifact store and of uploads.

use std::path::PathBuf;

/// Why the artifact store could not open, read or write.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactStoreError {
    #[error(
        "cannot open the artifact store at {path}: {source}; check the path and its \
         permissions, and restore the directory from a backup if it is corrupt"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the artifact store at {path} failed: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("writing the artifact store at {path} failed: {source}; nothing was changed")]
    Write {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error(
        "artifact store at {path} holds an unreadable entry (key {key:?}): {detail}; restore \
         the directory from a backup"
    )]
    Corrupt {
        path: PathBuf,
        key: String,
        detail: String,
    },
}

/// Why an artifact could not be added.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// The same bytes are stored with other metadata, or the same component version with
    /// other bytes.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] ArtifactStoreError),
}

/// Why an artifact could not be deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("artifact {id} is used by unfinished rollout(s) {}", rollouts.join(", "))]
    InUse { id: String, rollouts: Vec<String> },
    #[error(transparent)]
    Store(#[from] ArtifactStoreError),
}

/// Why an upload was refused. Nothing is stored after any of these.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("no release key is trusted: {path} is missing, so every upload is refused")]
    NoReleaseKeys { path: PathBuf },
    #[error("the upload is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the file is empty")]
    Empty,
    #[error("header {name}: {detail}")]
    BadHeader { name: &'static str, detail: String },
    #[error(
        "the file's SHA-256 is {actual}, but the signature file names {expected}: the bytes \
         were changed after signing (or the wrong .sig was given)"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error("the artifact is signed by release key {key_id}, which this controller does not trust")]
    UnknownKey { key_id: String },
    #[error("the release signature does not match the file's SHA-256 (tampered or wrongly signed)")]
    BadSignature,
    #[error("the client stopped sending the file: {0}")]
    Body(String),
    #[error("no data from the client for {0:?}")]
    Idle(std::time::Duration),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Insert(#[from] InsertError),
}
