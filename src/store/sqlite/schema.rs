//! The SQLite schema: an append-only list of migrations tracked by `PRAGMA user_version`.
//!
//! Never edit a migration that has shipped; append a new one.

use rusqlite::Connection;

use crate::error::{Error, Result};

use super::ledger_index::{Entries, catch_up_id};
use super::{BACKEND, sql_err};

/// Migration `i` (from 0) brings the schema from version `i` to version `i + 1`: the SQL
/// migrations, then [`STATUS_CHECKS`] (version 5), [`LEDGER_BY_PRODUCT`] (6) and
/// [`LEDGER_PACKS`] (7).
const MIGRATIONS: &[&str] = &[
    // 1: products, stock rows, payments and orders.
    "
    CREATE TABLE products (
        id        INTEGER PRIMARY KEY,
        name      TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
        has_sizes INTEGER NOT NULL CHECK (has_sizes IN (0, 1))
    ) STRICT;

    -- size '' is the product-wide row of a product without sizes.
    CREATE TABLE stock (
        product_id INTEGER NOT NULL REFERENCES products (id),
        size       TEXT    NOT NULL CHECK (length(size) <= 64),
        available  INTEGER NOT NULL CHECK (available >= 0),
        reserved   INTEGER NOT NULL CHECK (reserved >= 0),
        sold       INTEGER NOT NULL CHECK (sold >= 0),
        PRIMARY KEY (product_id, size)
    ) STRICT, WITHOUT ROWID;

    CREATE TABLE payments (
        hash       TEXT    PRIMARY KEY,
        key        TEXT    NOT NULL,
        amount     INTEGER NOT NULL CHECK (amount >= 0),
        status     TEXT    NOT NULL
                   CHECK (status IN ('pending', 'completed', 'expired', 'cancelled')),
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        paid_at    INTEGER
    ) STRICT;

    CREATE TABLE orders (
        id                 INTEGER PRIMARY KEY AUTOINCREMENT,
        payment_hash       TEXT    NOT NULL REFERENCES payments (hash),
        product_id         INTEGER NOT NULL,
        size               TEXT    NOT NULL,
        quantity           INTEGER NOT NULL CHECK (quantity > 0),
        unit_price         INTEGER NOT NULL CHECK (unit_price >= 0),
        customer_ref       TEXT,
        status             TEXT    NOT NULL
                           CHECK (status IN ('under_paying', 'pending', 'cancelled')),
        payment_status     TEXT    NOT NULL
                           CHECK (payment_status IN ('pending', 'completed', 'expired', 'cancelled')),
        created_at         INTEGER NOT NULL,
        payment_expires_at INTEGER NOT NULL,
        paid_at            INTEGER,
        admin_notes        TEXT,
        FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)
    ) STRICT;

    CREATE INDEX orders_by_payment ON orders (payment_hash);
    -- Cleanup reads only the orders still waiting for payment, oldest window first: its
    -- cost follows the number of expired orders, not the number of orders.
    CREATE INDEX orders_awaiting_payment ON orders (payment_expires_at, id)
        WHERE status = 'under_paying';
    ",
    // 2: the append-only stock ledger and stock counts.
    "
    CREATE TABLE stock_movements (
        id              INTEGER PRIMARY KEY,
        at              INTEGER NOT NULL,
        product_id      INTEGER NOT NULL,
        size            TEXT    NOT NULL,
        kind            TEXT    NOT NULL CHECK (kind IN ('reserve', 'release', 'sale', 'expire',
                            'cancel', 'restock', 'count_correction', 'late_payment_revival',
                            'hold', 'hold_release', 'hold_expire', 'hold_convert')),
        available_delta INTEGER NOT NULL,
        reserved_delta  INTEGER NOT NULL,
        sold_delta      INTEGER NOT NULL,
        order_id        INTEGER,
        payment_hash    TEXT,
        reference       TEXT,
        FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)
    ) STRICT;
    -- A product's movements in a time range, oldest first; metrics over a time window
    -- go through it product by product. No index by time alone: it would cost every
    -- movement one more page write.
    CREATE INDEX stock_movements_by_product ON stock_movements (product_id, at, id);
    CREATE TRIGGER stock_movements_append_only_update BEFORE UPDATE ON stock_movements
    BEGIN SELECT RAISE(ABORT, 'stock movements are append-only'); END;
    CREATE TRIGGER stock_movements_append_only_delete BEFORE DELETE ON stock_movements
    BEGIN SELECT RAISE(ABORT, 'stock movements are append-only'); END;

    CREATE TABLE stock_counts (
        id          INTEGER PRIMARY KEY,
        at          INTEGER NOT NULL,
        product_id  INTEGER NOT NULL,
        size        TEXT    NOT NULL,
        expected    INTEGER NOT NULL CHECK (expected >= 0),
        counted     INTEGER NOT NULL CHECK (counted >= 0),
        discrepancy INTEGER NOT NULL,
        applied     INTEGER NOT NULL CHECK (applied IN (0, 1)),
        available   INTEGER NOT NULL CHECK (available >= 0),
        reserved    INTEGER NOT NULL CHECK (reserved >= 0),
        sold        INTEGER NOT NULL CHECK (sold >= 0),
        FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)
    ) STRICT;
    CREATE INDEX stock_counts_by_time ON stock_counts (at);

    -- Stock that existed before the ledger gets an opening balance, so that every row's
    -- movements add up to its counters from the start.
    INSERT INTO stock_movements (at, product_id, size, kind, available_delta, reserved_delta,
                                 sold_delta, reference)
    SELECT CAST(unixepoch('subsec') * 1000000 AS INTEGER), product_id, size,
           'count_correction', available, reserved, sold, 'opening balance'
    FROM stock WHERE available > 0 OR reserved > 0 OR sold > 0;
    ",
    // 3: cart holds, and the index that tells awaiting-payment units per stock row.
    "
    CREATE TABLE cart_holds (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        cart_id    TEXT    NOT NULL CHECK (length(cart_id) BETWEEN 1 AND 64),
        product_id INTEGER NOT NULL,
        size       TEXT    NOT NULL,
        quantity   INTEGER NOT NULL CHECK (quantity >= 0),
        status     TEXT    NOT NULL
                   CHECK (status IN ('active', 'released', 'expired', 'converted')),
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)
    ) STRICT;
    -- One active hold per cart and stock row; a cart's holds are found by this too.
    CREATE UNIQUE INDEX cart_holds_active ON cart_holds (cart_id, product_id, size)
        WHERE status = 'active';
    -- Cleanup reads only the active holds, oldest expiry first.
    CREATE INDEX cart_holds_expiry ON cart_holds (expires_at, id) WHERE status = 'active';
    -- Units held and awaiting payment per stock row.
    CREATE INDEX cart_holds_by_row ON cart_holds (product_id, size) WHERE status = 'active';
    CREATE INDEX orders_awaiting_by_row ON orders (product_id, size)
        WHERE status = 'under_paying';
    ",
    // 4: the ledger's kind check as a chain of comparisons. SQLite evaluates a CHECK of
    // `kind IN (<12 names>)` by filling a temporary b-tree with the 12 names for every
    // row written: 12 b-tree inserts per movement, more work than the movement's own
    // row and index. The table is rebuilt (SQLite cannot change a CHECK in place), its
    // rows, ids, index and triggers kept.
    "
    CREATE TABLE stock_movements_v4 (
        id              INTEGER PRIMARY KEY,
        at              INTEGER NOT NULL,
        product_id      INTEGER NOT NULL,
        size            TEXT    NOT NULL,
        kind            TEXT    NOT NULL CHECK (
                            kind = 'reserve' OR kind = 'release' OR kind = 'sale'
                            OR kind = 'expire' OR kind = 'cancel' OR kind = 'restock'
                            OR kind = 'count_correction' OR kind = 'late_payment_revival'
                            OR kind = 'hold' OR kind = 'hold_release' OR kind = 'hold_expire'
                            OR kind = 'hold_convert'),
        available_delta INTEGER NOT NULL,
        reserved_delta  INTEGER NOT NULL,
        sold_delta      INTEGER NOT NULL,
        order_id        INTEGER,
        payment_hash    TEXT,
        reference       TEXT,
        FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)
    ) STRICT;
    INSERT INTO stock_movements_v4 (id, at, product_id, size, kind, available_delta,
                                    reserved_delta, sold_delta, order_id, payment_hash,
                                    reference)
    SELECT id, at, product_id, size, kind, available_delta, reserved_delta, sold_delta,
           order_id, payment_hash, reference
    FROM stock_movements ORDER BY id;
    DROP TABLE stock_movements;
    ALTER TABLE stock_movements_v4 RENAME TO stock_movements;
    CREATE INDEX stock_movements_by_product ON stock_movements (product_id, at, id);
    CREATE TRIGGER stock_movements_append_only_update BEFORE UPDATE ON stock_movements
    BEGIN SELECT RAISE(ABORT, 'stock movements are append-only'); END;
    CREATE TRIGGER stock_movements_append_only_delete BEFORE DELETE ON stock_movements
    BEGIN SELECT RAISE(ABORT, 'stock movements are append-only'); END;
    ",
];

/// 5: the status checks of payments, orders and cart holds as chains of comparisons.
/// Like the ledger's kind (version 4), SQLite evaluated each `status IN (3 or 4 names)`
/// by building a temporary b-tree of the names for every row written, which cost more
/// than writing the row: a cleanup of 10,000 expired orders spent a fifth of its time
/// there. The rules are the same, so no row can break the new ones, and the file's
/// content does not change: the tables' definitions are edited in place in
/// `sqlite_schema`, the procedure SQLite documents for changing a CHECK constraint
/// ("Making Other Kinds Of Table Schema Changes"), instead of copying every order.
const STATUS_CHECKS: &[(&str, &str, &[&str])] = &[
    (
        "payments",
        "status",
        &["pending", "completed", "expired", "cancelled"],
    ),
    (
        "orders",
        "status",
        &["under_paying", "pending", "cancelled"],
    ),
    (
        "orders",
        "payment_status",
        &["pending", "completed", "expired", "cancelled"],
    ),
    (
        "cart_holds",
        "status",
        &["active", "released", "expired", "converted"],
    ),
];

/// 6: the ledger's index by product as a table the writer fills in bulk (see
/// `ledger_index.rs`), in place of an index SQLite writes with every movement. Each
/// movement then costs one append and no descent to a random leaf of a by-product index;
/// `ledger_indexed.upto` is the last movement id that `ledger_by_product` holds, and
/// reads scan the movements after it.
const LEDGER_BY_PRODUCT: &str = "
    CREATE TABLE ledger_by_product (
        product_id INTEGER NOT NULL,
        at         INTEGER NOT NULL,
        id         INTEGER NOT NULL,
        size       TEXT    NOT NULL,
        PRIMARY KEY (product_id, at, id)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE ledger_indexed (
        one  INTEGER PRIMARY KEY CHECK (one = 1),
        upto INTEGER NOT NULL
    ) STRICT;
    INSERT INTO ledger_by_product (product_id, at, id, size)
    SELECT product_id, at, id, size FROM stock_movements ORDER BY product_id, at, id;
    INSERT INTO ledger_indexed (one, upto) SELECT 1, coalesce(max(id), 0) FROM stock_movements;
    DROP INDEX stock_movements_by_product;
";

/// 7: the ledger's index by product in packs (see `ledger_index.rs`): each row holds up
/// to 48 movements of one product and size, so a catch-up inserts one row for many
/// movements instead of one for each. The first movement is in the key, the others in
/// `entries`, and `span` is the time from the first to the last, so that a pack of one
/// movement takes about what a row of version 6 took. `catch_up` is a number drawn by
/// each catch-up, so that two catch-ups (one cut short by a crash and the next, or two
/// processes' at once) do not write the same key. Filled from `ledger_by_product` by
/// [`pack_ledger_index`].
const LEDGER_PACKS: &str = "
    CREATE TABLE ledger_packs (
        product_id INTEGER NOT NULL,
        first_at   INTEGER NOT NULL,
        first_id   INTEGER NOT NULL,
        catch_up   INTEGER NOT NULL,
        span       INTEGER NOT NULL,
        size       TEXT    NOT NULL,
        entries    BLOB    NOT NULL,
        PRIMARY KEY (product_id, first_at, first_id, catch_up)
    ) STRICT, WITHOUT ROWID;
";

/// The schema version the status checks come to (see [`STATUS_CHECKS`]).
const STATUS_CHECKS_VERSION: i64 = MIGRATIONS.len() as i64 + 1;

/// The schema version that indexes the ledger by product in bulk (see
/// [`LEDGER_BY_PRODUCT`]).
const LEDGER_BY_PRODUCT_VERSION: i64 = STATUS_CHECKS_VERSION + 1;

/// The schema version this code writes.
pub(crate) const LATEST: i64 = LEDGER_BY_PRODUCT_VERSION + 1;

/// Brings the database to [`LATEST`], in one `IMMEDIATE` transaction, so that two
/// processes opening a new file at once do not both migrate it. Refuses a database newer
/// than the code.
pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    let found: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql_err)?;
    if found < 0 {
        return Err(Error::storage(
            BACKEND,
            format!("database schema version {found} is not one stockroom writes"),
        ));
    }
    if found > LATEST {
        return Err(Error::SchemaTooNew {
            found,
            supported: LATEST,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        log::debug!("sqlite: applying migration {}", i + 1);
        tx.execute_batch(sql).map_err(sql_err)?;
    }
    if found < STATUS_CHECKS_VERSION {
        log::debug!("sqlite: applying migration {STATUS_CHECKS_VERSION}");
        rewrite_status_checks(&tx)?;
    }
    if found < LEDGER_BY_PRODUCT_VERSION {
        log::debug!("sqlite: applying migration {LEDGER_BY_PRODUCT_VERSION}");
        tx.execute_batch(LEDGER_BY_PRODUCT).map_err(sql_err)?;
    }
    if found < LATEST {
        log::debug!("sqlite: applying migration {LATEST}");
        pack_ledger_index(&tx)?;
        // PRAGMA takes no parameters; LATEST is a constant of this crate.
        tx.execute_batch(&format!("PRAGMA user_version = {LATEST}"))
            .map_err(sql_err)?;
        log::info!("sqlite: schema migrated from version {found} to {LATEST}");
    }
    tx.commit().map_err(sql_err)
}

/// Version 7: creates `ledger_packs` and fills it with the entries of `ledger_by_product`
/// that `ledger_indexed.upto` covers (those past it, left by a catch-up cut short, the
/// next catch-up writes again), then drops `ledger_by_product`.
fn pack_ledger_index(conn: &Connection) -> Result<()> {
    /// Entries packed at a time: the migration's memory stays bounded whatever the
    /// ledger's length (a run cut here makes one pack shorter).
    const AT_A_TIME: usize = 4_096;
    conn.execute_batch(LEDGER_PACKS).map_err(sql_err)?;
    let mut select = conn
        .prepare(
            "SELECT product_id, size, at, id FROM ledger_by_product \
             WHERE id <= (SELECT upto FROM ledger_indexed) ORDER BY product_id, at, id",
        )
        .map_err(sql_err)?;
    let catch_up = catch_up_id()?;
    let mut entries = Entries::default();
    let flush = |entries: &mut Entries| {
        entries.sort();
        let packed = entries.insert_packs(0..entries.len(), catch_up, |sql, params| {
            conn.prepare_cached(sql)?.execute(params).map(drop)
        });
        *entries = Entries::default();
        packed.map_err(sql_err)
    };
    let mut rows = select.query([]).map_err(sql_err)?;
    while let Some(row) = rows.next().map_err(sql_err)? {
        entries.push_row(row).map_err(sql_err)?;
        if entries.len() == AT_A_TIME {
            flush(&mut entries)?;
        }
    }
    flush(&mut entries)?;
    drop(rows);
    drop(select);
    conn.execute_batch("DROP TABLE ledger_by_product")
        .map_err(sql_err)
}

/// `CHECK (status IN ('a', 'b'))` in a table's definition becomes
/// `CHECK (status = 'a' OR status = 'b')`, for every entry of [`STATUS_CHECKS`], inside
/// the caller's transaction. A table that already has the new check is left as it is;
/// one that has neither refuses the migration (and so rolls it back).
fn rewrite_status_checks(conn: &Connection) -> Result<()> {
    let version: i64 = conn
        .query_row("PRAGMA schema_version", [], |r| r.get(0))
        .map_err(sql_err)?;
    conn.execute_batch("PRAGMA writable_schema = ON")
        .map_err(sql_err)?;
    let rewritten = STATUS_CHECKS.iter().try_for_each(|(table, column, names)| {
        let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
        let from = format!("CHECK ({column} IN ({}))", quoted.join(", "));
        let compared: Vec<String> = quoted.iter().map(|n| format!("{column} = {n}")).collect();
        let to = format!("CHECK ({})", compared.join(" OR "));
        conn.execute(
            "UPDATE sqlite_schema SET sql = replace(sql, ?2, ?3) \
             WHERE type = 'table' AND name = ?1 AND instr(sql, ?2) > 0",
            rusqlite::params![table, from, to],
        )
        .map_err(sql_err)?;
        let has_new: bool = conn
            .query_row(
                "SELECT count(*) = 1 FROM sqlite_schema \
                 WHERE type = 'table' AND name = ?1 AND instr(sql, ?2) > 0",
                rusqlite::params![table, to],
                |r| r.get(0),
            )
            .map_err(sql_err)?;
        if has_new {
            Ok(())
        } else {
            Err(Error::storage(
                BACKEND,
                format!("table {table} does not have the check `{from}` this migration rewrites"),
            ))
        }
    });
    // Whatever happened, schema editing goes off again before the transaction ends.
    let off = conn
        .execute_batch(&format!(
            "PRAGMA schema_version = {}; PRAGMA writable_schema = OFF",
            version + 1
        ))
        .map_err(sql_err);
    rewritten?;
    off?;
    // The edited definitions must parse: read each table once through the new schema.
    for (table, _, _) in STATUS_CHECKS {
        conn.prepare(&format!("SELECT * FROM {table} LIMIT 0"))
            .map_err(sql_err)?;
    }
    Ok(())
}
