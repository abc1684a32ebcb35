//! The whole story of stockroom on a SQLite file: products, carts held for a while,
//! checkout, payment, an unpaid checkout and an abandoned cart released by cleanup, and a
//! refusal explained as JSON.
//!
//! Run it with `cargo run --example checkout`.

use std::error::Error;
use std::sync::Arc;

use chrono::{TimeDelta, TimeZone, Utc};
use stockroom::{
    CheckoutRequest, NewProduct, OrderConfig, OrderLine, OrderService, ProductId, SqliteStore,
    StockLine, StockService, StockStore,
};

const MUG: ProductId = ProductId(1);
const SHIRT: ProductId = ProductId(2);

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("shop.db");
    let store: Arc<dyn StockStore> = Arc::new(SqliteStore::open(&path)?);
    let stock = StockService::new(store.clone());
    let orders = OrderService::new(store, OrderConfig::default());
    println!("stockroom on a SQLite file: {}", path.display());

    step("A shop with a mug (no sizes) and a T-shirt in three sizes");
    stock.create_product(NewProduct::plain(MUG, "Mug", 10))?;
    stock.create_product(NewProduct::sized(
        SHIRT,
        "T-shirt",
        [("S", 4), ("M", 3), ("L", 2)],
    ))?;
    table(&stock)?;

    // The clock is explicit: every time-dependent call takes `now`.
    let opened = Utc.with_ymd_and_hms(2026, 11, 26, 9, 0, 0).unwrap();

    step("Cart A: 2 mugs and 1 T-shirt in M are held for the cart (available -> reserved)");
    stock.hold_cart(
        "cart-A",
        &[
            StockLine::new(MUG, None, 2),
            StockLine::new(SHIRT, Some("M"), 1),
        ],
        opened,
    )?;
    table(&stock)?;

    step("Cart A checks out at 09:00: two orders wait for one payment until 09:15");
    let a = orders.checkout(
        CheckoutRequest::new(vec![
            OrderLine::new(MUG, None, 2, 1_200),
            OrderLine::new(SHIRT, Some("M"), 1, 2_500),
        ])
        .cart("cart-A"),
        opened,
    )?;
    for order in &a.orders {
        println!(
            "  order {} - {} x product {}{} - {}",
            order.id,
            order.quantity,
            order.product_id,
            order
                .size
                .as_deref()
                .map(|s| format!(" size {s}"))
                .unwrap_or_default(),
            order.status
        );
    }
    println!(
        "  payment {} for {} cents, expires {}",
        a.payment_hash,
        a.amount,
        a.expires_at.format("%H:%M")
    );
    table(&stock)?;

    step("Cart A pays at 09:04 (reserved -> sold)");
    let paid = orders.confirm_payment_for_orders(
        &a.payment_hash,
        &a.payment_key,
        opened + TimeDelta::minutes(4),
    )?;
    println!("  {} orders now {}", paid.len(), paid[0].status);
    table(&stock)?;

    step("Cart B: 2 T-shirts in L, checks out at 09:10 and never pays");
    let in_b = [StockLine::new(SHIRT, Some("L"), 2)];
    stock.hold_cart("cart-B", &in_b, opened + TimeDelta::minutes(10))?;
    let b = orders.checkout(
        CheckoutRequest::new(vec![OrderLine::new(SHIRT, Some("L"), 2, 2_500)]).cart("cart-B"),
        opened + TimeDelta::minutes(10),
    )?;
    table(&stock)?;

    step("Cart C: 3 mugs held at 09:12 (until 09:32), then the shopper walks away");
    let held = stock.hold_cart(
        "cart-C",
        &[StockLine::new(MUG, None, 3)],
        opened + TimeDelta::minutes(12),
    )?;
    println!(
        "  hold {} expires {}",
        held[0].id,
        held[0].expires_at.format("%H:%M")
    );
    table(&stock)?;

    step("09:40: cleanup releases cart B's unpaid order and cart C's abandoned hold");
    let now = opened + TimeDelta::minutes(40);
    let report = orders.cleanup_expired_payments(now)?;
    println!("  payments: {}", serde_json::to_string(&report)?);
    let report = stock.cleanup_expired_holds(now)?;
    println!("  holds: {}", serde_json::to_string(&report)?);
    let expired = orders.get_order(b.orders[0].id)?;
    println!(
        "  order {} is {} (payment {}): {}",
        expired.id,
        expired.status,
        expired.payment_status,
        expired.admin_notes.unwrap_or_default()
    );
    table(&stock)?;

    step("Someone asks for 5 T-shirts in L: refused, with the numbers");
    match stock.reserve_stock(SHIRT, 5, Some("L")) {
        Ok(_) => println!("  unexpectedly reserved"),
        Err(e) => {
            for line in serde_json::to_string_pretty(&e)?.lines() {
                println!("  {line}");
            }
        }
    }
    table(&stock)?;
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn table(stock: &StockService) -> Result<(), stockroom::Error> {
    println!(
        "  {:<10} {:<5} {:>9} {:>8} {:>4}",
        "product", "size", "available", "reserved", "sold"
    );
    for product in [MUG, SHIRT] {
        let name = stock.get_product(product)?.name;
        for row in stock.get_product_stock(product)? {
            println!(
                "  {:<10} {:<5} {:>9} {:>8} {:>4}",
                name,
                row.size.as_deref().unwrap_or("-"),
                row.available_quantity,
                row.reserved_quantity,
                row.sold_quantity
            );
        }
    }
    Ok(())
}
