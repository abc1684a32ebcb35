//! The one error type of the crate, with stable machine codes.

use chrono::{DateTime, Utc};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::model::{OrderId, OrderStatus, ProductId};

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A line of a late payment that could not get its stock back: see
/// [`Error::PaymentExpired`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ShortLine {
    /// The order whose line is short.
    pub order_id: OrderId,
    /// The product.
    pub product_id: ProductId,
    /// The size, for a product with sizes.
    pub size: Option<String>,
    /// Units available now.
    pub available_quantity: u64,
    /// Units the order needs.
    pub requested_quantity: u64,
}

/// Everything that can go wrong, each with a stable [`code`](Error::code) and the numbers
/// that explain it.
///
/// Every refusal leaves the store unchanged. The error serializes (serde) to the flat shape
/// shops already use, with `error_code`, `error_message` and the variant's fields:
///
/// ```
/// use stockroom::{Error, ProductId};
///
/// let err = Error::InsufficientStock {
///     product_id: ProductId(7),
///     size: Some("L".into()),
///     available: 5,
///     requested: 10,
///     line: None,
/// };
/// assert_eq!(err.code(), "INSUFFICIENT_STOCK");
/// assert_eq!(
///     err.to_string(),
///     "not enough stock available for product 7 size L: 5 available, 10 requested"
/// );
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No product has this id.
    #[error("product {product_id} not found")]
    ProductNotFound {
        /// The id asked for.
        product_id: ProductId,
    },
    /// The product has sizes, but not this one.
    #[error("size {size} is not available for product {product_id}")]
    SizeNotAvailable {
        /// The product.
        product_id: ProductId,
        /// The size asked for.
        size: String,
    },
    /// The product has sizes and no size was given.
    #[error("product {product_id} has sizes: a size is required")]
    SizeRequired {
        /// The product.
        product_id: ProductId,
    },
    /// A size was given for a product that has no sizes.
    #[error("product {product_id} has no sizes, but size {size} was given")]
    SizeNotApplicable {
        /// The product.
        product_id: ProductId,
        /// The size given.
        size: String,
    },
    /// Not enough units are available to reserve or sell.
    #[error(
        "not enough stock available for product {product_id}{}: {available} available, {requested} requested",
        size_suffix(size)
    )]
    InsufficientStock {
        /// The product.
        product_id: ProductId,
        /// The size, for a product with sizes.
        size: Option<String>,
        /// Units available now.
        available: u64,
        /// Units asked for.
        requested: u64,
        /// The index (from 0) of the refused line, in a multi-line operation.
        line: Option<usize>,
    },
    /// Not enough units are reserved to release, sell or check out.
    #[error(
        "not enough stock reserved for product {product_id}{}: {reserved} reserved, {requested} requested",
        size_suffix(size)
    )]
    InsufficientReserved {
        /// The product.
        product_id: ProductId,
        /// The size, for a product with sizes.
        size: Option<String>,
        /// Units reserved now.
        reserved: u64,
        /// Units asked for.
        requested: u64,
        /// The index (from 0) of the refused line, in a multi-line operation.
        line: Option<usize>,
    },
    /// A quantity is zero or above its bound.
    #[error("invalid quantity {quantity}: must be between 1 and {max}")]
    InvalidQuantity {
        /// The quantity given.
        quantity: u64,
        /// The largest quantity allowed here.
        max: u64,
        /// The index (from 0) of the refused line, in a multi-line operation.
        line: Option<usize>,
    },
    /// A label (size, name, customer reference) is empty, too long or has control
    /// characters.
    #[error("invalid {field}: {reason}")]
    InvalidLabel {
        /// Which label: `size`, `name` or `customer_ref`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The request itself is malformed (an empty cart, a size listed twice).
    #[error("invalid input: {reason}")]
    InvalidInput {
        /// What is wrong.
        reason: String,
    },
    /// A product with this id exists already.
    #[error("product {product_id} already exists")]
    ProductExists {
        /// The id given.
        product_id: ProductId,
    },
    /// A restock or count would push a counter past [`MAX_STOCK`](crate::MAX_STOCK).
    #[error(
        "stock limit exceeded for product {product_id}{}: {current} in stock, {added} added, at most {max}",
        size_suffix(size)
    )]
    StockLimitExceeded {
        /// The product.
        product_id: ProductId,
        /// The size, for a product with sizes.
        size: Option<String>,
        /// `available + reserved + sold` now.
        current: u64,
        /// Units that were to be added.
        added: u64,
        /// The bound.
        max: u64,
    },
    /// No order has this id.
    #[error("order {order_id} not found")]
    OrderNotFound {
        /// The id asked for.
        order_id: OrderId,
    },
    /// The order cannot be cancelled: it is paid or cancelled already.
    #[error("order {order_id} cannot be cancelled: it is {status}")]
    OrderNotCancellable {
        /// The order.
        order_id: OrderId,
        /// Its status.
        status: OrderStatus,
    },
    /// No payment has this hash, or the key is wrong (the two are not told apart, so that
    /// a caller cannot probe for hashes).
    #[error("payment not found")]
    PaymentNotFound,
    /// The payment came after its window and its stock could not be taken again (or late
    /// payments are refused): refund it.
    #[error(
        "payment {payment_hash} expired at {expired_at}{}",
        short_lines_suffix(lines)
    )]
    PaymentExpired {
        /// The payment.
        payment_hash: String,
        /// When its window closed.
        expired_at: DateTime<Utc>,
        /// Each line that could not get its stock back, with numbers; empty when late
        /// payments are refused by configuration.
        lines: Vec<ShortLine>,
    },
    /// Every order of the payment was cancelled by the customer before it was paid.
    #[error("payment {payment_hash} was cancelled")]
    PaymentCancelled {
        /// The payment.
        payment_hash: String,
    },
    /// The database was written by a newer version of stockroom.
    #[error("database schema version {found} is newer than this library supports ({supported})")]
    SchemaTooNew {
        /// The version found in the database.
        found: i64,
        /// The newest version this library knows.
        supported: i64,
    },
    /// The storage backend failed. Nothing was changed.
    #[error("{backend} storage error: {source}")]
    Storage {
        /// Which backend: `memory`, `sqlite` or `postgres`.
        backend: &'static str,
        /// The backend's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

fn size_suffix(size: &Option<String>) -> String {
    match size {
        Some(s) => format!(" size {s}"),
        None => String::new(),
    }
}

fn short_lines_suffix(lines: &[ShortLine]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                "product {}{}: {} available, {} requested",
                l.product_id,
                size_suffix(&l.size),
                l.available_quantity,
                l.requested_quantity
            )
        })
        .collect();
    format!(" and its stock is gone ({})", parts.join("; "))
}

impl Error {
    /// The stable machine code of this error, such as `"INSUFFICIENT_STOCK"`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::ProductNotFound { .. } => "PRODUCT_NOT_FOUND",
            Error::SizeNotAvailable { .. } => "SIZE_NOT_AVAILABLE",
            Error::SizeRequired { .. } => "SIZE_REQUIRED",
            Error::SizeNotApplicable { .. } => "SIZE_NOT_APPLICABLE",
            Error::InsufficientStock { .. } => "INSUFFICIENT_STOCK",
            Error::InsufficientReserved { .. } => "INSUFFICIENT_RESERVED",
            Error::InvalidQuantity { .. } => "INVALID_QUANTITY",
            Error::InvalidLabel { .. } => "INVALID_LABEL",
            Error::InvalidInput { .. } => "INVALID_INPUT",
            Error::ProductExists { .. } => "PRODUCT_EXISTS",
            Error::StockLimitExceeded { .. } => "STOCK_LIMIT_EXCEEDED",
            Error::OrderNotFound { .. } => "ORDER_NOT_FOUND",
            Error::OrderNotCancellable { .. } => "ORDER_NOT_CANCELLABLE",
            Error::PaymentNotFound => "PAYMENT_NOT_FOUND",
            Error::PaymentExpired { .. } => "PAYMENT_EXPIRED",
            Error::PaymentCancelled { .. } => "PAYMENT_CANCELLED",
            Error::SchemaTooNew { .. } => "SCHEMA_TOO_NEW",
            Error::Storage { .. } => "STORAGE",
        }
    }

    /// Wraps a backend's error as [`Error::Storage`].
    pub fn storage(
        backend: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Storage {
            backend,
            source: source.into(),
        }
    }

    /// Whether this is a refusal by the rules (bad input, not enough stock, unknown id), as
    /// opposed to a failure of the storage backend.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Error::Storage { .. } | Error::SchemaTooNew { .. })
    }

    /// The same error with the index of the line it concerns, for multi-line operations.
    pub(crate) fn at_line(mut self, index: usize) -> Self {
        match &mut self {
            Error::InsufficientStock { line, .. }
            | Error::InsufficientReserved { line, .. }
            | Error::InvalidQuantity { line, .. } => *line = Some(index),
            _ => {}
        }
        self
    }
}

impl Serialize for Error {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("error_code", self.code())?;
        map.serialize_entry("error_message", &self.to_string())?;
        match self {
            Error::ProductNotFound { product_id }
            | Error::SizeRequired { product_id }
            | Error::ProductExists { product_id } => {
                map.serialize_entry("product_id", product_id)?;
            }
            Error::SizeNotAvailable { product_id, size }
            | Error::SizeNotApplicable { product_id, size } => {
                map.serialize_entry("product_id", product_id)?;
                map.serialize_entry("size", size)?;
            }
            Error::InsufficientStock {
                product_id,
                size,
                available,
                requested,
                line,
            } => {
                map.serialize_entry("product_id", product_id)?;
                map.serialize_entry("available_quantity", available)?;
                map.serialize_entry("requested_quantity", requested)?;
                map.serialize_entry("size", size)?;
                if let Some(line) = line {
                    map.serialize_entry("line", line)?;
                }
            }
            Error::InsufficientReserved {
                product_id,
                size,
                reserved,
                requested,
                line,
            } => {
                map.serialize_entry("product_id", product_id)?;
                map.serialize_entry("reserved_quantity", reserved)?;
                map.serialize_entry("requested_quantity", requested)?;
                map.serialize_entry("size", size)?;
                if let Some(line) = line {
                    map.serialize_entry("line", line)?;
                }
            }
            Error::InvalidQuantity {
                quantity,
                max,
                line,
            } => {
                map.serialize_entry("requested_quantity", quantity)?;
                map.serialize_entry("max_quantity", max)?;
                if let Some(line) = line {
                    map.serialize_entry("line", line)?;
                }
            }
            Error::InvalidLabel { field, .. } => map.serialize_entry("field", field)?,
            Error::InvalidInput { .. } | Error::PaymentNotFound | Error::Storage { .. } => {}
            Error::StockLimitExceeded {
                product_id,
                size,
                current,
                added,
                max,
            } => {
                map.serialize_entry("product_id", product_id)?;
                map.serialize_entry("size", size)?;
                map.serialize_entry("current_quantity", current)?;
                map.serialize_entry("added_quantity", added)?;
                map.serialize_entry("max_quantity", max)?;
            }
            Error::OrderNotFound { order_id } => map.serialize_entry("order_id", order_id)?,
            Error::OrderNotCancellable { order_id, status } => {
                map.serialize_entry("order_id", order_id)?;
                map.serialize_entry("status", status)?;
            }
            Error::PaymentExpired {
                payment_hash,
                expired_at,
                lines,
            } => {
                map.serialize_entry("payment_hash", payment_hash)?;
                map.serialize_entry("expired_at", expired_at)?;
                map.serialize_entry("lines", lines)?;
            }
            Error::PaymentCancelled { payment_hash } => {
                map.serialize_entry("payment_hash", payment_hash)?;
            }
            Error::SchemaTooNew { found, supported } => {
                map.serialize_entry("found_version", found)?;
                map.serialize_entry("supported_version", supported)?;
            }
        }
        map.end()
    }
}
