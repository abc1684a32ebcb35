//! A shop's racing workload and the checks that follow it, shared by the multi-process
//! tests of every backend.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;

use chrono::{TimeDelta, TimeZone, Utc};
use stockroom::{
    CheckoutRequest, NewProduct, OrderConfig, OrderId, OrderLine, OrderService, OrderStatus,
    ProductId, StockLine, StockService, StockStore,
};

pub const HOT: [ProductId; 3] = [ProductId(1), ProductId(2), ProductId(3)];
pub const INITIAL: u64 = 60;

/// Creates the hot products.
pub fn stock_up(store: Arc<dyn StockStore>) {
    let stock = StockService::new(store);
    for p in HOT {
        stock
            .create_product(NewProduct::plain(p, "Hot", INITIAL))
            .unwrap();
    }
}

/// One shopper: holds, checks out from the cart, pays at once, pays late, never pays,
/// cancels, and runs cleanup now and then, `rounds` times. Prints `ORDER <id>` for each
/// order it creates. Any refusal but running out of stock or a late payment whose
/// stock is gone fails the test, and so does any storage (busy, locked) error.
pub fn shop(store: Arc<dyn StockStore>, seed: u64, rounds: u64, tag: &str) {
    let mut seed = seed;
    let mut roll = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let stock = StockService::new(store.clone());
    let orders = OrderService::new(store, OrderConfig::default());
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    let mut refused: BTreeMap<&'static str, u32> = BTreeMap::new();
    for i in 0..rounds {
        let now = t0 + TimeDelta::seconds(i as i64 * 30);
        let cart = format!("{tag}-{}-{i}", std::process::id());
        let product = HOT[roll(3) as usize];
        let quantity = 1 + roll(2);
        if let Err(e) = stock.hold_cart(&cart, &[StockLine::new(product, None, quantity)], now) {
            *refused.entry(e.code()).or_default() += 1;
            continue;
        }
        let request = CheckoutRequest::new(vec![OrderLine::new(product, None, quantity, 100)])
            .cart(cart.as_str());
        let checkout = match orders.checkout(request, now) {
            Ok(c) => c,
            Err(e) => {
                *refused.entry(e.code()).or_default() += 1;
                continue;
            }
        };
        println!("ORDER {}", checkout.orders[0].id.0);
        let pay_at = match roll(10) {
            0..=4 => Some(now + TimeDelta::minutes(1)),
            5 | 6 => Some(now + TimeDelta::minutes(40)),
            7 => {
                // Cancelling may lose to another shopper's cleanup: then it is refused.
                if let Err(e) = orders.cancel_order(checkout.orders[0].id, now) {
                    *refused.entry(e.code()).or_default() += 1;
                }
                None
            }
            _ => None,
        };
        if roll(4) == 0 {
            let report = orders
                .cleanup_expired_payments(now + TimeDelta::minutes(20))
                .unwrap();
            assert_eq!(report.failed_count, 0, "{report:?}");
            let holds = stock
                .cleanup_expired_holds(now + TimeDelta::minutes(30))
                .unwrap();
            assert_eq!(holds.failed_count, 0, "{holds:?}");
        }
        if let Some(at) = pay_at {
            if let Err(e) =
                orders.confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, at)
            {
                *refused.entry(e.code()).or_default() += 1;
            }
        }
    }
    for code in refused.keys() {
        assert!(
            [
                "INSUFFICIENT_STOCK",
                "PAYMENT_EXPIRED",
                "ORDER_NOT_CANCELLABLE"
            ]
            .contains(code),
            "unexpected refusal {code}: {refused:?}"
        );
    }
    println!("SHOPPER-DONE {refused:?}");
}

/// Runs `children` copies of the ignored test `child` of this test binary, with `env`,
/// all at once, and returns the order ids they printed.
pub fn run_children(child: &str, children: u64, env: &[(&str, String)]) -> Vec<i64> {
    let exe = std::env::current_exe().unwrap();
    let spawned: Vec<_> = (0..children)
        .map(|i| {
            let mut cmd = Command::new(&exe);
            cmd.args([
                "--ignored",
                "--exact",
                child,
                "--nocapture",
                "--test-threads=1",
            ])
            .env("STOCKROOM_TEST_CHILD_SEED", (1000 + i).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.spawn().expect("start child process")
        })
        .collect();
    let mut ids = Vec::new();
    for child in spawned {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("SHOPPER-DONE"), "{stdout}");
        ids.extend(stdout.lines().filter_map(|l| {
            l.split_once("ORDER ")
                .map(|(_, id)| id.trim().parse::<i64>().unwrap())
        }));
    }
    ids
}

/// After the race: units conserved, nothing oversold, sold units exactly the paid
/// orders', reserved units exactly the unpaid orders' and the live holds', the ledger
/// adds up.
pub fn verify_after_race(store: Arc<dyn StockStore>, order_ids: &[i64]) {
    assert!(
        order_ids.len() > 20,
        "too few orders to mean anything: {}",
        order_ids.len()
    );
    let stock = StockService::new(store.clone());
    let orders = OrderService::new(store, OrderConfig::default());
    let mut paid: BTreeMap<ProductId, u64> = BTreeMap::new();
    let mut waiting: BTreeMap<ProductId, u64> = BTreeMap::new();
    for id in order_ids {
        let order = orders.get_order(OrderId(*id)).unwrap();
        match order.status {
            OrderStatus::Pending => *paid.entry(order.product_id).or_default() += order.quantity,
            OrderStatus::UnderPaying => {
                *waiting.entry(order.product_id).or_default() += order.quantity
            }
            OrderStatus::Cancelled => {}
        }
    }
    for p in HOT {
        let b = stock.get_reservation_breakdown(p, None).unwrap();
        let i = &b.info;
        assert_eq!(
            i.available_quantity + i.reserved_quantity + i.sold_quantity,
            INITIAL
        );
        assert!(i.sold_quantity <= INITIAL, "oversold {p}");
        assert_eq!(
            i.sold_quantity,
            paid.get(&p).copied().unwrap_or(0),
            "sold of {p}"
        );
        assert_eq!(b.awaiting_payment, waiting.get(&p).copied().unwrap_or(0));
        assert_eq!(b.reserved_otherwise, 0, "reserved units nobody holds: {p}");
    }
    let ledger = stock.verify_ledger().unwrap();
    assert_eq!(ledger.rows_checked, HOT.len());
    assert!(ledger.is_consistent(), "{:?}", ledger.mismatches);
}
