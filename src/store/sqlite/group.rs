//! Group commit: the write units of concurrent callers share one transaction and one
//! commit (one fsync under [`Durability::Full`](super::Durability::Full)).
//!
//! Callers queue their units in arrival order. The caller at the front of the queue is
//! the leader: it takes every unit queued behind it (up to a bound), runs them one after
//! the other on the one writer connection, commits once, and hands each caller its own
//! outcome. The next caller in line then leads the next group. A caller alone runs its
//! unit on its own thread: no thread hand-off.
//!
//! A refused unit never fails its neighbours. Most refusals come before the unit writes
//! anything (the services check every rule first), and then there is nothing to undo.
//! A unit that fails after it has written is undone by rolling the transaction back and
//! running the units before it again (units may be run again: see [`WriteUnit`]), each
//! in a savepoint from then on, so one group runs at most twice.
//!
//! Under [`Durability::Full`](super::Durability::Full) the leader syncs the WAL after it
//! has handed the writer to the next leader (see [`WalSync`]): the next group's
//! transaction runs during the sync, and takes in the callers who queue until the sync
//! ends, and then those the sync has just answered when they usually come back within
//! half a sync (see [`GroupWriter::await_returns`]). Under
//! [`Durability::Normal`](super::Durability::Normal) a leader of a shared writer yields
//! the processor a few times before it commits instead (see [`GroupWriter::gather`]),
//! and so does a waiting caller before it sleeps (see [`answered_soon`]).

use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::c_int;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::hooks::Wal;

use crate::error::{Error, Result};
use crate::store::WriteUnit;

use super::checkpoint::{Checkpointed, Checkpointer, checkpoint};
use super::ledger_index::LedgerIndexer;
use super::prepared::PreparedConn;
use super::sync::{WalSync, running_average};
use super::vfs::FRAME_HEADER;
use super::{BACKEND, SqliteTx, lock};

/// The most units one transaction runs.
const MAX_GROUP: usize = 512;

/// The most groups one caller leads in a row before it hands over (when commits need no
/// sync of their own).
const LEAD_ROUNDS: usize = 4;

/// With the background checkpointer, the leader checkpoints too, between two
/// transactions, after this many commits or once the WAL holds this many bytes of frames,
/// whichever comes first: the background thread has copied most frames already, so this
/// short checkpoint catches up completely and the next write starts the WAL over. A
/// checkpoint that runs beside a stream of writes never catches up by itself, and the WAL
/// would grow without bound.
///
/// Under [`Durability::Normal`](super::Durability::Normal) each such pause stops every
/// writer, so it comes rarely (loadgen, 8 threads: every 2,000 commits gave 22,851
/// reservations/s and a p99.9 of 40 ms, every 10,000 gave 32,184/s and 6.9 ms). Under
/// [`Durability::Full`](super::Durability::Full) every sync of a WAL that is still
/// growing also writes the file's new size, and a new WAL grows until its first restart,
/// so it starts over sooner (10,000 commits measured 20% fewer reservations/s than 2,000
/// in 5-second runs). The size bound, which SQLite's WAL hook reports after each commit,
/// is for commits that carry many units and pages: 8 threads reserving over 1,000
/// products under NORMAL commit about 6 units and 13 pages at a time, and 10,000 such
/// commits let the WAL reach 166 MiB, past the 64 MiB at which SQLite cuts it back when
/// it starts over (the file is then cut and grown again every round); with 48 MiB it
/// peaked at 51–56 MiB. The WAL keeps growing until the background checkpointer's round
/// ends, though (the writer's checkpoint is busy meanwhile), and with commits of about
/// 100 pages (50-line carts, release build) a round of 65–140 ms let it pass 64 MiB in
/// one run of four: the bound is 40 MiB, and a writer's checkpoint that found the
/// background one at work tries again at the next commit. A single caller's commits
/// (3 pages) meet the commit bound first, as before; under FULL, a size bound alone
/// (16 MiB, about 5,300 such commits) measured 3–10% slower for one caller in 5-second
/// runs, from the longer first growth. Under NORMAL the background thread prepares the
/// restart from three quarters of either bound on, and the writer restarts once it is
/// ready, usually before the bound (see `checkpoint.rs`).
const RESTART_EVERY: u64 = 10_000;
const RESTART_EVERY_SYNCED: u64 = 2_000;
const RESTART_BYTES: i64 = 40 << 20;
const RESTART_BYTES_SYNCED: i64 = 16 << 20;

/// How many commits the writer waits before it tries again a catch-up checkpoint that
/// could not complete because a reader still needed frames (one that found the
/// background checkpointer at work tries again at the next commit).
const RESTART_RETRY: u64 = 50;

/// The most times a leader lets other threads run before it commits, to take in their
/// units (see [`GroupWriter::gather`]).
const GATHER_ROUNDS: usize = 8;

/// How many times a waiting caller lets other threads run, looking for its outcome,
/// before it sleeps (see [`answered_soon`]).
const SPIN_ROUNDS: usize = 20;

thread_local! {
    /// The frames in the WAL after the last commit this thread ran on a writer, as
    /// SQLite's WAL hook reports them while `COMMIT` runs (see [`record_wal_frames`]);
    /// -1 before a `COMMIT` that writes no frame.
    static WAL_FRAMES: Cell<i64> = const { Cell::new(-1) };

    /// The writer (by address) that ran this thread's last unit, and when its outcome
    /// was handed over: the next unit this thread queues there tells how soon its
    /// callers come back (see [`GroupWriter::note_return`]).
    static ANSWERED: Cell<Option<(usize, Instant)>> = const { Cell::new(None) };
}

/// The writer's WAL hook. SQLite calls it inside `COMMIT`, on the committing thread,
/// with the number of frames now in the WAL; the leader reads it right after.
pub(crate) fn record_wal_frames(_: &Wal, frames: c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(i64::from(frames));
    Ok(())
}

/// What a unit's caller gets back: its result, or the panic it raised.
type Outcome = std::thread::Result<Result<()>>;

struct Job {
    unit: Option<WriteUnit>,
    outcome: Option<Outcome>,
    /// The caller, parked until its outcome is in or it is its turn to lead.
    caller: Thread,
    /// The caller to wake once this one has its outcome (see [`deliver`]).
    wake_next: Option<Thread>,
    /// When the outcome was handed over.
    answered: Option<Instant>,
}

/// The queue of write units and the writer connection they run on.
pub(crate) struct GroupWriter {
    queue: Mutex<VecDeque<Arc<Mutex<Job>>>>,
    conn: Mutex<PreparedConn>,
    /// Syncs the WAL after commits ([`Durability::Full`](super::Durability::Full) on a
    /// file); `None` when a commit is as durable as it gets when `COMMIT` returns.
    sync: Option<Arc<WalSync>>,
    /// Checkpoints the WAL off the writers' path (file databases only). Declared after
    /// `conn` so the writer closes first and the checkpointer's last round sees every
    /// commit.
    checkpointer: Option<Checkpointer>,
    /// Indexes the ledger by product between groups (locked while `conn` is).
    ledger: Mutex<LedgerIndexer>,
    units: AtomicU64,
    transactions: AtomicU64,
    largest: AtomicU64,
    /// Commits, and frames in the WAL, at which the writer checkpoints to start it over.
    restart_commits: u64,
    restart_frames: i64,
    /// Commits since the writer's last complete checkpoint.
    since_restart: AtomicU64,
    /// Commits since a restart became due.
    since_due: AtomicU64,
    /// The writer's last catch-up checkpoint found another one at work.
    restart_busy: AtomicBool,
    /// Units in the last transaction.
    last_group: AtomicUsize,
    /// How long after its outcome a caller typically queues its next unit, in
    /// nanoseconds: a running average (see [`GroupWriter::note_return`]).
    return_ns: AtomicU64,
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
    /// Syncs of the write-ahead log the store ran itself after commits (under
    /// [`Durability::Full`](super::Durability::Full) on a file): fewer than
    /// `transactions` when one sync made several commits durable.
    pub syncs: u64,
}

impl GroupWriter {
    /// A writer on `conn`, whose database has pages of `page_size` bytes, that indexes
    /// the ledger by product every `ledger_batch` movements.
    pub(crate) fn new(
        conn: Connection,
        page_size: i64,
        sync: Option<Arc<WalSync>>,
        checkpointer: Option<Checkpointer>,
        ledger_batch: u64,
    ) -> Self {
        let (restart_commits, restart_bytes) = if sync.is_some() {
            (RESTART_EVERY_SYNCED, RESTART_BYTES_SYNCED)
        } else {
            (RESTART_EVERY, RESTART_BYTES)
        };
        GroupWriter {
            queue: Mutex::new(VecDeque::new()),
            conn: Mutex::new(PreparedConn::writer(conn)),
            sync,
            checkpointer,
            ledger: Mutex::new(LedgerIndexer::new(ledger_batch)),
            units: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            largest: AtomicU64::new(0),
            restart_commits,
            restart_frames: restart_bytes / (page_size.max(512) + FRAME_HEADER as i64),
            since_restart: AtomicU64::new(0),
            since_due: AtomicU64::new(0),
            restart_busy: AtomicBool::new(false),
            last_group: AtomicUsize::new(0),
            return_ns: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> WriterStats {
        WriterStats {
            units: self.units.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            largest_group: self.largest.load(Ordering::Relaxed),
            syncs: self.sync.as_ref().map_or(0, |s| s.syncs()),
        }
    }

    /// Runs `unit` in a transaction, alone or grouped with the units queued with it, and
    /// returns its own outcome once its transaction has committed (and is durable) or
    /// failed.
    pub(crate) fn write(&self, unit: WriteUnit) -> Result<()> {
        let me = self as *const Self as usize;
        if self.sync.is_some()
            && let Some((writer, at)) = ANSWERED.get()
            && writer == me
        {
            self.note_return(at);
        }
        let (outcome, answered) = self.queue_and_run(unit);
        ANSWERED.set(answered.map(|at| (me, at)));
        unwrap(outcome)
    }

    /// Notes that a caller answered at `answered` has queued its next unit now.
    fn note_return(&self, answered: Instant) {
        running_average(&self.return_ns, answered.elapsed(), 16);
    }

    /// [`GroupWriter::write`]'s queueing and waiting: the unit's outcome, and when it was
    /// handed over.
    fn queue_and_run(&self, unit: WriteUnit) -> (Outcome, Option<Instant>) {
        let job = Arc::new(Mutex::new(Job {
            unit: Some(unit),
            outcome: None,
            caller: thread::current(),
            wake_next: None,
            answered: None,
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
                    let next = own.wake_next.take();
                    let answered = own.answered;
                    drop(own);
                    drop(queue);
                    if let Some(next) = next {
                        next.unpark();
                    }
                    return (outcome, answered);
                }
                let at_front = queue.front().is_some_and(|front| Arc::ptr_eq(front, &job));
                if at_front && own.unit.is_some() {
                    drop(own);
                    break claim(&queue, 0);
                }
            }
            let shared = self.last_group.load(Ordering::Relaxed) >= 2;
            if self.sync.is_some() || !shared || !answered_soon(&job) {
                thread::park();
            }
        };
        // Lead this group and, while callers keep queueing and commits need no sync, a
        // few more: the leader is already running, where waking the next caller to lead
        // costs a context switch per group. The bound keeps the leader's own wait short.
        for round in 1.. {
            let (jobs, outcomes, ticket) = self.run_group(group);
            let mut queue = lock(&self.queue);
            for _ in &jobs {
                queue.pop_front();
            }
            let next = queue.front().map(Arc::clone);
            if let Some(ticket) = ticket {
                // The writer is free: the next caller in line leads the next group while
                // this one waits for its commit to be durable. Refusals need not wait.
                drop(queue);
                if let Some(next) = next {
                    lock(&next).caller.unpark();
                }
                let (waiting, refused): (Vec<_>, Vec<_>) = jobs
                    .into_iter()
                    .zip(outcomes)
                    .partition(|(_, outcome)| matches!(outcome, Ok(Ok(()))));
                deliver(refused, &job);
                let durable = self.sync.as_ref().map_or(Ok(()), |s| s.wait(ticket));
                let outcomes = waiting.into_iter().map(|(j, _)| match &durable {
                    Ok(()) => (j, Ok(Ok(()))),
                    Err(e) => (j, Ok(Err(copy(e)))),
                });
                deliver(outcomes.collect(), &job);
                break;
            }
            deliver(jobs.into_iter().zip(outcomes).collect(), &job);
            match next {
                None => break,
                Some(next) if round == LEAD_ROUNDS => {
                    drop(queue);
                    lock(&next).caller.unpark();
                    break;
                }
                Some(_) => group = claim(&queue, 0),
            }
        }
        let mut own = lock(&job);
        let outcome = own.outcome.take().expect("the leader's unit ran");
        (outcome, own.answered)
    }

    /// Runs a claimed group in one transaction. Returns its jobs (more than were given
    /// when callers queued while it waited for a sync), each one's outcome, and the
    /// ticket to wait on before telling a caller that its unit succeeded (see
    /// [`WalSync`]).
    fn run_group(&self, group: Vec<(Arc<Mutex<Job>>, WriteUnit)>) -> GroupOutcome {
        let conn = lock(&self.conn);
        let (mut jobs, units): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let mut batch = Batch {
            units,
            outcomes: Vec::new(),
            wrote: false,
            savepoints: false,
        };
        if let Some(e) = self.sync.as_ref().and_then(|s| s.check().err()) {
            let n = jobs.len();
            return (jobs, failed(e, n), None);
        }
        // Writes are held back (see `row_cache.rs`) only in a transaction that is likely
        // to be shared, as this group or the last one was (a lone unit gains nothing, and
        // holding costs a few hundred instructions), and only when commits need no sync.
        // Under FULL the writer's processor time does not set the pace, syncs and
        // wake-ups do, and held writes waited for the last returning caller, on the path
        // between one sync and the next (loadgen, 8 threads: 2–7% fewer reservations/s
        // over 1,000 products, alternated; within noise on one hot product and with 64).
        let shared = jobs.len() > 1 || self.last_group.load(Ordering::Relaxed) > 1;
        conn.hold_writes(self.sync.is_none() && shared);
        let mut ran = conn.exec("BEGIN IMMEDIATE").and_then(|()| batch.run(&conn));
        if let Some(sync) = &self.sync
            && ran.is_ok()
        {
            let mut queued_before = 0;
            if batch.units.len() < MAX_GROUP && sync.wait_idle() {
                // A sync was running: committing before it ends would only queue another
                // sync behind it. The callers who queued meanwhile join this transaction,
                // and the next sync makes them all durable at once.
                queued_before = jobs.len();
                ran = self.take_in(&conn, &mut jobs, &mut batch).map(drop);
            }
            if ran.is_ok() {
                ran = self.await_returns(&conn, &mut jobs, &mut batch, sync, queued_before);
            }
        }
        if self.sync.is_none() && ran.is_ok() {
            ran = self.gather(&conn, &mut jobs, &mut batch);
        }
        let n = jobs.len();
        self.last_group.store(n, Ordering::Relaxed);
        if let Err(e) = ran {
            let _ = conn.exec("ROLLBACK");
            return (jobs, failed(e, n), None);
        }
        let Batch {
            outcomes, wrote, ..
        } = batch;
        // The WAL hook sets it again if this commit writes frames.
        WAL_FRAMES.set(-1);
        if let Err(e) = conn.exec("COMMIT") {
            let _ = conn.exec("ROLLBACK");
            // Nothing of the group is kept: the units that had succeeded fail with the
            // commit's error; refusals keep their own error, which is still true.
            let outcomes = outcomes
                .into_iter()
                .map(|o| match o {
                    Ok(Ok(())) => Ok(Err(copy(&e))),
                    other => other,
                })
                .collect();
            return (jobs, outcomes, None);
        }
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.units.fetch_add(n as u64, Ordering::Relaxed);
        self.largest.fetch_max(n as u64, Ordering::Relaxed);
        // A unit that succeeded without writing may have read a commit that is not yet
        // durable: it waits for the latest commit too.
        let ticket = self.sync.as_ref().and_then(|s| {
            let succeeded = outcomes.iter().any(|o| matches!(o, Ok(Ok(()))));
            succeeded.then(|| if wrote { s.committed() } else { s.latest() })
        });
        if let Some(c) = &self.checkpointer {
            c.committed();
            // Once due, the checkpoint is tried again every RESTART_RETRY commits until
            // it completes. Under NORMAL, one that found the background checkpointer at
            // work (busy) is tried again at the next commit instead: a lock attempt, and
            // that round may end any moment with most frames copied, while 50 commits of
            // large carts add 5 MiB to the WAL (the WAL-bound test caught both the wait
            // for a whole round and the 50 commits). Under FULL every attempt holds the
            // WAL syncs back while it runs (see `WalSync::checkpoint`), and the bound,
            // 16 MiB, leaves 48 MiB of room: the rhythm stays at 50 commits there.
            let commits = self.since_restart.fetch_add(1, Ordering::Relaxed) + 1;
            let frames = WAL_FRAMES.get();
            let due = commits >= self.restart_commits || frames >= self.restart_frames;
            // Under NORMAL the background thread prepares the restart from three
            // quarters of either bound on, and the writer restarts as soon as it is
            // ready (see `checkpoint.rs`). Under FULL every commit has synced the WAL
            // already, and the rounds would hold the syncs back.
            let normal = self.sync.is_none();
            let near =
                commits >= self.restart_commits / 4 * 3 || frames >= self.restart_frames / 4 * 3;
            if normal && near {
                c.prepare_restart();
            }
            let prepared = normal && c.restart_ready();
            if due && !prepared {
                c.restart_due();
            }
            if due || prepared {
                let since = self.since_due.fetch_add(1, Ordering::Relaxed);
                let busy = normal && self.restart_busy.load(Ordering::Relaxed);
                if since % RESTART_RETRY == 0 || busy {
                    let done = checkpoint(&conn, self.sync.as_deref(), "writer");
                    self.restart_busy
                        .store(done == Checkpointed::Busy, Ordering::Relaxed);
                    if done == Checkpointed::All {
                        c.restarted();
                        self.since_restart.store(0, Ordering::Relaxed);
                        self.since_due.store(0, Ordering::Relaxed);
                    }
                }
            }
        }
        if wrote {
            lock(&self.ledger).after_commit(&conn);
        }
        (jobs, outcomes, ticket)
    }

    /// Under [`Durability::Normal`](super::Durability::Normal) there is no sync to wait
    /// for, and a commit costs about as much as the units it carries. A leader that
    /// commits at once commits for the one or two callers who had queued, while the
    /// callers it has just answered are still waking up to queue their next units. So
    /// when the writer is shared (this group or the last one had more than one unit), the
    /// leader yields the processor before it commits and takes in the units queued
    /// meanwhile, until a round brings none, at most [`GATHER_ROUNDS`] times. A lone
    /// caller never yields.
    fn gather(
        &self,
        conn: &PreparedConn,
        jobs: &mut Vec<Arc<Mutex<Job>>>,
        batch: &mut Batch,
    ) -> Result<()> {
        if jobs.len() < 2 && self.last_group.load(Ordering::Relaxed) < 2 {
            return Ok(());
        }
        for _ in 0..GATHER_ROUNDS {
            if jobs.len() >= MAX_GROUP {
                break;
            }
            thread::yield_now();
            if !self.take_in(conn, jobs, batch)? {
                break;
            }
        }
        Ok(())
    }

    /// Under [`Durability::Full`](super::Durability::Full), the callers the last sync
    /// has just answered are on their way back with their next units. A leader that
    /// commits before they queue sends them to the sync after the next one: with a
    /// steady set of callers the groups then alternate, each carrying half of them, and
    /// each caller waits two syncs per write (loadgen, 8 threads: 4.3 units per commit,
    /// p50 0.65 ms for syncs of 0.3 ms). So when they usually come back within half a
    /// sync (see [`return_wait`]), the leader yields the processor and takes in units
    /// until as many have queued as the last group carried, beside the `queued_before`
    /// the group had when the sync ended, or until a sync's time has passed.
    ///
    /// Callers that come back after a pause of their own (requests arriving one by one)
    /// keep the average far above half a sync, and their leader commits at once: a
    /// leader that waited for them would add that wait to every write.
    fn await_returns(
        &self,
        conn: &PreparedConn,
        jobs: &mut Vec<Arc<Mutex<Job>>>,
        batch: &mut Batch,
        sync: &WalSync,
        queued_before: usize,
    ) -> Result<()> {
        let Some((target, wait)) = return_wait(
            self.last_group.load(Ordering::Relaxed),
            queued_before,
            Duration::from_nanos(self.return_ns.load(Ordering::Relaxed)),
            sync.typical(),
        ) else {
            return Ok(());
        };
        let started = Instant::now();
        while jobs.len() < target && started.elapsed() < wait {
            thread::yield_now();
            self.take_in(conn, jobs, batch)?;
        }
        Ok(())
    }

    /// Takes the units queued behind the group into its open transaction and runs them;
    /// whether there were any.
    fn take_in(
        &self,
        conn: &PreparedConn,
        jobs: &mut Vec<Arc<Mutex<Job>>>,
        batch: &mut Batch,
    ) -> Result<bool> {
        let more = claim(&lock(&self.queue), jobs.len());
        if more.is_empty() {
            return Ok(false);
        }
        for (j, unit) in more {
            jobs.push(j);
            batch.units.push(unit);
        }
        batch.run(conn)?;
        Ok(true)
    }
}

/// What [`GroupWriter::run_group`] hands back.
type GroupOutcome = (Vec<Arc<Mutex<Job>>>, Vec<Outcome>, Option<u64>);

/// The units of one open transaction and what they did.
struct Batch {
    units: Vec<WriteUnit>,
    /// The outcomes of the units run so far, in order.
    outcomes: Vec<Outcome>,
    /// Whether a unit kept a write.
    wrote: bool,
    /// Set once a unit failed after writing: from then on each unit runs in a savepoint.
    savepoints: bool,
}

impl Batch {
    /// Runs the units not run yet, in the open transaction. An error here is the
    /// transaction's own, and ends the whole group.
    fn run(&mut self, conn: &PreparedConn) -> Result<()> {
        while self.outcomes.len() < self.units.len() {
            let i = self.outcomes.len();
            if self.savepoints {
                let (outcome, changed) = run_in_savepoint(conn, &mut self.units[i])?;
                self.wrote |= changed;
                self.outcomes.push(outcome);
                continue;
            }
            let (outcome, changed) = run_unit(conn, &mut self.units[i]);
            if changed && !matches!(outcome, Ok(Ok(()))) {
                // Failed after writing: only rolling back undoes it, and the units before
                // it with it. They run again, each in a savepoint from now on.
                conn.exec("ROLLBACK")?;
                conn.exec("BEGIN IMMEDIATE")?;
                self.savepoints = true;
                self.outcomes.clear();
                self.wrote = false;
                for unit in &mut self.units[..i] {
                    let (outcome, changed) = run_in_savepoint(conn, unit)?;
                    self.wrote |= changed;
                    self.outcomes.push(outcome);
                }
                self.outcomes.push(outcome);
                continue;
            }
            self.wrote |= changed;
            self.outcomes.push(outcome);
        }
        Ok(())
    }
}

/// A unit in a savepoint, rolled back alone if it fails; whether it kept a write. An
/// error here is the savepoint's own.
fn run_in_savepoint(conn: &PreparedConn, unit: &mut WriteUnit) -> Result<(Outcome, bool)> {
    conn.exec("SAVEPOINT unit")?;
    let (outcome, mut changed) = run_unit(conn, unit);
    if !matches!(outcome, Ok(Ok(()))) {
        conn.exec("ROLLBACK TO unit")?;
        changed = false;
    }
    conn.exec("RELEASE unit")?;
    Ok((outcome, changed))
}

/// Runs a unit, catching its panic; whether it changed any row.
fn run_unit(conn: &PreparedConn, unit: &mut WriteUnit) -> (Outcome, bool) {
    let mut tx = SqliteTx::new(conn);
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| unit(&mut tx)));
    (outcome, tx.wrote())
}

/// Hands each job its outcome and wakes their callers (but the leader's own, `own`) in
/// a chain: the leader wakes the first, and each woken caller wakes the next. The leader
/// makes one wake-up call instead of one per caller, and is preempted less by the
/// callers it wakes, which run on the other cores meanwhile.
fn deliver(jobs: Vec<(Arc<Mutex<Job>>, Outcome)>, own: &Arc<Mutex<Job>>) {
    let mut next: Option<Thread> = None;
    let now = Instant::now();
    for (j, outcome) in jobs.into_iter().rev() {
        let mut job = lock(&j);
        job.outcome = Some(outcome);
        job.answered = Some(now);
        if !Arc::ptr_eq(&j, own) {
            job.wake_next = next.take();
            next = Some(job.caller.clone());
        }
    }
    if let Some(first) = next {
        first.unpark();
    }
}

/// Whether a leader under [`Durability::Full`](super::Durability::Full) waits for the
/// `answered` callers of the last group to queue again, given the `queued_before` units
/// its own group had when the last sync ended, how soon answered callers come back
/// (`returns_in`) and how long a sync takes (`sync`): the group size to wait for, and
/// the longest wait. `None` when the last group was one caller (nobody else to wait
/// for), when callers come back later than half a sync (a wait would only delay this
/// group), or before the first sync has been timed.
fn return_wait(
    answered: usize,
    queued_before: usize,
    returns_in: Duration,
    sync: Duration,
) -> Option<(usize, Duration)> {
    (answered >= 2 && !sync.is_zero() && returns_in <= sync / 2)
        .then(|| ((queued_before + answered).min(MAX_GROUP), sync))
}

/// Under [`Durability::Normal`](super::Durability::Normal) a group commits within tens
/// of microseconds, sooner than a sleeping thread is woken on a small (virtual) machine:
/// a caller that sleeps at once makes the leader commit without it, and it comes back
/// for a later group. So, when groups carry more than one unit (as for
/// [`GroupWriter::gather`]), a waiting caller first yields the processor a few times and
/// looks for its outcome; whether it found it. Yielding costs little when other threads
/// want the processor, and is bounded when none do. (loadgen, 8 threads: 4.8–5.4 → 7.5–7.6
/// units per commit and 9–21% more reservations/s, in alternated pairs run in either
/// order.) Under [`Durability::Full`](super::Durability::Full) callers wait for a sync,
/// far longer than this, and spinning threads there take processor time from the leader
/// and from the disk's completion (64 threads: 9% fewer reservations/s); they sleep at
/// once.
fn answered_soon(job: &Mutex<Job>) -> bool {
    for _ in 0..SPIN_ROUNDS {
        thread::yield_now();
        if lock(job).outcome.is_some() {
            return true;
        }
    }
    false
}

fn unwrap(outcome: Outcome) -> Result<()> {
    match outcome {
        Ok(result) => result,
        Err(payload) => panic::resume_unwind(payload),
    }
}

/// The same storage failure for each of `n` callers: the first gets the original (with
/// its source), the others a copy.
fn failed(e: Error, n: usize) -> Vec<Outcome> {
    let mut out: Vec<Outcome> = (1..n).map(|_| Ok(Err(copy(&e)))).collect();
    out.insert(0, Ok(Err(e)));
    out
}

/// Takes the units of the jobs at the front of the queue after the first `skip` (which
/// the leader has taken already), up to [`MAX_GROUP`] in all, under the queue lock the
/// caller holds: from here on they belong to this leader.
fn claim(queue: &VecDeque<Arc<Mutex<Job>>>, skip: usize) -> Vec<(Arc<Mutex<Job>>, WriteUnit)> {
    queue
        .iter()
        .skip(skip)
        .take(MAX_GROUP.saturating_sub(skip))
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

#[cfg(test)]
mod tests {
    use super::*;

    const SYNC: Duration = Duration::from_micros(300);

    #[test]
    fn a_leader_waits_for_callers_that_come_back_within_half_a_sync() {
        let soon = Duration::from_micros(60);
        // The groups alternated: 4 queued during the sync, 4 are coming back.
        assert_eq!(return_wait(4, 4, soon, SYNC), Some((8, SYNC)));
        // The last group carried everyone: its callers are the ones coming back.
        assert_eq!(return_wait(8, 0, soon, SYNC), Some((8, SYNC)));
        assert_eq!(return_wait(2, 0, SYNC / 2, SYNC), Some((2, SYNC)));
        assert_eq!(return_wait(500, 100, soon, SYNC), Some((MAX_GROUP, SYNC)));
    }

    #[test]
    fn a_leader_commits_at_once_when_nobody_is_coming_back_soon() {
        let soon = Duration::from_micros(60);
        // A lone caller: nobody else to wait for.
        assert_eq!(return_wait(1, 0, soon, SYNC), None);
        assert_eq!(return_wait(0, 3, soon, SYNC), None);
        // Callers that pause between writes.
        let later = SYNC / 2 + Duration::from_nanos(1);
        assert_eq!(return_wait(8, 0, later, SYNC), None);
        assert_eq!(return_wait(8, 0, Duration::from_millis(2), SYNC), None);
        // No sync timed yet.
        assert_eq!(return_wait(8, 0, Duration::ZERO, Duration::ZERO), None);
    }
}
