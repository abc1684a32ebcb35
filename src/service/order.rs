//! [`OrderService`]: checkout, payment confirmation, cancellation and expiry cleanup.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;

use crate::clock::{Clock, SystemClock, normalize};
use crate::error::{Error, Result, ShortLine};
use crate::model::{
    MAX_LABEL_LEN, MAX_QUANTITY, MovementKind, NewOrder, Order, OrderId, OrderStatus, Payment,
    PaymentStatus, ProductId,
};
use crate::service::cleanup::{self, Batch, CleanupFailure, CleanupReport, Cursor, Expiring};
use crate::service::hold::{check_cart_id, convert_holds};
use crate::service::{
    Cause, LockedRows, Movement, RowName, check_label, check_quantity, check_size,
};
use crate::store::{StockRead, StockStore, StockTx, StoreExt};

/// The largest unit price, in minor currency units: ten billion (a hundred million in a
/// currency with cents).
pub const MAX_UNIT_PRICE: u64 = 10_000_000_000;

/// The largest number of lines in one checkout.
pub const MAX_CHECKOUT_LINES: usize = 1_000;

/// Settings of an [`OrderService`].
///
/// ```
/// use chrono::TimeDelta;
/// use stockroom::OrderConfig;
///
/// let config = OrderConfig::default()
///     .with_payment_window(TimeDelta::minutes(10))
///     .with_late_payments(false);
/// assert_eq!(config.payment_window, TimeDelta::minutes(10));
/// assert_eq!(OrderConfig::default().payment_window, TimeDelta::minutes(15));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct OrderConfig {
    /// How long a checkout waits for its payment: 15 minutes by default.
    pub payment_window: TimeDelta,
    /// Whether a payment that arrives after its window is still taken (its orders are
    /// confirmed if their stock is still held, or revived if the stock can be taken
    /// again): `true` by default. When `false`, every late payment is refused with
    /// [`Error::PaymentExpired`].
    pub accept_late_payments: bool,
    /// How many expired orders one cleanup transaction handles: 500 by default. A backlog
    /// never holds the write lock for longer than one batch.
    pub cleanup_batch_size: usize,
}

impl OrderConfig {
    /// The same settings with another payment window.
    pub fn with_payment_window(mut self, window: TimeDelta) -> Self {
        self.payment_window = window;
        self
    }

    /// The same settings, accepting late payments or not.
    pub fn with_late_payments(mut self, accept: bool) -> Self {
        self.accept_late_payments = accept;
        self
    }

    /// The same settings with another cleanup batch size (at least 1).
    pub fn with_cleanup_batch_size(mut self, size: usize) -> Self {
        self.cleanup_batch_size = size.max(1);
        self
    }
}

impl Default for OrderConfig {
    fn default() -> Self {
        OrderConfig {
            payment_window: TimeDelta::minutes(15),
            accept_late_payments: true,
            cleanup_batch_size: 500,
        }
    }
}

/// One line of a checkout: a reserved quantity of a product (or one size of it), at a unit
/// price.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct OrderLine {
    /// The product.
    pub product_id: ProductId,
    /// The size, for a product with sizes.
    pub size: Option<String>,
    /// Units, 1 to [`MAX_QUANTITY`]; they must be reserved already.
    pub quantity: u64,
    /// Price of one unit in minor currency units, at most [`MAX_UNIT_PRICE`].
    pub unit_price: u64,
}

impl OrderLine {
    /// A line of `quantity` units of `product_id` (of `size`), at `unit_price` each.
    pub fn new(product_id: ProductId, size: Option<&str>, quantity: u64, unit_price: u64) -> Self {
        OrderLine {
            product_id,
            size: size.map(str::to_owned),
            quantity,
            unit_price,
        }
    }
}

/// What to check out: the lines, the shop's reference for the customer, and the cart
/// whose holds become the orders' reservations.
///
/// `Vec<OrderLine>` converts into it, for a checkout of units reserved with
/// [`StockService::reserve_stock`](crate::StockService::reserve_stock) and no customer
/// reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct CheckoutRequest {
    /// The lines, one order each.
    pub lines: Vec<OrderLine>,
    /// Passed through to every order untouched (at most 64 bytes).
    pub customer_ref: Option<String>,
    /// The cart held with [`StockService::hold_cart`](crate::StockService::hold_cart):
    /// each line takes its units from the cart's hold on its row, and what the hold lacks
    /// (it expired and cleanup released it, or it held fewer) is taken from available,
    /// or the checkout is refused with the short line's numbers. Without a cart, each
    /// line's units must be reserved already.
    pub cart_id: Option<String>,
}

impl CheckoutRequest {
    /// A request for `lines`.
    pub fn new(lines: Vec<OrderLine>) -> Self {
        CheckoutRequest {
            lines,
            customer_ref: None,
            cart_id: None,
        }
    }

    /// The same request, converting the holds of `cart_id`.
    pub fn cart(mut self, cart_id: impl Into<String>) -> Self {
        self.cart_id = Some(cart_id.into());
        self
    }

    /// The same request with a customer reference.
    pub fn customer_ref(mut self, customer_ref: impl Into<String>) -> Self {
        self.customer_ref = Some(customer_ref.into());
        self
    }
}

impl From<Vec<OrderLine>> for CheckoutRequest {
    fn from(lines: Vec<OrderLine>) -> Self {
        CheckoutRequest::new(lines)
    }
}

/// What a checkout returns: the orders and the payment the customer must make.
///
/// `payment_key` is the secret the payment provider's callback presents to
/// [`OrderService::confirm_payment_for_orders`]; hand it only to the provider. `Debug`
/// hides it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Checkout {
    /// The public id of the payment.
    pub payment_hash: String,
    /// The secret key (64 hex digits, 256 bits from the operating system's CSPRNG).
    pub payment_key: String,
    /// The amount due in minor currency units.
    pub amount: u64,
    /// When the payment window closes.
    pub expires_at: DateTime<Utc>,
    /// One order per line, in line order, all `under_paying`.
    pub orders: Vec<Order>,
}

impl fmt::Debug for Checkout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkout")
            .field("payment_hash", &self.payment_hash)
            .field("payment_key", &"<hidden>")
            .field("amount", &self.amount)
            .field("expires_at", &self.expires_at)
            .field("orders", &self.orders)
            .finish()
    }
}

/// Order rules: checkout with a payment window, payment confirmation, cancellation and
/// caller-driven expiry cleanup.
///
/// Every method is one transaction of the store (cleanup: one per batch): it changes
/// everything it says or, when it returns an error, nothing.
///
/// ```
/// use std::sync::Arc;
/// use chrono::{TimeDelta, Utc};
/// use stockroom::{
///     MemoryStore, NewProduct, OrderConfig, OrderLine, OrderService, OrderStatus, ProductId,
///     StockService, StockStore,
/// };
///
/// let store: Arc<dyn StockStore> = Arc::new(MemoryStore::new());
/// let stock = StockService::new(store.clone());
/// let orders = OrderService::new(store, OrderConfig::default());
/// stock.create_product(NewProduct::plain(ProductId(1), "Mug", 10))?;
///
/// stock.reserve_stock(ProductId(1), 2, None)?; // add to cart
/// let now = Utc::now();
/// let checkout = orders.checkout(vec![OrderLine::new(ProductId(1), None, 2, 1_250)], now)?;
/// assert_eq!(checkout.amount, 2_500);
///
/// let paid = orders.confirm_payment_for_orders(
///     &checkout.payment_hash,
///     &checkout.payment_key,
///     now + TimeDelta::minutes(3),
/// )?;
/// assert_eq!(paid[0].status, OrderStatus::Pending);
/// let info = stock.get_stock_info(ProductId(1), None)?;
/// assert_eq!((info.available_quantity, info.reserved_quantity, info.sold_quantity), (8, 0, 2));
/// # Ok::<(), stockroom::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct OrderService {
    store: Arc<dyn StockStore>,
    config: OrderConfig,
    clock: Arc<dyn Clock>,
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| Error::storage("getrandom", e.to_string()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares two secrets in time that depends on their lengths only, not on where they
/// first differ.
fn secrets_match(given: &str, stored: &str) -> bool {
    let (a, b) = (given.as_bytes(), stored.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn append_note(order: &mut Order, note: String) {
    order.admin_notes = Some(match order.admin_notes.take() {
        Some(old) => format!("{old}\n{note}"),
        None => note,
    });
}

impl OrderService {
    /// A service over `store`.
    pub fn new(store: Arc<dyn StockStore>, config: OrderConfig) -> Self {
        OrderService {
            store,
            config,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same service stamping ledger rows with `clock` (the system clock by default).
    /// The outcome of every operation depends only on the `now` it is given.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn stamp(&self) -> DateTime<Utc> {
        normalize(self.clock.now())
    }

    /// The settings of this service.
    pub fn config(&self) -> &OrderConfig {
        &self.config
    }

    /// Turns reserved stock into orders waiting for payment: one order per line, all
    /// `under_paying`, sharing one payment that expires at `now + payment_window`. The
    /// stock stays reserved.
    ///
    /// # Errors
    ///
    /// [`Error::InsufficientReserved`] (with the line's index, and the reserved and
    /// requested quantities) when a line's stock is not reserved; [`Error::InvalidInput`]
    /// for no lines, more than [`MAX_CHECKOUT_LINES`], a unit price above
    /// [`MAX_UNIT_PRICE`] or an amount that overflows; a bad quantity, product or size as
    /// for [`StockService::reserve_stock`](crate::StockService::reserve_stock). Nothing is
    /// created.
    pub fn checkout(
        &self,
        request: impl Into<CheckoutRequest>,
        now: DateTime<Utc>,
    ) -> Result<Checkout> {
        let request = request.into();
        let now = normalize(now);
        let lines = request.lines;
        if lines.is_empty() || lines.len() > MAX_CHECKOUT_LINES {
            return Err(Error::InvalidInput {
                reason: format!(
                    "a checkout needs 1 to {MAX_CHECKOUT_LINES} lines, got {}",
                    lines.len()
                ),
            });
        }
        if let Some(r) = &request.customer_ref {
            check_label("customer_ref", r, MAX_LABEL_LEN)?;
        }
        let mut amount: u64 = 0;
        for (i, line) in lines.iter().enumerate() {
            check_quantity(line.quantity, MAX_QUANTITY).map_err(|e| e.at_line(i))?;
            check_size(line.size.as_deref())?;
            if line.unit_price > MAX_UNIT_PRICE {
                return Err(Error::InvalidInput {
                    reason: format!(
                        "line {i}: unit price {} is above the maximum {MAX_UNIT_PRICE}",
                        line.unit_price
                    ),
                });
            }
            amount = line
                .unit_price
                .checked_mul(line.quantity)
                .and_then(|v| v.checked_add(amount))
                .filter(|v| i64::try_from(*v).is_ok())
                .ok_or_else(|| Error::InvalidInput {
                    reason: "the checkout's amount overflows".into(),
                })?;
        }
        let expires_at = now
            .checked_add_signed(self.config.payment_window)
            .ok_or_else(|| Error::InvalidInput {
                reason: "the payment window ends out of range".into(),
            })?;
        let payment = Payment {
            hash: random_hex(16)?,
            key: random_hex(32)?,
            amount,
            status: PaymentStatus::Pending,
            created_at: now,
            expires_at,
            paid_at: None,
        };
        let customer_ref = request.customer_ref;
        let cart_id = request.cart_id;
        if let Some(cart) = &cart_id {
            check_cart_id(cart)?;
        }
        let unit_payment = payment.clone();
        let at = self.stamp();
        let orders = self.store.write_with(move |tx| {
            // A cart's holds are locked before the stock rows, as hold cleanup does.
            let holds = match &cart_id {
                Some(cart) => tx.cart_holds(cart)?,
                None => Vec::new(),
            };
            let keys = lines.iter().map(|l| (l.product_id, l.size.as_deref()));
            let mut rows = LockedRows::load(tx, keys, at)?;
            if cart_id.is_none() {
                // Each line must find its units reserved; lines for one row add up.
                // The counters do not move, so this copy of the rows is never stored.
                let mut check = rows.clone();
                let none = Cause::default();
                for (i, line) in lines.iter().enumerate() {
                    let size = line.size.as_deref();
                    let (kind, product) = (MovementKind::Release, line.product_id);
                    check
                        .apply(Movement::Release, kind, &none, product, size, line.quantity)
                        .map_err(|e| e.at_line(i))?;
                }
            }
            tx.insert_payment(&unit_payment)?;
            let mut orders = Vec::with_capacity(lines.len());
            for line in &lines {
                let new = NewOrder {
                    payment_hash: unit_payment.hash.clone(),
                    product_id: line.product_id,
                    size: line.size.clone(),
                    quantity: line.quantity,
                    unit_price: line.unit_price,
                    customer_ref: customer_ref.clone(),
                    created_at: now,
                    payment_expires_at: expires_at,
                };
                let id = tx.insert_order(&new)?;
                orders.push(new.into_order(id));
            }
            if let Some(cart) = &cart_id {
                // The cart's holds become the orders' reservations in this same unit:
                // there is no moment when the units are free.
                let wanted: Vec<_> = lines
                    .iter()
                    .map(|l| (l.product_id, l.size.clone(), l.quantity))
                    .collect();
                let causes: Vec<Cause> = orders.iter().map(Cause::order).collect();
                convert_holds(tx, &mut rows, cart, holds, &wanted, &causes)?;
                rows.store(tx)?;
            }
            Ok(orders)
        });
        let orders = match orders {
            Ok(orders) => orders,
            Err(e) => {
                if e.is_refusal() {
                    log::warn!("Checkout refused: {e}");
                } else {
                    log::error!("Checkout failed: {e}");
                }
                return Err(e);
            }
        };
        log::info!(
            "Checkout created {} order(s) for payment {} ({} minor units, expires {})",
            orders.len(),
            payment.hash,
            amount,
            when(expires_at)
        );
        Ok(Checkout {
            payment_hash: payment.hash,
            payment_key: payment.key,
            amount,
            expires_at,
            orders,
        })
    }

    /// Confirms a payment: every order of it, or none, moves its units reserved → sold and
    /// becomes `pending`, the payment `completed`, `paid_at = now`.
    ///
    /// A repeated confirmation returns the same orders and changes nothing. A late
    /// payment (after the window) is confirmed when its orders still hold their stock; if
    /// cleanup has released them already, their units are taken again from available,
    /// all lines or none (unless [`OrderConfig::accept_late_payments`] is off). Orders the
    /// customer cancelled stay cancelled.
    ///
    /// # Errors
    ///
    /// [`Error::PaymentNotFound`] for an unknown hash or a wrong key (the same error, so a
    /// caller cannot probe); [`Error::PaymentExpired`] for a late payment whose stock is
    /// gone (each short line with its available and requested quantities) or when late
    /// payments are refused; [`Error::PaymentCancelled`] when every order was cancelled;
    /// [`Error::InsufficientReserved`] if an order's reserved units were released behind
    /// its back. Nothing changes on error.
    pub fn confirm_payment_for_orders(
        &self,
        payment_hash: &str,
        payment_key: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Order>> {
        let now = normalize(now);
        // Hashes and keys are hex; anything far longer cannot match and is not worth a
        // query.
        if payment_hash.len() > 128 || payment_key.len() > 256 {
            return Err(Error::PaymentNotFound);
        }
        let hash = payment_hash.to_owned();
        let key = payment_key.to_owned();
        let accept_late = self.config.accept_late_payments;
        let at = self.stamp();
        let outcome = self.store.write_with(move |tx| {
            // Lock order: the payment's orders, then the payment, then stock rows (as
            // cleanup and cancellation take orders before the payment), so that a
            // confirmation racing a cleanup of the same payment never deadlocks.
            let mut orders = tx.payment_orders(&hash)?;
            let mut payment = match tx.payment(&hash)? {
                Some(p) if secrets_match(&key, &p.key) => p,
                _ => return Err(Error::PaymentNotFound),
            };
            match payment.status {
                PaymentStatus::Completed => return Ok((orders, Vec::new())),
                PaymentStatus::Cancelled => {
                    return Err(Error::PaymentCancelled {
                        payment_hash: hash.clone(),
                    });
                }
                PaymentStatus::Pending | PaymentStatus::Expired => {}
            }
            let late = now > payment.expires_at;
            if late && !accept_late {
                return Err(Error::PaymentExpired {
                    payment_hash: hash.clone(),
                    expired_at: payment.expires_at,
                    lines: Vec::new(),
                });
            }
            let keys = orders.iter().map(|o| (o.product_id, o.size.as_deref()));
            let mut rows = LockedRows::load(tx, keys, at)?;
            let mut short = Vec::new();
            let mut paid_now = Vec::new();
            for order in &mut orders {
                let (movement, kind, note) = match (order.status, order.payment_status) {
                    (OrderStatus::UnderPaying, _) => {
                        (Movement::SellReserved, MovementKind::Sale, None)
                    }
                    (OrderStatus::Cancelled, PaymentStatus::Expired) => (
                        Movement::SellAvailable,
                        MovementKind::LatePaymentRevival,
                        Some(format!(
                            "Revived by a late payment at {}: stock taken again from available.",
                            when(now)
                        )),
                    ),
                    _ => continue,
                };
                let size = order.size.as_deref();
                let cause = Cause::order(order);
                match rows.apply(
                    movement,
                    kind,
                    &cause,
                    order.product_id,
                    size,
                    order.quantity,
                ) {
                    Ok(_) => {}
                    Err(Error::InsufficientStock { available, .. }) => {
                        short.push(ShortLine {
                            order_id: order.id,
                            product_id: order.product_id,
                            size: order.size.clone(),
                            available_quantity: available,
                            requested_quantity: order.quantity,
                        });
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                order.status = OrderStatus::Pending;
                order.payment_status = PaymentStatus::Completed;
                order.paid_at = Some(now);
                if let Some(note) = note {
                    append_note(order, note);
                }
                paid_now.push((order.id, movement));
            }
            if !short.is_empty() {
                return Err(Error::PaymentExpired {
                    payment_hash: hash.clone(),
                    expired_at: payment.expires_at,
                    lines: short,
                });
            }
            rows.store(tx)?;
            for order in &orders {
                if paid_now.iter().any(|(id, _)| *id == order.id) {
                    tx.update_order(order)?;
                }
            }
            payment.status = PaymentStatus::Completed;
            payment.paid_at = Some(now);
            tx.update_payment(&payment)?;
            Ok((orders, paid_now))
        });
        match outcome {
            Ok((orders, paid_now)) => {
                if !paid_now.is_empty() {
                    for (id, movement) in &paid_now {
                        let Some(o) = orders.iter().find(|o| o.id == *id) else {
                            continue;
                        };
                        let row = RowName(o.product_id, o.size.as_deref());
                        log::info!("Order {id}: {}", movement.describe(o.quantity, &row));
                    }
                    log::info!("Payment {payment_hash} confirmed");
                } else {
                    log::info!("Payment {payment_hash} confirmed again: nothing to do");
                }
                Ok(orders)
            }
            Err(e) => {
                if e.is_refusal() {
                    log::warn!("Payment confirmation refused: {e}");
                } else {
                    log::error!("Payment confirmation failed: {e}");
                }
                Err(e)
            }
        }
    }

    /// Cancels an order whose payment has not arrived (the customer gave up): its units go
    /// back to available and it becomes `cancelled`. When no order of its payment is left
    /// waiting, the payment is `cancelled` too.
    ///
    /// # Errors
    ///
    /// [`Error::OrderNotFound`]; [`Error::OrderNotCancellable`] for a paid or cancelled
    /// order; [`Error::InsufficientReserved`] if its units were released behind its back.
    pub fn cancel_order(&self, order_id: OrderId, now: DateTime<Utc>) -> Result<Order> {
        let now = normalize(now);
        let at = self.stamp();
        let result = self.store.write_with(move |tx| {
            let mut order = tx
                .order(order_id)?
                .ok_or(Error::OrderNotFound { order_id })?;
            if order.status != OrderStatus::UnderPaying {
                return Err(Error::OrderNotCancellable {
                    order_id,
                    status: order.status,
                });
            }
            let mut rows = LockedRows::load(tx, [(order.product_id, order.size.as_deref())], at)?;
            rows.apply(
                Movement::Release,
                MovementKind::Cancel,
                &Cause::order(&order),
                order.product_id,
                order.size.as_deref(),
                order.quantity,
            )?;
            rows.store(tx)?;
            order.status = OrderStatus::Cancelled;
            order.payment_status = PaymentStatus::Cancelled;
            append_note(
                &mut order,
                format!("Cancelled by the customer at {}.", when(now)),
            );
            tx.update_order(&order)?;
            settle_payment(tx, &order.payment_hash, PaymentStatus::Cancelled)?;
            Ok(order)
        });
        match &result {
            Ok(o) => {
                let row = RowName(o.product_id, o.size.as_deref());
                log::info!(
                    "Order {order_id} cancelled: {}",
                    Movement::Release.describe(o.quantity, &row)
                );
            }
            Err(e) if e.is_refusal() => log::warn!("Cancelling order {order_id} refused: {e}"),
            Err(e) => log::error!("Cancelling order {order_id} failed: {e}"),
        }
        result
    }

    /// Cancels every order still `under_paying` whose payment window closed before `now`:
    /// its units go back to available, the order becomes `cancelled` with payment status
    /// `expired` and a note saying when and why, and the payment becomes `expired`.
    ///
    /// Works in batches of [`OrderConfig::cleanup_batch_size`], one transaction each; one
    /// order's failure does not stop or undo the others. Running it twice, or from two
    /// processes at once, releases each order exactly once.
    ///
    /// # Errors
    ///
    /// None for a failed order (it is counted in the report); [`Error::Storage`] only if
    /// the expired orders cannot even be listed.
    pub fn cleanup_expired_payments(&self, now: DateTime<Utc>) -> Result<CleanupReport> {
        let now = normalize(now);
        cleanup::run::<Order>(&*self.store, now, self.config.cleanup_batch_size, || {
            self.stamp()
        })
    }

    /// The order with this id.
    ///
    /// # Errors
    ///
    /// [`Error::OrderNotFound`].
    pub fn get_order(&self, order_id: OrderId) -> Result<Order> {
        self.store
            .read_with(|tx| tx.order(order_id)?.ok_or(Error::OrderNotFound { order_id }))
    }

    /// The orders of a payment, by id.
    ///
    /// # Errors
    ///
    /// [`Error::PaymentNotFound`] when no order has this payment hash.
    pub fn get_payment_orders(&self, payment_hash: &str) -> Result<Vec<Order>> {
        let orders = self.store.read_with(|tx| tx.payment_orders(payment_hash))?;
        if orders.is_empty() {
            return Err(Error::PaymentNotFound);
        }
        Ok(orders)
    }
}

impl Expiring for Order {
    const NAME: &'static str = "order";

    fn cursor(&self) -> (DateTime<Utc>, i64) {
        (self.payment_expires_at, self.id.0)
    }

    fn failure(&self, e: &Error) -> CleanupFailure {
        CleanupFailure {
            order_id: Some(self.id),
            hold_id: None,
            error_code: e.code(),
            error: e.to_string(),
        }
    }

    fn select(
        tx: &mut dyn StockRead,
        now: DateTime<Utc>,
        after: Cursor,
        limit: usize,
    ) -> Result<Vec<Self>> {
        tx.expired_orders(now, after.map(|(t, id)| (t, OrderId(id))), limit)
    }

    fn reload(&self, tx: &mut dyn StockTx) -> Result<Option<Self>> {
        Ok(tx
            .order(self.id)?
            .filter(|o| o.status == OrderStatus::UnderPaying))
    }

    fn expire(tx: &mut dyn StockTx, items: Vec<Self>, at: DateTime<Utc>) -> Result<Batch<Self>> {
        expire_orders(tx, items, at)
    }

    fn log_released(&self) {
        let row = RowName(self.product_id, self.size.as_deref());
        log::info!(
            "Order {} expired: {}",
            self.id,
            Movement::Release.describe(self.quantity, &row)
        );
    }
}

/// Releases the stock of `orders` (all `under_paying`, loaded in this unit) and cancels
/// them as expired. An order whose release is refused is reported and left untouched;
/// the others go on.
fn expire_orders(
    tx: &mut dyn StockTx,
    orders: Vec<Order>,
    at: DateTime<Utc>,
) -> Result<Batch<Order>> {
    let mut outcome = Batch::default();
    if orders.is_empty() {
        return Ok(outcome);
    }
    let keys = orders.iter().map(|o| (o.product_id, o.size.as_deref()));
    let mut rows = LockedRows::load(tx, keys, at)?;
    let mut payments = BTreeSet::new();
    for mut order in orders {
        let size = order.size.as_deref();
        let cause = Cause::order(&order);
        let kind = MovementKind::Expire;
        if let Err(e) = rows.apply(
            Movement::Release,
            kind,
            &cause,
            order.product_id,
            size,
            order.quantity,
        ) {
            outcome.failed.push((order, e));
            continue;
        }
        order.status = OrderStatus::Cancelled;
        order.payment_status = PaymentStatus::Expired;
        let note = format!(
            "Payment expired at {}. Stock unreserved automatically.",
            when(order.payment_expires_at)
        );
        append_note(&mut order, note);
        tx.update_order(&order)?;
        payments.insert(order.payment_hash.clone());
        outcome.released.push(order);
    }
    rows.store(tx)?;
    for hash in payments {
        settle_payment(tx, &hash, PaymentStatus::Expired)?;
    }
    Ok(outcome)
}

/// Gives a pending payment its final status once none of its orders waits any more.
fn settle_payment(tx: &mut dyn StockTx, hash: &str, status: PaymentStatus) -> Result<()> {
    let Some(mut payment) = tx.payment(hash)? else {
        return Ok(());
    };
    if payment.status != PaymentStatus::Pending {
        return Ok(());
    }
    let orders = tx.payment_orders(hash)?;
    if orders.iter().any(|o| o.status == OrderStatus::UnderPaying) {
        return Ok(());
    }
    // A payment whose orders were partly expired stays revivable: call it expired.
    payment.status = if orders
        .iter()
        .any(|o| o.payment_status == PaymentStatus::Expired)
    {
        PaymentStatus::Expired
    } else {
        status
    };
    tx.update_payment(&payment)
}

#[cfg(test)]
mod tests {
    use super::secrets_match;

    #[test]
    fn secrets_match_only_equal_strings() {
        assert!(secrets_match("abc", "abc"));
        assert!(!secrets_match("abd", "abc"));
        assert!(!secrets_match("ab", "abc"));
        assert!(!secrets_match("abc\0", "abc"));
        assert!(!secrets_match("", "abc"));
        assert!(secrets_match("", ""));
    }
}
