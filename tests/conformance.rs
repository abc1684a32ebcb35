//! The conformance suite (`stockroom::conformance`) on every backend of the crate: one
//! named test per (backend, case), so a failure names both.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use stockroom::{MemoryStore, Sharing, SqliteConfig, SqliteStore, StockStore};
#[cfg(feature = "postgres")]
use stockroom::{PostgresConfig, PostgresStore};

/// A folder for one test's database files, removed when the test ends.
struct Scratch {
    dir: tempfile::TempDir,
    next: AtomicUsize,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().expect("temporary folder"),
            next: AtomicUsize::new(0),
        }
    }

    fn file(&self) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join(format!("stock-{n}.db"))
    }
}

/// The PostgreSQL server the tests use: `.ci/run` always provides one.
#[cfg(feature = "postgres")]
fn pg_url() -> Option<String> {
    let url = std::env::var("STOCKROOM_PG_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("STOCKROOM_PG_URL is unset: skipping this PostgreSQL case");
    }
    url
}

/// A store in a schema of its own, so every case starts empty.
#[cfg(feature = "postgres")]
fn pg_store() -> PostgresStore {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let url = pg_url().expect("STOCKROOM_PG_URL");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let schema = format!(
        "t{}_{}_{}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    PostgresStore::connect(
        PostgresConfig::new(url)
            .with_schema(schema)
            .with_pool_size(10),
    )
    .expect("connect to PostgreSQL")
}

macro_rules! backend {
    ($backend:ident, $scratch:ident => $make:expr) => {
        backend!($backend, $scratch => $make, run_if = true);
    };
    ($backend:ident, $scratch:ident => $make:expr, run_if = $run:expr) => {
        mod $backend {
            use super::*;

            macro_rules! case {
                ($case:ident) => {
                    #[test]
                    fn $case() {
                        if !$run {
                            return;
                        }
                        let $scratch = Scratch::new();
                        let _ = &$scratch;
                        let made: RefCell<Vec<Arc<dyn StockStore>>> = RefCell::default();
                        let factory = || -> Arc<dyn StockStore> {
                            let store: Arc<dyn StockStore> = Arc::new($make);
                            made.borrow_mut().push(store.clone());
                            store
                        };
                        stockroom::conformance::$case(&factory);
                        // Whatever the case did, every store's counters must still be
                        // the sum of its ledger.
                        for store in made.borrow().iter() {
                            stockroom::conformance::assert_ledger_verifies(store.clone());
                        }
                    }
                };
            }

            case!(create_products);
            case!(create_product_refuses_bad_input);
            case!(reserve_moves_available_to_reserved);
            case!(reserve_more_than_available_is_refused);
            case!(unreserve_moves_reserved_back);
            case!(unreserve_more_than_reserved_is_refused);
            case!(direct_sale_moves_available_to_sold);
            case!(restock_adds_and_refuses_overflow);
            case!(size_rules_are_enforced);
            case!(bad_quantities_are_refused);
            case!(cart_reserves_all_or_none);
            case!(cart_lines_on_one_row_add_up);
            case!(availability_check_changes_nothing);
            case!(stock_count_books_the_difference);
            case!(concurrent_reservations_never_oversell);
            case!(checkout_creates_orders_awaiting_payment);
            case!(checkout_without_reservation_is_refused);
            case!(payment_confirmation_turns_reserved_into_sold);
            case!(wrong_key_or_hash_confirms_nothing);
            case!(repeated_confirmation_changes_nothing);
            case!(late_payment_before_cleanup_is_confirmed);
            case!(late_payment_after_cleanup_revives_orders);
            case!(late_payment_without_stock_is_refused);
            case!(late_payment_refused_by_config);
            case!(expiry_cleanup_releases_stock_and_cancels);
            case!(cleanup_twice_releases_once);
            case!(cleanup_from_two_threads_releases_once);
            case!(cleanup_works_in_batches);
            case!(cleanup_failure_does_not_stop_others);
            case!(cancel_order_releases_stock);
            case!(failed_confirmation_changes_nothing);
            case!(ledger_records_every_kind_of_movement);
            case!(failed_operations_write_no_movement);
            case!(add_to_stock_moves_only_within_its_guard);
            case!(movements_read_back_by_time_and_page);
            case!(metrics_match_hand_computed_figures);
            case!(cart_holds_are_set_changed_and_renewed);
            case!(cart_hold_is_all_or_none);
            case!(releasing_a_hold_is_exact_and_idempotent);
            case!(expired_holds_are_released_once);
            case!(expired_holds_cleanup_from_two_threads_releases_once);
            case!(checkout_converts_cart_holds);
            case!(checkout_of_an_expired_cart_holds_again_or_names_short_lines);
            case!(hold_expiring_during_checkout_is_used_once);
            case!(abandoned_cart_metrics);

            /// The list above and the suite's own list name the same cases.
            #[test]
            fn every_case_is_run() {
                let listed = include_str!("conformance.rs")
                    .lines()
                    .filter(|l| l.trim_start().starts_with("case!("))
                    .count();
                assert_eq!(listed, stockroom::conformance::ALL.len());
            }
        }
    };
}

backend!(memory, scratch => MemoryStore::new());
backend!(sqlite_memory, scratch => SqliteStore::open_in_memory().expect("open sqlite in memory"));
backend!(sqlite_file, scratch => SqliteStore::open(scratch.file()).expect("open sqlite file"));
// The writer indexes the ledger by product after every commit: reads go through the
// index instead of the scan of movements not indexed yet.
backend!(sqlite_indexed, scratch => SqliteStore::open_with(
    scratch.file(),
    SqliteConfig::default().with_ledger_index_batch(1),
).expect("open sqlite file"));
// The file kept to this process: SQLite's `unix-excl` VFS, the WAL index in memory.
backend!(sqlite_this_process, scratch => SqliteStore::open_with(
    scratch.file(),
    SqliteConfig::default().with_sharing(Sharing::ThisProcess),
).expect("open sqlite file"));
#[cfg(feature = "postgres")]
backend!(postgres, scratch => pg_store(), run_if = pg_url().is_some());
