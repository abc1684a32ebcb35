//! The storage contract every backend implements, and the backends that ship with the crate.
//!
//! The services ([`StockService`](crate::StockService), [`OrderService`](crate::OrderService))
//! hold every business rule; a store only stores, loads and locks. A new backend implements
//! [`StockStore`], [`StockRead`] and [`StockTx`] and runs the conformance suite (feature
//! `conformance`) against itself.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::model::{
    CounterDelta, Hold, HoldId, KindTotal, MovementKind, MovementQuery, NewHold, NewMovement,
    NewOrder, Order, OrderId, Payment, Product, ProductId, StockCountRecord, StockLevels,
    StockMovement,
};

/// A stock row with its identity: product, size (`None` for a product without sizes) and
/// counters.
pub type StockRow = (ProductId, Option<String>, StockLevels);

/// The summed ledger deltas of one stock row.
pub type LedgerBalance = (ProductId, Option<String>, CounterDelta);

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// A write unit: the work of one transaction, run by the store.
///
/// The store may run it on another thread (a writer thread batching several units into one
/// commit) and may run it more than once (a PostgreSQL transaction retried after a
/// serialization failure), so it is `FnMut + Send + 'static` and must not keep side effects
/// of a run that was rolled back.
pub type WriteUnit = Box<dyn FnMut(&mut dyn StockTx) -> Result<()> + Send + 'static>;

/// A read unit: the work of one read-only snapshot, run on the calling thread.
pub type ReadUnit<'a> = &'a mut dyn FnMut(&mut dyn StockRead) -> Result<()>;

/// A storage backend: runs read units and write units, each in one transaction.
///
/// # Contract
///
/// - **Atomic units.** [`write`](StockStore::write) runs the unit in one transaction. If the
///   unit returns `Ok`, everything it wrote is committed together (and durable as the
///   backend's configuration promises) before `write` returns `Ok`. If the unit returns
///   `Err`, or the commit fails, nothing it wrote is visible to anyone, ever, and `write`
///   returns that error unchanged (a unit's refusal such as
///   [`Error::InsufficientStock`] must come back as it was, never wrapped).
/// - **Isolation.** Write units are serializable with each other: a unit sees every unit
///   committed before it and none committed after. A backend that runs units concurrently
///   (PostgreSQL) locks each stock row, order and payment a unit loads through
///   [`StockTx`] until the unit ends; the services load several stock rows in ascending
///   (product id, size) order, so a backend that locks in load order never deadlocks on
///   them. [`read`](StockStore::read) sees one consistent committed snapshot.
/// - **Retries.** A backend may run a unit again after a transient failure of its own
///   (serialization failure, deadlock, busy database), a bounded number of times; the unit
///   is written to be re-run. Busy or locked conditions are never surfaced to a caller
///   while a retry or wait can resolve them.
/// - **Missing rows.** Loads return `Ok(None)` (or an empty list) for a missing row; the
///   service turns that into the right refusal. Updates of a row that does not exist are
///   a storage error ([`Error::Storage`]): the services always load before they update.
/// - **Storage errors** are [`Error::Storage`] with the backend's name and its error as
///   source.
/// - **Sizes.** `None` is the product-wide stock row of a product without sizes; a
///   backend may store it as an empty label, which the services never accept as a size.
///
/// The trait is object safe; the services hold an `Arc<dyn StockStore>`.
pub trait StockStore: Send + Sync + Debug + 'static {
    /// The backend's short name (`memory`, `sqlite`, `postgres`), used in errors and logs.
    fn backend(&self) -> &'static str;

    /// Runs `unit` in one write transaction. See the [contract](StockStore#contract).
    ///
    /// # Errors
    ///
    /// The unit's own error, unchanged, or [`Error::Storage`] when the transaction could
    /// not begin or commit.
    fn write(&self, unit: WriteUnit) -> Result<()>;

    /// Runs `unit` on one consistent read-only snapshot.
    ///
    /// # Errors
    ///
    /// The unit's own error, or [`Error::Storage`].
    fn read(&self, unit: ReadUnit<'_>) -> Result<()>;
}

/// The loads a unit can make. In a write unit ([`StockTx`]), every row loaded is locked
/// until the unit ends.
pub trait StockRead {
    /// The product with this id.
    fn product(&mut self, id: ProductId) -> Result<Option<Product>>;

    /// The counters of one stock row: `size` is `None` for a product without sizes.
    fn stock(&mut self, product: ProductId, size: Option<&str>) -> Result<Option<StockLevels>>;

    /// Every stock row of a product, ordered by size (the product-wide row of a product
    /// without sizes has size `None`).
    fn product_stock(&mut self, product: ProductId) -> Result<Vec<(Option<String>, StockLevels)>>;

    /// The order with this id.
    fn order(&mut self, id: OrderId) -> Result<Option<Order>>;

    /// The payment with this hash (its key included).
    fn payment(&mut self, hash: &str) -> Result<Option<Payment>>;

    /// The orders of a payment, by ascending id.
    fn payment_orders(&mut self, hash: &str) -> Result<Vec<Order>>;

    /// Up to `limit` orders with status `under_paying` whose `payment_expires_at` is
    /// before `now`, ordered by `(payment_expires_at, id)` and strictly after `after` in
    /// that order. In a write unit a backend that runs units concurrently skips orders
    /// another unit has locked, and locks those it returns.
    fn expired_orders(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, OrderId)>,
        limit: usize,
    ) -> Result<Vec<Order>>;

    /// Ledger movements matching `query`, ordered by `(at, id)`, at most `query.limit`.
    fn movements(&mut self, query: &MovementQuery) -> Result<Vec<StockMovement>>;

    /// Every stock row, ordered by (product, size).
    fn all_stock(&mut self) -> Result<Vec<StockRow>>;

    /// The sum of the deltas of every stock row's movements, for each row that has any,
    /// ordered by (product, size).
    fn ledger_balances(&mut self) -> Result<Vec<LedgerBalance>>;

    /// The summed deltas of movements with `from <= at < to`, per product and kind.
    fn kind_totals(&mut self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<KindTotal>>;

    /// The active holds of a cart, by id. In a write unit they are locked.
    fn cart_holds(&mut self, cart_id: &str) -> Result<Vec<Hold>>;

    /// Up to `limit` active holds whose `expires_at` is before `now`, ordered by
    /// `(expires_at, id)` and strictly after `after` in that order. In a write unit a
    /// backend that runs units concurrently skips holds another unit has locked, and
    /// locks those it returns.
    fn expired_holds(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, HoldId)>,
        limit: usize,
    ) -> Result<Vec<Hold>>;

    /// Units of one stock row in active holds, and in `under_paying` orders.
    fn reservation_breakdown(
        &mut self,
        product: ProductId,
        size: Option<&str>,
    ) -> Result<(u64, u64)>;

    /// The stock counts recorded with `from <= at < to`, oldest first.
    fn stock_counts(
        &mut self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<StockCountRecord>>;
}

/// The writes a write unit can make, on top of the loads of [`StockRead`].
pub trait StockTx: StockRead {
    /// Inserts a product. Returns `false`, writing nothing, if its id exists already.
    fn insert_product(&mut self, product: &Product) -> Result<bool>;

    /// Inserts a stock row. Returns `false`, writing nothing, if the row exists already.
    fn insert_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        levels: StockLevels,
    ) -> Result<bool>;

    /// Overwrites the counters of an existing stock row.
    fn update_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        levels: StockLevels,
    ) -> Result<()>;

    /// Adds `delta` to the counters of an existing stock row, in one step, only if no
    /// counter goes below zero and their total stays at most
    /// [`MAX_STOCK`](crate::MAX_STOCK) (see [`StockLevels::after`]). Returns the counters
    /// after, or `None`, changing nothing, when the row does not exist or the guard
    /// refuses. In a write unit the row is locked once changed.
    ///
    /// The services move one row's counters through this, so that a backend can read and
    /// write the row in one statement; the default loads the row and updates it.
    fn add_to_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        delta: CounterDelta,
    ) -> Result<Option<StockLevels>> {
        let Some(after) = self.stock(product, size)?.and_then(|l| l.after(delta)) else {
            return Ok(None);
        };
        self.update_stock(product, size, after)?;
        Ok(Some(after))
    }

    /// Inserts a payment record. Its hash is new (128 random bits).
    fn insert_payment(&mut self, payment: &Payment) -> Result<()>;

    /// Overwrites the status and `paid_at` of an existing payment.
    fn update_payment(&mut self, payment: &Payment) -> Result<()>;

    /// Inserts an order and returns the id the store assigned (ascending, never reused).
    fn insert_order(&mut self, order: &NewOrder) -> Result<OrderId>;

    /// Overwrites the status, payment status, `paid_at` and admin notes of an existing
    /// order.
    fn update_order(&mut self, order: &Order) -> Result<()>;

    /// Appends a movement to the ledger. Movements are never updated or deleted.
    fn insert_movement(&mut self, movement: &NewMovement) -> Result<()>;

    /// Appends several movements, in order (their ids ascend in this order). The default
    /// inserts them one by one; a backend may insert several rows per statement.
    fn insert_movements(&mut self, movements: &[NewMovement]) -> Result<()> {
        movements.iter().try_for_each(|m| self.insert_movement(m))
    }

    /// Records a physical stock count.
    fn insert_stock_count(&mut self, count: &StockCountRecord) -> Result<()>;

    /// Inserts an active hold and returns the id the store assigned. A cart has at most
    /// one active hold per stock row; the services update it rather than insert another.
    fn insert_hold(&mut self, hold: &NewHold) -> Result<HoldId>;

    /// Overwrites the quantity, status and expiry of an existing hold.
    fn update_hold(&mut self, hold: &Hold) -> Result<()>;
}

/// Typed results on top of the unit-based [`StockStore`] methods.
pub(crate) trait StoreExt {
    /// Runs a write unit and returns what it produced.
    fn write_with<T, F>(&self, unit: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn StockTx) -> Result<T> + Send + 'static;

    /// Runs a read unit and returns what it produced.
    fn read_with<T, F>(&self, unit: F) -> Result<T>
    where
        F: FnMut(&mut dyn StockRead) -> Result<T>;
}

impl StoreExt for dyn StockStore {
    fn write_with<T, F>(&self, mut unit: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn StockTx) -> Result<T> + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(None));
        let out = Arc::clone(&slot);
        self.write(Box::new(move |tx| {
            let value = unit(tx)?;
            *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
            Ok(())
        }))?;
        let value = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        value.ok_or_else(|| {
            Error::storage(
                self.backend(),
                "write unit committed without producing a result",
            )
        })
    }

    fn read_with<T, F>(&self, mut unit: F) -> Result<T>
    where
        F: FnMut(&mut dyn StockRead) -> Result<T>,
    {
        let mut out = None;
        self.read(&mut |tx| {
            out = Some(unit(tx)?);
            Ok(())
        })?;
        out.ok_or_else(|| Error::storage(self.backend(), "read unit produced no result"))
    }
}

/// The summed deltas of `movements` (each a product, a kind and a delta) per product and
/// kind, ordered by both: what [`StockRead::kind_totals`] returns.
pub(crate) fn sum_by_kind(
    movements: impl IntoIterator<Item = ((ProductId, MovementKind), CounterDelta)>,
) -> Vec<KindTotal> {
    let mut sums: BTreeMap<(ProductId, MovementKind), CounterDelta> = BTreeMap::new();
    for (key, delta) in movements {
        let sum = sums.entry(key).or_default();
        *sum = sum.plus(delta);
    }
    sums.into_iter()
        .map(|((product_id, kind), delta)| KindTotal {
            product_id,
            kind,
            delta,
        })
        .collect()
}

/// Compile-time check that the stores can be shared between threads.
#[allow(dead_code)]
fn assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<memory::MemoryStore>();
    #[cfg(feature = "sqlite")]
    check::<sqlite::SqliteStore>();
    #[cfg(feature = "postgres")]
    check::<postgres::PostgresStore>();
    check::<Arc<dyn StockStore>>();
    check::<Error>();
}
