//! Payment keys: 256 bits from the operating system's CSPRNG, different across 100,000
//! checkouts, never confirming with anything but the right key, never written to a log.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Once};

use chrono::{TimeDelta, TimeZone, Utc};
use proptest::prelude::*;
use stockroom::{
    MemoryStore, NewProduct, OrderConfig, OrderLine, OrderService, OrderStatus, ProductId,
    SqliteStore, StockService, StockStore,
};

/// Every log line of this test binary.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        LINES
            .lock()
            .unwrap()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

fn shop(store: Arc<dyn StockStore>, units: u64) -> (StockService, OrderService) {
    let stock = StockService::new(store.clone());
    stock
        .create_product(NewProduct::plain(ProductId(1), "Mug", units))
        .unwrap();
    (stock, OrderService::new(store, OrderConfig::default()))
}

#[test]
fn keys_are_long_random_and_never_repeat_over_100k_checkouts() {
    let (stock, orders) = shop(Arc::new(MemoryStore::new()), 100_000);
    stock.reserve_stock(ProductId(1), 1, None).unwrap();
    let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut keys = HashSet::new();
    let mut hashes = HashSet::new();
    let mut digits = [0u64; 16];
    for _ in 0..100_000 {
        // Checkout only checks that the unit is reserved; it does not move counters.
        let c = orders
            .checkout(vec![OrderLine::new(ProductId(1), None, 1, 1)], now)
            .unwrap();
        assert_eq!(c.payment_key.len(), 64, "256 bits as hex");
        assert_eq!(c.payment_hash.len(), 32, "128 bits as hex");
        for b in c.payment_key.bytes() {
            digits[(b as char).to_digit(16).expect("hex") as usize] += 1;
        }
        assert!(keys.insert(c.payment_key));
        assert!(hashes.insert(c.payment_hash));
    }
    // 6.4 million hex digits: each of the 16 holds its share to within 0.001 (ten
    // standard deviations of random bits), which a counter or a clock would not.
    let total: u64 = digits.iter().sum();
    for (d, n) in digits.iter().enumerate() {
        let share = *n as f64 / total as f64;
        assert!((share - 1.0 / 16.0).abs() < 0.001, "{d:x}: {share}");
    }
    assert!(!keys.iter().any(|k| hashes.contains(k)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any key but the right one — random, a prefix, the key plus a character, the key
    /// in upper case — is the same PAYMENT_NOT_FOUND as an unknown hash and changes
    /// nothing.
    #[test]
    fn only_the_right_key_confirms(wrong in "[0-9a-fA-F]{0,80}|.{0,80}", cut in 0usize..64) {
        let (stock, orders) = shop(Arc::new(MemoryStore::new()), 10);
        stock.reserve_stock(ProductId(1), 2, None).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let c = orders.checkout(vec![OrderLine::new(ProductId(1), None, 2, 1)], now).unwrap();
        let candidates = [
            wrong.clone(),
            c.payment_key[..cut].to_owned(),
            format!("{}0", c.payment_key),
            c.payment_key.to_uppercase(),
        ];
        for key in candidates.iter().filter(|k| **k != c.payment_key) {
            let err = orders.confirm_payment_for_orders(&c.payment_hash, key, now).unwrap_err();
            prop_assert_eq!(err.code(), "PAYMENT_NOT_FOUND");
        }
        let err = orders.confirm_payment_for_orders(&wrong, &c.payment_key, now).unwrap_err();
        prop_assert_eq!(err.code(), "PAYMENT_NOT_FOUND");
        prop_assert_eq!(orders.get_order(c.orders[0].id).unwrap().status, OrderStatus::UnderPaying);
        let info = stock.get_stock_info(ProductId(1), None).unwrap();
        prop_assert_eq!((info.reserved_quantity, info.sold_quantity), (2, 0));
        orders.confirm_payment_for_orders(&c.payment_hash, &c.payment_key, now).unwrap();
    }
}

#[test]
fn no_log_line_holds_a_payment_key() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let (stock, orders) = shop(
        Arc::new(SqliteStore::open(dir.path().join("s.db")).unwrap()),
        10,
    );
    let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut keys = Vec::new();
    for i in 0..5 {
        stock.reserve_stock(ProductId(1), 1, None).unwrap();
        let c = orders
            .checkout(vec![OrderLine::new(ProductId(1), None, 1, 1)], now)
            .unwrap();
        let _ = orders.confirm_payment_for_orders(&c.payment_hash, "wrong", now);
        if i % 2 == 0 {
            orders
                .confirm_payment_for_orders(&c.payment_hash, &c.payment_key, now)
                .unwrap();
            orders
                .confirm_payment_for_orders(&c.payment_hash, &c.payment_key, now)
                .unwrap();
        }
        assert!(
            !format!("{c:?}").contains(&c.payment_key),
            "Debug shows the key"
        );
        keys.push(c.payment_key);
    }
    orders
        .cleanup_expired_payments(now + TimeDelta::minutes(30))
        .unwrap();
    let lines = LINES.lock().unwrap();
    assert!(lines.len() > 20, "the library logged: {lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("Payment") && l.contains("confirmed"))
    );
    for line in lines.iter() {
        for key in &keys {
            assert!(!line.contains(key.as_str()), "a key was logged: {line}");
        }
    }
}
