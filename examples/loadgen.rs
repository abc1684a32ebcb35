//! A load generator for reservations: many threads reserving one unit at a time, against
//! stockroom on SQLite (or PostgreSQL), next to the floor — the same reservation done by
//! hand with bare rusqlite, one transaction each — measured right before it with the same
//! settings.
//!
//! ```text
//! cargo run --release --example loadgen -- --threads 8 --seconds 5 --durability full \
//!     --products 1000 --hot-share 0.5
//! cargo run --release --example loadgen -- --postgres postgres://user@localhost/db
//! cargo run --release --example loadgen -- --reservations 1000000 --products 100000
//! cargo run --release --example loadgen -- --threads 1 --seconds 0.5 --rounds 24
//! ```
//!
//! Options (defaults in brackets): `--threads N` [8], `--seconds S` [5],
//! `--durability full|normal` [full], `--products P` [1000], `--hot-share X` [0.5]: the
//! share of reservations that go to product 1, `--reservations N`: stop after N
//! reservations instead of after S seconds, `--sharing processes|this-process`
//! [processes]: the library's [`Sharing`] of the SQLite file (the floor always uses
//! SQLite's defaults), `--postgres URL`: run the library on PostgreSQL (no floor),
//! `--no-floor`: skip the floor, `--rounds R` [1]: measure the floor and the library R
//! times each, S seconds a run, alternating which goes first, and report the median
//! ratio (a shared machine drifts by ±20% within minutes: one pair of runs can say
//! little about a ratio near 1).

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use stockroom::{
    Durability, MAX_STOCK, NewProduct, ProductId, Sharing, SqliteConfig, SqliteStore, StockService,
    StockStore,
};
#[cfg(feature = "postgres")]
use stockroom::{PostgresConfig, PostgresStore};

#[path = "support/floor.rs"]
mod floor;

#[derive(Debug, Clone)]
struct Args {
    threads: usize,
    seconds: f64,
    durability: Durability,
    sharing: Sharing,
    products: i64,
    hot_share: f64,
    reservations: Option<u64>,
    postgres: Option<String>,
    floor: bool,
    rounds: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        threads: 8,
        seconds: 5.0,
        durability: Durability::Full,
        sharing: Sharing::Processes,
        products: 1000,
        hot_share: 0.5,
        reservations: None,
        postgres: None,
        floor: true,
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--durability" => {
                args.durability = match value()?.as_str() {
                    "full" => Durability::Full,
                    "normal" => Durability::Normal,
                    other => return Err(format!("--durability full|normal, not {other}")),
                }
            }
            "--sharing" => {
                args.sharing = match value()?.as_str() {
                    "processes" => Sharing::Processes,
                    "this-process" => Sharing::ThisProcess,
                    other => {
                        return Err(format!("--sharing processes|this-process, not {other}"));
                    }
                }
            }
            "--products" => {
                args.products = value()?.parse().map_err(|e| format!("--products: {e}"))?
            }
            "--hot-share" => {
                args.hot_share = value()?.parse().map_err(|e| format!("--hot-share: {e}"))?
            }
            "--reservations" => {
                args.reservations = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--reservations: {e}"))?,
                )
            }
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--postgres" => args.postgres = Some(value()?),
            "--no-floor" => args.floor = false,
            "--help" | "-h" => {
                return Err(
                    "usage: loadgen [--threads N] [--seconds S] [--durability full|normal] \
                     [--products P] [--hot-share X] [--reservations N] \
                     [--sharing processes|this-process] [--postgres URL] [--no-floor] \
                     [--rounds R]"
                        .into(),
                );
            }
            other => return Err(format!("unknown option {other} (try --help)")),
        }
    }
    if args.threads == 0
        || args.products < 1
        || args.rounds == 0
        || !(0.0..=1.0).contains(&args.hot_share)
    {
        return Err(
            "--threads, --products and --rounds must be at least 1, --hot-share in 0..=1".into(),
        );
    }
    if args.rounds > 1 && args.reservations.is_some() {
        return Err("--rounds needs timed runs: drop --reservations".into());
    }
    Ok(args)
}

/// A small per-thread generator: which product each reservation goes to.
struct Picker {
    state: u64,
    products: i64,
    hot_share: f64,
}

impl Picker {
    fn next(&mut self) -> i64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let unit = (self.state >> 11) as f64 / (1u64 << 53) as f64;
        if self.products == 1 || unit < self.hot_share {
            1
        } else {
            2 + (self.state % (self.products as u64 - 1)) as i64
        }
    }
}

/// Latencies in whole microseconds up to 100 ms, one counter each (and the exact
/// maximum): a fixed amount of memory however long the run, so that the peak memory
/// printed at the end is the library's, not the measurement's.
const BUCKETS: usize = 100_001;

struct Histogram {
    counts: Vec<u64>,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            max_us: 0,
        }
    }

    fn record(&mut self, us: u64) {
        self.counts[(us as usize).min(BUCKETS - 1)] += 1;
        self.max_us = self.max_us.max(us);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.max_us = self.max_us.max(other.max_us);
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What one run measured (or several, merged).
#[derive(Default)]
struct Run {
    ops: u64,
    elapsed: Duration,
    latencies: Histogram,
    errors: BTreeMap<String, u64>,
}

impl Run {
    fn merge(&mut self, other: &Run) {
        self.ops += other.ops;
        self.elapsed += other.elapsed;
        self.latencies.merge(&other.latencies);
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
    }

    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency at quantile `p`, in milliseconds; `p = 1` is the maximum.
    fn percentile(&self, p: f64) -> f64 {
        if self.ops == 0 {
            return 0.0;
        }
        if p >= 1.0 {
            return self.latencies.max_us as f64 / 1000.0;
        }
        let rank = ((self.ops as f64 * p).ceil() as u64).max(1);
        let mut seen = 0;
        for (us, n) in self.latencies.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return us as f64 / 1000.0;
            }
        }
        self.latencies.max_us as f64 / 1000.0
    }
}

/// Runs `op` on `threads` threads until the time or the reservation budget runs out.
fn drive<S: Send + 'static>(
    args: &Args,
    threads: usize,
    make: impl Fn(usize) -> S,
    op: fn(&mut S, i64) -> Result<(), String>,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let budget = args.reservations;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let mut state = make(t);
            let (stop, done, barrier) = (stop.clone(), done.clone(), barrier.clone());
            let mut picker = Picker {
                state: 0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
                products: args.products,
                hot_share: args.hot_share,
            };
            thread::spawn(move || {
                let mut latencies = Histogram::new();
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(b) = budget {
                        if done.fetch_add(1, Ordering::Relaxed) >= b {
                            break;
                        }
                    }
                    let product = picker.next();
                    let start = Instant::now();
                    let result = op(&mut state, product);
                    latencies.record(start.elapsed().as_micros() as u64);
                    if let Err(code) = result {
                        *errors.entry(code).or_default() += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    if budget.is_none() {
        thread::sleep(Duration::from_secs_f64(args.seconds));
        stop.store(true, Ordering::Relaxed);
    }
    let mut run = Run {
        ops: 0,
        elapsed: Duration::ZERO,
        latencies: Histogram::new(),
        errors: BTreeMap::new(),
    };
    for h in handles {
        let (lat, errs) = h.join().expect("load thread");
        run.latencies.merge(&lat);
        for (k, v) in errs {
            *run.errors.entry(k).or_default() += v;
        }
    }
    run.elapsed = start.elapsed();
    run.ops = run.latencies.total();
    run
}

fn stock_units(args: &Args) -> u64 {
    // Enough that nothing runs out: every reservation could go to one product.
    MAX_STOCK
        .min(1_000_000_000)
        .max(args.reservations.unwrap_or(0) + 1)
}

/// The floor: the same reservation by hand, bare rusqlite, one transaction each, on a file
/// of its own for each number of threads.
struct Floor {
    path: PathBuf,
    threads: usize,
    sync: &'static str,
    /// Open from creation to the end, so that the file's WAL outlives each run's
    /// connections, as the library's does between rounds: the last connection to close
    /// would checkpoint it and delete it, and the next run would pay for growing a new
    /// one (a sync that also writes the file's new size is slower).
    _keeper: Connection,
}

impl Floor {
    fn create(args: &Args, threads: usize, dir: &Path) -> Result<Floor, Box<dyn Error>> {
        let path = dir.join(format!("floor-{threads}.db"));
        let sync = match args.durability {
            Durability::Normal => "NORMAL",
            _ => "FULL",
        };
        let keeper = Connection::open(&path)?;
        floor::create(&keeper, sync, args.products, stock_units(args) as i64)?;
        Ok(Floor {
            path,
            threads,
            sync,
            _keeper: keeper,
        })
    }

    fn name(&self) -> String {
        match self.threads {
            1 => "floor, 1 thread".to_owned(),
            n => format!("floor, {n} threads"),
        }
    }

    fn run(&self, args: &Args) -> Run {
        let open = |_: usize| {
            let conn = Connection::open(&self.path).expect("open floor file");
            conn.busy_timeout(Duration::from_secs(30))
                .expect("busy timeout");
            conn.execute_batch(&format!("PRAGMA synchronous = {}", self.sync))
                .expect("pragma");
            conn
        };
        drive(
            args,
            self.threads,
            open,
            |conn, product| match floor::reserve(conn, product) {
                Ok(1) => Ok(()),
                Ok(_) => Err("SHORT".into()),
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    Err(format!("sqlite: {e}"))
                }
            },
        )
    }
}

/// The library: a store with its products, and the SQLite store again when it is one
/// (for its writer stats).
struct Library {
    stock: StockService,
    sqlite: Option<Arc<SqliteStore>>,
    name: String,
}

impl Library {
    fn open(args: &Args, dir: &Path) -> Result<Library, Box<dyn Error>> {
        let (store, sqlite): (Arc<dyn StockStore>, _) = match &args.postgres {
            Some(url) => (postgres_store(args, url)?, None),
            None => {
                let sqlite = Arc::new(SqliteStore::open_with(
                    dir.join("library.db"),
                    SqliteConfig::default()
                        .with_durability(args.durability)
                        .with_sharing(args.sharing),
                )?);
                (sqlite.clone(), Some(sqlite))
            }
        };
        let name = format!("stockroom ({})", store.backend());
        let stock = StockService::new(store);
        let units = stock_units(args);
        let mut batch = Vec::new();
        for p in 1..=args.products {
            batch.push(NewProduct::plain(ProductId(p), format!("P{p}"), units));
        }
        // Products are created from a few threads to keep the setup short.
        thread::scope(|s| {
            for chunk in batch.chunks(batch.len().div_ceil(4).max(1)) {
                let stock = stock.clone();
                s.spawn(move || {
                    for p in chunk {
                        stock.create_product(p.clone()).expect("create product");
                    }
                });
            }
        });
        Ok(Library {
            stock,
            sqlite,
            name,
        })
    }

    fn run(&self, args: &Args) -> Run {
        let before = self.sqlite.as_ref().map(|s| s.writer_stats());
        let run = drive(
            args,
            args.threads,
            |_| self.stock.clone(),
            |stock, product| {
                stock
                    .reserve_stock(ProductId(product), 1, None)
                    .map(drop)
                    .map_err(|e| e.code().to_owned())
            },
        );
        if let (Some(sqlite), Some(before)) = (&self.sqlite, before) {
            let after = sqlite.writer_stats();
            let (units, txs) = (
                after.units - before.units,
                after.transactions - before.transactions,
            );
            println!(
                "group commit: {units} units in {txs} transactions ({:.1} per commit, \
                 largest {}), {} WAL syncs",
                units as f64 / txs.max(1) as f64,
                after.largest_group,
                after.syncs - before.syncs
            );
        }
        run
    }
}

#[cfg(feature = "postgres")]
fn postgres_store(args: &Args, url: &str) -> Result<Arc<dyn StockStore>, Box<dyn Error>> {
    let schema = format!("loadgen_{}", std::process::id());
    let config = PostgresConfig::new(url)
        .with_schema(schema)
        .with_pool_size(args.threads as u32 + 1);
    Ok(Arc::new(PostgresStore::connect(config)?))
}

#[cfg(not(feature = "postgres"))]
fn postgres_store(_: &Args, url: &str) -> Result<Arc<dyn StockStore>, Box<dyn Error>> {
    Err(format!("--postgres {url}: build with --features postgres").into())
}

/// Peak resident memory of this process so far, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn report(name: &str, run: &Run) {
    println!(
        "{name:<22} {:>10.0} reservations/s  ({} in {:.2} s)",
        run.rate(),
        run.ops,
        run.elapsed.as_secs_f64()
    );
    println!(
        "{:<22} p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        "",
        run.percentile(0.50),
        run.percentile(0.99),
        run.percentile(0.999),
        run.percentile(1.0)
    );
    if !run.errors.is_empty() {
        println!("{:<22} errors: {:?}", "", run.errors);
    }
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The values with two decimals each, in order, for a line of output.
fn list(values: &[f64]) -> String {
    let shown: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
    shown.join(" ")
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let dir = tempfile::tempdir()?;
    println!(
        "loadgen: {} threads, {}, durability {:?}, sharing {:?}, {} products, hot share {}{}",
        args.threads,
        match args.reservations {
            Some(n) => format!("{n} reservations"),
            None => format!("{} s", args.seconds),
        },
        args.durability,
        args.sharing,
        args.products,
        args.hot_share,
        match args.rounds {
            1 => String::new(),
            n => format!(", {n} rounds"),
        }
    );
    let mut floors = Vec::new();
    if args.floor && args.postgres.is_none() {
        floors.push(Floor::create(&args, 1, dir.path())?);
        if args.threads > 1 {
            floors.push(Floor::create(&args, args.threads, dir.path())?);
        }
    }
    // Opened where it is first measured: after the floors in the first round, so that the
    // setup of its products does not run beside them.
    let mut library: Option<Library> = None;
    let mut all = Run::default();
    let mut measure_library = |library: &mut Option<Library>| -> Result<f64, Box<dyn Error>> {
        let library = match library {
            Some(l) => l,
            None => library.insert(Library::open(&args, dir.path())?),
        };
        let run = library.run(&args);
        report(&library.name, &run);
        all.merge(&run);
        Ok(run.rate())
    };
    let mut floor_rates = vec![Vec::new(); floors.len()];
    let mut library_rates = Vec::new();
    for round in 0..args.rounds {
        if args.rounds > 1 {
            println!("round {} of {}", round + 1, args.rounds);
        }
        // Every other round measures the library first, so that a machine that speeds up
        // or slows down over the run favours neither side.
        let first = match round % 2 {
            1 => Some(measure_library(&mut library)?),
            _ => None,
        };
        for (f, rates) in floors.iter().zip(&mut floor_rates) {
            let run = f.run(&args);
            report(&f.name(), &run);
            rates.push(run.rate());
        }
        library_rates.push(match first {
            Some(rate) => rate,
            None => measure_library(&mut library)?,
        });
    }
    let name = library.as_ref().map_or("stockroom", |l| l.name.as_str());
    if args.rounds > 1 {
        println!("median of {} rounds:", args.rounds);
        for (f, rates) in floors.iter().zip(&floor_rates) {
            println!("{:<22} {:>10.0} reservations/s", f.name(), median(rates));
        }
        println!("{name:<22} {:>10.0} reservations/s", median(&library_rates));
        report("stockroom, all rounds", &all);
    }
    for (f, rates) in floors.iter().zip(&floor_rates) {
        let by_round: Vec<f64> = library_rates
            .iter()
            .zip(rates)
            .map(|(l, f)| l / f)
            .collect();
        let of_rounds = match args.rounds {
            1 => String::new(),
            n => format!(" (median of {n} rounds: {})", list(&by_round)),
        };
        println!(
            "ratio: {:.2} x the {}-thread floor{of_rounds}",
            median(&by_round),
            f.threads
        );
    }
    if let Some(mib) = peak_rss_mib() {
        println!("peak memory (VmHWM): {mib:.1} MiB");
    }
    Ok(())
}
