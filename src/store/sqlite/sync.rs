//! Durable commits without holding the writer: the WAL is synced after the commit, by
//! whichever caller needs it first, while the next transaction already runs.
//!
//! Under [`Durability::Full`](super::Durability::Full) SQLite's own `synchronous = FULL`
//! syncs the WAL inside `COMMIT`, while the transaction still holds the write lock: one
//! fsync at a time, and nobody writes during it. The store instead commits with
//! `synchronous = NORMAL` (the WAL written but not synced, which SQLite keeps consistent
//! across a power cut) and then syncs the WAL file itself before it answers any caller
//! of that commit. The next group runs its transaction during the sync, and one sync
//! covers every commit made before it started: the WAL is appended in commit order, so a
//! synced commit has every earlier commit synced with it.
//!
//! Readers can see a commit during the fraction of a millisecond before it is synced; no
//! caller is ever told that a write succeeded before it is durable.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

use super::{BACKEND, lock};

/// Syncs the WAL file of one database for the commits that need it.
pub(crate) struct WalSync {
    wal: PathBuf,
    state: Mutex<State>,
    synced: Condvar,
    /// How long a sync takes, in nanoseconds: a running average (see [`WalSync::typical`]).
    typical_ns: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Commits made so far; a commit's ticket is its number.
    committed: u64,
    /// Every commit up to this one is durable.
    synced: u64,
    /// The highest commit the sync in progress (or the last one) makes durable: a sync
    /// runs while this is above `synced`.
    in_flight: u64,
    /// Syncs run so far.
    syncs: u64,
    /// Checkpoints running (the background one and the writer's may overlap): no sync
    /// starts meanwhile.
    checkpointing: u32,
    /// The WAL, opened by the first sync.
    file: Option<Arc<File>>,
    /// A sync failed: what it said. Nothing is trusted to be durable any more.
    failed: Option<String>,
    /// Threads asleep until a sync or a checkpoint ends (see [`WalSync::wake`]).
    sleepers: u32,
}

impl WalSync {
    /// Syncs the WAL of the database file `db`.
    /// The database file exists by then; its absolute path keeps the WAL found if the
    /// process changes its working directory later, as SQLite's own path does.
    pub(crate) fn new(db: &std::path::Path) -> Self {
        let db = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
        let mut wal = db.into_os_string();
        wal.push("-wal");
        WalSync {
            wal: wal.into(),
            state: Mutex::new(State::default()),
            synced: Condvar::new(),
            typical_ns: AtomicU64::new(0),
        }
    }

    /// Refuses new writes once a sync has failed: the kernel may have dropped pages it
    /// could not write, and a later sync that succeeds would not bring them back.
    pub(crate) fn check(&self) -> Result<()> {
        match &lock(&self.state).failed {
            Some(why) => Err(sync_failed(why)),
            None => Ok(()),
        }
    }

    /// Notes a commit; called right after `COMMIT`, before the writer is released, so
    /// tickets follow the WAL's order. Returns the commit's ticket.
    pub(crate) fn committed(&self) -> u64 {
        let mut state = lock(&self.state);
        state.committed += 1;
        state.committed
    }

    /// The ticket of the latest commit: a unit that wrote nothing but may have read it
    /// waits for it.
    pub(crate) fn latest(&self) -> u64 {
        lock(&self.state).committed
    }

    /// Returns once the commit with `ticket` is durable: at once if a sync that started
    /// after it has finished, or after the sync in progress (and a checkpoint in
    /// progress) and then, if that did not cover it, a sync this caller runs itself.
    /// One sync runs at a time (syncs started beside another measured no faster on the
    /// benchmark machine), and each makes durable every commit made before it started.
    pub(crate) fn wait(&self, ticket: u64) -> Result<()> {
        let mut state = lock(&self.state);
        loop {
            if let Some(why) = &state.failed {
                return Err(sync_failed(why));
            }
            if state.synced >= ticket {
                return Ok(());
            }
            if state.in_flight > state.synced || state.checkpointing > 0 {
                state = self.sleep(state);
                continue;
            }
            let upto = state.committed;
            state.in_flight = upto;
            state.syncs += 1;
            let file = match &state.file {
                Some(f) => Ok(Arc::clone(f)),
                None => File::options()
                    .read(true)
                    .write(true)
                    .open(&self.wal)
                    .map(Arc::new),
            };
            drop(state);
            let started = Instant::now();
            let outcome = file.and_then(|f| f.sync_data().map(|()| f));
            // One sync runs at a time: no sample is lost.
            running_average(&self.typical_ns, started.elapsed(), 8);
            state = lock(&self.state);
            match outcome {
                Ok(f) => {
                    state.file.get_or_insert(f);
                    state.synced = state.synced.max(upto);
                }
                Err(e) => {
                    log::error!(
                        "sqlite: syncing {} failed, refusing further writes: {e}",
                        self.wal.display()
                    );
                    state.failed = Some(e.to_string());
                }
            }
            self.wake(&state);
        }
    }

    /// Sleeps on `synced` until woken, counted in `sleepers` meanwhile.
    fn sleep<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        state.sleepers += 1;
        let mut state = self.synced.wait(state).unwrap_or_else(|e| e.into_inner());
        state.sleepers -= 1;
        state
    }

    /// Wakes the threads asleep in [`WalSync::sleep`], if any: a condition variable
    /// makes a system call for every notification, waiters or not, and a lone caller's
    /// syncs (one per commit) have nobody to wake.
    fn wake(&self, state: &State) {
        if state.sleepers > 0 {
            self.synced.notify_all();
        }
    }

    /// Waits until no sync is running; whether one was.
    ///
    /// (It sleeps on a condition variable. Yielding the processor in a loop instead, to
    /// notice the end of the sync sooner, made one sync in 400 take 4-14 ms instead of
    /// 0.2 ms on the 2-core benchmark machine: the spinning threads delayed the
    /// completion of the disk's own work.)
    pub(crate) fn wait_idle(&self) -> bool {
        let mut state = lock(&self.state);
        let mut waited = false;
        while state.in_flight > state.synced && state.failed.is_none() {
            waited = true;
            state = self.sleep(state);
        }
        waited
    }

    /// Runs `checkpoint` with no sync running beside it. A checkpoint copies the WAL into
    /// the database file and syncs both; a WAL sync that overlapped it waited for all of
    /// that on the disk, and its callers with it (loadgen measured syncs of 8-9 ms, ten
    /// times the usual, and a p99.9 latency of 12 ms instead of 2 ms).
    pub(crate) fn checkpoint<T>(&self, checkpoint: impl FnOnce() -> T) -> T {
        let mut state = lock(&self.state);
        while state.in_flight > state.synced && state.failed.is_none() {
            state = self.sleep(state);
        }
        state.checkpointing += 1;
        drop(state);
        // Counted down even if `checkpoint` panics, or syncs would wait for good.
        struct Done<'a>(&'a WalSync);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                let mut state = lock(&self.0.state);
                state.checkpointing -= 1;
                self.0.wake(&state);
            }
        }
        let _done = Done(self);
        checkpoint()
    }

    /// How long a sync of the WAL takes on this disk: the average of the recent ones,
    /// each weighing an eighth; zero before the first.
    pub(crate) fn typical(&self) -> Duration {
        Duration::from_nanos(self.typical_ns.load(Ordering::Relaxed))
    }

    /// Syncs run so far.
    pub(crate) fn syncs(&self) -> u64 {
        lock(&self.state).syncs
    }
}

/// Folds `sample` into the running average of nanoseconds in `average`, the sample
/// weighing `1 / weight` (the first sample is the average). Without a lock: of two
/// threads folding at once, one sample may be lost.
pub(crate) fn running_average(average: &AtomicU64, sample: Duration, weight: u64) {
    let sample = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX);
    let old = average.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        old - old / weight + sample / weight
    };
    average.store(new, Ordering::Relaxed);
}

fn sync_failed(why: &str) -> Error {
    Error::storage(
        BACKEND,
        format!("the write-ahead log could not be synced ({why}); reopen the store"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `WalSync` for an empty database and WAL in `dir`.
    fn wal_sync(dir: &std::path::Path) -> WalSync {
        let db = dir.join("x.db");
        std::fs::write(&db, b"").unwrap();
        std::fs::write(dir.join("x.db-wal"), b"").unwrap();
        WalSync::new(&db)
    }

    #[test]
    fn the_running_average_starts_at_the_first_sample_and_weighs_the_rest() {
        let average = AtomicU64::new(0);
        running_average(&average, Duration::from_nanos(800), 8);
        assert_eq!(average.load(Ordering::Relaxed), 800);
        // 800 - 100 + 1600 / 8
        running_average(&average, Duration::from_nanos(1600), 8);
        assert_eq!(average.load(Ordering::Relaxed), 900);
        running_average(&average, Duration::from_nanos(900), 8);
        assert_eq!(average.load(Ordering::Relaxed), 900);
    }

    #[test]
    fn the_end_of_a_sync_wakes_the_threads_asleep_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(wal_sync(dir.path()));
        let ticket = s.committed();
        // A sync of `ticket` in progress, as another caller would have started it.
        lock(&s.state).in_flight = ticket;
        let (done, finished) = std::sync::mpsc::channel();
        let idle = {
            let s = Arc::clone(&s);
            let done = done.clone();
            std::thread::spawn(move || done.send(("idle", s.wait_idle())).unwrap())
        };
        let waiter = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || done.send(("durable", s.wait(ticket).is_ok())).unwrap())
        };
        while lock(&s.state).sleepers < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The sync ends, as `wait` ends one.
        {
            let mut state = lock(&s.state);
            state.synced = ticket;
            s.wake(&state);
        }
        let mut got: Vec<_> = (0..2)
            .map(|_| finished.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, [("durable", true), ("idle", true)]);
        idle.join().unwrap();
        waiter.join().unwrap();
        // Nobody asleep any more, and no sync was run by the waiter: the one in progress
        // covered its commit.
        assert_eq!(s.syncs(), 0);
        assert_eq!(lock(&s.state).sleepers, 0);
    }

    #[test]
    fn a_checkpoint_that_ends_inside_another_still_holds_syncs_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = wal_sync(dir.path());
        let ticket = s.committed();
        s.checkpoint(|| {
            s.checkpoint(|| assert_eq!(lock(&s.state).checkpointing, 2));
            // The writer's checkpoint has ended; the background one has not.
            assert_eq!(lock(&s.state).checkpointing, 1);
        });
        assert_eq!(lock(&s.state).checkpointing, 0);
        s.wait(ticket).unwrap();
        assert_eq!((s.syncs(), lock(&s.state).synced), (1, ticket));
    }
}
