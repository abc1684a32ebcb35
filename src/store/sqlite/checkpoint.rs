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
//!
//! Only a checkpoint that copies the last frame lets the next write start the WAL over,
//! and under a stream of writes that takes the writer itself, between two transactions
//! (see `GroupWriter`). Under [`Durability::Normal`](super::Durability::Normal) nothing
//! else syncs the WAL, and that checkpoint first syncs everything written since the last
//! round: 25–60 ms of a 56–122 ms pause (loadgen, 8 threads), while every writer waits.
//! So the writer asks this thread to [prepare](Checkpointer::prepare_restart) its
//! checkpoint when the WAL nears its bound: rounds back to back, each shorter than the
//! one before, until one is short. The writer's checkpoint then syncs and copies only what
//! the last of them left: pauses of 23–55 ms, mostly the sync of the database file. The
//! rounds cost something too: writes that overlap a round are slower, and there are more
//! rounds (p99.9 at 8 threads 4.2 → 5.7 ms, medians of 16 runs).

use std::ffi::CStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::sync::WalSync;

/// How often the checkpointer looks for committed frames.
const INTERVAL: Duration = Duration::from_millis(250);

/// The most rounds a [prepare](Checkpointer::prepare_restart) runs back to back.
const PREPARE_ROUNDS: usize = 3;

/// A round this short ends a prepare: what it left for the writer is shorter still.
const SHORT_ROUND: Duration = Duration::from_millis(5);

/// Where the writer's restart stands ([`Checkpointer::prepare_restart`]): not asked for,
/// asked for, prepared, or due before it was prepared (the rounds stop).
const IDLE: u8 = 0;
const REQUESTED: u8 = 1;
const READY: u8 = 2;
const OVERDUE: u8 = 3;

/// A running checkpointer; stopping it (on drop) runs a last checkpoint.
pub(crate) struct Checkpointer {
    dirty: Arc<AtomicBool>,
    /// [`IDLE`], [`REQUESTED`], [`READY`] or [`OVERDUE`].
    restart: Arc<AtomicU8>,
    /// Asks the thread to prepare a restart; dropped to stop it.
    requests: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Prepares the thread has finished.
    #[cfg(test)]
    prepares: Arc<std::sync::atomic::AtomicUsize>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path`. With `sync`, each checkpoint waits
    /// for the WAL sync in progress and keeps new ones waiting until it ends.
    pub(crate) fn start(
        path: &Path,
        flags: OpenFlags,
        vfs: Option<&CStr>,
        busy: Duration,
        sync: Option<Arc<WalSync>>,
    ) -> rusqlite::Result<Self> {
        let conn = super::open_file(path, flags, vfs)?;
        conn.busy_timeout(busy)?;
        let dirty = Arc::new(AtomicBool::new(false));
        let restart = Arc::new(AtomicU8::new(IDLE));
        let (requests, received) = mpsc::channel::<()>();
        let (flag, restart_state) = (Arc::clone(&dirty), Arc::clone(&restart));
        #[cfg(test)]
        let prepares = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        #[cfg(test)]
        let prepared = Arc::clone(&prepares);
        let thread = std::thread::Builder::new()
            .name("stockroom-checkpoint".into())
            .spawn(move || {
                loop {
                    match received.recv_timeout(INTERVAL) {
                        Ok(()) => {
                            prepare(&conn, sync.as_deref(), &flag, &restart_state);
                            // Unless the writer restarted, or had to, meanwhile.
                            let _ = restart_state.compare_exchange(
                                REQUESTED,
                                READY,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                            #[cfg(test)]
                            prepared.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            if flag.swap(false, Ordering::AcqRel) {
                                checkpoint(&conn, sync.as_deref(), "background");
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            checkpoint(&conn, sync.as_deref(), "background");
                            break;
                        }
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
            restart,
            requests: Some(requests),
            thread: Some(thread),
            #[cfg(test)]
            prepares,
        })
    }

    /// Notes that a transaction committed: the next round checkpoints.
    pub(crate) fn committed(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Asks the thread to prepare the writer's restart of the WAL now: rounds back to
    /// back until one is short (see the module's documentation), then
    /// [`restart_ready`](Self::restart_ready). Only the first call after a restart asks.
    pub(crate) fn prepare_restart(&self) {
        let asked = self
            .restart
            .compare_exchange(IDLE, REQUESTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if asked && let Some(requests) = &self.requests {
            let _ = requests.send(());
        }
    }

    /// Whether a prepared restart is ready: the writer's checkpoint now has little left
    /// to sync and copy.
    pub(crate) fn restart_ready(&self) -> bool {
        self.restart.load(Ordering::Acquire) == READY
    }

    /// Notes that the writer's restart is due before it was prepared: the prepare's
    /// rounds stop, so that the writer's own checkpoint, which is busy while a round
    /// runs, gets its turn. (Rounds of large commits need not get shorter, and the WAL
    /// must not grow past its bound while they run: a test of 50-line carts caught it.)
    pub(crate) fn restart_due(&self) {
        let _ =
            self.restart
                .compare_exchange(REQUESTED, OVERDUE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Notes that the writer started the WAL over: a prepare still running is for
    /// nothing, and the next one is asked anew.
    pub(crate) fn restarted(&self) {
        self.restart.store(IDLE, Ordering::Release);
    }
}

/// [`Checkpointer::prepare_restart`]'s rounds: at most [`PREPARE_ROUNDS`], until one
/// takes under [`SHORT_ROUND`] or the restart is [`OVERDUE`]. Each syncs the frames
/// written during the one before and copies them (loadgen, 8 threads, NORMAL, 8
/// prepares: rounds of 25–97 ms, then 7–26 ms, then 3–9 ms).
fn prepare(conn: &Connection, sync: Option<&WalSync>, dirty: &AtomicBool, restart: &AtomicU8) {
    for _ in 0..PREPARE_ROUNDS {
        if restart.load(Ordering::Acquire) != REQUESTED {
            break;
        }
        dirty.store(false, Ordering::Release);
        let started = Instant::now();
        if checkpoint(conn, sync, "background") == Checkpointed::Busy
            || started.elapsed() < SHORT_ROUND
        {
            break;
        }
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
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAL database in `dir` with automatic checkpoints off and `rows` rows written,
    /// and its writer.
    fn database(dir: &Path, rows: i64) -> (std::path::PathBuf, Connection) {
        let path = dir.join("c.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; \
             CREATE TABLE t (x INTEGER);",
        )
        .unwrap();
        for x in 0..rows {
            conn.execute("INSERT INTO t VALUES (?1)", [x]).unwrap();
        }
        (path, conn)
    }

    fn start(path: &Path) -> Checkpointer {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        Checkpointer::start(path, flags, None, Duration::from_secs(5), None).unwrap()
    }

    /// The checkpoint sequence number in the WAL's header: one more at every restart.
    fn restarts(path: &Path) -> u32 {
        let header = std::fs::read(path.with_extension("db-wal")).unwrap();
        u32::from_be_bytes(header[12..16].try_into().unwrap())
    }

    fn until(what: impl Fn() -> bool) -> bool {
        let started = Instant::now();
        while !what() {
            if started.elapsed() > Duration::from_secs(20) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn a_prepared_restart_leaves_nothing_to_copy_and_the_next_write_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let (path, writer) = database(dir.path(), 200);
        let checkpointer = start(&path);
        let before = restarts(&path);
        assert!(!checkpointer.restart_ready());
        checkpointer.prepare_restart();
        assert!(until(|| checkpointer.restart_ready()), "never ready");
        // Asked again while ready: nothing new.
        checkpointer.prepare_restart();
        assert!(checkpointer.restart_ready());
        assert_eq!(checkpointer.prepares.load(Ordering::Acquire), 1);
        // The rounds copied every frame: the next write starts the WAL over.
        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert_eq!(restarts(&path), before + 1);
        checkpointer.restarted();
        assert!(!checkpointer.restart_ready());
        let rows: i64 = writer
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 201);
    }

    #[test]
    fn a_restart_before_the_rounds_end_leaves_no_stale_ready() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _writer) = database(dir.path(), 200);
        let checkpointer = start(&path);
        checkpointer.prepare_restart();
        // The writer restarted by itself (its bound came first).
        checkpointer.restarted();
        assert!(until(|| checkpointer.prepares.load(Ordering::Acquire) == 1));
        assert!(!checkpointer.restart_ready(), "a prepare for nothing");
        // The next one is asked anew.
        checkpointer.prepare_restart();
        assert!(until(|| checkpointer.restart_ready()));
        assert_eq!(checkpointer.prepares.load(Ordering::Acquire), 2);
    }
}
