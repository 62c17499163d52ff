//! Errors of the device registry.

use std::path::PathBuf;

/// Why the registry could not open, load or persist its store.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "cannot open the registry store at {path}: {source}; check the path and its permissions, \
         and restore the directory from a backup if it is corrupt"
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
    #[error(
        "registry store at {path} holds an unreadable record for key {key:?}: {detail}; \
         restore the directory from a backup"
    )]
    CorruptRecord {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("writing the registry store at {path} failed: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("cannot encode the record of device {device}: {source}")]
    Encode {
        device: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("a registry commit failed: {message}; it is retried on the next flush interval")]
    CommitFailed { message: String },
    #[error(
        "the registry committer is not running, so nothing can be made durable; \
         it is started by spawn_committer and stops at shutdown"
    )]
    NoCommitter,
    #[error("the registry commit task failed to run: {0}")]
    Join(String),
}
