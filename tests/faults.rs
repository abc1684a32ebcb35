//! Fault injection: every service operation, with its N-th storage call failing for
//! N = 1, 2, 3, … until it completes. After each injected fault the operation returned an
//! error and nothing partial is visible: counters, orders, payments, holds and the ledger
//! are exactly as before. (Cleanup is the one operation that may instead complete: it
//! retries a failed batch order by order; then everything is done, never half.)

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use stockroom::conformance::FailingStore;
use stockroom::{
    CheckoutRequest, Error, Hold, MemoryStore, MovementQuery, NewProduct, Order, OrderConfig,
    OrderId, OrderLine, OrderService, ProductId, SqliteStore, StockLevels, StockLine, StockService,
    StockStore,
};

const MUG: ProductId = ProductId(1);
const SHIRT: ProductId = ProductId(2);
const CARTS: [&str; 2] = ["cart-a", "cart-b"];

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, 0).unwrap()
}

/// Everything an operation could change, read through the store without faults.
#[derive(Debug, PartialEq)]
struct Snapshot {
    rows: Vec<(ProductId, Option<String>, StockLevels)>,
    orders: Vec<Order>,
    holds: Vec<Vec<Hold>>,
    movements: usize,
}

fn snapshot(inner: &Arc<dyn StockStore>, order_ids: &[OrderId]) -> Snapshot {
    let stock = StockService::new(inner.clone());
    let orders = OrderService::new(inner.clone(), OrderConfig::default());
    let mut rows = Vec::new();
    let mut movements = 0;
    for p in [MUG, SHIRT] {
        if let Ok(infos) = stock.get_product_stock(p) {
            rows.extend(infos.into_iter().map(|i| (p, i.size.clone(), i.levels())));
            movements += stock
                .movements(&MovementQuery::product(p).limit(10_000))
                .unwrap()
                .len();
        }
    }
    Snapshot {
        rows,
        orders: order_ids
            .iter()
            .map(|id| orders.get_order(*id).unwrap())
            .collect(),
        holds: CARTS.iter().map(|c| stock.get_cart(c).unwrap()).collect(),
        movements,
    }
}

/// Counts of what the run injected, for the report.
#[derive(Default, Debug)]
struct Tally {
    operations: usize,
    faults: u64,
}

/// Runs `op` with a fault at storage call 1, 2, 3, … until it succeeds, checking after
/// each fault that nothing changed; returns the successful result.
fn until_done<T: std::fmt::Debug>(
    name: &str,
    failing: &FailingStore,
    inner: &Arc<dyn StockStore>,
    order_ids: &[OrderId],
    tally: &mut Tally,
    may_complete_despite_fault: bool,
    mut op: impl FnMut() -> Result<T, Error>,
) -> T {
    tally.operations += 1;
    for n in 1.. {
        let before = snapshot(inner, order_ids);
        let faults_before = failing.faults();
        failing.fail_at(n);
        let result = op();
        failing.disarm();
        let injected = failing.faults() > faults_before;
        tally.faults += failing.faults() - faults_before;
        match result {
            Ok(value) if !injected || may_complete_despite_fault => return value,
            Ok(value) => panic!("{name}: fault at call {n} was swallowed: {value:?}"),
            Err(e) => {
                assert!(injected, "{name}: failed without a fault: {e}");
                assert_eq!(e.code(), "STORAGE", "{name}: fault at call {n} gave {e}");
                assert_eq!(
                    snapshot(inner, order_ids),
                    before,
                    "{name}: fault at call {n} left something partial"
                );
            }
        }
        assert!(n < 500, "{name}: never completed");
    }
    unreachable!()
}

fn scenario(inner: Arc<dyn StockStore>) -> Tally {
    let failing = Arc::new(FailingStore::new(inner.clone()));
    let stock = StockService::new(failing.clone());
    let orders = OrderService::new(failing.clone(), OrderConfig::default());
    let mut ids: Vec<OrderId> = Vec::new();
    let mut tally = Tally::default();
    let t = &mut tally;
    let f = &*failing;
    let i = &inner;

    until_done("create plain", f, i, &ids, t, false, || {
        stock.create_product(NewProduct::plain(MUG, "Mug", 20))
    });
    until_done("create sized", f, i, &ids, t, false, || {
        stock.create_product(NewProduct::sized(SHIRT, "Shirt", [("S", 6), ("M", 6)]))
    });
    until_done("reserve", f, i, &ids, t, false, || {
        stock.reserve_stock(MUG, 3, None)
    });
    until_done("reserve lines", f, i, &ids, t, false, || {
        stock.reserve_lines(&[
            StockLine::new(MUG, None, 1),
            StockLine::new(SHIRT, Some("S"), 2),
        ])
    });
    until_done("unreserve", f, i, &ids, t, false, || {
        stock.unreserve_stock(MUG, 1, None)
    });
    until_done("sell", f, i, &ids, t, false, || {
        stock.confirm_stock_sale(SHIRT, 1, Some("M"))
    });
    until_done("restock", f, i, &ids, t, false, || {
        stock.restock(MUG, 4, None)
    });
    until_done("count", f, i, &ids, t, false, || {
        stock.record_stock_count(SHIRT, Some("M"), 4)
    });
    until_done("hold", f, i, &ids, t, false, || {
        stock.hold_cart(
            "cart-a",
            &[
                StockLine::new(MUG, None, 2),
                StockLine::new(SHIRT, Some("M"), 1),
            ],
            t0(),
        )
    });
    until_done("hold b", f, i, &ids, t, false, || {
        stock.hold_cart("cart-b", &[StockLine::new(SHIRT, Some("S"), 1)], t0())
    });
    let plain = until_done("checkout", f, i, &ids, t, false, || {
        orders.checkout(
            vec![
                OrderLine::new(MUG, None, 3, 100),
                OrderLine::new(SHIRT, Some("S"), 2, 300),
            ],
            t0(),
        )
    });
    ids.extend(plain.orders.iter().map(|o| o.id));
    let carted = until_done("checkout cart", f, i, &ids, t, false, || {
        orders.checkout(
            CheckoutRequest::new(vec![OrderLine::new(MUG, None, 2, 100)]).cart("cart-a"),
            t0(),
        )
    });
    ids.extend(carted.orders.iter().map(|o| o.id));
    until_done("confirm", f, i, &ids, t, false, || {
        orders.confirm_payment_for_orders(&plain.payment_hash, &plain.payment_key, t0())
    });
    stock.reserve_stock(MUG, 1, None).unwrap();
    let to_cancel = orders
        .checkout(vec![OrderLine::new(MUG, None, 1, 100)], t0())
        .unwrap();
    ids.extend(to_cancel.orders.iter().map(|o| o.id));
    until_done("cancel", f, i, &ids, t, false, || {
        orders.cancel_order(to_cancel.orders[0].id, t0())
    });
    until_done("release line", f, i, &ids, t, false, || {
        stock.release_cart_line("cart-a", SHIRT, Some("M"))
    });
    let report = until_done("cleanup payments", f, i, &ids, t, true, || {
        orders.cleanup_expired_payments(t0() + TimeDelta::minutes(16))
    });
    assert_eq!(report.processed_count, 1, "the cart checkout expired");
    let report = until_done("cleanup holds", f, i, &ids, t, true, || {
        stock.cleanup_expired_holds(t0() + TimeDelta::minutes(30))
    });
    assert_eq!(report.processed_count, 1, "cart-b's hold expired");
    until_done("late payment", f, i, &ids, t, false, || {
        orders.confirm_payment_for_orders(
            &carted.payment_hash,
            &carted.payment_key,
            t0() + TimeDelta::minutes(40),
        )
    });
    until_done("release cart", f, i, &ids, t, false, || {
        stock.release_cart("cart-b")
    });

    let end = snapshot(&inner, &ids);
    let mug = end.rows.iter().find(|r| r.0 == MUG).unwrap().2;
    assert_eq!((mug.available, mug.reserved, mug.sold), (19, 0, 5));
    let ledger = StockService::new(inner).verify_ledger().unwrap();
    assert!(ledger.is_consistent(), "{:?}", ledger.mismatches);
    tally
}

#[test]
fn faults_on_memory_leave_nothing_partial() {
    let tally = scenario(Arc::new(MemoryStore::new()));
    println!("memory: {tally:?}");
    assert_eq!(tally.operations, 19);
    assert!(tally.faults >= 2 * 19, "{tally:?}");
}

#[test]
fn faults_on_sqlite_leave_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let tally = scenario(Arc::new(
        SqliteStore::open(dir.path().join("f.db")).unwrap(),
    ));
    println!("sqlite: {tally:?}");
    assert_eq!(tally.operations, 19);
    assert!(tally.faults >= 2 * 19, "{tally:?}");
}

#[cfg(feature = "postgres")]
#[test]
fn faults_on_postgres_leave_nothing_partial() {
    use stockroom::{PostgresConfig, PostgresStore};

    let Ok(url) = std::env::var("STOCKROOM_PG_URL") else {
        eprintln!("STOCKROOM_PG_URL is unset: skipping this PostgreSQL test");
        return;
    };
    let schema = format!("faults_{}", std::process::id());
    let store = PostgresStore::connect(PostgresConfig::new(url).with_schema(schema)).unwrap();
    let tally = scenario(Arc::new(store));
    println!("postgres: {tally:?}");
    assert_eq!(tally.operations, 19);
    assert!(tally.faults >= 2 * 19, "{tally:?}");
}
