//! Request parsing and validation: the bad input the local API must refuse, field by field.

use serde_json::json;

use super::request::from_json;
use super::*;

const PAN: &str = "4111111111111111";

fn valid_json() -> serde_json::Value {
    json!({
        "txn_id": "A7F3-000129",
        "timestamp_ms": 1_764_242_400_000u64,
        "amount_minor": 1250,
        "currency": "EUR",
        "kind": "sale",
        "status": "approved",
        "masked_card": "411111******1111",
        "card_token": "tok_9fQ2xk",
        "card_brand": "visa",
        "entry_mode": "contactless",
        "auth_code": "A1B2C3",
        "response_code": "00",
        "merchant_id": "MER-001",
        "store_id": "ST-12",
        "operator_id": "OP-7",
        "items": [{ "sku": "SKU-1001", "quantity": 2, "unit_price_minor": 625 }]
    })
}

fn parse(value: &serde_json::Value) -> Result<ValidTransaction, Refusal> {
    from_json(value.to_string().as_bytes())?.validate()
}

fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
    let mut v = valid_json();
    v[field] = value;
    v
}

fn without(field: &str) -> serde_json::Value {
    let mut v = valid_json();
    v.as_object_mut().unwrap().remove(field);
    v
}

/// The fields named in an `Invalid` refusal.
fn invalid_fields(result: Result<ValidTransaction, Refusal>) -> Vec<String> {
    match result {
        Err(Refusal::Invalid { problems }) => problems.into_iter().map(|p| p.field).collect(),
        other => panic!("expected field problems, got {other:?}"),
    }
}

fn pan_fields(result: Result<ValidTransaction, Refusal>) -> Vec<String> {
    match result {
        Err(refusal @ Refusal::Pan { .. }) => {
            let text = refusal.to_string();
            assert!(
                !text.contains("1111111111"),
                "the message echoes the PAN: {text}"
            );
            let Refusal::Pan { fields } = refusal else {
                unreachable!()
            };
            fields
        }
        other => panic!("expected a PAN refusal, got {other:?}"),
    }
}

#[test]
fn a_complete_transaction_becomes_the_wire_record() {
    let valid = parse(&valid_json()).unwrap();
    assert_eq!(valid.txn_id(), "A7F3-000129");
    let wire = valid.sequenced(7);
    assert_eq!(wire.seq, 7);
    assert_eq!(wire.amount_minor, 1250);
    assert_eq!(wire.kind(), posfleet_proto::pb::TransactionKind::Sale);
    assert_eq!(
        wire.entry_mode(),
        posfleet_proto::pb::EntryMode::Contactless
    );
    assert_eq!(wire.items.len(), 1);
    assert_eq!(wire.items[0].quantity, 2);
}

#[test]
fn optional_fields_may_be_left_out_or_null() {
    let mut v = valid_json();
    let obj = v.as_object_mut().unwrap();
    for f in [
        "masked_card",
        "card_token",
        "card_brand",
        "auth_code",
        "response_code",
        "store_id",
        "operator_id",
        "items",
    ] {
        obj.remove(f);
    }
    obj.insert("entry_mode".into(), serde_json::Value::Null);
    parse(&v).unwrap();
}

#[test]
fn malformed_json_is_refused_without_echo() {
    for body in [
        &b"{"[..],
        b"",
        b"not json",
        b"{\"txn_id\": \"4111111111111111",
    ] {
        match from_json(body) {
            Err(Refusal::Malformed { message }) => assert!(!message.contains("1111")),
            other => panic!("expected malformed, got {other:?}"),
        }
    }
    assert_eq!(
        invalid_fields(parse(&json!([1, 2]))),
        vec!["(body)".to_owned()]
    );
}

#[test]
fn a_pan_in_any_field_is_refused_and_never_echoed() {
    assert_eq!(
        pan_fields(parse(&with("merchant_id", json!(PAN)))),
        ["merchant_id"]
    );
    assert_eq!(
        pan_fields(parse(&with("auth_code", json!("4111 1111 1111 1111")))),
        ["auth_code"]
    );
    assert_eq!(
        pan_fields(parse(&with("operator_id", json!("op-4111-1111-1111-1111")))),
        ["operator_id"]
    );
    assert_eq!(
        pan_fields(parse(&with("masked_card", json!(PAN)))),
        ["masked_card"]
    );
    assert_eq!(
        pan_fields(parse(&with("card_token", json!(PAN)))),
        ["card_token"]
    );
    let items = json!([
        { "sku": "ok", "quantity": 1, "unit_price_minor": 1 },
        { "sku": format!("x{PAN}"), "quantity": 1, "unit_price_minor": 1 }
    ]);
    assert_eq!(pan_fields(parse(&with("items", items))), ["items[1].sku"]);
    // Unknown fields and even field names are scanned before anything else looks at them.
    assert_eq!(
        pan_fields(parse(&with("note", json!(PAN)))),
        ["(unknown field)"]
    );
    assert_eq!(
        pan_fields(parse(&with(PAN, json!("x")))),
        ["(unknown field) (the name)"]
    );
    // A PAN in a string where a number belongs is still a PAN.
    assert_eq!(
        pan_fields(parse(&with("amount_minor", json!(PAN)))),
        ["amount_minor"]
    );
}

#[test]
fn numbers_are_not_card_data() {
    // A 13-digit millisecond timestamp that passes the Luhn check is still just a time
    // (2010-01-01: outside the Unix times the guard recognises in text, 2015-2037).
    let luhn_valid_ms = 1_262_304_000_008u64;
    assert!(pan::contains_pan(&luhn_valid_ms.to_string()));
    parse(&with("timestamp_ms", json!(luhn_valid_ms))).unwrap();
}

#[test]
fn missing_fields_are_named() {
    for f in [
        "txn_id",
        "timestamp_ms",
        "amount_minor",
        "currency",
        "kind",
        "status",
        "merchant_id",
    ] {
        assert_eq!(invalid_fields(parse(&without(f))), [f], "{f}");
    }
    assert_eq!(invalid_fields(parse(&json!({}))).len(), 7);
}

#[test]
fn wrong_types_and_unknown_values_are_named_without_the_value() {
    let cases = [
        ("amount_minor", json!(12.5)),
        ("amount_minor", json!("1250")),
        ("timestamp_ms", json!(-1)),
        ("txn_id", json!(42)),
        ("kind", json!("chargeback")),
        ("status", json!("APPROVED")),
        ("entry_mode", json!("telepathy")),
        ("items", json!({"sku": "x"})),
        ("merchant_id", json!(["a"])),
    ];
    for (field, value) in cases {
        match parse(&with(field, value.clone())) {
            Err(Refusal::Invalid { problems }) => {
                assert_eq!(problems.len(), 1, "{field} {value}");
                assert_eq!(problems[0].field, field);
                let raw = value.to_string();
                assert!(
                    !problems[0].message.contains(raw.trim_matches('"')),
                    "{field}: message {:?} echoes the value",
                    problems[0].message
                );
            }
            other => panic!("{field} {value}: {other:?}"),
        }
    }
    let item = json!([{ "sku": "a", "quantity": -1, "unit_price_minor": 1, "colour": "red" }]);
    assert_eq!(
        invalid_fields(parse(&with("items", item))),
        ["items[0].colour", "items[0].quantity"]
    );
}

#[test]
fn unknown_fields_are_refused() {
    assert_eq!(invalid_fields(parse(&with("tip", json!(100)))), ["tip"]);
    let long = "x".repeat(100);
    assert_eq!(
        invalid_fields(parse(&with(&long, json!(1)))),
        ["(unprintable or long field name)"]
    );
}

#[test]
fn out_of_range_values_are_named() {
    let cases = [
        ("amount_minor", json!(-1)),
        (
            "amount_minor",
            json!(posfleet_proto::txrules::MAX_AMOUNT_MINOR + 1),
        ),
        ("timestamp_ms", json!(0)),
        (
            "timestamp_ms",
            json!(posfleet_proto::txrules::MAX_TIMESTAMP_MS + 1),
        ),
        ("currency", json!("eur")),
        ("currency", json!("EURO")),
        ("currency", json!("E1R")),
        ("masked_card", json!("4111")),
        ("masked_card", json!("411111111111")),
        ("masked_card", json!("4111******1111")),
        ("txn_id", json!("")),
        ("txn_id", json!("x".repeat(65))),
        ("txn_id", json!("has space")),
        ("merchant_id", json!("m\u{7}")),
        ("card_brand", json!("v".repeat(33))),
        ("auth_code", json!("A-1")),
        ("store_id", json!("")),
        ("card_token", json!("tok en")),
        ("operator_id", json!("ôp")),
    ];
    for (field, value) in cases {
        assert_eq!(
            invalid_fields(parse(&with(field, value.clone()))),
            [field],
            "{field} = {value}"
        );
    }
}

#[test]
fn too_many_items_and_bad_items_are_named() {
    let item = json!({ "sku": "S", "quantity": 1, "unit_price_minor": 1 });
    let many = serde_json::Value::Array(vec![item; posfleet_proto::txrules::MAX_ITEMS + 1]);
    assert_eq!(invalid_fields(parse(&with("items", many))), ["items"]);
    let bad = json!([
        { "sku": "", "quantity": 0, "unit_price_minor": -1_000_000_000_001i64 },
        { "sku": "ok", "quantity": 1, "unit_price_minor": -50 }
    ]);
    assert_eq!(
        invalid_fields(parse(&with("items", bad))),
        [
            "items[0].sku",
            "items[0].quantity",
            "items[0].unit_price_minor"
        ]
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let mut v = with("amount_minor", json!(-5));
    v["currency"] = json!("euro");
    v["txn_id"] = json!("");
    assert_eq!(
        invalid_fields(parse(&v)),
        ["txn_id", "amount_minor", "currency"]
    );
}

#[test]
fn the_digest_is_the_content() {
    let a = parse(&valid_json()).unwrap();
    let b = from_json(valid_json().to_string().as_bytes())
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(a.digest(), b.digest());
    let c = parse(&with("amount_minor", json!(1251))).unwrap();
    assert_ne!(a.digest(), c.digest());
    assert_eq!(
        ValidTransaction::from_wire(&a.sequenced(9)).digest(),
        a.digest()
    );
}

#[test]
fn the_largest_transaction_fits_a_batch_many_times() {
    use prost::Message;
    let item = json!({ "sku": "S".repeat(64), "quantity": 100000, "unit_price_minor": -1_000_000_000_000i64 });
    let mut v = valid_json();
    for f in ["txn_id", "merchant_id", "store_id", "operator_id"] {
        v[f] = json!("x".repeat(64));
    }
    v["card_token"] = json!("t".repeat(128));
    v["items"] = serde_json::Value::Array(vec![item; posfleet_proto::txrules::MAX_ITEMS]);
    let wire = parse(&v).unwrap().sequenced(u64::MAX);
    let len = wire.encoded_len();
    assert!(len < 32 * 1024, "{len}");
    assert!(len * 7 < posfleet_proto::Channel::Transactions.max_payload());
}

#[test]
fn the_stored_encoding_is_the_wire_encoding() {
    use prost::Message;
    let valid = parse(&valid_json()).unwrap();
    for seq in [0, 1, 127, 128, 300, 1 << 40, u64::MAX] {
        let mut out = Vec::new();
        valid.encode_sequenced(seq, &mut out);
        assert_eq!(out, valid.sequenced(seq).encode_to_vec(), "seq {seq}");
        assert!(out.len() <= valid.max_encoded_len());
    }
}
