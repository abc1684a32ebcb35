//! The backend conformance suite: one function per clause of the
//! [`StockStore`] contract and per service rule, each taking a store factory.
//!
//! Every backend in this crate runs all of it (see `tests/conformance.rs`), and a
//! third-party backend can run it too with the `conformance` feature:
//!
//! ```
//! use std::sync::Arc;
//! use stockroom::{MemoryStore, StockStore};
//!
//! // Swap MemoryStore for your own backend.
//! let factory = || -> Arc<dyn StockStore> { Arc::new(MemoryStore::new()) };
//! stockroom::conformance::reserve_more_than_available_is_refused(&factory);
//! for (name, case) in stockroom::conformance::ALL {
//!     println!("running {name}");
//!     case(&factory);
//! }
//! ```
//!
//! The factory returns a new, empty store on each call. Each function panics (like a
//! failing `assert!`) when the backend breaks the contract.

use std::sync::{Arc, Barrier};
use std::thread;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};

use crate::{
    CheckoutRequest, CounterDelta, Error, HoldStatus, MAX_QUANTITY, MAX_STOCK, ManualClock,
    MovementKind, MovementQuery, NewProduct, OrderConfig, OrderId, OrderLine, OrderService,
    OrderStatus, PaymentStatus, ProductId, StockLevels, StockLine, StockService, StockStore,
};

/// Makes a new, empty store.
pub type Factory<'a> = &'a dyn Fn() -> Arc<dyn StockStore>;

/// One case of the suite.
pub type Case = fn(Factory<'_>);

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        /// Every case of the suite, by name, for harnesses that loop over them.
        pub const ALL: &[(&str, Case)] = &[$((stringify!($case), $case)),*];
    };
}

cases![
    create_products,
    create_product_refuses_bad_input,
    reserve_moves_available_to_reserved,
    reserve_more_than_available_is_refused,
    unreserve_moves_reserved_back,
    unreserve_more_than_reserved_is_refused,
    direct_sale_moves_available_to_sold,
    restock_adds_and_refuses_overflow,
    size_rules_are_enforced,
    bad_quantities_are_refused,
    cart_reserves_all_or_none,
    cart_lines_on_one_row_add_up,
    availability_check_changes_nothing,
    stock_count_books_the_difference,
    concurrent_reservations_never_oversell,
    checkout_creates_orders_awaiting_payment,
    checkout_without_reservation_is_refused,
    payment_confirmation_turns_reserved_into_sold,
    wrong_key_or_hash_confirms_nothing,
    repeated_confirmation_changes_nothing,
    late_payment_before_cleanup_is_confirmed,
    late_payment_after_cleanup_revives_orders,
    late_payment_without_stock_is_refused,
    late_payment_refused_by_config,
    expiry_cleanup_releases_stock_and_cancels,
    cleanup_twice_releases_once,
    cleanup_from_two_threads_releases_once,
    cleanup_works_in_batches,
    cleanup_failure_does_not_stop_others,
    cancel_order_releases_stock,
    failed_confirmation_changes_nothing,
    ledger_records_every_kind_of_movement,
    failed_operations_write_no_movement,
    add_to_stock_moves_only_within_its_guard,
    movements_read_back_by_time_and_page,
    metrics_match_hand_computed_figures,
    cart_holds_are_set_changed_and_renewed,
    cart_hold_is_all_or_none,
    releasing_a_hold_is_exact_and_idempotent,
    expired_holds_are_released_once,
    expired_holds_cleanup_from_two_threads_releases_once,
    checkout_converts_cart_holds,
    checkout_of_an_expired_cart_holds_again_or_names_short_lines,
    hold_expiring_during_checkout_is_used_once,
    abandoned_cart_metrics,
];

/// Panics unless every stock row of `store` equals the sum of its ledger movements.
/// The harness of this crate runs it after every case.
pub fn assert_ledger_verifies(store: Arc<dyn StockStore>) {
    let report = StockService::new(store)
        .verify_ledger()
        .expect("verify ledger");
    assert!(
        report.is_consistent(),
        "ledger does not add up to the counters: {:?}",
        report.mismatches
    );
}

const PLAIN: ProductId = ProductId(1);
const SIZED: ProductId = ProductId(2);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn minutes(m: i64) -> TimeDelta {
    TimeDelta::minutes(m)
}

fn services(factory: Factory<'_>) -> (StockService, OrderService) {
    services_with(factory, OrderConfig::default())
}

fn services_with(factory: Factory<'_>, config: OrderConfig) -> (StockService, OrderService) {
    let store = factory();
    (
        StockService::new(store.clone()),
        OrderService::new(store, config),
    )
}

/// A plain product with 10 units and a sized one with S: 5, M: 3.
fn shop(stock: &StockService) {
    stock
        .create_product(NewProduct::plain(PLAIN, "Mug", 10))
        .expect("create plain product");
    stock
        .create_product(NewProduct::sized(SIZED, "Shirt", [("S", 5), ("M", 3)]))
        .expect("create sized product");
}

fn levels(stock: &StockService, product: ProductId, size: Option<&str>) -> (u64, u64, u64) {
    let info = stock.get_stock_info(product, size).expect("stock info");
    (
        info.available_quantity,
        info.reserved_quantity,
        info.sold_quantity,
    )
}

#[track_caller]
fn code<T: std::fmt::Debug>(result: Result<T, Error>) -> &'static str {
    result.expect_err("expected a refusal").code()
}

/// Products with and without sizes are created with one stock row per size (or one for
/// the product) holding the initial stock.
pub fn create_products(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    let rows = stock
        .create_product(NewProduct::sized(SIZED, "Shirt", [("S", 5), ("M", 3)]))
        .unwrap();
    assert_eq!(rows.len(), 2);
    stock
        .create_product(NewProduct::plain(PLAIN, "Mug", 10))
        .unwrap();
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
    assert_eq!(levels(&stock, SIZED, Some("S")), (5, 0, 0));
    assert_eq!(levels(&stock, SIZED, Some("M")), (3, 0, 0));
    let all = stock.get_product_stock(SIZED).unwrap();
    let sizes: Vec<_> = all.iter().map(|i| i.size.clone().unwrap()).collect();
    assert_eq!(sizes, ["M", "S"]);
    let product = stock.get_product(SIZED).unwrap();
    assert!(product.has_sizes);
    assert_eq!(product.name, "Shirt");
    assert!(!stock.get_product(PLAIN).unwrap().has_sizes);
    assert_eq!(code(stock.get_product(ProductId(99))), "PRODUCT_NOT_FOUND");
    assert_eq!(
        code(stock.get_product_stock(ProductId(99))),
        "PRODUCT_NOT_FOUND"
    );
    // A product may start with nothing in stock.
    stock
        .create_product(NewProduct::plain(ProductId(3), "Empty", 0))
        .unwrap();
    assert_eq!(levels(&stock, ProductId(3), None), (0, 0, 0));
}

/// A duplicate id, a bad name or size, a sized product without sizes or with a size
/// twice, and an initial stock over the bound are refused, and nothing is created.
pub fn create_product_refuses_bad_input(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    assert_eq!(
        code(stock.create_product(NewProduct::plain(PLAIN, "Other", 1))),
        "PRODUCT_EXISTS"
    );
    assert_eq!(
        code(stock.create_product(NewProduct::sized(SIZED, "Other", [("XL", 1)]))),
        "PRODUCT_EXISTS"
    );
    // The existing product is untouched, and no XL row appeared.
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
    assert_eq!(
        code(stock.get_stock_info(SIZED, Some("XL"))),
        "SIZE_NOT_AVAILABLE"
    );

    let id = ProductId(7);
    let cases = [
        (NewProduct::plain(id, "", 1), "INVALID_LABEL"),
        (NewProduct::plain(id, "   ", 1), "INVALID_LABEL"),
        (NewProduct::plain(id, "x".repeat(201), 1), "INVALID_LABEL"),
        (NewProduct::plain(id, "tab\there", 1), "INVALID_LABEL"),
        (NewProduct::sized(id, "Shoe", [("", 1)]), "INVALID_LABEL"),
        (
            NewProduct::sized(id, "Shoe", [("x".repeat(65), 1)]),
            "INVALID_LABEL",
        ),
        (NewProduct::sized::<&str>(id, "Shoe", []), "INVALID_INPUT"),
        (
            NewProduct::sized(id, "Shoe", [("42", 1), ("42", 2)]),
            "INVALID_INPUT",
        ),
        (
            NewProduct::plain(id, "Huge", MAX_STOCK + 1),
            "INVALID_QUANTITY",
        ),
        (
            NewProduct::sized(id, "Huge", [("L", MAX_STOCK + 1)]),
            "INVALID_QUANTITY",
        ),
    ];
    for (product, expected) in cases {
        assert_eq!(
            code(stock.create_product(product.clone())),
            expected,
            "{product:?}"
        );
    }
    assert_eq!(code(stock.get_product(id)), "PRODUCT_NOT_FOUND");
    // Unicode labels are fine.
    stock
        .create_product(NewProduct::sized(id, "Schuh «été»", [("42½", 1)]))
        .unwrap();
    assert_eq!(levels(&stock, id, Some("42½")), (1, 0, 0));
}

/// Reserving moves exactly the quantity from available to reserved.
pub fn reserve_moves_available_to_reserved(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    let info = stock.reserve_stock(PLAIN, 4, None).unwrap();
    assert_eq!(
        info.levels(),
        StockLevels {
            available: 6,
            reserved: 4,
            sold: 0
        }
    );
    stock.reserve_stock(SIZED, 3, Some("M")).unwrap();
    assert_eq!(levels(&stock, SIZED, Some("M")), (0, 3, 0));
    assert_eq!(levels(&stock, SIZED, Some("S")), (5, 0, 0));
    assert_eq!(levels(&stock, PLAIN, None), (6, 4, 0));
}

/// Reserving more than is available is refused with both numbers and changes nothing.
pub fn reserve_more_than_available_is_refused(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    stock.reserve_stock(SIZED, 2, Some("S")).unwrap();
    match stock.reserve_stock(SIZED, 4, Some("S")) {
        Err(Error::InsufficientStock {
            product_id,
            size,
            available,
            requested,
            line,
        }) => {
            assert_eq!(product_id, SIZED);
            assert_eq!(size.as_deref(), Some("S"));
            assert_eq!((available, requested, line), (3, 4, None));
        }
        other => panic!("expected INSUFFICIENT_STOCK, got {other:?}"),
    }
    assert_eq!(levels(&stock, SIZED, Some("S")), (3, 2, 0));
    // Exactly what is left can still be reserved.
    stock.reserve_stock(SIZED, 3, Some("S")).unwrap();
    assert_eq!(levels(&stock, SIZED, Some("S")), (0, 5, 0));
    assert_eq!(
        code(stock.reserve_stock(SIZED, 1, Some("S"))),
        "INSUFFICIENT_STOCK"
    );
}

/// Unreserving moves reserved units back to available.
pub fn unreserve_moves_reserved_back(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    stock.reserve_stock(PLAIN, 5, None).unwrap();
    let info = stock.unreserve_stock(PLAIN, 2, None).unwrap();
    assert_eq!(
        info.levels(),
        StockLevels {
            available: 7,
            reserved: 3,
            sold: 0
        }
    );
    let after = stock
        .unreserve_lines(&[StockLine::new(PLAIN, None, 3)])
        .unwrap();
    assert_eq!(after[0].levels(), StockLevels::with_available(10));
}

/// Unreserving more than is reserved is refused (never clamped at zero).
pub fn unreserve_more_than_reserved_is_refused(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    stock.reserve_stock(SIZED, 1, Some("M")).unwrap();
    match stock.unreserve_stock(SIZED, 2, Some("M")) {
        Err(Error::InsufficientReserved {
            reserved,
            requested,
            ..
        }) => assert_eq!((reserved, requested), (1, 2)),
        other => panic!("expected INSUFFICIENT_RESERVED, got {other:?}"),
    }
    assert_eq!(levels(&stock, SIZED, Some("M")), (2, 1, 0));
    assert_eq!(
        code(stock.unreserve_stock(PLAIN, 1, None)),
        "INSUFFICIENT_RESERVED"
    );
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
}

/// A direct sale moves available to sold and refuses more than is available.
pub fn direct_sale_moves_available_to_sold(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    stock.reserve_stock(PLAIN, 2, None).unwrap();
    let info = stock.confirm_stock_sale(PLAIN, 7, None).unwrap();
    assert_eq!(
        info.levels(),
        StockLevels {
            available: 1,
            reserved: 2,
            sold: 7
        }
    );
    match stock.confirm_stock_sale(PLAIN, 2, None) {
        Err(Error::InsufficientStock {
            available,
            requested,
            ..
        }) => assert_eq!((available, requested), (1, 2)),
        other => panic!("expected INSUFFICIENT_STOCK, got {other:?}"),
    }
    assert_eq!(levels(&stock, PLAIN, None), (1, 2, 7));
}

/// A restock adds to available; one that would pass MAX_STOCK is refused.
pub fn restock_adds_and_refuses_overflow(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    stock.reserve_stock(SIZED, 1, Some("M")).unwrap();
    let info = stock.restock(SIZED, 7, Some("M")).unwrap();
    assert_eq!(
        info.levels(),
        StockLevels {
            available: 9,
            reserved: 1,
            sold: 0
        }
    );

    let big = ProductId(9);
    stock
        .create_product(NewProduct::plain(big, "Screws", MAX_STOCK - 5))
        .unwrap();
    stock.confirm_stock_sale(big, 3, None).unwrap();
    match stock.restock(big, 6, None) {
        Err(Error::StockLimitExceeded {
            current,
            added,
            max,
            ..
        }) => assert_eq!((current, added, max), (MAX_STOCK - 5, 6, MAX_STOCK)),
        other => panic!("expected STOCK_LIMIT_EXCEEDED, got {other:?}"),
    }
    assert_eq!(levels(&stock, big, None), (MAX_STOCK - 8, 0, 3));
    stock.restock(big, 5, None).unwrap();
    assert_eq!(levels(&stock, big, None), (MAX_STOCK - 3, 0, 3));
    assert_eq!(code(stock.restock(big, 1, None)), "STOCK_LIMIT_EXCEEDED");
    assert_eq!(
        code(stock.restock(big, MAX_STOCK + 1, None)),
        "INVALID_QUANTITY"
    );
    assert_eq!(code(stock.restock(big, 0, None)), "INVALID_QUANTITY");
}

/// A product with sizes needs one of its sizes; a product without takes none; an unknown
/// product or size is named in the refusal.
pub fn size_rules_are_enforced(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    let missing = ProductId(404);
    for result in [
        stock.reserve_stock(missing, 1, None),
        stock.unreserve_stock(missing, 1, Some("S")),
        stock.confirm_stock_sale(missing, 1, None),
        stock.restock(missing, 1, None),
        stock.get_stock_info(missing, None),
    ] {
        assert!(
            matches!(result, Err(Error::ProductNotFound { product_id }) if product_id == missing)
        );
    }
    assert_eq!(code(stock.reserve_stock(SIZED, 1, None)), "SIZE_REQUIRED");
    assert_eq!(code(stock.get_stock_info(SIZED, None)), "SIZE_REQUIRED");
    match stock.reserve_stock(SIZED, 1, Some("XL")) {
        Err(Error::SizeNotAvailable { product_id, size }) => {
            assert_eq!((product_id, size.as_str()), (SIZED, "XL"));
        }
        other => panic!("expected SIZE_NOT_AVAILABLE, got {other:?}"),
    }
    assert_eq!(
        code(stock.reserve_stock(PLAIN, 1, Some("M"))),
        "SIZE_NOT_APPLICABLE"
    );
    assert_eq!(
        code(stock.restock(PLAIN, 1, Some("M"))),
        "SIZE_NOT_APPLICABLE"
    );
    for bad in ["", " ", &"L".repeat(65), "L\n"] {
        assert_eq!(
            code(stock.reserve_stock(SIZED, 1, Some(bad))),
            "INVALID_LABEL"
        );
    }
    // SQL-looking labels are just labels.
    assert_eq!(
        code(stock.reserve_stock(SIZED, 1, Some("S' OR '1'='1"))),
        "SIZE_NOT_AVAILABLE"
    );
    assert_eq!(levels(&stock, SIZED, Some("S")), (5, 0, 0));
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
}

/// Zero and over-bound quantities are refused by every operation, with the bound.
pub fn bad_quantities_are_refused(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    for q in [0, MAX_QUANTITY + 1, u64::MAX] {
        for result in [
            stock.reserve_stock(PLAIN, q, None),
            stock.unreserve_stock(PLAIN, q, None),
            stock.confirm_stock_sale(PLAIN, q, None),
        ] {
            match result {
                Err(Error::InvalidQuantity { quantity, max, .. }) => {
                    assert_eq!((quantity, max), (q, MAX_QUANTITY));
                }
                other => panic!("expected INVALID_QUANTITY for {q}, got {other:?}"),
            }
        }
        assert_eq!(
            code(stock.check_stock_availability(PLAIN, q, None)),
            "INVALID_QUANTITY"
        );
        assert_eq!(
            code(stock.reserve_lines(&[StockLine::new(PLAIN, None, q)])),
            "INVALID_QUANTITY"
        );
    }
    assert_eq!(
        code(stock.record_stock_count(PLAIN, None, MAX_STOCK + 1)),
        "INVALID_QUANTITY"
    );
    assert_eq!(code(stock.reserve_lines(&[])), "INVALID_INPUT");
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
}

/// A 10-line cart whose 7th line is short reserves nothing, and the error names that line
/// with its available and requested quantities.
pub fn cart_reserves_all_or_none(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    for i in 1..=10 {
        stock
            .create_product(NewProduct::plain(ProductId(100 + i), format!("P{i}"), 5))
            .unwrap();
    }
    let mut lines: Vec<StockLine> = (1..=10)
        .map(|i| StockLine::new(ProductId(100 + i), None, 2))
        .collect();
    lines[6].quantity = 6;
    match stock.reserve_lines(&lines) {
        Err(Error::InsufficientStock {
            product_id,
            available,
            requested,
            line,
            ..
        }) => {
            assert_eq!(product_id, ProductId(107));
            assert_eq!((available, requested, line), (5, 6, Some(6)));
        }
        other => panic!("expected INSUFFICIENT_STOCK on line 6, got {other:?}"),
    }
    for i in 1..=10 {
        assert_eq!(levels(&stock, ProductId(100 + i), None), (5, 0, 0));
    }
    // A missing product anywhere in the cart refuses it all.
    let mut with_missing = lines.clone();
    with_missing[6].quantity = 1;
    with_missing.push(StockLine::new(ProductId(999), None, 1));
    assert_eq!(
        code(stock.reserve_lines(&with_missing)),
        "PRODUCT_NOT_FOUND"
    );
    assert_eq!(levels(&stock, ProductId(101), None), (5, 0, 0));

    lines[6].quantity = 5;
    let after = stock.reserve_lines(&lines).unwrap();
    assert_eq!(after.len(), 10);
    assert_eq!(
        after[6].levels(),
        StockLevels {
            available: 0,
            reserved: 5,
            sold: 0
        }
    );
    assert_eq!(levels(&stock, ProductId(101), None), (3, 2, 0));
}

/// Lines on the same row add up: each is checked against what the lines before it left.
pub fn cart_lines_on_one_row_add_up(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    let lines = [
        StockLine::new(SIZED, Some("M"), 2),
        StockLine::new(PLAIN, None, 1),
        StockLine::new(SIZED, Some("M"), 2),
    ];
    match stock.reserve_lines(&lines) {
        Err(Error::InsufficientStock {
            available,
            requested,
            line,
            ..
        }) => assert_eq!((available, requested, line), (1, 2, Some(2))),
        other => panic!("expected INSUFFICIENT_STOCK on line 2, got {other:?}"),
    }
    assert_eq!(levels(&stock, SIZED, Some("M")), (3, 0, 0));
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
    let lines = [
        StockLine::new(SIZED, Some("M"), 2),
        StockLine::new(SIZED, Some("M"), 1),
    ];
    let after = stock.reserve_lines(&lines).unwrap();
    assert_eq!(after[0].levels(), after[1].levels());
    assert_eq!(levels(&stock, SIZED, Some("M")), (0, 3, 0));
}

/// The availability check answers with numbers and changes nothing.
pub fn availability_check_changes_nothing(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    stock.reserve_stock(SIZED, 1, Some("S")).unwrap();
    let yes = stock.check_stock_availability(SIZED, 4, Some("S")).unwrap();
    assert!(yes.available);
    assert_eq!(
        (yes.available_quantity, yes.requested_quantity, yes.reason),
        (4, 4, None)
    );
    let no = stock.check_stock_availability(SIZED, 5, Some("S")).unwrap();
    assert!(!no.available);
    assert_eq!(
        (no.available_quantity, no.requested_quantity, no.reason),
        (4, 5, Some("INSUFFICIENT_STOCK"))
    );
    assert_eq!(
        code(stock.check_stock_availability(SIZED, 1, None)),
        "SIZE_REQUIRED"
    );
    assert_eq!(levels(&stock, SIZED, Some("S")), (4, 1, 0));
}

/// A count books its difference on available; a count below the reserved units is
/// reported and not applied.
pub fn stock_count_books_the_difference(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    stock.reserve_stock(PLAIN, 4, None).unwrap();
    stock.confirm_stock_sale(PLAIN, 1, None).unwrap();
    // On the shelf the system expects available 5 + reserved 4 = 9.
    let count = stock.record_stock_count(PLAIN, None, 7).unwrap();
    assert_eq!(
        (count.expected, count.counted, count.discrepancy),
        (9, 7, -2)
    );
    assert!(count.applied);
    assert_eq!(
        count.levels,
        StockLevels {
            available: 3,
            reserved: 4,
            sold: 1
        }
    );
    assert_eq!(levels(&stock, PLAIN, None), (3, 4, 1));

    let up = stock.record_stock_count(PLAIN, None, 12).unwrap();
    assert_eq!((up.expected, up.discrepancy, up.applied), (7, 5, true));
    assert_eq!(levels(&stock, PLAIN, None), (8, 4, 1));

    let below = stock.record_stock_count(PLAIN, None, 3).unwrap();
    assert_eq!(
        (below.expected, below.discrepancy, below.applied),
        (12, -9, false)
    );
    assert_eq!(levels(&stock, PLAIN, None), (8, 4, 1));

    let exact = stock.record_stock_count(SIZED, Some("S"), 5).unwrap();
    assert_eq!((exact.discrepancy, exact.applied), (0, true));
    assert_eq!(
        code(stock.record_stock_count(SIZED, None, 5)),
        "SIZE_REQUIRED"
    );
}

/// 8 threads race to reserve one unit at a time of a product holding 100: exactly 100
/// succeed, every other call is INSUFFICIENT_STOCK (never a busy or storage error), and
/// the counters end at available 0, reserved 100.
pub fn concurrent_reservations_never_oversell(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    stock
        .create_product(NewProduct::plain(PLAIN, "Hot", 100))
        .unwrap();
    let threads = 8;
    let attempts_each = 20;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let stock = stock.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let (mut ok, mut short) = (0, 0);
                for _ in 0..attempts_each {
                    match stock.reserve_stock(PLAIN, 1, None) {
                        Ok(_) => ok += 1,
                        Err(Error::InsufficientStock { .. }) => short += 1,
                        Err(e) => panic!("unexpected error under contention: {e}"),
                    }
                }
                (ok, short)
            })
        })
        .collect();
    let (mut ok, mut short) = (0, 0);
    for h in handles {
        let (o, s) = h.join().unwrap();
        ok += o;
        short += s;
    }
    assert_eq!(ok, 100);
    assert_eq!(short, threads * attempts_each - 100);
    assert_eq!(levels(&stock, PLAIN, None), (0, 100, 0));
}

fn line(product: ProductId, size: Option<&str>, quantity: u64, price: u64) -> OrderLine {
    OrderLine::new(product, size, quantity, price)
}

/// Checkout creates one `under_paying` order per line sharing one payment that expires
/// after the payment window; the stock stays reserved.
pub fn checkout_creates_orders_awaiting_payment(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    stock.reserve_stock(PLAIN, 2, None).unwrap();
    stock.reserve_stock(SIZED, 1, Some("M")).unwrap();
    let request = crate::CheckoutRequest::new(vec![
        line(PLAIN, None, 2, 500),
        line(SIZED, Some("M"), 1, 1_999),
    ])
    .customer_ref("customer-17");
    let checkout = orders.checkout(request, t0()).unwrap();
    assert_eq!(checkout.amount, 2 * 500 + 1_999);
    assert_eq!(checkout.expires_at, t0() + minutes(15));
    assert_eq!(checkout.payment_hash.len(), 32);
    assert_eq!(checkout.payment_key.len(), 64);
    assert!(checkout.payment_key.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(checkout.orders.len(), 2);
    assert!(checkout.orders[0].id < checkout.orders[1].id);
    for (order, (product, size, quantity)) in checkout
        .orders
        .iter()
        .zip([(PLAIN, None, 2), (SIZED, Some("M"), 1)])
    {
        let stored = orders.get_order(order.id).unwrap();
        assert_eq!(&stored, order);
        assert_eq!(stored.status, OrderStatus::UnderPaying);
        assert_eq!(stored.payment_status, PaymentStatus::Pending);
        assert_eq!((stored.product_id, stored.size.as_deref()), (product, size));
        assert_eq!(stored.quantity, quantity);
        assert_eq!(stored.customer_ref.as_deref(), Some("customer-17"));
        assert_eq!(stored.created_at, t0());
        assert_eq!(stored.payment_expires_at, t0() + minutes(15));
        assert_eq!(stored.payment_hash, checkout.payment_hash);
        assert_eq!(stored.paid_at, None);
    }
    assert_eq!(
        orders.get_payment_orders(&checkout.payment_hash).unwrap(),
        checkout.orders
    );
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
    assert_eq!(levels(&stock, SIZED, Some("M")), (2, 1, 0));

    // A second checkout gets a different payment hash and key.
    stock.reserve_stock(PLAIN, 1, None).unwrap();
    let other = orders
        .checkout(vec![line(PLAIN, None, 1, 500)], t0())
        .unwrap();
    assert_ne!(other.payment_hash, checkout.payment_hash);
    assert_ne!(other.payment_key, checkout.payment_key);
    // A custom window.
    let config = OrderConfig::default().with_payment_window(minutes(5));
    let short = OrderService::new(stock.store().clone(), config);
    stock.reserve_stock(PLAIN, 1, None).unwrap();
    let quick = short.checkout(vec![line(PLAIN, None, 1, 1)], t0()).unwrap();
    assert_eq!(quick.expires_at, t0() + minutes(5));
}

/// A checkout line whose stock is not reserved is refused with the numbers and the line,
/// and nothing is created.
pub fn checkout_without_reservation_is_refused(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    stock.reserve_stock(PLAIN, 2, None).unwrap();
    stock.reserve_stock(SIZED, 1, Some("S")).unwrap();
    let lines = vec![line(PLAIN, None, 2, 100), line(SIZED, Some("S"), 2, 100)];
    match orders.checkout(lines, t0()) {
        Err(Error::InsufficientReserved {
            product_id,
            size,
            reserved,
            requested,
            line,
        }) => {
            assert_eq!((product_id, size.as_deref()), (SIZED, Some("S")));
            assert_eq!((reserved, requested, line), (1, 2, Some(1)));
        }
        other => panic!("expected INSUFFICIENT_RESERVED, got {other:?}"),
    }
    assert_eq!(code(orders.get_order(OrderId(1))), "ORDER_NOT_FOUND");
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
    assert_eq!(levels(&stock, SIZED, Some("S")), (4, 1, 0));

    assert_eq!(
        code(orders.checkout(Vec::<OrderLine>::new(), t0())),
        "INVALID_INPUT"
    );
    assert_eq!(
        code(orders.checkout(vec![line(PLAIN, None, 0, 1)], t0())),
        "INVALID_QUANTITY"
    );
    assert_eq!(
        code(orders.checkout(vec![line(PLAIN, None, 1, crate::MAX_UNIT_PRICE + 1)], t0())),
        "INVALID_INPUT"
    );
    assert_eq!(
        code(orders.checkout(vec![line(ProductId(77), None, 1, 1)], t0())),
        "PRODUCT_NOT_FOUND"
    );
    assert_eq!(
        code(orders.checkout(vec![line(SIZED, None, 1, 1)], t0())),
        "SIZE_REQUIRED"
    );
    let long_ref =
        crate::CheckoutRequest::new(vec![line(PLAIN, None, 1, 1)]).customer_ref("c".repeat(65));
    assert_eq!(code(orders.checkout(long_ref, t0())), "INVALID_LABEL");
    assert_eq!(code(orders.get_order(OrderId(1))), "ORDER_NOT_FOUND");
}

fn paid_checkout(
    stock: &StockService,
    orders: &OrderService,
    lines: Vec<OrderLine>,
) -> crate::Checkout {
    let stock_lines: Vec<StockLine> = lines
        .iter()
        .map(|l| StockLine::new(l.product_id, l.size.as_deref(), l.quantity))
        .collect();
    stock.reserve_lines(&stock_lines).unwrap();
    orders.checkout(lines, t0()).unwrap()
}

/// The seed's first integration test: confirming the payment turns the reserved units
/// into sold units, the orders become `pending` and the payment `completed`.
pub fn payment_confirmation_turns_reserved_into_sold(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let checkout = paid_checkout(
        &stock,
        &orders,
        vec![line(PLAIN, None, 3, 100), line(SIZED, Some("S"), 2, 250)],
    );
    assert_eq!(levels(&stock, SIZED, Some("S")), (3, 2, 0));
    let paid_at = t0() + minutes(5);
    let confirmed = orders
        .confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, paid_at)
        .unwrap();
    assert_eq!(confirmed.len(), 2);
    for order in &confirmed {
        assert_eq!(order.status, OrderStatus::Pending);
        assert_eq!(order.payment_status, PaymentStatus::Completed);
        assert_eq!(order.paid_at, Some(paid_at));
        assert_eq!(&orders.get_order(order.id).unwrap(), order);
    }
    assert_eq!(levels(&stock, PLAIN, None), (7, 0, 3));
    assert_eq!(levels(&stock, SIZED, Some("S")), (3, 0, 2));
    // Cleanup long after finds nothing to release.
    let report = orders.cleanup_expired_payments(t0() + minutes(60)).unwrap();
    assert_eq!((report.processed_count, report.failed_count), (0, 0));
    assert_eq!(levels(&stock, PLAIN, None), (7, 0, 3));
}

/// A wrong key gets the same PAYMENT_NOT_FOUND as an unknown hash, and changes nothing.
pub fn wrong_key_or_hash_confirms_nothing(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let checkout = paid_checkout(&stock, &orders, vec![line(PLAIN, None, 2, 100)]);
    let mut near = checkout.payment_key.clone().into_bytes();
    near[63] = if near[63] == b'0' { b'1' } else { b'0' };
    let near = String::from_utf8(near).unwrap();
    let now = t0() + minutes(1);
    let hash = checkout.payment_hash.as_str();
    for (h, k) in [
        (hash, near.as_str()),
        (hash, ""),
        (hash, &checkout.payment_key[..32]),
        (hash, &format!("{}0", checkout.payment_key)),
        ("0".repeat(32).as_str(), checkout.payment_key.as_str()),
        ("", ""),
        ("' OR 1=1 --", "' OR 1=1 --"),
        (&"f".repeat(10_000), &"f".repeat(10_000)),
    ] {
        assert!(matches!(
            orders.confirm_payment_for_orders(h, k, now),
            Err(Error::PaymentNotFound)
        ));
    }
    let order = orders.get_order(checkout.orders[0].id).unwrap();
    assert_eq!(order.status, OrderStatus::UnderPaying);
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
    assert_eq!(code(orders.get_payment_orders("nope")), "PAYMENT_NOT_FOUND");
}

/// A repeated confirmation returns the same orders and changes nothing.
pub fn repeated_confirmation_changes_nothing(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let checkout = paid_checkout(&stock, &orders, vec![line(SIZED, Some("M"), 2, 100)]);
    let first = orders
        .confirm_payment_for_orders(
            &checkout.payment_hash,
            &checkout.payment_key,
            t0() + minutes(2),
        )
        .unwrap();
    let again = orders
        .confirm_payment_for_orders(
            &checkout.payment_hash,
            &checkout.payment_key,
            t0() + minutes(9),
        )
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(again[0].paid_at, Some(t0() + minutes(2)));
    assert_eq!(levels(&stock, SIZED, Some("M")), (1, 0, 2));
}

/// A payment after the window, before cleanup ran, is confirmed from the stock still held.
pub fn late_payment_before_cleanup_is_confirmed(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let checkout = paid_checkout(&stock, &orders, vec![line(PLAIN, None, 4, 100)]);
    let late = t0() + minutes(40);
    let confirmed = orders
        .confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, late)
        .unwrap();
    assert_eq!(confirmed[0].status, OrderStatus::Pending);
    assert_eq!(confirmed[0].admin_notes, None);
    assert_eq!(levels(&stock, PLAIN, None), (6, 0, 4));
    let report = orders.cleanup_expired_payments(late + minutes(1)).unwrap();
    assert_eq!(report.processed_count, 0);
}

/// A payment after cleanup released its orders takes the stock again from available, all
/// lines, and revives the orders with a note.
pub fn late_payment_after_cleanup_revives_orders(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let checkout = paid_checkout(
        &stock,
        &orders,
        vec![line(PLAIN, None, 2, 100), line(SIZED, Some("M"), 3, 100)],
    );
    let report = orders.cleanup_expired_payments(t0() + minutes(16)).unwrap();
    assert_eq!(report.processed_count, 2);
    assert_eq!(levels(&stock, SIZED, Some("M")), (3, 0, 0));
    let late = t0() + minutes(30);
    let revived = orders
        .confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, late)
        .unwrap();
    for order in &revived {
        assert_eq!(order.status, OrderStatus::Pending);
        assert_eq!(order.payment_status, PaymentStatus::Completed);
        assert_eq!(order.paid_at, Some(late));
        let notes = order.admin_notes.as_deref().unwrap();
        assert!(notes.contains("Payment expired at"), "{notes}");
        assert!(notes.contains("Revived by a late payment"), "{notes}");
    }
    assert_eq!(levels(&stock, PLAIN, None), (8, 0, 2));
    assert_eq!(levels(&stock, SIZED, Some("M")), (0, 0, 3));
}

/// A late payment whose stock is gone is refused with each short line's numbers, and
/// nothing changes (not even the lines that could have been served).
pub fn late_payment_without_stock_is_refused(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let checkout = paid_checkout(
        &stock,
        &orders,
        vec![line(PLAIN, None, 2, 100), line(SIZED, Some("M"), 3, 100)],
    );
    orders.cleanup_expired_payments(t0() + minutes(16)).unwrap();
    // Someone else buys two of the three M shirts meanwhile.
    stock.confirm_stock_sale(SIZED, 2, Some("M")).unwrap();
    let late = t0() + minutes(30);
    match orders.confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, late) {
        Err(Error::PaymentExpired {
            payment_hash,
            expired_at,
            lines,
        }) => {
            assert_eq!(payment_hash, checkout.payment_hash);
            assert_eq!(expired_at, t0() + minutes(15));
            assert_eq!(lines.len(), 1);
            assert_eq!(lines[0].order_id, checkout.orders[1].id);
            assert_eq!(
                (lines[0].product_id, lines[0].size.as_deref()),
                (SIZED, Some("M"))
            );
            assert_eq!(
                (lines[0].available_quantity, lines[0].requested_quantity),
                (1, 3)
            );
        }
        other => panic!("expected PAYMENT_EXPIRED, got {other:?}"),
    }
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
    assert_eq!(levels(&stock, SIZED, Some("M")), (1, 0, 2));
    for order in orders.get_payment_orders(&checkout.payment_hash).unwrap() {
        assert_eq!(order.status, OrderStatus::Cancelled);
        assert_eq!(order.payment_status, PaymentStatus::Expired);
    }
}

/// With late payments switched off, every payment after the window is refused, whether
/// cleanup has run or not.
pub fn late_payment_refused_by_config(factory: Factory<'_>) {
    let config = OrderConfig::default().with_late_payments(false);
    let (stock, orders) = services_with(factory, config);
    shop(&stock);
    let checkout = paid_checkout(&stock, &orders, vec![line(PLAIN, None, 1, 100)]);
    let late = t0() + minutes(16);
    let err = orders
        .confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, late)
        .unwrap_err();
    assert!(matches!(&err, Error::PaymentExpired { lines, .. } if lines.is_empty()));
    assert_eq!(levels(&stock, PLAIN, None), (9, 1, 0));
    orders.cleanup_expired_payments(late).unwrap();
    assert_eq!(
        code(orders.confirm_payment_for_orders(
            &checkout.payment_hash,
            &checkout.payment_key,
            late
        )),
        "PAYMENT_EXPIRED"
    );
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
    // Exactly at the end of the window is still in time.
    let on_time = paid_checkout(&stock, &orders, vec![line(PLAIN, None, 1, 100)]);
    orders
        .confirm_payment_for_orders(
            &on_time.payment_hash,
            &on_time.payment_key,
            t0() + minutes(15),
        )
        .unwrap();
    assert_eq!(levels(&stock, PLAIN, None), (9, 0, 1));
}

/// The seed's second integration test: cleanup cancels orders whose window passed,
/// releases their stock, expires the payment, notes why, and leaves the others alone.
pub fn expiry_cleanup_releases_stock_and_cancels(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let old = paid_checkout(
        &stock,
        &orders,
        vec![line(PLAIN, None, 3, 100), line(SIZED, Some("S"), 1, 100)],
    );
    stock.reserve_stock(PLAIN, 2, None).unwrap();
    let fresh = orders
        .checkout(vec![line(PLAIN, None, 2, 100)], t0() + minutes(10))
        .unwrap();
    // At exactly the end of the window nothing has expired yet.
    let report = orders.cleanup_expired_payments(t0() + minutes(15)).unwrap();
    assert_eq!((report.processed_count, report.failed_count), (0, 0));

    let report = orders.cleanup_expired_payments(t0() + minutes(20)).unwrap();
    assert_eq!((report.processed_count, report.failed_count), (2, 0));
    assert!(report.errors.is_empty());
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
    assert_eq!(levels(&stock, SIZED, Some("S")), (5, 0, 0));
    for order in orders.get_payment_orders(&old.payment_hash).unwrap() {
        assert_eq!(order.status, OrderStatus::Cancelled);
        assert_eq!(order.payment_status, PaymentStatus::Expired);
        assert_eq!(
            order.admin_notes.as_deref(),
            Some("Payment expired at 2026-03-01 12:15:00 UTC. Stock unreserved automatically.")
        );
    }
    let waiting = orders.get_order(fresh.orders[0].id).unwrap();
    assert_eq!(waiting.status, OrderStatus::UnderPaying);
}

/// Running cleanup twice releases each order once; the second run finds nothing.
pub fn cleanup_twice_releases_once(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    paid_checkout(&stock, &orders, vec![line(PLAIN, None, 4, 100)]);
    let at = t0() + minutes(20);
    assert_eq!(
        orders.cleanup_expired_payments(at).unwrap().processed_count,
        1
    );
    let second = orders.cleanup_expired_payments(at + minutes(1)).unwrap();
    assert_eq!((second.processed_count, second.failed_count), (0, 0));
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
}

/// Two threads running cleanup at the same moment release each order exactly once.
pub fn cleanup_from_two_threads_releases_once(factory: Factory<'_>) {
    let config = OrderConfig::default().with_cleanup_batch_size(7);
    let (stock, orders) = services_with(factory, config);
    stock
        .create_product(NewProduct::plain(PLAIN, "Mug", 200))
        .unwrap();
    let checkouts = 60;
    for _ in 0..checkouts {
        paid_checkout(&stock, &orders, vec![line(PLAIN, None, 2, 100)]);
    }
    assert_eq!(levels(&stock, PLAIN, None), (80, 120, 0));
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let orders = orders.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                orders.cleanup_expired_payments(t0() + minutes(20)).unwrap()
            })
        })
        .collect();
    let reports: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let processed: usize = reports.iter().map(|r| r.processed_count).sum();
    let failed: usize = reports.iter().map(|r| r.failed_count).sum();
    assert_eq!((processed, failed), (checkouts, 0));
    assert_eq!(levels(&stock, PLAIN, None), (200, 0, 0));
}

/// A backlog larger than a batch is worked through completely, batch by batch.
pub fn cleanup_works_in_batches(factory: Factory<'_>) {
    let config = OrderConfig::default().with_cleanup_batch_size(3);
    let (stock, orders) = services_with(factory, config);
    shop(&stock);
    for i in 0..10 {
        stock.reserve_stock(PLAIN, 1, None).unwrap();
        orders
            .checkout(
                vec![line(PLAIN, None, 1, 100)],
                t0() + TimeDelta::seconds(i),
            )
            .unwrap();
    }
    let report = orders.cleanup_expired_payments(t0() + minutes(30)).unwrap();
    assert_eq!((report.processed_count, report.failed_count), (10, 0));
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
}

/// An order that cannot be released (its units were unreserved behind its back) is
/// reported with its id and code; the other orders are released all the same.
pub fn cleanup_failure_does_not_stop_others(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let a = paid_checkout(&stock, &orders, vec![line(SIZED, Some("S"), 2, 100)]);
    let b = paid_checkout(&stock, &orders, vec![line(SIZED, Some("M"), 2, 100)]);
    let c = paid_checkout(&stock, &orders, vec![line(PLAIN, None, 1, 100)]);
    // Drift: the M reservation is released outside the order.
    stock.unreserve_stock(SIZED, 1, Some("M")).unwrap();
    let report = orders.cleanup_expired_payments(t0() + minutes(20)).unwrap();
    assert_eq!((report.processed_count, report.failed_count), (2, 1));
    assert_eq!(report.errors[0].order_id, Some(b.orders[0].id));
    assert_eq!(report.errors[0].error_code, "INSUFFICIENT_RESERVED");
    assert_eq!(
        orders.get_order(a.orders[0].id).unwrap().status,
        OrderStatus::Cancelled
    );
    assert_eq!(
        orders.get_order(b.orders[0].id).unwrap().status,
        OrderStatus::UnderPaying
    );
    assert_eq!(
        orders.get_order(c.orders[0].id).unwrap().status,
        OrderStatus::Cancelled
    );
    assert_eq!(levels(&stock, SIZED, Some("S")), (5, 0, 0));
    assert_eq!(levels(&stock, SIZED, Some("M")), (2, 1, 0));
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
}

/// Cancelling an unpaid order releases its stock; a paid, cancelled or unknown order is
/// refused with a clear code; a payment whose orders are all cancelled cannot be
/// confirmed.
pub fn cancel_order_releases_stock(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let checkout = paid_checkout(
        &stock,
        &orders,
        vec![line(PLAIN, None, 2, 100), line(SIZED, Some("S"), 1, 100)],
    );
    let first = checkout.orders[0].id;
    let cancelled = orders.cancel_order(first, t0() + minutes(1)).unwrap();
    assert_eq!(cancelled.status, OrderStatus::Cancelled);
    assert_eq!(cancelled.payment_status, PaymentStatus::Cancelled);
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
    match orders.cancel_order(first, t0() + minutes(2)) {
        Err(Error::OrderNotCancellable { order_id, status }) => {
            assert_eq!((order_id, status), (first, OrderStatus::Cancelled));
        }
        other => panic!("expected ORDER_NOT_CANCELLABLE, got {other:?}"),
    }
    assert_eq!(
        code(orders.cancel_order(OrderId(9_999), t0())),
        "ORDER_NOT_FOUND"
    );

    // The remaining order can still be paid; the cancelled one stays cancelled.
    let paid = orders
        .confirm_payment_for_orders(
            &checkout.payment_hash,
            &checkout.payment_key,
            t0() + minutes(3),
        )
        .unwrap();
    assert_eq!(paid[0].status, OrderStatus::Cancelled);
    assert_eq!(paid[1].status, OrderStatus::Pending);
    assert_eq!(levels(&stock, SIZED, Some("S")), (4, 0, 1));
    assert_eq!(
        code(orders.cancel_order(paid[1].id, t0() + minutes(4))),
        "ORDER_NOT_CANCELLABLE"
    );
    assert_eq!(levels(&stock, SIZED, Some("S")), (4, 0, 1));

    let gone = paid_checkout(&stock, &orders, vec![line(PLAIN, None, 1, 100)]);
    orders
        .cancel_order(gone.orders[0].id, t0() + minutes(1))
        .unwrap();
    assert_eq!(
        code(orders.confirm_payment_for_orders(
            &gone.payment_hash,
            &gone.payment_key,
            t0() + minutes(2)
        )),
        "PAYMENT_CANCELLED"
    );
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
}

/// A confirmation that fails on its third order leaves the first two untouched: no
/// counter, order or payment changes.
pub fn failed_confirmation_changes_nothing(factory: Factory<'_>) {
    let (stock, orders) = services(factory);
    shop(&stock);
    let checkout = paid_checkout(
        &stock,
        &orders,
        vec![
            line(PLAIN, None, 2, 100),
            line(SIZED, Some("S"), 1, 100),
            line(SIZED, Some("M"), 2, 100),
        ],
    );
    stock.unreserve_stock(SIZED, 1, Some("M")).unwrap();
    match orders.confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, t0()) {
        Err(Error::InsufficientReserved {
            reserved,
            requested,
            ..
        }) => assert_eq!((reserved, requested), (1, 2)),
        other => panic!("expected INSUFFICIENT_RESERVED, got {other:?}"),
    }
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
    assert_eq!(levels(&stock, SIZED, Some("S")), (4, 1, 0));
    assert_eq!(levels(&stock, SIZED, Some("M")), (2, 1, 0));
    for order in orders.get_payment_orders(&checkout.payment_hash).unwrap() {
        assert_eq!(order.status, OrderStatus::UnderPaying);
        assert_eq!(order.paid_at, None);
    }
    // Once the stock is back, the same payment goes through.
    stock.reserve_stock(SIZED, 1, Some("M")).unwrap();
    orders
        .confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, t0())
        .unwrap();
    assert_eq!(levels(&stock, SIZED, Some("M")), (1, 0, 2));
}

fn clocked(factory: Factory<'_>) -> (StockService, OrderService, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(t0()));
    let store = factory();
    let stock = StockService::new(store.clone()).with_clock(clock.clone());
    let orders = OrderService::new(store, OrderConfig::default()).with_clock(clock.clone());
    (stock, orders, clock)
}

fn delta(available: i64, reserved: i64, sold: i64) -> CounterDelta {
    CounterDelta {
        available,
        reserved,
        sold,
    }
}

fn all_movements(stock: &StockService, product: ProductId) -> Vec<crate::StockMovement> {
    stock
        .movements(&MovementQuery::product(product).limit(10_000))
        .expect("movements")
}

/// Every operation writes one movement per stock row it changes, of its own kind, with
/// the exact deltas and what caused it.
pub fn ledger_records_every_kind_of_movement(factory: Factory<'_>) {
    let (stock, orders, clock) = clocked(factory);
    stock
        .create_product(NewProduct::plain(PLAIN, "Mug", 10))
        .unwrap();
    clock.advance(minutes(1));
    stock
        .with_reference("cart-1")
        .reserve_stock(PLAIN, 3, None)
        .unwrap();
    stock.unreserve_stock(PLAIN, 1, None).unwrap();
    stock.confirm_stock_sale(PLAIN, 1, None).unwrap();
    stock
        .with_reference("delivery-9")
        .restock(PLAIN, 5, None)
        .unwrap();
    // On the shelf: available 12 + reserved 2 = 14; one is missing.
    let count = stock.record_stock_count(PLAIN, None, 13).unwrap();
    assert_eq!(count.discrepancy, -1);
    // The 2 reserved units are checked out and paid.
    let paid = orders
        .checkout(vec![line(PLAIN, None, 2, 100)], t0())
        .unwrap();
    orders
        .confirm_payment_for_orders(&paid.payment_hash, &paid.payment_key, t0())
        .unwrap();
    // A checkout the customer cancels.
    stock.reserve_stock(PLAIN, 2, None).unwrap();
    let cancelled = orders
        .checkout(vec![line(PLAIN, None, 2, 100)], t0())
        .unwrap();
    orders.cancel_order(cancelled.orders[0].id, t0()).unwrap();
    // A checkout that expires, then is paid late.
    stock.reserve_stock(PLAIN, 2, None).unwrap();
    let late = orders
        .checkout(vec![line(PLAIN, None, 2, 100)], t0())
        .unwrap();
    orders.cleanup_expired_payments(t0() + minutes(20)).unwrap();
    orders
        .confirm_payment_for_orders(&late.payment_hash, &late.payment_key, t0() + minutes(21))
        .unwrap();

    let moves = all_movements(&stock, PLAIN);
    let got: Vec<(MovementKind, CounterDelta)> = moves.iter().map(|m| (m.kind, m.delta)).collect();
    use MovementKind as K;
    assert_eq!(
        got,
        [
            (K::Restock, delta(10, 0, 0)),
            (K::Reserve, delta(-3, 3, 0)),
            (K::Release, delta(1, -1, 0)),
            (K::Sale, delta(-1, 0, 1)),
            (K::Restock, delta(5, 0, 0)),
            (K::CountCorrection, delta(-1, 0, 0)),
            (K::Sale, delta(0, -2, 2)),
            (K::Reserve, delta(-2, 2, 0)),
            (K::Cancel, delta(2, -2, 0)),
            (K::Reserve, delta(-2, 2, 0)),
            (K::Expire, delta(2, -2, 0)),
            (K::LatePaymentRevival, delta(-2, 0, 2)),
        ]
    );
    assert_eq!(moves[0].at, t0());
    assert!(moves[1..].iter().all(|m| m.at == t0() + minutes(1)));
    assert!(
        moves
            .iter()
            .all(|m| m.product_id == PLAIN && m.size.is_none())
    );
    assert_eq!(moves[1].reference.as_deref(), Some("cart-1"));
    assert_eq!(moves[2].reference, None);
    assert_eq!(moves[4].reference.as_deref(), Some("delivery-9"));
    assert_eq!(moves[6].order_id, Some(paid.orders[0].id));
    assert_eq!(
        moves[6].payment_hash.as_deref(),
        Some(paid.payment_hash.as_str())
    );
    assert_eq!(moves[8].order_id, Some(cancelled.orders[0].id));
    assert_eq!(moves[10].order_id, Some(late.orders[0].id));
    assert_eq!(
        moves[11].payment_hash.as_deref(),
        Some(late.payment_hash.as_str())
    );
    assert!(moves.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(levels(&stock, PLAIN, None), (9, 0, 5));
    let report = stock.verify_ledger().unwrap();
    assert_eq!((report.rows_checked, report.mismatches.len()), (1, 0));
}

/// [`StockTx::add_to_stock`](crate::StockTx::add_to_stock) moves counters only when none
/// goes below zero and the total stays within [`MAX_STOCK`]; otherwise, and for a missing
/// row, it answers `None` and changes nothing.
pub fn add_to_stock_moves_only_within_its_guard(factory: Factory<'_>) {
    let (stock, _) = services(factory);
    shop(&stock);
    let reserve = |q: i64| delta(-q, q, 0);
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = Arc::clone(&results);
    stock
        .store()
        .write(Box::new(move |tx| {
            let seen = vec![
                tx.add_to_stock(PLAIN, None, reserve(11))?,
                tx.add_to_stock(PLAIN, None, delta(MAX_STOCK as i64, 0, 0))?,
                tx.add_to_stock(PLAIN, None, delta(0, 0, -1))?,
                tx.add_to_stock(SIZED, Some("XL"), reserve(1))?,
                tx.add_to_stock(SIZED, None, reserve(1))?,
                tx.stock(PLAIN, None)?,
                tx.add_to_stock(PLAIN, None, reserve(4))?,
                tx.add_to_stock(PLAIN, None, reserve(-4))?,
            ];
            *out.lock().unwrap() = seen;
            Ok(())
        }))
        .expect("unit");
    let l = |available, reserved, sold| {
        Some(StockLevels {
            available,
            reserved,
            sold,
        })
    };
    assert_eq!(
        *results.lock().unwrap(),
        vec![
            None,
            None,
            None,
            None,
            None,
            l(10, 0, 0),
            l(6, 4, 0),
            l(10, 0, 0)
        ]
    );
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));
    assert_eq!(levels(&stock, SIZED, Some("S")), (5, 0, 0));
}

/// A refused or failed operation writes no movement.
pub fn failed_operations_write_no_movement(factory: Factory<'_>) {
    let (stock, orders, _clock) = clocked(factory);
    shop(&stock);
    let paid = paid_checkout(&stock, &orders, vec![line(SIZED, Some("S"), 2, 100)]);
    orders
        .confirm_payment_for_orders(&paid.payment_hash, &paid.payment_key, t0())
        .unwrap();
    let count = |stock: &StockService| {
        all_movements(stock, PLAIN).len() + all_movements(stock, SIZED).len()
    };
    let before = count(&stock);
    assert_eq!(
        before,
        1 + 2 + 1 + 1,
        "initial stock of 3 rows, reserve, sale"
    );
    let failures = [
        code(stock.reserve_stock(PLAIN, 11, None)),
        code(stock.unreserve_stock(PLAIN, 1, None)),
        code(stock.confirm_stock_sale(SIZED, 9, Some("M"))),
        code(stock.reserve_lines(&[
            StockLine::new(PLAIN, None, 1),
            StockLine::new(SIZED, Some("M"), 4),
        ])),
        code(stock.restock(PLAIN, MAX_STOCK, None)),
        code(stock.with_reference("").reserve_stock(PLAIN, 1, None)),
        code(orders.checkout(vec![line(PLAIN, None, 1, 100)], t0())),
        code(orders.confirm_payment_for_orders(&paid.payment_hash, "wrong", t0())),
        code(orders.cancel_order(paid.orders[0].id, t0())),
    ];
    assert_eq!(
        failures,
        [
            "INSUFFICIENT_STOCK",
            "INSUFFICIENT_RESERVED",
            "INSUFFICIENT_STOCK",
            "INSUFFICIENT_STOCK",
            "STOCK_LIMIT_EXCEEDED",
            "INVALID_LABEL",
            "INSUFFICIENT_RESERVED",
            "PAYMENT_NOT_FOUND",
            "ORDER_NOT_CANCELLABLE",
        ]
    );
    assert_eq!(count(&stock), before);
    // A count that cannot be applied is recorded but moves nothing.
    stock.reserve_stock(PLAIN, 4, None).unwrap();
    assert!(!stock.record_stock_count(PLAIN, None, 2).unwrap().applied);
    assert_eq!(count(&stock), before + 1);
}

/// Movements read back by product and size, in a time range, oldest first, page by page.
pub fn movements_read_back_by_time_and_page(factory: Factory<'_>) {
    let (stock, _orders, clock) = clocked(factory);
    shop(&stock);
    for i in 0..5 {
        clock.advance(minutes(10));
        stock
            .reserve_stock(SIZED, 1, Some(if i % 2 == 0 { "S" } else { "M" }))
            .unwrap();
    }
    // SIZED: initial S at t0, initial M at t0, then S +10, M +20, S +30, M +40, S +50.
    let s_only = stock
        .movements(&MovementQuery::product(SIZED).size("S").limit(100))
        .unwrap();
    let times: Vec<_> = s_only.iter().map(|m| m.at).collect();
    assert_eq!(
        times,
        [
            t0(),
            t0() + minutes(10),
            t0() + minutes(30),
            t0() + minutes(50)
        ]
    );
    let window = MovementQuery::product(SIZED).between(t0() + minutes(10), t0() + minutes(40));
    let in_window = stock.movements(&window).unwrap();
    let kinds: Vec<_> = in_window
        .iter()
        .map(|m| (m.size.clone().unwrap(), m.at))
        .collect();
    assert_eq!(
        kinds,
        [
            ("S".to_owned(), t0() + minutes(10)),
            ("M".to_owned(), t0() + minutes(20)),
            ("S".to_owned(), t0() + minutes(30)),
        ]
    );
    // Pages of two, following each page's last movement, cover all seven once.
    let mut query = MovementQuery::product(SIZED).limit(2);
    let mut seen = Vec::new();
    loop {
        let page = stock.movements(&query).unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        query = query.after(last);
        seen.extend(page.into_iter().map(|m| m.id));
    }
    assert_eq!(seen.len(), 7);
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique, seen);
    assert_eq!(all_movements(&stock, PLAIN).len(), 1);
    assert_eq!(
        code(stock.movements(&MovementQuery::product(SIZED).limit(0))),
        "INVALID_INPUT"
    );
    assert!(
        stock
            .movements(&MovementQuery::product(ProductId(404)))
            .unwrap()
            .is_empty()
    );
}

/// The metrics of a scripted day match figures computed by hand.
pub fn metrics_match_hand_computed_figures(factory: Factory<'_>) {
    let (stock, orders, clock) = clocked(factory);
    shop(&stock);
    clock.advance(minutes(5));
    // PLAIN: 6 reserved in three carts of 2; one paid, one cancelled, one expired.
    let mut carts = Vec::new();
    for _ in 0..3 {
        carts.push(paid_checkout(
            &stock,
            &orders,
            vec![line(PLAIN, None, 2, 100)],
        ));
    }
    orders
        .confirm_payment_for_orders(&carts[0].payment_hash, &carts[0].payment_key, t0())
        .unwrap();
    orders.cancel_order(carts[1].orders[0].id, t0()).unwrap();
    orders.cleanup_expired_payments(t0() + minutes(20)).unwrap();
    // SIZED: 4 reserved, 1 unreserved, 3 still reserved; one direct sale of 1.
    stock.reserve_stock(SIZED, 4, Some("S")).unwrap();
    stock.unreserve_stock(SIZED, 1, Some("S")).unwrap();
    stock.confirm_stock_sale(SIZED, 1, Some("M")).unwrap();
    // Two counts: PLAIN matches (10 - 2 sold = 8 on the shelf), M is 2 short.
    assert_eq!(
        stock
            .record_stock_count(PLAIN, None, 8)
            .unwrap()
            .discrepancy,
        0
    );
    assert_eq!(
        stock
            .record_stock_count(SIZED, Some("M"), 0)
            .unwrap()
            .discrepancy,
        -2
    );
    // Something after the window does not count.
    clock.advance(minutes(120));
    stock.reserve_stock(PLAIN, 1, None).unwrap();

    let m = stock
        .metrics(t0() + minutes(1), t0() + minutes(60))
        .unwrap();
    let o = m.overall;
    assert_eq!(
        (
            o.units_reserved,
            o.units_sold,
            o.units_expired,
            o.units_released
        ),
        (10, 3, 2, 3)
    );
    assert_eq!(
        (o.units_held, o.units_hold_expired, o.abandoned_cart_rate),
        (0, 0, None)
    );
    assert_eq!(o.conversion_rate, Some(0.3));
    assert_eq!(o.expiry_rate, Some(0.2));
    assert_eq!(
        o.reserved_now, 4,
        "3 S units, and the 1 PLAIN unit reserved after the window"
    );
    assert_eq!(o.stock_accuracy.counts, 2);
    assert_eq!(o.stock_accuracy.matched, 1);
    assert_eq!(o.stock_accuracy.matched_share, Some(0.5));
    assert_eq!(o.stock_accuracy.total_abs_discrepancy, 2);

    assert_eq!(m.products.len(), 2);
    let plain = &m.products[0];
    assert_eq!(plain.product_id, PLAIN);
    let p = plain.figures;
    assert_eq!(
        (
            p.units_reserved,
            p.units_sold,
            p.units_expired,
            p.units_released,
            p.reserved_now
        ),
        (6, 2, 2, 2, 1)
    );
    assert_eq!(p.conversion_rate, Some(2.0 / 6.0));
    assert_eq!(p.stock_accuracy.matched_share, Some(1.0));
    let sized = m.products[1].figures;
    assert_eq!(
        (
            sized.units_reserved,
            sized.units_sold,
            sized.units_released,
            sized.reserved_now
        ),
        (4, 1, 1, 3)
    );
    assert_eq!(sized.expiry_rate, Some(0.0));
    assert_eq!(sized.stock_accuracy.total_abs_discrepancy, 2);

    let empty = stock
        .metrics(t0() - minutes(60), t0() - minutes(30))
        .unwrap();
    assert_eq!(
        (empty.overall.units_reserved, empty.overall.conversion_rate),
        (0, None)
    );
    assert_eq!(
        code(stock.metrics(t0(), t0() - minutes(1))),
        "INVALID_INPUT"
    );
}

fn sl(product: ProductId, size: Option<&str>, quantity: u64) -> StockLine {
    StockLine::new(product, size, quantity)
}

fn hold_kinds(stock: &StockService, product: ProductId) -> Vec<(MovementKind, CounterDelta)> {
    all_movements(stock, product)
        .into_iter()
        .filter(|m| m.kind != MovementKind::Restock)
        .map(|m| (m.kind, m.delta))
        .collect()
}

/// Holding sets each row's held quantity (more takes from available, less gives back),
/// keeps the rows not named, and renews the whole cart's expiry.
pub fn cart_holds_are_set_changed_and_renewed(factory: Factory<'_>) {
    let (stock, _orders, _clock) = clocked(factory);
    shop(&stock);
    let holds = stock
        .hold_cart("cart-1", &[sl(PLAIN, None, 3)], t0())
        .unwrap();
    assert_eq!(holds.len(), 1);
    assert_eq!(holds[0].cart_id, "cart-1");
    assert_eq!(
        (holds[0].quantity, holds[0].status),
        (3, HoldStatus::Active)
    );
    assert_eq!(holds[0].expires_at, t0() + minutes(20));
    assert_eq!(levels(&stock, PLAIN, None), (7, 3, 0));

    let later = t0() + minutes(5);
    let holds = stock
        .hold_cart(
            "cart-1",
            &[sl(SIZED, Some("M"), 2), sl(PLAIN, None, 5)],
            later,
        )
        .unwrap();
    assert_eq!(holds.len(), 2);
    assert!(holds.iter().all(|h| h.expires_at == later + minutes(20)));
    assert_eq!(levels(&stock, PLAIN, None), (5, 5, 0));
    assert_eq!(levels(&stock, SIZED, Some("M")), (1, 2, 0));

    // Only M is named: PLAIN keeps its 5, and both are renewed.
    let latest = t0() + minutes(9);
    let holds = stock
        .hold_cart("cart-1", &[sl(SIZED, Some("M"), 1)], latest)
        .unwrap();
    let quantities: Vec<_> = holds.iter().map(|h| (h.product_id, h.quantity)).collect();
    assert_eq!(quantities, [(PLAIN, 5), (SIZED, 1)]);
    assert!(holds.iter().all(|h| h.expires_at == latest + minutes(20)));
    assert_eq!(levels(&stock, SIZED, Some("M")), (2, 1, 0));
    assert_eq!(stock.get_cart("cart-1").unwrap(), holds);
    assert!(stock.get_cart("cart-2").unwrap().is_empty());

    use MovementKind as K;
    assert_eq!(
        hold_kinds(&stock, PLAIN),
        [(K::Hold, delta(-3, 3, 0)), (K::Hold, delta(-2, 2, 0))]
    );
    assert_eq!(
        hold_kinds(&stock, SIZED),
        [
            (K::Hold, delta(-2, 2, 0)),
            (K::HoldRelease, delta(1, -1, 0))
        ]
    );
    assert!(
        all_movements(&stock, SIZED)
            .iter()
            .filter(|m| m.kind != K::Restock)
            .all(|m| m.reference.as_deref() == Some("cart-1"))
    );
    let b = stock.get_reservation_breakdown(PLAIN, None).unwrap();
    assert_eq!(
        (b.held_in_carts, b.awaiting_payment, b.reserved_otherwise),
        (5, 0, 0)
    );
    stock.reserve_stock(PLAIN, 1, None).unwrap();
    let b = stock.get_reservation_breakdown(PLAIN, None).unwrap();
    assert_eq!(
        (
            b.info.reserved_quantity,
            b.held_in_carts,
            b.reserved_otherwise
        ),
        (6, 5, 1)
    );

    // A shorter hold duration.
    let quick = stock.clone().with_hold_duration(minutes(2));
    let h = quick
        .hold_cart("cart-3", &[sl(PLAIN, None, 1)], t0())
        .unwrap();
    assert_eq!(h[0].expires_at, t0() + minutes(2));
}

/// A hold is all lines or none, refused with the same errors and numbers as a
/// reservation; bad input is refused too.
pub fn cart_hold_is_all_or_none(factory: Factory<'_>) {
    let (stock, _orders, _clock) = clocked(factory);
    shop(&stock);
    stock
        .hold_cart("cart-1", &[sl(PLAIN, None, 2)], t0())
        .unwrap();
    match stock.hold_cart(
        "cart-1",
        &[sl(PLAIN, None, 4), sl(SIZED, Some("M"), 4)],
        t0() + minutes(1),
    ) {
        Err(Error::InsufficientStock {
            product_id,
            available,
            requested,
            line,
            ..
        }) => {
            assert_eq!(product_id, SIZED);
            assert_eq!((available, requested, line), (3, 4, Some(1)));
        }
        other => panic!("expected INSUFFICIENT_STOCK on line 1, got {other:?}"),
    }
    // Nothing changed: not the PLAIN hold, not its expiry.
    let holds = stock.get_cart("cart-1").unwrap();
    assert_eq!((holds.len(), holds[0].quantity), (1, 2));
    assert_eq!(holds[0].expires_at, t0() + minutes(20));
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
    assert_eq!(levels(&stock, SIZED, Some("M")), (3, 0, 0));

    let doubled = [sl(PLAIN, None, 1), sl(PLAIN, None, 1)];
    assert_eq!(
        code(stock.hold_cart("cart-1", &doubled, t0())),
        "INVALID_INPUT"
    );
    assert_eq!(
        code(stock.hold_cart("", &[sl(PLAIN, None, 1)], t0())),
        "INVALID_LABEL"
    );
    assert_eq!(
        code(stock.hold_cart(&"c".repeat(65), &[sl(PLAIN, None, 1)], t0())),
        "INVALID_LABEL"
    );
    assert_eq!(code(stock.hold_cart("cart-1", &[], t0())), "INVALID_INPUT");
    assert_eq!(
        code(stock.hold_cart("cart-1", &[sl(PLAIN, None, 0)], t0())),
        "INVALID_QUANTITY"
    );
    assert_eq!(
        code(stock.hold_cart("cart-1", &[sl(SIZED, None, 1)], t0())),
        "SIZE_REQUIRED"
    );
    assert_eq!(
        code(stock.hold_cart("cart-1", &[sl(ProductId(9), None, 1)], t0())),
        "PRODUCT_NOT_FOUND"
    );
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
}

/// Releasing a line gives back exactly its units; releasing it again, or a line never
/// held, changes nothing.
pub fn releasing_a_hold_is_exact_and_idempotent(factory: Factory<'_>) {
    let (stock, _orders, _clock) = clocked(factory);
    shop(&stock);
    stock
        .hold_cart(
            "cart-1",
            &[sl(PLAIN, None, 4), sl(SIZED, Some("S"), 2)],
            t0(),
        )
        .unwrap();
    stock
        .hold_cart("cart-2", &[sl(PLAIN, None, 1)], t0())
        .unwrap();
    let released = stock
        .release_cart_line("cart-1", PLAIN, None)
        .unwrap()
        .unwrap();
    assert_eq!(
        (released.quantity, released.status),
        (4, HoldStatus::Released)
    );
    assert_eq!(levels(&stock, PLAIN, None), (9, 1, 0));
    assert_eq!(
        stock.release_cart_line("cart-1", PLAIN, None).unwrap(),
        None
    );
    assert_eq!(
        stock.release_cart_line("cart-9", PLAIN, None).unwrap(),
        None
    );
    assert_eq!(levels(&stock, PLAIN, None), (9, 1, 0));

    let all = stock.release_cart("cart-1").unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(levels(&stock, SIZED, Some("S")), (5, 0, 0));
    assert!(stock.release_cart("cart-1").unwrap().is_empty());
    assert!(stock.get_cart("cart-1").unwrap().is_empty());
    // cart-2 untouched.
    assert_eq!(stock.get_cart("cart-2").unwrap()[0].quantity, 1);
    // The row can be held again after a release.
    stock
        .hold_cart("cart-1", &[sl(PLAIN, None, 2)], t0())
        .unwrap();
    assert_eq!(levels(&stock, PLAIN, None), (7, 3, 0));
}

/// Cleanup gives back the units of holds whose expiry passed, marks them expired, leaves
/// live holds alone, and a second run finds nothing.
pub fn expired_holds_are_released_once(factory: Factory<'_>) {
    let (stock, _orders, _clock) = clocked(factory);
    shop(&stock);
    stock
        .hold_cart("old", &[sl(PLAIN, None, 3), sl(SIZED, Some("S"), 1)], t0())
        .unwrap();
    stock
        .hold_cart("fresh", &[sl(PLAIN, None, 2)], t0() + minutes(10))
        .unwrap();
    // At exactly the expiry nothing has expired yet.
    let report = stock.cleanup_expired_holds(t0() + minutes(20)).unwrap();
    assert_eq!((report.processed_count, report.failed_count), (0, 0));
    let report = stock.cleanup_expired_holds(t0() + minutes(25)).unwrap();
    assert_eq!((report.processed_count, report.failed_count), (2, 0));
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
    assert_eq!(levels(&stock, SIZED, Some("S")), (5, 0, 0));
    assert!(stock.get_cart("old").unwrap().is_empty());
    assert_eq!(stock.get_cart("fresh").unwrap()[0].quantity, 2);
    assert_eq!(stock.release_cart_line("old", PLAIN, None).unwrap(), None);
    let again = stock.cleanup_expired_holds(t0() + minutes(26)).unwrap();
    assert_eq!(again.processed_count, 0);
    let kinds: Vec<_> = hold_kinds(&stock, SIZED)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(kinds, [MovementKind::Hold, MovementKind::HoldExpire]);
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
}

/// Two threads cleaning up the same expired holds release each exactly once.
pub fn expired_holds_cleanup_from_two_threads_releases_once(factory: Factory<'_>) {
    let (stock, _orders, _clock) = clocked(factory);
    stock
        .create_product(NewProduct::plain(PLAIN, "Mug", 1_000))
        .unwrap();
    for i in 0..700 {
        stock
            .hold_cart(&format!("cart-{i}"), &[sl(PLAIN, None, 1)], t0())
            .unwrap();
    }
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let stock = stock.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                stock.cleanup_expired_holds(t0() + minutes(30)).unwrap()
            })
        })
        .collect();
    let total: usize = handles
        .into_iter()
        .map(|h| h.join().unwrap().processed_count)
        .sum();
    assert_eq!(total, 700);
    assert_eq!(levels(&stock, PLAIN, None), (1_000, 0, 0));
}

/// A checkout with a cart turns its holds into the orders' reservations in the same
/// transaction: the counters do not move, the holds become converted, and the ledger
/// ties each conversion to its order.
pub fn checkout_converts_cart_holds(factory: Factory<'_>) {
    let (stock, orders, _clock) = clocked(factory);
    shop(&stock);
    stock
        .hold_cart(
            "cart-1",
            &[sl(PLAIN, None, 3), sl(SIZED, Some("M"), 2)],
            t0(),
        )
        .unwrap();
    let request = CheckoutRequest::new(vec![
        line(PLAIN, None, 2, 100),
        line(SIZED, Some("M"), 2, 300),
    ])
    .cart("cart-1");
    let checkout = orders.checkout(request, t0() + minutes(5)).unwrap();
    assert_eq!(levels(&stock, PLAIN, None), (7, 3, 0));
    assert_eq!(levels(&stock, SIZED, Some("M")), (1, 2, 0));
    // One PLAIN unit is still held for the cart; M is fully converted.
    let left = stock.get_cart("cart-1").unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!((left[0].product_id, left[0].quantity), (PLAIN, 1));
    let b = stock.get_reservation_breakdown(PLAIN, None).unwrap();
    assert_eq!(
        (b.held_in_carts, b.awaiting_payment, b.reserved_otherwise),
        (1, 2, 0)
    );
    let m = stock.get_reservation_breakdown(SIZED, Some("M")).unwrap();
    assert_eq!((m.held_in_carts, m.awaiting_payment), (0, 2));
    let convert = all_movements(&stock, SIZED)
        .into_iter()
        .find(|m| m.kind == MovementKind::HoldConvert)
        .unwrap();
    assert_eq!(convert.delta, CounterDelta::default());
    assert_eq!(convert.order_id, Some(checkout.orders[1].id));
    assert_eq!(convert.reference.as_deref(), Some("cart-1"));
    // Cleanup of holds does not touch converted units; payment sells them.
    let report = stock.cleanup_expired_holds(t0() + minutes(60)).unwrap();
    assert_eq!(
        report.processed_count, 1,
        "only the one PLAIN unit still held"
    );
    orders
        .confirm_payment_for_orders(
            &checkout.payment_hash,
            &checkout.payment_key,
            t0() + minutes(6),
        )
        .unwrap();
    assert_eq!(levels(&stock, PLAIN, None), (8, 0, 2));
    assert_eq!(levels(&stock, SIZED, Some("M")), (1, 0, 2));
}

/// A cart whose hold expired and was released checks out by holding again when the
/// stock is still there; when it is gone the error names the short line with numbers,
/// and nothing is created.
pub fn checkout_of_an_expired_cart_holds_again_or_names_short_lines(factory: Factory<'_>) {
    let (stock, orders, _clock) = clocked(factory);
    shop(&stock);
    stock
        .hold_cart("cart-1", &[sl(PLAIN, None, 2)], t0())
        .unwrap();
    stock
        .hold_cart("cart-2", &[sl(SIZED, Some("S"), 3)], t0())
        .unwrap();
    stock.cleanup_expired_holds(t0() + minutes(30)).unwrap();
    assert_eq!(levels(&stock, PLAIN, None), (10, 0, 0));

    let back = orders
        .checkout(
            CheckoutRequest::new(vec![line(PLAIN, None, 2, 100)]).cart("cart-1"),
            t0() + minutes(31),
        )
        .unwrap();
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
    assert_eq!(
        orders.get_order(back.orders[0].id).unwrap().status,
        OrderStatus::UnderPaying
    );

    // Meanwhile somebody bought S shirts: only 1 of the 3 is left.
    stock.confirm_stock_sale(SIZED, 4, Some("S")).unwrap();
    let request = CheckoutRequest::new(vec![
        line(PLAIN, None, 1, 100),
        line(SIZED, Some("S"), 3, 100),
    ])
    .cart("cart-2");
    match orders.checkout(request, t0() + minutes(31)) {
        Err(Error::InsufficientStock {
            product_id,
            size,
            available,
            requested,
            line,
        }) => {
            assert_eq!((product_id, size.as_deref()), (SIZED, Some("S")));
            assert_eq!((available, requested, line), (1, 3, Some(1)));
        }
        other => panic!("expected INSUFFICIENT_STOCK, got {other:?}"),
    }
    assert_eq!(levels(&stock, PLAIN, None), (8, 2, 0));
    assert_eq!(levels(&stock, SIZED, Some("S")), (1, 0, 4));
    assert_eq!(
        code(orders.get_order(OrderId(back.orders[0].id.0 + 1))),
        "ORDER_NOT_FOUND"
    );
    // A hold that expired but was not cleaned up yet still holds its units.
    stock
        .hold_cart("cart-3", &[sl(SIZED, Some("M"), 3)], t0())
        .unwrap();
    stock.confirm_stock_sale(SIZED, 3, Some("S")).unwrap_err();
    let late = orders
        .checkout(
            CheckoutRequest::new(vec![line(SIZED, Some("M"), 3, 100)]).cart("cart-3"),
            t0() + minutes(45),
        )
        .unwrap();
    assert_eq!(late.orders.len(), 1);
    assert_eq!(levels(&stock, SIZED, Some("M")), (0, 3, 0));
    assert!(stock.get_cart("cart-3").unwrap().is_empty());
    assert_eq!(
        stock
            .cleanup_expired_holds(t0() + minutes(50))
            .unwrap()
            .processed_count,
        0
    );
    assert_eq!(levels(&stock, SIZED, Some("M")), (0, 3, 0));
}

/// A hold that expires while its checkout runs is used exactly once: either the
/// checkout converts it (and cleanup finds nothing) or cleanup releases it first (and
/// the checkout takes the units again from available). Never both, never neither.
pub fn hold_expiring_during_checkout_is_used_once(factory: Factory<'_>) {
    let (stock, orders, _clock) = clocked(factory);
    stock
        .create_product(NewProduct::plain(PLAIN, "Mug", 400))
        .unwrap();
    let rounds = 40;
    for i in 0..rounds {
        let cart = format!("cart-{i}");
        stock.hold_cart(&cart, &[sl(PLAIN, None, 2)], t0()).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let checkout = {
            let orders = orders.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let request = CheckoutRequest::new(vec![line(PLAIN, None, 2, 100)]).cart(cart);
                orders.checkout(request, t0() + minutes(21)).unwrap()
            })
        };
        let cleanup = {
            let stock = stock.clone();
            thread::spawn(move || {
                barrier.wait();
                stock.cleanup_expired_holds(t0() + minutes(21)).unwrap()
            })
        };
        checkout.join().unwrap();
        let released = cleanup.join().unwrap().processed_count;
        assert!(released <= 1);
    }
    // Every round left exactly one order of 2 units reserved, whoever won.
    assert_eq!(
        levels(&stock, PLAIN, None),
        (400 - 2 * rounds, 2 * rounds, 0)
    );
    let b = stock.get_reservation_breakdown(PLAIN, None).unwrap();
    assert_eq!((b.held_in_carts, b.awaiting_payment), (0, 2 * rounds));
}

/// Metrics count held units and abandoned (expired) ones.
pub fn abandoned_cart_metrics(factory: Factory<'_>) {
    let (stock, orders, _clock) = clocked(factory);
    shop(&stock);
    stock.hold_cart("a", &[sl(PLAIN, None, 2)], t0()).unwrap();
    stock.hold_cart("b", &[sl(PLAIN, None, 3)], t0()).unwrap();
    stock
        .hold_cart("c", &[sl(SIZED, Some("S"), 1)], t0())
        .unwrap();
    orders
        .checkout(
            CheckoutRequest::new(vec![line(PLAIN, None, 2, 100)]).cart("a"),
            t0(),
        )
        .unwrap();
    stock.release_cart("c").unwrap();
    stock.cleanup_expired_holds(t0() + minutes(30)).unwrap();
    let m = stock.metrics(t0(), t0() + minutes(1)).unwrap();
    let o = m.overall;
    assert_eq!(
        (o.units_held, o.units_hold_expired, o.units_released),
        (6, 3, 1)
    );
    assert_eq!(o.abandoned_cart_rate, Some(0.5));
    assert_eq!(o.units_reserved, 6);
    assert_eq!(o.reserved_now, 2);
}

/// A store that passes everything to another store but fails the N-th storage call
/// (counting every load and write a unit makes, across units) with
/// [`Error::Storage`] — for proving that an operation interrupted anywhere leaves
/// nothing partial behind.
///
/// ```
/// use std::sync::Arc;
/// use stockroom::conformance::FailingStore;
/// use stockroom::{MemoryStore, NewProduct, ProductId, StockService};
///
/// let failing = Arc::new(FailingStore::new(Arc::new(MemoryStore::new())));
/// let stock = StockService::new(failing.clone());
/// stock.create_product(NewProduct::plain(ProductId(1), "Mug", 5))?;
/// failing.fail_at(2); // the second storage call from now on
/// assert_eq!(stock.reserve_stock(ProductId(1), 1, None).unwrap_err().code(), "STORAGE");
/// failing.disarm();
/// assert_eq!(stock.get_stock_info(ProductId(1), None)?.available_quantity, 5);
/// # Ok::<(), stockroom::Error>(())
/// ```
#[derive(Debug)]
pub struct FailingStore {
    inner: Arc<dyn StockStore>,
    state: Arc<FailState>,
}

#[derive(Debug, Default)]
struct FailState {
    calls: std::sync::atomic::AtomicU64,
    fail_at: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

impl FailState {
    /// Counts a call; the armed one fails.
    fn tick(&self, what: &str) -> crate::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.calls.fetch_add(1, SeqCst) + 1;
        if n == self.fail_at.load(SeqCst) {
            self.failed.fetch_add(1, SeqCst);
            return Err(Error::storage(
                "failing",
                format!("injected fault at storage call {n} ({what})"),
            ));
        }
        Ok(())
    }
}

impl FailingStore {
    /// Wraps `inner`; nothing fails until [`fail_at`](Self::fail_at) is called.
    pub fn new(inner: Arc<dyn StockStore>) -> Self {
        FailingStore {
            inner,
            state: Arc::new(FailState::default()),
        }
    }

    /// Fails the `n`-th storage call from now on (1 is the next one), once.
    pub fn fail_at(&self, n: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.state.calls.store(0, SeqCst);
        self.state.fail_at.store(n, SeqCst);
    }

    /// Stops failing.
    pub fn disarm(&self) {
        self.state
            .fail_at
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }

    /// Storage calls made since the last [`fail_at`](Self::fail_at).
    pub fn calls(&self) -> u64 {
        self.state.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many faults were injected so far.
    pub fn faults(&self) -> u64 {
        self.state.failed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl StockStore for FailingStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn write(&self, mut unit: crate::WriteUnit) -> crate::Result<()> {
        let state = Arc::clone(&self.state);
        self.inner.write(Box::new(move |tx| {
            unit(&mut FailingTx {
                inner: Inner::Tx(tx),
                state: &state,
            })
        }))
    }

    fn read(&self, unit: crate::ReadUnit<'_>) -> crate::Result<()> {
        let state = Arc::clone(&self.state);
        self.inner.read(&mut |tx| {
            unit(&mut FailingTx {
                inner: Inner::Read(tx),
                state: &state,
            })
        })
    }
}

enum Inner<'a> {
    Tx(&'a mut dyn crate::StockTx),
    Read(&'a mut dyn crate::StockRead),
}

struct FailingTx<'a> {
    inner: Inner<'a>,
    state: &'a FailState,
}

impl FailingTx<'_> {
    fn read(&mut self, what: &str) -> crate::Result<&mut dyn crate::StockRead> {
        self.state.tick(what)?;
        Ok(match &mut self.inner {
            Inner::Tx(tx) => &mut **tx,
            Inner::Read(r) => &mut **r,
        })
    }

    fn tx(&mut self, what: &str) -> crate::Result<&mut dyn crate::StockTx> {
        self.state.tick(what)?;
        match &mut self.inner {
            Inner::Tx(tx) => Ok(&mut **tx),
            Inner::Read(_) => Err(Error::storage("failing", "a write in a read unit")),
        }
    }
}

type R<T> = crate::Result<T>;

impl crate::StockRead for FailingTx<'_> {
    fn product(&mut self, id: ProductId) -> R<Option<crate::Product>> {
        self.read("product")?.product(id)
    }
    fn stock(&mut self, p: ProductId, s: Option<&str>) -> R<Option<StockLevels>> {
        self.read("stock")?.stock(p, s)
    }
    fn product_stock(&mut self, p: ProductId) -> R<Vec<(Option<String>, StockLevels)>> {
        self.read("product_stock")?.product_stock(p)
    }
    fn order(&mut self, id: OrderId) -> R<Option<crate::Order>> {
        self.read("order")?.order(id)
    }
    fn payment(&mut self, hash: &str) -> R<Option<crate::Payment>> {
        self.read("payment")?.payment(hash)
    }
    fn payment_orders(&mut self, hash: &str) -> R<Vec<crate::Order>> {
        self.read("payment_orders")?.payment_orders(hash)
    }
    fn expired_orders(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, OrderId)>,
        limit: usize,
    ) -> R<Vec<crate::Order>> {
        self.read("expired_orders")?
            .expired_orders(now, after, limit)
    }
    fn movements(&mut self, q: &MovementQuery) -> R<Vec<crate::StockMovement>> {
        self.read("movements")?.movements(q)
    }
    fn all_stock(&mut self) -> R<Vec<crate::StockRow>> {
        self.read("all_stock")?.all_stock()
    }
    fn ledger_balances(&mut self) -> R<Vec<crate::LedgerBalance>> {
        self.read("ledger_balances")?.ledger_balances()
    }
    fn kind_totals(&mut self, from: DateTime<Utc>, to: DateTime<Utc>) -> R<Vec<crate::KindTotal>> {
        self.read("kind_totals")?.kind_totals(from, to)
    }
    fn cart_holds(&mut self, cart: &str) -> R<Vec<crate::Hold>> {
        self.read("cart_holds")?.cart_holds(cart)
    }
    fn expired_holds(
        &mut self,
        now: DateTime<Utc>,
        after: Option<(DateTime<Utc>, crate::HoldId)>,
        limit: usize,
    ) -> R<Vec<crate::Hold>> {
        self.read("expired_holds")?.expired_holds(now, after, limit)
    }
    fn reservation_breakdown(&mut self, p: ProductId, s: Option<&str>) -> R<(u64, u64)> {
        self.read("reservation_breakdown")?
            .reservation_breakdown(p, s)
    }
    fn stock_counts(
        &mut self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> R<Vec<crate::StockCountRecord>> {
        self.read("stock_counts")?.stock_counts(from, to)
    }
}

impl crate::StockTx for FailingTx<'_> {
    fn insert_product(&mut self, p: &crate::Product) -> R<bool> {
        self.tx("insert_product")?.insert_product(p)
    }
    fn insert_stock(&mut self, p: ProductId, s: Option<&str>, l: StockLevels) -> R<bool> {
        self.tx("insert_stock")?.insert_stock(p, s, l)
    }
    fn update_stock(&mut self, p: ProductId, s: Option<&str>, l: StockLevels) -> R<()> {
        self.tx("update_stock")?.update_stock(p, s, l)
    }
    fn insert_payment(&mut self, p: &crate::Payment) -> R<()> {
        self.tx("insert_payment")?.insert_payment(p)
    }
    fn update_payment(&mut self, p: &crate::Payment) -> R<()> {
        self.tx("update_payment")?.update_payment(p)
    }
    fn insert_order(&mut self, o: &crate::NewOrder) -> R<OrderId> {
        self.tx("insert_order")?.insert_order(o)
    }
    fn update_order(&mut self, o: &crate::Order) -> R<()> {
        self.tx("update_order")?.update_order(o)
    }
    fn insert_movement(&mut self, m: &crate::NewMovement) -> R<()> {
        self.tx("insert_movement")?.insert_movement(m)
    }
    fn insert_stock_count(&mut self, c: &crate::StockCountRecord) -> R<()> {
        self.tx("insert_stock_count")?.insert_stock_count(c)
    }
    fn insert_hold(&mut self, h: &crate::NewHold) -> R<crate::HoldId> {
        self.tx("insert_hold")?.insert_hold(h)
    }
    fn update_hold(&mut self, h: &crate::Hold) -> R<()> {
        self.tx("update_hold")?.update_hold(h)
    }
}
