//! Bad input on every public operation — zero, huge and overflowing quantities; empty,
//! over-long, unicode, control-character and SQL-looking labels; unknown ids; wrong keys
//! — gets a clear refusal (never a panic, never a storage error) and changes nothing.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use proptest::prelude::*;
use stockroom::{
    CheckoutRequest, Error, MemoryStore, MovementQuery, NewProduct, OrderConfig, OrderId,
    OrderLine, OrderService, ProductId, SqliteStore, StockLevels, StockLine, StockService,
    StockStore,
};

fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" ".to_owned()),
        Just("M".to_owned()),
        Just("x".repeat(65)),
        Just("x".repeat(10_000)),
        Just("' OR '1'='1".to_owned()),
        Just("M'); DROP TABLE stock; --".to_owned()),
        Just("日本語のサイズ".to_owned()),
        Just("tab\tnewline\n".to_owned()),
        Just("\0".to_owned()),
        ".{0,80}",
    ]
}

fn quantity() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(1_000_000),
        Just(1_000_001),
        Just(1_000_000_000_000),
        Just(1_000_000_000_001),
        Just(u64::MAX),
        Just(i64::MAX as u64 + 1),
        any::<u64>(),
    ]
}

fn product() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(1i64),
        Just(2),
        Just(0),
        Just(-1),
        Just(i64::MAX),
        Just(i64::MIN),
        any::<i64>()
    ]
}

#[derive(Debug, PartialEq)]
struct State {
    rows: Vec<StockLevels>,
    movements: usize,
    cart: usize,
}

fn state(stock: &StockService) -> State {
    let mut rows = Vec::new();
    let mut movements = 0;
    for p in [ProductId(1), ProductId(2)] {
        rows.extend(
            stock
                .get_product_stock(p)
                .unwrap()
                .iter()
                .map(|i| i.levels()),
        );
        movements += stock
            .movements(&MovementQuery::product(p).limit(10_000))
            .unwrap()
            .len();
    }
    State {
        rows,
        movements,
        cart: stock.get_cart("cart").unwrap().len(),
    }
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 1, 9, 0, 0).unwrap()
}

/// Runs one call; a refusal must carry a refusal code and leave the state unchanged.
fn check<T>(
    stock: &StockService,
    name: &str,
    call: impl FnOnce() -> Result<T, Error>,
) -> Result<(), TestCaseError> {
    let before = state(stock);
    match call() {
        Ok(_) => {}
        Err(e) => {
            prop_assert!(e.is_refusal(), "{}: not a refusal: {}", name, e);
            prop_assert!(!e.to_string().is_empty());
            prop_assert_eq!(
                state(stock),
                before,
                "{} changed something before refusing",
                name
            );
        }
    }
    Ok(())
}

fn run_all(store: Arc<dyn StockStore>, s: &str, q: u64, p: i64) -> Result<(), TestCaseError> {
    let stock = StockService::new(store.clone());
    let orders = OrderService::new(store, OrderConfig::default());
    stock
        .create_product(NewProduct::plain(ProductId(1), "Mug", 50))
        .unwrap();
    stock
        .create_product(NewProduct::sized(ProductId(2), "Shirt", [("M", 50)]))
        .unwrap();
    stock.reserve_stock(ProductId(1), 5, None).unwrap();
    let paid = orders
        .checkout(vec![OrderLine::new(ProductId(1), None, 5, 100)], now())
        .unwrap();
    let pid = ProductId(p);
    let size = Some(s);
    check(&stock, "create", || {
        stock.create_product(NewProduct::plain(pid, s, q))
    })?;
    check(&stock, "create sized", || {
        stock.create_product(NewProduct::sized(pid, "Shoe", [(s, q)]))
    })?;
    check(&stock, "reserve", || stock.reserve_stock(pid, q, size))?;
    check(&stock, "reserve sized", || {
        stock.reserve_stock(ProductId(2), q, size)
    })?;
    check(&stock, "unreserve", || stock.unreserve_stock(pid, q, None))?;
    check(&stock, "sell", || {
        stock.confirm_stock_sale(ProductId(2), q, size)
    })?;
    check(&stock, "restock", || stock.restock(pid, q, None))?;
    check(&stock, "restock sized", || {
        stock.restock(ProductId(2), q, size)
    })?;
    check(&stock, "count", || {
        stock.record_stock_count(ProductId(2), size, q)
    })?;
    check(&stock, "availability", || {
        stock.check_stock_availability(pid, q, size)
    })?;
    check(&stock, "info", || stock.get_stock_info(pid, size))?;
    check(&stock, "lines", || {
        stock.reserve_lines(&[
            StockLine::new(ProductId(1), None, 1),
            StockLine::new(pid, size, q),
        ])
    })?;
    check(&stock, "hold", || {
        stock.hold_cart(s, &[StockLine::new(ProductId(2), size, q)], now())
    })?;
    check(&stock, "hold cart", || {
        stock.hold_cart("cart", &[StockLine::new(pid, size, q)], now())
    })?;
    check(&stock, "release", || stock.release_cart_line(s, pid, size))?;
    check(&stock, "reference", || {
        stock.with_reference(s).reserve_stock(ProductId(1), 1, None)
    })?;
    check(&stock, "movements", || {
        stock.movements(&MovementQuery::product(pid).limit(q.min(usize::MAX as u64) as usize))
    })?;
    check(&stock, "checkout", || {
        orders.checkout(vec![OrderLine::new(pid, size, q, q)], now())
    })?;
    check(&stock, "checkout ref", || {
        orders.checkout(
            CheckoutRequest::new(vec![OrderLine::new(ProductId(1), None, 1, q)])
                .customer_ref(s)
                .cart(s),
            now(),
        )
    })?;
    check(&stock, "confirm", || {
        orders.confirm_payment_for_orders(s, s, now())
    })?;
    check(&stock, "confirm key", || {
        orders.confirm_payment_for_orders(&paid.payment_hash, s, now())
    })?;
    check(&stock, "cancel", || orders.cancel_order(OrderId(p), now()))?;
    check(&stock, "order", || orders.get_order(OrderId(p)))?;
    check(&stock, "payment orders", || orders.get_payment_orders(s))?;
    let far = now() + TimeDelta::days(365 * 1000);
    check(&stock, "checkout far", || {
        orders.checkout(vec![OrderLine::new(ProductId(1), None, 1, 1)], far)
    })?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn memory_refuses_bad_input_cleanly(s in label(), q in quantity(), p in product()) {
        run_all(Arc::new(MemoryStore::new()), &s, q, p)?;
    }

    #[test]
    fn sqlite_refuses_bad_input_cleanly(s in label(), q in quantity(), p in product()) {
        run_all(Arc::new(SqliteStore::open_in_memory().unwrap()), &s, q, p)?;
    }
}
