//! [`SqliteStore`]: the default backend, on a bundled SQLite file.

mod checkpoint;
mod group;
mod ledger_index;
mod pcache;
mod prepared;
mod row_cache;
mod schema;
mod sync;
mod vfs;

use prepared::{PreparedConn, PreparedManager};

pub use group::WriterStats;

use std::cell::Cell;
use std::ffi::CStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, ToSql, params};

use crate::error::{Error, Result};
use crate::model::{
    CounterDelta, Hold, HoldId, HoldStatus, KindTotal, MovementKind, MovementQuery, NewHold,
    NewMovement, NewOrder, Order, OrderId, OrderStatus, Payment, PaymentStatus, Product, ProductId,
    StockCount, StockCountRecord, StockLevels, StockMovement,
};
use crate::store::{LedgerBalance, ReadUnit, StockRead, StockRow, StockStore, StockTx, WriteUnit};

const BACKEND: &str = "sqlite";

pub(crate) fn sql_err(e: rusqlite::Error) -> Error {
    Error::storage(BACKEND, e)
}

/// Locks `m`. Units run outside the store's locks and their panics are caught, so a
/// poisoned lock only means another caller panicked while holding it briefly; the data
/// is still consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How much a commit that has returned can lose if the machine loses power.
///
/// Both settings keep the database file consistent; they differ in how many of the last
/// commits may be lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Durability {
    /// Every commit is on disk (fsync) before the call returns. Nothing that returned
    /// `Ok` is lost to a process crash, an OS crash or a power cut. The default.
    ///
    /// The store syncs the WAL itself right after `COMMIT` (with SQLite's
    /// `synchronous = NORMAL`, which keeps the file consistent) rather than let SQLite
    /// sync inside `COMMIT`: the next group of writers runs its transaction during the
    /// sync, and one sync makes every commit before it durable. A reader may see a
    /// commit for the fraction of a millisecond before its sync ends; a writer is told
    /// `Ok` only after. If a sync fails, the store refuses every later write with
    /// [`Error::Storage`]: reopen it. When several threads write one after the other,
    /// the one committing for them waits, for at most one sync's time, for the callers
    /// the last sync answered to bring their next writes into the same commit; it does
    /// so only while callers usually come back within half a sync, so callers that
    /// pause between writes are never kept waiting for each other.
    #[default]
    Full,
    /// `PRAGMA synchronous = NORMAL`: commits survive a crash of the application, but
    /// the last ones before an OS crash or power cut may roll back (the WAL is synced at
    /// checkpoints, not at each commit). Several times faster per commit. When several
    /// threads write, the one committing for them yields the processor a few times
    /// before `COMMIT` while that brings more of their writes into the same transaction,
    /// and a thread waiting for its write yields a few times, looking for its outcome,
    /// before it sleeps.
    Normal,
}

/// Which processes may use a database file while a [`SqliteStore`] has it open.
///
/// ```
/// use stockroom::{Sharing, SqliteConfig};
///
/// let config = SqliteConfig::default().with_sharing(Sharing::ThisProcess);
/// assert_eq!(config.sharing, Sharing::ThisProcess);
/// assert_eq!(SqliteConfig::default().sharing, Sharing::Processes);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Sharing {
    /// Any number of processes, each with its own stores and other SQLite connections,
    /// as SQLite allows. The default. The WAL's index lives in a file every process
    /// maps (`-shm`), and each transaction takes and drops SQLite's locks on it: six
    /// `fcntl` calls per write, and two per read.
    #[default]
    Processes,
    /// This process only. The store's connections hold a lock on the database file that
    /// shuts every other process out for as long as the store (or another one of this
    /// process on the same file) is open, and they keep the WAL's index in the
    /// process's memory: transactions take no file locks at all. This is SQLite's own
    /// `unix-excl` VFS (on Unix), under the store's `stockroom-wal` layer.
    ///
    /// A lone caller reserves about 30% more per second under [`Durability::Normal`]
    /// and 7–11% more under [`Durability::Full`], and reads take half the time (see
    /// BENCHMARKS.md). On a platform without `unix-excl` the store does not open. Another
    /// process that opens the file, with stockroom or any SQLite program, waits for its
    /// busy timeout and fails; a store reports [`Error::Storage`] saying that another
    /// process holds the file. Crash safety is the same: the index is rebuilt from the
    /// WAL when the file is opened again.
    ///
    /// Within the process, open every store on the file with this setting, and any
    /// other SQLite connection to it through `unix-excl` too (with `rusqlite`, the URI
    /// `file:/path/to/stock.db?vfs=unix-excl` and `OpenFlags::SQLITE_OPEN_URI`): a
    /// connection through SQLite's default VFS takes real file locks, and one that
    /// unlocks the file last would give up the process's lock. A store in memory ignores
    /// the setting.
    ThisProcess,
}

impl Sharing {
    /// The SQLite VFS that the store's connections open a file with: `None` for the
    /// default one.
    fn vfs(self) -> Option<&'static CStr> {
        match self {
            Sharing::Processes => None,
            Sharing::ThisProcess => Some(c"unix-excl"),
        }
    }
}

/// Settings of a [`SqliteStore`].
///
/// ```
/// use std::time::Duration;
/// use stockroom::{Durability, SqliteConfig};
///
/// let config = SqliteConfig::default()
///     .with_durability(Durability::Normal)
///     .with_busy_timeout(Duration::from_secs(2));
/// assert_eq!(config.durability, Durability::Normal);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct SqliteConfig {
    /// What a power cut can lose: [`Durability::Full`] by default.
    pub durability: Durability,
    /// How long a writer waits for another process that holds the write lock before it
    /// reports a storage error: 10 seconds by default.
    pub busy_timeout: Duration,
    /// How many pooled connections serve reads: 4 by default.
    pub read_pool_size: u32,
    /// How many ledger movements the writer lets accumulate before it indexes them by
    /// product, in bulk: 16,384 by default.
    ///
    /// Movements are appended without an index by product; the writer catches up
    /// after its commits in short steps (it reads 128 movements, or inserts 128 entries
    /// in a short transaction, per step), sorted by product and packed up to 48
    /// movements of one product to a row. Reading a product's
    /// movements ([`StockService::movements`](crate::StockService::movements)) or the
    /// metrics ([`StockService::metrics`](crate::StockService::metrics)) scans the
    /// movements not indexed yet: about this many, and up to half as many again while a
    /// catch-up runs. A smaller batch makes those reads cheaper and every write dearer.
    pub ledger_index_batch: u64,
    /// Which processes may use the file while the store has it open:
    /// [`Sharing::Processes`] by default.
    pub sharing: Sharing,
}

impl SqliteConfig {
    /// The same settings with another durability.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The same settings with another busy timeout.
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The same settings with another read pool size (at least 1).
    pub fn with_read_pool_size(mut self, size: u32) -> Self {
        self.read_pool_size = size.max(1);
        self
    }

    /// The same settings with another ledger index batch (at least 1): see
    /// [`ledger_index_batch`](SqliteConfig::ledger_index_batch).
    pub fn with_ledger_index_batch(mut self, movements: u64) -> Self {
        self.ledger_index_batch = movements.max(1);
        self
    }

    /// The same settings with another sharing of the file between processes: see
    /// [`Sharing`].
    pub fn with_sharing(mut self, sharing: Sharing) -> Self {
        self.sharing = sharing;
        self
    }
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            durability: Durability::Full,
            busy_timeout: Duration::from_secs(10),
            read_pool_size: 4,
            ledger_index_batch: 16_384,
            sharing: Sharing::Processes,
        }
    }
}

/// A store on a SQLite database file (or one in memory), with SQLite bundled.
///
/// - Write units run in `BEGIN IMMEDIATE` transactions on the store's one writer
///   connection: writers of one process queue for it instead of racing for SQLite's lock,
///   and a busy error cannot come from a deferred transaction upgrading to a write. The
///   units queued while one transaction runs share the next one and its commit (group
///   commit; see [`writer_stats`](SqliteStore::writer_stats)); each succeeds or fails on
///   its own. Several processes may share one file; they wait for each other up to
///   [`SqliteConfig::busy_timeout`]. A process that needs no other to share it can keep
///   the file to itself and skip SQLite's file locks, with [`Sharing::ThisProcess`].
/// - The writer keeps a copy of the stock rows it has read or written lately (up to
///   8,192), so a reservation writes its row without reading it first. The copies are
///   dropped at every rollback, and whenever SQLite reports, as a transaction begins,
///   that another connection has written the file since the writer's last commit:
///   another process, another store, or any SQLite program changing rows behind the
///   library. Under [`Durability::Normal`], a row that several units of one group write
///   (a hot product) is written to SQLite once, with its last counters, and the group's
///   ledger movements a few per statement, before the commit or any other statement
///   that could see the difference.
/// - The file uses the WAL journal, so reads (served by a pool of read-only connections)
///   never wait for writers. The writer opens the file through a small VFS of the
///   store's own, named `stockroom-wal`, over SQLite's default one: it hands each
///   transaction's WAL frames to the file in one write, before SQLite publishes the
///   commit, where SQLite alone writes two per page. The file stays an ordinary SQLite
///   database that any SQLite program can open, even while the store has it open
///   (unless the store keeps it to its process, with [`Sharing::ThisProcess`]).
/// - **Process-wide:** if SQLite has not started yet when the first store of a process
///   opens, that store puts a thin layer over SQLite's page cache, which SQLite
///   configures for the whole process (its `SQLITE_CONFIG_PCACHE2`). The layer passes
///   every call to SQLite's own cache and changes one thing: when SQLite renumbers
///   b-tree pages after a split it moves one page, for a moment, to a page number far
///   past the end of the database, and that mark made SQLite's cache scan its whole
///   hash table at the end of the transaction; the layer keeps that page just past the
///   end instead. Every SQLite connection the process opens afterwards uses it. Open
///   any SQLite connection before the first store to keep SQLite's cache as it is (the
///   store works the same, a little slower); as with any SQLite configuration, no other
///   thread should be starting SQLite while that first store opens.
/// - The schema carries `CHECK` constraints (no counter below zero) and foreign keys, and
///   is migrated on open; a file written by a newer version is refused with
///   [`Error::SchemaTooNew`].
///
/// ```
/// use std::sync::Arc;
/// use stockroom::{NewProduct, ProductId, SqliteStore, StockService};
///
/// let dir = tempfile::tempdir()?;
/// let store = SqliteStore::open(dir.path().join("stock.db"))?;
/// let stock = StockService::new(Arc::new(store));
/// stock.create_product(NewProduct::sized(ProductId(7), "Shirt", [("M", 5)]))?;
/// stock.reserve_stock(ProductId(7), 2, Some("M"))?;
/// assert_eq!(stock.get_stock_info(ProductId(7), Some("M"))?.reserved_quantity, 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SqliteStore {
    writer: group::GroupWriter,
    readers: r2d2::Pool<PreparedManager>,
    location: Location,
    config: SqliteConfig,
}

#[derive(Debug, Clone)]
enum Location {
    File(PathBuf),
    Memory(String),
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.location)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating it if needed) the database file at `path` with the default
    /// [`SqliteConfig`].
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] if the file cannot be opened or migrated, or if another process
    /// keeps it locked past the busy timeout (see [`Sharing`]); [`Error::SchemaTooNew`] if
    /// a newer version of stockroom wrote it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteConfig::default())
    }

    /// Opens (creating it if needed) the database file at `path`.
    ///
    /// # Errors
    ///
    /// As [`open`](SqliteStore::open).
    pub fn open_with(path: impl AsRef<Path>, config: SqliteConfig) -> Result<Self> {
        let path = path.as_ref();
        let sharing = config.sharing;
        Self::build(Location::File(path.to_path_buf()), config).map_err(|e| {
            if !is_busy(&e) {
                return e;
            }
            let why = match sharing {
                Sharing::ThisProcess => format!(
                    "{} is open in another process, and a store with Sharing::ThisProcess \
                     needs it to itself",
                    path.display()
                ),
                Sharing::Processes => format!(
                    "{} stayed locked by another process past the busy timeout (a store \
                     with Sharing::ThisProcess keeps its file locked while it is open)",
                    path.display()
                ),
            };
            Error::storage(BACKEND, format!("{why}: {e}"))
        })
    }

    /// A private database in memory, shared by the store's writer and its read pool, gone
    /// when the store is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] if SQLite cannot allocate it.
    pub fn open_in_memory() -> Result<Self> {
        Self::open_in_memory_with(SqliteConfig::default())
    }

    /// As [`open_in_memory`](SqliteStore::open_in_memory), with settings.
    ///
    /// # Errors
    ///
    /// As [`open_in_memory`](SqliteStore::open_in_memory).
    pub fn open_in_memory_with(config: SqliteConfig) -> Result<Self> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| Error::storage(BACKEND, e.to_string()))?;
        let name: String = id.iter().map(|b| format!("{b:02x}")).collect();
        // The memdb VFS shares one database between every connection that opens the same
        // name starting with '/', and frees it when the last one closes.
        Self::build(
            Location::Memory(format!("file:/stockroom-{name}?vfs=memdb")),
            config,
        )
    }

    /// Counters of the writer: units run, transactions they shared, the largest group.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use stockroom::{NewProduct, ProductId, SqliteStore, StockService};
    /// let store = Arc::new(SqliteStore::open_in_memory()?);
    /// let stock = StockService::new(store.clone());
    /// stock.create_product(NewProduct::plain(ProductId(1), "Mug", 5))?;
    /// stock.reserve_stock(ProductId(1), 1, None)?;
    /// assert_eq!(store.writer_stats().units, 2);
    /// # Ok::<(), stockroom::Error>(())
    /// ```
    pub fn writer_stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// The settings this store was opened with.
    pub fn config(&self) -> &SqliteConfig {
        &self.config
    }

    /// The database file, or `None` for a store in memory.
    pub fn path(&self) -> Option<&Path> {
        match &self.location {
            Location::File(p) => Some(p),
            Location::Memory(_) => None,
        }
    }

    fn build(location: Location, config: SqliteConfig) -> Result<Self> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let target = match &location {
            Location::File(p) => p.to_string_lossy().into_owned(),
            Location::Memory(uri) => uri.clone(),
        };
        let in_memory = matches!(location, Location::Memory(_));
        // Before SQLite starts, if it has not: see `pcache.rs`.
        pcache::install();

        // The writer hands each transaction's WAL frames to the file in one write instead
        // of two per page (see `vfs.rs`); readers and the checkpointer only read the WAL.
        let base_vfs = config.sharing.vfs();
        let mut writer = match &location {
            Location::File(p) => match vfs::register(config.sharing) {
                Ok(layer) => Connection::open_with_flags_and_vfs(p, flags, layer),
                Err(why) => {
                    log::warn!("sqlite: writing the WAL frame by frame: {why}");
                    open_file(p, flags, base_vfs)
                }
            },
            Location::Memory(uri) => Connection::open_with_flags(uri, flags),
        }
        .map_err(sql_err)?;
        writer.busy_timeout(config.busy_timeout).map_err(sql_err)?;
        // Small pages for a new file: a reservation rewrites a few small rows in a few
        // b-trees, and every page it touches is written whole to the WAL at commit.
        // 1 KiB pages write a quarter of the bytes of the 4 KiB default; the loadgen
        // example measured a third more reservations per second with them. An existing
        // file keeps the page size it was created with.
        writer
            .execute_batch("PRAGMA page_size = 1024")
            .map_err(sql_err)?;
        if !in_memory {
            // Switching a new file to WAL needs it to itself, and SQLite reports busy
            // here without calling the busy handler when another process or thread is
            // opening the same file: wait and retry, within the busy timeout.
            let mode: String = retry_busy(config.busy_timeout, || {
                writer
                    .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                    .map_err(sql_err)
            })?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Error::storage(
                    BACKEND,
                    format!("could not switch {target} to WAL (journal mode is {mode})"),
                ));
            }
        }
        // Under FULL the WAL is synced after each commit by the store itself (see
        // `sync.rs`), not inside `COMMIT` by SQLite: the next transaction runs during the
        // sync. SQLite's NORMAL keeps the file consistent across a power cut either way.
        // The writer keeps up to 16 MiB of pages (SQLite's default is 2 MiB): a cleanup
        // batch of 500 orders among a million dirties about a thousand pages of indexes
        // spread over the file (criterion: 10,000 expired among 1,000,000 orders took
        // 1.89x the time among 10,000 with 2 MiB, 1.58x with 16 MiB).
        writer
            .execute_batch(
                "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
                 PRAGMA journal_size_limit = 67108864; PRAGMA cache_size = -16384;",
            )
            .map_err(sql_err)?;
        writer.set_prepared_statement_cache_capacity(64);
        retry_busy(config.busy_timeout, || schema::migrate(&mut writer))?;

        let busy_timeout = config.busy_timeout;
        let readers_target = match (&location, base_vfs) {
            (Location::File(p), Some(base)) => file_uri(p, base),
            _ => target.clone(),
        };
        let manager = SqliteConnectionManager::file(&readers_target)
            .with_flags(flags)
            .with_init(move |c| {
                c.busy_timeout(busy_timeout)?;
                c.execute_batch("PRAGMA foreign_keys = ON; PRAGMA query_only = ON;")?;
                c.set_prepared_statement_cache_capacity(64);
                Ok(())
            });
        let readers = r2d2::Pool::builder()
            .max_size(config.read_pool_size.max(1))
            .min_idle(Some(0))
            .build(PreparedManager(manager))
            .map_err(|e| Error::storage(BACKEND, e))?;

        // Under FULL the store syncs the WAL itself after each commit (see `sync.rs`).
        let wal_sync = match &location {
            Location::File(path) if config.durability == Durability::Full => {
                Some(Arc::new(sync::WalSync::new(path)))
            }
            _ => None,
        };
        // SQLite's automatic checkpoint runs in the commit that fills the WAL: a stall
        // for one unlucky group. A thread of its own checkpoints instead (see
        // `checkpoint.rs`); under FULL it never runs beside a WAL sync, whose callers
        // would wait for the checkpoint's writes too.
        let checkpointer = match &location {
            Location::File(path) => {
                writer
                    .execute_batch("PRAGMA wal_autocheckpoint = 0")
                    .map_err(sql_err)?;
                writer.wal_hook(Some(group::record_wal_frames));
                Some(
                    checkpoint::Checkpointer::start(
                        path,
                        flags,
                        base_vfs,
                        config.busy_timeout,
                        wal_sync.clone(),
                    )
                    .map_err(sql_err)?,
                )
            }
            _ => None,
        };
        let page_size: i64 = writer
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sql_err)?;
        log::debug!("sqlite: opened {target} ({config:?})");
        Ok(SqliteStore {
            writer: group::GroupWriter::new(
                writer,
                page_size,
                wal_sync,
                checkpointer,
                config.ledger_index_batch,
            ),
            readers,
            location,
            config,
        })
    }
}

/// Whether `e` is SQLite's busy or locked condition, which waiting can resolve.
pub(crate) fn is_busy(e: &Error) -> bool {
    let Error::Storage { source, .. } = e else {
        return false;
    };
    matches!(
        source.downcast_ref::<rusqlite::Error>(),
        Some(rusqlite::Error::SqliteFailure(f, _))
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Opens the file at `path` through the SQLite VFS named `vfs`, or the default one.
pub(crate) fn open_file(
    path: &Path,
    flags: OpenFlags,
    vfs: Option<&CStr>,
) -> rusqlite::Result<Connection> {
    match vfs {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs),
        None => Connection::open_with_flags(path, flags),
    }
}

/// The URI that opens the file at `path` through the SQLite VFS named `vfs`, for
/// openers that take a file name only. Every byte of the path but a few safe ones is
/// escaped (`?` and `#` would end it, `%` starts an escape), and an absolute path comes
/// after an empty authority (`file:///…`), so that one starting with `//` is not taken
/// for a host.
fn file_uri(path: &Path, vfs: &CStr) -> String {
    let bytes = path.as_os_str().as_encoded_bytes();
    let mut uri = String::from(if bytes.first() == Some(&b'/') {
        "file://"
    } else {
        "file:"
    });
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?vfs=");
    uri.push_str(&vfs.to_string_lossy());
    uri
}

/// Runs `step` again while it fails busy, for up to `timeout`, sleeping a little longer
/// each time.
fn retry_busy<T>(timeout: Duration, mut step: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match step() {
            Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                log::debug!("sqlite: busy while opening, retrying in {pause:?}");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

impl StockStore for SqliteStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn write(&self, unit: WriteUnit) -> Result<()> {
        self.writer.write(unit)
    }

    fn read(&self, unit: ReadUnit<'_>) -> Result<()> {
        let conn = self.readers.get().map_err(|e| Error::storage(BACKEND, e))?;
        conn.exec("BEGIN")?;
        let outcome = unit(&mut SqliteTx::new(&conn));
        // A read transaction has nothing to keep; end it whatever the outcome.
        let end = conn.exec("ROLLBACK");
        outcome.and(end)
    }
}

/// A unit's view of the database: the writer inside `BEGIN IMMEDIATE`, or a pooled reader
/// inside a read transaction.
pub(crate) struct SqliteTx<'c> {
    conn: &'c PreparedConn,
    /// Whether a statement of this unit changed a row.
    wrote: Cell<bool>,
}

impl<'c> SqliteTx<'c> {
    pub(crate) fn new(conn: &'c PreparedConn) -> Self {
        SqliteTx {
            conn,
            wrote: Cell::new(false),
        }
    }

    /// Whether a statement of this unit changed a row: a unit that fails without having
    /// written needs no rollback.
    pub(crate) fn wrote(&self) -> bool {
        self.wrote.get()
    }
}

fn to_db(value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::storage(BACKEND, format!("{value} does not fit")))
}

/// A stock row's counters as stored: available, reserved, sold.
fn levels_db(levels: StockLevels) -> Result<[i64; 3]> {
    Ok([
        to_db(levels.available)?,
        to_db(levels.reserved)?,
        to_db(levels.sold)?,
    ])
}

/// The write of a stock row's counters, by product and size (one statement, whether a
/// unit writes the row or the writer writes a row it held back).
static UPDATE_STOCK: &str = "UPDATE stock SET available = ?3, reserved = ?4, sold = ?5 \
                             WHERE product_id = ?1 AND size = ?2";

fn size_db(size: Option<&str>) -> &str {
    size.unwrap_or("")
}

fn size_from_db(size: String) -> Option<String> {
    (!size.is_empty()).then_some(size)
}

fn time_db(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn column_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Integer, Box::new(e))
    })
}

fn column_time(row: &Row<'_>, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    let v: i64 = row.get(idx)?;
    DateTime::from_timestamp_micros(v).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Integer,
            format!("timestamp {v} out of range").into(),
        )
    })
}

fn column_opt_time(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    match row.get::<_, Option<i64>>(idx)? {
        None => Ok(None),
        Some(_) => column_time(row, idx).map(Some),
    }
}

fn bad_text(idx: usize, what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        idx,
        rusqlite::types::Type::Text,
        format!("unknown {what} {v:?}").into(),
    )
}

fn column_order_status(row: &Row<'_>, idx: usize) -> rusqlite::Result<OrderStatus> {
    let v: String = row.get(idx)?;
    OrderStatus::parse(&v).ok_or_else(|| bad_text(idx, "order status", &v))
}

fn column_payment_status(row: &Row<'_>, idx: usize) -> rusqlite::Result<PaymentStatus> {
    let v: String = row.get(idx)?;
    PaymentStatus::parse(&v).ok_or_else(|| bad_text(idx, "payment status", &v))
}

fn column_kind(row: &Row<'_>, idx: usize) -> rusqlite::Result<MovementKind> {
    let v: String = row.get(idx)?;
    MovementKind::parse(&v).ok_or_else(|| bad_text(idx, "movement kind", &v))
}

fn delta_from_row(row: &Row<'_>, first: usize) -> rusqlite::Result<CounterDelta> {
    Ok(CounterDelta {
        available: row.get(first)?,
        reserved: row.get(first + 1)?,
        sold: row.get(first + 2)?,
    })
}

fn levels_from_row(row: &Row<'_>, first: usize) -> rusqlite::Result<StockLevels> {
    Ok(StockLevels {
        available: column_u64(row, first)?,
        reserved: column_u64(row, first + 1)?,
        sold: column_u64(row, first + 2)?,
    })
}

/// The columns [`order_from_row`] reads, in its order (a macro, so that `concat!` builds
/// each query as one `&'static str`).
macro_rules! order_columns {
    () => {
        "id, payment_hash, product_id, size, quantity, unit_price, customer_ref, status, \
         payment_status, created_at, payment_expires_at, paid_at, admin_notes"
    };
}

/// The columns [`hold_from_row`] reads, in its order.
macro_rules! hold_columns {
    () => {
        "id, cart_id, product_id, size, quantity, status, created_at, expires_at"
    };
}

fn hold_from_row(row: &Row<'_>) -> rusqlite::Result<Hold> {
    let status: String = row.get(5)?;
    Ok(Hold {
        id: HoldId(row.get(0)?),
        cart_id: row.get(1)?,
        product_id: ProductId(row.get(2)?),
        size: size_from_db(row.get(3)?),
        quantity: column_u64(row, 4)?,
        status: HoldStatus::parse(&status).ok_or_else(|| bad_text(5, "hold status", &status))?,
        created_at: column_time(row, 6)?,
        expires_at: column_time(row, 7)?,
    })
}

fn order_from_row(row: &Row<'_>) -> rusqlite::Result<Order> {
    Ok(Order {
        id: OrderId(row.get(0)?),
        payment_hash: row.get(1)?,
        product_id: ProductId(row.get(2)?),
        size: size_from_db(row.get(3)?),
        quantity: column_u64(row, 4)?,
        unit_price: column_u64(row, 5)?,
        customer_ref: row.get(6)?,
        status: column_order_status(row, 7)?,
        payment_status: column_payment_status(row, 8)?,
        created_at: column_time(row, 9)?,
        payment_expires_at: column_time(row, 10)?,
        paid_at: column_opt_time(row, 11)?,
        admin_notes: row.get(12)?,
    })
}

impl SqliteTx<'_> {
    /// Every row `sql` returns, mapped.
    fn all<T>(
        &self,
        sql: &'static str,
        params: impl rusqlite::Params,
        map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        self.conn
            .with(sql, |stmt| stmt.query_map(params, map)?.collect())
    }

    /// The one row `sql` returns, if any, mapped.
    fn one<T>(
        &self,
        sql: &'static str,
        params: impl rusqlite::Params,
        map: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>> {
        self.conn
            .with(sql, |stmt| stmt.query_row(params, map).optional())
    }

    /// Runs a statement that returns no rows; the number of rows it changed.
    fn run(&self, sql: &'static str, params: impl rusqlite::Params) -> Result<usize> {
        self.run_with(sql, |stmt| stmt.execute(params))
    }

    /// The last movement id the ledger's index by product covers (see `ledger_index.rs`).
    fn indexed_upto(&self) -> Result<i64> {
        self.conn.with("SELECT upto FROM ledger_indexed", |s| {
            s.query_row([], |r| r.get(0))
        })
    }

    /// Runs `execute`, which binds and runs the statement of `sql` and returns the number
    /// of rows it changed.
    fn run_with(
        &self,
        sql: &'static str,
        execute: impl FnOnce(&mut rusqlite::Statement<'_>) -> rusqlite::Result<usize>,
    ) -> Result<usize> {
        let changed = self.conn.with(sql, execute)?;
        if changed > 0 {
            self.wrote.set(true);
        }
        Ok(changed)
    }
}

/// Sorts `found` (movements as time and id), drops the ones found twice (two catch-ups
/// that ran at once may have packed a movement twice) and keeps the first `limit`.
fn first_ones(found: &mut Vec<(i64, i64)>, limit: usize) {
    found.sort_unstable();
    found.dedup();
    found.truncate(limit);
}

fn indexed_but_missing(id: i64) -> Error {
    Error::storage(
        BACKEND,
        format!("ledger movement {id} is in the index by product but not in the ledger"),
    )
}

impl StockRead for SqliteTx<'_> {
    fn product(&mut self, id: ProductId) -> Result<Option<Product>> {
        self.one(
            "SELECT name, has_sizes FROM products WHERE id = ?1",
            [id.0],
            |r| {
                Ok(Product {
                    id,
                    name: r.get(0)?,
                    has_sizes: r.get(1)?,
                })
            },
        )
    }

    fn stock(&mut self, product: ProductId, size: Option<&str>) -> Result<Option<StockLevels>> {
        let size = size_db(size);
        if let Some(kept) = self.conn.kept_stock(product.0, size) {
            return Ok(Some(kept));
        }
        // Not kept, so not held back either: nothing to write before this read.
        let levels = self.conn.with_pending(
            "SELECT available, reserved, sold FROM stock WHERE product_id = ?1 AND size = ?2",
            |s| {
                s.query_row(params![product.0, size], |r| levels_from_row(r, 0))
                    .optional()
            },
        )?;
        if let Some(levels) = levels {
            self.conn.keep_stock(product.0, size, levels);
        }
        Ok(levels)
    }

    fn product_stock(&mut self, product: ProductId) -> Result<Vec<(Option<String>, StockLevels)>> {
        self.all(
            "SELECT size, available, reserved, sold FROM stock WHERE product_id = ?1 \
             ORDER BY size",
            [product.0],
            |r| Ok((size_from_db(r.get(0)?), levels_from_row(r, 1)?)),
        )
    }

    fn order(&mut self, id: OrderId) -> Result<Option<Order>> {
        self.one(
            concat!("SELECT ", order_columns!(), " FROM orders WHERE id = ?1"),
            [id.0],
            order_from_row,
        )
    }

    fn payment(&mut self, hash: &str) -> Result<Option<Payment>> {
        self.one(
            "SELECT key, amount, status, created_at, expires_at, paid_at \
             FROM payments WHERE hash = ?1",
            [hash],
            |r| {
                Ok(Payment {
                    hash: hash.to_owned(),
                    key: r.get(0)?,
                    amount: column_u64(r, 1)?,
                    status: column_payment_status(r, 2)?,
                    created_at: column_time(r, 3)?,
                    expires_at: column_time(r, 4)?,
                    paid_at: column_opt_time(r, 5)?,
                })
            },
        )
    }

    fn payment_orders(&mut self, hash: &str) -> Result<Vec<Order>> {
        self.all(
            concat!(
                "SELECT ",
                order_columns!(),
                " FROM orders WHERE payment_hash = ?1 ORDER BY id"
            ),
            [hash],
            order_from_row,
        )
    }

    fn expired_orders(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, OrderId)>,
        limit: usize,
    ) -> Result<Vec<Order>> {
        let (after_t, after_id) = after.map_or((i64::MIN, i64::MIN), |(t, id)| (time_db(t), id.0));
        self.all(
            concat!(
                "SELECT ",
                order_columns!(),
                " FROM orders \
                 WHERE status = 'under_paying' AND payment_expires_at < ?1 \
                   AND (payment_expires_at, id) > (?2, ?3) \
                 ORDER BY payment_expires_at, id LIMIT ?4"
            ),
            params![time_db(now), after_t, after_id, db_limit(limit)],
            order_from_row,
        )
    }

    fn movements(&mut self, query: &MovementQuery) -> Result<Vec<StockMovement>> {
        let limit = query.limit;
        let from = query.from.map_or(i64::MIN, time_db);
        let to = query.to.map_or(i64::MAX, time_db);
        let after = query
            .after
            .map_or((i64::MIN, i64::MIN), |(t, id)| (time_db(t), id));
        let wanted = |entry: (i64, i64)| entry.0 >= from && entry.0 < to && entry > after;
        if limit == 0 || from >= to {
            return Ok(Vec::new());
        }
        let upto = self.indexed_upto()?;
        // The indexed movements from the packs, in the order of their first entries: no
        // entry of a pack comes before its first, so once `limit` movements come before
        // a pack's first entry, neither it nor any later pack holds one of the first
        // `limit`. A pack that ends at `lowest` or later begins at most `PACK_SPAN`
        // before it. Entries past `upto` are a catch-up's that has not ended.
        let mut found: Vec<(i64, i64)> = Vec::new();
        self.conn.with(
            "SELECT first_at, first_id, entries FROM ledger_packs \
             WHERE product_id = ?1 AND (?2 IS NULL OR size = ?2) \
               AND first_at >= ?5 AND first_at < ?3 AND first_at + span >= ?4 \
             ORDER BY first_at, first_id",
            |select| {
                let lowest = from.max(after.0);
                let earliest = lowest.saturating_sub(ledger_index::PACK_SPAN);
                let params = params![query.product_id.0, query.size, to, lowest, earliest];
                let mut packs = select.query(params)?;
                while let Some(pack) = packs.next()? {
                    let first: (i64, i64) = (pack.get(0)?, pack.get(1)?);
                    if found.len() >= limit {
                        first_ones(&mut found, limit);
                        if found.len() == limit && first > found[limit - 1] {
                            break;
                        }
                    }
                    let entries = ledger_index::unpack(pack, 0)?;
                    found.extend(entries.filter(|&(at, id)| id <= upto && wanted((at, id))));
                }
                Ok(())
            },
        )?;
        // The rest by a scan of the ledger's end.
        self.conn.with(
            "SELECT at, id FROM stock_movements \
             WHERE id > ?1 AND product_id = ?2 AND (?3 IS NULL OR size = ?3) \
               AND at >= ?4 AND at < ?5 AND (at, id) > (?6, ?7)",
            |select| {
                let params = params![
                    upto,
                    query.product_id.0,
                    query.size,
                    from,
                    to,
                    after.0,
                    after.1
                ];
                for entry in select.query_map(params, |r| Ok((r.get(0)?, r.get(1)?)))? {
                    found.push(entry?);
                }
                Ok(())
            },
        )?;
        first_ones(&mut found, limit);
        found
            .into_iter()
            .map(|(_, id)| {
                self.one(
                    "SELECT id, at, product_id, size, kind, available_delta, reserved_delta, \
                     sold_delta, order_id, payment_hash, reference FROM stock_movements \
                     WHERE id = ?1",
                    [id],
                    |r| {
                        Ok(StockMovement {
                            id: r.get(0)?,
                            at: column_time(r, 1)?,
                            product_id: ProductId(r.get(2)?),
                            size: size_from_db(r.get(3)?),
                            kind: column_kind(r, 4)?,
                            delta: delta_from_row(r, 5)?,
                            order_id: r.get::<_, Option<i64>>(8)?.map(OrderId),
                            payment_hash: r.get(9)?,
                            reference: r.get(10)?,
                        })
                    },
                )?
                .ok_or_else(|| indexed_but_missing(id))
            })
            .collect()
    }

    fn all_stock(&mut self) -> Result<Vec<StockRow>> {
        self.all(
            "SELECT product_id, size, available, reserved, sold FROM stock \
             ORDER BY product_id, size",
            [],
            |r| {
                Ok((
                    ProductId(r.get(0)?),
                    size_from_db(r.get(1)?),
                    levels_from_row(r, 2)?,
                ))
            },
        )
    }

    fn ledger_balances(&mut self) -> Result<Vec<LedgerBalance>> {
        self.all(
            "SELECT product_id, size, sum(available_delta), sum(reserved_delta), \
             sum(sold_delta) FROM stock_movements GROUP BY product_id, size \
             ORDER BY product_id, size",
            [],
            |r| {
                Ok((
                    ProductId(r.get(0)?),
                    size_from_db(r.get(1)?),
                    delta_from_row(r, 2)?,
                ))
            },
        )
    }

    fn kind_totals(&mut self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<KindTotal>> {
        let (from, to) = (time_db(from), time_db(to));
        let upto = self.indexed_upto()?;
        // The movements of the time range: the indexed ones from the packs that overlap
        // it, product by product (a pack that ends at `from` or later begins at most
        // `PACK_SPAN` before it), the rest by a scan of the ledger's end. The ledger
        // keeps no index by time, which would cost every movement one more page write.
        let mut ids = Vec::new();
        self.conn.with(
            "SELECT x.first_at, x.first_id, x.entries FROM products p \
             CROSS JOIN ledger_packs x \
             ON x.product_id = p.id AND x.first_at >= ?3 AND x.first_at < ?2 \
             WHERE x.first_at + x.span >= ?1",
            |select| {
                let earliest = from.saturating_sub(ledger_index::PACK_SPAN);
                let mut packs = select.query([from, to, earliest])?;
                while let Some(pack) = packs.next()? {
                    let entries = ledger_index::unpack(pack, 0)?;
                    ids.extend(
                        entries
                            .filter(|&(at, id)| id <= upto && at >= from && at < to)
                            .map(|(_, id)| id),
                    );
                }
                Ok(())
            },
        )?;
        self.conn.with(
            "SELECT id FROM stock_movements WHERE id > ?1 AND at >= ?2 AND at < ?3",
            |select| {
                for id in select.query_map([upto, from, to], |r| r.get(0))? {
                    ids.push(id?);
                }
                Ok(())
            },
        )?;
        // Two catch-ups that ran at once may have packed a movement twice.
        ids.sort_unstable();
        ids.dedup();
        let movements = ids
            .into_iter()
            .map(|id| {
                self.one(
                    "SELECT product_id, kind, available_delta, reserved_delta, sold_delta \
                     FROM stock_movements WHERE id = ?1",
                    [id],
                    |r| {
                        Ok((
                            (ProductId(r.get(0)?), column_kind(r, 1)?),
                            delta_from_row(r, 2)?,
                        ))
                    },
                )?
                .ok_or_else(|| indexed_but_missing(id))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(crate::store::sum_by_kind(movements))
    }

    fn cart_holds(&mut self, cart_id: &str) -> Result<Vec<Hold>> {
        self.all(
            concat!(
                "SELECT ",
                hold_columns!(),
                " FROM cart_holds WHERE cart_id = ?1 AND status = 'active' \
                 ORDER BY id"
            ),
            [cart_id],
            hold_from_row,
        )
    }

    fn expired_holds(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, HoldId)>,
        limit: usize,
    ) -> Result<Vec<Hold>> {
        let (after_t, after_id) = after.map_or((i64::MIN, i64::MIN), |(t, id)| (time_db(t), id.0));
        self.all(
            concat!(
                "SELECT ",
                hold_columns!(),
                " FROM cart_holds \
                 WHERE status = 'active' AND expires_at < ?1 AND (expires_at, id) > (?2, ?3) \
                 ORDER BY expires_at, id LIMIT ?4"
            ),
            params![time_db(now), after_t, after_id, db_limit(limit)],
            hold_from_row,
        )
    }

    fn reservation_breakdown(
        &mut self,
        product: ProductId,
        size: Option<&str>,
    ) -> Result<(u64, u64)> {
        let sums = self.one(
            "SELECT \
               (SELECT coalesce(sum(quantity), 0) FROM cart_holds \
                 WHERE product_id = ?1 AND size = ?2 AND status = 'active'), \
               (SELECT coalesce(sum(quantity), 0) FROM orders \
                 WHERE product_id = ?1 AND size = ?2 AND status = 'under_paying')",
            params![product.0, size_db(size)],
            |r| Ok((column_u64(r, 0)?, column_u64(r, 1)?)),
        )?;
        Ok(sums.unwrap_or((0, 0)))
    }

    fn stock_counts(
        &mut self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<StockCountRecord>> {
        self.all(
            "SELECT at, product_id, size, expected, counted, discrepancy, applied, \
             available, reserved, sold FROM stock_counts WHERE at >= ?1 AND at < ?2 \
             ORDER BY at, id",
            [time_db(from), time_db(to)],
            |r| {
                Ok(StockCountRecord {
                    at: column_time(r, 0)?,
                    count: StockCount {
                        product_id: ProductId(r.get(1)?),
                        size: size_from_db(r.get(2)?),
                        expected: column_u64(r, 3)?,
                        counted: column_u64(r, 4)?,
                        discrepancy: r.get(5)?,
                        applied: r.get(6)?,
                        levels: levels_from_row(r, 7)?,
                    },
                })
            },
        )
    }
}

impl StockTx for SqliteTx<'_> {
    fn insert_product(&mut self, product: &Product) -> Result<bool> {
        let n = self.run(
            "INSERT INTO products (id, name, has_sizes) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO NOTHING",
            params![product.id.0, product.name, product.has_sizes],
        )?;
        Ok(n == 1)
    }

    fn insert_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        levels: StockLevels,
    ) -> Result<bool> {
        let size = size_db(size);
        let [available, reserved, sold] = levels_db(levels)?;
        let n = self.run(
            "INSERT INTO stock (product_id, size, available, reserved, sold) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (product_id, size) DO NOTHING",
            params![product.0, size, available, reserved, sold],
        )?;
        if n == 1 {
            self.conn.keep_stock(product.0, size, levels);
        }
        Ok(n == 1)
    }

    fn update_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        levels: StockLevels,
    ) -> Result<()> {
        let size = size_db(size);
        let [available, reserved, sold] = levels_db(levels)?;
        if self.conn.hold_back_stock(product.0, size, levels) {
            // Written before the next statement that could tell (see `row_cache.rs`).
            self.wrote.set(true);
            return Ok(());
        }
        let n = self.run(
            UPDATE_STOCK,
            params![product.0, size, available, reserved, sold],
        )?;
        if n == 1 {
            self.conn.keep_stock(product.0, size, levels);
        }
        expect_one(n, "stock row")
    }

    fn insert_payment(&mut self, payment: &Payment) -> Result<()> {
        self.run(
            "INSERT INTO payments (hash, key, amount, status, created_at, expires_at, paid_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                payment.hash,
                payment.key,
                to_db(payment.amount)?,
                payment.status.as_str(),
                time_db(payment.created_at),
                time_db(payment.expires_at),
                payment.paid_at.map(time_db)
            ],
        )?;
        Ok(())
    }

    fn update_payment(&mut self, payment: &Payment) -> Result<()> {
        let n = self.run(
            "UPDATE payments SET status = ?2, paid_at = ?3 WHERE hash = ?1",
            params![
                payment.hash,
                payment.status.as_str(),
                payment.paid_at.map(time_db)
            ],
        )?;
        expect_one(n, "payment")
    }

    fn insert_order(&mut self, order: &NewOrder) -> Result<OrderId> {
        self.run(
            "INSERT INTO orders (payment_hash, product_id, size, quantity, unit_price, \
             customer_ref, status, payment_status, created_at, payment_expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'under_paying', 'pending', ?7, ?8)",
            params![
                order.payment_hash,
                order.product_id.0,
                size_db(order.size.as_deref()),
                to_db(order.quantity)?,
                to_db(order.unit_price)?,
                order.customer_ref,
                time_db(order.created_at),
                time_db(order.payment_expires_at)
            ],
        )?;
        Ok(OrderId(self.conn.last_insert_rowid()))
    }

    fn update_order(&mut self, order: &Order) -> Result<()> {
        let n = self.run(
            "UPDATE orders SET status = ?2, payment_status = ?3, paid_at = ?4, \
             admin_notes = ?5 WHERE id = ?1",
            params![
                order.id.0,
                order.status.as_str(),
                order.payment_status.as_str(),
                order.paid_at.map(time_db),
                order.admin_notes
            ],
        )?;
        expect_one(n, "order")
    }

    fn insert_movement(&mut self, m: &NewMovement) -> Result<()> {
        self.insert_movements(std::slice::from_ref(m))
    }

    fn insert_movements(&mut self, movements: &[NewMovement]) -> Result<()> {
        if movements.is_empty() {
            return Ok(());
        }
        if !self.conn.hold_back_movements(movements) {
            // Written after whatever is held back, so that ids keep the units' order.
            self.conn.write_pending()?;
            insert_movement_rows(self.conn, movements)?;
        }
        self.wrote.set(true);
        Ok(())
    }

    fn insert_stock_count(&mut self, record: &StockCountRecord) -> Result<()> {
        let c = &record.count;
        let [available, reserved, sold] = levels_db(c.levels)?;
        self.run(
            "INSERT INTO stock_counts (at, product_id, size, expected, counted, discrepancy, \
             applied, available, reserved, sold) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                time_db(record.at),
                c.product_id.0,
                size_db(c.size.as_deref()),
                to_db(c.expected)?,
                to_db(c.counted)?,
                c.discrepancy,
                c.applied,
                available,
                reserved,
                sold
            ],
        )?;
        Ok(())
    }

    fn insert_hold(&mut self, hold: &NewHold) -> Result<HoldId> {
        self.run(
            "INSERT INTO cart_holds (cart_id, product_id, size, quantity, status, created_at, \
             expires_at) VALUES (?1, ?2, ?3, ?4, 'active', ?5, ?6)",
            params![
                hold.cart_id,
                hold.product_id.0,
                size_db(hold.size.as_deref()),
                to_db(hold.quantity)?,
                time_db(hold.created_at),
                time_db(hold.expires_at)
            ],
        )?;
        Ok(HoldId(self.conn.last_insert_rowid()))
    }

    fn update_hold(&mut self, hold: &Hold) -> Result<()> {
        let n = self.run(
            "UPDATE cart_holds SET quantity = ?2, status = ?3, expires_at = ?4 WHERE id = ?1",
            params![
                hold.id.0,
                to_db(hold.quantity)?,
                hold.status.as_str(),
                time_db(hold.expires_at)
            ],
        )?;
        expect_one(n, "hold")
    }
}

/// The most ledger rows one `INSERT` statement appends.
const MOVEMENTS_PER_INSERT: usize = 8;

/// Inserts `movements` into the ledger, in order, without writing the stock rows held
/// back first: the ledger's foreign key asks only whether a movement's stock row exists,
/// which a row held back does (see `row_cache.rs`).
///
/// Up to [`MOVEMENTS_PER_INSERT`] rows per statement: one statement step instead of one
/// per row, and a handful of statements (one per row count). The values are bound one by
/// one, with nothing allocated for them.
fn insert_movement_rows(conn: &PreparedConn, movements: &[NewMovement]) -> Result<()> {
    for chunk in movements.chunks(MOVEMENTS_PER_INSERT) {
        conn.with_pending(insert_movements_sql(chunk.len()), |insert| {
            let mut index = 0;
            let mut bind = |value: &dyn ToSql| {
                index += 1;
                insert.raw_bind_parameter(index, value)
            };
            for m in chunk {
                bind(&time_db(m.at))?;
                bind(&m.product_id.0)?;
                bind(&size_db(m.size.as_deref()))?;
                bind(&m.kind.as_str())?;
                bind(&m.delta.available)?;
                bind(&m.delta.reserved)?;
                bind(&m.delta.sold)?;
                bind(&m.order_id.map(|o| o.0))?;
                bind(&m.payment_hash)?;
                bind(&m.reference)?;
            }
            insert.raw_execute()
        })?;
    }
    Ok(())
}

/// `INSERT INTO stock_movements ... VALUES (...), (...)` for `rows` rows (1 to
/// [`MOVEMENTS_PER_INSERT`]), built once.
fn insert_movements_sql(rows: usize) -> &'static str {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        (1..=MOVEMENTS_PER_INSERT)
            .map(|n| {
                let rows: Vec<String> = (0..n)
                    .map(|row| {
                        let params: Vec<String> =
                            (1..=10).map(|i| format!("?{}", row * 10 + i)).collect();
                        format!("({})", params.join(", "))
                    })
                    .collect();
                format!(
                    "INSERT INTO stock_movements (at, product_id, size, kind, \
                     available_delta, reserved_delta, sold_delta, order_id, payment_hash, \
                     reference) VALUES {}",
                    rows.join(", ")
                )
            })
            .collect()
    });
    &all[rows - 1]
}

/// A `LIMIT` parameter.
fn db_limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn expect_one(changed: usize, what: &str) -> Result<()> {
    if changed == 1 {
        Ok(())
    } else {
        Err(Error::storage(
            BACKEND,
            format!("update of a missing {what} ({changed} rows changed)"),
        ))
    }
}
