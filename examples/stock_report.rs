//! A day of a small shop on SQLite, driven by a manual clock, then its stock metrics as a
//! table and as JSON.
//!
//! Run it with `cargo run --example stock_report`.

use std::error::Error;
use std::sync::Arc;

use chrono::{TimeDelta, TimeZone, Utc};
use stockroom::{
    Checkout, ManualClock, MetricsFigures, NewProduct, OrderConfig, OrderLine, OrderService,
    ProductId, SqliteStore, StockLine, StockService, StockStore,
};

/// A small deterministic generator, so every run tells the same day.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % sides
    }
}

const CATALOGUE: [(ProductId, &str, Option<&str>, u64); 4] = [
    (ProductId(1), "Mug", None, 1_200),
    (ProductId(2), "Poster", None, 900),
    (ProductId(3), "T-shirt", Some("M"), 2_500),
    (ProductId(3), "T-shirt", Some("L"), 2_500),
];

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn StockStore> = Arc::new(SqliteStore::open(dir.path().join("shop.db"))?);
    let opening = Utc.with_ymd_and_hms(2026, 11, 26, 9, 0, 0).unwrap();
    let clock = Arc::new(ManualClock::new(opening));
    let stock = StockService::new(store.clone()).with_clock(clock.clone());
    let orders = OrderService::new(store, OrderConfig::default()).with_clock(clock.clone());

    stock.create_product(NewProduct::plain(ProductId(1), "Mug", 120))?;
    stock.create_product(NewProduct::plain(ProductId(2), "Poster", 80))?;
    stock.create_product(NewProduct::sized(
        ProductId(3),
        "T-shirt",
        [("M", 60), ("L", 40)],
    ))?;

    let mut dice = Dice(7);
    let mut waiting: Vec<(Checkout, chrono::DateTime<Utc>)> = Vec::new();
    let (mut carts, mut refused, mut paid, mut cancelled) = (0, 0, 0, 0);
    // A cart every 4 minutes from 09:00 to 21:00; cleanup every quarter hour.
    for tick in 0..180 {
        let now = opening + TimeDelta::minutes(4 * tick);
        clock.set(now);
        if tick % 4 == 0 {
            orders.cleanup_expired_payments(now)?;
        }
        if tick == 135 {
            // 18:00: the mugs are counted; two have gone missing.
            let info = stock.get_stock_info(ProductId(1), None)?;
            let on_shelf = info.available_quantity + info.reserved_quantity;
            stock.with_reference("count-evening").record_stock_count(
                ProductId(1),
                None,
                on_shelf - 2,
            )?;
            stock.record_stock_count(ProductId(2), None, {
                let p = stock.get_stock_info(ProductId(2), None)?;
                p.available_quantity + p.reserved_quantity
            })?;
        }
        // Customers whose payment arrives now.
        waiting.retain(|(checkout, pays_at)| {
            if *pays_at > now {
                return true;
            }
            match orders.confirm_payment_for_orders(
                &checkout.payment_hash,
                &checkout.payment_key,
                now,
            ) {
                Ok(_) => paid += 1,
                Err(e) => println!("late payment refused: {}", e.code()),
            }
            false
        });
        // A new cart of one or two lines.
        carts += 1;
        let mut lines = Vec::new();
        for _ in 0..=dice.roll(2) {
            let (id, _, size, price) = CATALOGUE[dice.roll(4) as usize];
            lines.push(OrderLine::new(id, size, 1 + dice.roll(2), price));
        }
        let reserve: Vec<StockLine> = lines
            .iter()
            .map(|l| StockLine::new(l.product_id, l.size.as_deref(), l.quantity))
            .collect();
        let cart = stock.with_reference(format!("cart-{carts}"));
        if cart.reserve_lines(&reserve).is_err() {
            refused += 1;
            continue;
        }
        let checkout = orders.checkout(lines, now)?;
        match dice.roll(10) {
            // Seven in ten pay within a few minutes.
            0..=6 => {
                let pays_at = now + TimeDelta::minutes(2 + dice.roll(8) as i64);
                waiting.push((checkout, pays_at));
            }
            // One gives up at once.
            7 => {
                for order in &checkout.orders {
                    orders.cancel_order(order.id, now)?;
                }
                cancelled += 1;
            }
            // Two never pay: cleanup releases them.
            _ => {}
        }
    }
    let closing = opening + TimeDelta::hours(12);
    clock.set(closing);
    orders.cleanup_expired_payments(closing)?;

    println!("A day at the shop, 09:00 to 21:00 UTC");
    println!(
        "{carts} carts, {refused} refused for lack of stock, {paid} paid, {cancelled} cancelled\n"
    );
    let metrics = stock.metrics(opening, closing)?;
    let names = ["", "Mug", "Poster", "T-shirt"];
    println!(
        "{:<8} {:>8} {:>5} {:>7} {:>8} {:>10} {:>7} {:>6} {:>11}",
        "product",
        "reserved",
        "sold",
        "expired",
        "released",
        "conversion",
        "expiry",
        "counts",
        "discrepancy"
    );
    for p in &metrics.products {
        row(names[p.product_id.0 as usize], &p.figures);
    }
    row("overall", &metrics.overall);
    let ledger = stock.verify_ledger()?;
    println!(
        "\nledger: {} stock rows checked, {} mismatches",
        ledger.rows_checked,
        ledger.mismatches.len()
    );
    println!("\n{}", serde_json::to_string_pretty(&metrics)?);
    Ok(())
}

fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

fn row(name: &str, f: &MetricsFigures) {
    println!(
        "{:<8} {:>8} {:>5} {:>7} {:>8} {:>10} {:>7} {:>6} {:>11}",
        name,
        f.units_reserved,
        f.units_sold,
        f.units_expired,
        f.units_released,
        percent(f.conversion_rate),
        percent(f.expiry_rate),
        f.stock_accuracy.counts,
        f.stock_accuracy.total_abs_discrepancy
    );
}
