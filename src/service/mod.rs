//! The rules, written once over any [`StockStore`](crate::StockStore).

pub(crate) mod cleanup;
pub(crate) mod hold;
pub(crate) mod ledger;
pub(crate) mod order;
pub(crate) mod stock;

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{Error, Result};
use chrono::{DateTime, Utc};

use crate::model::{
    CounterDelta, MAX_LABEL_LEN, MAX_QUANTITY, MAX_STOCK, MovementKind, NewMovement, Order,
    OrderId, ProductId, StockLevels, StockLine,
};
use crate::store::{StockRead, StockTx};

/// A stock row's identity: product and size (`None` for a product without sizes). Sorting
/// these gives the one order in which every unit locks rows.
pub(crate) type RowKey = (ProductId, Option<String>);

/// One kind of counter movement (DESIGN.md's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Movement {
    /// available → reserved.
    Reserve,
    /// reserved → available.
    Release,
    /// reserved → sold (a confirmed payment).
    SellReserved,
    /// available → sold (a direct sale, or a late payment taking stock again).
    SellAvailable,
    /// + available.
    Restock,
}

impl Movement {
    /// The counters after moving `quantity`, or the refusal that explains why not.
    /// Never changes anything itself.
    pub(crate) fn apply(
        self,
        product_id: ProductId,
        size: Option<&str>,
        levels: StockLevels,
        quantity: u64,
    ) -> Result<StockLevels> {
        let mut next = levels;
        let short_available = || Error::InsufficientStock {
            product_id,
            size: size.map(str::to_owned),
            available: levels.available,
            requested: quantity,
            line: None,
        };
        let short_reserved = || Error::InsufficientReserved {
            product_id,
            size: size.map(str::to_owned),
            reserved: levels.reserved,
            requested: quantity,
            line: None,
        };
        // Moves between counters conserve the total, which is at most MAX_STOCK, so the
        // additions below cannot overflow; they are checked anyway.
        let overflow = || Error::StockLimitExceeded {
            product_id,
            size: size.map(str::to_owned),
            current: levels.total().unwrap_or(u64::MAX),
            added: quantity,
            max: MAX_STOCK,
        };
        match self {
            Movement::Reserve => {
                next.available = levels
                    .available
                    .checked_sub(quantity)
                    .ok_or_else(short_available)?;
                next.reserved = levels.reserved.checked_add(quantity).ok_or_else(overflow)?;
            }
            Movement::Release => {
                next.reserved = levels
                    .reserved
                    .checked_sub(quantity)
                    .ok_or_else(short_reserved)?;
                next.available = levels
                    .available
                    .checked_add(quantity)
                    .ok_or_else(overflow)?;
            }
            Movement::SellReserved => {
                next.reserved = levels
                    .reserved
                    .checked_sub(quantity)
                    .ok_or_else(short_reserved)?;
                next.sold = levels.sold.checked_add(quantity).ok_or_else(overflow)?;
            }
            Movement::SellAvailable => {
                next.available = levels
                    .available
                    .checked_sub(quantity)
                    .ok_or_else(short_available)?;
                next.sold = levels.sold.checked_add(quantity).ok_or_else(overflow)?;
            }
            Movement::Restock => {
                next.available = levels
                    .available
                    .checked_add(quantity)
                    .ok_or_else(overflow)?;
                if next.total().is_none_or(|t| t > MAX_STOCK) {
                    return Err(overflow());
                }
            }
        }
        Ok(next)
    }

    /// The change to each counter that moving `quantity` makes. `quantity` is at most
    /// [`MAX_STOCK`], so it fits.
    pub(crate) fn delta(self, quantity: u64) -> CounterDelta {
        let q = i64::try_from(quantity).unwrap_or(i64::MAX);
        let (available, reserved, sold) = match self {
            Movement::Reserve => (-q, q, 0),
            Movement::Release => (q, -q, 0),
            Movement::SellReserved => (0, -q, q),
            Movement::SellAvailable => (-q, 0, q),
            Movement::Restock => (q, 0, 0),
        };
        CounterDelta {
            available,
            reserved,
            sold,
        }
    }

    /// Moves `quantity` on one stock row, with its ledger movement: in one statement
    /// where the store can (see [`StockTx::add_to_stock`]), otherwise (the guard
    /// refused, or the row is missing) from the loaded row, which explains a refusal.
    /// Returns the row's counters after.
    pub(crate) fn apply_to_row(
        self,
        tx: &mut dyn StockTx,
        product: ProductId,
        size: Option<&str>,
        quantity: u64,
        movement: NewMovementOf<'_>,
    ) -> Result<StockLevels> {
        let delta = self.delta(quantity);
        let after = match tx.add_to_stock(product, size, delta)? {
            Some(after) => after,
            None => {
                let levels = load_row(tx, product, size)?;
                let after = self.apply(product, size, levels, quantity)?;
                // The guard refused what the counters allow: another writer changed
                // the row in between (PostgreSQL). It is locked now.
                tx.update_stock(product, size, after)?;
                after
            }
        };
        tx.insert_movement(&movement.cause.movement(
            movement.at,
            movement.kind,
            product,
            size,
            delta,
        ))?;
        Ok(after)
    }

    /// The log line of a movement: "Reserved 2 units of size M for product 123".
    pub(crate) fn describe(self, quantity: u64, row: &RowName<'_>) -> String {
        match self {
            Movement::Reserve => format!("Reserved {quantity} units of {row}"),
            Movement::Release => format!("Unreserved {quantity} units of {row}"),
            Movement::SellReserved => {
                format!("Confirmed sale of {quantity} reserved units of {row}")
            }
            Movement::SellAvailable => format!("Confirmed sale of {quantity} units of {row}"),
            Movement::Restock => format!("Restocked {quantity} units of {row}"),
        }
    }

    /// The operation's name in refusal logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Movement::Reserve => "Reservation",
            Movement::Release => "Unreservation",
            Movement::SellReserved => "Sale of reserved units",
            Movement::SellAvailable => "Sale",
            Movement::Restock => "Restock",
        }
    }
}

/// "size M of product 123", or "product 123" for a product without sizes.
pub(crate) struct RowName<'a>(pub ProductId, pub Option<&'a str>);

impl fmt::Display for RowName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(size) => write!(f, "size {size} for product {}", self.0),
            None => write!(f, "product {}", self.0),
        }
    }
}

/// Refuses a quantity of zero or above `max`.
pub(crate) fn check_quantity(quantity: u64, max: u64) -> Result<()> {
    if quantity == 0 || quantity > max {
        return Err(Error::InvalidQuantity {
            quantity,
            max,
            line: None,
        });
    }
    Ok(())
}

/// Refuses an empty, over-long or control-character label. `max` is in bytes.
pub(crate) fn check_label(field: &'static str, value: &str, max: usize) -> Result<()> {
    let reason = if value.trim().is_empty() {
        "must not be empty".to_owned()
    } else if value.len() > max {
        format!("{} bytes, at most {max} allowed", value.len())
    } else if value.chars().any(char::is_control) {
        "must not contain control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(Error::InvalidLabel { field, reason })
}

pub(crate) fn check_size(size: Option<&str>) -> Result<()> {
    match size {
        Some(s) => check_label("size", s, MAX_LABEL_LEN),
        None => Ok(()),
    }
}

/// Validates each line of a multi-line operation, naming the first bad line.
pub(crate) fn check_lines(lines: &[StockLine]) -> Result<()> {
    if lines.is_empty() {
        return Err(Error::InvalidInput {
            reason: "no lines given".into(),
        });
    }
    for (i, line) in lines.iter().enumerate() {
        check_quantity(line.quantity, MAX_QUANTITY).map_err(|e| e.at_line(i))?;
        check_size(line.size.as_deref())?;
    }
    Ok(())
}

/// Why the stock row `(product, size)` does not exist: the product is unknown, needs a
/// size, takes none, or lacks this size.
pub(crate) fn missing_row(
    tx: &mut dyn StockRead,
    product_id: ProductId,
    size: Option<&str>,
) -> Error {
    match (tx.product(product_id), size) {
        (Err(e), _) => e,
        (Ok(None), _) => Error::ProductNotFound { product_id },
        (Ok(Some(p)), None) if p.has_sizes => Error::SizeRequired { product_id },
        (Ok(Some(_)), None) => Error::storage("stockroom", "product without its stock row"),
        (Ok(Some(p)), Some(s)) if !p.has_sizes => Error::SizeNotApplicable {
            product_id,
            size: s.to_owned(),
        },
        (Ok(Some(_)), Some(s)) => Error::SizeNotAvailable {
            product_id,
            size: s.to_owned(),
        },
    }
}

/// Loads (and so locks, in a write unit) one stock row, or the refusal that explains why
/// it does not exist.
pub(crate) fn load_row(
    tx: &mut dyn StockRead,
    product_id: ProductId,
    size: Option<&str>,
) -> Result<StockLevels> {
    match tx.stock(product_id, size)? {
        Some(levels) => Ok(levels),
        None => Err(missing_row(tx, product_id, size)),
    }
}

/// What caused a movement, for its ledger row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Cause {
    pub(crate) order_id: Option<OrderId>,
    pub(crate) payment_hash: Option<String>,
    pub(crate) reference: Option<String>,
}

impl Cause {
    pub(crate) fn reference(reference: Option<&str>) -> Self {
        Cause {
            reference: reference.map(str::to_owned),
            ..Cause::default()
        }
    }

    pub(crate) fn order(order: &Order) -> Self {
        Cause {
            order_id: Some(order.id),
            payment_hash: Some(order.payment_hash.clone()),
            reference: None,
        }
    }

    /// The ledger row of a change this caused.
    pub(crate) fn movement(
        &self,
        at: DateTime<Utc>,
        kind: MovementKind,
        product: ProductId,
        size: Option<&str>,
        delta: CounterDelta,
    ) -> NewMovement {
        NewMovement {
            at,
            product_id: product,
            size: size.map(str::to_owned),
            kind,
            delta,
            order_id: self.order_id,
            payment_hash: self.payment_hash.clone(),
            reference: self.reference.clone(),
        }
    }
}

/// What a one-row movement writes to the ledger besides its delta.
pub(crate) struct NewMovementOf<'a> {
    pub(crate) kind: MovementKind,
    pub(crate) cause: &'a Cause,
    pub(crate) at: DateTime<Utc>,
}

/// The stock rows of a multi-row unit, loaded in ascending (product, size) order so that
/// two units never wait for each other's rows in opposite orders; then changed in memory,
/// and written back once each together with one ledger movement per change.
#[derive(Clone)]
pub(crate) struct LockedRows {
    rows: BTreeMap<RowKey, (StockLevels, bool)>,
    at: DateTime<Utc>,
    movements: Vec<NewMovement>,
}

impl LockedRows {
    /// Loads every row named by `keys`, in sorted order. The first missing row's refusal
    /// is returned with the index of the first item in `keys` that names it. Movements
    /// are stamped `at`.
    pub(crate) fn load<'k>(
        tx: &mut dyn StockRead,
        keys: impl IntoIterator<Item = (ProductId, Option<&'k str>)>,
        at: DateTime<Utc>,
    ) -> Result<Self> {
        let mut wanted: BTreeMap<RowKey, usize> = BTreeMap::new();
        for (i, (p, s)) in keys.into_iter().enumerate() {
            wanted.entry((p, s.map(str::to_owned))).or_insert(i);
        }
        let mut rows = BTreeMap::new();
        let mut first_missing: Option<(usize, Error)> = None;
        for ((p, s), i) in wanted {
            match tx.stock(p, s.as_deref())? {
                Some(levels) => {
                    rows.insert((p, s), (levels, false));
                }
                None => {
                    if first_missing.as_ref().is_none_or(|(j, _)| i < *j) {
                        let e = missing_row(tx, p, s.as_deref());
                        first_missing = Some((i, e));
                    }
                }
            }
        }
        match first_missing {
            Some((_, e)) => Err(e),
            None => Ok(LockedRows {
                rows,
                at,
                movements: Vec::new(),
            }),
        }
    }

    /// The current (in-memory) counters of a loaded row.
    pub(crate) fn get(&self, product: ProductId, size: Option<&str>) -> StockLevels {
        self.rows
            .get(&(product, size.map(str::to_owned)))
            .map(|(l, _)| *l)
            .unwrap_or_default()
    }

    /// Applies a movement to a loaded row in memory and notes its ledger row; refuses
    /// without changing anything.
    pub(crate) fn apply(
        &mut self,
        movement: Movement,
        kind: MovementKind,
        cause: &Cause,
        product: ProductId,
        size: Option<&str>,
        quantity: u64,
    ) -> Result<StockLevels> {
        let entry = self
            .rows
            .get_mut(&(product, size.map(str::to_owned)))
            .ok_or_else(|| Error::storage("stockroom", "stock row used before it was loaded"))?;
        let before = entry.0;
        let next = movement.apply(product, size, before, quantity)?;
        *entry = (next, true);
        self.note(
            kind,
            cause,
            product,
            size,
            CounterDelta::between(before, next),
        );
        Ok(next)
    }

    /// Notes a ledger row for a change made without a counter movement (a hold converted
    /// into an order's reservation).
    pub(crate) fn note(
        &mut self,
        kind: MovementKind,
        cause: &Cause,
        product: ProductId,
        size: Option<&str>,
        delta: CounterDelta,
    ) {
        self.movements
            .push(cause.movement(self.at, kind, product, size, delta));
    }

    /// Writes back every changed row, in the same sorted order, then the ledger rows.
    pub(crate) fn store(self, tx: &mut dyn StockTx) -> Result<()> {
        for ((p, s), (levels, changed)) in self.rows {
            if changed {
                tx.update_stock(p, s.as_deref(), levels)?;
            }
        }
        tx.insert_movements(&self.movements)
    }
}
