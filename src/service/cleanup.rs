//! The caller-driven expiry cleanup, shared by expired payments and expired cart holds:
//! bounded batches, one transaction each, every item released exactly once, one item's
//! failure never holding back the others.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{HoldId, OrderId};
use crate::store::{StockRead, StockStore, StockTx, StoreExt};

/// One order or hold that cleanup could not release.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CleanupFailure {
    /// The order, for a payment cleanup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<OrderId>,
    /// The hold, for a hold cleanup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<HoldId>,
    /// The error's code.
    pub error_code: &'static str,
    /// The error's message.
    pub error: String,
}

/// What a cleanup did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct CleanupReport {
    /// Orders (or holds) released.
    pub processed_count: usize,
    /// Orders (or holds) that could not be released; they stay as they were.
    pub failed_count: usize,
    /// Each failure.
    pub errors: Vec<CleanupFailure>,
}

/// A cursor in `(expires_at, id)` order.
pub(crate) type Cursor = Option<(DateTime<Utc>, i64)>;

/// Something with an expiry that cleanup releases: an order awaiting payment, a cart hold.
pub(crate) trait Expiring: Send + 'static + Sized {
    /// What the logs call it: "order", "hold".
    const NAME: &'static str;

    /// Its place in `(expires_at, id)` order.
    fn cursor(&self) -> (DateTime<Utc>, i64);

    /// The failure entry naming it.
    fn failure(&self, e: &Error) -> CleanupFailure;

    /// Up to `limit` expired items after `after` (locked, in a write unit).
    fn select(
        tx: &mut dyn StockRead,
        now: DateTime<Utc>,
        after: Cursor,
        limit: usize,
    ) -> Result<Vec<Self>>;

    /// The same item loaded again in this unit, if it is still waiting to be released.
    fn reload(&self, tx: &mut dyn StockTx) -> Result<Option<Self>>;

    /// Releases `items` in one unit. An item whose release is refused is returned in
    /// `failed`, untouched; the others go on.
    fn expire(tx: &mut dyn StockTx, items: Vec<Self>, at: DateTime<Utc>) -> Result<Batch<Self>>;

    /// Logs one released item.
    fn log_released(&self);
}

/// What one cleanup transaction did.
pub(crate) struct Batch<T> {
    pub(crate) released: Vec<T>,
    pub(crate) failed: Vec<(T, Error)>,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            released: Vec::new(),
            failed: Vec::new(),
        }
    }
}

fn record<T: Expiring>(report: &mut CleanupReport, batch: Batch<T>) {
    for item in &batch.released {
        item.log_released();
    }
    report.processed_count += batch.released.len();
    for (item, e) in &batch.failed {
        record_failure(report, item.failure(e), e);
    }
}

fn record_failure(report: &mut CleanupReport, failure: CleanupFailure, e: &Error) {
    let id = failure
        .order_id
        .map(|o| format!("order {o}"))
        .or(failure.hold_id.map(|h| format!("hold {h}")))
        .unwrap_or_default();
    log::error!("Cleanup failed for {id}: {e}");
    report.failed_count += 1;
    report.errors.push(failure);
}

/// Releases every item of kind `T` expired before `now`, `limit` per transaction, and
/// reports what it did. `at` stamps the ledger rows of each batch.
pub(crate) fn run<T: Expiring>(
    store: &dyn StockStore,
    now: DateTime<Utc>,
    limit: usize,
    at: impl Fn() -> DateTime<Utc>,
) -> Result<CleanupReport> {
    let limit = limit.max(1);
    let mut report = CleanupReport::default();
    let mut cursor: Cursor = None;
    loop {
        let after = cursor;
        let stamp = at();
        let batch = store.write_with(move |tx| {
            let items = T::select(tx, now, after, limit)?;
            let seen = items.len();
            let last = items.last().map(T::cursor);
            Ok((seen, last, T::expire(tx, items, stamp)?))
        });
        let (seen, last) = match batch {
            Ok((seen, last, batch)) => {
                record(&mut report, batch);
                (seen, last)
            }
            Err(e) => {
                // The batch rolled back as a whole: go through its items one by one, so
                // that one bad item does not hold back the others.
                log::warn!(
                    "Cleanup batch of {}s failed ({e}); retrying them one by one",
                    T::NAME
                );
                let items = store.read_with(|tx| T::select(tx, now, after, limit))?;
                let seen = items.len();
                let last = items.last().map(T::cursor);
                for item in items {
                    let failure = item.failure(&e);
                    let single = store.write_with(move |tx| match item.reload(tx)? {
                        Some(fresh) => T::expire(tx, vec![fresh], stamp),
                        None => Ok(Batch::default()),
                    });
                    match single {
                        Ok(batch) => record(&mut report, batch),
                        Err(e) => record_failure(
                            &mut report,
                            CleanupFailure {
                                error_code: e.code(),
                                error: e.to_string(),
                                ..failure
                            },
                            &e,
                        ),
                    }
                }
                (seen, last)
            }
        };
        cursor = last;
        if seen < limit {
            break;
        }
    }
    if report.processed_count > 0 || report.failed_count > 0 {
        log::info!(
            "Cleanup of expired {}s: {} released, {} failed",
            T::NAME,
            report.processed_count,
            report.failed_count
        );
    }
    Ok(report)
}
