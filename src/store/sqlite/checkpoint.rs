//! WAL checkpoints on a thread of their own, off the writers' path.
//!
//! With SQLite's automatic checkpoints, the commit that crosses the WAL size threshold
//! copies the WAL back into the database file and syncs it before it returns: a latency
//! spike for one unlucky group and work repeated for pages written again and again. The
//! store turns automatic checkpoints off on its writer and runs a `PASSIVE` checkpoint
//! from this thread four times a second instead, only when something was committed.
//! `PASSIVE` never blocks writers or readers. Under
//! [`Durability::Full`](super::Durability::Full) a checkpoint waits for the WAL sync in
//! progress and holds back the next one until it ends: a sync beside a checkpoint waits
//! for the checkpoint's writes on the disk too.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::sync::WalSync;

/// How often the checkpointer looks for committed frames.
const INTERVAL: Duration = Duration::from_millis(250);

/// A running checkpointer; stopping it (on drop) runs a last checkpoint.
pub(crate) struct Checkpointer {
    dirty: Arc<AtomicBool>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path`. With `sync`, each checkpoint waits
    /// for the WAL sync in progress and keeps new ones waiting until it ends.
    pub(crate) fn start(
        path: &Path,
        flags: OpenFlags,
        busy: Duration,
        sync: Option<Arc<WalSync>>,
    ) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(busy)?;
        let dirty = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel::<()>();
        let flag = Arc::clone(&dirty);
        let thread = std::thread::Builder::new()
            .name("stockroom-checkpoint".into())
            .spawn(move || {
                loop {
                    let last = !matches!(
                        stopped.recv_timeout(INTERVAL),
                        Err(RecvTimeoutError::Timeout)
                    );
                    if flag.swap(false, Ordering::AcqRel) || last {
                        checkpoint(&conn, sync.as_deref(), "background");
                    }
                    if last {
                        break;
                    }
                }
            })
            .map_err(|e| {
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                    Some(format!("cannot start the checkpoint thread: {e}")),
                )
            })?;
        Ok(Checkpointer {
            dirty,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Notes that a transaction committed: the next round checkpoints.
    pub(crate) fn committed(&self) {
        self.dirty.store(true, Ordering::Release);
    }
}

/// How far a checkpoint got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checkpointed {
    /// Every frame of the WAL is in the database file: the next write starts the WAL
    /// over.
    All,
    /// Some frames are left: a reader still needs them, or the checkpoint failed.
    Part,
    /// Another connection was checkpointing; this one did nothing.
    Busy,
}

/// A `PASSIVE` checkpoint on `conn`, with no WAL sync of `sync` running beside it.
/// `who` names the caller in the log.
pub(crate) fn checkpoint(conn: &Connection, sync: Option<&WalSync>, who: &str) -> Checkpointed {
    match sync {
        Some(s) => s.checkpoint(|| passive(conn, who)),
        None => passive(conn, who),
    }
}

fn passive(conn: &Connection, who: &str) -> Checkpointed {
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    });
    match result {
        Ok((busy, log, done)) => {
            log::trace!("sqlite: {who} checkpoint copied {done} of {log} WAL frames (busy {busy})");
            match (busy, done == log) {
                (0, true) => Checkpointed::All,
                (0, false) => Checkpointed::Part,
                _ => Checkpointed::Busy,
            }
        }
        Err(e) => {
            log::debug!("sqlite: {who} checkpoint skipped: {e}");
            Checkpointed::Part
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
