//! What only the SQLite backend promises: files that persist and migrate, the schema as a
//! safety net, WAL, and several processes sharing one file (or one keeping it to itself).

use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;

use rusqlite::Connection;
use stockroom::{
    CounterDelta, Durability, Error, MovementKind, NewMovement, NewProduct, ProductId, Sharing,
    SqliteConfig, SqliteStore, StockService, StockStore, WriterStats,
};

const MUG: ProductId = ProductId(1);

fn service(store: SqliteStore) -> StockService {
    StockService::new(Arc::new(store))
}

/// `threads` threads each reserving one mug `each` times, every reservation accepted.
fn reserve_one_at_a_time(stock: &StockService, threads: usize, each: usize) {
    thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for _ in 0..each {
                    stock.reserve_stock(MUG, 1, None).unwrap();
                }
            });
        }
    });
}

/// A store on the file `name` in `dir`, under `Durability::Normal`.
fn normal_store(dir: &std::path::Path, name: &str) -> Arc<SqliteStore> {
    let normal = SqliteConfig::default().with_durability(Durability::Normal);
    Arc::new(SqliteStore::open_with(dir.join(name), normal).unwrap())
}

/// Asserts that the writer ran exactly `units` units since `before`, in fewer
/// transactions: callers shared commits.
fn assert_shared_commits(store: &SqliteStore, before: WriterStats, units: u64) {
    let stats = store.writer_stats();
    assert_eq!(stats.units - before.units, units);
    assert!(
        stats.transactions - before.transactions < units,
        "no commit was shared: {stats:?}"
    );
}

/// A movement of the product-wide row of `product`, now, changing available and
/// reserved by `(available, reserved)`.
fn movement(
    product: ProductId,
    kind: MovementKind,
    (available, reserved): (i64, i64),
    reference: Option<String>,
) -> NewMovement {
    NewMovement {
        at: chrono::Utc::now(),
        product_id: product,
        size: None,
        kind,
        delta: CounterDelta {
            available,
            reserved,
            sold: 0,
        },
        order_id: None,
        payment_hash: None,
        reference,
    }
}

/// The size of the WAL of the file `name` in `dir`.
fn wal_bytes(dir: &std::path::Path, name: &str) -> u64 {
    std::fs::metadata(dir.join(format!("{name}-wal")))
        .unwrap()
        .len()
}

fn levels(stock: &StockService) -> (u64, u64, u64) {
    counters(stock.get_stock_info(MUG, None).unwrap())
}

/// A row's counters: available, reserved, sold.
fn counters(i: stockroom::StockInfo) -> (u64, u64, u64) {
    (i.available_quantity, i.reserved_quantity, i.sold_quantity)
}

#[test]
fn a_file_keeps_its_stock_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    {
        let stock = service(SqliteStore::open(&path).unwrap());
        stock
            .create_product(NewProduct::plain(MUG, "Mug", 10))
            .unwrap();
        stock.reserve_stock(MUG, 3, None).unwrap();
        stock.confirm_stock_sale(MUG, 2, None).unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.path(), Some(path.as_path()));
    let stock = service(store);
    assert_eq!(levels(&stock), (5, 3, 2));
}

#[test]
fn a_new_file_is_migrated_to_the_latest_schema_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 7);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tables,
        [
            "cart_holds",
            "ledger_indexed",
            "ledger_packs",
            "orders",
            "payments",
            "products",
            "stock",
            "stock_counts",
            "stock_movements"
        ]
    );
}

#[test]
fn a_database_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    drop(SqliteStore::open(&path).unwrap());
    Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    match SqliteStore::open(&path) {
        Err(Error::SchemaTooNew { found, supported }) => assert_eq!((found, supported), (99, 7)),
        other => panic!("expected SCHEMA_TOO_NEW, got {other:?}"),
    }
}

#[test]
fn an_unopenable_path_is_a_storage_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = SqliteStore::open(dir.path().join("no/such/folder/stock.db")).unwrap_err();
    assert_eq!(err.code(), "STORAGE");
    assert!(std::error::Error::source(&err).is_some());
    assert!(!err.is_refusal());
}

#[test]
fn the_schema_refuses_negative_counters_written_behind_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    let stock = service(SqliteStore::open(&path).unwrap());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 1))
        .unwrap();
    let conn = Connection::open(&path).unwrap();
    let err = conn
        .execute("UPDATE stock SET reserved = -1 WHERE product_id = 1", [])
        .unwrap_err();
    assert!(err.to_string().contains("CHECK constraint failed"), "{err}");
    conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
    let err = conn
        .execute("INSERT INTO stock VALUES (99, '', 1, 0, 0)", [])
        .unwrap_err();
    assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
    assert_eq!(levels(&stock), (1, 0, 0));
}

#[test]
fn in_memory_stores_are_shared_by_their_pool_and_private_to_each_store() {
    let a = SqliteStore::open_in_memory().unwrap();
    assert_eq!(a.path(), None);
    let b = SqliteStore::open_in_memory().unwrap();
    let stock_a = service(a);
    let stock_b = service(b);
    stock_a
        .create_product(NewProduct::plain(MUG, "Mug", 4))
        .unwrap();
    // Written by the writer connection, read back through the pool from many threads.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let s = stock_a.clone();
            thread::spawn(move || levels(&s))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), (4, 0, 0));
    }
    assert_eq!(
        stock_b.get_stock_info(MUG, None).unwrap_err().code(),
        "PRODUCT_NOT_FOUND"
    );
}

#[test]
fn normal_durability_is_kept_in_the_config() {
    let store = SqliteStore::open_in_memory_with(
        SqliteConfig::default()
            .with_durability(Durability::Normal)
            .with_read_pool_size(2),
    )
    .unwrap();
    assert_eq!(store.config().durability, Durability::Normal);
    assert_eq!(store.config().read_pool_size, 2);
    assert_eq!(store.backend(), "sqlite");
    assert_eq!(SqliteConfig::default().durability, Durability::Full);
}

#[test]
fn threads_opening_a_new_file_at_once_migrate_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    let barrier = Arc::new(Barrier::new(6));
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let path = path.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let stock = service(SqliteStore::open(&path).unwrap());
                stock
                    .create_product(NewProduct::plain(ProductId(i), "P", 1))
                    .unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let stock = service(SqliteStore::open(&path).unwrap());
    for i in 0..6 {
        assert_eq!(
            stock
                .get_stock_info(ProductId(i), None)
                .unwrap()
                .available_quantity,
            1
        );
    }
}

const CHILD_DB: &str = "STOCKROOM_TEST_CHILD_DB";

/// Not a test of its own: the body of each child process of
/// `processes_sharing_one_file_never_oversell`, which runs this binary again with
/// `--ignored --exact` and the database path in the environment.
#[test]
#[ignore = "runs only as a child process of processes_sharing_one_file_never_oversell"]
fn child_reserver() {
    let path = std::env::var(CHILD_DB).expect("child started without a database path");
    let stock = service(SqliteStore::open(&path).unwrap());
    let (mut ok, mut short) = (0, 0);
    for _ in 0..40 {
        match stock.reserve_stock(MUG, 1, None) {
            Ok(_) => ok += 1,
            Err(Error::InsufficientStock { .. }) => short += 1,
            Err(e) => panic!("unexpected error across processes: {e}"),
        }
    }
    println!("CHILD-RESULT ok={ok} short={short}");
}

#[test]
fn processes_sharing_one_file_never_oversell() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    service(SqliteStore::open(&path).unwrap())
        .create_product(NewProduct::plain(MUG, "Mug", 100))
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    // All four start before any is waited for, so they really race.
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "child_reserver",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_DB, &path)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start child process")
        })
        .collect();
    let (mut ok, mut short) = (0, 0);
    for child in children {
        let out = child.wait_with_output().expect("wait for child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("CHILD-RESULT ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("child printed no result: {stdout}"));
        for part in line.split_whitespace() {
            let (k, v) = part.split_once('=').unwrap();
            let v: u32 = v.parse().unwrap();
            match k {
                "ok" => ok += v,
                "short" => short += v,
                _ => panic!("unknown field {k}"),
            }
        }
    }
    assert_eq!((ok, short), (100, 60));
    let stock = service(SqliteStore::open(&path).unwrap());
    assert_eq!(levels(&stock), (0, 100, 0));
}

const CHILD_SHARING: &str = "STOCKROOM_TEST_CHILD_SHARING";

/// Not a test of its own: the body of the child processes of
/// `a_store_that_keeps_its_file_shuts_other_processes_out_until_it_closes`. It opens the
/// file in the environment as a store (with the sharing the environment names) and as a
/// bare SQLite connection, each waiting at most 200 ms for locks, and prints what each
/// found.
#[test]
#[ignore = "runs only as a child process of the sharing tests"]
fn child_opener() {
    let path = std::env::var(CHILD_DB).expect("child started without a database path");
    let sharing = match std::env::var(CHILD_SHARING).as_deref() {
        Ok("this-process") => Sharing::ThisProcess,
        _ => Sharing::Processes,
    };
    let config = SqliteConfig::default()
        .with_sharing(sharing)
        .with_busy_timeout(std::time::Duration::from_millis(200));
    match SqliteStore::open_with(&path, config) {
        Ok(store) => match service(store).get_stock_info(MUG, None) {
            Ok(info) => println!("CHILD-STORE ok available={}", info.available_quantity),
            Err(e) => println!("CHILD-STORE err {e}"),
        },
        Err(e) => println!("CHILD-STORE err {e}"),
    }
    let raw = Connection::open(&path).unwrap();
    raw.busy_timeout(std::time::Duration::from_millis(200))
        .unwrap();
    match raw.query_row("SELECT count(*) FROM stock", [], |r| r.get::<_, i64>(0)) {
        Ok(n) => println!("CHILD-RAW ok rows={n}"),
        Err(e) => println!("CHILD-RAW err {e}"),
    }
}

/// Runs `child_opener` on `path` with `sharing` ("processes" or "this-process"); its two
/// result lines.
fn open_from_another_process(path: &std::path::Path, sharing: &str) -> (String, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_opener",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, path)
        .env(CHILD_SHARING, sharing)
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |tag: &str| {
        stdout
            .lines()
            .find_map(|l| l.split_once(tag).map(|(_, r)| r.to_string()))
            .unwrap_or_else(|| panic!("child printed no {tag}: {stdout}"))
    };
    (line("CHILD-STORE "), line("CHILD-RAW "))
}

#[test]
fn a_store_that_keeps_its_file_shuts_other_processes_out_until_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.db");
    let mine = SqliteConfig::default().with_sharing(Sharing::ThisProcess);
    let stock = service(SqliteStore::open_with(&path, mine.clone()).unwrap());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 10))
        .unwrap();
    stock.reserve_stock(MUG, 3, None).unwrap();
    // A read on the pool, and a second store of this process on the same file, whose
    // connections must keep the process's lock rather than give it up.
    assert_eq!(levels(&stock), (7, 3, 0));
    let second = service(SqliteStore::open_with(&path, mine).unwrap());
    assert_eq!(
        counters(second.reserve_stock(MUG, 1, None).unwrap()),
        (6, 4, 0)
    );
    assert_eq!(levels(&stock), (6, 4, 0));
    drop(second);

    let (store, raw) = open_from_another_process(&path, "processes");
    assert!(
        store.starts_with("err ") && store.contains("stayed locked by another process"),
        "{store}"
    );
    assert_eq!(raw, "err database is locked");

    drop(stock);
    let (store, raw) = open_from_another_process(&path, "processes");
    assert_eq!(store, "ok available=6");
    assert_eq!(raw, "ok rows=1");
}

/// The store's read pool opens the file by a URI that names SQLite's `unix-excl` VFS:
/// any file name must reach it unchanged.
#[test]
fn a_store_keeping_its_file_reads_it_under_any_name() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("a b?c#d%41 é&vfs=unix");
    std::fs::create_dir(&odd).unwrap();
    let path = odd.join("stock %2F.db");
    let mine = SqliteConfig::default().with_sharing(Sharing::ThisProcess);
    let stock = service(SqliteStore::open_with(&path, mine).unwrap());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 4))
        .unwrap();
    stock.reserve_stock(MUG, 1, None).unwrap();
    assert_eq!(levels(&stock), (3, 1, 0));
    drop(stock);
    let names: Vec<_> = std::fs::read_dir(&odd)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["stock %2F.db"]);
}

#[test]
fn a_store_cannot_keep_a_file_that_another_process_has_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let stock = service(SqliteStore::open(&path).unwrap());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 10))
        .unwrap();
    let (store, raw) = open_from_another_process(&path, "this-process");
    assert!(
        store.starts_with("err ") && store.contains("is open in another process"),
        "{store}"
    );
    // The bare connection shares the file with this process as SQLite always does.
    assert_eq!(raw, "ok rows=1");
    // Once this process lets go, the other keeps the file, and sees what was written.
    drop(stock);
    let (store, _) = open_from_another_process(&path, "this-process");
    assert_eq!(store, "ok available=10");
}

/// The writer keeps copies of the stock rows it writes, to skip reading them back: a
/// write by anyone else between two of its transactions must still be seen. Here two
/// stores (two writers) and a bare connection take turns on one file, and each
/// reservation answers with the counters it left.
#[test]
fn writes_by_other_connections_between_two_reservations_are_seen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turns.db");
    let a = service(SqliteStore::open(&path).unwrap());
    let b = service(SqliteStore::open(&path).unwrap());
    a.create_product(NewProduct::plain(MUG, "Mug", 10)).unwrap();
    assert_eq!(counters(a.reserve_stock(MUG, 1, None).unwrap()), (9, 1, 0));
    assert_eq!(counters(b.reserve_stock(MUG, 2, None).unwrap()), (7, 3, 0));
    assert_eq!(counters(a.reserve_stock(MUG, 1, None).unwrap()), (6, 4, 0));
    assert_eq!(counters(b.restock(MUG, 5, None).unwrap()), (11, 4, 0));
    assert_eq!(counters(a.reserve_stock(MUG, 1, None).unwrap()), (10, 5, 0));
    // Behind the library: the ledger no longer explains this, but no write may undo it.
    let raw = Connection::open(&path).unwrap();
    raw.execute("UPDATE stock SET available = 2 WHERE product_id = 1", [])
        .unwrap();
    assert_eq!(counters(a.reserve_stock(MUG, 1, None).unwrap()), (1, 6, 0));
    match a.reserve_stock(MUG, 2, None) {
        Err(Error::InsufficientStock { available: 1, .. }) => {}
        other => panic!("expected a refusal with 1 available: {other:?}"),
    }
    assert_eq!(counters(b.reserve_stock(MUG, 1, None).unwrap()), (0, 7, 0));
    assert_eq!(levels(&a), (0, 7, 0));
}

#[test]
fn verify_ledger_catches_a_counter_changed_behind_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    let stock = service(SqliteStore::open(&path).unwrap());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 10))
        .unwrap();
    stock
        .create_product(NewProduct::sized(ProductId(2), "Shirt", [("M", 3)]))
        .unwrap();
    stock.reserve_stock(MUG, 4, None).unwrap();
    let clean = stock.verify_ledger().unwrap();
    assert_eq!((clean.rows_checked, clean.mismatches.len()), (2, 0));
    assert!(clean.is_consistent());

    // A "repair job" edits the file directly.
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE stock SET reserved = 0, available = 14 WHERE product_id = 1",
            [],
        )
        .unwrap();
    let report = stock.verify_ledger().unwrap();
    assert_eq!(report.rows_checked, 2);
    assert_eq!(report.mismatches.len(), 1);
    let m = &report.mismatches[0];
    assert_eq!((m.product_id, m.size.as_deref()), (MUG, None));
    assert_eq!(
        (m.counters.available, m.counters.reserved, m.counters.sold),
        (14, 0, 0)
    );
    assert_eq!(
        (m.ledger.available, m.ledger.reserved, m.ledger.sold),
        (6, 4, 0)
    );
}

#[test]
fn the_ledger_is_append_only_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    let stock = service(SqliteStore::open(&path).unwrap());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 10))
        .unwrap();
    let conn = Connection::open(&path).unwrap();
    for sql in [
        "UPDATE stock_movements SET available_delta = 99",
        "DELETE FROM stock_movements",
    ] {
        let err = conn.execute(sql, []).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert!(stock.verify_ledger().unwrap().is_consistent());
}

#[test]
fn an_older_database_is_migrated_step_by_step_keeping_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    {
        let stock = service(SqliteStore::open(&path).unwrap());
        stock
            .create_product(NewProduct::plain(MUG, "Mug", 10))
            .unwrap();
    }
    // Turn the file back into what version 1 wrote: no ledger, no counts, no holds.
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "DROP TABLE cart_holds; DROP INDEX orders_awaiting_by_row;
             DROP TABLE stock_counts; DROP TABLE stock_movements;
             DROP TABLE ledger_packs; DROP TABLE ledger_indexed;
             PRAGMA user_version = 1;",
        )
        .unwrap();
    let stock = service(SqliteStore::open(&path).unwrap());
    let version: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 7);
    assert_eq!(levels(&stock), (10, 0, 0));
    // The ledger starts from an opening balance, so it adds up from the first day.
    let opening = stock
        .movements(&stockroom::MovementQuery::product(MUG))
        .unwrap();
    assert_eq!(opening.len(), 1);
    assert_eq!(opening[0].reference.as_deref(), Some("opening balance"));
    assert_eq!(opening[0].delta.available, 10);
    assert!(stock.verify_ledger().unwrap().is_consistent());
    stock
        .hold_cart(
            "cart",
            &[stockroom::StockLine::new(MUG, None, 2)],
            chrono::Utc::now(),
        )
        .unwrap();
    assert_eq!(levels(&stock), (8, 2, 0));
    assert!(stock.verify_ledger().unwrap().is_consistent());
}

#[test]
fn concurrent_writers_share_commits_and_refusals_stay_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("stock.db")).unwrap());
    let stock = StockService::new(store.clone());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 600))
        .unwrap();
    let before = store.writer_stats();
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (stock, barrier) = (stock.clone(), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                let (mut ok, mut short) = (0, 0);
                for _ in 0..50 {
                    match stock.reserve_stock(MUG, 1, None) {
                        Ok(_) => ok += 1,
                        Err(Error::InsufficientStock { .. }) => short += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                (ok, short)
            })
        })
        .collect();
    let (ok, short) = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    // Refused reservations ran in the same groups as accepted ones and failed alone.
    assert_eq!((ok, short), (600, 200));
    assert_eq!(levels(&stock), (0, 600, 0));
    assert_shared_commits(&store, before, 800);
    assert!(store.writer_stats().largest_group > 1);
    assert!(stock.verify_ledger().unwrap().is_consistent());
}

#[test]
fn a_panicking_unit_fails_only_its_own_caller() {
    let store: Arc<dyn StockStore> = Arc::new(SqliteStore::open_in_memory().unwrap());
    let stock = StockService::new(store.clone());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 10))
        .unwrap();
    let panicking = {
        let store = store.clone();
        thread::spawn(move || {
            store.write(Box::new(|tx| {
                tx.update_stock(MUG, None, stockroom::StockLevels::with_available(999))?;
                panic!("a unit that panics halfway");
            }))
        })
    };
    assert!(
        panicking.join().is_err(),
        "the panic reaches its own caller"
    );
    stock.reserve_stock(MUG, 2, None).unwrap();
    assert_eq!(
        levels(&stock),
        (8, 2, 0),
        "the panicking unit's write was rolled back"
    );
}

/// In a shared transaction the writer holds back a stock row's writes, and the ledger's
/// inserts, until a statement could tell: units that write their row twice with a
/// movement each and then query the product's rows and the ledger's sums read their own
/// last counters, and every write is kept exactly once, in order.
#[test]
fn queries_after_writes_held_back_read_the_last_counters() {
    let dir = tempfile::tempdir().unwrap();
    let store = normal_store(dir.path(), "held.db");
    let stock = StockService::new(store.clone());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 10_000))
        .unwrap();
    let before = store.writer_stats();
    thread::scope(|scope| {
        for t in 0..8 {
            let store = store.clone();
            scope.spawn(move || {
                for i in 0..100 {
                    store
                        .write(Box::new(move |tx| {
                            let mut row = tx.stock(MUG, None)?.expect("the mug's row");
                            for k in 0..2 {
                                row.available -= 1;
                                row.reserved += 1;
                                tx.update_stock(MUG, None, row)?;
                                tx.insert_movement(&movement(
                                    MUG,
                                    MovementKind::Reserve,
                                    (-1, 1),
                                    Some(format!("{t} {i} {k}")),
                                ))?;
                            }
                            let listed = tx.product_stock(MUG)?;
                            let summed = tx.ledger_balances()?;
                            let sums = CounterDelta {
                                available: row.available as i64,
                                reserved: row.reserved as i64,
                                sold: 0,
                            };
                            if listed != vec![(None, row)] || summed != vec![(MUG, None, sums)] {
                                return Err(Error::InvalidInput {
                                    reason: format!(
                                        "wrote {row:?}, listed {listed:?}, summed {summed:?}"
                                    ),
                                });
                            }
                            Ok(())
                        }))
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(levels(&stock), (8_400, 1_600, 0));
    let ledger = stock.verify_ledger().unwrap();
    assert!(ledger.is_consistent(), "{ledger:?}");
    // Each thread's movements have ids in the order its units wrote them.
    let conn = Connection::open(dir.path().join("held.db")).unwrap();
    let mut statement = conn
        .prepare("SELECT reference FROM stock_movements WHERE reference IS NOT NULL ORDER BY id")
        .unwrap();
    let mut last = [None; 8];
    let mut count = 0;
    for reference in statement.query_map([], |r| r.get::<_, String>(0)).unwrap() {
        let n: Vec<usize> = reference
            .unwrap()
            .split(' ')
            .map(|x| x.parse().unwrap())
            .collect();
        let written = Some((n[1], n[2]));
        assert!(
            last[n[0]] < written,
            "thread {}: {:?} after {:?}",
            n[0],
            written,
            last[n[0]]
        );
        last[n[0]] = written;
        count += 1;
    }
    assert_eq!(count, 1_600);
    // Shared commits: the writes were held back.
    assert_shared_commits(&store, before, 800);
}

/// A unit whose ledger movement the foreign key refuses (its stock row does not exist)
/// fails alone, also in a transaction whose other units' movements are held back: the
/// writer holds back only movements of rows it knows exist, so no refusal waits for the
/// commit, where it would fail every unit of the transaction.
#[test]
fn a_movement_of_a_missing_row_fails_only_its_own_unit_in_shared_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = normal_store(dir.path(), "missing.db");
    let stock = StockService::new(store.clone());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 10_000))
        .unwrap();
    let before = store.writer_stats();
    let refused: usize = thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (store, stock) = (store.clone(), &stock);
                scope.spawn(move || {
                    let mut refused = 0;
                    for i in 0..100 {
                        if i % 4 != 3 {
                            stock.reserve_stock(MUG, 1, None).unwrap();
                            continue;
                        }
                        let e = store
                            .write(Box::new(|tx| {
                                tx.insert_movement(&movement(
                                    ProductId(999),
                                    MovementKind::Restock,
                                    (1, 0),
                                    None,
                                ))
                            }))
                            .unwrap_err();
                        assert!(e.to_string().contains("FOREIGN KEY"), "{e}");
                        refused += 1;
                    }
                    refused
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(refused, 200);
    assert_eq!(levels(&stock), (9_400, 600, 0));
    assert!(stock.verify_ledger().unwrap().is_consistent());
    assert_shared_commits(&store, before, 800);
}

#[test]
fn under_normal_durability_the_wal_is_checkpointed_off_the_writers_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    let stock = StockService::new(normal_store(dir.path(), "stock.db"));
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 5_000))
        .unwrap();
    for _ in 0..2_000 {
        stock.reserve_stock(MUG, 1, None).unwrap();
    }
    let grown = wal_bytes(dir.path(), "stock.db");
    assert!(grown > 1_000_000, "2000 commits wrote {grown} bytes of WAL");
    // The checkpointer runs every 250 ms; once it has copied everything, the next
    // commit starts the WAL over from its beginning.
    thread::sleep(std::time::Duration::from_millis(800));
    stock.reserve_stock(MUG, 1, None).unwrap();
    let mut conn = Connection::open(&path).unwrap();
    let frames: i64 = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
        .unwrap();
    assert!(frames < 20, "the WAL was not restarted: {frames} frames");
    let _ = &mut conn;
    assert_eq!(levels(&stock), (2_999, 2_001, 0));
}

/// A crowd of callers that write again as soon as they return (each carrying a stale
/// wake-up from its previous write) never makes two leaders run one group: the
/// leader claims its units under the queue lock.
#[test]
fn a_crowd_of_repeat_writers_never_runs_a_group_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = normal_store(dir.path(), "crowd.db");
    let stock = StockService::new(store.clone());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 1_000_000))
        .unwrap();
    reserve_one_at_a_time(&stock, 16, 1_500);
    assert_eq!(levels(&stock), (976_000, 24_000, 0));
    assert_eq!(store.writer_stats().units, 24_001);
}

/// The same crowd under FULL, where a leader also waits for the callers the last sync
/// answered: every reservation is kept exactly once, and the callers share syncs.
#[test]
fn a_crowd_of_repeat_writers_under_full_durability_shares_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("crowd.db")).unwrap());
    let stock = StockService::new(store.clone());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 10_000))
        .unwrap();
    let before = store.writer_stats();
    reserve_one_at_a_time(&stock, 8, 250);
    assert_eq!(levels(&stock), (8_000, 2_000, 0));
    let stats = store.writer_stats();
    assert_eq!(stats.units - before.units, 2_000);
    assert!(
        stats.syncs - before.syncs < 2_000,
        "no sync was shared: {stats:?}"
    );
    assert!(stock.verify_ledger().unwrap().is_consistent());
}

/// Under a stream of writes with no pause, the WAL is still started over regularly: a
/// checkpoint running beside the writes never catches up by itself, so the leader
/// checkpoints between two transactions every 10,000 commits or once the WAL holds
/// 40 MiB of frames (under NORMAL). Without that, these 100,000 reservations leave about
/// 121 MiB of WAL; with it, the WAL stays under SQLite's 64 MiB journal size limit.
/// Four threads reserving 100,000 units under NORMAL on a store opened with `sharing`:
/// the WAL ends under 64 MiB (it would reach hundreds without its restarts).
fn wal_stays_bounded(sharing: Sharing) {
    let dir = tempfile::tempdir().unwrap();
    let config = SqliteConfig::default()
        .with_durability(Durability::Normal)
        .with_sharing(sharing);
    let store = SqliteStore::open_with(dir.path().join("stream.db"), config).unwrap();
    let stock = StockService::new(Arc::new(store));
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 1_000_000))
        .unwrap();
    reserve_one_at_a_time(&stock, 4, 25_000);
    let wal = wal_bytes(dir.path(), "stream.db");
    assert!(wal < 64 * 1024 * 1024, "the WAL grew to {wal} bytes");
    assert_eq!(levels(&stock), (900_000, 100_000, 0));
}

#[test]
fn under_a_stream_of_writes_the_wal_stays_bounded() {
    wal_stays_bounded(Sharing::Processes);
}

/// The same with the WAL index in the process's memory: the checkpoints and the
/// writer's restarts lock the readers out through it alone.
#[test]
fn under_a_stream_of_writes_the_wal_of_a_file_kept_to_the_process_stays_bounded() {
    wal_stays_bounded(Sharing::ThisProcess);
}

/// Under NORMAL the writer's restart of the WAL is prepared: from 7,500 commits on (three
/// quarters of the 10,000-commit bound) the background thread checkpoints in rounds
/// back to back, and the writer starts the WAL over as soon as they are done, well before
/// the bound, with little left to sync and copy itself. The WAL header's checkpoint
/// sequence number counts the restarts. A single caller pauses a millisecond between
/// commits past 7,500, so that the rounds end before the bound on a slow machine too.
#[test]
fn under_normal_durability_the_wal_restarts_once_the_background_thread_has_prepared_it() {
    let dir = tempfile::tempdir().unwrap();
    let stock = StockService::new(normal_store(dir.path(), "prepared.db"));
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 100_000))
        .unwrap();
    let wal = dir.path().join("prepared.db-wal");
    let sequence = || {
        let mut header = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open(&wal).unwrap(), &mut header).unwrap();
        u32::from_be_bytes(header[12..16].try_into().unwrap())
    };
    let first = sequence();
    let mut restarted_at = None;
    for commit in 2..=10_000u64 {
        stock.reserve_stock(MUG, 1, None).unwrap();
        if commit > 7_500 {
            if sequence() != first {
                restarted_at = Some(commit);
                break;
            }
            thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    let at = restarted_at.expect("the WAL was not started over before 10,000 commits");
    assert!(at < 10_000, "restarted at commit {at}, the bound itself");
    assert!(stock.verify_ledger().unwrap().is_consistent());
}

/// Commits that each carry many pages reach the WAL's size bound long before its commit
/// bound: the writer learns the WAL's size from SQLite's WAL hook after every commit and
/// starts it over at 40 MiB (under NORMAL). 1,200 carts of 50 lines spread over 1,000
/// products write about 100 pages a commit: with the size bound the WAL peaks at 40–62
/// MiB (it grows until the background checkpointer's round ends), without it (no WAL
/// hook) it reaches 118 MiB.
#[test]
fn a_wal_of_large_commits_is_bounded_by_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let stock = StockService::new(normal_store(dir.path(), "carts.db"));
    for p in 1..=1_000 {
        stock
            .create_product(NewProduct::plain(ProductId(p), "P", 1_000))
            .unwrap();
    }
    for cart in 0..1_200i64 {
        let first = cart * 37;
        let lines: Vec<stockroom::StockLine> = (0..50)
            .map(|i| stockroom::StockLine::new(ProductId(1 + (first + 20 * i) % 1_000), None, 1))
            .collect();
        stock.reserve_lines(&lines).unwrap();
    }
    let wal = wal_bytes(dir.path(), "carts.db");
    assert!(wal < 64 * 1024 * 1024, "the WAL grew to {wal} bytes");
    let reserved: u64 = (1..=1_000)
        .map(|p| {
            stock
                .get_stock_info(ProductId(p), None)
                .unwrap()
                .reserved_quantity
        })
        .sum();
    assert_eq!(reserved, 60_000);
}

/// Units that fail after they have written, in groups with units that succeed: each
/// failure is undone alone (the group is rolled back and its other units run again),
/// every success is kept exactly once, and a unit that fails before writing costs its
/// neighbours nothing.
#[test]
fn units_failing_after_a_write_are_undone_alone_in_shared_commits() {
    failing_units_in_shared_commits(Durability::Full);
}

/// The same under NORMAL, where a leader also takes in units that queue while it yields
/// before committing.
#[test]
fn units_failing_after_a_write_are_undone_alone_under_normal_durability() {
    failing_units_in_shared_commits(Durability::Normal);
}

fn failing_units_in_shared_commits(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open_with(
            dir.path().join("undo.db"),
            SqliteConfig::default().with_durability(durability),
        )
        .unwrap(),
    );
    let stock = StockService::new(store.clone());
    stock
        .create_product(NewProduct::plain(MUG, "Mug", 0))
        .unwrap();
    let before = store.writer_stats();
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let (store, barrier) = (store.clone(), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                let mut kept = 0u64;
                for i in 0..150u64 {
                    // Every third unit of the odd threads adds 1000 and then fails; every
                    // fifth of the even threads fails before writing; the rest add 1.
                    let fail_after = t % 2 == 1 && i % 3 == 0;
                    let fail_before = t % 2 == 0 && i % 5 == 0;
                    let result = store.write(Box::new(move |tx| {
                        if fail_before {
                            return Err(Error::InvalidInput {
                                reason: "before".into(),
                            });
                        }
                        let mut row = tx.stock(MUG, None)?.expect("the mug's row");
                        row.available += if fail_after { 1_000 } else { 1 };
                        tx.update_stock(MUG, None, row)?;
                        if fail_after {
                            return Err(Error::InvalidInput {
                                reason: "after".into(),
                            });
                        }
                        Ok(())
                    }));
                    match (result, fail_after || fail_before) {
                        (Ok(()), false) => kept += 1,
                        (Err(Error::InvalidInput { reason }), true) => {
                            assert_eq!(reason, if fail_after { "after" } else { "before" })
                        }
                        (other, expected_failure) => {
                            panic!("unit {i} of thread {t}: {other:?} (failure expected: {expected_failure})")
                        }
                    }
                }
                kept
            })
        })
        .collect();
    let kept: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    // Odd threads: 150 - 50 failing after writing; even threads: 150 - 30 before.
    assert_eq!(kept, 4 * 100 + 4 * 120);
    assert_eq!(levels(&stock), (880, 0, 0));
    assert_shared_commits(&store, before, 1_200);
}

/// Version 4 rebuilt the ledger table with a cheaper kind check: a version-3 file keeps
/// every movement (ids, order, contents), and the rebuilt table still refuses an unknown
/// kind, updates and deletes.
#[test]
fn the_ledger_rebuilt_by_version_4_keeps_its_rows_and_its_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    let before = {
        let stock = service(SqliteStore::open(&path).unwrap());
        stock
            .create_product(NewProduct::plain(MUG, "Mug", 10))
            .unwrap();
        stock.reserve_stock(MUG, 3, None).unwrap();
        stock.unreserve_stock(MUG, 1, None).unwrap();
        stock.confirm_stock_sale(MUG, 2, None).unwrap();
        stock
            .movements(&stockroom::MovementQuery::product(MUG))
            .unwrap()
    };
    assert_eq!(before.len(), 4);
    // Put back the version-3 table: same rows, the old check.
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP TABLE ledger_packs; DROP TABLE ledger_indexed;
         CREATE TABLE old_rows AS SELECT * FROM stock_movements;
         DROP TABLE stock_movements;
         CREATE TABLE stock_movements (
            id INTEGER PRIMARY KEY, at INTEGER NOT NULL, product_id INTEGER NOT NULL,
            size TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('reserve', 'release', 'sale', 'expire',
                'cancel', 'restock', 'count_correction', 'late_payment_revival', 'hold',
                'hold_release', 'hold_expire', 'hold_convert')),
            available_delta INTEGER NOT NULL, reserved_delta INTEGER NOT NULL,
            sold_delta INTEGER NOT NULL, order_id INTEGER, payment_hash TEXT,
            reference TEXT,
            FOREIGN KEY (product_id, size) REFERENCES stock (product_id, size)) STRICT;
         INSERT INTO stock_movements SELECT * FROM old_rows;
         DROP TABLE old_rows;
         CREATE INDEX stock_movements_by_product ON stock_movements (product_id, at, id);
         PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(conn);
    let stock = service(SqliteStore::open(&path).unwrap());
    let after = stock
        .movements(&stockroom::MovementQuery::product(MUG))
        .unwrap();
    assert_eq!(after, before);
    assert!(stock.verify_ledger().unwrap().is_consistent());
    stock.reserve_stock(MUG, 1, None).unwrap();
    let ids: Vec<i64> = stock
        .movements(&stockroom::MovementQuery::product(MUG))
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids ascend: {ids:?}");
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 7);
    let bad_kind = conn
        .execute(
            "INSERT INTO stock_movements (at, product_id, size, kind, available_delta, \
             reserved_delta, sold_delta) VALUES (0, 1, '', 'teleport', 0, 0, 0)",
            [],
        )
        .unwrap_err();
    assert!(bad_kind.to_string().contains("CHECK"), "{bad_kind}");
    for sql in [
        "UPDATE stock_movements SET available_delta = 99",
        "DELETE FROM stock_movements",
    ] {
        let err = conn.execute(sql, []).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
}

/// Under FULL the store syncs the WAL itself after each commit. When that sync fails,
/// the caller is not told its write succeeded, and the store refuses every later write
/// rather than promise durability it cannot give. (The sync is made to fail by putting a
/// directory where the WAL file was, before the first write.)
#[test]
fn a_failed_wal_sync_fails_the_write_and_refuses_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let stock = StockService::new(store.clone());
    let wal = dir.path().join("stock.db-wal");
    if wal.exists() {
        std::fs::remove_file(&wal).unwrap();
    }
    std::fs::create_dir(&wal).unwrap();
    let first = stock
        .create_product(NewProduct::plain(MUG, "Mug", 10))
        .unwrap_err();
    assert_eq!(first.code(), "STORAGE");
    assert!(first.to_string().contains("could not be synced"), "{first}");
    for _ in 0..2 {
        let later = stock
            .create_product(NewProduct::plain(ProductId(2), "Bowl", 10))
            .unwrap_err();
        assert_eq!(later.code(), "STORAGE");
        assert!(later.to_string().contains("reopen the store"), "{later}");
    }
    assert_eq!(store.writer_stats().units, 1, "later writes never ran");
}

/// The status checks as version 5 writes them, and as version 4 had them: (table, new
/// text, old text).
const VERSION_4_CHECKS: [(&str, &str, &str); 4] = [
    (
        "payments",
        "status = 'pending' OR status = 'completed' OR status = 'expired' OR status = 'cancelled'",
        "status IN ('pending', 'completed', 'expired', 'cancelled')",
    ),
    (
        "orders",
        "status = 'under_paying' OR status = 'pending' OR status = 'cancelled'",
        "status IN ('under_paying', 'pending', 'cancelled')",
    ),
    (
        "orders",
        "payment_status = 'pending' OR payment_status = 'completed' OR payment_status = 'expired' OR payment_status = 'cancelled'",
        "payment_status IN ('pending', 'completed', 'expired', 'cancelled')",
    ),
    (
        "cart_holds",
        "status = 'active' OR status = 'released' OR status = 'expired' OR status = 'converted'",
        "status IN ('active', 'released', 'expired', 'converted')",
    ),
];

/// What versions 6 and 7 changed, undone: the ledger's index by product back in place of
/// the packs the writer fills in bulk.
const UNDO_VERSIONS_6_AND_7: &str = "DROP TABLE ledger_packs; DROP TABLE ledger_indexed;
     CREATE INDEX stock_movements_by_product ON stock_movements (product_id, at, id);";

/// Replaces, in the file at `path`, each table's text `new` by `old` in its definition
/// (each must be found once), undoes versions 6 and 7, and sets the schema version to
/// `version` (at most 5).
fn edit_definitions(path: &std::path::Path, edits: &[(&str, &str, &str)], version: i64) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(UNDO_VERSIONS_6_AND_7).unwrap();
    conn.execute_batch("PRAGMA writable_schema = ON").unwrap();
    for (table, new, old) in edits {
        let changed = conn
            .execute(
                "UPDATE sqlite_schema SET sql = replace(sql, ?2, ?3) \
                 WHERE name = ?1 AND instr(sql, ?2) > 0",
                [table, new, old],
            )
            .unwrap();
        assert_eq!(changed, 1, "{table}: {new}");
    }
    conn.execute_batch(&format!(
        "PRAGMA writable_schema = OFF; PRAGMA user_version = {version}"
    ))
    .unwrap();
}

/// What SQLite runs for `sql`, one opcode per step (EXPLAIN).
fn opcodes(conn: &Connection, sql: &str) -> Vec<String> {
    conn.prepare(&format!("EXPLAIN {sql}"))
        .unwrap()
        .query_map([], |r| r.get::<_, String>(1))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Version 5 turns the status checks of payments, orders and cart holds from `IN`
/// lists, which SQLite evaluates by filling a temporary b-tree for every row written,
/// into comparisons. It edits the definitions in place: rows, rules and the service's
/// work on them stay as they were.
#[test]
fn version_5_rewrites_the_status_checks_in_place() {
    use stockroom::{
        CheckoutRequest, OrderConfig, OrderLine, OrderService, OrderStatus, StockLine,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    let now = chrono::Utc::now();
    let checkout = {
        let store: Arc<dyn StockStore> = Arc::new(SqliteStore::open(&path).unwrap());
        let stock = StockService::new(store.clone());
        stock
            .create_product(NewProduct::plain(MUG, "Mug", 10))
            .unwrap();
        stock
            .hold_cart("paying", &[StockLine::new(MUG, None, 2)], now)
            .unwrap();
        stock
            .hold_cart("browsing", &[StockLine::new(MUG, None, 1)], now)
            .unwrap();
        OrderService::new(store, OrderConfig::default())
            .checkout(
                CheckoutRequest::new(vec![OrderLine::new(MUG, None, 2, 500)]).cart("paying"),
                now,
            )
            .unwrap()
    };
    // Put back the definitions version 4 had.
    edit_definitions(&path, &VERSION_4_CHECKS, 4);
    let updates = [
        "UPDATE payments SET status = 'expired' WHERE hash = 'h'",
        "UPDATE orders SET status = 'cancelled', payment_status = 'expired' WHERE id = 1",
        "UPDATE cart_holds SET status = 'expired' WHERE id = 1",
    ];
    let conn = Connection::open(&path).unwrap();
    for sql in updates {
        assert!(
            opcodes(&conn, sql).iter().any(|op| op == "OpenEphemeral"),
            "{sql}"
        );
    }
    drop(conn);

    let store: Arc<dyn StockStore> = Arc::new(SqliteStore::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 7);
    for sql in updates {
        assert!(
            !opcodes(&conn, sql).iter().any(|op| op == "OpenEphemeral"),
            "{sql}"
        );
    }
    let with_in_lists: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema \
             WHERE name IN ('payments', 'orders', 'cart_holds') AND instr(sql, ' IN (') > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(with_in_lists, 0);
    // The rules hold.
    for sql in [
        "UPDATE payments SET status = 'lost'",
        "UPDATE orders SET status = 'shipped'",
        "UPDATE orders SET payment_status = 'refunded'",
        "UPDATE cart_holds SET status = 'abandoned'",
    ] {
        let err = conn.execute(sql, []).unwrap_err();
        assert!(
            err.to_string().contains("CHECK constraint failed"),
            "{sql}: {err}"
        );
    }
    // The rows are there, and the services go on with them.
    let stock = StockService::new(store.clone());
    assert_eq!(stock.get_cart("browsing").unwrap().len(), 1);
    assert_eq!(levels(&stock), (7, 3, 0));
    let orders = OrderService::new(store, OrderConfig::default());
    let paid = orders
        .confirm_payment_for_orders(&checkout.payment_hash, &checkout.payment_key, now)
        .unwrap();
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].status, OrderStatus::Pending);
    assert_eq!(levels(&stock), (7, 1, 2));
    assert!(stock.verify_ledger().unwrap().is_consistent());
}

/// A version-4 file whose cart holds table does not carry the check version 5 rewrites
/// (edited by hand, say) is refused, and left at version 4 with every definition as it
/// was, the tables rewritten before the refusal included.
#[test]
fn version_5_refuses_a_table_it_does_not_recognise_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.db");
    drop(SqliteStore::open(&path).unwrap());
    let unknown = (
        "cart_holds",
        VERSION_4_CHECKS[3].1,
        "status IN ('active', 'released', 'expired', 'converted', 'saved')",
    );
    edit_definitions(
        &path,
        &[VERSION_4_CHECKS[0], VERSION_4_CHECKS[1], unknown],
        4,
    );
    let conn = Connection::open(&path).unwrap();
    let definitions = |conn: &Connection| -> Vec<String> {
        conn.prepare("SELECT sql FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let before = definitions(&conn);
    drop(conn);

    let err = SqliteStore::open(&path).expect_err("version 5 refuses the file");
    assert_eq!(err.code(), "STORAGE");
    assert!(err.to_string().contains("table cart_holds"), "{err}");

    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
    assert_eq!(definitions(&conn), before);
    assert!(
        before
            .iter()
            .any(|sql| sql.contains("status IN ('under_paying'"))
    );
}

/// Every movement of `product` through the store, in pages of 7, as ids.
fn paged_movement_ids(stock: &StockService, product: ProductId) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut query = stockroom::MovementQuery::product(product).limit(7);
    loop {
        let page = stock.movements(&query).unwrap();
        ids.extend(page.iter().map(|m| m.id));
        match page.last() {
            Some(last) if page.len() == 7 => query = query.after(last),
            _ => return ids,
        }
    }
}

/// Every movement of `product` in the file, as ids, oldest first: what the ledger holds.
fn ledger_ids(conn: &Connection, product: ProductId) -> Vec<i64> {
    conn.prepare("SELECT id FROM stock_movements WHERE product_id = ?1 ORDER BY at, id")
        .unwrap()
        .query_map([product.0], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// (movements up to `ledger_indexed.upto`, of them those in `ledger_packs`, entries of
/// `ledger_packs`, `upto`). Checks each pack on the way: its first entry in its key, the
/// others 16 bytes each (time and id, little-endian), at most 48 entries, sorted, `span`
/// from the first time to the last.
fn index_state(conn: &Connection) -> (i64, i64, i64, i64) {
    let upto: i64 = conn
        .query_row("SELECT upto FROM ledger_indexed", [], |r| r.get(0))
        .unwrap();
    let mut packed = std::collections::HashSet::new();
    let mut entries = 0;
    let mut packs = conn
        .prepare("SELECT product_id, size, first_at, first_id, span, entries FROM ledger_packs")
        .unwrap();
    let mut rows = packs.query([]).unwrap();
    while let Some(row) = rows.next().unwrap() {
        let (product, size): (i64, String) = (row.get(0).unwrap(), row.get(1).unwrap());
        let bytes: Vec<u8> = row.get(5).unwrap();
        assert_eq!(bytes.len() % 16, 0, "{} bytes", bytes.len());
        let first: (i64, i64) = (row.get(2).unwrap(), row.get(3).unwrap());
        let rest = bytes.chunks_exact(16).map(|e| {
            let (at, id) = e.split_at(8);
            (
                i64::from_le_bytes(at.try_into().unwrap()),
                i64::from_le_bytes(id.try_into().unwrap()),
            )
        });
        let pack: Vec<(i64, i64)> = std::iter::once(first).chain(rest).collect();
        assert!((1..=48).contains(&pack.len()), "{} entries", pack.len());
        assert!(pack.windows(2).all(|w| w[0] < w[1]), "{pack:?}");
        assert_eq!(
            pack[pack.len() - 1].0 - first.0,
            row.get::<_, i64>(4).unwrap()
        );
        entries += pack.len() as i64;
        packed.extend(
            pack.into_iter()
                .map(|(at, id)| (product, size.clone(), at, id)),
        );
    }
    let (mut marked, mut indexed) = (0, 0);
    let mut movements = conn
        .prepare("SELECT product_id, size, at, id FROM stock_movements WHERE id <= ?1")
        .unwrap();
    let mut rows = movements.query([upto]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let movement = (
            r.get(0).unwrap(),
            r.get(1).unwrap(),
            r.get(2).unwrap(),
            r.get(3).unwrap(),
        );
        marked += 1;
        indexed += i64::from(packed.contains(&movement));
    }
    (marked, indexed, entries, upto)
}

/// Checks that every movement marked indexed (up to `ledger_indexed.upto`) is in
/// `ledger_packs`, a catch-up in progress having perhaps packed more, and that at
/// most `behind` of the first `movements` are not marked; returns how many are.
fn assert_indexed(conn: &Connection, movements: i64, behind: i64) -> i64 {
    let (marked, indexed, entries, upto) = index_state(conn);
    assert_eq!(indexed, marked);
    assert!(
        entries >= marked,
        "{entries} entries for {marked} movements"
    );
    assert!(
        upto >= movements - behind,
        "indexed up to {upto} of {movements} movements"
    );
    marked
}

/// The ledger is indexed by product in bulk, by the writer, once a batch of movements has
/// accumulated; reads take what is indexed through the index and scan the rest, and give
/// the same movements and metrics whatever the index has caught up with, a catch-up cut
/// short by a crash included (entries past the last movement marked indexed).
#[test]
fn the_ledger_is_indexed_by_product_in_bulk_and_reads_the_same_at_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let products = [ProductId(1), ProductId(2), ProductId(3)];
    let config = SqliteConfig::default()
        .with_durability(Durability::Normal)
        .with_ledger_index_batch(64);
    let reserve = |stock: &StockService, n: usize| {
        for i in 0..n {
            stock
                .reserve_stock(products[i % 3], 1 + (i % 2) as u64, None)
                .unwrap();
        }
    };
    let from = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    let to = chrono::Utc::now() + chrono::TimeDelta::hours(1);
    let (metrics, movements) = {
        let stock = service(SqliteStore::open_with(&path, config.clone()).unwrap());
        for p in products {
            stock
                .create_product(NewProduct::plain(p, "P", 10_000))
                .unwrap();
        }
        // Fewer movements than a batch: nothing indexed, every read scans.
        reserve(&stock, 40);
        let conn = Connection::open(&path).unwrap();
        assert_eq!(index_state(&conn), (0, 0, 0, 0));
        for p in products {
            assert_eq!(paged_movement_ids(&stock, p), ledger_ids(&conn, p));
        }
        // Past a batch: the writer indexes all it has found, and only that.
        reserve(&stock, 400);
        assert_indexed(&conn, 443, 64 + 16);
        let mut movements = Vec::new();
        for p in products {
            let ids = paged_movement_ids(&stock, p);
            assert_eq!(ids, ledger_ids(&conn, p));
            movements.push(ids);
        }
        (stock.metrics(from, to).unwrap(), movements)
    };
    assert_eq!(metrics.overall.units_reserved, 40 + 20 + 400 + 200);
    // A crash in the middle of a catch-up: the last 100 movements not marked indexed,
    // all of them packed already.
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("UPDATE ledger_indexed SET upto = upto - 100;")
        .unwrap();
    let (marked, indexed, entries, _) = index_state(&conn);
    assert_eq!((indexed, entries), (marked, marked + 100));
    // A batch larger than several catch-up transactions' chunks (128 entries) from here on.
    let config = config.with_ledger_index_batch(600);
    let stock = service(SqliteStore::open_with(&path, config).unwrap());
    for (p, ids) in products.iter().zip(&movements) {
        assert_eq!(&paged_movement_ids(&stock, *p), ids);
    }
    assert_eq!(stock.metrics(from, to).unwrap(), metrics);
    // The next catch-up indexes what was left in several transactions (chunks of 128),
    // the 100 packed twice and read once.
    reserve(&stock, 700);
    assert_indexed(&conn, 1_143, 600 + 16);
    for p in products {
        assert_eq!(paged_movement_ids(&stock, p), ledger_ids(&conn, p));
    }
    assert!(stock.verify_ledger().unwrap().is_consistent());
}

/// Version 7 packs what version 6's `ledger_by_product` holds up to `upto` (the entries
/// a cut-short catch-up left past it are dropped: reads scan past `upto`), and the reads
/// give the same movements and metrics before and after.
#[test]
fn version_7_packs_the_ledger_index_of_version_6() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v6.db");
    let shirt = ProductId(2);
    let from = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    let to = chrono::Utc::now() + chrono::TimeDelta::hours(1);
    let config = SqliteConfig::default()
        .with_durability(Durability::Normal)
        .with_ledger_index_batch(1 << 40);
    let (metrics, movements) = {
        let stock = service(SqliteStore::open_with(&path, config.clone()).unwrap());
        stock
            .create_product(NewProduct::plain(MUG, "Mug", 10_000))
            .unwrap();
        stock
            .create_product(NewProduct::sized(shirt, "Shirt", [("S", 500), ("M", 500)]))
            .unwrap();
        for i in 0..150 {
            stock.reserve_stock(MUG, 1, None).unwrap();
            let size = if i % 3 == 0 { "S" } else { "M" };
            stock.reserve_stock(shirt, 1, Some(size)).unwrap();
        }
        let movements: Vec<Vec<i64>> = [MUG, shirt]
            .into_iter()
            .map(|p| paged_movement_ids(&stock, p))
            .collect();
        (stock.metrics(from, to).unwrap(), movements)
    };
    // What version 6 wrote: every movement up to 250 indexed and marked, 30 more indexed
    // by a catch-up that did not end.
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "DROP TABLE ledger_packs;
             CREATE TABLE ledger_by_product (
                 product_id INTEGER NOT NULL,
                 at         INTEGER NOT NULL,
                 id         INTEGER NOT NULL,
                 size       TEXT    NOT NULL,
                 PRIMARY KEY (product_id, at, id)
             ) STRICT, WITHOUT ROWID;
             INSERT INTO ledger_by_product (product_id, at, id, size)
             SELECT product_id, at, id, size FROM stock_movements WHERE id <= 280;
             UPDATE ledger_indexed SET upto = 250;
             PRAGMA user_version = 6;",
        )
        .unwrap();
    let stock = service(SqliteStore::open_with(&path, config).unwrap());
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 7);
    let old_table: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'ledger_by_product'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old_table, 0);
    // 250 entries: the mug's 125 movements up to 250 in packs of 48 at most, the shirt's
    // 83 medium and 42 small ones in packs of their own.
    assert_eq!(index_state(&conn), (250, 250, 250, 250));
    let packs: Vec<(i64, String, i64)> = conn
        .prepare(
            "SELECT product_id, size, 1 + length(entries) / 16 FROM ledger_packs \
             ORDER BY product_id, size, first_at, first_id",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected = [
        (1, "", 48),
        (1, "", 48),
        (1, "", 29),
        (2, "M", 48),
        (2, "M", 35),
        (2, "S", 42),
    ];
    assert_eq!(packs, expected.map(|(p, s, n)| (p, s.to_string(), n)));
    for (p, ids) in [MUG, shirt].into_iter().zip(&movements) {
        assert_eq!(&paged_movement_ids(&stock, p), ids);
        assert_eq!(&ledger_ids(&conn, p), ids);
    }
    assert_eq!(stock.metrics(from, to).unwrap(), metrics);
    assert!(stock.verify_ledger().unwrap().is_consistent());
}

/// Commits that each append more movements than a catch-up transaction's smallest chunk
/// (300-line carts against 128 entries, looked at every 16 commits): the catch-up keeps
/// pace with them (each chunk twice what the commit before it appended, and the next look
/// right after a catch-up), so what is not indexed stays bounded however long they come.
#[test]
fn the_ledger_index_keeps_pace_with_large_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("carts.db");
    let config = SqliteConfig::default()
        .with_durability(Durability::Normal)
        .with_ledger_index_batch(1_000);
    let stock = service(SqliteStore::open_with(&path, config).unwrap());
    for p in 1..=300 {
        stock
            .create_product(NewProduct::plain(ProductId(p), "P", 1_000))
            .unwrap();
    }
    let lines: Vec<stockroom::StockLine> = (1..=300)
        .map(|p| stockroom::StockLine::new(ProductId(p), None, 1))
        .collect();
    let conn = Connection::open(&path).unwrap();
    let mut behind = Vec::new();
    for _ in 0..120 {
        stock.reserve_lines(&lines).unwrap();
        let (end, upto): (i64, i64) = conn
            .query_row(
                "SELECT (SELECT max(id) FROM stock_movements), \
                        (SELECT upto FROM ledger_indexed)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        behind.push(end - upto);
    }
    // A catch-up starts at 1,000 behind or more, plus what came since the last look;
    // it moves `upto` when it ends, 600 entries a commit while 300 come.
    let most = *behind.iter().max().unwrap();
    assert!(
        most <= 2 * (1_000 + 17 * 300),
        "up to {most} movements not indexed: {behind:?}"
    );
    let marked = assert_indexed(&conn, 300 + 120 * 300, most);
    assert_eq!(marked, 300 + 120 * 300 - behind[119]);
}
