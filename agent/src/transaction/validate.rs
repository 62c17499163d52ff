//! Field rules of a [`TransactionRequest`] and its conversion to the wire type.
//!
//! The field rules and limits are `posfleet_proto::txrules` (shared with the controller, which
//! must store whatever a terminal accepts); this module applies them to a request.
//!
//! Every string is also checked first by the [PAN guard](super::pan) (SKUs as product codes);
//! a PAN anywhere refuses the whole transaction. The separators the guard joins digit groups with include the `. _ : / + =`
//! these fields allow, so an id must not hold 13 or more digits in groups (ids built from a
//! date and a counter, `2026-12-07-000123`, pass: dates are recognised).

use posfleet_proto::pb;
use posfleet_proto::txrules::{self, ItemFields, TxFields};
use sha2::{Digest, Sha256};

use super::pan::contains_pan_in;
use super::request::{EntryMode, Kind, Status, TransactionRequest};
use super::{FieldProblem, Refusal};

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
        let problems = txrules::check(&self.fields());
        if !problems.is_empty() {
            return Err(Refusal::Invalid {
                problems: problems
                    .into_iter()
                    .map(|p| FieldProblem::new(p.field, p.message))
                    .collect(),
            });
        }
        Ok(ValidTransaction::new(self.to_wire()))
    }

    /// The fields the shared rules check.
    fn fields(&self) -> TxFields<'_> {
        TxFields {
            txn_id: &self.txn_id,
            timestamp_ms: self.timestamp_ms,
            amount_minor: self.amount_minor,
            currency: &self.currency,
            masked_card: self.masked_card.as_deref(),
            card_token: self.card_token.as_deref(),
            card_brand: self.card_brand.as_deref(),
            auth_code: self.auth_code.as_deref(),
            response_code: self.response_code.as_deref(),
            merchant_id: &self.merchant_id,
            store_id: self.store_id.as_deref(),
            operator_id: self.operator_id.as_deref(),
            items: self
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
