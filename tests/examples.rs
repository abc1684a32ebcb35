//! Each example in examples/ runs as a real process and prints what its story promises.

use std::path::PathBuf;
use std::process::Command;

/// The example binary that `cargo test` built next to this test.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile folder");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with cargo test, which builds the examples",
        path.display()
    );
    path
}

fn run(name: &str) -> String {
    let out = Command::new(example(name)).output().expect("run example");
    assert!(
        out.status.success(),
        "example {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The rows of the stock table printed after the step whose title starts with `step`.
fn table_after(output: &str, step: &str) -> Vec<String> {
    let start = output
        .find(&format!("== {step}"))
        .unwrap_or_else(|| panic!("step {step:?} not printed"));
    output[start..]
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("product"))
        .skip(1)
        .take_while(|l| l.starts_with("  ") && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn checkout_example_tells_the_whole_story() {
    let out = run("checkout");
    assert!(out.starts_with("stockroom on a SQLite file: "), "{out}");
    assert!(out.contains("shop.db"), "{out}");
    assert_eq!(
        table_after(&out, "Cart A pays"),
        [
            "Mug - 8 0 2",
            "T-shirt L 2 0 0",
            "T-shirt M 2 0 1",
            "T-shirt S 4 0 0"
        ]
    );
    assert_eq!(
        table_after(&out, "Cart B")[1],
        "T-shirt L 0 2 0",
        "cart B's reservation"
    );
    assert_eq!(
        table_after(&out, "Cart C")[0],
        "Mug - 5 3 2",
        "cart C's hold"
    );
    assert!(out.contains("payments: {\"processed_count\":1,\"failed_count\":0,\"errors\":[]}"));
    assert!(out.contains("holds: {\"processed_count\":1,\"failed_count\":0,\"errors\":[]}"));
    assert_eq!(
        table_after(&out, "09:40")[0],
        "Mug - 8 0 2",
        "cart C gave its mugs back"
    );
    assert!(out.contains(
        "is cancelled (payment expired): Payment expired at 2026-11-26 09:25:00 UTC. \
         Stock unreserved automatically."
    ));
    assert_eq!(table_after(&out, "09:40")[1], "T-shirt L 2 0 0");
    assert!(out.contains("\"error_code\": \"INSUFFICIENT_STOCK\""));
    assert!(out.contains("\"available_quantity\": 2"));
    assert!(out.contains("\"requested_quantity\": 5"));
    assert!(out.contains("\"size\": \"L\""));
    assert!(out.contains("orders now pending"));
}

#[test]
fn stock_report_example_prints_consistent_metrics() {
    let out = run("stock_report");
    assert!(
        out.starts_with("A day at the shop, 09:00 to 21:00 UTC"),
        "{out}"
    );
    assert!(
        out.contains("ledger: 4 stock rows checked, 0 mismatches"),
        "{out}"
    );
    let header = out.lines().find(|l| l.starts_with("product")).unwrap();
    assert!(header.contains("conversion") && header.contains("discrepancy"));
    let overall: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("overall"))
        .unwrap()
        .split_whitespace()
        .collect();
    let json_start = out.find("\n{").expect("metrics as JSON");
    let metrics: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap();
    let o = &metrics["overall"];
    let n = |k: &str| o[k].as_u64().unwrap();
    // The table and the JSON tell the same figures.
    assert_eq!(overall[1].parse::<u64>().unwrap(), n("units_reserved"));
    assert_eq!(overall[2].parse::<u64>().unwrap(), n("units_sold"));
    // At closing every reserved unit was sold, expired or released.
    assert_eq!(n("reserved_now"), 0);
    assert_eq!(
        n("units_reserved"),
        n("units_sold") + n("units_expired") + n("units_released")
    );
    assert!(n("units_expired") > 0 && n("units_sold") > 0);
    // The evening count found two mugs missing and the posters exact.
    assert_eq!(o["stock_accuracy"]["counts"], 2);
    assert_eq!(o["stock_accuracy"]["matched"], 1);
    assert_eq!(o["stock_accuracy"]["total_abs_discrepancy"], 2);
    assert_eq!(metrics["products"].as_array().unwrap().len(), 3);
}
