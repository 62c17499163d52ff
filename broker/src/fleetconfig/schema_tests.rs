//! Every rule's accept/refuse edges.

use serde_json::{Map, Value, json};

use super::*;

fn ok(key: &str, value: Value) {
    assert_eq!(check_entry(key, &value), Ok(()), "{key} = {value}");
}

fn refused(key: &str, value: Value) -> String {
    match check_entry(key, &value) {
        Ok(()) => panic!("{key} = {value} was accepted"),
        Err(e) => {
            assert!(!e.message.is_empty());
            e.message
        }
    }
}

#[test]
fn integer_ranges_are_inclusive_at_both_ends() {
    for (key, min, max) in [
        ("agent.max_offline_s", 5i64, 2_592_000i64),
        ("agent.heartbeat_interval_s", 5, 3600),
        ("agent.telemetry_interval_s", 5, 86_400),
        ("payment.max_amount_minor", 1, 1_000_000_000_000),
        ("payment.contactless_limit_minor", 0, 1_000_000_000),
        ("display.brightness", 0, 100),
    ] {
        ok(key, json!(min));
        ok(key, json!(max));
        let low = refused(key, json!(min - 1));
        assert!(low.contains(&format!("between {min} and {max}")), "{low}");
        refused(key, json!(max + 1));
    }
}

#[test]
fn wrong_types_are_named() {
    let m = refused("display.brightness", json!("50"));
    assert!(m.contains("expected an integer, got a string"), "{m}");
    let m = refused("display.brightness", json!(50.5));
    assert!(m.contains("decimal"), "{m}");
    let m = refused("payment.max_amount_minor", json!(u64::MAX));
    assert!(m.contains("integer above"), "{m}");
    refused("display.brightness", json!(true));
    refused("display.brightness", Value::Null);
    let m = refused("payment.tips_enabled", json!("true"));
    assert!(m.contains("expected a boolean"), "{m}");
    refused("payment.tips_enabled", json!(1));
    ok("payment.tips_enabled", json!(false));
    let m = refused("store.name", json!(5));
    assert!(m.contains("expected a string, got an integer"), "{m}");
    refused("store.name", json!(["a"]));
    refused("store.name", json!({"a": 1}));
}

#[test]
fn string_patterns() {
    ok("payment.currency", json!("EUR"));
    for bad in ["eur", "EU", "EURO", "E1R", ""] {
        refused("payment.currency", json!(bad));
    }
    for good in ["en", "fr-CH"] {
        ok("display.language", json!(good));
    }
    for bad in ["EN", "en-ch", "fr_CH", "fra", "fr-CHE", "e"] {
        refused("display.language", json!(bad));
    }
    for good in ["pool.ntp.org", "ntp", "10.0.0.1", "a-b.example"] {
        ok("network.ntp_server", json!(good));
    }
    let long_label = format!("{}.org", "a".repeat(64));
    for bad in [
        "",
        "-a.org",
        "a-.org",
        "a..org",
        "a.org.",
        "a_b.org",
        "a b",
        &long_label,
    ] {
        refused("network.ntp_server", json!(bad));
    }
    for good in ["02:00-04:00", "23:30-00:30", "00:00-23:59"] {
        ok("maintenance.window", json!(good));
    }
    for bad in [
        "24:00-01:00",
        "02:60-03:00",
        "2:00-04:00",
        "02:00-02:00",
        "02:00",
        "02:00-04:00x",
        "0a:00-04:00",
    ] {
        refused("maintenance.window", json!(bad));
    }
    for good in [
        "Europe/Zurich",
        "America/Argentina/Buenos_Aires",
        "Etc/GMT+1",
    ] {
        ok("store.timezone", json!(good));
    }
    for bad in [
        "UTC",
        "europe/Zurich",
        "Europe/",
        "A/B/C/D",
        "Europe/Zü",
        "/Zurich",
    ] {
        refused("store.timezone", json!(bad));
    }
}

#[test]
fn text_lengths_and_control_characters() {
    ok("receipt.header", json!("é".repeat(200)));
    let m = refused("receipt.header", json!("é".repeat(201)));
    assert!(m.contains("201 characters"), "{m}");
    ok("receipt.footer", json!("Thank you!"));
    refused("receipt.footer", json!("line\nbreak"));
    refused("receipt.footer", json!("esc\u{1b}[2J"));
    ok("store.name", json!("s".repeat(100)));
    refused("store.name", json!("s".repeat(101)));
}

#[test]
fn unknown_keys_are_refused_but_custom_keys_take_any_scalar() {
    let m = refused("payment.curency", json!("EUR"));
    assert!(m.contains("unknown key"), "{m}");
    ok("custom.loyalty.program", json!("gold"));
    ok("custom.x", json!(-5));
    ok("custom.x", json!(true));
    ok("custom.x", json!("s".repeat(256)));
    refused("custom.x", json!("s".repeat(257)));
    refused("custom.x", json!(1.5));
    refused("custom.x", Value::Null);
    refused("custom.x", json!([1]));
    refused("custom.", json!(1));
    refused("custom", json!(1));
}

#[test]
fn key_syntax_and_length() {
    let at_limit = format!("custom.{}", "k".repeat(MAX_KEY_LEN - 7));
    ok(&at_limit, json!(1));
    let over = format!("custom.{}", "k".repeat(MAX_KEY_LEN - 6));
    let e = check_entry(&over, &json!(1)).unwrap_err();
    assert!(e.message.contains("bytes long"), "{}", e.message);
    assert!(
        e.key.chars().count() <= SHOWN_KEY_CHARS + 1,
        "long keys are cut"
    );
    for bad in ["", ".a", "a.", "a..b", "custom.a b", "custom.ä", "custom/a"] {
        assert!(check_key_syntax(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn messages_never_repeat_the_value() {
    let secret = "4111111111111111";
    for key in ["display.brightness", "payment.currency", "nope.key"] {
        let e = check_entry(key, &json!(secret)).unwrap_err();
        assert!(!e.message.contains(secret), "{}", e.message);
    }
}

#[test]
fn document_limits_and_all_errors_at_once() {
    let mut doc = Map::new();
    for i in 0..MAX_KEYS {
        doc.insert(format!("custom.k{i}"), json!(i));
    }
    assert!(check_document(&doc).is_empty());
    doc.insert("custom.one_more".into(), json!(1));
    let errors = check_document(&doc);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].key, DOCUMENT_FIELD);

    // 150 keys of 256 characters, 'x' (1 byte) or 'é' (2 bytes): pad to exactly the limit.
    let value = |e: usize| format!("{}{}", "é".repeat(e), "x".repeat(256 - e));
    let mut big = Map::new();
    for i in 0..150 {
        big.insert(format!("custom.k{i:03}"), json!(value(0)));
    }
    let mut missing = MAX_DOCUMENT_BYTES - serde_json::to_vec(&big).unwrap().len();
    for i in 0..150 {
        let e = missing.min(255);
        big.insert(format!("custom.k{i:03}"), json!(value(e)));
        missing -= e;
    }
    assert_eq!(missing, 0);
    assert_eq!(serde_json::to_vec(&big).unwrap().len(), MAX_DOCUMENT_BYTES);
    assert!(check_document(&big).is_empty());
    // One byte more (a key with room for one more 'é').
    let (key, room) = (0..150)
        .map(|i| format!("custom.k{i:03}"))
        .find_map(|k| {
            let e = big[&k]
                .as_str()
                .unwrap()
                .chars()
                .filter(|c| *c == 'é')
                .count();
            (e < 256).then_some((k, e))
        })
        .unwrap();
    big.insert(key, json!(value(room + 1)));
    let errors = check_document(&big);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].message.contains("65537 bytes of JSON"),
        "{errors:?}"
    );

    let mixed: Map<String, Value> = serde_json::from_value(json!({
        "display.brightness": 101,
        "payment.currency": "eur",
        "store.name": "ok",
        "bogus": 1,
    }))
    .unwrap();
    let errors = check_document(&mixed);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["bogus", "display.brightness", "payment.currency"]);
}

#[test]
fn the_schema_view_lists_every_key() {
    let view = view();
    assert_eq!(view.keys.len(), KEYS.len());
    let currency = view
        .keys
        .iter()
        .find(|k| k.key == "payment.currency")
        .unwrap();
    assert_eq!(currency.kind, "string");
    assert!(currency.rule.contains("ISO 4217"));
    let mut sorted: Vec<&str> = KEYS.iter().map(|k| k.key).collect();
    sorted.sort_unstable();
    assert_eq!(sorted, KEYS.iter().map(|k| k.key).collect::<Vec<_>>());
}

/// Issue 10 item 7: a card number in a value (any notation, string or integer) or in a key,
/// and control or bidi characters in text, are refused naming the key, never echoing it.
#[test]
fn card_numbers_and_bidi_controls_are_refused_in_values_and_keys() {
    for value in [
        json!("4111.1111.1111.1111"),
        json!("4111a1111b1111c1111"),
        json!("ref 4111:1111:1111:1111"),
        json!(4_111_111_111_111_111i64),
    ] {
        let message = refused("custom.ref", value.clone());
        assert!(message.contains("card number"), "{value}: {message}");
    }
    for key in ["store.name", "receipt.footer", "network.ntp_server"] {
        let message = refused(key, json!("4111.1111.1111.1111"));
        assert!(message.contains("card number"), "{key}: {message}");
    }
    for text in [
        "a\u{202E}b",
        "a\u{2066}b",
        "a\u{200F}b",
        "a\u{061C}b",
        "a\tb",
    ] {
        refused("custom.note", json!(text));
        refused("store.name", json!(text));
    }
    let e = check_entry("custom.4111.1111.1111.1111", &json!("x")).unwrap_err();
    assert!(!e.key.contains("1111.1111"), "the key is echoed: {e:?}");
    // Legitimate values next to them still pass.
    ok("custom.when", json!("2026-12-07 07:33:31.123456"));
    ok("custom.amount", json!("1,234,567.89"));
    ok("custom.iban", json!("DE89 3704 0044 0532 0130 00"));
    ok("custom.when_ms", json!(1_764_242_400_000i64));
}
