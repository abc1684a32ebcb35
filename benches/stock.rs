//! Criterion benchmarks: the library's operations on MemoryStore and on SQLite (FULL and
//! NORMAL, the file shared between processes or kept to this one), and the floor — the
//! same reservation done by hand with bare rusqlite, one transaction each — measured in
//! the same run.
//!
//! `cargo bench --bench stock`; `cargo bench --bench stock -- reserve` for a subset.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, TimeZone, Utc};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use rusqlite::Connection;

#[path = "../examples/support/floor.rs"]
mod floor;
use stockroom::{
    CheckoutRequest, Durability, MAX_STOCK, MemoryStore, NewProduct, OrderConfig, OrderLine,
    OrderService, ProductId, Sharing, SqliteConfig, SqliteStore, StockLine, StockService,
    StockStore,
};

const PRODUCTS: i64 = 1_000;

struct Backend {
    name: &'static str,
    make: fn(&std::path::Path) -> Arc<dyn StockStore>,
}

fn sqlite(dir: &std::path::Path, durability: Durability, sharing: Sharing) -> Arc<dyn StockStore> {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Arc::new(
        SqliteStore::open_with(
            dir.join(format!("bench-{n}.db")),
            SqliteConfig::default()
                .with_durability(durability)
                .with_sharing(sharing),
        )
        .unwrap(),
    )
}

const BACKENDS: [Backend; 5] = [
    Backend {
        name: "memory",
        make: |_| Arc::new(MemoryStore::new()),
    },
    Backend {
        name: "sqlite_normal",
        make: |d| sqlite(d, Durability::Normal, Sharing::Processes),
    },
    Backend {
        name: "sqlite_full",
        make: |d| sqlite(d, Durability::Full, Sharing::Processes),
    },
    // The file kept to the process: no file locks per transaction.
    Backend {
        name: "sqlite_normal_this_process",
        make: |d| sqlite(d, Durability::Normal, Sharing::ThisProcess),
    },
    Backend {
        name: "sqlite_full_this_process",
        make: |d| sqlite(d, Durability::Full, Sharing::ThisProcess),
    },
];

fn shop(store: Arc<dyn StockStore>) -> StockService {
    let stock = StockService::new(store);
    for p in 1..=PRODUCTS {
        stock
            .create_product(NewProduct::plain(ProductId(p), "P", MAX_STOCK / 2))
            .unwrap();
    }
    stock
}

/// A small deterministic sequence of product ids.
struct Ids(u64);

impl Ids {
    fn next(&mut self) -> i64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        1 + ((self.0 >> 33) % PRODUCTS as u64) as i64
    }
}

/// The floor: bare rusqlite, the same reservation SQL shape, one transaction each.
fn floor(c: &mut Criterion, dir: &std::path::Path) {
    let mut group = c.benchmark_group("floor");
    for (name, sync) in [("sqlite_normal", "NORMAL"), ("sqlite_full", "FULL")] {
        let conn = Connection::open(dir.join(format!("floor-{name}.db"))).unwrap();
        floor::create(&conn, sync, PRODUCTS, 1_000_000_000_000).unwrap();
        let mut ids = Ids(7);
        group.bench_function(format!("reserve_random_row/{name}"), |b| {
            b.iter(|| assert_eq!(floor::reserve(&conn, ids.next()).unwrap(), 1))
        });
    }
    group.finish();
}

fn stock_ops(c: &mut Criterion, dir: &std::path::Path) {
    for backend in BACKENDS {
        let mut group = c.benchmark_group(backend.name);
        let stock = shop((backend.make)(dir));
        group.bench_function("reserve_one_row", |b| {
            b.iter(|| stock.reserve_stock(ProductId(1), 1, None).unwrap())
        });
        let mut ids = Ids(7);
        group.bench_function("reserve_random_row", |b| {
            b.iter(|| stock.reserve_stock(ProductId(ids.next()), 1, None).unwrap())
        });
        group.bench_function("reserve_then_unreserve", |b| {
            b.iter(|| {
                let p = ProductId(ids.next());
                stock.reserve_stock(p, 1, None).unwrap();
                stock.unreserve_stock(p, 1, None).unwrap();
            })
        });
        group.bench_function("cart_of_10_lines", |b| {
            b.iter(|| {
                let lines: Vec<StockLine> = (0..10)
                    .map(|_| StockLine::new(ProductId(ids.next()), None, 1))
                    .collect();
                stock.reserve_lines(&lines).unwrap()
            })
        });
        let orders = OrderService::new(stock.store().clone(), OrderConfig::default());
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
        group.bench_function("checkout_and_confirm_3_lines", |b| {
            b.iter(|| {
                let lines: Vec<OrderLine> = (0..3)
                    .map(|_| OrderLine::new(ProductId(ids.next()), None, 1, 100))
                    .collect();
                let holds: Vec<StockLine> = lines
                    .iter()
                    .map(|l| StockLine::new(l.product_id, None, 1))
                    .collect();
                stock.reserve_lines(&holds).unwrap();
                let checkout = orders.checkout(lines, now).unwrap();
                orders
                    .confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, now)
                    .unwrap()
            })
        });
        group.bench_function("get_stock_info", |b| {
            b.iter(|| stock.get_stock_info(ProductId(ids.next()), None).unwrap())
        });
        group.finish();
    }
}

/// Cleanup of 10,000 expired orders, among 10,000 and among 1,000,000 orders. The
/// orders are created through the library in a few large carts (fast: one transaction
/// each); every iteration gets a fresh copy of the database file, and only the cleanup
/// is timed (not the copy, nor closing the store afterwards).
fn cleanup(c: &mut Criterion, dir: &std::path::Path) {
    let mut group = c.benchmark_group("cleanup_10k_expired");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    let now = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    for total in [10_000u64, 1_000_000] {
        let path = dir.join(format!("cleanup-{total}.db"));
        {
            let store: Arc<dyn StockStore> = Arc::new(
                SqliteStore::open_with(
                    &path,
                    SqliteConfig::default().with_durability(Durability::Normal),
                )
                .unwrap(),
            );
            let stock = shop(store.clone());
            let orders = OrderService::new(store, OrderConfig::default());
            // The 10,000 that will have expired are checked out first, an hour early;
            // the rest are fresh.
            let mut made = 0u64;
            let mut cart = 0u64;
            while made < total {
                let expired = made < 10_000;
                let at = if expired {
                    now - TimeDelta::hours(1)
                } else {
                    now
                };
                let lines: Vec<OrderLine> = (0..500)
                    .map(|i| {
                        OrderLine::new(
                            ProductId(1 + ((made + i) % PRODUCTS as u64) as i64),
                            None,
                            1,
                            100,
                        )
                    })
                    .collect();
                let holds: Vec<StockLine> = lines
                    .iter()
                    .map(|l| StockLine::new(l.product_id, None, 1))
                    .collect();
                let id = format!("c{cart}");
                stock.hold_cart(&id, &holds, at).unwrap();
                orders
                    .checkout(CheckoutRequest::new(lines).cart(id), at)
                    .unwrap();
                made += 500;
                cart += 1;
            }
        }
        let label = if total == 10_000 {
            "among_10k"
        } else {
            "among_1m"
        };
        group.bench_function(label, |b| {
            // `iter_batched_ref`: the store is closed after the timing. Closing it
            // checkpoints whatever its WAL still holds into the database file, work
            // the store's background checkpointer does off the callers' path while it
            // runs; timing it here measured the close, not the cleanup.
            b.iter_batched_ref(
                || {
                    let copy = dir.join(format!("cleanup-{total}-run.db"));
                    let _ = std::fs::remove_file(copy.with_extension("db-wal"));
                    std::fs::copy(&path, &copy).unwrap();
                    // Flush the copy now: otherwise the kernel writes its pages back
                    // (500 MB among 1M orders) while the cleanup runs, and that is what
                    // gets measured.
                    std::fs::File::open(&copy).unwrap().sync_all().unwrap();
                    let store: Arc<dyn StockStore> = Arc::new(
                        SqliteStore::open_with(
                            &copy,
                            SqliteConfig::default().with_durability(Durability::Normal),
                        )
                        .unwrap(),
                    );
                    OrderService::new(store, OrderConfig::default())
                },
                |orders| {
                    let report = orders.cleanup_expired_payments(now).unwrap();
                    assert_eq!(report.processed_count, 10_000);
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    floor(c, dir.path());
    stock_ops(c, dir.path());
    cleanup(c, dir.path());
}

criterion_group! {
    name = all;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(all);
