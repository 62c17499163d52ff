//! Errors of the configuration store.

use std::path::PathBuf;

use crate::views::FieldMessage;

/// Why a configuration operation failed. The first four are the caller's doing (nothing was
/// changed); the rest are the store's.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the change is invalid ({} problem(s)); nothing was stored", .0.len())]
    Invalid(Vec<FieldMessage>),
    #[error("there is no {scope} layer")]
    NotFound { scope: String },
    #[error("{0}")]
    BadRange(String),
    #[error(
        "history before version {oldest} has been pruned; ask for a range starting at \
         {oldest_from} or later"
    )]
    Pruned { oldest: u64, oldest_from: u64 },
    #[error(
        "cannot open the configuration store at {path}: {source}; check the path and its \
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
    #[error(
        "configuration store at {path} holds an unreadable entry {key:?}: {detail}; restore \
         the directory from a backup"
    )]
    Corrupt {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("reading or writing the configuration store at {path} failed: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("cannot encode a configuration record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(
        "version {version} was written but could not be made durable ({detail}); it becomes \
         durable with the next successful change; check the disk"
    )]
    NotDurable { version: u64, detail: String },
}
