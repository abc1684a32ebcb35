//! The PostgreSQL schema: the same numbered list of migrations as SQLite's, tracked in a
//! one-row version table and applied under an advisory lock, so that several application
//! instances starting at once migrate the database exactly once.

use postgres::Client;

use crate::error::{Error, Result};

use super::pg_err;

/// Migration `i` (from 0) brings the schema from version `i` to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: products, stock rows, payments and orders.
    "
    CREATE TABLE products (
        id        BIGINT  PRIMARY KEY,
        name      TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
        has_sizes BOOLEAN NOT NULL
    );

    -- size '' is the product-wide row of a product without sizes.
    CREATE TABLE stock (
        product_id BIGINT NOT NULL REFERENCES products (id),
        size       TEXT   NOT NULL CHECK (length(size) <= 64),
        available  BIGINT NOT NULL CHECK (available >= 0),
        reserved   BIGINT NOT NULL CHECK (reserved >= 0),
        sold       BIGINT NOT NULL CHECK (sold >= 0),
        PRIMARY KEY (product_id, size)
    );

    CREATE TABLE payments (
        hash       TEXT        PRIMARY KEY,
        key        TEXT        NOT NULL,
        amount     BIGINT      NOT NULL CHECK (amount >= 0),
        status     TEXT        NOT NULL
                   CHECK (status IN ('pending', 'completed', 'expired', 'cancelled')),
        created_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL,
        paid_at    TIMESTAMPTZ
    );

    CREATE TABLE orders (
        id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        payment_hash       TEXT        NOT NULL REFERENCES payments (hash),
        product_id         BIGINT      NOT NULL,
        size               TEXT        NOT NULL,
        quantity           BIGINT      NOT NULL CHECK (quantity > 0),
        unit_price         BIGINT      NOT NULL CHECK (unit_price >= 0),
        customer_ref       TEXT,
        status             TEXT        NOT NULL
                           CHECK (status IN ('under_paying', 'pending', 'cancelled')),
        payment_status     TEXT        NOT NULL
                           CHECK (payment_status IN ('pending', 'completed', 'expired', 'cancelled')),
        created_at         TIMESTAMPTZ NOT NULL,
        payment_expires_at TIMESTAMPTZ NOT NULL,
        paid_at            TIMESTAMPTZ,
        admin_notes        TEXT,
        FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)
    );
    CREATE INDEX orders_by_payment ON orders (payment_hash);
    CREATE INDEX orders_awaiting_payment ON orders (payment_expires_at, id)
        WHERE status = 'under_paying';
    ",
    // 2: the append-only stock ledger and stock counts.
    "
    CREATE TABLE stock_movements (
        id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at              TIMESTAMPTZ NOT NULL,
        product_id      BIGINT      NOT NULL,
        size            TEXT        NOT NULL,
        kind            TEXT        NOT NULL CHECK (kind IN ('reserve', 'release', 'sale',
                            'expire', 'cancel', 'restock', 'count_correction',
                            'late_payment_revival', 'hold', 'hold_release', 'hold_expire',
                            'hold_convert')),
        available_delta BIGINT      NOT NULL,
        reserved_delta  BIGINT      NOT NULL,
        sold_delta      BIGINT      NOT NULL,
        order_id        BIGINT,
        payment_hash    TEXT,
        reference       TEXT,
        FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)
    );
    CREATE INDEX stock_movements_by_product ON stock_movements (product_id, at, id);
    CREATE INDEX stock_movements_by_time ON stock_movements (at);
    CREATE FUNCTION stock_movements_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'stock movements are append-only';
    END $$;
    CREATE TRIGGER stock_movements_append_only BEFORE UPDATE OR DELETE ON stock_movements
        FOR EACH ROW EXECUTE FUNCTION stock_movements_append_only();

    CREATE TABLE stock_counts (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at          TIMESTAMPTZ NOT NULL,
        product_id  BIGINT      NOT NULL,
        size        TEXT        NOT NULL,
        expected    BIGINT      NOT NULL CHECK (expected >= 0),
        counted     BIGINT      NOT NULL CHECK (counted >= 0),
        discrepancy BIGINT      NOT NULL,
        applied     BOOLEAN     NOT NULL,
        available   BIGINT      NOT NULL CHECK (available >= 0),
        reserved    BIGINT      NOT NULL CHECK (reserved >= 0),
        sold        BIGINT      NOT NULL CHECK (sold >= 0),
        FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)
    );
    CREATE INDEX stock_counts_by_time ON stock_counts (at);

    INSERT INTO stock_movements (at, product_id, size, kind, available_delta, reserved_delta,
                                 sold_delta, reference)
    SELECT date_trunc('microseconds', now()), product_id, size, 'count_correction',
           available, reserved, sold, 'opening balance'
    FROM stock WHERE available > 0 OR reserved > 0 OR sold > 0;
    ",
    // 3: cart holds, and the index that tells awaiting-payment units per stock row.
    "
    CREATE TABLE cart_holds (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        cart_id    TEXT        NOT NULL CHECK (length(cart_id) BETWEEN 1 AND 64),
        product_id BIGINT      NOT NULL,
        size       TEXT        NOT NULL,
        quantity   BIGINT      NOT NULL CHECK (quantity >= 0),
        status     TEXT        NOT NULL
                   CHECK (status IN ('active', 'released', 'expired', 'converted')),
        created_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL,
        FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)
    );
    CREATE UNIQUE INDEX cart_holds_active ON cart_holds (cart_id, product_id, size)
        WHERE status = 'active';
    CREATE INDEX cart_holds_expiry ON cart_holds (expires_at, id) WHERE status = 'active';
    CREATE INDEX cart_holds_by_row ON cart_holds (product_id, size) WHERE status = 'active';
    CREATE INDEX orders_awaiting_by_row ON orders (product_id, size)
        WHERE status = 'under_paying';
    ",
];

/// The schema version this code writes.
pub(crate) const LATEST: i64 = MIGRATIONS.len() as i64;

/// An arbitrary, fixed key for the migration's advisory lock ("stockrm" in ASCII).
const MIGRATION_LOCK: i64 = 0x73_74_6f_63_6b_72_6d;

/// Brings the schema to [`LATEST`] in one transaction, holding an advisory lock so that
/// instances starting together wait for each other instead of racing. Refuses a database
/// newer than the code.
pub(crate) fn migrate(client: &mut Client, schema: Option<&str>) -> Result<()> {
    let mut tx = client.transaction().map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg_err)?;
    if let Some(schema) = schema {
        // The name was checked to be a plain identifier when the store was configured.
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .map_err(pg_err)?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS stockroom_schema (
             one     BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
             version BIGINT  NOT NULL
         );
         INSERT INTO stockroom_schema (version) VALUES (0) ON CONFLICT (one) DO NOTHING;",
    )
    .map_err(pg_err)?;
    let found: i64 = tx
        .query_one("SELECT version FROM stockroom_schema", &[])
        .map_err(pg_err)?
        .get(0);
    if found > LATEST {
        return Err(Error::SchemaTooNew {
            found,
            supported: LATEST,
        });
    }
    if found < 0 {
        return Err(Error::storage(
            "postgres",
            format!("database schema version {found} is not one stockroom writes"),
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        log::debug!("postgres: applying migration {}", i + 1);
        tx.batch_execute(sql).map_err(pg_err)?;
    }
    if found < LATEST {
        tx.execute("UPDATE stockroom_schema SET version = $1", &[&LATEST])
            .map_err(pg_err)?;
        log::info!("postgres: schema migrated from version {found} to {LATEST}");
    }
    tx.commit().map_err(pg_err)
}
