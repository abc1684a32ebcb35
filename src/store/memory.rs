//! [`MemoryStore`]: everything in process memory, for tests and prototypes.

use std::collections::{BTreeMap, HashMap};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::model::{
    CounterDelta, Hold, HoldId, HoldStatus, KindTotal, MovementQuery, NewHold, NewMovement,
    NewOrder, Order, OrderId, OrderStatus, Payment, Product, ProductId, StockCountRecord,
    StockLevels, StockMovement,
};
use crate::store::{LedgerBalance, ReadUnit, StockRead, StockRow, StockStore, StockTx, WriteUnit};

const BACKEND: &str = "memory";

/// A store that keeps everything in process memory, behind one lock.
///
/// Write units run one at a time; a unit that fails is rolled back from an undo log, so
/// the all-or-nothing contract holds exactly as on the database backends. Nothing
/// survives the process.
///
/// ```
/// use std::sync::Arc;
/// use stockroom::{MemoryStore, NewProduct, ProductId, StockService};
///
/// let stock = StockService::new(Arc::new(MemoryStore::new()));
/// stock.create_product(NewProduct::plain(ProductId(1), "Mug", 3))?;
/// assert_eq!(stock.get_stock_info(ProductId(1), None)?.available_quantity, 3);
/// # Ok::<(), stockroom::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::storage(BACKEND, "a write unit panicked while holding the store"))
    }
}

type StockKey = (ProductId, String);

fn key(product: ProductId, size: Option<&str>) -> StockKey {
    (product, size.unwrap_or("").to_owned())
}

#[derive(Debug, Default)]
struct State {
    products: HashMap<ProductId, Product>,
    stock: BTreeMap<StockKey, StockLevels>,
    orders: BTreeMap<OrderId, Order>,
    payments: HashMap<String, Payment>,
    /// Order ids of each payment, ascending.
    payment_orders: HashMap<String, Vec<OrderId>>,
    last_order_id: i64,
    /// The ledger: a movement's id is its index plus one.
    movements: Vec<StockMovement>,
    counts: Vec<StockCountRecord>,
    holds: BTreeMap<HoldId, Hold>,
    last_hold_id: i64,
}

/// What to put back when a write unit fails.
enum Undo {
    Product(ProductId),
    StockInserted(StockKey),
    StockUpdated(StockKey, StockLevels),
    PaymentInserted(String),
    PaymentUpdated(Payment),
    OrderInserted(OrderId, i64),
    OrderUpdated(Order),
    MovementInserted,
    CountInserted,
    HoldInserted(HoldId, i64),
    HoldUpdated(Hold),
}

struct MemoryTx<'a> {
    state: &'a mut State,
    undo: Vec<Undo>,
}

impl MemoryTx<'_> {
    fn rollback(self) {
        let state = self.state;
        for undo in self.undo.into_iter().rev() {
            match undo {
                Undo::Product(id) => {
                    state.products.remove(&id);
                }
                Undo::StockInserted(k) => {
                    state.stock.remove(&k);
                }
                Undo::StockUpdated(k, old) => {
                    state.stock.insert(k, old);
                }
                Undo::PaymentInserted(hash) => {
                    state.payments.remove(&hash);
                }
                Undo::PaymentUpdated(old) => {
                    state.payments.insert(old.hash.clone(), old);
                }
                Undo::OrderInserted(id, last) => {
                    if let Some(order) = state.orders.remove(&id) {
                        if let Some(ids) = state.payment_orders.get_mut(&order.payment_hash) {
                            ids.retain(|o| *o != id);
                        }
                    }
                    state.last_order_id = last;
                }
                Undo::OrderUpdated(old) => {
                    state.orders.insert(old.id, old);
                }
                Undo::MovementInserted => {
                    state.movements.pop();
                }
                Undo::CountInserted => {
                    state.counts.pop();
                }
                Undo::HoldInserted(id, last) => {
                    state.holds.remove(&id);
                    state.last_hold_id = last;
                }
                Undo::HoldUpdated(old) => {
                    state.holds.insert(old.id, old);
                }
            }
        }
    }
}

fn missing(what: &str) -> Error {
    Error::storage(BACKEND, format!("update of a missing {what}"))
}

impl StockRead for MemoryTx<'_> {
    fn product(&mut self, id: ProductId) -> Result<Option<Product>> {
        Ok(self.state.products.get(&id).cloned())
    }

    fn stock(&mut self, product: ProductId, size: Option<&str>) -> Result<Option<StockLevels>> {
        Ok(self.state.stock.get(&key(product, size)).copied())
    }

    fn product_stock(&mut self, product: ProductId) -> Result<Vec<(Option<String>, StockLevels)>> {
        let from = (product, String::new());
        Ok(self
            .state
            .stock
            .range(from..)
            .take_while(|((p, _), _)| *p == product)
            .map(|((_, s), l)| ((!s.is_empty()).then(|| s.clone()), *l))
            .collect())
    }

    fn order(&mut self, id: OrderId) -> Result<Option<Order>> {
        Ok(self.state.orders.get(&id).cloned())
    }

    fn payment(&mut self, hash: &str) -> Result<Option<Payment>> {
        Ok(self.state.payments.get(hash).cloned())
    }

    fn payment_orders(&mut self, hash: &str) -> Result<Vec<Order>> {
        let ids = self.state.payment_orders.get(hash);
        Ok(ids
            .into_iter()
            .flatten()
            .filter_map(|id| self.state.orders.get(id).cloned())
            .collect())
    }

    fn expired_orders(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, OrderId)>,
        limit: usize,
    ) -> Result<Vec<Order>> {
        // A linear scan: the memory store is for tests and prototypes, where simplicity
        // beats an expiry index.
        let mut expired: Vec<&Order> = self
            .state
            .orders
            .values()
            .filter(|o| o.status == OrderStatus::UnderPaying && o.payment_expires_at < now)
            .filter(|o| after.is_none_or(|a| (o.payment_expires_at, o.id) > a))
            .collect();
        expired.sort_by_key(|o| (o.payment_expires_at, o.id));
        Ok(expired.into_iter().take(limit).cloned().collect())
    }

    fn movements(&mut self, query: &MovementQuery) -> Result<Vec<StockMovement>> {
        let mut found: Vec<&StockMovement> = self
            .state
            .movements
            .iter()
            .filter(|m| m.product_id == query.product_id)
            .filter(|m| query.size.is_none() || m.size == query.size)
            .filter(|m| query.from.is_none_or(|f| m.at >= f))
            .filter(|m| query.to.is_none_or(|t| m.at < t))
            .filter(|m| query.after.is_none_or(|a| (m.at, m.id) > a))
            .collect();
        found.sort_by_key(|m| (m.at, m.id));
        Ok(found.into_iter().take(query.limit).cloned().collect())
    }

    fn all_stock(&mut self) -> Result<Vec<StockRow>> {
        Ok(self
            .state
            .stock
            .iter()
            .map(|((p, s), l)| (*p, (!s.is_empty()).then(|| s.clone()), *l))
            .collect())
    }

    fn ledger_balances(&mut self) -> Result<Vec<LedgerBalance>> {
        let mut sums: BTreeMap<StockKey, CounterDelta> = BTreeMap::new();
        for m in &self.state.movements {
            let sum = sums
                .entry(key(m.product_id, m.size.as_deref()))
                .or_default();
            *sum = sum.plus(m.delta);
        }
        Ok(sums
            .into_iter()
            .map(|((p, s), d)| (p, (!s.is_empty()).then_some(s), d))
            .collect())
    }

    fn kind_totals(&mut self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<KindTotal>> {
        Ok(super::sum_by_kind(
            self.state
                .movements
                .iter()
                .filter(|m| m.at >= from && m.at < to)
                .map(|m| ((m.product_id, m.kind), m.delta)),
        ))
    }

    fn cart_holds(&mut self, cart_id: &str) -> Result<Vec<Hold>> {
        Ok(self
            .state
            .holds
            .values()
            .filter(|h| h.status == HoldStatus::Active && h.cart_id == cart_id)
            .cloned()
            .collect())
    }

    fn expired_holds(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, HoldId)>,
        limit: usize,
    ) -> Result<Vec<Hold>> {
        let mut expired: Vec<&Hold> = self
            .state
            .holds
            .values()
            .filter(|h| h.status == HoldStatus::Active && h.expires_at < now)
            .filter(|h| after.is_none_or(|a| (h.expires_at, h.id) > a))
            .collect();
        expired.sort_by_key(|h| (h.expires_at, h.id));
        Ok(expired.into_iter().take(limit).cloned().collect())
    }

    fn reservation_breakdown(
        &mut self,
        product: ProductId,
        size: Option<&str>,
    ) -> Result<(u64, u64)> {
        let row = |p: ProductId, s: Option<&str>| p == product && s == size;
        let held = self
            .state
            .holds
            .values()
            .filter(|h| h.status == HoldStatus::Active && row(h.product_id, h.size.as_deref()))
            .map(|h| h.quantity)
            .sum();
        let awaiting = self
            .state
            .orders
            .values()
            .filter(|o| {
                o.status == OrderStatus::UnderPaying && row(o.product_id, o.size.as_deref())
            })
            .map(|o| o.quantity)
            .sum();
        Ok((held, awaiting))
    }

    fn stock_counts(
        &mut self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<StockCountRecord>> {
        let mut found: Vec<StockCountRecord> = self
            .state
            .counts
            .iter()
            .filter(|c| c.at >= from && c.at < to)
            .cloned()
            .collect();
        found.sort_by_key(|c| c.at);
        Ok(found)
    }
}

impl StockTx for MemoryTx<'_> {
    fn insert_product(&mut self, product: &Product) -> Result<bool> {
        if self.state.products.contains_key(&product.id) {
            return Ok(false);
        }
        self.state.products.insert(product.id, product.clone());
        self.undo.push(Undo::Product(product.id));
        Ok(true)
    }

    fn insert_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        levels: StockLevels,
    ) -> Result<bool> {
        if !self.state.products.contains_key(&product) {
            return Err(Error::storage(BACKEND, "stock row for a missing product"));
        }
        let k = key(product, size);
        if self.state.stock.contains_key(&k) {
            return Ok(false);
        }
        self.state.stock.insert(k.clone(), levels);
        self.undo.push(Undo::StockInserted(k));
        Ok(true)
    }

    fn update_stock(
        &mut self,
        product: ProductId,
        size: Option<&str>,
        levels: StockLevels,
    ) -> Result<()> {
        let k = key(product, size);
        let slot = self
            .state
            .stock
            .get_mut(&k)
            .ok_or_else(|| missing("stock row"))?;
        let old = std::mem::replace(slot, levels);
        self.undo.push(Undo::StockUpdated(k, old));
        Ok(())
    }

    fn insert_payment(&mut self, payment: &Payment) -> Result<()> {
        if self.state.payments.contains_key(&payment.hash) {
            return Err(Error::storage(BACKEND, "duplicate payment hash"));
        }
        self.state
            .payments
            .insert(payment.hash.clone(), payment.clone());
        self.undo.push(Undo::PaymentInserted(payment.hash.clone()));
        Ok(())
    }

    fn update_payment(&mut self, payment: &Payment) -> Result<()> {
        let slot = self
            .state
            .payments
            .get_mut(&payment.hash)
            .ok_or_else(|| missing("payment"))?;
        let mut updated = slot.clone();
        updated.status = payment.status;
        updated.paid_at = payment.paid_at;
        let old = std::mem::replace(slot, updated);
        self.undo.push(Undo::PaymentUpdated(old));
        Ok(())
    }

    fn insert_order(&mut self, order: &NewOrder) -> Result<OrderId> {
        if !self.state.payments.contains_key(&order.payment_hash) {
            return Err(Error::storage(BACKEND, "order for a missing payment"));
        }
        if !self.state.products.contains_key(&order.product_id) {
            return Err(Error::storage(BACKEND, "order for a missing product"));
        }
        let last = self.state.last_order_id;
        let id = OrderId(last + 1);
        self.state.last_order_id = id.0;
        self.state.orders.insert(id, order.clone().into_order(id));
        self.state
            .payment_orders
            .entry(order.payment_hash.clone())
            .or_default()
            .push(id);
        self.undo.push(Undo::OrderInserted(id, last));
        Ok(id)
    }

    fn update_order(&mut self, order: &Order) -> Result<()> {
        let slot = self
            .state
            .orders
            .get_mut(&order.id)
            .ok_or_else(|| missing("order"))?;
        let mut updated = slot.clone();
        updated.status = order.status;
        updated.payment_status = order.payment_status;
        updated.paid_at = order.paid_at;
        updated.admin_notes = order.admin_notes.clone();
        let old = std::mem::replace(slot, updated);
        self.undo.push(Undo::OrderUpdated(old));
        Ok(())
    }

    fn insert_movement(&mut self, movement: &NewMovement) -> Result<()> {
        let id = self.state.movements.len() as i64 + 1;
        self.state
            .movements
            .push(movement.clone().into_movement(id));
        self.undo.push(Undo::MovementInserted);
        Ok(())
    }

    fn insert_stock_count(&mut self, count: &StockCountRecord) -> Result<()> {
        self.state.counts.push(count.clone());
        self.undo.push(Undo::CountInserted);
        Ok(())
    }

    fn insert_hold(&mut self, hold: &NewHold) -> Result<HoldId> {
        if !self
            .state
            .stock
            .contains_key(&key(hold.product_id, hold.size.as_deref()))
        {
            return Err(Error::storage(BACKEND, "hold on a missing stock row"));
        }
        let duplicate = self.state.holds.values().any(|h| {
            h.status == HoldStatus::Active
                && h.cart_id == hold.cart_id
                && h.product_id == hold.product_id
                && h.size == hold.size
        });
        if duplicate {
            return Err(Error::storage(
                BACKEND,
                "second active hold of a cart on one row",
            ));
        }
        let last = self.state.last_hold_id;
        let id = HoldId(last + 1);
        self.state.last_hold_id = id.0;
        self.state.holds.insert(id, hold.clone().into_hold(id));
        self.undo.push(Undo::HoldInserted(id, last));
        Ok(id)
    }

    fn update_hold(&mut self, hold: &Hold) -> Result<()> {
        let slot = self
            .state
            .holds
            .get_mut(&hold.id)
            .ok_or_else(|| missing("hold"))?;
        let mut updated = slot.clone();
        updated.quantity = hold.quantity;
        updated.status = hold.status;
        updated.expires_at = hold.expires_at;
        let old = std::mem::replace(slot, updated);
        self.undo.push(Undo::HoldUpdated(old));
        Ok(())
    }
}

impl StockStore for MemoryStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn write(&self, mut unit: WriteUnit) -> Result<()> {
        let mut state = self.lock()?;
        let mut tx = MemoryTx {
            state: &mut state,
            undo: Vec::new(),
        };
        // A panicking unit is rolled back too, so the lock is never left over half a
        // unit's writes.
        match panic::catch_unwind(AssertUnwindSafe(|| unit(&mut tx))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tx.rollback();
                Err(e)
            }
            Err(payload) => {
                tx.rollback();
                drop(state);
                panic::resume_unwind(payload)
            }
        }
    }

    fn read(&self, unit: ReadUnit<'_>) -> Result<()> {
        let mut state = self.lock()?;
        let mut tx = MemoryTx {
            state: &mut state,
            undo: Vec::new(),
        };
        unit(&mut tx)
    }
}
