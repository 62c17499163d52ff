//! Errors of the transaction store.

use std::path::PathBuf;

/// Why the transaction store could not open, read or commit.
#[derive(Debug, thiserror::Error)]
pub enum TxStoreError {
    #[error(
        "cannot open the transaction store at {path}: {source}; check the path and its \
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
    #[error("reading the transaction store at {path} failed: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error(
        "writing the transaction store at {path} failed: {source}; nothing in this commit was \
         acknowledged, terminals will resend it"
    )]
    Write {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error(
        "transaction store at {path} holds an unreadable entry (key {key:?}): {detail}; \
         restore the directory from a backup"
    )]
    Corrupt {
        path: PathBuf,
        key: String,
        detail: String,
    },
}

/// Why a transaction query was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("the cursor is not valid for this query: {0}")]
    BadCursor(&'static str),
    #[error(transparent)]
    Store(#[from] TxStoreError),
}
