//! Every error's stable code and its serialized shape.

use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use stockroom::{Error, OrderId, OrderStatus, ProductId, ShortLine};

fn to_json(e: &Error) -> Value {
    serde_json::to_value(e).unwrap()
}

#[test]
fn insufficient_stock_has_the_shape_shops_use() {
    let e = Error::InsufficientStock {
        product_id: ProductId(123),
        size: Some("L".into()),
        available: 5,
        requested: 10,
        line: None,
    };
    assert_eq!(
        to_json(&e),
        json!({
            "error_code": "INSUFFICIENT_STOCK",
            "error_message": "not enough stock available for product 123 size L: 5 available, 10 requested",
            "product_id": 123,
            "available_quantity": 5,
            "requested_quantity": 10,
            "size": "L"
        })
    );
    let in_cart = Error::InsufficientStock {
        product_id: ProductId(123),
        size: None,
        available: 0,
        requested: 1,
        line: Some(6),
    };
    let v = to_json(&in_cart);
    assert_eq!(v["line"], 6);
    assert_eq!(v["size"], Value::Null);
    assert_eq!(
        v["error_message"],
        "not enough stock available for product 123: 0 available, 1 requested"
    );
}

#[test]
fn every_variant_has_its_code_and_numbers() {
    let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    let cases: Vec<(Error, &str, Value)> = vec![
        (
            Error::ProductNotFound {
                product_id: ProductId(1),
            },
            "PRODUCT_NOT_FOUND",
            json!({"product_id": 1}),
        ),
        (
            Error::SizeNotAvailable {
                product_id: ProductId(1),
                size: "XL".into(),
            },
            "SIZE_NOT_AVAILABLE",
            json!({"product_id": 1, "size": "XL"}),
        ),
        (
            Error::SizeRequired {
                product_id: ProductId(2),
            },
            "SIZE_REQUIRED",
            json!({"product_id": 2}),
        ),
        (
            Error::SizeNotApplicable {
                product_id: ProductId(3),
                size: "M".into(),
            },
            "SIZE_NOT_APPLICABLE",
            json!({"product_id": 3, "size": "M"}),
        ),
        (
            Error::InsufficientReserved {
                product_id: ProductId(4),
                size: None,
                reserved: 1,
                requested: 2,
                line: Some(0),
            },
            "INSUFFICIENT_RESERVED",
            json!({"product_id": 4, "size": null, "reserved_quantity": 1, "requested_quantity": 2, "line": 0}),
        ),
        (
            Error::InvalidQuantity {
                quantity: 0,
                max: 1_000_000,
                line: None,
            },
            "INVALID_QUANTITY",
            json!({"requested_quantity": 0, "max_quantity": 1_000_000}),
        ),
        (
            Error::InvalidLabel {
                field: "size",
                reason: "must not be empty".into(),
            },
            "INVALID_LABEL",
            json!({"field": "size"}),
        ),
        (
            Error::InvalidInput {
                reason: "no lines given".into(),
            },
            "INVALID_INPUT",
            json!({}),
        ),
        (
            Error::ProductExists {
                product_id: ProductId(5),
            },
            "PRODUCT_EXISTS",
            json!({"product_id": 5}),
        ),
        (
            Error::StockLimitExceeded {
                product_id: ProductId(6),
                size: Some("S".into()),
                current: 10,
                added: 5,
                max: 12,
            },
            "STOCK_LIMIT_EXCEEDED",
            json!({"product_id": 6, "size": "S", "current_quantity": 10, "added_quantity": 5, "max_quantity": 12}),
        ),
        (
            Error::OrderNotFound {
                order_id: OrderId(7),
            },
            "ORDER_NOT_FOUND",
            json!({"order_id": 7}),
        ),
        (
            Error::OrderNotCancellable {
                order_id: OrderId(8),
                status: OrderStatus::Pending,
            },
            "ORDER_NOT_CANCELLABLE",
            json!({"order_id": 8, "status": "pending"}),
        ),
        (Error::PaymentNotFound, "PAYMENT_NOT_FOUND", json!({})),
        (
            Error::PaymentExpired {
                payment_hash: "abc".into(),
                expired_at: t,
                lines: vec![ShortLine {
                    order_id: OrderId(9),
                    product_id: ProductId(10),
                    size: Some("M".into()),
                    available_quantity: 1,
                    requested_quantity: 3,
                }],
            },
            "PAYMENT_EXPIRED",
            json!({
                "payment_hash": "abc",
                "expired_at": "2026-01-02T03:04:05Z",
                "lines": [{"order_id": 9, "product_id": 10, "size": "M",
                           "available_quantity": 1, "requested_quantity": 3}]
            }),
        ),
        (
            Error::PaymentCancelled {
                payment_hash: "abc".into(),
            },
            "PAYMENT_CANCELLED",
            json!({"payment_hash": "abc"}),
        ),
        (
            Error::SchemaTooNew {
                found: 9,
                supported: 1,
            },
            "SCHEMA_TOO_NEW",
            json!({"found_version": 9, "supported_version": 1}),
        ),
        (
            Error::storage("sqlite", "disk I/O error"),
            "STORAGE",
            json!({}),
        ),
    ];
    for (error, code, fields) in cases {
        assert_eq!(error.code(), code);
        let mut expected = fields.as_object().unwrap().clone();
        expected.insert("error_code".into(), json!(code));
        expected.insert("error_message".into(), json!(error.to_string()));
        assert_eq!(to_json(&error), Value::Object(expected), "{code}");
        let message = error.to_string();
        assert!(!message.ends_with('.'), "{code}: {message}");
        assert!(
            message.chars().next().unwrap().is_lowercase(),
            "{code}: {message}"
        );
    }
}

#[test]
fn messages_carry_the_numbers() {
    let e = Error::PaymentExpired {
        payment_hash: "abc".into(),
        expired_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
        lines: vec![ShortLine {
            order_id: OrderId(9),
            product_id: ProductId(10),
            size: None,
            available_quantity: 1,
            requested_quantity: 3,
        }],
    };
    assert_eq!(
        e.to_string(),
        "payment abc expired at 2026-01-02 03:04:05 UTC and its stock is gone \
         (product 10: 1 available, 3 requested)"
    );
    let storage = Error::storage("sqlite", "disk I/O error");
    assert_eq!(storage.to_string(), "sqlite storage error: disk I/O error");
    assert_eq!(
        std::error::Error::source(&storage).unwrap().to_string(),
        "disk I/O error"
    );
}
