//! A connection with its statements, each prepared once for the connection's life: the
//! writer's, and each reader's in the pool.
//!
//! rusqlite's statement cache finds a statement by its SQL text: each use copies the text
//! into a new key, hashes it twice and moves the statement in and out of a map. Counted
//! by callgrind over 30,000 reservations of one caller, that was about 6,400 of a
//! reservation's 50,000 instructions, about as many as the `UPDATE` of its stock row.
//! Every statement the store runs is a `&'static str`, so here its address is its key,
//! and the statement stays where it is.

use std::cell::RefCell;
use std::ops::Deref;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, Statement};

use crate::error::Result;
use crate::model::{NewMovement, StockLevels};

use super::row_cache::RowCache;
use super::{UPDATE_STOCK, expect_one, insert_movement_rows, levels_db, sql_err};

/// A connection and the statements prepared on it.
pub(crate) struct PreparedConn {
    /// Each statement with its SQL text's address and length. Declared before `conn`, so
    /// that they are finalized before it closes.
    statements: RefCell<Vec<(usize, usize, Statement<'static>)>>,
    /// The writer's copies of stock rows (see `row_cache.rs`); `None` on readers.
    rows: Option<RefCell<RowCache>>,
    /// Boxed: the statements point at it, wherever the `PreparedConn` moves.
    conn: Box<Connection>,
}

// SAFETY: a `Connection` may move to another thread, and the statements move with the
// one connection they belong to: they are reached only through the `PreparedConn`, by
// the one thread that holds it (the writer's under a lock, a reader's checked out of
// the pool), and never handed out beyond a call of `with`.
unsafe impl Send for PreparedConn {}

impl PreparedConn {
    pub(crate) fn new(conn: Connection) -> Self {
        PreparedConn {
            statements: RefCell::new(Vec::new()),
            rows: None,
            conn: Box::new(conn),
        }
    }

    /// The writer's connection: it keeps copies of the stock rows it reads and writes
    /// (see `row_cache.rs`).
    pub(crate) fn writer(conn: Connection) -> Self {
        PreparedConn {
            rows: Some(RefCell::default()),
            ..PreparedConn::new(conn)
        }
    }

    /// Runs `f` on the statement of `sql`, prepared at its first use. On the writer, the
    /// writes it has held back are made first (see `row_cache.rs`), unless `sql` rolls
    /// back.
    pub(crate) fn with<T>(
        &self,
        sql: &'static str,
        f: impl FnOnce(&mut Statement<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        if !sql.starts_with("ROLLBACK") {
            self.write_pending()?;
        }
        self.with_pending(sql, f)
    }

    /// [`PreparedConn::with`] without making the writes held back first: for the
    /// statements that make them, and for those whose outcome they cannot change (the
    /// read of a stock row not kept on this connection, and so not held back).
    pub(crate) fn with_pending<T>(
        &self,
        sql: &'static str,
        f: impl FnOnce(&mut Statement<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let key = (sql.as_ptr() as usize, sql.len());
        let Ok(mut statements) = self.statements.try_borrow_mut() else {
            // A statement run while another is in use (no caller does): from the cache.
            let mut statement = self.conn.prepare_cached(sql).map_err(sql_err)?;
            return f(&mut statement).map_err(sql_err);
        };
        let found = statements
            .iter()
            .position(|(at, len, _)| (*at, *len) == key);
        let i = match found {
            Some(i) => i,
            None => {
                let statement = self.conn.prepare(sql).map_err(sql_err)?;
                // SAFETY: the statement borrows `*self.conn`, which is boxed, so it stays
                // at its address for as long as `self` lives, and is dropped after the
                // statements (field order). The statements never leave `self`: `f` gets
                // one for the length of the call only.
                let statement: Statement<'static> = unsafe { std::mem::transmute(statement) };
                statements.push((key.0, key.1, statement));
                statements.len() - 1
            }
        };
        f(&mut statements[i].2).map_err(sql_err)
    }

    /// Runs `sql`, ignoring rows. Transactions on the writer begin and end here, which
    /// its copies of stock rows follow.
    pub(crate) fn exec(&self, sql: &'static str) -> Result<()> {
        let done = self.with(sql, |s| s.execute([]).map(drop));
        if let Some(rows) = &self.rows {
            rows.borrow_mut().after(&self.conn, sql, done.is_ok());
        }
        done
    }

    /// The writer's copy of a stock row, kept in this transaction (see `row_cache.rs`).
    pub(crate) fn kept_stock(&self, product: i64, size: &str) -> Option<StockLevels> {
        let rows = self.rows.as_ref()?;
        rows.borrow().get(&self.conn, product, size)
    }

    /// Keeps a copy of a stock row just read or written (on the writer).
    pub(crate) fn keep_stock(&self, product: i64, size: &str, levels: StockLevels) {
        if let Some(rows) = &self.rows {
            rows.borrow_mut().put(product, size, levels);
        }
    }

    /// Whether the writer's next transactions hold writes back (see `row_cache.rs`): the
    /// group writer turns it on for transactions it expects to carry several units.
    pub(crate) fn hold_writes(&self, on: bool) {
        if let Some(rows) = &self.rows {
            rows.borrow_mut().hold = on;
        }
    }

    /// Holds back the write of `levels` to a stock row this transaction keeps a copy of;
    /// whether it did (if not, the caller writes the row itself).
    pub(crate) fn hold_back_stock(&self, product: i64, size: &str, levels: StockLevels) -> bool {
        self.rows
            .as_ref()
            .is_some_and(|rows| rows.borrow_mut().hold_back(product, size, levels))
    }

    /// Holds back the insert of `movements` into the ledger until the writer writes what
    /// it holds back; whether it did (if not, the caller writes them, after
    /// [`PreparedConn::write_pending`]).
    pub(crate) fn hold_back_movements(&self, movements: &[NewMovement]) -> bool {
        self.rows
            .as_ref()
            .is_some_and(|rows| rows.borrow_mut().hold_back_movements(movements))
    }

    /// Writes the stock rows and the ledger movements held back.
    pub(crate) fn write_pending(&self) -> Result<()> {
        let Some(rows) = self.rows.as_ref().filter(|r| r.borrow().has_pending()) else {
            return Ok(());
        };
        let (pending, movements) = {
            let mut rows = rows.borrow_mut();
            (rows.take_pending(), rows.take_movements())
        };
        for (product, size, levels) in pending {
            let [available, reserved, sold] = levels_db(levels)?;
            let changed = self.with_pending(UPDATE_STOCK, |s| {
                s.execute(rusqlite::params![product, size, available, reserved, sold])
            })?;
            expect_one(changed, "stock row")?;
        }
        if !movements.is_empty() {
            insert_movement_rows(self, &movements)?;
            // The list goes back, emptied, with its room.
            rows.borrow_mut().give_back_movements(movements);
        }
        Ok(())
    }
}

impl Deref for PreparedConn {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// The readers' pool hands out [`PreparedConn`]s: connections that the wrapped manager
/// opens and sets up, with their statements kept.
#[derive(Debug)]
pub(crate) struct PreparedManager(pub(crate) SqliteConnectionManager);

impl r2d2::ManageConnection for PreparedManager {
    type Connection = PreparedConn;
    type Error = rusqlite::Error;

    fn connect(&self) -> rusqlite::Result<PreparedConn> {
        self.0.connect().map(PreparedConn::new)
    }

    fn is_valid(&self, conn: &mut PreparedConn) -> rusqlite::Result<()> {
        conn.execute_batch("")
    }

    fn has_broken(&self, _: &mut PreparedConn) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COUNT: &str = "SELECT count(*) FROM t";

    fn count(w: &PreparedConn) -> i64 {
        w.with(COUNT, |s| s.query_row([], |r| r.get(0))).unwrap()
    }

    #[test]
    fn a_statement_is_prepared_once_and_kept() {
        let w = PreparedConn::new(Connection::open_in_memory().unwrap());
        w.exec("CREATE TABLE t (x INTEGER)").unwrap();
        w.exec("INSERT INTO t VALUES (1)").unwrap();
        assert_eq!(count(&w), 1);
        w.exec("INSERT INTO t VALUES (1)").unwrap();
        assert_eq!(count(&w), 2);
        assert_eq!(w.statements.borrow().len(), 3);
        // A statement used while another is: prepared apart, and not kept.
        let nested = w
            .with(COUNT, |_| {
                Ok(w.with("SELECT 7", |s| s.query_row([], |r| r.get::<_, i64>(0))))
            })
            .unwrap()
            .unwrap();
        assert_eq!(nested, 7);
        assert_eq!(w.statements.borrow().len(), 3);
    }

    #[test]
    fn a_pooled_connection_keeps_its_statements_between_checkouts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
            .unwrap();
        let pool = r2d2::Pool::builder()
            .max_size(1)
            .build(PreparedManager(SqliteConnectionManager::file(&path)))
            .unwrap();
        for checkout in 0..3 {
            let conn = pool.get().unwrap();
            // Prepared by the first checkout, there at the next ones.
            assert_eq!(conn.statements.borrow().len(), usize::from(checkout > 0));
            assert_eq!(count(&conn), 1);
            assert_eq!(conn.statements.borrow().len(), 1);
        }
    }

    #[test]
    fn a_kept_statement_follows_a_schema_change_by_another_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let w = PreparedConn::new(Connection::open(&path).unwrap());
        w.exec("CREATE TABLE t (x INTEGER)").unwrap();
        w.exec("INSERT INTO t VALUES (1)").unwrap();
        assert_eq!(count(&w), 1);
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch("ALTER TABLE t ADD COLUMN y INTEGER; INSERT INTO t VALUES (2, 3);")
            .unwrap();
        assert_eq!(count(&w), 2);
        let e = w.exec("INSERT INTO missing VALUES (1)").unwrap_err();
        assert!(e.to_string().contains("no such table: missing"), "{e}");
        assert_eq!(count(&w), 2);
    }
}
