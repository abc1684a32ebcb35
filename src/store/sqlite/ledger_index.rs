//! The ledger's index by product, filled by the writer in bulk.
//!
//! Every movement is a row appended to `stock_movements`. An index by product that SQLite
//! wrote with each movement cost each one a descent to a random leaf, and that leaf's page
//! in the commit: a 10-line cart spent half its time there under NORMAL, and 8 threads
//! reserved 40% fewer units a second than without it. The movements are indexed by
//! product in `ledger_by_product` instead, by the writer, in bulk: once
//! [`SqliteConfig::ledger_index_batch`](super::SqliteConfig::ledger_index_batch)
//! movements have been appended past the last one indexed (`ledger_indexed.upto`), the
//! writer reads them, a slice after each commit, sorts them by product, inserts them a
//! chunk per short transaction after each commit, and moves `upto` with the last chunk.
//! Each slice and chunk is at least [`READ_SLICE`] or [`CHUNK`] entries, and at least
//! twice the movements the commit before it appended, so the catch-up always outpaces
//! the ledger (a first version with fixed steps fell behind 500-line carts, and its
//! backlog grew for as long as they came). Sorted, the new entries of a product go to its
//! leaf together: one page write for many movements.
//!
//! Reads take the movements up to `upto` through `ledger_by_product` and scan the ones
//! after it, so they are right whatever the index has caught up with: entries inserted
//! past `upto` before a crash are ignored until `upto` covers them, and inserted again
//! (`OR IGNORE`) by the next catch-up. Two processes may catch up at once: `upto` only
//! moves forward.

use std::sync::OnceLock;

use crate::error::Result;

use super::prepared::PreparedConn;

/// The fewest index entries one catch-up transaction inserts (more after a commit that
/// appended more than half as many movements): a pause of about a millisecond for the
/// callers queued behind it.
const CHUNK: usize = 512;

/// The fewest movements the writer reads, after one commit, for the catch-up to come
/// (reading a whole batch at once held the writer for several milliseconds).
const READ_SLICE: usize = 4_096;

/// How many commits the writer lets pass between two looks at how far the ledger has
/// run ahead of its index (at most; fewer with a smaller batch), except right after a
/// catch-up.
const LOOK_EVERY: u64 = 16;

/// Index entries per `INSERT` statement: one statement step for many rows (the rest of
/// a chunk goes a row at a time). Counted by callgrind, a catch-up of 65,536 entries in
/// chunks of 512 took 16% fewer instructions than with a statement per row.
const ROWS_PER_INSERT: usize = 32;

/// The insert of one entry.
const INSERT_ONE: &str =
    "INSERT OR IGNORE INTO ledger_by_product (product_id, at, id, size) VALUES (?, ?, ?, ?)";

/// One movement's entry: product, time, id, size.
type Entry = (i64, i64, i64, String);

/// The writer's side of the index by product: what it still has to insert.
#[derive(Debug)]
pub(crate) struct LedgerIndexer {
    /// How many movements past `upto` start a catch-up.
    batch: i64,
    look_every: u64,
    commits: u64,
    /// The entries of the catch-up in progress, sorted once all are read; `next` is the
    /// first not inserted.
    pending: Vec<Entry>,
    next: usize,
    /// The last movement id the catch-up in progress covers, and the last one read.
    target: i64,
    read: i64,
    /// The last movement id at the writer's last step of the catch-up.
    last: i64,
}

impl LedgerIndexer {
    pub(crate) fn new(batch: u64) -> Self {
        let batch = batch.max(1);
        LedgerIndexer {
            batch: i64::try_from(batch).unwrap_or(i64::MAX),
            look_every: batch.min(LOOK_EVERY),
            commits: 0,
            pending: Vec::new(),
            next: 0,
            target: 0,
            read: 0,
            last: 0,
        }
    }

    /// Called by the writer after a commit, outside any transaction: inserts the next
    /// chunk of a catch-up in progress, or now and then looks whether one is due. A
    /// failure is logged and the catch-up starts over later; reads stay right meanwhile.
    pub(crate) fn after_commit(&mut self, conn: &PreparedConn) {
        if let Err(e) = self.step(conn) {
            let _ = conn.exec("ROLLBACK");
            self.clear();
            self.read = self.target;
            log::warn!("sqlite: indexing the ledger by product failed, will retry: {e}");
        }
    }

    fn step(&mut self, conn: &PreparedConn) -> Result<()> {
        let catching_up = self.read < self.target || self.next < self.pending.len();
        if catching_up {
            // Outpace the ledger: twice what the last commit appended, at least.
            let (_, last) = ends(conn)?;
            let appended = usize::try_from(last - self.last).unwrap_or(0);
            self.last = last;
            return if self.read < self.target {
                self.read_slice(conn, READ_SLICE.max(2 * appended))
            } else {
                self.insert_chunk(conn, CHUNK.max(2 * appended))
            };
        }
        self.commits += 1;
        if self.commits % self.look_every != 0 {
            return Ok(());
        }
        let (upto, last) = ends(conn)?;
        if last - upto < self.batch {
            return Ok(());
        }
        // At most four batches at once, which bounds the memory a backlog can take.
        self.target = last.min(upto.saturating_add(self.batch.saturating_mul(4)));
        self.read = upto;
        self.last = last;
        self.clear();
        log::debug!(
            "sqlite: indexing ledger movements {} to {} by product",
            upto + 1,
            self.target
        );
        self.read_slice(conn, READ_SLICE)
    }

    /// Reads the next `size` movements to index; once all are read, sorts them.
    fn read_slice(&mut self, conn: &PreparedConn, size: usize) -> Result<()> {
        let to = self.target.min(
            self.read
                .saturating_add(i64::try_from(size).unwrap_or(i64::MAX)),
        );
        let pending = &mut self.pending;
        conn.with(
            "SELECT product_id, at, id, size FROM stock_movements WHERE id > ?1 AND id <= ?2",
            |select| {
                let rows = select.query_map([self.read, to], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?;
                for row in rows {
                    pending.push(row?);
                }
                Ok(())
            },
        )?;
        self.read = to;
        if to == self.target {
            self.pending.sort_unstable();
        }
        Ok(())
    }

    /// Inserts the next `size` pending entries in one transaction; the last chunk moves
    /// `upto` too.
    fn insert_chunk(&mut self, conn: &PreparedConn, size: usize) -> Result<()> {
        let end = (self.next + size).min(self.pending.len());
        conn.exec("BEGIN IMMEDIATE")?;
        let mut rows = self.pending[self.next..end].chunks_exact(ROWS_PER_INSERT);
        for group in &mut rows {
            insert_entries(conn, insert_many(), group)?;
        }
        for entry in rows.remainder() {
            insert_entries(conn, INSERT_ONE, std::slice::from_ref(entry))?;
        }
        let done = end == self.pending.len();
        if done {
            conn.with("UPDATE ledger_indexed SET upto = max(upto, ?1)", |update| {
                update.execute([self.target])
            })?;
        }
        conn.exec("COMMIT")?;
        self.next = end;
        if done {
            self.clear();
            // Look again at the next commit: what came during this catch-up may make
            // another batch already.
            self.commits = self.look_every - 1;
        }
        Ok(())
    }

    /// Forgets the entries of a catch-up, and the memory they took.
    fn clear(&mut self) {
        self.pending = Vec::new();
        self.next = 0;
    }
}

/// Runs `sql`, an insert of as many entries as `entries` holds.
fn insert_entries(conn: &PreparedConn, sql: &'static str, entries: &[Entry]) -> Result<()> {
    conn.with(sql, |insert| {
        let values = entries
            .iter()
            .flat_map(|(product, at, id, size)| [product as &dyn rusqlite::ToSql, at, id, size]);
        for (i, value) in values.enumerate() {
            insert.raw_bind_parameter(i + 1, value)?;
        }
        insert.raw_execute().map(drop)
    })
}

/// [`INSERT_ONE`] for [`ROWS_PER_INSERT`] entries, built once.
fn insert_many() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let values = vec!["(?, ?, ?, ?)"; ROWS_PER_INSERT].join(", ");
        INSERT_ONE.replace("(?, ?, ?, ?)", &values)
    })
}

/// `ledger_indexed.upto` and the last movement id: each a descent along the right edge of
/// a b-tree.
fn ends(conn: &PreparedConn) -> Result<(i64, i64)> {
    conn.with(
        "SELECT (SELECT upto FROM ledger_indexed), \
         (SELECT coalesce(max(id), 0) FROM stock_movements)",
        |s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))),
    )
}
