//! Racing for the last units on SQLite: threads of one process, and separate OS
//! processes sharing one file, hold, check out, pay (on time and late), cancel and run
//! cleanup over three hot products of 60 units each. Afterwards nothing is oversold,
//! nothing is lost, no busy or locked error reached a caller, every order was sold or
//! released exactly once, and the ledger adds up.

mod common;

use std::sync::Arc;
use std::thread;

use stockroom::{Sharing, SqliteConfig, SqliteStore, StockStore};

const CHILD_DB: &str = "STOCKROOM_TEST_CHILD_DB";

/// Six threads shopping on a store opened with `config`, then the checks.
fn threads_race(config: SqliteConfig) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn StockStore> =
        Arc::new(SqliteStore::open_with(dir.path().join("race.db"), config).unwrap());
    common::stock_up(store.clone());
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let store = store.clone();
            thread::spawn(move || common::shop(store, 500 + i, 60, &format!("t{i}")))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // The threads' orders are every order of the file: ids 1..=n.
    let orders = stockroom::OrderService::new(store.clone(), Default::default());
    let ids: Vec<i64> = (1..)
        .take_while(|id| orders.get_order(stockroom::OrderId(*id)).is_ok())
        .collect();
    println!("race: 6 threads, {} orders", ids.len());
    common::verify_after_race(store, &ids);
}

#[test]
fn threads_racing_on_one_file_never_oversell() {
    threads_race(SqliteConfig::default());
}

/// The same with the file kept to this process: the writer, the read pool and the
/// checkpointer lock each other through the WAL index in memory alone.
#[test]
fn threads_racing_on_a_file_kept_to_their_process_never_oversell() {
    threads_race(SqliteConfig::default().with_sharing(Sharing::ThisProcess));
}

/// Not a test of its own: the body of each child process of
/// `processes_racing_on_one_file_never_oversell`.
#[test]
#[ignore = "runs only as a child process of processes_racing_on_one_file_never_oversell"]
fn child_shopper() {
    let path = std::env::var(CHILD_DB).expect("child without a database");
    let seed: u64 = std::env::var("STOCKROOM_TEST_CHILD_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let store: Arc<dyn StockStore> = Arc::new(SqliteStore::open(&path).unwrap());
    common::shop(store, seed, 60, "p");
}

#[test]
fn processes_racing_on_one_file_never_oversell() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.db");
    let store: Arc<dyn StockStore> = Arc::new(SqliteStore::open(&path).unwrap());
    common::stock_up(store.clone());
    let ids = common::run_children(
        "child_shopper",
        4,
        &[(CHILD_DB, path.to_string_lossy().into_owned())],
    );
    println!("race: 4 processes on one SQLite file, {} orders", ids.len());
    common::verify_after_race(store, &ids);
}
