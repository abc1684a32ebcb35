//! stockroom keeps a shop's stock honest.
//!
//! It reserves stock when an item goes into a cart, turns the cart into orders that wait
//! for payment inside a payment window (15 minutes by default), sells the reserved units
//! when the payment is confirmed, and gives them back when the window runs out. It never
//! oversells: every operation is one transaction that changes everything it says or
//! nothing, and every refusal is an [`Error`] with a stable code and the numbers that
//! explain it.
//!
//! ```
//! use std::sync::Arc;
//! use chrono::{TimeDelta, Utc};
//! use stockroom::{
//!     MemoryStore, NewProduct, OrderConfig, OrderLine, OrderService, OrderStatus, ProductId,
//!     StockService, StockStore,
//! };
//!
//! # fn main() -> Result<(), stockroom::Error> {
//! // Any store: MemoryStore here, SqliteStore::open("shop.db")? in an application.
//! let store: Arc<dyn StockStore> = Arc::new(MemoryStore::new());
//! let stock = StockService::new(store.clone());
//! let orders = OrderService::new(store, OrderConfig::default());
//!
//! let shirt = ProductId(42);
//! stock.create_product(NewProduct::sized(shirt, "T-shirt", [("M", 5), ("L", 2)]))?;
//!
//! // Add to cart: available -> reserved.
//! stock.reserve_stock(shirt, 2, Some("M"))?;
//!
//! // Checkout: one order per line, waiting for payment for 15 minutes.
//! let now = Utc::now();
//! let checkout = orders.checkout(vec![OrderLine::new(shirt, Some("M"), 2, 1_999)], now)?;
//!
//! // The payment provider calls back: reserved -> sold.
//! orders.confirm_payment_for_orders(
//!     &checkout.payment_hash,
//!     &checkout.payment_key,
//!     now + TimeDelta::minutes(4),
//! )?;
//! let m = stock.get_stock_info(shirt, Some("M"))?;
//! assert_eq!((m.available_quantity, m.reserved_quantity, m.sold_quantity), (3, 0, 2));
//!
//! // Asking for more than there is: refused with the numbers, nothing changed.
//! let err = stock.reserve_stock(shirt, 5, Some("L")).unwrap_err();
//! assert_eq!(err.code(), "INSUFFICIENT_STOCK");
//! assert_eq!(
//!     err.to_string(),
//!     "not enough stock available for product 42 size L: 2 available, 5 requested"
//! );
//!
//! // Orders whose window passed are released by a cleanup the caller drives.
//! let report = orders.cleanup_expired_payments(now + TimeDelta::minutes(30))?;
//! assert_eq!(report.processed_count, 0);
//! assert_eq!(orders.get_order(checkout.orders[0].id)?.status, OrderStatus::Pending);
//! # Ok(())
//! # }
//! ```
//!
//! # Shape
//!
//! - [`StockService`] and [`OrderService`] hold every rule, written once.
//! - They run on any [`StockStore`]: [`MemoryStore`] (always built), [`SqliteStore`]
//!   (default feature `sqlite`, SQLite bundled).
//! - Operations whose outcome depends on time take `now` explicitly; the caller runs
//!   [`OrderService::cleanup_expired_payments`] from a timer or a cron job.
//!
//! # Features
//!
//! - `sqlite` (default): [`SqliteStore`], on rusqlite with SQLite bundled.
//! - `conformance`: the `stockroom::conformance` suite, for testing a third-party backend.
//! - `postgres`: `PostgresStore`, for several application instances sharing one
//!   PostgreSQL database.
//!
//! # Logging
//!
//! Through the [`log`](https://docs.rs/log) facade, never installing a logger: `info` for
//! each stock movement ("Reserved 2 units of size M for product 123"), `warn` for refused
//! operations, `error` for failures, `debug` in backends.
//!
// Without the `sqlite` feature there is no `SqliteStore` to link to: the links above go
// to its page on docs.rs instead.
#![cfg_attr(
    not(feature = "sqlite"),
    doc = "[`SqliteStore`]: https://docs.rs/stockroom/latest/stockroom/struct.SqliteStore.html"
)]
#![deny(missing_docs)]
#![warn(rust_2018_idioms, unreachable_pub)]

mod clock;
mod error;
mod model;
mod service;
pub mod store;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result, ShortLine};
pub use model::{
    Availability, CounterDelta, Hold, HoldId, HoldStatus, InitialStock, KindTotal, LedgerMismatch,
    LedgerReport, MAX_LABEL_LEN, MAX_NAME_LEN, MAX_QUANTITY, MAX_STOCK, MovementKind,
    MovementQuery, NewHold, NewMovement, NewOrder, NewProduct, Order, OrderId, OrderStatus,
    Payment, PaymentStatus, Product, ProductId, ReservationBreakdown, StockCount, StockCountRecord,
    StockInfo, StockLevels, StockLine, StockMovement,
};
pub use service::cleanup::{CleanupFailure, CleanupReport};
pub use service::ledger::{MetricsFigures, ProductMetrics, StockAccuracy, StockMetrics};
pub use service::order::{
    Checkout, CheckoutRequest, MAX_CHECKOUT_LINES, MAX_UNIT_PRICE, OrderConfig, OrderLine,
    OrderService,
};
pub use service::stock::{DEFAULT_HOLD_DURATION, StockService};
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use store::postgres::{PostgresConfig, PostgresStore};
#[cfg(feature = "sqlite")]
pub use store::sqlite::{Durability, Sharing, SqliteConfig, SqliteStore, WriterStats};
pub use store::{LedgerBalance, ReadUnit, StockRead, StockRow, StockStore, StockTx, WriteUnit};

/// Compile-time check that the services can be shared between threads.
#[allow(dead_code)]
fn assert_services_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<StockService>();
    check::<OrderService>();
}

/// The README's examples use both backends, so they are tested with both features on
/// (as `cargo test --all-features` and CI do).
#[cfg(all(doctest, feature = "sqlite", feature = "postgres"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
