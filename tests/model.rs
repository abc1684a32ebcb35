//! Model-based property tests: random sequences of operations — reserve, unreserve,
//! sell, restock, count, hold, release, checkout (with and without a cart), confirm
//! (right key, wrong key, twice, late), cancel, cleanup, and a clock that moves forward —
//! applied to a backend and to a small reference model written here. After every step
//! the results and error codes, the counters, every order's and payment's state and every
//! cart's holds match the model, and the ledger verifies. Failing sequences shrink.
//!
//! `STOCKROOM_MODEL_CASES=N` runs N cases on every backend (defaults: 256 on memory, 128
//! on SQLite in memory, 48 on a SQLite file, 32 on PostgreSQL); each case is a sequence of
//! up to 40 operations.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use stockroom::{
    Checkout, CheckoutRequest, Error, MemoryStore, NewProduct, OrderConfig, OrderLine,
    OrderService, OrderStatus, PaymentStatus, ProductId, SqliteStore, StockLine, StockService,
    StockStore,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Row {
    Mug,
    S,
    M,
}

impl Row {
    const ALL: [Row; 3] = [Row::Mug, Row::S, Row::M];

    fn product(self) -> ProductId {
        match self {
            Row::Mug => ProductId(1),
            _ => ProductId(2),
        }
    }

    fn size(self) -> Option<&'static str> {
        match self {
            Row::Mug => None,
            Row::S => Some("S"),
            Row::M => Some("M"),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone)]
enum Op {
    Reserve(Row, u64),
    Unreserve(Row, u64),
    Sell(Row, u64),
    Restock(Row, u64),
    Count(Row, u64),
    Hold(u8, Row, u64),
    ReleaseCart(u8),
    Checkout(Option<u8>, Row, u64),
    Confirm(usize, bool),
    Cancel(usize),
    Cleanup,
    Advance(i64),
}

fn row() -> impl Strategy<Value = Row> {
    prop_oneof![Just(Row::Mug), Just(Row::S), Just(Row::M)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (row(), 1..5u64).prop_map(|(r, q)| Op::Reserve(r, q)),
        1 => (row(), 1..5u64).prop_map(|(r, q)| Op::Unreserve(r, q)),
        1 => (row(), 1..4u64).prop_map(|(r, q)| Op::Sell(r, q)),
        1 => (row(), 1..6u64).prop_map(|(r, q)| Op::Restock(r, q)),
        1 => (row(), 0..14u64).prop_map(|(r, q)| Op::Count(r, q)),
        3 => (0..3u8, row(), 1..5u64).prop_map(|(c, r, q)| Op::Hold(c, r, q)),
        1 => (0..3u8).prop_map(Op::ReleaseCart),
        4 => (proptest::option::of(0..3u8), row(), 1..4u64)
            .prop_map(|(c, r, q)| Op::Checkout(c, r, q)),
        3 => (any::<usize>(), prop::bool::weighted(0.85)).prop_map(|(i, k)| Op::Confirm(i, k)),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => Just(Op::Cleanup),
        2 => (1..25i64).prop_map(Op::Advance),
    ]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Levels {
    available: u64,
    reserved: u64,
    sold: u64,
}

#[derive(Debug, Clone)]
struct MHold {
    cart: u8,
    row: Row,
    quantity: u64,
    expires: i64,
    active: bool,
}

#[derive(Debug, Clone)]
struct MOrder {
    row: Row,
    quantity: u64,
    status: OrderStatus,
    payment: PaymentStatus,
    expires: i64,
}

/// The reference model: what the library must do, written the plain way.
#[derive(Debug, Clone)]
struct Model {
    rows: [Levels; 3],
    holds: Vec<MHold>,
    orders: Vec<MOrder>,
    now: i64,
}

type Outcome = Result<(), &'static str>;

impl Model {
    fn new() -> Self {
        let l = |a| Levels {
            available: a,
            ..Levels::default()
        };
        Model {
            rows: [l(10), l(6), l(4)],
            holds: Vec::new(),
            orders: Vec::new(),
            now: 0,
        }
    }

    fn lv(&mut self, r: Row) -> &mut Levels {
        &mut self.rows[r.index()]
    }

    fn take(&mut self, r: Row, q: u64, short: &'static str) -> Outcome {
        let l = self.lv(r);
        if l.available < q {
            return Err(short);
        }
        l.available -= q;
        l.reserved += q;
        Ok(())
    }

    fn release(&mut self, r: Row, q: u64) -> Outcome {
        let l = self.lv(r);
        if l.reserved < q {
            return Err("INSUFFICIENT_RESERVED");
        }
        l.reserved -= q;
        l.available += q;
        Ok(())
    }

    fn active_hold(&self, cart: u8, r: Row) -> Option<usize> {
        self.holds
            .iter()
            .position(|h| h.active && h.cart == cart && h.row == r)
    }

    /// Applies `op`; the state changes only when the outcome is `Ok`.
    fn apply(&mut self, op: &Op) -> Outcome {
        let before = self.clone();
        let outcome = self.apply_inner(op);
        if outcome.is_err() {
            *self = before;
        }
        outcome
    }

    fn apply_inner(&mut self, op: &Op) -> Outcome {
        match *op {
            Op::Reserve(r, q) => self.take(r, q, "INSUFFICIENT_STOCK"),
            Op::Unreserve(r, q) => self.release(r, q),
            Op::Sell(r, q) => {
                let l = self.lv(r);
                if l.available < q {
                    return Err("INSUFFICIENT_STOCK");
                }
                l.available -= q;
                l.sold += q;
                Ok(())
            }
            Op::Restock(r, q) => {
                self.lv(r).available += q;
                Ok(())
            }
            Op::Count(r, counted) => {
                let l = self.lv(r);
                if counted >= l.reserved {
                    l.available = counted - l.reserved;
                }
                Ok(())
            }
            Op::Hold(cart, r, q) => {
                let at = self.active_hold(cart, r);
                let held = at.map_or(0, |i| self.holds[i].quantity);
                if q > held {
                    self.take(r, q - held, "INSUFFICIENT_STOCK")?;
                } else if q < held {
                    self.release(r, held - q)?;
                }
                match at {
                    Some(i) => self.holds[i].quantity = q,
                    None => self.holds.push(MHold {
                        cart,
                        row: r,
                        quantity: q,
                        expires: 0,
                        active: true,
                    }),
                }
                let expires = self.now + 20;
                for h in self.holds.iter_mut().filter(|h| h.active && h.cart == cart) {
                    h.expires = expires;
                }
                Ok(())
            }
            Op::ReleaseCart(cart) => {
                for i in 0..self.holds.len() {
                    let h = self.holds[i].clone();
                    if h.active && h.cart == cart {
                        self.release(h.row, h.quantity)?;
                        self.holds[i].active = false;
                    }
                }
                Ok(())
            }
            Op::Checkout(cart, r, q) => {
                match cart {
                    None => {
                        if self.rows[r.index()].reserved < q {
                            return Err("INSUFFICIENT_RESERVED");
                        }
                    }
                    Some(c) => {
                        let at = self.active_hold(c, r);
                        let held = at.map_or(0, |i| self.holds[i].quantity);
                        if held < q {
                            self.take(r, q - held, "INSUFFICIENT_STOCK")?;
                        }
                        if let Some(i) = at {
                            self.holds[i].quantity -= held.min(q);
                            if self.holds[i].quantity == 0 {
                                self.holds[i].active = false;
                            }
                        }
                    }
                }
                self.orders.push(MOrder {
                    row: r,
                    quantity: q,
                    status: OrderStatus::UnderPaying,
                    payment: PaymentStatus::Pending,
                    expires: self.now + 15,
                });
                Ok(())
            }
            Op::Confirm(i, right_key) => {
                if self.orders.is_empty() {
                    return Ok(());
                }
                let i = i % self.orders.len();
                if !right_key {
                    return Err("PAYMENT_NOT_FOUND");
                }
                let o = self.orders[i].clone();
                match o.payment {
                    PaymentStatus::Completed => return Ok(()),
                    PaymentStatus::Cancelled => return Err("PAYMENT_CANCELLED"),
                    _ => {}
                }
                match o.status {
                    OrderStatus::UnderPaying => {
                        let l = self.lv(o.row);
                        if l.reserved < o.quantity {
                            return Err("INSUFFICIENT_RESERVED");
                        }
                        l.reserved -= o.quantity;
                        l.sold += o.quantity;
                    }
                    OrderStatus::Cancelled => {
                        let l = self.lv(o.row);
                        if l.available < o.quantity {
                            return Err("PAYMENT_EXPIRED");
                        }
                        l.available -= o.quantity;
                        l.sold += o.quantity;
                    }
                    OrderStatus::Pending => unreachable!("a pending order's payment is completed"),
                }
                self.orders[i].status = OrderStatus::Pending;
                self.orders[i].payment = PaymentStatus::Completed;
                Ok(())
            }
            Op::Cancel(i) => {
                if self.orders.is_empty() {
                    return Ok(());
                }
                let i = i % self.orders.len();
                let o = self.orders[i].clone();
                if o.status != OrderStatus::UnderPaying {
                    return Err("ORDER_NOT_CANCELLABLE");
                }
                self.release(o.row, o.quantity)?;
                self.orders[i].status = OrderStatus::Cancelled;
                self.orders[i].payment = PaymentStatus::Cancelled;
                Ok(())
            }
            Op::Cleanup => {
                self.cleanup();
                Ok(())
            }
            Op::Advance(m) => {
                self.now += m;
                Ok(())
            }
        }
    }

    /// Expired payments, then expired holds, each oldest expiry first (then by id);
    /// a release that cannot be made is a failure that leaves the item as it was.
    /// Returns (released, failed) for orders and for holds.
    fn cleanup(&mut self) -> ((usize, usize), (usize, usize)) {
        let mut orders: Vec<usize> = (0..self.orders.len())
            .filter(|&i| {
                self.orders[i].status == OrderStatus::UnderPaying
                    && self.orders[i].expires < self.now
            })
            .collect();
        orders.sort_by_key(|&i| (self.orders[i].expires, i));
        let mut o = (0, 0);
        for i in orders {
            let (r, q) = (self.orders[i].row, self.orders[i].quantity);
            if self.release(r, q).is_ok() {
                self.orders[i].status = OrderStatus::Cancelled;
                self.orders[i].payment = PaymentStatus::Expired;
                o.0 += 1;
            } else {
                o.1 += 1;
            }
        }
        let mut holds: Vec<usize> = (0..self.holds.len())
            .filter(|&i| self.holds[i].active && self.holds[i].expires < self.now)
            .collect();
        holds.sort_by_key(|&i| (self.holds[i].expires, i));
        let mut h = (0, 0);
        for i in holds {
            let (r, q) = (self.holds[i].row, self.holds[i].quantity);
            if self.release(r, q).is_ok() {
                self.holds[i].active = false;
                h.0 += 1;
            } else {
                h.1 += 1;
            }
        }
        (o, h)
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 7, 1, 8, 0, 0).unwrap()
}

/// The system under test: the services on one store, and the checkouts made so far.
struct Real {
    stock: StockService,
    orders: OrderService,
    checkouts: Vec<Checkout>,
}

fn code<T>(r: Result<T, Error>) -> Outcome {
    r.map(drop).map_err(|e| e.code())
}

impl Real {
    fn new(store: Arc<dyn StockStore>) -> Self {
        let stock = StockService::new(store.clone());
        stock
            .create_product(NewProduct::plain(ProductId(1), "Mug", 10))
            .unwrap();
        stock
            .create_product(NewProduct::sized(
                ProductId(2),
                "Shirt",
                [("S", 6), ("M", 4)],
            ))
            .unwrap();
        Real {
            stock,
            orders: OrderService::new(store, OrderConfig::default()),
            checkouts: Vec::new(),
        }
    }

    fn apply(&mut self, op: &Op, model: &Model) -> Result<Outcome, TestCaseError> {
        let now = t0() + TimeDelta::minutes(model.now);
        let cart = |c: u8| format!("cart-{c}");
        Ok(match *op {
            Op::Reserve(r, q) => code(self.stock.reserve_stock(r.product(), q, r.size())),
            Op::Unreserve(r, q) => code(self.stock.unreserve_stock(r.product(), q, r.size())),
            Op::Sell(r, q) => code(self.stock.confirm_stock_sale(r.product(), q, r.size())),
            Op::Restock(r, q) => code(self.stock.restock(r.product(), q, r.size())),
            Op::Count(r, q) => code(self.stock.record_stock_count(r.product(), r.size(), q)),
            Op::Hold(c, r, q) => code(self.stock.hold_cart(
                &cart(c),
                &[StockLine::new(r.product(), r.size(), q)],
                now,
            )),
            Op::ReleaseCart(c) => code(self.stock.release_cart(&cart(c))),
            Op::Checkout(c, r, q) => {
                let mut request =
                    CheckoutRequest::new(vec![OrderLine::new(r.product(), r.size(), q, 100)]);
                if let Some(c) = c {
                    request = request.cart(cart(c));
                }
                match self.orders.checkout(request, now) {
                    Ok(checkout) => {
                        self.checkouts.push(checkout);
                        Ok(())
                    }
                    Err(e) => Err(e.code()),
                }
            }
            Op::Confirm(i, right_key) => {
                if self.checkouts.is_empty() {
                    return Ok(Ok(()));
                }
                let c = &self.checkouts[i % self.checkouts.len()];
                let key = if right_key {
                    c.payment_key.clone()
                } else {
                    let mut k = c.payment_key.clone().into_bytes();
                    k[0] = if k[0] == b'a' { b'b' } else { b'a' };
                    String::from_utf8(k).unwrap()
                };
                code(
                    self.orders
                        .confirm_payment_for_orders(&c.payment_hash, &key, now),
                )
            }
            Op::Cancel(i) => {
                if self.checkouts.is_empty() {
                    return Ok(Ok(()));
                }
                let id = self.checkouts[i % self.checkouts.len()].orders[0].id;
                code(self.orders.cancel_order(id, now))
            }
            Op::Cleanup => {
                let mut expected = model.clone();
                let ((o_ok, o_failed), (h_ok, h_failed)) = expected.cleanup();
                let payments = self.orders.cleanup_expired_payments(now).unwrap();
                let holds = self.stock.cleanup_expired_holds(now).unwrap();
                prop_assert_eq!(
                    (payments.processed_count, payments.failed_count),
                    (o_ok, o_failed),
                    "payment cleanup report"
                );
                prop_assert_eq!(
                    (holds.processed_count, holds.failed_count),
                    (h_ok, h_failed),
                    "hold cleanup report"
                );
                Ok(())
            }
            Op::Advance(_) => Ok(()),
        })
    }

    fn check(&self, model: &Model) -> Result<(), TestCaseError> {
        for r in Row::ALL {
            let info = self.stock.get_stock_info(r.product(), r.size()).unwrap();
            let m = model.rows[r.index()];
            prop_assert_eq!(
                (
                    info.available_quantity,
                    info.reserved_quantity,
                    info.sold_quantity
                ),
                (m.available, m.reserved, m.sold),
                "counters of {:?}",
                r
            );
        }
        prop_assert_eq!(self.checkouts.len(), model.orders.len());
        for (c, m) in self.checkouts.iter().zip(&model.orders) {
            let o = self.orders.get_order(c.orders[0].id).unwrap();
            prop_assert_eq!(
                (o.status, o.payment_status),
                (m.status, m.payment),
                "order {}",
                o.id
            );
        }
        for cart in 0..3u8 {
            let mut real: Vec<(ProductId, Option<String>, u64)> = self
                .stock
                .get_cart(&format!("cart-{cart}"))
                .unwrap()
                .into_iter()
                .map(|h| (h.product_id, h.size, h.quantity))
                .collect();
            let mut expected: Vec<(ProductId, Option<String>, u64)> = model
                .holds
                .iter()
                .filter(|h| h.active && h.cart == cart)
                .map(|h| (h.row.product(), h.row.size().map(str::to_owned), h.quantity))
                .collect();
            real.sort();
            expected.sort();
            prop_assert_eq!(real, expected, "holds of cart-{}", cart);
        }
        let ledger = self.stock.verify_ledger().unwrap();
        prop_assert!(ledger.is_consistent(), "ledger: {:?}", ledger.mismatches);
        Ok(())
    }
}

fn run(name: &str, default_cases: u32, make: &dyn Fn() -> Arc<dyn StockStore>) {
    let cases = std::env::var("STOCKROOM_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let steps = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let mut real = Real::new(make());
        let mut model = Model::new();
        steps.fetch_add(ops.len(), std::sync::atomic::Ordering::Relaxed);
        for (step, op) in ops.iter().enumerate() {
            let got = real.apply(op, &model)?;
            let want = model.apply(op);
            prop_assert_eq!(got, want, "step {} {:?}", step, op);
            real.check(&model)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    println!(
        "model: {name}: {cases} cases, {} operations, each checked against the model",
        steps.into_inner()
    );
}

#[test]
fn memory_matches_the_model() {
    run("memory", 256, &|| Arc::new(MemoryStore::new()));
}

#[test]
fn sqlite_in_memory_matches_the_model() {
    run("sqlite in memory", 128, &|| {
        Arc::new(SqliteStore::open_in_memory().unwrap())
    });
}

#[test]
fn sqlite_file_matches_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    run("sqlite file", 48, &|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(SqliteStore::open(dir.path().join(format!("m{i}.db"))).unwrap())
    });
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_matches_the_model() {
    let Ok(url) = std::env::var("STOCKROOM_PG_URL") else {
        eprintln!("STOCKROOM_PG_URL is unset: skipping this PostgreSQL test");
        return;
    };
    let n = std::sync::atomic::AtomicUsize::new(0);
    run("postgres", 32, &|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let schema = format!("model_{}_{i}", std::process::id());
        Arc::new(
            stockroom::PostgresStore::connect(
                stockroom::PostgresConfig::new(url.clone()).with_schema(schema),
            )
            .unwrap(),
        )
    });
}
