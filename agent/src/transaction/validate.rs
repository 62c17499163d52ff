//! Field rules of a [`TransactionRequest`] and its conversion to the wire type.
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
//! Optional strings, when present, must not be empty. Every string is also checked by the
//! [PAN guard](super::pan) (SKUs as product codes); a PAN anywhere refuses the whole
//! transaction. The separators the guard joins digit groups with include the `. _ : / + =`
//! these fields allow, so an id must not hold 13 or more digits in groups (ids built from a
//! date and a counter, `2026-12-07-000123`, pass: dates are recognised).

use posfleet_proto::pb;
use sha2::{Digest, Sha256};

use super::pan::contains_pan_in;
use super::request::{EntryMode, Kind, Status, TransactionRequest};
use super::{FieldProblem, Refusal};

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

/// SHA-256 of a transaction's content (its protobuf encoding with `seq = 0`): what the
/// idempotency check compares.
pub type ContentDigest = [u8; 32];

/// A transaction that passed every rule, ready for the outbox (`seq` still 0).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTransaction {
    txn: pb::Transaction,
    /// The protobuf encoding of `txn` (without seq): hashed for the digest, and the tail of
    /// the stored record (see [`ValidTransaction::encode_sequenced`]).
    encoded: Vec<u8>,
    digest: ContentDigest,
}

impl ValidTransaction {
    pub fn txn_id(&self) -> &str {
        &self.txn.txn_id
    }

    pub fn digest(&self) -> &ContentDigest {
        &self.digest
    }

    /// The wire record with its sequence number.
    pub fn sequenced(&self, seq: u64) -> pb::Transaction {
        pb::Transaction {
            seq,
            ..self.txn.clone()
        }
    }

    /// Appends the protobuf encoding of [`ValidTransaction::sequenced`] to `out` without
    /// encoding again: `seq` is field 1, which prost writes first, so the encoding is the
    /// seq field followed by the encoding without it (a test holds this to be exact).
    pub(crate) fn encode_sequenced(&self, seq: u64, out: &mut Vec<u8>) {
        if seq != 0 {
            prost::encoding::uint64::encode(1, &seq, out);
        }
        out.extend_from_slice(&self.encoded);
    }

    /// Length of [`ValidTransaction::encode_sequenced`]'s output, at most.
    pub(crate) fn max_encoded_len(&self) -> usize {
        self.encoded.len() + 11
    }

    /// Builds one from a stored wire record.
    #[cfg(test)]
    pub(crate) fn from_wire(txn: &pb::Transaction) -> Self {
        Self::new(pb::Transaction {
            seq: 0,
            ..txn.clone()
        })
    }

    /// `txn` must have `seq = 0`.
    fn new(txn: pb::Transaction) -> Self {
        use prost::Message;
        let encoded = txn.encode_to_vec();
        let digest = Sha256::digest(&encoded).into();
        Self {
            txn,
            encoded,
            digest,
        }
    }
}

impl TransactionRequest {
    /// Applies every rule; PANs are reported before (and instead of) other problems.
    pub fn validate(&self) -> Result<ValidTransaction, Refusal> {
        let pans: Vec<String> = self
            .strings()
            .filter(|(field, s)| contains_pan_in(s, super::request::kind_of(field)))
            .map(|(field, _)| field)
            .collect();
        if !pans.is_empty() {
            return Err(Refusal::Pan { fields: pans });
        }
        let mut v = Rules::default();
        v.text("txn_id", &self.txn_id, 64, is_id_char);
        if !(MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&self.timestamp_ms) {
            v.problem(
                "timestamp_ms",
                "must be Unix milliseconds between 2000-01-01 and 2100-01-01",
            );
        }
        if self.amount_minor < 0 {
            v.problem(
                "amount_minor",
                "must not be negative (a refund is kind \"refund\" with a positive amount)",
            );
        } else if self.amount_minor > MAX_AMOUNT_MINOR {
            v.problem(
                "amount_minor",
                format!("must be at most {MAX_AMOUNT_MINOR}"),
            );
        }
        if !(self.currency.len() == 3 && self.currency.bytes().all(|b| b.is_ascii_uppercase())) {
            v.problem(
                "currency",
                "must be an ISO-4217 code: three capital letters, e.g. EUR",
            );
        }
        if let Some(masked) = &self.masked_card {
            if !is_masked_card(masked) {
                v.problem(
                    "masked_card",
                    "must be a 6-8 digit BIN, 2-9 mask characters (* or X) and the last 4 \
                     digits, e.g. 411111******1111",
                );
            }
        }
        v.optional("card_token", &self.card_token, 128, |c| {
            c.is_ascii_alphanumeric() || "._:+/=-".contains(c)
        });
        v.optional("card_brand", &self.card_brand, 32, |c| {
            c.is_ascii_alphanumeric() || " _-".contains(c)
        });
        v.optional("auth_code", &self.auth_code, 12, |c| {
            c.is_ascii_alphanumeric()
        });
        v.optional("response_code", &self.response_code, 8, |c| {
            c.is_ascii_alphanumeric()
        });
        v.text("merchant_id", &self.merchant_id, 64, is_id_char);
        v.optional("store_id", &self.store_id, 64, is_id_char);
        v.optional("operator_id", &self.operator_id, 64, is_id_char);
        if self.items.len() > MAX_ITEMS {
            v.problem("items", format!("at most {MAX_ITEMS} line items"));
        }
        for (i, item) in self.items.iter().enumerate().take(MAX_ITEMS) {
            v.text(&format!("items[{i}].sku"), &item.sku, 64, |c| {
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
        if !v.problems.is_empty() {
            return Err(Refusal::Invalid {
                problems: v.problems,
            });
        }
        Ok(ValidTransaction::new(self.to_wire()))
    }

    /// Every string field with its path.
    fn strings(&self) -> impl Iterator<Item = (String, &str)> {
        let fixed = [
            ("txn_id", Some(self.txn_id.as_str())),
            ("currency", Some(self.currency.as_str())),
            ("masked_card", self.masked_card.as_deref()),
            ("card_token", self.card_token.as_deref()),
            ("card_brand", self.card_brand.as_deref()),
            ("auth_code", self.auth_code.as_deref()),
            ("response_code", self.response_code.as_deref()),
            ("merchant_id", Some(self.merchant_id.as_str())),
            ("store_id", self.store_id.as_deref()),
            ("operator_id", self.operator_id.as_deref()),
        ];
        fixed
            .into_iter()
            .filter_map(|(f, s)| s.map(|s| (f.to_owned(), s)))
            .chain(
                self.items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (format!("items[{i}].sku"), item.sku.as_str())),
            )
    }

    fn to_wire(&self) -> pb::Transaction {
        let kind = match self.kind {
            Kind::Sale => pb::TransactionKind::Sale,
            Kind::Refund => pb::TransactionKind::Refund,
            Kind::Void => pb::TransactionKind::Void,
            Kind::Preauth => pb::TransactionKind::Preauth,
            Kind::Capture => pb::TransactionKind::Capture,
        };
        let status = match self.status {
            Status::Approved => pb::TransactionStatus::Approved,
            Status::Declined => pb::TransactionStatus::Declined,
            Status::Error => pb::TransactionStatus::Error,
        };
        let entry_mode = match self.entry_mode {
            None => pb::EntryMode::Unspecified,
            Some(EntryMode::Chip) => pb::EntryMode::Chip,
            Some(EntryMode::Contactless) => pb::EntryMode::Contactless,
            Some(EntryMode::Swipe) => pb::EntryMode::Swipe,
            Some(EntryMode::Manual) => pb::EntryMode::Manual,
            Some(EntryMode::Wallet) => pb::EntryMode::Wallet,
        };
        let text = |s: &Option<String>| s.clone().unwrap_or_default();
        pb::Transaction {
            seq: 0,
            txn_id: self.txn_id.clone(),
            timestamp_ms: self.timestamp_ms,
            amount_minor: self.amount_minor,
            currency: self.currency.clone(),
            kind: kind.into(),
            status: status.into(),
            masked_card: text(&self.masked_card),
            card_token: text(&self.card_token),
            card_brand: text(&self.card_brand),
            entry_mode: entry_mode.into(),
            auth_code: text(&self.auth_code),
            response_code: text(&self.response_code),
            merchant_id: self.merchant_id.clone(),
            store_id: text(&self.store_id),
            operator_id: text(&self.operator_id),
            items: self
                .items
                .iter()
                .map(|i| pb::LineItem {
                    sku: i.sku.clone(),
                    quantity: i.quantity,
                    unit_price_minor: i.unit_price_minor,
                })
                .collect(),
        }
    }
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
    problems: Vec<FieldProblem>,
}

impl Rules {
    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(FieldProblem::new(field, message));
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
        value: &Option<String>,
        max: usize,
        allowed: impl Fn(char) -> bool,
    ) {
        if let Some(value) = value {
            self.text(field, value, max, allowed);
        }
    }
}
