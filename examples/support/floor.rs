//! The floor: the reservation a user would write by hand with bare rusqlite, one
//! transaction each. `examples/loadgen.rs` and `benches/stock.rs` both include this file,
//! so the two measure the same SQL.

use rusqlite::{Connection, params};

/// Creates the floor's `stock` table (the library's CHECK constraints, SQLite's defaults
/// otherwise) in WAL mode with `synchronous` (`NORMAL` or `FULL`), holding `products`
/// product-wide rows of `units` available units each.
pub fn create(
    conn: &Connection,
    synchronous: &str,
    products: i64,
    units: i64,
) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
         CREATE TABLE stock (product_id INTEGER NOT NULL, size TEXT NOT NULL,
             available INTEGER NOT NULL CHECK (available >= 0),
             reserved INTEGER NOT NULL CHECK (reserved >= 0),
             sold INTEGER NOT NULL CHECK (sold >= 0),
             PRIMARY KEY (product_id, size)) STRICT, WITHOUT ROWID;"
    ))?;
    let tx = conn.unchecked_transaction()?;
    for p in 1..=products {
        tx.execute(
            "INSERT INTO stock VALUES (?1, '', ?2, 0, 0)",
            params![p, units],
        )?;
    }
    tx.commit()
}

/// Reserves one unit of `product` in a transaction of its own; the rows changed (0 when
/// the product has none left).
pub fn reserve(conn: &Connection, product: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let n = conn
        .prepare_cached(
            "UPDATE stock SET available = available - 1, reserved = reserved + 1 \
             WHERE product_id = ?1 AND size = '' AND available >= 1",
        )?
        .execute([product])?;
    conn.prepare_cached("COMMIT")?.execute([])?;
    Ok(n)
}
