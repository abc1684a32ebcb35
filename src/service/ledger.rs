//! The stock ledger on [`StockService`]: reading movements back, proving the counters
//! from them, and the metrics they add up to.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{
    CounterDelta, KindTotal, LedgerMismatch, LedgerReport, MovementKind, MovementQuery, ProductId,
    StockCountRecord, StockMovement,
};
use crate::service::check_size;
use crate::service::stock::StockService;
use crate::store::StoreExt;

/// The largest page of [`StockService::movements`].
const MAX_PAGE: usize = 10_000;

/// How well the system's figures matched physical counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StockAccuracy {
    /// Counts recorded in the window.
    pub counts: u64,
    /// Counts that found exactly the expected units.
    pub matched: u64,
    /// `matched / counts`, or `None` without counts.
    pub matched_share: Option<f64>,
    /// The sum of `|counted - expected|` over the counts.
    pub total_abs_discrepancy: u64,
}

/// Figures over a time window, for one product or for the whole shop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MetricsFigures {
    /// Units that went from available to reserved (carts, holds).
    pub units_reserved: u64,
    /// Units sold (paid orders, direct sales, revived late payments).
    pub units_sold: u64,
    /// Reserved units released because an order's payment window passed.
    pub units_expired: u64,
    /// Reserved units released by an unreserve or a cancelled order.
    pub units_released: u64,
    /// Units held in carts.
    pub units_held: u64,
    /// Held units released because the hold expired (abandoned carts).
    pub units_hold_expired: u64,
    /// `units_sold / units_reserved`, or `None` when nothing was reserved.
    pub conversion_rate: Option<f64>,
    /// `units_expired / units_reserved`, or `None` when nothing was reserved.
    pub expiry_rate: Option<f64>,
    /// `units_hold_expired / units_held`, or `None` when nothing was held.
    pub abandoned_cart_rate: Option<f64>,
    /// Units reserved right now (at the time of the call, not of the window).
    pub reserved_now: u64,
    /// How the counts in the window went.
    pub stock_accuracy: StockAccuracy,
}

/// The figures of one product.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProductMetrics {
    /// The product.
    pub product_id: ProductId,
    /// Its figures.
    pub figures: MetricsFigures,
}

/// What [`StockService::metrics`] reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StockMetrics {
    /// The window's start (inclusive).
    pub from: DateTime<Utc>,
    /// The window's end (exclusive).
    pub to: DateTime<Utc>,
    /// The whole shop.
    pub overall: MetricsFigures,
    /// Each product with any movement, count or reserved unit, by id.
    pub products: Vec<ProductMetrics>,
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn units(v: i64) -> u64 {
    v.unsigned_abs()
}

impl MetricsFigures {
    fn add_kind(&mut self, kind: MovementKind, d: CounterDelta) {
        match kind {
            MovementKind::Reserve => self.units_reserved += units(d.reserved),
            MovementKind::Hold => {
                self.units_reserved += units(d.reserved);
                self.units_held += units(d.reserved);
            }
            MovementKind::Sale | MovementKind::LatePaymentRevival => {
                self.units_sold += units(d.sold)
            }
            MovementKind::Expire => self.units_expired += units(d.reserved),
            MovementKind::Release | MovementKind::Cancel | MovementKind::HoldRelease => {
                self.units_released += units(d.reserved)
            }
            MovementKind::HoldExpire => self.units_hold_expired += units(d.reserved),
            MovementKind::Restock | MovementKind::CountCorrection | MovementKind::HoldConvert => {}
        }
    }

    fn add_count(&mut self, count: &StockCountRecord) {
        let a = &mut self.stock_accuracy;
        a.counts += 1;
        if count.count.discrepancy == 0 {
            a.matched += 1;
        }
        a.total_abs_discrepancy += count.count.discrepancy.unsigned_abs();
    }

    fn finish(&mut self) {
        self.conversion_rate = ratio(self.units_sold, self.units_reserved);
        self.expiry_rate = ratio(self.units_expired, self.units_reserved);
        self.abandoned_cart_rate = ratio(self.units_hold_expired, self.units_held);
        let a = &mut self.stock_accuracy;
        a.matched_share = ratio(a.matched, a.counts);
    }
}

impl StockService {
    /// The ledger movements of a product (or one of its sizes), oldest first, one page
    /// at a time: pass the last movement to [`MovementQuery::after`] for the next page.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a limit of 0 or above 10,000; [`Error::InvalidLabel`]
    /// for a bad size; [`Error::Storage`].
    pub fn movements(&self, query: &MovementQuery) -> Result<Vec<StockMovement>> {
        if query.limit == 0 || query.limit > MAX_PAGE {
            return Err(Error::InvalidInput {
                reason: format!(
                    "a page holds 1 to {MAX_PAGE} movements, not {}",
                    query.limit
                ),
            });
        }
        check_size(query.size.as_deref())?;
        self.store().read_with(|tx| tx.movements(query))
    }

    /// Proves every stock row's counters from its ledger: for each row, the sum of its
    /// movements must equal its counters. Reports each row where they differ (a counter
    /// changed behind the library's back).
    ///
    /// # Errors
    ///
    /// [`Error::Storage`].
    pub fn verify_ledger(&self) -> Result<LedgerReport> {
        let (rows, balances) = self
            .store()
            .read_with(|tx| Ok((tx.all_stock()?, tx.ledger_balances()?)))?;
        let mut sums: BTreeMap<(ProductId, Option<String>), CounterDelta> =
            balances.into_iter().map(|(p, s, d)| ((p, s), d)).collect();
        let mut report = LedgerReport {
            rows_checked: rows.len(),
            mismatches: Vec::new(),
        };
        for (product_id, size, counters) in rows {
            let ledger = sums.remove(&(product_id, size.clone())).unwrap_or_default();
            if !ledger.matches(counters) {
                report.mismatches.push(LedgerMismatch {
                    product_id,
                    size,
                    counters,
                    ledger,
                });
            }
        }
        for ((product_id, size), ledger) in sums {
            report.mismatches.push(LedgerMismatch {
                product_id,
                size,
                counters: Default::default(),
                ledger,
            });
        }
        for m in &report.mismatches {
            log::warn!(
                "Ledger mismatch for product {}{}: counters {:?}, ledger {:?}",
                m.product_id,
                m.size
                    .as_deref()
                    .map(|s| format!(" size {s}"))
                    .unwrap_or_default(),
                m.counters,
                m.ledger
            );
        }
        Ok(report)
    }

    /// Metrics over `[from, to)`, per product and overall: units reserved, sold, expired
    /// and released, conversion and expiry rates, abandoned carts, units reserved now,
    /// and stock-count accuracy.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `to` is before `from`; [`Error::Storage`].
    pub fn metrics(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<StockMetrics> {
        if to < from {
            return Err(Error::InvalidInput {
                reason: "the metrics window ends before it starts".into(),
            });
        }
        let (totals, counts, rows) = self.store().read_with(|tx| {
            Ok((
                tx.kind_totals(from, to)?,
                tx.stock_counts(from, to)?,
                tx.all_stock()?,
            ))
        })?;
        let mut overall = MetricsFigures::default();
        let mut per: BTreeMap<ProductId, MetricsFigures> = BTreeMap::new();
        for KindTotal {
            product_id,
            kind,
            delta,
        } in totals
        {
            overall.add_kind(kind, delta);
            per.entry(product_id).or_default().add_kind(kind, delta);
        }
        for count in &counts {
            overall.add_count(count);
            per.entry(count.count.product_id)
                .or_default()
                .add_count(count);
        }
        for (product_id, _, levels) in rows {
            if levels.reserved > 0 {
                overall.reserved_now += levels.reserved;
                per.entry(product_id).or_default().reserved_now += levels.reserved;
            }
        }
        overall.finish();
        let products = per
            .into_iter()
            .map(|(product_id, mut figures)| {
                figures.finish();
                ProductMetrics {
                    product_id,
                    figures,
                }
            })
            .collect();
        Ok(StockMetrics {
            from,
            to,
            overall,
            products,
        })
    }
}
