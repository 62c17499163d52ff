//! Payment transactions as the payment application submits them, and the checks they pass
//! before anything is stored.
//!
//! - [`request`]: [`TransactionRequest`], the JSON body of `POST /v1/transactions` (also built
//!   directly by the simulator), and [`request::from_json`], which turns untrusted bytes into
//!   one (PAN scan of every string and key first, then field types, unknown fields refused).
//! - [`validate`]: field rules (lengths, formats, ranges, PAN guard) and the conversion to the
//!   wire type [`pb::Transaction`] with its content digest.
//! - [`pan`]: the PAN guard.
//! - [`intake`]: [`TransactionIntake::accept`], the one accept path of the local API and the
//!   simulator: lock check, validation, durable outbox.
//!
//! Numbers are not card data: `timestamp_ms`, `amount_minor`, `quantity` and
//! `unit_price_minor` are typed JSON numbers, range-checked, and never scanned for PANs (a
//! millisecond timestamp has 13 digits and would trip the guard one time in ten). A number in
//! a place that expects a string is refused as the wrong type.

pub mod intake;
pub use posfleet_proto::pan;
pub mod request;
pub mod validate;

#[cfg(test)]
mod tests;

use std::fmt;

pub use intake::{AcceptError, Accepted, TransactionIntake};
pub use request::{EntryMode, Kind, LineItemRequest, Status, TransactionRequest};
pub use validate::{ContentDigest, ValidTransaction};

/// One invalid field. The message says what is wrong and never repeats the value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldProblem {
    /// JSON path of the field, e.g. `amount_minor` or `items[2].sku`.
    pub field: String,
    pub message: String,
}

impl FieldProblem {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a transaction was refused before anything was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The body is not JSON at all (the message is the parser's, which never quotes input).
    Malformed { message: String },
    /// A full card number in these fields (paths only, never the number).
    Pan { fields: Vec<String> },
    /// Field-level problems, all of them at once.
    Invalid { problems: Vec<FieldProblem> },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Malformed { message } => write!(f, "the body is not valid JSON: {message}"),
            Refusal::Pan { fields } => write!(
                f,
                "a full card number (PAN) was found in {}; only a masked card (BIN + last 4) or \
                 a token may be sent; nothing was stored",
                fields.join(", ")
            ),
            Refusal::Invalid { problems } => {
                write!(f, "invalid transaction:")?;
                for p in problems {
                    write!(f, " {}: {};", p.field, p.message)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// Requests for tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A valid sale of `amount_minor` with id `txn_id`.
    pub(crate) fn sale(txn_id: &str, amount_minor: i64) -> TransactionRequest {
        TransactionRequest {
            txn_id: txn_id.to_owned(),
            timestamp_ms: 1_764_242_400_000,
            amount_minor,
            currency: "EUR".into(),
            kind: Kind::Sale,
            status: Status::Approved,
            masked_card: Some("411111******1111".into()),
            card_token: None,
            card_brand: Some("visa".into()),
            entry_mode: Some(EntryMode::Chip),
            auth_code: Some("A1B2C3".into()),
            response_code: Some("00".into()),
            merchant_id: "MER-001".into(),
            store_id: None,
            operator_id: None,
            items: vec![LineItemRequest {
                sku: "SKU-1".into(),
                quantity: 1,
                unit_price_minor: amount_minor,
            }],
        }
    }

    pub(crate) fn valid(txn_id: &str, amount_minor: i64) -> ValidTransaction {
        sale(txn_id, amount_minor)
            .validate()
            .expect("the fixture is valid")
    }
}
