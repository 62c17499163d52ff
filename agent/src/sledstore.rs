//! The sled rules of `notes/storage.md`, shared by every sled store of the project (the
//! agent's outbox; the controller's `registry` and `txstore`): open with partial snapshots removed and an explicit page cache, and make a
//! commit durable with `flush` plus an fsync of the `db` file. Every function here blocks.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Why a sled directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
}

/// How long `open` waits for the lock of a database this process has just closed.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Pause between lock attempts.
const LOCK_RETRY: Duration = Duration::from_millis(20);

/// Opens (creating it 0700 if needed) the sled database in `dir` with a page cache of
/// `cache_capacity` bytes, after removing partial snapshots (storage rules 3 and 5).
///
/// sled's background threads keep the database's file lock for a moment after the last
/// `Db` handle is dropped, so a reopen right after a close (a restart within the process)
/// waits up to [`LOCK_WAIT`] for it. A lock held by another process fails after that wait.
pub fn open(dir: &Path, cache_capacity: u64) -> Result<sled::Db, OpenError> {
    create_private_dir(dir)?;
    remove_partial_snapshots(dir)?;
    let started = Instant::now();
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_busy(&e) && started.elapsed() < LOCK_WAIT => {
                // Called at startup or on a blocking thread, never on the async runtime.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(LOCK_RETRY);
            }
            Err(source) => {
                return Err(OpenError::Sled {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
    }
}

/// True for sled's "could not acquire lock" error (the `db` file is locked).
fn is_lock_busy(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Makes everything applied to the database in `dir` durable: `flush` (which on Linux uses
/// `sync_file_range`: survives a process kill, not a power cut, sled issue 1452), then an
/// fsync of the `db` file through a second handle (storage rule 2).
pub fn make_durable(db: &sled::Tree, dir: &Path) -> Result<(), DurableError> {
    db.flush().map_err(DurableError::Flush)?;
    let db_file = dir.join("db");
    fs::File::open(&db_file)
        .and_then(|f| f.sync_all())
        .map_err(|source| DurableError::Fsync {
            path: db_file,
            source,
        })
}

/// Why a commit could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("sled flush failed: {0}")]
    Flush(#[source] sled::Error),
    #[error("fsync of {path} failed: {source}")]
    Fsync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn create_private_dir(dir: &Path) -> Result<(), OpenError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| OpenError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Deletes `snap.*.generating` files: a kill while sled writes a snapshot can leave a
/// truncated one that sled would take as the newest and refuse to open
/// (notes/storage.md rule 3).
fn remove_partial_snapshots(dir: &Path) -> Result<(), OpenError> {
    let io = |source| OpenError::Io {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let partial = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating"));
        if partial {
            warn!(path = %path.display(), "removing a partial sled snapshot left by a crash");
            fs::remove_file(&path).map_err(|source| OpenError::Io {
                path: path.clone(),
                source,
            })?;
            info!(path = %path.display(), "partial snapshot removed");
        }
    }
    Ok(())
}
