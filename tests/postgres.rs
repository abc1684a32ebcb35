//! What only the PostgreSQL backend promises: several instances (pools, processes)
//! sharing one database, concurrent first starts migrating once, a newer schema refused.
//!
//! Needs `STOCKROOM_PG_URL` (`.ci/run` starts a server and sets it); without it each test
//! prints a notice and returns.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use chrono::{TimeDelta, TimeZone, Utc};
use stockroom::{
    Error, NewProduct, OrderConfig, OrderLine, OrderService, PostgresConfig, PostgresStore,
    ProductId, StockService, StockStore,
};

fn pg_url() -> Option<String> {
    let url = std::env::var("STOCKROOM_PG_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("STOCKROOM_PG_URL is unset: skipping this PostgreSQL test");
    }
    url
}

fn fresh_schema() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "p{}_{}_{}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn connect(url: &str, schema: &str) -> PostgresStore {
    PostgresStore::connect(
        PostgresConfig::new(url)
            .with_schema(schema)
            .with_pool_size(6),
    )
    .expect("connect to PostgreSQL")
}

fn admin(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("admin connection")
}

#[test]
fn instances_starting_together_migrate_once() {
    let Some(url) = pg_url() else { return };
    let schema = fresh_schema();
    let barrier = Arc::new(Barrier::new(6));
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let (url, schema, barrier) = (url.clone(), schema.clone(), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                let stock = StockService::new(Arc::new(connect(&url, &schema)));
                stock
                    .create_product(NewProduct::plain(ProductId(i), "P", 3))
                    .unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut client = admin(&url);
    let version: i64 = client
        .query_one(
            &format!("SELECT version FROM {schema}.stockroom_schema"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, 3);
    let products: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.products"), &[])
        .unwrap()
        .get(0);
    assert_eq!(products, 6);
}

#[test]
fn a_database_from_a_newer_version_is_refused() {
    let Some(url) = pg_url() else { return };
    let schema = fresh_schema();
    drop(connect(&url, &schema));
    admin(&url)
        .execute(
            &format!("UPDATE {schema}.stockroom_schema SET version = 99"),
            &[],
        )
        .unwrap();
    match PostgresStore::connect(PostgresConfig::new(&url).with_schema(&schema)) {
        Err(Error::SchemaTooNew { found, supported }) => assert_eq!((found, supported), (99, 3)),
        other => panic!("expected SCHEMA_TOO_NEW, got {other:?}"),
    }
}

#[test]
fn bad_settings_are_storage_errors() {
    let Some(url) = pg_url() else { return };
    let bad_schema = PostgresStore::connect(PostgresConfig::new(&url).with_schema("x; DROP"));
    assert_eq!(bad_schema.unwrap_err().code(), "STORAGE");
    let bad_url = PostgresStore::connect(
        PostgresConfig::new("postgres://nobody@127.0.0.1:1/x")
            .with_connect_timeout(std::time::Duration::from_millis(500)),
    );
    assert_eq!(bad_url.unwrap_err().code(), "STORAGE");
}

#[test]
fn the_ledger_is_append_only_and_verify_catches_edits() {
    let Some(url) = pg_url() else { return };
    let schema = fresh_schema();
    let stock = StockService::new(Arc::new(connect(&url, &schema)));
    stock
        .create_product(NewProduct::plain(ProductId(1), "Mug", 10))
        .unwrap();
    stock.reserve_stock(ProductId(1), 4, None).unwrap();
    let mut client = admin(&url);
    let err = client
        .execute(&format!("DELETE FROM {schema}.stock_movements"), &[])
        .unwrap_err();
    assert!(err.to_string().contains("append-only") || format!("{err:?}").contains("append-only"));
    assert!(stock.verify_ledger().unwrap().is_consistent());
    client
        .execute(
            &format!("UPDATE {schema}.stock SET reserved = 0, available = 14"),
            &[],
        )
        .unwrap();
    let report = stock.verify_ledger().unwrap();
    assert_eq!(report.mismatches.len(), 1);
    assert_eq!(report.mismatches[0].counters.available, 14);
    assert_eq!(report.mismatches[0].ledger.available, 6);
}

#[test]
fn two_instances_cleaning_up_at_once_release_each_order_once() {
    let Some(url) = pg_url() else { return };
    let schema = fresh_schema();
    let a: Arc<dyn StockStore> = Arc::new(connect(&url, &schema));
    let b: Arc<dyn StockStore> = Arc::new(connect(&url, &schema));
    let stock = StockService::new(a.clone());
    stock
        .create_product(NewProduct::plain(ProductId(1), "Mug", 500))
        .unwrap();
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    let config = OrderConfig::default().with_cleanup_batch_size(25);
    let orders_a = OrderService::new(a, config.clone());
    for _ in 0..200 {
        stock.reserve_stock(ProductId(1), 2, None).unwrap();
        orders_a
            .checkout(vec![OrderLine::new(ProductId(1), None, 2, 100)], t0)
            .unwrap();
    }
    let orders_b = OrderService::new(b, config);
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = [orders_a, orders_b]
        .into_iter()
        .map(|orders| {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                orders
                    .cleanup_expired_payments(t0 + TimeDelta::minutes(20))
                    .unwrap()
            })
        })
        .collect();
    let reports: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let processed: usize = reports.iter().map(|r| r.processed_count).sum();
    assert_eq!(processed, 200);
    assert!(reports.iter().all(|r| r.failed_count == 0));
    let info = stock.get_stock_info(ProductId(1), None).unwrap();
    assert_eq!(
        (
            info.available_quantity,
            info.reserved_quantity,
            info.sold_quantity
        ),
        (500, 0, 0)
    );
    assert!(stock.verify_ledger().unwrap().is_consistent());
}

const CHILD_SCHEMA: &str = "STOCKROOM_TEST_CHILD_PG_SCHEMA";

/// Not a test of its own: the body of each child process of
/// `processes_racing_for_hot_products_never_oversell`, which runs this binary again with
/// `--ignored --exact` and the schema in the environment. Each child has its own pool.
#[test]
#[ignore = "runs only as a child process of processes_racing_for_hot_products_never_oversell"]
fn child_shopper() {
    let url = std::env::var("STOCKROOM_PG_URL").expect("child without a database URL");
    let schema = std::env::var(CHILD_SCHEMA).expect("child without a schema");
    let seed: u64 = std::env::var("STOCKROOM_TEST_CHILD_SEED")
        .unwrap()
        .parse()
        .unwrap();
    common::shop(Arc::new(connect(&url, &schema)), seed, 60, &schema);
}

#[test]
fn processes_racing_for_hot_products_never_oversell() {
    let Some(url) = pg_url() else { return };
    let schema = fresh_schema();
    let store: Arc<dyn StockStore> = Arc::new(connect(&url, &schema));
    common::stock_up(store.clone());
    let ids = common::run_children("child_shopper", 4, &[(CHILD_SCHEMA, schema)]);
    println!("race: 4 processes on PostgreSQL, {} orders", ids.len());
    common::verify_after_race(store, &ids);
}
