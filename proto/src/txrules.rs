//! The field rules a terminal applies to a transaction before it stores it (the agent's local
//! API and simulator), here so that the controller can hold itself to storing everything a
//! terminal accepts (`broker/src/txstore/validate.rs`) without depending on the agent.
//!
//! | field | rule |
//! | --- | --- |
//! | `txn_id` | 1–64 characters `A-Z a-z 0-9 . _ : / -` |
//! | `timestamp_ms` | between 2000-01-01 and 2100-01-01 (Unix ms) |
//! | `amount_minor` | 0 ..= 10^12 |
//! | `currency` | three capital letters (ISO-4217 alphabetic format) |
//! | `masked_card` | 6–8 digit BIN, 2–9 mask characters `*`/`X`/`x`, last 4 digits; 13–19 long |
//! | `card_token` | 1–128 characters `A-Z a-z 0-9 . _ : + / = -` |
//! | `card_brand` | 1–32 characters `A-Z a-z 0-9 _ -` and space |
//! | `auth_code`, `response_code` | 1–12 and 1–8 letters or digits |
//! | `merchant_id` (required), `store_id`, `operator_id` | like `txn_id` |
//! | `items` | at most 200; `sku` 1–64 printable ASCII, `quantity` 1–100000, `unit_price_minor` within ±10^12 |
//!
//! Optional strings, when present, must not be empty. The PAN guard ([`crate::pan`]) runs
//! before these rules and is not part of them.

use crate::pb;

/// Most line items per transaction.
pub const MAX_ITEMS: usize = 200;
/// Largest amount (and absolute unit price), in minor units.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;
/// Earliest accepted timestamp: 2000-01-01T00:00:00Z.
pub const MIN_TIMESTAMP_MS: u64 = 946_684_800_000;
/// Latest accepted timestamp: 2100-01-01T00:00:00Z.
pub const MAX_TIMESTAMP_MS: u64 = 4_102_444_800_000;
/// Largest quantity of one line item.
pub const MAX_QUANTITY: u32 = 100_000;

/// The checked fields of one transaction, borrowed; an optional field is `None` when absent.
#[derive(Debug, Clone, PartialEq)]
pub struct TxFields<'a> {
    pub txn_id: &'a str,
    pub timestamp_ms: u64,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub masked_card: Option<&'a str>,
    pub card_token: Option<&'a str>,
    pub card_brand: Option<&'a str>,
    pub auth_code: Option<&'a str>,
    pub response_code: Option<&'a str>,
    pub merchant_id: &'a str,
    pub store_id: Option<&'a str>,
    pub operator_id: Option<&'a str>,
    pub items: Vec<ItemFields<'a>>,
}

/// The checked fields of one line item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemFields<'a> {
    pub sku: &'a str,
    pub quantity: u32,
    pub unit_price_minor: i64,
}

impl<'a> TxFields<'a> {
    /// The fields of a wire record; an empty optional string counts as absent (the wire form of
    /// an absent one).
    pub fn of_wire(txn: &'a pb::Transaction) -> Self {
        let optional = |s: &'a String| (!s.is_empty()).then_some(s.as_str());
        Self {
            txn_id: &txn.txn_id,
            timestamp_ms: txn.timestamp_ms,
            amount_minor: txn.amount_minor,
            currency: &txn.currency,
            masked_card: optional(&txn.masked_card),
            card_token: optional(&txn.card_token),
            card_brand: optional(&txn.card_brand),
            auth_code: optional(&txn.auth_code),
            response_code: optional(&txn.response_code),
            merchant_id: &txn.merchant_id,
            store_id: optional(&txn.store_id),
            operator_id: optional(&txn.operator_id),
            items: txn
                .items
                .iter()
                .map(|i| ItemFields {
                    sku: &i.sku,
                    quantity: i.quantity,
                    unit_price_minor: i.unit_price_minor,
                })
                .collect(),
        }
    }
}

/// One broken rule: the field's JSON path (e.g. `items[2].sku`) and what is wrong, never the
/// value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleProblem {
    pub field: String,
    pub message: String,
}

/// Applies every rule; all problems at once, in field order (empty: the transaction passes).
pub fn check(tx: &TxFields<'_>) -> Vec<RuleProblem> {
    let mut v = Rules::default();
    v.text("txn_id", tx.txn_id, 64, is_id_char);
    if !(MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&tx.timestamp_ms) {
        v.problem(
            "timestamp_ms",
            "must be Unix milliseconds between 2000-01-01 and 2100-01-01",
        );
    }
    if tx.amount_minor < 0 {
        v.problem(
            "amount_minor",
            "must not be negative (a refund is kind \"refund\" with a positive amount)",
        );
    } else if tx.amount_minor > MAX_AMOUNT_MINOR {
        v.problem(
            "amount_minor",
            format!("must be at most {MAX_AMOUNT_MINOR}"),
        );
    }
    if !(tx.currency.len() == 3 && tx.currency.bytes().all(|b| b.is_ascii_uppercase())) {
        v.problem(
            "currency",
            "must be an ISO-4217 code: three capital letters, e.g. EUR",
        );
    }
    if let Some(masked) = tx.masked_card {
        if !is_masked_card(masked) {
            v.problem(
                "masked_card",
                "must be a 6-8 digit BIN, 2-9 mask characters (* or X) and the last 4 \
                 digits, e.g. 411111******1111",
            );
        }
    }
    v.optional("card_token", tx.card_token, 128, |c| {
        c.is_ascii_alphanumeric() || "._:+/=-".contains(c)
    });
    v.optional("card_brand", tx.card_brand, 32, |c| {
        c.is_ascii_alphanumeric() || " _-".contains(c)
    });
    v.optional("auth_code", tx.auth_code, 12, |c| c.is_ascii_alphanumeric());
    v.optional("response_code", tx.response_code, 8, |c| {
        c.is_ascii_alphanumeric()
    });
    v.text("merchant_id", tx.merchant_id, 64, is_id_char);
    v.optional("store_id", tx.store_id, 64, is_id_char);
    v.optional("operator_id", tx.operator_id, 64, is_id_char);
    if tx.items.len() > MAX_ITEMS {
        v.problem("items", format!("at most {MAX_ITEMS} line items"));
    }
    for (i, item) in tx.items.iter().enumerate().take(MAX_ITEMS) {
        v.text(&format!("items[{i}].sku"), item.sku, 64, |c| {
            c.is_ascii_graphic() || c == ' '
        });
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            v.problem(
                format!("items[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            );
        }
        if item.unit_price_minor.abs() > MAX_AMOUNT_MINOR {
            v.problem(
                format!("items[{i}].unit_price_minor"),
                format!("must be within -{MAX_AMOUNT_MINOR}..={MAX_AMOUNT_MINOR}"),
            );
        }
    }
    v.problems
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._:/-".contains(c)
}

/// `^[0-9]{6,8}[*Xx]{2,9}[0-9]{4}$`, 13 to 19 characters.
fn is_masked_card(s: &str) -> bool {
    let b = s.as_bytes();
    if !(13..=19).contains(&b.len()) {
        return false;
    }
    let bin = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let mask = b[bin..]
        .iter()
        .take_while(|c| matches!(c, b'*' | b'X' | b'x'))
        .count();
    let last = &b[bin + mask..];
    (6..=8).contains(&bin)
        && (2..=9).contains(&mask)
        && last.len() == 4
        && last.iter().all(u8::is_ascii_digit)
}

/// Collects problems.
#[derive(Default)]
struct Rules {
    problems: Vec<RuleProblem>,
}

impl Rules {
    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(RuleProblem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn text(&mut self, field: &str, value: &str, max: usize, allowed: impl Fn(char) -> bool) {
        if value.is_empty() {
            self.problem(field, "must not be empty");
        } else if value.chars().count() > max {
            self.problem(field, format!("longer than {max} characters"));
        } else if !value.chars().all(allowed) {
            self.problem(field, "contains characters that are not allowed here");
        }
    }

    fn optional(
        &mut self,
        field: &str,
        value: Option<&str>,
        max: usize,
        allowed: impl Fn(char) -> bool,
    ) {
        if let Some(value) = value {
            self.text(field, value, max, allowed);
        }
    }
}
