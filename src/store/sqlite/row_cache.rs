//! The writer's copy of the stock rows it has read or written lately, so that a
//! reservation does not read its row back with a `SELECT` before it writes it.
//!
//! Callgrind counted the read of the row at about an eighth of a lone caller's
//! instructions (5,600 of 45,000 a reservation: the statement's binding, its b-tree
//! descent and its columns), and at 8 callers the writer is the one running it for all of
//! them.
//!
//! A copy is only as good as the knowledge that nobody else has written the row since,
//! and another connection may: another process on the same file, or another store opened
//! on it in this one. SQLite itself answers that question for its page cache: when a
//! transaction starts and finds the database changed by someone else, it throws its
//! cached pages away and counts up the pager's data version
//! ([`SQLITE_FCNTL_DATA_VERSION`](https://sqlite.org/c3ref/c_fcntl_begin_atomic_write.html#sqlitefcntldataversion)),
//! which this connection's own commits also count up. So the copies follow the writer's
//! transactions, which all go through [`PreparedConn::exec`](super::prepared::PreparedConn::exec):
//!
//! - each commit notes the data version it leaves;
//! - each `BEGIN IMMEDIATE` (which takes the write lock and starts reading at once) reads
//!   it again, and if anything but this connection's last commit changed it, forgets
//!   every copy;
//! - a rollback, whole or to a savepoint, forgets every copy, and so does a failed
//!   commit;
//! - inside a transaction, every stock row the writer reads or changes is kept as it now
//!   is (a statement that fails changes nothing, and leaves the copy as it was).
//!
//! Copies are used only inside a transaction that began this way and is still open.
//!
//! In a transaction shared by several units under
//! [`Durability::Normal`](super::Durability::Normal) (the group writer decides, see
//! `GroupWriter::run_group`), the writer also holds back its writes of the rows it keeps,
//! and the ledger movements of those rows, until the transaction needs the tables to be
//! right: a stock row written by several units of one group (a hot product in a flash
//! sale, where most of a group's units write the same row) is written to SQLite once,
//! with its last counters, instead of once a unit, and the group's movements go into the
//! ledger a few rows per statement, in the order the units wrote them. A write held back
//! is *pending*.
//! [`PreparedConn`](super::prepared::PreparedConn) writes everything pending before it
//! runs any statement but the read of a row that is not kept (and therefore not
//! pending), so a commit, a savepoint, and every query find the tables as if each write
//! had gone straight in; a rollback, whole or to a savepoint, drops what is pending with
//! the copies. Only writes to rows already kept are held back: those rows exist, so
//! neither the update nor the ledger's foreign key can be refused later, when a refusal
//! would fail the whole transaction rather than the unit that made it. At most half the
//! bound of rows, and 1,024 movements, are pending at a time.

use std::collections::HashMap;
use std::ffi::c_uint;
use std::hash::{BuildHasherDefault, Hasher};

use rusqlite::{Connection, ffi};

use crate::model::{NewMovement, StockLevels};

/// The most rows kept. Past it every copy but the pending ones is forgotten and the
/// count starts again: a store with more rows than this in play gains little from copies
/// anyway. The table is allocated once, at its full size (about 650 KiB), and never
/// again: copies made and dropped on the threads that take turns leading the writer
/// would otherwise scatter small allocations over every thread's malloc arena (a first
/// version, with one allocation a row, raised the peak memory of 1,000,000 reservations
/// over 100,000 products from 40 to 48 MiB).
const MAX_ROWS: usize = 8_192;

/// The longest size kept, in bytes; rows with longer sizes are read every time.
const MAX_SIZE: usize = 15;

/// The most rows held back at a time: past it a write goes straight to SQLite. Half the
/// bound, so that making room for a new copy (which keeps the pending ones) always frees
/// some.
const MAX_PENDING: usize = MAX_ROWS / 2;

/// The most ledger movements held back at a time: past it the writer writes everything it
/// holds back, then the new movements.
const MAX_MOVEMENTS: usize = 1_024;

/// A row's key: its product, and its size's length and bytes (`""` for none, as stored).
type Key = (i64, u128);

fn key(product: i64, size: &str) -> Option<Key> {
    let bytes = size.as_bytes();
    let len = u8::try_from(bytes.len())
        .ok()
        .filter(|&n| usize::from(n) <= MAX_SIZE)?;
    let mut key = [0; MAX_SIZE + 1];
    key[0] = len;
    key[1..=bytes.len()].copy_from_slice(bytes);
    Some((product, u128::from_le_bytes(key)))
}

/// The size a [`Key`] was made of (its bytes came from a `&str`, so they are UTF-8).
fn size_of(packed: u128) -> String {
    let bytes = packed.to_le_bytes();
    let len = usize::from(bytes[0]).min(MAX_SIZE);
    String::from_utf8_lossy(&bytes[1..=len]).into_owned()
}

/// Hashes a [`Key`] with a multiplication a word (the scheme of rustc's FxHash): the keys
/// are the shop's own product ids and sizes, and the standard SipHash cost about as much
/// as the rest of a lookup (callgrind, 100,000 products).
#[derive(Default)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.add(n as u64);
    }

    fn write_u128(&mut self, n: u128) {
        self.add(n as u64);
        self.add((n >> 64) as u64);
    }
}

/// A kept copy of a row.
#[derive(Debug, Clone, Copy)]
struct Kept {
    levels: StockLevels,
    /// Written in this transaction, not yet to SQLite.
    pending: bool,
}

/// A row held back, as [`RowCache::take_pending`] hands it over: its product, its size,
/// and the counters to write.
pub(crate) type PendingRow = (i64, String, StockLevels);

/// The stock rows of one connection, as this connection last read or wrote them.
#[derive(Debug, Default)]
pub(crate) struct RowCache {
    rows: HashMap<Key, Kept, BuildHasherDefault<KeyHasher>>,
    /// The keys of the pending rows, each once.
    pending: Vec<Key>,
    /// Ledger movements held back, in the order the units wrote them.
    movements: Vec<NewMovement>,
    /// The data version this connection's last commit left: the copies hold while the
    /// next transaction starts at the same one.
    valid_at: Option<c_uint>,
    /// A transaction that began with the copies checked is open.
    open: bool,
    /// Writes of kept rows, and ledger movements, are held back (see the module's
    /// documentation); set by the writer for each group.
    pub(crate) hold: bool,
}

impl RowCache {
    /// Follows the transaction statement `sql`, just run on `conn` (successfully if
    /// `ok`).
    pub(crate) fn after(&mut self, conn: &Connection, sql: &str, ok: bool) {
        match (sql, ok) {
            ("BEGIN IMMEDIATE", true) => {
                let now = data_version(conn);
                if now.is_none() || now != self.valid_at {
                    self.forget();
                }
                self.open = true;
            }
            ("COMMIT", true) => {
                self.valid_at = data_version(conn);
                self.open = false;
            }
            ("SAVEPOINT unit" | "RELEASE unit", true) => {}
            (s, true) if s.starts_with("ROLLBACK TO ") => self.forget(),
            // A failed commit, any rollback, any other kind of transaction: the copies
            // are not known to hold any more.
            (s, _) if is_transaction(s) => {
                self.forget();
                self.valid_at = None;
                self.open = false;
            }
            _ => {}
        }
    }

    /// Forgets every copy, and every write held back with them.
    fn forget(&mut self) {
        self.rows.clear();
        self.pending.clear();
        self.movements.clear();
    }

    /// The row of `product` and `size` as this transaction last saw it, if kept.
    pub(crate) fn get(&self, conn: &Connection, product: i64, size: &str) -> Option<StockLevels> {
        if !self.open || conn.is_autocommit() {
            return None;
        }
        self.rows.get(&key(product, size)?).map(|k| k.levels)
    }

    /// Keeps `levels` as the row of `product` and `size`, read or written just now in
    /// the open transaction.
    pub(crate) fn put(&mut self, product: i64, size: &str, levels: StockLevels) {
        let Some(key) = key(product, size).filter(|_| self.open) else {
            return;
        };
        if self.rows.capacity() == 0 {
            self.rows.reserve(MAX_ROWS);
        }
        if self.rows.len() >= MAX_ROWS && !self.rows.contains_key(&key) {
            // Room is made among the copies that are only copies.
            self.rows.retain(|_, kept| kept.pending);
        }
        self.rows
            .entry(key)
            .and_modify(|kept| kept.levels = levels)
            .or_insert(Kept {
                levels,
                pending: false,
            });
    }

    /// Holds back the write of `levels` to the row of `product` and `size`, which this
    /// open transaction keeps a copy of; whether it did (if not, the caller writes it).
    pub(crate) fn hold_back(&mut self, product: i64, size: &str, levels: StockLevels) -> bool {
        if !self.open || !self.hold || self.pending.len() >= MAX_PENDING {
            return false;
        }
        let Some(key) = key(product, size) else {
            return false;
        };
        let Some(kept) = self.rows.get_mut(&key) else {
            return false;
        };
        kept.levels = levels;
        if !kept.pending {
            kept.pending = true;
            self.pending.push(key);
        }
        true
    }

    /// Holds back the insert of `movements` into the ledger, in the open transaction;
    /// whether it did (if not, the caller writes them, after everything held back).
    ///
    /// Only movements of stock rows kept are held back: those rows exist, so the ledger's
    /// foreign key cannot refuse them later, when a refusal would fail the whole
    /// transaction instead of the unit that made it.
    pub(crate) fn hold_back_movements(&mut self, movements: &[NewMovement]) -> bool {
        if !self.open || !self.hold || self.movements.len() + movements.len() > MAX_MOVEMENTS {
            return false;
        }
        let kept = |m: &NewMovement| {
            key(m.product_id.0, m.size.as_deref().unwrap_or(""))
                .is_some_and(|k| self.rows.contains_key(&k))
        };
        if !movements.iter().all(kept) {
            return false;
        }
        self.movements.extend_from_slice(movements);
        true
    }

    /// Whether any write is held back.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.movements.is_empty()
    }

    /// Hands over the movements held back, in order.
    pub(crate) fn take_movements(&mut self) -> Vec<NewMovement> {
        std::mem::take(&mut self.movements)
    }

    /// Takes back the list [`RowCache::take_movements`] handed over, emptied, to keep its
    /// room for the next transaction.
    pub(crate) fn give_back_movements(&mut self, mut list: Vec<NewMovement>) {
        if self.movements.is_empty() {
            list.clear();
            self.movements = list;
        }
    }

    /// Hands over the rows held back, in the order they were first held, and counts them
    /// as written (the caller writes them now).
    pub(crate) fn take_pending(&mut self) -> Vec<PendingRow> {
        let mut out = Vec::with_capacity(self.pending.len());
        for key in self.pending.drain(..) {
            let Some(kept) = self.rows.get_mut(&key) else {
                continue;
            };
            kept.pending = false;
            out.push((key.0, size_of(key.1), kept.levels));
        }
        out
    }
}

/// Whether `sql` begins or ends a transaction (or a savepoint).
fn is_transaction(sql: &str) -> bool {
    ["BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"]
        .iter()
        .any(|w| sql.starts_with(w))
}

/// The pager's data version of `conn`'s main database: see the module's documentation.
fn data_version(conn: &Connection) -> Option<c_uint> {
    let mut version: c_uint = 0;
    // SAFETY: the handle is the open connection's, the database name a C string, and
    // this file control writes one unsigned int through the pointer.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_DATA_VERSION,
            (&raw mut version).cast(),
        )
    };
    (rc == ffi::SQLITE_OK).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: StockLevels = StockLevels {
        available: 9,
        reserved: 1,
        sold: 0,
    };

    /// Runs a transaction statement on `conn` as the writer does, and has `cache` follow it.
    fn exec(conn: &Connection, cache: &mut RowCache, sql: &str) {
        let ok = conn.execute_batch(sql).is_ok();
        cache.after(conn, sql, ok);
    }

    /// Two connections on one new file with a table to write.
    fn two_connections() -> (tempfile::TempDir, Connection, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER);")
            .unwrap();
        let other = Connection::open(&path).unwrap();
        (dir, writer, other)
    }

    #[test]
    fn copies_outlive_the_writers_own_commits_but_not_another_connections() {
        let (_dir, writer, other) = two_connections();
        let mut cache = RowCache::default();
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        writer.execute_batch("INSERT INTO t VALUES (1)").unwrap();
        cache.put(7, "", ROW);
        cache.put(7, "M", StockLevels::with_available(3));
        assert_eq!(cache.get(&writer, 7, ""), Some(ROW));
        exec(&writer, &mut cache, "COMMIT");
        // Outside a transaction nothing is used.
        assert_eq!(cache.get(&writer, 7, ""), None);

        // The writer's own commits, and its own reads, leave the copies standing.
        for _ in 0..3 {
            exec(&writer, &mut cache, "BEGIN IMMEDIATE");
            assert_eq!(cache.get(&writer, 7, ""), Some(ROW));
            writer.execute_batch("INSERT INTO t VALUES (2)").unwrap();
            exec(&writer, &mut cache, "COMMIT");
        }
        assert_eq!(cache.get(&writer, 7, "M"), None, "outside a transaction");

        // Another connection commits: the next transaction starts with nothing.
        other.execute_batch("INSERT INTO t VALUES (3)").unwrap();
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        assert_eq!(cache.get(&writer, 7, ""), None);
        assert_eq!(cache.get(&writer, 7, "M"), None);
        assert!(cache.rows.is_empty());
        exec(&writer, &mut cache, "COMMIT");
    }

    #[test]
    fn copies_are_used_only_in_a_transaction_begun_immediately() {
        let (_dir, writer, _other) = two_connections();
        let mut cache = RowCache::default();
        // Kept outside a transaction: not kept.
        cache.put(7, "", ROW);
        assert!(cache.rows.is_empty());
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        cache.put(7, "", ROW);
        exec(&writer, &mut cache, "COMMIT");
        // A deferred transaction has not read the database yet when it begins.
        exec(&writer, &mut cache, "BEGIN");
        assert_eq!(cache.get(&writer, 7, ""), None);
        exec(&writer, &mut cache, "COMMIT");
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        assert_eq!(
            cache.get(&writer, 7, ""),
            None,
            "forgotten at the deferred BEGIN"
        );
        exec(&writer, &mut cache, "ROLLBACK");
    }

    #[test]
    fn rollbacks_forget_every_copy() {
        let (_dir, writer, _other) = two_connections();
        let mut cache = RowCache::default();
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        cache.put(1, "", ROW);
        exec(&writer, &mut cache, "SAVEPOINT unit");
        cache.put(2, "", ROW);
        exec(&writer, &mut cache, "ROLLBACK TO unit");
        exec(&writer, &mut cache, "RELEASE unit");
        // Still in the transaction, with nothing kept: what the savepoint undid is unknown.
        assert_eq!(
            (cache.get(&writer, 1, ""), cache.get(&writer, 2, "")),
            (None, None)
        );
        cache.put(3, "", ROW);
        assert_eq!(cache.get(&writer, 3, ""), Some(ROW));
        exec(&writer, &mut cache, "ROLLBACK");
        assert!(cache.rows.is_empty());
        // Nothing kept from before the rollback counts as known at the next transaction.
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        cache.put(4, "", ROW);
        exec(&writer, &mut cache, "COMMIT");
        // A failed commit (no transaction is open) forgets too.
        exec(&writer, &mut cache, "COMMIT");
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        assert_eq!(cache.get(&writer, 4, ""), None);
        exec(&writer, &mut cache, "COMMIT");
    }

    #[test]
    fn a_write_replaces_the_copy_and_the_bound_starts_afresh() {
        let (_dir, writer, _other) = two_connections();
        let mut cache = RowCache::default();
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        cache.put(1, "", ROW);
        let capacity = cache.rows.capacity();
        assert!(capacity >= MAX_ROWS, "allocated once, at its full size");
        let five = StockLevels::with_available(5);
        cache.put(1, "", five);
        assert_eq!(cache.get(&writer, 1, ""), Some(five));
        // Sizes of up to 15 bytes are kept, longer ones read every time.
        cache.put(1, "fifteen bytes!!", ROW);
        cache.put(1, "sixteen bytes!!!", ROW);
        assert_eq!(cache.get(&writer, 1, "fifteen bytes!!"), Some(ROW));
        assert_eq!(cache.get(&writer, 1, "sixteen bytes!!"), None);
        assert_eq!(cache.get(&writer, 1, "sixteen bytes!!!"), None);
        assert_eq!(cache.rows.len(), 2);
        for p in 3..=MAX_ROWS as i64 {
            cache.put(p, "", ROW);
        }
        assert_eq!(cache.rows.len(), MAX_ROWS);
        assert_eq!(cache.get(&writer, 1, ""), Some(five));
        // One row past the bound: everything else is forgotten.
        cache.put(0, "XL", ROW);
        assert_eq!(cache.rows.len(), 1);
        assert_eq!(cache.get(&writer, 1, ""), None);
        assert_eq!(cache.get(&writer, 0, "XL"), Some(ROW));
        assert_eq!(cache.rows.capacity(), capacity);
        exec(&writer, &mut cache, "COMMIT");
    }

    /// A cache whose transactions hold writes back, as the writer's do when shared.
    fn holding() -> RowCache {
        RowCache {
            hold: true,
            ..RowCache::default()
        }
    }

    #[test]
    fn writes_held_back_are_handed_over_once_and_rollbacks_drop_them() {
        let (_dir, writer, _other) = two_connections();
        let mut cache = RowCache::default();
        let two = StockLevels::with_available(2);
        // Only when the writer asks for it.
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        cache.put(1, "", ROW);
        assert!(!cache.hold_back(1, "", two));
        exec(&writer, &mut cache, "ROLLBACK");
        cache.hold = true;
        // Outside a transaction nothing is held back.
        assert!(!cache.hold_back(1, "", two));
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        // Only a row kept is held back: one not kept might not exist.
        assert!(!cache.hold_back(1, "", two));
        cache.put(1, "", ROW);
        cache.put(2, "XL", ROW);
        assert!(!cache.has_pending());
        assert!(cache.hold_back(2, "XL", two));
        assert!(cache.hold_back(1, "", two));
        let three = StockLevels::with_available(3);
        assert!(cache.hold_back(2, "XL", three));
        assert!(cache.has_pending());
        // The copy is the last write; each row is handed over once, in the order first
        // held, with its last counters.
        assert_eq!(cache.get(&writer, 2, "XL"), Some(three));
        assert_eq!(
            cache.take_pending(),
            vec![(2, "XL".to_string(), three), (1, String::new(), two)]
        );
        assert!(!cache.has_pending());
        assert_eq!(cache.take_pending(), vec![]);
        assert_eq!(cache.get(&writer, 1, ""), Some(two), "still kept");
        // A rollback to a savepoint drops what is held back with the copies.
        exec(&writer, &mut cache, "SAVEPOINT unit");
        assert!(cache.hold_back(1, "", ROW));
        exec(&writer, &mut cache, "ROLLBACK TO unit");
        exec(&writer, &mut cache, "RELEASE unit");
        assert!(!cache.has_pending());
        assert_eq!(cache.get(&writer, 1, ""), None);
        cache.put(1, "", ROW);
        assert!(cache.hold_back(1, "", two));
        exec(&writer, &mut cache, "ROLLBACK");
        assert!(!cache.has_pending());
        assert!(cache.rows.is_empty());
    }

    #[test]
    fn making_room_keeps_the_rows_held_back_and_their_number_is_bounded() {
        let (_dir, writer, _other) = two_connections();
        let mut cache = holding();
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        for p in 0..MAX_ROWS as i64 {
            cache.put(p, "", ROW);
        }
        let held = StockLevels::with_available(7);
        for p in 0..MAX_PENDING as i64 {
            assert!(cache.hold_back(p, "", held), "row {p}");
        }
        // The bound: the next write goes straight to SQLite.
        assert!(!cache.hold_back(MAX_PENDING as i64, "", held));
        // A copy past the bound drops the copies that are only copies.
        cache.put(-1, "", ROW);
        assert_eq!(cache.rows.len(), MAX_PENDING + 1);
        assert_eq!(cache.get(&writer, 0, ""), Some(held));
        assert_eq!(cache.get(&writer, MAX_PENDING as i64, ""), None);
        assert_eq!(cache.get(&writer, -1, ""), Some(ROW));
        let pending = cache.take_pending();
        assert_eq!(pending.len(), MAX_PENDING);
        assert!(
            pending
                .iter()
                .all(|(_, size, levels)| size.is_empty() && *levels == held)
        );
        exec(&writer, &mut cache, "COMMIT");
    }

    /// A reservation of `n` units of `product` and `size`, at `n` seconds past the epoch.
    fn movement(product: i64, size: Option<&str>, n: i64) -> NewMovement {
        NewMovement {
            at: chrono::DateTime::from_timestamp(n, 0).unwrap(),
            product_id: crate::model::ProductId(product),
            size: size.map(str::to_string),
            kind: crate::model::MovementKind::Reserve,
            delta: crate::model::CounterDelta {
                available: -n,
                reserved: n,
                sold: 0,
            },
            order_id: None,
            payment_hash: None,
            reference: None,
        }
    }

    #[test]
    fn movements_are_held_back_in_order_for_kept_rows_only() {
        let (_dir, writer, _other) = two_connections();
        let mut cache = holding();
        let (a, b, c) = (
            movement(1, None, 1),
            movement(2, Some("M"), 2),
            movement(1, None, 3),
        );
        // Outside a transaction: no.
        assert!(!cache.hold_back_movements(std::slice::from_ref(&a)));
        exec(&writer, &mut cache, "BEGIN IMMEDIATE");
        // A row not kept might not exist: the ledger's foreign key would refuse it at
        // the commit, failing every unit of the transaction.
        assert!(!cache.hold_back_movements(std::slice::from_ref(&a)));
        cache.put(1, "", ROW);
        assert!(
            !cache.hold_back_movements(&[a.clone(), b.clone()]),
            "all or none"
        );
        assert!(!cache.has_pending());
        cache.put(2, "M", ROW);
        assert!(cache.hold_back_movements(&[a.clone(), b.clone()]));
        assert!(cache.hold_back_movements(std::slice::from_ref(&c)));
        assert!(cache.has_pending());
        let taken = cache.take_movements();
        assert_eq!(taken, vec![a.clone(), b, c]);
        assert!(!cache.has_pending());
        cache.give_back_movements(taken);
        // The bound: past it the caller writes everything, then its movements.
        let many = vec![a.clone(); MAX_MOVEMENTS];
        assert!(cache.hold_back_movements(&many));
        assert!(!cache.hold_back_movements(&[a]));
        exec(&writer, &mut cache, "ROLLBACK");
        assert!(!cache.has_pending(), "a rollback drops them");
    }
}
