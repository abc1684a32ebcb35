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
    assert!(out.contains("report: {\"processed_count\":1,\"failed_count\":0,\"errors\":[]}"));
    assert!(out.contains(
        "is cancelled (payment expired): Payment expired at 2026-11-26 09:25:00 UTC. \
         Stock unreserved automatically."
    ));
    assert_eq!(table_after(&out, "09:30")[1], "T-shirt L 2 0 0");
    assert!(out.contains("\"error_code\": \"INSUFFICIENT_STOCK\""));
    assert!(out.contains("\"available_quantity\": 2"));
    assert!(out.contains("\"requested_quantity\": 5"));
    assert!(out.contains("\"size\": \"L\""));
    assert!(out.contains("orders now pending"));
}
