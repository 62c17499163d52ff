//! The sled rules of `docs/storage.md`, shared by every sled store of the project (the
//! agent's outbox; the controller's `registry` and `txstore`): open with partial snapshots removed and an explicit page cache, and make a
//! commit durable with `flush` plus an fsync of the `db` file. Every function here blocks.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
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

/// [`open`], then the tree `name`: what most stores need (one tree, namespaced keys).
pub fn open_tree(
    dir: &Path,
    cache_capacity: u64,
    name: &str,
) -> Result<(sled::Db, sled::Tree), OpenError> {
    let db = open(dir, cache_capacity)?;
    let tree = db.open_tree(name).map_err(|source| OpenError::Sled {
        path: dir.to_owned(),
        source,
    })?;
    Ok((db, tree))
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

/// Group commit for stores with many independent writers (the agent's state store, shared
/// by every simulated terminal): writers apply their batch, then call
/// [`SyncGate::make_durable`]. One caller at a time runs the flush + fsync; everyone whose
/// write was applied before that flush started returns when it ends, so N concurrent writers
/// cost about two flushes instead of N (storage rule 4 without a committer thread).
#[derive(Debug, Default)]
pub struct SyncGate {
    state: Mutex<GateState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// Tickets handed out (one per call).
    requested: u64,
    /// Every ticket up to this one is durable.
    completed: u64,
    /// A flush is running.
    running: bool,
    /// Flushes run (for tests and metrics).
    flushes: u64,
}

impl SyncGate {
    /// Returns once everything applied to `tree` before this call is durable
    /// ([`make_durable`], shared with concurrent callers). Blocks.
    pub fn make_durable(&self, tree: &sled::Tree, dir: &Path) -> Result<(), DurableError> {
        self.sync_with(|| make_durable(tree, dir))
    }

    /// Flushes run so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The gate's logic with the flush given by the caller.
    fn sync_with<E>(&self, flush: impl Fn() -> Result<(), E>) -> Result<(), E> {
        let mut st = self.lock();
        st.requested += 1;
        let ticket = st.requested;
        loop {
            if st.completed >= ticket {
                return Ok(());
            }
            if st.running {
                st = self.done.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead a flush: it covers every ticket handed out so far (their writes were
            // applied before they took a ticket).
            st.running = true;
            st.flushes += 1;
            let target = st.requested;
            drop(st);
            let result = flush();
            st = self.lock();
            st.running = false;
            if result.is_ok() {
                st.completed = st.completed.max(target);
            }
            self.done.notify_all();
            // On failure the error goes to this caller; waiters retry with a flush of their own.
            result?;
        }
    }
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
/// (docs/storage.md rule 3).
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn sync_gate_returns_only_after_a_flush_that_started_after_the_write() {
        let gate = Arc::new(SyncGate::default());
        // `written` counts writes; a flush records how many were written when it started.
        let written = Arc::new(AtomicU64::new(0));
        let flushed_through = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (gate, written, flushed_through) =
                    (gate.clone(), written.clone(), flushed_through.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                        gate.sync_with(|| -> Result<(), ()> {
                            let seen = written.load(Ordering::SeqCst);
                            std::thread::yield_now();
                            flushed_through.fetch_max(seen, Ordering::SeqCst);
                            Ok(())
                        })
                        .unwrap();
                        assert!(flushed_through.load(Ordering::SeqCst) >= mine);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(written.load(Ordering::SeqCst), 800);
    }

    #[test]
    fn writers_waiting_during_a_flush_share_the_next_one() {
        let gate = Arc::new(SyncGate::default());
        let (release, hold) = std::sync::mpsc::sync_channel::<()>(0);
        let hold = Arc::new(Mutex::new(hold));
        // The leader's flush blocks until released.
        let leader = {
            let (gate, hold) = (gate.clone(), hold.clone());
            std::thread::spawn(move || {
                gate.sync_with(|| -> Result<(), ()> {
                    hold.lock().unwrap().recv().unwrap();
                    Ok(())
                })
            })
        };
        while !gate.lock().running {
            std::thread::yield_now();
        }
        let followers: Vec<_> = (0..10)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || gate.sync_with(|| Ok::<(), ()>(())))
            })
            .collect();
        while gate.lock().requested < 11 {
            std::thread::yield_now();
        }
        release.send(()).unwrap();
        assert_eq!(leader.join().unwrap(), Ok(()));
        for f in followers {
            assert_eq!(f.join().unwrap(), Ok(()));
        }
        assert_eq!(gate.flushes(), 2, "ten waiting writers shared one flush");
    }

    #[test]
    fn sync_gate_failure_reaches_the_caller_and_the_next_call_flushes_again() {
        let gate = SyncGate::default();
        assert_eq!(gate.sync_with(|| Err("disk full")), Err("disk full"));
        assert_eq!(gate.sync_with(|| Ok::<(), &str>(())), Ok(()));
        assert_eq!(gate.flushes(), 2);
    }
}
