//! The values stockroom stores and returns: ids, stock levels, orders, payments.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The largest quantity a single movement may carry (reserve, unreserve, sale, an order
/// line): one million units.
///
/// A larger number is almost always a bug in the caller (a price passed as a quantity, a
/// negative number cast to unsigned), so it is refused with
/// [`Error::InvalidQuantity`](crate::Error::InvalidQuantity).
pub const MAX_QUANTITY: u64 = 1_000_000;

/// The largest value any stock counter may hold, and the largest initial stock, restock or
/// counted quantity: one trillion units.
///
/// A restock that would push `available + reserved + sold` past this bound is refused with
/// [`Error::StockLimitExceeded`](crate::Error::StockLimitExceeded) instead of overflowing.
pub const MAX_STOCK: u64 = 1_000_000_000_000;

/// The longest size label or product name, in bytes.
pub const MAX_LABEL_LEN: usize = 64;

/// The longest product name, in bytes.
pub const MAX_NAME_LEN: usize = 200;

/// `as_str` (the name stored in databases and shown in JSON), `parse` and `Display` for a
/// status enum.
macro_rules! stored_names {
    ($ty:ident { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// The name it is stored under.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),*
                }
            }

            /// Parses a stored name.
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($name => Some($ty::$variant),)*
                    _ => None,
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// A product's id, chosen by the shop (usually its catalogue's primary key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProductId(pub i64);

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An order's id, assigned by the store when the order is created at checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(pub i64);

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The three counters of one stock row (a product without sizes, or one size of a product).
///
/// `available` can be reserved or sold, `reserved` is held for carts and unpaid orders, and
/// `sold` only ever grows through sales.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StockLevels {
    /// Units that can be reserved or sold now.
    pub available: u64,
    /// Units held for carts and orders awaiting payment.
    pub reserved: u64,
    /// Units sold.
    pub sold: u64,
}

impl StockLevels {
    /// Levels with `available` units and nothing reserved or sold.
    pub const fn with_available(available: u64) -> Self {
        StockLevels {
            available,
            reserved: 0,
            sold: 0,
        }
    }

    /// `available + reserved + sold`, or `None` if the sum overflows `u64`.
    pub fn total(&self) -> Option<u64> {
        self.available
            .checked_add(self.reserved)?
            .checked_add(self.sold)
    }

    /// The counters after adding `delta`, or `None` if a counter would go below zero or
    /// the total above [`MAX_STOCK`]: the guard of
    /// [`StockTx::add_to_stock`](crate::StockTx::add_to_stock).
    ///
    /// ```
    /// use stockroom::{CounterDelta, StockLevels};
    ///
    /// let levels = StockLevels::with_available(3);
    /// let reserve_two = CounterDelta { available: -2, reserved: 2, sold: 0 };
    /// let after = levels.after(reserve_two).unwrap();
    /// assert_eq!((after.available, after.reserved), (1, 2));
    /// assert_eq!(after.after(reserve_two), None);
    /// ```
    pub fn after(self, delta: CounterDelta) -> Option<StockLevels> {
        let add = |counter: u64, d: i64| counter.checked_add_signed(d);
        let after = StockLevels {
            available: add(self.available, delta.available)?,
            reserved: add(self.reserved, delta.reserved)?,
            sold: add(self.sold, delta.sold)?,
        };
        after
            .total()
            .is_some_and(|t| t <= MAX_STOCK)
            .then_some(after)
    }
}

/// What [`StockService::get_stock_info`](crate::StockService::get_stock_info) reports for one
/// stock row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StockInfo {
    /// The product.
    pub product_id: ProductId,
    /// The size, for a product with sizes.
    pub size: Option<String>,
    /// Units that can be reserved or sold now.
    pub available_quantity: u64,
    /// Units held for carts and orders awaiting payment.
    pub reserved_quantity: u64,
    /// Units sold.
    pub sold_quantity: u64,
}

impl StockInfo {
    pub(crate) fn new(product_id: ProductId, size: Option<&str>, levels: StockLevels) -> Self {
        StockInfo {
            product_id,
            size: size.map(str::to_owned),
            available_quantity: levels.available,
            reserved_quantity: levels.reserved,
            sold_quantity: levels.sold,
        }
    }

    /// The counters as [`StockLevels`].
    pub fn levels(&self) -> StockLevels {
        StockLevels {
            available: self.available_quantity,
            reserved: self.reserved_quantity,
            sold: self.sold_quantity,
        }
    }
}

/// The answer of
/// [`StockService::check_stock_availability`](crate::StockService::check_stock_availability).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Availability {
    /// Whether `requested_quantity` could be reserved right now.
    pub available: bool,
    /// Units available now.
    pub available_quantity: u64,
    /// Units asked for.
    pub requested_quantity: u64,
    /// The error code a reservation would get, when `available` is false
    /// (`"INSUFFICIENT_STOCK"`).
    pub reason: Option<&'static str>,
}

/// A product as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Product {
    /// The shop's id for it.
    pub id: ProductId,
    /// A display name, used in logs and reports.
    pub name: String,
    /// Whether stock is kept per size (then every stock operation needs a size) or for the
    /// product as a whole (then a size is an error).
    pub has_sizes: bool,
}

/// How a new product's stock is laid out: see [`NewProduct`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InitialStock {
    /// One stock row for the whole product.
    Plain(u64),
    /// One stock row per size label, each with its initial available quantity.
    Sized(Vec<(String, u64)>),
}

/// A product to create with [`StockService::create_product`](crate::StockService::create_product).
///
/// ```
/// use stockroom::{NewProduct, ProductId};
///
/// let mug = NewProduct::plain(ProductId(1), "Mug", 40);
/// let shirt = NewProduct::sized(ProductId(2), "T-shirt", [("S", 5), ("M", 8), ("L", 2)]);
/// assert!(!mug.has_sizes());
/// assert!(shirt.has_sizes());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NewProduct {
    /// The shop's id for the product; must not exist yet.
    pub id: ProductId,
    /// A display name (1 to [`MAX_NAME_LEN`] bytes).
    pub name: String,
    /// The initial stock.
    pub stock: InitialStock,
}

impl NewProduct {
    /// A product without sizes, with `available` units in stock.
    pub fn plain(id: ProductId, name: impl Into<String>, available: u64) -> Self {
        NewProduct {
            id,
            name: name.into(),
            stock: InitialStock::Plain(available),
        }
    }

    /// A product with sizes, each with its initial available quantity.
    pub fn sized<S: Into<String>>(
        id: ProductId,
        name: impl Into<String>,
        sizes: impl IntoIterator<Item = (S, u64)>,
    ) -> Self {
        NewProduct {
            id,
            name: name.into(),
            stock: InitialStock::Sized(sizes.into_iter().map(|(s, q)| (s.into(), q)).collect()),
        }
    }

    /// Whether the product keeps stock per size.
    pub fn has_sizes(&self) -> bool {
        matches!(self.stock, InitialStock::Sized(_))
    }
}

/// One line of a multi-line reservation or a checkout: a quantity of a product, or of one
/// size of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StockLine {
    /// The product.
    pub product_id: ProductId,
    /// The size, for a product with sizes.
    pub size: Option<String>,
    /// Units, 1 to [`MAX_QUANTITY`].
    pub quantity: u64,
}

impl StockLine {
    /// A line for `quantity` units of `product_id`, of `size` when the product has sizes.
    pub fn new(product_id: ProductId, size: Option<&str>, quantity: u64) -> Self {
        StockLine {
            product_id,
            size: size.map(str::to_owned),
            quantity,
        }
    }
}

/// The outcome of [`StockService::record_stock_count`](crate::StockService::record_stock_count).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StockCount {
    /// The product counted.
    pub product_id: ProductId,
    /// The size counted, for a product with sizes.
    pub size: Option<String>,
    /// Units the system expected on the shelf before the count (`available + reserved`).
    pub expected: u64,
    /// Units counted on the shelf.
    pub counted: u64,
    /// `counted - expected`: negative when units are missing.
    pub discrepancy: i64,
    /// Whether the count was booked. A count lower than the reserved units cannot be booked
    /// (it would make `available` negative): it is reported, and nothing changes.
    pub applied: bool,
    /// The counters after the count.
    pub levels: StockLevels,
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Created at checkout; its stock is reserved until the payment arrives or the window
    /// passes.
    UnderPaying,
    /// Paid: its units are sold and it waits for the shop to ship it.
    Pending,
    /// Cancelled (by expiry or by the customer); its units went back to `available`.
    Cancelled,
}

stored_names!(OrderStatus {
    UnderPaying => "under_paying",
    Pending => "pending",
    Cancelled => "cancelled",
});

/// Where a payment (and each of its orders' payment) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Waiting for the payment inside its window.
    Pending,
    /// Paid.
    Completed,
    /// The window passed and cleanup released the stock.
    Expired,
    /// The customer cancelled before paying.
    Cancelled,
}

stored_names!(PaymentStatus {
    Pending => "pending",
    Completed => "completed",
    Expired => "expired",
    Cancelled => "cancelled",
});

/// One order: one line of a checkout.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Order {
    /// Assigned by the store.
    pub id: OrderId,
    /// The payment this order is paid with, shared by all orders of one checkout.
    pub payment_hash: String,
    /// The product ordered.
    pub product_id: ProductId,
    /// The size ordered, for a product with sizes.
    pub size: Option<String>,
    /// Units ordered.
    pub quantity: u64,
    /// Price of one unit in minor currency units (cents).
    pub unit_price: u64,
    /// The shop's reference for the customer, passed through untouched.
    pub customer_ref: Option<String>,
    /// Where the order stands.
    pub status: OrderStatus,
    /// Where its payment stands.
    pub payment_status: PaymentStatus,
    /// When the checkout created it.
    pub created_at: DateTime<Utc>,
    /// When its payment window closes.
    pub payment_expires_at: DateTime<Utc>,
    /// When it was paid.
    pub paid_at: Option<DateTime<Utc>>,
    /// Notes for the shop's staff: why it was cancelled or revived.
    pub admin_notes: Option<String>,
}

/// The payment record shared by the orders of one checkout, as the store keeps it.
///
/// Its `key` is the secret the payment provider's callback must present; it is never logged
/// and its `Debug` output hides it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Payment {
    /// The public id of the payment.
    pub hash: String,
    /// The secret key (hex, 128 random bits or more).
    pub key: String,
    /// The amount due in minor currency units: the sum of the orders' `quantity * unit_price`.
    pub amount: u64,
    /// Where the payment stands.
    pub status: PaymentStatus,
    /// When the checkout created it.
    pub created_at: DateTime<Utc>,
    /// When the payment window closes.
    pub expires_at: DateTime<Utc>,
    /// When it was paid.
    pub paid_at: Option<DateTime<Utc>>,
}

impl fmt::Debug for Payment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payment")
            .field("hash", &self.hash)
            .field("key", &"<hidden>")
            .field("amount", &self.amount)
            .field("status", &self.status)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("paid_at", &self.paid_at)
            .finish()
    }
}

/// A new order as the service hands it to the store, before the store assigns its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NewOrder {
    /// The payment it belongs to.
    pub payment_hash: String,
    /// The product ordered.
    pub product_id: ProductId,
    /// The size ordered.
    pub size: Option<String>,
    /// Units ordered.
    pub quantity: u64,
    /// Price of one unit in minor currency units.
    pub unit_price: u64,
    /// The shop's customer reference.
    pub customer_ref: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its payment window closes.
    pub payment_expires_at: DateTime<Utc>,
}

impl NewOrder {
    /// The order the store creates from this, with the id it assigned.
    pub fn into_order(self, id: OrderId) -> Order {
        Order {
            id,
            payment_hash: self.payment_hash,
            product_id: self.product_id,
            size: self.size,
            quantity: self.quantity,
            unit_price: self.unit_price,
            customer_ref: self.customer_ref,
            status: OrderStatus::UnderPaying,
            payment_status: PaymentStatus::Pending,
            created_at: self.created_at,
            payment_expires_at: self.payment_expires_at,
            paid_at: None,
            admin_notes: None,
        }
    }
}

/// What caused a stock movement: see [`StockMovement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovementKind {
    /// available → reserved, by `reserve_stock` or `reserve_lines`.
    Reserve,
    /// reserved → available, by `unreserve_stock` or `unreserve_lines`.
    Release,
    /// → sold: a direct sale (from available) or a confirmed payment (from reserved).
    Sale,
    /// reserved → available: an order's payment window passed.
    Expire,
    /// reserved → available: the customer cancelled an unpaid order.
    Cancel,
    /// + available: a delivery, or a product's initial stock.
    Restock,
    /// ± available: a physical count differed from the system's figure.
    CountCorrection,
    /// available → sold: a payment after cleanup took the units again.
    LatePaymentRevival,
    /// available → reserved: a cart hold.
    Hold,
    /// reserved → available: a cart hold released by the shop.
    HoldRelease,
    /// reserved → available: a cart hold that expired.
    HoldExpire,
    /// A cart hold became an order's reservation at checkout (no counter moves).
    HoldConvert,
}

impl MovementKind {
    /// Every kind, in declaration order.
    pub const ALL: [MovementKind; 12] = [
        MovementKind::Reserve,
        MovementKind::Release,
        MovementKind::Sale,
        MovementKind::Expire,
        MovementKind::Cancel,
        MovementKind::Restock,
        MovementKind::CountCorrection,
        MovementKind::LatePaymentRevival,
        MovementKind::Hold,
        MovementKind::HoldRelease,
        MovementKind::HoldExpire,
        MovementKind::HoldConvert,
    ];
}

stored_names!(MovementKind {
    Reserve => "reserve",
    Release => "release",
    Sale => "sale",
    Expire => "expire",
    Cancel => "cancel",
    Restock => "restock",
    CountCorrection => "count_correction",
    LatePaymentRevival => "late_payment_revival",
    Hold => "hold",
    HoldRelease => "hold_release",
    HoldExpire => "hold_expire",
    HoldConvert => "hold_convert",
});

/// A signed change to each counter of a stock row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CounterDelta {
    /// Change to `available`.
    pub available: i64,
    /// Change to `reserved`.
    pub reserved: i64,
    /// Change to `sold`.
    pub sold: i64,
}

impl CounterDelta {
    /// The change from `before` to `after`. Counters are at most [`MAX_STOCK`], so the
    /// differences fit.
    pub fn between(before: StockLevels, after: StockLevels) -> Self {
        let d = |a: u64, b: u64| b as i64 - a as i64;
        CounterDelta {
            available: d(before.available, after.available),
            reserved: d(before.reserved, after.reserved),
            sold: d(before.sold, after.sold),
        }
    }

    /// The sum of two deltas (saturating: sums of real ledgers stay far from the bounds).
    pub fn plus(self, other: CounterDelta) -> Self {
        CounterDelta {
            available: self.available.saturating_add(other.available),
            reserved: self.reserved.saturating_add(other.reserved),
            sold: self.sold.saturating_add(other.sold),
        }
    }

    /// Whether these deltas, summed from zero, equal `levels`.
    pub fn matches(&self, levels: StockLevels) -> bool {
        i64::try_from(levels.available) == Ok(self.available)
            && i64::try_from(levels.reserved) == Ok(self.reserved)
            && i64::try_from(levels.sold) == Ok(self.sold)
    }
}

/// One row of the append-only stock ledger: a change to one stock row, written in the same
/// transaction as the change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StockMovement {
    /// Assigned by the store, ascending.
    pub id: i64,
    /// When it happened, from the service's [`Clock`](crate::Clock).
    pub at: DateTime<Utc>,
    /// The product.
    pub product_id: ProductId,
    /// The size, for a product with sizes.
    pub size: Option<String>,
    /// What kind of movement.
    pub kind: MovementKind,
    /// The change to each counter.
    pub delta: CounterDelta,
    /// The order that caused it.
    pub order_id: Option<OrderId>,
    /// The payment that caused it.
    pub payment_hash: Option<String>,
    /// The caller's reference (see
    /// [`StockService::with_reference`](crate::StockService::with_reference)) or the cart id.
    pub reference: Option<String>,
}

/// A movement as the service hands it to the store, before the store assigns its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NewMovement {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// The product.
    pub product_id: ProductId,
    /// The size.
    pub size: Option<String>,
    /// What kind of movement.
    pub kind: MovementKind,
    /// The change to each counter.
    pub delta: CounterDelta,
    /// The order that caused it.
    pub order_id: Option<OrderId>,
    /// The payment that caused it.
    pub payment_hash: Option<String>,
    /// The caller's reference or cart id.
    pub reference: Option<String>,
}

impl NewMovement {
    /// The movement the store keeps, with the id it assigned.
    pub fn into_movement(self, id: i64) -> StockMovement {
        StockMovement {
            id,
            at: self.at,
            product_id: self.product_id,
            size: self.size,
            kind: self.kind,
            delta: self.delta,
            order_id: self.order_id,
            payment_hash: self.payment_hash,
            reference: self.reference,
        }
    }
}

/// Which movements to read: see
/// [`StockService::movements`](crate::StockService::movements).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MovementQuery {
    /// The product.
    pub product_id: ProductId,
    /// One size only; `None` for every row of the product.
    pub size: Option<String>,
    /// From this time on (inclusive).
    pub from: Option<DateTime<Utc>>,
    /// Before this time (exclusive).
    pub to: Option<DateTime<Utc>>,
    /// Only movements after this one, in (time, id) order: pass the last movement of the
    /// previous page to get the next.
    pub after: Option<(DateTime<Utc>, i64)>,
    /// At most this many (1 to 10,000; 100 by default).
    pub limit: usize,
}

impl MovementQuery {
    /// The first 100 movements of every row of `product_id`, oldest first.
    pub fn product(product_id: ProductId) -> Self {
        MovementQuery {
            product_id,
            size: None,
            from: None,
            to: None,
            after: None,
            limit: 100,
        }
    }

    /// The same query for one size.
    pub fn size(mut self, size: impl Into<String>) -> Self {
        self.size = Some(size.into());
        self
    }

    /// The same query over `[from, to)`.
    pub fn between(mut self, from: DateTime<Utc>, to: DateTime<Utc>) -> Self {
        self.from = Some(from);
        self.to = Some(to);
        self
    }

    /// The same query, at most `limit` movements.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The query for the page after `last`.
    pub fn after(mut self, last: &StockMovement) -> Self {
        self.after = Some((last.at, last.id));
        self
    }
}

/// A physical stock count as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StockCountRecord {
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// The count itself.
    pub count: StockCount,
}

/// The sum of the deltas of one movement kind for one product: what the metrics are made
/// of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KindTotal {
    /// The product.
    pub product_id: ProductId,
    /// The kind.
    pub kind: MovementKind,
    /// The summed deltas.
    pub delta: CounterDelta,
}

/// A stock row whose counters differ from the sum of its ledger: see
/// [`StockService::verify_ledger`](crate::StockService::verify_ledger).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LedgerMismatch {
    /// The product.
    pub product_id: ProductId,
    /// The size.
    pub size: Option<String>,
    /// The counters as stored.
    pub counters: StockLevels,
    /// The sum of the row's movements.
    pub ledger: CounterDelta,
}

/// The result of [`StockService::verify_ledger`](crate::StockService::verify_ledger).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LedgerReport {
    /// Stock rows checked.
    pub rows_checked: usize,
    /// Rows whose counters differ from their ledger (empty when everything adds up).
    pub mismatches: Vec<LedgerMismatch>,
}

impl LedgerReport {
    /// Whether every row's counters equal the sum of its movements.
    pub fn is_consistent(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// A cart hold's id, assigned by the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HoldId(pub i64);

impl fmt::Display for HoldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a cart hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    /// Its units are reserved for the cart.
    Active,
    /// The shop released it; its units went back to available.
    Released,
    /// It expired and cleanup gave its units back.
    Expired,
    /// A checkout turned it into orders.
    Converted,
}

stored_names!(HoldStatus {
    Active => "active",
    Released => "released",
    Expired => "expired",
    Converted => "converted",
});

/// Units of one stock row held for a cart until an expiry: see
/// [`StockService::hold_cart`](crate::StockService::hold_cart).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hold {
    /// Assigned by the store.
    pub id: HoldId,
    /// The shop's cart id.
    pub cart_id: String,
    /// The product.
    pub product_id: ProductId,
    /// The size, for a product with sizes.
    pub size: Option<String>,
    /// Units held now (what is left after a partial checkout).
    pub quantity: u64,
    /// Where it stands.
    pub status: HoldStatus,
    /// When it was first made.
    pub created_at: DateTime<Utc>,
    /// When it expires unless the cart is held again.
    pub expires_at: DateTime<Utc>,
}

/// A hold as the service hands it to the store, before the store assigns its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NewHold {
    /// The shop's cart id.
    pub cart_id: String,
    /// The product.
    pub product_id: ProductId,
    /// The size.
    pub size: Option<String>,
    /// Units held.
    pub quantity: u64,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}

impl NewHold {
    /// The hold the store keeps, with the id it assigned, `active`.
    pub fn into_hold(self, id: HoldId) -> Hold {
        Hold {
            id,
            cart_id: self.cart_id,
            product_id: self.product_id,
            size: self.size,
            quantity: self.quantity,
            status: HoldStatus::Active,
            created_at: self.created_at,
            expires_at: self.expires_at,
        }
    }
}

/// How a stock row's reserved units are spoken for: see
/// [`StockService::get_reservation_breakdown`](crate::StockService::get_reservation_breakdown).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReservationBreakdown {
    /// The row's counters.
    pub info: StockInfo,
    /// Units held in active cart holds.
    pub held_in_carts: u64,
    /// Units of orders waiting for payment (`under_paying`).
    pub awaiting_payment: u64,
    /// The rest of `reserved`: units reserved with `reserve_stock` by a shop that tracks
    /// carts itself.
    pub reserved_otherwise: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stored name parses back, and is the name serde uses in JSON.
    #[test]
    fn stored_names_round_trip_and_match_serde() {
        fn check<T>(all: &[T], name: fn(T) -> &'static str, parse: fn(&str) -> Option<T>)
        where
            T: Copy + PartialEq + std::fmt::Debug + Serialize + fmt::Display,
        {
            for &v in all {
                assert_eq!(parse(name(v)), Some(v));
                assert_eq!(v.to_string(), name(v));
                assert_eq!(
                    serde_json::to_string(&v).unwrap(),
                    format!("\"{}\"", name(v))
                );
            }
            assert_eq!(parse("no such name"), None);
        }
        use OrderStatus as O;
        use PaymentStatus as P;
        check(
            &[O::UnderPaying, O::Pending, O::Cancelled],
            O::as_str,
            O::parse,
        );
        check(
            &[P::Pending, P::Completed, P::Expired, P::Cancelled],
            P::as_str,
            P::parse,
        );
        use HoldStatus as H;
        check(
            &[H::Active, H::Released, H::Expired, H::Converted],
            H::as_str,
            H::parse,
        );
        check(
            &MovementKind::ALL,
            MovementKind::as_str,
            MovementKind::parse,
        );
    }
}
