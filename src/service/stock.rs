//! [`StockService`]: products, stock rows and their counters.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use crate::clock::{Clock, SystemClock, normalize};
use crate::error::{Error, Result};
use crate::model::{
    Availability, CounterDelta, InitialStock, MAX_LABEL_LEN, MAX_NAME_LEN, MAX_QUANTITY, MAX_STOCK,
    MovementKind, NewProduct, Product, ProductId, StockCount, StockCountRecord, StockInfo,
    StockLevels, StockLine,
};
use crate::service::{
    Cause, LockedRows, Movement, NewMovementOf, RowName, check_label, check_lines, check_quantity,
    check_size, load_row,
};
use crate::store::{StockStore, StoreExt};

/// Stock rules: create products, restock, count, reserve, release and sell.
///
/// Every method is one transaction of the store: it changes everything it says or, when
/// it returns an error, nothing at all. Cloning is cheap (the store is shared).
///
/// ```
/// use std::sync::Arc;
/// use stockroom::{MemoryStore, NewProduct, ProductId, StockLine, StockService};
///
/// let stock = StockService::new(Arc::new(MemoryStore::new()));
/// stock.create_product(NewProduct::sized(ProductId(1), "Hoodie", [("M", 3), ("L", 1)]))?;
///
/// // Add to cart: available -> reserved.
/// stock.reserve_stock(ProductId(1), 2, Some("M"))?;
///
/// // A cart of several lines is reserved all or none.
/// let err = stock
///     .reserve_lines(&[
///         StockLine::new(ProductId(1), Some("M"), 1),
///         StockLine::new(ProductId(1), Some("L"), 2),
///     ])
///     .unwrap_err();
/// assert_eq!(err.code(), "INSUFFICIENT_STOCK");
/// let m = stock.get_stock_info(ProductId(1), Some("M"))?;
/// assert_eq!((m.available_quantity, m.reserved_quantity), (1, 2));
/// # Ok::<(), stockroom::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct StockService {
    store: Arc<dyn StockStore>,
    clock: Arc<dyn Clock>,
    reference: Option<String>,
    pub(crate) hold_duration: TimeDelta,
}

/// How long a cart hold lasts unless the cart is held again: 20 minutes by default.
pub const DEFAULT_HOLD_DURATION: TimeDelta = TimeDelta::minutes(20);

impl StockService {
    /// A service over `store`, stamping ledger rows with the system clock.
    pub fn new(store: Arc<dyn StockStore>) -> Self {
        StockService {
            store,
            clock: Arc::new(SystemClock),
            reference: None,
            hold_duration: DEFAULT_HOLD_DURATION,
        }
    }

    /// The same service with another cart hold duration (see
    /// [`hold_cart`](Self::hold_cart)); [`DEFAULT_HOLD_DURATION`] otherwise.
    pub fn with_hold_duration(mut self, duration: TimeDelta) -> Self {
        self.hold_duration = duration;
        self
    }

    /// The same service stamping ledger rows and stock counts with `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// A copy of this service whose movements carry `reference` in the ledger (an
    /// invoice number, a cart id, a staff member): what caused them.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use stockroom::{MemoryStore, MovementQuery, NewProduct, ProductId, StockService};
    /// # let stock = StockService::new(Arc::new(MemoryStore::new()));
    /// stock.create_product(NewProduct::plain(ProductId(1), "Mug", 5))?;
    /// stock.with_reference("delivery-981").restock(ProductId(1), 20, None)?;
    /// let last = stock.movements(&MovementQuery::product(ProductId(1)))?.pop().unwrap();
    /// assert_eq!(last.reference.as_deref(), Some("delivery-981"));
    /// # Ok::<(), stockroom::Error>(())
    /// ```
    ///
    /// A reference longer than [`MAX_LABEL_LEN`] bytes, empty or with control characters
    /// makes the operations refuse with [`Error::InvalidLabel`].
    pub fn with_reference(&self, reference: impl Into<String>) -> Self {
        StockService {
            reference: Some(reference.into()),
            ..self.clone()
        }
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        normalize(self.clock.now())
    }

    pub(crate) fn cause(&self) -> Result<Cause> {
        if let Some(r) = &self.reference {
            check_label("reference", r, MAX_LABEL_LEN)?;
        }
        Ok(Cause::reference(self.reference.as_deref()))
    }

    /// The store this service runs on.
    pub fn store(&self) -> &Arc<dyn StockStore> {
        &self.store
    }

    /// Creates a product and its stock rows: one for a product without sizes, one per size
    /// otherwise. Returns the new rows.
    ///
    /// # Errors
    ///
    /// [`Error::ProductExists`] for a taken id; [`Error::InvalidLabel`] for an empty,
    /// over-long or control-character name or size; [`Error::InvalidInput`] for a sized
    /// product without sizes or with a size listed twice; [`Error::InvalidQuantity`] for an
    /// initial stock above [`MAX_STOCK`].
    pub fn create_product(&self, product: NewProduct) -> Result<Vec<StockInfo>> {
        check_label("name", &product.name, MAX_NAME_LEN)?;
        let rows: Vec<(Option<String>, u64)> = match &product.stock {
            InitialStock::Plain(q) => vec![(None, *q)],
            InitialStock::Sized(sizes) => {
                if sizes.is_empty() {
                    return Err(Error::InvalidInput {
                        reason: "a product with sizes needs at least one size".into(),
                    });
                }
                let mut seen = std::collections::HashSet::new();
                for (size, _) in sizes {
                    check_size(Some(size))?;
                    if !seen.insert(size.as_str()) {
                        return Err(Error::InvalidInput {
                            reason: format!("size {size} is listed twice"),
                        });
                    }
                }
                sizes.iter().map(|(s, q)| (Some(s.clone()), *q)).collect()
            }
        };
        for (_, q) in &rows {
            if *q > MAX_STOCK {
                return Err(Error::InvalidQuantity {
                    quantity: *q,
                    max: MAX_STOCK,
                    line: None,
                });
            }
        }
        let record = Product {
            id: product.id,
            name: product.name.clone(),
            has_sizes: product.has_sizes(),
        };
        let unit_rows = rows.clone();
        let cause = self.cause()?;
        let at = self.now();
        self.store.write_with(move |tx| {
            if !tx.insert_product(&record)? {
                return Err(Error::ProductExists {
                    product_id: record.id,
                });
            }
            for (size, q) in &unit_rows {
                let levels = StockLevels::with_available(*q);
                tx.insert_stock(record.id, size.as_deref(), levels)?;
                if *q > 0 {
                    // The initial stock is the row's first movement, so the ledger sums
                    // to the counters from the start.
                    tx.insert_movement(&cause.movement(
                        at,
                        MovementKind::Restock,
                        record.id,
                        size.as_deref(),
                        CounterDelta::between(StockLevels::default(), levels),
                    ))?;
                }
            }
            Ok(())
        })?;
        log::info!(
            "Created product {} ({}) with {} stock row(s)",
            product.id,
            product.name,
            rows.len()
        );
        Ok(rows
            .into_iter()
            .map(|(size, q)| {
                StockInfo::new(product.id, size.as_deref(), StockLevels::with_available(q))
            })
            .collect())
    }

    /// The product with this id.
    ///
    /// # Errors
    ///
    /// [`Error::ProductNotFound`].
    pub fn get_product(&self, product_id: ProductId) -> Result<Product> {
        self.store.read_with(|tx| {
            tx.product(product_id)?
                .ok_or(Error::ProductNotFound { product_id })
        })
    }

    /// Reserves `quantity` units (add to cart): available → reserved.
    ///
    /// # Errors
    ///
    /// [`Error::InsufficientStock`] with the available and requested quantities;
    /// [`Error::InvalidQuantity`] for 0 or more than [`MAX_QUANTITY`];
    /// [`Error::ProductNotFound`], [`Error::SizeRequired`], [`Error::SizeNotApplicable`],
    /// [`Error::SizeNotAvailable`], [`Error::InvalidLabel`] for a bad product or size.
    pub fn reserve_stock(
        &self,
        product_id: ProductId,
        quantity: u64,
        size: Option<&str>,
    ) -> Result<StockInfo> {
        self.move_one(
            Movement::Reserve,
            MovementKind::Reserve,
            product_id,
            quantity,
            size,
        )
    }

    /// Releases `quantity` reserved units (remove from cart): reserved → available.
    ///
    /// # Errors
    ///
    /// [`Error::InsufficientReserved`] when fewer units are reserved (the counter is never
    /// clamped at zero); otherwise as [`reserve_stock`](Self::reserve_stock).
    pub fn unreserve_stock(
        &self,
        product_id: ProductId,
        quantity: u64,
        size: Option<&str>,
    ) -> Result<StockInfo> {
        self.move_one(
            Movement::Release,
            MovementKind::Release,
            product_id,
            quantity,
            size,
        )
    }

    /// Sells `quantity` available units directly, without a reservation: available → sold.
    ///
    /// (A paid order's units move reserved → sold through
    /// [`OrderService::confirm_payment_for_orders`](crate::OrderService::confirm_payment_for_orders).)
    ///
    /// # Errors
    ///
    /// As [`reserve_stock`](Self::reserve_stock).
    pub fn confirm_stock_sale(
        &self,
        product_id: ProductId,
        quantity: u64,
        size: Option<&str>,
    ) -> Result<StockInfo> {
        self.move_one(
            Movement::SellAvailable,
            MovementKind::Sale,
            product_id,
            quantity,
            size,
        )
    }

    /// Adds `quantity` units to available (a delivery arrived).
    ///
    /// # Errors
    ///
    /// [`Error::StockLimitExceeded`] if `available + reserved + sold` would pass
    /// [`MAX_STOCK`]; [`Error::InvalidQuantity`] for 0 or more than [`MAX_STOCK`];
    /// otherwise as [`reserve_stock`](Self::reserve_stock).
    pub fn restock(
        &self,
        product_id: ProductId,
        quantity: u64,
        size: Option<&str>,
    ) -> Result<StockInfo> {
        check_quantity(quantity, MAX_STOCK)?;
        let info = self.move_lines(
            Movement::Restock,
            MovementKind::Restock,
            vec![StockLine::new(product_id, size, quantity)],
        )?;
        Ok(info.into_iter().next().expect("one line in, one row out"))
    }

    /// Reserves several lines at once (a cart), all or none. Lines may repeat a row; each
    /// line is checked against what the lines before it left.
    ///
    /// # Errors
    ///
    /// The first refused line's error, with its index in `line`
    /// ([`Error::InsufficientStock`] names the available and requested quantities);
    /// [`Error::InvalidInput`] for no lines. Nothing is reserved.
    pub fn reserve_lines(&self, lines: &[StockLine]) -> Result<Vec<StockInfo>> {
        check_lines(lines)?;
        self.move_lines(Movement::Reserve, MovementKind::Reserve, lines.to_vec())
    }

    /// Releases several reserved lines at once, all or none.
    ///
    /// # Errors
    ///
    /// As [`reserve_lines`](Self::reserve_lines), with [`Error::InsufficientReserved`].
    pub fn unreserve_lines(&self, lines: &[StockLine]) -> Result<Vec<StockInfo>> {
        check_lines(lines)?;
        self.move_lines(Movement::Release, MovementKind::Release, lines.to_vec())
    }

    /// Whether `quantity` units could be reserved now, with the numbers. Changes nothing.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use stockroom::{MemoryStore, NewProduct, ProductId, StockService};
    /// # let stock = StockService::new(Arc::new(MemoryStore::new()));
    /// stock.create_product(NewProduct::plain(ProductId(9), "Lamp", 5))?;
    /// let answer = stock.check_stock_availability(ProductId(9), 10, None)?;
    /// assert!(!answer.available);
    /// assert_eq!((answer.available_quantity, answer.requested_quantity), (5, 10));
    /// assert_eq!(answer.reason, Some("INSUFFICIENT_STOCK"));
    /// # Ok::<(), stockroom::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Not enough stock is an answer, not an error; a bad quantity, product or size is an
    /// error as for [`reserve_stock`](Self::reserve_stock).
    pub fn check_stock_availability(
        &self,
        product_id: ProductId,
        quantity: u64,
        size: Option<&str>,
    ) -> Result<Availability> {
        check_quantity(quantity, MAX_QUANTITY)?;
        check_size(size)?;
        let levels = self.store.read_with(|tx| load_row(tx, product_id, size))?;
        let available = levels.available >= quantity;
        Ok(Availability {
            available,
            available_quantity: levels.available,
            requested_quantity: quantity,
            reason: (!available).then_some("INSUFFICIENT_STOCK"),
        })
    }

    /// The available, reserved and sold quantities of one stock row.
    ///
    /// # Errors
    ///
    /// [`Error::ProductNotFound`], [`Error::SizeRequired`], [`Error::SizeNotApplicable`],
    /// [`Error::SizeNotAvailable`], [`Error::InvalidLabel`].
    pub fn get_stock_info(&self, product_id: ProductId, size: Option<&str>) -> Result<StockInfo> {
        check_size(size)?;
        let levels = self.store.read_with(|tx| load_row(tx, product_id, size))?;
        Ok(StockInfo::new(product_id, size, levels))
    }

    /// Every stock row of a product, by size.
    ///
    /// # Errors
    ///
    /// [`Error::ProductNotFound`].
    pub fn get_product_stock(&self, product_id: ProductId) -> Result<Vec<StockInfo>> {
        let rows = self.store.read_with(|tx| {
            let rows = tx.product_stock(product_id)?;
            if rows.is_empty() && tx.product(product_id)?.is_none() {
                return Err(Error::ProductNotFound { product_id });
            }
            Ok(rows)
        })?;
        Ok(rows
            .into_iter()
            .map(|(size, levels)| StockInfo::new(product_id, size.as_deref(), levels))
            .collect())
    }

    /// Records a physical count: `counted` units on the shelf, i.e. `available +
    /// reserved`. The difference from the system's figure is booked on `available`. A
    /// count below the reserved units cannot be booked (it would make `available`
    /// negative): it is reported with `applied: false` and nothing changes.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use stockroom::{MemoryStore, NewProduct, ProductId, StockService};
    /// # let stock = StockService::new(Arc::new(MemoryStore::new()));
    /// stock.create_product(NewProduct::plain(ProductId(3), "Kettle", 10))?;
    /// stock.reserve_stock(ProductId(3), 2, None)?;
    /// let count = stock.record_stock_count(ProductId(3), None, 9)?;
    /// assert_eq!((count.expected, count.discrepancy, count.applied), (10, -1, true));
    /// assert_eq!(count.levels.available, 7);
    /// # Ok::<(), stockroom::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidQuantity`] for a count above [`MAX_STOCK`];
    /// [`Error::StockLimitExceeded`] if the count would push the row's total past it;
    /// otherwise as [`get_stock_info`](Self::get_stock_info).
    pub fn record_stock_count(
        &self,
        product_id: ProductId,
        size: Option<&str>,
        counted: u64,
    ) -> Result<StockCount> {
        if counted > MAX_STOCK {
            return Err(Error::InvalidQuantity {
                quantity: counted,
                max: MAX_STOCK,
                line: None,
            });
        }
        check_size(size)?;
        let cause = self.cause()?;
        let at = self.now();
        let owned_size = size.map(str::to_owned);
        let count = self.store.write_with(move |tx| {
            let size = owned_size.as_deref();
            let levels = load_row(tx, product_id, size)?;
            // Both are at most MAX_STOCK, so neither the sum nor the difference overflows.
            let expected = levels.available + levels.reserved;
            let discrepancy = counted as i64 - expected as i64;
            let mut next = levels;
            let applied = counted >= levels.reserved;
            if applied {
                next.available = counted - levels.reserved;
                if next.total().is_none_or(|t| t > MAX_STOCK) {
                    return Err(Error::StockLimitExceeded {
                        product_id,
                        size: owned_size.clone(),
                        current: levels.total().unwrap_or(u64::MAX),
                        added: counted.saturating_sub(expected),
                        max: MAX_STOCK,
                    });
                }
                if next != levels {
                    tx.update_stock(product_id, size, next)?;
                    tx.insert_movement(&cause.movement(
                        at,
                        MovementKind::CountCorrection,
                        product_id,
                        size,
                        CounterDelta::between(levels, next),
                    ))?;
                }
            }
            let count = StockCount {
                product_id,
                size: owned_size.clone(),
                expected,
                counted,
                discrepancy,
                applied,
                levels: next,
            };
            tx.insert_stock_count(&StockCountRecord {
                at,
                count: count.clone(),
            })?;
            Ok(count)
        })?;
        let row = RowName(product_id, size);
        if count.applied {
            log::info!(
                "Stock count for {row}: {} counted, {} expected, discrepancy {}",
                count.counted,
                count.expected,
                count.discrepancy
            );
        } else {
            log::warn!(
                "Stock count for {row} not applied: {} counted but {} units are reserved",
                count.counted,
                count.levels.reserved
            );
        }
        Ok(count)
    }

    fn move_one(
        &self,
        movement: Movement,
        kind: MovementKind,
        product_id: ProductId,
        quantity: u64,
        size: Option<&str>,
    ) -> Result<StockInfo> {
        check_quantity(quantity, MAX_QUANTITY)?;
        let info = self.move_lines(
            movement,
            kind,
            vec![StockLine::new(product_id, size, quantity)],
        )?;
        Ok(info.into_iter().next().expect("one line in, one row out"))
    }

    /// Applies `movement` to every line in one unit, all or none, and returns each line's
    /// row after the whole unit.
    fn move_lines(
        &self,
        movement: Movement,
        kind: MovementKind,
        lines: Vec<StockLine>,
    ) -> Result<Vec<StockInfo>> {
        for line in &lines {
            check_size(line.size.as_deref())?;
        }
        let cause = self.cause()?;
        let at = self.now();
        let logged = lines.clone();
        let result = self.store.write_with(move |tx| {
            if let [line] = lines.as_slice() {
                let size = line.size.as_deref();
                let ledger = NewMovementOf {
                    kind,
                    cause: &cause,
                    at,
                };
                let after =
                    movement.apply_to_row(tx, line.product_id, size, line.quantity, ledger)?;
                return Ok(vec![StockInfo::new(line.product_id, size, after)]);
            }
            let keys = lines.iter().map(|l| (l.product_id, l.size.as_deref()));
            let mut rows = LockedRows::load(tx, keys, at)?;
            let several = lines.len() > 1;
            for (i, line) in lines.iter().enumerate() {
                let size = line.size.as_deref();
                rows.apply(movement, kind, &cause, line.product_id, size, line.quantity)
                    .map_err(|e| if several { e.at_line(i) } else { e })?;
            }
            let after: Vec<StockInfo> = lines
                .iter()
                .map(|l| {
                    let levels = rows.get(l.product_id, l.size.as_deref());
                    StockInfo::new(l.product_id, l.size.as_deref(), levels)
                })
                .collect();
            rows.store(tx)?;
            Ok(after)
        });
        match &result {
            Ok(_) => {
                for line in &logged {
                    let row = RowName(line.product_id, line.size.as_deref());
                    log::info!("{}", movement.describe(line.quantity, &row));
                }
            }
            Err(e) if e.is_refusal() => log::warn!("{} refused: {e}", movement.name()),
            Err(e) => log::error!("{} failed: {e}", movement.name()),
        }
        result
    }
}
