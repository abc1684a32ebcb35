//! [`PostgresStore`]: several application instances sharing one stock (feature
//! `postgres`).

mod schema;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, IsolationLevel, NoTls, Row, Statement, Transaction};
use r2d2_postgres::PostgresConnectionManager;

use crate::error::{Error, Result};
use crate::model::{
    CounterDelta, Hold, HoldId, HoldStatus, KindTotal, MAX_STOCK, MovementKind, MovementQuery,
    NewHold, NewMovement, NewOrder, Order, OrderId, OrderStatus, Payment, PaymentStatus, Product,
    ProductId, StockCount, StockCountRecord, StockLevels, StockMovement,
};
use crate::store::{LedgerBalance, ReadUnit, StockRead, StockRow, StockStore, StockTx, WriteUnit};

const BACKEND: &str = "postgres";

pub(crate) fn pg_err(e: postgres::Error) -> Error {
    Error::storage(BACKEND, e)
}

/// The SQLSTATE of a PostgreSQL error inside `e`, if it carries one.
fn sqlstate(e: &Error) -> Option<&SqlState> {
    let Error::Storage { source, .. } = e else {
        return None;
    };
    source.downcast_ref::<postgres::Error>()?.code()
}

/// Whether running the unit again may succeed: a serialization failure or a deadlock.
fn is_transient(e: &Error) -> bool {
    matches!(
        sqlstate(e),
        Some(s) if *s == SqlState::T_R_SERIALIZATION_FAILURE || *s == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// Settings of a [`PostgresStore`].
///
/// Its `Debug` output hides the password of the connection URL.
///
/// ```
/// use stockroom::PostgresConfig;
///
/// let config = PostgresConfig::new("postgres://shop:s3cret@db.internal/shop")
///     .with_pool_size(16)
///     .with_schema("stockroom");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// A libpq-style URL (`postgres://user:password@host:port/db`) or key=value string.
    pub url: String,
    /// Connections in this instance's pool: 8 by default.
    pub pool_size: u32,
    /// How many times a unit is run again after a serialization failure or deadlock
    /// before the error is reported: 10 by default.
    pub max_retries: u32,
    /// The schema that holds stockroom's tables, created if missing: the connection's
    /// default (`public`) when `None`. Letters, digits and `_` only.
    pub schema: Option<String>,
    /// How long to wait for a new connection: 10 seconds by default.
    pub connect_timeout: Duration,
}

impl PostgresConfig {
    /// Settings for `url`, with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            pool_size: 8,
            max_retries: 10,
            schema: None,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// The same settings with another pool size (at least 1).
    pub fn with_pool_size(mut self, size: u32) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// The same settings with another retry bound.
    pub fn with_max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// The same settings with another connection timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The same settings, keeping stockroom's tables in `schema`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }
}

/// `url` with any password replaced by `***`.
fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            if let Some(colon) = authority[..at].find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &authority[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact(&self.url))
            .field("pool_size", &self.pool_size)
            .field("max_retries", &self.max_retries)
            .field("schema", &self.schema)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// A store on PostgreSQL, for several application instances sharing one stock.
///
/// - Write units run in `READ COMMITTED` transactions that lock every row they load
///   (`FOR NO KEY UPDATE`); the services load several stock rows in (product id, size)
///   order, so two checkouts never wait for each other in opposite orders. A
///   serialization failure or deadlock runs the unit again, up to
///   [`PostgresConfig::max_retries`] times with a jittered pause, then is reported as
///   [`Error::Storage`] carrying the SQLSTATE.
/// - Cleanup takes expired orders and holds with `FOR UPDATE SKIP LOCKED`, so instances
///   cleaning up at once split the work instead of waiting on each other row by row.
/// - Reads run in read-only `REPEATABLE READ` transactions: one consistent snapshot.
/// - The schema is migrated on connect under an advisory lock.
///
/// ```no_run
/// use std::sync::Arc;
/// use stockroom::{PostgresConfig, PostgresStore, StockService};
///
/// let store = PostgresStore::connect(PostgresConfig::new("postgres://shop@localhost/shop"))?;
/// let stock = StockService::new(Arc::new(store));
/// # Ok::<(), stockroom::Error>(())
/// ```
pub struct PostgresStore {
    pool: r2d2::Pool<Manager>,
    config: PostgresConfig,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

impl PostgresStore {
    /// Connects, builds the pool and migrates the schema.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] if the URL is malformed, the schema name is not a plain
    /// identifier, or the server cannot be reached; [`Error::SchemaTooNew`] if a newer
    /// version of stockroom wrote the database.
    pub fn connect(config: PostgresConfig) -> Result<Self> {
        let mut pg: postgres::Config = config
            .url
            .parse()
            .map_err(|e: postgres::Error| Error::storage(BACKEND, e))?;
        pg.connect_timeout(config.connect_timeout);
        if let Some(schema) = &config.schema {
            if !is_identifier(schema) {
                return Err(Error::storage(
                    BACKEND,
                    format!("schema name {schema:?} is not a plain identifier"),
                ));
            }
            pg.options(&format!("-c search_path={schema}"));
        }
        let manager = Manager(PostgresConnectionManager::new(pg, NoTls));
        let pool = r2d2::Pool::builder()
            .max_size(config.pool_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(config.connect_timeout)
            .build(manager)
            .map_err(|e| Error::storage(BACKEND, e))?;
        {
            let mut client = pool.get().map_err(|e| Error::storage(BACKEND, e))?;
            schema::migrate(&mut client.client, config.schema.as_deref())?;
        }
        log::debug!("postgres: connected ({config:?})");
        Ok(PostgresStore { pool, config })
    }

    /// The settings this store was opened with.
    pub fn config(&self) -> &PostgresConfig {
        &self.config
    }

    fn client(&self) -> Result<r2d2::PooledConnection<Manager>> {
        self.pool.get().map_err(|e| Error::storage(BACKEND, e))
    }
}

/// The pool's connections: a client and the statements prepared on it.
struct Manager(PostgresConnectionManager<NoTls>);

/// A pooled connection with its prepared statements, by SQL text. Each statement is
/// prepared once per connection (a round trip) and then only bound and executed: a
/// reservation is 4 round trips instead of 6. The texts are the store's own, a few dozen.
struct Connection {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Connection;
    type Error = postgres::Error;

    fn connect(&self) -> std::result::Result<Connection, postgres::Error> {
        Ok(Connection {
            client: self.0.connect()?,
            statements: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut Connection) -> std::result::Result<(), postgres::Error> {
        self.0.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        self.0.has_broken(&mut conn.client)
    }
}

/// A pause before retry `attempt` (from 1): exponential from 2 ms, capped at 200 ms, with
/// full jitter so that retrying instances spread out.
fn backoff(attempt: u32) -> Duration {
    let cap = 2u64.saturating_pow(attempt).min(200);
    let mut b = [0u8; 4];
    let jitter = match getrandom::fill(&mut b) {
        Ok(()) => u64::from(u32::from_le_bytes(b)) % (cap * 1000 + 1),
        Err(_) => cap * 500,
    };
    Duration::from_micros(jitter)
}

impl StockStore for PostgresStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn write(&self, mut unit: WriteUnit) -> Result<()> {
        let mut conn = self.client()?;
        let Connection { client, statements } = &mut *conn;
        let mut attempt = 0;
        loop {
            let outcome = (|| {
                let mut tx = client.transaction().map_err(pg_err)?;
                unit(&mut PgTx {
                    tx: &mut tx,
                    statements: &mut *statements,
                    locking: true,
                })?;
                tx.commit().map_err(pg_err)
            })();
            match outcome {
                Err(e) if is_transient(&e) && attempt < self.config.max_retries => {
                    attempt += 1;
                    let pause = backoff(attempt);
                    log::debug!("postgres: {e}; running the unit again in {pause:?}");
                    std::thread::sleep(pause);
                }
                Err(e) if is_transient(&e) => {
                    let state = sqlstate(&e)
                        .map(|s| s.code().to_owned())
                        .unwrap_or_default();
                    log::error!("postgres: giving up after {attempt} retries (SQLSTATE {state})");
                    return Err(Error::storage(
                        BACKEND,
                        format!("SQLSTATE {state} after {attempt} retries: {e}"),
                    ));
                }
                other => return other,
            }
        }
    }

    fn read(&self, unit: ReadUnit<'_>) -> Result<()> {
        let mut conn = self.client()?;
        let Connection { client, statements } = &mut *conn;
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(pg_err)?;
        let outcome = unit(&mut PgTx {
            tx: &mut tx,
            statements,
            locking: false,
        });
        let end = tx.rollback().map_err(pg_err);
        outcome.and(end)
    }
}

/// A unit's view of the database: one transaction, locking what it loads when it is a
/// write unit.
struct PgTx<'a, 'c> {
    tx: &'a mut Transaction<'c>,
    statements: &'a mut HashMap<String, Statement>,
    locking: bool,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl PgTx<'_, '_> {
    /// `sql` with `lock` appended in a write unit.
    fn locked(&self, sql: &str, lock: &str) -> String {
        if self.locking {
            format!("{sql} {lock}")
        } else {
            sql.to_owned()
        }
    }

    /// The statement for `sql`, prepared on this connection the first time. Prepared
    /// statements belong to the session, so a rolled-back transaction keeps them.
    fn prepared(&mut self, sql: &str) -> Result<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.tx.prepare(sql).map_err(pg_err)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let statement = self.prepared(sql)?;
        self.tx.query(&statement, params).map_err(pg_err)
    }

    fn query_opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let statement = self.prepared(sql)?;
        self.tx.query_opt(&statement, params).map_err(pg_err)
    }

    fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64> {
        let statement = self.prepared(sql)?;
        self.tx.execute(&statement, params).map_err(pg_err)
    }
}

fn db(value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::storage(BACKEND, format!("{value} does not fit")))
}

fn unsigned(row: &Row, idx: usize) -> Result<u64> {
    let v: i64 = row.try_get(idx).map_err(pg_err)?;
    u64::try_from(v)
        .map_err(|_| Error::storage(BACKEND, format!("negative value {v} in column {idx}")))
}

fn get<'r, T: postgres::types::FromSql<'r>>(row: &'r Row, idx: usize) -> Result<T> {
    row.try_get(idx).map_err(pg_err)
}

fn size_db(size: Option<&str>) -> &str {
    size.unwrap_or("")
}

fn size_from(row: &Row, idx: usize) -> Result<Option<String>> {
    let s: String = get(row, idx)?;
    Ok((!s.is_empty()).then_some(s))
}

fn parsed<T>(row: &Row, idx: usize, what: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
    let s: String = get(row, idx)?;
    parse(&s).ok_or_else(|| Error::storage(BACKEND, format!("unknown {what} {s:?}")))
}

fn levels(row: &Row, first: usize) -> Result<StockLevels> {
    Ok(StockLevels {
        available: unsigned(row, first)?,
        reserved: unsigned(row, first + 1)?,
        sold: unsigned(row, first + 2)?,
    })
}

fn delta(row: &Row, first: usize) -> Result<CounterDelta> {
    Ok(CounterDelta {
        available: get(row, first)?,
        reserved: get(row, first + 1)?,
        sold: get(row, first + 2)?,
    })
}

const ORDER_COLUMNS: &str = "id, payment_hash, product_id, size, quantity, unit_price, \
     customer_ref, status, payment_status, created_at, payment_expires_at, paid_at, admin_notes";

fn order(row: &Row) -> Result<Order> {
    Ok(Order {
        id: OrderId(get(row, 0)?),
        payment_hash: get(row, 1)?,
        product_id: ProductId(get(row, 2)?),
        size: size_from(row, 3)?,
        quantity: unsigned(row, 4)?,
        unit_price: unsigned(row, 5)?,
        customer_ref: get(row, 6)?,
        status: parsed(row, 7, "order status", OrderStatus::parse)?,
        payment_status: parsed(row, 8, "payment status", PaymentStatus::parse)?,
        created_at: get(row, 9)?,
        payment_expires_at: get(row, 10)?,
        paid_at: get(row, 11)?,
        admin_notes: get(row, 12)?,
    })
}

const HOLD_COLUMNS: &str =
    "id, cart_id, product_id, size, quantity, status, created_at, expires_at";

fn hold(row: &Row) -> Result<Hold> {
    Ok(Hold {
        id: HoldId(get(row, 0)?),
        cart_id: get(row, 1)?,
        product_id: ProductId(get(row, 2)?),
        size: size_from(row, 3)?,
        quantity: unsigned(row, 4)?,
        status: parsed(row, 5, "hold status", HoldStatus::parse)?,
        created_at: get(row, 6)?,
        expires_at: get(row, 7)?,
    })
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Bounds for open-ended time ranges, inside what `timestamptz` can hold.
fn time_min() -> DateTime<Utc> {
    DateTime::from_timestamp(-62_135_596_800, 0).unwrap_or_default() // 0001-01-01
}

fn time_max() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 0).unwrap_or_default() // 9999-12-31
}

fn expect_one(changed: u64, what: &str) -> Result<()> {
    if changed == 1 {
        Ok(())
    } else {
        Err(Error::storage(
            BACKEND,
            format!("update of a missing {what} ({changed} rows changed)"),
        ))
    }
}

impl StockRead for PgTx<'_, '_> {
    fn product(&mut self, id: ProductId) -> Result<Option<Product>> {
        let row = self.query_opt(
            "SELECT name, has_sizes FROM products WHERE id = $1",
            &[&id.0],
        )?;
        row.map(|r| {
            Ok(Product {
                id,
                name: get(&r, 0)?,
                has_sizes: get(&r, 1)?,
            })
        })
        .transpose()
    }

    fn stock(&mut self, product: ProductId, size: Option<&str>) -> Result<Option<StockLevels>> {
        let sql = self.locked(
            "SELECT available, reserved, sold FROM stock WHERE product_id = $1 AND size = $2",
            "FOR NO KEY UPDATE",
        );
        let row = self.query_opt(&sql, &[&product.0, &size_db(size)])?;
        row.map(|r| levels(&r, 0)).transpose()
    }

    fn product_stock(&mut self, product: ProductId) -> Result<Vec<(Option<String>, StockLevels)>> {
        let rows = self.query(
            "SELECT size, available, reserved, sold FROM stock WHERE product_id = $1 \
             ORDER BY size COLLATE \"C\"",
            &[&product.0],
        )?;
        rows.iter()
            .map(|r| Ok((size_from(r, 0)?, levels(r, 1)?)))
            .collect()
    }

    fn order(&mut self, id: OrderId) -> Result<Option<Order>> {
        let sql = self.locked(
            &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"),
            "FOR UPDATE",
        );
        self.query_opt(&sql, &[&id.0])?
            .map(|r| order(&r))
            .transpose()
    }

    fn payment(&mut self, hash: &str) -> Result<Option<Payment>> {
        let sql = self.locked(
            "SELECT key, amount, status, created_at, expires_at, paid_at FROM payments \
             WHERE hash = $1",
            "FOR UPDATE",
        );
        let row = self.query_opt(&sql, &[&hash])?;
        row.map(|r| {
            Ok(Payment {
                hash: hash.to_owned(),
                key: get(&r, 0)?,
                amount: unsigned(&r, 1)?,
                status: parsed(&r, 2, "payment status", PaymentStatus::parse)?,
                created_at: get(&r, 3)?,
                expires_at: get(&r, 4)?,
                paid_at: get(&r, 5)?,
            })
        })
        .transpose()
    }

    fn payment_orders(&mut self, hash: &str) -> Result<Vec<Order>> {
        let sql = self.locked(
            &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE payment_hash = $1 ORDER BY id"),
            "FOR UPDATE",
        );
        self.query(&sql, &[&hash])?.iter().map(order).collect()
    }

    fn expired_orders(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, OrderId)>,
        n: usize,
    ) -> Result<Vec<Order>> {
        let (after_t, after_id) = after.map_or((time_min(), i64::MIN), |(t, id)| (t, id.0));
        let sql = self.locked(
            &format!(
                "SELECT {ORDER_COLUMNS} FROM orders \
                 WHERE status = 'under_paying' AND payment_expires_at < $1 \
                   AND (payment_expires_at, id) > ($2, $3) \
                 ORDER BY payment_expires_at, id LIMIT $4"
            ),
            "FOR UPDATE SKIP LOCKED",
        );
        self.query(&sql, &[&now, &after_t, &after_id, &limit(n)])?
            .iter()
            .map(order)
            .collect()
    }

    fn movements(&mut self, q: &MovementQuery) -> Result<Vec<StockMovement>> {
        let (after_t, after_id) = q.after.unwrap_or((time_min(), i64::MIN));
        let rows = self.query(
            "SELECT id, at, product_id, size, kind, available_delta, reserved_delta, \
             sold_delta, order_id, payment_hash, reference FROM stock_movements \
             WHERE product_id = $1 AND ($2::TEXT IS NULL OR size = $2) \
               AND at >= $3 AND at < $4 AND (at, id) > ($5, $6) \
             ORDER BY at, id LIMIT $7",
            &[
                &q.product_id.0,
                &q.size,
                &q.from.unwrap_or(time_min()),
                &q.to.unwrap_or(time_max()),
                &after_t,
                &after_id,
                &limit(q.limit),
            ],
        )?;
        rows.iter()
            .map(|r| {
                Ok(StockMovement {
                    id: get(r, 0)?,
                    at: get(r, 1)?,
                    product_id: ProductId(get(r, 2)?),
                    size: size_from(r, 3)?,
                    kind: parsed(r, 4, "movement kind", MovementKind::parse)?,
                    delta: delta(r, 5)?,
                    order_id: get::<Option<i64>>(r, 8)?.map(OrderId),
                    payment_hash: get(r, 9)?,
                    reference: get(r, 10)?,
                })
            })
            .collect()
    }

    fn all_stock(&mut self) -> Result<Vec<StockRow>> {
        let rows = self.query(
            "SELECT product_id, size, available, reserved, sold FROM stock \
             ORDER BY product_id, size COLLATE \"C\"",
            &[],
        )?;
        rows.iter()
            .map(|r| Ok((ProductId(get(r, 0)?), size_from(r, 1)?, levels(r, 2)?)))
            .collect()
    }

    fn ledger_balances(&mut self) -> Result<Vec<LedgerBalance>> {
        let rows = self.query(
            "SELECT product_id, size, sum(available_delta)::BIGINT, sum(reserved_delta)::BIGINT, \
             sum(sold_delta)::BIGINT FROM stock_movements GROUP BY product_id, size \
             ORDER BY product_id, size COLLATE \"C\"",
            &[],
        )?;
        rows.iter()
            .map(|r| Ok((ProductId(get(r, 0)?), size_from(r, 1)?, delta(r, 2)?)))
            .collect()
    }

    fn kind_totals(&mut self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<KindTotal>> {
        let rows = self.query(
            "SELECT product_id, kind, sum(available_delta)::BIGINT, sum(reserved_delta)::BIGINT, \
             sum(sold_delta)::BIGINT FROM stock_movements WHERE at >= $1 AND at < $2 \
             GROUP BY product_id, kind ORDER BY product_id, kind",
            &[&from, &to],
        )?;
        rows.iter()
            .map(|r| {
                Ok(KindTotal {
                    product_id: ProductId(get(r, 0)?),
                    kind: parsed(r, 1, "movement kind", MovementKind::parse)?,
                    delta: delta(r, 2)?,
                })
            })
            .collect()
    }

    fn cart_holds(&mut self, cart_id: &str) -> Result<Vec<Hold>> {
        let sql = self.locked(
            &format!(
                "SELECT {HOLD_COLUMNS} FROM cart_holds WHERE cart_id = $1 AND status = 'active' \
                 ORDER BY id"
            ),
            "FOR UPDATE",
        );
        self.query(&sql, &[&cart_id])?.iter().map(hold).collect()
    }

    fn expired_holds(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, HoldId)>,
        n: usize,
    ) -> Result<Vec<Hold>> {
        let (after_t, after_id) = after.map_or((time_min(), i64::MIN), |(t, id)| (t, id.0));
        let sql = self.locked(
            &format!(
                "SELECT {HOLD_COLUMNS} FROM cart_holds \
                 WHERE status = 'active' AND expires_at < $1 AND (expires_at, id) > ($2, $3) \
                 ORDER BY expires_at, id LIMIT $4"
            ),
            "FOR UPDATE SKIP LOCKED",
        );
        self.query(&sql, &[&now, &after_t, &after_id, &limit(n)])?
            .iter()
            .map(hold)
            .collect()
    }

    fn reservation_breakdown(
        &mut self,
        product: ProductId,
        size: Option<&str>,
    ) -> Result<(u64, u64)> {
        let row = self
            .query(
                "SELECT \
                   (SELECT coalesce(sum(quantity), 0)::BIGINT FROM cart_holds \
                     WHERE product_id = $1 AND size = $2 AND status = 'active'), \
                   (SELECT coalesce(sum(quantity), 0)::BIGINT FROM orders \
                     WHERE product_id = $1 AND size = $2 AND status = 'under_paying')",
                &[&product.0, &size_db(size)],
            )?
            .into_iter()
            .next()
            .ok_or_else(|| Error::storage(BACKEND, "breakdown query returned no row"))?;
        Ok((unsigned(&row, 0)?, unsigned(&row, 1)?))
    }

    fn stock_counts(
        &mut self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<StockCountRecord>> {
        let rows = self.query(
            "SELECT at, product_id, size, expected, counted, discrepancy, applied, available, \
             reserved, sold FROM stock_counts WHERE at >= $1 AND at < $2 ORDER BY at, id",
            &[&from, &to],
        )?;
        rows.iter()
            .map(|r| {
                Ok(StockCountRecord {
                    at: get(r, 0)?,
                    count: StockCount {
                        product_id: ProductId(get(r, 1)?),
                        size: size_from(r, 2)?,
                        expected: unsigned(r, 3)?,
                        counted: unsigned(r, 4)?,
                        discrepancy: get(r, 5)?,
                        applied: get(r, 6)?,
                        levels: levels(r, 7)?,
                    },
                })
            })
            .collect()
    }
}

impl StockTx for PgTx<'_, '_> {
    fn insert_product(&mut self, p: &Product) -> Result<bool> {
        let n = self.execute(
            "INSERT INTO products (id, name, has_sizes) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
            &[&p.id.0, &p.name, &p.has_sizes],
        )?;
        Ok(n == 1)
    }

    fn insert_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        l: StockLevels,
    ) -> Result<bool> {
        let n = self.execute(
            "INSERT INTO stock (product_id, size, available, reserved, sold) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (product_id, size) DO NOTHING",
            &[
                &product.0,
                &size_db(size),
                &db(l.available)?,
                &db(l.reserved)?,
                &db(l.sold)?,
            ],
        )?;
        Ok(n == 1)
    }

    fn update_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        l: StockLevels,
    ) -> Result<()> {
        let n = self.execute(
            "UPDATE stock SET available = $3, reserved = $4, sold = $5 \
             WHERE product_id = $1 AND size = $2",
            &[
                &product.0,
                &size_db(size),
                &db(l.available)?,
                &db(l.reserved)?,
                &db(l.sold)?,
            ],
        )?;
        expect_one(n, "stock row")
    }

    fn add_to_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        d: CounterDelta,
    ) -> Result<Option<StockLevels>> {
        let row = self.query_opt(
            "UPDATE stock SET available = available + $3, reserved = reserved + $4, \
             sold = sold + $5 \
             WHERE product_id = $1 AND size = $2 AND available + $3 >= 0 \
               AND reserved + $4 >= 0 AND sold + $5 >= 0 \
               AND available + reserved + sold + $3 + $4 + $5 <= $6 \
             RETURNING available, reserved, sold",
            &[
                &product.0,
                &size_db(size),
                &d.available,
                &d.reserved,
                &d.sold,
                &db(MAX_STOCK)?,
            ],
        )?;
        row.map(|r| levels(&r, 0)).transpose()
    }

    fn insert_payment(&mut self, p: &Payment) -> Result<()> {
        self.execute(
            "INSERT INTO payments (hash, key, amount, status, created_at, expires_at, paid_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &p.hash,
                &p.key,
                &db(p.amount)?,
                &p.status.as_str(),
                &p.created_at,
                &p.expires_at,
                &p.paid_at,
            ],
        )?;
        Ok(())
    }

    fn update_payment(&mut self, p: &Payment) -> Result<()> {
        let n = self.execute(
            "UPDATE payments SET status = $2, paid_at = $3 WHERE hash = $1",
            &[&p.hash, &p.status.as_str(), &p.paid_at],
        )?;
        expect_one(n, "payment")
    }

    fn insert_order(&mut self, o: &NewOrder) -> Result<OrderId> {
        let rows = self.query(
            "INSERT INTO orders (payment_hash, product_id, size, quantity, unit_price, \
             customer_ref, status, payment_status, created_at, payment_expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'under_paying', 'pending', $7, $8) RETURNING id",
            &[
                &o.payment_hash,
                &o.product_id.0,
                &size_db(o.size.as_deref()),
                &db(o.quantity)?,
                &db(o.unit_price)?,
                &o.customer_ref,
                &o.created_at,
                &o.payment_expires_at,
            ],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| Error::storage(BACKEND, "insert returned no id"))?;
        Ok(OrderId(get(row, 0)?))
    }

    fn update_order(&mut self, o: &Order) -> Result<()> {
        let n = self.execute(
            "UPDATE orders SET status = $2, payment_status = $3, paid_at = $4, admin_notes = $5 \
             WHERE id = $1",
            &[
                &o.id.0,
                &o.status.as_str(),
                &o.payment_status.as_str(),
                &o.paid_at,
                &o.admin_notes,
            ],
        )?;
        expect_one(n, "order")
    }

    fn insert_movement(&mut self, m: &NewMovement) -> Result<()> {
        self.execute(
            "INSERT INTO stock_movements (at, product_id, size, kind, available_delta, \
             reserved_delta, sold_delta, order_id, payment_hash, reference) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &m.at,
                &m.product_id.0,
                &size_db(m.size.as_deref()),
                &m.kind.as_str(),
                &m.delta.available,
                &m.delta.reserved,
                &m.delta.sold,
                &m.order_id.map(|o| o.0),
                &m.payment_hash,
                &m.reference,
            ],
        )?;
        Ok(())
    }

    fn insert_stock_count(&mut self, r: &StockCountRecord) -> Result<()> {
        let c = &r.count;
        self.execute(
            "INSERT INTO stock_counts (at, product_id, size, expected, counted, discrepancy, \
             applied, available, reserved, sold) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &r.at,
                &c.product_id.0,
                &size_db(c.size.as_deref()),
                &db(c.expected)?,
                &db(c.counted)?,
                &c.discrepancy,
                &c.applied,
                &db(c.levels.available)?,
                &db(c.levels.reserved)?,
                &db(c.levels.sold)?,
            ],
        )?;
        Ok(())
    }

    fn insert_hold(&mut self, h: &NewHold) -> Result<HoldId> {
        let rows = self.query(
            "INSERT INTO cart_holds (cart_id, product_id, size, quantity, status, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, 'active', $5, $6) RETURNING id",
            &[
                &h.cart_id,
                &h.product_id.0,
                &size_db(h.size.as_deref()),
                &db(h.quantity)?,
                &h.created_at,
                &h.expires_at,
            ],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| Error::storage(BACKEND, "insert returned no id"))?;
        Ok(HoldId(get(row, 0)?))
    }

    fn update_hold(&mut self, h: &Hold) -> Result<()> {
        let n = self.execute(
            "UPDATE cart_holds SET quantity = $2, status = $3, expires_at = $4 WHERE id = $1",
            &[&h.id.0, &db(h.quantity)?, &h.status.as_str(), &h.expires_at],
        )?;
        expect_one(n, "hold")
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://shop:s3cret@db:5432/shop"),
            "postgres://shop:***@db:5432/shop"
        );
        assert_eq!(redact("postgres://shop@db/shop"), "postgres://shop@db/shop");
        assert_eq!(
            redact("host=db user=shop password=s3cret dbname=shop"),
            "host=db user=shop password=*** dbname=shop"
        );
    }
}
