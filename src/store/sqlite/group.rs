//! Group commit: the write units of concurrent callers share one transaction and one
//! commit (one fsync under `synchronous = FULL`).
//!
//! Callers queue their units in arrival order. The caller at the front of the queue is
//! the leader: it takes every unit queued behind it (up to a bound), runs each in its own
//! savepoint on the one writer connection (so a refused unit is rolled back alone and
//! never fails its neighbours), commits once, and hands each caller its own outcome. The
//! next caller in line then leads the next group. A caller alone runs its unit on its own
//! thread, in a plain transaction: no thread hand-off, no savepoint.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, Thread};

use rusqlite::Connection;

use crate::error::{Error, Result};
use crate::store::WriteUnit;

use super::checkpoint::Checkpointer;
use super::{BACKEND, SqliteTx, exec};

/// The most units one transaction runs.
const MAX_GROUP: usize = 512;

/// The most groups one caller leads in a row before it hands over.
const LEAD_ROUNDS: usize = 4;

/// With the background checkpointer, every this many transactions the leader checkpoints
/// too, between two transactions: the background thread has copied most frames already,
/// so this short checkpoint catches up completely and the next write starts the WAL over.
/// A checkpoint that runs beside a stream of writes never catches up by itself, and the
/// WAL would grow without bound.
const RESTART_EVERY: u64 = 2_000;

/// What a unit's caller gets back: its result, or the panic it raised.
type Outcome = std::thread::Result<Result<()>>;

struct Job {
    unit: Option<WriteUnit>,
    outcome: Option<Outcome>,
    /// The caller, parked until its outcome is in or it is its turn to lead.
    caller: Thread,
}

/// The queue of write units and the writer connection they run on.
pub(crate) struct GroupWriter {
    queue: Mutex<VecDeque<Arc<Mutex<Job>>>>,
    conn: Mutex<Connection>,
    /// Checkpoints the WAL off the writers' path (file databases only). Declared after
    /// `conn` so the writer closes first and the checkpointer's last round sees every
    /// commit.
    checkpointer: Option<Checkpointer>,
    units: AtomicU64,
    transactions: AtomicU64,
    largest: AtomicU64,
}

/// What the writer of a [`SqliteStore`](super::SqliteStore) has done since it opened: see
/// [`SqliteStore::writer_stats`](super::SqliteStore::writer_stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct WriterStats {
    /// Write units run.
    pub units: u64,
    /// Transactions (commits or rollbacks) they ran in: fewer than `units` when
    /// concurrent callers shared commits.
    pub transactions: u64,
    /// The most units one transaction ran.
    pub largest_group: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Units run outside these locks and panics are caught, so a poisoned lock only means
    // another caller panicked while holding it briefly; the data is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl GroupWriter {
    pub(crate) fn new(conn: Connection, checkpointer: Option<Checkpointer>) -> Self {
        GroupWriter {
            queue: Mutex::new(VecDeque::new()),
            conn: Mutex::new(conn),
            checkpointer,
            units: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            largest: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> WriterStats {
        WriterStats {
            units: self.units.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            largest_group: self.largest.load(Ordering::Relaxed),
        }
    }

    /// Runs `unit` in a transaction, alone or grouped with the units queued with it, and
    /// returns its own outcome once its transaction has committed (or failed).
    pub(crate) fn write(&self, unit: WriteUnit) -> Result<()> {
        let job = Arc::new(Mutex::new(Job {
            unit: Some(unit),
            outcome: None,
            caller: thread::current(),
        }));
        lock(&self.queue).push_back(Arc::clone(&job));
        // Each waiting caller is woken alone (by the leader that ran its unit, or when it
        // reaches the front), never all at once: on a small machine a crowd of callers
        // waking for nothing costs more than the commits themselves. A caller leads only
        // when it is at the front and no leader has claimed its unit yet: a leader claims
        // the units of its group under the queue lock, so a caller woken early (or
        // spuriously) never runs a group twice.
        let mut group = loop {
            {
                let queue = lock(&self.queue);
                let mut own = lock(&job);
                if let Some(outcome) = own.outcome.take() {
                    drop(own);
                    drop(queue);
                    return match outcome {
                        Ok(result) => result,
                        Err(payload) => panic::resume_unwind(payload),
                    };
                }
                let at_front = queue.front().is_some_and(|front| Arc::ptr_eq(front, &job));
                if at_front && own.unit.is_some() {
                    drop(own);
                    break claim(&queue);
                }
            }
            thread::park();
        };
        // Lead this group and, while callers keep queueing, a few more: the leader is
        // already running, where waking the next caller to lead costs a context switch
        // per group. The bound keeps the leader's own wait short.
        for round in 1.. {
            let jobs: Vec<Arc<Mutex<Job>>> = group.iter().map(|(j, _)| Arc::clone(j)).collect();
            self.lead(group);
            let mut queue = lock(&self.queue);
            for j in &jobs {
                lock(j).caller.unpark();
                queue.pop_front();
            }
            if queue.is_empty() {
                break;
            }
            if round == LEAD_ROUNDS {
                if let Some(next) = queue.front() {
                    lock(next).caller.unpark();
                }
                break;
            }
            group = claim(&queue);
        }
        let own = lock(&job).outcome.take().expect("the leader's unit ran");
        match own {
            Ok(result) => result,
            Err(payload) => panic::resume_unwind(payload),
        }
    }

    /// Runs a claimed group in one transaction and stores each caller's outcome.
    fn lead(&self, group: Vec<(Arc<Mutex<Job>>, WriteUnit)>) {
        let (jobs, units): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let n = units.len() as u64;
        let outcomes = self.run_group(units);
        self.units.fetch_add(n, Ordering::Relaxed);
        let done = self.transactions.fetch_add(1, Ordering::Relaxed) + 1;
        self.largest.fetch_max(n, Ordering::Relaxed);
        if let Some(c) = &self.checkpointer {
            c.committed();
            if done % RESTART_EVERY == 0 {
                let conn = lock(&self.conn);
                let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                });
                match result {
                    Ok((log, done)) => {
                        log::trace!("sqlite: writer checkpoint copied {done} of {log} frames")
                    }
                    Err(e) => log::debug!("sqlite: writer checkpoint skipped: {e}"),
                }
            }
        }
        for (j, outcome) in jobs.iter().zip(outcomes) {
            lock(j).outcome = Some(outcome);
        }
    }

    /// Runs `units` in one transaction and returns each one's outcome.
    fn run_group(&self, mut units: Vec<WriteUnit>) -> Vec<Outcome> {
        let conn = lock(&self.conn);
        let n = units.len();
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE") {
            return failed(e, n);
        }
        if n == 1 {
            return vec![run_alone(&conn, &mut units[0])];
        }
        let mut outcomes = Vec::with_capacity(n);
        for unit in &mut units {
            match run_in_savepoint(&conn, unit) {
                Ok(outcome) => outcomes.push(outcome),
                Err(e) => {
                    let _ = exec(&conn, "ROLLBACK");
                    return failed(e, n);
                }
            }
        }
        if let Err(e) = exec(&conn, "COMMIT") {
            let _ = exec(&conn, "ROLLBACK");
            // Nothing of the group is kept: the units that had succeeded fail with the
            // commit's error; refusals keep their own error, which is still true.
            return outcomes
                .into_iter()
                .map(|o| match o {
                    Ok(Ok(())) => Ok(Err(copy(&e))),
                    other => other,
                })
                .collect();
        }
        outcomes
    }
}

/// A unit alone in its transaction: the transaction is its savepoint.
fn run_alone(conn: &Connection, unit: &mut WriteUnit) -> Outcome {
    let outcome = run_unit(conn, unit);
    if matches!(outcome, Ok(Ok(()))) {
        if let Err(e) = exec(conn, "COMMIT") {
            let _ = exec(conn, "ROLLBACK");
            return Ok(Err(e));
        }
    } else if let Err(e) = exec(conn, "ROLLBACK") {
        log::error!("sqlite: rollback after a failed unit failed: {e}");
    }
    outcome
}

/// A unit in a savepoint of a group's transaction, rolled back alone if it fails. An
/// error here is the savepoint's own, and ends the whole group.
fn run_in_savepoint(conn: &Connection, unit: &mut WriteUnit) -> Result<Outcome> {
    exec(conn, "SAVEPOINT unit")?;
    let outcome = run_unit(conn, unit);
    if !matches!(outcome, Ok(Ok(()))) {
        exec(conn, "ROLLBACK TO unit")?;
    }
    exec(conn, "RELEASE unit")?;
    Ok(outcome)
}

/// The same storage failure for each of `n` callers: the first gets the original (with
/// its source), the others a copy.
fn failed(e: Error, n: usize) -> Vec<Outcome> {
    let mut out: Vec<Outcome> = (1..n).map(|_| Ok(Err(copy(&e)))).collect();
    out.insert(0, Ok(Err(e)));
    out
}

/// Takes the units of the jobs at the front of the queue (at most [`MAX_GROUP`]), under
/// the queue lock the caller holds: from here on they belong to this leader.
fn claim(queue: &VecDeque<Arc<Mutex<Job>>>) -> Vec<(Arc<Mutex<Job>>, WriteUnit)> {
    queue
        .iter()
        .take(MAX_GROUP)
        .map_while(|j| {
            let unit = lock(j).unit.take()?;
            Some((Arc::clone(j), unit))
        })
        .collect()
}

/// A storage error again, for every caller of a failed group.
fn copy(e: &Error) -> Error {
    Error::storage(BACKEND, e.to_string())
}

fn run_unit(conn: &Connection, unit: &mut WriteUnit) -> Outcome {
    panic::catch_unwind(AssertUnwindSafe(|| unit(&mut SqliteTx { conn })))
}
