//! [`TransactionRequest`]: the JSON body of `POST /v1/transactions`, and [`from_json`], the
//! only way untrusted bytes become one.
//!
//! ```json
//! { "txn_id": "A7F3-000129", "timestamp_ms": 1764242400000, "amount_minor": 1250,
//!   "currency": "EUR", "kind": "sale", "status": "approved",
//!   "masked_card": "411111******1111", "card_brand": "visa", "entry_mode": "contactless",
//!   "auth_code": "A1B2C3", "response_code": "00", "merchant_id": "MER-001",
//!   "store_id": "ST-12", "operator_id": "OP-7",
//!   "items": [ { "sku": "SKU-1001", "quantity": 2, "unit_price_minor": 625 } ] }
//! ```
//!
//! [`from_json`] works in this order, so that no error message can echo card data:
//! 1. parse as JSON (parser errors name a line and column, never the input);
//! 2. scan **every** string value and every object key, known or not, with the PAN guard
//!    (SKUs as product codes: a lone GTIN with a valid GS1 check digit passes);
//! 3. check the shape: every field known (`deny_unknown_fields`), of the right JSON type,
//!    required fields present, enum values known. Messages name the field, never the value;
//! 4. build the typed request. The field rules of [`super::validate`] run afterwards, in the
//!    accept path shared with the simulator.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::pan::{TextKind, contains_pan, contains_pan_in};
use super::{FieldProblem, Refusal};

/// What happened at the till.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Sale,
    Refund,
    Void,
    Preauth,
    Capture,
}

/// The outcome of the authorisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Approved,
    Declined,
    Error,
}

/// How the card was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryMode {
    Chip,
    Contactless,
    Swipe,
    Manual,
    Wallet,
}

/// One basket line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineItemRequest {
    pub sku: String,
    pub quantity: u32,
    /// Minor units; negative for a discount line.
    pub unit_price_minor: i64,
}

/// A transaction as the payment application submits it (field rules: [`super::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransactionRequest {
    /// The payment application's id: the idempotency key.
    pub txn_id: String,
    /// When the transaction happened, Unix milliseconds (terminal clock).
    pub timestamp_ms: u64,
    /// Minor units (cents), never negative: a refund is `kind = refund` with a positive amount.
    pub amount_minor: i64,
    /// ISO-4217 alphabetic code, e.g. `EUR`.
    pub currency: String,
    pub kind: Kind,
    pub status: Status,
    /// BIN (6 or 8 digits), a mask of `*`/`X`, and the last 4 digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_card: Option<String>,
    /// A payment token instead of, or besides, the masked card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_brand: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_mode: Option<EntryMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_code: Option<String>,
    pub merchant_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<LineItemRequest>,
}

/// The JSON type a field must have.
#[derive(Clone, Copy)]
enum Shape {
    Str,
    /// An integer that fits `i64`.
    Int,
    /// A non-negative integer that fits `u64`.
    UInt,
    /// A non-negative integer that fits `u32`.
    UInt32,
    OneOf(&'static [&'static str]),
    Items,
}

const KINDS: &[&str] = &["sale", "refund", "void", "preauth", "capture"];
const STATUSES: &[&str] = &["approved", "declined", "error"];
const ENTRY_MODES: &[&str] = &["chip", "contactless", "swipe", "manual", "wallet"];

/// Every field of [`TransactionRequest`]: name, shape, required.
const FIELDS: &[(&str, Shape, bool)] = &[
    ("txn_id", Shape::Str, true),
    ("timestamp_ms", Shape::UInt, true),
    ("amount_minor", Shape::Int, true),
    ("currency", Shape::Str, true),
    ("kind", Shape::OneOf(KINDS), true),
    ("status", Shape::OneOf(STATUSES), true),
    ("masked_card", Shape::Str, false),
    ("card_token", Shape::Str, false),
    ("card_brand", Shape::Str, false),
    ("entry_mode", Shape::OneOf(ENTRY_MODES), false),
    ("auth_code", Shape::Str, false),
    ("response_code", Shape::Str, false),
    ("merchant_id", Shape::Str, true),
    ("store_id", Shape::Str, false),
    ("operator_id", Shape::Str, false),
    ("items", Shape::Items, false),
];

/// Every field of [`LineItemRequest`].
const ITEM_FIELDS: &[(&str, Shape, bool)] = &[
    ("sku", Shape::Str, true),
    ("quantity", Shape::UInt32, true),
    ("unit_price_minor", Shape::Int, true),
];

/// Parses an untrusted body (see the module docs for the order of the checks).
pub fn from_json(body: &[u8]) -> Result<TransactionRequest, Refusal> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Refusal::Malformed {
        message: e.to_string(),
    })?;
    let mut pan_fields = Vec::new();
    scan_for_pans(&value, &mut String::new(), &mut pan_fields);
    if !pan_fields.is_empty() {
        return Err(Refusal::Pan { fields: pan_fields });
    }
    let mut problems = Vec::new();
    check_object(&value, FIELDS, "", &mut problems);
    if !problems.is_empty() {
        return Err(Refusal::Invalid { problems });
    }
    // The shape check accepted exactly what the derive accepts; a failure here is a bug, and
    // its message could quote a value, so it is not passed on.
    serde_json::from_value(value).map_err(|_| Refusal::Invalid {
        problems: vec![FieldProblem::new("(body)", "not a valid transaction")],
    })
}

/// Collects the paths of every string value or key that holds a PAN. Paths only use known
/// field names and indexes; an unknown key shows as `(unknown field)`.
fn scan_for_pans(value: &Value, path: &mut String, found: &mut Vec<String>) {
    match value {
        Value::String(s) => {
            if contains_pan_in(s, kind_of(path)) {
                found.push(display_path(path));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                scan_for_pans(item, path, found);
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                if is_known_field(key) {
                    path.push_str(key);
                } else {
                    path.push_str("(unknown field)");
                }
                if contains_pan(key) {
                    found.push(format!("{} (the name)", display_path(path)));
                }
                scan_for_pans(item, path, found);
                path.truncate(len);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// The kind of text at `path`: line-item SKUs are product codes (a GTIN passes the guard).
pub(super) fn kind_of(path: &str) -> TextKind {
    if path.starts_with("items[") && path.ends_with("].sku") {
        TextKind::ProductCode
    } else {
        TextKind::General
    }
}

fn is_known_field(key: &str) -> bool {
    FIELDS
        .iter()
        .chain(ITEM_FIELDS)
        .any(|(name, ..)| *name == key)
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "(body)".to_owned()
    } else {
        path.to_owned()
    }
}

fn check_object(
    value: &Value,
    fields: &[(&str, Shape, bool)],
    prefix: &str,
    problems: &mut Vec<FieldProblem>,
) {
    let path = |name: &str| format!("{prefix}{name}");
    let Value::Object(map) = value else {
        let at = if prefix.is_empty() {
            "(body)".to_owned()
        } else {
            prefix.trim_end_matches('.').to_owned()
        };
        problems.push(FieldProblem::new(at, "must be a JSON object"));
        return;
    };
    for key in map.keys() {
        if !fields.iter().any(|(name, ..)| name == key) {
            problems.push(FieldProblem::new(
                path(&printable_key(key)),
                "unknown field",
            ));
        }
    }
    for (name, shape, required) in fields {
        match map.get(*name) {
            None | Some(Value::Null) => {
                if *required {
                    problems.push(FieldProblem::new(path(name), "missing"));
                }
            }
            Some(v) => check_shape(v, *shape, &path(name), problems),
        }
    }
}

fn check_shape(value: &Value, shape: Shape, path: &str, problems: &mut Vec<FieldProblem>) {
    let problem = |p: &mut Vec<FieldProblem>, m: &str| p.push(FieldProblem::new(path, m));
    match shape {
        Shape::Str => {
            if !value.is_string() {
                problem(problems, "must be a string");
            }
        }
        Shape::Int => {
            if value.as_i64().is_none() {
                problem(
                    problems,
                    "must be a whole number (minor units, at most 19 digits)",
                );
            }
        }
        Shape::UInt => {
            if value.as_u64().is_none() {
                problem(problems, "must be a non-negative whole number");
            }
        }
        Shape::UInt32 => {
            if value.as_u64().is_none_or(|n| u32::try_from(n).is_err()) {
                problem(problems, "must be a whole number between 0 and 4294967295");
            }
        }
        Shape::OneOf(options) => match value.as_str() {
            Some(s) if options.contains(&s) => {}
            _ => problem(problems, &format!("must be one of {}", options.join(", "))),
        },
        Shape::Items => match value.as_array() {
            Some(items) if items.len() > posfleet_proto::txrules::MAX_ITEMS => problem(
                problems,
                &format!("at most {} line items", posfleet_proto::txrules::MAX_ITEMS),
            ),
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_object(item, ITEM_FIELDS, &format!("{path}[{i}]."), problems);
                }
            }
            None => problem(problems, "must be an array of line items"),
        },
    }
}

/// An unknown key as it may appear in an error: printable ASCII, at most 40 characters.
/// (Keys were already checked for PANs.)
fn printable_key(key: &str) -> String {
    if key.is_empty() || key.len() > 40 || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        "(unprintable or long field name)".to_owned()
    } else {
        key.to_owned()
    }
}
