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

impl OrderStatus {
    /// The stored name: `under_paying`, `pending` or `cancelled`.
    pub const fn as_str(self) -> &'static str {
        match self {
            OrderStatus::UnderPaying => "under_paying",
            OrderStatus::Pending => "pending",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "under_paying" => OrderStatus::UnderPaying,
            "pending" => OrderStatus::Pending,
            "cancelled" => OrderStatus::Cancelled,
            _ => return None,
        })
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

impl PaymentStatus {
    /// The stored name: `pending`, `completed`, `expired` or `cancelled`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "pending",
            PaymentStatus::Completed => "completed",
            PaymentStatus::Expired => "expired",
            PaymentStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => PaymentStatus::Pending,
            "completed" => PaymentStatus::Completed,
            "expired" => PaymentStatus::Expired,
            "cancelled" => PaymentStatus::Cancelled,
            _ => return None,
        })
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
