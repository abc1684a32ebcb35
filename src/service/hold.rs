//! Cart holds on [`StockService`]: stock held for a cart until an expiry, so that an
//! abandoned cart gives its stock back by itself.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::clock::normalize;
use crate::error::{Error, Result};
use crate::model::{
    CounterDelta, Hold, HoldId, HoldStatus, MAX_LABEL_LEN, MovementKind, NewHold, ProductId,
    ReservationBreakdown, StockInfo, StockLine,
};
use crate::service::cleanup::{self, Batch, CleanupFailure, CleanupReport, Cursor, Expiring};
use crate::service::stock::StockService;
use crate::service::{
    Cause, LockedRows, Movement, RowKey, RowName, check_label, check_lines, check_size, load_row,
};
use crate::store::{StockRead, StockTx, StoreExt};

/// How many expired holds one cleanup transaction releases.
const HOLD_CLEANUP_BATCH: usize = 500;

pub(crate) fn check_cart_id(cart_id: &str) -> Result<()> {
    check_label("cart_id", cart_id, MAX_LABEL_LEN)
}

fn key_of(hold: &Hold) -> RowKey {
    (hold.product_id, hold.size.clone())
}

impl StockService {
    /// Holds lines for a cart until `now` plus the hold duration (20 minutes unless
    /// [`with_hold_duration`](Self::with_hold_duration) says otherwise), all lines or none.
    ///
    /// Each line sets the cart's held quantity of its row: more than held takes units
    /// from available, less gives the difference back. Rows the lines do not name keep
    /// their holds. Every active hold of the cart is renewed to the new expiry. Returns
    /// the cart's active holds.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use chrono::{TimeDelta, Utc};
    /// # use stockroom::{MemoryStore, NewProduct, ProductId, StockLine, StockService};
    /// # let stock = StockService::new(Arc::new(MemoryStore::new()));
    /// stock.create_product(NewProduct::plain(ProductId(1), "Mug", 10))?;
    /// let now = Utc::now();
    /// stock.hold_cart("cart-7", &[StockLine::new(ProductId(1), None, 3)], now)?;
    /// stock.hold_cart("cart-7", &[StockLine::new(ProductId(1), None, 1)], now)?; // changed
    /// assert_eq!(stock.get_stock_info(ProductId(1), None)?.reserved_quantity, 1);
    ///
    /// // Nobody comes back: cleanup gives the units back after the hold expires.
    /// let report = stock.cleanup_expired_holds(now + TimeDelta::minutes(21))?;
    /// assert_eq!(report.processed_count, 1);
    /// assert_eq!(stock.get_stock_info(ProductId(1), None)?.available_quantity, 10);
    /// # Ok::<(), stockroom::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`reserve_lines`](Self::reserve_lines) (the first short line with its index and
    /// numbers); [`Error::InvalidInput`] when a row is named twice or the expiry is out of
    /// range; [`Error::InvalidLabel`] for a bad cart id.
    pub fn hold_cart(
        &self,
        cart_id: &str,
        lines: &[StockLine],
        now: DateTime<Utc>,
    ) -> Result<Vec<Hold>> {
        check_cart_id(cart_id)?;
        check_lines(lines)?;
        let mut seen = std::collections::HashSet::new();
        for line in lines {
            if !seen.insert((line.product_id, line.size.as_deref())) {
                return Err(Error::InvalidInput {
                    reason: format!(
                        "{} is named twice in one hold",
                        RowName(line.product_id, line.size.as_deref())
                    ),
                });
            }
        }
        let now = normalize(now);
        let expires_at =
            now.checked_add_signed(self.hold_duration)
                .ok_or_else(|| Error::InvalidInput {
                    reason: "the hold expires out of range".into(),
                })?;
        let at = self.now();
        let cart = cart_id.to_owned();
        let lines = lines.to_vec();
        let result = self.store().write_with(move |tx| {
            let cause = Cause::reference(Some(&cart));
            let mut holds: BTreeMap<RowKey, Hold> = tx
                .cart_holds(&cart)?
                .into_iter()
                .map(|h| (key_of(&h), h))
                .collect();
            let keys = lines.iter().map(|l| (l.product_id, l.size.as_deref()));
            let mut rows = LockedRows::load(tx, keys, at)?;
            let several = lines.len() > 1;
            let mut new_holds = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                let size = line.size.as_deref();
                let key = (line.product_id, line.size.clone());
                let held = holds.get(&key).map_or(0, |h| h.quantity);
                let at_line = |e: Error| if several { e.at_line(i) } else { e };
                if line.quantity > held {
                    let more = line.quantity - held;
                    rows.apply(
                        Movement::Reserve,
                        MovementKind::Hold,
                        &cause,
                        line.product_id,
                        size,
                        more,
                    )
                    .map_err(at_line)?;
                } else if line.quantity < held {
                    let less = held - line.quantity;
                    rows.apply(
                        Movement::Release,
                        MovementKind::HoldRelease,
                        &cause,
                        line.product_id,
                        size,
                        less,
                    )
                    .map_err(at_line)?;
                }
                match holds.get_mut(&key) {
                    Some(hold) => hold.quantity = line.quantity,
                    None => new_holds.push(NewHold {
                        cart_id: cart.clone(),
                        product_id: line.product_id,
                        size: line.size.clone(),
                        quantity: line.quantity,
                        created_at: now,
                        expires_at,
                    }),
                }
            }
            rows.store(tx)?;
            let mut active: Vec<Hold> = Vec::new();
            for mut hold in holds.into_values() {
                hold.expires_at = expires_at;
                tx.update_hold(&hold)?;
                active.push(hold);
            }
            for new in new_holds {
                let id = tx.insert_hold(&new)?;
                active.push(new.into_hold(id));
            }
            active.sort_by_key(|h| h.id);
            Ok(active)
        });
        match &result {
            Ok(holds) => {
                for h in holds {
                    log::info!(
                        "Cart {cart_id} holds {} units of {} until {}",
                        h.quantity,
                        RowName(h.product_id, h.size.as_deref()),
                        expires_at
                    );
                }
            }
            Err(e) if e.is_refusal() => log::warn!("Hold for cart {cart_id} refused: {e}"),
            Err(e) => log::error!("Hold for cart {cart_id} failed: {e}"),
        }
        result
    }

    /// Releases a cart's hold on one row: exactly its units go back to available.
    /// Releasing a hold that is already released, expired or converted (or never existed)
    /// changes nothing and returns `None`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidLabel`] for a bad cart id or size; [`Error::Storage`].
    pub fn release_cart_line(
        &self,
        cart_id: &str,
        product_id: ProductId,
        size: Option<&str>,
    ) -> Result<Option<Hold>> {
        check_size(size)?;
        let key = (product_id, size.map(str::to_owned));
        let released = self.release_holds(cart_id, move |h| key_of(h) == key)?;
        Ok(released.into_iter().next())
    }

    /// Releases every active hold of a cart (the shopper emptied it). Returns the holds
    /// released; none when the cart holds nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidLabel`] for a bad cart id; [`Error::Storage`].
    pub fn release_cart(&self, cart_id: &str) -> Result<Vec<Hold>> {
        self.release_holds(cart_id, |_| true)
    }

    fn release_holds(
        &self,
        cart_id: &str,
        which: impl Fn(&Hold) -> bool + Send + 'static,
    ) -> Result<Vec<Hold>> {
        check_cart_id(cart_id)?;
        let at = self.now();
        let cart = cart_id.to_owned();
        let released = self.store().write_with(move |tx| {
            let holds: Vec<Hold> = tx.cart_holds(&cart)?.into_iter().filter(&which).collect();
            let cause = Cause::reference(Some(&cart));
            let keys = holds.iter().map(|h| (h.product_id, h.size.as_deref()));
            let mut rows = LockedRows::load(tx, keys, at)?;
            let mut released = Vec::with_capacity(holds.len());
            for mut hold in holds {
                let size = hold.size.as_deref();
                let kind = MovementKind::HoldRelease;
                rows.apply(
                    Movement::Release,
                    kind,
                    &cause,
                    hold.product_id,
                    size,
                    hold.quantity,
                )?;
                hold.status = HoldStatus::Released;
                tx.update_hold(&hold)?;
                released.push(hold);
            }
            rows.store(tx)?;
            Ok(released)
        })?;
        for h in &released {
            let row = RowName(h.product_id, h.size.as_deref());
            log::info!(
                "Cart {cart_id}: {}",
                Movement::Release.describe(h.quantity, &row)
            );
        }
        Ok(released)
    }

    /// The active holds of a cart, by id.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidLabel`] for a bad cart id; [`Error::Storage`].
    pub fn get_cart(&self, cart_id: &str) -> Result<Vec<Hold>> {
        check_cart_id(cart_id)?;
        self.store().read_with(|tx| tx.cart_holds(cart_id))
    }

    /// Gives back the units of every active hold whose expiry is before `now` (abandoned
    /// carts), in batches of 500, one transaction each; the holds become `expired`.
    /// Exactly once, even when run twice or from two processes at once.
    ///
    /// This is the cart-hold half of the caller-driven cleanup; run it next to
    /// [`OrderService::cleanup_expired_payments`](crate::OrderService::cleanup_expired_payments)
    /// from the same timer.
    ///
    /// # Errors
    ///
    /// None for a failed hold (it is counted in the report); [`Error::Storage`] only if
    /// the expired holds cannot even be listed.
    pub fn cleanup_expired_holds(&self, now: DateTime<Utc>) -> Result<CleanupReport> {
        let now = normalize(now);
        cleanup::run::<Hold>(&**self.store(), now, HOLD_CLEANUP_BATCH, || self.now())
    }

    /// How the reserved units of one stock row are spoken for: held in carts, awaiting
    /// payment in orders, or reserved by the shop's own cart tracking.
    ///
    /// # Errors
    ///
    /// As [`get_stock_info`](Self::get_stock_info).
    pub fn get_reservation_breakdown(
        &self,
        product_id: ProductId,
        size: Option<&str>,
    ) -> Result<ReservationBreakdown> {
        check_size(size)?;
        let (levels, (held, awaiting)) = self.store().read_with(|tx| {
            let levels = load_row(tx, product_id, size)?;
            Ok((levels, tx.reservation_breakdown(product_id, size)?))
        })?;
        Ok(ReservationBreakdown {
            info: StockInfo::new(product_id, size, levels),
            held_in_carts: held,
            awaiting_payment: awaiting,
            reserved_otherwise: levels.reserved.saturating_sub(held + awaiting),
        })
    }
}

impl Expiring for Hold {
    const NAME: &'static str = "hold";

    fn cursor(&self) -> (DateTime<Utc>, i64) {
        (self.expires_at, self.id.0)
    }

    fn failure(&self, e: &Error) -> CleanupFailure {
        CleanupFailure {
            order_id: None,
            hold_id: Some(self.id),
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
        tx.expired_holds(now, after.map(|(t, id)| (t, HoldId(id))), limit)
    }

    fn reload(&self, tx: &mut dyn StockTx) -> Result<Option<Self>> {
        Ok(tx
            .cart_holds(&self.cart_id)?
            .into_iter()
            .find(|h| h.id == self.id))
    }

    fn expire(tx: &mut dyn StockTx, holds: Vec<Self>, at: DateTime<Utc>) -> Result<Batch<Self>> {
        let mut batch = Batch::default();
        let keys = holds.iter().map(|h| (h.product_id, h.size.as_deref()));
        let mut rows = LockedRows::load(tx, keys, at)?;
        for mut hold in holds {
            let cause = Cause::reference(Some(&hold.cart_id));
            let size = hold.size.as_deref();
            let kind = MovementKind::HoldExpire;
            if let Err(e) = rows.apply(
                Movement::Release,
                kind,
                &cause,
                hold.product_id,
                size,
                hold.quantity,
            ) {
                batch.failed.push((hold, e));
                continue;
            }
            hold.status = HoldStatus::Expired;
            tx.update_hold(&hold)?;
            batch.released.push(hold);
        }
        rows.store(tx)?;
        Ok(batch)
    }

    fn log_released(&self) {
        let row = RowName(self.product_id, self.size.as_deref());
        log::info!(
            "Hold {} of cart {} expired: {}",
            self.id,
            self.cart_id,
            Movement::Release.describe(self.quantity, &row)
        );
    }
}

/// Turns a cart's holds (its active holds, loaded and locked before the stock rows) into
/// the reservations of checkout lines, inside the checkout's unit: each line takes its units from the cart's active hold on its row (expired or
/// not, as long as cleanup has not released it), and whatever the hold lacks is taken
/// from available. Holds left with nothing become `converted`.
pub(crate) fn convert_holds(
    tx: &mut dyn StockTx,
    rows: &mut LockedRows,
    cart_id: &str,
    holds: Vec<Hold>,
    lines: &[(ProductId, Option<String>, u64)],
    order_causes: &[Cause],
) -> Result<()> {
    let mut holds: BTreeMap<RowKey, Hold> = holds.into_iter().map(|h| (key_of(&h), h)).collect();
    let cart = Cause::reference(Some(cart_id));
    for (i, ((product, size, quantity), order)) in lines.iter().zip(order_causes).enumerate() {
        let key = (*product, size.clone());
        let held = holds.get(&key).map_or(0, |h| h.quantity);
        if held < *quantity {
            rows.apply(
                Movement::Reserve,
                MovementKind::Hold,
                &cart,
                *product,
                size.as_deref(),
                quantity - held,
            )
            .map_err(|e| e.at_line(i))?;
        }
        let taken = held.min(*quantity);
        if let Some(hold) = holds.get_mut(&key) {
            hold.quantity -= taken;
        }
        let cause = Cause {
            reference: Some(cart_id.to_owned()),
            ..order.clone()
        };
        rows.note(
            MovementKind::HoldConvert,
            &cause,
            *product,
            size.as_deref(),
            CounterDelta::default(),
        );
    }
    for mut hold in holds.into_values() {
        if hold.quantity == 0 {
            hold.status = HoldStatus::Converted;
        }
        tx.update_hold(&hold)?;
    }
    Ok(())
}
